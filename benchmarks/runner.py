#!/usr/bin/env python3
"""Tile runner benchmark: against its pure-inference ceiling, a naive loop and WSInfer.

All figures come from one run on this machine (ratios, not absolute numbers, are the point).
Three suites (`--suite`, repeatable; `all` runs them in this order):

* ``demo`` (default) - the demo models (carcinoma + mitosis gated on it), 50k slide:
    runner    `tilerunner run` in a subprocess (CPU): tiles/s of the tile pass, end-to-end
              time, peak RSS (wait4 ru_maxrss), CPU time of the tile pass;
    ceiling   the same models and session options on batches of real tiles already decoded in
              memory; Carcinoma on every tile, Mitosis on the same share as in the run;
    naive     read one tile with OpenSlide, normalise it in numpy, run the raw carcinoma
              model, then mitosis if positive, next tile;
    memory    peak RSS of the runner on the small and the large slide (should not grow).
* ``resnet50`` - a ResNet-50 (torchvision's architecture, generated weights: resnet.py) as
  the one classifier, 50k slide: runner tiles/s, its share of the ceiling (wall and CPU
  time), peak RSS, and the per-tile inference cost of the runner's CPU plan (one
  single-threaded sub-batch per core) against the previous plan (ORT's intra-op threads on
  the whole batch) on the same in-memory tiles.
* ``wsinfer`` - ResNet-18 with the same generated weights in both, on the 20k slide:
  WSInfer 0.6.1 (torch, its DataLoader with 2 workers, batch 32, as `wsinfer run` defaults
  here) against the runner, and the runner with the previous CPU plan; `--rounds`
  alternating rounds (the order flips each round). Tiles/s of each inference pass, CPU ms
  per tile (this process and its children: insensitive to the other load on the machine),
  their ratios per round and the median. WSInfer runs in its own venv
  (~/.cache/ivd-testbed/bench-venv-*, ~6 GB, created on first use from
  requirements-wsinfer.txt); torch's and the runner's logits are checked equal first.

    .venv/bin/python benchmarks/runner.py                         # demo suite
    .venv/bin/python benchmarks/runner.py --suite wsinfer --suite resnet50 --json out.json
    .venv/bin/python benchmarks/runner.py --suite all

The machine is shared: every figure states the 1-minute load average around it, and the
ratios that matter are taken between runs next to each other. Synthetic slides, models and
the venv are cached under ~/.cache/ivd-testbed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tilerunner import demo_models, synthetic

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import resnet  # noqa: E402  (benchmarks/ is not a package)

TESTBED = Path(os.environ.get("IVD_TEST_CACHE") or Path.home() / ".cache" / "ivd-testbed")
CACHE = TESTBED / "tilerunner"
SUITES = ("demo", "resnet50", "wsinfer")
WSINFER_REQUIREMENTS = HERE / "requirements-wsinfer.txt"
IMAGENET = [
    {"cls": "Normalization", "params": {"factor": 255.0}},
    {
        "cls": "MeanStd",
        "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    },
]


def _key(*modules: Any) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


def cached_models() -> Path:
    target = CACHE / f"models-{_key(demo_models, synthetic)}"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".tmp-"))
        demo_models.write_demo_models(tmp)
        tmp.rename(target)
    return target


def cached_resnet(arch: str) -> Path:
    """benchmarks/resnet.py's `arch` with generated weights, as <dir>/model.onnx (cached)."""
    target = CACHE / f"{arch}-{_key(resnet)}"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".tmp-"))
        print(f"building {arch} with generated weights (cached afterwards)...", flush=True)
        resnet.write(arch, tmp / "model.onnx")
        tmp.rename(target)
    return target


def cached_slide(size: int, seed: int) -> Path:
    target = CACHE / f"bench-{size}-{seed}-{_key(synthetic)}" / "slide.tiff"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".tmp-"))
        t0 = time.perf_counter()
        print(f"generating a {size} x {size} synthetic slide (cached afterwards)...", flush=True)
        synthetic.make_slide(tmp / "slide.tiff", width=size, seed=seed, workers=os.cpu_count() or 1)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
        tmp.rename(target.parent)
    return target


