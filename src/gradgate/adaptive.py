"""Adaptive freezing: freeze the leading stages that have stopped learning (AutoFreeze).

Every ``every`` optimizer steps, ``AutoFreeze`` asks of each trainable stage
whether it still makes progress (by default: whether the slope of the loss
along the stage's net move over the last window or two, pooled over up to 4
windows, is shown to be below a tenth of the stage that progresses most,
decided only while some stage measurably progresses, so that gradient noise
alone never freezes), and freezes the longest settled prefix of stages
through ``gg.freeze`` and ``gg.sync``. The frozen prefix can then be served
from a ``gg.FeatureCache`` (``split``). The rank rule of the AutoFreeze paper
(arXiv 2102.01386, on gradient-norm decay) and a fixed threshold remain as
options.
"""

from __future__ import annotations

import logging
import math
import statistics
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import schedules
from ._index import ModelIndex, current
from ._optimizers import unwrap_optimizer
from .distributed import GatedDDP, rewrap_indexed
from .errors import InvalidArgumentError
from .freezing import apply_indexed
from .optim.sync import sync_indexed
from .schedules import Stages, split_sequential
from .selection import Selector

__all__ = ["AutoFreeze", "Decision"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """One check of ``AutoFreeze``: what it measured and what it froze.

    Attributes:
        step: the optimizer step count at the check.
        grad_norm: per stage, the mean gradient norm over the window that just
            ended (``None`` for stages that were already frozen).
        change: per stage, ``|previous - current| / previous`` of ``grad_norm``
            (``None`` where there is no previous window or the stage is frozen).
        froze: names of the stages frozen by this check (often empty).
        frozen: names of all frozen stages after the check.
        skipped: why this window was not used (``None`` when it was): too few
            of its steps gave a finite, non-zero gradient norm on some stage
            (a skipped AMP step, a ``zero_grad(set_to_none=False)`` step that
            produced no gradient). Such a window never freezes anything, and
            the next window is compared with nothing.
        decay: per stage, ``grad_norm`` over the stage's baseline (the mean of
            the first two usable windows); ``None`` before the baseline is
            complete and for frozen stages. The rank rule's signal.
        contribution: per stage, the t-statistic of what the measured rules
            read over the pooled windows (up to 4, more when ``every`` is
            below 8): its progress under ``rule="progress"``, the loss
            reduction its own steps caused under ``rule="contribution"``;
            ``None`` before there is anything to pool (for the contribution
            rule: before 4 windows), for frozen stages and under the other
            rules.
        bound: per stage, the upper bound (mean + 2 standard errors) of that
            quantity as a share of the largest stage mean; the measured
            rules' signal (settled below 0.1). ``None`` where
            ``contribution`` is, or when no stage's mean is positive.
        paced: whether ``froze`` was frozen by ``pace`` (the model had
            stopped learning measurably) rather than shown negligible.

    Example:
        >>> Decision(50, [1.0], [None], [], []).to_dict()["step"]
        50
    """

    step: int
    grad_norm: list[float | None]
    change: list[float | None]
    froze: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    skipped: str | None = None
    decay: list[float | None] = field(default_factory=list)
    contribution: list[float | None] = field(default_factory=list)
    bound: list[float | None] = field(default_factory=list)
    paced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the record."""
        return asdict(self)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(
            f"{name} must be a whole number >= {low}; got {value!r}"
            + ("" if high is None else f" (this model has {high} stages)")
        )
    if high is not None and value > high:
        raise InvalidArgumentError(
            f"{name}={value} asks for more trainable stages than there are ({high}); "
            f"pass min_trainable between 1 and {high}"
        )
    return value


def _check_ratio(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise InvalidArgumentError(
            f"ratio must be a number in (0, 1] (a decay below ratio x the median decay "
            f"counts as settled); got {value!r}"
        )
    return float(value)


def _optimizer_params(optimizer: Any) -> set[int]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise InvalidArgumentError(
            f"optimizer must be a torch optimizer (or a wrapper with param_groups); "
            f"got {type(optimizer).__name__}"
        )
    return {id(p) for g in groups for p in g["params"]}


def _seq(name: str, value: object, n: int) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise InvalidArgumentError(
            f"the state's {name} must be a list of {n} numbers (one per stage); got {value!r}"
        )
    return list(value)


def _floats(name: str, value: object, n: int, signed: bool = False) -> list[float]:
    """``n`` finite numbers (``>= 0`` unless ``signed``) from a saved state, else an error."""
    out = _seq(name, value, n)
    if not all(
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (signed or v >= 0)
        for v in out
    ):
        bound = "" if signed else " >= 0"
        raise InvalidArgumentError(
            f"the state's {name} must hold finite numbers{bound}; got {value!r}"
        )
    return [float(v) for v in out]


def _dot(grad: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``grad . update`` as one number, without a copy of either (a sparse gradient is
    densified; half precision is summed in float32)."""
    dense = grad.to_dense() if grad.is_sparse else grad
    a, b = dense.reshape(-1), update.reshape(-1)
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.vdot(a, b)


def _refuse_hidden_ddp(model: nn.Module) -> None:
    """Refuse a DDP wrapper AutoFreeze could not rebuild after a freeze.

    A plain ``DistributedDataParallel`` (or a ``gg.distributed.wrap`` wrapper
    inside ``torch.compile``) would keep reducing the frozen parameters, and
    the first step after a freeze would fail inside DDP, maybe hours in.
    """
    top = model
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) and not (
            model is top and isinstance(model, GatedDDP)
        ):
            where = "" if model is top else f" inside {type(top).__name__}"
            raise InvalidArgumentError(
                f"AutoFreeze got a {type(model).__name__}{where}, which it cannot rebuild "
                "when stages freeze (DDP would fail at the next step); pass "
                "gg.distributed.wrap(model) itself as model (compile inside it: "
                "gg.distributed.wrap(torch.compile(model)))"
            )
        inner, prefix = schedules.looked_through(model)
        if inner is model:
            return
        model = getattr(model, prefix.split(".")[0])


