#!/usr/bin/env python3
"""GPU vs CPU: a customer image's tile runner on the benchmark slide, CUDA then CPU provider.

Needs a machine with an NVIDIA GPU, its driver (CUDA 13: >= 580), Docker with the NVIDIA
container toolkit (`docker run --gpus all` works) and a customer image built on the gpu
variant of the base image (`builder build CUSTOMER --variant gpu --load`, or pushed).
Both runs happen in this one invocation on the same machine, so the ratio is the point:

* tiles/s of the tile pass with `--device cuda` and with `--device cpu` (summary.json), and
  their ratio;
* GPU utilisation while the CUDA run lasts (nvidia-smi sampled every 200 ms: mean, median,
  max) and GPU memory used;
* the share of the tile pass the inference thread spent waiting for decoded tiles
  (summary.json `read_wait` / `tiles`): near 0 means the GPU is the bound, near 1 that
  decoding is (add `--workers`, or GPU decode);
* per model: inference seconds and ms per tile. The runner hands ORT uint8 NHWC tiles
  through I/O binding (an OrtValue on the device) and the cast, transpose and normalisation
  run in the graph on the GPU, so only 150 KB per 224 px tile crosses PCIe.

    python benchmarks/gpu.py --image 127.0.0.1:5000/customer-x:2.4.1-gpu
    python benchmarks/gpu.py --image IMAGE --size 50000 --workers 12 --batch-size 128 --json out.json
    python benchmarks/gpu.py --image IMAGE --check-only       # preflight only
    python benchmarks/gpu.py --host --size 30000               # no Docker: this host's runner

`--host` runs the tile runner of this checkout (base-image/runner) on this host's Python, which
must have onnxruntime-gpu and the CUDA 13 / cuDNN 9 libraries it loads: the same runner code and
the same demo models as the image, for a GPU machine without Docker.

Without a GPU it stops after the preflight with one line saying what is missing (exit 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SMI_QUERY = "--query-gpu=utilization.gpu,memory.used"


class Unavailable(Exception):
    """What this machine lacks for the benchmark (one line)."""


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists; raise Unavailable when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        raise Unavailable(
            "no NVIDIA GPU here: nvidia-smi not found (run on a machine with a GPU, its driver "
            ">= 580 for CUDA 13 and the NVIDIA container toolkit)"
        )
    proc = subprocess.run(
        [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    gpus = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not gpus:
        raise Unavailable(f"nvidia-smi lists no GPU: {' '.join(proc.stderr.split())[:200]}")
    return gpus


def preflight_host() -> dict[str, Any]:
    """The GPU and this host's onnxruntime with the CUDA provider (for --host)."""
    gpus = gpu_names()
    try:
        import onnxruntime as ort
    except ImportError:
        raise Unavailable("onnxruntime is not installed on this host") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Unavailable(
            f"onnxruntime {ort.__version__} here has no CUDA provider (install onnxruntime-gpu)"
        )
    return {"gpus": gpus, "labels": {"onnxruntime": ort.__version__}}


def preflight(image: str) -> dict[str, Any]:
    """The GPU, driver and Docker with GPU support; raise Unavailable naming what is missing."""
    gpus = gpu_names()
    import docker
    from docker.errors import DockerException, ImageNotFound

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except DockerException as exc:
        raise Unavailable(f"no Docker engine (DOCKER_HOST): {exc}") from None
    try:
        labels = client.images.get(image).labels or {}
    except ImageNotFound:
        try:
            labels = client.images.pull(image).labels or {}
        except DockerException as exc:
            raise Unavailable(f"image {image} not found locally nor pullable: {exc}") from None
    if labels.get("com.ivd.runner.variant") != "gpu":
        raise Unavailable(
            f"{image} is not built on the gpu variant of the base image "
            f"(com.ivd.runner.variant={labels.get('com.ivd.runner.variant')!r}); build it with "
            "`builder build CUSTOMER --variant gpu`"
        )
    return {"client": client, "gpus": gpus, "labels": labels}


