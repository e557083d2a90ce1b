"""A published version of any transport (or a plain HF directory) as a transformers model: what the learner's
held-out evaluation loads. A delta version has no weights file of its own; it is rebuilt from its base full
version with the same checks a rollout worker applies. An adapter version (or a LoRA job's exported adapter)
is merged into the base model its adapter_config.json names."""

from __future__ import annotations

from pathlib import Path

from asyncopd.ml.weights.manifest import Manifest


def load_causal_lm(location: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from asyncopd.ml import lora

    manifest = Manifest.read(Path(location)) if Path(location).is_dir() else None
    if (manifest is not None and manifest.kind == "adapter") or (manifest is None and lora.is_adapter_dir(location)):
        # An adapter version or a LoRA job's export: its base (adapter_config.json names it) with the adapter
        # merged in. A version's tensors are checked against its manifest first, as a follower would.
        if manifest is None:
            return lora.load_merged(location, dtype)
        from asyncopd.ml.weights.transports.adapter import AdapterFollower

        base = AutoModelForCausalLM.from_pretrained(lora.base_model_of(location), dtype=dtype)
        return lora.apply(base, location, AdapterFollower().tensors(location)).merge_and_unload()
    if manifest is None or manifest.kind == "full":
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    from asyncopd.ml.weights.transports.delta import DeltaFollower

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(location), dtype=dtype)
    missing, unexpected = model.load_state_dict(DeltaFollower().tensors(location), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # tied embeddings are stored once
        raise ValueError(f"{location} does not match its config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model
