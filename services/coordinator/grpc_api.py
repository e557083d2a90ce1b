import grpc

from asyncopd.v1 import coordinator_pb2, coordinator_pb2_grpc
from services.coordinator.pools import PoolError

# The REST status of a PoolError, as the gRPC status a caller can act on.
_STATUS = {502: grpc.StatusCode.FAILED_PRECONDITION, 503: grpc.StatusCode.UNAVAILABLE,
           504: grpc.StatusCode.DEADLINE_EXCEEDED}


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, runtime, pool) -> None:
        self.runtime, self.pool = runtime, pool

    def GetStatus(self, request, context):  # noqa: N802
        return self.runtime.status()

    def ScaleRollout(self, request, context):  # noqa: N802
        if request.replicas < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replicas must be >= 0")
        try:
            return coordinator_pb2.ScaleResponse(replicas=self.pool.scale(request.replicas))
        except PoolError as exc:
            context.abort(_STATUS.get(exc.status_code, grpc.StatusCode.INTERNAL), str(exc))
