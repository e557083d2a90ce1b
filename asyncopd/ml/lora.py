"""LoRA students through PEFT: the learner wraps the student, engines and evaluation apply published adapters.

An adapter directory is PEFT's own layout (`adapter_config.json` + `adapter_model.safetensors`, keys as
`get_peft_model_state_dict` writes them), so a weight version, the job's export and any adapter a user
trained elsewhere load the same way, in `peft` and in vLLM (`LoRARequest`). `adapter_config.json` names the
base model (`base_model_name_or_path`): the student the job started from, which a reader loads once.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_config(spec, base_model: str):
    """The PEFT config of a job's `student.lora` (asyncopd.jobspec.Lora)."""
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      target_modules=spec.target_modules, task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def wrap(model, spec, base_model: str):
    """The student with fresh adapters (B = 0: the wrapped model computes exactly what the base did) and only
    the adapters trainable."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec, base_model))


def adapter_state(model) -> dict:
    """The adapter's tensors under the names PEFT saves them (no adapter name), detached clones: published
    versions must not alias parameters the optimizer changes in place."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def adapter_config_json(model) -> str:
    """`adapter_config.json` as `PeftModel.save_pretrained` writes it (inference mode, target modules as the
    list PEFT resolved `all-linear` to)."""
    import tempfile

    config = model.peft_config["default"]
    inference = config.inference_mode
    config.inference_mode = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            return (Path(tmp) / ADAPTER_CONFIG).read_text()
    finally:
        config.inference_mode = inference


def adapter_rank(path: str | Path) -> int:
    return int(json.loads((Path(path) / ADAPTER_CONFIG).read_text())["r"])


def base_model_of(path: str | Path) -> str:
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def apply(base, adapter_dir: str | Path, tensors: dict | None = None):
    """`base` (a transformers model) with the adapter at `adapter_dir`; `tensors` (its weights, already read
    and verified) spares reading the file again."""
    from peft import PeftModel

    if tensors is None:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    from peft import PeftConfig

    model = PeftModel(base, PeftConfig.from_pretrained(str(adapter_dir)))
    set_adapter_tensors(model, tensors)
    return model


def set_adapter_tensors(model, tensors: dict) -> None:
    """Load an adapter's tensors into a PeftModel of the same configuration; every adapter weight must be
    given (a version with missing or foreign tensors is the wrong adapter, never half-applied)."""
    from peft import set_peft_model_state_dict

    expected = {k for k in model.state_dict() if "lora_" in k}
    result = set_peft_model_state_dict(model, tensors)
    loaded = expected - set(result.missing_keys)
    if result.unexpected_keys or len(loaded) != len(expected) or len(tensors) != len(expected):
        raise ValueError(f"adapter tensors do not match the model's adapters: {len(tensors)} given, "
                         f"{len(expected)} expected, unexpected={result.unexpected_keys[:4]}")


def load_merged(adapter_dir: str | Path, dtype, base: str | None = None):
    """The adapter merged into its base model: a plain transformers model (evaluation generates with it, so
    no per-call adapter overhead)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base or base_model_of(adapter_dir), dtype=dtype)
    return apply(model, adapter_dir).merge_and_unload()


def vllm_max_rank(rank: int) -> int:
    """The smallest rank vLLM's LoRA kernels are built for that holds `rank`."""
    from asyncopd.jobspec import VLLM_LORA_RANKS

    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def save_adapter(directory: str | Path, tensors: dict, config_json: str) -> None:
    """An adapter directory in PEFT's layout (what `PeftModel.save_pretrained` writes, minus its model card)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(config_json)
