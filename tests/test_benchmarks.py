"""The benchmarks are ready to run: the runner's models, CPU paths and refusals, and the
build and fleet benchmarks end to end on the test bed.

The figures themselves come from running the benchmarks (README); these tests never look at
time. What they check: benchmarks/resnet.py builds torchvision's ResNet-18/50 (the parameter
counts torchvision documents), the runner computes it the same whether a batch is split over
threads or not and within the composition tolerance of the plain model, gpu.py's CPU path
(--dry-run) runs end to end and its GPU paths refuse in one line without a GPU, and the
WSInfer suite's environment is fully pinned.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from helpers import ROOT

from testbed.docker_engine import Engine

BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import resnet  # noqa: E402
import runner as bench_runner  # noqa: E402


def _script(
    *args: str, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(("arch", "params"), [("resnet18", 11_177_538), ("resnet50", 23_512_130)])
def test_resnets_have_torchvisions_parameters(arch: str, params: int) -> None:
    """torchvision's counts (11,689,512 and 25,557,032 with 1000 classes) less the 1000-class
    head, plus a 2-class one; batch-norm statistics are buffers, not parameters."""
    weights = resnet.state_dict(arch)
    counted = sum(v.size for k, v in weights.items() if "running_" not in k)
    assert counted == params
    model = resnet.build(arch, weights)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {i.name for i in model.graph.initializer} == set(weights)


def test_runner_computes_the_resnet_as_the_plain_model(tmp_path: Path) -> None:
    """ResNet-18 through the runner (uint8 in, ImageNet preprocessing in the graph, all
    optimisations, batches split over threads): bit-identical to one whole-batch call and
    within the composition tolerance of the raw model with every optimisation off."""
    from tilerunner.config import load_config
    from tilerunner.models import CPU, EngineOptions, ModelStore

    model_dir = tmp_path / "resnet18"
    resnet.write("resnet18", model_dir / "model.onnx")
    config = bench_runner.write_model_app(tmp_path / "app", model_dir)
    cfg = load_config(config, config.parent)
    stores = {}
    for threads in (1, 3):
        stores[threads] = ModelStore(EngineOptions("cpu", threads))
        stores[threads].load(cfg)
    tiles = np.random.default_rng(5).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    split = stores[3].runners[("bench", "classifier")]
    whole = stores[1].runners[("bench", "classifier")]
    assert split.session.splits == 3 and whole.session.splits == 1
    got = split.session.run(tiles)
    assert np.array_equal(got, whole.session.run(tiles))
    x = tiles.transpose(0, 3, 1, 2).astype(np.float32)
    for step in split.spec.preprocessing:
        x = step.apply(x, "NCHW")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    raw = ort.InferenceSession(str(model_dir / "model.onnx"), plain, providers=[CPU])
    np.testing.assert_allclose(got, raw.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)
    pred = split.predict(tiles)
    assert pred.labels is not None and pred.scores is not None and pred.scores.shape == (5,)


def test_gpu_bench_cpu_path_runs_end_to_end(tmp_path: Path) -> None:
    """--dry-run: no GPU, no Docker; the CPU configuration on a small slide, its table."""
    out = tmp_path / "gpu.json"
    args = ["--dry-run", "--model", "demo", "--size", "4096", "--batch-size", "8"]
    proc = _script(str(BENCH / "gpu.py"), *args, "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^cpu\s+cpu\s+\d+\s+False\s+\d+\s+[\d.]+", proc.stdout, re.M), proc.stdout
    figures: dict[str, Any] = json.loads(out.read_text())
    cpu = figures["results"]["cpu"]
    assert cpu["device"] == "cpu" and cpu["tiles"] > 0 and cpu["gpu"] is None
    assert figures["failed"] == {}


@pytest.mark.parametrize(
    "args",
    [["--host", "--check-only"], ["--host", "--model", "resnet18"]],
)
def test_gpu_bench_refuses_in_one_line_without_a_gpu(args: list[str]) -> None:
    proc = _script(str(BENCH / "gpu.py"), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU here" in lines[0], proc.stderr


def test_runner_bench_suites_and_wsinfer_pins() -> None:
    """The suites parse; the WSInfer venv's requirements pin every distribution exactly."""
    proc = _script(str(BENCH / "runner.py"), "--help")
    assert proc.returncode == 0 and "{demo,resnet50,wsinfer,all}" in proc.stdout
    lines = [
        line.strip()
        for line in bench_runner.WSINFER_REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+]+", line) for line in lines), lines
    names = {line.split("==")[0].lower() for line in lines}
    assert {"torch", "torchvision", "wsinfer", "tiffslide", "zarr", "setuptools"} <= names
    assert not names & {"onnxruntime", "onnx"}  # the runner side uses the host's
    helper = _script(str(BENCH / "wsinfer_side.py"), "--help")
    assert helper.returncode == 0 and "export" in helper.stdout and "run" in helper.stdout


@pytest.mark.slow
def test_the_build_benchmarks_run_and_print_their_targets(
    docker_engine: Engine, base_os_image: str
) -> None:
    """benchmarks/build.py and benchmarks/fleet.py, small, on the test bed: they run to the
    end and print every figure their targets are read from (the release guarantee once made
    the fleet run fail: nothing ran them)."""
    env = {**os.environ, **docker_engine.env()}
    build_args = ["--models", "1", "--size-mb", "2", "--customers", "2"]
    build_args += ["--docker-customers", "1", "--rounds", "1"]
    build = _script(str(BENCH / "build.py"), *build_args, timeout=600, env=env)
    assert build.returncode == 0, build.stderr[-2000:]
    for figure in ("config-only change", "the registry's own floor", "base bump", "target <= 6"):
        assert figure in build.stdout, build.stdout
    fleet_args = ["--sizes", "20", "--unchanged", "20", "--build", "2", "--jobs", "1"]
    fleet = _script(str(BENCH / "fleet.py"), *fleet_args, timeout=900, env=env)
    assert fleet.returncode == 0, fleet.stderr[-2000:]
    for figure in ("10+10 / cold", "bump / config-only change", "requests for the image itself"):
        assert figure in fleet.stdout, fleet.stdout
