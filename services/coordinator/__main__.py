"""Coordinator entrypoint (`python -m services.coordinator`, the image entrypoint too)."""


def main() -> None:
    from asyncopd.logs import setup_logging
    from services.coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings()
    setup_logging(settings.log_level, "coordinator")

    import uvicorn

    from asyncopd.runtime import ServiceRuntime
    from asyncopd.v1 import coordinator_pb2_grpc
    from services.coordinator.api import create_app
    from services.coordinator.grpc_api import CoordinatorServicer
    from services.coordinator.jobs import JobStore
    from services.coordinator.pools import build_pool
    from services.coordinator.runner import JobRunner

    runtime = ServiceRuntime("coordinator", "asyncopd.v1.CoordinatorService", settings)
    store = JobStore(runtime.redis, settings.data_dir)
    runner = JobRunner(runtime.redis, store, settings.tick_s, settings.instance)
    pool = build_pool(settings)
    runtime.start(lambda server: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(runtime, pool), server), handle_signals=False)
    runtime.set_model_loaded(True)  # the coordinator serves no model: ready once up

    def shutdown() -> None:
        pool.close()
        runtime.stop.set()
        runtime.shutdown()

    app = create_app(store, runner, pool, settings.api_token, on_shutdown=shutdown)
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level.lower(),
                access_log=False)


if __name__ == "__main__":
    main()
