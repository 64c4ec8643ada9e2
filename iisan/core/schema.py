"""Settings as dataclasses, each stated once: a field's annotation is its type, and
``setting(default, description, **limits)`` gives its default, what it means and its
limits. The JSON schema that config.yaml and the command line are validated against
is derived from the dataclasses (``schema_of``), never written beside them, and
``parse`` turns a mapping into the dataclass with errors that name the dotted key.

Numbers must be finite: JSON and YAML admit NaN and infinity, which no setting means.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import MISSING

from iisan.core.errors import ConfigValidationError

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object", list: "array",
               type(None): "null"}  # fmt: skip


def setting(default=MISSING, description: str = "", *, factory=None, schema: dict | None = None, **limits):
    """A dataclass field with its description and JSON-schema limits (``minimum=1``, ...).
    ``schema`` replaces the type derived from the annotation (e.g. a ``oneOf``)."""
    metadata = {"description": description, "limits": limits, "schema": schema}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_schema(tp) -> dict:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        parts = [_type_schema(a) for a in typing.get_args(tp)]
        if all(set(p) == {"type"} for p in parts):
            return {"type": [p["type"] for p in parts]}
        return {"anyOf": parts}
    if dataclasses.is_dataclass(tp):
        return schema_of(tp)
    base = origin or tp
    if base not in _JSON_TYPES:
        raise TypeError(f"no JSON type for {tp!r}")
    return {"type": _JSON_TYPES[base]}


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return MISSING


def fields(cls) -> list[dataclasses.Field]:
    """The user-settable fields of a settings dataclass (those declared with ``setting``)."""
    return [f for f in dataclasses.fields(cls) if "description" in f.metadata]


def schema_of(cls, only: typing.Iterable[str] | None = None) -> dict:
    """The JSON schema of a settings dataclass: an object with exactly its settings."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        prop = copy.deepcopy(meta["schema"]) if meta["schema"] else _type_schema(hints[f.name])
        prop.update(meta["limits"])
        default = _default(f)
        if default is MISSING:
            required.append(f.name)
        else:
            prop["default"] = copy.deepcopy(default)
        prop["description"] = meta["description"]
        props[f.name] = prop
    out = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    if cls.__doc__:
        out["description"] = cls.__doc__.strip().split("\n\n")[0].replace("\n", " ")
    return out


def _finite_number(checker, instance) -> bool:
    return (
        isinstance(instance, (int, float))
        and not isinstance(instance, bool)
        and (not isinstance(instance, float) or math.isfinite(instance))
    )


def validator(schema: dict, defaults: bool = True):
    """A Draft 2020-12 validator whose numbers are finite and that fills in defaults
    (jsonschema's FAQ recipe)."""
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("number", _finite_number)
    props = base.VALIDATORS["properties"]

    def set_defaults(v, properties, instance, sch):
        if isinstance(instance, dict):
            for key, spec in properties.items():
                if "default" in spec and key not in instance:
                    instance[key] = copy.deepcopy(spec["default"])
        yield from props(v, properties, instance, sch)

    cls = validators.extend(base, {"properties": set_defaults} if defaults else {}, type_checker=checker)
    return cls(schema)


def _dotted(path, root: str) -> str:
    return ".".join([root, *(str(p) for p in path)]) if path else root


def check(schema: dict, value, root: str, defaults: bool = True, schema_name: str = "the schema"):
    """Validate a copy of ``value`` (defaults filled in) and return it; the first error is a
    ConfigValidationError naming the dotted key (``root`` names the whole, e.g. ``--settings``)."""
    from jsonschema.exceptions import best_match

    value = copy.deepcopy(value)
    error = best_match(validator(schema, defaults).iter_errors(value))
    if error is None:
        return value
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":  # name the unknown key(s) and what is known
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        raise ConfigValidationError(
            f"{_dotted(path, root)}: unknown key(s) {unknown}; known: {known}\n"
            "  fix: correct the spelling or remove them"
        )
    key = f"`{path[-1]}`={error.instance!r}: " if path else ""
    message = error.message
    if error.validator == "type" and "number" in str(error.validator_value) and isinstance(error.instance, float):
        message = f"{error.instance!r} is not a finite number"
    raise ConfigValidationError(
        f"{_dotted(path[:-1], root)}: {key}{message}\n  fix: see `{_dotted(path, root)}` in {schema_name}"
    )


def parse(cls, value: dict, root: str):
    """A settings dataclass from a mapping: validated against ``schema_of(cls)``, defaults filled."""
    if not isinstance(value, dict):
        raise ConfigValidationError(f"{root}: expected a mapping of settings, got {type(value).__name__}")
    return cls(**check(schema_of(cls), value, root))
