"""The manifest of a published version (`manifest.json`, written last inside the version directory).

Invariant: the manifest names every file of the version with its size and every tensor with the checksum of
its bytes in the served dtype *after* reconstruction, so a reader can tell a complete, intact version from a
missing, truncated or corrupted one before handing anything to an engine. A delta names the full version it
is encoded against by number and by `id` (a random name per written full), because a restarted learner
rewrites version numbers: the id, not the number, says whether a cached base is the right one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "asyncopd-weights/1"

# Reasons a version cannot be loaded; the `reason` label of asyncopd_weight_sync_failures_total.
REASONS = ("missing", "truncated", "corrupt", "checksum", "manifest", "mismatch")


class WeightSyncError(Exception):
    """A published version that cannot be loaded as written. `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class TensorEntry:
    shape: list[int]
    dtype: str
    checksum: str  # xxh3-64 of the reconstructed tensor's bytes
    offset: int = 0  # delta: where its compressed frame starts in the delta file
    length: int = 0  # delta: the frame's length in bytes


@dataclass
class Manifest:
    kind: str  # "full" | "delta" | "adapter" (a LoRA adapter alone, PEFT layout: transports/adapter.py)
    version: int
    dtype: str
    tensors: dict[str, TensorEntry]
    files: dict[str, int]  # file name -> size in bytes
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    base: int | None = None  # delta: the full version it is encoded against
    base_id: str | None = None
    format: str = FORMAT

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest of a version directory; None for a plain HF directory (no manifest: the job's initial
        student, or a model a person put there). Raises WeightSyncError when the directory is gone or the
        manifest is unreadable."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            if not Path(directory).is_dir():
                raise WeightSyncError("missing", f"{directory} does not exist")
            return None
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            raw["tensors"] = {k: TensorEntry(**v) for k, v in raw["tensors"].items()}
            return cls(**raw)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            raise WeightSyncError("manifest", f"{path}: {exc}") from exc

    def check_files(self, directory: Path) -> None:
        """Every file the manifest names is there at its full size (a cheap check before any read)."""
        for name, size in self.files.items():
            path = Path(directory) / name
            if not path.exists():
                raise WeightSyncError("missing", f"{path} is missing")
            actual = path.stat().st_size
            if actual != size:
                raise WeightSyncError("truncated" if actual < size else "corrupt",
                                      f"{path} has {actual} bytes, the manifest says {size}")

    def bytes(self) -> int:
        return sum(self.files.values())
