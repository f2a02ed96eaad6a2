"""The run: config + slide -> per-analysis outputs, with reading overlapped with inference.

Order of work, so that every input error surfaces before any slide work:
config (caller) -> output folder writable -> models load -> slide opens -> tissue ->
per analysis: passes over tile grids -> results staged -> moved into place.

Within an analysis, features are run in dependency order. Features whose models share a
grid (mpp, tile size) and whose parents are on the same grid run in one pass: every tile is
read and decoded once and handed to all their models; a dependent feature (Mitosis) runs
only on the tiles its parents marked positive, collected into full batches. A feature whose
parent is on another grid runs in a later pass, on the tiles overlapping positive parents.

Reading: worker threads (each with its own slide handle) read whole batches into uint8
arrays; at most `prefetch` batches are in flight (a bounded queue), so memory does not
depend on slide size. OpenSlide, imagecodecs, PIL and ORT release the GIL, so the threads
overlap for real.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tilerunner import CONFIG_SCHEMA_VERSIONS, __version__
from tilerunner.config import AnalysisSpec, RunConfig
from tilerunner.errors import ConfigError, RunnerError
from tilerunner.grid import TileGrid, make_grid, tissue_fractions
from tilerunner.models import EngineOptions, ModelRunner, ModelStore, ort_version
from tilerunner.outputs import (
    OutputStage,
    file_sha256,
    write_geojson,
    write_heatmap,
    write_json,
    write_overlay,
)
from tilerunner.plugins import FEATURES
from tilerunner.plugins.features import Feature, FeatureResult
from tilerunner.plugins.registry import build
from tilerunner.slide import Slide, attach_decoder, open_slide
from tilerunner.tissue import TissueMask, TissueParams, detect_tissue, read_thumbnail

log = logging.getLogger("tilerunner")

SUMMARY_FORMAT = "tilerunner-summary/1"


def default_workers() -> int:
    """Reader threads: one per core beyond the first, at least one, at most eight (a GPU
    machine's 16 cores decode for a GPU that runs a ResNet-50 at thousands of tiles/s; on
    the CPU idle readers only wait on the bounded queue)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class RunOptions:
    """How a run goes: device, batch size, reader threads, ORT threads, mpp override, reader."""

    device: str = "auto"
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    threads: int = 0
    prefetch: int | None = None  # batches in flight; default 2 x workers
    mpp: float | None = None  # override the slide's resolution
    spin: bool = False
    reader: str = "auto"  # "openslide": never decode tiles with tifffile
    decoder: str = "auto"  # "cpu", "nvimgcodec": who decodes JPEG tiles (tilerunner.decoders)


@dataclass(frozen=True)
class Progress:
    """One progress report: analysis, stage, tiles done of total, seconds so far."""

    analysis: str
    stage: str  # "tissue", "tiles", "writing", "done"
    done: int
    total: int
    elapsed_s: float


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class RunReport:
    """What a run produced (for the CLI and benchmarks)."""

    out_dir: Path
    analyses: dict[str, Path]
    device: str
    tiles: int  # tiles through the pipeline (all passes, all analyses)
    seconds: float
    summaries: dict[str, dict[str, Any]]


# --------------------------------------------------------------------------- reading


@dataclass
class Batch:
    """Tiles read for one inference call, with their grid coordinates."""

    coords: np.ndarray  # (n, 2) int (col, row)
    tiles: np.ndarray  # (n, T, T, 3) uint8
    read_s: float


def _resize(region: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(region))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


