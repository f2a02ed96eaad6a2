"""Synthetic pyramidal whole-slide images with known ground truth (demo and tests only).

Every pixel is a pure function of the slide spec and its physical position, so any region
of any pyramid level renders on its own: a 50k x 50k slide is written tile by tile in
bounded memory, and each level is rendered at its own resolution (no full-level buffers).

The appearance is a cartoon of H&E: glass, pink stroma with sparse small nuclei,
"carcinoma" regions with dense large dark nuclei, and "mitoses" (very dark round blobs,
about 6 um across) inside carcinoma regions, plus tiny dark "mimics" that a blob detector
must reject by size. Pyramid levels are top-level IFDs (not SubIFDs), which OpenSlide reads
as levels (wsi-runtimes.md 5b); mpp is in the TIFF resolution tags (generic TIFF) or in an
Aperio ImageDescription.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Fine levels render individual nuclei; coarser levels blend their expected coverage.
_NUCLEI_MAX_MPP = 1.0


@dataclass(frozen=True)
class Palette:
    """RGB colours of one stain/scanner look; "B" stands in for a second customer's scanner."""

    glass: tuple[int, int, int] = (243, 243, 245)
    stroma: tuple[int, int, int] = (238, 182, 208)
    carcinoma_bg: tuple[int, int, int] = (226, 168, 206)
    nucleus: tuple[int, int, int] = (118, 78, 158)
    carcinoma_nucleus: tuple[int, int, int] = (96, 58, 148)
    mitosis: tuple[int, int, int] = (42, 22, 78)
    mimic: tuple[int, int, int] = (52, 32, 90)


PALETTES: dict[str, Palette] = {
    "A": Palette(),
    "B": Palette(
        glass=(240, 242, 246),
        stroma=(236, 192, 222),
        carcinoma_bg=(222, 178, 220),
        nucleus=(128, 92, 176),
        carcinoma_nucleus=(108, 72, 166),
        mitosis=(58, 36, 100),
        mimic=(66, 44, 108),
    ),
}


@dataclass(frozen=True)
class Nuclei:
    """A jittered-grid point process of round nuclei (one candidate per cell)."""

    cell_um: float
    radius_um: float
    radius_jitter_um: float
    density: float  # probability that a cell holds a nucleus
    grid_id: int


STROMA_NUCLEI = Nuclei(cell_um=16.0, radius_um=2.2, radius_jitter_um=0.4, density=0.8, grid_id=1)
CARCINOMA_NUCLEI = Nuclei(
    cell_um=12.0, radius_um=3.2, radius_jitter_um=0.6, density=0.95, grid_id=2
)
MITOSIS_RADIUS_UM = 3.0
MIMIC_RADIUS_UM = 1.3


