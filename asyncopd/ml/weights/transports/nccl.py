"""`nccl`: rollout workers receive each version straight from the learner through vLLM's weight transfer
(NCCL between GPUs, gloo between CPUs: `asyncopd.ml.weights.vllm_transfer`), and every version is also
published through the fallback transport (`filesystem` or `delta`), which is what a follower loads whenever a
transfer cannot serve it.

Why both: a collective needs every member present at once, and a rollout worker reloads between its batches,
when its own fence or reload lag says so, not when the learner publishes. So the learner serves transfers on
request: a transfer server thread holds the two newest versions (served-dtype copies in host memory, streamed
to the device per tensor at send time) and forms one transfer group per round, from the followers that asked
for that version within a short gather window, then tears it down. A group per round is what lets workers join
late (scale-up), die, or lag without stalling the learner; a follower that joins a running job, asks for a
version the server no longer holds, or whose round fails, loads the version from the fallback transport and
counts it in `asyncopd_weight_sync_fallbacks_total{reason}`. The job goes on either way.

A round (Redis lists; the same pattern as `asyncopd.ml.weights.repair`):
1. follower RPUSHes `{member, version, location, ranks, backend, mailbox, until}` on the job's transfer list;
2. the server answers each request on its mailbox: `gone` (not a version it holds, or another backend), or
   `init` with that member's rank offset in a group of 1 + Σ ranks;
3. the trainer engine runs vLLM's handshake through `RoundClient`: `init` (members join the group while the
   trainer opens it), `update` (members start, receive and finish a layerwise reload while the trainer
   broadcasts), each acknowledged on the round's ack list; `abort` tells waiting members the round failed.
Every wait has a timeout (`weights_transfer_timeout_s`); gloo bounds its collectives with the same timeout,
NCCL through the engines' watchdogs.

What a round carries is the learner's copy of the version, not the files: it is not checksummed against the
manifest (the transfer's own transport is reliable; checksumming on the device would cost a copy per tensor).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from asyncopd.ml.weights.metrics import SYNC_FALLBACKS, TRANSFER_ROUNDS, TRANSFER_SECONDS
from asyncopd.ml.weights.transports.base import WeightFollower, WeightPublisher

log = logging.getLogger(__name__)

NO_VERSION = -1  # an engine's version after a round failed part-way and the fallback could not load it either
GATHER_S = 0.05  # after a first request, how long the server waits for others wanting the same version
MAILBOX_TTL_S = 120


def transfer_key(job_id: str) -> str:
    return f"asyncopd:job:{job_id}:weights:transfer"


class TransferRoundError(RuntimeError):
    pass


def _pop(r, key: str, timeout_s: float, stopped=lambda: False) -> dict | None:
    """The next message on `key` within `timeout_s` (waiting in slices of at most 1 s so `stopped` is seen)."""
    deadline = time.monotonic() + timeout_s
    while not stopped():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        got = r.blpop([key], timeout=max(0.01, min(1.0, remaining)))
        if got is not None:
            return json.loads(got[1])
    return None


def _post(r, key: str, message: dict) -> None:
    pipe = r.pipeline()
    pipe.rpush(key, json.dumps(message))
    pipe.expire(key, MAILBOX_TTL_S)
    pipe.execute()


def advertised_host(host: str) -> str:
    """The address followers reach the learner at: the setting, else this host's name resolved (a pod's IP)."""
    if host:
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


# ---------------------------------------------------------------------------------------------------- learner


@dataclass(frozen=True)
class Member:
    id: str
    mailbox: str
    ranks: int


class RoundClient:
    """vLLM's `VLLMWeightSyncClient` for one round's members, over Redis: the trainer engine drives the
    handshake through it as it would drive one engine's RPCs."""

    def __init__(self, r, round_id: str, members: list[Member], timeout_s: float) -> None:
        self.r, self.members, self.timeout_s = r, members, timeout_s
        self.acks = f"{round_id}:acks"

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offset = init_info["rank_offset"]
        for m in self.members:
            _post(self.r, m.mailbox, {"op": "init", "acks": self.acks, "init_info": {
                **init_info, "rank_offset": offset, "timeout_s": self.timeout_s}})
            offset += m.ranks
        self._wait("init")

    def start_weight_update(self) -> None:
        """Members start their update when the update info arrives (`update_weights`): one message less."""

    def update_weights(self, update_info) -> None:
        for m in self.members:
            _post(self.r, m.mailbox, {"op": "update", "update_info": update_info})
        self._wait("update")

    def finish_weight_update(self, weight_version=None) -> None:
        """Members finish as part of `update`."""

    def abort(self) -> None:
        for m in self.members:
            _post(self.r, m.mailbox, {"op": "abort"})

    def _wait(self, op: str) -> None:
        waiting = {m.id for m in self.members}
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            ack = _pop(self.r, self.acks, deadline - time.monotonic())
            if ack is None:
                raise TransferRoundError(f"{op}: no answer from {sorted(waiting)} within {self.timeout_s}s")
            if ack.get("error"):
                raise TransferRoundError(f"{op}: follower {ack['member']} failed: {ack['error']}")
            if ack.get("op") == op:
                waiting.discard(ack["member"])


