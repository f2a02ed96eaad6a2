"""The runner's contract: every config this runner accepts, derived from the plug-in classes.

The contract is one JSON document: the accepted verbose-config schema versions and their
schemas, every preprocessing, postprocessing and feature plug-in with a JSON Schema of its
params (types, required/optional, defaults, ranges, enums, nested objects), the model roles
of each feature, the prediction kinds each postprocessing step takes and gives, and what
`depends_on` may name. It is computed from the registered classes (dataclass fields, their
type hints and ``field(metadata={"schema": ...})`` constraints), never written by hand, so it
cannot drift; the config loader validates params with the very same schemas.

The base image ships it as /opt/tilerunner/contract.json with its sha256 in the label
``com.ivd.runner.contract.sha256``; the builder checks every verbose config against it before
it assembles an image, so what the builder accepts is what the runner runs.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import json
import types
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from tilerunner import CONFIG_SCHEMA_VERSIONS

#: Version of the contract document layout.
CONTRACT_VERSION = 1
#: Where the base image installs the contract.
CONTRACT_PATH = "/opt/tilerunner/contract.json"
#: Base image label holding the sha256 (hex) of that file.
CONTRACT_LABEL = "com.ivd.runner.contract.sha256"
#: Schema keyword marking a param whose value names a file of its model (a path inside the
#: model folder): the config schema's ``params.file``, or a plug-in field declared with
#: ``field(metadata=model_file())``. The builder checks each against the model's pinned files.
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
        prop["x-expects"] = expects(prop)
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        schema["required"] = required
    return schema


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
        if "x-expects" in schema:
            found = (list(keys), schema)
    return found


def order_problem(schema: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    """A param below the one its ``x-not-below`` names (defaults count), in words, or None.

    Declared with ``field(metadata=constraint(**{"x-not-below": "other"}))``: the contract
    carries it, so the builder checks the same pairs.
    """
    props: Mapping[str, Any] = schema.get("properties") or {}
    for key, prop in props.items():
        other = prop.get("x-not-below")
        if not other:
            continue
        value = params.get(key, prop.get("default"))
        floor = params.get(other, (props.get(other) or {}).get("default"))
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (value, floor)
        )
        if numbers and value < floor:
            return f"{key} must be >= {other} ({json.dumps(floor)}), not {json.dumps(value)}"
    return None


def params_problem(schema: Mapping[str, Any], params: Any) -> str | None:
    """The first thing wrong with ``params`` under a params schema, in words, or None."""
    import difflib

    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(
        validator.iter_errors(params), key=lambda e: (len(e.path), list(map(str, e.path)))
    )
    if not errors:
        return order_problem(schema, params)
    error = errors[0]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        parent = _at(schema, list(error.path))[1] if error.path else schema
        allowed = sorted(error.schema.get("properties") or parent.get("properties") or {})
        extra = sorted(k for k in error.instance if k not in allowed)
        prefix = ".".join(map(str, error.path))
        names = ", ".join(repr(f"{prefix}.{k}" if prefix else k) for k in extra)
        guess = difflib.get_close_matches(extra[0], allowed, n=1) if extra else []
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        return f"unknown params {names} ({hint}accepted: {', '.join(allowed) or 'none'})"
    keys, prop = _at(schema, list(error.path))
    if error.validator == "required" or not keys:
        return f"{error.message}"
    value = params
    for key in keys:
        value = value[key]
    return f"{'.'.join(keys)} must be {prop['x-expects']}, not {json.dumps(value)}"


def _description(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # dataclasses invent "Name(field: type = ...)" docs for classes without one: not ours
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ")


def _postprocessing_kinds(cls: type) -> dict[str, str]:
    """Which prediction kind a step gives for each kind it takes (from output_kind)."""
    from tilerunner.plugins.postprocessing import Kind

    try:
        step = cls()
    except (TypeError, ValueError):  # required params: no default instance to ask
        return {}
    out = {}
    for kind in Kind:
        try:
            out[kind.value] = step.output_kind(kind).value
        except ValueError:
            continue
    return out


def _plugin_entry(kind: str, cls: type) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": _description(cls)}
    if kind == "feature":
        entry["params"] = params_schema(cls.Params)  # type: ignore[attr-defined]
        entry["models"] = {role: k.value for role, k in sorted(cls.roles.items())}  # type: ignore[attr-defined]
    else:
        entry["params"] = params_schema(cls)
    if kind == "postprocessing":
        entry["kinds"] = _postprocessing_kinds(cls)
    return entry


def build_contract() -> dict[str, Any]:
    """The contract of the plug-ins registered now (the CLI and the base image use this)."""
    from tilerunner.config import schema
    from tilerunner.plugins import FEATURES, POSTPROCESSING, PREPROCESSING
    from tilerunner.plugins.postprocessing import Kind
    from tilerunner.tissue import TissueParams

    plugins = {
        registry.kind: {name: _plugin_entry(registry.kind, cls) for name, cls in registry.items()}
        for registry in (PREPROCESSING, POSTPROCESSING, FEATURES)
    }
    return {
        "contract_version": CONTRACT_VERSION,
        "config_schema_versions": list(CONFIG_SCHEMA_VERSIONS),
        "config_schemas": {str(v): schema() for v in CONFIG_SCHEMA_VERSIONS},
        "plugins": plugins,
        "analysis_params": {
            "type": "object",
            "properties": {"tissue": params_schema(TissueParams)},
        },
        "model_files": {
            "mark": MODEL_FILE,
            "meaning": "a param (model params, or a preprocessing/postprocessing step's params) "
            "whose value is a path relative to its model's folder naming a file the runner "
            "loads: it stays inside that folder and is one of the model's files",
        },
        "prediction_kinds": {
            "model_output": {"rank 1-2": Kind.SCORES.value, "rank 3-4": Kind.MAPS.value},
            "all": [k.value for k in Kind],
        },
        "features": {
            "name": "a feature's `name`, default its `cls`; unique per analysis, case-insensitively",
            "models": "exactly the roles of its class, each naming a model of the same analysis",
            "depends_on": {
                "refers_to": "feature names of the same analysis",
                "self": False,
                "cycles": False,
                "effect": "the feature runs only on tiles its parents marked positive",
            },
        },
    }


def render(contract: Mapping[str, Any]) -> bytes:
    """Canonical bytes of the contract (sorted keys, ASCII, one trailing newline)."""
    return (json.dumps(contract, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


@cache
def contract_bytes() -> bytes:
    """The rendered contract of this runner."""
    return render(build_contract())


def contract_sha256() -> str:
    return hashlib.sha256(contract_bytes()).hexdigest()
