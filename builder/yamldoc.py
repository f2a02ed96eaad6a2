"""Strict YAML documents: safe parsing with line numbers, schema validation, stable output.

PyYAML alone accepts duplicate keys (the last one wins silently) and expands aliases without
limit; both are refused here, and every error names the file, the line and the key.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from builder.errors import ConfigError

#: Upper bound on the nodes a document may expand to through aliases ("billion laughs").
MAX_EXPANDED_NODES = 20_000

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Document:
    """A parsed YAML document and the line of every key, for error messages."""

    origin: str  # what to call the file in messages, e.g. "customers/customer-x/analysis.yaml"
    data: Any
    lines: Mapping[Path_, int]

    def line_of(self, path: Path_) -> int | None:
        """Line of the deepest known prefix of ``path`` (1-based)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def where(self, path: Path_) -> str:
        line = self.line_of(path)
        return f"{self.origin}:{line}" if line else self.origin


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Number of nodes the tree expands to when every alias is followed (memoised, linear)."""
    cached = memo.get(id(node))
    if cached is not None:
        return cached
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def _key_lines(node: yaml.Node, path: Path_, out: dict[Path_, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            out[child] = key_node.start_mark.line + 1
            _key_lines(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _key_lines(item, (*path, index), out)


def parse(text: str | bytes, origin: str) -> Document:
    """Parse one YAML document strictly; any problem becomes a one-line ``ConfigError``."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{origin}: the file is empty", hint="see `builder schema`")
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"{origin}:{node.start_mark.line + 1}: YAML aliases expand to more than "
                f"{MAX_EXPANDED_NODES} nodes; refusing (write the values out instead of aliasing)"
            )
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{origin}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    lines: dict[Path_, int] = {}
    _key_lines(node, (), lines)
    return Document(origin=origin, data=data, lines=lines)


@cache
def schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in ``builder/schemas`` (``customer``, ``analysis-short``, ...)."""
    names = schema_names()
    if name not in names:
        raise ConfigError(f"unknown schema {name!r}", hint=f"one of: {', '.join(names)}")
    text = resources.files("builder.schemas").joinpath(f"{name}.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def schema_names() -> list[str]:
    files = resources.files("builder.schemas").iterdir()
    suffix = ".schema.json"
    return sorted(f.name.removesuffix(suffix) for f in files if f.name.endswith(suffix))


def dotted(path: Path_) -> str:
    """``('analyses', 0, 'models')`` -> ``analyses[0].models``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError, doc: Document) -> str:
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema_ = error.schema if isinstance(error.schema, Mapping) else {}
        allowed = sorted(schema_.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)[0]
        guess = difflib.get_close_matches(extra, allowed, n=1)
        did_you_mean = (
            f" (did you mean {guess[0]!r}?)" if guess else f" (allowed: {', '.join(allowed)})"
        )
        return f"{doc.where((*path, extra))}: {dotted(path)}: unknown key {extra!r}{did_you_mean}"
    if error.validator == "required":
        return f"{doc.where(path)}: {dotted(path)}: {error.message}"
    if "propertyNames" in error.absolute_schema_path:
        name = error.instance
        return (
            f"{doc.where((*path, str(name)))}: {dotted(path)}: invalid name {name!r} "
            "(letters, digits, '_', '.', '-'; not starting with '.' or '-'; at most 64 characters)"
        )
    return f"{doc.where(path)}: {dotted(path)}: {error.message}"


def _errors(doc: Document, schema_name: str) -> Iterator[jsonschema.ValidationError]:
    validator = jsonschema.Draft202012Validator(schema(schema_name))
    return iter(
        sorted(
            validator.iter_errors(doc.data),
            key=lambda e: (len(e.absolute_path), str(e.absolute_path)),
        )
    )


def validate(doc: Document, schema_name: str) -> None:
    """Validate against a shipped schema; raise one ConfigError for the first (shallowest) error."""
    first = next(_errors(doc, schema_name), None)
    if first is None:
        return
    # The error deepest inside the shallowest failing branch is usually the one a person can fix.
    best = jsonschema.exceptions.best_match([first, *first.context]) if first.context else first
    raise ConfigError(_describe(best, doc))


def dump(data: Any) -> bytes:
    """Deterministic YAML: sorted keys, block style, UTF-8, no aliases."""

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text = yaml.dump(
        data,
        Dumper=_NoAliases,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )
    return text.encode("utf-8")


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, compact) for digests and in-image records."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )
