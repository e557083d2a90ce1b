"""Versioned weight directories: published atomically (write, rename), found by version, pruned."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def version_dir(root: Path, version: int) -> Path:
    return root / f"v{version:08d}"


def safetensors_files(path: str | Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def commit_dir(tmp: Path, final: Path) -> None:
    """Make a fully written directory visible under its final name, or not at all."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_version(state: dict, config_json: str, target: Path) -> None:
    """A policy version in HF layout (config.json + model.safetensors), renamed into place once complete.

    Not fsynced, unlike `commit_dir`: a version lives a few steps and a crashed learner republishes from its
    checkpoint, so durability buys nothing, while the rename alone keeps readers from a partial directory.
    Tensors sharing storage (tied embeddings) are written once, under their first name, as transformers does.
    """
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().contiguous()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(config_json)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


def prune(root: Path, keep_from: int) -> None:
    """Delete versions older than `keep_from`; readers never ask for them (the staleness budget)."""
    for d in root.glob("v*"):
        if d.is_dir() and d.name[1:].isdigit() and int(d.name[1:]) < keep_from:
            shutil.rmtree(d, ignore_errors=True)
