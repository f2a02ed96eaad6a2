"""Release records: what ``builder release-record`` committed on the releases branch."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from builder.errors import ConfigError

if TYPE_CHECKING:
    from builder.settings import Settings

_HEX40: Final = re.compile(r"^[0-9a-f]{40}$")
_DIGEST: Final = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ReleaseRecord:
    """One released image, as ``builder release-record`` committed it on the releases branch."""

    path: str  # releases/<customer>/<base version>-<config rev>.yaml on that branch
    customer: str
    config_commit: str
    image: str
    manifest_digest: str
    base: Mapping[str, Any]  # repository, version, digest
    models: Sequence[Mapping[str, Any]]
    built_at: str | None
    ci_url: str | None


def _release_from(data: Mapping[str, Any], where: str) -> ReleaseRecord:
    """Check one record as builder.fleet.release_record writes it (record_version 1).

    The layout was still settling when this was written; both the flat form (``image``,
    ``manifest_digest``, ``ci_url``) and the nested one (``image: {reference, digest}``,
    ``ci: {job_url}``) are read.
    """
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    image = data.get("image")
    nested = image if isinstance(image, dict) else {}
    ci = data.get("ci") if isinstance(data.get("ci"), dict) else {}
    assert isinstance(config, dict) and isinstance(ci, dict)
    commit = str(config.get("commit") or data.get("config_commit") or "")
    digest = str(data.get("manifest_digest") or nested.get("digest") or "")
    reference = str(nested.get("reference") or (image if isinstance(image, str) else ""))
    for key, value, ok in (
        ("config.commit", commit, bool(_HEX40.match(commit))),
        ("manifest_digest", digest, bool(_DIGEST.match(digest))),
        ("image", reference, bool(reference)),
    ):
        if not ok:
            raise ConfigError(
                f"{where}: {key} {value!r} is missing or malformed",
                hint="release records are append-only: add a corrected record, do not edit",
            )
    base = data.get("base_image")
    models = data.get("models")
    ci_url = data.get("ci_url") or ci.get("job_url")
    return ReleaseRecord(
        path=str(data.get("_path", "")),
        customer=str(data.get("customer") or ""),
        config_commit=commit,
        image=reference,
        manifest_digest=digest,
        base=dict(base) if isinstance(base, dict) else {},
        models=[dict(m) for m in models if isinstance(m, dict)] if isinstance(models, list) else [],
        built_at=str(data["built_at"]) if data.get("built_at") else None,
        ci_url=str(ci_url) if ci_url else None,
    )


def read_release_records(
    location: str, customer: str, settings: Settings
) -> tuple[list[ReleaseRecord], str]:
    """The customer's release records, oldest build first, and where they were read.

    Read with builder.fleet's reader from the ``ivd-releases`` branch of the repository that
    holds ``location`` (its ``origin`` when it has one), the branch ``builder release-record``
    writes; a malformed record is one ConfigError naming its file.
    """
    from builder.fleet import RELEASES_BRANCH, ReleaseLog, record_remote
    from builder.gitauth import git_credentials

    with git_credentials():
        log = ReleaseLog(record_remote(location), settings.cache_dir)
        raw = log.records(customer, log.fetch())
    where = f"{log.shown} branch {RELEASES_BRANCH}"
    records = [_release_from(r, f"{where}: {r.get('_path')}") for r in raw]
    return sorted(records, key=lambda r: (r.built_at or "", r.path)), where


# == resolved configuration of one revision ===================================================
