"""Plain YAML data -> typed dataclasses, checked against the annotations (the generic layer under ``config``).

Knows nothing of the engine's sections: :func:`build_dataclass` walks any dataclass whose fields are annotated with
``bool``, ``int``, ``float``, ``str``, ``None``, ``Optional``/``Union`` of them, ``List[...]``, ``Dict[...]`` or
nested dataclasses. ``int`` is accepted where ``float`` is expected (and a string YAML 1.1 left unparsed, such as
``"1e-4"``); ``bool`` is never taken for a number. A field whose metadata has ``internal: True`` cannot be set.
Every mismatch raises :class:`~siss_fast.engine.errors.ConfigError` naming the dotted key and the expected type.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Union

from .errors import ConfigError

__all__ = ["type_name", "coerce", "build_dataclass", "merge_mappings"]


def type_name(tp: Any) -> str:
    """``tp`` in words for an error message (``Optional[int]`` -> ``"an integer or null"``)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats); raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp)
            return [coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    elif origin in (dict, Dict):
        if isinstance(value, dict):
            return dict(value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """``cls(**data)`` with every value coerced to its field's annotation, nested dataclasses built recursively.

    ``prefix`` is the dotted path of ``data`` in the whole config (``""`` at the top, ``"train."`` below), for
    messages; keys missing from ``data`` keep the field defaults; an unknown key raises ConfigError listing the
    valid ones.
    """
    if dataclasses.is_dataclass(cls) and not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{full}: unknown key; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = coerce(full, value, tp)
    return cls(**kwargs)


def merge_mappings(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``extra``, recursing where both hold a mapping (neither argument is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = value
    return out
