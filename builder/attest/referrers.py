"""Attestations as OCI 1.1 referrers of the image, and the one call the pipeline makes.

The documents are stored next to the image: in an OCI image layout, and in a registry
(through the referrers API where the registry has it, else the ``sha256-<hex>`` tag schema).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from builder.attest.dsse import MEDIA_DSSE, envelope_payload, sign_envelope
from builder.attest.statement import (
    ENVELOPE_FILE,
    MEDIA_CYCLONEDX,
    MEDIA_INTOTO,
    PROVENANCE_FILE,
    SBOM_FILE,
    SLSA_PROVENANCE,
    BuildFacts,
    provenance_statement,
    rfc3339,
    sbom,
)
from builder.errors import AttestationError, BuilderError, ImageError
from builder.fsutil import write_atomic
from builder.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    BlobStore,
    BlobUnknownError,
    Descriptor,
    RegistryClient,
    RetryPolicy,
    canonical_json,
    fallback_tag,
    layout_blob_path,
    layout_referrers,
    read_layout_blob,
    read_layout_index,
    registry_referrers,
    sha256_digest,
    shared_client,
    split_repository,
    update_layout_index,
)

MEDIA_EMPTY: Final = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG: Final = b"{}"
PREDICATE_ANNOTATION: Final = "in-toto.io/predicate-type"
TITLE_ANNOTATION: Final = "org.opencontainers.image.title"
CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
#: Annotation naming which of our documents an artifact holds: "provenance" or "sbom".
KIND_ANNOTATION: Final = "com.ivd.attestation"


# -- the documents as OCI artifacts ----------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """One document to attach to an image as an OCI 1.1 referrer."""

    kind: str  # "provenance" | "sbom"
    artifact_type: str
    media_type: str  # of its single layer
    data: bytes
    file_name: str
    created: str  # RFC 3339: the build's end (provenance), the config commit time (SBOM)
    predicate_type: str | None = None

    @property
    def layer(self) -> Descriptor:
        """The descriptor of the document blob."""
        annotations = {TITLE_ANNOTATION: self.file_name}
        if self.predicate_type:
            annotations[PREDICATE_ANNOTATION] = self.predicate_type
        return Descriptor(self.media_type, sha256_digest(self.data), len(self.data), annotations)

    def manifest(self, subject: Descriptor) -> bytes:
        """The artifact manifest: empty config, the document as its layer, ``subject`` set."""
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": self.artifact_type,
            "config": empty_descriptor().to_dict(),
            "layers": [self.layer.to_dict()],
            "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_dict(),
            "annotations": self.annotations,
        }
        return canonical_json(manifest)

    @property
    def annotations(self) -> dict[str, str]:
        """Annotations of the artifact manifest (copied into referrers index entries)."""
        out = {CREATED_ANNOTATION: self.created, KIND_ANNOTATION: self.kind}
        if self.predicate_type:
            out[PREDICATE_ANNOTATION] = self.predicate_type
        return out


def empty_descriptor() -> Descriptor:
    """The OCI empty descriptor (``{}``) used as the config of artifact manifests."""
    return Descriptor(MEDIA_EMPTY, sha256_digest(EMPTY_CONFIG), len(EMPTY_CONFIG))


@dataclass(frozen=True)
class Attestations:
    """The provenance Statement (signed or not) and the SBOM of one image."""

    subject: Descriptor
    statement: dict[str, Any]
    sbom: dict[str, Any]
    envelope: dict[str, Any] | None
    created: str  # when the build finished
    sbom_created: str  # the config commit time: the same image always gets the same SBOM

    @property
    def artifacts(self) -> list[Artifact]:
        """Provenance (a DSSE envelope when signed, else the bare Statement) and SBOM."""
        if self.envelope is not None:
            provenance = Artifact(
                "provenance",
                MEDIA_DSSE,
                MEDIA_DSSE,
                canonical_json(self.envelope),
                ENVELOPE_FILE,
                self.created,
                SLSA_PROVENANCE,
            )
        else:
            provenance = Artifact(
                "provenance",
                MEDIA_INTOTO,
                MEDIA_INTOTO,
                canonical_json(self.statement),
                PROVENANCE_FILE,
                self.created,
                SLSA_PROVENANCE,
            )
        sbom_artifact = Artifact(
            "sbom", MEDIA_CYCLONEDX, MEDIA_CYCLONEDX, self.sbom_bytes, SBOM_FILE, self.sbom_created
        )
        return [provenance, sbom_artifact]

    @property
    def sbom_bytes(self) -> bytes:
        """The SBOM as canonical JSON bytes, the form that is attached and hashed."""
        return canonical_json(self.sbom)

    def manifests(self) -> list[tuple[Artifact, bytes]]:
        """Each artifact with its manifest bytes."""
        return [(a, a.manifest(self.subject)) for a in self.artifacts]

    def write_files(self, directory: Path) -> list[Path]:
        """Write the documents as plain files (for archiving with the build report)."""
        files = {PROVENANCE_FILE: canonical_json(self.statement), SBOM_FILE: self.sbom_bytes}
        if self.envelope is not None:
            files[ENVELOPE_FILE] = canonical_json(self.envelope)
        out = []
        for name, data in files.items():
            write_atomic(directory / name, data)
            out.append(directory / name)
        return out


def make_attestations(facts: BuildFacts, sign_key: Path | None = None) -> Attestations:
    """SBOM first (its digest goes into the provenance byproducts), then the Statement."""
    bom = sbom(facts)
    statement = provenance_statement(
        facts, sbom_sha256=hashlib.sha256(canonical_json(bom)).hexdigest()
    )
    envelope = sign_envelope(canonical_json(statement), sign_key) if sign_key else None
    return Attestations(
        subject=facts.manifest,
        statement=statement,
        sbom=bom,
        envelope=envelope,
        created=rfc3339(facts.finished),
        sbom_created=rfc3339(datetime.fromtimestamp(facts.source_date_epoch, UTC)),
    )


# -- one provenance per build definition and run --------------------------------------------


def _identity(media_type: str, data: bytes) -> str | None:
    """What makes two provenance documents the same attestation: type, signers, and the
    Statement without the run's start and end times (None: not a provenance we can read)."""
    try:
        doc = json.loads(data)
        signers: list[str] = []
        if media_type == MEDIA_DSSE:
            signers = sorted(str(s.get("keyid")) for s in doc.get("signatures") or [])
            doc = json.loads(envelope_payload(doc))
        metadata = doc["predicate"]["runDetails"].get("metadata") or {}
        for key in ("startedOn", "finishedOn"):
            metadata.pop(key, None)
    except (ValueError, KeyError, TypeError, AttributeError, AttestationError):
        return None
    return hashlib.sha256(canonical_json([media_type, signers, doc])).hexdigest()


