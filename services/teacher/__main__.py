"""Teacher scorer entrypoint (`python -m services.teacher`, the image entrypoint too)."""


def main() -> None:
    from asyncopd.logs import setup_logging
    from services.teacher.settings import TeacherSettings

    settings = TeacherSettings()
    setup_logging(settings.log_level, "teacher", settings.instance, settings.log_format)

    from asyncopd.runtime import ServiceRuntime
    from asyncopd.v1 import teacher_pb2_grpc
    from services.teacher.scorer import TeacherScorer

    runtime = ServiceRuntime("teacher", "asyncopd.v1.TeacherService", settings)
    scorer = TeacherScorer(settings, runtime)
    runtime.start(teacher_pb2_grpc.add_TeacherServiceServicer_to_server)
    try:
        scorer.run()
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
