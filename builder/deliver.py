"""Deliver stage: push an assembled image to registries, or write it as files / into Docker.

Which tags may move (immutable ones, and what differs when one may not) is decided here;
writing an image to a repository is :mod:`builder.oci.push`, the registry transport
:mod:`builder.oci.remote`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from builder.contracts import Progress
from builder.errors import BuilderError, ImageError
from builder.image.assemble import AssembledImage
from builder.image.provenance import forced_tag_warning, image_differences, immutable_tag_error
from builder.oci import (
    OCI_INDEX,
    REF_NAME,
    BlobPush,
    Descriptor,
    Reference,
    RegistryClient,
    RetryPolicy,
    canonical_json,
    copy_blob,
    layout_blob_path,
    layout_directories,
    parse_reference,
    push_blobs,
    put_manifest,
    remove_abandoned,
    shared_client,
    write_layout_index,
)

# -- push ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushReport:
    """The outcome of :func:`push`."""

    manifest_digest: str
    blobs: tuple[BlobPush, ...]
    refs: tuple[str, ...]  # full references now pointing at the manifest
    overwritten: Mapping[str, str] = field(
        default_factory=dict
    )  # forced immutable ref -> old digest
    warnings: tuple[str, ...] = ()
    manifests_sent: int = 0  # manifest PUTs (by digest per repository when several, per tag)

    @property
    def bytes_uploaded(self) -> int:
        """Bytes sent as blob uploads (mounted and present blobs cost nothing)."""
        return sum(b.size for b in self.blobs if b.action == "uploaded")

    def count(self, action: str) -> int:
        """How many blobs had ``action``."""
        return sum(1 for b in self.blobs if b.action == action)


def push(
    image: AssembledImage,
    targets: Sequence[str],
    *,
    immutable: Sequence[str] = (),
    force: bool = False,
    insecure: bool | None = None,
    progress: Progress | None = None,
    retry: RetryPolicy | None = None,
    credentials: Mapping[str, tuple[str, str]] | None = None,
    known: Mapping[str, str | None] | None = None,
) -> PushReport:
    """Push ``image`` and tag it as each of ``targets`` (``registry/repo:tag``).

    Order: every immutable tag is checked first; then per repository the blobs, the
    config, and the tags (the immutable ones first). ``immutable`` holds full references or
    bare tags; such a tag pointing to another digest is refused unless ``force``, and a
    forced overwrite is reported in ``overwritten`` and ``warnings``. ``credentials`` maps a
    registry host to (user, password) when not from the Docker config.

    Only what must cross does: an immutable tag is read once, not at all when ``known``
    holds what the caller read of it earlier in this run (a fleet reads every image's tag up
    front, in one batch); other tags are not read. A blob the layer cache knows is in the
    repository is not asked about; a small one it does not know is sent at once (asking
    costs as much); a large one is asked about, then mounted or uploaded. The manifest goes
    up by digest first only when several repositories must all hold it before any tag
    moves. Should the registry refuse the manifest for a blob the cache wrongly believed
    there, every blob is checked and the push goes on.
    """
    if not targets:
        raise ImageError("nothing to push: no target references given")
    refs = [parse_reference(t) for t in targets]
    for ref in refs:
        if not ref.tag or ref.digest:
            raise ImageError(f"push target {ref} must be registry/repository:tag")

    def client_for(host: str) -> RegistryClient:
        creds = (credentials or {}).get(host)
        return shared_client(host, insecure=insecure, retry=retry, credentials=creds)

    frozen = {r for r in refs if str(r) in set(immutable) or r.tag in set(immutable)}
    overwritten, warnings = _check_immutable(image, frozen, force, known or {}, client_for)

    blobs: list[BlobPush] = []
    repositories = sorted({(r.registry, r.path) for r in refs})
    for host, path in repositories:
        blobs += push_blobs(image, client_for(host), path, progress)
    by_digest = repositories if len(repositories) > 1 else []  # all hold it before a tag moves
    for host, path in by_digest:
        put_manifest(image, client_for(host), path, image.manifest_digest, progress)
    for ref in sorted(refs, key=lambda r: r not in frozen):
        assert ref.tag is not None
        put_manifest(image, client_for(ref.registry), ref.path, ref.tag, progress)
    return PushReport(
        manifest_digest=image.manifest_digest,
        blobs=tuple(blobs),
        refs=tuple(str(r) for r in refs),
        overwritten=overwritten,
        warnings=tuple(warnings),
        manifests_sent=len(by_digest) + len(refs),
    )


def _check_immutable(
    image: AssembledImage,
    frozen: set[Reference],
    force: bool,
    known: Mapping[str, str | None],
    client_for: Callable[[str], RegistryClient],
) -> tuple[dict[str, str], list[str]]:
    """Refuse to move an immutable tag to another digest (unless ``force``), saying what
    differs between the two images; the forced ones, with the digest they pointed to, and
    their warnings. ``known``: what the caller read of the tags earlier."""
    overwritten: dict[str, str] = {}
    warnings: list[str] = []
    for ref in sorted(frozen, key=str):
        assert ref.tag is not None
        found = str(ref) in known
        current = (
            known[str(ref)]
            if found
            else client_for(ref.registry).manifest_digest(ref.path, ref.tag)
        )
        if current is None or current == image.manifest_digest:
            continue
        differences = _registry_differences(client_for(ref.registry), ref.path, current, image)
        if not force:
            raise immutable_tag_error(str(ref), current, image.manifest_digest, differences)
        overwritten[str(ref)] = current
        warnings.append(forced_tag_warning(str(ref), current, image.manifest_digest, differences))
    return overwritten, warnings


def _registry_differences(
    client: RegistryClient, path: str, digest: str, image: AssembledImage
) -> list[str]:
    """What differs between the image ``digest`` in the registry and ``image`` (inputs side
    by side); a line saying why when the tagged image cannot be read."""
    try:
        tagged = _json_document(client.get_manifest(path, digest)[0])
        config = Descriptor.from_dict(tagged["config"])
        tagged_config = _json_document(client.get_blob_bytes(path, config.digest))
    except (BuilderError, ValueError, KeyError, TypeError) as exc:
        reason = exc.message if isinstance(exc, BuilderError) else "not an image manifest"
        return [f"the tagged image could not be read ({reason})"]
    built = (_json_document(image.manifest_bytes), _json_document(image.config_bytes))
    return image_differences((tagged, tagged_config), built)


def _json_document(raw: bytes) -> dict[str, Any]:
    """A JSON object (ValueError for anything else)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


