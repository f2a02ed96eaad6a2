"""The fleet file (customers/fleet.yaml): which customers a base release reaches.

Schema-checked, one line per error; base version constraints and what they admit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from builder import yamldoc
from builder.cook.load import _URL
from builder.errors import (
    ConfigError,
)
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
        return bool(_URL.match(self.location))


@dataclass(frozen=True)
class Fleet:
    path: Path
    entries: tuple[FleetEntry, ...]

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
        return Fleet(self.path, tuple(e for e in self.entries if e.name in wanted))

    def entry(self, name: str) -> FleetEntry:
        return self.select([name]).entries[0]


def default_fleet_path(settings: Settings) -> Path:
    return settings.customers / FLEET_FILE


def load_fleet(path: Path | None, settings: Settings) -> Fleet:
    """Read and validate the fleet file; relative folders are relative to the file."""
    path = (path or default_fleet_path(settings)).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the fleet file: {exc.strerror or exc}",
            hint="pass --fleet FILE (default: fleet.yaml in the customers folder)",
        ) from None
    doc = yamldoc.parse(raw, str(path))
    yamldoc.validate(doc, "fleet")
    entries: list[FleetEntry] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(doc.data["customers"]):
        where = doc.where(("customers", index, "name"))
        name = item["name"]
        if name in seen:
            raise ConfigError(f"{where}: customer {name!r} is listed twice (first at {seen[name]})")
        seen[name] = where
        repo = item["repo"].strip()
        if _URL.match(repo):
            if strip_credentials(repo) != repo:
                raise ConfigError(
                    f"{doc.where(('customers', index, 'repo'))}: the URL of {name!r} holds "
                    "credentials; remove them",
                    hint="CI supplies them from BUILDER_GIT_TOKEN or CI_JOB_TOKEN",
                )
            location = repo
        else:
            location = str((path.parent / Path(repo).expanduser()).resolve())
        entries.append(
            FleetEntry(
                name=name,
                repo=repo,
                location=location,
                ref=str(item.get("ref", "HEAD")).strip(),
                where=where,
            )
        )
    return Fleet(path=path, entries=tuple(entries))


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
