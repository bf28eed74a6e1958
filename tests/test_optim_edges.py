"""Edges of sync and checkpoints found on older torch releases and by newcomers (issue 25)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradgate as gg
from gradgate import checkpoint


def _two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_sync_gives_adagrad_the_state_its_constructor_would() -> None:
    # Before torch 2.12 Adagrad makes 'step' and 'sum' only in __init__ and its
    # step() reads them for every parameter with a gradient: a parameter added
    # by sync without them raised KeyError: 'sum' (2.6-2.11).
    net = _two_layers()
    gg.freeze(net, "0")
    opt = torch.optim.Adagrad(
        [p for p in net.parameters() if p.requires_grad], lr=0.1, initial_accumulator_value=0.5
    )
    gg.unfreeze(net, "0")
    assert gg.sync(opt, net)["added"] == ["0.weight", "0.bias"]
    first = net[0]
    assert isinstance(first, nn.Linear)
    for p in (first.weight, first.bias):
        state = opt.state[p]
        assert set(state) == {"step", "sum"}
        assert torch.equal(state["sum"], torch.full_like(p, 0.5))
        assert float(state["step"]) == 0.0
    # The same numbers as an Adagrad built over the whole model from the start.
    ref_net = _two_layers()
    ref = torch.optim.Adagrad(ref_net.parameters(), lr=0.1, initial_accumulator_value=0.5)
    x = torch.randn(5, 3)
    for model, o in ((net, opt), (ref_net, ref)):
        o.zero_grad()
        model(x).sum().backward()
        o.step()
    for a, b in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_complex128_checkpoint_is_read_into_an_aligned_buffer(tmp_path: Path) -> None:
    # A two-element float64 tensor before it puts the complex
    # tensor's bytes at an 8-byte offset in the file; viewing that buffer as
    # complex128 and copying from it crashed torch 2.6 (segfault).
    net = nn.Module()
    net.a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    net.z = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    path = gg.save_trainable(net, tmp_path / "c.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("z").data_ptr() % 16 == 8  # the misaligned layout under test
    tensors, _ = checkpoint._read(path)
    assert tensors["z"].dtype == torch.complex128
    assert tensors["z"].data_ptr() % 16 == 0
    saved = net.z.detach().clone()
    with torch.no_grad():
        net.z.zero_()
    gg.load_trainable(net, path)
    assert torch.equal(net.z, saved)
