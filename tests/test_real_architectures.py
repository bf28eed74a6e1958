"""Freeze recipes on real Hugging Face architectures, each built from a tiny config.

The optional ``architectures`` group: it needs transformers (the dev extra
installs it, so CI runs it) and never downloads anything. Every model is
built from a config with two to twelve layers of width 32, so the module
names, norm classes, tied weights and functional dropouts are the real ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradgate as gg

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.architectures

BATCH, SEQ, LABELS, VOCAB, WIDTH = 2, 8, 3, 64, 32


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build its classifier, feed it, and what it is made of."""

    name: str
    build: Callable[[], nn.Module]
    body: str  # the pre-trained part a head recipe freezes
    head: str  # the part a head recipe trains
    root_dropouts: tuple[str, ...]  # parameter-free modules at the root beside the head
    norm_class: str
    inputs: Callable[[], dict[str, torch.Tensor]]

    def __repr__(self) -> str:
        return self.name


def _text() -> dict[str, torch.Tensor]:
    # ids from 1: 0 is the pad id of the causal models' configs
    return {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ))}


def _seq2seq() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    # T5ForSequenceClassification pools the decoder state at the last eos token
    ids[:, -1] = 1
    return {"input_ids": ids}


def _image() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, 8, 8)}


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=LABELS,
    )
    model: nn.Module = transformers.BertForSequenceClassification(cfg)
    return model


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=WIDTH,
        n_layer=2,
        n_head=2,
        n_positions=16,
        num_labels=LABELS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    model: nn.Module = transformers.GPT2ForSequenceClassification(cfg)
    return model


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_heads=2,
        num_labels=LABELS,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model: nn.Module = transformers.T5ForSequenceClassification(cfg)
    return model


def _llama_config(**extra: Any) -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        **extra,
    )


def _llama() -> nn.Module:
    # attention dropout on, so a body that ran in training mode would not be deterministic
    cfg = _llama_config(num_labels=LABELS, attention_dropout=0.1, attention_bias=True)
    model: nn.Module = transformers.LlamaForSequenceClassification(cfg)
    return model


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=LABELS,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model: nn.Module = transformers.ViTForImageClassification(cfg)
    return model


ARCHS = [
    Arch("bert", _bert, "bert", "classifier", ("dropout",), "LayerNorm", _text),
    Arch("gpt2", _gpt2, "transformer", "score", (), "LayerNorm", _text),
    Arch("t5", _t5, "transformer", "classification_head", (), "T5LayerNorm", _seq2seq),
    Arch("llama", _llama, "model", "score", (), "LlamaRMSNorm", _text),
    Arch("vit", _vit, "vit", "classifier", (), "LayerNorm", _image),
]


