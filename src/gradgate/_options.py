"""Typed option coercion: a string option becomes its enum at the call (private).

Public signatures take ``Literal[...]`` strings so that editors and
``mypy --strict`` see the valid values; inside, each option is an enum.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from .errors import InvalidArgumentError

E = TypeVar("E", bound=enum.Enum)


def choice(kind: type[E], name: str, value: object) -> E:
    """Turn a string option into its enum at once, naming the valid values.

    Example:
        >>> import enum
        >>> class Color(enum.Enum):
        ...     RED = "red"
        >>> choice(Color, "color", "red")
        <Color.RED: 'red'>
        >>> choice(Color, "color", "blue")
        Traceback (most recent call last):
        ...
        gradgate.errors.InvalidArgumentError: color must be one of 'red'; got 'blue'
    """
    if isinstance(value, kind):
        return value
    for member in kind:
        if member.value == value:
            return member
    valid = ", ".join(repr(m.value) for m in kind)
    raise InvalidArgumentError(f"{name} must be one of {valid}; got {value!r}")
