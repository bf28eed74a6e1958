"""The selector grammar: which modules and parameters of a model a call means.

One grammar serves every function that takes ``*selectors``: dotted glob
patterns (``*``, ``**``, ``[..]``), ``re:`` regular expressions, module and
parameter objects, module types, predicates ``(name, module) -> bool``
(``norms`` is one) and lists of these.

Brackets: a bracket that is a whole dotted segment and holds whole numbers,
ranges and commas (``[6-11]``, ``[0,2,4-6]``) matches a whole-number segment
in that set; any other bracket is a character class of single characters
(``conv[12]`` matches ``conv1`` and ``conv2``, ``[!0-3]`` negates). Python
slices (``[-4:]``) are not part of the grammar: they would depend on how many
siblings exist, so write the range (``layer.[8-11]``); neither are negative
indices, open ranges or empty items (``[-1]``, ``[1-]``, ``[0-3,]``), which
are refused rather than read as character classes, and neither is a number
with a leading zero (``layer.[01]``: the number 1, or glob's class {0, 1}?
module indices have no leading zeros, so the error shows both readings). A
malformed bracket is an ``InvalidArgumentError`` naming the selector.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

from torch import nn

from ._index import ModelIndex, sizes
from .errors import InvalidArgumentError, NoMatchError

__all__ = ["Selection", "Selector", "norms", "select"]

Selector = Union[
    str,
    nn.Module,
    nn.Parameter,
    type[nn.Module],
    Callable[[str, nn.Module], bool],
    "SelectorItem",
    Sequence["Selector"],
]
"""Anything a ``*selectors`` argument accepts (see the module docstring)."""

_NUMBERS = re.compile(r"\s*[0-9]+(?:\s*-\s*[0-9]+)?(?:\s*,\s*[0-9]+(?:\s*-\s*[0-9]+)?)*\s*")
_WIDE_RANGE = re.compile(r"[0-9]{2}\s*-|-\s*[0-9]{2}")
# Only number-set characters, but not a number set: [-1], [1-], [0-3,], [,].
_NOT_NUMBERS = re.compile(r"[0-9,\s-]*[,-][0-9,\s-]*")
_SLICE = re.compile(r"\s*-?[0-9]*\s*:\s*-?[0-9]*\s*(?::\s*-?[0-9]*\s*)?")


class SelectorItem:
    """A selector item that selects what its ``selector`` selects, and says more.

    ``gg.rows`` items derive from it: selection resolves the inner selector;
    what the item adds (which rows) is read by the code that knows it.
    """

    __slots__ = ()
    selector: Selector


class _Syntax(Exception):
    """A malformed glob; turned into an ``InvalidArgumentError`` naming the selector."""


def _digits_regex(lo: str, hi: str) -> str:
    """A regex for the decimal strings of one length between ``lo`` and ``hi``."""
    if lo == hi:
        return lo
    if lo[0] == hi[0]:
        return lo[0] + _digits_regex(lo[1:], hi[1:])
    rest = len(lo) - 1
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return f"[{lo[0]}-{hi[0]}]" + "[0-9]" * rest
    parts = [lo[0] + _digits_regex(lo[1:], "9" * rest)]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]" + "[0-9]" * rest)
    parts.append(hi[0] + _digits_regex("0" * rest, hi[1:]))
    return "(?:" + "|".join(parts) + ")"


def range_regex(lo: int, hi: int) -> str:
    """A regex matching exactly the canonical decimal numbers ``lo..hi`` (inclusive).

    Example:
        >>> import re
        >>> rx = range_regex(6, 11)
        >>> [n for n in range(20) if re.fullmatch(rx, str(n))]
        [6, 7, 8, 9, 10, 11]
    """
    parts = []
    for width in range(len(str(lo)), len(str(hi)) + 1):
        low = max(lo, 10 ** (width - 1) if width > 1 else 0)
        high = min(hi, 10**width - 1)
        parts.append(_digits_regex(str(low), str(high)))
    return "(?:" + "|".join(parts) + ")"


def _refuse_leading_zero(body: str) -> None:
    """Refuse ``[01]``-style brackets: a number set or a character class, nobody can tell.

    Module indices never have a leading zero, so ``layer.[01]`` read as numbers
    would be layer 1 alone while glob (and users) read it as layers 0 and 1.
    """
    numbers = [t.strip() for item in body.split(",") for t in item.split("-")]
    odd = next((t for t in numbers if len(t) > 1 and t.startswith("0")), None)
    if odd is None:
        return
    as_numbers = ",".join(
        "-".join(str(int(t)) for t in item.split("-")) for item in body.split(",")
    )
    reading = f"read as numbers it means [{as_numbers}]"
    if body.strip().isdigit():
        chars = sorted(set(body.strip()), key=int)
        reading += f", read as a glob character class [{','.join(chars)}]"
    raise _Syntax(
        f"[{body}] is ambiguous: {odd!r} has a leading zero, which no module index has; "
        f"{reading}: write the one you mean"
    )


def _number_set(body: str) -> str:
    """Translate the body of a whole-number bracket (``6-11`` or ``0,2,4-6``)."""
    _refuse_leading_zero(body)
    parts = []
    for item in body.split(","):
        lo_text, _, hi_text = item.partition("-")
        lo = int(lo_text)
        hi = int(hi_text) if hi_text.strip() else lo
        if hi < lo:
            raise _Syntax(f"the range [{item.strip()}] runs backwards")
        parts.append(range_regex(lo, hi))
    return "(?:" + "|".join(parts) + ")"


def _char_class(body: str, other: str) -> str:
    """Translate a character class body (``0-3``, ``!ab``) with every character literal."""
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    if not body:
        raise _Syntax("an empty bracket matches nothing")
    items = []
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            if body[i] > body[i + 2]:
                raise _Syntax(f"the character range {body[i : i + 3]!r} runs backwards")
            items.append(re.escape(body[i]) + "-" + re.escape(body[i + 2]))
            i += 3
        else:
            items.append(re.escape(body[i]))
            i += 1
    # A negated class must not cross a segment (nor, in a joined scan, a line).
    return "[" + ("^" + other if negate else "") + "".join(items) + "]"


def _segment_regex(seg: str, other: str) -> str:
    """Translate one dotted segment of a glob; ``other`` is what ``*`` never crosses."""
    if seg.startswith("[") and seg.endswith("]") and _NUMBERS.fullmatch(seg[1:-1]):
        return _number_set(seg[1:-1])
    if seg.startswith("[") and seg.endswith("]") and _NOT_NUMBERS.fullmatch(seg[1:-1]):
        raise _Syntax(
            f"[{seg[1:-1]}] is not a number set: negative indices, open ranges and empty "
            "items are not supported; write whole numbers and closed ranges, e.g. "
            "'layer.[8-11]' or 'layer.[0,2]'"
        )
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            if not out or out[-1] != f"[^{other}]*":
                out.append(f"[^{other}]*")
        elif c == "?":
            out.append(f"[^{other}]")
        elif c == "[":
            end = seg.find("]", i + 2 if seg[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise _Syntax("a '[' has no closing ']' in its dotted segment")
            body = seg[i + 1 : end]
            if _SLICE.fullmatch(body):
                raise _Syntax(
                    f"slices like [{body}] are not supported; write the range of "
                    "numbers, e.g. 'layer.[8-11]'"
                )
            if _NUMBERS.fullmatch(body) and ("," in body or _WIDE_RANGE.search(body)):
                raise _Syntax(
                    f"the number set [{body}] must be a whole dotted segment "
                    "(e.g. 'layer.[0-11]'); inside a segment a bracket is a class "
                    "of single characters"
                )
            out.append(_char_class(body, other))
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_to_regex(pattern: str, *, scan: bool = True) -> str:
    """Translate a dotted glob into a regular expression for ``re.fullmatch``.

    ``*`` matches inside one dotted segment, ``**`` any number of segments
    (zero included), a whole-segment bracket of numbers (``[6-11]``,
    ``[0,2,4-6]``) a whole-number segment in that set, any other bracket a
    character class. With ``scan`` (the default) no wildcard crosses a
    newline, so the regex can scan names joined by newlines; without it the
    regex must be compiled with ``re.DOTALL``.

    Raises:
        InvalidArgumentError: the pattern has a malformed bracket.

    Example:
        >>> import re
        >>> bool(re.fullmatch(glob_to_regex("**.bias"), "blocks.0.bias"))
        True
        >>> bool(re.fullmatch(glob_to_regex("blocks.*"), "blocks.0.attn"))
        False
        >>> [n for n in range(13) if re.fullmatch(glob_to_regex("[0-11]"), str(n))][-1]
        11
    """
    other = r".\n" if scan else "."
    segs = pattern.split(".")
    rx = ""
    need_dot = False
    last = len(segs) - 1
    try:
        for i, seg in enumerate(segs):
            if seg == "**":
                if i < last and segs[i + 1] == "**":
                    continue  # '**.**' means '**'; two in a row would backtrack exponentially
                if i == last:
                    rx += rf"(?:\.[^{other}]+)*" if rx else r".*"
                else:
                    if need_dot:
                        rx += r"\."
                    # Zero or more whole segments. Scanning joined names (no name holds a
                    # newline or an empty segment), "anything up to a dot" says the same
                    # and backtracks once per line instead of once per segment.
                    rx += r"(?:[^\n]*\.)?" if scan else rf"(?:[^{other}]+\.)*"
                need_dot = False
            else:
                if need_dot:
                    rx += r"\."
                rx += _segment_regex(seg, other)
                need_dot = True
    except _Syntax as e:
        raise InvalidArgumentError(f"selector {pattern!r} is malformed: {e}") from None
    return rx


@dataclass
class _Match:
    roots: set[str] = field(default_factory=set)
    aliases: set[str] = field(default_factory=set)


def _describe(selector: object) -> str:
    if isinstance(selector, str):
        return repr(selector)
    if isinstance(selector, (list, tuple)):
        return "[" + ", ".join(_describe(s) for s in selector) + "]"
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, nn.Parameter):
        return f"Parameter{tuple(selector.shape)}"
    if isinstance(selector, nn.Module):
        return f"{type(selector).__name__} object"
    return getattr(selector, "__name__", type(selector).__name__)


def describe_selectors(selectors: Sequence[object]) -> str:
    """Render selectors the way the user wrote them, for error messages."""
    return ", ".join(_describe(s) for s in selectors) if selectors else "(whole model)"


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _suggest(index: ModelIndex, selector: object) -> str:
    names = index.all_names()
    if isinstance(selector, str):
        text = selector[3:] if selector.startswith("re:") else selector
        tails = [n for n in names if n.endswith("." + text)]
        if tails and not selector.startswith("re:"):
            return (
                f"; names are anchored at the root: did you mean '**.{text}' "
                f"(matches {tails[0]!r})?"
            )
        head, _, last = text.rpartition(".")
        if not selector.startswith("re:") and head and _is_glob(head) and not _is_glob(last):
            # a pattern whose last part is misspelt ('**.biass'): suggest the pattern fixed
            lasts = sorted({n.rpartition(".")[2] for n in names})
            near = difflib.get_close_matches(last, lasts, n=3, cutoff=0.6)
            if near:
                fixed = ", ".join(repr(f"{head}.{n}") for n in near)
                return f"; no name ends in {last!r}: did you mean {fixed}?"
        pool = names if len(names) <= 20000 else [n for n in names if "." not in n]
        close = difflib.get_close_matches(text, pool, n=5, cutoff=0.5)
        if close:
            return "; closest names: " + ", ".join(repr(c) for c in close)
    top = [n for n in index.modules if n and "." not in n]
    top += [n for n, _ in index.aliases if "." not in n]
    shown = ", ".join(repr(n) for n in top[:10]) + (", ..." if len(top) > 10 else "")
    return f"; top-level names: {shown or '(none)'}"


def _compile(selector: str, pattern: str, flags: int) -> re.Pattern[str]:
    """Compile a selector's regex; a pattern the engine refuses is the user's input error."""
    shown = selector if len(selector) <= 80 else selector[:77] + "..."
    try:
        with warnings.catch_warnings():
            # The stdlib warns (FutureWarning) of a set such as '[[a]' or '[a--b]'
            # whose meaning a future Python changes: what such a selector
            # matches would change silently, so it is refused now.
            warnings.simplefilter("error", FutureWarning)
            return re.compile(pattern, flags)
    except FutureWarning as e:
        raise InvalidArgumentError(
            f"selector {shown!r} is ambiguous: Python will read it differently in a future "
            f"version ({e}); escape the character, e.g. '\\[' for a literal '[' or "
            "'\\-' for a literal '-'"
        ) from None
    except (re.error, RecursionError, OverflowError, MemoryError) as e:
        what = "regular expression" if selector.startswith("re:") else "pattern"
        raise InvalidArgumentError(
            f"selector {shown!r} is not a valid {what} ({type(e).__name__}: "
            f"{e or 'nested too deeply'}); fix the pattern or use a predicate"
        ) from None


def _resolve_one(index: ModelIndex, selector: object, out: _Match) -> bool:
    """Add what ``selector`` matches to ``out``; return whether it matched anything."""
    if isinstance(selector, str):
        if not selector:
            raise InvalidArgumentError("an empty string is not a selector")
        if selector.startswith("re:"):
            rx = _compile(selector, selector[3:], 0)
            mods = [n for n in index.names[1:] if rx.fullmatch(n)]
            params = [n for n, _ in index.aliases if rx.fullmatch(n)]
        elif "\n" in selector or index.names_have_newlines():
            # A newline would let the joined-names scan match across two names:
            # test each name on its own instead (slower, still exact).
            rx = _compile(selector, glob_to_regex(selector, scan=False), re.DOTALL)
            mods = [n for n in index.names[1:] if rx.fullmatch(n)]
            params = [n for n, _ in index.aliases if rx.fullmatch(n)]
        else:
            # One C-level scan over the names joined by newlines replaces a
            # Python loop; the leading literal newline lets the engine skip to
            # line starts, and no glob wildcard crosses a newline.
            rx = _compile(selector, r"\n(" + glob_to_regex(selector) + r")(?=\n)", 0)
            mods = rx.findall(index.module_text())
            params = rx.findall(index.alias_text())
        out.roots.update(mods)
        out.aliases.update(params)
        return bool(mods or params)
    if isinstance(selector, nn.Parameter):
        hit = [n for n, p in index.aliases if p is selector]
        out.aliases.update(hit)
        return bool(hit)
    if isinstance(selector, nn.Module):
        hit = [n for n, m in index.modules.items() if m is selector]
        out.roots.update(hit)
        return bool(hit)
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise InvalidArgumentError(
                f"a type selector must be an nn.Module subclass, got {selector.__name__}"
            )
        hit = [n for n, m in index.modules.items() if isinstance(m, selector)]
        out.roots.update(hit)
        return bool(hit)
    if isinstance(selector, (list, tuple)):
        if not selector:
            raise InvalidArgumentError("an empty list is not a selector")
        if len(selector) > 1 and all(isinstance(s, nn.Parameter) for s in selector):
            # Many tensors (a weight-decay rule): one pass over the aliases, not one each.
            by_id: dict[int, list[str]] = {}
            for n, p in index.aliases:
                by_id.setdefault(id(p), []).append(n)
            for sub in selector:
                names = by_id.get(id(sub))
                if names is None:
                    _resolve_checked(index, sub, out)  # raises, naming the tensor
                out.aliases.update(names or ())
            return True
        for sub in selector:
            _resolve_checked(index, sub, out)
        return True
    if callable(selector):
        hit = [n for n, m in index.modules.items() if selector(n, m)]
        out.roots.update(hit)
        return bool(hit)
    if isinstance(selector, SelectorItem):  # gg.rows: an item selects its tensors
        return _resolve_one(index, selector.selector, out)
    raise InvalidArgumentError(
        f"cannot use {type(selector).__name__} as a selector; use a name pattern, "
        "a module, a parameter, a module type, a predicate (name, module) -> bool, "
        "or a list of these"
    )


def _resolve_checked(index: ModelIndex, selector: object, out: _Match) -> None:
    if not _resolve_one(index, selector, out):
        raise NoMatchError(
            f"selector {_describe(selector)} matched nothing in "
            f"{type(index.model).__name__}{_suggest(index, selector)}"
        )


def _expand(index: ModelIndex, match: _Match) -> tuple[list[bool], list[tuple[str, nn.Parameter]]]:
    """Return per-module subtree flags and the matched ``(alias, parameter)`` pairs."""
    inside = index.subtree_flags(match.roots)
    direct = match.aliases
    hit = [
        (name, p)
        for (name, p), o in zip(index.aliases, index.alias_owner)
        if inside[o] or name in direct
    ]
    return inside, hit


_TORCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_NORM_CLASS_NAME = re.compile(r"Norm(?:Act)?(?:[123]d)?$")


def norms(name: str, module: nn.Module) -> bool:
    """Selector matching every normalisation layer (use it as ``gg.norms``).

    Torch's BatchNorm*/SyncBatchNorm/InstanceNorm*/LayerNorm/GroupNorm/
    LocalResponseNorm/RMSNorm (and their subclasses) and, by the naming
    convention of Hugging Face and timm, any class whose name ends in
    ``Norm``, ``Norm1d/2d/3d`` or ``NormAct``/``NormAct2d`` (``LlamaRMSNorm``,
    ``T5LayerNorm``, ``BatchNormAct2d``, ``LayerNorm2d``,
    ``FrozenBatchNorm2d``) and, by the Hugging Face Trainer's name patterns,
    any module owning parameters whose own name contains ``layernorm`` or
    ``rmsnorm``, is ``norm`` or ends in ``_norm`` (``input_layernorm``,
    ``q_norm``), as long as its submodules own no parameters: a wrapper
    such as ``PreNorm`` (a norm and a feed-forward) is not a norm, its inner
    norm is. It is also what ``gg.param_groups`` keeps out of weight decay
    (``gg.DEFAULT_NO_DECAY``). fastai's ``train_bn=True`` recipe is
    ``gg.freeze(model, "backbone", exclude=gg.norms)``.

    Args:
        name: the module's path (its last segment is matched by name).
        module: the module to test.

    Returns:
        Whether ``module`` is a normalisation layer.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> gg.select(net, gg.norms).roots
        ['1']
    """
    if isinstance(module, _TORCH_NORMS):
        return True
    # A name alone also fits a wrapper (``PreNorm`` holding a norm and a
    # feed-forward); since a module selector takes its subtree, only a module
    # whose children own no parameters (timm's act/drop) counts as a norm.
    if any(next(child.parameters(), None) is not None for child in module.children()):
        return False
    if _NORM_CLASS_NAME.search(type(module).__name__):
        return True
    last = name.rpartition(".")[2].lower()
    return (
        "layernorm" in last or "rmsnorm" in last or last == "norm" or last.endswith("_norm")
    ) and next(module.parameters(recurse=False), None) is not None


@dataclass(frozen=True)
class Selection:
    """What a set of selectors matched in a model: the dry run of a freeze.

    Attributes:
        roots: paths of the modules a selector named directly (subtree roots);
            ``""`` is the whole model.
        modules: paths of every module inside a selected subtree.
        parameters: canonical names of the selected parameters, each
            parameter once however many names it has (tied weights).

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> gg.select(net, "**.bias").parameters
        ['0.bias']
    """

    roots: list[str]
    modules: list[str]
    parameters: list[str]
    numel: int
    aliases: frozenset[str] = field(repr=False)
    _params: dict[str, nn.Parameter] = field(repr=False)
    _module_set: frozenset[str] = field(repr=False)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ``(canonical name, parameter)`` for each selected parameter."""
        yield from self._params.items()

    def __contains__(self, name: object) -> bool:
        return name in self._params or name in self._module_set

    def __len__(self) -> int:
        return len(self._params)

    def __str__(self) -> str:
        lines = [
            f"Selection: {len(self.modules)} modules, {len(self.parameters)} "
            f"parameter tensors, {self.numel:,} elements"
        ]
        lines += [f"  module     {r or '(root)'}" for r in self.roots]
        lines += [f"  parameter  {n}" for n in self.parameters]
        return "\n".join(lines)


