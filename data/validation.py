"""Config validation with pydantic: constraints declared on the fields of plain dataclasses.

Every config (``DataConfig``, ``LoopedConfig``, the training sections) stays a stdlib dataclass with
the same fields and API; a field's constraints are declared beside its default with :func:`setting`::

    lr: float = setting(1e-3, ge=0)                      # a finite number >= 0
    schedule: str = setting("constant", choices=SCHEDULES)
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], ge=0, lt=1, length=2)   # per item

pydantic (v2) checks them: :func:`check` validates an instance (called from ``__post_init__``, so
direct construction and ``dataclasses.replace`` are checked), :func:`validate` a dict before
construction (``from_dict``), and :func:`parse` a command-line string (``--set section.key=value``).
Types are strict (an int field refuses ``True`` and ``1.5``; a float field takes ``4`` as ``4.0``;
numpy scalars become Python numbers), floats are finite. Errors are one line naming the field and
what it accepts::

    optim.lr must be a finite number >= 0, got 'fast'

pydantic is imported on first validation, not at import time, so ``looplens --help`` does not pay for
it. Cross-field rules (``out_degree <= n_relations``) stay in each ``__post_init__``.

>>> from dataclasses import dataclass
>>> @dataclass
... class Example:
...     steps: int = setting(10, ge=1)
...     mode: str = setting("a", choices=("a", "b"))
...     def __post_init__(self):
...         check(self, "example.")
>>> Example(steps=0)
Traceback (most recent call last):
...
ValueError: example.steps must be an integer >= 1, got 0
>>> parse(Example, "steps", "1e3", "example.")
1000
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

_KEY = "looplens"


@dataclass(frozen=True)
class Rule:
    """Constraints of one field (of each item, for a list field; ``length`` is the list's)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    length: int | None = None


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, compare: bool = True,
            **rule: Any) -> Any:
    """A dataclass field with constraints (:class:`Rule`'s keywords), e.g. ``setting(4, ge=1)``."""
    if "choices" in rule:
        rule["choices"] = tuple(rule["choices"])
    kwargs: dict[str, Any] = {"compare": compare, "metadata": {_KEY: Rule(**rule)}}
    if factory is not dataclasses.MISSING:
        kwargs["default_factory"] = factory
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata.get(_KEY, Rule())


# -------------------------------------------------------------------------------------------------
# types: the field's annotation plus its Rule, as pydantic understands them
# -------------------------------------------------------------------------------------------------
def _split_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return args[0], True
    return hint, False


def _pydantic_type(hint: Any, rule: Rule, item: bool = False) -> Any:
    from typing import Annotated, Literal

    from pydantic import Field

    inner, optional = _split_optional(hint)
    if typing.get_origin(inner) is list:
        (item_hint,) = typing.get_args(inner)
        out: Any = list[_pydantic_type(item_hint, rule, item=True)]
        if rule.length is not None:
            out = Annotated[out, Field(min_length=rule.length, max_length=rule.length)]
    elif rule.choices is not None:
        out = Literal[rule.choices]  # Literal[("a", "b")] is Literal["a", "b"]
    elif inner in (int, float):
        bounds = {k: getattr(rule, k) for k in ("ge", "gt", "le", "lt") if getattr(rule, k) is not None}
        out = Annotated[inner, Field(**bounds, **({"allow_inf_nan": False} if inner is float else {}))]
    else:
        out = inner
    return out | None if optional else out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(cls: type):
    from pydantic import TypeAdapter
    from typing_extensions import TypedDict

    hints = _hints(cls)
    fields = {f.name: _pydantic_type(hints[f.name], rule_of(f)) for f in dataclasses.fields(cls)}
    return TypeAdapter(TypedDict(f"{cls.__name__}Fields", fields, total=False))


@functools.cache
def _field_adapter(cls: type, key: str):
    from pydantic import TypeAdapter

    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    return TypeAdapter(_pydantic_type(_hints(cls)[key], rule_of(f)))


# -------------------------------------------------------------------------------------------------
# messages
# -------------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


