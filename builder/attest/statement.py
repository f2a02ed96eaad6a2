"""What attestations say about one build: in-toto SLSA v1 provenance and a CycloneDX ML-BOM.

Every build can say, in standard formats a verifier outside this project reads, what it made
(the image manifest digest) from what (config commit, base image digest, every weight file's
sha256 with its ClearML model and task id) and how (tool version, CI job).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from builder import __version__
from builder.documents import ModelRecord
from builder.image.assemble import GZIP_LEVEL, LAYER_FORMAT
from builder.imagename import ImageName
from builder.oci import Descriptor

STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE: Final = "https://slsa.dev/provenance/v1"
#: What our externalParameters/internalParameters mean (documented in the README).
BUILD_TYPE: Final = "urn:ivd-image-builder:build-type:customer-image:v1"
#: Builder id for builds outside CI (a developer machine: the weakest trust boundary).
LOCAL_BUILDER_ID: Final = "urn:ivd-image-builder:builder:local"
MEDIA_INTOTO: Final = "application/vnd.in-toto+json"
MEDIA_CYCLONEDX: Final = "application/vnd.cyclonedx+json"
PROVENANCE_FILE: Final = "provenance.intoto.json"
ENVELOPE_FILE: Final = "provenance.dsse.json"
SBOM_FILE: Final = "sbom.cdx.json"


def rfc3339(moment: datetime) -> str:
    """``moment`` as an RFC 3339 UTC time (``2026-05-28T20:26:40Z``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ci_details(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Builder id and CI job URL from the environment (GitLab's variables, else generic ones).

    ``IVD_BUILDER_ID`` overrides the id: set it per runner pool, one id per trust boundary.
    """
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    if env.get("GITLAB_CI") and env.get("CI_SERVER_URL") and env.get("CI_PROJECT_PATH"):
        runner = env.get("CI_RUNNER_ID", "unknown")
        out["builder_id"] = f"{env['CI_SERVER_URL']}/{env['CI_PROJECT_PATH']}/-/runners/{runner}"
    elif env.get("CI"):
        out["builder_id"] = "urn:ivd-image-builder:builder:ci"
    if env.get("IVD_BUILDER_ID"):
        out["builder_id"] = env["IVD_BUILDER_ID"]
    if env.get("CI_JOB_URL"):
        out["job_url"] = env["CI_JOB_URL"]
    for key, name in (("CI_PIPELINE_URL", "pipeline_url"), ("CI_MERGE_REQUEST_IID", "mr")):
        if env.get(key):
            out[name] = env[key]
    return out


@dataclass(frozen=True)
class BuildFacts:
    """What the attestations say about one build, gathered from the pipeline's data."""

    image: ImageName  # the immutable name
    manifest: Descriptor  # the image manifest: the subject
    config_digest: str
    customer: str
    repository: str  # canonical source URL without the #folder fragment
    config_path: str  # folder inside the repository ("." for the root)
    analysis_path: str
    ref: str
    commit: str
    source_date_epoch: int
    base: Mapping[str, str]  # repository, version, digest
    base_constraint: str
    models: Sequence[ModelRecord]  # BuildReport.models (the weights URIs the build reached)
    verbose_sha256: str
    development: bool
    locked: bool
    lock_sha256: str | None
    started: datetime
    finished: datetime
    base_override: str | None = None
    allow_unpublished: bool = False
    ci: Mapping[str, str] = field(default_factory=dict)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _model_file_ref(model: str, file: str) -> str:
    """The name shared by a weight file's provenance dependency and its SBOM bom-ref."""
    return f"model:{model}/{file}"


def _file_uri(model: ModelRecord, name: str) -> str:
    return f"{str(model.weights_uri).rstrip('/')}/{name}"


def _base_uri(base: Mapping[str, str]) -> str:
    repo = base["repository"]
    return repo if repo.startswith("oci:") else f"oci://{repo}:{base['version']}"


# -- SLSA provenance -----------------------------------------------------------------------


def _input_dependencies(facts: BuildFacts) -> list[dict[str, Any]]:
    """The config commit, the lock (when the build was locked) and the base image."""
    folder = "" if facts.config_path == "." else f"#{facts.config_path}"
    dependencies: list[dict[str, Any]] = [
        {
            "name": "config",
            "uri": f"git+{facts.repository}@{facts.commit}{folder}",
            "digest": {"gitCommit": facts.commit},
        }
    ]
    if facts.lock_sha256:
        dependencies.append({"name": "customer.lock.yaml", "digest": {"sha256": facts.lock_sha256}})
    if facts.base.get("digest"):
        dependencies.append(
            {
                "name": "base-image",
                "uri": _base_uri(facts.base),
                "digest": {"sha256": _hex(facts.base["digest"])},
                "annotations": {
                    "version": facts.base["version"],
                    "constraint": facts.base_constraint,
                },
            }
        )
    return dependencies


def _model_dependencies(model: ModelRecord) -> list[dict[str, Any]]:
    """One dependency per weight file of ``model``, annotated with the model's ids."""
    annotations: dict[str, Any] = {
        "model": model.name,
        "sourcing": model.sourcing,
        "dirHash": model.dir_hash,
    }
    for value, name in (
        (model.registry_id, "clearmlModelId"),
        (model.task_id, "clearmlTaskId"),
        (model.registry_name, "registryName"),
    ):
        if value:
            annotations[name] = value
    return [
        {
            "name": _model_file_ref(model.name, file.name),
            "uri": _file_uri(model, file.name),
            "digest": {"sha256": file.sha256},
            "annotations": {**annotations, "size": file.size},
        }
        for file in model.files
    ]


def _external_parameters(facts: BuildFacts) -> dict[str, Any]:
    """What the build was asked to do: repository, folder, ref, customer, options."""
    external: dict[str, Any] = {
        "repository": facts.repository,
        "configPath": facts.config_path,
        "ref": facts.ref,
        "customer": facts.customer,
        "locked": facts.locked,
    }
    if facts.base_override:
        external["baseVersion"] = facts.base_override
    if facts.allow_unpublished:
        external["allowUnpublished"] = True
    return external


def _internal_parameters(facts: BuildFacts) -> dict[str, Any]:
    """How the builder made it: tool version, commit time, layer format, CI pipeline."""
    internal: dict[str, Any] = {
        "toolVersion": __version__,
        "sourceDateEpoch": facts.source_date_epoch,
        "analysisPath": facts.analysis_path,
        "layerFormat": LAYER_FORMAT,
        "gzipLevel": GZIP_LEVEL,
        "developmentBuild": facts.development,
    }
    for key, name in (("pipeline_url", "ciPipelineUrl"), ("mr", "ciMergeRequest")):
        if facts.ci.get(key):
            internal[name] = facts.ci[key]
    return internal


def _byproducts(facts: BuildFacts, sbom_sha256: str | None) -> list[dict[str, Any]]:
    """The verbose config, the image config and the SBOM (when made)."""
    byproducts: list[dict[str, Any]] = [
        {
            "name": "/app/config/analysis.yaml",
            "digest": {"sha256": facts.verbose_sha256},
            "mediaType": "application/yaml",
        },
        {
            "name": "image-config",
            "digest": {"sha256": _hex(facts.config_digest)},
            "mediaType": "application/vnd.oci.image.config.v1+json",
        },
    ]
    if sbom_sha256:
        byproducts.append(
            {"name": SBOM_FILE, "digest": {"sha256": sbom_sha256}, "mediaType": MEDIA_CYCLONEDX}
        )
    return byproducts


def _run_details(facts: BuildFacts, sbom_sha256: str | None) -> dict[str, Any]:
    """Who built it, when, in which CI job, and what else it made."""
    metadata: dict[str, Any] = {
        "startedOn": rfc3339(facts.started),
        "finishedOn": rfc3339(facts.finished),
    }
    if facts.ci.get("job_url"):
        metadata["invocationId"] = facts.ci["job_url"]
    return {
        "builder": {
            "id": facts.ci.get("builder_id", LOCAL_BUILDER_ID),
            "version": {"ivd-image-builder": __version__},
        },
        "metadata": metadata,
        "byproducts": _byproducts(facts, sbom_sha256),
    }


def provenance_statement(facts: BuildFacts, *, sbom_sha256: str | None = None) -> dict[str, Any]:
    """An in-toto Statement v1 with a SLSA provenance v1 predicate for the image."""
    dependencies = _input_dependencies(facts)
    for model in facts.models:
        dependencies.extend(_model_dependencies(model))
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": str(facts.image), "digest": {"sha256": _hex(facts.manifest.digest)}}],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": _external_parameters(facts),
                "internalParameters": _internal_parameters(facts),
                "resolvedDependencies": dependencies,
            },
            "runDetails": _run_details(facts, sbom_sha256),
        },
    }


