"""Each bad input: one clear line on stderr, its exit code, and no outputs that look complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tilerunner.cli import main
from tilerunner_testlib import App, verbose_config

EXIT = {"config": 2, "model": 3, "slide": 4, "output": 5, "device": 6}


def _run(
    capsys: pytest.CaptureFixture[str], app: App, slide: Path, out: Path, *extra: str
) -> tuple[int, str]:
    code = main(
        [
            "-q",
            "run",
            str(slide),
            "--config",
            str(app.config),
            "--app-dir",
            str(app.root),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "16",
            "--workers",
            "1",
            "--no-progress",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, kind: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT[kind], err
    assert len(lines) == 1, err
    assert lines[0].startswith("tilerunner: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def _assert_nothing_written(out: Path) -> None:
    if out.exists():
        leftovers = sorted(p.name for p in out.iterdir())
        assert leftovers == [], leftovers


def test_truncated_slide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, small_slide: Path
) -> None:
    bad = tmp_path / "truncated.tiff"
    data = small_slide.read_bytes()
    bad.write_bytes(data[: len(data) * 6 // 10])
    code, err = _run(capsys, app, bad, tmp_path / "out")
    _assert_one_line_error(code, err, "slide", "truncated", str(bad))
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_slides_from_openslide_fixtures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, openslide_fixtures: Path
) -> None:
    for name in ("unopenable.tiff", "unreadable.svs"):
        out = tmp_path / name
        code, err = _run(capsys, app, openslide_fixtures / name, out)
        _assert_one_line_error(code, err, "slide", name)
        _assert_nothing_written(out)


def test_corrupt_tile_data_fails_cleanly_mid_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, small_slide: Path
) -> None:
    """Garbage in the middle of level 1's tiles: the error surfaces during tile reading."""
    import tifffile

    bad = tmp_path / "corrupt.tiff"
    shutil.copy(small_slide, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[1]
        mid = len(page.dataoffsets) // 2
        spans = [
            (int(o), int(c))
            for o, c in zip(
                page.dataoffsets[mid - 40 : mid + 40],
                page.databytecounts[mid - 40 : mid + 40],
                strict=True,
            )
        ]
    with bad.open("r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(b"\xff\xd8\x00garbage" + b"\x00" * (count - 10))
    out = tmp_path / "out"
    code, err = _run(capsys, app, bad, out)
    _assert_one_line_error(code, err, "slide", "corrupt")
    _assert_nothing_written(out)


def test_not_a_slide(tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App) -> None:
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    code, err = _run(capsys, app, text, tmp_path / "out")
    _assert_one_line_error(code, err, "slide", "not a whole-slide image")
    code, err = _run(capsys, app, tmp_path / "missing.svs", tmp_path / "out")
    _assert_one_line_error(code, err, "slide", "not found")
    _assert_nothing_written(tmp_path / "out")


def test_slide_without_resolution_needs_mpp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App
) -> None:
    import numpy as np
    import tifffile

    plain = tmp_path / "plain.tiff"
    image = np.full((1024, 1024, 3), 240, np.uint8)
    tifffile.imwrite(plain, image, tile=(256, 256), photometric="rgb", compression="zlib")
    code, err = _run(capsys, app, plain, tmp_path / "out")
    _assert_one_line_error(code, err, "slide", "--mpp")
    code, err = _run(capsys, app, plain, tmp_path / "out", "--mpp", "0.5")
    assert code == 0, err
    assert (tmp_path / "out" / "breast" / "summary.json").is_file()


def test_unknown_plugin_class(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    app: App,
    models_dir: Path,
    small_slide: Path,
) -> None:
    doc = verbose_config(models_dir)
    doc["analyses"][0]["models"]["carcinoma_model"]["postprocessing"] = [
        {"cls": "BinaryClasification", "params": {"threshold": 0.5}}
    ]
    app.write(doc)
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(
        code, err, "config", "BinaryClasification", "BinaryClassification", "postprocessing[0]"
    )
    doc = verbose_config(models_dir)
    doc["analyses"][0]["features"][0]["cls"] = "Carcinomma"
    app.write(doc)
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(code, err, "config", "Carcinomma", "Mitosis")
    _assert_nothing_written(tmp_path / "out")


def test_config_errors_name_file_and_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    app: App,
    models_dir: Path,
    small_slide: Path,
) -> None:
    cases = []
    doc = verbose_config(models_dir)
    doc["analyses"][0]["models"]["carcinoma_model"]["params"]["tilesize"] = 224
    del doc["analyses"][0]["models"]["carcinoma_model"]["params"]["tile_size"]
    cases.append((doc, "tile_size"))
    doc = verbose_config(models_dir)
    doc["analyses"][0]["features"][0]["depends_on"] = ["mitosis"]
    cases.append((doc, "cycle"))
    doc = verbose_config(models_dir)
    doc["schema_version"] = 2
    cases.append((doc, "schema_version 2"))
    doc = verbose_config(models_dir)
    doc["analyses"][0]["models"]["carcinoma_model"]["preprocessing"][0]["params"] = {"factr": 1}
    cases.append((doc, "factr"))
    doc = verbose_config(models_dir)
    doc["analyses"][0]["models"]["mitosis_model"]["postprocessing"] = [
        {"cls": "BinaryClassification"}
    ]
    cases.append((doc, "BinaryClassification takes scores but gets maps"))
    for doc, needle in cases:
        app.write(doc)
        code, err = _run(capsys, app, small_slide, tmp_path / "out")
        _assert_one_line_error(code, err, "config", needle)
    app.config.write_text("schema_version: 1\nanalyses: [\n")
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(code, err, "config", str(app.config), "line")
    _assert_nothing_written(tmp_path / "out")


