"""Rows live inside the model: every PyTorch operation on a row-frozen model, one table.

Each case trains a model with ``gg.rows`` in force and a reference copy of
the same model trained by hand (a row mask on the gradient, no weight
decay, no gradgate), applies one PyTorch operation to both halfway, and
asserts: frozen rows bit-identical, trainable rows moved, and the model
equal to the reference (gradients cleared or clipped as on the plain model).
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cases
import gradgate as gg

VOCAB, DIM = 24, 6
NEW = [20, 21, 22, 23]
OLD = [i for i in range(VOCAB) if i not in NEW]


class UntiedLM(nn.Module):
    """``cases.TiedLM``'s shape with its own output weight: rows of the embedding only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.body = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh())
        self.decoder = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.body(self.embed(x)))
        return out


def _build(kind: str) -> Any:
    torch.manual_seed(0)
    return cases.TiedLM(VOCAB, DIM) if kind == "tied" else UntiedLM()


def _rows(model: nn.Module, mode: str) -> None:
    """The two ways to leave ``OLD`` fixed and train ``NEW``."""
    if mode == "freeze":
        gg.freeze(model, gg.rows("embed.weight", OLD))  # the rest of the model trains
    else:
        gg.train_only(model, gg.rows("embed.weight", NEW))  # nothing else trains


def _reference(model: nn.Module, mode: str) -> nn.Module:
    """The same model for hand-written row freezing: plain flags, a mask applied by the loop."""
    if mode == "train_only":
        for name, p in model.named_parameters():
            p.requires_grad_(name == "embed.weight")
    return model


_MASK = torch.zeros(VOCAB, 1)
_MASK[NEW] = 1.0


def _mask(model: nn.Module) -> None:
    """The reference's row freeze: the frozen rows' gradient is zero (no weight decay)."""
    w = model.get_parameter("embed.weight")
    if w.grad is not None:
        w.grad.mul_(_MASK.to(w.grad))


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, VOCAB, (4, 5), generator=g)
    x[:, 0] = torch.tensor(NEW)  # new tokens in every batch
    return x


def _loss(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCAB).float(), x.reshape(-1))


def _weight(model: nn.Module) -> torch.Tensor:
    """``embed.weight`` as ``state_dict`` gives it: the full current tensor."""
    w: torch.Tensor = model.state_dict()["embed.weight"]
    return w


@dataclass
class Run:
    """A model, its optimizer, and what the loop calls it through."""

    model: Any
    ref: bool
    call: Callable[[torch.Tensor], torch.Tensor] | None = None
    opt: torch.optim.Optimizer = field(init=False)
    seen: list[Any] = field(default_factory=list)  # what a step observed (norms, grads)

    def __post_init__(self) -> None:
        self.new_optimizer()

    def new_optimizer(self) -> None:
        params = (
            [p for p in self.model.parameters() if p.requires_grad]
            if self.ref
            else list(gg.trainable_parameters(self.model))  # the same list, with rows
        )
        self.opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _loss(self.model if self.call is None else self.call, x)


# -- the steps: how one training step touches the model -------------------------


def step_plain(run: Run, x: torch.Tensor) -> None:
    run.opt.zero_grad()
    run.forward(x).backward()
    if run.ref:
        _mask(run.model)
    run.opt.step()


def _step_zero_grad(set_to_none: bool) -> Callable[[Run, torch.Tensor], None]:
    def step(run: Run, x: torch.Tensor) -> None:
        run.model.zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in run.model.parameters() if p.requires_grad]
        run.seen.append([None if g is None else bool(g.abs().sum() == 0) for g in grads])
        run.forward(x[:2]).backward()  # two micro-batches accumulate
        run.forward(x[2:]).backward()
        if run.ref:
            _mask(run.model)
        run.opt.step()

    return step


def step_clip_norm(run: Run, x: torch.Tensor) -> None:
    run.opt.zero_grad()
    run.forward(x).backward()
    if run.ref:
        _mask(run.model)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 0.05)
    run.seen.append(float(norm))
    run.opt.step()


