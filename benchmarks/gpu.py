#!/usr/bin/env python3
"""GPU vs CPU: the tile runner on the benchmark slide with a ResNet-50, on CUDA and on the CPU.

Needs a machine with an NVIDIA GPU and its driver (CUDA 13: >= 580), and either Docker with
the NVIDIA container toolkit and an image built on the gpu variant of the base image
(`--image`), or this checkout's runner on a host Python with onnxruntime-gpu (`--host`).
Every configuration runs in this one invocation on the same machine, so the ratios are the
point. The model is benchmarks/resnet.py's ResNet-50 (generated weights, ~8 GFLOP per tile)
behind the Carcinoma feature (`--model resnet18|demo|image` for the others; `image`: the
customer image's own config). Configurations, each one `tilerunner run`:

* cuda           --device cuda, the runner's default reader threads, CPU JPEG decoding;
* cuda+readers   the same with one reader thread per core but one (if that is more);
* cuda+gpudecode --decoder nvimgcodec: JPEG tiles decoded on the GPU by nvImageCodec (in
                 the gpu variant); its one-line refusal is reported if it cannot run;
* cpu            --device cpu, the baseline.

For each: tiles/s of the tile pass, GPU utilisation while it runs (nvidia-smi every 200 ms:
mean, median, max; memory), the share of the tile pass the inference thread spent waiting
for decoded tiles (summary.json `read_wait` / `tiles`: near 0 means the GPU is the bound,
near 1 that decoding is), ms per tile, and who decoded the tiles (summary.json's reader).
The runner hands ORT uint8 NHWC tiles through I/O binding and normalises them on the GPU, so
only 150 KB per 224 px tile crosses PCIe. Target: >= 80 % GPU utilisation with ResNet-50.

    python benchmarks/gpu.py --host                              # 50k slide, ResNet-50
    python benchmarks/gpu.py --image 127.0.0.1:5000/customer-x:2.4.1-gpu --batch-size 128
    python benchmarks/gpu.py --image IMAGE --check-only         # preflight only
    python benchmarks/gpu.py --dry-run                          # no GPU: the CPU path only

Without a GPU it stops after the preflight with one line saying what is missing (exit 2).
`--dry-run` needs no GPU and no Docker: it runs the CPU configuration of this checkout's
runner on a small slide (8k px unless --size) with the chosen model and prints the same
table with the GPU figures empty, to check the benchmark itself.
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Setup:
    """One configuration of the benchmark: device, decoder, reader threads (0: default)."""

    label: str
    device: str
    decoder: str = "cpu"
    workers: int = 0


def setups(args: argparse.Namespace, cpus: int) -> list[Setup]:
    """The configurations this invocation runs (see the module docstring)."""
    if args.dry_run:
        return [Setup("cpu", "cpu", "auto", args.workers)]
    default = args.workers or max(1, min(8, cpus - 1))  # tilerunner.pipeline.default_workers
    out = [Setup("cuda", "cuda", "cpu", args.workers)]
    if cpus - 1 > default:
        out.append(Setup("cuda+readers", "cuda", "cpu", cpus - 1))
    out.append(Setup("cuda+gpudecode", "cuda", "nvimgcodec", args.workers))
    return [*out, Setup("cpu", "cpu", "cpu", args.workers)]


def _runner_options(setup: Setup, args: argparse.Namespace) -> list[str]:
    """The `tilerunner run` options both ways of running share."""
    options = ["--device", setup.device, "--decoder", setup.decoder, "--no-progress"]
    options += ["--batch-size", str(args.batch_size)]
    return options + (["--workers", str(setup.workers)] if setup.workers else [])


def app_config(out: Path, model: str) -> Path | None:
    """The app folder's config for `model` (None: the image's own config)."""
    bench = _bench_runner()
    if model == "image":
        return None
    if model == "demo":
        return Path(bench.write_app(out / "app", bench.cached_models()))
    return Path(bench.write_model_app(out / "app", bench.cached_resnet(model)))


def _measured(device: str, target: Path, run: Callable[[], tuple[int, str]]) -> dict[str, Any]:
    """Run ``run`` (exit code, stderr) timed, sampling the GPU on cuda; its summaries."""
    sampler = GpuSampler() if device == "cuda" else None
    target.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if sampler:
        sampler.start()
    try:
        code, stderr = run()
    finally:
        wall = time.perf_counter() - t0
        gpu = sampler.stop() if sampler else None
    if code != 0:
        raise RuntimeError(f"exit {code}: {stderr.strip()[-500:]}")
    summaries = {p.parent.name: json.loads(p.read_text()) for p in target.glob("*/summary.json")}
    return {"wall_s": wall, "summaries": summaries, "gpu": gpu, "stderr": stderr}


def run_host(
    slide: Path, out: Path, config: Path | None, setup: Setup, args: argparse.Namespace
) -> dict[str, Any]:
    """One `tilerunner run` of this checkout on this host (--host, --dry-run)."""
    assert config is not None, "--host runs need a model config (not --model image)"
    target = out / setup.label
    command = [sys.executable, "-m", "tilerunner", "-q", "run", str(slide), "--config", str(config)]
    command += ["--app-dir", str(config.parent), "--out", str(target)]
    command += _runner_options(setup, args)

    def run() -> tuple[int, str]:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
        return proc.returncode, proc.stderr

    return _measured(setup.device, target, run)


def run_image(
    client: Any,
    image: str,
    slide: Path,
    out: Path,
    config: Path | None,
    setup: Setup,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One `tilerunner run` in the image; the summaries of its analyses and the wall time."""
    from docker.types import DeviceRequest

    target = out / setup.label
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o777)
    # the image runs as uid 10001: the cached slide's folder (made 0700 by mkdtemp) must open
    slide.parent.chmod(0o755)
    command = ["run", f"/slides/{slide.name}", "--out", "/out", "--json"]
    volumes = {
        str(slide.parent): {"bind": "/slides", "mode": "ro"},
        str(target): {"bind": "/out", "mode": "rw"},
    }
    if config is not None:  # the benchmark model instead of the image's own config
        volumes[str(config.parent)] = {"bind": "/bench", "mode": "ro"}
        command += ["--config", f"/bench/{config.name}", "--app-dir", "/bench"]
    command += _runner_options(setup, args)
    gpus = [DeviceRequest(count=-1, capabilities=[["gpu"]])] if setup.device == "cuda" else []

    def run() -> tuple[int, str]:
        container = client.containers.run(
            image,
            command,
            volumes=volumes,
            device_requests=gpus,
            network_mode="none",
            detach=True,
        )
        try:
            code = int(container.wait(timeout=args.timeout)["StatusCode"])
            return code, bytes(container.logs(stdout=False, stderr=True)).decode()
        finally:
            container.remove(force=True)

    return _measured(setup.device, target, run)


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """tiles/s, wait share and per-model inference of one run (all analyses together)."""
    tiles = tile_s = wait_s = 0.0
    models: dict[str, dict[str, float]] = {}
    device = reader = None
    for name, summary in result["summaries"].items():
        run = summary["run"]
        device = summary["deterministic"].get("device", device)
        reader = summary["deterministic"]["slide"].get("reader", reader)
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
        "decoded_on_gpu": "decoded on the GPU" in str(reader),
        "workers": next(iter(result["summaries"].values()))["run"]["options"]["workers"]
        if result["summaries"]
        else None,
        "models": models,
        "gpu": result["gpu"],
    }


