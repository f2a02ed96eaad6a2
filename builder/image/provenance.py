"""Provenance recorded in every image: labels, manifest annotations and /app/config/provenance.json.

Only inputs go in (config commit, base digest, model ids and sha256, tool version, the config
commit time); never the build host, the wall clock, the ref name or any credential, so the same
inputs give the same image digest. From image format 3 (:data:`LOCATION_FREE_FORMAT`) no
location goes in either: not the clone's ``origin``, not the registry alias the base was pulled
through, not the production store's spelling (see :func:`image_locations`); the attestation and
the release record say where things were reached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from builder import __version__
from builder.contracts import BaseImageRef, CustomerSpec, ResolvedModel, WeightFile
from builder.cook.expand import located_weights_uri
from builder.documents import FileDigest, ModelRecord, sourcing
from builder.documents.provenance import Provenance
from builder.errors import ImageError
from builder.image.assemble import (
    BASE_NAME_LABEL,
    LAYER_FORMAT,
    LAYER_FORMAT_LABEL,
    LAYER_NAME_ANNOTATION,
    LOCATION_FREE_FORMAT,
)
from builder.imagename import ImageName

LABEL_PREFIX = "com.ivd"
SOURCE_LABEL: Final = "org.opencontainers.image.source"


def rfc3339(epoch: int) -> str:
    """``epoch`` as an RFC 3339 UTC time (``2026-05-28T20:26:40Z``)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dir_hash(model: ResolvedModel) -> str:
    """in-toto ``dirHash``: sha256 over the sorted ``sha256sum`` lines of the model's files."""
    lines = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(model.files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def image_name(spec: CustomerSpec, base: BaseImageRef, registry: str) -> ImageName:
    """The immutable name of the image of ``spec`` on ``base`` in ``registry``."""
    return ImageName.of_build(
        registry, spec.customer, base.version, base.variant, spec.commit, dirty=spec.worktree
    )


def _file(f: WeightFile) -> FileDigest:
    """A fetched weight file as provenance records it (fetch has filled size and sha256)."""
    if f.size is None or f.sha256 is None:
        raise ImageError(f"{f.name}: size and sha256 are not known before the weights are fetched")
    return FileDigest(name=f.name, size=f.size, sha256=f.sha256)


@dataclass(frozen=True)
class Locations:
    """How an image names where its inputs were: the config repository (``<url>#<folder>``),
    the base image (``org.opencontainers.image.base.name``) and each model's weights URI.
    None: the image names no such location."""

    source: str | None
    base_name: str | None
    weights: Mapping[str, str]  # model name -> weights URI as the image records it


def image_locations(
    spec: CustomerSpec,
    models: tuple[ResolvedModel, ...],
    base: BaseImageRef,
    *,
    layer_format: int = LAYER_FORMAT,
    recorded: Locations | None = None,
) -> Locations:
    """What an image of ``layer_format`` records as locations.

    From :data:`LOCATION_FREE_FORMAT` on: the repository address customer.yaml declares (its
    ``#folder`` appended), else none; no base image name; weights by :func:`located_weights_uri`.
    So two clones of one commit, with any ``origin``, base registry alias or production store
    spelling, build the same digest. Older formats recorded the observed locations; ``verify``
    rebuilds such an image with what it ``recorded``.
    """
    if layer_format >= LOCATION_FREE_FORMAT:
        source = spec.repository
        if source and spec.source.subdir:
            source = f"{source}#{spec.source.subdir}"
        return Locations(source, None, {m.name: located_weights_uri(m) for m in models})
    if recorded is not None:
        return recorded
    return Locations(
        spec.source.url,
        f"{base.repository}:{base.version}",
        {m.name: m.weights_uri for m in models},
    )


def recorded_locations(labels: Mapping[str, str], provenance: Provenance) -> Locations:
    """The locations an image recorded (its labels and provenance.json), read back."""
    return Locations(
        source=provenance.config_repository,
        base_name=labels.get(BASE_NAME_LABEL),
        weights={m.name: str(m.weights_uri) for m in provenance.models},
    )


def provenance_document(
    spec: CustomerSpec,
    models: tuple[ResolvedModel, ...],
    *,
    verbose_sha256: str,
    development: bool,
    source: str | None,
) -> Provenance:
    """The in-image record (/app/config/provenance.json) that `explain` reads back; ``models``
    with the weights URIs the image records, ``source`` the repository it records."""
    return Provenance(
        customer=spec.customer,
        config_repository=source,
        config_commit=spec.commit,
        config_path=spec.source.subdir or ".",
        config_analysis=spec.analysis_path,
        verbose_sha256=verbose_sha256,
        worktree=spec.worktree,
        base_constraint=spec.base_version,
        models=tuple(
            ModelRecord(
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
    locations: Locations,
) -> dict[str, str]:
    """OCI labels (mirrored as manifest annotations) plus the product's own keys; the source
    and base name only where ``locations`` names them."""
    labels = {
        "org.opencontainers.image.title": f"{spec.customer} inference image",
        # the immutable tag (the registry is no input of the image)
        "org.opencontainers.image.version": image_name(spec, base, "").tag,
        "org.opencontainers.image.revision": spec.commit,
        "org.opencontainers.image.created": rfc3339(spec.commit_time),
        "org.opencontainers.image.base.digest": base.digest or "",
        "org.opencontainers.image.vendor": "ivd-image-builder",
        f"{LABEL_PREFIX}.customer": spec.customer,
        f"{LABEL_PREFIX}.base.version": base.version,
        f"{LABEL_PREFIX}.config.analysis": spec.analysis_path,
        f"{LABEL_PREFIX}.config.sha256": verbose_sha256,
        f"{LABEL_PREFIX}.development-build": "true" if development else "false",
        f"{LABEL_PREFIX}.builder.version": __version__,
    }
    if locations.source is not None:
        labels[SOURCE_LABEL] = locations.source
    if locations.base_name is not None:
        labels[BASE_NAME_LABEL] = locations.base_name
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


# -- what differs between two images ------------------------------------------------------------

#: Labels that record an input, in the order a comparison lists them, with what they record.
_INPUT_LABELS: Final = (
    ("org.opencontainers.image.revision", "config commit"),
    (f"{LABEL_PREFIX}.config.sha256", "verbose config sha256"),
    ("org.opencontainers.image.base.digest", "base digest"),
    (f"{LABEL_PREFIX}.base.version", "base version"),
    (LAYER_FORMAT_LABEL, "image format"),
    (f"{LABEL_PREFIX}.builder.version", "builder version"),
    (f"{LABEL_PREFIX}.development-build", "development build"),
    (SOURCE_LABEL, "recorded repository"),
    (BASE_NAME_LABEL, "recorded base name"),
)
#: How many differences a one-line message lists before "and N more".
MAX_DIFFERENCES: Final = 8


def _shown(value: str | None) -> str:
    if value is None:
        return "none"
    hexpart = value.removeprefix("sha256:")
    if len(hexpart) in (40, 64) and all(c in "0123456789abcdef" for c in hexpart):
        return value[: len(value) - len(hexpart) + 12]
    return value if len(value) <= 80 else f"{value[:77]}..."


def _label_name(key: str) -> str:
    known = dict(_INPUT_LABELS)
    if key in known:
        return known[key]
    model = key.removeprefix(f"{LABEL_PREFIX}.model.")
    if model != key:
        name, _, field = model.rpartition(".")
        return f"model {name} {field}"
    return f"label {key}"


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one (a malformed document reads empty)."""
    return value if isinstance(value, Mapping) else {}


def _labels_of(config: Mapping[str, Any]) -> dict[str, str]:
    raw = _mapping(_mapping(config.get("config")).get("Labels"))
    return {str(k): str(v) for k, v in raw.items()}


def layer_format_of(config: Mapping[str, Any]) -> int:
    """The layer format an image config records (no label: format 1; unreadable: 0)."""
    raw = _labels_of(config).get(LAYER_FORMAT_LABEL, "1")
    return int(raw) if raw.isdigit() else 0


def _layers_of(manifest: Mapping[str, Any]) -> dict[str, str]:
    layers = manifest.get("layers")
    out = {}
    for index, raw in enumerate(layers if isinstance(layers, list) else []):
        layer = _mapping(raw)
        name = _mapping(layer.get("annotations")).get(LAYER_NAME_ANNOTATION)
        out[str(name or f"base layer {index}")] = str(layer.get("digest"))
    return out


def image_differences(
    tagged: tuple[Mapping[str, Any], Mapping[str, Any]],
    built: tuple[Mapping[str, Any], Mapping[str, Any]],
) -> list[str]:
    """What differs between two images, each given as (manifest, image config): their
    recorded inputs side by side (config commit, verbose config, models, base digest, image
    format, builder version, ...), ``<what>: <tagged> (tagged) vs <built> (this build)``; when
    the recorded inputs agree, the layers that differ."""
    a, b = _labels_of(tagged[1]), _labels_of(built[1])
    if LAYER_FORMAT_LABEL in a or LAYER_FORMAT_LABEL in b:  # absent: format 1
        a.setdefault(LAYER_FORMAT_LABEL, "1")
        b.setdefault(LAYER_FORMAT_LABEL, "1")
    first = [key for key, _ in _INPUT_LABELS]
    models = sorted(k for k in set(a) | set(b) if k.startswith(f"{LABEL_PREFIX}.model."))
    rest = sorted((set(a) | set(b)) - set(first) - set(models))
    lines = [
        f"{_label_name(key)}: {_shown(a.get(key))} (tagged) vs {_shown(b.get(key))} (this build)"
        for key in [*first, *models, *rest]
        if a.get(key) != b.get(key)
    ]
    if lines:
        return lines
    la, lb = _layers_of(tagged[0]), _layers_of(built[0])
    lines = [
        f"layer {name}: {_shown(la.get(name))} (tagged) vs {_shown(lb.get(name))} (this build)"
        for name in [*la, *(n for n in lb if n not in la)]
        if la.get(name) != lb.get(name)
    ]
    return lines or ["the recorded inputs and the layers agree; the manifests differ"]


def summarize(differences: list[str]) -> str:
    """Differences as one line (the first :data:`MAX_DIFFERENCES`, then how many more)."""
    shown = differences[:MAX_DIFFERENCES]
    more = len(differences) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


def immutable_tag_error(
    ref: str, current: str, new: str, differences: list[str], where: str = ""
) -> ImageError:
    """The refusal to move immutable tag ``ref`` (``where``: e.g. " in the local image store
    DIR") from ``current`` to ``new``, naming what differs between the two images."""
    return ImageError(
        f"{ref} is an immutable tag{where} and already points to {current}; refusing to move "
        f"it to {new}. What differs: {summarize(differences)}",
        hint="build with a new config revision, or pass --force to overwrite",
    )


def only_the_base_differs(
    tagged: Mapping[str, Any], built: Mapping[str, Any], base_labels: Mapping[str, str]
) -> bool:
    """Whether two image configs of one base version differ in their base only: the base
    digest, and labels the (new) base image carries itself (``base_labels``)."""
    a, b = _labels_of(tagged), _labels_of(built)
    digest, version = "org.opencontainers.image.base.digest", f"{LABEL_PREFIX}.base.version"
    if a.get(version) != b.get(version) or a.get(digest) == b.get(digest):
        return False
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return all(k == digest or k in base_labels for k in differing)


def moved_tag_warning(ref: str, current: str, new: str, why: str, where: str) -> str:
    """The notice that tag ``ref`` (``where``: the local store) moved to this build, and
    ``why`` the store allowed it."""
    return (
        f"immutable tag {ref}{where} moved from {current} to {new}: {why}. A registry still "
        "refuses the move (build a new config revision or base version, or --force)"
    )


def forced_tag_warning(
    ref: str, current: str, new: str, differences: list[str], where: str = ""
) -> str:
    """The warning of a forced move of immutable tag ``ref``: what it pointed to and what
    differs."""
    return (
        f"FORCED: immutable tag {ref}{where} overwritten; it pointed to {current}, now {new} "
        f"(what differs: {summarize(differences)})"
    )
