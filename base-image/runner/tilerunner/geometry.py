"""Exact outlines of tile-grid regions and merging of point detections.

Region polygons are the union of positive tiles, traced edge by edge (no raster contour
approximation, no shapely/OpenCV), so they are exact and deterministic.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

Ring = list[tuple[int, int]]

# direction vectors (dx, dy) in screen coordinates (y down)
_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


def _ring_area2(ring: Ring) -> int:
    """Twice the signed area (screen coordinates: clockwise is positive)."""
    s = 0
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True):
        s += x0 * y1 - x1 * y0
    return s


def _simplify(ring: Ring) -> Ring:
    """Drop vertices in the middle of straight runs."""
    out: Ring = []
    n = len(ring)
    for i in range(n):
        px, py = ring[i - 1]
        x, y = ring[i]
        nx, ny = ring[(i + 1) % n]
        if (x - px) * (ny - y) - (y - py) * (nx - x) != 0:
            out.append((x, y))
    return out


def _trace(cells: set[tuple[int, int]]) -> list[Ring]:
    """Boundary rings of a set of (col, row) cells; outer rings clockwise, holes anticlockwise."""
    edges: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for c, r in cells:
        if (c, r - 1) not in cells:
            edges[(c, r)].append((c + 1, r))
        if (c + 1, r) not in cells:
            edges[(c + 1, r)].append((c + 1, r + 1))
        if (c, r + 1) not in cells:
            edges[(c + 1, r + 1)].append((c, r + 1))
        if (c - 1, r) not in cells:
            edges[(c, r + 1)].append((c, r))
    rings: list[Ring] = []
    for start in sorted(edges):
        while edges[start]:
            ring: Ring = [start]
            prev = start
            cur = edges[start].pop(0)
            while cur != start:
                ring.append(cur)
                direction = (cur[0] - prev[0], cur[1] - prev[1])
                outs = edges[cur]
                if len(outs) == 1:
                    nxt = outs.pop()
                else:  # pinch vertex: keep cells that only touch at a corner apart
                    right = _RIGHT_TURN[direction]
                    want = (cur[0] + right[0], cur[1] + right[1])
                    nxt = want if want in outs else outs[0]
                    outs.remove(nxt)
                prev, cur = cur, nxt
            rings.append(_simplify(ring))
    return rings


def grid_regions(mask: np.ndarray) -> list[tuple[list[Ring], np.ndarray]]:
    """4-connected regions of a boolean (rows, cols) grid -> [(rings, cell mask)], row-major.

    rings[0] is the outer boundary (clockwise in screen coordinates), the rest are holes;
    vertices are grid corners (x = column, y = row).
    """
    from scipy import ndimage  # type: ignore[import-untyped]

    labels, n = ndimage.label(mask, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    regions: list[tuple[list[Ring], np.ndarray]] = []
    for index in range(1, n + 1):
        region = labels == index
        rows, cols = np.nonzero(region)
        rings = _trace({(int(c), int(r)) for r, c in zip(rows, cols, strict=True)})
        rings.sort(key=lambda ring: -abs(_ring_area2(ring)))
        outer = rings[0]
        if _ring_area2(outer) < 0:
            outer = outer[::-1]
        holes = [h if _ring_area2(h) < 0 else h[::-1] for h in rings[1:]]
        regions.append(([outer, *holes], region))
    return regions


def merge_points(
    xy: np.ndarray, weights: np.ndarray, distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Merge points closer than `distance` (single linkage): weighted centroids, group ids.

    Detections of one object cut by a tile border come out of two tiles; this joins them.
    Deterministic: groups are numbered by their first point in input order.
    """
    n = len(xy)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cells: dict[tuple[int, int], list[int]] = defaultdict(list)
    keys = np.floor(xy / max(distance, 1e-9)).astype(np.int64)
    for i, (kx, ky) in enumerate(keys):
        cells[(int(kx), int(ky))].append(i)
    d2 = distance * distance
    for (kx, ky), members in cells.items():
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in cells.get((kx + dx, ky + dy), ()):
                    for i in members:
                        if i < j and float(((xy[i] - xy[j]) ** 2).sum()) <= d2:
                            a, b = find(i), find(j)
                            if a != b:
                                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)])
    order = {r: k for k, r in enumerate(dict.fromkeys(roots.tolist()))}
    group = np.array([order[r] for r in roots.tolist()], np.int64)
    centres = np.zeros((len(order), 2))
    total = np.zeros(len(order))
    np.add.at(centres, group, xy * weights[:, None])
    np.add.at(total, group, weights)
    return centres / total[:, None], group