# -- CycloneDX SBOM ------------------------------------------------------------------------


def _props(pairs: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in pairs.items() if v not in (None, "")]


def _purl(repository: str, digest: str) -> str | None:
    """``pkg:oci/<name>@sha256%3A<hex>?repository_url=...`` for a registry repository."""
    if repository.startswith("oci:") or "/" not in repository:
        return None
    name = repository.rsplit("/", 1)[1]
    return f"pkg:oci/{name}@{digest.replace(':', '%3A')}?repository_url={repository}"


def _with_purl(component: dict[str, Any], repository: str, digest: str) -> dict[str, Any]:
    purl = _purl(repository, digest)
    if purl:
        component["purl"] = purl
    return component


def _image_component(facts: BuildFacts) -> dict[str, Any]:
    """The image itself: its repository, immutable tag, manifest digest and config source."""
    repository = facts.image.repository
    return _with_purl(
        {
            "type": "container",
            "bom-ref": "image",
            "name": repository,
            "version": facts.image.tag,
            "hashes": [{"alg": "SHA-256", "content": _hex(facts.manifest.digest)}],
            "properties": _props(
                {
                    "ivd:customer": facts.customer,
                    "ivd:config:repository": facts.repository,
                    "ivd:config:path": facts.config_path,
                    "ivd:config:commit": facts.commit,
                    "ivd:development-build": str(facts.development).lower(),
                }
            ),
        },
        repository,
        facts.manifest.digest,
    )


