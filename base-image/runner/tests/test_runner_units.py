"""Unit tests of the runner's parts: plug-ins, graph composition, geometry, tissue, readers."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from tilerunner import config as config_mod
from tilerunner.errors import ConfigError, DeviceError, SlideError
from tilerunner.geometry import grid_regions, merge_points
from tilerunner.grid import choose_level
from tilerunner.models import CPU, CUDA, EngineOptions, ModelStore, select_providers
from tilerunner.pipeline import BatchReader, RunOptions, run
from tilerunner.plugins import FEATURES, POSTPROCESSING, PREPROCESSING
from tilerunner.plugins.postprocessing import Kind, Prediction
from tilerunner.tissue import TissueParams, otsu_threshold
from tilerunner_testlib import App, verbose_config

# --------------------------------------------------------------------------- devices


def test_provider_selection_by_availability() -> None:
    assert select_providers("auto", [CUDA, CPU]) == ("cuda", [CUDA, CPU])
    assert select_providers("auto", ["AzureExecutionProvider", CPU]) == ("cpu", [CPU])
    assert select_providers("cpu", [CUDA, CPU]) == ("cpu", [CPU])
    assert select_providers("cuda", ["TensorrtExecutionProvider", CUDA, CPU]) == (
        "cuda",
        [CUDA, CPU],
    )
    with pytest.raises(DeviceError, match="no CUDAExecutionProvider"):
        select_providers("cuda", [CPU])


def test_cuda_listed_but_unusable_falls_back_to_cpu_for_auto(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """ORT lists CUDA but this machine has no driver: auto says why in one line and takes the
    CPU; cuda is a DeviceError (exit 6) naming the reason."""
    cfg = config_mod.load_config(app.config, app.root)
    with caplog.at_level("WARNING", logger="tilerunner"):
        store = ModelStore(EngineOptions("auto"), available=[CUDA, CPU])
    store.load(cfg)
    assert store.device == "cpu" and store.providers == [CPU]
    [line] = [r.getMessage() for r in caplog.records if "device" in r.getMessage()]
    assert "CUDA not usable (no NVIDIA driver: libcuda.so.1 not found" in line
    assert line.endswith("running on the CPU") and "\n" not in line
    with pytest.raises(DeviceError, match=r"installed but not usable: no NVIDIA driver") as err:
        ModelStore(EngineOptions("cuda"), available=[CUDA, CPU])
    assert err.value.exit_code == 6 and "\n" not in str(err.value)
    assert ModelStore(EngineOptions("cpu"), available=[CUDA, CPU]).device == "cpu"


def test_cuda_session_that_fails_late_still_falls_back(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the probe passes but ORT cannot start the provider at session time."""
    from tilerunner import cuda as cuda_mod

    monkeypatch.setattr(cuda_mod, "_driver", lambda major: ("13.0", 1, ""))
    cfg = config_mod.load_config(app.config, app.root)
    store = ModelStore(EngineOptions("auto"), available=[CUDA, CPU])
    assert store.device == "cuda"
    store.load(cfg)
    assert store.device == "cpu" and {s.device for s in store.sessions} == {"cpu"}
    with pytest.raises(DeviceError, match="CUDA provider failed"):
        ModelStore(EngineOptions("cuda"), available=[CUDA, CPU]).load(cfg)


