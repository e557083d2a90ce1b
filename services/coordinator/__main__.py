"""Coordinator entrypoint (`python -m services.coordinator`, the image entrypoint too)."""


def main() -> None:
    from asyncopd.logs import setup_logging
    from services.coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings()
    setup_logging(settings.log_level, "coordinator", settings.instance, settings.log_format)

    import uvicorn

    from asyncopd.runtime import ServiceRuntime
    from asyncopd.v1 import coordinator_pb2_grpc
    from services.coordinator.api import create_app
    from services.coordinator.jobs import JobStore
    from services.coordinator.pools import build_pool
    from services.coordinator.runner import JobRunner

    runtime = ServiceRuntime("coordinator", "asyncopd.v1.CoordinatorService", settings)
    store = JobStore(runtime.redis, settings.data_dir, settings.output_roots)
    runner = JobRunner(runtime.redis, store, settings.tick_s, settings.instance, settings.max_model_len)
    pool = build_pool(settings)
    runtime.start(coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, handle_signals=False)
    runtime.set_ready(True)  # it serves no model (model_loaded stays false): ready once up

    def shutdown() -> None:
        pool.close()
        runtime.stop.set()
        runtime.shutdown()

    app = create_app(store, runner, pool, settings.api_token, on_shutdown=shutdown,
                     max_body_bytes=settings.max_body_bytes, probe=runtime.probe)
    # log_config=None: uvicorn's loggers propagate to the root handler (same format) instead of its own.
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level.lower(),
                access_log=False, log_config=None)


if __name__ == "__main__":
    main()