def _prefix_hint(saved: object, names: list[str]) -> str:
    """Where saved and current stage names differ only by a wrapper's prefix, say so."""
    if not isinstance(saved, (list, tuple)) or len(saved) != len(names) or not names:
        return ""
    pairs = [(str(a), b) for a, b in zip(saved, names, strict=True)]
    for longer, shorter, how in ((0, 1, "saved"), (1, 0, "loaded")):
        heads = {p[longer][: len(p[longer]) - len(p[shorter])] for p in pairs
                 if p[longer].endswith(p[shorter])}  # fmt: skip
        if (
            len(heads) == 1
            and (head := heads.pop())
            and sum(p[longer].endswith(p[shorter]) for p in pairs) == len(pairs)
        ):
            return (
                f" (they differ only by the prefix {head!r}, which the model it was {how} on "
                "has from a wrapper: torch.compile adds '_orig_mod.', DataParallel 'module.'; "
                "wrap the model the same way on both sides)"
            )
    return ""


def _like(
    kept: list[torch.Tensor] | None, params: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """``kept`` (weight copies of a stage) in its parameters' dtypes and devices.

    After ``model.to(dtype)`` or ``.to(device)`` mid-run, the copies are converted
    once: the arithmetic stays in the model's dtype and on its device, and a state
    saved later is one the same model loads back.
    """
    if kept is None or all(
        k.dtype == p.dtype and k.device == p.device for k, p in zip(kept, params, strict=True)
    ):
        return kept
    return [k.to(device=p.device, dtype=p.dtype) for k, p in zip(kept, params, strict=True)]


def _slope(grad: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor,
           scratch: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``grad . (weight - anchor)`` as one number: the difference is formed a slice of
    ``CHUNK`` elements at a time in ``scratch``, so each tensor is read once from memory
    and no copy of it is made (a sparse gradient reads its rows only)."""
    if grad.is_sparse:
        g = grad.coalesce()
        rows = g.indices()[0]
        diff = weight.detach().index_select(0, rows) - anchor.index_select(0, rows)
        return _dot(g.values(), diff)
    g, w, a = grad.reshape(-1), weight.detach().reshape(-1), anchor.reshape(-1)
    parts = []
    for start in range(0, g.numel(), CHUNK):
        end = min(start + CHUNK, g.numel())
        d = scratch[: end - start]
        torch.sub(w[start:end], a[start:end], out=d)
        parts.append(_dot(g[start:end], d))
    return torch.stack(parts).sum() if parts else torch.zeros((), device=g.device)


class _ProgressHook:
    """The optimizer's step pre-hook of an ``AutoFreeze(rule="progress")``: measures each
    trainable stage's slope just before the weights move. It holds the AutoFreeze weakly
    (an optimizer never keeps a dead one alive; the AutoFreeze removes it when collected),
    ignores any optimizer but the one it was registered on (a ``deepcopy`` of the optimizer
    shares the hook), and pickles as a no-op (an unpickled or copied AutoFreeze registers
    its own). A fused optimizer stepped by a ``GradScaler`` gets the loss scale as
    ``optimizer.grad_scale``: the gradients are still scaled here, so the slope is divided
    by it."""

    def __init__(self, af: AutoFreeze) -> None:
        self.ref: weakref.ref[AutoFreeze] | None = weakref.ref(af)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        af = None if self.ref is None else self.ref()
        if af is not None and af.rule == "progress" and optimizer is af._hooked:
            # GradScaler.step sets it on the optimizer for the step (or passes it)
            scale = getattr(optimizer, "grad_scale", None)
            if scale is None and isinstance(kwargs, dict):
                scale = kwargs.get("grad_scale")
            af._measure_progress(scale)

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": None}


def _cloned(
    copies: list[list[torch.Tensor] | None], params: Sequence[Sequence[torch.Tensor]]
) -> list[list[torch.Tensor] | None]:
    """Copies of per-stage weight copies, not the live buffers (a state is one moment),
    in the parameters' dtypes and devices (a state saved right after ``model.to(...)``
    loads into the converted model)."""
    return [
        None
        if ts is None
        else [
            t.detach().to(device=p.device, dtype=p.dtype, copy=True)
            for t, p in zip(ts, ps, strict=True)
        ]
        for ts, ps in zip(copies, params, strict=True)
    ]


def _sums(name: str, value: object, n: int) -> list[list[float]]:
    """A window's contribution sums, sums of squares and counts (the last two >= 0)."""
    rows = _seq(name, value, 3)
    return [
        _floats(name, rows[0], n, signed=True),
        _floats(name, rows[1], n),
        _floats(name, rows[2], n),
    ]


def _pool(every: int) -> int:
    """Windows pooled by the measured rules: 4, or enough for ``MIN_SAMPLES`` steps."""
    return max(CONTRIBUTION_WINDOWS, -(-MIN_SAMPLES // every) + 1)


def _seq_any(name: str, value: object, most: int) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) > most:
        raise InvalidArgumentError(
            f"the state's {name} must be a list of at most {most} windows; got {value!r}"
        )
    return list(value)


def _shorten(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


RULES = ("progress", "contribution", "rank", "threshold")
MEASURED = ("progress", "contribution")  # the rules that pool per-step t-statistics
BASE_WINDOWS = 2  # usable windows averaged into each stage's baseline gradient norm
# The contribution rule (measurements in bench/notes/autofreeze.md):
CONTRIBUTION_WINDOWS = 4  # windows pooled into each stage's mean contribution
EVIDENCE_T = 5.0  # decide only while some trainable stage's contribution has t >= this
BOUND_Z = 2.0  # a stage's contribution is at most its mean + BOUND_Z standard errors ...
NEGLIGIBLE = 0.1  # ... and it is settled when that is below this share of the top stage's mean
MIN_SAMPLES = 30  # pooled steps per stage before deciding (t = 5 from 2 samples is luck)
LEARNED = 2  # decisions in a row with t >= EVIDENCE_T before ``pace`` counts the model as learned,
# spanning at least MIN_SAMPLES steps (at every=1 two decisions share 30 of 31 pooled steps)
CHUNK = 1 << 17  # elements per slice of the progress rule's difference (stays in cache)
T_CAP = 1e9  # the t-statistic of a constant, non-zero contribution (zero variance)


def _check_threshold(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidArgumentError(
            f"threshold must be a finite number >= 0 (0 never freezes); got {value!r}"
        )
    return float(value)


def _evidence_counts(value: object) -> list[int]:
    """A saved ``[decisions with evidence in a row, learned (0/1), quiet decisions]``."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise InvalidArgumentError(
            "the state's evidence must be [decisions with evidence in a row, learned (0 or 1), "
            f"quiet decisions]; got {value!r}"
        )
    run, learned, quiet = (_check_int("evidence", v, 0) for v in value)
    if learned > 1 or (quiet and not learned):
        raise InvalidArgumentError(
            f"the state's evidence {list(value)} cannot come from AutoFreeze: learned must be 0 "
            "or 1, and quiet decisions are counted only once the model has learned"
        )
    return [run, learned, quiet]


def _check_pace(value: object, rule: str) -> int:
    pace = _check_int("pace", value, 0)
    if pace and rule not in MEASURED:
        raise InvalidArgumentError(
            f"pace={pace} applies to the measured rules {list(MEASURED)} only (it acts when "
            f"their evidence that the model learns has gone); rule={rule!r}"
        )
    return pace


def _resolve_rule(rule: object, threshold: object) -> tuple[str, float | None]:
    if rule is None:
        rule = "progress" if threshold is None else "threshold"
    if rule not in RULES:
        raise InvalidArgumentError(f"rule must be one of {list(RULES)}; got {rule!r}")
    if rule != "threshold":
        if threshold is not None:
            raise InvalidArgumentError(
                f"threshold={threshold!r} applies to rule='threshold' only; the {rule} rule "
                "compares the stages with each other: drop threshold, or pass rule='threshold'"
            )
        return str(rule), None
    return "threshold", _check_threshold(0.05 if threshold is None else threshold)


class AutoFreeze:
    """Freeze the longest prefix of stages that has stopped learning, measured on gradients.

    Call ``af.step()`` after each ``optimizer.step()`` (before ``zero_grad``:
    it reads the gradients); with a ``GradScaler``, after
    ``scaler.step(optimizer)``, which unscales the gradients in place. It
    adds each trainable stage's gradient norm (and, under the measured rules,
    its progress or contribution) to a window; every ``every`` steps it takes
    the window's mean norm ``g`` per stage and decides:

    - ``rule="progress"`` (the default): each step, each stage's *progress*
      is the slope of the loss along its net move, ``-g_t . (w_{t-1} -
      anchor)``, where ``anchor`` is the stage's weights at the start of the
      previous window (the first weights seen during the first two windows),
      so the move spans one to two windows: positive while the stage still
      travels downhill, about 0 or below once its moves are noise around a
      minimum (oscillation across a valley cancels in the net move; one step's
      update, which ``rule="contribution"`` reads, is mostly that
      oscillation). It is measured inside ``optimizer.step()``, through a
      step pre-hook AutoFreeze registers on the optimizer, on the weights
      the gradient was taken at, before they move: no weight copy per step
      (two snapshots per trainable stage, taken once per window, freed as
      stages freeze; a skipped AMP step is not measured). Then as for the
      contribution rule: t-statistics over the pooled windows (up to 4),
      decisions only while some stage has t >= ``EVIDENCE_T``, a stage
      settled when its upper bound is below ``NEGLIGIBLE`` of the top
      stage's mean, never on fewer than ``MIN_SAMPLES`` pooled steps; the
      first decision comes as soon as there are that many (step 32 at
      ``every=16``). ``Decision.contribution`` and ``bound`` hold its
      t-statistics and bounds. It needs a ``torch.optim`` optimizer (a
      step pre-hook); the hook holds AutoFreeze weakly, ignores other
      optimizers and pickles as a no-op.
    - ``rule="contribution"``: each step, each stage's
      *contribution* is the loss reduction its own previous update caused on
      this step's batch, to first order: ``-g_t . (w_{t-1} - w_{t-2})``
      (loss change allocation, Lan et al. 2019), measured on a batch the update never saw, so for
      gradients that are pure noise its mean is 0. Over the last
      ``CONTRIBUTION_WINDOWS`` (4) windows AutoFreeze takes each stage's
      mean contribution and its standard error. It decides only while some
      trainable stage's t-statistic (mean over standard error) is at least
      ``EVIDENCE_T`` (5: the model measurably learns), so pure noise never
      freezes; then a stage is settled when even the upper bound of its
      contribution (mean + 2 standard errors) is below ``NEGLIGIBLE`` (0.1)
      of the top stage's mean: its updates are shown to matter little, not
      merely not shown to matter. It never decides on fewer than
      ``MIN_SAMPLES`` (30) pooled steps per stage: with ``every`` below 8 it
      pools more windows (``ceil(30 / every) + 1``). ``patience`` is 1
      unless given (each decision already pools 4 windows). Call ``step()``
      exactly once per optimizer step: a second call would score an update
      on the very gradient that made it. It keeps two copies of the
      trainable stages' weights (the last weights and the last update),
      updated every step, freed as stages freeze.
    - ``rule="rank"``: each stage's ``g`` is divided by its
      baseline (its mean over the first two usable windows): the *decay* of
      its gradient. A stage is *settled* in a window when its decay is below
      ``ratio`` times the median decay of the trainable stages, i.e. its
      gradients have shrunk clearly more than the others' (the stages are
      ranked against each other, as in AutoFreeze, arXiv 2102.01386). The
      leading stages settled in ``patience`` consecutive windows freeze. The
      paper's window-to-window change ``|g_prev - g| / g_prev`` is recorded
      in ``history`` too; on real fine-tunes it is mini-batch noise (see
      docs/adaptive.md).
    - ``rule="threshold"`` (the only rule before; chosen by passing
      ``threshold=``): a stage is settled when its window-to-window change
      is below ``threshold``; ``patience`` is 1 unless given. ``threshold=0``
      never freezes.

    ``pace`` (the measured rules only; 0, the default, turns it off): once
    the model has learned measurably (some stage at t >= ``EVIDENCE_T`` in
    ``LEARNED`` (2) decisions in a row spanning at least ``MIN_SAMPLES`` (30)
    steps) and then stopped (no stage there in
    ``patience`` decisions in a row), each decision freezes ``pace`` more
    leading stages, front to back as ``ProgressiveFreeze`` would, until the
    evidence returns or ``min_trainable`` stages are left. First-order
    measures cannot see the slow gains a fine-tune can still make then
    (docs/adaptive.md): ``pace`` bets that the front stages make the least
    of them, and says so in ``Decision.paced``. Pure noise never starts it:
    the model never learned measurably.

    Every rule freezes a prefix only (never a stage behind a trainable
    one), never leaves fewer than ``min_trainable`` stages training and never
    unfreezes. A window where some trainable stage had a finite, non-zero
    gradient norm in fewer than half of its steps (NaN or inf from an
    overflowing step, all zeros from a step that produced no gradient) is
    never used: it freezes nothing, resets the patience counts, and the next
    window is compared with nothing. Frozen stages go through ``gg.freeze``
    (sticky eval, grad ``None``) and ``gg.sync`` (optimizer state dropped,
    scheduler aligned).

    Under DDP pass the ``gg.distributed.wrap`` wrapper as ``model``: the
    window sums are all-reduced over the ranks before each decision, so every
    rank freezes the same stages at the same step, and a freeze rebuilds the
    wrapper; run ``af.wrapped``. Without a wrapper the same all-reduce runs
    whenever a process group is initialised.

    Resume: ``load_state_dict`` re-applies the freezes, so load it before the
    optimizer's and scheduler's state.

    Args:
        model: the model (or its ``gg.distributed.wrap`` wrapper).
        stages: the stages, front to back (``gg.stages`` or selectors); by
            default the model's top-level children that hold a trainable
            parameter (the wrapped model's, inside ``torch.compile``, DDP or
            ``DataParallel``). Together they must hold every trainable parameter.
        optimizer: the optimizer over the model's trainable parameters.
        scheduler: a learning-rate scheduler to keep aligned (``gg.sync``).
        every: steps per window (and between decisions).
        threshold: the change under which a stage counts as settled; passing
            it selects ``rule="threshold"``.
        min_trainable: stages that always keep training (the last ones).
        rule: ``"progress"``, ``"contribution"``, ``"rank"`` or
            ``"threshold"``; by default ``"progress"`` unless ``threshold``
            is given.
        patience: consecutive settled windows before a stage freezes (default:
            2 under the rank rule, 1 under the others).
        ratio: the rank rule's margin: settled means a decay below ``ratio``
            times the median decay.
        pace: stages to freeze per decision once the model has stopped
            learning measurably (measured rules; 0: never).

    Raises:
        InvalidArgumentError: a bad ``every``/``threshold``/``min_trainable``/
            ``rule``/``patience``/``ratio``/``pace``, ``threshold`` with
            ``rule="rank"``, ``pace`` with a rule that is not measured,
            stages that do not partition the trainable parameters, an
            optimizer that lacks some of them, or (under ``rule="progress"``)
            one that takes no step pre-hook. Nothing is changed then.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.0)  # nothing changes: all settled
        >>> af = gg.AutoFreeze(net, optimizer=opt, every=2, threshold=0.5)
        >>> for _ in range(4):
        ...     net(torch.ones(1, 4)).sum().backward(); opt.step(); af.step()
        ...     opt.zero_grad()
        []
        []
        []
        ['0', '1']
        >>> af.frozen, net[0].weight.requires_grad, af.rule
        (['0', '1'], False, 'threshold')
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Stages | Sequence[Selector] | None = None,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        every: int = 16,
        threshold: float | None = None,
        min_trainable: int = 1,
        rule: str | None = None,
        patience: int | None = None,
        ratio: float = 0.7,
        pace: int = 0,
    ) -> None:
        _refuse_hidden_ddp(model)
        self.wrapper: GatedDDP | None = model if isinstance(model, GatedDDP) else None
        inner = model.module if isinstance(model, GatedDDP) else model
        self.model: nn.Module = inner
        self.every = _check_int("every", every, 1)
        self.rule, self.threshold = _resolve_rule(rule, threshold)
        default_patience = 2 if self.rule == "rank" else 1
        self.patience = _check_int(
            "patience", default_patience if patience is None else patience, 1
        )
        self.ratio = _check_ratio(ratio)
        self.pace = _check_pace(pace, self.rule)
        self.stages = self._partition(stages)
        self.min_trainable = _check_int("min_trainable", min_trainable, 1, len(self.stages))
        self._check_optimizer(optimizer)
        self.optimizer = optimizer
        self.scheduler = scheduler
        by_name = dict(inner.named_parameters())
        # the trainable parameters only: a row-frozen weight's frozen full tensor is never
        # measured nor copied, only its trainable rows
        self._params = [
            [by_name[n] for n in names if by_name[n].requires_grad]
            for names in self.stages.parameters
        ]
        self.boundary = 0
        self.steps = 0
        self.history: list[Decision] = []
        self._sums = self._zeros()
        self._valid = self._zeros()
        self._count = 0
        self._previous: list[float] | None = None
        self._settled = [0] * len(self.stages)
        self._base = [0.0] * len(self.stages)
        self._base_windows = 0
        # the measured rules: per window and stage the sum, sum of squares and count of
        # the per-step values; the last _pool(every) usable windows; the contribution rule:
        # per stage the weights after the last step and the last update (None: not yet known)
        self._c = [self._zeros(), self._zeros(), self._zeros()]
        self._recent: list[list[list[float]]] = []
        self._last: list[list[torch.Tensor] | None] = [None] * len(self.stages)
        self._update: list[list[torch.Tensor] | None] = [None] * len(self.stages)
        # the progress rule: per stage the weights its slope is measured from (the start
        # of the previous window; the first weights seen until two windows have passed)
        # and the weights at the start of the current window (None: not yet known)
        self._anchor: list[list[torch.Tensor] | None] = [None] * len(self.stages)
        self._start: list[list[torch.Tensor] | None] = [None] * len(self.stages)
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        # this step's slope per stage, measured in optimizer.step(), kept by af.step() only
        # when the step's gradient is usable (finite, non-zero norm), as for the norms
        self._pending: list[torch.Tensor | None] = [None] * len(self.stages)
        # ``pace``: decisions in a row with (``_evidence``) and, once the model has learned
        # measurably (``_learned``), without (``_quiet``) a stage at t >= EVIDENCE_T
        self._evidence, self._learned, self._quiet = 0, False, 0
        self._hooked: torch.optim.Optimizer | None = None
        self._register(optimizer)

    def _register(self, optimizer: Any) -> None:
        """Hook the progress rule's measurement into the step of ``optimizer`` or the torch
        optimizer it wraps (any rule: a loaded state may switch to it); under the progress
        rule, an optimizer that takes no step pre-hook is refused."""
        try:
            inner: Any = unwrap_optimizer(optimizer)
        except InvalidArgumentError:
            inner = optimizer
        if not isinstance(getattr(inner, "_optimizer_step_pre_hooks", None), dict):
            if self.rule == "progress":
                raise InvalidArgumentError(self._no_hook(optimizer))
            return
        handle = inner.register_step_pre_hook(_ProgressHook(self))
        self._hooked = inner
        weakref.finalize(self, handle.remove)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_hooked"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """An unpickled or deep-copied AutoFreeze hooks its own (copied) optimizer."""
        self.__dict__.update(state)
        self._hooked = None
        self._register(self.optimizer)

    @staticmethod
    def _no_hook(optimizer: Any) -> str:
        return (
            f"rule='progress' measures inside optimizer.step() through a step pre-hook, which "
            f"{type(optimizer).__name__} does not take; pass a torch.optim optimizer (the "
            "trainer's inner one), or rule='contribution'"
        )

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros((), dtype=torch.float64) for _ in self.stages]

    def _partition(self, value: Stages | Sequence[Selector] | None) -> Stages:
        model = self.model
        if value is None:
            inner, prefix = schedules.looked_through(model)
            children = [
                schedules.path_selector(prefix + name)
                for name, child in inner.named_children()
                if any(p.requires_grad for p in child.parameters())
            ]
            if not children:
                raise InvalidArgumentError(
                    f"{type(model).__name__} has no child module with a trainable parameter; "
                    "pass stages=[...] (selectors, front to back)"
                )
            st = schedules.stages(model, *children)
        else:
            st = value if isinstance(value, Stages) else Stages(model, list(value))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        covered: set[str] = set()
        for name, params in zip(st.names, st.parameters, strict=True):
            if not set(trainable).intersection(params):
                raise InvalidArgumentError(
                    f"stage {name!r} has no trainable parameter (it is frozen already); "
                    "stages must partition the trainable part: leave it out"
                )
            covered.update(params)
        missing = [n for n in trainable if n not in covered]
        if missing:
            raise InvalidArgumentError(
                f"stages {st.names} do not cover the trainable parameters "
                f"{_shorten(missing)}; add a stage for them (or freeze them first)"
            )
        return st

    def _check_optimizer(self, optimizer: Any) -> None:
        held = _optimizer_params(optimizer)
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in held
        ]
        if missing:
            raise InvalidArgumentError(
                f"the optimizer does not hold the trainable parameters {_shorten(missing)}; "
                "build it over the model after freezing, e.g. "
                "torch.optim.AdamW(gg.param_groups(model, lr=...))"
            )

    @property
    def frozen(self) -> list[str]:
        """Names of the stages frozen so far (a prefix of ``stages.names``)."""
        return list(self.stages.names[: self.boundary])

    @property
    def wrapped(self) -> nn.Module:
        """The module to run: the current DDP wrapper (rebuilt on freeze), else the model."""
        return self.wrapper if self.wrapper is not None else self.model

    def _accumulate(self) -> None:
        seen = False
        for i in range(self.boundary, len(self.stages)):
            grads = [
                (p.grad.coalesce().values() if p.grad.is_sparse else p.grad)
                for p in self._params[i]
                if p.grad is not None
            ]
            if grads:
                seen = True
                # stays on the gradients' device: no host sync per step
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double())
                good = torch.isfinite(norm) & (norm > 0)
                self._sums[i] = self._sums[i].to(norm.device) + torch.where(good, norm, 0.0)
                self._valid[i] = self._valid[i].to(norm.device) + good.double()
                c = self._pending[i]
                if c is not None:  # the progress rule's slope: kept on a usable step only
                    self._add_sample(i, c, good.to(c.device))
        self._pending = [None] * len(self.stages)
        if not seen:
            raise InvalidArgumentError(
                f"AutoFreeze.step() found no gradient on the trainable stages "
                f"{self.stages.names[self.boundary :]}; call it after optimizer.step() and "
                "before optimizer.zero_grad()"
            )
        self._count += 1

    def _add_sample(self, i: int, c: torch.Tensor, good: torch.Tensor | None = None) -> None:
        """Add one step's measured value ``c`` of stage ``i`` to the window's sum, sum of
        squares and count, unless it is non-finite or ``good`` says the step is unusable
        (on the device: no host sync)."""
        ok = torch.isfinite(c) if good is None else good & torch.isfinite(c)
        c = torch.where(ok, c, 0.0)
        for k, value in enumerate((c, c * c, ok.double())):
            self._c[k][i] = self._c[k][i].to(c.device) + value

    def _contribute(self) -> None:
        """Add each trainable stage's contribution ``-g_t . (w_{t-1} - w_{t-2})`` to the window.

        ``g_t`` (this step's gradient) was computed at ``w_{t-1}``, before the
        update it is dotted with could have fitted its batch. Then the weights
        after this step and this step's update are kept for the next call.
        """
        for i in range(self.boundary, len(self.stages)):
            params = self._params[i]
            now = [p.detach() for p in params]
            last = self._last[i] = _like(self._last[i], now)
            update = self._update[i] = _like(self._update[i], now)
            if last is None:
                self._last[i] = [t.clone() for t in now]
                continue
            if update is not None:
                dots = [_dot(p.grad, u) for p, u in zip(params, update, strict=True)
                        if p.grad is not None]  # fmt: skip
                if dots:
                    self._add_sample(i, -torch.stack(dots).double().sum())
            else:
                update = [torch.empty_like(t) for t in now]
                self._update[i] = update
            for u, w, previous in zip(update, now, last, strict=True):
                torch.sub(w, previous, out=u)  # one pass: read both, write the update
            torch._foreach_copy_(last, now)

    def _measure_progress(self, grad_scale: Any = None) -> None:
        """Before the optimizer moves the weights: each trainable stage's progress
        ``-g_t . (w_{t-1} - anchor)`` (``g_t`` was computed at ``w_{t-1}``, the weights
        now), kept for ``af.step()``; the first call only keeps the weights as the anchor.
        ``grad_scale``: the loss scale still in the gradients (a fused optimizer under a
        ``GradScaler``)."""
        with torch.no_grad():
            for i in range(self.boundary, len(self.stages)):
                params = self._params[i]
                anchor = self._anchor[i] = _like(self._anchor[i], params)
                if anchor is None:
                    self._anchor[i] = [p.detach().clone() for p in params]
                    continue
                dots = []
                for p, a in zip(params, anchor, strict=True):
                    if p.grad is None:
                        continue
                    dots.append(_slope(p.grad, p, a, self._scratch_for(p)))
                if dots:
                    c = -torch.stack(dots).double().sum()
                    if isinstance(grad_scale, torch.Tensor):
                        c = c / grad_scale.to(c.device, torch.float64)
                    self._pending[i] = c

    def _scratch_for(self, p: torch.Tensor) -> torch.Tensor:
        """A reused buffer of at least ``min(p.numel(), CHUNK)`` elements of ``p``'s dtype
        and device (one per dtype and device: a mixed-precision stage never reallocates)."""
        key = (p.dtype, p.device)
        size = min(p.numel(), CHUNK)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.numel() < size:
            scratch = self._scratch[key] = torch.empty(size, dtype=p.dtype, device=p.device)
        return scratch

    def _next_window(self) -> None:
        """At a window's end (progress rule): the current window's start becomes the anchor
        and the weights now the next window's start (the first start keeps the first
        anchor, so the slope always spans at least one window from the third on)."""
        for i in range(self.boundary, len(self.stages)):
            now = [p.detach() for p in self._params[i]]
            self._anchor[i] = _like(self._anchor[i], now)
            start = self._start[i] = _like(self._start[i], now)
            if start is None:
                if self._anchor[i] is not None:
                    self._start[i] = [t.clone() for t in now]
                continue
            self._anchor[i], self._start[i] = start, self._anchor[i]
            torch._foreach_copy_(self._start[i], now)  # type: ignore[arg-type]

    def _window(self) -> tuple[list[float], list[float], int, list[list[float]]]:
        """Per stage the sum of good norms and the count of good steps, over all ranks; and
        the window's contribution sums, sums of squares and counts, averaged over the ranks."""
        rows = [self._sums, self._valid, *self._c]
        totals = torch.stack([torch.stack([v.cpu() for v in row]) for row in rows])
        count = self._count
        if dist.is_available() and dist.is_initialized():
            # every rank decides from the same numbers, so all freeze alike
            shared = totals.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
            totals = shared.cpu()
            # DDP ranks see the same averaged gradient and weights: the same contributions
            totals[2:] /= world
            count *= world
        sums, valid, *c = totals.tolist()
        return [float(v) for v in sums], [float(v) for v in valid], count, c

    def step(self) -> list[str]:
        """Count one optimizer step; on every ``every``-th, decide. Return the stages frozen now."""
        self._accumulate()
        if self.rule == "contribution":
            self._contribute()
        self.steps += 1
        if self.steps % self.every:
            return []
        froze = self._decide()
        if self.rule == "progress":
            self._next_window()
        return froze

    def _measured_rule(
        self,
    ) -> tuple[list[float | None], list[float | None], list[bool] | None, bool | None]:
        """The progress and contribution rules' decision. Per trainable stage, over the pooled
        windows: the t-statistic of its measured values (progress or contribution), the upper
        bound of their mean as a share of the top stage's mean, and whether it is settled
        (``None``: nothing to decide from yet); and whether some stage shows the model
        learning (t >= EVIDENCE_T; ``None``: too few pooled steps to tell)."""
        n_stages = len(self.stages)
        t: list[float | None] = [None] * n_stages
        bound: list[float | None] = [None] * n_stages
        if self.rule == "contribution" and len(self._recent) < _pool(self.every):
            return t, bound, None, None
        means: dict[int, tuple[float, float]] = {}
        pooled = math.inf  # the fewest pooled steps of any trainable stage
        for i in range(self.boundary, n_stages):
            total, squares, n = (sum(w[k][i] for w in self._recent) for k in range(3))
            if n < 2:
                return [None] * n_stages, bound, None, None
            pooled = min(pooled, n)
            mean = total / n
            se = math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1) / n)
            means[i] = mean, se
            if se > 0:
                t[i] = max(-T_CAP, min(T_CAP, mean / se))
            else:
                t[i] = 0.0 if mean == 0 else math.copysign(T_CAP, mean)
        top = max(mean for mean, _ in means.values())
        if top > 0:
            for i, (mean, se) in means.items():
                bound[i] = (mean + BOUND_Z * se) / top
        if pooled < MIN_SAMPLES:
            return t, bound, [False] * n_stages, None  # too few samples
        if max(v for v in t if v is not None) < EVIDENCE_T:
            return t, bound, [False] * n_stages, False  # no stage learns measurably
        return t, bound, [b is not None and b < NEGLIGIBLE for b in bound], True

    def _settled_now(
        self, change: list[float | None], decay: list[float | None]
    ) -> list[bool] | None:
        """Per stage whether this window counts as settled under the rank or threshold rule;
        ``None``: nothing to compare yet."""
        live = range(self.boundary, len(self.stages))
        if self.threshold is not None:  # the threshold rule
            if self._previous is None:
                return None
            bar = self.threshold
            return [c is not None and c < bar for c in change]
        known = [d for d in (decay[i] for i in live) if d is not None]
        if len(known) < len(live):
            return None
        bar = self.ratio * statistics.median(known)
        return [d is not None and d < bar for d in decay]

    def _decide(self) -> list[str]:
        sums, valid, count, c = self._window()
        live = range(self.boundary, len(self.stages))
        n = len(self.stages)
        short = [self.stages.names[i] for i in live if 2 * valid[i] < count]
        grad_norm: list[float | None] = [
            sums[i] / valid[i] if i in live and valid[i] > 0 else None for i in range(n)
        ]
        change: list[float | None] = [None] * n
        decay: list[float | None] = [None] * n
        contribution: list[float | None] = [None] * n
        bound: list[float | None] = [None] * n
        skipped: str | None = None
        froze: list[str] = []
        means: list[float] | None = None
        paced = False
        if short:
            skipped = (
                f"stages {_shorten(short)} had a finite, non-zero gradient norm in fewer "
                f"than half of the window's {count} steps"
            )
            self._settled = [0] * n
            self._recent = []  # the contribution rule pools only consecutive usable windows
            self._evidence = self._quiet = 0
            log.warning("AutoFreeze step %d: window not used: %s", self.steps, skipped)
        else:
            means = [sums[i] / valid[i] if i in live else 0.0 for i in range(n)]
            if self._previous is not None:
                for i in live:
                    change[i] = abs(self._previous[i] - means[i]) / self._previous[i]
            if self._base_windows >= BASE_WINDOWS:
                for i in live:
                    decay[i] = means[i] * self._base_windows / self._base[i]
            learns: bool | None = None
            if self.rule in MEASURED:
                self._recent = [*self._recent, c][-_pool(self.every) :]
                contribution, bound, settled, learns = self._measured_rule()
                self._count_evidence(learns)
            else:
                settled = self._settled_now(change, decay)
            if settled is not None:
                for i in live:
                    self._settled[i] = self._settled[i] + 1 if settled[i] else 0
                cut = self.boundary
                while cut < n - self.min_trainable and self._settled[cut] >= self.patience:
                    cut += 1
                if learns is False and self.pace and self._quiet >= self.patience:
                    # the model learned measurably and has stopped: freeze ``pace`` more
                    settled_cut = cut
                    cut = max(cut, min(self.boundary + self.pace, n - self.min_trainable))
                    paced = cut > settled_cut
                froze = list(self.stages.names[self.boundary : cut])
                if froze:
                    self._freeze_to(cut)
                    log.info(
                        "AutoFreeze step %d: froze %s (decay %s, change %s, bound %s)",
                        self.steps, froze, decay, change, bound,
                    )  # fmt: skip
            if self._base_windows < BASE_WINDOWS:
                self._base = [b + m for b, m in zip(self._base, means, strict=True)]
                self._base_windows += 1
        if not froze and skipped is None:
            log.debug("AutoFreeze step %d: nothing to freeze (decay %s)", self.steps, decay)
        self.history.append(
            Decision(
                self.steps,
                grad_norm,
                change,
                froze,
                self.frozen,
                skipped,
                decay,
                contribution,
                bound,
                paced,
            )
        )
        self._previous = means
        self._sums, self._valid, self._count = self._zeros(), self._zeros(), 0
        self._c = [self._zeros(), self._zeros(), self._zeros()]
        return froze

    def _count_evidence(self, learns: bool | None) -> None:
        """Count decisions in a row with and without evidence that the model learns."""
        if learns is None:
            return  # too few pooled steps: neither
        if learns:
            self._evidence, self._quiet = self._evidence + 1, 0
            span = self._evidence * self.every  # steps the evidence has held, in a row
            self._learned = self._learned or (self._evidence >= LEARNED and span >= MIN_SAMPLES)
        else:
            self._evidence = 0
            self._quiet = self._quiet + 1 if self._learned else 0

    def _freeze_to(self, cut: int) -> None:
        index = ModelIndex(self.model)  # the one walk of this step: freeze, sync, rewrap
        apply_indexed(index, "freeze", list(self.stages[self.boundary : cut]))
        for i in range(self.boundary, cut):  # the weight copies are not needed any more
            self._last[i] = self._update[i] = self._anchor[i] = self._start[i] = None
        self.boundary = cut
        index = current(index)
        sync_indexed(self.optimizer, index, self.scheduler)
        if self.wrapper is not None:
            now = tuple(n for n, p in index.params.items() if p.requires_grad)
            if now != self.wrapper.gg_trainable:
                self.wrapper = rewrap_indexed(self.wrapper, index)

    def split(self, model: nn.Module | None = None) -> tuple[nn.Sequential, nn.Sequential]:
        """``(frozen prefix, rest)`` of an ``nn.Sequential`` whose children are the stages.

        The prefix is what a ``gg.FeatureCache`` can serve from now on; the
        rest is what still runs each step. With nothing frozen the prefix is
        empty.

        Raises:
            InvalidArgumentError: the model is not an ``nn.Sequential``, or a
                frozen stage is not one of its children.

        Example:
            >>> import torch, gradgate as gg
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> af = gg.AutoFreeze(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
            >>> [len(part) for part in af.split()]
            [0, 2]
        """
        seq = self.model if model is None else model
        return split_sequential(seq, self.stages, self.boundary)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, step count, frozen prefix, window, history.

        Under the measured rules it holds tensors (``progress``: ``anchor``
        and ``start``, each trainable stage's weights at the start of the
        previous and of the current window; ``contribution``: ``last`` and
        ``update``, the weights after the last step and the last update), so
        save it with ``torch.save``, not JSON.
        """
        return {
            "stages": list(self.stages.names),
            "every": self.every,
            "rule": self.rule,
            "threshold": self.threshold,
            "patience": self.patience,
            "ratio": self.ratio,
            "pace": self.pace,
            "min_trainable": self.min_trainable,
            "steps": self.steps,
            "boundary": self.boundary,
            "sums": [float(v) for v in self._sums],
            "valid": [float(v) for v in self._valid],
            "count": self._count,
            "previous": None if self._previous is None else list(self._previous),
            "settled": list(self._settled),
            "base": list(self._base),
            "base_windows": self._base_windows,
            "contribution": [[float(v) for v in row] for row in self._c],
            "recent": [[list(row) for row in w] for w in self._recent],
            "evidence": [self._evidence, int(self._learned), self._quiet],
            # copies, not the live buffers: the state is one moment, like its numbers
            "last": _cloned(self._last, self._params),
            "update": _cloned(self._update, self._params),
            "anchor": _cloned(self._anchor, self._params),
            "start": _cloned(self._start, self._params),
            "history": [d.to_dict() for d in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the recorded freezes and restore the window.

        Call it before loading the optimizer's and scheduler's state: it
        removes the frozen stages from the optimizer as the original run did.
        The whole state is checked before anything changes. A state saved
        before the rank rule existed (no ``rule`` key) resumes the threshold
        rule it ran.

        Raises:
            InvalidArgumentError: the state was saved for other stages, it
                freezes every stage or leaves fewer than ``min_trainable``
                training, it has fewer frozen stages than are frozen here
                (AutoFreeze never unfreezes), or a setting or number in it is
                invalid (a NaN threshold, a negative step count, ...).
        """
        names = list(self.stages.names)
        n = len(names)
        saved = state.get("stages") if isinstance(state, dict) else None
        if not isinstance(saved, (list, tuple)) or list(saved) != names:
            raise InvalidArgumentError(
                f"this AutoFreeze state was saved for stages {saved}, but these "
                f"are {names}; build AutoFreeze with the same stages{_prefix_hint(saved, names)}"
            )
        every = _check_int("every", state.get("every"), 1)
        legacy = "rule" not in state
        rule, threshold = _resolve_rule(
            "threshold" if legacy else state["rule"], state.get("threshold")
        )
        patience = _check_int("patience", state.get("patience", 1 if legacy else None), 1)
        ratio = _check_ratio(state.get("ratio", 0.7))
        pace = _check_pace(state.get("pace", 0), rule)
        evidence = _evidence_counts(state.get("evidence", [0, 0, 0]))
        min_trainable = _check_int("min_trainable", state.get("min_trainable"), 1, n)
        boundary = _check_int("boundary", state.get("boundary"), 0)
        if boundary > n - min_trainable:
            raise InvalidArgumentError(
                f"the state freezes {boundary} of the {n} stages, but min_trainable="
                f"{min_trainable} must keep training; it cannot come from AutoFreeze"
            )
        if boundary < self.boundary:
            raise InvalidArgumentError(
                f"the state has {boundary} frozen stages but {self.boundary} are frozen "
                "already; AutoFreeze never unfreezes: load it into a fresh AutoFreeze"
            )
        steps = _check_int("steps", state.get("steps"), 0)
        count = _check_int("count", state.get("count"), 0)
        sums = _floats("sums", state.get("sums"), n)
        valid = _floats("valid", state.get("valid", [float(count)] * n), n)
        prev = state.get("previous")
        previous = None if prev is None else _floats("previous", prev, n)
        if previous is not None and not all(previous[boundary:]):
            raise InvalidArgumentError(
                f"the state's previous must be > 0 for every trainable stage; got {previous}"
            )
        settled = [
            _check_int("settled", v, 0) for v in _seq("settled", state.get("settled", [0] * n), n)
        ]
        base = _floats("base", state.get("base", [0.0] * n), n)
        base_windows = _check_int("base_windows", state.get("base_windows", 0), 0)
        if base_windows and not all(base[boundary:]):
            raise InvalidArgumentError(
                f"the state's base must be > 0 for every trainable stage; got {base}"
            )
        partial = state.get("contribution", [[0.0] * n] * 3)
        contrib = _sums("contribution", partial, n)
        recent = [
            _sums("recent", w, n) for w in _seq_any("recent", state.get("recent", []), _pool(every))
        ]
        last = self._copies("last", state.get("last"), boundary)
        update = self._copies("update", state.get("update"), boundary)
        anchor = self._copies("anchor", state.get("anchor"), boundary)
        start = self._copies("start", state.get("start"), boundary)
        if rule == "progress" and self._hooked is None:
            raise InvalidArgumentError(self._no_hook(self.optimizer))
        try:
            history = [Decision(**d) for d in state.get("history", [])]
        except TypeError as e:
            raise InvalidArgumentError(f"the state's history is not AutoFreeze's: {e}") from None
        # everything is checked: from here on nothing can fail half-way
        self.every, self.rule, self.threshold = every, rule, threshold
        self.patience, self.ratio, self.min_trainable = patience, ratio, min_trainable
        self.pace = pace
        self._evidence, self._learned, self._quiet = evidence[0], bool(evidence[1]), evidence[2]
        if boundary > self.boundary:
            self._freeze_to(boundary)
        self.steps = steps
        self._sums = [torch.tensor(v, dtype=torch.float64) for v in sums]
        self._valid = [torch.tensor(v, dtype=torch.float64) for v in valid]
        self._count = count
        self._previous = previous
        self._settled = settled
        self._base, self._base_windows = base, base_windows
        self._c = [[torch.tensor(v, dtype=torch.float64) for v in row] for row in contrib]
        self._recent, self._last, self._update = recent, last, update
        self._anchor, self._start = anchor, start
        self.history = history

    def _copies(self, key: str, value: object, boundary: int) -> list[list[torch.Tensor] | None]:
        """The state's per-stage weight copies, checked against the stages' parameters."""
        n = len(self.stages)
        if value is None:
            return [None] * n
        out: list[list[torch.Tensor] | None] = []
        for i, ts in enumerate(_seq(key, value, n)):
            params = self._params[i]
            if ts is None or i < boundary:
                out.append(None)
                continue
            if (
                not isinstance(ts, (list, tuple))
                or len(ts) != len(params)
                or not all(
                    isinstance(t, torch.Tensor)
                    and t.shape == p.shape
                    and t.dtype == p.dtype
                    and t.layout == torch.strided
                    and bool(torch.isfinite(t).all())
                    for t, p in zip(ts, params, strict=False)
                )
            ):
                raise InvalidArgumentError(
                    f"the state's {key} for stage {self.stages.names[i]!r} must be "
                    f"{len(params)} finite dense tensors shaped like its parameters "
                    f"{[tuple(p.shape) for p in params]} with their dtypes "
                    f"{[str(p.dtype) for p in params]}"
                )
            out.append([t.detach().to(p.device, p.dtype, copy=True)
                        for t, p in zip(ts, params, strict=True)])  # fmt: skip
        return out
