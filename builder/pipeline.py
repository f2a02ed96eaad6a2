"""The main job: cook the config, fetch the weights, assemble the image, deliver it.

``build`` runs the stages in order and returns a ``BuildReport``; it never prints. Every
stage's time goes into the report so a slow build shows where the time went.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from builder import deliver, yamldoc
from builder.attest.dsse import load_private_key
from builder.attest.referrers import attach_to_layout, make_attestations, push_referrers
from builder.attest.statement import BuildFacts, ci_details
from builder.contracts import BaseImageRef, CustomerSpec, Progress, ProgressEvent
from builder.cook.expand import MODELS_DIR, expand
from builder.cook.fetch import Cache, FetchResult, fetch
from builder.cook.load import LOCK_FILE, read_customer, shown_files, work_tree_changes
from builder.cook.lock import models_from_lock, read_lock
from builder.cook.resolve import resolve_manual
from builder.cook.stage import (
    Cooked,
    LockResult,
    cook,
    make_customer_lock,
    release_lock_drift,
    uncommitted_changes,
)
from builder.documents import ModelRecord
from builder.documents.build_report import BuildReport, LayerReport
from builder.documents.lock import LockedBase
from builder.documents.provenance import Provenance
from builder.errors import ConfigError, DriftError, ReleaseGateError
from builder.image.assemble import (
    LAYER_FORMAT,
    AssembledImage,
    FileEntry,
    LayerSpec,
    assemble,
)
from builder.image.base import BaseImage
from builder.image.base_resolution import (
    base_repository,
    check_runner_accepts,
    check_variant,
    locked_base_drift,
    no_contract_note,
    resolve_base_image,
    try_resolve_base,
)
from builder.image.contract import (
    Contract,
    file_reference_problems,
    read_base_contract,
    require_loadable,
)
from builder.image.docker_backend import build_with_docker, push_with_docker
from builder.image.engine import docker_client
from builder.image.provenance import (
    Locations,
    image_labels,
    image_locations,
    image_name,
    manifest_annotations,
    provenance_document,
)
from builder.image.store import ImageStore
from builder.imagename import ImageName
from builder.oci import parse_reference
from builder.settings import Settings, refuse_credentials

APP_DIR = "/app"
CONFIG_DIR = f"{APP_DIR}/config"


@dataclass(frozen=True)
class BuildRequest:
    """What to build for one customer and how: revision, base, variant, outputs, push, signing."""

    customer: str
    # the commit to build; None: HEAD, not named (a release then refuses uncommitted edits)
    ref: str | None = None
    worktree: bool = False
    locked: bool = False
    offline: bool = False
    allow_unpublished: bool = False
    allow_unlocked: bool = False  # development: a release build without a committed lock
    fleet: bool = False  # a fleet rebuild (build --all): a release even without --push
    base_version: str | None = None  # overrides customer.yaml (fleet rebuilds)
    base_repository: str | None = None
    variant: str | None = None  # cpu | gpu; None: the first of customer.yaml's variants
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
    # Tags whose current digest (None: absent) the caller read earlier in this run, not read
    # again before the push (a fleet reads every image's immutable tag up front, in a batch).
    known_tags: tuple[tuple[str, str | None], ...] = ()
    # The manifest digest the caller resolved base_version to and kept in the local image
    # store (a fleet resolves each base once for all its builds): no registry asked.
    base_digest: str | None = None
    layer_format: int = LAYER_FORMAT  # older formats only for `verify` of older images
    # `verify` of an image of a format before 3: the locations it recorded, recorded again
    recorded: Locations | None = None

    @property
    def release(self) -> bool:
        """A release build (pushed, or a fleet rebuild): it ships only what the committed lock
        pins, from a commit."""
        return self.push or self.fleet


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 3)


def build_variant(spec: CustomerSpec, requested: str | None) -> str:
    """The variant to build: the one asked for (it must be one customer.yaml lists), else the first."""
    if requested is None:
        return spec.variants[0]
    if requested not in spec.variants:
        raise ConfigError(
            f"customer.yaml: base_image.variant of {spec.customer} is "
            f"{', '.join(spec.variants)}, not {requested}",
            hint=f"add {requested} to base_image.variant, or build {spec.variants[0]}",
        )
    return requested


def _preflight(request: BuildRequest) -> None:
    """What can be refused before any work: a dirty release, a registry with credentials in
    its name, no engine, a bad signing key."""
    refuse_credentials(request.image_registry, "--registry")
    if request.worktree and request.push:
        raise ReleaseGateError(
            f"{request.customer}: a --worktree build holds uncommitted files and cannot be "
            "pushed as a release",
            hint="commit the changes and build from git, or drop --push "
            "(--oci-layout, --docker-archive, --load for development)",
        )
    if request.load or request.backend == "docker":
        docker_client(30, needed_for=_engine_use(request)).close()  # say so before any work
    if request.sign_key is not None:
        load_private_key(request.sign_key)  # a bad key fails before any work, not after a push


def _engine_use(request: BuildRequest) -> str:
    """What a build needs the Docker engine for, and how to do without (the no-engine line)."""
    if request.backend == "docker":
        return "--backend docker builds with it; the default backend needs none"
    return "--load loads into it; --oci-layout DIR or --docker-archive FILE need none"


def check_against_base(cooked: Cooked, base: BaseImage, settings: Settings) -> list[str]:
    """Check that the runner of ``base`` loads the config with these models: every model file
    it names is one the model has, and the runner contract accepts the config (ConfigError
    listing every problem); the warnings to show when the base declares no contract."""
    contract = read_base_contract(base, settings.cache_dir)
    require_loadable(cooked.spec, cooked.models, contract, verbose=cooked.verbose)
    return [] if contract is not None else [no_contract_note(base)]


def _release_gate(request: BuildRequest, cooked: Cooked) -> Cooked:
    """What a release build refuses before any download: uncommitted edits in the folder it
    builds the HEAD of (ReleaseGateError), and no committed lock (DriftError, exit 7), which
    ``allow_unlocked`` turns into a development build, labelled so."""
    spec = cooked.spec
    if request.ref is None and not spec.worktree:
        changed = work_tree_changes(spec.source)
        if changed:
            raise ReleaseGateError(
                f"{spec.source.location} has uncommitted changes ({shown_files(changed)}); a "
                f"release ships commits, and HEAD ({spec.commit[:12]}) is not what is on disk",
                hint="commit them (and `builder lock`), or name the commit to release with --ref",
            )
    if cooked.lock is not None or read_lock(spec) is not None:
        return cooked
    if not request.allow_unlocked:
        raise DriftError(
            f"{spec.source.location}: no {LOCK_FILE} committed at {spec.commit[:12]}; a "
            "release ships what the committed lock pins",
            hint="run `builder lock`, review and commit customer.lock.yaml, then build again "
            "(or --allow-unlocked for a development build)",
        )
    note = f"no {LOCK_FILE} committed: a development build (--allow-unlocked), not a release"
    return replace(cooked, development=True, warnings=(*cooked.warnings, note))


def _refuse_stale_lock(
    request: BuildRequest, cooked: Cooked, fetched: FetchResult, base: BaseImageRef
) -> None:
    """A release build ships what the committed lock pins, or nothing (DriftError, exit 7)."""
    committed = cooked.lock or read_lock(cooked.spec)
    if committed is None:
        return  # refused, or made a development build, by _release_gate
    drift = release_lock_drift(
        cooked.spec,
        committed,
        fetched.models,
        base,
        compare_base=not request.base_version,
        store_base=cooked.store_base,
    )
    if drift:
        raise DriftError(
            f"{cooked.spec.source.location}/{LOCK_FILE} is stale; a release must ship what it "
            "pins: " + "; ".join(drift),
            hint="run `builder lock`, review and commit the result, then build again",
        )


def _contract_of(base: BaseImage, settings: Settings) -> tuple[Contract | None, str | None]:
    """The contract ``base`` declares, or None and the note saying it declares none."""
    contract = read_base_contract(base, settings.cache_dir)
    return contract, None if contract is not None else no_contract_note(base)


def runner_contract(
    spec: CustomerSpec,
    settings: Settings,
    *,
    repository: str | None = None,
    insecure: bool | None = None,
) -> tuple[Contract | None, str | None]:
    """The runner contract of the base ``spec`` builds on, or None and why it is not checked."""
    base, why = try_resolve_base(spec, settings, repository=repository, insecure=insecure)
    if base is None:  # the registry, else the local image store: validate works with no server
        return None, f"runner contract not checked: the base image was not resolved ({why})"
    return _contract_of(base, settings)


@dataclass(frozen=True)
class Validation:
    """What `validate` found: the spec, whether the runner contract was checked, where the
    models' plug-ins came from, and notes."""

    spec: CustomerSpec
    contract_info: dict[str, Any]  # checked, source, sha256
    notes: tuple[str, ...]
    # "lock" (the committed lock pins them), or None: validate never asks a model registry,
    # so model ids are checked for their form only
    models_from: str | None = None


