"""vLLM weight-transfer engines for the `nccl` weights transport, registered with vLLM's two factories.

vLLM 0.32 moves weights from a trainer into running engines with a pair of engines: a worker-side
`WeightTransferEngine` (inside vLLM, driven by `LLM.init_weight_transfer_engine` / `start_weight_update` /
`update_weights` / `finish_weight_update`) and a trainer-side `TrainerWeightTransferEngine`. This module adds:

- `asyncopd_nccl` (worker, GPUs): vLLM's NCCL engine with the two things it lacks for a job that must go on when
  a transfer fails. A failed receive restores the model before re-raising (`finalize_layerwise_reload` puts back
  the layers that never arrived; without it they stay on the meta device and the engine wedges), and a watchdog
  aborts the communicator when a receive outlives its timeout (NCCL collectives have none). The trainer side is
  vLLM's own `NCCLTrainerWeightTransferEngine`.
- `asyncopd_gloo` (worker and trainer, CPUs): the same round over a gloo group, so CI runs the whole path (vLLM's
  NCCL engine needs a GPU). Tensors travel packed into byte buffers of `buffer_bytes`, cut at the same
  boundaries on both sides from the round's metadata; gloo's own timeout bounds every collective.

`register()` is idempotent and is also the `vllm.general_plugins` entry point (pyproject.toml), so the worker
processes of a tensor-parallel engine have these engines too; an in-process engine gets them from the call in
`VLLMEngine`. Importing this module imports vLLM: only engines and the learner's transfer server do.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo

log = logging.getLogger(__name__)

GLOO, NCCL = "asyncopd_gloo", "asyncopd_nccl"
DEFAULT_BUFFER_BYTES = 64 << 20


def backend_for(device: str) -> str:
    """The worker-side backend an engine on `device` registers: NCCL between GPUs, gloo between CPUs."""
    return NCCL if device == "cuda" else GLOO


def chunk_plan(sizes: list[int], buffer_bytes: int) -> list[range]:
    """Consecutive tensor indices per packed buffer: a buffer closes once it holds `buffer_bytes` (a bigger
    tensor travels alone). Both sides cut the same plan from the same metadata, so no boundary is sent."""
    plan, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= buffer_bytes:
            plan.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        plan.append(range(start, len(sizes)))
    return plan


def restore_on_failure(model, model_config) -> None:
    """After a receive failed mid-way: the layers that never arrived get their previous tensors back (vLLM's
    layerwise reload left them on the meta device). The caller then loads the version another way."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    try:
        finalize_layerwise_reload(model, model_config)
    except Exception:  # the original error is the one to report
        log.exception("weights: restoring the model after a failed transfer")


@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    timeout_s: float = 60.0


@dataclass
class TensorsUpdateInfo(WeightTransferUpdateInfo):
    """One round's tensors, in the order they travel (the layout of vLLM's NCCL update info)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def sizes(self) -> list[int]:
        return [_numel(shape) * getattr(torch, dtype).itemsize
                for shape, dtype in zip(self.shapes, self.dtype_names, strict=True)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, listen_socket=None):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend="gloo",
                                                          listen_socket=listen_socket,
                                                          timeout=timedelta(seconds=timeout_s))


def destroy(group) -> None:
    """Shut a gloo group down (None: nothing to do); returns None, what the owner holds afterwards."""
    if group is not None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        stateless_destroy_torch_distributed_process_group(group)


def broadcast(group, tensor: torch.Tensor) -> None:
    """From group rank 0 (the trainer); a stateless group has no global ranks, so the group's own method."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, TensorsUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = TensorsUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.buffer_bytes = DEFAULT_BUFFER_BYTES

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.buffer_bytes = init_info.buffer_bytes
        self.group = gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info) -> None:
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except BaseException:
            restore_on_failure(self.model, self.model_config)
            raise

    def receive_weights(self, update_info: TensorsUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("asyncopd_gloo weight transfer: init_weight_transfer_engine first")
        from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

        sizes = update_info.sizes()
        for chunk in chunk_plan(sizes, self.buffer_bytes):
            buffer = torch.empty(sum(sizes[i] for i in chunk), dtype=torch.uint8)
            broadcast(self.group, buffer)
            self.model.load_weights(unpack_tensor(
                buffer, [update_info.names[i] for i in chunk], [update_info.shapes[i] for i in chunk],
                [getattr(torch, update_info.dtype_names[i]) for i in chunk], [sizes[i] for i in chunk]))

    def shutdown(self) -> None:
        self.group = destroy(self.group)


@dataclass(kw_only=True)
class WatchedNCCLInitInfo(NCCLWeightTransferInitInfo):
    timeout_s: float = 60.0


class WatchedNCCLWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL engine; a receive that fails restores the model, one that outlives the round's `timeout_s`
    is aborted: ncclCommAbort makes the blocked collective return with an error."""

    init_info_cls = WatchedNCCLInitInfo
    timeout_s = 60.0

    def init_transfer_engine(self, init_info: WatchedNCCLInitInfo) -> None:
        self.timeout_s = init_info.timeout_s
        super().init_transfer_engine(init_info)

    def update_weights(self, update_info) -> None:
        watchdog = threading.Timer(self.timeout_s, self._abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            super().update_weights(update_info)
        except BaseException:
            restore_on_failure(self.model, self.model_config)
            raise
        finally:
            watchdog.cancel()

    def _abort(self) -> None:
        log.warning("weights: NCCL receive outlived %.0fs; aborting the transfer communicator", self.timeout_s)
        self.shutdown()


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """`master_port` 0: any free port (the worker payload carries the one bound)."""

    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    timeout_s: float = 60.0


class GlooTrainerEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer side of `asyncopd_gloo`, the same round as vLLM's NCCL trainer engine: the followers'
    `init_weight_transfer_engine` runs while the trainer opens the group (both block in the rendezvous), their
    `update_weights` while it broadcasts."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.buffer_bytes = buffer_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     buffer_bytes=init_info.buffer_bytes)
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind((init_info.master_address, init_info.master_port))
        listen.listen()
        port = listen.getsockname()[1]
        worker = GlooInitInfo(master_address=init_info.master_address, master_port=port, rank_offset=1,
                              world_size=init_info.world_size, buffer_bytes=init_info.buffer_bytes,
                              timeout_s=init_info.timeout_s)
        with ThreadPoolExecutor(max_workers=1) as exe:
            future = exe.submit(client.init_weight_transfer_engine, asdict(worker))
            try:
                engine.group = gloo_group(init_info.master_address, port, 0, init_info.world_size,
                                          init_info.timeout_s, listen_socket=listen)
            finally:
                future.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        info = TensorsUpdateInfo([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                                 [list(m.shape) for m in meta])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, asdict(info))
            tensors = iter(self.source)
            for chunk in chunk_plan(info.sizes(), self.buffer_bytes):
                parts = [next(tensors)[1].contiguous().view(-1).view(torch.uint8) for _ in chunk]
                broadcast(self.group, torch.cat(parts))
            future.result()
        finally:
            exe.shutdown(wait=False)  # a follower stuck in the collective must not hang the trainer too
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = destroy(self.group)


def register() -> None:
    """Make both backends known to vLLM's factories (idempotent; the `vllm.general_plugins` entry point)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    if GLOO not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO, GlooWeightTransferEngine)
    if NCCL not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(NCCL, WatchedNCCLWeightTransferEngine)
    if GLOO not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO, GlooTrainerEngine)
