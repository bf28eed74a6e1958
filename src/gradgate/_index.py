"""The model index: module paths, parameter names, owners and subtree flags (private).

One walk over a model serves the selecting, freezing, reporting, checking and
saving code; this module is the only place that knows how names map to
tensors and modules.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .errors import InvalidArgumentError


def owner_of(name: str) -> str:
    """Return the module path that owns a parameter or buffer name."""
    head, _, _ = name.rpartition(".")
    return head


class BuildCounter:
    """How many model indexes were built while counting was on (see ``counting_builds``)."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.count = 0

    def saw(self, model: nn.Module) -> None:
        """Count one walk of ``model`` (when this counter counts that model)."""
        if self.model is None or self.model is model:
            self.count += 1


_counters: list[BuildCounter] = []


@contextlib.contextmanager
def counting_builds(model: nn.Module | None = None) -> Iterator[BuildCounter]:
    """Count every ``ModelIndex`` built inside the block (a test instrument; off by default).

    With ``model``, only the walks of that model count (a live guard on
    another model reacts to every change and walks its own model).

    Example:
        >>> import torch
        >>> with counting_builds() as c:
        ...     _ = ModelIndex(torch.nn.Linear(1, 1))
        >>> c.count
        1
    """
    counter = BuildCounter(model)
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


class ModelIndex:
    """Every module path and parameter alias of a model, read in one pass.

    Internal helper shared by the selecting, freezing and reporting code so
    that each call walks the model once.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"expected a torch.nn.Module, got {type(model).__name__}")
        for counter in _counters:
            counter.saw(model)
        self.model = model
        self.reshaped = False  # set when a call installs row modules (the walk is then stale)
        names: list[str] = []
        mods: list[nn.Module] = []
        parent: list[int] = []
        aliases: list[tuple[str, nn.Parameter]] = []
        alias_owner: list[int] = []
        # An explicit pre-order walk: the same order as named_modules /
        # named_parameters(remove_duplicate=False), without nested generators,
        # recording each module's parent and each parameter's owner by index.
        stack: list[tuple[str, nn.Module, int]] = [("", model, -1)]
        pop, push = stack.pop, stack.extend
        add_name, add_mod, add_parent = names.append, mods.append, parent.append
        add_alias, add_owner = aliases.append, alias_owner.append
        i = -1
        while stack:
            name, mod, up = pop()
            i += 1
            add_name(name)
            add_mod(mod)
            add_parent(up)
            d = mod.__dict__
            dot = name + "." if name else ""
            for pname, p in d["_parameters"].items():
                if p is not None:
                    add_alias((dot + pname, p))
                    add_owner(i)
            kids = d["_modules"]
            if kids:
                push([(dot + c, m, i) for c, m in reversed(kids.items()) if m is not None])
        self.names = names
        self.mods = mods
        self.parent = parent
        self.aliases = aliases
        self.alias_owner = alias_owner
        self._modules: dict[str, nn.Module] | None = None
        self._module_text: str | None = None
        self._alias_text: str | None = None
        self._newlines: bool | None = None
        ids = [id(p) for _, p in aliases]
        canonical = dict(zip(ids, [n for n, _ in aliases]))
        if len(canonical) == len(ids):  # nothing tied: every alias is canonical (C-level dicts)
            self.canonical = canonical
            self.params: dict[str, nn.Parameter] = dict(aliases)
            self.shared: set[int] = set()
            return
        self.canonical = canonical = {}
        self.params = params = {}
        self.shared = shared = set()
        for name, p in aliases:
            key = id(p)
            if key in canonical:
                shared.add(key)
            else:
                canonical[key] = name
                params[name] = p

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Module path -> module (built on first use)."""
        if self._modules is None:
            self._modules = dict(zip(self.names, self.mods))
        return self._modules

    def subtree_flags(self, roots: set[str]) -> list[bool]:
        """For each module (by position), whether it lies under one of ``roots``."""
        inside = [False] * len(self.names)
        parent = self.parent
        for i, name in enumerate(self.names):
            inside[i] = name in roots or (i > 0 and inside[parent[i]])
        return inside

    def module_text(self) -> str:
        """Every module path but the root, each between newlines (for regex scans)."""
        if self._module_text is None:
            self._module_text = _joined(self.names[1:])
        return self._module_text

    def alias_text(self) -> str:
        """Every parameter alias, each between newlines (for regex scans)."""
        if self._alias_text is None:
            self._alias_text = _joined([n for n, _ in self.aliases])
        return self._alias_text

    def names_have_newlines(self) -> bool:
        """Whether a module or parameter name holds a newline (joined scans would be wrong)."""
        if self._newlines is None:
            mods, aliases = self.module_text(), self.alias_text()
            # The joined texts hold exactly one more newline than names unless a
            # name brings its own: a C-level count instead of a Python loop.
            self._newlines = (
                mods.count("\n") != len(self.names) or aliases.count("\n") != len(self.aliases) + 1
            )
        return self._newlines

    def all_names(self) -> list[str]:
        """Every module path (root excluded) and parameter alias."""
        return [n for n in self.modules if n] + [n for n, _ in self.aliases]


