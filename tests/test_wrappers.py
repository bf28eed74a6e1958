"""One cycle-safe unwrap of trainer wrappers (``.optimizer`` / ``.scheduler``) for everything."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gradgate as gg
from gradgate._optimizers import unwrap_optimizer, unwrap_scheduler


class Wrapper:
    def __init__(self, optimizer: Any = None, scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler


def _net_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


@pytest.mark.timeout(30)
def test_a_back_reference_from_the_optimizer_to_its_wrapper_is_seen_through() -> None:
    net, opt = _net_and_opt()
    outer = Wrapper(opt)
    opt.optimizer = outer  # type: ignore[attr-defined]  # a loop: wrapper <-> optimizer
    assert unwrap_optimizer(outer) is opt
    gg.freeze(net, "0")
    report = gg.sync(outer, net)  # type: ignore[arg-type]  # wrappers are accepted
    assert report["removed"] == ["0.weight", "0.bias"]
    with gg.guard(net, outer):  # type: ignore[arg-type]
        pass


@pytest.mark.timeout(30)
def test_a_loop_of_wrappers_without_an_optimizer_is_an_error_not_a_hang() -> None:
    net, _ = _net_and_opt()
    a, b = Wrapper(), Wrapper()
    a.optimizer, b.optimizer = b, a
    with pytest.raises(gg.InvalidArgumentError, match=r"`.optimizer` chain loops \(Wrapper -> "):
        gg.sync(a, net)  # type: ignore[arg-type]
    with pytest.raises(gg.InvalidArgumentError, match="chain loops"):
        gg.save_trainable(net, "unused.safetensors", optimizer=a)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_a_loop_of_scheduler_wrappers_is_an_error_not_a_hang() -> None:
    net, opt = _net_and_opt()
    a, b = Wrapper(), Wrapper()
    a.scheduler, b.scheduler = b, a
    with pytest.raises(gg.InvalidArgumentError, match=r"`.scheduler` chain of Wrapper loops"):
        unwrap_scheduler(a)
    gg.freeze(net, "0")
    opt = torch.optim.SGD(gg.trainable_parameters(net), lr=0.1)
    gg.unfreeze(net, "0")  # sync adds a group and extends the schedule to it
    with pytest.raises(gg.InvalidArgumentError, match="chain of Wrapper loops"):
        gg.sync(opt, net, a)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    sched.scheduler = Wrapper(scheduler=sched)  # type: ignore[attr-defined]
    assert unwrap_scheduler(Wrapper(scheduler=sched)) is sched
