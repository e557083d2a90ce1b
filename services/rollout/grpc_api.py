import grpc

from asyncopd.runtime import ControlServicer
from asyncopd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from services.rollout.worker import RolloutWorker


class RolloutServicer(ControlServicer, rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, runtime, worker: RolloutWorker) -> None:
        super().__init__(runtime)
        self.worker = worker

    def Generate(self, request, context):  # noqa: N802
        with self.worker.lock:
            if self.worker.engine is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no job is active: no student loaded")
            result = self.worker.engine.generate(
                [list(request.prompt_token_ids)], n=request.n or 1, max_tokens=request.max_tokens or 16,
                temperature=request.temperature or 1.0, seeds=[request.seed],
            )[0]
            version = self.worker.engine.version
        return rollout_pb2.GenerateResponse(completions=[
            rollout_pb2.Completion(token_ids=c.token_ids, logprobs=c.logprobs, policy_version=version,
                                   finish_reason=c.finish_reason) for c in result
        ])

    def UpdateWeights(self, request, context):  # noqa: N802
        with self.worker.lock:
            if self.worker.engine is None or self.worker.job is None or self.worker.job.id != request.job_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job {request.job_id!r} is not loaded here")
            self.worker.sync_weights(request.version)
            return common_pb2.WeightUpdateAck(loaded_version=self.worker.engine.version)
