"""`filesystem`: every version is a full Hugging Face directory (config.json + model.safetensors in the served
dtype) plus a manifest with per-tensor checksums; followers reload the engine from the path.

The simplest transport and the one every other falls back to: a late joiner, the evaluator or a person can
read any full version with stock tools. Its follower checks that the files are complete (sizes against the
manifest) but hands the path to the engine as is, so vLLM reads the files itself; reading them once more
to checksum them would double the reload. The `delta` transport verifies every tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from asyncopd.ml.weights.codec import DTYPE_NAMES, checksum, served
from asyncopd.ml.weights.layout import fresh_tmp, replace_dir, version_dir
from asyncopd.ml.weights.manifest import Manifest, TensorEntry, WeightSyncError
from asyncopd.ml.weights.transports.base import WeightFollower, WeightPublisher

WEIGHTS_FILE = "model.safetensors"


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype) or str(t.dtype).removeprefix("torch.")


def write_full(target: Path, version: int, tensors: dict[str, torch.Tensor], config_json: str,
               dtype: torch.dtype, *, kind: str = "full", weights_file: str = WEIGHTS_FILE,
               config_file: str = "config.json") -> Manifest:
    """Write a full version in HF layout with its manifest, renamed into place once complete. The `adapter`
    transport writes its versions through here too, in PEFT's file names (`kind="adapter"`)."""
    from safetensors.torch import save_file

    tmp = fresh_tmp(target)
    save_file(tensors, tmp / weights_file, metadata={"format": "pt"})
    (tmp / config_file).write_text(config_json)
    entries = {name: TensorEntry(list(t.shape), dtype_name(t), checksum(t)) for name, t in tensors.items()}
    files = {f.name: f.stat().st_size for f in tmp.iterdir()}
    manifest = Manifest(kind, version, DTYPE_NAMES[dtype], entries, files)
    manifest.write(tmp)
    replace_dir(tmp, target)
    return manifest


def read_full(location: str | Path, manifest: Manifest | None) -> dict[str, torch.Tensor]:
    """The tensors of a full version, each checked against the manifest (when there is one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from asyncopd.ml.weights.layout import safetensors_files

    if manifest is not None:
        manifest.check_files(Path(location))
    tensors: dict[str, torch.Tensor] = {}
    try:
        for f in safetensors_files(location):
            tensors.update(load_file(f))
    except FileNotFoundError as exc:
        raise WeightSyncError("missing", str(exc)) from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightSyncError("corrupt", f"{location}: {exc}") from exc
    if manifest is not None:
        verify(tensors, manifest, location)
    return tensors


def verify(tensors: dict[str, torch.Tensor], manifest: Manifest, location) -> None:
    if set(tensors) != set(manifest.tensors):
        raise WeightSyncError("mismatch", f"{location}: tensors differ from the manifest's")
    for name, entry in manifest.tensors.items():
        if checksum(tensors[name]) != entry.checksum:
            raise WeightSyncError("checksum", f"{location}: tensor {name} does not match its checksum")


class FilesystemPublisher(WeightPublisher):
    name = "filesystem"

    def __init__(self, root: Path, dtype: torch.dtype) -> None:
        super().__init__(root)
        self.dtype = dtype
        self._bytes = 0

    def publish(self, version, state, config_json, owned=False):
        target = version_dir(self.root, version)
        self._bytes = write_full(target, version, served(state, self.dtype), config_json, self.dtype).bytes()
        return str(target)

    def last_bytes(self) -> int:
        return self._bytes


class FilesystemFollower(WeightFollower):
    name = "filesystem"

    def load(self, location, version, engine):
        manifest = Manifest.read(Path(location))
        if manifest is not None:
            if manifest.kind != "full":
                raise WeightSyncError("mismatch", f"{location} is a {manifest.kind} version: the learner publishes "
                                      "with another transport (set ASYNCOPD_WEIGHTS_TRANSPORT alike on both)")
            manifest.check_files(Path(location))
        engine.load_weights(str(location), version)

    def tensors(self, location: str) -> dict[str, torch.Tensor]:
        return read_full(location, Manifest.read(Path(location)))
