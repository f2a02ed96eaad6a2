"""Scoring runner outputs against a synthetic slide's ground truth (tests and benchmarks).

Region IoU is measured on a raster (default 4 um per pixel); the same raster gives the IoU
of an *oracle* tile classifier (positive when at least half a tile is carcinoma), the best
any classifier on that tile grid can reach, so tests compare against what is achievable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _raster(
    size: tuple[int, int], scale: float, polygons: list[list[list[list[float]]]]
) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("1", size, 0)
    draw = ImageDraw.Draw(image)
    for rings in polygons:
        for k, ring in enumerate(rings):
            pts = [(x / scale, y / scale) for x, y in ring]
            if len(pts) >= 3:
                draw.polygon(pts, fill=1 if k == 0 else 0)
    return np.asarray(image, bool)


def truth_mask(truth: dict[str, Any], scale: float) -> np.ndarray:
    """Carcinoma ground truth rasterised at `scale` level-0 px per pixel."""
    w, h = truth["spec"]["width"], truth["spec"]["height"]
    size = (int(np.ceil(w / scale)), int(np.ceil(h / scale)))
    return _raster(size, scale, [[r["polygon_px"]] for r in truth["carcinoma"]])


def geojson_mask(geojson: dict[str, Any], truth: dict[str, Any], scale: float) -> np.ndarray:
    """Rasterise GeoJSON polygons onto the truth's grid at `scale` level-0 px per pixel."""
    w, h = truth["spec"]["width"], truth["spec"]["height"]
    size = (int(np.ceil(w / scale)), int(np.ceil(h / scale)))
    polys = []
    for feat in geojson["features"]:
        geom = feat["geometry"]
        if geom["type"] == "Polygon":
            polys.append(geom["coordinates"])
        elif geom["type"] == "MultiPolygon":
            polys.extend(geom["coordinates"])
    return _raster(size, scale, polys)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def oracle_iou(truth: dict[str, Any], step0: float, scale: float) -> float:
    """IoU of the ideal tile classifier on a grid of `step0` level-0 px tiles."""
    gt = truth_mask(truth, scale)
    h, w = gt.shape
    cell = step0 / scale
    rows, cols = int(np.ceil(h / cell)), int(np.ceil(w / cell))
    pred = np.zeros_like(gt)
    for r in range(rows):
        for c in range(cols):
            y0, y1 = round(r * cell), min(h, round((r + 1) * cell))
            x0, x1 = round(c * cell), min(w, round((c + 1) * cell))
            block = gt[y0:y1, x0:x1]
            if block.size and block.mean() >= 0.5:
                pred[y0:y1, x0:x1] = True
    return iou(gt, pred)


def match_points(pred: np.ndarray, truth: np.ndarray, radius: float) -> tuple[int, int, int]:
    """Greedy one-to-one matching by distance; returns (true pos, false pos, false neg)."""
    if len(pred) == 0 or len(truth) == 0:
        return 0, len(pred), len(truth)
    d = np.hypot(pred[:, None, 0] - truth[None, :, 0], pred[:, None, 1] - truth[None, :, 1])
    pairs = np.argwhere(d <= radius)
    order = np.argsort(d[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_p: set[int] = set()
    used_t: set[int] = set()
    for i, j in pairs[order]:
        if i not in used_p and j not in used_t:
            used_p.add(int(i))
            used_t.add(int(j))
    tp = len(used_p)
    return tp, len(pred) - tp, len(truth) - tp


def score(
    result_dir: Path,
    truth_path: Path,
    *,
    region_feature: str = "carcinoma",
    point_feature: str = "mitosis",
    match_um: float = 8.0,
    scale_um: float = 4.0,
) -> dict[str, float]:
    """IoU (and oracle IoU), precision and recall of a runner analysis folder."""
    truth = json.loads(truth_path.read_text())
    summary = json.loads((result_dir / "summary.json").read_text())
    mpp = truth["spec"]["mpp"]
    scale = scale_um / mpp
    regions = json.loads((result_dir / f"{region_feature}.geojson").read_text())
    gt = truth_mask(truth, scale)
    got = geojson_mask(regions, truth, scale)
    grid = next(iter(summary["deterministic"]["grids"].values()))
    points = json.loads((result_dir / f"{point_feature}.geojson").read_text())
    pred = np.array([f["geometry"]["coordinates"] for f in points["features"]], float).reshape(
        -1, 2
    )
    gt_pts = np.array([[m["x_px"], m["y_px"]] for m in truth["mitoses"]], float).reshape(-1, 2)
    tp, fp, fn = match_points(pred, gt_pts, match_um / mpp)
    return {
        "iou": iou(gt, got),
        "oracle_iou": oracle_iou(truth, grid["step_level0_px"], scale),
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }
