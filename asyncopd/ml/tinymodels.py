"""Tiny HF-format teacher and student for the arithmetic task, built and trained locally (no downloads).

The teacher is trained to high held-out accuracy, the student (smaller, trained for fewer steps) to a clearly
lower one, so distillation has a real gap to close. Both share one byte-level tokenizer (one token per
character: digits are never merged, which keeps addition learnable at this size). Shapes respect vLLM's CPU
attention (head_dim 32/64/...). Everything is deterministic from the recipe below on one machine (not across
CPUs: kernels may round differently by instruction set; the trained models' accuracy differed by 2 points)
and cached under `.cache/models/<recipe-hash>/`; `python -m asyncopd.ml.tinymodels OUT_DIR` (or `asyncopd
models`) builds them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from asyncopd.tasks import arithmetic

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class ModelRecipe:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    steps: int
    lr: float
    seed: int


@dataclass(frozen=True)
class Recipe:
    max_value: int = 99
    train_problems: int = 8000
    heldout_problems: int = 256
    split_seed: int = 0
    batch: int = 128
    threads: int = 1  # torch threads while training: results depend on it, so it is part of the recipe
    # Measured on the 2-core dev machine: teacher 98.8 % held-out exact match (~70 s of training), student
    # 22 % (~8 s). The student's curve is steep (200 steps: 10 %, 250: 65 %), which makes it a quick learner.
    teacher: ModelRecipe = ModelRecipe(hidden=128, layers=2, heads=2, kv_heads=1, steps=1000, lr=1e-3, seed=1)
    student: ModelRecipe = ModelRecipe(hidden=64, layers=2, heads=2, kv_heads=1, steps=230, lr=3e-3, seed=2)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


DEFAULT = Recipe()
# For tests: same shapes and files, a few optimizer steps (the models are barely trained).
QUICK = Recipe(teacher=ModelRecipe(hidden=128, layers=2, heads=2, kv_heads=1, steps=20, lr=3e-3, seed=1),
               student=ModelRecipe(hidden=64, layers=2, heads=2, kv_heads=1, steps=5, lr=3e-3, seed=2))


def build_tokenizer(out: Path, vocab_size: int = 259):
    """Byte-level BPE; at 259 (256 bytes + 3 specials) it has no merges: one token per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.prompt + p.completion for p in arithmetic.problems(0, 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def new_model(spec: ModelRecipe, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train_supervised(model, tokenizer, problems: list[arithmetic.Problem], spec: ModelRecipe, batch: int) -> None:
    """Teacher-forced cross-entropy on the answer tokens (and end-of-sequence) only."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    rows = []
    for p in problems:
        prompt = tokenizer(p.prompt)["input_ids"]
        answer = tokenizer(p.completion)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + answer, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (seq, plen) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, plen : len(seq)] = torch.tensor(seq[plen:])
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    model.train()
    for _ in range(spec.steps):
        idx = torch.randint(len(rows), (batch,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=(ids[idx] != tokenizer.pad_token_id).long(),
                     labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def build_all(root: Path, recipe: Recipe = DEFAULT, log=print, link: bool = True) -> dict[str, Path]:
    """Build (or reuse) the task files and the two models; with `link`, point root/{teacher,student} at them
    (the paths examples/tiny-job.yaml names). Returns their paths."""
    base = root / recipe.key()
    paths = {"teacher": base / "teacher", "student": base / "student", "train": base / "train.jsonl",
             "heldout": base / "heldout.jsonl"}
    if not all((paths[n] / "config.json").exists() for n in ("teacher", "student")):
        _build(paths, base, recipe, log)
    if link:
        for name in ("teacher", "student"):
            tmp = root / f".{name}.link"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(paths[name].relative_to(root))
            if (root / name).is_dir() and not (root / name).is_symlink():
                shutil.rmtree(root / name)  # a model directory from an older layout
            tmp.replace(root / name)
    return paths


def _build(paths: dict[str, Path], base: Path, recipe: Recipe, log) -> None:
    import torch

    torch.set_num_threads(recipe.threads)
    train, heldout = arithmetic.splits(recipe.split_seed, recipe.train_problems, recipe.heldout_problems,
                                       recipe.max_value)
    arithmetic.write_jsonl(paths["train"], train)
    arithmetic.write_jsonl(paths["heldout"], heldout)
    tokenizer = build_tokenizer(base / "tokenizer")
    for name in ("teacher", "student"):
        spec = getattr(recipe, name)
        t0 = time.time()
        model = new_model(spec, tokenizer)
        train_supervised(model, tokenizer, train, spec, recipe.batch)
        tmp = paths[name].with_name(name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(paths[name])
        log(f"trained {name} ({spec.steps} steps) in {time.time() - t0:.0f} s")


@dataclass(frozen=True)
class SizePreset:
    """A Llama-style shape for measurements by model size (random init: what is measured is bytes and
    seconds, not what the model knows). head_dim 64 where heads > 2, as vLLM's CPU attention needs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


# example: the example job's student; 25m and 125m: Llama proportions (GQA, SwiGLU ~2.7x, untied embeddings),
# with a vocabulary large enough that embeddings are a realistic share of the parameters.
SIZES = {
    "example": SizePreset(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=259),
    "25m": SizePreset(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, vocab=20000),
    "125m": SizePreset(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
    # The GPU check's throughput pair (`asyncopd gpu-check`): a student and a teacher of one vocabulary (the
    # teacher's top-K ids index the student's logits) and one tokenizer. 0.5b: Qwen2.5-0.5B's blocks (hidden
    # 896, 24 layers, 14 heads of 64, 2 kv heads, SwiGLU 4864) with a 64K vocabulary, untied: 0.49 B
    # parameters; 1.5b: Qwen2.5-1.5B's blocks (1536, 28 layers, 12 heads of 128, 2 kv heads, 8960): 1.51 B.
    "0.5b": SizePreset(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=65536),
    "1.5b": SizePreset(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=65536),
    # The GPU check's weights cost curve beyond the pair: Qwen2.5-3B's blocks (2048, 36 layers, 16 heads of 128,
    # 2 kv heads, 11008) with the pair's 64K vocabulary, untied: 3.04 B.
    "3b": SizePreset(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=65536),
    # Their CPU rehearsal: the same roles at toy size.
    "pair-student": SizePreset(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=512),
    "pair-teacher": SizePreset(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=512),
}


def build_sizes(root: Path, names: list[str], seed: int = 0, log=print, *, device: str = "cpu",
                dtype: str | None = None) -> dict[str, Path]:
    """Random-init models of the named sizes in HF format (config, safetensors, the byte-level tokenizer; ids
    above the tokenizer's are never produced by it but are real embedding rows), cached under root/sizes/.
    `device`: where the random init runs (a GPU makes billions of parameters in seconds); `dtype`: the saved
    dtype (default float32). Both are part of the cache key when not the defaults."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for name in names:
        p = SIZES[name]
        made = [device, dtype] if (device, dtype) != ("cpu", None) else []
        key = hashlib.sha1(json.dumps([asdict(p), seed, *made]).encode()).hexdigest()[:8]
        path = root / "sizes" / f"{name}-{key}"
        if not (path / "config.json").exists():
            t0 = time.time()
            torch.manual_seed(seed)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # builds running at once do not collide
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer = build_tokenizer(tmp)
            config = LlamaConfig(
                vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
                num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, max_position_embeddings=512,
                tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
            with torch.device(device):
                model = LlamaForCausalLM(config)
            if dtype is not None:
                from asyncopd.ml.dtypes import DTYPES

                model = model.to(DTYPES[dtype])
            model.save_pretrained(tmp, safe_serialization=True)
            try:
                tmp.rename(path)
            except OSError:  # another process built the same model first: the same bits, keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            log(f"built {name} ({sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters) in "
                f"{time.time() - t0:.0f} s")
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path, nargs="?", default=Path(".cache/models"))
    args = ap.parse_args()
    for name, path in build_all(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