def _build(arch: Arch, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return arch.build()


def _under(prefix: str, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(prefix + ".")]


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = torch.arange(BATCH) % LABELS
    logits = model(**batch).logits
    return nn.functional.cross_entropy(logits, labels)


def _body_output(
    model: nn.Module, arch: Arch, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[str]]:
    """The frozen body's first output during a full forward, and its modules that ran training.

    Only modules that run and whose forward may read ``training`` count: HF's
    own classes and torch's Dropout. HF attention reads its own flag and never
    calls its ``nn.Dropout`` child; gradgate leaves a direct write on torch's
    Linear/Embedding/LayerNorm/Conv (whose forward ignores the flag) as it is.
    """
    seen: list[torch.Tensor] = []
    ran_training: list[str] = []
    body = model.get_submodule(arch.body)

    def grab(_m: nn.Module, _args: object, out: Any) -> None:
        seen.append(out[0].detach().clone())

    def mode(name: str) -> Callable[[nn.Module, object, object], None]:
        def record(m: nn.Module, _args: object, _out: object) -> None:
            reads_mode = isinstance(m, nn.Dropout) or not type(m).__module__.startswith("torch.")
            if m.training and reads_mode:
                ran_training.append(name)

        return record

    handles = [m.register_forward_hook(mode(n)) for n, m in body.named_modules()]
    handles.append(body.register_forward_hook(grab))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen[0], ran_training


def _assert_inference(
    model: nn.Module, arch: Arch, batch: dict[str, torch.Tensor], reference: torch.Tensor
) -> None:
    output, ran_training = _body_output(model, arch, batch)
    assert ran_training == []
    assert torch.equal(output, reference)


@pytest.mark.parametrize("arch", ARCHS, ids=repr)
def test_head_recipe_trains_the_head_and_holds_the_body_in_eval(arch: Arch) -> None:
    model = _build(arch)
    batch = arch.inputs()
    model.eval()
    reference, _ = _body_output(model, arch, batch)

    gg.train_only(model, arch.head)
    model.train()

    assert _trainable(model) == _under(arch.head, _names(model))
    body = model.get_submodule(arch.body)
    assert all(gg.is_sticky(m) and not m.training for m in body.modules())
    for name in (arch.head, *arch.root_dropouts):
        module = model.get_submodule(name)
        assert module.training and not gg.is_sticky(module), name
    # the body's dropouts are on in the config: only inference mode makes it repeat
    _assert_inference(model, arch, batch, reference)

    for m in body.modules():
        m.training = True  # what Lightning does after a validation loop
    _assert_inference(model, arch, batch, reference)
    model.train()
    _assert_inference(model, arch, batch, reference)


def _frozen_subtrees(model: nn.Module) -> list[str]:
    """Hand rule: frozen when parameters exist and none trains; parameter-free: as its parent."""
    frozen: dict[str, bool] = {}
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params:
            frozen[name] = not any(p.requires_grad for p in params)
        else:
            frozen[name] = frozen.get(name.rpartition(".")[0], False) if name else False
    return [n for n, f in frozen.items() if f]


@pytest.mark.parametrize("arch", ARCHS, ids=repr)
def test_bitfit_trains_only_biases_and_keeps_the_model_stochastic(arch: Arch) -> None:
    model = _build(arch)
    gg.train_only(model, "**.bias")
    model.train()

    names = _names(model)
    assert _trainable(model) == [n for n in names if n.endswith(".bias")]
    held = [n for n, m in model.named_modules() if gg.is_sticky(m) or not m.training]
    assert held == _frozen_subtrees(model)
    if _under(arch.body, [n for n in names if n.endswith(".bias")]):
        # the body holds biases (T5's does not), so every Dropout in it has a training parent
        assert not any(isinstance(model.get_submodule(n), nn.Dropout) for n in held)


def test_numeric_ranges_select_whole_layers_of_a_12_layer_bert() -> None:
    bert = _build(ARCHS[0])
    names = _names(bert)
    layers = [f"bert.encoder.layer.{i}" for i in range(12)]

    upper = gg.select(bert, "bert.encoder.layer.[6-11]")
    # roots come sorted as strings ("layer.10" before "layer.6"), parameters in model order
    assert upper.roots == sorted(layers[6:])
    assert upper.parameters == [n for n in names if any(n.startswith(r + ".") for r in layers[6:])]

    every = gg.select(bert, "bert.encoder.layer.[0-11]")
    assert every.roots == sorted(layers)
    assert every.parameters == _under("bert.encoder.layer", names)

    mixed = gg.select(bert, "bert.encoder.layer.[0,2,10-11]")
    assert mixed.roots == sorted([layers[0], layers[2], layers[10], layers[11]])


@pytest.mark.parametrize("arch", ARCHS, ids=repr)
def test_norms_match_every_norm_class_and_survive_a_freeze(arch: Arch) -> None:
    model = _build(arch)
    norm_modules = [n for n, m in model.named_modules() if type(m).__name__ == arch.norm_class]
    assert norm_modules

    assert gg.select(model, gg.norms).roots == sorted(norm_modules)
    gg.freeze(model, exclude=gg.norms)
    expected = [n for n in _names(model) if any(n.startswith(m + ".") for m in norm_modules)]
    assert _trainable(model) == expected


@pytest.mark.parametrize("arch", ARCHS, ids=repr)
def test_adamw_with_decay_never_moves_the_frozen_body(arch: Arch) -> None:
    model = _build(arch)
    gg.train_only(model, arch.head)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    body = gg.fingerprint(model.get_submodule(arch.body))
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    batch = arch.inputs()

    with gg.guard(model, opt, check="both"):
        for _ in range(3):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()

    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == p.requires_grad, name
    assert gg.fingerprint(model.get_submodule(arch.body)) == body


def _fine_tune(model: nn.Module, arch: Arch) -> None:
    opt = torch.optim.AdamW(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    opt.zero_grad()
    _loss(model, arch.inputs()).backward()
    opt.step()


@pytest.mark.parametrize("arch", ARCHS, ids=repr)
def test_trainable_checkpoint_round_trips_onto_the_same_base_only(
    arch: Arch, tmp_path: Path
) -> None:
    tuned = _build(arch, seed=0)
    gg.train_only(tuned, arch.head)
    _fine_tune(tuned, arch)
    path = tmp_path / f"{arch.name}.safetensors"
    gg.save_trainable(tuned, path)

    fresh = _build(arch, seed=0)
    gg.train_only(fresh, arch.head)
    head = fresh.get_submodule(arch.head)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(head.parameters(), tuned.get_submodule(arch.head).parameters(), strict=True)
    )
    gg.load_trainable(fresh, path)
    want = tuned.state_dict()
    got = fresh.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    other = _build(arch, seed=1)
    gg.train_only(other, arch.head)
    untouched = gg.fingerprint(other)
    with pytest.raises(gg.FingerprintMismatchError, match="frozen"):
        gg.load_trainable(other, path)
    assert gg.fingerprint(other) == untouched


def _tied_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=16, bos_token_id=1
    )
    cfg.eos_token_id = 1
    model: nn.Module = transformers.GPT2LMHeadModel(cfg)
    return model


def _tied_llama() -> nn.Module:
    model: nn.Module = transformers.LlamaForCausalLM(_llama_config(tie_word_embeddings=True))
    return model


@pytest.mark.parametrize(
    ("build", "embedding", "head"),
    [
        (_tied_gpt2, "transformer.wte", "lm_head"),
        (_tied_llama, "model.embed_tokens", "lm_head"),
    ],
    ids=["gpt2", "llama"],
)
def test_tied_embeddings_refuse_a_one_sided_freeze(
    build: Callable[[], nn.Module], embedding: str, head: str
) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    tied = model.get_submodule(embedding).weight
    assert tied is model.get_submodule(head).weight

    with pytest.raises(gg.SharedParameterError) as caught:
        gg.freeze(model, "**.embed_tokens" if "embed_tokens" in embedding else embedding)
    message = str(caught.value)
    assert f"'{embedding}'" in message and f"'{head}'" in message
    assert "shared='freeze'" in message
    assert tied.requires_grad  # the refused call changed nothing

    with gg.freeze(model, embedding, shared="freeze"):
        assert not tied.requires_grad
    assert tied.requires_grad