# -- files and the Docker engine -----------------------------------------------------------------


def write_oci_layout(
    image: AssembledImage,
    directory: Path | str,
    tags: Sequence[str] = (),
    progress: Progress | None = None,
) -> Path:
    """Write (or merge into) an OCI image layout at ``directory``; each tag becomes a ref name.

    Blobs are hard-linked from the blob store when on the same filesystem. An existing
    index.json keeps its other entries; a tag already there is re-pointed.
    """
    directory = Path(directory)
    try:
        layout_directories(directory)
        descriptors = [layer.descriptor for layer in image.layers]
        descriptors += [image.config_descriptor, image.manifest_descriptor]
        for descriptor in descriptors:
            source = image.blob_path(descriptor, progress, full=True)
            copy_blob(source, layout_blob_path(directory, descriptor.digest))
            image.store.note_verified(descriptor.digest)  # hashed just now; linked, not changed
        write_layout_index(directory, image.manifest_descriptor, list(tags))
    except OSError as exc:
        raise ImageError(f"cannot write OCI layout {directory}: {exc.strerror or exc}") from None
    return directory


def _docker_archive_tags(tags: Sequence[str]) -> list[str]:
    out = []
    for tag in tags:
        name = tag.split("@", 1)[0]
        if ":" not in name.rsplit("/", 1)[-1]:
            raise ImageError(f"docker archive tag {tag!r} must be name:tag")
        out.append(name)
    return out


