"""Version directories on the shared volume: named by version, made visible by one rename, pruned together
with what they depend on.

Invariant: a directory named `v<version>` is complete (every file its manifest names is written) or absent;
writers build it under `<name>.tmp` and rename it into place. Pruning never deletes a full version that a
retained delta is encoded against.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from asyncopd.ml.weights.manifest import Manifest, WeightSyncError


def version_dir(root: Path, version: int) -> Path:
    return root / f"v{version:08d}"


def version_of(path: Path) -> int | None:
    """The version a `v<version>` directory holds; None for anything else (`.tmp` directories, stray files)."""
    name = path.name
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def safetensors_files(path: str | Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def commit_dir(tmp: Path, final: Path) -> None:
    """Make a fully written directory visible under its final name, or not at all (fsynced: for results)."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def fresh_tmp(target: Path) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename a finished version into place. Not fsynced, unlike `commit_dir`: a version lives a few steps and
    a crashed learner republishes from its checkpoint, so durability buys nothing; the rename alone keeps
    readers from a partial directory. A version republished by a restarted learner replaces the old one."""
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


def prune(root: Path, keep_from: int) -> None:
    """Delete versions older than `keep_from` (readers never ask for them: the staleness budget), except the
    full versions that retained deltas are encoded against. A retained delta whose manifest cannot be read
    keeps the newest older full, the base it most likely needs."""
    versions = sorted((v, d) for d in root.glob("v*") if d.is_dir() and (v := version_of(d)) is not None)
    needed: set[int] = set()
    unsure = False
    for v, d in versions:
        if v < keep_from:
            continue
        try:
            m = Manifest.read(d)
        except WeightSyncError:
            unsure = True
            continue
        if m is not None and m.base is not None:
            needed.add(m.base)
    if unsure:
        fulls = [v for v, d in versions if v < keep_from and _is_full(d)]
        needed.update(fulls[-1:])
    for v, d in versions:
        if v < keep_from and v not in needed:
            shutil.rmtree(d, ignore_errors=True)


def _is_full(d: Path) -> bool:
    try:
        m = Manifest.read(d)
    except WeightSyncError:
        return False
    return m is None or m.kind == "full"