def test_missing_and_corrupt_model_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, small_slide: Path
) -> None:
    model = app.models / "mitosis-demo" / "model.onnx"
    data = model.read_bytes()
    model.unlink()
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(code, err, "model", "not found", "mitosis_model", str(model))
    model.write_bytes(data[: len(data) // 2])  # truncated copy: also fails its sha256
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(code, err, "model", "sha256", "mitosis_model")
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_model_without_provenance(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    app: App,
    models_dir: Path,
    small_slide: Path,
) -> None:
    doc = verbose_config(models_dir)
    for m in doc["analyses"][0]["models"].values():
        m.pop("provenance")
    app.write(doc)
    model = app.models / "carcinoma-demo" / "model.onnx"
    model.write_bytes(os.urandom(2000))
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(code, err, "model", "not a valid ONNX model", "carcinoma_model")
    _assert_nothing_written(tmp_path / "out")


def test_model_tile_size_mismatch(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    app: App,
    models_dir: Path,
    small_slide: Path,
) -> None:
    doc = verbose_config(models_dir)
    doc["analyses"][0]["models"]["carcinoma_model"]["params"]["tile_size"] = 256
    app.write(doc)
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(code, err, "model", "tile_size is 256", "224", "carcinoma_model")
    _assert_nothing_written(tmp_path / "out")


def test_output_folder_not_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, small_slide: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        code, err = _run(capsys, app, small_slide, out)
        _assert_one_line_error(code, err, "output", "not writable", str(out))
    if os.geteuid() != 0:  # permission bits do not stop root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, err = _run(capsys, app, small_slide, ro)
        _assert_one_line_error(code, err, "output", "not writable")


def test_cuda_requested_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, small_slide: Path
) -> None:
    code = main(
        [
            "-q",
            "run",
            str(small_slide),
            "--config",
            str(app.config),
            "--app-dir",
            str(app.root),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cuda",
        ]
    )
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "device", "--device cuda", "--device cpu")
    _assert_nothing_written(tmp_path / "out")


def test_progress_bar_reports_tiles_and_rate() -> None:
    import io

    from tilerunner.cli import ProgressBar
    from tilerunner.pipeline import Progress

    stream = io.StringIO()
    bar = ProgressBar(stream)
    for done in (32, 64, 100):
        bar(Progress("breast", "tiles", done, 100, done / 50))
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "breast: 100/100 tiles (100%), 50.0 tiles/s"
    assert len(lines) == 3


def test_errors_come_before_slide_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, models_dir: Path
) -> None:
    """A bad config with a missing slide reports the config, then the output, then models."""
    doc = verbose_config(models_dir)
    doc["analyses"][0]["features"][0]["cls"] = "Nope"
    app.write(doc)
    code, err = _run(capsys, app, tmp_path / "missing.svs", tmp_path / "out")
    _assert_one_line_error(code, err, "config", "Nope")
    app.write(verbose_config(models_dir))
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _run(capsys, app, tmp_path / "missing.svs", blocker)
    _assert_one_line_error(code, err, "output")


def test_previous_results_survive_a_failed_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, blank_slide: Path
) -> None:
    out = tmp_path / "out"
    code, err = _run(capsys, app, blank_slide, out)
    assert code == 0, err
    before = (out / "breast" / "summary.json").read_bytes()
    bad = tmp_path / "bad.svs"
    bad.write_text("nope")
    code, err = _run(capsys, app, bad, out)
    assert code == EXIT["slide"]
    assert sorted(p.name for p in out.iterdir()) == ["breast"]
    assert (out / "breast" / "summary.json").read_bytes() == before


def test_console_script_exit_code_and_single_line(tmp_path: Path, app: App) -> None:
    exe = Path(sys.executable).with_name("tilerunner")
    cmd = [
        str(exe) if exe.exists() else sys.executable,
        *([] if exe.exists() else ["-m", "tilerunner"]),
    ]
    proc = subprocess.run(
        [
            *cmd,
            "run",
            str(tmp_path / "nope.svs"),
            "--config",
            str(app.config),
            "--app-dir",
            str(app.root),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EXIT["slide"], proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"tilerunner: error: slide {tmp_path / 'nope.svs'} not found"], proc.stderr
    info = subprocess.run([*cmd, "info"], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(info.stdout)["config_schemas"] == [1]
