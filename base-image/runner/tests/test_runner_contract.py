"""The runner's contract: derived from the plug-in classes, and the loader validates with it."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import pytest
from tilerunner.cli import main
from tilerunner.contract import build_contract, contract_bytes
from tilerunner.errors import ConfigError
from tilerunner.param_schema import MODEL_FILE, constraint, model_file, params_schema
from tilerunner.plugins import FEATURES, POSTPROCESSING, PREPROCESSING
from tilerunner.plugins.postprocessing import Kind, Prediction
from tilerunner.plugins.registry import build


def test_every_plugin_is_in_the_contract_with_a_valid_params_schema() -> None:
    contract = build_contract()
    for registry in (PREPROCESSING, POSTPROCESSING, FEATURES):
        listed = contract["plugins"][registry.kind]
        assert sorted(listed) == registry.names()
        for name, cls in registry.items():
            schema = listed[name]["params"]
            jsonschema.Draft202012Validator.check_schema(schema)
            assert schema["additionalProperties"] is False
            # the class's own defaults are accepted by its schema, and build() takes them
            defaults = {k: p["default"] for k, p in schema["properties"].items() if "default" in p}
            jsonschema.validate(defaults, schema)
            build(getattr(cls, "Params", cls), defaults, name)
    features = contract["plugins"]["feature"]
    assert features["Mitosis"]["models"] == {"segmentation_model": "objects"}
    assert contract["plugins"]["postprocessing"]["BinaryClassification"]["kinds"] == {
        "scores": "labels"
    }
    assert contract["config_schema_versions"] == [1]
    assert contract["features"]["depends_on"]["cycles"] is False


def test_contract_is_deterministic_and_the_cli_prints_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    assert contract_bytes() == contract_bytes()
    assert main(["contract"]) == 0
    printed = capsys.readouterr().out.encode()
    assert printed == contract_bytes()
    assert main(["contract", "--sha256"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(printed).hexdigest()
    out = tmp_path / "contract.json"
    assert main(["contract", "--output", str(out)]) == 0
    assert json.loads(out.read_bytes()) == build_contract()


class Mode(enum.StrEnum):
    FAST = "fast"
    EXACT = "exact"


@dataclass(frozen=True)
class Inner:
    radius_um: float = field(default=1.0, metadata=constraint(exclusiveMinimum=0))


def test_every_param_type_becomes_a_schema_the_loader_enforces() -> None:
    """A new plug-in with each kind of param: the contract describes it and build() refuses
    exactly what the schema refuses."""

    @dataclass(frozen=True)
    class Everything:
        count: int = field(default=1, metadata=constraint(minimum=1, maximum=10))
        ratio: float | None = None
        name: str = "x"
        flag: bool = False
        mode: Mode = Mode.FAST
        layout: Literal["NCHW", "NHWC"] = "NCHW"
        sizes: list[int] = field(default_factory=lambda: [1, 2])
        weights: dict[str, float] = field(default_factory=dict)
        inner: Inner = field(default_factory=Inner)
        required: str = field(default="", metadata=constraint(minLength=1))

    schema = params_schema(Everything)
    props = schema["properties"]
    assert props["count"]["x-expects"] == "an integer in [1, 10]"
    assert props["ratio"]["type"] == ["number", "null"]
    assert props["flag"]["type"] == "boolean"
    assert props["mode"]["enum"] == ["fast", "exact"]
    assert props["layout"]["enum"] == ["NCHW", "NHWC"]
    assert props["sizes"] == {**props["sizes"], "type": "array", "items": {"type": "integer"}}
    assert props["weights"]["additionalProperties"] == {"type": "number"}
    assert props["inner"]["properties"]["radius_um"]["exclusiveMinimum"] == 0
    cases: list[tuple[dict[str, Any], str]] = [
        ({"count": 0}, "count must be an integer in [1, 10], not 0"),
        ({"count": "3"}, 'count must be an integer in [1, 10], not "3"'),
        ({"ratio": "half"}, "ratio must be a number or null"),
        ({"flag": "yes"}, "flag must be true or false"),
        ({"mode": "quick"}, 'mode must be one of "fast", "exact"'),
        ({"layout": "NCWH"}, "layout must be one of"),
        ({"sizes": [1, "2"]}, "sizes must be a list of integers"),
        ({"weights": {"a": "b"}}, "weights must be"),
        ({"inner": {"radius_um": 0}}, "inner.radius_um must be a number > 0, not 0"),
        ({"inner": {"radius": 1}}, "unknown params 'inner.radius'"),
        ({"cuont": 2}, "unknown params 'cuont' (did you mean 'count'?"),
    ]
    built = build(Everything, {"inner": {"radius_um": 2.5}, "mode": "exact"}, "here")
    assert built.inner == Inner(2.5)
    for params, needle in cases:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(params, schema)
        with pytest.raises(ConfigError) as raised:
            build(Everything, params, "here")
        assert needle in str(raised.value), (params, str(raised.value))


def test_a_registered_plugin_enters_the_contract() -> None:
    @dataclass(frozen=True)
    class Threshold2:
        """Two thresholds."""

        low: float = field(default=0.2, metadata=constraint(minimum=0, maximum=1))

        def output_kind(self, kind: Kind) -> Kind:
            if kind is not Kind.SCORES:
                raise ValueError("scores only")
            return Kind.LABELS

        def apply(self, pred: Prediction) -> Prediction:
            return pred

    POSTPROCESSING.register(Threshold2)
    try:
        entry = build_contract()["plugins"]["postprocessing"]["Threshold2"]
        assert entry["description"] == "Two thresholds."
        assert entry["kinds"] == {"scores": "labels"}
        assert entry["params"]["properties"]["low"]["x-expects"] == "a number in [0, 1]"
        with pytest.raises(ConfigError, match=r"low must be a number in \[0, 1\], not 2"):
            POSTPROCESSING.create("Threshold2", {"low": 2}, "here")
    finally:
        POSTPROCESSING._classes.pop("Threshold2")


def test_unknown_class_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'MaskToObjects'"):
        POSTPROCESSING.create("MaskToObject", {}, "here")


def test_params_naming_model_files_are_marked_for_the_builder() -> None:
    """The contract says which params name a file of their model (MODEL_FILE), so the builder
    can check each against the model's pinned files: the config schema's params.file, and
    any plug-in field declared with model_file()."""
    contract = build_contract()
    assert contract["model_files"]["mark"] == MODEL_FILE
    model_params = contract["config_schemas"]["1"]["$defs"]["model_params"]["properties"]
    assert [k for k, p in model_params.items() if p.get(MODEL_FILE)] == ["file"]

    @dataclass(frozen=True)
    class WithTable:
        table: str = field(default="lut.bin", metadata=model_file())
        factor: float = 1.0

    schema = params_schema(WithTable)
    assert schema["properties"]["table"][MODEL_FILE] is True
    assert MODEL_FILE not in schema["properties"]["factor"]
