"""Load the verbose analysis config strictly: schema, plug-ins, feature graph, model files.

Everything that can be checked without ONNX Runtime or the slide is checked here, so that a
bad config fails in milliseconds with the file and the key in the message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tilerunner import CONFIG_SCHEMA_VERSIONS
from tilerunner.errors import ConfigError, ModelError
from tilerunner.param_schema import MODEL_FILE, did_you_mean, marked, params_schema
from tilerunner.paths import UnsafePathError, join_within
from tilerunner.plugins import FEATURES, POSTPROCESSING, PREPROCESSING
from tilerunner.plugins.postprocessing import Postprocessor
from tilerunner.plugins.preprocessing import Preprocessor
from tilerunner.plugins.registry import build
from tilerunner.tissue import TissueParams

DEFAULT_APP_DIR = Path("/app")
DEFAULT_CONFIG = Path("config/analysis.yaml")


def default_app_dir() -> Path:
    """--app-dir default: $TILERUNNER_APP_DIR, else /app."""
    return Path(os.environ.get("TILERUNNER_APP_DIR") or DEFAULT_APP_DIR)


@dataclass(frozen=True)
class ModelSpec:
    """A model of an analysis with its plug-ins built and its file located."""

    name: str
    analysis: str
    reference: str
    folder: Path
    file: Path
    tile_size: int
    mpp: float
    input_layout: str | None
    output: str | None
    params: Mapping[str, Any]
    preprocessing: tuple[Preprocessor, ...]
    preprocessing_spec: tuple[Mapping[str, Any], ...]
    postprocessing: tuple[Postprocessor, ...]
    provenance: Mapping[str, Any]

    @property
    def expected_sha256(self) -> str | None:
        """sha256 of the model file recorded in the provenance, if any."""
        for entry in self.provenance.get("files", ()) or ():
            if entry.get("name") == self.params["file"] and entry.get("sha256"):
                return str(entry["sha256"])
        return None


@dataclass(frozen=True)
class FeatureSpec:
    """A feature of an analysis: its class, models by role, parents and params."""

    name: str
    cls: str
    models: Mapping[str, str]  # role -> model name
    depends_on: tuple[str, ...]
    params: Mapping[str, Any]


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis of the config: its models, features (parents first) and tissue settings."""

    name: str
    description: str
    models: Mapping[str, ModelSpec]
    features: tuple[FeatureSpec, ...]  # topologically sorted (parents first)
    tissue: TissueParams
    params: Mapping[str, Any]


@dataclass(frozen=True)
class RunConfig:
    """A loaded, validated verbose config (the sha256 of its bytes identifies it)."""

    path: Path
    sha256: str
    schema_version: int
    customer: str
    app_dir: Path
    analyses: tuple[AnalysisSpec, ...]


@cache
def schema() -> dict[str, Any]:
    """The verbose-config JSON Schema shipped with the runner."""
    text = (
        resources.files("tilerunner") / "schemas" / "analysis-verbose-v1.schema.json"
    ).read_text(encoding="utf-8")
    return dict(json.loads(text))


def _where(path: Any) -> str:
    parts = ""
    for p in path:
        parts += f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p))
    return parts or "(top level)"


def _validate_schema(doc: Any, file: Path) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise ConfigError(f"{file}: at {_where(error.absolute_path)}: {error.message}")


def _topo_sort(features: list[FeatureSpec], file: Path, analysis: str) -> tuple[FeatureSpec, ...]:
    by_name = {f.name: f for f in features}
    order: list[FeatureSpec] = []
    state: dict[str, int] = {}

    def visit(f: FeatureSpec, chain: list[str]) -> None:
        if state.get(f.name) == 2:
            return
        if state.get(f.name) == 1:
            cycle = " -> ".join([*chain[chain.index(f.name) :], f.name])
            raise ConfigError(
                f"{file}: analysis {analysis!r}: features depend on each other in a cycle: {cycle}"
            )
        state[f.name] = 1
        for parent in f.depends_on:
            visit(by_name[parent], [*chain, f.name])
        state[f.name] = 2
        order.append(f)

    for f in features:
        visit(f, [])
    return tuple(order)


def _model_folder(name: str, raw: Mapping[str, Any], where: str, app_dir: Path) -> Path:
    """The model's folder: an absolute `reference` as it is, a relative one inside the app dir."""
    reference = str(raw["reference"])
    if Path(reference).is_absolute():
        return Path(reference)
    try:
        return join_within(app_dir, reference, what=f"{where}.reference")
    except UnsafePathError as exc:
        raise ConfigError(f"{exc} (the app dir; model {name!r})") from None


