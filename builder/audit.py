"""Audit: what shipped to whom, built from what, what changed, and whether it rebuilds.

Everything here reads only git and images: the customer repository's history and release
records, and an image's labels, in-image /app/config/provenance.json, layers and attached
attestations. ``history`` and ``diff`` compare configurations in resolved terms (model ids,
tasks, weights, thresholds, base) rather than as text; ``explain`` checks an image's model
files against their recorded sha256; ``verify`` rebuilds an image from its recorded commit
and lock and compares digests. The core never prints; the CLI renders these results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

import git

from builder import __version__
from builder.assemble import LAYER_FORMAT, LAYER_FORMAT_LABEL, check_layer_format
from builder.attest import (
    MEDIA_CYCLONEDX,
    MEDIA_DSSE,
    MEDIA_INTOTO,
    AttestationError,
    envelope_payload,
    load_public_key,
    verify_envelope,
)
from builder.contracts import CustomerSpec, RepoSource, ResolvedModel
from builder.errors import BuilderError, ConfigError, ImageError
from builder.load import load_customer, open_source
from builder.oci import Descriptor
from builder.oci.image import (
    ArchiveImage,
    ImageFiles,
    LayoutImage,
    OpenedImage,
    _json_object,
    open_image,
    own_layers,
    scan_files,
)

if TYPE_CHECKING:
    from builder.settings import Settings

#: Exit code of a failed audit check (tampered file, digest mismatch, bad signature).
AUDIT_FAILED: Final = 10
PROVENANCE_PATH: Final = "app/config/provenance.json"
ANALYSIS_PATH: Final = "app/config/analysis.yaml"
MODELS_PREFIX: Final = "app/models/"
_HEX40: Final = re.compile(r"^[0-9a-f]{40}$")
_DIGEST: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
# Checks about attached attestations (signature, subject, digests named in them), as opposed to
# the image's own files, labels and provenance.json ("files intact").
_ATTESTATION_CHECKS: Final = (
    "attestation",
    "provenance signature",
    "provenance subject",
    "provenance model digests",
    "provenance config commit",
    "SBOM digest",
)


def short(value: Any, n: int = 8) -> str:
    """A short form of an id or digest for people (``sha256:`` dropped)."""
    text = str(value or "-")
    return text.removeprefix("sha256:")[:n]


# == release records ==========================================================================


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
    from builder.fleet import RELEASES_BRANCH, ReleaseLog, git_credentials, record_remote

    with git_credentials():
        log = ReleaseLog(record_remote(location), settings.cache_dir)
        raw = log.records(customer, log.fetch())
    where = f"{log.shown} branch {RELEASES_BRANCH}"
    records = [_release_from(r, f"{where}: {r.get('_path')}") for r in raw]
    return sorted(records, key=lambda r: (r.built_at or "", r.path)), where


# == resolved configuration of one revision ===================================================


@dataclass(frozen=True)
class Revision:
    """One commit of the customer folder."""

    commit: str
    date: str  # author date, RFC 3339 UTC
    author: str
    message: str  # first line
    files: tuple[str, ...] = ()  # changed paths inside the customer folder


@dataclass
class ResolvedConfig:
    """A revision's configuration in the terms a reviewer cares about."""

    commit: str
    customer: str
    base_constraint: str
    base_repository: str | None
    base: dict[str, Any] | None  # pinned by the lock: version, digest
    models: dict[str, dict[str, Any]]
    analyses: dict[str, dict[str, Any]]
    resolved_from: str  # "lock" | "registry" | "config" | "unresolved"
    notes: list[str] = field(default_factory=list)


def _model_view(m: ResolvedModel) -> dict[str, Any]:
    from builder.provenance import dir_hash

    return {
        "sourcing": m.sourcing,
        "model_id": m.model_id,
        "registry_name": m.registry_name,
        "task_id": m.task_id,
        "weights": {f.name: f.sha256 for f in m.files},
        "dir_hash": dir_hash(m) if all(f.sha256 for f in m.files) else None,
        "preprocessing": [{"cls": p.cls, "params": dict(p.params)} for p in m.preprocessing],
        "postprocessing": [{"cls": p.cls, "params": dict(p.params)} for p in m.postprocessing],
        "params": dict(m.params),
    }


def _analyses_view(spec: CustomerSpec) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for analysis in spec.analysis["analyses"]:
        features: dict[str, dict[str, Any]] = {}
        for feature in analysis["features"]:
            key = feature.get("name") or feature["cls"]
            while key in features:
                key += "'"
            features[key] = {k: v for k, v in feature.items() if k not in ("cls", "name")}
            features[key]["cls"] = feature["cls"]
        other = {k: v for k, v in analysis.items() if k not in ("name", "models", "features")}
        out[analysis["name"]] = {"features": features, "settings": other}
    return out