def test_cuda_status_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way CUDA can be unusable gives a one-line reason (driver faults injected)."""
    from tilerunner import cuda as cuda_mod

    status = cuda_mod.cuda_status([CPU])
    assert not status.installed and "gpu variant" in status.reason
    assert "no NVIDIA driver" in cuda_mod.cuda_status([CUDA, CPU]).reason
    monkeypatch.setattr(cuda_mod, "_driver", lambda major: ("12.4", 0, "no CUDA device visible"))
    monkeypatch.setattr(cuda_mod, "preload", lambda: ({}, ("libcudnn.so.9",)))
    status = cuda_mod.cuda_status([CUDA, CPU])
    assert status.installed and not status.usable
    assert status.reason == "CUDA libraries missing: libcudnn.so.9; no CUDA device visible"
    assert json.loads(json.dumps(status.as_dict()))["missing"] == ["libcudnn.so.9"]


# --------------------------------------------------------------------------- plug-ins


def test_preprocessing_in_graph_matches_numpy(app: App) -> None:
    """The composed graph (uint8 in) equals numpy preprocessing + the raw model (float in)."""
    import onnxruntime as ort

    cfg = config_mod.load_config(app.config, app.root)
    store = ModelStore(EngineOptions("cpu"))
    store.load(cfg)
    runner = store.runners[("breast", "mitosis_model")]
    tiles = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    composed = runner.session.run(tiles)
    x = tiles.transpose(0, 3, 1, 2).astype(np.float32)
    for step in runner.spec.preprocessing:
        x = step.apply(x, "NCHW")
    raw = ort.InferenceSession(str(runner.spec.file), providers=[CPU]).run(None, {"input": x})[0]
    np.testing.assert_allclose(composed, raw, rtol=1e-5, atol=1e-6)


def test_preprocessing_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="factor"):
        PREPROCESSING.create("Normalization", {"factor": 0}, "here")
    with pytest.raises(ConfigError, match=r"std must be .*a list of 3 numbers \(not 0\)"):
        PREPROCESSING.create("MeanStd", {"mean": [0, 0, 0], "std": [1, 0, 1]}, "here")
    with pytest.raises(ConfigError, match="list of 3"):
        PREPROCESSING.create("MeanStd", {"mean": [0, 0]}, "here")
    with pytest.raises(ConfigError, match="unknown params 'scale'"):
        PREPROCESSING.create("Normalization", {"scale": 2}, "here")


def test_classification_postprocessing() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], np.float32)
    pred = Prediction.from_raw(logits, 0.5)
    soft = POSTPROCESSING.create("Softmax", {}, "x").apply(pred)
    assert soft.scores is not None
    np.testing.assert_allclose(soft.scores.sum(1), 1.0, rtol=1e-6)
    arg = POSTPROCESSING.create("ArgMax", {}, "x").apply(soft)
    assert arg.kind is Kind.LABELS and arg.labels is not None and arg.labels.tolist() == [0, 1, 0]
    binary = POSTPROCESSING.create("BinaryClassification", {"threshold": 0.5}, "x").apply(soft)
    assert binary.labels is not None
    assert binary.labels.tolist() == [0, 1, 1]  # p = 0.5 counts as positive (>=)
    single = Prediction.from_raw(np.array([[0.2], [0.7]], np.float32), 0.5)
    out = POSTPROCESSING.create("BinaryClassification", {"threshold": 0.6}, "x").apply(single)
    assert out.labels is not None and out.scores is not None
    assert out.labels.tolist() == [0, 1] and out.scores.tolist() == pytest.approx([0.2, 0.7])
    with pytest.raises(ConfigError, match=r"threshold must be a number in \[0, 1\]"):
        POSTPROCESSING.create("BinaryClassification", {"threshold": 2}, "x")


def test_mask_to_objects_sizes_in_um2() -> None:
    maps = np.zeros((2, 1, 64, 64), np.float32)
    maps[0, 0, 10:20, 10:20] = 0.9  # 100 px at 0.5 mpp = 25 um2
    maps[0, 0, 40:42, 40:42] = 0.9  # 4 px = 1 um2: too small
    maps[1, 0, 0:60, 0:60] = 0.8  # 3600 px = 900 um2: too big
    step = POSTPROCESSING.create(
        "MaskToObjects", {"threshold": 0.5, "min_area_um2": 5, "max_area_um2": 200}, "x"
    )
    out = step.apply(Prediction.from_raw(maps, 0.5))
    assert out.kind is Kind.OBJECTS and out.objects is not None
    assert len(out.objects[0]) == 1 and out.objects[1] == []
    obj = out.objects[0][0]
    assert (obj.x, obj.y, obj.area_px) == (15.0, 15.0, 100)
    assert obj.score == pytest.approx(0.9)


def test_chain_kinds_are_checked() -> None:
    seg = POSTPROCESSING.create("MaskToObjects", {}, "x")
    with pytest.raises(ValueError, match="takes maps or labelmap but gets scores"):
        seg.output_kind(Kind.SCORES)
    assert POSTPROCESSING.create("ArgMax", {}, "x").output_kind(Kind.MAPS) is Kind.LABELMAP


def test_a_new_plugin_is_one_registered_class(
    tmp_path: Path, app: App, models_dir: Path, small_slide: Path
) -> None:
    """Register a feature class; the config can use it with no other change."""

    @dataclass
    class TileCounter:
        roles: ClassVar[dict[str, Kind]] = {"classification_model": Kind.LABELS}

        @dataclass(frozen=True)
        class Params:
            label: str = "tiles"

        name: str
        grid: Any
        params: Any
        seen: int = 0

        def consume(self, tiles: np.ndarray, preds: dict[str, Prediction]) -> np.ndarray:
            self.seen += len(tiles)
            return np.ones(len(tiles), bool)

        def positive_grid(self) -> np.ndarray:
            return np.ones((self.grid.rows, self.grid.cols), bool)

        def finish(self) -> Any:
            from tilerunner.plugins.features import FeatureResult

            return FeatureResult([], {}, {self.params.label: self.seen})

    FEATURES.register(TileCounter)
    try:
        doc = verbose_config(models_dir)
        doc["analyses"][0]["features"] = [
            {
                "cls": "TileCounter",
                "models": {"classification_model": "carcinoma_model"},
                "params": {"label": "counted"},
            }
        ]
        app.write(doc)
        report = run(
            config_mod.load_config(app.config, app.root),
            small_slide,
            tmp_path / "o",
            RunOptions(device="cpu", workers=1),
        )
        feat = report.summaries["breast"]["deterministic"]["features"]["TileCounter"]
        assert feat["counted"] == feat["tiles_run"] > 0
    finally:
        FEATURES._classes.pop("TileCounter")


# --------------------------------------------------------------------------- config


def test_schema_is_valid_draft_2020_12_and_closed() -> None:
    import jsonschema

    schema = config_mod.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for name in ("analysis", "model", "feature", "plugin", "provenance"):
        assert schema["$defs"][name]["additionalProperties"] is False, name
    shipped = Path(config_mod.__file__).parent / "schemas" / "analysis-verbose-v1.schema.json"
    assert json.loads(shipped.read_text()) == schema


def test_analysis_params_tune_tissue_detection(app: App, models_dir: Path) -> None:
    app.write(verbose_config(models_dir, params={"tissue": {"min_tile_fraction": 0.5}}))
    cfg = config_mod.load_config(app.config, app.root)
    assert cfg.analyses[0].tissue == TissueParams(min_tile_fraction=0.5)
    app.write(verbose_config(models_dir, params={"tissue": {"min_tile_fraction": 2}}))
    with pytest.raises(ConfigError, match="min_tile_fraction"):
        config_mod.load_config(app.config, app.root)


def test_app_dir_from_environment(monkeypatch: pytest.MonkeyPatch, app: App) -> None:
    monkeypatch.setenv("TILERUNNER_APP_DIR", str(app.root))
    cfg = config_mod.load_config()
    assert cfg.path == app.config
    assert cfg.analyses[0].models["carcinoma_model"].file.is_relative_to(app.root)


# --------------------------------------------------------------------------- geometry


def test_grid_regions_trace_holes_and_corner_contacts() -> None:
    mask = np.zeros((5, 6), bool)
    mask[0:3, 0:3] = True
    mask[1, 1] = False  # a hole
    mask[3, 3] = True  # touches the block only at a corner: separate region
    regions = grid_regions(mask)
    assert len(regions) == 2
    rings, cells = regions[0]
    assert rings[0] == [(0, 0), (3, 0), (3, 3), (0, 3)]
    assert rings[1] == [(1, 1), (1, 2), (2, 2), (2, 1)]  # hole, opposite orientation
    assert cells.sum() == 8
    assert regions[1][0] == [[(3, 3), (4, 3), (4, 4), (3, 4)]]


def test_merge_points_joins_split_detections() -> None:
    xy = np.array([[0.0, 0.0], [3.0, 0.0], [100.0, 100.0]])
    centres, group = merge_points(xy, np.array([1.0, 3.0, 1.0]), 4.0)
    assert group.tolist() == [0, 0, 1]
    np.testing.assert_allclose(centres, [[2.25, 0.0], [100.0, 100.0]])


def test_choose_level_never_upsamples_beyond_ten_percent() -> None:
    mpps = [0.25, 0.5, 1.0, 2.0]
    assert choose_level(mpps, 0.5) == 1
    assert choose_level(mpps, 0.7) == 1  # 1.0 would be 43 % too coarse
    assert choose_level(mpps, 1.05) == 2  # 1.0 is finer: fine
    assert choose_level([0.499], 0.5) == 0
    assert choose_level([0.6], 0.25) == 0  # nothing fine enough: the finest there is


# --------------------------------------------------------------------------- tissue, readers


def test_otsu_separates_two_modes() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.02, 0.01, 5000), rng.normal(0.3, 0.05, 3000)])
    t = otsu_threshold(np.clip(values, 0, 1))
    assert 0.06 < t < 0.25


def test_tifffile_fallback_reads_what_openslide_rejects(tmp_path: Path) -> None:
    """A strip (untiled) TIFF: OpenSlide refuses it, the tifffile reader serves it."""
    import tifffile
    from tilerunner.slide import OpenSlideSlide, TiffSlide, open_slide

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(
        path,
        image,
        photometric="rgb",
        rowsperstrip=64,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    slide = open_slide(path)
    assert isinstance(slide, TiffSlide) and slide.info.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(
        slide.read_region((100, 50), 0, (300, 200)), image[50:250, 100:400]
    )
    edge = slide.read_region((800, 650), 0, (200, 100))
    np.testing.assert_array_equal(edge[:50, :100], image[650:, 800:])
    assert (edge[50:] == 255).all() and (edge[:, 100:] == 255).all()
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(
        tiled,
        image,
        photometric="rgb",
        tile=(256, 256),
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    osr = open_slide(tiled, reader="openslide")
    assert isinstance(osr, OpenSlideSlide)
    np.testing.assert_array_equal(
        osr.read_region((100, 50), 0, (300, 200)),
        TiffSlide(tiled).read_region((100, 50), 0, (300, 200)),
    )


def test_fast_tile_path_is_pixel_identical_to_openslide(small_slide: Path, cmu_slide: Path) -> None:
    """reader auto decodes TIFF tiles with tifffile only where OpenSlide gives the same pixels."""
    from tilerunner.slide import OpenSlideSlide, TiffSlide, open_slide

    rng = np.random.default_rng(4)
    for path in (small_slide, cmu_slide):
        fast = open_slide(path)
        ref = open_slide(path, reader="openslide")
        assert isinstance(fast, TiffSlide) and isinstance(ref, OpenSlideSlide)
        assert "checked identical" in fast.info.reader and fast.info.vendor == ref.info.vendor
        assert fast.info.mpp == ref.info.mpp
        for level, (w, h) in enumerate(ref.info.level_dimensions[:2]):
            ds = ref.info.level_downsamples[level]
            for _ in range(5):
                x, y = int(rng.integers(0, w - 300)), int(rng.integers(0, h - 300))
                loc = (round(x * ds), round(y * ds))
                np.testing.assert_array_equal(
                    fast.read_region(loc, level, (300, 260)),
                    ref.read_region(loc, level, (300, 260)),
                )


def test_bad_mpp_override(small_slide: Path) -> None:
    from tilerunner.slide import open_slide

    with pytest.raises(SlideError, match="--mpp"):
        open_slide(small_slide, mpp=-1.0)


class _SlowSlide:
    """Counts concurrent reads; each read takes a little time."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.info = None

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.002)
        with self.lock:
            self.active -= 1
        return np.zeros((size[1], size[0], 3), np.uint8)

    def prefetch(self, locations: list[tuple[int, int]], level: int, size: tuple[int, int]) -> None:
        pass

    def clone(self) -> _SlowSlide:
        return self

    def close(self) -> None:
        pass