class BatchReader:
    """Reads batches of tiles in worker threads, at most `prefetch` batches ahead."""

    def __init__(
        self,
        slide: Slide,
        grid: TileGrid,
        coords: np.ndarray,
        batch_size: int,
        workers: int,
        prefetch: int | None,
    ) -> None:
        self.slide, self.grid, self.coords = slide, grid, coords
        self.batch_size = max(1, batch_size)
        self.workers = max(0, workers)
        self.prefetch = max(1, prefetch or 2 * max(1, self.workers))
        self.wait_s = 0.0  # main thread blocked waiting for tiles
        self.busy_s = 0.0  # reader time summed over workers
        self._local = threading.local()
        self._handles: list[Slide] = []
        self._handles_lock = threading.Lock()

    def _handle(self) -> Slide:
        handle = getattr(self._local, "slide", None)
        if handle is None:
            handle = self.slide.clone()
            self._local.slide = handle
            with self._handles_lock:
                self._handles.append(handle)
        return handle

    def read(self, slide: Slide, coords: np.ndarray) -> Batch:
        """Read the tiles at `coords` (col, row) of the grid into one batch."""
        t0 = time.perf_counter()
        g = self.grid
        out = np.empty((len(coords), g.tile_size, g.tile_size, 3), np.uint8)
        origins = [g.origin0(int(col), int(row)) for col, row in coords]
        slide.prefetch(origins, g.level, (g.read_size, g.read_size))
        for i, (col, row) in enumerate(coords):
            region = slide.read_region(
                g.origin0(int(col), int(row)), g.level, (g.read_size, g.read_size)
            )
            out[i] = _resize(region, g.tile_size) if g.resize else region
        return Batch(coords, out, time.perf_counter() - t0)

    def _task(self, coords: np.ndarray) -> Batch:
        return self.read(self._handle(), coords)

    def __iter__(self) -> Iterator[Batch]:
        chunks = [
            self.coords[i : i + self.batch_size]
            for i in range(0, len(self.coords), self.batch_size)
        ]
        if self.workers == 0:
            for chunk in chunks:
                batch = self.read(self.slide, chunk)
                self.wait_s += batch.read_s
                self.busy_s += batch.read_s
                yield batch
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tile-reader")
        pending: deque[Future[Batch]] = deque()
        todo = iter(chunks)
        try:
            for chunk in todo:
                pending.append(pool.submit(self._task, chunk))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                t0 = time.perf_counter()
                batch = pending.popleft().result()
                self.wait_s += time.perf_counter() - t0
                self.busy_s += batch.read_s
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._task, nxt))
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
            for handle in self._handles:
                handle.close()


# --------------------------------------------------------------------------- planning


@dataclass
class FeatureRun:
    """A feature instance in a run, with its models and counters."""

    name: str
    cls: str
    depends_on: tuple[str, ...]
    runners: dict[str, ModelRunner]
    grid: TileGrid
    impl: Feature
    pass_index: int = 0
    tiles_run: int = 0
    skipped_by_dependency: int = 0
    consume_s: float = 0.0