@contextlib.contextmanager
def _replaced_on_success(path: Path) -> Iterator[IO[bytes]]:
    """A temporary file next to ``path`` that replaces it only once completely written: a full
    disk or a failure halfway leaves the old file (if any) intact and no partial one. It is
    locked while written, so the next write to ``path`` removes one a killed run left."""
    remove_abandoned(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed or removed below)
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # in use: not abandoned
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_docker_archive(
    image: AssembledImage,
    file: Path | str | IO[bytes],
    tags: Sequence[str] = (),
    progress: Progress | None = None,
) -> None:
    """Write a tar that ``docker load`` accepts, and that is an OCI image layout as well.

    ``manifest.json`` (Config, RepoTags, Layers) points at ``blobs/sha256/<hex>``, next to
    ``oci-layout`` and ``index.json``, the dual format of ``docker save`` since Docker 25.
    Docker loads gzip and uncompressed layers alike. Members are sorted with fixed metadata.
    """
    repo_tags = _docker_archive_tags(tags)
    blob_name = "blobs/sha256/{}".format
    layer_files = [
        (
            blob_name(layer.descriptor.digest.split(":")[1]),
            image.blob_path(layer.descriptor, progress, full=True),
        )
        for layer in image.layers
    ]
    config_name = blob_name(image.config_digest.split(":")[1])
    manifest_json = [
        {"Config": config_name, "RepoTags": repo_tags, "Layers": [n for n, _ in layer_files]}
    ]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            Descriptor(
                image.media_type,
                image.manifest_digest,
                len(image.manifest_bytes),
                {REF_NAME: repo_tags[0]} if repo_tags else {},
            ).to_dict()
        ],
    }
    members: dict[str, Path | bytes] = dict(layer_files)
    members[config_name] = image.config_bytes
    members[blob_name(image.manifest_digest.split(":")[1])] = image.manifest_bytes
    members["manifest.json"] = canonical_json(manifest_json)
    members["oci-layout"] = canonical_json({"imageLayoutVersion": "1.0.0"})
    members["index.json"] = canonical_json(index)
    try:
        with contextlib.ExitStack() as stack:
            out: IO[bytes] = (
                file
                if not isinstance(file, (str, Path))
                else stack.enter_context(_replaced_on_success(Path(file)))
            )
            with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for directory in ("blobs", "blobs/sha256"):
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                for name in sorted(members):
                    content = members[name]
                    info = tarfile.TarInfo(name)
                    info.mode = 0o644
                    if isinstance(content, bytes):
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
                    else:
                        info.size = content.stat().st_size
                        with content.open("rb") as src:
                            tar.addfile(info, src)
    except OSError as exc:
        raise ImageError(f"cannot write docker archive {file}: {exc.strerror or exc}") from None


def load_into_docker(image: AssembledImage, tags: Sequence[str], client: Any) -> list[str]:
    """Load ``image`` into a Docker engine (docker SDK ``images.load``); return the image ids."""
    import docker.errors

    _docker_archive_tags(tags)
    with tempfile.TemporaryFile(dir=image.store.tmp) as archive:
        write_docker_archive(image, archive, tags)
        archive.seek(0)
        try:
            loaded = client.images.load(archive)
        except docker.errors.DockerException as exc:
            raise ImageError(f"docker load failed: {docker_message(exc)}") from None
    return [str(img.id) for img in loaded]


def docker_message(exc: BaseException) -> str:
    """The first line of a docker SDK error (its explanation, else its text)."""
    explanation = getattr(exc, "explanation", None)
    return (
        str(explanation or exc).strip().splitlines()[0]
        if str(explanation or exc).strip()
        else type(exc).__name__
    )