class Resolver:
    """Resolves the models of many revisions, opening the registry at most once.

    The committed lock is preferred (it is what a ``--locked`` build uses); without a usable
    lock the registry is asked as it is now, and the result says so.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backend: tuple[Any, Any] | None = None
        self._failure: str | None = None

    def _open(self) -> tuple[Any, Any]:
        if self._failure is not None:
            raise BuilderError(self._failure)
        if self._backend is None:
            from builder.registries import open_registry
            from builder.storage import open_store

            try:
                self._backend = (
                    open_registry(self.settings.model_registry),
                    open_store(self.settings.production, self.settings.root),
                )
            except BuilderError as exc:
                self._failure = str(exc)
                raise
        return self._backend

    def config(self, spec: CustomerSpec) -> ResolvedConfig:
        """The resolved configuration of ``spec`` (lock first, then the registry)."""
        from builder.lock import models_from_lock, read_lock
        from builder.resolve import resolve

        notes: list[str] = []
        lock: dict[str, Any] | None = None
        models: tuple[ResolvedModel, ...] | None = None
        how = "lock"
        try:
            lock = read_lock(spec)
            if lock is not None:
                models = models_from_lock(spec, lock, production=self.settings.production)
        except ConfigError as exc:
            notes.append(f"lock not used: {exc.message}")
        if models is None:
            needs_registry = any(d.sourcing == "auto" for d in spec.models)
            try:
                backend = self._open() if needs_registry else (None, None)
                models = resolve(spec, *backend)
                how = "registry" if needs_registry else "config"
                if needs_registry:
                    notes.append("models resolved from the model registry as it is now")
            except BuilderError as exc:
                how = "unresolved"
                notes.append(f"models not resolved: {exc}")
        if models is not None:
            model_views = {m.name: _model_view(m) for m in models}
        else:
            model_views = {
                d.name: {"sourcing": d.sourcing, "model_id": d.reference, "weights": {}}
                for d in spec.models
            }
        base = (lock or {}).get("base_image")
        return ResolvedConfig(
            commit=spec.commit,
            customer=spec.customer,
            base_constraint=spec.base_version,
            base_repository=spec.base_repository,
            base=dict(base) if base and base.get("digest") else None,
            models=model_views,
            analyses=_analyses_view(spec),
            resolved_from=how,
            notes=notes,
        )


# == semantic diff =============================================================================


@dataclass(frozen=True)
class Change:
    """One difference between two resolved configurations, in reviewer terms."""

    kind: str  # lock|model-added|model-removed|model-replaced|weights-changed|model-setting|
    #            feature-added|feature-removed|feature-setting|analysis-added|
    #            analysis-removed|analysis-setting|base|base-constraint|customer
    subject: str
    text: str
    before: Any = None
    after: Any = None
    # True when a side of the change was resolved from the model registry as it is now (no
    # usable lock at that revision): not a recorded state, marked as such wherever it is shown.
    unrecorded: bool = False
    # For a value change, ``text`` is ``f"{lead} {was} -> {now}"`` (+ a mark): the report
    # highlights the two values.
    lead: str = ""
    was: str = ""
    now: str = ""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b.c -> value``; plug-in lists keyed by their class name."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or ({prefix: {}} if prefix else {})
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, Mapping) and "cls" in v for v in value)
        and len({v["cls"] for v in value}) == len(value)
    ):
        out = {}
        for item in value:
            name = f"{prefix} {item['cls']}" if prefix else str(item["cls"])
            params = item.get("params") or {}
            out.update(_flatten(params, name) if params else {name: "(no params)"})
        return out
    return {prefix: value}


def _fmt(value: Any) -> str:
    if value is None:  # not set in the config: the runner's default applies
        return "(default)"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _settings_changes(kind: str, subject: str, old: Any, new: Any) -> list[Change]:
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            label = f"{subject} {key}".strip()
            was, now = _fmt(a.get(key)), _fmt(b.get(key))
            out.append(
                Change(
                    kind,
                    subject,
                    f"{label} {was} -> {now}",
                    a.get(key),
                    b.get(key),
                    lead=label,
                    was=was,
                    now=now,
                )
            )
    return out


def _model_label(m: Mapping[str, Any]) -> str:
    """``"mitosis v2" 9b0e6d1c (task 77c1e2d3)``: the registry name a reviewer reads, then ids."""
    if m.get("sourcing") == "manual":
        return f"in-repo weights {short(m.get('dir_hash'), 12)}"
    task = f" (task {short(m.get('task_id'))})" if m.get("task_id") else ""
    name = f'"{m.get("registry_name")}" ' if m.get("registry_name") else ""
    return f"{name}{short(m.get('model_id'))}{task}"


def _model_changes(
    name: str, a: Mapping[str, Any] | None, b: Mapping[str, Any] | None
) -> list[Change]:
    if a is None and b is not None:
        return [
            Change("model-added", name, f"{name}: added {_model_label(b)}", None, b.get("model_id"))
        ]
    if b is None and a is not None:
        return [
            Change(
                "model-removed",
                name,
                f"{name}: removed (was {_model_label(a)})",
                a.get("model_id"),
                None,
            )
        ]
    assert a is not None and b is not None
    out = []
    if (a.get("model_id"), a.get("sourcing")) != (b.get("model_id"), b.get("sourcing")):
        was, now = _model_label(a), _model_label(b)
        out.append(
            Change(
                "model-replaced",
                name,
                f"{name}: {was} -> {now}",
                a.get("model_id"),
                b.get("model_id"),
                lead=f"{name}:",
                was=was,
                now=now,
            )
        )
    elif a.get("weights") != b.get("weights") and a.get("weights") and b.get("weights"):
        wa, wb = a["weights"], b["weights"]
        files = ", ".join(
            f"{f} {short(wa.get(f), 12)} -> {short(wb.get(f), 12)}"
            for f in sorted(set(wa) | set(wb))
            if wa.get(f) != wb.get(f)
        )
        out.append(Change("weights-changed", name, f"{name}: weights changed: {files}", wa, wb))
    for key in ("preprocessing", "postprocessing", "params"):
        if key in a and key in b:
            out += _settings_changes("model-setting", f"{name} {key}", a[key], b[key])
    return out


def _analysis_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Change]:
    out = []
    several = len(set(a) | set(b)) > 1
    for name in sorted(set(a) | set(b)):
        if name not in a:
            out.append(Change("analysis-added", name, f"analysis {name}: added"))
            continue
        if name not in b:
            out.append(Change("analysis-removed", name, f"analysis {name}: removed"))
            continue
        prefix = f"{name}/" if several else ""
        out += _settings_changes(
            "analysis-setting", f"analysis {name}", a[name]["settings"], b[name]["settings"]
        )
        fa, fb = a[name]["features"], b[name]["features"]
        for feature in sorted(set(fa) | set(fb), key=[*fa, *fb].index):
            label = f"{prefix}{feature}"
            if feature not in fa:
                out.append(Change("feature-added", label, f"{label}: feature added"))
            elif feature not in fb:
                out.append(Change("feature-removed", label, f"{label}: feature removed"))
            else:
                # "Carcinoma threshold 0.5 -> 0.6": feature params read without a "params." prefix
                old, new = dict(fa[feature]), dict(fb[feature])
                old_params, new_params = old.pop("params", {}), new.pop("params", {})
                out += _settings_changes("feature-setting", label, old_params, new_params)
                out += _settings_changes("feature-setting", label, old, new)
    return out


def _base_text(base: Mapping[str, Any] | None) -> str:
    if not base:
        return "(not pinned)"
    return f"{base.get('version')} ({short(base.get('digest'), 12)})"


def diff_configs(a: ResolvedConfig, b: ResolvedConfig) -> list[Change]:
    """What changed from ``a`` to ``b``, models first, then features, then the base."""
    out: list[Change] = []
    if a.customer != b.customer:
        out.append(
            Change(
                "customer",
                "customer",
                f"customer {a.customer} -> {b.customer}",
                a.customer,
                b.customer,
            )
        )
    if a.resolved_from != b.resolved_from and "lock" in (a.resolved_from, b.resolved_from):
        text = (
            "models pinned by customer.lock.yaml"
            if b.resolved_from == "lock"
            else f"models no longer pinned by the lock (resolved from: {b.resolved_from})"
        )
        out.append(Change("lock", "lock", text, a.resolved_from, b.resolved_from))
    unrecorded = "registry" in (a.resolved_from, b.resolved_from)
    for name in sorted(set(a.models) | set(b.models)):
        for change in _model_changes(name, a.models.get(name), b.models.get(name)):
            out.append(
                replace(
                    change,
                    text=f"{change.text} [registry as it is now, not a recorded value]",
                    unrecorded=True,
                )
                if unrecorded
                else change
            )
    out += _analysis_changes(a.analyses, b.analyses)
    if a.base_constraint != b.base_constraint:
        out.append(
            Change(
                "base-constraint",
                "base",
                f"base constraint {a.base_constraint} -> {b.base_constraint}",
                a.base_constraint,
                b.base_constraint,
            )
        )
    if a.base_repository != b.base_repository:
        out.append(
            Change(
                "base-constraint",
                "base",
                f"base repository {a.base_repository or '(default)'} -> {b.base_repository or '(default)'}",
                a.base_repository,
                b.base_repository,
            )
        )
    pin_a = (a.base or {}).get("version"), (a.base or {}).get("digest")
    pin_b = (b.base or {}).get("version"), (b.base or {}).get("digest")
    if pin_a != pin_b and (a.base or b.base):
        if a.base and b.base and pin_a[0] != pin_b[0]:
            was, now = str(pin_a[0]), str(pin_b[0])
        else:
            was, now = _base_text(a.base), _base_text(b.base)
        out.append(
            Change(
                "base",
                "base",
                f"base {was} -> {now}",
                a.base,
                b.base,
                lead="base",
                was=was,
                now=now,
            )
        )
    return out


# == history and diff ==========================================================================


def _commit(source: RepoSource, ref: str) -> git.Commit:
    """The commit ``ref`` names in the customer repo, or one ConfigError line.

    ``git rev-parse --verify`` also refuses a well-formed sha that is not in the repository,
    which gitpython's lazy ``repo.commit`` only notices later.
    """
    repo = git.Repo(source.root)
    try:
        sha = repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}")
    except git.GitCommandError:
        raise ConfigError(
            f"{source.location}: ref {ref!r} does not exist",
            hint="use a branch, tag or commit of the customer repo",
        ) from None
    return repo.commit(sha)


def _location(source: RepoSource) -> str:
    """A location that opens the same source again without re-cloning or fetching."""
    return str(source.root / source.subdir) if source.subdir else str(source.root)


def _revision(commit: git.Commit, subdir: str) -> Revision:
    prefix = f"{subdir}/" if subdir else ""
    files = tuple(
        sorted(
            str(path).removeprefix(prefix)
            for path in commit.stats.files
            if not prefix or str(path).startswith(prefix)
        )
    )
    return Revision(
        commit=commit.hexsha,
        date=datetime.fromtimestamp(commit.authored_date, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        author=str(commit.author.name),
        message=str(commit.message).strip().splitlines()[0] if str(commit.message).strip() else "",
        files=files,
    )


@dataclass
class HistoryEntry:
    """One configuration revision: what changed and which images were released from it."""

    revision: Revision
    config: ResolvedConfig | None
    changes: list[Change]
    releases: list[ReleaseRecord]
    error: str | None = None  # the revision could not be loaded (invalid config then)


@dataclass
class History:
    """A customer's configuration timeline, oldest first, and its release records."""

    customer: str
    repository: str
    ref: str
    entries: list[HistoryEntry]
    releases: list[ReleaseRecord]
    problems: list[str]  # release records that do not fit the history


