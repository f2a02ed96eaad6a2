"""Verify an image: rebuild it from its recorded commit, lock and base, and compare digests."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import git

from builder import __version__
from builder.audit.explain import Explanation, explain
from builder.audit.history import find_commit
from builder.audit.text import short
from builder.contracts import CustomerSpec
from builder.cook.load import _URL, load_customer, open_source
from builder.cook.lock import models_from_lock, read_lock
from builder.errors import ConfigError, ImageError
from builder.gitauth import git_credentials
from builder.image.assemble import LAYER_FORMAT, LAYER_FORMAT_LABEL, check_layer_format
from builder.oci.image import (
    ArchiveImage,
    ImageFiles,
    LayoutImage,
    OpenedImage,
    open_image,
    own_layers,
    scan_files,
)
from builder.paths import safe_join
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


def _rebuild_location(provenance: Mapping[str, Any], repo: Path | None, settings: Settings) -> str:
    """A local path of the recorded customer folder, found or made from the record alone.

    ``--repo`` wins; else a recorded ``file://`` repository on this machine (a work tree, or a
    bare repository, also when the record dropped its ``.git`` suffix, which is cloned into the
    cache); else the recorded git URL is cloned or fetched into the cache with the same
    credential helper CI uses (BUILDER_GIT_TOKEN / CI_JOB_TOKEN, never in a URL).
    """
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
    if folder and git.Repo(root).bare:  # a mirror: no folders to open, so check one out
        root = _work_tree(root, str((provenance.get("config") or {}).get("commit", "")), settings)
    path = safe_join(root, folder, what="recorded customer folder") if folder else root
    if not path.is_dir():
        raise ConfigError(
            f"{path}: the recorded customer folder {folder!r} is not in {base}",
            hint="fetch the full history of the config repository",
        )
    return str(path)


def _work_tree(bare: Path, commit: str, settings: Settings) -> Path:
    """A detached work tree of ``commit`` of a bare repository, in the cache (reused): a
    customer kept in a folder of a repository is read from a folder, as where it was built."""
    key = hashlib.sha256(str(bare.resolve()).encode()).hexdigest()[:12]
    target = settings.cache_dir / "verify-trees" / f"{key}-{commit[:12]}"
    if (target / ".git").exists():
        return target
    try:
        git.Repo(bare).git.worktree("add", "--detach", "--force", str(target), commit)
    except git.GitCommandError:
        raise ConfigError(
            f"the recorded config commit {short(commit, 12)} is not in {bare}",
            hint="fetch the full history of the config repository",
        ) from None
    return target


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
        find_commit(open_source(location, settings), commit)
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
