"""`delta`: a full version every `full_every` versions, and in between each version as the XOR of its served
bits against the last full one, byte-shuffled and zstd-compressed (`delta.bin` + manifest + config.json).

Invariants:
- A delta is encoded against exactly one full version (its manifest's `base`/`base_id`), never against another
  delta: any version is that full plus one file, so a follower that missed versions reads one delta, a worker
  that joins a running job seeds from the newest full (the base of the head) plus one delta, and one bad file
  spoils one version, not a chain.
- What a follower hands its engine matches the manifest's per-tensor checksums; on a mismatch it reads the
  base from disk again (its cached copy may be the stale one) and replays the delta once more; if that fails
  too, the version is reported (WeightSyncError) and `recover` asks the publisher for a full copy.
- The publisher writes a full version whenever a delta would be unsafe: first publish, every `full_every`,
  a version at or below the base (a restarted learner), changed tensor names/shapes, or a base gone from disk.

Memory: the publisher keeps the base's bits and, for repairs, the last published tensors (two copies of the
model in the served dtype, on rank 0's host); a follower keeps the base (one copy).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncopd.ml.weights.codec import bits, checksum, decode_delta, encode_delta, served
from asyncopd.ml.weights.layout import fresh_tmp, replace_dir, version_dir
from asyncopd.ml.weights.manifest import MANIFEST, Manifest, TensorEntry, WeightSyncError
from asyncopd.ml.weights.transports.base import WeightFollower, WeightPublisher
from asyncopd.ml.weights.transports.filesystem import DTYPE_NAMES, dtype_name, read_full, write_full

log = logging.getLogger(__name__)

DELTA_FILE = "delta.bin"
WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class Base:
    version: int
    id: str
    tensors: dict[str, torch.Tensor]  # served dtype, owned (never a live parameter)


def write_delta(target: Path, version: int, tensors: dict[str, torch.Tensor], config_json: str, base: Base,
                dtype: torch.dtype) -> Manifest:
    tmp = fresh_tmp(target)
    entries, offset = {}, 0
    items = list(tensors.items())
    # zstd, numpy and torch release the GIL: tensors in parallel, written in order as they come, so at most a
    # window of frames is in memory, never the whole compressed version (up to a served copy at high lr)
    with ThreadPoolExecutor(WORKERS) as pool, open(tmp / DELTA_FILE, "wb") as fh:
        encoded = _in_order(pool, lambda item: encode_delta(item[1], bits(base.tensors[item[0]])), items, 2 * WORKERS)
        for (name, t), frame in zip(items, encoded, strict=True):
            fh.write(frame)
            entries[name] = TensorEntry(list(t.shape), dtype_name(t), checksum(t), offset, len(frame))
            offset += len(frame)
    (tmp / "config.json").write_text(config_json)
    files = {f.name: f.stat().st_size for f in tmp.iterdir()}
    manifest = Manifest("delta", version, DTYPE_NAMES[dtype], entries, files, base=base.version, base_id=base.id)
    manifest.write(tmp)
    replace_dir(tmp, target)
    return manifest


def _in_order(pool: ThreadPoolExecutor, fn, items: list, window: int):
    """`fn(item)` for each item, computed by `pool`, yielded in order with at most `window` results pending."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def apply_delta(location: Path, manifest: Manifest, base: Base) -> dict[str, torch.Tensor]:
    if set(manifest.tensors) != set(base.tensors):
        raise WeightSyncError("mismatch", f"{location}: tensors differ from those of base v{base.version}")
    try:
        fh = open(location / DELTA_FILE, "rb")  # noqa: SIM115 (closed below, after the pool is done with it)
    except FileNotFoundError as exc:  # pruned or replaced since its manifest was read
        raise WeightSyncError("missing", str(exc)) from exc

    def rebuild(item: tuple[str, TensorEntry]) -> torch.Tensor:
        name, e = item
        # Each worker reads its own frame: the file is never in memory whole (up to a served copy at high lr).
        frame = os.pread(fh.fileno(), e.length, e.offset)
        if len(frame) < e.length:
            raise WeightSyncError("truncated", f"{location}/{DELTA_FILE} ends before tensor {name}")
        t = decode_delta(frame, bits(base.tensors[name]), base.tensors[name].dtype, e.shape)
        if checksum(t) != e.checksum:
            raise WeightSyncError("checksum", f"{location}: tensor {name} does not match its checksum")
        return t

    with fh, ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(manifest.tensors, pool.map(rebuild, manifest.tensors.items()), strict=True))