def step_clip_value(run: Run, x: torch.Tensor) -> None:
    run.opt.zero_grad()
    run.forward(x).backward()
    if run.ref:
        _mask(run.model)
    torch.nn.utils.clip_grad_value_(run.model.parameters(), 1e-3)
    run.opt.step()


def step_autograd_grad(run: Run, x: torch.Tensor) -> None:
    params = [p for p in run.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(run.forward(x), params)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    if run.ref:
        _mask(run.model)
    run.opt.step()


def _step_compiled(backend: str) -> Callable[[Run, torch.Tensor], None]:
    def step(run: Run, x: torch.Tensor) -> None:
        if run.call is None:
            run.call = torch.compile(run.model, backend=backend)  # autograd through dynamo
        step_plain(run, x)

    return step


# -- the transforms: what happens to the model between two halves of training ---


def _fresh(run: Run, kind: str, mode: str) -> Any:
    model = _build(kind)
    if run.ref:
        return _reference(model, mode)
    _rows(model, mode)
    return model


def t_state_dict_strict(run: Run, kind: str, mode: str) -> Any:
    new = _fresh(run, kind, mode)
    result = new.load_state_dict(run.model.state_dict(), strict=True)
    run.seen.append((sorted(result.missing_keys), sorted(result.unexpected_keys)))
    return new


def t_state_dict_non_strict(run: Run, kind: str, mode: str) -> Any:
    new = _fresh(run, kind, mode)
    state = {k: v for k, v in run.model.state_dict().items() if not k.startswith("body.")}
    result = new.load_state_dict(state, strict=False)
    run.seen.append((sorted(result.missing_keys), sorted(result.unexpected_keys)))
    new.body.load_state_dict(run.model.body.state_dict())
    return new


def t_state_dict_assign(run: Run, kind: str, mode: str) -> Any:
    new = _fresh(run, kind, mode)
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    if kind == "tied":  # one tensor under both keys, as a saved tied model holds it
        state["decoder.weight"] = state["embed.weight"]
    new.load_state_dict(state, assign=True)
    if kind == "tied" and run.ref:
        # assign=True gives each key its own Parameter: plain torch unties, so the
        # hand-written loop ties again (as transformers' tie_weights does). With rows,
        # both uses keep one trainable-rows parameter: nothing to redo.
        new.decoder.weight = new.embed.weight
    return new


def t_deepcopy(run: Run, kind: str, mode: str) -> Any:
    new: nn.Module = copy.deepcopy(run.model)
    return new


def t_pickle(run: Run, kind: str, mode: str) -> Any:
    new: nn.Module = pickle.loads(pickle.dumps(run.model))
    return new


def t_torch_save(run: Run, kind: str, mode: str) -> Any:
    buf = io.BytesIO()
    torch.save(run.model, buf)
    buf.seek(0)
    new: nn.Module = torch.load(buf, weights_only=False)
    return new


def t_float64(run: Run, kind: str, mode: str) -> Any:
    return run.model.to(torch.float64)


def t_half_roundtrip(run: Run, kind: str, mode: str) -> Any:
    return run.model.half().float()


def t_bfloat16_roundtrip(run: Run, kind: str, mode: str) -> Any:
    return run.model.to(torch.bfloat16).to(torch.float32)


def t_to_device(run: Run, kind: str, mode: str) -> Any:
    return run.model.to(torch.device("cpu")).to("cpu", torch.float32)


def t_none(run: Run, kind: str, mode: str) -> Any:
    return run.model


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


# What each transform does to the values of frozen rows (dtype round trips round them).
CAST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "float64": lambda t: t.to(torch.float64),
    "half_roundtrip": lambda t: t.half().float(),
    "bfloat16_roundtrip": lambda t: t.to(torch.bfloat16).float(),
}