def test_batch_reader_is_ordered_and_bounded(small_slide: Path) -> None:
    """Batches come back in order; at most `prefetch` batches are ever in flight."""
    from tilerunner.grid import make_grid
    from tilerunner.slide import open_slide

    class Counting(BatchReader):
        started = 0

        def read(self, slide: Any, coords: np.ndarray) -> Any:
            Counting.started += 1
            return super().read(slide, coords)

    grid = make_grid(open_slide(small_slide).info, 0.5, 16)
    coords = np.array([(c, r) for r in range(10) for c in range(10)])
    slide: Any = _SlowSlide()  # a stand-in with the methods the reader calls
    reader = Counting(slide, grid, coords, batch_size=4, workers=3, prefetch=3)
    seen: list[Any] = []
    for consumed, batch in enumerate(reader, start=1):
        time.sleep(0.02)  # slow consumer: readers must wait, not run ahead
        assert Counting.started - consumed <= 3
        seen.extend(map(tuple, batch.coords))
    assert seen == [tuple(c) for c in coords]
    assert 1 < slide.peak <= 3


# --------------------------------------------------------------------------- demo models


def test_demo_backbone_in_numpy_matches_onnxruntime() -> None:
    """The head is fitted on float64 numpy features; ORT must compute the same features."""
    import onnxruntime as ort
    from tilerunner import demo_models as dm

    layers = dm._carcinoma_layers()
    g = dm._Graph("probe")
    feats = dm._backbone_graph(g, "input", layers)
    model = g.model("input", ["N", 3, 224, 224], feats, ["N", 64], "features", {})
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    x = np.random.default_rng(3).integers(0, 256, (2, 3, 224, 224)).astype(np.float64) / 255
    got = session.run(None, {"input": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, dm._forward_numpy(x, layers), rtol=1e-4, atol=1e-5)


def test_demo_mitosis_model_is_byte_identical_when_rebuilt(models_dir: Path) -> None:
    from tilerunner import demo_models as dm

    first = dm.build_mitosis("finetuned").SerializeToString(deterministic=True)
    again = dm.build_mitosis("finetuned").SerializeToString(deterministic=True)
    assert first == again == (models_dir / "mitosis-demo-ft" / "model.onnx").read_bytes()


def test_dependency_across_grids(
    tmp_path: Path, app: App, models_dir: Path, small_slide: Path
) -> None:
    """Mitosis at 0.25 um/px (another grid) runs only on tiles overlapping positive Carcinoma."""
    from tilerunner.evaluate import match_points
    from tilerunner_testlib import truth_of

    doc = verbose_config(models_dir)
    doc["analyses"][0]["models"]["mitosis_model"]["params"]["mpp"] = 0.25
    app.write(doc)
    report = run(
        config_mod.load_config(app.config, app.root),
        small_slide,
        tmp_path / "o",
        RunOptions(device="cpu", workers=1),
    )
    det = report.summaries["breast"]["deterministic"]
    mit, carc = det["features"]["mitosis"], det["features"]["Carcinoma"]
    grid = det["grids"]["0.25@224"]
    assert grid["level"] == 0 and mit["grid"] == "0.25@224"
    assert 0 < mit["tiles_run"] <= 4 * carc["positive_tiles"] < grid["tissue_tiles"]
    assert mit["tiles_run"] + mit["tiles_skipped_by_dependency"] == grid["tissue_tiles"]
    folder = report.analyses["breast"]
    points = json.loads((folder / "mitosis.geojson").read_text())["features"]
    pred = np.array([p["geometry"]["coordinates"] for p in points]).reshape(-1, 2)
    truth = json.loads(truth_of(small_slide).read_text())
    gt = np.array([[m["x_px"], m["y_px"]] for m in truth["mitoses"]])
    tp, fp, fn = match_points(pred, gt, 8 / 0.25)
    assert tp >= 0.8 * len(gt) and fp <= 0.2 * len(pred), (tp, fp, fn)
