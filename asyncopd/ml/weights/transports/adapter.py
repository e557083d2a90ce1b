"""`adapter`: each version of a LoRA student is its adapter alone, in PEFT's layout (`adapter_model.safetensors`
+ `adapter_config.json`) plus the manifest every version has, written and renamed into place by the same code
as a `filesystem` version (`write_full`). The base weights never change, so followers load them once (the job's
initial student) and apply each version's adapter (`Engine.load_adapter`).

Chosen by the job (`student.lora`), not by `ASYNCOPD_WEIGHTS_TRANSPORT`: an adapter is a few MB, so a delta of
it would save nothing, and learner and rollout workers read the same job spec, so they cannot disagree.
Versions share the head, lineage, fence and pruning rules of the other transports (`layout`, `head`).

The follower verifies every tensor against the manifest's checksums before the engine sees it (cheap at
adapter size), and hands the engine both the path (vLLM reads the directory itself) and the verified tensors
(the HF engine copies them into its adapters without reading the file again).
"""

from __future__ import annotations

from pathlib import Path

import torch

from asyncopd.ml.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from asyncopd.ml.weights.codec import served
from asyncopd.ml.weights.layout import version_dir
from asyncopd.ml.weights.manifest import Manifest, WeightSyncError
from asyncopd.ml.weights.transports.base import WeightFollower, WeightPublisher
from asyncopd.ml.weights.transports.filesystem import read_full, write_full


class AdapterPublisher(WeightPublisher):
    name = "adapter"

    def __init__(self, root: Path, dtype: torch.dtype) -> None:
        super().__init__(root)
        self.dtype = dtype
        self._bytes = 0

    def publish(self, version, state, config_json, owned=False):
        """`state`: the adapter's tensors (asyncopd.ml.lora.adapter_state); `config_json`: its
        adapter_config.json."""
        target = version_dir(self.root, version)
        manifest = write_full(target, version, served(state, self.dtype), config_json, self.dtype, kind="adapter",
                              weights_file=ADAPTER_WEIGHTS, config_file=ADAPTER_CONFIG)
        self._bytes = manifest.bytes()
        return str(target)

    def last_bytes(self) -> int:
        return self._bytes


class AdapterFollower(WeightFollower):
    name = "adapter"

    def tensors(self, location):
        manifest = Manifest.read(Path(location))
        if manifest is None or manifest.kind != "adapter":
            kind = "a plain model directory" if manifest is None else f"a {manifest.kind} version"
            raise WeightSyncError("mismatch", f"{location} is {kind}, not a LoRA adapter version")
        return read_full(location, manifest)

    def load(self, location, version, engine):
        engine.load_adapter(str(location), version, self.tensors(location))
