"""Publish: promote a trained model's weights to the production store, then mark it published.

Order matters for a regulated product: weights are copied and verified first, the manifest is
written next, and only then is the model marked published in the registry, so no model is ever
published without a verified production copy. Production weights are immutable: a destination
holding other bytes is refused, never overwritten. Every step is idempotent, so a re-run after
an interruption completes what was left.

Weights land under ``<production>/<task id>/<model id>/`` with a manifest naming the model:
a task can have several output models, and each one's weights belong to it alone. The source
(the model record's ``uri``) is read through ClearML's storage layer (builder.cook.storage.
clearml_local_copy), so every place ClearML stores models works as ClearML users set it up.

A weights *package* (system tag ``package``) is extracted as ClearML's SDK extracts it on
``get_local_copy`` (builder.cook.packages), and the extracted files are what is copied, listed
in the manifest (with the archive's own name, size and sha256 under ``package``) and later
pinned by resolve, fetch and the lock: they are what a runner loads.

Policy (README, "ClearML"): an archived model is refused (archiving withdraws it), and so is a
model whose creating task was deleted or that never had one (an imported model): nothing can
show that training completed. Publishing reads no model design.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from builder.contracts import Progress
from builder.cook.packages import archive_kind, extract_package
from builder.cook.registries import (
    COMPLETED_TASK_STATES,
    DELETED_TASK_PREFIX,
    ModelRecord,
    ModelRegistry,
    TaskRecord,
)
from builder.cook.storage import (
    MANIFEST_NAME,
    Store,
    clearml_local_copy,
    file_path,
    open_store,
    production_folder,
    read_manifest,
)
from builder.documents import FileDigest
from builder.documents.publish_manifest import PublishManifest
from builder.errors import FetchError, RegistryError, ReleaseGateError
from builder.paths import normal_model_id


@dataclass(frozen=True)
class PublishedFile:
    """One weights file of a publish: name, size, checksum and what was done with it."""

    name: str
    size: int
    sha256: str
    action: str  # copied | present | would-copy


@dataclass
class PublishResult:
    """What publishing a model did: where its files went, the manifest and the published flag."""

    model_id: str
    task_id: str
    destination: str
    files: list[PublishedFile] = field(default_factory=list)
    manifest_written: bool = False
    marked_published: bool = False  # this run flipped the flag (False: it already was, or dry run)
    dry_run: bool = False
    package: PublishedFile | None = None  # the archive the files were extracted from


def _sha256_of(store: Store, key: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in store.stream(key, 0, size):
        digest.update(chunk)
    return digest.hexdigest()


Objects = list[tuple[str, str, int]]  # (name in production, key in the source store, size)


def _local_source(uri: str, base: Path) -> tuple[Store, Objects]:
    """(store, objects) of a model URI, read where it is.

    ``file:`` URIs (one file, or a folder with a trailing /) are read in place; every other
    URI goes through ClearML's StorageManager into its cache, then is read from there.
    """
    if not uri.startswith("file:"):
        local = clearml_local_copy(uri)
        name = PurePosixPath(uri.rstrip("/")).name
        store = open_store(f"file:{local.parent}", base)
        return store, [(name, local.name, local.stat().st_size)]
    path = file_path(uri)
    if uri.endswith("/"):
        store = open_store(f"file:{path}", base)
        return store, [(o.key, o.key, o.size) for o in store.list("")]
    store = open_store(f"file:{path.parent}", base)
    found = [o for o in store.list("") if o.key == path.name]
    if not found:
        raise FetchError(
            f"the model's weights {uri} do not exist", hint="check the model's URI in the registry"
        )
    return store, [(path.name, path.name, found[0].size)]


@contextmanager
def _source_objects(
    model: ModelRecord, base: Path
) -> Iterator[tuple[Store, Objects, PublishedFile | None]]:
    """(store, objects, package) of a model's weights: a package's extracted files (and the
    archive itself as ``package``), else the weights as they are."""
    store, objects = _local_source(model.uri, base)
    kind = archive_kind(model.uri)
    if not model.package or kind is None or len(objects) != 1:
        yield store, objects, None  # as the SDK: only these archives are extracted
        return
    name, key, size = objects[0]
    archive = PublishedFile(name, size, _sha256_of(store, key, size), "extracted")
    with tempfile.TemporaryDirectory(prefix="ivd-package-") as tmp:
        local = Path(store.uri(key).removeprefix("file:"))
        if not local.is_absolute():
            local = base / local
        files = extract_package(local, kind, Path(tmp), model.uri)
        extracted = open_store(f"file:{tmp}", base)
        yield extracted, [(f.name, f.name, f.size) for f in files], archive


def _copy(
    src: Store, src_key: str, dst: Store, dst_key: str, size: int, progress: Progress | None
) -> None:
    dst.write_stream(dst_key, src.stream(src_key, 0, size), size, progress=progress)


def _gate(model: ModelRecord, registry: ModelRegistry) -> TaskRecord:
    """The model's creating task, if the model may be published at all."""
    if not model.task:
        raise ReleaseGateError(
            f"model {model.id} has no creating task in {registry.description} (an imported "
            "model); refusing to publish a model without its training record",
            hint="publish the model of the training task that produced these weights",
        )
    if model.archived:
        raise ReleaseGateError(
            f"model {model.id} is archived in {registry.description}; refusing to publish it",
            hint="restore it from the archive first if it really is meant for production",
        )
    if model.task_deleted:
        raise ReleaseGateError(
            f"model {model.id}: its creating task {model.task} was deleted "
            f"({DELETED_TASK_PREFIX}{model.task}); refusing to publish a model without its training record"
        )
    if model.public and not model.ready:
        raise ReleaseGateError(
            f"model {model.id} is a public model of {registry.description} (company ''): the "
            "server lets no company mark it published; refusing to copy it",
            hint="publish it as its owner, or clone it into your company's project",
        )
    task = registry.get_task(model.task)
    if task.status not in COMPLETED_TASK_STATES:
        raise ReleaseGateError(
            f"model {model.id}: its task {task.id} did not complete (status {task.status}); refusing to publish"
        )
    return task


