"""Publish: promote a trained model's weights to the production store, then mark it published.

Order matters for a regulated product: weights are copied and verified first, the manifest is
written next, and only then is the model marked published in the registry, so no model is ever
published without a verified production copy. Production weights are immutable: a destination
holding other bytes is refused, never overwritten. Every step is idempotent, so a re-run after
an interruption completes what was left.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from builder.contracts import Progress
from builder.errors import FetchError, RegistryError, ReleaseGateError
from builder.registries import COMPLETED_TASK_STATES, ModelRegistry
from builder.storage import MANIFEST_NAME, S3Store, Store, open_store, read_manifest, split_uri

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PublishedFile:
    name: str
    size: int
    sha256: str
    action: str  # copied | present | would-copy


@dataclass
class PublishResult:
    model_id: str
    task_id: str
    destination: str
    files: list[PublishedFile] = field(default_factory=list)
    manifest_written: bool = False
    marked_published: bool = False  # this run flipped the flag (False: it already was, or dry run)
    dry_run: bool = False


def _sha256_of(store: Store, key: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in store.stream(key, 0, size):
        digest.update(chunk)
    return digest.hexdigest()


def _source_objects(uri: str, base: Path) -> tuple[Store, list[tuple[str, str, int]]]:
    """(store, [(name, key, size)]) for a model URI naming one file or a folder (trailing /)."""
    if not (uri.startswith("s3://") or uri.startswith("file:")):
        raise FetchError(
            f"weights URI {uri!r} is not supported for publishing",
            hint="s3:// and file: sources are supported",
        )
    root, key = split_uri(uri)
    store = open_store(root, base)
    if uri.endswith("/"):
        objects = store.list(key.rstrip("/"))
        return store, [
            (PurePosixPath(o.key).relative_to(key.rstrip("/")).as_posix(), o.key, o.size)
            for o in objects
        ]
    parent = str(PurePosixPath(key).parent)
    found = [o for o in store.list(parent if parent != "." else "") if o.key == key]
    if not found:
        raise FetchError(
            f"the model's weights {uri} do not exist", hint="check the model's URI in the registry"
        )
    return store, [(PurePosixPath(key).name, key, found[0].size)]


def _copy(
    src: Store, src_key: str, dst: Store, dst_key: str, size: int, progress: Progress | None
) -> None:
    if isinstance(src, S3Store) and isinstance(dst, S3Store):
        # Same endpoint (both from the standard AWS settings): a server-side copy; boto3's
        # managed copy switches to multipart UploadPartCopy above its threshold (needed > 5 GB).
        from boto3.s3.transfer import TransferConfig

        done = 0

        def callback(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(dst_key, done, size)

        try:
            dst._client.copy(
                {"Bucket": src.bucket, "Key": src._key(src_key)},
                dst.bucket,
                dst._key(dst_key),
                Config=TransferConfig(multipart_threshold=1 << 30, multipart_chunksize=512 << 20),
                Callback=callback,
            )
        except Exception as exc:
            raise FetchError(
                f"copying {src.uri(src_key)} to {dst.uri(dst_key)} failed: {type(exc).__name__}: {exc}"
            ) from None
        return
    dst.write_stream(dst_key, src.stream(src_key, 0, size), size, progress=progress)


def publish(
    model_id: str,
    registry: ModelRegistry,
    production: str,
    *,
    dry_run: bool = False,
    base: Path | None = None,
    progress: Progress | None = None,
) -> PublishResult:
    """Copy a model's weights to ``<production>/<task id>/``, verify, write the manifest, mark published."""
    model = registry.get_model(model_id)
    if not model.task:
        raise RegistryError(f"model {model.id} has no creating task in {registry.description}")
    task = registry.get_task(model.task)
    if task.status not in COMPLETED_TASK_STATES:
        raise ReleaseGateError(
            f"model {model.id}: its task {task.id} did not complete (status {task.status}); refusing to publish"
        )
    if not model.uri:
        raise RegistryError(f"model {model.id} has no weights URI in {registry.description}")
    base = base or Path.cwd()
    src, objects = _source_objects(model.uri, base)
    dst = open_store(production, base)
    result = PublishResult(
        model_id=model.id, task_id=task.id, destination=dst.uri(f"{task.id}/"), dry_run=dry_run
    )
    existing = {o.key: o.size for o in dst.list(task.id)}
    for name, key, size in sorted(objects):
        dst_key = f"{task.id}/{name}"
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
            result.files.append(PublishedFile(name, size, sha, "present"))
            continue
        if dry_run:
            result.files.append(PublishedFile(name, size, sha, "would-copy"))
            continue
        _copy(src, key, dst, dst_key, size, progress)
        landed = _sha256_of(dst, dst_key, size)
        if landed != sha:
            raise FetchError(
                f"{dst.uri(dst_key)}: sha256 after copy {landed[:12]} != source {sha[:12]}; not publishing"
            )
        result.files.append(PublishedFile(name, size, sha, "copied"))
    if dry_run:
        return result
    manifest_files = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in result.files]
    current = read_manifest(dst, task.id)
    if current is None:
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "model_id": model.id,
            "model_name": model.name,
            "task_id": task.id,
            "source_uri": model.uri,
            "files": manifest_files,
            "published_by": os.environ.get("GITLAB_USER_LOGIN")
            or os.environ.get("USER")
            or getpass.getuser(),
            "published_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        dst.write_stream(f"{task.id}/{MANIFEST_NAME}", iter([data]), len(data))
        result.manifest_written = True
    elif (
        sorted(current.get("files", []), key=lambda f: f["name"]) != manifest_files
        or current.get("model_id") != model.id
    ):
        raise FetchError(
            f"{dst.uri(f'{task.id}/{MANIFEST_NAME}')} describes other files or another model; refusing to change it"
        )
    result.marked_published = registry.mark_published(model.id)
    return result


def production_presence(store: Store, task_id: str) -> dict[str, Any]:
    """Whether a task's weights are in production, for `builder models list`."""
    manifest = read_manifest(store, task_id)
    return {
        "in_production": manifest is not None,
        "files": len(manifest.get("files", [])) if manifest else 0,
    }
