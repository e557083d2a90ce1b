"""Weight versions: the learner publishes them, rollout workers follow them, one head in Redis says which is
current. Everything about weight versions lives in this package:

- `head`: the (lineage, version, location) head, the reload rule (`needs_reload`) and a blocking wait for the
  head to move (torch-free; announcing is `asyncopd.state.publish_version`, re-exported as `head.announce`).
- `transports/`: the publisher/follower contract (`base`) and its implementations, picked by the
  `weights_transport` setting: `filesystem` (a full HF directory per version), `delta` (XOR deltas against
  the last full version, zstd, per-tensor checksums, repairs) and `nccl` (vLLM's weight transfer from the
  learner, `vllm_transfer` its engines, with one of the others as the fallback); a LoRA student's versions
  are its adapter alone (`adapter`, chosen by the job).
- `follow`: the loop a rollout worker runs between batches; `repair`: a follower asks the publisher for a full
  copy of a version it cannot load.
- `layout`: version directories, atomic commits, pruning that keeps what retained deltas need;
  `manifest`: what a version holds and how to tell it is intact; `codec`: tensor bytes, checksums, XOR deltas;
  `hf`: any published version as a transformers model (the learner's held-out evaluation); `metrics`.

Invariant across the package: a version is announced only once it is complete on the shared volume, and a
follower's engine holds either exactly the published bits of a version or what it held before.
Importing this package imports no torch (the transports do, when set up).
"""

from asyncopd.ml.weights.layout import commit_dir, prune, safetensors_files, version_dir

__all__ = ["commit_dir", "learner_publisher", "prune", "safetensors_files", "version_dir"]


def learner_publisher(settings, root, job_id: str, adapter: bool = False):
    """The learner's publisher from its settings (`weights_transport`, `weights_fallback`, `weights_dtype`,
    `weights_full_every`, the transfer settings); a delta publisher answers repair requests and an nccl one
    serves transfer rounds while the job is the active one. `adapter` (a job with `student.lora`): adapter-only
    versions, whatever the transport setting."""
    from asyncopd import state
    from asyncopd.ml.weights.transports import ADAPTER, setup_publisher

    if adapter:
        return setup_publisher(ADAPTER, root, dtype=settings.weights_dtype)
    r = state.connect(settings.redis_url, settings.redis_password, settings.redis_outage_s) \
        if settings.weights_transport != "filesystem" else None
    done = lambda: r is not None and not state.is_active(r, job_id)  # noqa: E731
    server = None
    if settings.weights_transport == "nccl":
        from asyncopd.ml.weights.transports.nccl import TransferServer

        server = TransferServer(r, job_id, device=settings.device, host=settings.pod_ip,
                                port=settings.weights_transfer_port, timeout_s=settings.weights_transfer_timeout_s,
                                done=done)
    return setup_publisher(settings.weights_transport, root, dtype=settings.weights_dtype,
                           full_every=settings.weights_full_every, redis=r, job_id=job_id, job_done=done,
                           fallback=settings.weights_fallback, server=server)
