"""Feature plug-ins: turn per-tile predictions into regions, detections, heatmaps, counts.

A feature names the models it needs by role (`roles`, with the prediction kind each role's
postprocessing chain must end in), takes batches of predictions (`consume`, which also says
which tiles are positive for dependent features) and produces its results (`finish`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from tilerunner.geometry import grid_regions, merge_points
from tilerunner.grid import TileGrid
from tilerunner.param_schema import constraint
from tilerunner.plugins.postprocessing import Kind, Prediction
from tilerunner.plugins.registry import Registry

_NS = uuid.UUID("5b0a44a3-6f49-4a5e-9a0e-1f3c3d0c5e11")


@dataclass
class FeatureResult:
    """What a feature hands to the output writer."""

    geojson: list[dict[str, Any]]  # GeoJSON Feature objects (QuPath flavoured)
    heatmaps: dict[str, np.ndarray]  # name -> (rows, cols) float32, NaN where not computed
    summary: dict[str, Any]
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # for overlays


class Feature(Protocol):
    """A feature on tiles: takes predictions, marks positive tiles, finishes with its results."""

    roles: ClassVar[Mapping[str, Kind]]
    Params: ClassVar[type]

    def consume(self, tiles: np.ndarray, preds: Mapping[str, Prediction]) -> np.ndarray:
        """Record predictions for tiles (k, 2) of (col, row); return their positive flags."""
        ...

    def positive_grid(self) -> np.ndarray:
        """(rows, cols) bool: tiles this feature marked positive (gates dependents)."""
        ...

    def finish(self) -> FeatureResult:
        """The feature's GeoJSON, heatmaps and summary numbers."""


class FeatureFactory(Protocol):
    """A feature class: its model roles, its Params, and how to make one for a grid."""

    roles: ClassVar[Mapping[str, Kind]]
    Params: ClassVar[type]

    def __call__(self, name: str, grid: TileGrid, params: Any) -> Feature: ...


FEATURES: Registry[Any] = Registry("feature")
#: An RGB colour for QuPath: 3 integers 0-255.
_COLOUR = constraint(
    minItems=3, maxItems=3, items={"type": "integer", "minimum": 0, "maximum": 255}
)


def _object_id(*parts: object) -> str:
    return str(uuid.uuid5(_NS, "/".join(map(str, parts))))


def _r(v: float, nd: int = 3) -> float:
    return float(round(float(v), nd))


def _validate_colour(colour: list[int]) -> None:
    if (
        not isinstance(colour, list | tuple)
        or len(colour) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
    ):
        raise ValueError("color must be a list of 3 integers 0-255")


@FEATURES.register
class Carcinoma:
    """Tile classification -> probability heatmap and region polygons of positive tiles."""

    roles: ClassVar[Mapping[str, Kind]] = {"classification_model": Kind.LABELS}

    @dataclass(frozen=True)
    class Params:
        """Params of Carcinoma (config `params`)."""

        min_region_area_um2: float = field(default=0.0, metadata=constraint(minimum=0))
        class_name: str = "Carcinoma"
        color: list[int] = field(default_factory=lambda: [200, 40, 40], metadata=_COLOUR)

        def __post_init__(self) -> None:
            if self.min_region_area_um2 < 0:
                raise ValueError("min_region_area_um2 must be >= 0")
            _validate_colour(self.color)

    def __init__(self, name: str, grid: TileGrid, params: Carcinoma.Params) -> None:
        self.name, self.grid, self.params = name, grid, params
        self.prob = np.full((grid.rows, grid.cols), np.nan, np.float32)
        self.positive = np.zeros((grid.rows, grid.cols), bool)

    def consume(self, tiles: np.ndarray, preds: Mapping[str, Prediction]) -> np.ndarray:
        """Record the tiles' scores and labels; the mask of positive tiles."""
        pred = preds["classification_model"]
        assert pred.scores is not None and pred.labels is not None
        cols, rows = tiles[:, 0], tiles[:, 1]
        self.prob[rows, cols] = pred.scores
        flags = pred.labels.astype(bool)
        self.positive[rows, cols] = flags
        return flags

    def positive_grid(self) -> np.ndarray:
        """Tiles classified carcinoma (children run only there)."""
        return self.positive

    def _clipped_cell_area_um2(self, region: np.ndarray) -> float:
        g = self.grid
        rows, cols = (v.tolist() for v in np.nonzero(region))
        x0 = np.array([g.origin0(c, 0)[0] for c in cols], np.float64)
        x1 = np.minimum(np.array([g.origin0(c + 1, 0)[0] for c in cols], np.float64), g.width0)
        y0 = np.array([g.origin0(0, r)[1] for r in rows], np.float64)
        y1 = np.minimum(np.array([g.origin0(0, r + 1)[1] for r in rows], np.float64), g.height0)
        return float(((x1 - x0) * (y1 - y0)).sum() * g.mpp0 * g.mpp0)

    def finish(self) -> FeatureResult:
        """Regions of positive tiles, the probability heatmap and the areas."""
        g, p = self.grid, self.params
        features: list[dict[str, Any]] = []
        total_area = 0.0
        kept = 0
        for index, (rings, region) in enumerate(grid_regions(self.positive)):
            area = self._clipped_cell_area_um2(region)
            if area < p.min_region_area_um2:
                continue
            kept += 1
            total_area += area
            probs = self.prob[region]
            coords = [
                [
                    [min(g.origin0(x, 0)[0], g.width0), min(g.origin0(0, y)[1], g.height0)]
                    for x, y in [*ring, ring[0]]
                ]
                for ring in rings
            ]
            features.append(
                {
                    "type": "Feature",
                    "id": _object_id(self.name, "region", index),
                    "geometry": {"type": "Polygon", "coordinates": coords},
                    "properties": {
                        "objectType": "annotation",
                        "name": f"{p.class_name} region {kept}",
                        "classification": {"name": p.class_name, "color": list(p.color)},
                        "isLocked": False,
                        "measurements": {
                            "Area um^2": _r(area, 1),
                            "Tiles": int(region.sum()),
                            "Mean probability": _r(float(probs.mean()), 4),
                            "Max probability": _r(float(probs.max()), 4),
                        },
                    },
                }
            )
        run = int(np.isfinite(self.prob).sum())
        return FeatureResult(
            geojson=features,
            heatmaps={"probability": self.prob},
            summary={
                "tiles_run": run,
                "positive_tiles": int(self.positive.sum()),
                "regions": kept,
                "area_um2": _r(total_area, 1),
                "area_mm2": _r(total_area / 1e6, 4),
            },
        )


