"""Who approved each configuration change, read from git alone.

A release's approval covers every change since the previous release. So a change (a commit
of the customer folder) is covered by an approval recorded on that commit or on a later one
up to the release that shipped it: ``Approved-by:`` / ``Reviewed-by:`` / ``Acked-by:``
trailers (git interpret-trailers form) on a revision, or on the merge commit that brought a
revision onto the branch, and that merge's merge request (``See merge request group/proj!7``,
the message GitLab writes). "Later" means a descendant in git: approving a state approves
everything it contains, never what came after it. A change no approval covers is flagged:
``unapproved`` once released, ``pending`` while not yet released.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import git

from builder.documents.release_record import ReleaseRecord

_TRAILER: Final = re.compile(r"^(Approved-by|Reviewed-by|Acked-by):[ \t]*(\S.*)$", re.M | re.I)
_MERGE_REQUEST: Final = re.compile(r"See merge request (?P<project>[\w./-]+)!(?P<number>\d+)")


@dataclass(frozen=True)
class Approval:
    """One approval trailer: who, and the commit whose message carries it."""

    kind: str  # Approved-by | Reviewed-by | Acked-by (as git trailers are usually spelled)
    who: str
    commit: str

    @property
    def text(self) -> str:
        """The approval as people read it, e.g. ``Approved-by: Jane Doe``."""
        return f"{self.kind}: {self.who}"


@dataclass(frozen=True)
class Review:
    """A revision's own review: trailers on it and on the merge commit that brought it in."""

    commit: str
    subject: str  # the commit message's first line
    approvals: tuple[Approval, ...]
    merge_commit: str | None
    merge_request: str | None  # "group/project!7"

    @property
    def approved(self) -> bool:
        """Whether the revision carries an approval trailer or came in by a merge request."""
        return bool(self.approvals or self.merge_request)


class ApprovalStatus(StrEnum):
    """How a configuration change is approved (see :class:`Coverage`)."""

    APPROVED = "approved"
    COVERED = "covered"
    UNAPPROVED = "unapproved"
    PENDING = "pending"


@dataclass(frozen=True)
class Coverage:
    """Which approvals cover one configuration change, and how.

    ``status``: ``approved`` (on the change itself or its merge), ``covered`` (by a later
    revision up to the release), ``unapproved`` (released, and nothing covers it) or
    ``pending`` (not released, and nothing covers it yet).
    """

    commit: str
    status: ApprovalStatus
    approvals: tuple[Approval, ...]
    merge_requests: tuple[str, ...]
    carriers: tuple[str, ...]  # the revisions whose review is counted (the change itself first)
    release: str | None  # the image whose release shipped this change first; None: unreleased
    #: For ``covered``: the later revision nearest to the change whose approval covers it.
    later: str | None = None
    later_subject: str = ""

    @property
    def covered(self) -> bool:
        """Whether an approval covers the change (on itself, its merge or a later revision)."""
        return self.status in (ApprovalStatus.APPROVED, ApprovalStatus.COVERED)

    @property
    def names(self) -> list[str]:
        """The approvals as people read them (``Approved-by: ...``), each once."""
        return list(dict.fromkeys(a.text for a in self.approvals))

    @property
    def sentence(self) -> str:
        """One line a reviewer reads: who approved, where it was recorded, or that nobody did."""
        names = "; ".join(self.names)
        requests = ", ".join(f"merge request {m}" for m in self.merge_requests)
        who = ", ".join(x for x in (names, requests) if x)
        shipped = f", released as {self.release}" if self.release else ""
        if self.status == ApprovalStatus.APPROVED:
            return f"approved: {who}{shipped}"
        if self.status == ApprovalStatus.COVERED:
            where = f'{(self.later or "")[:12]} "{self.later_subject}"'
            return f"covered by the approval on the later revision {where}: {who}{shipped}"
        if self.status == ApprovalStatus.UNAPPROVED:
            return f"NOT APPROVED: no approval covers this change{shipped}"
        return "not released yet; no approval recorded so far"


def reason(message: str) -> str:
    """A commit message as the reason for a change: without trailer and merge-request lines."""
    lines = [
        line
        for line in message.strip().splitlines()
        if not _TRAILER.match(line) and not _MERGE_REQUEST.search(line)
    ]
    return "\n".join(lines).strip()