class DeltaPublisher(WeightPublisher):
    name = "delta"

    def __init__(self, root: Path, dtype: torch.dtype, full_every: int) -> None:
        super().__init__(root)
        self.dtype, self.full_every = dtype, full_every
        self.base: Base | None = None
        self.last: tuple[int, dict[str, torch.Tensor], str] | None = None  # for repairs
        self.lock = threading.Lock()  # publish (the learner loop) and repairs (the responder thread)
        self.responder = None
        self.repaired: dict[int, str] = {}  # version -> id of the full copy a repair wrote
        self._bytes = 0

    def publish(self, version, state, config_json, owned=False):
        target = version_dir(self.root, version)
        tensors = served(state, self.dtype, copy=not owned)  # kept: as the base, and for repairs
        with self.lock:
            if self._needs_full(version, tensors):
                manifest = write_full(target, version, tensors, config_json, self.dtype)
                self.base = Base(version, manifest.id, tensors)
            else:
                assert self.base is not None
                manifest = write_delta(target, version, tensors, config_json, self.base, self.dtype)
            self.last = (version, tensors, config_json)
            self._bytes = manifest.bytes()
        return str(target)

    def _needs_full(self, version: int, tensors: dict[str, torch.Tensor]) -> bool:
        b = self.base
        if b is None or version <= b.version or version - b.version >= self.full_every:
            return True
        if {n: (t.shape, t.dtype) for n, t in tensors.items()} != {n: (t.shape, t.dtype) for n, t in b.tensors.items()}:
            return True
        return not (version_dir(self.root, b.version) / MANIFEST).exists()

    def write_full_copy(self, version: int) -> bool:
        """Rewrite `version` as a full version at its location, if it is the last one published (repairs).
        Several followers may ask for the same version: a full copy already written and still intact is not
        written again (rewriting would pull it from under the followers reading it)."""
        with self.lock:
            if self.last is None or self.last[0] != version:
                return False
            _, tensors, config_json = self.last
            target = version_dir(self.root, version)
            if self.repaired.get(version) is not None and self._intact(target, self.repaired[version]):
                return True
            self.repaired = {version: write_full(target, version, tensors, config_json, self.dtype).id}
            return True

    @staticmethod
    def _intact(target: Path, written_id: str) -> bool:
        try:
            manifest = Manifest.read(target)
            return manifest is not None and manifest.id == written_id and bool(read_full(target, manifest))
        except WeightSyncError:
            return False

    def last_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        if self.responder is not None:
            self.responder.close()


class DeltaFollower(WeightFollower):
    name = "delta"

    def __init__(self, redis=None, job_id: str | None = None) -> None:
        self.r, self.job_id = redis, job_id
        self.base: Base | None = None

    def reset(self) -> None:
        self.base = None

    def tensors(self, location):
        location = Path(location)
        manifest = Manifest.read(location)
        if manifest is None or manifest.kind == "full":
            tensors = read_full(location, manifest)
            if manifest is not None:
                self.base = Base(manifest.version, manifest.id, tensors)
            return tensors
        manifest.check_files(location)
        seeded = False
        if self.base is None or self.base.id != manifest.base_id:
            self._seed(location, manifest)
            seeded = True
        try:
            return apply_delta(location, manifest, self.base)
        except WeightSyncError as exc:
            if seeded or exc.reason != "checksum":
                raise
            log.warning("weights: %s; reading base v%d again and replaying the delta", exc, manifest.base)
            self._seed(location, manifest)
            return apply_delta(location, manifest, self.base)

    def _seed(self, location: Path, manifest: Manifest) -> None:
        """Load the full version the delta is encoded against, checked, as the new base."""
        self.base = None
        assert manifest.base is not None
        base_dir = version_dir(location.parent, manifest.base)
        base_manifest = Manifest.read(base_dir)
        if base_manifest is None or base_manifest.id != manifest.base_id:
            raise WeightSyncError("missing", f"{base_dir} is not the full version {location.name} was encoded "
                                  "against (replaced or pruned)")
        self.base = Base(base_manifest.version, base_manifest.id, read_full(base_dir, base_manifest))

    def recover(self, location, version, timeout_s, stopped=lambda: False):
        if self.r is None or self.job_id is None:
            return False
        from asyncopd.ml.weights.repair import WRITTEN, request_full

        answer = request_full(self.r, self.job_id, version, timeout_s, stopped)
        log.warning("weights: asked the learner for a full copy of version %d: %s", version, answer or "no answer")
        return answer == WRITTEN
