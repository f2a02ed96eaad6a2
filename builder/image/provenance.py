"""Provenance recorded in every image: labels, manifest annotations and /app/config/provenance.json.

Only inputs go in (config commit, base digest, model ids and sha256, tool version, the config
commit time); never the build host, the wall clock, the ref name or any credential, so the same
inputs give the same image digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime

from builder import __version__
from builder.contracts import BaseImageRef, CustomerSpec, ResolvedModel, WeightFile
from builder.documents import FileDigest, sourcing
from builder.documents.provenance import Provenance, ProvenanceModel
from builder.errors import ImageError

LABEL_PREFIX = "com.ivd"


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dir_hash(model: ResolvedModel) -> str:
    """in-toto ``dirHash``: sha256 over the sorted ``sha256sum`` lines of the model's files."""
    lines = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(model.files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def variant_tag(version: str, variant: str) -> str:
    """``<base version>`` for cpu, ``<base version>-gpu`` for the GPU variant."""
    return version if variant == "cpu" else f"{version}-{variant}"


def variant_version(base: BaseImageRef) -> str:
    """The moving tag of an image built on ``base``: its version, with its variant."""
    return variant_tag(base.version, base.variant)


def image_version(spec: CustomerSpec, base: BaseImageRef) -> str:
    """The immutable tag: ``<base version>[-gpu]-<config rev>``."""
    return f"{variant_version(base)}-{spec.config_rev}"


def _file(f: WeightFile) -> FileDigest:
    """A fetched weight file as provenance records it (fetch has filled size and sha256)."""
    if f.size is None or f.sha256 is None:
        raise ImageError(f"{f.name}: size and sha256 are not known before the weights are fetched")
    return FileDigest(name=f.name, size=f.size, sha256=f.sha256)


def provenance_document(
    spec: CustomerSpec,
    models: tuple[ResolvedModel, ...],
    *,
    verbose_sha256: str,
    development: bool,
) -> Provenance:
    """The in-image record (/app/config/provenance.json) that `explain` reads back."""
    return Provenance(
        customer=spec.customer,
        config_repository=spec.source.url,
        config_commit=spec.commit,
        config_path=spec.source.subdir or ".",
        config_analysis=spec.analysis_path,
        verbose_sha256=verbose_sha256,
        worktree=spec.worktree,
        base_constraint=spec.base_version,
        models=tuple(
            ProvenanceModel(
                name=m.name,
                sourcing=sourcing(m.sourcing),
                registry_id=m.model_id,
                registry_name=m.registry_name,
                task_id=m.task_id,
                weights_uri=m.weights_uri,
                dir_hash=dir_hash(m),
                files=tuple(_file(f) for f in m.files),
            )
            for m in models
        ),
        builder_name="ivd-image-builder",
        builder_version=__version__,
        source_date_epoch=spec.commit_time,
        development_build=development,
    )


def image_labels(
    spec: CustomerSpec,
    models: tuple[ResolvedModel, ...],
    base: BaseImageRef,
    *,
    verbose_sha256: str,
    development: bool,
) -> dict[str, str]:
    """OCI labels (mirrored as manifest annotations) plus the product's own keys."""
    labels = {
        "org.opencontainers.image.title": f"{spec.customer} inference image",
        "org.opencontainers.image.version": image_version(spec, base),
        "org.opencontainers.image.revision": spec.commit,
        "org.opencontainers.image.source": spec.source.url,
        "org.opencontainers.image.created": rfc3339(spec.commit_time),
        "org.opencontainers.image.base.name": f"{base.repository}:{base.version}",
        "org.opencontainers.image.base.digest": base.digest or "",
        "org.opencontainers.image.vendor": "ivd-image-builder",
        f"{LABEL_PREFIX}.customer": spec.customer,
        f"{LABEL_PREFIX}.base.version": base.version,
        f"{LABEL_PREFIX}.config.analysis": spec.analysis_path,
        f"{LABEL_PREFIX}.config.sha256": verbose_sha256,
        f"{LABEL_PREFIX}.development-build": "true" if development else "false",
        f"{LABEL_PREFIX}.builder.version": __version__,
    }
    if spec.worktree:
        labels[f"{LABEL_PREFIX}.config.dirty"] = "true"
    for m in models:
        key = f"{LABEL_PREFIX}.model.{m.name}"
        labels[f"{key}.sha256"] = dir_hash(m)
        if m.model_id:
            labels[f"{key}.id"] = m.model_id
            labels[f"{key}.task"] = m.task_id or ""
    return labels


def manifest_annotations(labels: Mapping[str, str]) -> dict[str, str]:
    """The subset of labels that belongs on the manifest (OCI annotation keys)."""
    return {
        k: v
        for k, v in labels.items()
        if k.startswith("org.opencontainers.image.")
        or k in (f"{LABEL_PREFIX}.customer", f"{LABEL_PREFIX}.development-build")
    }
