"""Strict YAML documents: safe parsing with line numbers, schema validation, stable output.

PyYAML alone accepts duplicate keys (the last one wins silently) and expands aliases without
limit; both are refused here, and every error names the file, the line and the key.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

import jsonschema
import yaml

from builder.errors import ConfigError

#: Largest YAML input read at all, checked before parsing (configs and locks are kilobytes).
MAX_DOCUMENT_BYTES = 1 << 20
#: Upper bound on the nodes aliases ADD when expanded ("billion laughs"); the document's own
#: nodes are bounded by MAX_DOCUMENT_BYTES and do not count here.
MAX_EXPANDED_NODES = 20_000
#: Deepest nesting of lists and mappings (aliases followed); deeper input is refused before any
#: recursive step (composition, construction, schema validation) could exhaust the stack.
MAX_DEPTH = 100
#: Longest integer literal, in digits (Python refuses to convert beyond 4,300 anyway).
MAX_INT_DIGITS = 100

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
        """``file:line`` of the value at ``path``, or the file alone when the line is unknown."""
        line = self.line_of(path)
        return f"{self.origin}:{line}" if line else self.origin


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, deep nesting and huge integers."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self.current: yaml.Node | None = None  # the node being constructed (for messages)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        self.current = node
        return super().construct_object(node, deep=deep)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # PyYAML composes recursively: bound the depth before Python's stack is exhausted.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"lists/mappings nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a list or mapping cannot be a key", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(ch.isalnum() for ch in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"integer with {digits} digits; at most {MAX_INT_DIGITS} are allowed",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


class _LimitError(Exception):
    """A document that is valid YAML but exceeds one of the limits above."""

    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.node = node


def _check_expansion(root: yaml.Node) -> None:
    """Refuse recursive aliases, and trees that aliases make too big or too deep.

    Iterative and memoised (linear in the distinct nodes), so a hostile document cannot make
    this check itself slow or recurse. Raises ``_LimitError`` naming the limit hit."""
    size: dict[int, int] = {}  # expanded node count of each finished node
    depth: dict[int, int] = {}  # expanded depth of each finished node
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[key] > MAX_DEPTH:
                raise _LimitError(
                    f"aliases nest lists/mappings deeper than {MAX_DEPTH} levels", node
                )
            continue
        if key in size:
            continue
        if key in on_path:
            raise _LimitError("recursive alias (a node that contains itself)", node)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)
    distinct = len(size)
    added = size[id(root)] - distinct
    if added > MAX_EXPANDED_NODES:
        raise _LimitError(
            f"YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes ({added} added by "
            "aliases; the alias-expansion limit); write the values out instead of aliasing",
            root,
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


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


def check_size(size: int, origin: str) -> None:
    """Refuse a YAML input over MAX_DOCUMENT_BYTES (callers check before even reading it)."""
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigError(
            f"{origin}: {size} bytes, over the size limit of {MAX_DOCUMENT_BYTES} bytes for a "
            "YAML file; refusing to parse it",
            hint="is this the right file?",
        )


def _decode(text: str | bytes, origin: str) -> str:
    """The document as text; size checked first, then NUL bytes and UTF-8."""
    check_size(
        len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text), origin
    )
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ConfigError(
            f"{origin}: a NUL byte at offset {nul}: this is a binary file, not YAML",
            hint="is this the right file?",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{origin}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            hint="save the file as UTF-8",
        ) from None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def parse(text: str | bytes, origin: str) -> Document:
    """Parse one YAML document strictly; any problem becomes a one-line ``ConfigError``.

    Limits, each named in its message: the input size (checked first), the nesting depth, the
    nodes added by aliases (counted apart from the document's own), the digits of an integer."""
    decoded = _decode(text, origin)
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(decoded)  # PyYAML checks the characters here
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{origin}: the file is empty", hint="see `builder schema`")
        _check_expansion(node)
        data = _construct(loader, node, origin)
    except _LimitError as exc:
        raise ConfigError(f"{origin}:{exc.node.start_mark.line + 1}: {exc}; refusing") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = _one_line(exc.problem or exc.context)
        raise ConfigError(f"{origin}{line}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            f"{origin}: invalid YAML: character #x{exc.character:04x} at offset {exc.position} "
            "is not allowed in YAML",
            hint="is this a text file?",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {_one_line(exc)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[Path_, int] = {}
    _key_lines(node, (), lines)
    doc = Document(origin=origin, data=data, lines=lines)
    check_json_model(doc)
    return doc


def _construct(loader: _StrictLoader, node: yaml.Node, origin: str) -> Any:
    """The document's Python data; a scalar PyYAML recognises by its tag but cannot convert
    (``!!int ""``, ``!!timestamp x``, a date like 2024-13-45) is bad input, not a bug."""
    try:
        return loader.construct_document(node)
    except yaml.YAMLError:
        raise
    except Exception as exc:  # PyYAML's scalar constructors raise anything (IndexError, ...)
        bad = loader.current or node
        tag = str(bad.tag).rsplit(":", 1)[-1]
        value = _one_line(bad.value)[:40] if isinstance(bad, yaml.ScalarNode) else ""
        why = _one_line(exc)[:120] if isinstance(exc, ValueError) else type(exc).__name__
        raise ConfigError(
            f"{origin}:{bad.start_mark.line + 1}: invalid YAML value: !!{tag} {value!r} "
            f"cannot be read ({why})",
            hint="quote the value to make it a string, or fix it",
        ) from None


#: What YAML can hold beyond JSON's data model, as people would call it.
_NOT_JSON: Final = (
    (bool, ""),  # a JSON value (checked first: bool is an int)
    (datetime.datetime, "a timestamp"),
    (datetime.date, "a date"),
    (bytes, "binary data (!!binary)"),
    (set, "a set (!!set)"),
    (tuple, "a pair (!!omap/!!pairs)"),
)


_JSON_ONLY: Final = "strings, numbers, booleans, null, lists and mappings only"


def _not_json(value: Any) -> str | None:
    """Why ``value`` (one node, not its children) is outside JSON's data model, else None."""
    for kind, name in _NOT_JSON:
        if isinstance(value, kind):
            return name or None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (not a finite number)"
    if value is None or isinstance(value, str | int | float | list | dict):
        return None
    return f"a {type(value).__name__}"


def json_model_problem(data: Any) -> tuple[Path_, str] | None:
    """The first place where ``data`` leaves JSON's data model, and why: keys that are not
    strings or hold control characters, dates, sets, binary, NaN/Infinity. Every document the
    builder reads is JSON-shaped (its schemas are JSON Schema); YAML alone can say more."""
    stack: list[tuple[Any, Path_]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        why = _not_json(value)
        if why is not None:
            return path, f"{why} is not allowed here ({_JSON_ONLY}); quote it to make it a string"
        if isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return path, f"key {key!r} is not a string; quote it"
                if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
                    return path, f"key {key!r} holds a control character"
                stack.append((item, (*path, key)))
    return None


def check_json_model(doc: Document) -> None:
    """Refuse ``doc`` in one line (file:line: key: why) where it leaves JSON's data model."""
    found = json_model_problem(doc.data)
    if found is not None:
        path, why = found
        raise ConfigError(f"{doc.where(path)}: {dotted(path)}: {why}")


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
    """The names of the JSON schemas shipped in builder/schemas, sorted."""
    files = resources.files("builder.schemas").iterdir()
    suffix = ".schema.json"
    return sorted(f.name.removesuffix(suffix) for f in files if f.name.endswith(suffix))


def dotted(path: Path_) -> str:
    """``('analyses', 0, 'models')`` -> ``analyses[0].models``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError, doc: Document) -> list[str]:
    """The lines of one schema error: one per unknown key, else one."""
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema_ = error.schema if isinstance(error.schema, Mapping) else {}
        allowed = sorted(schema_.get("properties", {}))
        lines = []
        for extra in sorted(str(k) for k in error.instance if k not in allowed):
            guess = difflib.get_close_matches(extra, allowed, n=1)
            did_you_mean = (
                f" (did you mean {guess[0]!r}?)" if guess else f" (allowed: {', '.join(allowed)})"
            )
            lines.append(
                f"{doc.where((*path, extra))}: {dotted(path)}: unknown key {extra!r}{did_you_mean}"
            )
        return lines
    if error.validator == "required":
        return [f"{doc.where(path)}: {dotted(path)}: {error.message}"]
    if "propertyNames" in error.absolute_schema_path:
        name = error.instance
        return [
            f"{doc.where((*path, str(name)))}: {dotted(path)}: invalid name {repr(name)[:80]} "
            "(letters, digits, '_', '.', '-'; not starting with '.' or '-'; at most 64 characters)"
        ]
    return [f"{doc.where(path)}: {dotted(path)}: {_short_message(error)}"]


_JSON_TYPES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _short_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message without the offending value written out whole: that value can be
    a whole file (a link to /etc/passwd read as YAML) or a huge string."""
    if error.validator == "type":
        kind = _JSON_TYPES.get(type(error.instance), type(error.instance).__name__)
        return f"{kind} is not of type {error.validator_value!r}"
    message = _one_line(error.message)
    return message if len(message) <= 200 else f"{message[:197]}..."


def _errors(doc: Document, schema_name: str) -> Iterator[jsonschema.ValidationError]:
    validator = jsonschema.Draft202012Validator(schema(schema_name))
    return iter(
        sorted(
            validator.iter_errors(doc.data),
            key=lambda e: (len(e.absolute_path), str(e.absolute_path)),
        )
    )


def schema_problems(doc: Document, schema_name: str) -> list[str]:
    """Every way ``doc`` breaks a shipped schema, one line each (file:line: key: what), in
    line order: a person fixes them all in one go."""
    out: list[str] = []
    for error in _errors(doc, schema_name):
        # The error deepest inside a failing branch is usually the one a person can fix.
        best = jsonschema.exceptions.best_match([error, *error.context]) if error.context else error
        out.extend(line for line in _describe(best, doc) if line not in out)
    return in_file_order(out)


def validate(doc: Document, schema_name: str) -> None:
    """Validate against a shipped schema; raise one ConfigError listing every error."""
    problems = schema_problems(doc, schema_name)
    if problems:
        raise problems_error(problems)


_POSITION = re.compile(r"(?P<file>.+?):(?P<line>[0-9]+): ", re.DOTALL)


def in_file_order(problems: Iterable[str]) -> list[str]:
    """Problems written ``file:line: ...`` sorted by file, then line (a problem without a line
    comes first in its file; the same line keeps the order found)."""

    def key(text: str) -> tuple[str, int]:
        found = _POSITION.match(text)
        return (found["file"], int(found["line"])) if found else (text.split(": ", 1)[0], 0)

    return sorted(problems, key=key)


def problems_error(problems: Sequence[str], *, hint: str | None = None) -> ConfigError:
    """One ConfigError listing every problem (none summarised away), counted when several."""
    more = f" [{len(problems)} problems]" if len(problems) > 1 else ""
    return ConfigError("; ".join(problems) + more, hint=hint)


def validate_data(data: Any, schema_name: str, origin: str) -> None:
    """Validate data that did not come from a YAML file (JSON, a registry's answer) the same
    way; the message names ``origin`` and the key."""
    doc = Document(origin=origin, data=data, lines={})
    check_json_model(doc)
    validate(doc, schema_name)


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
