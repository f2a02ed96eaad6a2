"""How audit shows ids, digests and image repositories to people."""

from __future__ import annotations

from typing import Any


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
