"""Attestations of a build: in-toto SLSA v1 provenance, a CycloneDX ML-BOM, DSSE signatures.

Every build can say, in standard formats a verifier outside this project reads, what it made
(the image manifest digest) from what (config commit, base image digest, every weight file's
sha256 with its ClearML model and task id) and how (tool version, CI job). The documents are
stored next to the image as OCI 1.1 referrers: in an OCI image layout, and in a registry
(through the referrers API where the registry has it, else the ``sha256-<hex>`` tag schema).

Signing is optional and local: an ECDSA P-256 key in a PEM file signs a DSSE envelope around
the provenance Statement. The SBOM's digest is a byproduct of the provenance, so one signature
covers both. Keys are read here and nowhere else; nothing of them reaches an image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from builder import __version__
from builder.errors import BuilderError, ConfigError, ImageError
from builder.fsutil import write_atomic
from builder.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    layout_blob_path,
    read_layout_blob,
    sha256_digest,
)

if TYPE_CHECKING:
    from builder.assemble import AssembledImage
    from builder.contracts import CustomerSpec
    from builder.oci import RegistryClient, RetryPolicy
    from builder.pipeline import BuildReport, BuildRequest

STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE: Final = "https://slsa.dev/provenance/v1"
#: What our externalParameters/internalParameters mean (documented in the README).
BUILD_TYPE: Final = "urn:ivd-image-builder:build-type:customer-image:v1"
#: Builder id for builds outside CI (a developer machine: the weakest trust boundary).
LOCAL_BUILDER_ID: Final = "urn:ivd-image-builder:builder:local"

MEDIA_INTOTO: Final = "application/vnd.in-toto+json"
MEDIA_DSSE: Final = "application/vnd.dsse.envelope.v1+json"
MEDIA_CYCLONEDX: Final = "application/vnd.cyclonedx+json"
MEDIA_EMPTY: Final = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG: Final = b"{}"
PREDICATE_ANNOTATION: Final = "in-toto.io/predicate-type"
TITLE_ANNOTATION: Final = "org.opencontainers.image.title"
CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
#: Annotation naming which of our documents an artifact holds: "provenance" or "sbom".
KIND_ANNOTATION: Final = "com.ivd.attestation"
#: Environment variable holding the signing key's password, when the PEM is encrypted.
KEY_PASSWORD_ENV: Final = "BUILDER_SIGN_KEY_PASSWORD"

PROVENANCE_FILE: Final = "provenance.intoto.json"
ENVELOPE_FILE: Final = "provenance.dsse.json"
SBOM_FILE: Final = "sbom.cdx.json"


class AttestationError(BuilderError):
    """A signature or attestation does not verify (exit code 10, like a failed audit check)."""

    exit_code = 10


# -- facts about one build -------------------------------------------------------------------


def _rfc3339(moment: datetime) -> str:
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

    image: str  # immutable reference (registry/customer:tag)
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
    models: Sequence[Mapping[str, Any]]  # BuildReport.models (provenance.json's model records)
    verbose_sha256: str
    development: bool
    locked: bool
    lock_sha256: str | None
    started: datetime
    finished: datetime
    base_override: str | None = None
    allow_unpublished: bool = False
    ci: Mapping[str, str] = field(default_factory=dict)


def facts_from_build(
    request: BuildRequest,
    report: BuildReport,
    image: AssembledImage,
    spec: CustomerSpec,
    *,
    finished: datetime | None = None,
) -> BuildFacts:
    """BuildFacts of a finished build (start time: now minus the stage timings)."""
    from builder.load import LOCK_FILE, read_committed_file

    finished = finished or datetime.now(UTC)
    labels = (json.loads(image.config_bytes).get("config") or {}).get("Labels") or {}
    lock = read_committed_file(spec, LOCK_FILE) if request.locked else None
    repository, _, folder = spec.source.url.partition("#")
    return BuildFacts(
        image=report.image,
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
        models=list(report.models),
        verbose_sha256=str(labels.get("com.ivd.config.sha256", "")),
        development=report.development,
        locked=request.locked,
        lock_sha256=hashlib.sha256(lock).hexdigest() if lock is not None else None,
        started=finished - timedelta(seconds=sum(report.timings.values())),
        finished=finished,
        base_override=request.base_version,
        allow_unpublished=request.allow_unpublished,
        ci=ci_details(),
    )


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _model_file_ref(model: str, file: str) -> str:
    """The name shared by a weight file's provenance dependency and its SBOM bom-ref."""
    return f"model:{model}/{file}"