OPERATIONS: dict[str, tuple[Callable[..., None], Callable[..., Any]]] = {
    "zero_grad_set_to_none": (_step_zero_grad(True), t_none),
    "zero_grad_zeros": (_step_zero_grad(False), t_none),
    "clip_grad_norm_": (step_clip_norm, t_none),
    "clip_grad_value_": (step_clip_value, t_none),
    "autograd_grad": (step_autograd_grad, t_none),
    "torch_compile": (_step_compiled("aot_eager"), t_none),
    # inductor (CPU) generates and builds C++ kernels: it needs a C compiler (gcc here)
    "torch_compile_inductor": (_step_compiled("inductor"), t_none),
    "state_dict_strict": (step_plain, t_state_dict_strict),
    "state_dict_non_strict": (step_plain, t_state_dict_non_strict),
    "state_dict_assign": (step_plain, t_state_dict_assign),
    "deepcopy": (step_plain, t_deepcopy),
    "pickle": (step_plain, t_pickle),
    "torch_save_model": (step_plain, t_torch_save),
    "float64": (step_plain, t_float64),
    "half_roundtrip": (step_plain, t_half_roundtrip),
    "bfloat16_roundtrip": (step_plain, t_bfloat16_roundtrip),
    "to_device": (step_plain, t_to_device),
}


@pytest.mark.parametrize("kind", ["plain", "tied"])
@pytest.mark.parametrize("mode", ["freeze", "train_only"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_pytorch_operation_on_a_row_frozen_model(operation: str, mode: str, kind: str) -> None:
    step, transform = OPERATIONS[operation]
    model = _build(kind)
    ref_model = _reference(copy.deepcopy(model), mode)
    start = _weight(model).clone()
    _rows(model, mode)
    runs = [Run(model, ref=False), Run(ref_model, ref=True)]
    for i in range(2):
        for run in runs:
            step(run, _batch(i))
    for run in runs:
        new = transform(run, kind, mode)
        if new is not run.model:
            run.model, run.call = new, None
            run.new_optimizer()
        elif transform is not t_none:
            run.new_optimizer()  # a dtype change makes new tensors for the optimizer
    for i in range(2, 4):
        for run in runs:
            step(run, _batch(i))
    ours, theirs = runs
    w, ref_w = _weight(ours.model), _weight(theirs.model)
    cast = CAST.get(operation, _same)
    assert torch.equal(w[OLD], cast(start)[OLD]), "a frozen row moved"
    assert torch.equal(ref_w[OLD], cast(start)[OLD])  # the reference is right too
    assert not torch.equal(w[NEW], cast(start)[NEW]), "the trainable rows did not train"
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    state, ref_state = ours.model.state_dict(), theirs.model.state_dict()
    assert list(state) == list(ref_state)  # same keys, same order: nothing extra
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    assert len(ours.seen) == len(theirs.seen)
    for mine, reference in zip(ours.seen, theirs.seen, strict=True):
        if isinstance(mine, float):
            assert mine == pytest.approx(reference, rel=1e-5)  # clip_grad_norm_'s total norm
        elif operation.startswith("zero_grad"):
            # Every trainable gradient cleared as on the plain model: None, or all zero.
            assert set(mine) == set(reference) and len(set(mine)) <= 1
        else:
            assert mine == reference  # load_state_dict's missing / unexpected keys
    assert ours.model.embed._parameters["weight"].grad is None  # W: frozen, no full-size grad


def test_undo_after_the_operations_gives_back_the_trained_tensor() -> None:
    model = _build("tied")
    handle = gg.train_only(model, gg.rows("embed.weight", NEW))
    run = Run(model, ref=False)
    step_plain(run, _batch(0))
    trained = _weight(model).clone()
    copied = copy.deepcopy(model)
    handle.undo()
    w = model.embed.weight
    assert type(w) is nn.Parameter and w is model.decoder.weight
    assert torch.equal(w.detach(), trained)
    assert not any(isinstance(m, gg.subtensor.TrainableRows) for m in model.modules())
    assert type(model.embed) is nn.Embedding and type(model.decoder) is nn.Linear
    # the copy made before the undo still trains its rows on its own
    assert isinstance(copied.embed.weight_rows, gg.subtensor.TrainableRows)