def _base_component(base: Mapping[str, str]) -> dict[str, Any]:
    """The base image, by digest (its own SBOM lists its packages)."""
    return _with_purl(
        {
            "type": "container",
            "bom-ref": "base-image",
            "name": base["repository"],
            "version": base["version"],
            "description": "Inference base image (runtime and tile runner); "
            "its own SBOM lists the OS and Python packages.",
            "hashes": [{"alg": "SHA-256", "content": _hex(base["digest"])}],
        },
        base["repository"],
        base["digest"],
    )


def _model_component(model: ModelRecord) -> dict[str, Any]:
    """One machine-learning-model component, its weight files nested as file components."""
    files = [
        {
            "type": "file",
            "bom-ref": _model_file_ref(model.name, f.name),
            "name": f"/app/models/{model.name}/{f.name}",
            "hashes": [{"alg": "SHA-256", "content": f.sha256}],
            "properties": _props({"ivd:file:size": f.size}),
        }
        for f in model.files
    ]
    component: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": f"model:{model.name}",
        "name": model.name,
        "version": model.registry_id or f"dirhash-{model.dir_hash[:12]}",
        "properties": _props(
            {
                "ivd:model:sourcing": model.sourcing,
                "ivd:clearml:model-id": model.registry_id,
                "ivd:clearml:task-id": model.task_id,
                "ivd:model:registry-name": model.registry_name,
                "ivd:model:weights-uri": model.weights_uri,
                "ivd:model:dir-hash": model.dir_hash,
            }
        ),
        "components": files,
    }
    if model.registry_name:
        component["description"] = model.registry_name
    return component


def sbom(facts: BuildFacts) -> dict[str, Any]:
    """A CycloneDX 1.6 BOM of the image: base image, one machine-learning-model per model.

    The base image's own SBOM lists its OS and Python packages; this one references the base
    by digest instead of repeating it. Each weight file is a nested ``file`` component whose
    bom-ref equals the name of its provenance dependency.
    """
    components: list[dict[str, Any]] = []
    if facts.base.get("digest"):
        components.append(_base_component(facts.base))
    components.extend(_model_component(model) for model in facts.models)
    components.append(
        {
            "type": "file",
            "bom-ref": "config:analysis.yaml",
            "name": "/app/config/analysis.yaml",
            "hashes": [{"alg": "SHA-256", "content": facts.verbose_sha256}],
        }
    )
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"{facts.image}@{facts.manifest.digest}")
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            # The config commit time (SOURCE_DATE_EPOCH), not the clock: the SBOM describes the
            # image's content, so rebuilding the same image gives the same SBOM blob.
            "timestamp": rfc3339(datetime.fromtimestamp(facts.source_date_epoch, UTC)),
            "lifecycles": [{"phase": "build"}],
            "tools": {
                "components": [
                    {"type": "application", "name": "ivd-image-builder", "version": __version__}
                ]
            },
            "component": _image_component(facts),
        },
        "components": components,
        "dependencies": [
            {"ref": "image", "dependsOn": [c["bom-ref"] for c in components]},
        ],
    }