def describe(hint: Any, rule: Rule) -> str:
    """What a field accepts, in words: ``"an integer >= 1"``, ``"one of fixed, poisson"``, ..."""
    inner, optional = _split_optional(hint)
    if typing.get_origin(inner) is list:
        (item_hint,) = typing.get_args(inner)
        size = f"{rule.length} " if rule.length is not None else ""
        text = f"a list of {size}items, each {describe(item_hint, dataclasses.replace(rule, length=None))}"
    elif rule.choices is not None:
        text = f"one of {', '.join(rule.choices)}"
    elif inner is bool:
        text = "true or false"
    elif inner in (int, float):
        lo = (f">= {_num(rule.ge)}" if rule.ge is not None else f"> {_num(rule.gt)}" if rule.gt is not None else None)
        hi = (f"<= {_num(rule.le)}" if rule.le is not None else f"< {_num(rule.lt)}" if rule.lt is not None else None)
        kind = "an integer" if inner is int else "a finite number"
        if lo and hi and inner is float:
            left = "[" if rule.ge is not None else "("
            right = "]" if rule.le is not None else ")"
            low, high = rule.ge if rule.ge is not None else rule.gt, rule.le if rule.le is not None else rule.lt
            text = f"a number in {left}{_num(low)}, {_num(high)}{right}"
        else:
            text = " ".join(part for part in (kind, lo, hi and ("and " + hi if lo else hi)) if part)
    elif inner is str:
        text = "a string"
    else:
        text = f"a {getattr(inner, '__name__', inner)}"
    return f"{text} (or none)" if optional else text


def _message(cls: type, err: Any, values: dict[str, Any], prefix: str) -> str:
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else "?"
    f = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    if f is None:
        return f"{prefix}{key}: {first['msg']}"
    return f"{prefix}{key} must be {describe(_hints(cls)[key], rule_of(f))}, got {values.get(key)!r}"


# -------------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, tuples -> lists (what JSON and TOML would give)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def validate(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` (a subset of ``cls``'s fields) checked and coerced; ValueError naming the field."""
    from pydantic import ValidationError

    values = {k: _plain(v) for k, v in values.items()}
    try:
        return dict(_adapter(cls).validate_python(values, strict=True))
    except ValidationError as err:
        raise ValueError(_message(cls, err, values, prefix)) from None


def check(obj: Any, prefix: str) -> None:
    """Validate a dataclass instance's fields in place (coerced values are written back)."""
    cls = type(obj)
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}
    for name, value in validate(cls, values, prefix).items():
        object.__setattr__(obj, name, value)  # also for frozen dataclasses: validation happens in __init__


_NONE = ("none", "null", "")


def parse(cls: type, key: str, raw: str, prefix: str) -> Any:
    """A command-line string as the value of field ``key`` (``--set section.key=value``).

    Tried in order: the string itself (pydantic's lax parsing: "64", "3e-4", "yes", "cosine"), none for
    an optional field ("none", "null", ""), JSON ("1e4" for an int, "[1, 2, 8]"), a comma list ("1,2,8").
    """
    import json

    from pydantic import ValidationError

    adapter = _field_adapter(cls, key)
    hint, optional = _split_optional(_hints(cls)[key])
    candidates: list[Any] = [raw]
    if optional and raw.strip().lower() in _NONE:
        candidates.insert(0, None)
    try:
        candidates.append(json.loads(raw))
    except ValueError:
        pass
    if typing.get_origin(hint) is list:
        body = raw.strip().removeprefix("[").removesuffix("]")
        candidates.append([item.strip().strip("'\"") for item in body.split(",") if item.strip()])
    for candidate in candidates:
        if isinstance(candidate, bool) and hint is not bool:
            continue  # JSON's true is not the number 1
        try:
            return adapter.validate_python(candidate, strict=False)
        except ValidationError:
            continue
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    raise ValueError(f"{prefix}{key} must be {describe(_hints(cls)[key], rule_of(f))}, got {raw!r}")
