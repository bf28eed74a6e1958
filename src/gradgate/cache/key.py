"""What determines cached features, hashed (private to the cache).

Three digests make a cache key: the front-end (values, structure and
parameter-free settings), the input function (code and every value it
reaches), and the samples. Each is exact for what it covers; what cannot be
hashed is refused (input function) or named by its type (module attributes
that pickle cannot describe).
"""

from __future__ import annotations

import copyreg
import enum
import functools
import hashlib
import os
import re
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .._index import ModelIndex
from ..errors import InvalidArgumentError
from ..freezing import is_sticky
from ..hashing import tensor_digest

__all__ = [
    "ValueHasher",
    "global_hooks_digest",
    "input_fn_digest",
    "module_digests",
    "value_digests",
]

_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_NAMED = (types.ModuleType, type, torch.dtype, torch.device)
# Hook tables that change what forward returns; the others (backward, state
# dict) do not touch the features.
_FORWARD_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
_SKIPPED = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_is_full_backward_hook",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)


_CODE_DIGESTS: weakref.WeakKeyDictionary[types.CodeType, tuple[str, frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)


# Classes whose digest is being computed, per thread: a method that reaches an
# instance of its own class is keyed by the class name there, not followed.
# Likewise the modules of the trees being keyed (id -> name): a setting that
# reaches one of them (a bound method of itself, an accelerate hook's
# ``partial(new_forward, module)``) is keyed by its name, not followed again.
_DIGESTING = threading.local()
# torch's process-wide forward hooks (``register_module_forward_hook`` and the
# pre-hook twin): they run in every module's forward, so they key every cache.
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


def _is_library(obj: Any) -> bool:
    """Whether ``obj`` (a module, function or class) comes from an installed package.

    Installed code (the standard library, site-packages) changes only with its
    version and is named; the user's own code (their script and its sibling
    modules) is followed, so editing a helper's body changes the key.

    Example:
        >>> _is_library(os.path.join), _is_library(torch.relu)
        (True, True)
    """
    module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(obj.__module__ or "")
    file = getattr(module, "__file__", None)
    if not file:
        return True  # builtin, frozen or made up at run time: nothing to read
    return _library_file(file)


@functools.lru_cache(maxsize=4096)
def _library_file(file: str) -> bool:
    """Whether a source file lies under an installed-package root (its real path, once).

    Resolving the real path costs a system call per path component; every
    cache key (each pass re-checks one) asks about the same few files.
    """
    return os.path.realpath(file).startswith(_library_roots())


class Unkeyable(Exception):
    """Raised inside the hasher when a strict value cannot be described."""


class ValueHasher:
    """Feed values into a hash: exact for data, by code for functions.

    ``strict`` refuses a value it cannot describe (the input function must be
    keyed exactly); otherwise such a value is named by its type.

    Example:
        >>> a, b = ValueHasher(strict=True), ValueHasher(strict=True)
        >>> a.add((1, "x", [2.5])); b.add((1, "x", [2.5]))
        >>> a.hexdigest() == b.hexdigest()
        True
    """

    def __init__(self, strict: bool, hasher: Any = None) -> None:
        self.strict = strict
        self.h = hasher if hasher is not None else hashlib.sha256()
        self._seen: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps ids unique while hashing

    def hexdigest(self) -> str:
        return str(self.h.hexdigest())

    def _tag(self, tag: str) -> None:
        self.h.update(tag.encode() + b"\0")

    def add(self, obj: Any) -> None:
        """Hash ``obj`` (recursively; a repeated object is hashed by reference)."""
        if isinstance(obj, _SCALARS):
            self._tag(f"{type(obj).__name__}:{obj!r}")
            return
        if isinstance(obj, torch.Tensor):
            self._tag("tensor")
            tensor_digest(obj, self.h)
            return
        if isinstance(obj, (*_NAMED, enum.Enum)):
            self._tag(f"named:{_qualified(obj)}")
            return
        seen = self._seen.get(id(obj))
        if seen is not None:
            self._tag(f"ref:{seen}")
            return
        self._seen[id(obj)] = len(self._seen)
        self._alive.append(obj)
        self._add_container(obj)

    def _add_container(self, obj: Any) -> None:
        if isinstance(obj, (tuple, list)):
            self._tag(f"{type(obj).__name__}:{len(obj)}")
            for v in obj:
                self.add(v)
        elif isinstance(obj, dict):
            self._tag(f"dict:{len(obj)}")
            for k, v in obj.items():
                self.add(k)
                self.add(v)
        elif isinstance(obj, (set, frozenset)):
            parts = sorted(_sub_digest(v, self.strict) for v in obj)
            self._tag(f"set:{','.join(parts)}")
        elif isinstance(obj, np.ndarray):
            self._add_array(obj)
        elif isinstance(obj, np.generic):
            self._tag(f"np:{obj.dtype}:{obj.item()!r}")
        elif isinstance(obj, nn.Module):
            keyed = getattr(_DIGESTING, "modules", {})
            if id(obj) in keyed:
                self._tag(f"module-ref:{keyed[id(obj)]}")
                return
            for name, digest in module_digests(obj):
                self._tag(f"module:{name}:{digest}")
        elif isinstance(obj, types.FunctionType):
            self._add_function(obj)
        elif isinstance(obj, types.MethodType):
            self._tag("method")
            self.add(obj.__func__)
            self.add(obj.__self__)
        elif isinstance(obj, types.BuiltinFunctionType):
            self._tag(f"builtin:{_qualified(obj)}")
            owner = obj.__self__
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.add(owner)  # a bound builtin such as some_dict.get
        elif isinstance(obj, functools.partial):
            self._tag("partial")
            self.add(obj.func)
            self.add(obj.args)
            self.add(obj.keywords)
        elif isinstance(obj, re.Pattern):
            self._tag(f"re:{obj.pattern!r}:{obj.flags}")
        else:
            self._add_object(obj)

    def _add_array(self, arr: np.ndarray[Any, Any]) -> None:
        self._tag(f"ndarray:{arr.dtype}:{arr.shape}")
        if arr.dtype.hasobject:
            self.add(arr.tolist())
        else:
            self.h.update(np.ascontiguousarray(arr).tobytes())

    def _add_function(self, fn: types.FunctionType) -> None:
        self._tag(f"function:{fn.__module__}.{fn.__qualname__}")
        self.add(fn.__defaults__)
        self.add(fn.__kwdefaults__)
        for cell in fn.__closure__ or ():
            try:
                self.add(cell.cell_contents)
            except ValueError:  # an empty cell (a name not yet bound)
                self._tag("empty-cell")
        self._add_code(fn.__code__)
        names = _CODE_DIGESTS[fn.__code__][1]
        for name in sorted(names):
            if name not in fn.__globals__:
                continue
            value = fn.__globals__[name]
            self._tag(f"global:{name}")
            # Installed code is named; the user's own code (this file or a
            # sibling module) is followed, so editing a helper changes the key.
            if isinstance(value, types.ModuleType):
                self._add_global_module(value, names)
            elif isinstance(value, (types.FunctionType, type)) and _is_library(value):
                self._tag(f"named:{_qualified(value)}")
            elif isinstance(value, type):
                self._tag(f"class:{_class_digest(value)}")
            else:
                self.add(value)

    def _add_global_module(self, module: types.ModuleType, names: frozenset[str]) -> None:
        """A module a function reads: named, and the user's own one followed by attribute."""
        self._tag(f"named:{module.__name__}")
        if _is_library(module) or module.__name__ in getattr(_DIGESTING, "user_modules", ()):
            return
        reading = _DIGESTING.__dict__.setdefault("user_modules", set())
        reading.add(module.__name__)
        try:
            for attr in sorted(names):  # co_names: the attributes the code reads
                member = vars(module).get(attr)
                if isinstance(member, type):
                    self._tag(f"attr:{attr}:class:{_class_digest(member)}")
                elif isinstance(member, (types.FunctionType, types.ModuleType)) or _plain(member):
                    self._tag(f"attr:{attr}")
                    if isinstance(member, types.ModuleType):
                        self._add_global_module(member, names)
                    else:
                        self.add(member)
        finally:
            reading.discard(module.__name__)

    def _add_code(self, code: types.CodeType) -> None:
        digest = _CODE_DIGESTS.get(code)
        if digest is None:
            # Code objects are immutable: hash each once per process.
            sub = ValueHasher(strict=self.strict)
            sub.h.update(code.co_code)
            sub._tag(f"names:{code.co_names}:{code.co_varnames}:{code.co_freevars}")
            for const in code.co_consts:
                if isinstance(const, types.CodeType):
                    sub._add_code(const)
                else:
                    sub.add(const)
            digest = (sub.hexdigest(), frozenset(_global_names(code)))
            _CODE_DIGESTS[code] = digest
        self._tag(f"code:{digest[0]}")

    def _add_object(self, obj: Any) -> None:
        self._tag(f"object:{_qualified(type(obj))}")
        call = next(
            (k.__dict__["__call__"] for k in type(obj).__mro__ if "__call__" in k.__dict__), None
        )
        if isinstance(call, types.FunctionType):
            self._add_function(call)
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception as e:  # pickle's own refusal, whatever its type
            if self.strict:
                raise Unkeyable(f"{_qualified(type(obj))} ({type(e).__name__}: {e})") from e
            return
        if isinstance(reduced, str):  # a global singleton, pickled by name
            self._tag(f"global-object:{reduced}")
            return
        func, args, *more = reduced
        if func is not getattr(copyreg, "__newobj__", None):
            self.add(func)
        self.add(args)
        for part in more:
            self.add(list(part) if isinstance(part, Iterator) else part)


def _qualified(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if isinstance(obj, (torch.dtype, torch.device, enum.Enum)):
        return f"{type(obj).__qualname__}:{obj!r}"
    module = getattr(obj, "__module__", None) or ""
    return f"{module}.{getattr(obj, '__qualname__', repr(obj))}"


def _plain(value: Any) -> bool:
    """A scalar, or a tuple/list/set of scalars: ``repr`` is exact and deterministic."""
    if isinstance(value, _SCALARS):
        return True
    if type(value) in (tuple, list):
        return all(isinstance(v, _SCALARS) for v in value)
    return type(value) is set and not value  # an empty set (non-persistent buffers)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _sub_digest(obj: Any, strict: bool) -> str:
    sub = ValueHasher(strict)
    sub.add(obj)
    return sub.hexdigest()


def _function_of(value: Any) -> types.FunctionType | None:
    """The function a class attribute runs when reached through an instance, if any."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    elif isinstance(value, functools.cached_property):
        value = value.func
    return value if isinstance(value, types.FunctionType) else None


def _class_digest(cls: type) -> str:
    """A class as forward sees it through ``self``: every function's code and plain setting.

    torch's own classes change only with torch, so they are named with its version.

    Example:
        >>> class A(torch.nn.Module):
        ...     scale = 2.0
        >>> before = _class_digest(A)
        >>> A.scale = 3.0
        >>> before == _class_digest(A)
        False
    """
    h = ValueHasher(strict=False)
    h._tag(f"class:{_qualified(cls)}")
    digesting = _DIGESTING.__dict__.setdefault("classes", set())
    if cls.__module__.split(".")[0] == "torch":
        h._tag(f"torch:{torch.__version__}")
        return h.hexdigest()
    if cls in digesting:  # its methods reach an instance of itself (a module-level registry)
        h._tag("cycle")
        return h.hexdigest()
    digesting.add(cls)
    try:
        plain = []
        for attr, value in sorted(vars(cls).items()):
            fn = _function_of(value)
            if fn is not None:
                h._tag(f"def:{attr}")
                h._add_function(fn)
            # Dunder settings (__doc__, __firstlineno__) do not reach forward.
            elif not (attr.startswith("__") and attr.endswith("__")) and _plain(value):
                plain.append((attr, value))
        h._tag(f"plain:{plain!r}")
    finally:
        digesting.discard(cls)
    return h.hexdigest()


def module_digests(module: nn.Module, index: ModelIndex | None = None) -> list[tuple[str, str]]:
    """One digest per submodule: its classes, settings and tensors.

    ``index``: the calling public call's walk of ``module`` (else one is made).

    Classes: the code of every method (forward and the helpers it calls
    through ``self``) and every plain class attribute, along the whole MRO.
    Settings are every instance attribute that is not a parameter, buffer or
    child (a LeakyReLU slope, a conv stride, an activation function), plus the
    forward hooks. Sticky eval (gradgate's own marker) is left out.

    Example:
        >>> a = module_digests(torch.nn.LeakyReLU(0.1))
        >>> b, c = module_digests(torch.nn.LeakyReLU(0.2)), module_digests(torch.nn.LeakyReLU(0.1))
        >>> a == b, a == c
        (False, True)
    """
    if index is None or index.model is not module:
        index = ModelIndex(module)
    outer = getattr(_DIGESTING, "modules", {})
    _DIGESTING.modules = {
        **outer,
        **{id(m): n or "<root>" for n, m in zip(index.names, index.mods, strict=True)},
    }
    try:
        return _module_digests(index)
    finally:
        _DIGESTING.modules = outer


def _module_digests(index: ModelIndex) -> list[tuple[str, str]]:
    out = []
    classes: dict[type, str] = {}
    for name, m in zip(index.names, index.mods, strict=True):
        h = ValueHasher(strict=False)
        h._tag(f"type:{_qualified(type(m))}")
        for cls in type(m).__mro__:
            if cls is nn.Module or cls is object:
                continue
            if cls not in classes:
                classes[cls] = _class_digest(cls)
            h._tag(f"class:{classes[cls]}")
        script = getattr(m, "code", None)
        if isinstance(script, str):  # TorchScript keeps its program here
            h._tag(f"script:{script}")
        for pname, p in m._parameters.items():
            h._tag(f"param:{pname}")
            if p is not None and is_lazy(p):
                raise InvalidArgumentError(
                    f"FeatureCache cannot key the front-end: {name or 'the root'}.{pname} is an "
                    "uninitialised lazy parameter; run one forward pass before caching"
                )
            if p is not None:
                tensor_digest(p, h.h)
        for bname, b in m._buffers.items():
            h._tag(f"buffer:{bname}")
            if b is not None:
                tensor_digest(b, h.h)
        h._tag(f"children:{list(m._modules)}")
        sticky = is_sticky(m)
        plain = []  # settings that repr() describes exactly, hashed in one go
        for attr in sorted(m.__dict__):
            if attr in _SKIPPED or (attr == "train" and sticky):
                continue
            value = m.__dict__[attr]
            if attr in _FORWARD_HOOKS:
                value = list(value.values()) if isinstance(value, dict) else value
            if _plain(value):
                plain.append((attr, value))
            else:
                h._tag(f"attr:{attr}")
                h.add(value)
        h._tag(f"plain:{plain!r}")
        out.append((name, h.hexdigest()))
    return out


def global_hooks_digest() -> str:
    """Digest of torch's process-wide forward hooks (they change every module's output).

    Example:
        >>> before = global_hooks_digest()
        >>> handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
        >>> before == global_hooks_digest()
        False
        >>> handle.remove(); before == global_hooks_digest()
        True
    """
    from torch.nn.modules import module as torch_module

    h = ValueHasher(strict=False)
    for table in _GLOBAL_HOOKS:
        hooks = getattr(torch_module, table, None)
        h._tag(f"hooks:{table}")
        h.add(list(hooks.values()) if isinstance(hooks, dict) else hooks)
    return h.hexdigest()


def input_fn_digest(fn: Callable[[Any], Any]) -> str:
    """Digest of an input function: its code, defaults, closure and the values it reads.

    Raises:
        InvalidArgumentError: ``fn`` reaches a value that cannot be described
            (an object pickle refuses).

    Example:
        >>> input_fn_digest(lambda d: d["img"]) == input_fn_digest(lambda d: d["img"])
        True
        >>> input_fn_digest(lambda d: d["img"]) == input_fn_digest(lambda d: d["label"])
        False
    """
    h = ValueHasher(strict=True)
    try:
        h.add(fn)
    except Unkeyable as e:
        raise InvalidArgumentError(
            f"FeatureCache cannot key input_fn={fn!r}: it reaches a {e}, which cannot be hashed; "
            "use a plain function or functools.partial over data values (numbers, strings, "
            "tensors, arrays), or pass dataset_key= naming what the input function does"
        ) from None
    return h.hexdigest()


def value_digests(values: Sequence[Any]) -> tuple[bytes, ...]:
    """One 16-byte digest per value of a dataset item (front-end input, then the rest).

    Example:
        >>> d = value_digests((torch.ones(2), 3))
        >>> len(d), d == value_digests((torch.ones(2), 3)), d == value_digests((torch.ones(2), 4))
        (2, True, False)
    """
    out = []
    for value in values:
        h = ValueHasher(strict=True, hasher=hashlib.blake2b(digest_size=16))
        try:
            h.add(value)
        except Unkeyable as e:
            raise InvalidArgumentError(
                f"FeatureCache cannot hash a dataset item: it holds a {e}; items must be "
                "tensors, arrays, numbers, strings or containers of them"
            ) from None
        out.append(h.h.digest())
    return tuple(out)
