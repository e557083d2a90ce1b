"""The learner's step through the real DeepSpeed engine (one gloo rank, CPU): the memory-flat chunked loss
gives the same loss, metrics and gradients as the full-logits path, under ZeRO-0 and ZeRO-3 (where the
lm_head weight is a partition gathered for the chunks)."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

from asyncopd.jobspec import JobSpec
from asyncopd.state import ActiveJob
from asyncopd.streams import ScoredEntry

K = 4


def entries(vocab: int, samples: int, seed: int = 0, teacher_samples: int = 0) -> list[ScoredEntry]:
    """Scored samples of different prompt and completion lengths with made-up behaviour/teacher data (and
    teacher_samples made-up teacher draws per position, for forward_kl_mc)."""
    rng = random.Random(seed)
    out = []
    for i in range(samples):
        prompt, completion = rng.randint(2, 6), rng.randint(1, 7)
        topk = [rng.sample(range(vocab), K) for _ in range(completion)]
        out.append(ScoredEntry(
            job_id="j", batch=0, sample_id=f"b0-p{i}-s0", policy_version=0,
            prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt)],
            completion_token_ids=[row[0] if rng.random() < 0.5 else rng.randrange(vocab) for row in topk],
            behavior_logprobs=[-rng.uniform(0.5, 4.0) for _ in range(completion)],
            top_k=K, teacher_sampled_logprobs=[-rng.uniform(0.2, 5.0) for _ in range(completion)],
            support_ids=[t for row in topk for t in row],
            teacher_support_logprobs=[v for _ in topk for v in sorted(-rng.uniform(0.3, 3.0) for _ in range(K))],
            teacher_samples=teacher_samples,
            teacher_sample_ids=[rng.randrange(vocab) for _ in range(completion * teacher_samples)],
            teacher_sample_logprobs=[-rng.uniform(0.1, 4.0) for _ in range(completion * teacher_samples)],
        ))
    return out


def one_step(models, tmp_path, objective: dict, zero_stage: int, chunked: bool, batch: list[ScoredEntry]):
    from deepspeed.utils import safe_get_full_grad

    from services.learner.settings import LearnerSettings
    from services.learner.trainer import Trainer

    spec = JobSpec.model_validate({"student": {"model": str(models["student"])},
                                   "teacher": {"model": str(models["teacher"])},
                                   "prompts": {"path": "unused.jsonl"}, "objective": objective,
                                   "train": {"learning_rate": 1e-3}})
    settings = LearnerSettings(data_dir=tmp_path / "data", zero_stage=zero_stage, loss_chunk_tokens=5)
    trainer = Trainer(ActiveJob("j", spec, str(tmp_path / f"out-{zero_stage}-{chunked}")), settings)
    assert trainer.net.chunked, trainer.net.blocker  # the tiny Llama qualifies for the chunked path
    if not chunked:
        trainer.net.blocker = "forced by the test"
    grads = {}
    real_step = trainer.engine.step

    def step():  # the gradients DeepSpeed is about to apply, whatever the ZeRO stage keeps them in
        grads.update({n: safe_get_full_grad(p).clone() for n, p in trainer.model.named_parameters()})
        real_step()

    trainer.engine.step = step
    record = dataclasses.asdict(trainer.step(batch))
    return record, grads


@pytest.mark.parametrize("zero_stage,objective", [
    (0, {"kind": "forward_kl_topk"}),
    (0, {"kind": "m2po", "second_moment_budget": 0.05}),
    (3, {"kind": "mixed", "alpha": 0.5}),
    (0, {"kind": "forward_kl_mc", "samples": 3}),  # the teacher's draws, collated per position
])
def test_chunked_step_equals_the_full_logits_step(distributed, tiny_models, tmp_path, zero_stage, objective):
    torch.set_num_threads(1)
    batch = entries(vocab=259, samples=5, teacher_samples=objective.get("samples", 0))
    full, full_grads = one_step(tiny_models, tmp_path, objective, zero_stage, False, batch)
    chunk, chunk_grads = one_step(tiny_models, tmp_path, objective, zero_stage, True, batch)
    assert full["tokens"] == chunk["tokens"] == sum(len(e.completion_token_ids) for e in batch)
    assert chunk["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-6)
    assert chunk["objective"] == pytest.approx(full["objective"], rel=1e-4, abs=1e-6)
    assert all(map(torch.isfinite, map(torch.tensor, chunk["objective"].values())))
    if objective["kind"] == "m2po":  # the budget binds on this batch: one bound for all 3+ chunks
        assert chunk["objective"]["m2po_tau"] < 20
    assert full_grads.keys() == chunk_grads.keys() and len(full_grads) > 3
    for name, g in full_grads.items():
        assert g.abs().sum() > 0, name  # every parameter, lm_head included, got its gradient
        torch.testing.assert_close(chunk_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_zero3_chunked_steps_after_the_first_match_the_full_logits_path(distributed, tiny_models, tmp_path):
    """From the second step on, DeepSpeed fetches the lm_head weight itself (an external parameter of the loss
    module since the first forward read it); gathering it again and releasing it inside the forward failed
    ("Cannot free a ZeRO-3 parameter while it is still active"). Three steps, same losses as full logits."""
    from services.learner.settings import LearnerSettings
    from services.learner.trainer import Trainer

    torch.set_num_threads(1)
    spec = JobSpec.model_validate({"student": {"model": str(tiny_models["student"])},
                                   "teacher": {"model": str(tiny_models["teacher"])},
                                   "prompts": {"path": "unused.jsonl"}, "train": {"learning_rate": 1e-3}})
    losses = {}
    for chunked in (True, False):
        settings = LearnerSettings(data_dir=tmp_path / "data", zero_stage=3, loss_chunk_tokens=5)
        trainer = Trainer(ActiveJob("j", spec, str(tmp_path / f"out-{chunked}")), settings)
        if not chunked:
            trainer.net.blocker = "forced by the test"
        losses[chunked] = [trainer.step(entries(259, 4, seed=i)).loss for i in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def _rank_main(rank: int, world: int, port: int, models: dict, tmp: str, objective: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from pathlib import Path

    from services.learner.distributed import init_distributed
    from services.learner.settings import LearnerSettings

    torch.set_num_threads(1)
    init_distributed(LearnerSettings())
    for stage, samples in CASES:
        out = Path(tmp) / f"rank{rank}-{samples}"
        record, grads = one_step(models, out, objective, stage, True, entries(259, samples))
        if rank == 0:
            torch.save({"record": record, "grads": grads}, Path(tmp) / f"two-ranks-{samples}.pt")


# (ZeRO stage, samples): 5 samples split 3/2 with uneven token counts; 1 sample leaves rank 1 with none,
# under ZeRO-3, where a rank skipping the forward would hang the others' parameter gathers.
CASES = ((2, 5), (3, 1))


def test_two_ranks_step_like_one_rank_on_the_whole_batch(distributed, tiny_models, tmp_path):
    """Two gloo ranks, each with its share of the samples: same loss, metrics and gradients as one rank on
    the whole batch — the loss is a token mean over the global batch and M2PO's clip range is solved on the
    whole batch (the budget binds on the 5-sample batch). With one sample, rank 1 runs it at weight zero so
    that it still joins every collective."""
    import torch.multiprocessing as mp

    from asyncopd.ports import free_port

    objective = {"kind": "m2po", "second_moment_budget": 0.05}
    mp.start_processes(_rank_main, args=(2, free_port(), tiny_models, str(tmp_path), objective),
                       nprocs=2, start_method="spawn")
    for _, samples in CASES:
        one, one_grads = one_step(tiny_models, tmp_path / "one", objective, 0, True, entries(259, samples))
        two = torch.load(tmp_path / f"two-ranks-{samples}.pt")
        assert two["record"]["tokens"] == one["tokens"]
        assert two["record"]["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
        assert two["record"]["objective"] == pytest.approx(one["objective"], rel=1e-4, abs=1e-6)
        for name, g in one_grads.items():
            torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"{samples}: {name}")


def test_zero3_publishes_the_whole_model_gathering_one_layer_at_a_time(distributed, tiny_models, tmp_path):
    """What a version holds under ZeRO-3 equals the state gathered all at once, bit for bit, yet no gather held
    more than one layer's parameters (or one of the unnumbered ones: embeddings, final norm, head)."""
    import deepspeed

    from asyncopd.ml.weights.codec import served
    from services.learner.settings import LearnerSettings
    from services.learner.trainer import Trainer, layer_groups

    spec = JobSpec.model_validate({"student": {"model": str(tiny_models["student"])},
                                   "teacher": {"model": str(tiny_models["teacher"])},
                                   "prompts": {"path": "unused.jsonl"}, "train": {"learning_rate": 1e-3}})
    trainer = Trainer(ActiveJob("j", spec, str(tmp_path / "out")),
                      LearnerSettings(data_dir=tmp_path, zero_stage=3, weights_dtype="bfloat16"))
    trainer.step(entries(trainer.model.config.vocab_size, 4))
    gathers, real = [], trainer._gathered
    trainer._gathered = lambda params: gathers.append(len(params)) or real(params)
    published = served(trainer._full_state_dict(), torch.float32)

    names = [n for n, _ in trainer.model.named_parameters()]
    assert max(gathers) == max(len(g) for g in layer_groups(names)) < len(names)
    assert len(gathers) == trainer.model.config.num_hidden_layers + 3  # + embeddings, final norm, lm_head
    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
        whole = served({k: v.clone() for k, v in trainer.model.state_dict().items()}, torch.float32)
    assert published.keys() == whole.keys()
    assert all(torch.equal(published[k], whole[k]) for k in whole)

    # Cast to the served dtype layer by layer as it is gathered: that host copy is the version's snapshot,
    # handed to the writer as owned (a second copy of the whole model would double rank 0's host memory).
    assert all(torch.equal(a, b) for a, b in zip(trainer._full_state_dict(torch.bfloat16).values(),
                                                 served(whole, torch.bfloat16).values(), strict=True))
    submitted, submit = [], trainer.writer.submit
    trainer.writer.submit = lambda *args, **kw: submitted.append((args[1], kw["owned"])) or submit(*args, **kw)
    trainer.publish()
    assert trainer.published() is not None
    (snapshot, owned), = submitted
    assert owned and {t.dtype for t in snapshot.values()} == {torch.bfloat16}
    trainer.close()
