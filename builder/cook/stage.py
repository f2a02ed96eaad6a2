"""Config cooking: load -> resolve (or read the lock) -> release gates -> expand, and `lock`.

The first half of the main job, shared by `validate`, `expand`, `lock` and `build`.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from builder import yamldoc
from builder.contracts import BaseImageRef, CustomerSpec, Progress, ResolvedModel
from builder.cook.expand import expand, located_weights_uri
from builder.cook.fetch import Cache, fetch
from builder.cook.load import (
    LOCK_FILE,
    load_customer,
    read_committed_file,
    shown_files,
    work_tree_changes,
)
from builder.cook.lock import diff_locks, make_lock, models_from_lock, parse_lock, read_lock, render
from builder.cook.registries import ModelRecord, ModelRegistry, TaskRecord
from builder.cook.registries.opener import open_registry
from builder.cook.resolve import release_blockers, resolve
from builder.cook.storage import open_store
from builder.documents.lock import Lock
from builder.errors import ConfigError, DriftError, RegistryError, ReleaseGateError
from builder.fsutil import write_atomic
from builder.settings import Settings


@dataclass(frozen=True)
class Cooked:
    """A customer's config, resolved; expanded on first use (``verbose``), once per model set."""

    spec: CustomerSpec
    models: tuple[ResolvedModel, ...]
    development: bool  # release gates were waived (--allow-unpublished) and something failed them
    warnings: tuple[str, ...] = ()
    lock: Lock | None = field(default=None)  # the committed lock, when one was used
    lock_sha256: str | None = None  # sha256 of that lock file's bytes (the attestation names it)
    store_base: Path = Path()  # anchors relative file: weight URIs (Settings.root)

    @cached_property
    def verbose(self) -> dict[str, Any]:
        """The verbose analysis config of these models (expanded once, then kept)."""
        return expand(self.spec, self.models)

    @cached_property
    def verbose_yaml(self) -> bytes:
        """The verbose config's bytes, as the image carries them."""
        return yamldoc.dump(self.verbose)

    @cached_property
    def located(self) -> Cooked:
        """This config as an image records it: each model's weights by
        :func:`~builder.cook.expand.located_weights_uri` (no production store spelling)."""
        return self.with_models(
            tuple(replace(m, weights_uri=located_weights_uri(m)) for m in self.models)
        )

    def with_models(self, models: tuple[ResolvedModel, ...]) -> Cooked:
        """This config with ``models`` (fetched: every sha256 and size known); itself, with its
        expansion kept, when they are the same models."""
        return self if models == self.models else replace(self, models=models)


def cook(
    customer: str,
    settings: Settings,
    *,
    ref: str | None = "HEAD",
    worktree: bool = False,
    locked: bool = False,
    allow_unpublished: bool = False,
    registry: Callable[[], ModelRegistry] | None = None,
) -> Cooked:
    """Load, resolve (from the registry, or the committed lock when ``locked``), gate, expand.
    ``ref=None``: what is on disk (the work tree when the customer folder has uncommitted
    changes, said in the warnings), as `expand` and `lock` read it."""
    spec = load_customer(customer, settings, ref=ref, worktree=worktree)
    raw_lock = read_committed_file(spec, LOCK_FILE) if locked else None
    lock = parse_lock(raw_lock, spec) if raw_lock is not None else None
    if locked:
        if lock is None:  # exit 7 like every release build without a lock
            raise DriftError(
                f"{spec.source.location}: no {LOCK_FILE} committed at {spec.ref}",
                hint="run `builder lock` and commit it, or build without --locked",
            )
        models = models_from_lock(
            spec, lock, production=settings.production, store_base=settings.root
        )
    else:
        needs_registry = any(d.sourcing == "auto" for d in spec.models)
        reg: ModelRegistry | None = (
            _LocatedRegistry((registry or (lambda: open_registry(settings.model_registry)))(), spec)
            if needs_registry
            else None
        )
        store = open_store(settings.production, settings.root) if needs_registry else None
        models = resolve(spec, reg, store)
    blockers = release_blockers(models)
    if blockers and not allow_unpublished:
        # every reason, none summarised away: a reviewer fixes them all in one go
        counted = f"{len(blockers)} release gates failed: " if len(blockers) > 1 else ""
        raise ReleaseGateError(
            counted + "; ".join(blockers),
            hint="fix the registry, or --allow-unpublished for a development build",
        )
    notes = list(blockers)
    if worktree:
        notes.append(
            "built from the uncommitted work tree (--worktree): a dirty development build, "
            "not a release"
        )
    else:
        notes.extend(uncommitted_changes(spec))
    return Cooked(
        spec=spec,
        models=models,
        development=bool(blockers) or spec.worktree,
        warnings=tuple(notes),
        lock=lock,
        lock_sha256=hashlib.sha256(raw_lock).hexdigest() if raw_lock is not None else None,
        store_base=settings.root,
    )


def uncommitted_changes(spec: CustomerSpec) -> list[str]:
    """What a config read differs from its commit in: the work-tree files it read (``ref``
    None, see load.read_customer), or, when it read git, the edits it leaves out."""
    if spec.uncommitted:
        return [uncommitted_note(spec)]
    if spec.worktree:
        return []
    changed = work_tree_changes(spec.source)
    if not changed:
        return []
    return [
        f"{spec.source.location} has uncommitted changes that this build does not include "
        f"({shown_files(changed)}); it builds commit {spec.commit[:12]} (commit them, or "
        "--worktree for a development build)"
    ]


def uncommitted_note(spec: CustomerSpec) -> str:
    """The note of a config read from the work tree because it has uncommitted changes."""
    return (
        f"uncommitted changes in {spec.source.location} ({shown_files(spec.uncommitted)}): "
        f"read from the work tree, not commit {spec.commit[:12]}; a release build ships "
        "commits only"
    )


