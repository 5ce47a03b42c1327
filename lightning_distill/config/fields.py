"""Typed configuration: validate plain YAML trees against dataclasses, with errors that say where and how to fix.

Components own their config as a nested ``Config`` dataclass. A recipe section that selects a component is
``{name: NAME, **fields}``; its fields are checked against ``REGISTRY.get(NAME).Config``. A field typed
``component("role")`` holds such a section and validates to a :class:`Spec`, which builds the component later —
validation never imports a model or touches data.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from lightning_distill.errors import RecipeError
from lightning_distill.config.registry import REGISTRIES


@dataclass(frozen=True)
class Role:
    """Marker in ``Annotated[Spec, Role("loss")]``: the field selects a component of that role."""

    role: str


@dataclass(frozen=True)
class Spec:
    """A validated component choice: its role, registered name and typed config."""

    role: str
    name: str
    config: Any = None

    def component(self) -> Any:
        return REGISTRIES[self.role].get(self.name)

    def build(self, *args: Any, **runtime: Any) -> Any:
        """Build the component: ``cls(config, *args, **runtime)`` (``cls(*args, **runtime)`` if it has no Config)."""
        cls = self.component()
        if self.config is None:
            return cls(*args, **runtime)
        return cls(self.config, *args, **runtime)

    def to_dict(self) -> dict[str, Any]:
        body = to_dict(self.config) if self.config is not None else {}
        return {"name": self.name, **body}


@dataclass(frozen=True)
class Min:
    """Marker in ``Annotated[int, Min(1)]``: the value must be at least this."""

    value: float


PositiveInt = Annotated[int, Min(1)]
NonNegativeFloat = Annotated[float, Min(0)]


def component(role: str) -> Any:
    """The annotation of a config field that selects a component of ``role``."""
    return Annotated[Spec, Role(role)]


# Where a key came from, for error messages: given a key path, the file (or "command line") that set it.
SourceLookup = Callable[[str], "str | None"]


def _no_source(_: str) -> None:
    return None


def validate(data: Any, cls: type, *, path: str = "", source: SourceLookup = _no_source) -> Any:
    """Check a plain tree (dicts, lists, scalars) against dataclass ``cls`` and return an instance.

    Raises:
        RecipeError: naming the source file, the key path, what was expected and the nearest valid key.
    """
    return _check(data, cls, path, source)


def _err(message: str, path: str, source: SourceLookup) -> RecipeError:
    return RecipeError(message, path=path or "<root>", source=source(path))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(value: Any, tp: Any, path: str, source: SourceLookup) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        role = next((e.role for e in extras if isinstance(e, Role)), None)
        if role is not None:
            return _check_spec(value, role, path, source)
        checked = _check(value, base, path, source)
        for bound in (e for e in extras if isinstance(e, Min)):
            if checked is not None and checked < bound.value:
                raise _err(f"must be at least {bound.value:g}, got {checked!r}", path, source)
        return checked
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, path, source)
            except RecipeError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise _err(f"expected {_type_name(tp)}, got {_describe(value)}", path, source)
    if value is None:
        raise _err(f"expected {_type_name(tp)}, got null", path, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _err(f"{value!r} is not one of {', '.join(map(repr, allowed))}.{hint}", path, source)
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _err(f"expected a list, got {_describe(value)}", path, source)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _err(f"expected a list of {len(args)} items, got {len(value)}", path, source)
            return tuple(_check(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_check(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _err(f"expected a mapping, got {_describe(value)}", path, source)
        args = typing.get_args(tp)
        item = args[1] if args else Any
        return {str(k): _check(v, item, _join(path, str(k)), source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _check_dataclass(value, tp, path, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise _err(f"expected true or false, got {_describe(value)}", path, source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(f"expected an integer, got {_describe(value)}", path, source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(f"expected a number, got {_describe(value)}", path, source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _err(f"expected a string, got {_describe(value)}", path, source)
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug in a component, not user input


def _check_dataclass(value: Any, cls: type, path: str, source: SourceLookup) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise _err(f"expected a mapping of {cls.__name__} fields, got {_describe(value)}", path, source)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(fields) or "(none)"
            raise _err(f"unknown key {key!r}.{hint} Valid keys here: {valid}", _join(path, str(key)), source)
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name in value:
            kwargs[name] = _check(value[name], hints[name], sub, source)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if _holds_spec(hints[name]) and default is not None:
                default = _check(default, hints[name], sub, source)
            kwargs[name] = default
        else:
            raise _err(f"missing required key {name!r} ({_type_name(hints[name])})", sub, source)
    return cls(**kwargs)


def _holds_spec(tp: Any) -> bool:
    if typing.get_origin(tp) is Annotated:
        return any(isinstance(e, Role) for e in typing.get_args(tp)[1:])
    return any(_holds_spec(a) for a in typing.get_args(tp) if a is not Ellipsis)


def _check_spec(value: Any, role: str, path: str, source: SourceLookup) -> Spec:
    if isinstance(value, Spec):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict) and "name" not in value and REGISTRIES[role].default is not None:
        value = {"name": REGISTRIES[role].default, **value}
    if not isinstance(value, dict) or "name" not in value:
        raise _err(f"expected a {role} section with a 'name' key, got {_describe(value)}", path, source)
    name = value["name"]
    if not isinstance(name, str):
        raise _err(f"expected a {role} name, got {_describe(name)}", _join(path, "name"), source)
    registry = REGISTRIES[role]
    if name not in registry:
        raise _err(registry.unknown_message(name), _join(path, "name"), source)
    cls = registry.get(name)
    body = {k: v for k, v in value.items() if k != "name"}
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        if body:
            key = next(iter(body))
            raise _err(f"unknown key {key!r}: {role} {name!r} takes no settings", _join(path, key), source)
        return Spec(role, name, None)
    return Spec(role, name, _check_dataclass(body, config_cls, path, source))


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        role = next((e.role for e in typing.get_args(tp)[1:] if isinstance(e, Role)), None)
        bound = next((e.value for e in typing.get_args(tp)[1:] if isinstance(e, Min)), None)
        if role:
            return f"{role} section"
        return _type_name(typing.get_args(tp)[0]) + (f" >= {bound:g}" if bound is not None else "")
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (list, tuple):
        return "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(obj: Any) -> Any:
    """A validated config back to plain containers (for saving the resolved recipe)."""
    if isinstance(obj, Spec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe_fields(cls: type | None) -> list[tuple[str, str, Any]]:
    """``(name, type, default)`` of each field of a Config class, for ``lightning-distill components``."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls, include_extras=True)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints[f.name]), default))
    return rows
