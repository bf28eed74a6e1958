"""Edges of sync and checkpoints found on older torch releases and by newcomers (issue 25)."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))


def test_save_into_a_path_whose_parent_is_a_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    # Before: a raw FileExistsError/NotADirectoryError from mkdir.
    (tmp_path / "notes.txt").write_text("mine")
    net = _bn_net()
    gg.freeze(net, "0")
    for dest in (tmp_path / "notes.txt" / "h.safetensors", tmp_path / "notes.txt" / "a" / "h.st"):
        with pytest.raises(gg.CheckpointError) as info:
            gg.save_trainable(net, dest)
        assert repr(str(dest)) in str(info.value)
        assert f"{str(tmp_path / 'notes.txt')!r} is a file, not a folder" in str(info.value)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_frozen_batchnorm_eps_change_is_a_different_base(tmp_path: Path) -> None:
    net = _bn_net()
    gg.freeze(net, "0", "1")
    path = gg.save_trainable(net, tmp_path / "h.safetensors")
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm1d)
    bn.eps = 1e-3  # no tensor changed, the computation did
    before = [t.detach().clone() for t in net.state_dict().values()]
    message = r"settings differ: 1\.eps 1e-05 -> 0\.001"
    with pytest.raises(gg.FingerprintMismatchError, match=message):
        gg.load_trainable(net, path)
    assert all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values(), strict=True))
    bn.eps = 1e-5
    gg.load_trainable(net, path)  # the same settings load


def test_loading_onto_a_fresh_unfrozen_model_says_freeze_it_first(tmp_path: Path) -> None:
    net = _bn_net()
    gg.freeze(net, "0", "1")
    path = gg.save_trainable(net, tmp_path / "h.safetensors")
    fresh = _bn_net()
    with pytest.raises(gg.FingerprintMismatchError) as info:
        gg.load_trainable(fresh, path)
    msg = str(info.value)
    assert "freeze it the same way first" in msg
    assert f"gg.freeze(model, '0', '1'); gg.load_trainable(model, {str(path)!r})" in msg
    assert "strict=False" not in msg
    gg.freeze(fresh, "0", "1")  # doing what it says works
    gg.load_trainable(fresh, path)


def test_load_trainable_returns_a_short_readable_result(tmp_path: Path) -> None:
    net = _bn_net()
    gg.freeze(net, "0", "1")
    opt = torch.optim.SGD(gg.trainable_parameters(net), lr=0.1)
    path = gg.save_trainable(net, tmp_path / "h.safetensors", optimizer=opt)
    result = gg.load_trainable(net, path, optimizer=opt)
    assert isinstance(result, checkpoint.LoadResult)
    assert result.loaded == ("2.weight", "2.bias")
    assert result.optimizer is True and result.path == path
    assert result.frozen == 7  # two Linear tensors, BatchNorm's two and its three buffers
    assert result.fingerprint == result["gradgate.frozen_fingerprint"]
    assert f"torch {torch.__version__}" in result.saved_with
    text = repr(result)
    assert "\n" not in text and len(text) < 300 and "2.weight" in text
    assert str(result) == text
    # still the metadata mapping it used to be
    assert result["torch.version"] == torch.__version__
    assert dict(result) == dict(result.metadata) and "gradgate.format" in result
