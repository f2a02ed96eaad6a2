"""Config cooking: load -> resolve (or read the lock) -> release gates -> expand, and `lock`.

The first half of the main job, shared by `validate`, `expand`, `lock` and `build`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from builder import yamldoc
from builder.contracts import BaseImageRef, CustomerSpec, Progress, ResolvedModel
from builder.errors import ConfigError, DriftError, ReleaseGateError
from builder.expand import expand
from builder.fetch import Cache, fetch
from builder.fsutil import write_atomic
from builder.load import LOCK_FILE, load_customer
from builder.lock import diff_locks, make_lock, models_from_lock, read_lock, render
from builder.registries import ModelRegistry, open_registry
from builder.resolve import release_blockers, resolve
from builder.settings import Settings
from builder.storage import open_store


@dataclass(frozen=True)
class Cooked:
    """A customer's config, resolved and expanded."""

    spec: CustomerSpec
    models: tuple[ResolvedModel, ...]
    verbose: dict[str, Any]
    development: bool  # release gates were waived (--allow-unpublished) and something failed them
    warnings: tuple[str, ...] = ()
    lock: dict[str, Any] | None = field(default=None)  # the committed lock, when one was used
    store_base: Path = Path()  # anchors relative file: weight URIs (Settings.root)

    @property
    def verbose_yaml(self) -> bytes:
        return yamldoc.dump(self.verbose)


def cook(
    customer: str,
    settings: Settings,
    *,
    ref: str = "HEAD",
    worktree: bool = False,
    locked: bool = False,
    allow_unpublished: bool = False,
    registry: Callable[[], ModelRegistry] | None = None,
) -> Cooked:
    """Load, resolve (from the registry, or the committed lock when ``locked``), gate, expand."""
    spec = load_customer(customer, settings, ref=ref, worktree=worktree)
    lock = read_lock(spec) if locked else None
    if locked:
        if lock is None:
            raise ConfigError(
                f"{spec.source.location}: no {LOCK_FILE} at {ref}",
                hint="run `builder lock` and commit it, or build without --locked",
            )
        models = models_from_lock(spec, lock, production=settings.production)
    else:
        needs_registry = any(d.sourcing == "auto" for d in spec.models)
        reg = (
            (registry or (lambda: open_registry(settings.model_registry)))()
            if needs_registry
            else None
        )
        store = open_store(settings.production, settings.root) if needs_registry else None
        models = resolve(spec, reg, store)
    blockers = release_blockers(models)
    if blockers and not allow_unpublished:
        more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
        raise ReleaseGateError(
            f"{blockers[0]}{more}",
            hint="fix the registry, or --allow-unpublished for a development build",
        )
    return Cooked(
        spec=spec,
        models=models,
        verbose=expand(spec, models),
        development=bool(blockers),
        warnings=tuple(blockers),
        lock=lock,
        store_base=settings.root,
    )


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
    return replace(cooked, models=result.models, verbose=expand(cooked.spec, result.models))


@dataclass(frozen=True)
class LockResult:
    path: Path | None  # where the lock was written (None for --check)
    lock: dict[str, Any]
    drift: tuple[str, ...]  # differences from the committed lock (check mode)
    warnings: tuple[str, ...]


def lock_path(spec: CustomerSpec) -> Path:
    if spec.source.root.joinpath(".git").exists() or spec.source.subdir:
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
) -> LockResult:
    """Write the lock (atomically), or compare a fresh one with the committed lock."""
    cooked = complete_hashes(cooked, cache, progress=progress)
    fresh = make_lock(cooked.spec, cooked.models, base)
    if check:
        committed = read_lock(cooked.spec)
        if committed is None:
            raise DriftError(
                f"{cooked.spec.source.location}: no {LOCK_FILE} committed",
                hint="run `builder lock` and commit it",
            )
        drift = tuple(diff_locks(committed, fresh))
        if drift:
            raise DriftError(
                f"{LOCK_FILE} drifted: " + "; ".join(drift),
                hint="run `builder lock` and commit the result",
            )
        return LockResult(path=None, lock=fresh, drift=(), warnings=cooked.warnings)
    path = output or lock_path(cooked.spec)
    write_atomic(path, render(fresh))
    return LockResult(path=path, lock=fresh, drift=(), warnings=cooked.warnings)
