"""Tile grids: where a model's tiles lie on the slide, and which level they are read from.

A grid is fixed by (mpp, tile size): models sharing both share one grid, so each tile is
read and decoded once for all of them. Tiles are read from the pyramid level closest to the
target mpp that is not coarser than it by more than 10 % (upsampling invents no detail),
and resized the rest of the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilerunner.slide import SlideInfo
from tilerunner.tissue import TissueMask

#: A level whose mpp is within this fraction of the target is read without resizing.
SAME_SCALE_TOLERANCE = 0.01
#: Levels coarser than the target by more than this fraction are not used.
UPSAMPLE_TOLERANCE = 0.10


def choose_level(level_mpps: list[float], target: float) -> int:
    """Index of the level to read for `target` mpp (see module docstring)."""
    usable = [i for i, m in enumerate(level_mpps) if m <= target * (1.0 + UPSAMPLE_TOLERANCE)]
    if not usable:
        return int(np.argmin(level_mpps))
    return min(usable, key=lambda i: (abs(math.log(level_mpps[i] / target)), i))


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping square tiles of `tile_size` px at `mpp`, row-major over the slide."""

    mpp: float
    tile_size: int
    level: int
    level_mpp: float
    level_downsample: float
    read_size: int  # pixels read at `level` for one tile (square)
    step0: float  # level-0 pixels per tile edge
    cols: int
    rows: int
    width0: int
    height0: int
    mpp0: float

    @property
    def key(self) -> tuple[float, int]:
        """(mpp, tile size): grids with the same key share tiles."""
        return (self.mpp, self.tile_size)

    @property
    def resize(self) -> bool:
        """True if tiles are read at another size and resized."""
        return self.read_size != self.tile_size

    def origin0(self, col: int, row: int) -> tuple[int, int]:
        """Level-0 pixel of the tile's top-left corner."""
        return round(col * self.step0), round(row * self.step0)

    def tile_area_um2(self) -> float:
        """The area one tile covers, in square micrometres."""
        return (self.tile_size * self.mpp) ** 2

    def describe(self) -> dict[str, Any]:
        """The grid as summary.json records it."""
        return {
            "mpp": self.mpp,
            "tile_size": self.tile_size,
            "level": self.level,
            "level_mpp": round(self.level_mpp, 6),
            "read_size": self.read_size,
            "resized": self.resize,
            "cols": self.cols,
            "rows": self.rows,
            "step_level0_px": round(self.step0, 6),
        }


def make_grid(info: SlideInfo, mpp: float, tile_size: int) -> TileGrid:
    """The grid for models at `mpp` with `tile_size` px inputs on this slide."""
    mpps = info.level_mpps
    level = choose_level(mpps, mpp)
    level_mpp = mpps[level]
    exact = tile_size * mpp / level_mpp
    read = (
        tile_size
        if abs(exact - tile_size) <= SAME_SCALE_TOLERANCE * tile_size
        else math.ceil(exact - 1e-6)
    )
    step0 = tile_size * mpp / info.mpp
    w0, h0 = info.dimensions
    return TileGrid(
        mpp=mpp,
        tile_size=tile_size,
        level=level,
        level_mpp=level_mpp,
        level_downsample=info.level_downsamples[level],
        read_size=read,
        step0=step0,
        cols=max(1, math.ceil(w0 / step0 - 1e-9)),
        rows=max(1, math.ceil(h0 / step0 - 1e-9)),
        width0=w0,
        height0=h0,
        mpp0=info.mpp,
    )


def tissue_fractions(grid: TileGrid, tissue: TissueMask) -> np.ndarray:
    """(rows, cols) fraction of each tile covered by tissue (integral image of the mask)."""
    sx, sy = tissue.scale0
    h, w = tissue.mask.shape
    integral = np.zeros((h + 1, w + 1), np.int32)  # a mask has far fewer than 2**31 pixels
    integral[1:, 1:] = np.cumsum(np.cumsum(tissue.mask, axis=0, dtype=np.int32), axis=1)
    xs = np.array([grid.origin0(c, 0)[0] for c in range(grid.cols + 1)], np.float64)
    ys = np.array([grid.origin0(0, r)[1] for r in range(grid.rows + 1)], np.float64)
    xs[-1] = max(xs[-1], (grid.cols) * grid.step0)
    c_idx = np.clip(np.floor(xs / sx).astype(np.int64), 0, w)
    c_end = np.clip(np.ceil(xs / sx).astype(np.int64), 0, w)
    r_idx = np.clip(np.floor(ys / sy).astype(np.int64), 0, h)
    r_end = np.clip(np.ceil(ys / sy).astype(np.int64), 0, h)
    c0, c1 = c_idx[:-1], c_end[1:]
    r0, r1 = r_idx[:-1], r_end[1:]
    total = (
        integral[r1[:, None], c1[None, :]]
        - integral[r0[:, None], c1[None, :]]
        - integral[r1[:, None], c0[None, :]]
        + integral[r0[:, None], c0[None, :]]
    )
    # area of the tile inside the slide, in mask pixels (edge tiles stick out of the slide)
    count = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    full = (grid.step0 / sx) * (grid.step0 / sy)
    denom = np.maximum(np.maximum(count, 1), 0.25 * full)
    return np.asarray(np.minimum(total / denom, 1.0), np.float32)