def history(location: str, settings: Settings, *, ref: str = "HEAD") -> History:
    """The customer's config revisions at ``ref``, each with its changes and releases."""
    from builder.load import _URL

    source = open_source(location, settings)
    repo = git.Repo(source.root)
    tip = _commit(source, ref)
    kwargs: dict[str, Any] = {"paths": source.subdir} if source.subdir else {}
    commits = list(reversed(list(repo.iter_commits(tip, **kwargs))))
    if not commits:
        raise ConfigError(f"{source.location}: no commits touch the customer folder at {ref!r}")
    resolver = Resolver(settings)
    entries: list[HistoryEntry] = []
    previous: ResolvedConfig | None = None
    again = _location(source)
    for commit in commits:
        revision = _revision(commit, source.subdir)
        try:
            spec = load_customer(again, settings, ref=commit.hexsha)
            config = resolver.config(spec)
        except BuilderError as exc:
            entries.append(HistoryEntry(revision, None, [], [], str(exc)))
            continue
        changes = diff_configs(previous, config) if previous is not None else _initial(config)
        entries.append(HistoryEntry(revision, config, changes, []))
        previous = config
    customer = previous.customer if previous is not None else PurePosixPath(again).name
    records, where = read_release_records(
        location if _URL.match(location) else again, customer, settings
    )
    by_commit = {e.revision.commit: e for e in entries}
    problems = []
    for record in records:
        if record.config_commit in by_commit:
            by_commit[record.config_commit].releases.append(record)
        else:
            problems.append(
                f"{where}: {record.path}: config commit {short(record.config_commit, 12)} is "
                f"not a revision of {source.location} at {ref}"
            )
    return History(customer, source.url, ref, entries, records, problems)


def _initial(config: ResolvedConfig) -> list[Change]:
    """The first revision, told as additions."""
    now = config.resolved_from == "registry"
    mark = " [registry as it is now, not a recorded value]" if now else ""
    out = [
        Change(
            "model-added", name, f"{name}: {_model_label(m)}{mark}", None, m.get("model_id"), now
        )
        for name, m in sorted(config.models.items())
    ]
    out.append(
        Change(
            "base-constraint",
            "base",
            f"base constraint {config.base_constraint}",
            None,
            config.base_constraint,
        )
    )
    if config.base:
        out.append(
            Change("base", "base", f"base pinned to {_base_text(config.base)}", None, config.base)
        )
    return out


@dataclass
class ConfigDiff:
    """``diff`` result: the two revisions and what changed between them."""

    customer: str
    a: Revision
    b: Revision
    config_a: ResolvedConfig
    config_b: ResolvedConfig
    changes: list[Change]


