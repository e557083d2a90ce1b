"""Versioned weight directories: published atomically (write, fsync, rename), found by version, pruned."""

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


def prune(root: Path, keep_from: int) -> None:
    """Delete versions older than `keep_from`; readers never ask for them (the staleness budget)."""
    for d in root.glob("v*"):
        if d.is_dir() and d.name[1:].isdigit() and int(d.name[1:]) < keep_from:
            shutil.rmtree(d, ignore_errors=True)
