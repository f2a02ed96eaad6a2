"""Tissue detection on a low-resolution image of the slide.

Saturation (HSV, lightly smoothed) separates stained tissue from glass; Otsu picks the
threshold, clamped to [min_saturation, max_saturation]: the floor keeps a blank slide (only
glass noise) empty instead of splitting its noise in two, the ceiling keeps pale stroma when
densely stained areas dominate the histogram (Otsu then splits tissue from tissue). Small
objects (dust) are removed and small holes (lumina, fat) filled, both sized in square
micrometres so the result does not depend on the thumbnail resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tilerunner.param_schema import constraint
from tilerunner.slide import Slide

_CHUNK = 2048  # level pixels per read when building the thumbnail (bounds memory)


_SATURATION = constraint(minimum=0, exclusiveMaximum=1)


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings (analysis `params.tissue` overrides them)."""

    mpp: float = field(default=8.0, metadata=constraint(exclusiveMinimum=0))  # detection image
    # Otsu is clamped to [min_saturation, max_saturation]: below, glass noise; above, stain
    min_saturation: float = field(default=0.07, metadata=_SATURATION)
    max_saturation: float = field(
        default=0.12,
        metadata={"schema": {**_SATURATION["schema"], "x-not-below": "min_saturation"}},
    )
    min_object_um2: float = field(default=25_000.0, metadata=constraint(minimum=0))
    max_hole_um2: float = field(default=25_000.0, metadata=constraint(minimum=0))
    # a tile is processed when this much of it is tissue
    min_tile_fraction: float = field(
        default=0.1, metadata=constraint(exclusiveMinimum=0, maximum=1)
    )

    def __post_init__(self) -> None:
        if not self.mpp > 0:
            raise ValueError("tissue.mpp must be > 0")
        if not 0.0 <= self.min_saturation <= self.max_saturation < 1.0:
            raise ValueError("tissue.min_saturation/max_saturation must be in [0, 1), min <= max")
        if not 0.0 < self.min_tile_fraction <= 1.0:
            raise ValueError("tissue.min_tile_fraction must be in (0, 1]")
        if self.min_object_um2 < 0 or self.max_hole_um2 < 0:
            raise ValueError("tissue areas must be >= 0")


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask and the RGB thumbnail it came from, with its scale."""

    mask: np.ndarray  # (h, w) bool
    thumbnail: np.ndarray  # (h, w, 3) uint8
    scale0: tuple[float, float]  # level-0 pixels per mask pixel (x, y)
    mpp: float  # um per mask pixel (x)
    threshold: float  # saturation threshold used
    level: int  # slide level the thumbnail was read from

    def fraction_in(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Fraction of tissue in the level-0 rectangle (pixels overlapped by it)."""
        sx, sy = self.scale0
        h, w = self.mask.shape
        c0 = min(max(math.floor(x0 / sx), 0), w)
        c1 = min(max(math.ceil(x1 / sx), 0), w)
        r0 = min(max(math.floor(y0 / sy), 0), h)
        r1 = min(max(math.ceil(y1 / sy), 0), h)
        if c1 <= c0 or r1 <= r0:
            return 0.0
        return float(self.mask[r0:r1, c0:c1].mean())

    def area_um2(self) -> float:
        """Tissue area in square micrometres."""
        sx, sy = self.scale0
        return float(self.mask.sum()) * self.mpp * self.mpp * (sy / sx)

    def describe(self) -> dict[str, Any]:
        """The mask as summary.json records it."""
        return {
            "mpp": round(self.mpp, 6),
            "shape": list(self.mask.shape),
            "level": self.level,
            "saturation_threshold": round(self.threshold, 6),
            "area_um2": round(self.area_um2(), 1),
        }


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 1.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB image."""
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(mx > 0, (mx - mn) / mx, 0.0)
    return s.astype(np.float32)


def _choose_level(slide: Slide, mpp: float) -> int:
    """Coarsest level still at least as fine as `mpp` (times 1.5), else level 0."""
    best = 0
    for i, level_mpp in enumerate(slide.info.level_mpps):
        if level_mpp <= mpp * 1.5:
            best = i
    return best


def read_thumbnail(slide: Slide, mpp: float) -> tuple[np.ndarray, int, tuple[float, float]]:
    """RGB image of the whole slide at about `mpp`, built chunk by chunk (bounded memory)."""
    from PIL import Image

    level = _choose_level(slide, mpp)
    lw, lh = slide.info.level_dimensions[level]
    level_mpp = slide.info.level_mpps[level]
    factor = max(mpp / level_mpp, 1.0)
    tw, th = max(1, round(lw / factor)), max(1, round(lh / factor))
    fx, fy = lw / tw, lh / th
    ds = slide.info.level_downsamples[level]
    out = np.empty((th, tw, 3), np.uint8)
    step = max(1, math.floor(_CHUNK / max(fx, fy)))  # output pixels per chunk edge
    for oy in range(0, th, step):
        for ox in range(0, tw, step):
            ow, oh = min(step, tw - ox), min(step, th - oy)
            lx0, ly0 = round(ox * fx), round(oy * fy)
            lx1, ly1 = min(lw, round((ox + ow) * fx)), min(lh, round((oy + oh) * fy))
            region = slide.read_region(
                (round(lx0 * ds), round(ly0 * ds)), level, (max(1, lx1 - lx0), max(1, ly1 - ly0))
            )
            if region.shape[:2] != (oh, ow):
                region = np.asarray(
                    Image.fromarray(np.ascontiguousarray(region)).resize(
                        (ow, oh), Image.Resampling.BOX
                    )
                )
            out[oy : oy + oh, ox : ox + ow] = region
    return out, level, (slide.info.dimensions[0] / tw, slide.info.dimensions[1] / th)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    from scipy import ndimage  # type: ignore[import-untyped]

    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return np.asarray(keep[labels])


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    from scipy import ndimage

    if max_px <= 0:
        return mask
    holes, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes <= max_px
    fill[0] = False
    fill[border] = False
    return np.asarray(mask | fill[holes])


def detect_tissue(slide: Slide, params: TissueParams) -> TissueMask:
    """Tissue mask of the slide at about `params.mpp` um per pixel."""
    thumb, level, scale0 = read_thumbnail(slide, params.mpp)
    from scipy import ndimage

    sat = ndimage.gaussian_filter(saturation(thumb), 1.0)
    threshold = min(max(otsu_threshold(sat.ravel()), params.min_saturation), params.max_saturation)
    mask = sat > threshold
    mpp = slide.info.mpp * scale0[0]
    px_area = mpp * slide.info.mpp * scale0[1]
    mask = _remove_small(mask, params.min_object_um2 / px_area)
    mask = _fill_small_holes(mask, params.max_hole_um2 / px_area)
    return TissueMask(
        mask=mask, thumbnail=thumb, scale0=scale0, mpp=mpp, threshold=threshold, level=level
    )