def _file_uri(model: Mapping[str, Any], name: str) -> str:
    return f"{str(model['weights_uri']).rstrip('/')}/{name}"


def _base_uri(base: Mapping[str, str]) -> str:
    repo = base["repository"]
    return repo if repo.startswith("oci:") else f"oci://{repo}:{base['version']}"


# -- SLSA provenance -----------------------------------------------------------------------


def provenance_statement(facts: BuildFacts, *, sbom_sha256: str | None = None) -> dict[str, Any]:
    """An in-toto Statement v1 with a SLSA provenance v1 predicate for the image."""
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
    for model in facts.models:
        annotations = {
            "model": model["name"],
            "sourcing": model["sourcing"],
            "dirHash": model["dir_hash"],
        }
        for key, name in (
            ("registry_id", "clearmlModelId"),
            ("task_id", "clearmlTaskId"),
            ("registry_name", "registryName"),
        ):
            if model.get(key):
                annotations[name] = model[key]
        for file in model["files"]:
            dependencies.append(
                {
                    "name": _model_file_ref(model["name"], file["name"]),
                    "uri": _file_uri(model, file["name"]),
                    "digest": {"sha256": file["sha256"]},
                    "annotations": {**annotations, "size": file["size"]},
                }
            )
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
    from builder.assemble import GZIP_LEVEL, LAYER_FORMAT

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
    metadata: dict[str, Any] = {
        "startedOn": _rfc3339(facts.started),
        "finishedOn": _rfc3339(facts.finished),
    }
    if facts.ci.get("job_url"):
        metadata["invocationId"] = facts.ci["job_url"]
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
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": facts.image, "digest": {"sha256": _hex(facts.manifest.digest)}}],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": internal,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {
                    "id": facts.ci.get("builder_id", LOCAL_BUILDER_ID),
                    "version": {"ivd-image-builder": __version__},
                },
                "metadata": metadata,
                "byproducts": byproducts,
            },
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


def sbom(facts: BuildFacts) -> dict[str, Any]:
    """A CycloneDX 1.6 BOM of the image: base image, one machine-learning-model per model.

    The base image's own SBOM lists its OS and Python packages; this one references the base
    by digest instead of repeating it. Each weight file is a nested ``file`` component whose
    bom-ref equals the name of its provenance dependency.
    """
    repository, _, tag = facts.image.rpartition(":")
    image_component = _with_purl(
        {
            "type": "container",
            "bom-ref": "image",
            "name": repository,
            "version": tag,
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
    components: list[dict[str, Any]] = []
    if facts.base.get("digest"):
        components.append(
            _with_purl(
                {
                    "type": "container",
                    "bom-ref": "base-image",
                    "name": facts.base["repository"],
                    "version": facts.base["version"],
                    "description": "Inference base image (runtime and tile runner); "
                    "its own SBOM lists the OS and Python packages.",
                    "hashes": [{"alg": "SHA-256", "content": _hex(facts.base["digest"])}],
                },
                facts.base["repository"],
                facts.base["digest"],
            )
        )
    for model in facts.models:
        files = [
            {
                "type": "file",
                "bom-ref": _model_file_ref(model["name"], f["name"]),
                "name": f"/app/models/{model['name']}/{f['name']}",
                "hashes": [{"alg": "SHA-256", "content": f["sha256"]}],
                "properties": _props({"ivd:file:size": f["size"]}),
            }
            for f in model["files"]
        ]
        component: dict[str, Any] = {
            "type": "machine-learning-model",
            "bom-ref": f"model:{model['name']}",
            "name": model["name"],
            "version": model.get("registry_id") or f"dirhash-{model['dir_hash'][:12]}",
            "properties": _props(
                {
                    "ivd:model:sourcing": model["sourcing"],
                    "ivd:clearml:model-id": model.get("registry_id"),
                    "ivd:clearml:task-id": model.get("task_id"),
                    "ivd:model:registry-name": model.get("registry_name"),
                    "ivd:model:weights-uri": model.get("weights_uri"),
                    "ivd:model:dir-hash": model["dir_hash"],
                }
            ),
            "components": files,
        }
        if model.get("registry_name"):
            component["description"] = model["registry_name"]
        components.append(component)
    components.append(
        {
            "type": "file",
            "bom-ref": "config:analysis.yaml",
            "name": "/app/config/analysis.yaml",
            "hashes": [{"alg": "SHA-256", "content": facts.verbose_sha256}],
        }
    )
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, facts.image + '@' + facts.manifest.digest)}",
        "version": 1,
        "metadata": {
            # The config commit time (SOURCE_DATE_EPOCH), not the clock: the SBOM describes the
            # image's content, so rebuilding the same image gives the same SBOM blob.
            "timestamp": _rfc3339(datetime.fromtimestamp(facts.source_date_epoch, UTC)),
            "lifecycles": [{"phase": "build"}],
            "tools": {
                "components": [
                    {"type": "application", "name": "ivd-image-builder", "version": __version__}
                ]
            },
            "component": image_component,
        },
        "components": components,
        "dependencies": [
            {"ref": "image", "dependsOn": [c["bom-ref"] for c in components]},
        ],
    }