@FEATURES.register
class Mitosis:
    """Segmentation -> point detections (merged across tile borders) and a count heatmap."""

    roles: ClassVar[Mapping[str, Kind]] = {"segmentation_model": Kind.OBJECTS}

    @dataclass(frozen=True)
    class Params:
        """Params of Mitosis (config `params`)."""

        merge_distance_um: float = field(default=4.0, metadata=constraint(minimum=0))
        class_name: str = "Mitosis"
        color: list[int] = field(default_factory=lambda: [20, 20, 220], metadata=_COLOUR)

        def __post_init__(self) -> None:
            if self.merge_distance_um < 0:
                raise ValueError("merge_distance_um must be >= 0")
            _validate_colour(self.color)

    def __init__(self, name: str, grid: TileGrid, params: Mitosis.Params) -> None:
        self.name, self.grid, self.params = name, grid, params
        self.count = np.full((grid.rows, grid.cols), np.nan, np.float32)
        self._xy: list[tuple[float, float]] = []
        self._area: list[float] = []
        self._score: list[float] = []

    def consume(self, tiles: np.ndarray, preds: Mapping[str, Prediction]) -> np.ndarray:
        """Record the tiles' detected objects; the mask of tiles with any."""
        pred = preds["segmentation_model"]
        assert pred.objects is not None
        g = self.grid
        scale = g.step0 / g.tile_size  # level-0 px per model px
        px_um2 = pred.mpp * pred.mpp
        flags = np.zeros(len(tiles), bool)
        for i, ((col, row), objects) in enumerate(zip(tiles, pred.objects, strict=True)):
            ox, oy = g.origin0(int(col), int(row))
            for obj in objects:
                x, y = ox + obj.x * scale, oy + obj.y * scale
                if x >= g.width0 or y >= g.height0:
                    continue
                self._xy.append((x, y))
                self._area.append(obj.area_px * px_um2)
                self._score.append(obj.score)
            self.count[row, col] = len(objects)
            flags[i] = bool(objects)
        return flags

    def positive_grid(self) -> np.ndarray:
        """Tiles with at least one mitosis."""
        return np.nan_to_num(self.count) > 0

    def finish(self) -> FeatureResult:
        """Merged detections as points, the count heatmap and the density."""
        g, p = self.grid, self.params
        xy = np.asarray(self._xy, np.float64).reshape(-1, 2)
        area = np.asarray(self._area, np.float64)
        score = np.asarray(self._score, np.float64)
        centres, group = merge_points(xy, np.maximum(area, 1e-9), p.merge_distance_um / g.mpp0)
        features: list[dict[str, Any]] = []
        for k, (x, y) in enumerate(centres):
            members = group == k
            features.append(
                {
                    "type": "Feature",
                    "id": _object_id(self.name, "detection", _r(x, 2), _r(y, 2)),
                    "geometry": {"type": "Point", "coordinates": [_r(x, 2), _r(y, 2)]},
                    "properties": {
                        "objectType": "detection",
                        "classification": {"name": p.class_name, "color": list(p.color)},
                        "isLocked": False,
                        "measurements": {
                            "Area um^2": _r(float(area[members].sum()), 2),
                            "Probability": _r(float(score[members].max()), 4),
                        },
                    },
                }
            )
        # recount per tile after merging (a split object counts once, in the tile of its centre)
        run = np.isfinite(self.count)
        merged = np.where(run, 0.0, np.nan).astype(np.float32)
        for x, y in centres:
            col = min(int(x // g.step0), g.cols - 1)
            row = min(int(y // g.step0), g.rows - 1)
            if run[row, col]:
                merged[row, col] += 1
        tiles_run = int(run.sum())
        area_mm2 = tiles_run * g.tile_area_um2() / 1e6
        return FeatureResult(
            geojson=features,
            heatmaps={"count": merged},
            summary={
                "tiles_run": tiles_run,
                "positive_tiles": int((np.nan_to_num(merged) > 0).sum()),
                "count": len(features),
                "area_searched_mm2": _r(area_mm2, 4),
                "per_mm2": _r(len(features) / area_mm2, 3) if area_mm2 else 0.0,
            },
            points=centres,
        )
