"""The runner's contract: the catalog of every config this runner accepts, from its plug-ins.

The contract is one JSON document: the accepted verbose-config schema versions and their
schemas, every preprocessing, postprocessing and feature plug-in with a JSON Schema of its
params (types, required/optional, defaults, ranges, enums, nested objects), the model roles
of each feature, the prediction kinds each postprocessing step takes and gives, and what
`depends_on` may name. It is computed from the registered classes (their params schemas come from
tilerunner.param_schema: dataclass fields, type hints and ``field(metadata=constraint(...))``),
never written by hand, so it cannot drift; the config loader validates params with the very
same schemas.

The base image ships it as /opt/tilerunner/contract.json with its sha256 in the label
``com.ivd.runner.contract.sha256``; the builder checks every verbose config against it before
it assembles an image, so what the builder accepts is what the runner runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from functools import cache
from typing import Any

from tilerunner import CONFIG_SCHEMA_VERSIONS
from tilerunner.config import schema
from tilerunner.param_schema import MODEL_FILE, params_schema
from tilerunner.plugins import FEATURES, POSTPROCESSING, PREPROCESSING
from tilerunner.plugins.postprocessing import Kind
from tilerunner.tissue import TissueParams

#: Version of the contract document layout.
CONTRACT_VERSION = 1
#: Where the base image installs the contract.
CONTRACT_PATH = "/opt/tilerunner/contract.json"
#: Base image label holding the sha256 (hex) of that file.
CONTRACT_LABEL = "com.ivd.runner.contract.sha256"


def _description(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # dataclasses invent "Name(field: type = ...)" docs for classes without one: not ours
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ")


def _postprocessing_kinds(cls: type) -> dict[str, str]:
    """Which prediction kind a step gives for each kind it takes (from output_kind)."""
    try:
        step = cls()
    except (TypeError, ValueError):  # required params: no default instance to ask
        return {}
    out = {}
    for kind in Kind:
        try:
            out[kind.value] = step.output_kind(kind).value
        except ValueError:
            continue
    return out


def _plugin_entry(kind: str, cls: type) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": _description(cls)}
    if kind == "feature":
        entry["params"] = params_schema(cls.Params)  # type: ignore[attr-defined]
        entry["models"] = {role: k.value for role, k in sorted(cls.roles.items())}  # type: ignore[attr-defined]
    else:
        entry["params"] = params_schema(cls)
    if kind == "postprocessing":
        entry["kinds"] = _postprocessing_kinds(cls)
    return entry


def build_contract() -> dict[str, Any]:
    """The contract of the plug-ins registered now (the CLI and the base image use this)."""
    plugins = {
        registry.kind: {name: _plugin_entry(registry.kind, cls) for name, cls in registry.items()}
        for registry in (PREPROCESSING, POSTPROCESSING, FEATURES)
    }
    return {
        "contract_version": CONTRACT_VERSION,
        "config_schema_versions": list(CONFIG_SCHEMA_VERSIONS),
        "config_schemas": {str(v): schema() for v in CONFIG_SCHEMA_VERSIONS},
        "plugins": plugins,
        "analysis_params": {
            "type": "object",
            "properties": {"tissue": params_schema(TissueParams)},
        },
        "model_files": {
            "mark": MODEL_FILE,
            "meaning": "a param (model params, or a preprocessing/postprocessing step's params) "
            "whose value is a path relative to its model's folder naming a file the runner "
            "loads: it stays inside that folder and is one of the model's files",
        },
        "prediction_kinds": {
            "model_output": {"rank 1-2": Kind.SCORES.value, "rank 3-4": Kind.MAPS.value},
            "all": [k.value for k in Kind],
        },
        "features": {
            "name": "a feature's `name`, default its `cls`; unique per analysis, case-insensitively",
            "models": "exactly the roles of its class, each naming a model of the same analysis",
            "depends_on": {
                "refers_to": "feature names of the same analysis",
                "self": False,
                "cycles": False,
                "effect": "the feature runs only on tiles its parents marked positive",
            },
        },
    }


def render(contract: Mapping[str, Any]) -> bytes:
    """Canonical bytes of the contract (sorted keys, ASCII, one trailing newline)."""
    return (json.dumps(contract, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


@cache
def contract_bytes() -> bytes:
    """The rendered contract of this runner."""
    return render(build_contract())


def contract_sha256() -> str:
    """sha256 (hex) of contract_bytes(): the base image's com.ivd.runner.contract.sha256."""
    return hashlib.sha256(contract_bytes()).hexdigest()