@dataclass(frozen=True)
class Blob:
    """A wobbly ellipse in micrometres: r(theta) scaled by 1 + sum a*sin(k*theta + phase)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    wobble: tuple[tuple[float, int, float], ...] = ()

    def bbox(self) -> tuple[float, float, float, float]:
        """Conservative bounding box (x0, y0, x1, y1) in um."""
        r = max(self.rx, self.ry) * (1.0 + sum(abs(a) for a, _, _ in self.wobble))
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def contains(self, xu: np.ndarray, yu: np.ndarray) -> np.ndarray:
        """Boolean mask of points (um) inside the blob."""
        dx, dy = xu - self.cx, yu - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.rx
        v = (-dx * s + dy * c) / self.ry
        theta = np.arctan2(v, u)
        scale = np.ones_like(theta)
        for amp, k, phase in self.wobble:
            scale = scale + amp * np.sin(k * theta + phase)
        return np.asarray(u * u + v * v <= scale * scale)

    def polygon(self, n: int = 360) -> list[tuple[float, float]]:
        """The boundary as n vertices (um), counter-clockwise in image coordinates."""
        theta = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        scale = np.ones_like(theta)
        for amp, k, phase in self.wobble:
            scale = scale + amp * np.sin(k * theta + phase)
        u, v = np.cos(theta) * scale * self.rx, np.sin(theta) * scale * self.ry
        c, s = math.cos(self.angle), math.sin(self.angle)
        xs, ys = self.cx + u * c - v * s, self.cy + u * s + v * c
        return [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]

    def area_um2(self) -> float:
        """Area of the polygonised boundary (shoelace)."""
        pts = np.array(self.polygon(2048))
        x, y = pts[:, 0], pts[:, 1]
        return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


@dataclass(frozen=True)
class SlideSpec:
    """Everything that determines a synthetic slide's pixels and its ground truth."""

    width: int  # level-0 pixels
    height: int
    mpp: float
    seed: int
    palette: str = "A"
    tissue: tuple[Blob, ...] = ()
    carcinoma: tuple[Blob, ...] = ()
    mitoses: tuple[tuple[float, float], ...] = ()  # centres in um
    mimics: tuple[tuple[float, float], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- hashing


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a deterministic hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return np.asarray(x ^ (x >> np.uint64(31)))


def _hash_uniform(ix: np.ndarray, iy: np.ndarray, salt: int, count: int) -> list[np.ndarray]:
    """`count` independent uniforms in [0, 1) per integer cell (ix, iy)."""
    base = (
        ix.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        + iy.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        + np.uint64((salt * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
    )
    out = []
    for k in range(count):
        h = _mix64(base + np.uint64(((k + 1) * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF))
        out.append((h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0))
    return out


# --------------------------------------------------------------------------- spec


def _rng_blob(rng: np.random.Generator, cx: float, cy: float, r: float, wobble: float) -> Blob:
    aspect = rng.uniform(0.75, 1.0)
    terms = (
        (wobble * rng.uniform(0.5, 1.0), 3, rng.uniform(0, 2 * math.pi)),
        (wobble * 0.5 * rng.uniform(0.5, 1.0), 5, rng.uniform(0, 2 * math.pi)),
    )
    return Blob(cx, cy, r, r * aspect, rng.uniform(0, math.pi), terms)


def _inside(outer: Blob, inner: Blob, margin_um: float) -> bool:
    pts = np.array(inner.polygon(180))
    xs, ys = pts[:, 0], pts[:, 1]
    ok = outer.contains(xs, ys)
    # also points pushed outward by the margin
    dx, dy = xs - inner.cx, ys - inner.cy
    norm = np.hypot(dx, dy) + 1e-9
    ok &= outer.contains(xs + dx / norm * margin_um, ys + dy / norm * margin_um)
    return bool(ok.all())


def _place_mitoses(rng: np.random.Generator, region: Blob, count: int) -> list[tuple[float, float]]:
    """Up to `count` points >= ~130 um inside the region and >= 30 um apart."""
    shrunk = Blob(
        region.cx, region.cy, region.rx - 130.0, region.ry - 130.0, region.angle, region.wobble
    )
    placed: list[tuple[float, float]] = []
    if shrunk.rx <= 0 or shrunk.ry <= 0:
        return placed
    for _try in range(count * 40):
        if len(placed) >= count:
            break
        px = region.cx + rng.uniform(-1, 1) * region.rx
        py = region.cy + rng.uniform(-1, 1) * region.rx
        if not shrunk.contains(np.array([px]), np.array([py]))[0]:
            continue
        if any(math.hypot(px - qx, py - qy) < 30.0 for qx, qy in placed):
            continue
        placed.append((px, py))
    return placed


def make_spec(
    width: int,
    height: int,
    *,
    seed: int = 0,
    mpp: float = 0.25,
    palette: str = "A",
    tissue: bool = True,
    cell_mm: float = 2.0,
) -> SlideSpec:
    """Lay out tissue, carcinoma regions, mitoses and mimics deterministically from `seed`.

    The slide is cut into cells of about `cell_mm`; each cell gets one tissue blob (the
    single cell of a small slide always does) and most blobs one carcinoma region well
    inside them. Mitoses sit at least one model tile (120 um) inside a carcinoma boundary,
    30 um apart, so that tile-level gating cannot hide them.
    """
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; choose one of {sorted(PALETTES)}")
    rng = np.random.default_rng(seed)
    w_um, h_um = width * mpp, height * mpp
    nx = max(1, round(w_um / (cell_mm * 1000)))
    ny = max(1, round(h_um / (cell_mm * 1000)))
    cw, ch = w_um / nx, h_um / ny
    blobs: list[Blob] = []
    regions: list[Blob] = []
    mitoses: list[tuple[float, float]] = []
    mimics: list[tuple[float, float]] = []
    single = nx * ny == 1
    for j in range(ny):
        for i in range(nx):
            keep = rng.uniform()
            if not tissue or (not single and keep > 0.85):
                continue
            r = min(cw, ch) * rng.uniform(0.36, 0.42)
            cx = (i + 0.5) * cw + rng.uniform(-0.04, 0.04) * cw
            cy = (j + 0.5) * ch + rng.uniform(-0.04, 0.04) * ch
            blob = _rng_blob(rng, cx, cy, r, 0.08)
            blobs.append(blob)
            if not single and rng.uniform() > 0.7:
                continue
            for _attempt in range(50):
                rr = r * rng.uniform(0.38, 0.48)
                off = r * 0.35
                region = _rng_blob(
                    rng, cx + rng.uniform(-off, off), cy + rng.uniform(-off, off), rr, 0.06
                )
                if _inside(blob, region, 60.0):
                    break
            else:  # pragma: no cover - the layout is generous; kept as a guard
                continue
            regions.append(region)
            n_mit = max(3, round(region.area_um2() / 40000.0))
            mitoses.extend(_place_mitoses(rng, region, n_mit))
            for _m in range(n_mit):
                mimics.append(
                    (
                        region.cx + rng.uniform(-0.6, 0.6) * region.rx,
                        region.cy + rng.uniform(-0.6, 0.6) * region.ry,
                    )
                )
    return SlideSpec(
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        palette=palette,
        tissue=tuple(blobs),
        carcinoma=tuple(regions),
        mitoses=tuple(mitoses),
        mimics=tuple(mimics),
    )


# --------------------------------------------------------------------------- rendering

_NOISE_SIZE = 512


def _noise_table(seed: int) -> np.ndarray:
    """A fixed table of pixel noise in [-4, 4), tiled over the slide (cheaper than hashing)."""
    (u,) = _hash_uniform(
        np.arange(_NOISE_SIZE * _NOISE_SIZE, dtype=np.int64) % _NOISE_SIZE,
        np.arange(_NOISE_SIZE * _NOISE_SIZE, dtype=np.int64) // _NOISE_SIZE,
        seed * 7919 + 17,
        1,
    )
    return ((u - 0.5) * 8.0).astype(np.float32).reshape(_NOISE_SIZE, _NOISE_SIZE)


_NOISE_CACHE: dict[int, np.ndarray] = {}


def _noise(seed: int, x: int, y: int, w: int, h: int, level_salt: int) -> np.ndarray:
    """Pixel noise for a region: a view into the tiled table when it fits, else a gather."""
    table = _NOISE_CACHE.get(seed)
    if table is None:
        base = _noise_table(seed)
        table = _NOISE_CACHE[seed] = np.tile(base, (2, 2))
    xo = (x + level_salt * 131) % _NOISE_SIZE
    yo = (y + level_salt * 71) % _NOISE_SIZE
    if w <= _NOISE_SIZE and h <= _NOISE_SIZE:
        return table[yo : yo + h, xo : xo + w]
    xi = (np.arange(w) + xo) % _NOISE_SIZE
    yi = (np.arange(h) + yo) % _NOISE_SIZE
    return table[yi[:, None], xi[None, :]]


def _seg_dist(ax: float, ay: float, bx: float, by: float) -> float:
    """Distance from the origin to the segment a-b."""
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, -(ax * dx + ay * dy) / (dx * dx + dy * dy + 1e-30)))
    return math.hypot(ax + t * dx, ay + t * dy)


def _blob_mask(blob: Blob, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | bool:
    """Mask of a blob over the grid xs x ys (um); True/False when the tile is wholly in/out.

    The tile maps to a parallelogram in the blob's normalised (u, v) space; comparing its
    nearest and farthest points with the wobble bounds decides most tiles without trig.
    """
    c, s = math.cos(blob.angle), math.sin(blob.angle)
    corners = []
    for px, py in ((xs[0], ys[0]), (xs[-1], ys[0]), (xs[-1], ys[-1]), (xs[0], ys[-1])):
        dx, dy = px - blob.cx, py - blob.cy
        corners.append(((dx * c + dy * s) / blob.rx, (-dx * s + dy * c) / blob.ry))
    far = max(math.hypot(u, v) for u, v in corners)
    cross = [
        corners[i][0] * corners[(i + 1) % 4][1] - corners[i][1] * corners[(i + 1) % 4][0]
        for i in range(4)
    ]
    origin_inside = all(v >= 0 for v in cross) or all(v <= 0 for v in cross)
    near = (
        0.0
        if origin_inside
        else min(_seg_dist(*corners[i], *corners[(i + 1) % 4]) for i in range(4))
    )
    wob = sum(abs(a) for a, _, _ in blob.wobble)
    if near >= 1.0 + wob:
        return False
    if far <= 1.0 - wob:
        return True
    if not origin_inside:
        # tighter: the wobble only over the angles the tile spans (sampled, Lipschitz margin)
        angles = np.unwrap([math.atan2(v, u) for u, v in corners])
        lo, hi = float(angles.min()), float(angles.max())
        theta = np.linspace(lo, hi, 17)
        scale = np.ones_like(theta)
        for amp, k, phase in blob.wobble:
            scale = scale + amp * np.sin(k * theta + phase)
        slack = sum(abs(a) * k for a, k, _ in blob.wobble) * (hi - lo) / 32.0
        if near >= float(scale.max()) + slack:
            return False
        if far <= float(scale.min()) - slack:
            return True
    return blob.contains(xs[None, :], ys[:, None])


def _mask_of(blobs: tuple[Blob, ...], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    mask = np.zeros((ys.size, xs.size), bool)
    for blob in blobs:
        m = _blob_mask(blob, xs, ys)
        if m is True:
            mask[:] = True
            break
        if m is not False:
            mask |= m
    return mask


def _nuclei(xs: np.ndarray, ys: np.ndarray, nuc: Nuclei, seed: int, mpp: float) -> np.ndarray:
    """Anti-aliased coverage (times a per-nucleus shade) of one point process of nuclei.

    One candidate nucleus per cell, centred anywhere in its cell; each is drawn in its own
    bounding box, so the cost is per nucleus, not per pixel and cell.
    """
    h, w = ys.size, xs.size
    alpha = np.zeros((h, w), np.float32)
    rmax = nuc.radius_um + nuc.radius_jitter_um
    c0 = math.floor((xs[0] - rmax) / nuc.cell_um)
    c1 = math.floor((xs[-1] + rmax) / nuc.cell_um)
    r0 = math.floor((ys[0] - rmax) / nuc.cell_um)
    r1 = math.floor((ys[-1] + rmax) / nuc.cell_um)
    gx, gy = np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1))
    u_present, u_r, u_x, u_y, u_shade = _hash_uniform(gx, gy, seed * 1000 + nuc.grid_id, 5)
    keep = u_present < nuc.density
    radii = nuc.radius_um + nuc.radius_jitter_um * (2.0 * u_r[keep] - 1.0)
    cxs = (gx[keep] + u_x[keep]) * nuc.cell_um
    cys = (gy[keep] + u_y[keep]) * nuc.cell_um
    shades = (0.85 + 0.3 * u_shade[keep]).astype(np.float32)
    x_first, y_first = xs[0], ys[0]
    inv = 1.0 / mpp
    for cx, cy, r, shade in zip(cxs, cys, radii, shades, strict=True):
        i0 = max(0, math.floor((cx - r - x_first) * inv) - 1)
        i1 = min(w, math.ceil((cx + r - x_first) * inv) + 2)
        j0 = max(0, math.floor((cy - r - y_first) * inv) - 1)
        j1 = min(h, math.ceil((cy + r - y_first) * inv) + 2)
        if i0 >= i1 or j0 >= j1:
            continue
        dx = (xs[i0:i1] - cx).astype(np.float32)
        dy = (ys[j0:j1] - cy).astype(np.float32)
        d = np.sqrt(dx[None, :] ** 2 + dy[:, None] ** 2)
        a = np.clip((np.float32(r) - d) * np.float32(inv) + 0.5, 0.0, 1.0) * shade
        box = alpha[j0:j1, i0:i1]
        np.maximum(box, a, out=box)
    return np.minimum(alpha, 1.0, out=alpha)


def _discs(
    xs: np.ndarray, ys: np.ndarray, centres: np.ndarray, radius: float, mpp: float
) -> np.ndarray | None:
    """Anti-aliased coverage of the explicit discs near the region (None when there are none)."""
    if centres.size == 0:
        return None
    pad = radius + mpp
    sel = centres[
        (centres[:, 0] >= xs[0] - pad)
        & (centres[:, 0] <= xs[-1] + pad)
        & (centres[:, 1] >= ys[0] - pad)
        & (centres[:, 1] <= ys[-1] + pad)
    ]
    if sel.size == 0:
        return None
    alpha = np.zeros((ys.size, xs.size), np.float32)
    for cx, cy in sel:
        d = np.sqrt(((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2).astype(np.float32))
        np.maximum(alpha, np.clip((radius - d) / np.float32(mpp) + 0.5, 0.0, 1.0), out=alpha)
    return alpha


def render_region(spec: SlideSpec, x: int, y: int, w: int, h: int, mpp: float) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the region at pixel (x, y) of a level with resolution `mpp`."""
    pal = PALETTES[spec.palette]
    xs = (np.arange(x, x + w, dtype=np.float64) + 0.5) * mpp
    ys = (np.arange(y, y + h, dtype=np.float64) + 0.5) * mpp
    noise = _noise(spec.seed, x, y, w, h, round(math.log2(mpp / spec.mpp)) + 1)
    out = np.empty((h, w, 3), np.uint8)
    tissue_mask = _mask_of(spec.tissue, xs, ys)
    if not tissue_mask.any():  # glass only: the common case on a real slide
        for c in range(3):
            plane = noise + np.float32(pal.glass[c] + 0.5)
            np.copyto(out[..., c], np.clip(plane, 0, 255, out=plane), casting="unsafe")
        return out
    carc_mask = _mask_of(spec.carcinoma, xs, ys) & tissue_mask
    tissue = tissue_mask.astype(np.float32)
    carc = carc_mask.astype(np.float32)
    wave = (3.0 * np.sin(xs / 97.0)[None, :] * np.cos(ys / 113.0)[:, None]).astype(np.float32)
    fine = mpp <= _NUCLEI_MAX_MPP
    alpha = np.zeros((h, w), np.float32)
    for nuc, where in ((STROMA_NUCLEI, tissue - carc), (CARCINOMA_NUCLEI, carc)):
        if not where.any():
            continue
        if fine:
            alpha += _nuclei(xs, ys, nuc, spec.seed, mpp) * where
        else:
            alpha += np.float32(nuc.density * math.pi * nuc.radius_um**2 / nuc.cell_um**2) * where
    discs = []
    if fine:
        for centres, radius, colour in (
            (spec.mimics, MIMIC_RADIUS_UM, pal.mimic),
            (spec.mitoses, MITOSIS_RADIUS_UM, pal.mitosis),
        ):
            disc = _discs(xs, ys, np.asarray(centres, np.float64).reshape(-1, 2), radius, mpp)
            if disc is not None:
                discs.append((disc * tissue, colour))
    for c in range(3):
        g, s, cb = pal.glass[c], pal.stroma[c], pal.carcinoma_bg[c]
        n, cn = pal.nucleus[c], pal.carcinoma_nucleus[c]
        plane = np.float32(g) + tissue * np.float32(s - g + 0.0) + carc * np.float32(cb - s)
        plane += wave * tissue
        nuc_colour = np.float32(n) + carc * np.float32(cn - n)
        plane += alpha * (nuc_colour - plane)
        for disc, colour in discs:
            plane += disc * (np.float32(colour[c]) - plane)
        plane += noise
        plane += np.float32(0.5)
        np.copyto(out[..., c], np.clip(plane, 0, 255, out=plane), casting="unsafe")
    return out


# --------------------------------------------------------------------------- writing


def level_mpps(spec: SlideSpec, *, pyramid: bool = True, min_size: int = 512) -> list[float]:
    """mpp of each level: x2 steps until the level fits in `min_size` pixels."""
    mpps = [spec.mpp]
    if pyramid:
        size = max(spec.width, spec.height)
        while size > min_size:
            size = math.ceil(size / 2)
            mpps.append(mpps[-1] * 2)
    return mpps


def _tile_row(spec: SlideSpec, width: int, ty: int, mpp: float, tile: int) -> list[np.ndarray]:
    return [render_region(spec, tx, ty, tile, tile, mpp) for tx in range(0, width, tile)]


def _tiles(
    spec: SlideSpec, width: int, height: int, mpp: float, tile: int, pool: Executor | None
) -> Iterator[np.ndarray]:
    """Tiles in row-major order; rows render in the pool with a bounded look-ahead."""
    rows = range(0, height, tile)
    if pool is None:
        for ty in rows:
            yield from _tile_row(spec, width, ty, mpp, tile)
        return
    pending: deque[Future[list[np.ndarray]]] = deque()
    it = iter(rows)
    for ty in it:
        pending.append(pool.submit(_tile_row, spec, width, ty, mpp, tile))
        if len(pending) >= 4:
            break
    while pending:
        row = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(_tile_row, spec, width, nxt, mpp, tile))
        yield from row


def write_slide(
    path: Path,
    spec: SlideSpec,
    *,
    pyramid: bool = True,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    vendor: str = "generic",
    workers: int = 1,
) -> list[tuple[int, int, float]]:
    """Write the slide as a tiled TIFF, one top-level IFD per level; return (w, h, mpp) per level.

    `vendor="aperio"` writes an Aperio ImageDescription (OpenSlide vendor "aperio", mpp in the
    description); "generic" relies on the resolution tags (OpenSlide vendor "generic-tiff").
    """
    import tifffile

    if compression not in ("jpeg", "deflate"):
        raise ValueError("compression must be 'jpeg' or 'deflate'")
    levels: list[tuple[int, int, float]] = []
    comp: Any = ("jpeg", quality) if compression == "jpeg" else ("zlib", 6)
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )
    big = spec.width * spec.height * 3 > 3_500_000_000
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)
        tw = stack.enter_context(tifffile.TiffWriter(path, bigtiff=big))
        for i, mpp in enumerate(level_mpps(spec, pyramid=pyramid)):
            factor = mpp / spec.mpp
            w = math.ceil(spec.width / factor)
            h = math.ceil(spec.height / factor)
            levels.append((w, h, mpp))
            description = None
            if vendor == "aperio":
                mag = 10.0 / spec.mpp
                description = (
                    (
                        f"Aperio Image Library v12.0.0\n{spec.width}x{spec.height} [0,0 "
                        f"{spec.width}x{spec.height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                        f"|AppMag = {mag:g}|MPP = {spec.mpp:g}|Synthetic = tilerunner"
                    )
                    if i == 0
                    else f"Aperio Image Library v12.0.0\n{w}x{h} -> {w}x{h}"
                )
            res = 10000.0 / mpp  # pixels per centimetre
            tw.write(
                _tiles(spec, w, h, mpp, tile, pool),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=comp[0],
                compressionargs={"level": comp[1]},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description=description,
                metadata=None,
                software="tilerunner.synthetic",
            )
    return levels


def ground_truth(spec: SlideSpec, levels: list[tuple[int, int, float]]) -> dict[str, Any]:
    """Ground-truth document: polygons and points in level-0 pixels (and um), JSON-ready."""
    to_px = 1.0 / spec.mpp

    def poly(b: Blob) -> list[list[float]]:
        return [[round(px * to_px, 2), round(py * to_px, 2)] for px, py in b.polygon()]

    return {
        "generator": "tilerunner.synthetic",
        "spec": {
            "width": spec.width,
            "height": spec.height,
            "mpp": spec.mpp,
            "seed": spec.seed,
            "palette": spec.palette,
        },
        "levels": [{"width": w, "height": h, "mpp": m} for w, h, m in levels],
        "tissue": [
            {"polygon_px": poly(b), "area_um2": round(b.area_um2(), 1)} for b in spec.tissue
        ],
        "carcinoma": [
            {"polygon_px": poly(b), "area_um2": round(b.area_um2(), 1), "blob": asdict(b)}
            for b in spec.carcinoma
        ],
        "mitoses": [
            {
                "x_px": round(x * to_px, 2),
                "y_px": round(y * to_px, 2),
                "radius_um": MITOSIS_RADIUS_UM,
            }
            for x, y in spec.mitoses
        ],
        "mimics": [
            {"x_px": round(x * to_px, 2), "y_px": round(y * to_px, 2), "radius_um": MIMIC_RADIUS_UM}
            for x, y in spec.mimics
        ],
    }


def make_slide(
    path: Path,
    *,
    width: int,
    height: int | None = None,
    seed: int = 0,
    mpp: float = 0.25,
    palette: str = "A",
    tissue: bool = True,
    pyramid: bool = True,
    compression: str = "jpeg",
    vendor: str = "generic",
    workers: int = 1,
) -> dict[str, Any]:
    """Write a synthetic slide and its ground truth next to it (`<stem>.truth.json`)."""
    spec = make_spec(width, height or width, seed=seed, mpp=mpp, palette=palette, tissue=tissue)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = write_slide(
        path, spec, pyramid=pyramid, compression=compression, vendor=vendor, workers=workers
    )
    truth = ground_truth(spec, levels)
    truth_path = path.with_name(path.stem + ".truth.json")
    truth_path.write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return truth
