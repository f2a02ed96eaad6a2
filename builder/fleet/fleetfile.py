"""The fleet file (customers/fleet.yaml): which customers a base release reaches.

Schema-checked, one line per error; base version constraints and what they admit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from builder import yamldoc
from builder.cook.load import is_repo_url
from builder.errors import (
    ConfigError,
)
from builder.fleet.index import cache_file, read_json, write_json
from builder.redact import strip_credentials
from builder.settings import Settings

FLEET_FILE: Final = "fleet.yaml"
FLEET_VERSION: Final = 1


# -- the fleet file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetEntry:
    """One customer of the fleet."""

    name: str
    repo: str  # as written in the fleet file, credentials removed
    location: str  # what the load stage opens: a git URL or an absolute folder
    ref: str
    where: str  # "fleet.yaml:LINE", for messages

    @property
    def is_url(self) -> bool:
        """Whether the customer's repository is a git URL rather than a local folder."""
        return is_repo_url(self.location)


@dataclass(frozen=True)
class Fleet:
    """A fleet file read: its entries (maybe a selection) and every folder and name it covers."""

    path: Path
    entries: tuple[FleetEntry, ...]
    # Every local customer folder (absolute) and every name the file lists, also when
    # ``entries`` is a selection: what the file covers.
    folders: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()

    def select(self, names: Sequence[str]) -> Fleet:
        """The named customers only (all when ``names`` is empty); an unknown name is an error."""
        if not names:
            return self
        known = {entry.name: entry for entry in self.entries}
        for name in names:
            if name not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise ConfigError(
                    f"customer {name!r} is not in the fleet file {self.path} (listed: {listed})",
                    hint="add it to the fleet file, or fix the name",
                )
        wanted = set(names)
        chosen = tuple(e for e in self.entries if e.name in wanted)
        return Fleet(self.path, chosen, self.folders, self.names)

    def entry(self, name: str) -> FleetEntry:
        """The entry of customer ``name`` (ConfigError when the file has none)."""
        return self.select([name]).entries[0]


def default_fleet_path(settings: Settings) -> Path:
    """The fleet file used when none is named: the one in the customers folder."""
    return settings.customers / FLEET_FILE


def load_fleet(path: Path | None, settings: Settings) -> Fleet:
    """Read and validate the fleet file; relative folders are relative to the file.

    What a file's bytes say is kept in the cache under their hash, so an unchanged fleet file
    of thousands of customers is not parsed and validated again; folders are resolved anew.
    """
    path = (path or default_fleet_path(settings)).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the fleet file: {exc.strerror or exc}",
            hint="pass --fleet FILE (default: fleet.yaml in the customers folder)",
        ) from None
    kept = cache_file(settings.cache_dir, "fleet", str(path), hashlib.sha256(raw).hexdigest())
    rows = _kept_rows(kept)
    if rows is None:
        rows = _parse_rows(raw, path)
        write_json(kept, {"rows": [list(row) for row in rows]})
    parents: dict[str, str] = {}
    entries = tuple(_entry(path, *row, parents=parents) for row in rows)
    folders = frozenset(e.location for e in entries if not e.is_url)
    names = frozenset(e.name for e in entries)
    return Fleet(path=path, entries=entries, folders=folders, names=names)


def _kept_rows(kept: Path) -> list[tuple[str, str, str, str]] | None:
    data = read_json(kept)
    try:
        return [(str(n), str(r), str(f), str(w)) for n, r, f, w in (data or {})["rows"]]
    except (KeyError, TypeError, ValueError):
        return None


def _parse_rows(raw: bytes, path: Path) -> list[tuple[str, str, str, str]]:
    """(name, repo, ref, where) of each entry, schema-checked, one line per error."""
    doc = yamldoc.parse(raw, str(path))
    yamldoc.validate(doc, "fleet")
    rows: list[tuple[str, str, str, str]] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(doc.data["customers"]):
        where = doc.where(("customers", index, "name"))
        name = item["name"]
        if name in seen:
            raise ConfigError(f"{where}: customer {name!r} is listed twice (first at {seen[name]})")
        seen[name] = where
        repo = item["repo"].strip()
        if is_repo_url(repo) and strip_credentials(repo) != repo:
            raise ConfigError(
                f"{doc.where(('customers', index, 'repo'))}: the URL of {name!r} holds "
                "credentials; remove them",
                hint="CI supplies them from BUILDER_GIT_TOKEN or CI_JOB_TOKEN",
            )
        rows.append((name, repo, str(item.get("ref", "HEAD")).strip(), where))
    return rows


def _entry(
    path: Path, name: str, repo: str, ref: str, where: str, *, parents: dict[str, str]
) -> FleetEntry:
    location = repo if is_repo_url(repo) else _resolved(path.parent / repo, parents)
    return FleetEntry(name=name, repo=repo, location=location, ref=ref, where=where)


def _resolved(path: Path, parents: dict[str, str]) -> str:
    """``path.resolve()``, each parent folder resolved once for all its customers (kept in
    ``parents``): thousands of ``customers/<name>`` cost one lookup each, not one per part.
    Plain ``os.path`` on strings: pathlib's parsing is the very cost avoided here."""
    if ".." in path.parts or path.name in ("", "."):  # "..": a link's target decides
        return str(path.expanduser().resolve())
    text = os.path.abspath(os.path.expanduser(path))  # noqa: PTH100, PTH111
    head, name = os.path.split(text)
    if head not in parents:
        parents[head] = os.path.realpath(head)
    candidate = os.path.join(parents[head], name)  # noqa: PTH118
    return os.path.realpath(candidate) if os.path.islink(candidate) else candidate  # noqa: PTH114


# -- versions -----------------------------------------------------------------------------------


def parse_release_version(text: str) -> Version:
    """The released base version (exact, not a constraint)."""
    try:
        return Version(text.strip())
    except InvalidVersion:
        raise ConfigError(
            f"base version {text!r} is not a version like 2.5.0",
            hint="give the released base image version, not a constraint",
        ) from None


@cache
def admits(constraint: str, version: Version) -> bool:
    """Whether a customer's pinned base (``2.4.1``, ``~=2.4``, ``>=2.4,<3``) admits ``version``,
    by the same rules the build uses to pick a base (pre-releases only when pinned exactly)."""
    spec = constraint.strip()
    if spec[:1].isdigit() or spec.startswith("v"):
        try:
            return Version(spec) == version
        except InvalidVersion:
            raise ConfigError(f"invalid base image version {constraint!r}") from None
    try:
        specifiers = SpecifierSet(spec)
    except InvalidSpecifier:
        raise ConfigError(
            f"invalid base image version constraint {constraint!r}",
            hint="use an exact version such as 2.4.1 or a PEP 440 specifier such as ~=2.4",
        ) from None
    exact = len(specifiers) == 1 and next(iter(specifiers)).operator in ("==", "===")
    return specifiers.contains(version, prereleases=exact)
