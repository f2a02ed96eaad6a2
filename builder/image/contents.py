"""A built image read back (``explain``, ``verify``, the audit report): found wherever it is,
the layers ivd-image-builder made in it, and the /app files they hold.

The OCI wing reads any image (:mod:`builder.oci.image`) and knows nothing of ours; what makes
an image ours is written by :mod:`builder.image.assemble` (layer annotations, config history)
and :mod:`builder.image.provenance` (labels), and read back here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from builder.errors import ImageError
from builder.image.assemble import HISTORY_PREFIX, LAYER_NAME_ANNOTATION
from builder.image.provenance import LABEL_PREFIX
from builder.oci import (
    Descriptor,
    ImageFiles,
    LayoutImage,
    OpenedImage,
    RegistryImage,
    open_path,
    read_files,
    read_layout_index,
)
from builder.settings import Settings

#: The folders of the image our layers fill (paths inside layer tars have no leading slash).
MODELS_FOLDER: Final = "app/models/"
CONFIG_FOLDER: Final = "app/config/"
_MODEL_LABEL: Final = re.compile(rf"^{re.escape(LABEL_PREFIX)}\.model\.(.+)\.sha256$")


def open_image(reference: str, settings: Settings, *, insecure: bool | None = None) -> OpenedImage:
    """Open ``oci:DIR[:TAG]``, ``docker-archive:FILE``, a layout folder, an archive file, or a
    registry reference ``host/repo:tag`` / ``host/repo@sha256:...``; a registry reference the
    registry cannot answer is read from the local image store when that names it (a build
    that was not pushed, or a registry out of reach)."""
    image = open_path(reference)
    if image is not None:
        return image
    try:
        return RegistryImage.at(reference, settings.cache_dir / "oci", insecure=insecure)
    except ImageError as online:
        stored = _stored_image(reference, settings.store_dir)
        if stored is None:
            raise
        stored.notes.append(f"{online.message}; read {reference} from the local image store")
        return stored


def _stored_image(reference: str, store: Path) -> LayoutImage | None:
    """The image the local image store names ``reference``, or None."""
    if not (store / "index.json").is_file():
        return None
    if not any(e.ref_name == reference for e in read_layout_index(store)):
        return None
    return LayoutImage(store, reference, what=f"{reference} in the local image store {store}")


def own_layers(image: OpenedImage) -> list[tuple[str, Descriptor]]:
    """The layers this tool added (models, config) and any layer after them, with names.

    The image config's history says which layers ivd-image-builder made; everything from the
    first of them on is read, so a layer appended later cannot hide a file.
    """
    layers = image.layers
    history = [h for h in image.config.get("history") or [] if not h.get("empty_layer")]
    names: list[str | None] = [None] * len(layers)
    if len(history) == len(layers):
        for i, entry in enumerate(history):
            created_by = str(entry.get("created_by", ""))
            if created_by.startswith(HISTORY_PREFIX):
                names[i] = created_by.removeprefix(HISTORY_PREFIX).split(" ", 1)[0]
    for i, layer in enumerate(layers):
        names[i] = layer.annotations.get(LAYER_NAME_ANNOTATION) or names[i]
    first = next((i for i, n in enumerate(names) if n), None)
    if first is None:
        # The docker backend's layers carry Dockerfile history: ours are the last ones, one
        # per model (the labels list them) plus the config layer.
        models = [k for k in image.labels if _MODEL_LABEL.match(k)]
        first = len(layers) - len(models) - 1
        if not models or first < 0:
            return []
    return [
        (names[i] or f"layer {i} (not made by ivd-image-builder)", layers[i])
        for i in range(first, len(layers))
    ]


def scan_files(image: OpenedImage, layers: Sequence[tuple[str, Descriptor]]) -> ImageFiles:
    """Hash every file under /app/models and /app/config in ``layers``, in order (whiteouts
    too); the small /app/config files are kept to read."""
    return read_files(image, layers, under=(MODELS_FOLDER, CONFIG_FOLDER), keep=(CONFIG_FOLDER,))