def write_app(root: Path, models: Path) -> Path:
    manifest = {m["name"]: m for m in json.loads((models / "demo-models.json").read_text())}

    def model(name: str) -> dict[str, Any]:
        m = manifest[name]
        return {
            "sourcing": "manual",
            "reference": str(models / name),
            "preprocessing": m["preprocessing"],
            "postprocessing": m["postprocessing"],
            "params": {"file": "model.onnx", "tile_size": 224, "mpp": 0.5},
            "provenance": {
                "files": [{"name": "model.onnx", "size": m["size"], "sha256": m["sha256"]}]
            },
        }

    doc = {
        "schema_version": 1,
        "customer": "bench",
        "analyses": [
            {
                "name": "bench",
                "models": {
                    "carcinoma_model": model("carcinoma-demo"),
                    "mitosis_model": model("mitosis-demo"),
                },
                "features": [
                    {"cls": "Carcinoma", "models": {"classification_model": "carcinoma_model"}},
                    {
                        "cls": "Mitosis",
                        "models": {"segmentation_model": "mitosis_model"},
                        "depends_on": ["Carcinoma"],
                    },
                ],
            }
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    config = root / "analysis.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def write_model_app(root: Path, model_dir: Path) -> Path:
    """A config with one ImageNet-normalised two-class classifier (Softmax -> positive class)
    behind the Carcinoma feature: how a ResNet tile classifier is configured. The model is
    linked into the app folder (a relative reference: the folder can be mounted anywhere)."""
    data = (model_dir / "model.onnx").read_bytes()
    (root / "model").mkdir(parents=True, exist_ok=True)
    target = root / "model" / "model.onnx"
    if not target.exists():
        try:
            os.link(model_dir / "model.onnx", target)
        except OSError:  # another file system
            target.write_bytes(data)
    model = {
        "sourcing": "manual",
        "reference": "model",
        "preprocessing": IMAGENET,
        "postprocessing": [
            {"cls": "Softmax"},
            {"cls": "BinaryClassification", "params": {"positive_index": 1}},
        ],
        "params": {"file": "model.onnx", "tile_size": 224, "mpp": 0.5},
        "provenance": {
            "files": [
                {
                    "name": "model.onnx",
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ]
        },
    }
    doc = {
        "schema_version": 1,
        "customer": "bench",
        "analyses": [
            {
                "name": "bench",
                "models": {"classifier": model},
                "features": [
                    {"cls": "Carcinoma", "models": {"classification_model": "classifier"}}
                ],
            }
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    config = root / "analysis.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def _previous_plan(threads: int, fixed_batch: int | None, cores: int | None = None) -> Any:
    """The runner's CPU plan before batch splitting: ORT's intra-op threads on the whole batch."""
    from tilerunner import models

    return models.CpuPlan(threads if threads > 0 else (cores or models.usable_cores()), 1)


@contextlib.contextmanager
def previous_plan() -> Iterator[None]:
    """Sessions made inside use the previous CPU plan (the baseline of the plan figures)."""
    from tilerunner import models

    saved = models.cpu_plan
    models.cpu_plan = _previous_plan
    try:
        yield
    finally:
        models.cpu_plan = saved


# `tilerunner ARGS` in a child process with the previous CPU plan
PREVIOUS_PLAN = (
    f"import sys; sys.path.insert(0, {str(HERE)!r}); import runner; "
    "runner.previous_plan().__enter__(); "
    "from tilerunner.cli import main; sys.exit(main(sys.argv[1:]))"
)


class PeakRss(threading.Thread):
    """The child's own peak RSS (VmHWM, MB), read from /proc while it runs.

    Not wait4's ru_maxrss: a child forked from this process counts this process's resident
    memory until it execs (here the in-memory tiles and ceiling sessions, over 1 GB), so every
    child would seem to peak at least there."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.status = Path(f"/proc/{pid}/status")
        self.peak_kb = 0
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(0.2):
            with contextlib.suppress(OSError):
                for line in self.status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kb / 1024


def run_runner(
    slide: Path, config: Path, out: Path, args: argparse.Namespace, previous: bool = False
) -> dict[str, Any]:
    """tilerunner run in a child process; its summary plus wall time and peak RSS (MB)."""
    launcher = ["-c", PREVIOUS_PLAN] if previous else ["-m", "tilerunner"]
    cmd = [
        sys.executable,
        *launcher,
        "-q",
        "run",
        str(slide),
        "--config",
        str(config),
        "--app-dir",
        str(config.parent),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        str(args.batch_size),
        "--no-progress",
    ]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(cmd)
    peak = PeakRss(proc.pid)
    _, status, _usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"runner failed with exit code {proc.returncode}")
    summary = json.loads((out / "bench" / "summary.json").read_text())
    return {
        "summary": summary,
        "wall_s": wall,
        "peak_rss_mb": peak.stop(),
        # 1-minute load average around the run: > 2 means other work shared the 2 cores
        "load": (load_before, os.getloadavg()[0]),
    }


def tissue_tiles(slide_path: Path) -> tuple[np.ndarray, Any]:
    """(col, row) of the tissue tiles of the demo models' grid, as the runner selects them."""
    from tilerunner.grid import make_grid, tissue_fractions
    from tilerunner.slide import open_slide
    from tilerunner.tissue import TissueParams, detect_tissue

    slide = open_slide(slide_path)
    params = TissueParams()
    grid = make_grid(slide.info, 0.5, 224)
    ok = tissue_fractions(grid, detect_tissue(slide, params)) >= params.min_tile_fraction
    rows, cols = np.nonzero(ok)
    return np.stack([cols, rows], axis=1), grid


def sample_tiles(slide_path: Path, coords: np.ndarray, grid: Any, count: int) -> np.ndarray:
    """`count` decoded tissue tiles (uint8 NHWC), spread over the slide, read into memory."""
    from tilerunner.slide import open_slide

    slide = open_slide(slide_path)
    pick = np.linspace(0, len(coords) - 1, min(count, len(coords))).astype(int)
    tiles = np.empty((len(pick), 224, 224, 3), np.uint8)
    for i, k in enumerate(pick):
        tiles[i] = slide.read_region(grid.origin0(*map(int, coords[k])), grid.level, (224, 224))
    return tiles


def inference_cost(
    config: Path, tiles: np.ndarray, counts: dict[str, int], batch: int, threads: int
) -> dict[str, float]:
    """Seconds per tile of each model (wall and `<model>_cpu`) on in-memory batches, through
    the runner's own ModelStore: the same composed graph and session options as a run."""
    from tilerunner.config import load_config
    from tilerunner.models import EngineOptions, ModelStore

    cfg = load_config(config, config.parent)
    store = ModelStore(EngineOptions("cpu", threads))
    store.load(cfg)
    cost: dict[str, float] = {}
    for (_analysis, name), runner in store.runners.items():
        count = counts[name]
        runner.predict(tiles[:batch])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        done = 0
        while done < count:
            k = min(batch, count - done)
            start = done % max(1, len(tiles) - k)
            runner.predict(tiles[start : start + k])
            done += k
        cost[name] = (time.perf_counter() - t0) / count
        cost[f"{name}_cpu"] = (time.process_time() - c0) / count
    return cost


def naive(slide_path: Path, models: Path, coords: np.ndarray, grid: Any, count: int) -> float:
    """Read a tile, normalise it on the host, run it, next: tiles/s over `count` tissue tiles."""
    import onnxruntime as ort
    from tilerunner.slide import open_slide

    carc = ort.InferenceSession(
        str(models / "carcinoma-demo" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    mit = ort.InferenceSession(
        str(models / "mitosis-demo" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    slide = open_slide(slide_path)
    n = min(count, len(coords))
    t0 = time.perf_counter()
    for k in range(n):
        tile = slide.read_region(grid.origin0(*map(int, coords[k])), grid.level, (224, 224))
        x = (tile.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        p = carc.run(None, {"input": np.ascontiguousarray(x)})[0]
        if p[0, 0] >= 0.5:
            z = (x - 0.5) / 0.25
            mit.run(None, {"input": np.ascontiguousarray(z, dtype=np.float32)})
    return n / (time.perf_counter() - t0)


def compare(
    runs: list[dict[str, Any]], costs: list[dict[str, float]], expected: int
) -> list[dict[str, Any]]:
    """Per large run: runner tiles/s, the ceiling around it (mean of before/after), ratio."""
    per_run = []
    for i, r in enumerate(runs):
        det, run = r["summary"]["deterministic"], r["summary"]["run"]
        tiles = det["features"]["Carcinoma"]["tiles_run"]
        if tiles != expected:
            raise SystemExit(f"the runner ran {tiles} tissue tiles, the benchmark found {expected}")
        model_tiles = {name: m["tiles"] for name, m in det["models"].items()}
        cost = {m: (costs[i][m] + costs[i + 1][m]) / 2 for m in costs[i]}
        ceiling_s = sum(n * cost[name] for name, n in model_tiles.items())
        ceiling_cpu = sum(n * cost[f"{name}_cpu"] for name, n in model_tiles.items())
        rate = tiles / run["timings_s"]["tiles"]
        per_run.append(
            {
                "runner": rate,
                "ceiling": tiles / ceiling_s,
                "ratio": rate / (tiles / ceiling_s),
                "cpu_ratio": ceiling_cpu / run["timings_s"]["tiles_cpu"],
                "decode_ms": 1000 * run["timings_s"]["read_busy"] / tiles,
                "infer_ms": 1000 * ceiling_s / tiles,
                "infer_cpu_ms": 1000 * ceiling_cpu / tiles,
                "wall": r["wall_s"],
                "rss": r["peak_rss_mb"],
                "load": r["load"],
            }
        )
    return per_run


def _load(before: float) -> list[float]:
    return [round(before, 1), round(os.getloadavg()[0], 1)]


def print_figures(title: str, figures: dict[str, Any]) -> None:
    """One suite's figures, aligned."""
    width = max(map(len, figures))
    print(f"\n== {title}")
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")


def bracketed_runs(
    slide: Path, config: Path, tmp: Path, args: argparse.Namespace, repeat: int, counts: Any
) -> tuple[list[dict[str, Any]], list[dict[str, float]], np.ndarray, Any]:
    """`repeat` runner runs on `slide`, each between two ceiling measurements; the tissue
    tiles' (col, row) and grid too.

    The machine is shared: each run is compared with the mean of the ceilings measured just
    before and after it, then the median over runs is taken. `counts(coords)` gives the tiles
    per model for the ceiling."""
    coords, grid = tissue_tiles(slide)
    mem_tiles = sample_tiles(slide, coords, grid, 256)
    per_model = counts(len(coords))
    runs: list[dict[str, Any]] = []
    costs: list[dict[str, float]] = []
    for i in range(repeat):
        print(f"pure-inference ceiling ({i + 1})...", flush=True)
        costs.append(inference_cost(config, mem_tiles, per_model, args.batch_size, args.threads))
        print(f"runner on {slide.parent.name} ({i + 1}/{repeat})...", flush=True)
        runs.append(run_runner(slide, config, tmp / f"out-{slide.parent.name}-{i}", args))
    print(f"pure-inference ceiling ({repeat + 1})...", flush=True)
    costs.append(inference_cost(config, mem_tiles, per_model, args.batch_size, args.threads))
    return runs, costs, coords, grid


def suite_demo(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Demo models: runner vs ceiling vs naive loop on the large slide, RSS small vs large."""
    models = cached_models()
    large = cached_slide(args.size, 7)
    small = cached_slide(args.small_size, 7)
    config = write_app(tmp / "app", models)
    print("runner on the small slide...", flush=True)
    r_small = run_runner(small, config, tmp / "out-small", args)
    k = args.ceiling_tiles

    def counts(tissue: int) -> dict[str, int]:
        return {"carcinoma_model": min(k, tissue), "mitosis_model": max(args.batch_size, k // 2)}

    runs, costs, coords, grid = bracketed_runs(large, config, tmp, args, args.repeat, counts)
    print("naive loop...", flush=True)
    naive_rate = naive(large, models, coords, grid, args.naive_tiles)
    per_run = compare(runs, costs, len(coords))
    median = sorted(per_run, key=lambda x: x["ratio"])[len(per_run) // 2]
    last = runs[-1]["summary"]
    det, run = last["deterministic"], last["run"]
    rss_large = max(x["rss"] for x in per_run)
    figures = {
        "slide_px": args.size,
        "tissue_tiles": len(coords),
        "mitosis_tiles": det["features"]["Mitosis"]["tiles_run"],
        "grid_tiles": det["grids"]["0.5@224"]["tiles_total"],
        "runner_tiles_per_s": round(median["runner"], 1),
        "ceiling_tiles_per_s": round(median["ceiling"], 1),
        "runner_vs_ceiling": round(median["ratio"], 3),
        "runner_vs_ceiling_all_runs": [round(x["ratio"], 3) for x in per_run],
        "load_average_around_runs": [[round(v, 1) for v in x["load"]] for x in per_run],
        # CPU-time efficiency (ceiling CPU s / runner CPU s for the same tiles): insensitive to
        # other load; equals the wall ratio when both keep the cores busy on an idle machine
        "runner_vs_ceiling_cpu_all_runs": [round(x["cpu_ratio"], 3) for x in per_run],
        "runner_end_to_end_s": round(median["wall"], 1),
        "naive_tiles_per_s": round(naive_rate, 1),
        "runner_vs_naive": round(median["runner"] / naive_rate, 2),
        "decode_ms_per_tile_worker_time": round(median["decode_ms"], 2),
        "inference_ms_per_tile_wall": round(median["infer_ms"], 2),
        "mitosis_saved_s_by_dependency": run["timings_s"]["features"]["Mitosis"][
            "estimated_saved_by_dependency_s"
        ],
        "reader": det["slide"]["reader"],
        "peak_rss_mb_small": round(r_small["peak_rss_mb"], 1),
        "peak_rss_mb_large": round(rss_large, 1),
        "rss_large_vs_small": round(rss_large / r_small["peak_rss_mb"], 3),
        "small_slide_px": args.small_size,
        "workers": run["options"]["workers"],
        "batch_size": args.batch_size,
    }
    print_figures("demo models", figures)
    print(
        f"runner / ceiling = {figures['runner_vs_ceiling']:.1%}; runner / naive = "
        f"{figures['runner_vs_naive']:.2f}x; peak RSS {figures['peak_rss_mb_small']:.0f} MB "
        f"({args.small_size} px) vs {figures['peak_rss_mb_large']:.0f} MB ({args.size} px)"
    )
    return figures


def plan_costs(config: Path, tiles: np.ndarray, count: int, args: argparse.Namespace) -> list[Any]:
    """Per-tile inference (wall, CPU) of the runner's plan and the previous one, alternated."""
    rounds: list[Any] = []
    for i in range(args.rounds):
        pair = {}
        for which in ("batch", "previous") if i % 2 == 0 else ("previous", "batch"):
            ctx = previous_plan() if which == "previous" else contextlib.nullcontext()
            with ctx:
                load = os.getloadavg()[0]
                cost = inference_cost(
                    config, tiles, {"classifier": count}, args.batch_size, args.threads
                )
            pair[which] = (cost["classifier"], cost["classifier_cpu"], _load(load))
        rounds.append(pair)
    return rounds


def suite_resnet50(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """ResNet-50 as the classifier on the large slide: share of the ceiling, RSS, CPU plans."""
    model = cached_resnet("resnet50")
    large = cached_slide(args.size, 7)
    config = write_model_app(tmp / "app-resnet50", model)
    k = args.resnet_ceiling_tiles
    runs, costs, coords, grid = bracketed_runs(
        large, config, tmp, args, args.resnet_repeat, lambda tissue: {"classifier": min(k, tissue)}
    )
    per_run = compare(runs, costs, len(coords))
    median = sorted(per_run, key=lambda x: x["ratio"])[len(per_run) // 2]
    print("CPU plans on in-memory tiles (batch-parallel vs previous intra-op)...", flush=True)
    mem = sample_tiles(large, coords, grid, 2 * args.batch_size)
    plans = plan_costs(config, mem, 2 * args.batch_size, args)
    speedups = [p["previous"][0] / p["batch"][0] for p in plans]
    cpu_speedups = [p["previous"][1] / p["batch"][1] for p in plans]
    run = runs[-1]["summary"]["run"]
    figures = {
        "model": f"resnet50 ({resnet.GFLOP_PER_TILE['resnet50']} GFLOP/tile, generated weights)",
        "slide_px": args.size,
        "tissue_tiles": len(coords),
        "runner_tiles_per_s": round(median["runner"], 2),
        "ceiling_tiles_per_s": round(median["ceiling"], 2),
        "runner_vs_ceiling": round(median["ratio"], 3),
        "runner_vs_ceiling_all_runs": [round(x["ratio"], 3) for x in per_run],
        "runner_vs_ceiling_cpu_all_runs": [round(x["cpu_ratio"], 3) for x in per_run],
        "load_average_around_runs": [[round(v, 1) for v in x["load"]] for x in per_run],
        "inference_cpu_ms_per_tile": round(median["infer_cpu_ms"], 1),
        "decode_ms_per_tile_worker_time": round(median["decode_ms"], 2),
        "runner_end_to_end_s": round(median["wall"], 1),
        "peak_rss_mb": round(max(x["rss"] for x in per_run), 1),
        "plan_batch_ms_per_tile_wall": [round(1000 * p["batch"][0], 1) for p in plans],
        "plan_previous_ms_per_tile_wall": [round(1000 * p["previous"][0], 1) for p in plans],
        "plan_speedup_wall_all_rounds": [round(x, 2) for x in speedups],
        "plan_speedup_cpu_all_rounds": [round(x, 2) for x in cpu_speedups],
        "plan_load_average": [[p["batch"][2], p["previous"][2]] for p in plans],
        "workers": run["options"]["workers"],
        "batch_size": args.batch_size,
    }
    print_figures("ResNet-50 (realistic model)", figures)
    print(
        f"runner / ceiling = {figures['runner_vs_ceiling']:.1%} at "
        f"{figures['runner_tiles_per_s']} tiles/s; peak RSS {figures['peak_rss_mb']:.0f} MB; "
        f"batch-parallel plan / previous plan = {statistics.median(speedups):.2f}x per tile"
    )
    return figures


# --------------------------------------------------------------------------- WSInfer


def bench_venv() -> Path:
    """The Python of the WSInfer venv, created from requirements-wsinfer.txt on first use."""
    key = hashlib.sha256(WSINFER_REQUIREMENTS.read_bytes()).hexdigest()[:12]
    root = TESTBED / f"bench-venv-{key}"
    python = root / "bin" / "python"
    if (root / ".complete").exists():
        return python
    print(f"creating the WSInfer venv {root} (once; ~6 GB: torch and its NVIDIA libraries)...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "install", "--no-deps", "-r", str(WSINFER_REQUIREMENTS)], check=True)
    subprocess.run([*pip, "check"], check=True)
    (root / ".complete").write_text(key + "\n")
    return python


def wsinfer_model(python: Path, onnx_dir: Path) -> tuple[Path, float]:
    """WSInfer's TorchScript ResNet-18 (same weights) and max |logit difference| vs the runner's
    ONNX on probe tiles (through the runner's composed graph: uint8 in, ImageNet preprocessing)."""
    from tilerunner.config import load_config
    from tilerunner.models import EngineOptions, ModelStore

    target = CACHE / f"wsinfer-resnet18-{_key(resnet)}"
    if not (target / "probe-logits.npy").exists():
        subprocess.run(
            [str(python), str(HERE / "wsinfer_side.py"), "export", str(target), "resnet18"],
            check=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        config = write_model_app(Path(tmp), onnx_dir)
        store = ModelStore(EngineOptions("cpu"))
        store.load(load_config(config, config.parent))
    runner = store.runners[("bench", "classifier")]
    ours = runner.session.run(np.load(target / "probe-tiles.npy"))
    diff = float(np.abs(ours - np.load(target / "probe-logits.npy")).max())
    if diff > 1e-4:
        raise SystemExit(f"WSInfer's model and the runner's ONNX differ by {diff} on probe tiles")
    return target, diff


def run_wsinfer(python: Path, slide: Path, model: Path, out: Path) -> dict[str, Any]:
    """One WSInfer run (patching + inference) in the venv; figures of its inference pass."""
    load = os.getloadavg()[0]
    proc = subprocess.run(
        [str(python), str(HERE / "wsinfer_side.py"), "run", str(slide), str(model), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"WSInfer failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "load": _load(load)}


def _runner_pass(r: dict[str, Any]) -> dict[str, Any]:
    run = r["summary"]["run"]
    return {
        "tiles": run["tiles"],
        "tiles_s": run["timings_s"]["tiles"],
        "tiles_cpu_s": run["timings_s"]["tiles_cpu"],
        "peak_rss_mb": r["peak_rss_mb"],
        "load": [round(v, 1) for v in r["load"]],
    }


def suite_wsinfer(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """ResNet-18 on the small slide: runner vs WSInfer vs the runner's previous CPU plan."""
    python = bench_venv()
    model = cached_resnet("resnet18")
    slide = cached_slide(args.small_size, 7)
    ts_model, diff = wsinfer_model(python, model)
    config = write_model_app(tmp / "app-resnet18", model)
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(args.rounds):
        order = ["runner", "wsinfer", "previous"]
        order = order if i % 2 == 0 else order[::-1]
        got: dict[str, dict[str, Any]] = {}
        for which in order:
            print(f"round {i + 1}/{args.rounds}: {which}...", flush=True)
            out = tmp / f"wsinfer-{i}-{which}"
            if which == "wsinfer":
                got[which] = run_wsinfer(python, slide, ts_model, out)
            else:
                got[which] = _runner_pass(
                    run_runner(slide, config, out, args, previous=which == "previous")
                )
            got[which]["rate"] = got[which]["tiles"] / got[which]["tiles_s"]
            got[which]["cpu_ms"] = 1000 * got[which]["tiles_cpu_s"] / got[which]["tiles"]
        rounds.append(got)

    def ratios(a: str, b: str, key: str, inverse: bool = False) -> list[float]:
        vals = [r[a][key] / r[b][key] for r in rounds]
        return [round(1 / v if inverse else v, 2) for v in vals]

    speed = ratios("runner", "wsinfer", "rate")
    cpu = ratios("runner", "wsinfer", "cpu_ms", inverse=True)
    figures = {
        "model": f"resnet18 ({resnet.GFLOP_PER_TILE['resnet18']} GFLOP/tile, same weights both)",
        "slide_px": args.small_size,
        "logits_max_abs_diff_torch_vs_runner": diff,
        "tiles_runner_wsinfer": [rounds[0]["runner"]["tiles"], rounds[0]["wsinfer"]["tiles"]],
        "runner_tiles_per_s": [round(r["runner"]["rate"], 2) for r in rounds],
        "wsinfer_tiles_per_s": [round(r["wsinfer"]["rate"], 2) for r in rounds],
        "previous_plan_tiles_per_s": [round(r["previous"]["rate"], 2) for r in rounds],
        "runner_vs_wsinfer_all_rounds": speed,
        "runner_vs_wsinfer": statistics.median(speed),
        "runner_cpu_ms_per_tile": [round(r["runner"]["cpu_ms"], 1) for r in rounds],
        "wsinfer_cpu_ms_per_tile": [round(r["wsinfer"]["cpu_ms"], 1) for r in rounds],
        "previous_plan_cpu_ms_per_tile": [round(r["previous"]["cpu_ms"], 1) for r in rounds],
        "runner_vs_wsinfer_cpu_all_rounds": cpu,
        "runner_vs_wsinfer_cpu": statistics.median(cpu),
        "previous_plan_vs_wsinfer_all_rounds": ratios("previous", "wsinfer", "rate"),
        "runner_vs_previous_plan_all_rounds": ratios("runner", "previous", "rate"),
        "peak_rss_mb_runner_wsinfer": [
            round(max(r["runner"]["peak_rss_mb"] for r in rounds)),
            round(max(r["wsinfer"]["peak_rss_mb"] for r in rounds)),
        ],
        "load_average_runner_wsinfer_previous": [
            [r["runner"]["load"], r["wsinfer"]["load"], r["previous"]["load"]] for r in rounds
        ],
        "batch_size": args.batch_size,
    }
    print_figures("ResNet-18 vs WSInfer 0.6.1 (steady state, one run)", figures)
    print(
        f"runner / WSInfer = {figures['runner_vs_wsinfer']:.2f}x tiles/s (median of "
        f"{args.rounds} alternating rounds, target >= 2.5x), "
        f"{figures['runner_vs_wsinfer_cpu']:.2f}x in CPU time per tile"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--suite",
        action="append",
        choices=(*SUITES, "all"),
        help="what to measure (repeatable; default demo)",
    )
    parser.add_argument("--size", type=int, default=50_000, help="large slide edge (px)")
    parser.add_argument("--small-size", type=int, default=20_000, help="small slide edge (px)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="demo: runs on the large slide")
    parser.add_argument("--resnet-repeat", type=int, default=1, help="resnet50: large runs")
    parser.add_argument("--rounds", type=int, default=3, help="wsinfer, plans: rounds")
    parser.add_argument("--ceiling-tiles", type=int, default=512)
    parser.add_argument("--resnet-ceiling-tiles", type=int, default=128)
    parser.add_argument("--naive-tiles", type=int, default=400)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    chosen = args.suite or ["demo"]
    suites = [s for s in SUITES if s in chosen or "all" in chosen]
    CACHE.mkdir(parents=True, exist_ok=True)
    runs = {"demo": suite_demo, "resnet50": suite_resnet50, "wsinfer": suite_wsinfer}
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="tilerunner-bench-") as tmp:
        for suite in suites:
            figures[suite] = runs[suite](args, Path(tmp))
            if args.json:  # after each suite: a long run keeps what it has measured
                args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
