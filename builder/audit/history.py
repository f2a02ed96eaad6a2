"""History and diff of a customer's configuration, compared in resolved terms.

Model ids, tasks, weights, thresholds and the base image rather than text; each revision with
its reason (the commit message), the approval that covers it and the release records that
name it. Revisions are named by git refs, release tags or image references alike; an old
revision that today's validation refuses is read as written and says so, rather than being
called broken."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Final

import git
import yaml

from builder.audit.approvals import (
    ApprovalStatus,
    Coverage,
    coverage,
    reason,
    review_of,
    revision_graph,
)
from builder.audit.records import find_release, read_release_records
from builder.audit.text import base_of, short
from builder.contracts import CustomerSpec, RepoSource, ResolvedModel
from builder.cook.load import CUSTOMER_FILE, LOCK_FILE, KnownRevision, load_customer, open_source
from builder.cook.lock import StaleLockError, models_from_lock, read_lock
from builder.cook.registries.opener import open_registry
from builder.cook.resolve import resolve
from builder.cook.storage import open_store
from builder.documents.lock import Lock
from builder.documents.release_record import ReleaseRecord
from builder.errors import BuilderError, ConfigError, ImageError
from builder.image.contents import open_image
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
    reason: str = ""  # the whole message without trailers: why the change was made


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
    #: The base image a release of this revision shipped on (repository, version, digest), when
    #: the revision was named by a release or an image; the lock's ``base`` is what was pinned.
    shipped: dict[str, Any] | None = None


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


def _analyses_view(analysis_doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for analysis in analysis_doc["analyses"]:
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


def recorded_store(lock: Lock) -> str | None:
    """The production store a lock's registry models lie in (``<store>/<task id>/...``), when
    they all name the same one."""
    roots = {
        m.weights_uri[: m.weights_uri.index(f"/{m.task_id}/")]
        for m in lock.models.values()
        if m.sourcing != "manual" and m.task_id and f"/{m.task_id}/" in m.weights_uri
    }
    return roots.pop() if len(roots) == 1 else None


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

    def _locked(self, spec: CustomerSpec, lock: Lock) -> tuple[ResolvedModel, ...]:
        """The models a lock pins. Read, not fetched: weights pinned in another production
        store than this machine's setting (or with none set, as on a reviewer's laptop) are
        read against the store the lock itself names."""
        anchor = self.settings.root
        try:
            return models_from_lock(
                spec, lock, production=self.settings.production, store_base=anchor
            )
        except StaleLockError:
            raise
        except ConfigError:
            recorded = recorded_store(lock)
            if recorded is None or recorded == self.settings.production:
                raise
            return models_from_lock(spec, lock, production=recorded, store_base=anchor)

    def config(self, spec: CustomerSpec) -> ResolvedConfig:
        """The resolved configuration of ``spec`` (lock first, then the registry)."""
        notes: list[str] = []
        lock: Lock | None = None
        models: tuple[ResolvedModel, ...] | None = None
        how = "lock"
        try:
            lock = read_lock(spec)
            if lock is not None:
                models = self._locked(spec, lock)
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
            analyses=_analyses_view(spec.analysis),
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
    #: In a diff over several revisions: the revisions that made this change (their reasons and
    #: approvals are in the diff's ``revisions``).
    revisions: tuple[str, ...] = ()

    @property
    def topic(self) -> tuple[str, ...]:
        """What the change is about, the same for every step of it (a model slot, a setting)."""
        if self.kind.startswith("model-") and self.kind != "model-setting":
            return ("model", self.subject)
        if self.kind.startswith("base"):
            return (self.kind,)
        return (self.kind.split("-")[0], self.subject, self.lead or self.text)


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


def _id(value: Any) -> Any:
    """A registry id compared by identity, not spelling: a UUID written with dashes or in upper
    case is the same model as its 32-hex form (configs written before that form was required)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F-]{32,36}", value):
        return value.replace("-", "").lower()
    return value


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
    if (_id(a.get("model_id")), a.get("sourcing")) != (_id(b.get("model_id")), b.get("sourcing")):
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
                lead="base constraint",
                was=a.base_constraint,
                now=b.base_constraint,
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
    return out + _base_changes(a, b)