def publish(
    model_id: str,
    registry: ModelRegistry,
    production: str,
    *,
    dry_run: bool = False,
    base: Path | None = None,
    progress: Progress | None = None,
) -> PublishResult:
    """Copy a model's weights to ``<production>/<task id>/<model id>/``, verify, write the
    manifest, mark published. ``model_id`` in any canonical UUID spelling."""
    model = registry.get_model(
        normal_model_id(model_id.strip(), what="model id", error=RegistryError), design=False
    )
    task = _gate(model, registry)
    if not model.uri:
        raise RegistryError(f"model {model.id} has no weights URI in {registry.description}")
    base = base or Path.cwd()
    dst = open_store(production, base)
    folder = production_folder(task.id, model.id)
    result = PublishResult(
        model_id=model.id, task_id=task.id, destination=dst.uri(f"{folder}/"), dry_run=dry_run
    )
    with _source_objects(model, base) as (src, objects, package):
        result.package = package
        result.files = _copy_all(src, objects, dst, folder, dry_run, progress)
    if dry_run:
        return result
    manifest = PublishManifest(
        files=tuple(FileDigest(f.name, f.size, f.sha256) for f in result.files),
        model_id=model.id,
        model_name=model.name,
        task_id=task.id,
        source_uri=model.uri,
        package=FileDigest(package.name, package.size, package.sha256) if package else None,
        published_by=os.environ.get("GITLAB_USER_LOGIN")
        or os.environ.get("USER")
        or getpass.getuser(),
        published_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    current = read_manifest(dst, folder)
    if current is None:
        data = manifest.to_bytes()
        dst.write_stream(f"{folder}/{MANIFEST_NAME}", iter([data]), len(data))
        result.manifest_written = True
    elif (
        sorted(current.files, key=lambda f: f.name) != list(manifest.files)
        or current.model_id != model.id
    ):
        raise FetchError(
            f"{dst.uri(f'{folder}/{MANIFEST_NAME}')} describes other files or another model; refusing to change it"
        )
    if model.ready:  # as the SDK's Model.publish(): a published model is not marked again
        return result
    try:
        result.marked_published = registry.mark_published(model.id)
    except RegistryError as exc:
        raise RegistryError(
            f"model {model.id}: its weights are copied and verified at {result.destination}, "
            f"but it is not marked published: {exc.message}",
            hint=f"check the model in the registry, then re-run `builder publish {model.id}`",
        ) from None
    return result


def _copy_all(
    src: Store,
    objects: Objects,
    dst: Store,
    folder: str,
    dry_run: bool,
    progress: Progress | None,
) -> list[PublishedFile]:
    """Copy each object into ``folder`` of ``dst`` unless already there, verified by sha256."""
    out = []
    existing = {o.key: o.size for o in dst.list(folder)}
    for name, key, size in sorted(objects):
        dst_key = f"{folder}/{name}"
        sha = _sha256_of(src, key, size)
        if dst_key in existing:
            landed = (
                _sha256_of(dst, dst_key, existing[dst_key]) if existing[dst_key] == size else None
            )
            if landed != sha:
                raise FetchError(
                    f"{dst.uri(dst_key)} already holds different bytes; production weights are immutable",
                    hint="investigate: never overwrite a published file",
                )
            out.append(PublishedFile(name, size, sha, "present"))
            continue
        if dry_run:
            out.append(PublishedFile(name, size, sha, "would-copy"))
            continue
        _copy(src, key, dst, dst_key, size, progress)
        landed = _sha256_of(dst, dst_key, size)
        if landed != sha:
            raise FetchError(
                f"{dst.uri(dst_key)}: sha256 after copy {landed[:12]} != source {sha[:12]}; not publishing"
            )
        out.append(PublishedFile(name, size, sha, "copied"))
    return out


def production_presence(store: Store, task_id: str, model_id: str) -> dict[str, Any]:
    """Whether a model's weights are in production (its own manifest), for `models list`."""
    manifest = read_manifest(store, production_folder(task_id, model_id))
    ok = manifest is not None and manifest.model_id == model_id
    return {
        "in_production": ok,
        "files": len(manifest.files) if manifest and ok else 0,
    }