def diff(location: str, settings: Settings, rev_a: str, rev_b: str) -> ConfigDiff:
    """Semantic diff of the resolved configurations at two revisions of the customer folder."""
    source = open_source(location, settings)
    again, resolver = _location(source), Resolver(settings)
    sides = []
    for ref in (rev_a, rev_b):
        _commit(source, ref)
        spec = load_customer(again, settings, ref=ref)  # the folder's last commit at ref
        commit = git.Repo(source.root).commit(spec.commit)
        sides.append((_revision(commit, source.subdir), resolver.config(spec)))
    (a, config_a), (b, config_b) = sides
    return ConfigDiff(config_b.customer, a, b, config_a, config_b, diff_configs(config_a, config_b))


# == explain ==================================================================================


@dataclass(frozen=True)
class Check:
    """One audit check and its outcome."""

    name: str
    ok: bool
    detail: str


@dataclass
class ModelFileStatus:
    """A recorded weight file and what the image holds at its path."""

    model: str
    file: str
    recorded_sha256: str
    image_sha256: str | None  # None: missing
    size: int | None
    status: str  # ok | MODIFIED | MISSING | UNEXPECTED


@dataclass
class AttestationInfo:
    """An attestation attached to the image."""

    digest: str
    kind: str  # provenance | sbom | other
    artifact_type: str
    created: str | None
    signed: bool
    key_id: str | None
    signature: str  # "valid" | "INVALID" | "not checked" | "unsigned"


@dataclass
class Explanation:
    """Everything ``explain`` found out about an image, and its checks."""

    image: str
    kind: str
    manifest_digest: str
    config_digest: str
    customer: str
    provenance: dict[str, Any]
    base: dict[str, Any]  # repository, version, digest, constraint
    labels: dict[str, str]
    created: str | None  # the image's created time (= config commit time)
    built_at: str | None  # when the build ran (attestation or release record)
    built_at_source: str | None
    files: list[ModelFileStatus]
    attestations: list[AttestationInfo]
    attestations_where: str
    release: dict[str, Any] | None
    release_note: str
    checks: list[Check]
    ci_url: str | None = None
    selected: dict[str, Any] | None = None  # how a customer name was turned into this image

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    @property
    def verdict(self) -> dict[str, Any]:
        """The three answers a reviewer signs off on, each yes or no, with who signed.

        ``recorded_release``: a release record names this digest. ``signed``: a provenance
        signature is attached (``signed_by`` its key id; ``signature`` valid / INVALID / not
        checked without --public-key). ``files_intact``: every model and config file matches
        its recorded sha256 and labels, annotations and provenance agree.
        """
        signatures = [a for a in self.attestations if a.kind == "provenance" and a.signed]
        states = {a.signature for a in signatures}
        state = "INVALID" if "INVALID" in states else "valid" if "valid" in states else None
        intact = all(c.ok for c in self.checks if not c.name.startswith(_ATTESTATION_CHECKS))
        return {
            "recorded_release": self.release is not None,
            "signed": bool(signatures),
            "signed_by": sorted({a.key_id for a in signatures if a.key_id}),
            "signature": state or ("not checked" if signatures else "unsigned"),
            "files_intact": intact,
        }

    def verdict_line(self) -> str:
        """``recorded release: yes | signed: yes, by key ab12.. (valid) | files intact: yes``."""
        v = self.verdict
        if v["signed"]:
            keys = ", ".join(k[:16] for k in v["signed_by"]) or "an unnamed key"
            signed = f"yes, by key {keys} ({v['signature']})"
        else:
            signed = "no (unsigned)"
        return (
            f"recorded release: {'yes' if v['recorded_release'] else 'no'} | signed: {signed} | "
            f"files intact: {'yes' if v['files_intact'] else 'NO'}"
        )

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


def _not_ours(image: OpenedImage, why: str) -> ImageError:
    return ImageError(
        f"{image.what} was not built by ivd-image-builder: {why}",
        hint="explain and verify only read images this tool built",
    )


def _read_provenance(image: OpenedImage, found: ImageFiles) -> dict[str, Any]:
    raw = found.contents.get(PROVENANCE_PATH)
    if raw is None:
        raise _not_ours(image, "it has no /app/config/provenance.json")
    try:
        record = json.loads(raw)
    except ValueError:
        raise ImageError(
            f"{image.what}: /app/config/provenance.json is not JSON (altered?)"
        ) from None
    if not isinstance(record, dict) or record.get("provenance_version") != 1:
        version = record.get("provenance_version") if isinstance(record, dict) else None
        raise ImageError(
            f"{image.what}: /app/config/provenance.json has provenance_version {version!r}, "
            "which this version cannot read",
            hint="use the builder version that made the image",
        )
    return record


def _file_statuses(provenance: Mapping[str, Any], found: ImageFiles) -> list[ModelFileStatus]:
    out = []
    expected: set[str] = set()
    for model in provenance.get("models") or []:
        for f in model.get("files") or []:
            path = f"{MODELS_PREFIX}{model['name']}/{f['name']}"
            expected.add(path)
            have = found.files.get(path)
            status = "MISSING" if have is None else "ok" if have[0] == f["sha256"] else "MODIFIED"
            out.append(
                ModelFileStatus(
                    model["name"],
                    f["name"],
                    f["sha256"],
                    have[0] if have else None,
                    have[1] if have else None,
                    status,
                )
            )
    for path, (sha, size) in sorted(found.files.items()):
        if path.startswith(MODELS_PREFIX) and path not in expected:
            rest = path.removeprefix(MODELS_PREFIX)
            model, _, name = rest.partition("/")
            out.append(ModelFileStatus(model, name, "", sha, size, "UNEXPECTED"))
    return out