def report(results: dict[str, dict[str, Any]], failed: dict[str, str]) -> None:
    """The table of configurations, the ratios to the CPU run, the GPU utilisation."""
    cpu = results.get("cpu") or {}
    keys = ("device", "workers", "decoded_on_gpu", "tiles", "tiles_per_s", "wait_share")
    print(f"{'':<16}" + "".join(f"{k:>16}" for k in (*keys, "gpu_util_mean", "vs_cpu")))
    for label, r in results.items():
        g = r["gpu"] or {}
        ratio = (
            round(r["tiles_per_s"] / cpu["tiles_per_s"], 2)
            if r["tiles_per_s"] and cpu.get("tiles_per_s")
            else None
        )
        row = [*(r[k] for k in keys), g.get("util_mean"), ratio]
        print(f"{label:<16}" + "".join(f"{v!s:>16}" for v in row))
    for label, why in failed.items():
        print(f"{label:<16}did not run: {why}")
    for label, r in results.items():
        g = r["gpu"]
        if g:
            print(
                f"{label}: GPU utilisation mean {g.get('util_mean')} %, median "
                f"{g.get('util_median')} %, max {g.get('util_max')} % ({g.get('samples')} "
                f"samples); memory max {g.get('memory_max_mb')} MiB"
            )
        for name, m in r["models"].items():
            print(f"  {label} {name}: {m['ms_per_tile']} ms/tile")
    utils = [r["gpu"]["util_mean"] for r in results.values() if r["gpu"] and r["gpu"]["util_mean"]]
    if utils:
        print(f"best mean GPU utilisation: {max(utils)} % (target >= 80 %)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", help="customer image on the gpu base variant")
    where.add_argument(
        "--host", action="store_true", help="no Docker: this checkout's runner on this host"
    )
    where.add_argument(
        "--dry-run", action="store_true", help="no GPU: the CPU configuration on a small slide"
    )
    parser.add_argument("--model", choices=("resnet50", "resnet18", "demo", "image"))
    parser.add_argument("--size", type=int, default=None, help="slide size (px; 50k, dry 8k)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="reader threads (0: runner's)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--check-only", action="store_true", help="preflight, then stop")
    return parser


def run_setups(
    args: argparse.Namespace, env: dict[str, Any], slide: Path, model: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every configuration in turn: figures of those that ran, the reason of those that not."""
    cpus = os.cpu_count() or 1
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        config = app_config(Path(tmp), model)
        print(f"model: {model}; slide {slide}; {cpus} CPUs", flush=True)
        for setup in setups(args, cpus):
            print(f"running {setup} ...", flush=True)
            try:
                if args.image:
                    out = run_image(
                        env["client"], args.image, slide, Path(tmp), config, setup, args
                    )
                else:
                    out = run_host(slide, Path(tmp), config, setup, args)
            except RuntimeError as exc:
                failed[setup.label] = " ".join(str(exc).split())[:300]
                print(f"  {setup.label}: {failed[setup.label]}", flush=True)
                continue
            result = figures(out)
            if result["device"] != setup.device:
                failed[setup.label] = f"ran on {result['device']}, not {setup.device} (see its log)"
                continue
            results[setup.label] = result
    return results, failed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    model = args.model or "resnet50"
    if model == "image" and not args.image:
        parser.error("--model image needs --image")
    env: dict[str, Any] = {"gpus": ["none (dry run)"], "labels": {}}
    try:
        if args.host:
            env = preflight_host()
        elif args.image:
            env = preflight(args.image)
    except Unavailable as exc:
        print(f"gpu.py: {exc}", file=sys.stderr)
        return 2
    print(f"GPU: {'; '.join(env['gpus'])}")
    if args.image:
        labels = env["labels"]
        cuda, cudnn = labels.get("com.ivd.runner.cuda"), labels.get("com.ivd.runner.cudnn")
        print(f"image: {args.image} (CUDA {cuda}, cuDNN {cudnn})")
    if args.check_only:
        return 0
    slide = bench_slide(args.size or (8192 if args.dry_run else 50_000), args.seed)
    results, failed = run_setups(args, env, slide, model)
    if "cpu" not in results:
        print(f"gpu.py: the CPU baseline did not run: {failed.get('cpu')}", file=sys.stderr)
        return 1
    report(results, failed)
    if args.json:
        figures_all = {"model": model, "results": results, "failed": failed}
        args.json.write_text(json.dumps(figures_all, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
