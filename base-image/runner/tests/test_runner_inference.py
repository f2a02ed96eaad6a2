"""CPU inference: the thread plan, the session options, and outputs equal to the plain path."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tilerunner import config as config_mod
from tilerunner.models import CPU, CpuPlan, EngineOptions, ModelStore, cpu_plan, session_options
from tilerunner_testlib import App


def test_cpu_plan_splits_batches_one_thread_each() -> None:
    """Batch-parallel by default; threads inside the call only where a batch cannot split."""
    assert cpu_plan(0, None, cores=2) == CpuPlan(intra_op=1, splits=2)
    assert cpu_plan(0, None, cores=16) == CpuPlan(intra_op=1, splits=16)
    assert cpu_plan(3, None, cores=16) == CpuPlan(intra_op=1, splits=3)
    assert cpu_plan(1, None, cores=16) == CpuPlan(intra_op=1, splits=1)
    assert cpu_plan(0, 8, cores=4) == CpuPlan(intra_op=4, splits=1)  # fixed batch dimension
    assert cpu_plan(2, 1, cores=4) == CpuPlan(intra_op=2, splits=1)
    assert cpu_plan(0, None).splits >= 1


def test_session_options_follow_the_plan_and_the_device() -> None:
    so = session_options(EngineOptions("cpu"), "cpu", CpuPlan(intra_op=1, splits=4))
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 1)
    assert so.use_deterministic_compute and so.enable_cpu_mem_arena
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spin = session_options(EngineOptions("cpu", 4, spin=True), "cpu", CpuPlan(4, 1))
    assert spin.intra_op_num_threads == 4
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # on CUDA the CPU plan does not apply: --threads as given (0: ORT's default)
    assert session_options(EngineOptions("cuda", 0), "cuda", None).intra_op_num_threads == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_batches_give_the_same_bytes_as_one_call(app: App, threads: int) -> None:
    """Every model, any thread count, odd batch sizes: outputs bit-identical to one call with
    the batch whole (threads=1), and the stats count each tile once."""
    cfg = config_mod.load_config(app.config, app.root)
    whole = ModelStore(EngineOptions("cpu", threads=1))
    whole.load(cfg)
    split = ModelStore(EngineOptions("cpu", threads=threads))
    split.load(cfg)
    tiles = np.random.default_rng(3).integers(0, 256, (7, 224, 224, 3), dtype=np.uint8)
    for key, runner in split.runners.items():
        assert runner.session.splits == threads
        expected = whole.runners[key].session.run(tiles)
        for n in (1, 2, 7):
            got = runner.session.run(tiles[:n])
            assert got.dtype == expected.dtype and np.array_equal(got, expected[:n]), (key, n)
        assert runner.session.stats["tiles"] == 1 + 2 + 7


def test_optimised_graph_within_tolerance_of_the_unoptimised_model(app: App) -> None:
    """The runner's session (fusions, NCHWc layout, split batches) vs the raw model file run
    by ORT with every graph optimisation off, preprocessing in numpy: the tolerance the
    composition test uses."""
    cfg = config_mod.load_config(app.config, app.root)
    store = ModelStore(EngineOptions("cpu"))
    store.load(cfg)
    tiles = np.random.default_rng(4).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for runner in store.runners.values():
        x = tiles.transpose(0, 3, 1, 2).astype(np.float32)
        for step in runner.spec.preprocessing:
            x = step.apply(x, "NCHW")
        raw = ort.InferenceSession(str(runner.spec.file), plain, providers=[CPU])
        expected = raw.run(None, {"input": x})[0]
        np.testing.assert_allclose(runner.session.run(tiles), expected, rtol=1e-5, atol=1e-6)