def snapshot_source(tensors: dict[str, torch.Tensor], device: torch.device):
    """A vLLM `WeightSource` over a version's tensors, moved to `device` one at a time as they are sent."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class SnapshotSource(WeightSource):
        def metadata(self):
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]

        def __iter__(self):
            for name, t in tensors.items():
                yield name, t.to(device, non_blocking=True)

    return SnapshotSource()


class TransferServer:
    """The learner's (rank 0's) side: a daemon thread that serves rounds of the `HELD` newest offered versions.
    Two, not one: a worker fenced at version v often asks for it just after the learner published v + 1 (a
    short step, or a worker one batch behind), and a round for v is still better than v's files."""

    HELD = 2

    def __init__(self, r, job_id: str, *, device: str, host: str, port: int, timeout_s: float,
                 done=lambda: False, buffer_bytes: int | None = None) -> None:
        from asyncopd.ml.weights.vllm_transfer import DEFAULT_BUFFER_BYTES, backend_for, register

        register()
        self.r, self.job_id, self.key = r, job_id, transfer_key(job_id)
        self.backend = backend_for(device)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.host, self.port, self.timeout_s, self.done = advertised_host(host), port, timeout_s, done
        self.buffer_bytes = buffer_bytes or DEFAULT_BUFFER_BYTES
        self.held: dict[tuple[int, str], dict] = {}  # (version, location) -> tensors, oldest first
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"weights-transfer-{job_id}", daemon=True)
        self.thread.start()

    def offer(self, version: int, location: str, tensors: dict[str, torch.Tensor]) -> None:
        """Serve `version` from now on (tensors the caller no longer changes), and forget all but the `HELD`
        newest; a round in progress finishes with the tensors it started with."""
        held = {k: v for k, v in self.held.items() if k != (version, location)}
        held[(version, location)] = tensors
        self.held = dict(list(held.items())[-self.HELD:])  # swapped whole: the server thread reads a snapshot

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        while not self.stop.is_set():
            try:
                if self.done():
                    return
                first = _pop(self.r, self.key, 1.0, self.stop.is_set)
                if first is None:
                    continue
                requests = [first]
                deadline = time.monotonic() + GATHER_S
                while (more := _pop(self.r, self.key, max(0.0, deadline - time.monotonic()))) is not None:
                    requests.append(more)
                held = self.held
                rounds: dict[tuple[int, str], list[Member]] = {}
                for request in requests:
                    if (member := self._admit(request, held)) is not None:
                        rounds.setdefault((request["version"], request["location"]), []).append(member)
                for (version, location), members in sorted(rounds.items(), reverse=True):  # newest first
                    self._round((version, location, held[(version, location)]), members)
            except Exception:  # the server must outlive a failed round or a Redis hiccup
                log.exception("weights: transfer server")
                self.stop.wait(1.0)

    def _admit(self, request: dict, held: dict) -> Member | None:
        reason = None
        if request.get("until", float("inf")) < time.time():
            return None  # its follower stopped waiting and loaded the version another way
        if (request["version"], request["location"]) not in held:
            reason = "superseded"
        elif request["backend"] != self.backend:
            reason = "backend"
        if reason:
            _post(self.r, request["mailbox"], {"op": "gone", "reason": reason})
            return None
        return Member(request["member"], request["mailbox"], int(request["ranks"]))

    def _round(self, current, members: list[Member]) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        version, _, tensors = current
        client = RoundClient(self.r, f"{self.key}:round:{uuid.uuid4().hex}", members, self.timeout_s)
        world = 1 + sum(m.ranks for m in members)
        t0 = time.perf_counter()
        engine = None
        watchdog = None
        try:
            engine = WeightTransferTrainerFactory.trainer_init(self._init_info(world), client=client,
                                                               source=snapshot_source(tensors, self.device))
            if self.device.type == "cuda":  # NCCL collectives have no timeout: abort the communicator
                watchdog = threading.Timer(self.timeout_s, engine.shutdown)
                watchdog.daemon = True
                watchdog.start()
            engine.send_weights()
            TRANSFER_ROUNDS.labels("ok").inc()
            TRANSFER_SECONDS.observe(time.perf_counter() - t0)
            log.info("weights: v%d sent to %d follower(s) (%d ranks) in %.3fs", version, len(members), world - 1,
                     time.perf_counter() - t0)
        except Exception as exc:
            TRANSFER_ROUNDS.labels("failed").inc()
            log.warning("weights: transfer round of v%d to %s failed: %s", version, [m.id for m in members], exc)
            client.abort()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if engine is not None:
                engine.shutdown()

    def _init_info(self, world: int):
        from asyncopd.ml.weights.vllm_transfer import GLOO, GlooTrainerInitInfo

        if self.backend == GLOO:
            return GlooTrainerInitInfo(master_address=self.host, master_port=self.port, world_size=world,
                                       timeout_s=self.timeout_s, buffer_bytes=self.buffer_bytes, rank=0)
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(master_address=self.host, master_port=self.port or _free_port(self.host),
                                   world_size=world, packed_buffer_size_bytes=self.buffer_bytes, rank=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2 * self.timeout_s)  # its waits are 1 s slices; a round ends by its timeout


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NcclPublisher(WeightPublisher):
    """Publishes through `inner` (every version complete on the shared volume before it is announced, as
    always), then offers the same tensors to the transfer server."""

    name = "nccl"

    def __init__(self, inner: WeightPublisher, server: TransferServer, dtype: torch.dtype) -> None:
        super().__init__(inner.root)
        self.inner, self.server, self.dtype = inner, server, dtype

    def publish(self, version, state, config_json, owned=False):
        from asyncopd.ml.weights.codec import served

        # Owned: the server keeps them past this call, and the optimizer changes the live parameters in place.
        # The inner publisher may keep the same ones (nobody writes to them): one copy per version, not two.
        tensors = served(state, self.dtype, copy=not owned)
        location = self.inner.publish(version, tensors, config_json, owned=True)
        self.server.offer(version, location, tensors)
        return location

    def prune(self, keep_from):
        self.inner.prune(keep_from)

    def last_bytes(self):
        return self.inner.last_bytes()

    def close(self):
        self.server.close()
        self.inner.close()


