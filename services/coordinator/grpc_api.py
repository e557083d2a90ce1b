from asyncopd.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, runtime, pool) -> None:
        self.runtime, self.pool = runtime, pool

    def GetStatus(self, request, context):  # noqa: N802
        return self.runtime.status()

    def ScaleRollout(self, request, context):  # noqa: N802
        return coordinator_pb2.ScaleResponse(replicas=self.pool.scale(request.replicas))