def base_of(labels: Mapping[str, str], provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The base image an image was built on: repository, version and digest from the labels
    (provenance.json records only the constraint, so a base bump leaves the config layer
    unchanged), the constraint from provenance.json."""
    recorded = dict(provenance.get("base_image") or {})
    version = labels.get("com.ivd.base.version") or recorded.get("version")
    name = labels.get("org.opencontainers.image.base.name", "")
    repository = name.removesuffix(f":{version}") if version else name.rpartition(":")[0]
    return {
        "repository": recorded.get("repository") or repository or None,
        "version": version,
        "digest": labels.get("org.opencontainers.image.base.digest") or recorded.get("digest"),
        "constraint": recorded.get("constraint"),
    }


def _consistency_checks(
    image: OpenedImage, provenance: Mapping[str, Any], found: ImageFiles
) -> list[Check]:
    """Labels, manifest annotations, provenance.json and the config layer must agree."""
    from builder.provenance import LABEL_PREFIX

    labels = image.labels
    config = provenance.get("config") or {}
    base = provenance.get("base_image") or {}
    pairs = [
        (
            "label org.opencontainers.image.revision",
            labels.get("org.opencontainers.image.revision"),
            config.get("commit"),
        ),
        (
            "label org.opencontainers.image.source",
            labels.get("org.opencontainers.image.source"),
            config.get("repository"),
        ),
        (
            f"label {LABEL_PREFIX}.customer",
            labels.get(f"{LABEL_PREFIX}.customer"),
            provenance.get("customer"),
        ),
        (
            f"label {LABEL_PREFIX}.config.sha256",
            labels.get(f"{LABEL_PREFIX}.config.sha256"),
            config.get("verbose_sha256"),
        ),
    ]
    if base.get("digest"):  # provenance.json of builds that recorded the resolved base
        pairs.append(
            (
                "label org.opencontainers.image.base.digest",
                labels.get("org.opencontainers.image.base.digest"),
                base.get("digest"),
            )
        )
    analysis = found.files.get(ANALYSIS_PATH)
    pairs.append(
        (
            "/app/config/analysis.yaml sha256",
            analysis[0] if analysis else None,
            config.get("verbose_sha256"),
        )
    )
    for model in provenance.get("models") or []:
        pairs.append(
            (
                f"label {LABEL_PREFIX}.model.{model['name']}.sha256",
                labels.get(f"{LABEL_PREFIX}.model.{model['name']}.sha256"),
                model.get("dir_hash"),
            )
        )
    annotations = image.manifest.get("annotations") or {}
    for key in ("org.opencontainers.image.revision", "org.opencontainers.image.base.digest"):
        if key in annotations:
            pairs.append((f"manifest annotation {key}", annotations.get(key), labels.get(key)))
    checks = []
    for name, actual, recorded in pairs:
        ok = actual == recorded
        detail = (
            "agrees with provenance.json"
            if ok
            else f"is {actual!r}, provenance.json records {recorded!r}"
        )
        checks.append(Check(name, ok, detail))
    return checks


def _artifact_document(
    image: OpenedImage, descriptor: Descriptor
) -> tuple[dict[str, Any], Descriptor, bytes]:
    manifest = _json_object(
        image.manifest_bytes(descriptor.digest), f"attestation {descriptor.digest}"
    )
    layers = manifest.get("layers") or []
    if not layers:
        raise ImageError(f"attestation {descriptor.digest} has no layer")
    layer = Descriptor.from_dict(layers[0])
    return manifest, layer, image.blob(layer.digest)


@dataclass
class _Attested:
    infos: list[AttestationInfo] = field(default_factory=list)
    statement: dict[str, Any] | None = None  # newest provenance Statement
    sbom_sha256: str | None = None
    checks: list[Check] = field(default_factory=list)


def _read_attestations(
    image: OpenedImage, descriptors: Sequence[Descriptor], public_key: Path | None
) -> _Attested:
    out = _Attested()
    newest = ""
    for descriptor in descriptors:
        try:
            manifest, layer, data = _artifact_document(image, descriptor)
        except ImageError as exc:
            out.checks.append(
                Check(f"attestation {short(descriptor.digest, 12)}", False, exc.message)
            )
            continue
        created = (manifest.get("annotations") or {}).get("org.opencontainers.image.created")
        info = AttestationInfo(
            descriptor.digest,
            "other",
            str(manifest.get("artifactType", "")),
            created,
            False,
            None,
            "unsigned",
        )
        statement: dict[str, Any] | None = None
        if layer.media_type == MEDIA_CYCLONEDX:
            info.kind = "sbom"
            out.sbom_sha256 = hashlib.sha256(data).hexdigest()
        elif layer.media_type in (MEDIA_INTOTO, MEDIA_DSSE):
            info.kind = "provenance"
            document = _json_object(data, f"attestation {descriptor.digest}")
            if layer.media_type == MEDIA_DSSE:
                info.signed = True
                signatures = document.get("signatures") or []
                info.key_id = (
                    str(signatures[0].get("keyid"))
                    if signatures and isinstance(signatures[0], dict)
                    else None
                )
                payload = envelope_payload(document)
                if public_key is not None:
                    try:
                        payload = verify_envelope(document, public_key)
                        info.signature = "valid"
                    except AttestationError as exc:
                        info.signature = "INVALID"
                        out.checks.append(Check("provenance signature", False, exc.message))
                else:
                    info.signature = "not checked"
                statement = _json_object(payload, "DSSE payload")
            else:
                statement = document
        out.infos.append(info)
        if statement is not None and (created or "") >= newest:
            newest, out.statement = created or "", statement
    return out


def _statement_checks(
    image: OpenedImage,
    statement: Mapping[str, Any],
    provenance: Mapping[str, Any],
    sbom_sha: str | None,
) -> list[Check]:
    subjects = {(s.get("digest") or {}).get("sha256") for s in statement.get("subject") or []}
    checks = [
        Check(
            "provenance subject",
            image.manifest_digest.removeprefix("sha256:") in subjects,
            "names this image's manifest digest"
            if image.manifest_digest.removeprefix("sha256:") in subjects
            else "names another image",
        )
    ]
    deps = (statement.get("predicate") or {}).get("buildDefinition", {}).get(
        "resolvedDependencies"
    ) or []
    recorded = {
        f"model:{m['name']}/{f['name']}": f["sha256"]
        for m in provenance.get("models") or []
        for f in m.get("files") or []
    }
    attested = {
        d.get("name"): (d.get("digest") or {}).get("sha256")
        for d in deps
        if str(d.get("name", "")).startswith("model:")
    }
    checks.append(
        Check(
            "provenance model digests",
            attested == recorded,
            "match provenance.json"
            if attested == recorded
            else f"attested {sorted(attested.items())} vs recorded {sorted(recorded.items())}",
        )
    )
    commit = next(
        (d.get("digest", {}).get("gitCommit") for d in deps if d.get("name") == "config"), None
    )
    recorded_commit = (provenance.get("config") or {}).get("commit")
    checks.append(
        Check(
            "provenance config commit",
            commit == recorded_commit,
            f"{short(commit, 12)} vs recorded {short(recorded_commit, 12)}",
        )
    )
    byproducts = (statement.get("predicate") or {}).get("runDetails", {}).get("byproducts") or []
    sbom_digest = next(
        (
            (b.get("digest") or {}).get("sha256")
            for b in byproducts
            if b.get("mediaType") == MEDIA_CYCLONEDX
        ),
        None,
    )
    if sbom_sha is not None and sbom_digest is not None:
        checks.append(
            Check(
                "SBOM digest",
                sbom_sha == sbom_digest,
                "matches the provenance byproduct"
                if sbom_sha == sbom_digest
                else f"SBOM {short(sbom_sha, 12)} is not the attested {short(sbom_digest, 12)}",
            )
        )
    return checks


def _release_for(
    provenance: Mapping[str, Any], digest: str, settings: Settings
) -> tuple[dict[str, Any] | None, str]:
    """The release record of this digest, read from the recorded config repository."""
    url = str((provenance.get("config") or {}).get("repository", ""))
    location = _local_location(url) or url.partition("#")[0]
    try:
        records, where = read_release_records(location, str(provenance.get("customer")), settings)
    except BuilderError as exc:
        return None, f"release records not read: {exc}"
    for record in records:
        if record.manifest_digest == digest:
            return {
                "path": record.path,
                "image": record.image,
                "built_at": record.built_at,
                "ci_url": record.ci_url,
            }, f"released as {record.image} ({where}: {record.path})"
    return None, f"no release record on {where} names this digest: not a recorded release"


def _local_location(url: str, repo: Path | None = None) -> str | None:
    """Where the recorded config repository is on this machine (file:// URLs, or ``repo``)."""
    from urllib.parse import unquote, urlsplit

    base, _, folder = url.partition("#")
    if repo is not None:
        root = repo
    elif base.startswith("file://"):
        root = Path(unquote(urlsplit(base).path))
    else:
        return None
    path = root / folder if folder else root
    return str(path) if path.exists() else None


def _file_checks(files: Sequence[ModelFileStatus]) -> list[Check]:
    """One check per recorded or unexpected model file."""
    checks = []
    for f in files:
        where = f"/app/models/{f.model}/{f.file}"
        if f.status == "ok":
            detail = f"sha256 {short(f.recorded_sha256, 12)} as recorded"
        elif f.status == "MODIFIED":
            detail = (
                f"MODIFIED: sha256 {short(f.image_sha256, 12)} in the image, "
                f"{short(f.recorded_sha256, 12)} recorded"
            )
        elif f.status == "MISSING":
            detail = "MISSING from the image"
        else:
            detail = "UNEXPECTED: not among the recorded model files"
        checks.append(Check(where, f.status == "ok", detail))
    return checks


def explain(
    reference: str,
    settings: Settings,
    *,
    public_key: Path | None = None,
    insecure: bool | None = None,
    image: OpenedImage | None = None,
) -> Explanation:
    """Read an image's provenance back and check its model files and attestations."""
    if public_key is not None:
        load_public_key(public_key)  # a bad key file is a usage error, before any download
    opened = image is None
    image = image or open_image(reference, settings, insecure=insecure)
    labels = image.labels
    if "com.ivd.customer" not in labels:
        shown = ", ".join(sorted(labels)[:4]) or "none"
        raise _not_ours(image, f"its config has no com.ivd.customer label (labels: {shown})")
    layers = own_layers(image)
    if not layers:
        raise _not_ours(image, "no layer of it was made by ivd-image-builder")
    found = scan_files(image, layers)
    provenance = _read_provenance(image, found)
    files = _file_statuses(provenance, found)
    checks = [Check("layer digest", False, p) for p in found.problems] + _file_checks(files)
    checks += _consistency_checks(image, provenance, found)
    descriptors, where = image.referrers()
    attested = _read_attestations(image, descriptors, public_key)
    checks += attested.checks
    if attested.statement is not None:
        checks += _statement_checks(image, attested.statement, provenance, attested.sbom_sha256)
    signatures = {a.signature for a in attested.infos}
    if public_key is not None and not signatures & {"valid", "INVALID"}:
        checks.append(Check("provenance signature", False, f"no signed provenance ({where})"))
    release, release_note = _release_for(provenance, image.manifest_digest, settings)
    metadata = ((attested.statement or {}).get("predicate") or {}).get("runDetails", {}).get(
        "metadata"
    ) or {}
    built_at, built_from = (
        metadata.get("finishedOn"),
        "provenance attestation" if metadata.get("finishedOn") else None,
    )
    if built_at is None and release and release.get("built_at"):
        built_at, built_from = release["built_at"], "release record"
    ci_url = metadata.get("invocationId") or (release or {}).get("ci_url")
    if opened and isinstance(image, ArchiveImage):
        image.close()
    return Explanation(
        image=image.what if image.kind != "registry" else reference,
        kind=image.kind,
        manifest_digest=image.manifest_digest,
        config_digest=image.config_digest,
        customer=str(provenance.get("customer")),
        provenance=provenance,
        base=base_of(labels, provenance),
        labels=labels,
        created=labels.get("org.opencontainers.image.created"),
        built_at=built_at,
        built_at_source=built_from,
        files=files,
        attestations=attested.infos,
        attestations_where=where,
        release=release,
        release_note=release_note,
        checks=checks,
        ci_url=ci_url,
    )


_CUSTOMER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def names_a_customer(target: str) -> bool:
    """True if ``target`` is a bare customer name rather than an image reference or a path."""
    return bool(_CUSTOMER_NAME.fullmatch(target)) and not Path(target).exists()


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
    source = open_source(customer, settings)
    spec = load_customer(_location(source), settings)
    records, where = read_release_records(_location(source), spec.customer, settings)
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
            f"customer {spec.customer}: no release record{limits} on {where} "
            f"({len(records)} records in all)",
            hint="explain an image by its reference (host/repo:tag or @sha256:...) instead",
        )
    record = chosen[-1]
    reference = f"{_repository_of(record.image)}@{record.manifest_digest}"
    now, note = _moving_tag_note(record, settings, insecure)
    return reference, {
        "customer": spec.customer,
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


# == verify ===================================================================================


@dataclass
class Verification:
    """``verify`` result: the recorded inputs, the rebuilt digest, and what differs."""

    image: str
    manifest_digest: str
    rebuilt_digest: str
    match: bool
    commit: str
    repository: str
    locked: bool
    base: dict[str, Any]
    differences: list[str]
    notes: list[str]
    explanation: Explanation


def _rebuild_location(provenance: Mapping[str, Any], repo: Path | None, settings: Settings) -> str:
    """A local path of the recorded customer folder, found or made from the record alone.

    ``--repo`` wins; else a recorded ``file://`` repository on this machine (a work tree, or a
    bare repository, also when the record dropped its ``.git`` suffix, which is cloned into the
    cache); else the recorded git URL is cloned or fetched into the cache with the same
    credential helper CI uses (BUILDER_GIT_TOKEN / CI_JOB_TOKEN, never in a URL).
    """
    from urllib.parse import unquote, urlsplit

    from builder.fleet import git_credentials
    from builder.load import _URL
    from builder.paths import safe_join

    url = str((provenance.get("config") or {}).get("repository", ""))
    base, _, folder = url.partition("#")
    if repo is not None:
        if not repo.is_dir():
            raise ConfigError(f"--repo {repo}: no such folder", hint=f"give a clone of {base}")
        root = repo
    elif base.startswith("file://"):
        path = Path(unquote(urlsplit(base).path))
        found = next((c for c in (path, path.with_name(f"{path.name}.git")) if c.exists()), None)
        if found is None:
            raise ConfigError(
                f"the config repository {url} is not on this machine",
                hint="pass --repo CLONE, or run verify where the repository is",
            )
        if git.Repo(found).bare:
            with git_credentials():
                root = open_source(found.as_uri(), settings).root
        else:
            root = Path(git.Repo(found, search_parent_directories=True).working_tree_dir or found)
    elif _URL.match(base):
        with git_credentials():
            root = open_source(base, settings).root
    else:
        raise ConfigError(
            f"the image records no usable config repository ({url!r})",
            hint="pass --repo CLONE of the repository the image was built from",
        )
    path = safe_join(root, folder, what="recorded customer folder") if folder else root
    if not path.is_dir():
        raise ConfigError(
            f"{path}: the recorded customer folder {folder!r} is not in {base}",
            hint="fetch the full history of the config repository",
        )
    return str(path)


def _recorded_production(provenance: Mapping[str, Any]) -> str | None:
    """The production store root the image's weights came from, read off its weights URIs
    (``<root>/<task id>/...``), when every registry model names the same root."""
    roots = set()
    for model in provenance.get("models") or []:
        uri, task = str(model.get("weights_uri") or ""), str(model.get("task_id") or "")
        if not model.get("registry_id") or not task or f"/{task}" not in uri:
            continue
        roots.add(uri[: uri.index(f"/{task}")])
    return roots.pop() if len(roots) == 1 else None


def _project_settings(location: str, settings: Settings, provenance: Mapping[str, Any]) -> Settings:
    """Settings for the rebuild that do not depend on the working directory: the project
    settings (builder.toml) of the recorded repository when it has them, else the caller's;
    the production store the image recorded; the caller's caches (weights are sha256-checked)."""
    from builder.settings import SETTINGS_FILE, load_settings

    start = Path(location).resolve()
    own = next(
        (f for f in (start, *start.parents) if (f / SETTINGS_FILE).is_file()),
        None,
    )
    chosen = settings
    if own is not None and str(own / SETTINGS_FILE) != settings.origin:
        chosen = replace(load_settings(cwd=own), cache_dir=settings.cache_dir)
    production = _recorded_production(provenance)
    if production is not None and production != chosen.production.rstrip("/"):
        chosen = replace(chosen, production=production)
    return chosen


def _rebuild_settings(settings: Settings, scratch: Path) -> Settings:
    """Settings whose image blob store is empty (every layer is re-tarred, none reused from the
    layer cache) while weights and clones come from the usual, sha256-verified caches."""
    for name in ("weights", "repos"):
        shared = settings.cache_dir / name
        shared.mkdir(parents=True, exist_ok=True)
        (scratch / name).symlink_to(shared, target_is_directory=True)
    return replace(settings, cache_dir=scratch, image_store=None)  # the store: scratch/oci


def _compare(
    original: OpenedImage, rebuilt: OpenedImage, theirs: ImageFiles, ours: ImageFiles
) -> list[str]:
    out = []
    if original.config_digest != rebuilt.config_digest:
        out.append(
            f"image config: {original.config_digest} in the image, {rebuilt.config_digest} rebuilt"
        )
    a_layers, b_layers = original.layers, rebuilt.layers
    if len(a_layers) != len(b_layers):
        out.append(f"layers: {len(a_layers)} in the image, {len(b_layers)} rebuilt")
    for i, (a, b) in enumerate(zip(a_layers, b_layers, strict=False)):
        if a.digest != b.digest:
            name = (
                b.annotations.get("com.ivd.layer.name")
                or a.annotations.get("com.ivd.layer.name")
                or f"base layer {i}"
            )
            out.append(
                f"layer {name}: {short(a.digest, 19)} in the image, {short(b.digest, 19)} rebuilt"
            )
    la, lb = original.labels, rebuilt.labels
    for key in sorted(set(la) | set(lb)):
        if la.get(key) != lb.get(key):
            out.append(f"label {key}: {la.get(key)!r} in the image, {lb.get(key)!r} rebuilt")
    for path in sorted(set(theirs.files) | set(ours.files)):
        a_file, b_file = theirs.files.get(path), ours.files.get(path)
        if a_file != b_file:
            out.append(
                f"/{path}: {short(a_file[0], 12) if a_file else 'absent'} in the image, "
                f"{short(b_file[0], 12) if b_file else 'absent'} rebuilt"
            )
    return out


_FORMAT_NOTE: Final = (
    "built with layer format {old} (model layers stamped with the config commit time, "
    "before model layers became shared blobs); rebuilt with format {old}, not {new}"
)


def recorded_layer_format(labels: Mapping[str, str]) -> int:
    """The layer format an image was written with: its label, or 1 for images that predate it.

    A format this builder cannot write is refused here, before any rebuild work.
    """
    raw = labels.get(LAYER_FORMAT_LABEL)
    if raw is None:
        return 1
    try:
        return check_layer_format(int(raw))
    except ValueError:
        raise ImageError(
            f"label {LAYER_FORMAT_LABEL}={raw!r} is not a layer format number",
            hint="the image was not made by ivd-image-builder or its config was altered",
        ) from None


def _rebuild_format(labels: Mapping[str, str], notes: list[str]) -> int:
    """The layer format to rebuild with (the image's own); a note when it is not the current."""
    layer_format = recorded_layer_format(labels)
    if layer_format != LAYER_FORMAT:
        notes.append(_FORMAT_NOTE.format(old=layer_format, new=LAYER_FORMAT))
    return layer_format


def _lock_usable(spec: CustomerSpec, settings: Settings, notes: list[str]) -> bool:
    """True if the recorded commit's lock can drive the rebuild; else a note says why not."""
    from builder.lock import models_from_lock, read_lock

    try:
        lock = read_lock(spec)
        if lock is not None:
            models_from_lock(spec, lock, production=settings.production)
            return True
    except ConfigError as exc:
        notes.append(
            f"lock not usable ({exc.message}); models resolved from the registry as it is now"
        )
        return False
    notes.append("no lock at that commit; models resolved from the registry as it is now")
    return False


def verify(
    reference: str,
    settings: Settings,
    *,
    repo: Path | None = None,
    insecure: bool | None = None,
) -> Verification:
    """Rebuild an image from its recorded commit, lock and base, and compare digests."""
    from builder.pipeline import BuildRequest, build

    image = open_image(reference, settings, insecure=insecure)
    explanation = explain(reference, settings, insecure=insecure, image=image)
    provenance = explanation.provenance
    config = provenance.get("config") or {}
    base = explanation.base
    if config.get("worktree"):
        raise ConfigError(
            f"{reference} was built from an uncommitted work tree (a development build); "
            "there is no commit to rebuild it from"
        )
    location = _rebuild_location(provenance, repo, settings)
    settings = _project_settings(location, settings, provenance)
    commit = str(config.get("commit"))
    try:
        _commit(open_source(location, settings), commit)
        spec = load_customer(location, settings, ref=commit)
    except ConfigError as exc:
        raise ConfigError(
            f"cannot read the recorded config commit {short(commit, 12)} from {location}: {exc.message}",
            hint="fetch the full history of the config repository",
        ) from None
    notes = []
    if spec.commit != commit:
        notes.append(
            f"{short(commit, 12)} is not a commit of the customer folder; read {short(spec.commit, 12)}"
        )
    locked = _lock_usable(spec, settings, notes)
    builder_version = (provenance.get("builder") or {}).get("version")
    if builder_version != __version__:
        notes.append(f"built by ivd-image-builder {builder_version}; rebuilding with {__version__}")
    layer_format = _rebuild_format(image.labels, notes)
    request = BuildRequest(
        customer=location,
        ref=commit,
        locked=locked,
        allow_unpublished=bool(provenance.get("development_build")),
        base_version=str(base.get("version")),
        base_repository=str(base.get("repository")),
        variant=image.labels.get("com.ivd.runner.variant") or None,  # inherited from the base
        insecure=insecure,
        layer_format=layer_format,
    )
    with tempfile.TemporaryDirectory(prefix="verify-", dir=_scratch_parent(settings)) as tmp:
        report = build(request, _rebuild_settings(settings, Path(tmp)))
        rebuilt = LayoutImage(Path(tmp) / "oci", digest=report.manifest_digest)
        match = report.manifest_digest == image.manifest_digest
        differences: list[str] = []
        if report.base.get("digest") != base.get("digest"):
            differences.append(
                f"base image: built on {base.get('repository')}:{base.get('version')}@{base.get('digest')}, "
                f"which now resolves to {report.base.get('digest')}"
            )
        if not match:
            image_files = scan_files(image, own_layers(image))
            rebuilt_files = scan_files(rebuilt, own_layers(rebuilt))
            differences += _compare(image, rebuilt, image_files, rebuilt_files)
            if not differences:
                differences.append("manifest differs only in its annotations or media types")
    if isinstance(image, ArchiveImage):
        image.close()
    return Verification(
        image=reference,
        manifest_digest=image.manifest_digest,
        rebuilt_digest=report.manifest_digest,
        match=match,
        commit=commit,
        repository=str(config.get("repository")),
        locked=locked,
        base=base,
        differences=differences,
        notes=notes,
        explanation=explanation,
    )


def _scratch_parent(settings: Settings) -> Path:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return settings.cache_dir


# == the audit report ========================================================================


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
    reference = f"{_repository_of(record.image)}@{record.manifest_digest}"
    try:
        image = open_image(reference, settings)
        descriptors, where = image.referrers()
        attested = _read_attestations(image, descriptors, None)
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
    """``verify`` of a released image: MATCH, MISMATCH with the first difference, or why not."""
    reference = f"{_repository_of(record.image)}@{record.manifest_digest}"
    try:
        result = verify(reference, settings)
    except BuilderError as exc:
        return {"state": "not verified", "detail": exc.message}
    if result.match:
        return {"state": "MATCH", "detail": f"rebuilt {short(result.rebuilt_digest, 19)}"}
    return {"state": "MISMATCH", "detail": "; ".join(result.differences[:3])}


def _repository_of(image: str) -> str:
    """``host/repo`` of ``host/repo:tag`` or ``host/repo@sha256:...``."""
    head = image.partition("@")[0]
    repo, _, tag = head.rpartition(":")
    return repo if repo and "/" not in tag else head


def unrecorded_tags(
    customer: str, records: Sequence[ReleaseRecord], settings: Settings
) -> tuple[list[dict[str, str]], list[str]]:
    """Tags in the customer's image repositories whose image no release record names (pushed
    outside a release: a development build, a manual push), and what could not be read."""
    from builder.oci import RegistryClient, parse_reference

    repositories = {_repository_of(r.image) for r in records} or {
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
    tip = _commit(source, ref).hexsha
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
    import jinja2

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
    from builder.fsutil import write_atomic

    data = report_data(location, settings, ref=ref, verify_releases=verify_releases)
    write_atomic(output, render_report(data).encode("utf-8"))
    return data


__all__ = [
    "AUDIT_FAILED",
    "Change",
    "ConfigDiff",
    "Explanation",
    "History",
    "ReleaseRecord",
    "Verification",
    "diff",
    "diff_configs",
    "explain",
    "history",
    "read_release_records",
    "report_data",
    "verify",
    "write_report",
]
