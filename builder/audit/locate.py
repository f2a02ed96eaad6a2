"""Which customer, or which image, a reviewer means: from any folder, by name or by image.

A customer is named by a folder, a git URL (also the ``URL#folder`` form the tool prints), or
a bare name resolved where the settings point: the customers folder (setting ``customers``),
then the fleet file there, whose entries may be repositories of their own. An image is named
by a registry reference, an OCI layout or a docker archive. ``explain`` and ``verify`` take
either; a customer name stands for the image its newest release record names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from builder.audit.history import open_customer
from builder.audit.text import pinned, short
from builder.cook.load import CUSTOMER_FILE, is_repo_url
from builder.documents.release_record import ReleaseRecord
from builder.errors import BuilderError, ConfigError
from builder.fleet.fleetfile import default_fleet_path, load_fleet
from builder.image.contents import open_image
from builder.settings import Settings, user_settings_file

_CUSTOMER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Located:
    """Where a customer's configuration is, and how it was found."""

    location: str  # a folder or a git URL[#folder]: what open_source opens
    ref: str  # the branch its images are built from (the fleet file's ``ref``, else HEAD)
    via: str  # for people: "folder ...", "fleet file ...:LINE", "as given"


def is_customer(target: str) -> bool:
    """True if ``target`` names a customer (a name, a repository URL, a customer folder)
    rather than an image (a registry reference, an OCI layout, a docker archive)."""
    if is_repo_url(target):
        return "@sha256:" not in target  # ``name@sha256:...`` is an image, not an scp URL
    path = Path(target).expanduser()
    if path.exists():
        return path.is_dir() and (path / CUSTOMER_FILE).is_file()
    return bool(_CUSTOMER_NAME.fullmatch(target))


def locate_customer(target: str, settings: Settings) -> Located:
    """A customer name, folder or repository URL as a location to open.

    A bare name is looked up where the settings point: ``<customers>/<name>``, then the fleet
    file (``<customers>/fleet.yaml``), whose entry gives its repository and branch. Nothing
    depends on the working directory beyond the settings themselves (builder.toml found
    upward, else the user's own settings file, then BUILDER_* variables).
    """
    if is_repo_url(target) or Path(target).expanduser().exists():
        return Located(target, "HEAD", "as given")
    folder = settings.customers / target
    if folder.is_dir():
        return Located(str(folder), "HEAD", f"folder {folder}")
    fleet_path = default_fleet_path(settings)
    if fleet_path.is_file():
        fleet = load_fleet(fleet_path, settings)
        entry = next((e for e in fleet.entries if e.name == target), None)
        if entry is not None:
            return Located(entry.location, entry.ref, f"fleet file {entry.where}")
        listed = ", ".join(e.name for e in fleet.entries) or "none"
        looked = f"not in the fleet file {fleet_path} (listed: {listed})"
    else:
        looked = f"no fleet file {fleet_path}"
    raise ConfigError(
        f"customer {target!r} not found: no folder {folder}, and {looked} "
        f"(settings: {settings.origin})",
        hint=f"set BUILDER_CUSTOMERS to the customers folder (or customers = ... in "
        f"{user_settings_file()}), or give the repository URL or an image reference",
    )


def _at_or_before(built_at: str | None, at: str) -> bool:
    """True if a record's build time is at or before ``at`` (a date or an RFC 3339 time, UTC)."""
    if not built_at:
        return False
    limit = at if "T" in at else f"{at}T23:59:59Z"
    return built_at <= limit


def _moving_tag_note(
    record: ReleaseRecord, settings: Settings, insecure: bool | None
) -> tuple[str | None, str]:
    """Where the customer's moving ``<base version>`` tag points now, and a sentence about it."""
    repository, _, tag = record.image.rpartition(":")
    version = str(record.base.get("version") or tag.partition("-")[0])
    if not repository or "/" in tag or not version:
        return None, "registry not asked: the recorded image reference has no tag"
    moving = f"{repository}:{version}"
    try:
        now = open_image(moving, settings, insecure=insecure).manifest_digest
    except BuilderError as exc:
        return None, f"registry: {moving} not read ({exc.message})"
    if now == record.manifest_digest:
        return now, f"registry: {moving} points to this release"
    return now, f"registry: {moving} now points to {short(now, 19)}, not to this release"


def shipped_reference(
    customer: str,
    settings: Settings,
    *,
    base_version: str | None = None,
    at: str | None = None,
    insecure: bool | None = None,
) -> tuple[str, dict[str, Any]]:
    """The image a customer has been shipped: its newest release record (optionally of one base
    version line, or as of a date), as ``repository@digest``, and how it was chosen.

    Records are read from the customer repository's releases branch; the registry is asked
    where the moving ``<base version>`` tag points now, so a reviewer sees whether what the
    records say shipped is still what the site pulls.
    """
    located = locate_customer(customer, settings)
    opened = open_customer(located.location, settings)
    records, where = opened.records, opened.records_where
    chosen = [
        r
        for r in records
        if (
            base_version is None
            or str(r.base.get("version")) == base_version
            or str(r.base.get("version")).startswith(f"{base_version}.")
        )
        and (at is None or _at_or_before(r.built_at, at))
    ]
    if not chosen:
        limits = "".join(
            [f" for base {base_version}" if base_version else "", f" built by {at}" if at else ""]
        )
        raise ConfigError(
            f"customer {opened.name}: no release record{limits} on {where} "
            f"({len(records)} records in all)",
            hint="explain an image by its reference (host/repo:tag or @sha256:...) instead",
        )
    record = chosen[-1]
    reference = pinned(record.image, record.manifest_digest)
    now, note = _moving_tag_note(record, settings, insecure)
    return reference, {
        "customer": opened.name,
        "found": located.via,
        "record": record.path,
        "records_where": where,
        "release_image": record.image,
        "built_at": record.built_at,
        "base_version": record.base.get("version"),
        "records_considered": len(chosen),
        "records_total": len(records),
        "moving_tag_digest": now,
        "registry_note": note,
    }


def image_target(
    target: str,
    settings: Settings,
    *,
    base_version: str | None = None,
    at: str | None = None,
    insecure: bool | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """An image reference as given, or the image a customer (by name, folder or repository
    URL) was shipped, with how it was chosen."""
    if not is_customer(target):
        if base_version or at:
            raise ConfigError("--base-version and --at go with a customer name, not an image")
        return target, None
    return shipped_reference(target, settings, base_version=base_version, at=at, insecure=insecure)
