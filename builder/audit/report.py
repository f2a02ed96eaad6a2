"""The audit report of a customer: history, lineage, releases and their review, as HTML."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

import git
import jinja2

from builder import __version__
from builder.audit.explain import read_attestations
from builder.audit.history import Change, History, HistoryEntry, diff_configs, find_commit, history
from builder.audit.text import pinned, repository_of, short
from builder.audit.verify import verify
from builder.cook.load import open_source
from builder.documents.release_record import ReleaseRecord
from builder.errors import BuilderError
from builder.fsutil import write_atomic
from builder.oci import RegistryClient, parse_reference
from builder.oci.image import open_image
from builder.settings import Settings


def lineage(entries: Sequence[HistoryEntry]) -> dict[str, list[dict[str, Any]]]:
    """Per model name, the spans of revisions during which one model (id, task, weights) was used."""
    spans: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry.config is None:
            continue
        for name, model in entry.config.models.items():
            key = (
                model.get("model_id"),
                model.get("task_id"),
                json.dumps(model.get("weights"), sort_keys=True),
            )
            runs = spans.setdefault(name, [])
            if runs and runs[-1]["key"] == key and runs[-1]["open"]:
                runs[-1]["last"] = entry.revision
            else:
                if runs:
                    runs[-1]["open"] = False
                runs.append(
                    {
                        "key": key,
                        "open": True,
                        "first": entry.revision,
                        "last": entry.revision,
                        "model": model,
                        "releases": [],
                    }
                )
            runs[-1]["releases"] += [r.image for r in entry.releases]
        for name, runs in spans.items():
            if name not in entry.config.models and runs and runs[-1]["open"]:
                runs[-1]["open"] = False
    return {
        name: [
            {
                "model_id": r["model"].get("model_id"),
                "registry_name": r["model"].get("registry_name"),
                "task_id": r["model"].get("task_id"),
                "sourcing": r["model"].get("sourcing"),
                "weights": r["model"].get("weights") or {},
                "from_commit": r["first"].commit,
                "from_date": r["first"].date,
                "to_commit": r["last"].commit,
                "to_date": r["last"].date,
                "current": r["open"],
                "releases": r["releases"],
            }
            for r in runs
        ]
        for name, runs in sorted(spans.items())
    }


def release_diffs(hist: History) -> list[dict[str, Any]]:
    """What changed between consecutive releases (config changes plus the base actually used)."""
    configs = {e.revision.commit: e.config for e in hist.entries if e.config is not None}
    out = []
    for old, new in zip(hist.releases, hist.releases[1:], strict=False):
        a, b = configs.get(old.config_commit), configs.get(new.config_commit)
        changes = [c for c in diff_configs(a, b) if c.kind != "base"] if a and b else []
        if a is None or b is None:
            changes.append(
                Change(
                    "note",
                    "config",
                    "configuration not comparable: a config commit is not in the history",
                )
            )
        va, vb = old.base.get("version"), new.base.get("version")
        if va != vb:
            changes.append(
                Change(
                    "base",
                    "base",
                    f"base {va} -> {vb}",
                    va,
                    vb,
                    lead="base",
                    was=str(va),
                    now=str(vb),
                )
            )
        elif old.base.get("digest") != new.base.get("digest"):
            da, db = old.base.get("digest"), new.base.get("digest")
            changes.append(
                Change(
                    "base",
                    "base",
                    f"base {va} re-pinned {short(da, 12)} -> {short(db, 12)}",
                    da,
                    db,
                )
            )
        out.append({"from": old, "to": new, "changes": changes})
    return out


# -- what a reviewer signs off on: approvals, links, signatures, tags without a record -------

_TRAILER: Final = re.compile(r"^(Approved-by|Reviewed-by|Acked-by):[ \t]*(\S.*)$", re.M | re.I)
_MERGE_REQUEST: Final = re.compile(r"See merge request (?P<project>[\w./-]+)!(?P<number>\d+)")


def web_base(repository: str) -> str | None:
    """The web address of a recorded https repository (commit and merge request links), or None
    for a repository that has none (a local path, SSH only)."""
    base = repository.partition("#")[0]
    return base if base.startswith("https://") else None


def repository_shown(repository: str) -> str:
    """A repository as a reviewer reads it: its web address, or its name for a local one (a
    local file path means nothing on the reviewer's machine)."""
    base, _, folder = repository.partition("#")
    if base.startswith("https://"):
        return repository
    name = PurePosixPath(base.split("://", 1)[-1]).name or base
    return f"{name} (local repository){f', folder {folder}' if folder else ''}"


def _review_of(repo: git.Repo, sha: str, tip: str) -> dict[str, Any]:
    """Who approved a revision: trailers on the commit and on the merge commit that brought it
    onto the reviewed branch, and that merge's merge request (GitLab's merge message)."""
    merge = None
    with contextlib.suppress(git.GitCommandError):
        for candidate in repo.git.rev_list(
            "--ancestry-path", "--merges", "--reverse", f"{sha}..{tip}"
        ).split():
            parents = repo.commit(candidate).parents
            if parents and not repo.is_ancestor(repo.commit(sha), parents[0]):
                merge = repo.commit(candidate)
                break
    messages = [str(repo.commit(sha).message)] + ([str(merge.message)] if merge else [])
    approvals = sorted(
        {
            f"{m.group(1).title()}: {m.group(2).strip()}"
            for text in messages
            for m in _TRAILER.finditer(text)
        }
    )
    request = _MERGE_REQUEST.search(str(merge.message)) if merge is not None else None
    return {
        "approvals": approvals,
        "merge_commit": merge.hexsha if merge is not None else None,
        "merge_request": f"{request['project']}!{request['number']}" if request else None,
        "merge_request_number": int(request["number"]) if request else None,
    }


def _release_status(record: ReleaseRecord, settings: Settings) -> dict[str, Any]:
    """Signature state of a released image, read from the registry (no file hashing)."""
    reference = pinned(record.image, record.manifest_digest)
    try:
        image = open_image(reference, settings)
        descriptors, where = image.referrers()
        attested = read_attestations(image, descriptors, None)
    except BuilderError as exc:
        return {"reachable": False, "signed": None, "signed_by": [], "note": exc.message}
    signed = [a for a in attested.infos if a.kind == "provenance" and a.signed]
    return {
        "reachable": True,
        "signed": bool(signed),
        "signed_by": sorted({a.key_id or "?" for a in signed}),
        "note": f"{len(attested.infos)} attestation(s) ({where})",
    }


def _verify_status(record: ReleaseRecord, settings: Settings) -> dict[str, Any]:
    """``verify`` of a released image: MATCH, MISMATCH with the first differences, or why
    not; the detail is one line that names no path of this machine's cache."""
    reference = pinned(record.image, record.manifest_digest)
    try:
        result = verify(reference, settings)
    except BuilderError as exc:
        return {"state": "not verified", "detail": _one_line(exc.message, settings)}
    if result.match:
        return {"state": "MATCH", "detail": f"rebuilt {short(result.rebuilt_digest, 19)}"}
    return {
        "state": "MISMATCH",
        "detail": _one_line("; ".join(result.differences[:3]), settings),
    }


def _one_line(text: str, settings: Settings) -> str:
    """``text`` on one line, this machine's cache folder named as "the cache"."""
    cache = str(settings.cache_dir)
    return " ".join(text.replace(f"{cache}/", "").replace(cache, "the cache").split())


def unrecorded_tags(
    customer: str, records: Sequence[ReleaseRecord], settings: Settings
) -> tuple[list[dict[str, str]], list[str]]:
    """Tags in the customer's image repositories whose image no release record names (pushed
    outside a release: a development build, a manual push), and what could not be read."""
    repositories = {repository_of(r.image) for r in records} or {
        f"{settings.image_registry}/{customer}"
    }
    recorded = {r.manifest_digest for r in records}
    found: list[dict[str, str]] = []
    problems: list[str] = []
    for repository in sorted(repositories):
        try:
            ref = parse_reference(f"{repository}:latest")
            client = RegistryClient(ref.registry)
            for tag in sorted(client.list_tags(ref.path)):
                if re.fullmatch(r"sha256-[0-9a-f]{64}(\..*)?", tag):
                    continue  # an attestation attached by the referrers tag schema
                digest = client.manifest_digest(ref.path, tag)
                if digest and digest not in recorded:
                    found.append({"image": f"{repository}:{tag}", "digest": digest})
        except BuilderError as exc:
            problems.append(f"tags of {repository} not listed: {exc.message}")
    return found, problems


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


def _ref_shown(location: str, ref: str, settings: Settings) -> str:
    """The reviewed ref in words: ``HEAD`` becomes the branch name (or the commit)."""
    if ref != "HEAD":
        return ref
    source = open_source(location, settings)
    repo = git.Repo(source.root)
    if not repo.head.is_detached:
        return f"branch {repo.active_branch.name}"
    return f"commit {repo.head.commit.hexsha[:12]}"


def report_data(
    location: str, settings: Settings, *, ref: str = "HEAD", verify_releases: bool = False
) -> dict[str, Any]:
    """Everything the HTML audit report shows, as plain data."""
    hist = history(location, settings, ref=ref)
    source = open_source(location, settings)
    repo = git.Repo(source.root)
    tip = find_commit(source, ref).hexsha
    web = web_base(hist.repository)
    reviews = {e.revision.commit: _review_of(repo, e.revision.commit, tip) for e in hist.entries}
    names = {
        str(m.get("model_id")): str(m.get("registry_name"))
        for e in hist.entries
        if e.config is not None
        for m in e.config.models.values()
        if m.get("model_id") and m.get("registry_name")
    }
    statuses = {r.path: _release_status(r, settings) for r in hist.releases}
    verified = (
        {r.path: _verify_status(r, settings) for r in hist.releases} if verify_releases else {}
    )
    tags, tag_problems = unrecorded_tags(hist.customer, hist.releases, settings)
    local = f"{source.root}/"
    for entry in hist.entries:  # a local path means nothing on the reviewer's machine
        if entry.config is not None:
            entry.config.notes[:] = [n.replace(local, "") for n in entry.config.notes]
        if entry.error:
            entry.error = entry.error.replace(local, "")
    return {
        "customer": hist.customer,
        "repository": repository_shown(hist.repository),
        "web": web,
        "ref": _ref_shown(location, ref, settings),
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool_version": __version__,
        "history": hist,
        "entries": list(reversed(hist.entries)),
        "releases": list(reversed(hist.releases)),
        "latest_release": hist.releases[-1] if hist.releases else None,
        "current": next((e for e in reversed(hist.entries) if e.config is not None), None),
        "lineage": lineage(hist.entries),
        "release_diffs": list(reversed(release_diffs(hist))),
        "reviews": reviews,
        "model_names": names,
        "release_status": statuses,
        "verified": verified,
        "verify_run": verify_releases,
        "unrecorded_tags": tags,
        "problems": hist.problems + tag_problems,
    }


def render_report(data: Mapping[str, Any]) -> str:
    """The self-contained HTML audit report (inline CSS, no scripts, no network resources)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("builder", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = short
    env.filters["when"] = human_date
    return env.get_template("audit.html.j2").render(**data)


def write_report(
    location: str,
    settings: Settings,
    output: Path,
    *,
    ref: str = "HEAD",
    verify_releases: bool = False,
) -> dict[str, Any]:
    """Render the audit report of a customer into ``output`` (atomically)."""
    data = report_data(location, settings, ref=ref, verify_releases=verify_releases)
    write_atomic(output, render_report(data).encode("utf-8"))
    return data
