"""A config is outside data: every path it names stays in its model folder, every number is
finite. Refused at load with one line naming the file, the key and the value (exit 2)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_runner_errors import _assert_nothing_written, _assert_one_line_error, _run
from tilerunner.config import load_config
from tilerunner.errors import ConfigError
from tilerunner.param_schema import model_file, params_problem, params_schema
from tilerunner.plugins import PREPROCESSING
from tilerunner.plugins.postprocessing import POSTPROCESSING
from tilerunner_testlib import App, verbose_config

CARCINOMA = ("analyses", 0, "models", "carcinoma_model")


def _with(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A copy of `doc` with the value at `path` replaced."""
    out = copy.deepcopy(doc)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _refused(app: App, doc: dict[str, Any]) -> str:
    app.write(doc)
    with pytest.raises(ConfigError) as info:
        load_config(app.config, app.root)
    message = str(info.value)
    assert message.startswith(f"{app.config}: ") and "\n" not in message, message
    return message


def test_a_model_file_outside_its_folder_is_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    app: App,
    models_dir: Path,
    small_slide: Path,
) -> None:
    """The reported case, through the CLI: nothing is opened, nothing written, exit 2."""
    app.write(
        _with(verbose_config(models_dir), (*CARCINOMA, "params", "file"), "../../../../etc/passwd")
    )
    code, err = _run(capsys, app, small_slide, tmp_path / "out")
    _assert_one_line_error(
        code,
        err,
        "config",
        "models.carcinoma_model.params.file '../../../../etc/passwd' leaves its folder",
        str(app.models / "carcinoma-demo"),
    )
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("value", "link"),
    [
        ("/etc/passwd", None),
        ("sub/../../mitosis-demo/model.onnx", None),
        ("..", None),
        ("model\n.onnx", None),
        ("", None),
        ("link.onnx", "../mitosis-demo/model.onnx"),  # a link out of the folder
        ("link.onnx", "/etc/passwd"),
    ],
    ids=["absolute", "dot-dot inside", "dot-dot alone", "newline", "empty", "link", "link out"],
)
def test_every_way_out_of_the_model_folder_is_refused(
    app: App, models_dir: Path, value: str, link: str | None
) -> None:
    if link is not None:
        (app.models / "carcinoma-demo" / "link.onnx").symlink_to(link)
    doc = _with(verbose_config(models_dir), (*CARCINOMA, "params", "file"), value)
    if value == "":
        assert "should be non-empty" in _refused(app, doc)  # the schema's minLength
        return
    message = _refused(app, doc)
    assert "models.carcinoma_model.params.file " in message and "leaves its folder" in message
    assert "(model 'carcinoma_model')" in message


def test_a_link_that_stays_in_the_folder_and_a_sub_folder_are_fine(
    app: App, models_dir: Path
) -> None:
    folder = app.models / "carcinoma-demo"
    (folder / "weights").mkdir()
    (folder / "model.onnx").rename(folder / "weights" / "model.onnx")
    (folder / "current.onnx").symlink_to("weights/model.onnx")
    for value in ("weights/model.onnx", "current.onnx", "./weights/model.onnx"):
        app.write(_with(verbose_config(models_dir), (*CARCINOMA, "params", "file"), value))
        spec = load_config(app.config, app.root).analyses[0].models["carcinoma_model"]
        assert spec.file == folder / value


def test_a_reference_out_of_the_app_dir_is_refused(app: App, models_dir: Path) -> None:
    outside = app.root.parent / "elsewhere"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"not a model")
    (app.models / "escape").symlink_to(outside, target_is_directory=True)
    for reference in ("../elsewhere/", "models/escape/"):
        doc = _with(verbose_config(models_dir), (*CARCINOMA, "reference"), reference)
        message = _refused(app, doc)
        assert f"models.carcinoma_model.reference {reference!r} leaves its folder" in message
        assert "(the app dir; model 'carcinoma_model')" in message


@dataclass(frozen=True)
class LookupTable:
    """A test plug-in whose param names a file of its model (declared with model_file())."""

    table: str = field(default="lut.npy", metadata=model_file())
    extra: list[str] = field(default_factory=list, metadata=model_file())


def test_every_param_that_names_a_file_is_checked(app: App, models_dir: Path) -> None:
    """Not only params.file: a plug-in field declared with model_file(), also in lists."""
    schema = params_schema(LookupTable)
    assert schema["properties"]["table"]["x-model-file"] is True
    PREPROCESSING.register(LookupTable)  # type: ignore[arg-type]
    try:
        base = verbose_config(models_dir)
        chain = (*CARCINOMA, "preprocessing")
        steps = base["analyses"][0]["models"]["carcinoma_model"]["preprocessing"]
        ok = _with(base, chain, [*steps, {"cls": "LookupTable", "params": {"extra": ["a/b.npy"]}}])
        app.write(ok)
        assert load_config(app.config, app.root).analyses[0].models["carcinoma_model"]
        for params, key in [
            ({"table": "../../../etc/passwd"}, "preprocessing[1].params.table"),
            ({"extra": ["ok.npy", "/etc/shadow"]}, "preprocessing[1].params.extra[1]"),
        ]:
            doc = _with(base, chain, [*steps, {"cls": "LookupTable", "params": params}])
            message = _refused(app, doc)
            assert f"models.carcinoma_model.{key} " in message and "leaves its folder" in message
    finally:
        PREPROCESSING._classes.pop("LookupTable")


NON_FINITE = [
    ((*CARCINOMA, "params", "mpp"), math.nan, "models.carcinoma_model.params.mpp"),
    ((*CARCINOMA, "params", "tile_size"), math.inf, "models.carcinoma_model.params.tile_size"),
    ((*CARCINOMA, "postprocessing", 0, "params", "threshold"), math.nan, "postprocessing[0]"),
    ((*CARCINOMA, "preprocessing", 0, "params", "factor"), -math.inf, "preprocessing[0]"),
    (("analyses", 0, "features", 1, "params"), {"merge_distance_um": math.inf}, "features[1]"),
    (("analyses", 0, "params"), {"tissue": {"mpp": math.nan}}, "params.tissue.mpp"),
    ((*CARCINOMA, "params", "classes"), ["a", math.nan], "params.classes[1]"),  # free-form
]


@pytest.mark.parametrize(
    ("path", "value", "where"), NON_FINITE, ids=[w for _p, _v, w in NON_FINITE]
)
def test_nan_and_infinities_are_refused_wherever_they_stand(
    app: App, models_dir: Path, path: tuple[Any, ...], value: Any, where: str
) -> None:
    """NaN compares false with every bound, so schema checks alone let it through."""
    message = _refused(app, _with(verbose_config(models_dir), path, value))
    assert where in message and "(NaN and infinities are refused)" in message, message


def test_the_contract_check_refuses_nan_too() -> None:
    """The same params check the builder runs on the contract's schemas."""
    threshold = params_schema(POSTPROCESSING.get("BinaryClassification", "x"))
    for bad, shown in ((math.nan, "NaN"), (math.inf, "Infinity")):
        assert params_problem(threshold, {"threshold": bad}) == (
            f"threshold must be a number in [0, 1], not {shown}"
        )
    assert params_problem(threshold, {"threshold": 0.5}) is None