def _already_attached(
    artifact: Artifact,
    manifest: bytes,
    existing: Sequence[Descriptor],
    read_manifest: Callable[[str], bytes],
    read_blob: Callable[[str], bytes],
) -> Descriptor | None:
    """An attached artifact saying the same as ``artifact``, if there is one.

    The SBOM is deterministic, so the same manifest digest is the same document. A provenance
    differs per run only in its times: one pushed again for the same build definition and CI
    invocation (a re-push from the same job) is not attached twice.
    """
    digest = sha256_digest(manifest)
    for descriptor in existing:
        if descriptor.digest == digest:
            return descriptor
    if artifact.kind != "provenance":
        return None
    wanted = _identity(artifact.media_type, artifact.data)
    for descriptor in existing:
        if descriptor.extra.get("artifactType") != artifact.artifact_type:
            continue
        try:
            layers = json.loads(read_manifest(descriptor.digest)).get("layers") or []
            layer = Descriptor.from_dict(layers[0])
            if (
                wanted is not None
                and layer.media_type == artifact.media_type
                and _identity(layer.media_type, read_blob(layer.digest)) == wanted
            ):
                return descriptor
        except (BuilderError, ValueError, IndexError, AttributeError):
            continue
    return None


# -- OCI image layout ------------------------------------------------------------------------


def _write_blob(directory: Path, data: bytes) -> None:
    path = layout_blob_path(directory, sha256_digest(data))
    if not path.is_file() or path.is_symlink():  # a link is replaced, never written through
        write_atomic(path, data)


