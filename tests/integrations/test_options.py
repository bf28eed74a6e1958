"""Options, optional imports, checkpoint state and the HF extras of ``GradgateFinetuning``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import gradgate as gg

pytest.importorskip("lightning")
pytest.importorskip("transformers")

from gradgate.integrations import lightning, transformers
from integrations import frameworks as fw

CALLBACKS = [
    pytest.param(lightning.GradgateFinetuning, id="lightning"),
    pytest.param(transformers.GradgateFinetuning, id="hf"),
]


def test_import_gradgate_imports_neither_framework() -> None:
    code = (
        "import sys, gradgate, gradgate.integrations\n"
        "print(sorted(m for m in ('lightning', 'transformers', 'pytorch_lightning') "
        "if m in sys.modules))"
    )
    src = str(Path(gg.__file__).parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src, "PATH": ""},
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"freeze": "a", "train_only": "b"}, "both freeze= and train_only="),
        ({"guard": "fastest"}, "guard must be one of 'fast', 'exact', 'both'; got 'fastest'"),
        ({"mode": "evel"}, "mode must be one of"),
        ({"lr_mult": 0}, "lr_mult must be a positive number; got 0"),
        ({"unfreeze": [(1.5, "late")]}, "unfreeze epoch must be a whole number >= 0; got 1.5"),
        ({"unfreeze": ["late"]}, "unfreeze must be a list of (epoch, selectors) pairs"),
    ],
)
def test_bad_options_fail_at_construction(
    callback: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(gg.InvalidArgumentError) as err:
        callback(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_a_checkpoint_from_another_schedule_is_refused() -> None:
    saved = lightning.GradgateFinetuning("backbone", unfreeze=[(1, "late")]).state_dict()
    other = lightning.GradgateFinetuning("backbone", unfreeze=[(2, "late")])
    with pytest.raises(gg.CheckpointError, match=r"unfreeze epochs \[1\], this one has \[2\]"):
        other.load_state_dict(saved)


def test_a_selector_that_matches_nothing_fails_the_fit_before_training(tmp_path: Path) -> None:
    with pytest.raises(gg.NoMatchError, match="bakbone"):
        fw.fit_lightning(tmp_path, lightning.GradgateFinetuning("bakbone"))


def test_two_optimizers_are_refused_with_a_reason(tmp_path: Path) -> None:
    class TwoOptimizers(fw.Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.head.parameters(), lr=0.1) for _ in range(2)]

    trainer = fw.lightning_trainer(tmp_path, callbacks=[lightning.GradgateFinetuning("backbone")])
    with pytest.raises(gg.InvalidArgumentError, match="exactly one optimizer"):
        trainer.fit(TwoOptimizers(), fw.DataLoader(fw.image_data(), batch_size=8))


def test_hf_saves_only_what_trains_bound_to_the_frozen_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cb = transformers.GradgateFinetuning(train_only="classifier", save_trainable=True, summary=True)
    run = fw.fit_hf(tmp_path, cb, epochs=1, save_every_epoch=True)
    assert "classifier" in capsys.readouterr().out  # the summary table at train start
    path = run.checkpoints[-1] / transformers.TRAINABLE_FILE
    fresh = fw.hf_model()
    gg.train_only(fresh, "classifier")
    gg.load_trainable(fresh, path)
    assert gg.fingerprint(fresh) == gg.fingerprint(run.model)
    other = fw.hf_model()
    with torch.no_grad():
        other.get_parameter("bert.embeddings.word_embeddings.weight")[0, 0] += 1
    gg.train_only(other, "classifier")
    with pytest.raises(gg.FingerprintMismatchError):
        gg.load_trainable(other, path)


def test_a_restored_unfreeze_is_replayed_into_the_first_optimizer() -> None:
    from gradgate.integrations._core import FinetuneCore

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    core = FinetuneCore("0", unfreeze=[(1, "0")], guard=None)
    core.prepare(net)
    core.load_state_dict({"applied": [0], "epochs": [1]})
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    core.align(net, opt, None)
    core.align(net, opt, None)  # on_train_begin aligns again after GradgateTrainer did
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert core.on_epoch(net, 5) is False  # replayed already: nothing left to do


def hf_trainer(tmp_path: Path, callback: Any, **kwargs: Any) -> Any:
    args = fw.hf_args(tmp_path / "hf", **kwargs)
    return transformers.GradgateTrainer(
        model=fw.hf_model(), args=args, train_dataset=fw.TokenData(), callbacks=[callback]
    )


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (None, r"gradgate_finetuning.json is missing or unreadable"),
        ("{not json", r"gradgate_finetuning.json is missing or unreadable"),
        ('{"applied": [0], "epochs": [2]}', r"unfreeze epochs \[2\], this one has \[1\]"),
        ('{"applied": [3], "epochs": [1]}', r"applied=\[3\], expected indices into the 1"),
        (
            '{"version": 2, "kind": "GradualUnfreeze", "schedule": {"at": [1], "unfrozen": [7]}}',
            r"unfrozen=\[7\], expected indices into the 1",
        ),
        ('{"version": 9, "kind": "GradualUnfreeze"}', r"has version 9, this gradgate reads 2"),
        ("[0]", r"holds list, not the callback state"),
    ],
)
def test_hf_resume_from_a_bad_state_fails_before_anything_changes(
    tmp_path: Path, state: str | None, message: str
) -> None:
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    if state is not None:
        (folder / transformers.STATE_FILE).write_text(state)
    cb = transformers.GradgateFinetuning(
        ["bert.encoder.layer.0", "bert.encoder.layer.1"], unfreeze=[(1, "bert.encoder.layer.1")]
    )
    trainer = hf_trainer(tmp_path, cb)
    model = trainer.model
    before = gg.fingerprint(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(gg.CheckpointError, match=message):
        trainer.train(resume_from_checkpoint=str(folder))
    assert gg.fingerprint(model) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert trainer.optimizer is None and cb.core.schedule is None
