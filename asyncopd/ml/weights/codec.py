"""Tensor bytes: the served-dtype state a version holds, its checksums, and XOR deltas against a base.

Invariant: `decode_delta(encode_delta(t, bits(base)), bits(base), t.dtype)` is bit-identical to `t` (XOR of
the raw bit patterns, so no float arithmetic can round anything), and `checksum` covers exactly the bytes an
engine receives.

Why XOR + byte shuffle + zstd: at LLM learning rates most served (bf16) weights keep their bit pattern from one
version to the next, and those that change keep sign, exponent and upper mantissa bits, so the XOR is mostly
zero bytes. Grouping byte k of every element together (the "shuffle" of blosc/HDF5) puts those zero bytes in
long runs: on a 16M-parameter Llama at lr 1e-5 it cut zstd's output by ~20 % against the plain XOR, and zstd
runs faster on the shuffled bytes than on the plain XOR.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import xxhash
import zstandard

from asyncopd.ml.weights.manifest import WeightSyncError

INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ZSTD_LEVEL = 1  # level 3 wrote the same bytes (+-1 %) at half the speed on weight XORs


def served(state, dtype: torch.dtype | None, copy: bool = False) -> dict[str, torch.Tensor]:
    """The tensors a version holds: CPU, contiguous, in the served dtype (floating tensors; None keeps theirs);
    tensors sharing storage (tied embeddings) once, under their first name, as transformers saves them. `state`
    is a dict or an iterable of (name, tensor). The result may alias `state`'s tensors unless `copy` (then
    casting and copying are one)."""
    seen, out = set(), {}
    for name, tensor in state.items() if isinstance(state, Mapping) else state:
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        t = tensor.detach()
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if t.device.type != "cpu" and t.dtype != target:
            # Cast where the tensor is: torch copies a cross-device cast in the source dtype and casts on the host,
            # so an fp32 master would cross to the host at twice the served bytes into a full-precision temporary.
            # The price: one tensor's served copy on the device at a time.
            t = t.to(target)
        out[name] = t.to(device="cpu", dtype=target, copy=copy, memory_format=torch.contiguous_format)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of the same width (a view, no copy)."""
    return t.contiguous().view(INT_VIEWS[t.element_size()])


def raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def checksum(t: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(raw(t))


def shuffle(x: torch.Tensor) -> np.ndarray:
    """Byte k of every element together, k = 0..width-1 (uint8, flat): one strided numpy copy per byte plane
    into one buffer (5x faster here than torch's `.T.contiguous()` or shifts and casts)."""
    src = x.reshape(-1).numpy().view(np.uint8)
    width, n = x.element_size(), x.numel()
    out = np.empty(n * width, np.uint8)
    for k in range(width):
        out[k * n : (k + 1) * n] = src[k::width]
    return out


def unshuffle(planes: np.ndarray, width: int) -> torch.Tensor:
    """The inverse of `shuffle`: a flat tensor of `width`-byte integers."""
    n = planes.size // width
    out = np.empty(n * width, np.uint8)
    for k in range(width):
        out[k::width] = planes[k * n : (k + 1) * n]
    return torch.from_numpy(out).view(INT_VIEWS[width])


def encode_delta(t: torch.Tensor, base_bits: torch.Tensor) -> bytes:
    # A compressor per call: they are cheap to make and not safe to share between threads.
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor.compress(memoryview(shuffle(torch.bitwise_xor(bits(t), base_bits))))


def decode_delta(frame: bytes | memoryview, base_bits: torch.Tensor, dtype: torch.dtype,
                 shape: list[int]) -> torch.Tensor:
    width = base_bits.element_size()
    try:
        data = zstandard.ZstdDecompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise WeightSyncError("corrupt", f"zstd: {exc}") from exc
    if len(data) != base_bits.numel() * width:
        raise WeightSyncError("corrupt", f"{len(data)} bytes decoded, the base has {base_bits.numel() * width}")
    out = torch.bitwise_xor(unshuffle(np.frombuffer(data, np.uint8), width), base_bits.reshape(-1))
    return out.view(dtype).reshape(shape)