# -- DSSE ----------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_p256(key: Any, path: Path, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    public = key.public_key() if hasattr(key, "public_key") else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise ConfigError(
            f"{path}: the {what} is not an ECDSA P-256 key",
            hint="generate one with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem`",
        )


def load_private_key(path: Path) -> Any:
    """An ECDSA P-256 private key from a PEM file (password from BUILDER_SIGN_KEY_PASSWORD)."""
    from cryptography.hazmat.primitives import serialization

    data = _read_pem(path, "signing key")
    password = os.environ.get(KEY_PASSWORD_ENV)
    try:
        key = serialization.load_pem_private_key(
            data, password=password.encode() if password else None
        )
    except TypeError:
        raise ConfigError(
            f"{path}: the signing key is encrypted", hint=f"set {KEY_PASSWORD_ENV}"
        ) from None
    except ValueError:
        raise ConfigError(
            f"{path}: not a PEM private key (or the password is wrong)",
            hint="give the private key file; the public key is for verifying",
        ) from None
    _check_p256(key, path, "signing key")
    return key


def load_public_key(path: Path) -> Any:
    """An ECDSA P-256 public key from a PEM file (SubjectPublicKeyInfo, as cosign writes)."""
    from cryptography.hazmat.primitives import serialization

    data = _read_pem(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        hint = "that is a private key; give the public one" if b"PRIVATE KEY" in data else None
        raise ConfigError(f"{path}: not a PEM public key", hint=hint) from None
    _check_p256(key, path, "public key")
    return key


def key_id(public_key: Any) -> str:
    """A hint naming the key: sha256 of its DER SubjectPublicKeyInfo (never trusted as such)."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def sign_envelope(
    payload: bytes, key_path: Path, payload_type: str = MEDIA_INTOTO
) -> dict[str, Any]:
    """A DSSE envelope over ``payload``, signed with the ECDSA P-256 key at ``key_path``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_private_key(key_path)
    signature = key.sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }


