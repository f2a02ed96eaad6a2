"""Expand stage: the short analysis + resolved models -> the verbose config the runner loads.

A pure function: the same spec and models give byte-identical output (see ``yamldoc.dump``).
Everything of the short form other than `models` passes through untouched.
"""

from __future__ import annotations

from typing import Any

from builder.contracts import VERBOSE_SCHEMA_VERSION, CustomerSpec, Plugin, ResolvedModel

#: Where model folders live relative to the runner's app dir (/app in the image).
MODELS_DIR = "models"
#: Scheme of a registry model's weights as an image records them: ``production:<task>/<model>/``.
PRODUCTION_SCHEME = "production:"


def located_weights_uri(model: ResolvedModel) -> str:
    """A model's weights by what they are, not by how the store was reached: a registry
    model's production folder ``production:<task id>/<model id>/`` (whatever the production
    setting's spelling: ``file:demo/production``, an absolute path, ``s3://...``); a manual
    model's ``repo:<folder>`` as it is (a path inside the config commit)."""
    if model.model_id and model.task_id:
        return f"{PRODUCTION_SCHEME}{model.task_id}/{model.model_id}/"
    return model.weights_uri


def _plugins(plugins: tuple[Plugin, ...]) -> list[dict[str, Any]]:
    return [p.to_dict() for p in plugins]


def model_provenance(model: ResolvedModel) -> dict[str, Any]:
    """What the image records about where a model came from."""
    record: dict[str, Any] = {
        "source": "registry" if model.sourcing == "auto" else "customer-repo",
        "weights_uri": model.weights_uri,
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in model.files],
    }
    if model.model_id is not None:
        record.update(
            registry_id=model.model_id, registry_name=model.registry_name, task_id=model.task_id
        )
    return record


def verbose_model(model: ResolvedModel) -> dict[str, Any]:
    """One model's entry in the verbose config: its folder, plug-ins, params and provenance."""
    return {
        "sourcing": "manual",
        "reference": f"{MODELS_DIR}/{model.name}/",
        "preprocessing": _plugins(model.preprocessing),
        "postprocessing": _plugins(model.postprocessing),
        "params": dict(model.params),
        "provenance": model_provenance(model),
    }


def expand(spec: CustomerSpec, models: tuple[ResolvedModel, ...]) -> dict[str, Any]:
    """The verbose analysis config for ``spec`` with ``models`` resolved."""
    by_name = {m.name: m for m in models}
    analyses = []
    for analysis in spec.analysis["analyses"]:
        verbose = {key: value for key, value in analysis.items() if key != "models"}
        verbose["models"] = {name: verbose_model(by_name[name]) for name in analysis["models"]}
        analyses.append(verbose)
    return {
        "schema_version": VERBOSE_SCHEMA_VERSION,
        "customer": spec.customer,
        "analyses": analyses,
    }
