"""How audit shows ids, digests, dates and image repositories to people, and reads an image's
base off its labels."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from builder.documents.provenance import Provenance


def short(value: Any, n: int = 8) -> str:
    """A short form of an id or digest for people (``sha256:`` dropped)."""
    text = str(value or "-")
    return text.removeprefix("sha256:")[:n]


def repository_of(image: str) -> str:
    """``host/repo`` of ``host/repo:tag`` or ``host/repo@sha256:...``."""
    head = image.partition("@")[0]
    repo, _, tag = head.rpartition(":")
    return repo if repo and "/" not in tag else head


def pinned(image: str, digest: str) -> str:
    """``host/repo@sha256:...``: the image a record names, by its digest rather than its tag."""
    return f"{repository_of(image)}@{digest}"


def human_date(value: Any) -> str:
    """``2026-05-28T20:26:40Z`` as ``28 May 2026, 20:26 UTC`` (the zone always said)."""
    text = str(value or "")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text or "unrecorded"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%-d %b %Y, %H:%M UTC")


def base_of(labels: Mapping[str, str], provenance: Provenance | None) -> dict[str, Any]:
    """The base image an image was built on: repository, version and digest from the labels
    (provenance.json records only the constraint, so a base bump leaves the config layer
    unchanged; older builders' records name the resolved base too), the constraint from
    provenance.json (None: no provenance read)."""
    recorded_repository, recorded_version, recorded_digest = (
        (provenance.base_repository, provenance.base_version, provenance.base_digest)
        if provenance
        else (None, None, None)
    )
    version = labels.get("com.ivd.base.version") or recorded_version
    name = labels.get("org.opencontainers.image.base.name", "")
    repository = name.removesuffix(f":{version}") if version else name.rpartition(":")[0]
    return {
        "repository": recorded_repository or repository or None,
        "version": version,
        "digest": labels.get("org.opencontainers.image.base.digest") or recorded_digest,
        "constraint": provenance.base_constraint if provenance else None,
    }
