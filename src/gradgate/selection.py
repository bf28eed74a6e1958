"""The selector grammar: which modules and parameters of a model a call means.

One grammar serves every function that takes ``*selectors``: dotted glob
patterns (``*``, ``**``, ``[..]``), ``re:`` regular expressions, module and
parameter objects, module types, predicates ``(name, module) -> bool`` and
lists of these.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from torch import nn

from ._index import ModelIndex
from .errors import InvalidArgumentError, NoMatchError

if TYPE_CHECKING:
    from .subtensor import Rows  # rows (issue 16)

__all__ = ["Selection", "Selector", "select"]

Selector = Union[
    str,
    nn.Module,
    nn.Parameter,
    type[nn.Module],
    Callable[[str, nn.Module], bool],
    "Rows",
    Sequence["Selector"],
]
"""Anything a ``*selectors`` argument accepts (see the module docstring)."""


def _segment_regex(seg: str) -> str:
    """Translate one dotted segment of a glob into a regular expression."""
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append(r"[^.\n]*")
        elif c == "?":
            out.append(r"[^.\n]")
        elif c == "[":
            end = seg.find("]", i + 2 if seg[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = seg[i + 1 : end]
                if body[:1] in ("!", "^"):
                    # A negated class must not cross a segment or a line.
                    body = "^.\n" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_to_regex(pattern: str) -> str:
    """Translate a dotted glob into a regular expression for ``re.fullmatch``.

    ``*`` matches inside one dotted segment, ``**`` any number of segments
    (zero included), ``[0-3]`` a character class.

    Example:
        >>> import re
        >>> bool(re.fullmatch(glob_to_regex("**.bias"), "blocks.0.bias"))
        True
        >>> bool(re.fullmatch(glob_to_regex("blocks.*"), "blocks.0.attn"))
        False
    """
    segs = pattern.split(".")
    rx = ""
    need_dot = False
    last = len(segs) - 1
    for i, seg in enumerate(segs):
        if seg == "**":
            if i == last:
                rx += r"(?:\.[^.\n]+)*" if i > 0 else r".*"
            else:
                if need_dot:
                    rx += r"\."
                rx += r"(?:[^.\n]+\.)*"
            need_dot = False
        else:
            if need_dot:
                rx += r"\."
            rx += _segment_regex(seg)
            need_dot = True
    return rx


@dataclass
class _Match:
    roots: set[str] = field(default_factory=set)
    aliases: set[str] = field(default_factory=set)
    param_ids: set[int] = field(default_factory=set)


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
        pool = names if len(names) <= 20000 else [n for n in names if "." not in n]
        close = difflib.get_close_matches(text, pool, n=5, cutoff=0.5)
        if close:
            return "; closest names: " + ", ".join(repr(c) for c in close)
    top = [n for n in index.modules if n and "." not in n]
    top += [n for n, _ in index.aliases if "." not in n]
    shown = ", ".join(repr(n) for n in top[:10]) + (", ..." if len(top) > 10 else "")
    return f"; top-level names: {shown or '(none)'}"


def _resolve_one(index: ModelIndex, selector: object, out: _Match) -> bool:
    """Add what ``selector`` matches to ``out``; return whether it matched anything."""
    if isinstance(selector, str):
        if not selector:
            raise InvalidArgumentError("an empty string is not a selector")
        if selector.startswith("re:"):
            try:
                rx = re.compile(selector[3:])
            except re.error as e:
                raise InvalidArgumentError(
                    f"selector {selector!r} is not a valid regular expression: {e}"
                ) from e
            mods = [n for n in index.modules if n and rx.fullmatch(n)]
            params = [n for n, _ in index.aliases if rx.fullmatch(n)]
        else:
            # Names never hold a newline and glob regexes never cross one, so
            # one C-level scan over the joined names replaces a Python loop; the
            # leading literal newline lets the engine skip to line starts.
            rx = re.compile(r"\n(" + glob_to_regex(selector) + r")(?=\n)")
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
        for sub in selector:
            _resolve_checked(index, sub, out)
        return True
    if callable(selector):
        hit = [n for n, m in index.modules.items() if selector(n, m)]
        out.roots.update(hit)
        return bool(hit)
    from .subtensor import Rows  # rows (issue 16): a rows item selects its tensors

    if isinstance(selector, Rows):
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
        numel=sum(p.numel() for p in params.values()),
        aliases=frozenset(aliases),
        _params=params,
        _module_set=module_set,
    )


def select(model: nn.Module, *selectors: Selector, exclude: Selector | None = None) -> Selection:
    """Resolve selectors against ``model`` without changing anything (a dry run).

    Args:
        model: the model whose module and parameter names are matched.
        *selectors: any mix of dotted globs (``"front_end"``, ``"**.bias"``,
            ``"blocks.[0-3]"``), ``"re:..."`` regular expressions (fullmatch),
            module or parameter objects, module types and predicates
            ``(name, module) -> bool``. With none, the whole model.
        exclude: selectors whose matches are removed from the result.

    Returns:
        The ``Selection``: matched module paths and parameter names.

    Raises:
        NoMatchError: a selector matched nothing; the message names the
            closest existing names.
        InvalidArgumentError: a selector has an unusable type or syntax.

    Example:
        >>> import torch, gradgate as gg
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> gg.select(net, "1").parameters
        ['1.weight', '1.bias']
    """
    return resolve(ModelIndex(model), selectors, exclude)