class _LocatedRegistry:
    """A registry whose unknown-model errors name analysis.yaml:line, the slot and a guess."""

    def __init__(self, inner: ModelRegistry, spec: CustomerSpec) -> None:
        self._inner = inner
        self._spec = spec
        self.description = inner.description

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_model(self, model_id: str, *, design: bool = True) -> ModelRecord:
        try:
            return self._inner.get_model(model_id, design=design)
        except RegistryError as exc:
            if not exc.message.startswith(
                (f"model {model_id.strip()} not found", f"{model_id.strip()!r} is not a valid")
            ):
                raise
            raise RegistryError(
                f"{_slot_of(self._spec, model_id)}: model {model_id.strip()} not found in "
                f"{self.description}{_guess_model(self._inner, model_id.strip())}",
                hint="check the reference, or `builder models list`",
            ) from None

    def get_task(self, task_id: str) -> TaskRecord:
        return self._inner.get_task(task_id)


def _slot_of(spec: CustomerSpec, model_id: str) -> str:
    """analysis.yaml:line: analyses[i].models.<slot>.reference of a model id."""
    origin = f"{spec.source.location}/{spec.analysis_path}"
    raw = read_committed_file(spec, spec.analysis_path)
    if raw is None:
        return origin
    doc = yamldoc.parse(raw, origin)
    slots = {d.name for d in spec.models if d.reference == model_id.strip()}  # ids normalised
    for a_index, analysis in enumerate(doc.data.get("analyses") or []):
        for slot in analysis.get("models") or {}:
            if slot in slots:
                path = ("analyses", a_index, "models", slot, "reference")
                return f"{doc.where(path)}: {yamldoc.dotted(path)} (model slot {slot!r})"
    return origin


def _guess_model(registry: ModelRegistry, model_id: str) -> str:
    """ " (did you mean <id> (<name>)?)" from the registry's models, or ""."""
    try:
        records = registry.list_models()
    except RegistryError:
        return ""
    by_key = {r.id: r for r in records} | {r.name: r for r in records if r.name}
    match = difflib.get_close_matches(model_id, list(by_key), n=1, cutoff=0.6)
    if not match:
        return ""
    record = by_key[match[0]]
    return f" (did you mean {record.id} ({record.name})?)"


def complete_hashes(
    cooked: Cooked, cache: Cache, *, offline: bool = False, progress: Progress | None = None
) -> Cooked:
    """Fetch what has no known sha256 yet, so the lock and the image can pin every file."""
    if all(f.sha256 is not None and f.size is not None for m in cooked.models for f in m.files):
        return cooked
    result = fetch(
        cooked.models,
        cache,
        manual_files=cooked.spec.manual_files,
        offline=offline,
        base=cooked.store_base,
        progress=progress,
    )
    return cooked.with_models(result.models)


@dataclass(frozen=True)
class LockResult:
    """What ``builder lock`` did: where it wrote the lock, the lock, its drift and warnings."""

    path: Path | None  # where the lock was written (None for --check)
    lock: Lock
    drift: tuple[str, ...]  # differences from the committed lock (check mode)
    warnings: tuple[str, ...]


def lock_path(spec: CustomerSpec) -> Path:
    """Where a customer's lock file is written; ConfigError for a remote repository."""
    if spec.source.root.joinpath(".git").exists():  # a work tree, not a mirror in the cache
        return spec.source.root / spec.source.subdir / LOCK_FILE
    raise ConfigError(
        f"{spec.source.location}: a remote repository; cannot write its lock here",
        hint="clone it and run `builder lock` in the clone",
    )


def make_customer_lock(
    cooked: Cooked,
    cache: Cache,
    *,
    base: BaseImageRef | None,
    check: bool,
    output: Path | None = None,
    progress: Progress | None = None,
    base_drift: Sequence[str] = (),
) -> LockResult:
    """Write the lock (atomically), or compare a fresh one with the committed lock: the
    config, models, weights and params; the base image only by ``base_drift`` (see
    ``base_resolution.locked_base_drift``: a newer base release is not drift)."""
    cooked = complete_hashes(cooked, cache, progress=progress)
    fresh = make_lock(cooked.spec, cooked.models, base)
    if check:
        committed = read_lock(cooked.spec)
        if committed is None:
            raise DriftError(
                f"{cooked.spec.source.location}: no {LOCK_FILE} committed",
                hint="run `builder lock` and commit it",
            )
        fresh_drift = diff_locks(
            committed, fresh, cooked.spec, base=False, store_base=cooked.store_base
        )
        drift = (*fresh_drift, *base_drift)
        if drift:
            raise DriftError(
                f"{LOCK_FILE} drifted: " + "; ".join(drift),
                hint="run `builder lock` and commit the result",
            )
        return LockResult(path=None, lock=fresh, drift=(), warnings=cooked.warnings)
    path = output or lock_path(cooked.spec)
    write_atomic(path, render(fresh))
    return LockResult(path=path, lock=fresh, drift=(), warnings=cooked.warnings)


def release_lock_drift(
    spec: CustomerSpec,
    committed: Lock,
    models: tuple[ResolvedModel, ...],
    base: BaseImageRef | None,
    *,
    compare_base: bool = True,
    store_base: Path | None = None,
) -> list[str]:
    """What a release build's inputs change against the committed lock ([] when it matches).

    A release (push, fleet, CI) must ship what the lock pins; the caller reads the lock once
    and says, with its own severity, when there is none. ``store_base`` anchors relative
    ``file:`` weights URIs (another spelling of the same store is no change).
    """
    fresh = make_lock(spec, models, base)
    return diff_locks(committed, fresh, spec, base=compare_base, store_base=store_base)
