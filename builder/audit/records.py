"""Release records: what ``builder release-record`` committed on the releases branch."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import git

from builder.audit.text import pinned
from builder.contracts import RepoSource
from builder.documents.release_record import ReleaseRecord
from builder.gitauth import git_credentials
from builder.imagename import parse_name
from builder.record import ReleaseLog, record_remote
from builder.settings import Settings


def records_remote(source: RepoSource, settings: Settings) -> str:
    """Where the release records of an opened customer repository live: for a mirror in the
    cache, the URL it mirrors; else the repository's ``origin``, or the repository itself."""
    mirrors = (settings.cache_dir / "repos").resolve()
    if Path(source.root).resolve().is_relative_to(mirrors):
        with contextlib.suppress(AttributeError, ValueError):
            return str(git.Repo(source.root).remotes.origin.url)
    return record_remote(str(source.root))


def read_release_records(
    source: RepoSource, customer: str, settings: Settings
) -> tuple[list[ReleaseRecord], str]:
    """The customer's release records, oldest build first, and where they were read.

    Read with builder.record's reader from the ``ivd-releases`` branch of the repository that
    holds ``source`` (its ``origin`` when it has one), the branch ``builder release-record``
    writes; a malformed record is one ConfigError naming its file.
    """
    with git_credentials():
        log = ReleaseLog(records_remote(source, settings), settings.cache_dir)
        records = log.records(customer, log.fetch())
    return records, log.where


def find_release(records: Sequence[ReleaseRecord], text: str) -> ReleaseRecord | None:
    """The release a reviewer names: its image reference or tag (``2.5.0-1a2b3c4d5e6f``), its
    manifest digest, ``repository@digest``, or its record file; the newest build when a moving
    tag names several."""
    wanted = text.strip().removesuffix(".yaml")
    for record in reversed(records):
        named = (
            parse_name(r, base_version=record.base_version) for r in {record.image, *record.tags}
        )
        names = {
            record.image,
            record.manifest_digest,
            record.manifest_digest.removeprefix("sha256:"),
            pinned(record.image, record.manifest_digest),
            record.path.removesuffix(".yaml"),
            record.path.rpartition("/")[2].removesuffix(".yaml"),
            *record.tags,
            *(name.tag for name in named if name is not None),
        }
        if wanted in names:
            return record
    return None
