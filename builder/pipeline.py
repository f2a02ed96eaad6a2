"""The main job: cook the config, fetch the weights, assemble the image, deliver it.

``build`` runs the stages in order and returns a ``BuildReport``; it never prints. Every
stage's time goes into the report so a slow build shows where the time went.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import yamldoc
from builder.assemble import AssembledImage, BaseImage, FileEntry, LayerSpec, assemble, resolve_base
from builder.contracts import VERBOSE_SCHEMA_VERSION, BaseImageRef, CustomerSpec, Progress
from builder.cook import Cooked, cook
from builder.errors import ImageError
from builder.expand import MODELS_DIR, expand
from builder.fetch import Cache, FetchResult, fetch
from builder.oci import BlobStore
from builder.provenance import (
    image_labels,
    image_version,
    manifest_annotations,
    provenance_document,
)
from builder.settings import Settings

APP_DIR = "/app"
CONFIG_DIR = f"{APP_DIR}/config"
#: Base image label listing the verbose-config schema versions its runner accepts.
SCHEMAS_LABEL = "com.ivd.runner.config-schemas"


@dataclass(frozen=True)
class BuildRequest:
    customer: str
    ref: str = "HEAD"
    worktree: bool = False
    locked: bool = False
    offline: bool = False
    allow_unpublished: bool = False
    base_version: str | None = None  # overrides customer.yaml (fleet rebuilds)
    base_repository: str | None = None
    image_registry: str | None = None
    push: bool = False
    force: bool = False
    insecure: bool | None = None
    oci_layout: Path | None = None
    docker_archive: Path | None = None
    load: bool = False
    jobs: int = 2
    backend: str = (
        "oci"  # "oci": no daemon (default); "docker": Dockerfile + Docker engine (baseline)
    )
    sign_key: Path | None = None  # PEM ECDSA P-256 key signing the provenance (DSSE)


@dataclass
class LayerReport:
    name: str
    digest: str
    size: int
    media_type: str
    new: bool  # added by this build (False: from the base image)
    push: str | None = None  # uploaded | mounted | present, when pushed


@dataclass
class BuildReport:
    customer: str
    image: str  # the immutable reference
    tags: list[str]
    manifest_digest: str
    config_digest: str
    config_commit: str
    base: dict[str, str]
    models: list[dict[str, Any]]
    layers: list[LayerReport]
    development: bool
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 3)


def base_repository(spec: CustomerSpec, settings: Settings, override: str | None = None) -> str:
    return override or spec.base_repository or settings.base_repository


def try_resolve_base(
    spec: CustomerSpec,
    settings: Settings,
    *,
    repository: str | None = None,
    insecure: bool | None = None,
) -> tuple[BaseImageRef | None, str | None]:
    """The base image for the lock, or None and why not (the lock can be made without it)."""
    try:
        return resolve_base(
            base_repository(spec, settings, repository), spec.base_version, insecure=insecure
        ).ref, None
    except ImageError as exc:
        return None, f"base image not pinned: {exc}"


def check_runner_accepts(base: BaseImage) -> None:
    """Refuse a base whose runner does not accept the verbose config version we write."""
    accepted = {v.strip() for v in base.labels.get(SCHEMAS_LABEL, "").split(",") if v.strip()}
    if str(VERBOSE_SCHEMA_VERSION) not in accepted:
        shown = ", ".join(sorted(accepted)) or "none (label missing)"
        raise ImageError(
            f"base image {base.name} accepts config schema versions {shown}, not {VERBOSE_SCHEMA_VERSION}",
            hint="pick a base version whose runner reads this config version",
        )


def _resolve_locked_base(
    cooked: Cooked, repository: str, version_spec: str, insecure: bool | None
) -> BaseImage:
    base = resolve_base(repository, version_spec, insecure=insecure)
    pinned = (cooked.lock or {}).get("base_image")
    if (
        pinned
        and pinned.get("digest")
        and (pinned["version"], pinned["digest"]) != (base.version, base.digest)
    ):
        raise ImageError(
            f"base image {repository} resolves to {base.version} ({base.digest[:19]}) "
            f"but the lock pins {pinned['version']} ({pinned['digest'][:19]})",
            hint="run `builder lock` to accept the new base, or restore the pinned one",
        )
    return base


def image_layers(
    cooked: Cooked, fetched: FetchResult, verbose_yaml: bytes, provenance_json: bytes
) -> list[LayerSpec]:
    """One layer per model (sorted by name), then the small config layer last."""
    layers = [
        LayerSpec(
            name=m.name,
            entries=[
                FileEntry(
                    path=f"{APP_DIR}/{MODELS_DIR}/{m.name}/{f.name}",
                    source=fetched.path_of(m.name, f.name),
                    sha256=f.sha256,
                )
                for f in m.files
            ],
        )
        for m in fetched.models
    ]
    config = [
        FileEntry(path=f"{CONFIG_DIR}/analysis.yaml", source=verbose_yaml),
        FileEntry(path=f"{CONFIG_DIR}/provenance.json", source=provenance_json),
    ]
    layers.append(LayerSpec(name="config", entries=config))
    return layers


def _deliver(
    request: BuildRequest,
    image: AssembledImage,
    report: BuildReport,
    immutable: str,
    moving: str,
    progress: Progress | None,
) -> None:
    from builder import deliver
    from builder.deliver import parse_reference

    push_actions: dict[str, str] = {}
    if request.push:
        pushed = deliver.push(
            image,
            [immutable, moving],
            immutable=[immutable],
            force=request.force,
            insecure=request.insecure,
            progress=progress,
        )
        push_actions = {b.digest: b.action for b in pushed.blobs}
        # Every byte sent: blob uploads, and the manifest written by digest per repository
        # and once per tag (the attestations add theirs in the attest stage).
        repositories = {parse_reference(r).repository for r in pushed.refs}
        manifests = len(image.manifest_bytes) * (len(repositories) + len(pushed.refs))
        report.bytes_uploaded = pushed.bytes_uploaded + manifests
        report.warnings.extend(pushed.warnings)
        report.outputs["registry"] = f"{immutable}@{image.manifest_digest}"
    if request.oci_layout:
        # Ref names are bare tags, as skopeo, oras and crane expect (`oci:DIR:TAG`).
        deliver.write_oci_layout(
            image, request.oci_layout, [t.rsplit(":", 1)[1] for t in (immutable, moving)]
        )
        report.outputs["oci_layout"] = str(request.oci_layout)
    if request.docker_archive:
        deliver.write_docker_archive(image, request.docker_archive, [immutable, moving])
        report.outputs["docker_archive"] = str(request.docker_archive)
    if request.load:
        import docker

        client = docker.from_env(timeout=300)
        deliver.load_into_docker(image, [immutable, moving], client)
        report.outputs["docker"] = immutable
    for layer in report.layers:
        layer.push = push_actions.get(layer.digest)


def _build_with_docker(
    request: BuildRequest,
    base: BaseImage,
    layers: list[LayerSpec],
    labels: dict[str, str],
    sde: int,
    report: BuildReport,
    progress: Progress | None,
) -> None:
    """The familiar path and benchmark baseline: a rendered Dockerfile built by the engine."""
    import docker

    from builder.docker_backend import build_with_docker, push_with_docker

    client = docker.from_env(timeout=600)
    built = build_with_docker(
        base,
        layers,
        labels=labels,
        source_date_epoch=sde,
        client=client,
        tag=report.image,
        progress=progress,
    )
    report.config_digest = built.image_id
    report.outputs["docker"] = report.image
    if request.push:
        report.manifest_digest = push_with_docker(
            client, report.image, report.tags, progress=progress
        )
        report.outputs["registry"] = f"{report.image}@{report.manifest_digest}"


def build(
    request: BuildRequest,
    settings: Settings,
    *,
    progress: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build one customer's image; see BuildRequest for the knobs."""
    timings: dict[str, float] = {}

    def stage(name: str) -> Any:
        if on_stage:
            on_stage(name)
        return _timed(timings, name)

    if request.sign_key is not None:
        from builder.attest import load_private_key

        load_private_key(request.sign_key)  # a bad key fails before any work, not after a push
    with stage("cook"):
        cooked = cook(
            request.customer,
            settings,
            ref=request.ref,
            worktree=request.worktree,
            locked=request.locked,
            allow_unpublished=request.allow_unpublished,
        )
    spec = cooked.spec
    repository = base_repository(spec, settings, request.base_repository)
    with stage("base"):
        version_spec = request.base_version or spec.base_version
        if request.locked and not request.base_version:
            base = _resolve_locked_base(cooked, repository, version_spec, request.insecure)
        else:
            base = resolve_base(repository, version_spec, insecure=request.insecure)
        check_runner_accepts(base)
    with stage("fetch"):
        fetched = fetch(
            cooked.models,
            Cache(settings.cache_dir / "weights"),
            manual_files=spec.manual_files,
            offline=request.offline,
            base=settings.root,
            jobs=request.jobs,
            progress=progress,
        )
    base_ref = base.ref
    verbose_yaml = yamldoc.dump(expand(spec, fetched.models))
    verbose_sha = hashlib.sha256(verbose_yaml).hexdigest()
    provenance = provenance_document(
        spec, fetched.models, verbose_sha256=verbose_sha, development=cooked.development
    )
    labels = image_labels(
        spec, fetched.models, base_ref, verbose_sha256=verbose_sha, development=cooked.development
    )
    layers = image_layers(cooked, fetched, verbose_yaml, yamldoc.canonical_json(provenance))
    registry = request.image_registry or settings.image_registry
    immutable = f"{registry}/{spec.customer}:{image_version(spec, base_ref)}"
    moving = f"{registry}/{spec.customer}:{base_ref.version}"
    report = BuildReport(
        customer=spec.customer,
        image=immutable,
        tags=[immutable, moving],
        manifest_digest="",
        config_digest="",
        config_commit=spec.commit,
        base={"repository": base.repository, "version": base.version, "digest": base.digest},
        models=provenance["models"],
        layers=[],
        development=cooked.development,
        bytes_downloaded=fetched.bytes_downloaded,
        timings=timings,
        warnings=list(cooked.warnings),
    )
    if request.backend == "docker":
        with stage("docker build"):
            _build_with_docker(request, base, layers, labels, spec.commit_time, report, progress)
        return report
    with stage("assemble"):
        image = assemble(
            base,
            layers,
            labels=labels,
            annotations=manifest_annotations(labels),
            source_date_epoch=spec.commit_time,
            store=BlobStore(settings.cache_dir / "oci"),
            progress=progress,
        )
    report.manifest_digest, report.config_digest = image.manifest_digest, image.config_digest
    report.layers = [
        LayerReport(
            layer.name or "base",
            layer.descriptor.digest,
            layer.descriptor.size,
            layer.descriptor.media_type,
            layer.new,
        )
        for layer in image.layers
    ]
    with stage("deliver"):
        _deliver(request, image, report, immutable, moving, progress)
    with stage("attest"):
        from builder.attest import attest_build

        attest_build(request, report, image, spec, request.sign_key)
    return report
