"""Params as JSON Schema: derived from a params dataclass, checked with jsonschema, said in words.

The schema walk of the runner contract (tilerunner.contract lists the plug-ins, this module
says what their params are): a dataclass's fields, type hints, defaults and
``field(metadata=constraint(...))`` keywords become a closed JSON Schema object, each property
carrying ``x-expects`` (what a value must be, in words). One keyword goes beyond JSON Schema:
``x-not-below`` (a number that must not be below another param, defaults counting), checked
here as a jsonschema keyword, so a params mapping is checked by one jsonschema validation.

The builder reads these schemas from the contract file the base image ships and validates
with them; the config loader validates with the very same objects (plug-ins/registry.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import Any

import jsonschema

#: Keyword of a numeric param that must be >= the param it names (defaults count).
NOT_BELOW = "x-not-below"
#: Keyword holding what a param's value must be, in words ("a number in [0, 1]").
EXPECTS = "x-expects"
#: Schema keyword marking a param whose value names a file of its model (a path inside the
#: model folder): the config schema's ``params.file``, or a plug-in field declared with
#: ``field(metadata=model_file())``. The runner refuses one that leaves the folder.
MODEL_FILE = "x-model-file"

_SCALARS: dict[Any, dict[str, Any]] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    type(None): {"type": "null"},
}


def constraint(**schema: Any) -> dict[str, Any]:
    """``field(metadata=constraint(minimum=0))``: JSON Schema keywords added to a param."""
    return {"schema": schema}


def model_file() -> dict[str, Any]:
    """``field(metadata=model_file())``: the param names a file of its model (MODEL_FILE)."""
    return constraint(**{MODEL_FILE: True})


def marked(
    schema: Any, value: Any, mark: str, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """(path, value) of every value under ``schema`` that the schema marks with ``mark`` (the
    value, or each item of a list), following object properties and array items."""
    if not isinstance(schema, Mapping):
        return
    if schema.get(mark):
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            yield (path if index is None else (*path, index)), item
    elif isinstance(value, Mapping):
        for key, prop in (schema.get("properties") or {}).items():
            if key in value:
                yield from marked(prop, value[key], mark, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from marked(schema.get("items"), item, mark, (*path, index))


def _merge_types(options: list[dict[str, Any]]) -> dict[str, Any]:
    """anyOf of plain ``{"type": X}`` schemas -> ``{"type": [X, Y]}``; else anyOf."""
    if all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
        return {"type": [o["type"] for o in options]}
    return {"anyOf": options}


def type_schema(tp: Any) -> dict[str, Any]:
    """JSON Schema of a param's type hint (scalars, Optional/unions, lists, mappings, enums,
    Literal, nested dataclasses); TypeError for a type the contract cannot describe."""
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return params_schema(tp)
    return _generic_schema(tp)


def _generic_schema(tp: Any) -> dict[str, Any]:
    """type_schema of a parametrised type: Literal, unions, lists, tuples, mappings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    schema: dict[str, Any] | None = None
    if origin is typing.Literal:
        schema = {"enum": list(args)}
    elif origin in (typing.Union, types.UnionType):
        schema = _merge_types([type_schema(a) for a in args])
    elif origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        schema = {
            "type": "array",
            "prefixItems": [type_schema(a) for a in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    elif origin in (list, tuple, Sequence) and args:
        schema = {"type": "array", "items": type_schema(args[0])}
    elif origin in (dict, Mapping) and args:
        schema = {"type": "object", "additionalProperties": type_schema(args[1])}
    if schema is None:
        raise TypeError(f"the contract cannot describe the param type {tp!r}")
    return schema


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _json_default(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple | list):
        return [_json_default(v) for v in value]
    return value


@cache
def params_schema(cls: type) -> dict[str, Any]:
    """A closed object schema of a params dataclass: one property per init field."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        prop = type_schema(hints[f.name])
        prop.update(f.metadata.get("schema", {}))
        if f.default is not dataclasses.MISSING:
            prop["default"] = _json_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            prop["default"] = _json_default(f.default_factory())
        else:
            required.append(f.name)
        prop[EXPECTS] = expects(prop)
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        schema["required"] = required
    return schema


# --------------------------------------------------------------------------- in words


def _num(value: Any) -> str:
    return repr(value) if not isinstance(value, float) or not value.is_integer() else str(value)


def _range(s: Mapping[str, Any]) -> str:
    low = s.get("minimum", s.get("exclusiveMinimum"))
    high = s.get("maximum", s.get("exclusiveMaximum"))
    lo_b = "[" if "minimum" in s else "("
    hi_b = "]" if "maximum" in s else ")"
    if low is not None and high is not None:
        return f" in {lo_b}{_num(low)}, {_num(high)}{hi_b}"
    if low is not None:
        return f" {'>=' if lo_b == '[' else '>'} {_num(low)}"
    if high is not None:
        return f" {'<=' if hi_b == ']' else '<'} {_num(high)}"
    return ""


#: Keywords of a union's schema that apply to its members (JSON Schema ignores the rest).
_SHARED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "not",
    "minItems",
    "maxItems",
    "items",
)

_NOUNS = {
    "number": ("a number", "numbers"),
    "integer": ("an integer", "integers"),
    "string": ("a string", "strings"),
    "boolean": ("true or false", "booleans"),
    "null": ("null", "nulls"),
    "object": ("a mapping", "mappings"),
}


def expects(schema: Mapping[str, Any], plural: bool = False) -> str:
    """What a value must be, in words ("a number in [0, 1]", "a list of 3 integers in [0, 255]")."""
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        shared = {k: v for k, v in schema.items() if k in _SHARED}
        return " or ".join(expects({**o, **shared}, plural) for o in schema["anyOf"])
    kinds = schema.get("type")
    if isinstance(kinds, list):
        parts = [expects({**schema, "type": k}, plural) for k in kinds]
        return " or ".join(parts)
    if kinds == "array":
        lo, hi = schema.get("minItems"), schema.get("maxItems")
        count = f"{lo} " if lo is not None and lo == hi else ""
        items = schema.get("items") or {}
        inner = expects(items, plural=True) if items else "values"
        return f"{'lists' if plural else 'a list'} of {count}{inner}"
    if kinds in _NOUNS:
        noun = _NOUNS[kinds][1 if plural else 0]
        extra = ""
        if kinds in ("number", "integer"):
            extra = _range(schema)
            if schema.get("not") == {"const": 0}:
                extra += " (not 0)"
        return noun + extra
    return "any value"


# --------------------------------------------------------------------------- the check


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _properties_in_order(
    validator: Any, properties: Mapping[str, Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """JSON Schema's ``properties``, then each property's NOT_BELOW (defaults count)."""
    yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](
        validator, properties, instance, schema
    )
    if not isinstance(instance, Mapping):
        return
    for key, prop in properties.items():
        other = prop.get(NOT_BELOW) if isinstance(prop, Mapping) else None
        if not other:
            continue
        value = instance.get(key, prop.get("default"))
        floor = instance.get(other, (properties.get(other) or {}).get("default"))
        if _is_number(value) and _is_number(floor) and value < floor:
            yield jsonschema.ValidationError(
                f"{key} must be >= {other} ({json.dumps(floor)}), not {json.dumps(value)}",
                validator=NOT_BELOW,
                path=(key,),
            )


def _finite_number(checker: Any, instance: Any) -> bool:
    """JSON's numbers: NaN and the infinities (YAML's .nan, .inf) are none."""
    return _is_number(instance) and math.isfinite(instance)


#: Draft 2020-12 plus the contract's NOT_BELOW keyword; NaN and infinities are no numbers.
ParamsValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    {"properties": _properties_in_order},
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("number", _finite_number),
)


def _at(schema: Mapping[str, Any], path: Sequence[Any]) -> tuple[list[str], Mapping[str, Any]]:
    """The deepest property along ``path`` that says what it expects: (its key path, schema)."""
    keys: list[str] = []
    found: tuple[list[str], Mapping[str, Any]] = ([], schema)
    for part in path:
        props = schema.get("properties")
        if not isinstance(part, str) or not isinstance(props, Mapping) or part not in props:
            break
        schema = props[part]
        keys.append(part)
        if EXPECTS in schema:
            found = (list(keys), schema)
    return found


def _errors(schema: Mapping[str, Any], value: Any) -> list[jsonschema.ValidationError]:
    """Every error of ``value`` under ``schema``, shallowest first; the order of two params
    (NOT_BELOW) only once everything else is right."""
    errors = list(ParamsValidator(schema).iter_errors(value))
    plain = [e for e in errors if e.validator != NOT_BELOW]
    return sorted(plain or errors, key=lambda e: (len(e.path), [str(p) for p in e.path]))


def _properties(error: jsonschema.ValidationError) -> Any:
    """The ``properties`` of the schema an error was found under (None if it has none)."""
    return error.schema.get("properties") if isinstance(error.schema, Mapping) else None


def _in_words(
    schema: Mapping[str, Any], value: Any, error: jsonschema.ValidationError
) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(path inside ``value``, what is wrong) for one error: unknown keys one by one with a
    did-you-mean, a value against its property's ``x-expects``, else jsonschema's message."""
    path = tuple(error.path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(_properties(error) or {})
        for extra in sorted(k for k in error.instance if k not in allowed):
            yield (
                (*path, extra),
                f"unknown key {extra!r} ({did_you_mean(extra, allowed)}"
                f"accepted: {', '.join(allowed) or 'none'})",
            )
        return
    keys, prop = _at(schema, path)
    if error.validator in ("required", NOT_BELOW) or not keys:
        yield path, str(error.message)
        return
    shown = value
    for key in keys:
        shown = shown[key]
    yield tuple(keys), f"{'.'.join(keys)} must be {prop[EXPECTS]}, not {json.dumps(shown)}"


def param_problems(schema: Mapping[str, Any], value: Any) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(path inside ``value``, what is wrong in words) for each problem, shallowest first
    ("threshold must be a number in [0, 1], not 2"; "unknown key 'treshold' (did you mean
    'threshold'? accepted: ...)"). The builder lists them all at analysis.yaml:line."""
    for error in _errors(schema, value):
        yield from _in_words(schema, value, error)


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``known``, or ``""``."""
    match = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean {match[0]!r}? " if match else ""


def params_problem(schema: Mapping[str, Any], params: Any) -> str | None:
    """The first thing wrong with ``params`` under a params schema, in words, or None (the
    runner's config loader: it stops at the first)."""
    errors = _errors(schema, params)
    if not errors:
        return None
    error = errors[0]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        parent = _at(schema, list(error.path))[1] if error.path else schema
        allowed = sorted(_properties(error) or parent.get("properties") or {})
        extra = sorted(k for k in error.instance if k not in allowed)
        prefix = ".".join(map(str, error.path))
        names = ", ".join(repr(f"{prefix}.{k}" if prefix else k) for k in extra)
        hint = did_you_mean(extra[0], allowed) if extra else ""
        return f"unknown params {names} ({hint}accepted: {', '.join(allowed) or 'none'})"
    return next(_in_words(schema, params, error))[1]
