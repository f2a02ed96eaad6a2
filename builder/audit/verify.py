"""Verify an image: rebuild it from its recorded commit, lock and base, and compare digests."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import git

from builder import __version__
from builder.audit.explain import Explanation, explain
from builder.audit.history import find_commit, location_of, recorded_store
from builder.audit.text import short
from builder.contracts import CustomerSpec, RepoSource
from builder.cook.load import is_repo_url, load_customer, open_source
from builder.cook.lock import models_from_lock, read_lock
from builder.documents.build_report import BuildReport
from builder.documents.lock import Lock
from builder.documents.provenance import Provenance
from builder.errors import ConfigError, ImageError
from builder.gitauth import git_credentials
from builder.image.assemble import (
    LAYER_FORMAT,
    LAYER_FORMAT_LABEL,
    LOCATION_FREE_FORMAT,
    check_layer_format,
)
from builder.image.base_resolution import base_repository as base_repository_of
from builder.image.contents import open_image, own_layers, scan_files
from builder.image.provenance import recorded_locations
from builder.image.store import ImageStore
from builder.oci import ArchiveImage, ImageFiles, LayoutImage, OpenedImage
from builder.pipeline import BuildRequest, build
from builder.settings import SETTINGS_FILE, Settings, load_settings


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


def _local_repository(url: str) -> str:
    """A local path for a recorded ``file://`` repository (``<path>#<folder>`` for a folder):
    a work tree, or a bare repository (also when the record dropped its ``.git`` suffix)."""
    base, _, folder = url.partition("#")
    path = Path(unquote(urlsplit(base).path))
    found = next((c for c in (path, path.with_name(f"{path.name}.git")) if c.is_dir()), None)
    if found is None:
        raise ConfigError(f"{base} is not on this machine")
    try:
        repo = git.Repo(found, search_parent_directories=True)
    except git.InvalidGitRepositoryError:
        raise ConfigError(f"{found} is not a git repository") from None
    root = found if repo.bare else Path(repo.working_tree_dir or found)
    return f"{root}#{folder}" if folder else str(root)


def _open_recorded(url: str, commit: str, settings: Settings) -> RepoSource:
    """The recorded config repository ``url`` (``<url>#<folder>``), opened with ``commit`` in it:
    a local path where it is on this machine, else cloned or fetched into the cache with the
    credential helper CI uses (BUILDER_GIT_TOKEN / CI_JOB_TOKEN, never in a URL)."""
    if url.startswith("file://"):
        location = _local_repository(url)
    elif is_repo_url(url):
        location = url
    else:
        raise ConfigError(f"{url!r} is not a repository address")
    with git_credentials():
        source = open_source(location, settings)
    find_commit(source, commit)
    return source


def _rebuild_source(
    sources: list[str], repo: Path | None, commit: str, settings: Settings
) -> tuple[RepoSource, str]:
    """The config repository to rebuild from, by what the image records alone, and the
    recorded address it was found by.

    ``--repo`` wins (with the recorded folder). Else each recorded repository in turn: the
    image's own record, then its provenance attestation's (a location-free image records a
    repository only when customer.yaml declares one); the first that holds ``commit``.
    """
    folder = sources[0].partition("#")[2] if sources else ""
    if repo is not None:
        if not repo.is_dir():
            raise ConfigError(
                f"--repo {repo}: no such folder",
                hint=f"give a clone of {sources[0].partition('#')[0] if sources else 'it'}",
            )
        location = f"{repo}#{folder}" if folder else str(repo)
        try:
            source = open_source(location, settings)
            find_commit(source, commit)
        except ConfigError as exc:
            raise _unreadable(commit, [f"{repo}: {exc.message}"]) from None
        return source, sources[0] if sources else str(repo)
    if not sources:
        raise ConfigError(
            "the image records no config repository, and no provenance attestation naming one "
            "is attached to it",
            hint="pass --repo CLONE of the repository the image was built from",
        )
    problems = []
    for url in sources:
        try:
            return _open_recorded(url, commit, settings), url
        except ConfigError as exc:
            problems.append(f"{url}: {exc.message}")
    raise _unreadable(commit, problems)


def _unreadable(commit: str, problems: list[str]) -> ConfigError:
    return ConfigError(
        f"cannot read the recorded config commit {short(commit, 12)}: " + "; ".join(problems),
        hint="pass --repo CLONE holding it, or fetch the full history of the config repository",
    )


def _store_root(weights: list[tuple[str, str]]) -> str | None:
    """The production store root that registry models' weights URIs (``<root>/<task id>/...``,
    paired with their task id) name, when they all name the same one."""
    roots = {uri[: uri.index(f"/{task}")] for uri, task in weights if task and f"/{task}" in uri}
    return roots.pop() if len(roots) == 1 else None


def _recorded_production(provenance: Provenance, lock: Lock | None) -> str | None:
    """The production store the image's weights came from: read off the weights URIs the
    image records (formats before 3), else off its lock at the recorded commit (a
    location-free image names weights by task and model id alone)."""
    recorded = [(m.weights_uri or "", m.task_id or "") for m in provenance.models if m.registry_id]
    return _store_root(recorded) or (recorded_store(lock) if lock is not None else None)


def _project_settings(source: RepoSource, settings: Settings) -> Settings:
    """Settings for the rebuild that do not depend on the working directory: the project
    settings (builder.toml) of the recorded repository when it is a work tree that has them,
    else the caller's; the caller's caches (weights are sha256-checked)."""
    if not (source.root / ".git").exists():
        return settings  # a bare repository or a mirror in the cache: no files on disk
    start = source.root / source.subdir
    own = next(
        (f for f in (start, *start.parents) if (f / SETTINGS_FILE).is_file()),
        None,
    )
    if own is not None and str(own / SETTINGS_FILE) != settings.origin:
        return replace(load_settings(cwd=own), cache_dir=settings.cache_dir)
    return settings


def _with_production(settings: Settings, production: str | None) -> Settings:
    """``settings`` with the recorded production store, when one is recorded."""
    if production is None or production == settings.production.rstrip("/"):
        return settings
    return replace(settings, production=production)


def _seed_base(
    settings: Settings, scratch: Settings, repository: str, base: Mapping[str, Any]
) -> None:
    """Put the recorded base image into the rebuild's empty store when this machine's local
    image store holds it by digest, so an image whose base is in no registry (built with the
    local store alone) rebuilds too; a registry is still asked first, as in any build."""
    digest, version = str(base.get("digest") or ""), str(base.get("version") or "")
    own = ImageStore(settings.store_dir)
    if not digest or not version or not own.complete(digest):
        return
    stored = own.base_image(repository, version, digest)
    # Read from the caller's store as from the OCI layout it is; kept by tag and digest.
    ImageStore(scratch.store_dir).keep_base(dataclasses.replace(stored, source="oci-layout"))


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


#: What an older image format was, for the note saying a rebuild used it.
_FORMATS: Final = {
    1: "model layers stamped with the config commit time, before model layers became shared blobs",
    2: "before images became location-free: it records the clone's origin, the base image's "
    "registry name and the production store's spelling, and the rebuild records them again",
}


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
    """The image format to rebuild with (the image's own); a note when it is not the current."""
    layer_format = recorded_layer_format(labels)
    if layer_format != LAYER_FORMAT:
        notes.append(
            f"built with image format {layer_format} ({_FORMATS[layer_format]}); rebuilt with "
            f"format {layer_format}, not {LAYER_FORMAT}"
        )
    return layer_format


def _lock_usable(spec: CustomerSpec, settings: Settings, notes: list[str]) -> Lock | None:
    """The recorded commit's lock if it can drive the rebuild; else None and a note why not."""
    try:
        lock = read_lock(spec)
        if lock is not None:
            models_from_lock(spec, lock, production=settings.production, store_base=settings.root)
            return lock
    except ConfigError as exc:
        notes.append(
            f"lock not usable ({exc.message}); models resolved from the registry as it is now"
        )
        return None
    notes.append("no lock at that commit; models resolved from the registry as it is now")
    return None


def _committed_lock(spec: CustomerSpec) -> Lock | None:
    """The lock at the recorded commit, read only for what it records (None: none readable)."""
    try:
        return read_lock(spec)
    except ConfigError:
        return None


def _rebuild_and_compare(
    request: BuildRequest,
    spec: CustomerSpec,
    settings: Settings,
    image: OpenedImage,
    base: Mapping[str, Any],
) -> tuple[BuildReport, list[str]]:
    """Rebuild ``request`` in a scratch cache seeded with the recorded base; the rebuild's
    report and how it differs from ``image`` (its base, then its files when the digests
    differ)."""
    with tempfile.TemporaryDirectory(prefix="verify-", dir=_scratch_parent(settings)) as tmp:
        scratch = _rebuild_settings(settings, Path(tmp))
        variant = request.variant or spec.variants[0]
        repository = base_repository_of(spec, settings, request.base_repository, variant)
        _seed_base(settings, scratch, repository, base)
        report = build(request, scratch)
        rebuilt = LayoutImage(Path(tmp) / "oci", digest=report.manifest_digest)
        differences: list[str] = []
        if report.base.get("digest") != base.get("digest"):
            differences.append(
                f"base image: built on {report.base.get('repository')}:{base.get('version')}@"
                f"{base.get('digest')}, which now resolves to {report.base.get('digest')}"
            )
        if report.manifest_digest != image.manifest_digest:
            image_files = scan_files(image, own_layers(image))
            rebuilt_files = scan_files(rebuilt, own_layers(rebuilt))
            differences += _compare(image, rebuilt, image_files, rebuilt_files)
            if not differences:
                differences.append("manifest differs only in its annotations or media types")
    return report, differences


def verify(
    reference: str,
    settings: Settings,
    *,
    repo: Path | None = None,
    insecure: bool | None = None,
) -> Verification:
    """Rebuild an image from its recorded commit, lock and base, and compare digests.

    Everything comes from the image and what it records: the config repository (its own
    record, else its attestation's), the commit, the lock at that commit (models, production
    store, base repository where the image names none), the base digest and the image format
    (an image of a format before 3 is rebuilt with the locations it recorded)."""
    image = open_image(reference, settings, insecure=insecure)
    explanation = explain(reference, settings, insecure=insecure, image=image)
    provenance = explanation.provenance
    base = explanation.base
    if provenance.worktree:
        raise ConfigError(
            f"{reference} was built from an uncommitted work tree (a development build); "
            "there is no commit to rebuild it from"
        )
    commit = provenance.config_commit
    source, repository = _rebuild_source(explanation.sources, repo, commit, settings)
    location = location_of(source)
    settings = _project_settings(source, settings)
    spec = load_customer(location, settings, ref=commit)
    committed = _committed_lock(spec)
    settings = _with_production(settings, _recorded_production(provenance, committed))
    notes = list(image.notes)  # how the image was found (the local store, say)
    if spec.commit != commit:
        notes.append(
            f"{short(commit, 12)} is not a commit of the customer folder; read {short(spec.commit, 12)}"
        )
    locked = _lock_usable(spec, settings, notes) is not None
    builder_version = provenance.builder_version
    if builder_version != __version__:
        notes.append(f"built by ivd-image-builder {builder_version}; rebuilding with {__version__}")
    layer_format = _rebuild_format(image.labels, notes)
    pinned_base = committed.base_image if committed is not None else None
    base_repository = base.get("repository") or (pinned_base.repository if pinned_base else None)
    request = BuildRequest(
        customer=location,
        ref=commit,
        locked=locked,
        allow_unpublished=provenance.development_build,
        base_version=str(base.get("version")),
        base_repository=base_repository,
        variant=image.labels.get("com.ivd.runner.variant") or None,  # inherited from the base
        insecure=insecure,
        layer_format=layer_format,
        recorded=(
            recorded_locations(image.labels, provenance)
            if layer_format < LOCATION_FREE_FORMAT
            else None
        ),
    )
    report, differences = _rebuild_and_compare(request, spec, settings, image, base)
    match = report.manifest_digest == image.manifest_digest
    if isinstance(image, ArchiveImage):
        image.close()
    return Verification(
        image=reference,
        manifest_digest=image.manifest_digest,
        rebuilt_digest=report.manifest_digest,
        match=match,
        commit=commit,
        repository=repository,
        locked=locked,
        base={**base, "repository": report.base.get("repository")}
        if base.get("repository") is None
        else base,
        differences=differences,
        notes=notes,
        explanation=explanation,
    )


def _scratch_parent(settings: Settings) -> Path:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    return settings.cache_dir
