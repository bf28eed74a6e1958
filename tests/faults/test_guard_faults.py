"""guard under faults: replaced tensors, wrappers, other threads, interrupts."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import gradgate as gg
from gradgate import _events


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    gg.freeze(model, "0", "1")
    return model


def test_replacement_through_a_compiled_wrapper_is_seen() -> None:
    model = _model()
    compiled = torch.compile(model, backend="eager")
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'_orig_mod\.0\.weight' .*replaced"),
        gg.guard(compiled),  # type: ignore[arg-type]
    ):
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


def test_a_freeze_from_another_thread_joins_the_watch() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    with gg.guard(model, opt) as g:
        worker = threading.Thread(target=lambda: gg.freeze(model, "2"))
        worker.start()
        worker.join()
        model.get_parameter("2.weight").grad = torch.zeros(1, 3)  # weight decay would move it
        with pytest.raises(gg.FrozenTensorChangedError, match=r"'2\.weight'"):
            opt.step()
    assert g.steps == 1


def test_two_guards_on_two_models_do_not_see_each_others_changes() -> None:
    a, b = _model(), _model()
    with gg.guard(a) as ga, gg.guard(b) as gb:
        gg.unfreeze(a, "0")
        with torch.no_grad():
            a.get_parameter("0.weight").add_(1)  # a's guard let it go
        with torch.no_grad(), pytest.raises(gg.FrozenTensorChangedError, match=r"'0\.weight'"):
            b.get_parameter("0.weight").add_(1)
            gb.check()
        ga.check()


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_an_interrupt_inside_the_guard_keeps_its_type_and_unsubscribes(
    error: type[BaseException],
) -> None:
    model = _model()
    listeners = len(_events._listeners)
    with pytest.raises(error), gg.guard(model):
        with torch.no_grad():
            model.get_parameter("0.weight").add_(1)
        raise error()
    assert len(_events._listeners) == listeners  # no listener leaked


def test_buffer_replaced_by_load_state_dict_assign_is_seen() -> None:
    model = _model()
    stats = {"1.running_mean": torch.full((3,), 7.0)}
    with (
        pytest.raises(
            gg.FrozenTensorChangedError, match=r"^frozen buffer '1\.running_mean' .*replaced"
        ),
        gg.guard(model, check="exact"),
    ):
        model.load_state_dict(stats, strict=False, assign=True)


def test_a_module_replaced_before_a_gradgate_change_is_still_reported() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    gg.freeze(model, "0", "1")
    with (
        pytest.raises(gg.FrozenTensorChangedError, match=r"'1\.weight' .*replaced"),
        gg.guard(model),
    ):
        model[1] = nn.Linear(3, 3).requires_grad_(False)  # the old '1' is gone
        gg.freeze(model, "2")  # a gradgate change re-reads the model before any check