def _trailers(message: str, commit: str) -> list[Approval]:
    return [
        Approval(m.group(1).capitalize(), m.group(2).strip(), commit)
        for m in _TRAILER.finditer(message)
    ]


def review_of(repo: git.Repo, sha: str, tip: str) -> Review:
    """The trailers of ``sha`` and of the merge commit that brought it onto ``tip``'s branch
    (the first merge on the ancestry path whose first parent does not already contain it)."""
    merge = None
    with contextlib.suppress(git.GitCommandError):
        for candidate in repo.git.rev_list(
            "--ancestry-path", "--merges", "--reverse", f"{sha}..{tip}"
        ).split():
            parents = repo.commit(candidate).parents
            if parents and not repo.is_ancestor(repo.commit(sha), parents[0]):
                merge = repo.commit(candidate)
                break
    approvals = _trailers(str(repo.commit(sha).message), sha)
    request = None
    if merge is not None:
        approvals += _trailers(str(merge.message), merge.hexsha)
        found = _MERGE_REQUEST.search(str(merge.message))
        request = f"{found['project']}!{found['number']}" if found else None
    message = str(repo.commit(sha).message).strip()
    return Review(
        commit=sha,
        subject=message.splitlines()[0] if message else "",
        approvals=tuple(dict.fromkeys(approvals)),
        merge_commit=merge.hexsha if merge is not None else None,
        merge_request=request,
    )


def revision_graph(repo: git.Repo, tips: Iterable[str], subdir: str) -> dict[str, tuple[str, ...]]:
    """Every revision of the folder reachable from ``tips`` and its parents among them (git's
    parent rewriting under path limiting), newest first."""
    args = ["--parents", "--topo-order", *tips]
    out = repo.git.rev_list(*args, *(["--", subdir] if subdir else []))
    graph: dict[str, tuple[str, ...]] = {}
    for line in out.splitlines():
        commit, *parents = line.split()
        graph[commit] = tuple(parents)
    return graph


def _reach(graph: Mapping[str, Sequence[str]], start: str) -> set[str]:
    """``start`` and its ancestors among the graph's revisions."""
    seen: set[str] = set()
    todo = [start] if start in graph else []
    while todo:
        commit = todo.pop()
        if commit not in seen:
            seen.add(commit)
            todo.extend(p for p in graph.get(commit, ()) if p in graph)
    return seen


def coverage(
    graph: Mapping[str, Sequence[str]],
    reviews: Mapping[str, Review],
    releases: Sequence[ReleaseRecord],
) -> dict[str, Coverage]:
    """For each revision of ``graph``, the approvals that cover it.

    ``releases`` oldest build first: a revision belongs to the first release that contains
    it; its approvals are the reviews of itself and of its descendants within that release's
    changes (or, while unreleased, among the unreleased revisions).
    """
    groups: list[tuple[ReleaseRecord | None, set[str]]] = []
    shipped: set[str] = set()
    for released in releases:
        reach = _reach(graph, released.config_commit) - shipped
        if reach:
            groups.append((released, reach))
            shipped |= reach
    groups.append((None, set(graph) - shipped))
    order = {c: i for i, c in enumerate(graph)}  # newest first
    out: dict[str, Coverage] = {}
    for record, members in groups:
        empty = Review("", "", (), None, None)
        carriers = [c for c in members if reviews.get(c, empty).approved]
        covers = {c: _reach(graph, c) & members for c in carriers}
        for commit in members:
            # the change itself first, then the later revisions nearest to it
            counted = sorted(
                (c for c in carriers if commit in covers[c]),
                key=lambda c: (c != commit, -order[c]),
            )
            approvals = tuple(dict.fromkeys(a for c in counted for a in reviews[c].approvals))
            requests = tuple(dict.fromkeys(r for c in counted if (r := reviews[c].merge_request)))
            later = next((c for c in counted if c != commit), None)
            if counted and counted[0] == commit:
                status = ApprovalStatus.APPROVED
            elif counted:
                status = ApprovalStatus.COVERED
            else:
                status = ApprovalStatus.UNAPPROVED if record else ApprovalStatus.PENDING
            out[commit] = Coverage(
                commit=commit,
                status=status,
                approvals=approvals,
                merge_requests=requests,
                carriers=tuple(counted),
                release=record.image if record is not None else None,
                later=later if status == ApprovalStatus.COVERED else None,
                later_subject=(
                    reviews[later].subject if later and status == ApprovalStatus.COVERED else ""
                ),
            )
    return out
