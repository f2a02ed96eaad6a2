"""Release records: what ``builder release-record`` committed on the releases branch."""

from __future__ import annotations

from dataclasses import replace

from builder.documents.release_record import ReleaseRecord
from builder.gitauth import git_credentials
from builder.record import RELEASES_BRANCH, ReleaseLog, record_remote
from builder.settings import Settings


def read_release_records(
    location: str, customer: str, settings: Settings
) -> tuple[list[ReleaseRecord], str]:
    """The customer's release records, oldest build first, and where they were read.

    Read with builder.record's reader from the ``ivd-releases`` branch of the repository that
    holds ``location`` (its ``origin`` when it has one), the branch ``builder release-record``
    writes; a malformed record is one ConfigError naming its file.
    """
    with git_credentials():
        log = ReleaseLog(record_remote(location), settings.cache_dir)
        raw = log.records(customer, log.fetch())
    where = f"{log.shown} branch {RELEASES_BRANCH}"
    records = [
        replace(ReleaseRecord.from_dict(r, f"{where}: {r.get('_path')}"), path=str(r["_path"]))
        for r in raw
    ]
    return sorted(records, key=lambda r: (r.built_at, r.path)), where


# == resolved configuration of one revision ===================================================
