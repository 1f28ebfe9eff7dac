"""Typed options: turn TOML values into constructor arguments by type hint.

A plugin's ``__init__`` signature is its schema, and mesh.toml's own tables
are described the same way (dataclasses in `mesh.config`). `bind` checks a
table against a signature and reports every problem at once: unknown keys
(with a did-you-mean), missing required keys, and values of the wrong type,
each naming its key path, what was found and what was expected.

Hints understood: ``str``, ``int``, ``float``, ``bool``, `Duration`, `Rate`,
``pathlib.Path`` (relative to mesh.toml's folder), ``Literal[...]``,
``list[T]``, ``dict[K, V]``, unions such as ``str | list[str]`` or
``int | None``, and ``Any``.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

__all__ = ["Duration", "Rate", "Size", "OptionError", "bind", "check", "construct", "convert", "parse_duration"]


class OptionError(ValueError):
    """One option value that does not fit its hint."""


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


class Duration(float):
    """Seconds, written in mesh.toml as ``"250ms"``, ``"30s"``, ``"1m"``, ``"2h"``, ``"1d"``."""

    @classmethod
    def parse(cls, value: str | int | float) -> Duration:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            seconds = parse_duration(value)
        if seconds < 0:
            raise ValueError(value)
        return cls(seconds)

    def __repr__(self) -> str:
        return f"Duration({float(self)!r})"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


class Size(int):
    """Bytes, written in mesh.toml as ``65536``, ``"64KiB"``, ``"1MiB"`` or ``"2MB"``."""

    @classmethod
    def parse(cls, value: str | int) -> Size:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            size = value
        else:
            match = _SIZE.match(value.lower()) if isinstance(value, str) else None
            if not match or match.group(2) not in _SIZE_UNITS:
                raise ValueError(value)
            size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
        if size < 0:
            raise ValueError(value)
        return cls(size)

    def __repr__(self) -> str:
        return f"Size({int(self)})"


_PERIODS = {
    "second": 1, "seconds": 1, "s": 1, "sec": 1,
    "minute": 60, "minutes": 60, "m": 60, "min": 60,
    "hour": 3600, "hours": 3600, "h": 3600,
    "day": 86400, "days": 86400, "d": 86400,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


class Rate:
    """A rate like ``"100/minute"`` or ``"10/5 seconds"``: ``amount`` per ``seconds``."""

    __slots__ = ("amount", "seconds", "text")

    def __init__(self, amount: int, seconds: float, text: str | None = None) -> None:
        self.amount = amount
        self.seconds = seconds
        self.text = text or f"{amount}/{seconds:g} seconds"

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text.lower()) if isinstance(text, str) else None
        if not match or match.group(3) not in _PERIODS or int(match.group(1)) <= 0:
            raise ValueError(text)
        multiple = int(match.group(2) or 1)
        return cls(int(match.group(1)), multiple * _PERIODS[match.group(3)], text.strip())

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Rate)
                and (self.amount, self.seconds) == (other.amount, other.seconds))

    def __hash__(self) -> int:
        return hash((self.amount, self.seconds))

    def __repr__(self) -> str:
        return f"Rate({self.text!r})"


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "table"}.get(type(value), type(value).__name__)


def _found(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_type_name(value)})"


def describe(hint: Any) -> str:
    """Say in words what a hint accepts: 'an integer', 'a list of strings'."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return "any value"
    if origin in (Union, types.UnionType):
        parts = [describe(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_plural(item)}"
    if origin is dict:
        args = typing.get_args(hint) or (str, Any)
        return f"a table of {_plural(args[1])}"
    return {
        str: "a string", int: "an integer", float: "a number", bool: "true or false",
        Duration: "a duration like '30s' or '250ms'",
        Size: "a size in bytes like 65536, '64KiB' or '1MiB'",
        Rate: "a rate like '100/minute'", Path: "a file path",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    words = describe(hint)
    for article in ("a ", "an "):
        if words.startswith(article):
            noun, _, rest = words[len(article):].partition(" ")
            return f"{noun}s {rest}".rstrip()
    return words


def convert(value: Any, hint: Any, *, root: Path | None = None, where: str = "") -> Any:
    """Return ``value`` converted to ``hint``, or raise `OptionError` saying why."""
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:  # `X | None`: X's own message says more
            return convert(value, args[0], root=root, where=where)
        # In the order written, so that "30s" for `Duration | str` stays a duration.
        for arg in args:
            try:
                return convert(value, arg, root=root, where=where)
            except OptionError:
                pass
        raise OptionError(f"{where}: expected {describe(hint)}, found {_found(value)}")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise OptionError(f"{where}: expected {describe(hint)}, found {_found(value)}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise OptionError(f"{where}: expected {describe(hint)}, found {_found(value)}")
        return [convert(v, item, root=root, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint) or (str, Any)
        if not isinstance(value, dict):
            raise OptionError(f"{where}: expected {describe(hint)}, found {_found(value)}")
        return {convert(k, key_hint, root=root, where=where):
                convert(v, value_hint, root=root, where=f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Duration:
        try:
            return Duration.parse(value)
        except (ValueError, TypeError):
            pass
    elif hint is Size:
        try:
            return Size.parse(value)
        except (ValueError, TypeError):
            pass
    elif hint is Rate:
        try:
            return Rate.parse(value)
        except (ValueError, TypeError):
            pass
    elif hint is Path:
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            return path if path.is_absolute() or root is None else root / path
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict) and hasattr(hint, "__dataclass_fields__"):
            problems: list[str] = []
            result = bind(hint, value, where=where, root=root, problems=problems)
            if problems:
                raise OptionError(problems[0] if len(problems) == 1 else "\n".join(problems))
            return result
    raise OptionError(f"{where}: expected {describe(hint)}, found {_found(value)}")


def signature_hints(target: Any) -> dict[str, tuple[Any, Any]]:
    """``{name: (hint, default)}`` of a class's constructor keyword arguments."""
    init = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    sig = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an unresolvable annotation: treat it as untyped
        hints = {}
    params = {}
    for name, param in sig.parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        params[name] = (hints.get(name, Any), param.default)
    return params


def accepts_any_keyword(target: Any) -> bool:
    init = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values())


def check(target: Any, table: dict[str, Any], *, where: str, root: Path | None = None,
          problems: list[str], label: str | None = None) -> dict[str, Any] | None:
    """Convert ``table`` into keyword arguments for ``target``; append problems, None on any.

    ``label`` names the thing in messages, as in ``services.web.plugins[1] (ratelimit)``.
    """
    params = signature_hints(target)
    prefix = f"{where} ({label})" if label else where
    before = len(problems)
    kwargs: dict[str, Any] = {}
    open_ended = accepts_any_keyword(target)
    for key, value in table.items():
        if key not in params:
            if open_ended:
                kwargs[key] = value
                continue
            close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.6)
            hint = f", did you mean '{close[0]}'?" if close else (
                f" (known: {', '.join(sorted(params))})" if params else " (it takes no options)")
            problems.append(f"{prefix}: unknown option '{key}'{hint}")
            continue
        hint, _default = params[key]
        try:
            kwargs[key] = convert(value, hint, root=root, where=key)
        except OptionError as exc:
            problems.append(f"{prefix}: {exc}" if label else f"{where}.{exc}")
    for name, (hint, default) in params.items():
        if default is inspect.Parameter.empty and name not in table:
            if label:
                problems.append(f"{prefix}: missing required option '{name}' ({describe(hint)})")
            else:
                problems.append(f"{where}.{name}: missing, expected {describe(hint)}")
    return None if len(problems) > before else kwargs


def construct(target: Any, kwargs: dict[str, Any], *, where: str, problems: list[str],
              label: str | None = None) -> Any:
    """``target(**kwargs)``, with a ValueError or TypeError it raises recorded as a problem."""
    try:
        return target(**kwargs)
    except (ValueError, TypeError) as exc:
        problems.append(f"{where} ({label}): {exc}" if label else f"{where}: {exc}")
        return None


def bind(target: Any, table: dict[str, Any], *, where: str, root: Path | None = None,
         problems: list[str], label: str | None = None) -> Any:
    """Check ``table`` against ``target``'s signature and build it; None (and problems) on failure."""
    kwargs = check(target, table, where=where, root=root, problems=problems, label=label)
    if kwargs is None:
        return None
    return construct(target, kwargs, where=where, problems=problems, label=label)
