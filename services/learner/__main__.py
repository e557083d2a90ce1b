"""Learner entrypoint: `python -m services.learner`, or `torchrun ... -m services.learner` for several ranks
(rank 0 serves gRPC/metrics and reads Redis; the other ranks follow it)."""


def main() -> None:
    from asyncopd.logs import setup_logging
    from services.learner.settings import LearnerSettings

    settings = LearnerSettings()
    setup_logging(settings.log_level, "learner")

    import torch.distributed as dist

    from services.learner.service import Comm
    from services.learner.trainer import init_distributed

    init_distributed(settings)
    if dist.get_rank() != 0:
        import signal

        # torchrun forwards SIGTERM to every rank; followers leave when rank 0 says so, mid-collective never.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Comm.follow(settings)
        return

    from asyncopd.runtime import ServiceRuntime
    from asyncopd.v1 import learner_pb2_grpc
    from services.learner.grpc_api import LearnerServicer
    from services.learner.service import Learner

    runtime = ServiceRuntime("learner", "asyncopd.v1.LearnerService", settings)
    learner = Learner(settings, runtime, Comm())
    runtime.start(lambda server: learner_pb2_grpc.add_LearnerServiceServicer_to_server(
        LearnerServicer(runtime, learner), server))
    try:
        learner.run()
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
