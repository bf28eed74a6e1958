from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import gradgate as gg
from cases import CASES, Case
from gradgate.tools.agent import Agent


def _trained(seed: int = 0) -> tuple[Agent, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    agent = Agent()
    gg.freeze(agent, "front_end")
    opt = torch.optim.Adam(gg.trainable_parameters(agent), lr=1e-3)
    for _ in range(2):
        agent(torch.randn(4, 3, 28, 28)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return agent, opt


def test_round_trip_bit_for_bit(tmp_path: Path) -> None:
    agent, opt = _trained()
    path = gg.save_trainable(agent, tmp_path / "policy.safetensors", optimizer=opt)
    fresh = Agent()
    fresh.front_end.load_state_dict(agent.front_end.state_dict())
    gg.freeze(fresh, "front_end")
    opt2 = torch.optim.Adam(gg.trainable_parameters(fresh), lr=1e-3)
    meta = gg.load_trainable(fresh, path, optimizer=opt2)
    assert meta["torch.version"] == torch.__version__
    assert gg.fingerprint(fresh) == gg.fingerprint(agent)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for key in s1["state"][k]:
            assert torch.equal(s1["state"][k][key], s2["state"][k][key])
    # both continue identically
    x = torch.randn(4, 3, 28, 28)
    for model, o in ((agent, opt), (fresh, opt2)):
        model(x).pow(2).mean().backward()
        o.step()
    assert gg.fingerprint(fresh) == gg.fingerprint(agent)


def test_file_holds_only_the_trainable_part(tmp_path: Path) -> None:
    agent = Agent()
    gg.train_only(agent, "front_end")
    small = gg.save_trainable(agent, tmp_path / "front.safetensors")
    whole = tmp_path / "whole.pt"
    torch.save(agent.state_dict(), whole)
    ratio = os.path.getsize(small) / os.path.getsize(whole)
    trainable = gg.summary(agent).trainable / gg.summary(agent).total
    assert ratio < trainable + 0.05


def test_wrong_base_raises_and_leaves_model(tmp_path: Path) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    other = Agent()  # a different front-end
    gg.freeze(other, "front_end")
    before = gg.fingerprint(other)
    with pytest.raises(gg.FingerprintMismatchError, match=r"front_end\.conv1\.weight"):
        gg.load_trainable(other, path)
    assert gg.fingerprint(other) == before
    gg.load_trainable(other, path, strict=False)
    assert torch.equal(other.back_end.fc1.weight, agent.back_end.fc1.weight)


def test_missing_key_raises(tmp_path: Path) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    target = Agent()
    target.front_end.load_state_dict(agent.front_end.state_dict())
    target.back_end.extra = torch.nn.Linear(10, 2)  # a head the checkpoint lacks
    gg.freeze(target, "front_end")
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointKeyError) as info:
        gg.load_trainable(target, path)
    assert "back_end.extra.weight" in str(info.value) and "missing" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert gg.fingerprint(target) == before


def test_changed_trainable_set_is_a_different_base(tmp_path: Path) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    gg.unfreeze(agent, "front_end.conv2")
    with pytest.raises(gg.FingerprintMismatchError, match="frozen in the checkpoint's base only"):
        gg.load_trainable(agent, path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_file_raises_and_leaves_model(tmp_path: Path, damage: str) -> None:
    agent, _ = _trained()
    path = gg.save_trainable(agent, tmp_path / "p.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 8 + data[8:])
    else:
        path.unlink()
    target = Agent()
    target.front_end.load_state_dict(agent.front_end.state_dict())
    gg.freeze(target, "front_end")
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointError, match=r"p\.safetensors"):
        gg.load_trainable(target, path)
    assert gg.fingerprint(target) == before


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "tied"], ids=str)
def test_round_trip_over_cases(tmp_path: Path, case: Case) -> None:
    torch.manual_seed(1)
    model = case.factory()
    gg.freeze(model, *case.selectors)
    path = gg.save_trainable(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    copy = case.factory()
    gg.freeze(copy, *case.selectors)
    with torch.no_grad():
        for p in gg.trainable_parameters(copy):
            p.add_(1.0)
    gg.load_trainable(copy, path)
    assert gg.fingerprint(copy) == gg.fingerprint(model)


def _tiny() -> torch.nn.Sequential:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    gg.freeze(model, "0")
    return model


def test_every_flipped_byte_is_refused_and_leaves_the_model(tmp_path: Path) -> None:
    model = _tiny()
    opt = torch.optim.Adam(gg.trainable_parameters(model), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = gg.save_trainable(model, tmp_path / "p.safetensors", optimizer=opt)
    good = path.read_bytes()
    target = _tiny()
    target_opt = torch.optim.Adam(gg.trainable_parameters(target), lr=1e-3)
    before = gg.fingerprint(target)
    header = 8 + int.from_bytes(good[:8], "little")
    for i in range(len(good)):  # header (metadata, names, dtypes, offsets) and every tensor byte
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(gg.CheckpointError):
            gg.load_trainable(target, path, optimizer=target_opt)
        assert target_opt.state_dict()["state"] == {}, i
    assert gg.fingerprint(target) == before
    assert header < len(good)  # the loop covered tensor bytes too
    path.write_bytes(good)
    gg.load_trainable(target, path, optimizer=target_opt)
    assert gg.fingerprint(target) == gg.fingerprint(model)


def _rewrite(path: Path, edit: Any) -> None:
    """Re-save a checkpoint with edited metadata and a digest recomputed to match it."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from gradgate.integrity import tensor_digest

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        tensor_digest(tensors[name], h)
    digest_key = "gradgate.payload_digest"
    h.update(json.dumps(sorted((k, v) for k, v in meta.items() if k != digest_key)).encode())
    meta[digest_key] = h.hexdigest()
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, t: m.update({"gradgate.optimizer": "{not json"}), "not valid JSON"),
        (lambda m, t: m.pop("gradgate.optimizer"), "holds no optimizer state"),
        (lambda m, t: m.update({"gradgate.optimizer": "[1, 2]"}), "malformed optimizer"),
        (lambda m, t: m.update({"gradgate.optimizer": '{"class": "Adam"}'}), "malformed"),
        (lambda m, t: m.pop("gradgate.frozen_fingerprint"), "lacks the frozen base"),
        (lambda m, t: m.pop("gradgate.complex"), "lacks its 'gradgate.complex'"),
        (lambda m, t: m.update({"gradgate.complex": "7"}), "malformed 'gradgate.complex'"),
        (lambda m, t: m.update({"gradgate.format": "1"}), "format '1'"),
        (lambda m, t: m.pop("gradgate.format"), "not a gradgate"),
        (lambda m, t: t.pop(next(k for k in t if k.startswith("__optim__"))), "missing from"),
    ],
)
def test_damaged_metadata_with_a_matching_digest_is_a_checkpoint_error(
    tmp_path: Path, edit: Any, message: str
) -> None:
    model = _tiny()
    opt = torch.optim.Adam(gg.trainable_parameters(model), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = gg.save_trainable(model, tmp_path / "p.safetensors", optimizer=opt)
    _rewrite(path, edit)
    target = _tiny()
    target_opt = torch.optim.Adam(gg.trainable_parameters(target), lr=1e-3)
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointError, match=message):
        gg.load_trainable(target, path, optimizer=target_opt)
    assert gg.fingerprint(target) == before and target_opt.state_dict()["state"] == {}


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.bfloat16])
def test_dtype_mismatch_is_refused_never_cast(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _tiny()
    path = gg.save_trainable(model, tmp_path / "p.safetensors")
    target = _tiny()
    target[1].to(dtype)
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointError) as info:
        gg.load_trainable(target, path)
    assert "'1.weight'" in str(info.value)
    assert f"checkpoint dtype torch.float32 != model dtype {dtype}" in str(info.value)
    assert gg.fingerprint(target) == before


def test_integer_buffer_dtype_mismatch_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    gg.freeze(model, "0")
    path = gg.save_trainable(model, tmp_path / "p.safetensors")
    model[1].num_batches_tracked = torch.tensor(5, dtype=torch.int32)
    with pytest.raises(gg.CheckpointError, match=r"'1\.num_batches_tracked'.*int64.*int32"):
        gg.load_trainable(model, path)
    assert model[1].num_batches_tracked.item() == 5


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.bfloat16])
def test_round_trip_keeps_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _tiny().to(dtype)
    path = gg.save_trainable(model, tmp_path / "p.safetensors")
    target = _tiny().to(dtype)
    weight = target.get_parameter("1.weight")
    with torch.no_grad():
        weight.add_(1)
    gg.load_trainable(target, path)
    assert weight.dtype == dtype
    assert torch.equal(weight, model.get_parameter("1.weight"))


class _Uncopyable(torch.nn.Module):
    """A trainable module whose buffer cannot be written in place (an expanded view)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.register_buffer("z_stats", torch.zeros(1).expand(3))


def test_a_copy_failing_part_way_restores_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Uncopyable()
    model.z_stats = torch.ones(3)  # saved as a plain tensor
    path = gg.save_trainable(model, tmp_path / "p.safetensors")
    torch.manual_seed(1)
    target = _Uncopyable()
    before = gg.fingerprint(target)
    with pytest.raises(gg.CheckpointError, match=r"could not write 'z_stats'.*nothing was changed"):
        gg.load_trainable(target, path)
    assert gg.fingerprint(target) == before  # 'a.weight' and 'a.bias' were written, then restored


class _FailingAdam(torch.optim.Adam):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # applied, then it fails: the worst case
        raise RuntimeError("injected failure")


def test_an_optimizer_failing_to_load_restores_model_and_optimizer(tmp_path: Path) -> None:
    agent, opt = _trained(0)
    path = gg.save_trainable(agent, tmp_path / "p.safetensors", optimizer=opt)
    target, _ = _trained(1)
    target.front_end.load_state_dict(agent.front_end.state_dict())
    failing = _FailingAdam(gg.trainable_parameters(target), lr=5e-4)
    target(torch.randn(2, 3, 28, 28)).pow(2).mean().backward()
    failing.step()
    before_model = gg.fingerprint(target)
    before_state = {k: dict(v) for k, v in failing.state_dict()["state"].items()}
    before_lr = failing.param_groups[0]["lr"]
    with pytest.raises(RuntimeError, match="injected failure"):  # user code keeps its type
        gg.load_trainable(target, path, optimizer=failing)
    assert gg.fingerprint(target) == before_model
    after = failing.state_dict()["state"]
    assert after.keys() == before_state.keys()
    for k, entry in before_state.items():
        for key, value in entry.items():
            assert torch.equal(after[k][key], value), (k, key)
    assert failing.param_groups[0]["lr"] == before_lr == 5e-4
    failing.step()  # still a working optimizer


def test_tensor_lr_survives_save_and_load(tmp_path: Path) -> None:
    model = _tiny()
    opt = torch.optim.Adam(gg.trainable_parameters(model), lr=torch.tensor(1e-2), foreach=False)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    path = gg.save_trainable(model, tmp_path / "p.safetensors", optimizer=opt)
    target = _tiny()
    opt2 = torch.optim.Adam(gg.trainable_parameters(target), lr=torch.tensor(5.0), foreach=False)
    gg.load_trainable(target, path, optimizer=opt2)
    lr = opt2.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and torch.equal(lr, torch.tensor(1e-2))
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)
    x = torch.randn(2, 3)
    for m, o in ((model, opt), (target, opt2)):
        m(x).sum().backward()
        o.step()  # failed before: the tensor lr was dropped
    assert gg.fingerprint(target) == gg.fingerprint(model)


def test_lbfgs_state_round_trips(tmp_path: Path) -> None:
    model = _tiny()
    opt = torch.optim.LBFGS(gg.trainable_parameters(model), lr=0.1, history_size=3)
    x = torch.randn(5, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss: torch.Tensor = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    path = gg.save_trainable(model, tmp_path / "p.safetensors", optimizer=opt)
    target = _tiny()
    opt2 = torch.optim.LBFGS(gg.trainable_parameters(target), lr=0.1, history_size=3)
    gg.load_trainable(target, path, optimizer=opt2)
    saved, loaded = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert saved.keys() == loaded.keys() and isinstance(loaded["old_dirs"], list)
    for key, value in saved.items():
        if isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, loaded[key], strict=True))
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, loaded[key]), key
        else:
            assert value == loaded[key], key