def validate_customer(
    customer: str,
    settings: Settings,
    *,
    ref: str | None = None,
    worktree: bool = False,
    base_repository: str | None = None,
    insecure: bool | None = None,
) -> Validation:
    """Schema and consistency checks, then the runner contract of the resolved base: one
    ConfigError listing every problem of the analysis in file:line order. No model registry
    call: registry plug-ins and files come from the lock when it is current. ``ref=None``
    reads what is on disk (uncommitted edits included, said in the notes)."""
    loaded = read_customer(customer, settings, ref=ref, worktree=worktree)
    spec = loaded.spec
    notes = uncommitted_changes(spec) if spec.uncommitted else []
    contract, note = runner_contract(spec, settings, repository=base_repository, insecure=insecure)
    models = None
    lock = read_lock(spec)
    if lock is not None:
        try:
            models = models_from_lock(
                spec, lock, production=settings.production, store_base=settings.root
            )
        except DriftError as exc:
            notes.append(f"registry plug-ins not checked: {exc.message}")
    elif any(d.sourcing == "auto" for d in spec.models):
        notes.append(f"registry plug-ins not checked: no {LOCK_FILE} committed")
    # without a current lock, the files of the models committed in the repo are still known
    manual = resolve_manual(spec) if models is None else ()
    if contract is None:
        notes.append(note or "runner contract not checked")
    verbose = expand(spec, models) if models is not None and contract is not None else None
    problems = [*loaded.problems, *file_reference_problems(spec, manual, contract)]
    require_loadable(spec, models, contract, verbose=verbose, problems=problems)
    info = {
        "checked": contract is not None,
        "source": contract.source if contract else None,
        "sha256": contract.sha256 if contract else None,
    }
    return Validation(spec, info, tuple(notes), "lock" if models is not None else None)


