"""Postprocessing plug-ins: a model's raw batch output -> scores, labels, maps or objects.

A chain is checked when models load: each step declares which kinds of prediction it takes
and gives (see `Kind`), so "BinaryClassification after a segmentation model" or a Mitosis
feature fed by a classifier fails before any slide work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

import numpy as np

from tilerunner.param_schema import constraint
from tilerunner.plugins.registry import Registry


class Kind(StrEnum):
    """What a prediction holds at a point of the chain."""

    SCORES = "scores"  # per tile vector (N, C)
    LABELS = "labels"  # per tile label (N,) and its score (N,)
    MAPS = "maps"  # per pixel scores (N, C, H, W)
    LABELMAP = "labelmap"  # per pixel label (N, H, W)
    OBJECTS = "objects"  # per tile list of TileObject


@dataclass(frozen=True)
class TileObject:
    """A connected component found in one tile, in tile pixel coordinates."""

    x: float  # centroid, pixels from the tile's left edge (pixel centres at +0.5)
    y: float
    area_px: int
    score: float  # mean probability over the component (1.0 for label maps)


@dataclass(frozen=True)
class Prediction:
    """One batch's output as it moves down a postprocessing chain."""

    kind: Kind
    mpp: float  # of the model input, to convert pixel areas
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    maps: np.ndarray | None = None
    objects: list[list[TileObject]] | None = None

    @staticmethod
    def from_raw(raw: np.ndarray, mpp: float) -> Prediction:
        """Wrap a model output: rank 1-2 is per tile, rank 3-4 is per pixel."""
        if raw.ndim == 1:
            return Prediction(Kind.SCORES, mpp, scores=raw[:, None].astype(np.float32))
        if raw.ndim == 2:
            return Prediction(Kind.SCORES, mpp, scores=raw.astype(np.float32))
        if raw.ndim == 3:
            return Prediction(Kind.MAPS, mpp, maps=raw[:, None].astype(np.float32))
        if raw.ndim == 4:
            return Prediction(Kind.MAPS, mpp, maps=raw.astype(np.float32))
        raise ValueError(f"model output of rank {raw.ndim} is not supported (1 to 4)")


def raw_kind(rank: int) -> Kind:
    """The kind a model output of this rank starts as (see Prediction.from_raw)."""
    return Kind.SCORES if rank <= 2 else Kind.MAPS


class Postprocessor(Protocol):
    """A postprocessing step: checks the kind it takes, turns one prediction into the next."""

    def output_kind(self, kind: Kind) -> Kind:
        """The kind this step gives for input `kind`; ValueError if it cannot take it."""
        ...

    def apply(self, pred: Prediction) -> Prediction:
        """The prediction after this step."""


POSTPROCESSING: Registry[Postprocessor] = Registry("postprocessing")
_UNIT = constraint(minimum=0, maximum=1)  # a probability threshold


def _needs(kind: Kind, accepted: tuple[Kind, ...], name: str) -> None:
    if kind not in accepted:
        raise ValueError(
            f"{name} takes {' or '.join(k.value for k in accepted)} but gets {kind.value} here"
        )


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=axis, keepdims=True), np.float32)


@POSTPROCESSING.register
@dataclass(frozen=True)
class Softmax:
    """Softmax over the class axis (scores or per-pixel maps)."""

    def output_kind(self, kind: Kind) -> Kind:
        """Scores or maps stay what they are."""
        _needs(kind, (Kind.SCORES, Kind.MAPS), "Softmax")
        return kind

    def apply(self, pred: Prediction) -> Prediction:
        """Softmax over the class axis."""
        if pred.kind is Kind.SCORES:
            assert pred.scores is not None
            return replace(pred, scores=_softmax(pred.scores, 1))
        assert pred.maps is not None
        return replace(pred, maps=_softmax(pred.maps, 1))


@POSTPROCESSING.register
@dataclass(frozen=True)
class Sigmoid:
    """Logistic function, for models that output logits."""

    def output_kind(self, kind: Kind) -> Kind:
        """Scores or maps stay what they are."""
        _needs(kind, (Kind.SCORES, Kind.MAPS), "Sigmoid")
        return kind

    def apply(self, pred: Prediction) -> Prediction:
        """The logistic function, element-wise."""

        def sig(x: np.ndarray) -> np.ndarray:
            return np.asarray(1.0 / (1.0 + np.exp(-x)), np.float32)

        if pred.kind is Kind.SCORES:
            assert pred.scores is not None
            return replace(pred, scores=sig(pred.scores))
        assert pred.maps is not None
        return replace(pred, maps=sig(pred.maps))


