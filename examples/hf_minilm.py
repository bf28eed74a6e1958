"""HF Trainer: MiniLM (all-MiniLM-L6-v2, offline) classifying sentences with GradgateFinetuning.

The encoder is frozen except its last layer, which joins at epoch 1 at a
tenth of the head's learning rate under the Trainer's linear warm-up
schedule. Dropout in the frozen layers stays off although the Trainer calls
``model.train()``; each checkpoint also holds ``trainable.safetensors``
(only what trains, bound to the frozen base's fingerprint).

Run: python examples/hf_minilm.py [--per-class N] [--epochs E]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

import gradgate as gg
from gradgate.integrations.transformers import TRAINABLE_FILE, GradgateFinetuning
from gradgate.tools.zoo import minilm, stdlib_sentences, tokenize


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


def main(per_class: int = 20, epochs: int = 2) -> dict[str, float]:
    """Fine-tune; return held-out accuracy and whether the frozen layers stayed bit-identical."""
    torch.manual_seed(0)
    sentences, labels, _ = stdlib_sentences(per_class)
    _, tokenizer = minilm()
    ids = tokenize(tokenizer, sentences)
    order = torch.randperm(len(labels))
    ids, labels = ids[order], labels[order]
    cut = int(0.75 * len(labels))
    model = SentenceClassifier(int(labels.max()) + 1)
    frozen_layer = "minilm.encoder.encoder.layer.0"
    before = gg.fingerprint(model.get_submodule(frozen_layer))
    train = [{"ids_mask": ids[i], "labels": labels[i]} for i in range(cut)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=epochs,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
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
        logits = model(ids[cut:])["logits"]
    accuracy = (logits.argmax(1) == labels[cut:]).float().mean().item()
    out = {
        "accuracy": accuracy,
        "frozen_unchanged": float(gg.fingerprint(model.get_submodule(frozen_layer)) == before),
        "trainable_file_mb": size / 1e6,
    }
    print(
        f"held-out accuracy {accuracy:.3f}; frozen layer 0 bit-identical: "
        f"{bool(out['frozen_unchanged'])}; trainable.safetensors {size / 1e6:.2f} MB"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    a = parser.parse_args()
    main(a.per_class, a.epochs)