def resolve(
    index: ModelIndex,
    selectors: Sequence[Selector],
    exclude: Selector | None = None,
) -> Selection:
    """Resolve selectors on an already built index (internal; see ``select``)."""
    match = _Match()
    if not selectors:
        match.roots.add("")
    for sel in selectors:
        _resolve_checked(index, sel, match)
    inside, hit = _expand(index, match)
    if exclude is not None:
        ex = _Match()
        _resolve_checked(index, exclude, ex)
        ex_inside, ex_hit = _expand(index, ex)
        inside = [a and not b for a, b in zip(inside, ex_inside)]
        ex_ids = {id(p) for _, p in ex_hit}
        hit = [(n, p) for n, p in hit if id(p) not in ex_ids]
    aliases = [n for n, _ in hit]
    if index.shared:  # keep canonical order when a tied parameter was hit by a later name
        ids = {id(p) for _, p in hit}
        params = {n: p for n, p in index.params.items() if id(p) in ids}
    else:  # every alias is canonical: the hits are already in model order
        params = dict(hit)
    modules = [n for n, flag in zip(index.names, inside) if flag]
    module_set = frozenset(modules)
    return Selection(
        roots=sorted(r for r in match.roots if r in module_set or r == ""),
        modules=modules,
        parameters=list(params),
        numel=sum(sizes(params.values())),
        aliases=frozenset(aliases),
        _params=params,
        _module_set=module_set,
    )


