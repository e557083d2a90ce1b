from asyncopd.v1 import learner_pb2, learner_pb2_grpc
from services.learner.service import Learner


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, runtime, learner: Learner) -> None:
        self.runtime, self.learner = runtime, learner

    def GetStatus(self, request, context):  # noqa: N802
        return self.runtime.status()

    def GetProgress(self, request, context):  # noqa: N802
        p = self.learner.progress
        return learner_pb2.LearnerProgress(
            job_id=p.get("job_id", ""), step=p.get("step", 0), policy_version=p.get("policy_version", 0),
            last_loss=p.get("last_loss", 0.0), last_kl=p.get("last_kl", 0.0),
        )
