"""The runner finds what the synthetic slides hold, skips glass, and is deterministic.

Thresholds:
* Carcinoma IoU >= 0.9 x the oracle IoU (and >= 0.6). Regions are unions of 112 um tiles, so
  even a perfect tile classifier loses the boundary band: the oracle (positive when >= half
  of a tile is carcinoma) reaches about 1 - t/(2R) ~ 0.85 for a ~340 um radius region. 0.9 x
  oracle leaves room for the model's calls on boundary tiles, not for missing the region.
* Mitoses: recall and precision >= 0.9, matched within 8 um (a mitosis is 6 um across, so a
  match means the blob itself). Mitoses lie >= 120 um inside carcinoma, so the Carcinoma
  gate cannot hide them; mimics (tiny dark bodies) must be rejected by size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tilerunner.config import load_config
from tilerunner.evaluate import score
from tilerunner.pipeline import RunOptions, run
from tilerunner_testlib import App, truth_of, verbose_config

OPTS = RunOptions(device="cpu", batch_size=16, workers=1)


def _run(app: App, slide: Path, out: Path, options: RunOptions = OPTS) -> Path:
    report = run(load_config(app.config, app.root), slide, out, options)
    return report.analyses["breast"]


@pytest.fixture(scope="module")
def small_result(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, small_slide: Path
) -> Path:
    root = tmp_path_factory.mktemp("small")
    app = App(root / "app", models_dir)
    app.write(verbose_config(models_dir))
    return _run(app, small_slide, root / "out")


def test_finds_carcinoma_and_mitoses(small_result: Path, small_slide: Path) -> None:
    s = score(small_result, truth_of(small_slide))
    assert s["iou"] >= max(0.6, 0.9 * s["oracle_iou"]), s
    assert s["recall"] >= 0.9, s
    assert s["precision"] >= 0.9, s


def test_skips_glass_and_gates_mitosis_on_carcinoma(small_result: Path) -> None:
    summary = json.loads((small_result / "summary.json").read_text())["deterministic"]
    grid = summary["grids"]["0.5@224"]
    carc, mit = summary["features"]["Carcinoma"], summary["features"]["mitosis"]
    assert 0 < grid["tissue_tiles"] < grid["tiles_total"]
    assert grid["skipped_no_tissue"] == grid["tiles_total"] - grid["tissue_tiles"]
    assert carc["tiles_run"] == grid["tissue_tiles"]
    # Mitosis ran on exactly the tiles Carcinoma marked positive, and nowhere else
    assert mit["tiles_run"] == carc["positive_tiles"] > 0
    assert mit["tiles_skipped_by_dependency"] == grid["tissue_tiles"] - carc["positive_tiles"]
    prob = np.load(small_result / "carcinoma.probability.npy")
    count = np.load(small_result / "mitosis.count.npy")
    assert np.isfinite(prob).sum() == grid["tissue_tiles"]
    assert np.array_equal(np.isfinite(count), prob >= 0.5)
    # the saving shows in the timings
    run_info = json.loads((small_result / "summary.json").read_text())["run"]
    assert run_info["timings_s"]["features"]["mitosis"]["estimated_saved_by_dependency_s"] > 0


def test_outputs_are_qupath_geojson_and_overlays(small_result: Path) -> None:
    regions = json.loads((small_result / "carcinoma.geojson").read_text())
    points = json.loads((small_result / "mitosis.geojson").read_text())
    assert regions["type"] == points["type"] == "FeatureCollection"
    region = regions["features"][0]
    assert region["geometry"]["type"] == "Polygon"
    ring = region["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) >= 5
    props = region["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"]["name"] == "Carcinoma"
    assert props["measurements"]["Area um^2"] > 0
    det = points["features"][0]
    assert det["geometry"]["type"] == "Point"
    assert det["properties"]["objectType"] == "detection"
    assert det["properties"]["classification"]["name"] == "Mitosis"
    from PIL import Image

    with Image.open(small_result / "carcinoma.probability.png") as im:
        assert im.format == "PNG" and max(im.size) == 1024
    summary = json.loads((small_result / "summary.json").read_text())
    det_sum = summary["deterministic"]
    assert det_sum["device"] == "cpu"
    assert det_sum["models"]["carcinoma_model"]["registry_id"] == "demo-carcinoma-demo"
    assert len(det_sum["models"]["mitosis_model"]["sha256"]) == 64
    assert set(det_sum["outputs"]) == {p.name for p in small_result.iterdir()} - {"summary.json"}
    assert not list(small_result.parent.glob(".tilerunner-partial-*"))


def test_deterministic_across_runs_workers_and_batch_sizes(
    tmp_path: Path, app: App, small_slide: Path, small_result: Path
) -> None:
    """Same slide, config, device -> identical files and identical summary minus `run`."""
    again = _run(
        app,
        small_slide,
        tmp_path / "again",
        RunOptions(device="cpu", batch_size=7, workers=2, threads=3),  # 3 sub-batches a call
    )
    first = json.loads((small_result / "summary.json").read_text())
    second = json.loads((again / "summary.json").read_text())
    assert first["volatile_keys"] == ["run"]
    first["deterministic"]["config"].pop(
        "sha256"
    )  # the two app folders' configs differ in path only
    second["deterministic"]["config"].pop("sha256")
    assert first["deterministic"] == second["deterministic"]
    for name in first["deterministic"]["outputs"]:
        assert (small_result / name).read_bytes() == (again / name).read_bytes(), name


def test_same_outputs_through_openslide_only(
    tmp_path: Path, app: App, small_slide: Path, small_result: Path
) -> None:
    """--reader openslide gives the same files as the default tile fast path."""
    again = _run(
        app,
        small_slide,
        tmp_path / "os",
        RunOptions(device="cpu", batch_size=16, workers=1, reader="openslide"),
    )
    first = json.loads((small_result / "summary.json").read_text())["deterministic"]
    second = json.loads((again / "summary.json").read_text())["deterministic"]
    assert "checked identical" in first["slide"]["reader"]
    assert "checked identical" not in second["slide"]["reader"]
    assert first["outputs"] == second["outputs"]


def test_no_pyramid_slide_works(tmp_path: Path, app: App, flat_slide: Path) -> None:
    result = _run(app, flat_slide, tmp_path / "out")
    summary = json.loads((result / "summary.json").read_text())["deterministic"]
    grid = summary["grids"]["0.5@224"]
    assert grid["level"] == 0 and grid["resized"] and grid["read_size"] == 448
    s = score(result, truth_of(flat_slide))
    assert s["iou"] >= max(0.5, 0.85 * s["oracle_iou"]), s
    assert s["recall"] >= 0.75 and s["precision"] >= 0.75, s


def test_no_tissue_gives_empty_results(tmp_path: Path, app: App, blank_slide: Path) -> None:
    result = _run(app, blank_slide, tmp_path / "out")
    summary = json.loads((result / "summary.json").read_text())["deterministic"]
    assert summary["grids"]["0.5@224"]["tissue_tiles"] == 0
    assert summary["features"]["Carcinoma"]["regions"] == 0
    assert summary["features"]["mitosis"]["count"] == 0
    assert json.loads((result / "carcinoma.geojson").read_text())["features"] == []
    assert np.isnan(np.load(result / "carcinoma.probability.npy")).all()


def test_finetuned_models_on_second_customers_stain(
    tmp_path: Path, app: App, models_dir: Path, stain_b_slide: Path
) -> None:
    app.write(verbose_config(models_dir, "finetuned"))
    result = _run(app, stain_b_slide, tmp_path / "ft")
    s = score(result, truth_of(stain_b_slide))
    assert s["iou"] >= max(0.6, 0.9 * s["oracle_iou"]), s
    assert s["recall"] >= 0.9 and s["precision"] >= 0.9, s


def test_real_slide_tissue_where_tissue_is(tmp_path: Path, app: App, cmu_slide: Path) -> None:
    """CMU-1-Small-Region: single level at 0.499 mpp; tissue tiles are the stained ones."""
    from tilerunner.slide import open_slide
    from tilerunner.tissue import saturation

    result = _run(app, cmu_slide, tmp_path / "out")
    summary = json.loads((result / "summary.json").read_text())["deterministic"]
    assert summary["slide"]["vendor"] == "aperio"
    assert len(summary["slide"]["levels"]) == 1
    grid = summary["grids"]["0.5@224"]
    assert grid["level"] == 0 and not grid["resized"]  # 0.499 mpp is read as is
    assert 0 < grid["tissue_tiles"] < grid["tiles_total"]
    prob = np.load(result / "carcinoma.probability.npy")
    slide = open_slide(cmu_slide)
    step = grid["step_level0_px"]
    sat_in: list[float] = []
    sat_out: list[float] = []
    for r in range(grid["rows"]):
        for c in range(grid["cols"]):
            x, y = round(c * step), round(r * step)
            tile = slide.read_region((x, y), 0, (224, 224))
            (sat_in if np.isfinite(prob[r, c]) else sat_out).append(float(saturation(tile).mean()))
    # tiles taken as tissue are clearly more stained than the ones skipped as glass; no
    # well-stained tile is skipped and no bare-glass tile is processed
    assert np.median(sat_in) > 3 * np.median(sat_out), (sat_in, sat_out)
    assert max(sat_out) < 0.12 < np.median(sat_in), (sat_in, sat_out)
    assert min(sat_in) > 0.02, sat_in