@POSTPROCESSING.register
@dataclass(frozen=True)
class ArgMax:
    """Most likely class: per tile (labels, with its score) or per pixel (label map)."""

    def output_kind(self, kind: Kind) -> Kind:
        """Scores become labels, maps a label map."""
        _needs(kind, (Kind.SCORES, Kind.MAPS), "ArgMax")
        return Kind.LABELS if kind is Kind.SCORES else Kind.LABELMAP

    def apply(self, pred: Prediction) -> Prediction:
        """The best class (and its score) per tile or pixel."""
        if pred.kind is Kind.SCORES:
            assert pred.scores is not None
            labels = pred.scores.argmax(axis=1)
            scores = np.take_along_axis(pred.scores, labels[:, None], axis=1)[:, 0]
            return replace(pred, kind=Kind.LABELS, labels=labels.astype(np.int64), scores=scores)
        assert pred.maps is not None
        return replace(pred, kind=Kind.LABELMAP, labels=pred.maps.argmax(axis=1), maps=None)


@POSTPROCESSING.register
@dataclass(frozen=True)
class BinaryClassification:
    """Positive when the positive-class probability >= threshold.

    Takes one score per tile (sigmoid output) or two (softmax output; `positive_index`
    picks the positive column, default 1). Gives labels (1 positive, 0 not) and the score.
    """

    threshold: float = field(default=0.5, metadata=_UNIT)
    positive_index: int = field(default=1, metadata=constraint(minimum=0))

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be a number in [0, 1]")
        if not isinstance(self.positive_index, int) or self.positive_index < 0:
            raise ValueError("positive_index must be a non-negative integer")

    def output_kind(self, kind: Kind) -> Kind:
        """Scores become labels."""
        _needs(kind, (Kind.SCORES,), "BinaryClassification")
        return Kind.LABELS

    def apply(self, pred: Prediction) -> Prediction:
        """Label 1 where the positive score reaches the threshold."""
        assert pred.scores is not None
        s = pred.scores
        if s.shape[1] == 1:
            p = s[:, 0]
        elif self.positive_index < s.shape[1]:
            p = s[:, self.positive_index]
        else:
            raise ValueError(
                f"positive_index {self.positive_index} is out of range for {s.shape[1]} classes"
            )
        labels = (p >= np.float32(self.threshold)).astype(np.int64)
        return replace(pred, kind=Kind.LABELS, labels=labels, scores=p.astype(np.float32))


@POSTPROCESSING.register
@dataclass(frozen=True)
class MaskToObjects:
    """Segmentation -> objects: threshold (or label), 8-connected components, size filter.

    For probability maps, `class_index` picks the channel (default: the last one) and
    `threshold` binarises it; for label maps, pixels equal to `label` form objects.
    Components outside [min_area_um2, max_area_um2] are dropped (area from the model mpp).
    """

    threshold: float = field(default=0.5, metadata=_UNIT)
    class_index: int | None = field(default=None, metadata=constraint(minimum=0))
    label: int = 1
    min_area_um2: float = field(default=0.0, metadata=constraint(minimum=0))
    max_area_um2: float | None = field(
        default=None, metadata=constraint(minimum=0, **{"x-not-below": "min_area_um2"})
    )

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be a number in [0, 1]")
        if self.min_area_um2 < 0:
            raise ValueError("min_area_um2 must be >= 0")
        if self.max_area_um2 is not None and self.max_area_um2 < self.min_area_um2:
            raise ValueError("max_area_um2 must be >= min_area_um2")

    def output_kind(self, kind: Kind) -> Kind:
        """Maps or label maps become objects."""
        _needs(kind, (Kind.MAPS, Kind.LABELMAP), "MaskToObjects")
        return Kind.OBJECTS

    def apply(self, pred: Prediction) -> Prediction:
        """Connected components of the thresholded mask, sized in square micrometres."""
        from scipy import ndimage  # type: ignore[import-untyped]

        px_area = pred.mpp * pred.mpp
        if pred.kind is Kind.MAPS:
            assert pred.maps is not None
            channel = pred.maps.shape[1] - 1 if self.class_index is None else self.class_index
            prob = pred.maps[:, channel]
            binary = prob >= np.float32(self.threshold)
        else:
            assert pred.labels is not None
            binary = pred.labels == self.label
            prob = binary.astype(np.float32)
        structure = np.ones((3, 3), bool)
        objects: list[list[TileObject]] = []
        for i in range(binary.shape[0]):
            found: list[TileObject] = []
            if binary[i].any():
                lab, n = ndimage.label(binary[i], structure=structure)
                index = np.arange(1, n + 1)
                areas = ndimage.sum_labels(np.ones_like(prob[i]), lab, index)
                cy_cx = ndimage.center_of_mass(np.ones_like(prob[i]), lab, index)
                means = ndimage.mean(prob[i], lab, index)
                for area, (cy, cx), mean in zip(areas, cy_cx, means, strict=True):
                    a_um2 = float(area) * px_area
                    if a_um2 < self.min_area_um2:
                        continue
                    if self.max_area_um2 is not None and a_um2 > self.max_area_um2:
                        continue
                    found.append(
                        TileObject(float(cx) + 0.5, float(cy) + 0.5, int(area), float(mean))
                    )
            objects.append(found)
        return replace(pred, kind=Kind.OBJECTS, objects=objects, maps=None)