def _project(src: TileGrid, mask: np.ndarray, dst: TileGrid) -> np.ndarray:
    """(dst.rows, dst.cols) bool: dst tiles overlapping any True tile of `mask` on `src`."""
    integral = np.zeros((src.rows + 1, src.cols + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1)
    x = np.array([dst.origin0(c, 0)[0] for c in range(dst.cols + 1)], np.float64)
    y = np.array([dst.origin0(0, r)[1] for r in range(dst.rows + 1)], np.float64)
    c0 = np.clip(np.floor(x[:-1] / src.step0).astype(int), 0, src.cols)
    c1 = np.clip(np.ceil(x[1:] / src.step0).astype(int), 0, src.cols)
    r0 = np.clip(np.floor(y[:-1] / src.step0).astype(int), 0, src.rows)
    r1 = np.clip(np.ceil(y[1:] / src.step0).astype(int), 0, src.rows)
    total = (
        integral[r1[:, None], c1[None, :]]
        - integral[r0[:, None], c1[None, :]]
        - integral[r1[:, None], c0[None, :]]
        + integral[r0[:, None], c0[None, :]]
    )
    return np.asarray(total > 0)


def _plan(analysis: AnalysisSpec, store: ModelStore, slide: Slide) -> list[FeatureRun]:
    """Feature instances in dependency order, each with its grid and pass index."""
    runs: dict[str, FeatureRun] = {}
    grids: dict[tuple[float, int], TileGrid] = {}
    for spec in analysis.features:
        runners = {role: store.runners[(analysis.name, m)] for role, m in spec.models.items()}
        keys = {(r.spec.mpp, r.spec.tile_size) for r in runners.values()}
        if len(keys) > 1:
            raise ConfigError(
                f"analysis {analysis.name!r} feature {spec.name!r}: its models differ in mpp or "
                f"tile_size ({sorted(keys)}); a feature reads one tile grid"
            )
        key = keys.pop()
        if key not in grids:
            grids[key] = make_grid(slide.info, key[0], key[1])
        grid = grids[key]
        cls = FEATURES.get(spec.cls, analysis.name)
        impl = cls(spec.name, grid, build(cls.Params, spec.params, spec.name))
        pass_index = 0
        for parent in spec.depends_on:
            p = runs[parent]
            pass_index = max(pass_index, p.pass_index + (0 if p.grid.key == grid.key else 1))
        runs[spec.name] = FeatureRun(
            spec.name, spec.cls, spec.depends_on, runners, grid, impl, pass_index
        )
    return list(runs.values())


# --------------------------------------------------------------------------- running


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class _Buffer:
    """Tiles waiting for a leaf feature, run in full batches (bounded: < one batch held)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.coords: list[np.ndarray] = []
        self.tiles: list[np.ndarray] = []
        self.count = 0

    def add(self, coords: np.ndarray, tiles: np.ndarray) -> None:
        self.coords.append(coords)
        self.tiles.append(tiles)  # a fancy-indexed copy, not a view of the reader's batch
        self.count += len(coords)

    def take(self, final: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Full batches (and, when `final`, the rest)."""
        while self.count >= self.size or (final and self.count):
            coords, tiles = np.concatenate(self.coords), np.concatenate(self.tiles)
            n = min(self.size, len(coords))
            self.coords, self.tiles = [coords[n:]], [tiles[n:]]
            self.count -= n
            yield coords[:n], tiles[:n]


def _run_feature(
    f: FeatureRun,
    coords: np.ndarray,
    tiles: np.ndarray,
    cache: dict[tuple[int, bytes], Any] | None = None,
    idx: np.ndarray | None = None,
) -> np.ndarray:
    """Models of `f` on the tiles, then the feature; returns its positive flags."""
    preds = {}
    for role, runner in f.runners.items():
        key = (id(runner), b"" if idx is None else idx.tobytes())
        if cache is None or key not in cache:
            pred = runner.predict(tiles)
            if cache is not None:
                cache[key] = pred
        else:
            pred = cache[key]
        preds[role] = pred
    t0 = time.perf_counter()
    flags = np.asarray(f.impl.consume(coords, preds), bool)
    f.consume_s += time.perf_counter() - t0
    f.tiles_run += len(coords)
    return flags


def _process_batch(
    batch: Batch,
    features: list[FeatureRun],
    gates: dict[str, np.ndarray],
    buffers: dict[str, _Buffer],
) -> None:
    """Run the pass's features on one batch, parents first; children see only positives.

    Features nobody in the pass depends on (e.g. Mitosis) get their tiles through a buffer
    and run in full batches, whatever share of each reader batch their parents let through.
    """
    n = len(batch.coords)
    flags: dict[str, np.ndarray] = {}
    cache: dict[tuple[int, bytes], Any] = {}  # a model shared by features runs once per tile
    for f in features:
        ok = np.ones(n, bool)
        for parent in f.depends_on:
            if parent in flags:
                ok &= flags[parent]
        if f.name in gates:
            ok &= gates[f.name][batch.coords[:, 1], batch.coords[:, 0]]
        idx = np.nonzero(ok)[0]
        f.skipped_by_dependency += n - len(idx)
        full = np.zeros(n, bool)
        if f.name in buffers:
            if len(idx):
                buffers[f.name].add(batch.coords[idx], batch.tiles[idx])
            for coords, tiles in buffers[f.name].take(final=False):
                _run_feature(f, coords, tiles)
        elif len(idx):
            tiles = batch.tiles if len(idx) == n else batch.tiles[idx]
            full[idx] = _run_feature(f, batch.coords[idx], tiles, cache, idx)
        flags[f.name] = full


def _run_pass(
    analysis: str,
    features: list[FeatureRun],
    all_runs: dict[str, FeatureRun],
    slide: Slide,
    tissue_ok: np.ndarray,
    options: RunOptions,
    progress: ProgressFn | None,
    clock: _Clock,
    timing: dict[str, float],
) -> int:
    grid = features[0].grid
    in_pass = {f.name for f in features}
    gates: dict[str, np.ndarray] = {}
    for f in features:
        gate = np.ones((grid.rows, grid.cols), bool)
        cross = [p for p in f.depends_on if p not in in_pass]
        for parent in cross:
            p = all_runs[parent]
            gate &= _project(p.grid, p.impl.positive_grid(), grid)
        if cross:
            gates[f.name] = gate
    eligible = tissue_ok.copy()
    if features and all(f.name in gates for f in features):
        union = np.zeros_like(tissue_ok)
        for g in gates.values():
            union |= g
        eligible &= union
    rows, cols = np.nonzero(eligible)
    coords = np.stack([cols, rows], axis=1).astype(np.int64)
    for f in features:  # tissue tiles outside the pass's tile set are skipped by dependency
        f.skipped_by_dependency += int(tissue_ok.sum() - len(coords))
    reader = BatchReader(slide, grid, coords, options.batch_size, options.workers, options.prefetch)
    parents = {p for f in features for p in f.depends_on}
    buffers = {
        f.name: _Buffer(options.batch_size)
        for f in features
        if f.name not in parents and (f.depends_on or f.name in gates)
    }
    done = 0
    for batch in reader:
        _process_batch(batch, features, gates, buffers)
        done += len(batch.coords)
        if progress:
            progress(Progress(analysis, "tiles", done, len(coords), clock.elapsed()))
    for f in features:
        if f.name in buffers:
            for tile_coords, tiles in buffers[f.name].take(final=True):
                _run_feature(f, tile_coords, tiles)
    timing["read_wait_s"] = timing.get("read_wait_s", 0.0) + reader.wait_s
    timing["read_busy_s"] = timing.get("read_busy_s", 0.0) + reader.busy_s
    return len(coords)


@dataclass(frozen=True)
class Thumbnail:
    """RGB image of the whole slide for overlays, with level-0 px per thumbnail px."""

    image: np.ndarray
    scale0: tuple[float, float]


OVERLAY_SIZE = 1024


def overlay_thumbnail(slide: Slide, tissue: TissueMask) -> Thumbnail:
    """About OVERLAY_SIZE px on the long side; reuses the tissue image when that is enough."""
    w, h = slide.info.dimensions
    mpp = max(w, h) * slide.info.mpp / OVERLAY_SIZE
    if mpp >= tissue.mpp * 0.9:
        return Thumbnail(tissue.thumbnail, tissue.scale0)
    image, _level, scale0 = read_thumbnail(slide, mpp)
    return Thumbnail(image, scale0)


def _thumb_points(points: np.ndarray, thumb: Thumbnail) -> np.ndarray:
    sx, sy = thumb.scale0
    return points / np.array([sx, sy]) if len(points) else points


def _write_analysis(
    folder: Path,
    analysis: AnalysisSpec,
    runs: list[FeatureRun],
    results: dict[str, FeatureResult],
    thumb: Thumbnail,
) -> dict[str, str]:
    """Write GeoJSON, heatmaps and overlays; return {file name: sha256}."""
    files: dict[str, str] = {}
    for f in runs:
        res = results[f.name]
        stem = f.name.lower()
        write_geojson(folder / f"{stem}.geojson", res.geojson)
        colour = tuple(getattr(getattr(f.impl, "params", None), "color", (200, 40, 40)))
        for hname, array in sorted(res.heatmaps.items()):
            write_heatmap(folder / f"{stem}.{hname}.npy", array)
            sx, sy = thumb.scale0
            write_overlay(
                folder / f"{stem}.{hname}.png",
                thumb.image,
                array,
                colour=colour,
                grid_px=(f.grid.step0 / sx, f.grid.step0 / sy),
                points=_thumb_points(res.points, thumb),
            )
    for path in sorted(folder.iterdir()):
        files[path.name] = file_sha256(path)
    return files


def _run_analyses(
    config: RunConfig,
    store: ModelStore,
    slide: Slide,
    options: RunOptions,
    progress: ProgressFn | None,
    clock: _Clock,
    stage: OutputStage,
    started: str,
    models_s: float,
    open_s: float,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every analysis in turn (tissue detected once per distinct tissue settings)."""
    tissue_cache: dict[TissueParams, tuple[TissueMask, float]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    total_tiles = 0
    for analysis in config.analyses:
        t = time.perf_counter()
        if analysis.tissue not in tissue_cache:
            if progress:
                progress(Progress(analysis.name, "tissue", 0, 0, clock.elapsed()))
            tissue_cache[analysis.tissue] = (
                detect_tissue(slide, analysis.tissue),
                time.perf_counter() - t,
            )
        tissue, tissue_s = tissue_cache[analysis.tissue]
        summary, n = _run_analysis(
            config, analysis, store, slide, tissue, options, progress, clock, stage
        )
        timings = summary["run"]["timings_s"]
        timings.update(
            tissue=round(tissue_s, 4), models_load=round(models_s, 4), slide_open=round(open_s, 4)
        )
        summary["run"]["started"] = started
        write_json(stage.analysis_dir_path(analysis.name) / "summary.json", summary)
        summaries[analysis.name] = summary
        total_tiles += n
    return summaries, total_tiles


def run(
    config: RunConfig,
    slide_path: Path,
    out_dir: Path,
    options: RunOptions | None = None,
    progress: ProgressFn | None = None,
    *,
    available_providers: list[str] | None = None,
    store: ModelStore | None = None,
) -> RunReport:
    """Run every analysis of `config` on the slide; results land in `out_dir/<analysis>/`.

    `store`: the models of `config` already loaded (a worker loads them once for all jobs);
    when given, `options.device`, `threads` and `spin` are those it was loaded with.
    """
    options = options or RunOptions()
    if options.batch_size < 1:
        raise RunnerError("--batch-size must be >= 1")
    clock = _Clock()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    stage = OutputStage(out_dir)
    stage.prepare()
    try:
        t = time.perf_counter()
        if store is None:
            store = ModelStore(
                EngineOptions(options.device, options.threads, options.spin), available_providers
            )
            store.load(config)
        models_s = time.perf_counter() - t
        t = time.perf_counter()
        slide = open_slide(slide_path, mpp=options.mpp, reader=options.reader)
        try:
            slide = attach_decoder(slide, options.decoder, store.device)
        except BaseException:
            slide.close()
            raise
        open_s = time.perf_counter() - t
        log.info(
            "device: %s (ONNX Runtime %s, providers %s); slide %s via %s",
            store.device,
            ort_version(),
            ", ".join(store.providers),
            slide_path.name,
            slide.info.reader,
        )
        try:
            summaries, total_tiles = _run_analyses(
                config, store, slide, options, progress, clock, stage, started, models_s, open_s
            )
        finally:
            slide.close()
        committed = stage.commit()
    except BaseException:
        stage.abort()
        raise
    seconds = clock.elapsed()
    if progress:
        progress(Progress("", "done", total_tiles, total_tiles, seconds))
    return RunReport(
        out_dir=out_dir,
        analyses={p.name: p for p in committed},
        device=store.device,
        tiles=total_tiles,
        seconds=seconds,
        summaries=summaries,
    )


def _tissue_by_grid(
    runs: list[FeatureRun], tissue: TissueMask, min_fraction: float
) -> tuple[dict[tuple[float, int], np.ndarray], dict[str, Any]]:
    """Per tile grid: which tiles hold enough tissue, and the grid's summary entry."""
    tissue_ok_by_grid: dict[tuple[float, int], np.ndarray] = {}
    grid_info: dict[str, Any] = {}
    for f in runs:
        if f.grid.key not in tissue_ok_by_grid:
            frac = tissue_fractions(f.grid, tissue)
            tissue_ok_by_grid[f.grid.key] = frac >= min_fraction
            ok = tissue_ok_by_grid[f.grid.key]
            grid_info[f"{f.grid.mpp}@{f.grid.tile_size}"] = {
                **f.grid.describe(),
                "tiles_total": f.grid.rows * f.grid.cols,
                "tissue_tiles": int(ok.sum()),
                "skipped_no_tissue": int(f.grid.rows * f.grid.cols - ok.sum()),
            }
    return tissue_ok_by_grid, grid_info


def _model_records(
    analysis: str, runs: list[FeatureRun], store: ModelStore
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary's entry of each model the features used, and its timings."""
    used = {m for f in runs for m in (r.spec.name for r in f.runners.values())}
    models: dict[str, Any] = {}
    model_timing: dict[str, Any] = {}
    for name in sorted(used):
        runner = store.runners[(analysis, name)]
        spec = runner.spec
        prov = spec.provenance
        models[name] = {
            "file": spec.params["file"],
            "sha256": runner.session.sha256,
            "registry_id": prov.get("registry_id"),
            "task_id": prov.get("task_id"),
            "weights_uri": prov.get("weights_uri"),
            "tile_size": spec.tile_size,
            "mpp": spec.mpp,
            "tiles": int(runner.stats["tiles"]),
        }
        model_timing[name] = {
            "inference_s": round(runner.stats["infer_s"], 4),
            "postprocess_s": round(runner.stats["post_s"], 4),
            "calls": int(runner.stats["calls"]),
            "load_s": round(runner.session.load_s, 4),
        }
    return models, model_timing


def _feature_records(
    runs: list[FeatureRun], results: dict[str, FeatureResult]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary's entry of each feature, and its timings (what the dependency saved)."""
    feature_summary: dict[str, Any] = {}
    feature_timing: dict[str, Any] = {}
    for f in runs:
        feature_summary[f.name] = {
            "cls": f.cls,
            "depends_on": list(f.depends_on),
            "models": {role: r.spec.name for role, r in sorted(f.runners.items())},
            "grid": f"{f.grid.mpp}@{f.grid.tile_size}",
            "tiles_run": f.tiles_run,
            "tiles_skipped_by_dependency": f.skipped_by_dependency,
            **{k: v for k, v in results[f.name].summary.items() if k != "tiles_run"},
        }
        infer = sum(r.stats["infer_s"] for r in f.runners.values())
        per_tile = infer / max(1, sum(r.stats["tiles"] for r in f.runners.values()))
        feature_timing[f.name] = {
            "consume_s": round(f.consume_s, 4),
            "inference_s": round(infer, 4),
            "estimated_saved_by_dependency_s": round(per_tile * f.skipped_by_dependency, 4),
        }
    return feature_summary, feature_timing


def _deterministic(
    config: RunConfig,
    analysis: AnalysisSpec,
    store: ModelStore,
    slide: Slide,
    tissue: TissueMask,
    records: dict[str, Any],
) -> dict[str, Any]:
    """The summary's deterministic section (`records`: grids, models, features, outputs)."""
    return {
        "runner": {
            "name": "tilerunner",
            "version": __version__,
            "config_schemas": list(CONFIG_SCHEMA_VERSIONS),
            "onnxruntime": ort_version(),
        },
        "config": {
            "file": config.path.name,
            "sha256": config.sha256,
            "schema_version": config.schema_version,
        },
        "customer": config.customer,
        "analysis": analysis.name,
        "slide": slide.info.describe(),
        "device": store.device,
        "providers": store.providers,
        "tissue": tissue.describe(),
        **records,
    }


def _options_record(options: RunOptions) -> dict[str, Any]:
    return {
        "batch_size": options.batch_size,
        "workers": options.workers,
        "threads": options.threads,
        "prefetch": options.prefetch,
        "spin": options.spin,
        "reader": options.reader,
        "decoder": options.decoder,
    }


def _run_analysis(
    config: RunConfig,
    analysis: AnalysisSpec,
    store: ModelStore,
    slide: Slide,
    tissue: TissueMask,
    options: RunOptions,
    progress: ProgressFn | None,
    clock: _Clock,
    stage: OutputStage,
) -> tuple[dict[str, Any], int]:
    t_start = time.perf_counter()
    for runner in store.runners.values():
        runner.stats.update(tiles=0, calls=0, infer_s=0.0, post_s=0.0)
    runs = _plan(analysis, store, slide)
    by_name = {f.name: f for f in runs}
    timing: dict[str, float] = {}
    tissue_ok_by_grid, grid_info = _tissue_by_grid(runs, tissue, analysis.tissue.min_tile_fraction)
    passes: dict[tuple[int, tuple[float, int]], list[FeatureRun]] = {}
    for f in runs:
        passes.setdefault((f.pass_index, f.grid.key), []).append(f)
    tiles = 0
    t_tiles, cpu_tiles = time.perf_counter(), time.process_time()
    for key in sorted(passes):
        tiles += _run_pass(
            analysis.name,
            passes[key],
            by_name,
            slide,
            tissue_ok_by_grid[key[1]],
            options,
            progress,
            clock,
            timing,
        )
    tiles_s = time.perf_counter() - t_tiles
    tiles_cpu_s = time.process_time() - cpu_tiles
    t = time.perf_counter()
    results = {f.name: f.impl.finish() for f in runs}
    finish_s = time.perf_counter() - t
    if progress:
        progress(Progress(analysis.name, "writing", tiles, tiles, clock.elapsed()))
    t = time.perf_counter()
    folder = stage.analysis_dir(analysis.name)
    files = _write_analysis(folder, analysis, runs, results, overlay_thumbnail(slide, tissue))
    write_s = time.perf_counter() - t
    models, model_timing = _model_records(analysis.name, runs, store)
    feature_summary, feature_timing = _feature_records(runs, results)
    records = {"grids": grid_info, "models": models, "features": feature_summary, "outputs": files}
    total_s = time.perf_counter() - t_start
    summary = {
        "format": SUMMARY_FORMAT,
        "volatile_keys": ["run"],
        "deterministic": _deterministic(config, analysis, store, slide, tissue, records),
        "run": {
            "host": socket.gethostname(),
            "options": _options_record(options),
            "tiles": tiles,
            "tiles_per_s": round(tiles / tiles_s, 2) if tiles_s > 0 else None,
            "timings_s": {
                "tiles": round(tiles_s, 4),
                "tiles_cpu": round(tiles_cpu_s, 4),  # process CPU time of the tile passes
                "read_wait": round(timing.get("read_wait_s", 0.0), 4),
                "read_busy": round(timing.get("read_busy_s", 0.0), 4),
                "features_finish": round(finish_s, 4),
                "write": round(write_s, 4),
                "analysis_total": round(total_s, 4),
                "models": model_timing,
                "features": feature_timing,
            },
        },
    }
    return summary, tiles