def attach_to_layout(directory: Path, attestations: Attestations) -> list[Descriptor]:
    """Add the artifacts to the OCI image layout holding the subject image.

    Blobs go into ``blobs/sha256``; each artifact manifest is listed in ``index.json`` with its
    ``artifactType`` and no ref name, which is how oras and the image-layout spec find
    referrers in a layout (by reading the manifests' ``subject``).
    """
    try:
        read_layout_index(directory)
    except ImageError as exc:
        raise ImageError(f"{directory} is not an OCI image layout: {exc}") from None
    if not layout_blob_path(directory, attestations.subject.digest).is_file():
        raise ImageError(
            f"OCI layout {directory} does not hold image {attestations.subject.digest}"
        )
    added = []
    _write_blob(directory, EMPTY_CONFIG)
    existing = layout_referrers(directory, attestations.subject.digest)
    for artifact, manifest in attestations.manifests():
        same = _already_attached(
            artifact,
            manifest,
            existing,
            lambda d: read_layout_blob(directory, d),
            lambda d: read_layout_blob(directory, d),
        )
        if same is not None:
            added.append(same)
            continue
        _write_blob(directory, artifact.data)
        _write_blob(directory, manifest)
        descriptor = Descriptor(
            OCI_MANIFEST,
            sha256_digest(manifest),
            len(manifest),
            artifact.annotations,
            {"artifactType": artifact.artifact_type},
        )
        added.append(descriptor)
    new = [d.to_dict() for d in added]

    def merge(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        have = {e.get("digest") for e in entries}
        return entries + [d for d in new if d["digest"] not in have]

    # The layout's one locked index writer: concurrent builds into one layout keep every entry.
    update_layout_index(directory, merge)
    return added


# -- registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferrersPush:
    """What :func:`push_referrers` did in one repository."""

    repository: str
    manifests: tuple[str, ...]  # artifact manifest digests
    mode: str  # "referrers-api" | "tag-schema"
    tag: str | None = None  # the fallback tag, in tag-schema mode
    bytes_uploaded: int = 0  # every byte sent: blobs uploaded, manifests and index written


def _send_artifact(
    client: RegistryClient, path: str, artifact: Artifact, manifest: bytes, there: set[str]
) -> int:
    """Upload an artifact's blobs (those not in ``there``, which learns what it sends) and
    PUT its manifest by digest; the bytes sent. The documents are small and new: sent
    without asking whether the registry has them."""
    sent = 0
    empty = empty_descriptor()
    for data, descriptor in ((EMPTY_CONFIG, empty), (artifact.data, artifact.layer)):
        if descriptor.digest in there or (
            descriptor == empty and client.blob_exists(path, empty.digest)
        ):
            there.add(descriptor.digest)
            continue
        client.upload_blob(path, descriptor.digest, descriptor.size, data)
        there.add(descriptor.digest)
        sent += len(data)
    try:
        client.put_manifest(path, sha256_digest(manifest), manifest, OCI_MANIFEST)
    except BlobUnknownError:  # the blob store's memory of the empty config was wrong
        client.upload_blob(path, empty.digest, empty.size, EMPTY_CONFIG)
        sent += len(EMPTY_CONFIG) + len(manifest)
        client.put_manifest(path, sha256_digest(manifest), manifest, OCI_MANIFEST)
    return sent + len(manifest)


def push_referrers(
    repository: str,
    attestations: Attestations,
    *,
    insecure: bool | None = None,
    retry: RetryPolicy | None = None,
    subject_pushed: bool = False,
    store: BlobStore | None = None,
) -> ReferrersPush:
    """Push the artifacts to ``repository`` (``host/path``) as referrers of the image.

    The subject image must already be there (checked, unless the caller has just pushed it:
    ``subject_pushed``). Artifact manifests are pushed by digest; if the registry answers
    the referrers API it indexes them itself. Otherwise (CNCF distribution 2.x) the
    ``sha256-<hex>`` tag is read, merged with the new descriptors and written back, then read
    again to catch a concurrent writer (retried a few times: the schema is racy). A blob
    ``store`` remembers that the repository holds the artifacts' empty config.
    """
    host, path = split_repository(repository)
    client = shared_client(host, insecure=insecure, retry=retry)
    if not subject_pushed and client.manifest_digest(path, attestations.subject.digest) is None:
        raise ImageError(f"{repository} has no manifest {attestations.subject.digest} to attest")
    descriptors = []
    sent = 0
    empty = empty_descriptor().digest
    # the empty config is there after the repository's first artifact: the blob store
    # remembers it, or the registry is asked once
    there = {empty} & (store.present_in(host, path) if store is not None else set())
    attached, mode = registry_referrers(client, path, attestations.subject.digest)
    for artifact, manifest in attestations.manifests():
        same = _already_attached(
            artifact,
            manifest,
            attached,
            lambda d: client.get_manifest(path, d)[0],
            lambda d: client.get_blob_bytes(path, d),
        )
        if same is not None:
            descriptors.append(same)
            continue
        sent += _send_artifact(client, path, artifact, manifest, there)
        descriptors.append(
            Descriptor(
                OCI_MANIFEST,
                sha256_digest(manifest),
                len(manifest),
                artifact.annotations,
                {"artifactType": artifact.artifact_type},
            )
        )
    if store is not None and empty in there:
        with contextlib.suppress(OSError, ImageError):  # a hint only: without it, the next asks
            store.note_present(host, path, [empty])
    pushed = tuple(d.digest for d in descriptors)
    if mode == "referrers-api":
        return ReferrersPush(repository, pushed, "referrers-api", bytes_uploaded=sent)
    tag = fallback_tag(attestations.subject.digest)
    existing = attached  # read above; read again only after a concurrent writer
    for _ in range(3):
        known = {d.digest for d in existing}
        merged = [d.to_dict() for d in existing] + [
            d.to_dict() for d in descriptors if d.digest not in known
        ]
        index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": merged})
        client.put_manifest(path, tag, index, OCI_INDEX)
        sent += len(index)
        existing = registry_referrers(client, path, attestations.subject.digest)[0]
        if set(pushed) <= {d.digest for d in existing}:
            return ReferrersPush(repository, pushed, "tag-schema", tag, sent)
    raise ImageError(
        f"{repository}:{tag} kept changing while the attestations were added",
        hint="another client writes the same referrers tag; push again",
    )


# -- the one call the pipeline makes --------------------------------------------------------