def _base_changes(a: ResolvedConfig, b: ResolvedConfig) -> list[Change]:
    """The base image: what shipped when both sides are releases, else what the lock pinned."""
    if a.shipped and b.shipped:
        return _pin_changes("base-shipped", "base shipped", a.shipped, b.shipped)
    return _pin_changes("base", "base pinned", a.base, b.base)


def _pin_changes(
    kind: str, lead: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> list[Change]:
    """``base pinned 2.4.1 -> 2.5.0``; a first pin, a dropped pin or a moved digest said so."""
    pin_a = (old or {}).get("version"), (old or {}).get("digest")
    pin_b = (new or {}).get("version"), (new or {}).get("digest")
    if pin_a == pin_b or not (old or new):
        return []
    if old is None:
        return [Change(kind, "base", f"{lead} {_base_text(new)}", None, new)]
    if new is None:
        return [Change(kind, "base", f"{lead}: none (was {_base_text(old)})", old, None)]
    if pin_a[0] == pin_b[0]:  # same version, another digest: the version's tag was moved
        lead = f"{lead} {pin_a[0]} digest"
        was, now = short(pin_a[1], 12), short(pin_b[1], 12)
    else:
        was, now = str(pin_a[0]), str(pin_b[0])
    return [Change(kind, "base", f"{lead} {was} -> {now}", old, new, lead=lead, was=was, now=now)]


# == revisions: git refs, releases and images ==================================================


def find_commit(source: RepoSource, ref: str) -> git.Commit:
    """The commit ``ref`` names in the customer repo, or one ConfigError line.

    ``git rev-parse --verify`` also refuses a well-formed sha that is not in the repository,
    which gitpython's lazy ``repo.commit`` only notices later.
    """
    found = _git_commit(git.Repo(source.root), ref)
    if found is None:
        raise ConfigError(
            f"{source.location}: ref {ref!r} does not exist",
            hint="use a branch, tag or commit of the customer repo",
        )
    return found


def location_of(source: RepoSource) -> str:
    """A location that opens the same source again without re-cloning or fetching (a folder
    of a repository without a work tree, such as a bare one, as ``<repository>#<folder>``)."""
    if not source.subdir:
        return str(source.root)
    folder = source.root / source.subdir
    return str(folder) if folder.is_dir() else f"{source.root}#{source.subdir}"


def _git_commit(repo: git.Repo, ref: str) -> git.Commit | None:
    if ref.startswith("-"):
        return None
    try:
        return repo.commit(repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}"))
    except (git.GitCommandError, ValueError):
        return None


def _folder_commit(repo: git.Repo, commit: str, subdir: str) -> str | None:
    """The customer folder's revision at ``commit``: the last commit that touched it."""
    if not subdir:
        return commit
    found = next(repo.iter_commits(commit, paths=subdir, max_count=1), None)
    return found.hexsha if found is not None else None


@dataclass(frozen=True)
class Point:
    """A revision as a reviewer named it: a git ref, a release (its tag, image or digest) or
    an image reference; ``commit`` is the customer folder's revision there."""

    named: str
    commit: str
    via: str  # "git" | "release" | "image"
    release: ReleaseRecord | None = None
    image: str | None = None  # the image reference, for a release or an image
    shipped: dict[str, Any] | None = None  # the base the release or image shipped on


@dataclass
class Customer:
    """An opened customer repository: its folder, git, name and release records."""

    source: RepoSource
    repo: git.Repo
    name: str
    records: list[ReleaseRecord]
    records_where: str
    settings: Settings

    def point(self, named: str, *, insecure: bool | None = None) -> Point:
        """Resolve a git ref, a release tag or an image reference to a folder revision."""
        found = _git_commit(self.repo, named)
        if found is not None:
            commit = _folder_commit(self.repo, found.hexsha, self.source.subdir)
            if commit is None:
                raise ConfigError(
                    f"{self.source.location}: folder {self.source.subdir!r} is not in git at "
                    f"{named!r}",
                    hint="name a later revision",
                )
            return Point(named, commit, "git")
        record = find_release(self.records, named)
        if record is None:
            return self._image_point(named, insecure)
        return Point(named, self._recorded_commit(record.config_commit, named), "release",
                     release=record, image=record.image, shipped=dict(record.base))  # fmt: skip

    def _image_point(self, named: str, insecure: bool | None) -> Point:
        if not _IMAGE_LIKE.search(named):
            raise ConfigError(
                f"{self.source.location}: {named!r} does not exist: it is neither a ref of the "
                f"customer repository nor a release of {self.name} ({len(self.records)} "
                f"recorded on {self.records_where})",
                hint="use a branch, tag or commit, a release tag such as "
                f"{_example_tag(self.records)}, or an image reference",
            )
        image = open_image(named, self.settings, insecure=insecure)
        labels = image.labels
        customer = labels.get("com.ivd.customer")
        commit = labels.get("org.opencontainers.image.revision")
        if customer is None or commit is None:
            raise ImageError(
                f"{image.what} was not built by ivd-image-builder (no com.ivd.customer or "
                "org.opencontainers.image.revision label)"
            )
        if customer != self.name:
            raise ConfigError(f"{named} is an image of {customer}, not of {self.name}")
        record = next((r for r in self.records if r.manifest_digest == image.manifest_digest), None)
        return Point(named, self._recorded_commit(commit, named), "release" if record else "image",
                     release=record, image=named, shipped=base_of(labels, None))  # fmt: skip

    def _recorded_commit(self, commit: str, named: str) -> str:
        if _git_commit(self.repo, commit) is None:
            raise ConfigError(
                f"{named} was built from config commit {short(commit, 12)}, which "
                f"{self.source.location} does not have",
                hint="fetch the full history of the config repository",
            )
        return commit

    def load(self, commit: str) -> CustomerSpec:
        """The customer's configuration at a folder revision (no second open or fetch)."""
        known = KnownRevision(self.source, self.repo, commit)
        return load_customer(self.source.location, self.settings, ref=commit, known=known)


_IMAGE_LIKE: Final = re.compile(r"[/@]|^(oci|docker-archive|oci-archive):")


def _example_tag(records: Sequence[ReleaseRecord]) -> str:
    return records[-1].image.rpartition(":")[2] if records else "2.5.0-1a2b3c4d5e6f"


def open_customer(location: str, settings: Settings) -> Customer:
    """Open a customer location (folder, name under the customers folder, git URL[#folder])
    with its release records."""
    source = open_source(location, settings)
    repo = git.Repo(source.root)
    head = _folder_commit(repo, "HEAD", source.subdir) if _git_commit(repo, "HEAD") else None
    if head is None:
        raise ConfigError(f"{source.location}: no commits touch the customer folder")
    customer = Customer(source, repo, "", [], "", settings)
    customer.name = _customer_name(customer, head)
    customer.records, customer.records_where = read_release_records(source, customer.name, settings)
    return customer


def _customer_name(customer: Customer, head: str) -> str:
    """The ``customer`` of customer.yaml at the folder's newest revision (read as written when
    today's rules refuse it), else the folder's name."""
    try:
        return customer.load(head).customer
    except BuilderError:
        written = _written(customer.repo, head, customer.source.subdir, CUSTOMER_FILE)
        name = written.get("customer") if isinstance(written, dict) else None
        return str(name or PurePosixPath(customer.source.subdir or customer.source.url).name)


# == revisions read as written ================================================================


def _blob(repo: git.Repo, commit: str, subdir: str, name: str) -> bytes | None:
    """A file of the folder at ``commit``, or None."""
    path = PurePosixPath(subdir, name).as_posix() if subdir else name
    try:
        return bytes(repo.commit(commit).tree[path].data_stream.read())
    except (KeyError, ValueError, git.GitCommandError):
        return None


def _written(repo: git.Repo, commit: str, subdir: str, name: str) -> Any:
    """A YAML file of the folder at ``commit`` as written (no schema), or None."""
    raw = _blob(repo, commit, subdir, name)
    try:
        return yaml.safe_load(raw) if raw is not None else None
    except yaml.YAMLError:
        return None


@dataclass
class _AsWritten:
    config: ResolvedConfig
    locked: bool  # its committed lock matches its files: the builder of its time accepted it


def _as_written(customer: Customer, commit: str, refused: str) -> _AsWritten | None:
    """A revision today's validation refuses, read as it was written: models from its lock
    (else as declared), features and settings from its analysis file. None if even that fails."""
    repo, subdir = customer.repo, customer.source.subdir
    spec = _written(repo, commit, subdir, CUSTOMER_FILE)
    try:
        analysis_path = str(spec.get("analysis", "analysis.yaml"))
        analysis = _written(repo, commit, subdir, analysis_path)
        lock = _written(repo, commit, subdir, LOCK_FILE) or {}
        locked = lock.get("models") or {}
        declared = {
            name: entry
            for item in analysis["analyses"]
            for name, entry in (item.get("models") or {}).items()
        }
        models = {
            name: _written_model(locked[name]) if name in locked else
            {"sourcing": entry.get("sourcing"), "model_id": entry.get("reference"), "weights": {}}
            for name, entry in declared.items()
        }  # fmt: skip
        files = {
            name: hashlib.sha256(_blob(repo, commit, subdir, name) or b"").hexdigest()
            for name in (CUSTOMER_FILE, analysis_path)
        }
        base = lock.get("base_image") or {}
        config = ResolvedConfig(
            commit=commit,
            customer=str(spec.get("customer")),
            base_constraint=str(spec["base_image"]["version"]),
            base_repository=spec["base_image"].get("repository"),
            base=dict(base) if base.get("digest") else None,
            models=models,
            analyses=_analyses_view(analysis),
            resolved_from="lock" if locked else "config",
            notes=[f"read as written: today's validation refuses it ({refused})"],
        )
        return _AsWritten(config, bool(locked) and lock.get("inputs") == files)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _written_model(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A lock entry in the terms of :func:`_model_view` (no dir hash: not re-computed)."""
    files = entry.get("files") or []
    return {
        "sourcing": entry.get("sourcing"),
        "model_id": entry.get("model_id"),
        "registry_name": entry.get("registry_name"),
        "task_id": entry.get("task_id"),
        "weights": {f["name"]: f.get("sha256") for f in files},
        "dir_hash": None,
        "preprocessing": list(entry.get("preprocessing") or []),
        "postprocessing": list(entry.get("postprocessing") or []),
        "params": dict(entry.get("params") or {}),
    }


# == history ===================================================================================


def _revision(commit: git.Commit, subdir: str) -> Revision:
    prefix = f"{subdir}/" if subdir else ""
    files = tuple(
        sorted(
            str(path).removeprefix(prefix)
            for path in commit.stats.files
            if not prefix or str(path).startswith(prefix)
        )
    )
    message = str(commit.message).strip()
    return Revision(
        commit=commit.hexsha,
        date=datetime.fromtimestamp(commit.authored_date, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        author=str(commit.author.name),
        message=message.splitlines()[0] if message else "",
        files=files,
        reason=reason(message),
    )


@dataclass
class HistoryEntry:
    """One configuration revision: what changed, why, who approved it, what was released."""

    revision: Revision
    config: ResolvedConfig | None
    changes: list[Change]
    releases: list[ReleaseRecord]
    error: str | None = None  # the revision could not be read at all
    #: Today's validation refuses the revision (a rule newer than it): it is read as written.
    refused: str | None = None
    approval: Coverage | None = None
    locked_then: bool = False  # its lock matches its files: the builder of its time accepted it

    @property
    def rule_note(self) -> str | None:
        """The plain sentence for a revision that today's validation refuses: written before
        the rule when the builder of its time accepted it (released, or locked), else said
        without judging."""
        if self.refused is None:
            return None
        if self.releases or self.locked_then:
            evidence = "was released" if self.releases else "was locked by it"
            return (
                "written before a rule this builder applies today (it passed the checks of its "
                f"time and {evidence}); shown as written. Today's rule: {self.refused}"
            )
        return f"today's validation refuses this revision; shown as written: {self.refused}"


@dataclass
class History:
    """A customer's configuration timeline, oldest first, and its release records."""

    customer: str
    repository: str
    ref: str
    entries: list[HistoryEntry]
    releases: list[ReleaseRecord]
    problems: list[str]  # release records that do not fit the history
    records_where: str = ""

    @property
    def unapproved(self) -> list[HistoryEntry]:
        """Released changes that no approval covers."""
        return [
            e for e in self.entries if e.approval and e.approval.status == ApprovalStatus.UNAPPROVED
        ]


class _Walker:
    """Reads revisions in order and diffs each against its parent revision's configuration."""

    def __init__(self, customer: Customer) -> None:
        self.customer = customer
        self.resolver = Resolver(customer.settings)
        self.configs: dict[str, ResolvedConfig] = {}

    def read(self, commit: str) -> HistoryEntry:
        """A folder revision's configuration (no changes yet), read as written when today's
        validation refuses it."""
        entry = HistoryEntry(
            _revision(self.customer.repo.commit(commit), self.customer.source.subdir), None, [], []
        )
        try:
            entry.config = self.resolver.config(self.customer.load(commit))
        except ConfigError as exc:
            entry.refused = exc.message
            written = _as_written(self.customer, commit, exc.message)
            if written is None:
                entry.error = exc.message
            else:
                entry.config, entry.locked_then = written.config, written.locked
        except BuilderError as exc:
            entry.error = str(exc)
        if entry.config is not None:
            self.configs[commit] = entry.config
        return entry

    def entry(
        self, commit: str, parents: Sequence[str], previous: ResolvedConfig | None
    ) -> HistoryEntry:
        """A revision with what changed since its parent revision (else ``previous``)."""
        entry = self.read(commit)
        if entry.config is not None:
            before = next((self.configs[p] for p in parents if p in self.configs), previous)
            config = entry.config
            entry.changes = diff_configs(before, config) if before is not None else _initial(config)
        return entry


def _approvals(
    customer: Customer, graph: Mapping[str, Sequence[str]], tip: str
) -> dict[str, Coverage]:
    reviews = {c: review_of(customer.repo, c, tip) for c in graph}
    return coverage(graph, reviews, customer.records)


def history(
    location: str, settings: Settings, *, ref: str = "HEAD", customer: Customer | None = None
) -> History:
    """The customer's config revisions at ``ref`` (a git ref, release tag or image), each with
    its changes, reason, covering approval and releases."""
    customer = customer or open_customer(location, settings)
    point = customer.point(ref)
    repo, subdir = customer.repo, customer.source.subdir
    graph = revision_graph(repo, [point.commit], subdir)
    walker = _Walker(customer)
    entries: list[HistoryEntry] = []
    previous: ResolvedConfig | None = None
    for sha in reversed(graph):
        entry = walker.entry(sha, graph[sha], previous)
        entries.append(entry)
        previous = entry.config or previous
    approvals = _approvals(customer, graph, _branch_tip(customer, ref, point))
    by_commit = {e.revision.commit: e for e in entries}
    for entry in entries:
        entry.approval = approvals.get(entry.revision.commit)
    problems = []
    for record in customer.records:
        if record.config_commit in by_commit:
            by_commit[record.config_commit].releases.append(record)
        else:
            problems.append(
                f"{customer.records_where}: {record.path}: config commit "
                f"{short(record.config_commit, 12)} is not a revision of "
                f"{customer.source.location} at {ref}"
            )
    return History(
        customer.name, customer.source.url, ref, entries, customer.records, problems,
        customer.records_where,
    )  # fmt: skip


def _branch_tip(customer: Customer, ref: str, point: Point) -> str:
    """Where merge commits are looked for: the branch ``ref`` names, else the repository's
    HEAD when it contains the revision (a release or image of it), else the revision."""
    named = _git_commit(customer.repo, ref)
    if named is not None:
        return named.hexsha
    head = _git_commit(customer.repo, "HEAD")
    if head is not None and customer.repo.is_ancestor(customer.repo.commit(point.commit), head):
        return head.hexsha
    return point.commit


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
    return out + _pin_changes("base", "base pinned", None, config.base)


# == diff ======================================================================================


@dataclass
class ConfigDiff:
    """``diff`` result: the two revisions, what changed between them, and the revisions that
    made the changes, each with its reason and the approval that covers it."""

    customer: str
    a: Revision
    b: Revision
    config_a: ResolvedConfig
    config_b: ResolvedConfig
    changes: list[Change]
    point_a: Point | None = None
    point_b: Point | None = None
    revisions: list[HistoryEntry] = field(default_factory=list)  # oldest first

    @property
    def unapproved(self) -> list[HistoryEntry]:
        """The revisions of the diff that no approval covers, for the reviewer to chase."""
        return [e for e in self.revisions if e.approval and not e.approval.covered]


def diff(
    location: str,
    settings: Settings,
    rev_a: str,
    rev_b: str,
    *,
    branch: str = "HEAD",
    customer: Customer | None = None,
    insecure: bool | None = None,
) -> ConfigDiff:
    """Semantic diff of the resolved configurations at two revisions (git refs, release tags or
    image references) of the customer folder, each change with the revisions that made it."""
    customer = customer or open_customer(location, settings)
    points = [customer.point(rev, insecure=insecure) for rev in (rev_a, rev_b)]
    walker = _Walker(customer)
    sides = []
    for point in points:
        read = walker.read(point.commit)
        if read.config is None:
            raise ConfigError(f"{point.named}: revision {short(point.commit, 12)}: {read.error}")
        sides.append((read.revision, replace(read.config, shipped=point.shipped)))
    (a, config_a), (b, config_b) = sides
    changes = diff_configs(config_a, config_b)
    between = _between(customer, walker, points[0].commit, points[1].commit, branch)
    steps = {e.revision.commit: {c.topic for c in e.changes} for e in between}
    changes = [
        replace(c, revisions=tuple(s for s, topics in steps.items() if c.topic in topics))
        for c in changes
    ]
    return ConfigDiff(config_b.customer, a, b, config_a, config_b, changes, points[0], points[1],
                      between)  # fmt: skip


def _between(
    customer: Customer, walker: _Walker, old: str, new: str, branch: str
) -> list[HistoryEntry]:
    """The revisions after ``old`` up to ``new``, oldest first, with their own changes and the
    approvals that cover them (judged on ``branch``, with every release)."""
    repo, subdir = customer.repo, customer.source.subdir
    tip = _git_commit(repo, branch)
    tips = [new] + ([tip.hexsha] if tip is not None else [])
    graph = revision_graph(repo, tips, subdir)
    span = revision_graph(repo, [new, f"^{old}"], subdir) if old != new else {}
    approvals = _approvals(customer, graph, tips[-1])
    entries: list[HistoryEntry] = []
    if old not in walker.configs:
        walker.read(old)
    previous = walker.configs.get(old)
    for sha in reversed(span):
        entry = walker.entry(sha, graph.get(sha, ()), previous)
        entry.approval = approvals.get(sha)
        entry.releases = [r for r in customer.records if r.config_commit == sha]
        entries.append(entry)
        previous = entry.config or previous
    return entries


# == a release's review ========================================================================


@dataclass
class ReleaseReview:
    """What a release changed since the previous release of the customer, why (each revision's
    reason), and the approvals that cover those changes; the changes none covers."""

    release: ReleaseRecord
    previous: ReleaseRecord | None
    changes: list[Change]
    revisions: list[HistoryEntry]  # oldest first

    @property
    def approvals(self) -> list[str]:
        """Everyone who approved a change of this release (trailers), then merge requests."""
        found = [a.text for e in self.revisions if e.approval for a in e.approval.approvals]
        requests = [
            f"merge request {m}"
            for e in self.revisions
            if e.approval
            for m in e.approval.merge_requests
        ]
        return list(dict.fromkeys(found + requests))

    @property
    def unapproved(self) -> list[HistoryEntry]:
        """The revisions of the release that no approval covers, for the reviewer to chase."""
        return [e for e in self.revisions if e.approval and not e.approval.covered]


def release_review(customer: Customer, record: ReleaseRecord) -> ReleaseReview:
    """The review of one release: a diff from the previous release (by build time) when there
    is one, else the whole history up to it."""
    earlier = [r for r in customer.records if (r.built_at, r.path) < (record.built_at, record.path)]
    tag = record.image.rpartition(":")[2]
    if earlier:
        previous = earlier[-1]
        found = diff(
            customer.source.location, customer.settings,
            previous.manifest_digest, record.manifest_digest, customer=customer,
        )  # fmt: skip
        return ReleaseReview(record, previous, found.changes, found.revisions)
    hist = history(customer.source.location, customer.settings, ref=tag, customer=customer)
    changes = [c for e in hist.entries for c in e.changes]
    return ReleaseReview(record, None, changes, hist.entries)
