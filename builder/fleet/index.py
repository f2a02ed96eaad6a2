"""The plan index: what the last plan of a fleet learnt about each customer, kept in the cache
so that a re-plan reads and validates only the customers whose folder changed.

A customer's facts (its name, base constraint and variants, the state of its lock) are a
function of its folder at one config commit. They are kept under that commit and the folder's
source, in a file per fleet file whose name is a hash (nothing from outside data), stamped
with the builder's version and the schemas that validated them: another builder, or any
doubt about the file, means the customers are read again. The release records have their
own index, next to each release log (:meth:`builder.record.ReleaseLog.latest_by_image`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, fields
from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

from builder import __version__
from builder.errors import BuilderError
from builder.fsutil import write_atomic

#: Layout of the index and of what it keeps (bump on any change to either).
INDEX_VERSION: Final = 2
#: The folder of the cache holding the plan's files.
PLAN_CACHE: Final = "plan"


@cache
def fingerprint() -> str:
    """What the kept facts depend on besides the customer folder: the index layout, the
    builder version and the schemas the files were validated against."""
    digest = hashlib.sha256(f"{INDEX_VERSION}\0{__version__}".encode())
    schemas = resources.files("builder.schemas")
    for item in sorted(schemas.iterdir(), key=lambda entry: entry.name):
        if item.name.endswith(".json"):
            digest.update(item.name.encode() + b"\0" + item.read_bytes())
    return digest.hexdigest()


def cache_file(cache_dir: Path, kind: str, *parts: str) -> Path:
    """``<cache>/plan/<kind>-<sha256 of parts>.json``: a name made of a hash only."""
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
    return cache_dir / PLAN_CACHE / f"{kind}-{key}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object kept by :func:`write_json` with this builder's fingerprint (else None:
    absent, unreadable, or written by another builder)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint():
        return None
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Keep ``data`` (stamped with the fingerprint) atomically; a cache that cannot be
    written only costs the next run its speed."""
    with contextlib.suppress(OSError, BuilderError):
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {**data, "fingerprint": fingerprint()}
        write_atomic(path, json.dumps(body, sort_keys=True).encode(), durable=False)


class LockState(StrEnum):
    """Whether a customer's committed lock pins its config (from git alone)."""

    CURRENT = "current"
    MISSING = "missing"
    STALE = "stale"  # the config files changed since it was made
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class CustomerFacts:
    """What a plan needs of one customer folder at one config commit."""

    customer: str  # the name in customer.yaml
    constraint: str  # base_image.version
    base_repository: str | None  # base_image.repository
    variants: tuple[str, ...]
    commit: str
    lock: LockState
    lock_detail: str = ""  # why, when not current

    def to_dict(self) -> dict[str, Any]:
        """The facts as the index keeps them."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "variants": list(self.variants)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomerFacts:
        """The facts as :meth:`to_dict` wrote them (TypeError/KeyError for anything else)."""
        repository = data["base_repository"]
        facts = cls(
            customer=str(data["customer"]),
            constraint=str(data["constraint"]),
            base_repository=None if repository is None else str(repository),
            variants=tuple(str(v) for v in data["variants"]),
            commit=str(data["commit"]),
            lock=LockState(data["lock"]),
            lock_detail=str(data["lock_detail"]),
        )
        if not facts.variants:
            raise TypeError("no variants")
        return facts


class PlanIndex:
    """The customers' facts of one fleet file, by customer name, each under the key (source
    and config commit) it was read at. Only what the current plan used is written back."""

    def __init__(self, path: Path, kept: dict[str, tuple[str, CustomerFacts]]) -> None:
        self.path = path
        self._kept = kept
        self._used: dict[str, tuple[str, CustomerFacts]] = {}
        self._changed = False

    @classmethod
    def open(cls, cache_dir: Path, fleet_file: Path) -> PlanIndex:
        """The index kept for this fleet file in the cache (empty when none or unreadable)."""
        path = cache_file(cache_dir, "customers", str(fleet_file.resolve()))
        data = read_json(path) or {}
        kept: dict[str, tuple[str, CustomerFacts]] = {}
        for name, entry in (data.get("customers") or {}).items():
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                kept[str(name)] = (str(entry["key"]), CustomerFacts.from_dict(entry["facts"]))
        return cls(path, kept)

    def get(self, name: str, key: str) -> CustomerFacts | None:
        """The facts kept for customer ``name`` under ``key``, else None."""
        found = self._kept.get(name)
        if found is None or found[0] != key:
            return None
        self._used[name] = found
        return found[1]

    def put(self, name: str, key: str, facts: CustomerFacts) -> None:
        """Keep the facts read for customer ``name`` under ``key``, for the next plan."""
        self._used[name] = (key, facts)
        self._changed = True

    def save(self) -> None:
        """Write what this plan used, when it differs from what was kept."""
        if not self._changed and self._used.keys() == self._kept.keys():
            return
        customers = {
            name: {"key": key, "facts": facts.to_dict()}
            for name, (key, facts) in sorted(self._used.items())
        }
        write_json(self.path, {"customers": customers})