def current(index: ModelIndex) -> ModelIndex:
    """``index`` itself, or a fresh walk if a call since reshaped the model (``gg.rows``).

    Freezing and unfreezing change flags, which the index reads live, so one
    walk serves a whole schedule step (freeze, sync, DDP rebuild); only
    installing or releasing row modules changes the module tree under it.

    Example:
        >>> import torch
        >>> index = ModelIndex(torch.nn.Linear(1, 1))
        >>> current(index) is index
        True
    """
    return ModelIndex(index.model) if index.reshaped else index


def covering_paths(index: ModelIndex, names: Iterable[str]) -> list[str]:
    """The fewest module paths (or parameter names) that hold exactly ``names``, in their order.

    Each name is replaced by its shortest enclosing module path (the root
    excluded) all of whose parameters are in ``names``, else kept as it is;
    each path is given once. Linear in the parameters times their depth: a
    path qualifies when as many of its parameters are named as it holds.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
        >>> covering_paths(ModelIndex(net), ["0.weight", "0.bias", "1.bias"])
        ['0', '1.bias']
    """
    ordered = list(names)
    chosen = set(ordered)
    held: dict[str, int] = {}  # module path -> its parameters
    named: dict[str, int] = {}  # module path -> those of them in ``names``
    for name in index.params:
        inside = name in chosen
        end = name.find(".")
        while end != -1:
            path = name[:end]
            held[path] = held.get(path, 0) + 1
            if inside:
                named[path] = named.get(path, 0) + 1
            end = name.find(".", end + 1)
    out: list[str] = []
    given: set[str] = set()
    for name in ordered:
        best = name
        end = name.find(".")
        while end != -1:
            path = name[:end]
            if named.get(path, 0) == held[path]:
                best = path
                break
            end = name.find(".", end + 1)
        if best not in given:
            given.add(best)
            out.append(best)
    return out


def _joined(names: list[str]) -> str:
    return "\n" + "\n".join(names) + "\n" if names else "\n"


def trainable_flags(index: ModelIndex) -> list[bool]:
    """For each module (by position), whether a trainable parameter lies under it."""
    flags = [False] * len(index.names)
    for (_, p), owner in zip(index.aliases, index.alias_owner):
        if p.requires_grad:
            flags[owner] = True
    parent = index.parent
    for i in range(len(flags) - 1, 0, -1):
        if flags[i]:
            flags[parent[i]] = True
    return flags


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while walking a large model.

    A walk allocates many small containers; on a model with 10^5 tensors the
    collector's repeated full scans cost more than the walk itself.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def is_float(p: torch.Tensor) -> bool:
    """Whether a tensor's dtype can carry gradients."""
    return p.is_floating_point() or p.is_complex()


def sizes(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Elements of each tensor, as ``numel`` counts them (one fast pass when none is lazy)."""
    items = list(tensors)
    try:
        return [t.numel() for t in items]
    except ValueError:  # an uninitialised lazy parameter has no size yet
        return [numel(t) for t in items]


def numel(p: torch.Tensor) -> int:
    """Elements of a tensor; 0 for an uninitialised lazy parameter (it has no shape yet)."""
    return 0 if nn.parameter.is_lazy(p) else p.numel()