def lock_customer(
    customer: str,
    settings: Settings,
    *,
    ref: str | None = None,
    worktree: bool = False,
    check: bool = False,
    output: Path | None = None,
    allow_unpublished: bool = False,
    base_repository: str | None = None,
    insecure: bool | None = None,
    progress: Progress | None = None,
) -> LockResult:
    """Resolve the config, refuse what the runner could not load (a model file the model
    lacks; the base's contract, when the base is found), then write customer.lock.yaml or,
    with ``check``, compare with the committed one (DriftError). ``ref=None``: what is on
    disk. The result's warnings say what was read and what was not pinned or checked."""
    cooked = cook(
        customer, settings, ref=ref, worktree=worktree, allow_unpublished=allow_unpublished
    )
    notes = list(cooked.warnings)
    base, why = try_resolve_base(
        cooked.spec, settings, repository=base_repository, insecure=insecure
    )
    pinned = base.ref if base is not None else None
    base_note = None if base is not None else f"base image not pinned: {why}"
    base_drift: list[str] = []
    if check:  # the check compares the pinned base by its tag (a newer base is a note)
        committed = read_lock(cooked.spec)
        committed_base = committed.base_image if committed else None
        base_drift, drift_notes = locked_base_drift(
            cooked.spec,
            settings,
            committed_base,
            pinned,
            repository=base_repository,
            insecure=insecure,
        )
        base_note = "; ".join(drift_notes) or (base_note if not committed_base else None)
    notes.extend([base_note] if base_note else [])
    contract = None
    if base is not None:
        contract, note = _contract_of(base, settings)
        notes.extend([note] if note else [])
    verbose = cooked.verbose if contract is not None else None
    require_loadable(cooked.spec, cooked.models, contract, verbose=verbose)
    result = make_customer_lock(
        cooked,
        Cache(settings.cache_dir / "weights"),
        base=pinned,
        check=check,
        output=output,
        progress=progress,
        base_drift=base_drift,
    )
    return replace(result, warnings=tuple(notes))


