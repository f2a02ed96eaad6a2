"""The audit report of a customer: the five questions a reviewer asks, answered on one page
that reads well on screen and on paper (HTML, and a PDF written by WeasyPrint).

What runs at the customer (the newest release), where each model came from (registry id,
training task, weights), who approved it (the approvals covering every change of a release),
what changed since the previous release and why (each revision's reason), and whether it
rebuilds (``--verify``). Identifiers (image references, digests, URLs) never break across
lines: they are set whole, or shortened with the full value in a title and a numbered note.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final

import jinja2
from markupsafe import Markup, escape

from builder import __version__
from builder.audit.explain import read_attestations
from builder.audit.history import (
    Change,
    Customer,
    History,
    HistoryEntry,
    ResolvedConfig,
    diff_configs,
    history,
    open_customer,
)
from builder.audit.locate import locate_customer
from builder.audit.text import human_date, pinned, repository_of, short
from builder.audit.verify import verify
from builder.documents.release_record import ReleaseRecord
from builder.errors import BuilderError, ConfigError
from builder.fsutil import write_atomic
from builder.image.contents import open_image
from builder.oci import RegistryClient, parse_reference
from builder.settings import Settings

#: The longest identifier set whole in a value cell: what fits one printed A4 line at the
#: report's 8 pt monospace beside its label (~150 mm); longer ones are shortened with a note.
IDENT_LIMIT: Final = 84


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


def release_changes(hist: History) -> dict[str, dict[str, Any]]:
    """Per release (by record path): the previous release, what changed since it (the
    configuration in resolved terms, and the base as shipped) and the revisions that made the
    changes, each with its reason and the approval that covers it."""
    configs = {e.revision.commit: e.config for e in hist.entries if e.config is not None}
    out: dict[str, dict[str, Any]] = {}
    previous: ReleaseRecord | None = None
    for record in hist.releases:
        revisions = [e for e in hist.entries if e.approval and e.approval.release == record.image]
        now = configs.get(record.config_commit)
        before = configs.get(previous.config_commit) if previous else None
        changes: list[Change] = []
        if previous is not None and before is not None and now is not None:
            changes = diff_configs(_shipped(before, previous), _shipped(now, record))
        elif previous is not None:
            changes = [Change("note", "config", "configuration not comparable: a config "
                              "commit is not in the history")]  # fmt: skip
        out[record.path] = {
            "previous": previous,
            "changes": changes,
            "revisions": list(reversed(revisions)),
            "unapproved": [e for e in revisions if e.approval and not e.approval.covered],
            "approvals": list(
                dict.fromkeys(a.text for e in revisions if e.approval for a in e.approval.approvals)
            ),
            "merge_requests": list(
                dict.fromkeys(m for e in revisions if e.approval for m in e.approval.merge_requests)
            ),
            "pinned": (now.base if now else None),
        }
        previous = record
    return out


def _shipped(config: ResolvedConfig, record: ReleaseRecord) -> ResolvedConfig:
    return replace(config, shipped=dict(record.base))


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


def base_statement(
    current: HistoryEntry | None,
    latest: ReleaseRecord | None,
    pinned_then: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One consistent statement of the base image: what the configuration allows, what the
    current lock pins, what the newest release shipped, and why they differ when they do."""
    config = current.config if current is not None else None
    pin = config.base if config is not None else None
    shipped = dict(latest.base) if latest is not None else None
    why = []
    if (
        latest is not None
        and pinned_then is not None
        and pinned_then.get("digest") != latest.base_digest
    ):
        why.append(
            f"the release was built on base {latest.base_version}, while the lock of its "
            f"revision pins {pinned_then.get('version')}: a rebuild on another base "
            "without a configuration change (fleet rebuild)"
        )
    if (
        latest is not None
        and current is not None
        and (current.revision.commit != latest.config_commit)
    ):
        why.append(
            "the configuration has changed since the newest release; the lock of the current "
            "revision pins the base the next release will use"
        )
    return {
        "allowed": config.base_constraint if config is not None else None,
        "pinned": pin,
        "shipped": shipped,
        "why": why,
    }