def envelope_payload(envelope: Mapping[str, Any], what: str = "DSSE envelope") -> bytes:
    """The payload of a DSSE envelope (not verified)."""
    try:
        return base64.b64decode(str(envelope["payload"]), validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise AttestationError(f"{what} is malformed: no base64 payload") from None


def verify_envelope(envelope: Mapping[str, Any], public_key_path: Path) -> bytes:
    """The payload of ``envelope`` if one of its signatures verifies with the key, else raise.

    Every signature is tried: ``keyid`` is only a hint and decides nothing.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_public_key(public_key_path)
    payload = envelope_payload(envelope)
    payload_type = str(envelope.get("payloadType", ""))
    signatures = envelope.get("signatures") or []
    if not isinstance(signatures, list) or not signatures:
        raise AttestationError("the DSSE envelope has no signatures")
    message = pae(payload_type, payload)
    for entry in signatures:
        try:
            sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, AttributeError):
            continue
        return payload
    raise AttestationError(
        f"no signature of the DSSE envelope verifies with {public_key_path} "
        f"(key id {key_id(key)[:16]})",
        hint="wrong key, or the attestation was altered",
    )


# -- the documents as OCI artifacts ----------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """One document to attach to an image as an OCI 1.1 referrer."""

    kind: str  # "provenance" | "sbom"
    artifact_type: str
    media_type: str  # of its single layer
    data: bytes
    file_name: str
    created: str  # RFC 3339: the build's end (provenance), the config commit time (SBOM)
    predicate_type: str | None = None

    @property
    def layer(self) -> Descriptor:
        """The descriptor of the document blob."""
        annotations = {TITLE_ANNOTATION: self.file_name}
        if self.predicate_type:
            annotations[PREDICATE_ANNOTATION] = self.predicate_type
        return Descriptor(self.media_type, sha256_digest(self.data), len(self.data), annotations)

    def manifest(self, subject: Descriptor) -> bytes:
        """The artifact manifest: empty config, the document as its layer, ``subject`` set."""
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": self.artifact_type,
            "config": empty_descriptor().to_dict(),
            "layers": [self.layer.to_dict()],
            "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_dict(),
            "annotations": self.annotations,
        }
        return canonical_json(manifest)

    @property
    def annotations(self) -> dict[str, str]:
        """Annotations of the artifact manifest (copied into referrers index entries)."""
        out = {CREATED_ANNOTATION: self.created, KIND_ANNOTATION: self.kind}
        if self.predicate_type:
            out[PREDICATE_ANNOTATION] = self.predicate_type
        return out


def empty_descriptor() -> Descriptor:
    """The OCI empty descriptor (``{}``) used as the config of artifact manifests."""
    return Descriptor(MEDIA_EMPTY, sha256_digest(EMPTY_CONFIG), len(EMPTY_CONFIG))


@dataclass(frozen=True)
class Attestations:
    """The provenance Statement (signed or not) and the SBOM of one image."""

    subject: Descriptor
    statement: dict[str, Any]
    sbom: dict[str, Any]
    envelope: dict[str, Any] | None
    created: str  # when the build finished
    sbom_created: str  # the config commit time: the same image always gets the same SBOM

    @property
    def artifacts(self) -> list[Artifact]:
        """Provenance (a DSSE envelope when signed, else the bare Statement) and SBOM."""
        if self.envelope is not None:
            provenance = Artifact(
                "provenance",
                MEDIA_DSSE,
                MEDIA_DSSE,
                canonical_json(self.envelope),
                ENVELOPE_FILE,
                self.created,
                SLSA_PROVENANCE,
            )
        else:
            provenance = Artifact(
                "provenance",
                MEDIA_INTOTO,
                MEDIA_INTOTO,
                canonical_json(self.statement),
                PROVENANCE_FILE,
                self.created,
                SLSA_PROVENANCE,
            )
        sbom_artifact = Artifact(
            "sbom", MEDIA_CYCLONEDX, MEDIA_CYCLONEDX, self.sbom_bytes, SBOM_FILE, self.sbom_created
        )
        return [provenance, sbom_artifact]

    @property
    def sbom_bytes(self) -> bytes:
        return canonical_json(self.sbom)

    def manifests(self) -> list[tuple[Artifact, bytes]]:
        """Each artifact with its manifest bytes."""
        return [(a, a.manifest(self.subject)) for a in self.artifacts]

    def write_files(self, directory: Path) -> list[Path]:
        """Write the documents as plain files (for archiving with the build report)."""
        files = {PROVENANCE_FILE: canonical_json(self.statement), SBOM_FILE: self.sbom_bytes}
        if self.envelope is not None:
            files[ENVELOPE_FILE] = canonical_json(self.envelope)
        out = []
        for name, data in files.items():
            write_atomic(directory / name, data)
            out.append(directory / name)
        return out


def make_attestations(facts: BuildFacts, sign_key: Path | None = None) -> Attestations:
    """SBOM first (its digest goes into the provenance byproducts), then the Statement."""
    bom = sbom(facts)
    statement = provenance_statement(
        facts, sbom_sha256=hashlib.sha256(canonical_json(bom)).hexdigest()
    )
    envelope = sign_envelope(canonical_json(statement), sign_key) if sign_key else None
    return Attestations(
        subject=facts.manifest,
        statement=statement,
        sbom=bom,
        envelope=envelope,
        created=_rfc3339(facts.finished),
        sbom_created=_rfc3339(datetime.fromtimestamp(facts.source_date_epoch, UTC)),
    )


# -- one provenance per build definition and run --------------------------------------------


def _identity(media_type: str, data: bytes) -> str | None:
    """What makes two provenance documents the same attestation: type, signers, and the
    Statement without the run's start and end times (None: not a provenance we can read)."""
    try:
        doc = json.loads(data)
        signers: list[str] = []
        if media_type == MEDIA_DSSE:
            signers = sorted(str(s.get("keyid")) for s in doc.get("signatures") or [])
            doc = json.loads(envelope_payload(doc))
        metadata = doc["predicate"]["runDetails"].get("metadata") or {}
        for key in ("startedOn", "finishedOn"):
            metadata.pop(key, None)
    except (ValueError, KeyError, TypeError, AttributeError, AttestationError):
        return None
    return hashlib.sha256(canonical_json([media_type, signers, doc])).hexdigest()


def _already_attached(
    artifact: Artifact,
    manifest: bytes,
    existing: Sequence[Descriptor],
    read_manifest: Callable[[str], bytes],
    read_blob: Callable[[str], bytes],
) -> Descriptor | None:
    """An attached artifact saying the same as ``artifact``, if there is one.

    The SBOM is deterministic, so the same manifest digest is the same document. A provenance
    differs per run only in its times: one pushed again for the same build definition and CI
    invocation (a re-push from the same job) is not attached twice.
    """
    digest = sha256_digest(manifest)
    for descriptor in existing:
        if descriptor.digest == digest:
            return descriptor
    if artifact.kind != "provenance":
        return None
    wanted = _identity(artifact.media_type, artifact.data)
    for descriptor in existing:
        if descriptor.extra.get("artifactType") != artifact.artifact_type:
            continue
        try:
            layers = json.loads(read_manifest(descriptor.digest)).get("layers") or []
            layer = Descriptor.from_dict(layers[0])
            if (
                wanted is not None
                and layer.media_type == artifact.media_type
                and _identity(layer.media_type, read_blob(layer.digest)) == wanted
            ):
                return descriptor
        except (BuilderError, ValueError, IndexError, AttributeError):
            continue
    return None


# -- OCI image layout ------------------------------------------------------------------------


def _write_blob(directory: Path, data: bytes) -> None:
    path = layout_blob_path(directory, sha256_digest(data))
    if not path.exists():
        write_atomic(path, data)


def attach_to_layout(directory: Path, attestations: Attestations) -> list[Descriptor]:
    """Add the artifacts to the OCI image layout holding the subject image.

    Blobs go into ``blobs/sha256``; each artifact manifest is listed in ``index.json`` with its
    ``artifactType`` and no ref name, which is how oras and the image-layout spec find
    referrers in a layout (by reading the manifests' ``subject``).
    """
    from builder.oci import read_layout_index, update_layout_index

    try:
        read_layout_index(directory)
    except ImageError as exc:
        raise ImageError(f"{directory} is not an OCI image layout: {exc}") from None
    if not layout_blob_path(directory, attestations.subject.digest).is_file():
        raise ImageError(
            f"OCI layout {directory} does not hold image {attestations.subject.digest}"
        )
    added = []
    _write_blob(directory, EMPTY_CONFIG)
    existing = layout_referrers(directory, attestations.subject.digest)
    for artifact, manifest in attestations.manifests():
        same = _already_attached(
            artifact,
            manifest,
            existing,
            lambda d: read_layout_blob(directory, d),
            lambda d: read_layout_blob(directory, d),
        )
        if same is not None:
            added.append(same)
            continue
        _write_blob(directory, artifact.data)
        _write_blob(directory, manifest)
        descriptor = Descriptor(
            OCI_MANIFEST,
            sha256_digest(manifest),
            len(manifest),
            artifact.annotations,
            {"artifactType": artifact.artifact_type},
        )
        added.append(descriptor)
    new = [d.to_dict() for d in added]

    def merge(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        have = {e.get("digest") for e in entries}
        return entries + [d for d in new if d["digest"] not in have]

    # The layout's one locked index writer: concurrent builds into one layout keep every entry.
    update_layout_index(directory, merge)
    return added


def layout_referrers(directory: Path, digest: str) -> list[Descriptor]:
    """Descriptors (with artifactType) of the manifests in a layout whose subject is ``digest``."""
    from builder.oci import read_layout_index

    found = []
    for entry in read_layout_index(directory):
        descriptor = entry.descriptor
        if descriptor.media_type != OCI_MANIFEST or entry.ref_name:
            continue
        try:
            manifest = json.loads(read_layout_blob(directory, descriptor.digest))
        except (ImageError, ValueError):
            continue
        if (manifest.get("subject") or {}).get("digest") == digest:
            found.append(_referrer_descriptor(descriptor, manifest))
    return found


def _referrer_descriptor(descriptor: Descriptor, manifest: Mapping[str, Any]) -> Descriptor:
    """The referrers-index form of an artifact manifest's descriptor."""
    extra = dict(descriptor.extra)
    artifact_type = manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")
    if artifact_type:
        extra["artifactType"] = artifact_type
    annotations = dict(manifest.get("annotations") or {}) or dict(descriptor.annotations)
    return Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, annotations, extra)


# -- registry --------------------------------------------------------------------------------


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject digest: ``sha256-<hex>``."""
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}-{hex_}"


@dataclass(frozen=True)
class ReferrersPush:
    """What :func:`push_referrers` did in one repository."""

    repository: str
    manifests: tuple[str, ...]  # artifact manifest digests
    mode: str  # "referrers-api" | "tag-schema"
    tag: str | None = None  # the fallback tag, in tag-schema mode
    bytes_uploaded: int = 0  # every byte sent: blobs uploaded, manifests and index written


def registry_referrers(
    client: RegistryClient, path: str, digest: str
) -> tuple[list[Descriptor], str]:
    """Referrers of ``digest`` in ``path``: from the referrers API, else the fallback tag.

    Returns the descriptors and the mode used ("referrers-api" or "tag-schema").
    """
    api = client.referrers(path, digest)
    if api is not None:
        return [Descriptor.from_dict(d) for d in api], "referrers-api"
    tag = fallback_tag(digest)
    if client.manifest_digest(path, tag) is None:
        return [], "tag-schema"
    raw, _, _ = client.get_manifest(path, tag)
    try:
        entries = json.loads(raw).get("manifests") or []
    except (ValueError, AttributeError):
        raise ImageError(f"{client.host}/{path}:{tag} is not an image index") from None
    return [Descriptor.from_dict(d) for d in entries], "tag-schema"


def push_referrers(
    repository: str,
    attestations: Attestations,
    *,
    insecure: bool | None = None,
    retry: RetryPolicy | None = None,
) -> ReferrersPush:
    """Push the artifacts to ``repository`` (``host/path``) as referrers of the image.

    The subject image must already be there. Artifact manifests are pushed by digest; if the
    registry answers the referrers API it indexes them itself. Otherwise (CNCF distribution
    2.x) the ``sha256-<hex>`` tag is read, merged with the new descriptors and written back,
    then read again to catch a concurrent writer (retried a few times: the schema is racy).
    """
    from builder.oci import RegistryClient, split_repository

    host, path = split_repository(repository)
    client = RegistryClient(host, insecure=insecure, retry=retry)
    if client.manifest_digest(path, attestations.subject.digest) is None:
        raise ImageError(f"{repository} has no manifest {attestations.subject.digest} to attest")
    descriptors = []
    sent = 0
    attached, mode = registry_referrers(client, path, attestations.subject.digest)
    for artifact, manifest in attestations.manifests():
        same = _already_attached(
            artifact,
            manifest,
            attached,
            lambda d: client.get_manifest(path, d)[0],
            lambda d: client.get_blob_bytes(path, d),
        )
        if same is not None:
            descriptors.append(same)
            continue
        for data, descriptor in (
            (EMPTY_CONFIG, empty_descriptor()),
            (artifact.data, artifact.layer),
        ):
            if not client.blob_exists(path, descriptor.digest):
                client.upload_blob(path, descriptor.digest, descriptor.size, data)
                sent += len(data)
        digest = client.put_manifest(path, sha256_digest(manifest), manifest, OCI_MANIFEST)
        sent += len(manifest)
        descriptors.append(
            Descriptor(
                OCI_MANIFEST,
                digest,
                len(manifest),
                artifact.annotations,
                {"artifactType": artifact.artifact_type},
            )
        )
    pushed = tuple(d.digest for d in descriptors)
    if mode == "referrers-api":
        return ReferrersPush(repository, pushed, "referrers-api", bytes_uploaded=sent)
    tag = fallback_tag(attestations.subject.digest)
    for _ in range(3):
        existing, _mode = registry_referrers(client, path, attestations.subject.digest)
        known = {d.digest for d in existing}
        merged = [d.to_dict() for d in existing] + [
            d.to_dict() for d in descriptors if d.digest not in known
        ]
        index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": merged})
        client.put_manifest(path, tag, index, OCI_INDEX)
        sent += len(index)
        now = {d.digest for d in registry_referrers(client, path, attestations.subject.digest)[0]}
        if set(pushed) <= now:
            return ReferrersPush(repository, pushed, "tag-schema", tag, sent)
    raise ImageError(
        f"{repository}:{tag} kept changing while the attestations were added",
        hint="another client writes the same referrers tag; push again",
    )


# -- the one call the pipeline makes --------------------------------------------------------


@dataclass(frozen=True)
class AttestResult:
    """Where the attestations of one build went."""

    directory: Path
    files: tuple[Path, ...]
    signed: bool
    key_id: str | None
    layout: tuple[str, ...] = ()  # artifact manifest digests added to the OCI layout
    registry: tuple[ReferrersPush, ...] = ()


def attest_build(
    request: BuildRequest,
    report: BuildReport,
    image: AssembledImage,
    spec: CustomerSpec,
    sign_key: Path | None = None,
    *,
    directory: Path | None = None,
) -> AttestResult:
    """Make the provenance and SBOM of a finished build and put them where the image went.

    Always written as files to ``directory`` (default: ``attestations/<manifest hex>`` next to
    the blob store); added to ``request.oci_layout`` and pushed as referrers when
    ``request.push``. The report's ``outputs`` gain ``attestations`` (and ``referrers``).
    """
    from builder.oci import parse_reference

    attestations = make_attestations(facts_from_build(request, report, image, spec), sign_key)
    directory = directory or image.store.root.parent / "attestations" / _hex(image.manifest_digest)
    files = tuple(attestations.write_files(directory))
    report.outputs["attestations"] = str(directory)
    layout: tuple[str, ...] = ()
    if request.oci_layout:
        layout = tuple(d.digest for d in attach_to_layout(request.oci_layout, attestations))
    pushes: list[ReferrersPush] = []
    if request.push:
        for repository in sorted({parse_reference(t).repository for t in report.tags}):
            pushes.append(push_referrers(repository, attestations, insecure=request.insecure))
        report.outputs["referrers"] = ", ".join(
            f"{p.repository} ({p.mode}{': ' + p.tag if p.tag else ''})" for p in pushes
        )
        report.bytes_uploaded += sum(p.bytes_uploaded for p in pushes)
    signer = attestations.envelope["signatures"][0]["keyid"] if attestations.envelope else None
    return AttestResult(directory, files, sign_key is not None, signer, layout, tuple(pushes))
