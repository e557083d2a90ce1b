"""Tiny HF-format teacher and student built locally (no downloads), loadable by transformers and vLLM alike.

Both share one byte-level BPE tokenizer. Shapes respect vLLM's CPU attention (head_dim 32/64/...).
`python -m asyncopd.tinymodels OUT_DIR` writes OUT_DIR/{teacher,student}; it is deterministic and skips
models already present.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

SPECS = {
    # name: (hidden, layers, heads, kv_heads, init std, seed). The teacher's larger init makes it opinionated,
    # so the student has a real distance to close.
    "teacher": (128, 2, 2, 1, 0.08, 1),
    "student": (64, 2, 2, 1, 0.02, 2),
}


def corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rnd.randint(0, 999), rnd.randint(0, 999)
        op = rnd.choice("+-*")
        out.append(f"Q: {a}{op}{b}= A: {eval(f'{a}{op}{b}')}")
    return out


def build_tokenizer(out: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, name: str, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, std, seed = SPECS[name]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        initializer_range=std, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_all(root: Path) -> dict[str, Path]:
    paths = {name: root / name for name in SPECS}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(root / "tokenizer")
    for name, path in paths.items():
        build_model(path, name, tokenizer)
    return paths


def write_prompts(path: Path, count: int, seed: int) -> None:
    import json

    rnd = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(count):
            a, b = rnd.randint(0, 99), rnd.randint(0, 99)
            fh.write(json.dumps({"prompt": f"Q: {a}+{b}= A:"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    for name, path in build_all(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