@dataclass
class Notes:
    """Numbered notes holding the full value of every identifier the page shortens."""

    values: list[str] = field(default_factory=list)

    def ident(self, value: Any, limit: int = IDENT_LIMIT, *, link: bool = False) -> Markup:
        """An identifier that never breaks across lines: whole when it fits ``limit``
        characters, else its head and tail around an ellipsis, the full value on hover and in
        a numbered note (printed at the end)."""
        text = str(value or "")
        if not text:
            return Markup("-")
        shown, note = text, ""
        if len(text) > limit:
            keep = (limit - 1) // 2
            shown = f"{text[:keep]}…{text[-(limit - 1 - keep) :]}"
            if text not in self.values:
                self.values.append(text)
            number = self.values.index(text) + 1
            note = f'<sup class="noteref">[{number}]</sup>'
        body = escape(shown)
        if link and text.startswith("https://"):
            body = Markup(f'<a href="{escape(text)}">{body}</a>')
        return Markup(f'<code class="id" title="{escape(text)}">{body}</code>{note}')


def _ref_shown(customer: Customer, ref: str) -> str:
    """The reviewed ref in words: ``HEAD`` becomes the branch name (or the commit)."""
    if ref != "HEAD":
        return ref
    repo = customer.repo
    if not repo.head.is_detached:
        return f"branch {repo.active_branch.name}"
    return f"commit {repo.head.commit.hexsha[:12]}"


def report_data(
    location: str,
    settings: Settings,
    *,
    ref: str | None = None,
    verify_releases: bool = False,
    generated_at: datetime | None = None,
) -> dict[str, Any]:
    """Everything the audit report shows, as plain data. ``location``: a customer name,
    folder or repository URL, resolved as every audit command does."""
    located = locate_customer(location, settings)
    customer = open_customer(located.location, settings)
    ref = ref or located.ref
    hist = history(located.location, settings, ref=ref, customer=customer)
    web = web_base(hist.repository)
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
    local = f"{customer.source.root}/"
    for entry in hist.entries:  # a local path means nothing on the reviewer's machine
        if entry.config is not None:
            entry.config.notes[:] = [n.replace(local, "") for n in entry.config.notes]
        if entry.error:
            entry.error = entry.error.replace(local, "")
        if entry.refused:
            entry.refused = entry.refused.replace(local, "")
    per_release = release_changes(hist)
    latest = hist.releases[-1] if hist.releases else None
    current = next((e for e in reversed(hist.entries) if e.config is not None), None)
    refused_now = hist.entries[-1] if hist.entries and hist.entries[-1].refused else None
    moment = generated_at or datetime.now(UTC)
    return {
        "customer": hist.customer,
        "repository": repository_shown(hist.repository),
        "web": web,
        "ref": _ref_shown(customer, ref),
        "generated_at": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool_version": __version__,
        "history": hist,
        "entries": list(reversed(hist.entries)),
        "releases": list(reversed(hist.releases)),
        "latest_release": latest,
        "current": current,
        "base": base_statement(
            current, latest, per_release[latest.path]["pinned"] if latest else None
        ),
        "lineage": lineage(hist.entries),
        "release_changes": per_release,
        "model_names": names,
        "subjects": {e.revision.commit: e.revision.message for e in hist.entries},
        "release_status": statuses,
        "verified": verified,
        "verify_run": verify_releases,
        "unrecorded_tags": tags,
        "unapproved": list(reversed(hist.unapproved)),
        "pending": [e for e in reversed(hist.entries) if e.approval and not e.approval.release],
        "refused_now": refused_now,
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
    notes = Notes()
    return env.get_template("audit.html.j2").render(**data, notes=notes, ident=notes.ident)


def write_pdf(html: str, output: Path) -> None:
    """The report as a PDF (A4, page numbers and the generation date on every page) written by
    WeasyPrint (pinned in the lock), atomically."""
    try:
        import weasyprint  # pango is loaded on import: only when a PDF is asked
    except OSError as exc:  # the library is installed, the system's pango is not
        raise ConfigError(
            f"cannot write a PDF: WeasyPrint needs the pango library ({exc})",
            hint="install libpango-1.0-0 and libpangoft2-1.0-0 (scripts/bootstrap.sh does)",
        ) from None
    write_atomic(output, weasyprint.HTML(string=html).write_pdf())


def write_report(
    location: str,
    settings: Settings,
    *,
    html: Path | None = None,
    pdf: Path | None = None,
    ref: str | None = None,
    verify_releases: bool = False,
) -> dict[str, Any]:
    """Render the audit report of a customer into ``html`` and/or ``pdf`` (atomically)."""
    data = report_data(location, settings, ref=ref, verify_releases=verify_releases)
    page = render_report(data)
    if html is not None:
        write_atomic(html, page.encode("utf-8"))
    if pdf is not None:
        write_pdf(page, pdf)
    return data