def _model_files(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key, value) of every param that names a model file: marked MODEL_FILE in the config
    schema's model params or in a plug-in's params schema (tilerunner.param_schema)."""
    model_params = schema()["$defs"]["model_params"]
    for path, value in marked(model_params, raw["params"], MODEL_FILE, ("params",)):
        yield _where(path), value
    for kind, registry in (("preprocessing", PREPROCESSING), ("postprocessing", POSTPROCESSING)):
        for index, step in enumerate(raw.get(kind, ())):
            cls: Any = registry.get(step["cls"], f"{kind}[{index}]")
            found = marked(params_schema(cls), step.get("params") or {}, MODEL_FILE)
            for path, value in found:
                yield _where((kind, index, "params", *path)), value


def _model_file(
    name: str, raw: Mapping[str, Any], analysis: str, where: str, folder: Path, app_dir: Path
) -> Path:
    """The model file, once every file a param names is checked to stay in the model folder
    (symlinks resolved): ConfigError for one that leaves it, ModelError if the file is missing."""
    for key, value in _model_files(raw):
        try:
            join_within(folder, str(value), what=f"{where}.{key}")
        except UnsafePathError as exc:
            raise ConfigError(f"{exc} (model {name!r})") from None
    params = raw["params"]
    file = folder / str(params["file"])
    if not file.is_file():
        raise ModelError(
            f"model {name!r} (analysis {analysis!r}): file {file} not found "
            f"(reference {raw['reference']!r}, params.file {params['file']!r}, app dir {app_dir})"
        )
    return file


def _model(
    name: str, raw: Mapping[str, Any], analysis: str, where: str, app_dir: Path
) -> ModelSpec:
    params = dict(raw["params"])
    pre = tuple(
        PREPROCESSING.create(p["cls"], p.get("params"), f"{where}.preprocessing[{i}]")
        for i, p in enumerate(raw.get("preprocessing", ()))
    )
    post = tuple(
        POSTPROCESSING.create(p["cls"], p.get("params"), f"{where}.postprocessing[{i}]")
        for i, p in enumerate(raw.get("postprocessing", ()))
    )
    folder = _model_folder(name, raw, where, app_dir)
    file = _model_file(name, raw, analysis, where, folder, app_dir)
    return ModelSpec(
        name=name,
        analysis=analysis,
        reference=str(raw["reference"]),
        folder=folder,
        file=file,
        tile_size=int(params["tile_size"]),
        mpp=float(params["mpp"]),
        input_layout=params.get("input_layout"),
        output=params.get("output"),
        params=params,
        preprocessing=pre,
        preprocessing_spec=tuple(dict(p) for p in raw.get("preprocessing", ())),
        postprocessing=post,
        provenance=dict(raw.get("provenance") or {}),
    )


def _check_version(doc: Any, file: Path) -> None:
    if isinstance(doc, dict) and doc.get("schema_version", 1) not in CONFIG_SCHEMA_VERSIONS:
        accepted = ", ".join(map(str, CONFIG_SCHEMA_VERSIONS))
        raise ConfigError(
            f"{file}: schema_version {doc['schema_version']!r} is not supported by this runner "
            f"(accepts {accepted}); use a base image whose com.ivd.runner.config-schemas has it"
        )


def _non_finite(value: Any, path: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], float] | None:
    """The first NaN or infinity in a parsed document (YAML's .nan, .inf) and its path."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found = _non_finite(item, (*path, key))
        if found is not None:
            return found
    return None


def _refuse_non_finite(doc: Any, file: Path) -> None:
    """NaN compares false with every bound a schema sets, so it would pass them all."""
    found = _non_finite(doc)
    if found is not None:
        path, value = found
        raise ConfigError(
            f"{file}: at {_where(path)}: {value} is not a number the runner accepts "
            "(NaN and infinities are refused); write a finite number"
        )


def _feature(
    f_where: str, raw_f: Mapping[str, Any], models: Mapping[str, ModelSpec], names: set[str]
) -> FeatureSpec:
    """One feature: its class, a name unique in the analysis, its model roles and params."""
    cls = FEATURES.get(raw_f["cls"], f_where)
    f_name = raw_f.get("name", raw_f["cls"])
    if f_name.lower() in {n.lower() for n in names}:  # names become file names
        raise ConfigError(
            f"{f_where}: feature name {f_name!r} is used twice "
            "(case-insensitively); give one of them a `name`"
        )
    names.add(f_name)
    roles = dict(raw_f["models"])
    missing = sorted(set(cls.roles) - set(roles))
    extra = sorted(set(roles) - set(cls.roles))
    if missing or extra:
        raise ConfigError(
            f"{f_where}: {raw_f['cls']} takes models {sorted(cls.roles)}; "
            + (f"missing {missing}" if missing else f"unknown {extra}")
        )
    for role, m_name in roles.items():
        if m_name not in models:
            raise ConfigError(
                f"{f_where}.models.{role}: no model {m_name!r} in this analysis "
                f"(models: {', '.join(sorted(models))})"
            )
    build(cls.Params, raw_f.get("params") or {}, f"{f_where}.params ({raw_f['cls']})")
    return FeatureSpec(
        name=f_name,
        cls=raw_f["cls"],
        models=roles,
        depends_on=tuple(raw_f.get("depends_on", ())),
        params=raw_f.get("params") or {},
    )


def _check_parents(features: list[FeatureSpec], names: set[str], a_where: str, a_name: str) -> None:
    for f_index, f in enumerate(features):
        for parent in f.depends_on:
            if parent not in names:
                raise ConfigError(
                    f"{a_where}.features[{f_index}].depends_on: no feature {parent!r} in "
                    f"analysis {a_name!r} ({did_you_mean(parent, sorted(names))}features: "
                    f"{', '.join(sorted(names))})"
                )
            if parent == f.name:
                raise ConfigError(f"{a_where}.features[{f_index}]: {f.name!r} depends on itself")


def _analysis(raw_a: Mapping[str, Any], a_where: str, file: Path, app_dir: Path) -> AnalysisSpec:
    a_name = raw_a["name"]
    models = {
        m_name: _model(m_name, raw_m, a_name, f"{a_where}.models.{m_name}", app_dir)
        for m_name, raw_m in sorted(raw_a["models"].items())
    }
    names: set[str] = set()
    features = [
        _feature(f"{a_where}.features[{f_index}]", raw_f, models, names)
        for f_index, raw_f in enumerate(raw_a["features"])
    ]
    _check_parents(features, names, a_where, a_name)
    a_params = dict(raw_a.get("params") or {})
    tissue = build(TissueParams, a_params.get("tissue") or {}, f"{a_where}.params.tissue")
    return AnalysisSpec(
        name=a_name,
        description=raw_a.get("description", ""),
        models=models,
        features=_topo_sort(features, file, a_name),
        tissue=tissue,
        params=a_params,
    )


def parse_config(doc: Any, file: Path, app_dir: Path) -> RunConfig:
    """Validate a parsed config document and build the run configuration."""
    _check_version(doc, file)
    _refuse_non_finite(doc, file)
    _validate_schema(doc, file)
    analyses: list[AnalysisSpec] = []
    seen_analyses: set[str] = set()
    for a_index, raw_a in enumerate(doc["analyses"]):
        a_where = f"{file}: analyses[{a_index}]"
        if raw_a["name"] in seen_analyses:
            raise ConfigError(f"{a_where}: analysis name {raw_a['name']!r} is used twice")
        seen_analyses.add(raw_a["name"])
        analyses.append(_analysis(raw_a, a_where, file, app_dir))
    return RunConfig(
        path=file,
        sha256="",
        schema_version=int(doc["schema_version"]),
        customer=str(doc["customer"]),
        app_dir=app_dir,
        analyses=tuple(analyses),
    )


def load_config(path: Path | None = None, app_dir: Path | None = None) -> RunConfig:
    """Read and validate the verbose config (default <app dir>/config/analysis.yaml)."""
    import yaml

    app_dir = app_dir or default_app_dir()
    file = path or app_dir / DEFAULT_CONFIG
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {file} not found (pass --config)") from None
    except OSError as exc:
        raise ConfigError(f"config file {file} cannot be read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{file}:{line}: {problem}") from None
    config = parse_config(doc, file, app_dir)
    return RunConfig(
        path=config.path,
        sha256=hashlib.sha256(data).hexdigest(),
        schema_version=config.schema_version,
        customer=config.customer,
        app_dir=config.app_dir,
        analyses=config.analyses,
    )
