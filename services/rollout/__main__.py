"""Rollout worker entrypoint (`python -m services.rollout`, the image entrypoint too)."""


def main() -> None:
    from asyncopd.logs import setup_logging
    from services.rollout.settings import RolloutSettings

    settings = RolloutSettings()
    setup_logging(settings.log_level, "rollout", settings.instance, settings.log_format)

    from asyncopd.runtime import ServiceRuntime
    from asyncopd.v1 import rollout_pb2_grpc
    from services.rollout.worker import RolloutWorker

    runtime = ServiceRuntime("rollout", "asyncopd.v1.RolloutService", settings)
    worker = RolloutWorker(settings, runtime)
    runtime.start(rollout_pb2_grpc.add_RolloutServiceServicer_to_server)
    try:
        worker.run()
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