class GpuSampler(threading.Thread):
    """nvidia-smi utilisation and memory every 200 ms while a run lasts."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.util: list[float] = []
        self.mem_mb: list[float] = []
        self._proc: subprocess.Popen[str] | None = None

    def run(self) -> None:
        self._proc = subprocess.Popen(
            ["nvidia-smi", SMI_QUERY, "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0].replace(".", "").isdigit():
                self.util.append(float(parts[0]))
                self.mem_mb.append(float(parts[1]))

    def stop(self) -> dict[str, float | None]:
        if self._proc:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self.join(timeout=10)
        busy = list(self.util)
        return {
            "samples": len(busy),
            "util_mean": round(statistics.fmean(busy), 1) if busy else None,
            "util_median": statistics.median(busy) if busy else None,
            "util_max": max(busy) if busy else None,
            "memory_max_mb": max(self.mem_mb) if self.mem_mb else None,
        }


def _bench_runner() -> Any:
    """benchmarks/runner.py, for its cached slide, demo models and app config."""
    spec = importlib.util.spec_from_file_location("bench_runner", HERE / "runner.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_slide(size: int, seed: int) -> Path:
    """The cached synthetic benchmark slide of benchmarks/runner.py (same key, same file)."""
    return Path(_bench_runner().cached_slide(size, seed))


def _runner_options(device: str, args: argparse.Namespace) -> list[str]:
    """The `tilerunner run` options both ways of running share."""
    options = ["--device", device, "--batch-size", str(args.batch_size), "--no-progress"]
    return options + (["--workers", str(args.workers)] if args.workers else [])


def _measured(device: str, target: Path, run: Callable[[], tuple[int, str]]) -> dict[str, Any]:
    """Run ``run`` (exit code, stderr) timed, sampling the GPU on cuda; its summaries."""
    sampler = GpuSampler() if device == "cuda" else None
    t0 = time.perf_counter()
    if sampler:
        sampler.start()
    try:
        code, stderr = run()
    finally:
        wall = time.perf_counter() - t0
        gpu = sampler.stop() if sampler else None
    if code != 0:
        raise RuntimeError(f"--device {device} exited {code}: {stderr.strip()[-500:]}")
    summaries = {p.parent.name: json.loads(p.read_text()) for p in target.glob("*/summary.json")}
    return {"wall_s": wall, "summaries": summaries, "gpu": gpu, "stderr": stderr}


def run_host(slide: Path, out: Path, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """One `tilerunner run` of this checkout on this host with the demo models (--host)."""
    bench = _bench_runner()
    config = bench.write_app(out / "app", bench.cached_models())
    target = out / device
    command = [sys.executable, "-m", "tilerunner", "-q", "run", str(slide), "--config", str(config)]
    command += ["--app-dir", str(config.parent), "--out", str(target)]
    command += _runner_options(device, args)

    def run() -> tuple[int, str]:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
        return proc.returncode, proc.stderr

    return _measured(device, target, run)


def run_image(
    client: Any, image: str, slide: Path, out: Path, device: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One `tilerunner run` in the image; the summaries of its analyses and the wall time."""
    from docker.types import DeviceRequest

    target = out / device
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o777)
    command = ["run", f"/slides/{slide.name}", "--out", f"/out/{device}", "--json"]
    command += _runner_options(device, args)
    gpus = [DeviceRequest(count=-1, capabilities=[["gpu"]])] if device == "cuda" else []

    def run() -> tuple[int, str]:
        container = client.containers.run(
            image,
            command,
            volumes={
                str(slide.parent): {"bind": "/slides", "mode": "ro"},
                str(target): {"bind": f"/out/{device}", "mode": "rw"},
            },
            device_requests=gpus,
            network_mode="none",
            detach=True,
        )
        try:
            code = int(container.wait(timeout=args.timeout)["StatusCode"])
            return code, bytes(container.logs(stdout=False, stderr=True)).decode()
        finally:
            container.remove(force=True)

    return _measured(device, target, run)


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """tiles/s, wait share and per-model inference of one run (all analyses together)."""
    tiles = tile_s = wait_s = 0.0
    models: dict[str, dict[str, float]] = {}
    device = None
    for name, summary in result["summaries"].items():
        run = summary["run"]
        device = summary["deterministic"].get("device", device)
        tiles += run["tiles"]
        tile_s += run["timings_s"]["tiles"]
        wait_s += run["timings_s"]["read_wait"]
        counted = summary["deterministic"].get("models") or {}
        for model, timing in (run["timings_s"].get("models") or {}).items():
            entry = models.setdefault(f"{name}/{model}", {"tiles": 0, "inference_s": 0.0})
            entry["tiles"] += (counted.get(model) or {}).get("tiles", 0)
            entry["inference_s"] += timing.get("inference_s", 0.0)
    for entry in models.values():
        entry["ms_per_tile"] = round(1000 * entry["inference_s"] / max(1, entry["tiles"]), 3)
    return {
        "device": device,
        "tiles": int(tiles),
        "tiles_per_s": round(tiles / tile_s, 1) if tile_s else None,
        "tile_pass_s": round(tile_s, 2),
        "wait_share": round(wait_s / tile_s, 3) if tile_s else None,
        "wall_s": round(result["wall_s"], 1),
        "models": models,
        "gpu": result["gpu"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", help="customer image on the gpu base variant")
    where.add_argument(
        "--host", action="store_true", help="no Docker: this checkout's runner on this host"
    )
    parser.add_argument("--size", type=int, default=50_000, help="benchmark slide size (px)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="reader threads (0: runner's)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--check-only", action="store_true", help="preflight, then stop")
    args = parser.parse_args(argv)
    try:
        env = preflight_host() if args.host else preflight(args.image)
    except Unavailable as exc:
        print(f"gpu.py: {exc}", file=sys.stderr)
        return 2
    print(f"GPU: {'; '.join(env['gpus'])}")
    if args.host:
        print(f"host runner: onnxruntime {env['labels']['onnxruntime']} (CUDA provider available)")
    else:
        print(
            f"image: {args.image} (CUDA {env['labels'].get('com.ivd.runner.cuda')}, cuDNN "
            f"{env['labels'].get('com.ivd.runner.cudnn')})"
        )
    if args.check_only:
        return 0
    slide = bench_slide(args.size, args.seed)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        results = {}
        for device in ("cuda", "cpu"):
            print(f"running --device {device} on {slide} ...", flush=True)
            try:
                if args.host:
                    result = run_host(slide, Path(tmp), device, args)
                else:
                    result = run_image(env["client"], args.image, slide, Path(tmp), device, args)
            except RuntimeError as exc:
                print(f"gpu.py: {' '.join(str(exc).split())}", file=sys.stderr)
                return 1
            results[device] = figures(result)
    gpu, cpu = results["cuda"], results["cpu"]
    if gpu["device"] != "cuda":
        print("gpu.py: the CUDA run did not run on the GPU (see its log)", file=sys.stderr)
        return 1
    ratio = (
        gpu["tiles_per_s"] / cpu["tiles_per_s"]
        if gpu["tiles_per_s"] and cpu["tiles_per_s"]
        else None
    )
    print(f"{'':<28}{'cuda':>12}{'cpu':>12}")
    for key in ("tiles", "tiles_per_s", "tile_pass_s", "wait_share", "wall_s"):
        print(f"{key:<28}{gpu[key]!s:>12}{cpu[key]!s:>12}")
    print(f"GPU / CPU tiles/s: {ratio:.2f}x" if ratio else "GPU / CPU tiles/s: n/a")
    g = gpu["gpu"] or {}
    print(
        f"GPU utilisation during the CUDA run: mean {g.get('util_mean')} %, median "
        f"{g.get('util_median')} %, max {g.get('util_max')} % ({g.get('samples')} samples); "
        f"memory max {g.get('memory_max_mb')} MiB"
    )
    print(
        f"share of the tile pass waiting for decoded tiles: cuda {gpu['wait_share']}, cpu {cpu['wait_share']}"
    )
    for name in gpu["models"]:
        print(
            f"  {name}: {gpu['models'][name]['ms_per_tile']} ms/tile on cuda, "
            f"{cpu['models'].get(name, {}).get('ms_per_tile')} ms/tile on cpu"
        )
    if args.json:
        args.json.write_text(json.dumps({"cuda": gpu, "cpu": cpu, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