def image_layers(
    fetched: FetchResult, verbose_yaml: bytes, provenance_json: bytes
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
    # Only the config layer carries the commit time: model layers are shared blobs.
    layers.append(LayerSpec(name="config", entries=config, stamped=True))
    return layers


@dataclass(frozen=True)
class ImagePlan:
    """Everything the image is made of, decided once after fetch: the verbose config bytes and
    their sha256, the provenance, the labels, the layers and the two tags."""

    verbose_yaml: bytes
    verbose_sha256: str
    provenance: Provenance
    # The models with the weights URIs this build fetched from (the image may record them
    # location-free): what the build report and the attestation say.
    reached: tuple[ModelRecord, ...]
    labels: dict[str, str]
    layers: list[LayerSpec]
    name: ImageName  # the immutable name; its moving name is ``name.moving``

    @property
    def immutable(self) -> str:
        """``<registry>/<customer>:<base version>[-gpu]-<config rev>[-dirty]``."""
        return self.name.reference

    @property
    def moving(self) -> str:
        """``<registry>/<customer>:<base version>[-gpu]``."""
        return self.name.moving.reference

    @property
    def tags(self) -> list[str]:
        """The immutable tag, then the moving one."""
        return [self.immutable, self.moving]


def plan_image(
    cooked: Cooked,
    fetched: FetchResult,
    base: BaseImageRef,
    registry: str,
    *,
    layer_format: int = LAYER_FORMAT,
    recorded: Locations | None = None,
) -> ImagePlan:
    """The image plan of a fetched config (``cooked`` carries the fetched models), with the
    locations an image of ``layer_format`` records (see ``image_locations``)."""
    spec = cooked.spec
    locations = image_locations(
        spec, cooked.models, base, layer_format=layer_format, recorded=recorded
    )
    # The image's own view: each model's weights as the image records them.
    image = cooked.with_models(
        tuple(
            replace(m, weights_uri=locations.weights.get(m.name, m.weights_uri))
            for m in cooked.models
        )
    )
    verbose_yaml = image.verbose_yaml
    verbose_sha = hashlib.sha256(verbose_yaml).hexdigest()

    def document(of: Cooked, source: str | None) -> Provenance:
        return provenance_document(
            spec, of.models, verbose_sha256=verbose_sha, development=of.development, source=source
        )

    provenance = document(image, locations.source)
    return ImagePlan(
        verbose_yaml=verbose_yaml,
        verbose_sha256=verbose_sha,
        provenance=provenance,
        reached=document(cooked, spec.source.url).models,
        labels=image_labels(
            spec,
            image.models,
            base,
            verbose_sha256=verbose_sha,
            development=cooked.development,
            locations=locations,
        ),
        layers=image_layers(fetched, verbose_yaml, yamldoc.canonical_json(provenance.to_dict())),
        name=image_name(spec, base, registry),
    )


def build_facts(
    request: BuildRequest,
    cooked: Cooked,
    plan: ImagePlan,
    report: BuildReport,
    image: AssembledImage,
    *,
    finished: datetime | None = None,
) -> BuildFacts:
    """What the attestations say about a finished build (start time: now minus the stage
    timings), from the build's own data: nothing read back from git or the image."""
    spec = cooked.spec
    finished = finished or datetime.now(UTC)
    repository, _, folder = spec.source.url.partition("#")
    return BuildFacts(
        image=plan.name,
        manifest=image.manifest_descriptor,
        config_digest=image.config_digest,
        customer=spec.customer,
        repository=repository,
        config_path=folder or ".",
        analysis_path=spec.analysis_path,
        ref=spec.ref,
        commit=spec.commit,
        source_date_epoch=spec.commit_time,
        base=dict(report.base),
        base_constraint=spec.base_version,
        models=plan.reached,
        verbose_sha256=plan.verbose_sha256,
        development=cooked.development,
        locked=request.locked,
        lock_sha256=cooked.lock_sha256 if request.locked else None,
        started=finished - timedelta(seconds=sum(report.timings.values())),
        finished=finished,
        base_override=request.base_version,
        allow_unpublished=request.allow_unpublished,
        ci=ci_details(),
    )


def _attest(
    request: BuildRequest,
    report: BuildReport,
    image: AssembledImage,
    facts: BuildFacts,
    cache_dir: Path,
) -> None:
    """Make the provenance and SBOM of a finished build and put them where the image went:
    files under ``<cache_dir>/attestations/<manifest hex>`` (wherever the image store is),
    the local image store (so `verify` works from it alone) and the OCI layout, and the
    registry as referrers when pushed. The report's outputs say where."""
    attestations = make_attestations(facts, request.sign_key)
    directory = cache_dir / "attestations" / image.manifest_digest.split(":")[-1]
    attestations.write_files(directory)
    report.outputs["attestations"] = str(directory)
    attach_to_layout(image.store.root, attestations)
    if request.oci_layout:
        attach_to_layout(request.oci_layout, attestations)
    if request.push:
        pushes = [
            push_referrers(
                repository,
                attestations,
                insecure=request.insecure,
                subject_pushed=True,
                store=image.store,
            )
            for repository in sorted({parse_reference(t).repository for t in report.tags})
        ]
        report.outputs["referrers"] = ", ".join(
            f"{p.repository} ({p.mode}{': ' + p.tag if p.tag else ''})" for p in pushes
        )
        report.bytes_uploaded += sum(p.bytes_uploaded for p in pushes)


def _deliver(
    request: BuildRequest,
    image: AssembledImage,
    report: BuildReport,
    name: ImageName,
    progress: Progress | None,
) -> None:
    """Send the stored image where the request says: registry, OCI layout, docker archive,
    the Docker engine; the report's outputs say where it went."""
    immutable, moving = name.reference, name.moving.reference
    push_actions: dict[str, str] = {}
    if request.push:
        pushed = deliver.push(
            image,
            [immutable, moving],
            immutable=[immutable],
            force=request.force,
            insecure=request.insecure,
            progress=progress,
            known=dict(request.known_tags),
        )
        push_actions = {b.digest: b.action for b in pushed.blobs}
        # Every byte sent: blob uploads and manifests (the attestations add theirs later).
        manifests = len(image.manifest_bytes) * pushed.manifests_sent
        report.bytes_uploaded = pushed.bytes_uploaded + manifests
        report.warnings.extend(pushed.warnings)
        report.outputs["registry"] = f"{immutable}@{image.manifest_digest}"
    if request.oci_layout:
        # Ref names are bare tags, as skopeo, oras and crane expect (`oci:DIR:TAG`).
        deliver.write_oci_layout(image, request.oci_layout, [name.tag, name.moving.tag])
        report.outputs["oci_layout"] = str(request.oci_layout)
    if request.docker_archive:
        deliver.write_docker_archive(image, request.docker_archive, [immutable, moving])
        report.outputs["docker_archive"] = str(request.docker_archive)
    if request.load:
        client = docker_client(300, needed_for=_engine_use(request))
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
    client = docker_client(600, needed_for=_engine_use(request))
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


def _cook(request: BuildRequest, settings: Settings) -> Cooked:
    """The request's config cooked, through the release gate for a release build."""
    cooked = cook(
        request.customer,
        settings,
        ref=request.ref or "HEAD",
        worktree=request.worktree,
        locked=request.locked,
        allow_unpublished=request.allow_unpublished,
    )
    return _release_gate(request, cooked) if request.release else cooked


def _base_of(
    request: BuildRequest,
    cooked: Cooked,
    repository: str,
    variant: str,
    store: ImageStore,
    notes: list[str],
) -> BaseImage:
    """The base image the build uses (the lock's pin, or the digest a fleet run resolved
    once), checked to run this config on this variant."""
    spec = cooked.spec
    pinned = cooked.lock.base_image if cooked.lock else None
    if request.base_digest:  # resolved once for many builds (a fleet run): the store's
        version = request.base_version or spec.base_version
        pinned = LockedBase(repository, version, digest=request.base_digest)
    base = resolve_base_image(
        repository,
        request.base_version or spec.base_version,
        store,
        pinned=pinned
        if request.base_digest or (request.locked and not request.base_version)
        else None,
        offline=request.offline,
        insecure=request.insecure,
        notes=notes,
    )
    check_runner_accepts(base)
    check_variant(base, variant)
    return base


def _fetch(
    request: BuildRequest, cooked: Cooked, settings: Settings, progress: Progress | None
) -> FetchResult:
    """The models' weights, from the weights cache or their stores."""
    return fetch(
        cooked.models,
        Cache(settings.cache_dir / "weights"),
        manual_files=cooked.spec.manual_files,
        offline=request.offline,
        base=settings.root,
        jobs=request.jobs,
        progress=progress,
    )


def _started_report(
    cooked: Cooked,
    fetched: FetchResult,
    base: BaseImage,
    plan: ImagePlan,
    timings: dict[str, float],
    notes: list[str],
) -> BuildReport:
    """The report of a build once planned; assembly, delivery and attestation fill it in."""
    spec = cooked.spec
    return BuildReport(
        customer=spec.customer,
        image=plan.immutable,
        tags=plan.tags,
        manifest_digest="",
        config_digest="",
        config_commit=spec.commit,
        base={"repository": base.repository, "version": base.version, "digest": base.digest},
        models=list(plan.reached),
        layers=[],
        development=cooked.development,
        bytes_downloaded=fetched.bytes_downloaded,
        bytes_resumed=fetched.bytes_resumed,
        timings=timings,
        warnings=[*cooked.warnings, *notes],
    )


def _layer_reports(image: AssembledImage) -> list[LayerReport]:
    """The image's layers as the report lists them (the base's unnamed)."""
    return [
        LayerReport(
            layer.name or "base",
            layer.descriptor.digest,
            layer.descriptor.size,
            layer.descriptor.media_type,
            layer.new,
        )
        for layer in image.layers
    ]


def _store_image(
    request: BuildRequest,
    store: ImageStore,
    image: AssembledImage,
    plan: ImagePlan,
    report: BuildReport,
    progress: Progress | None,
) -> None:
    """Every build lands in the local image store, complete; the flags send it further. Its
    immutable tag is as immutable here as in a registry (a -dirty work-tree build's tag names
    uncommitted files and moves with them)."""
    report.warnings.extend(
        store.add_image(
            image,
            plan.tags,
            progress,
            immutable=() if plan.name.dirty else (plan.immutable,),  # spec.worktree
            force=request.force,
        )
    )
    report.outputs["store"] = str(store.root)


def build(
    request: BuildRequest,
    settings: Settings,
    *,
    progress: Progress | None = None,
) -> BuildReport:
    """Build one customer's image; see BuildRequest for the knobs. ``progress`` gets each
    stage as it starts and the bytes of the long ones."""
    timings: dict[str, float] = {}

    def stage(name: str) -> Any:
        if progress:
            progress(ProgressEvent(stage=name))
        return _timed(timings, name)

    _preflight(request)
    with stage("cook"):
        cooked = _cook(request, settings)
    # Shared hold on the store: `builder images prune` waits until this build is stored.
    store = ImageStore(settings.store_dir)
    notes: list[str] = []
    with store.in_use():
        spec = cooked.spec
        variant = build_variant(spec, request.variant)
        repository = base_repository(spec, settings, request.base_repository, variant)
        with stage("base"):
            base = _base_of(request, cooked, repository, variant, store, notes)
        with stage("contract"):
            notes.extend(check_against_base(cooked, base, settings))
        with stage("fetch"):
            fetched = _fetch(request, cooked, settings, progress)
        base_ref = base.ref
        if request.release:
            _refuse_stale_lock(request, cooked, fetched, base_ref)
        cooked = cooked.with_models(fetched.models)
        plan = plan_image(
            cooked,
            fetched,
            base_ref,
            request.image_registry or settings.image_registry,
            layer_format=request.layer_format,
            recorded=request.recorded,
        )
        report = _started_report(cooked, fetched, base, plan, timings, notes)
        if request.backend == "docker":
            with stage("docker build"):
                _build_with_docker(
                    request, base, plan.layers, plan.labels, spec.commit_time, report, progress
                )
            report.warnings.extend(store.blobs.repairs)
            return report
        with stage("assemble"):
            image = assemble(
                base,
                plan.layers,
                labels=plan.labels,
                annotations=manifest_annotations(plan.labels),
                source_date_epoch=spec.commit_time,
                store=store.blobs,
                progress=progress,
                layer_format=request.layer_format,
            )
        report.manifest_digest, report.config_digest = image.manifest_digest, image.config_digest
        report.layers = _layer_reports(image)
        with stage("deliver"):
            _store_image(request, store, image, plan, report, progress)
            _deliver(request, image, report, plan.name, progress)
        with stage("attest"):
            facts = build_facts(request, cooked, plan, report, image)
            _attest(request, report, image, facts, settings.cache_dir)
        report.warnings.extend(store.blobs.repairs)
        return report