# -------------------------------------------------------------------------------------------------- follower


class TransferFallback(Exception):
    """This version does not come by transfer; `reason` labels asyncopd_weight_sync_fallbacks_total."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NcclFollower(WeightFollower):
    """Receives a version by transfer when its engine can (a vLLM engine started with a weight-transfer
    backend), else, or when the transfer fails, through `inner`."""

    name = "nccl"

    def __init__(self, inner: WeightFollower, r, job_id: str, *, join_s: float, timeout_s: float,
                 stopped=lambda: False) -> None:
        self.inner, self.r, self.key = inner, r, transfer_key(job_id)
        self.join_s, self.timeout_s, self.stopped = join_s, timeout_s, stopped
        self.member = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    def tensors(self, location):
        return self.inner.tensors(location)

    def recover(self, location, version, timeout_s, stopped=lambda: False):
        return self.inner.recover(location, version, timeout_s, stopped)

    def reset(self):
        self.inner.reset()

    def load(self, location, version, engine):
        if engine.weight_transfer is None:
            self.inner.load(location, version, engine)
            return
        self.receiving = False
        try:
            self._receive(location, version, engine)
            return
        except TransferFallback as exc:
            reason, message = exc.reason, str(exc)
        except Exception as exc:  # the round failed on our side or the learner's: the version comes from disk
            reason, message = "failed", f"{type(exc).__name__}: {exc}"
        SYNC_FALLBACKS.labels(reason).inc()
        log.warning("weights: v%d not received by transfer (%s: %s); loading it from %s", version, reason, message,
                    location)
        try:
            self.inner.load(location, version, engine)
        except Exception:
            if self.receiving:
                # The layers the failed round had reached hold its weights: the engine holds no version now, so
                # it generates nothing until one loads whole (the follower loop waits for the next).
                engine.version = NO_VERSION
            raise

    def _receive(self, location: str, version: int, engine) -> None:
        mailbox = f"{self.key}:to:{self.member}:{uuid.uuid4().hex[:8]}"
        _post(self.r, self.key, {"member": self.member, "version": version, "location": location,
                                 "ranks": engine.transfer_ranks(), "backend": engine.weight_transfer,
                                 "mailbox": mailbox, "until": time.time() + self.join_s})
        message = _pop(self.r, mailbox, self.join_s, self.stopped)
        if message is None:
            raise TransferFallback("unanswered", f"no transfer round within {self.join_s}s")
        if message["op"] != "init":
            raise TransferFallback(message.get("reason", message["op"]), f"the learner answered {message}")
        acks = message["acks"]
        try:
            try:
                engine.join_transfer(message["init_info"])
            except Exception as exc:
                _post(self.r, acks, {"member": self.member, "op": "init", "error": str(exc)})
                raise
            _post(self.r, acks, {"member": self.member, "op": "init"})
            message = _pop(self.r, mailbox, self.timeout_s, self.stopped)
            if message is None or message["op"] != "update":
                raise TransferFallback("aborted", f"round ended before the weights came: {message}")
            self.receiving = True
            try:
                engine.receive_transfer(message["update_info"], version)
            except Exception as exc:
                _post(self.r, acks, {"member": self.member, "op": "update", "error": str(exc)})
                raise
            _post(self.r, acks, {"member": self.member, "op": "update"})
        finally:
            engine.leave_transfer()