def test_an_optimizer_of_another_class_is_refused(tmp_path: Path) -> None:
    model = _tiny()
    opt = torch.optim.Adam(gg.trainable_parameters(model), lr=1e-3)
    path = gg.save_trainable(model, tmp_path / "p.safetensors", optimizer=opt)
    sgd = torch.optim.SGD(gg.trainable_parameters(model), lr=1e-3)
    with pytest.raises(gg.CheckpointError, match="holds Adam state; the optimizer given is SGD"):
        gg.load_trainable(model, path, optimizer=sgd)


def test_an_optimizer_value_that_cannot_be_stored_is_refused_at_save(tmp_path: Path) -> None:
    model = _tiny()
    opt = torch.optim.SGD(gg.trainable_parameters(model), lr=1e-3)
    opt.param_groups[0]["callback"] = print
    with pytest.raises(gg.CheckpointError, match="option 'callback': a builtin_function"):
        gg.save_trainable(model, tmp_path / "p.safetensors", optimizer=opt)
    assert list(tmp_path.iterdir()) == []


def test_strict_false_with_no_name_in_common_is_refused(tmp_path: Path) -> None:
    model = _tiny()
    path = gg.save_trainable(model, tmp_path / "p.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    other.head = torch.nn.Linear(3, 2)
    gg.freeze(other, "0")
    before = gg.fingerprint(other)
    with pytest.raises(gg.CheckpointKeyError) as info:
        gg.load_trainable(other, path, strict=False)
    msg = str(info.value)
    assert "no trainable name" in msg and "'1.weight'" in msg and "'head.weight'" in msg
    assert gg.fingerprint(other) == before


@pytest.mark.parametrize("wrap", ["accelerate", "lightning"])
def test_save_and_load_through_optimizer_wrappers(tmp_path: Path, wrap: str) -> None:
    from test_integrity import accelerated, lightning

    agent, opt = _trained(0)
    wrapped, _ = (accelerated if wrap == "accelerate" else lightning)(opt)
    path = gg.save_trainable(agent, tmp_path / "p.safetensors", optimizer=wrapped)
    target, opt2 = _trained(1)
    target.front_end.load_state_dict(agent.front_end.state_dict())
    wrapped2, _ = (accelerated if wrap == "accelerate" else lightning)(opt2)
    gg.load_trainable(target, path, optimizer=wrapped2)
    assert gg.fingerprint(target) == gg.fingerprint(agent)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