def select(model: nn.Module, *selectors: Selector, exclude: Selector | None = None) -> Selection:
    """Resolve selectors against ``model`` without changing anything (a dry run).

    Args:
        model: the model whose module and parameter names are matched.
        *selectors: any mix of dotted globs (``"front_end"``, ``"**.bias"``,
            ``"layer.[6-11]"``, ``"blocks.[0,2,4-6]"``), ``"re:..."`` regular
            expressions (fullmatch), module or parameter objects, module types
            and predicates ``(name, module) -> bool`` such as ``gg.norms``.
            With none, the whole model. A whole-segment bracket of whole
            numbers, ranges and commas matches a whole-number segment in that
            set; any other bracket is a class of single characters. Slices
            (``[-4:]``) are refused: write the range. See docs/semantics.md.
        exclude: selectors whose matches are removed from the result.

    Returns:
        The ``Selection``: matched module paths and parameter names.

    Raises:
        NoMatchError: a selector matched nothing; the message names the
            closest existing names.
        InvalidArgumentError: a selector has an unusable type or syntax (a
            malformed bracket, an invalid ``re:`` expression).

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> gg.select(net, "1").parameters
        ['1.weight', '1.bias']
        >>> layers = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(12))
        >>> gg.select(layers, "[9-11]").roots
        ['10', '11', '9']
    """
    return resolve(ModelIndex(model), selectors, exclude)
