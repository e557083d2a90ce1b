import grpc

from asyncopd.runtime import ControlServicer
from asyncopd.v1 import teacher_pb2, teacher_pb2_grpc
from services.teacher.scorer import TeacherScorer


class TeacherServicer(ControlServicer, teacher_pb2_grpc.TeacherServiceServicer):
    def __init__(self, runtime, scorer: TeacherScorer) -> None:
        super().__init__(runtime)
        self.scorer = scorer

    def Score(self, request, context):  # noqa: N802
        with self.scorer.lock:
            if self.scorer.engine is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no job is active: no teacher loaded")
            s = self.scorer.engine.score([list(request.prompt_token_ids)], [list(request.completion_token_ids)],
                                         top_k=request.top_k or 8)[0]
        return teacher_pb2.ScoreResponse(positions=[
            teacher_pb2.PositionScore(sampled_logprob=lp, topk_ids=ids, topk_logprobs=lps)
            for lp, ids, lps in zip(s.sampled_logprobs, s.topk_ids, s.topk_logprobs, strict=True)
        ])
