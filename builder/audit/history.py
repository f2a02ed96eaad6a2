"""History and diff of a customer's configuration, compared in resolved terms.

Model ids, tasks, weights, thresholds and the base image rather than text; each revision
with the release records that name it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import git

from builder.audit.records import read_release_records
from builder.audit.text import short
from builder.contracts import CustomerSpec, RepoSource, ResolvedModel
from builder.cook.load import _URL, load_customer, open_source
from builder.cook.lock import models_from_lock, read_lock
from builder.cook.registries.opener import open_registry
from builder.cook.resolve import resolve
from builder.cook.storage import open_store
from builder.documents.lock import Lock
from builder.documents.release_record import ReleaseRecord
from builder.errors import BuilderError, ConfigError
from builder.image.provenance import dir_hash
from builder.settings import Settings


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
    return {
        "sourcing": m.sourcing,
        "model_id": m.model_id,
        "registry_name": m.registry_name,
        "task_id": m.task_id,
        "weights": {f.name: f.sha256 for f in m.files},
        "dir_hash": dir_hash(m) if all(f.sha256 for f in m.files) else None,
        "preprocessing": [p.to_dict() for p in m.preprocessing],
        "postprocessing": [p.to_dict() for p in m.postprocessing],
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
        notes: list[str] = []
        lock: Lock | None = None
        models: tuple[ResolvedModel, ...] | None = None
        how = "lock"
        try:
            lock = read_lock(spec)
            if lock is not None:
                models = models_from_lock(
                    spec,
                    lock,
                    production=self.settings.production,
                    store_base=self.settings.root,
                )
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
        base = lock.base_image.to_dict() if lock and lock.base_image else None
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


def find_commit(source: RepoSource, ref: str) -> git.Commit:
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


def location_of(source: RepoSource) -> str:
    """A location that opens the same source again without re-cloning or fetching (a folder
    of a repository without a work tree, such as a bare one, as ``<repository>#<folder>``)."""
    if not source.subdir:
        return str(source.root)
    folder = source.root / source.subdir
    return str(folder) if folder.is_dir() else f"{source.root}#{source.subdir}"


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
    source = open_source(location, settings)
    repo = git.Repo(source.root)
    tip = find_commit(source, ref)
    kwargs: dict[str, Any] = {"paths": source.subdir} if source.subdir else {}
    commits = list(reversed(list(repo.iter_commits(tip, **kwargs))))
    if not commits:
        raise ConfigError(f"{source.location}: no commits touch the customer folder at {ref!r}")
    resolver = Resolver(settings)
    entries: list[HistoryEntry] = []
    previous: ResolvedConfig | None = None
    again = location_of(source)
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
    again, resolver = location_of(source), Resolver(settings)
    sides = []
    for ref in (rev_a, rev_b):
        find_commit(source, ref)
        spec = load_customer(again, settings, ref=ref)  # the folder's last commit at ref
        commit = git.Repo(source.root).commit(spec.commit)
        sides.append((_revision(commit, source.subdir), resolver.config(spec)))
    (a, config_a), (b, config_b) = sides
    return ConfigDiff(config_b.customer, a, b, config_a, config_b, diff_configs(config_a, config_b))
