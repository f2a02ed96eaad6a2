"""Explain an image: read its provenance back, check its model files, labels and attached
attestations, and find the release record that names it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from builder.attest.dsse import (
    MEDIA_DSSE,
    envelope_payload,
    load_public_key,
    verify_envelope,
)
from builder.attest.statement import MEDIA_CYCLONEDX, MEDIA_INTOTO, PROVENANCE_FILE
from builder.audit.history import ReleaseReview, open_customer, release_review
from builder.audit.text import base_of, short
from builder.documents.provenance import Provenance
from builder.errors import AttestationError, BuilderError, ConfigError, ImageError
from builder.image.contents import open_image, own_layers, scan_files
from builder.image.provenance import LABEL_PREFIX
from builder.oci import ArchiveImage, Descriptor, ImageFiles, OpenedImage
from builder.oci.image import json_object
from builder.settings import Settings

#: Exit code of a failed audit check (tampered file, digest mismatch, bad signature).
PROVENANCE_PATH: Final = "app/config/provenance.json"
ANALYSIS_PATH: Final = "app/config/analysis.yaml"
MODELS_PREFIX: Final = "app/models/"
# Checks about attached attestations (signature, subject, digests named in them), as opposed to
# the image's own files, labels and provenance.json ("files intact").
_ATTESTATION_CHECKS: Final = (
    "attestation",
    "provenance signature",
    "provenance subject",
    "provenance model digests",
    "provenance config commit",
    "SBOM digest",
)


@dataclass(frozen=True)
class Check:
    """One audit check and its outcome."""

    name: str
    ok: bool
    detail: str


class FileState(StrEnum):
    """What the image holds at a weight file's path, against the provenance."""

    OK = "ok"
    MODIFIED = "MODIFIED"  # another sha256
    MISSING = "MISSING"
    UNEXPECTED = "UNEXPECTED"  # a file under /app/models the provenance does not name


@dataclass
class ModelFileStatus:
    """A recorded weight file and what the image holds at its path."""

    model: str
    file: str
    recorded_sha256: str
    image_sha256: str | None  # None: missing
    size: int | None
    status: FileState


@dataclass
class AttestationInfo:
    """An attestation attached to the image."""

    digest: str
    kind: str  # provenance | sbom | other
    artifact_type: str
    created: str | None
    signed: bool
    key_id: str | None
    signature: str  # "valid" | "INVALID" | "not checked" | "unsigned"


@dataclass
class Explanation:
    """Everything ``explain`` found out about an image, and its checks."""

    image: str
    kind: str
    manifest_digest: str
    config_digest: str
    customer: str
    provenance: Provenance  # the JSON shows it as the image holds it (``to_dict``)
    base: dict[str, Any]  # repository, version, digest, constraint
    labels: dict[str, str]
    created: str | None  # the image's created time (= config commit time)
    built_at: str | None  # when the build ran (attestation or release record)
    built_at_source: str | None
    files: list[ModelFileStatus]
    attestations: list[AttestationInfo]
    attestations_where: str
    release: dict[str, Any] | None
    release_note: str
    checks: list[Check]
    ci_url: str | None = None
    selected: dict[str, Any] | None = None  # how a customer name was turned into this image
    #: For a recorded release: what changed since the previous release, why, who approved it.
    review: ReleaseReview | None = None
    # Where the config repository (``<url>#<folder>``) is recorded: the image's own record (a
    # location-free image has one only when customer.yaml declares it), then its provenance
    # attestation's (where the build read it)
    sources: list[str] = field(default_factory=list)

    @property
    def source(self) -> str | None:
        """The config repository the image (else its attestation) records."""
        return self.sources[0] if self.sources else None

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    @property
    def verdict(self) -> dict[str, Any]:
        """The three answers a reviewer signs off on, each yes or no, with who signed.

        ``recorded_release``: a release record names this digest. ``signed``: a provenance
        signature is attached (``signed_by`` its key id; ``signature`` valid / INVALID / not
        checked without --public-key). ``files_intact``: every model and config file matches
        its recorded sha256 and labels, annotations and provenance agree.
        """
        signatures = [a for a in self.attestations if a.kind == "provenance" and a.signed]
        states = {a.signature for a in signatures}
        state = "INVALID" if "INVALID" in states else "valid" if "valid" in states else None
        intact = all(c.ok for c in self.checks if not c.name.startswith(_ATTESTATION_CHECKS))
        return {
            "recorded_release": self.release is not None,
            "signed": bool(signatures),
            "signed_by": sorted({a.key_id for a in signatures if a.key_id}),
            "signature": state or ("not checked" if signatures else "unsigned"),
            "files_intact": intact,
        }

    def verdict_line(self) -> str:
        """``recorded release: yes | signed: yes, by key ab12.. (valid) | files intact: yes``."""
        v = self.verdict
        if v["signed"]:
            keys = ", ".join(k[:16] for k in v["signed_by"]) or "an unnamed key"
            signed = f"yes, by key {keys} ({v['signature']})"
        else:
            signed = "no (unsigned)"
        return (
            f"recorded release: {'yes' if v['recorded_release'] else 'no'} | signed: {signed} | "
            f"files intact: {'yes' if v['files_intact'] else 'NO'}"
        )

    @property
    def problems(self) -> list[str]:
        """The failed checks, one ``name: detail`` line each, for the verdict and errors."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


def _not_ours(image: OpenedImage, why: str) -> ImageError:
    return ImageError(
        f"{image.what} was not built by ivd-image-builder: {why}",
        hint="explain and verify only read images this tool built",
    )


def _read_provenance(image: OpenedImage, found: ImageFiles) -> Provenance:
    """The image's provenance.json, read as any builder version wrote it; one ImageError line
    when it is missing, not JSON, of another version or malformed."""
    raw = found.contents.get(PROVENANCE_PATH)
    if raw is None:
        raise _not_ours(image, "it has no /app/config/provenance.json")
    try:
        record = json.loads(raw)
    except ValueError:
        raise ImageError(
            f"{image.what}: /app/config/provenance.json is not JSON (altered?)"
        ) from None
    if not isinstance(record, dict) or record.get("provenance_version") != 1:
        version = record.get("provenance_version") if isinstance(record, dict) else None
        raise ImageError(
            f"{image.what}: /app/config/provenance.json has provenance_version {version!r}, "
            "which this version cannot read",
            hint="use the builder version that made the image",
        )
    try:
        return Provenance.from_dict(record, f"{image.what}: {PROVENANCE_PATH}", recorded=True)
    except ConfigError as exc:
        raise ImageError(exc.message, hint=exc.hint) from None


def _file_statuses(provenance: Provenance, found: ImageFiles) -> list[ModelFileStatus]:
    out = []
    expected: set[str] = set()
    for model in provenance.models:
        for f in model.files:
            path = f"{MODELS_PREFIX}{model.name}/{f.name}"
            expected.add(path)
            have = found.files.get(path)
            status = (
                FileState.MISSING
                if have is None
                else FileState.OK
                if have[0] == f.sha256
                else FileState.MODIFIED
            )
            out.append(
                ModelFileStatus(
                    model.name,
                    f.name,
                    f.sha256,
                    have[0] if have else None,
                    have[1] if have else None,
                    status,
                )
            )
    for path, (sha, size) in sorted(found.files.items()):
        if path.startswith(MODELS_PREFIX) and path not in expected:
            rest = path.removeprefix(MODELS_PREFIX)
            folder, _, name = rest.partition("/")
            out.append(ModelFileStatus(folder, name, "", sha, size, FileState.UNEXPECTED))
    return out


def _consistency_checks(
    image: OpenedImage, provenance: Provenance, found: ImageFiles
) -> list[Check]:
    """Labels, manifest annotations, provenance.json and the config layer must agree."""
    labels = image.labels
    pairs = [
        (
            "label org.opencontainers.image.revision",
            labels.get("org.opencontainers.image.revision"),
            provenance.config_commit,
        ),
        (
            "label org.opencontainers.image.source",
            labels.get("org.opencontainers.image.source"),
            provenance.config_repository,
        ),
        (
            f"label {LABEL_PREFIX}.customer",
            labels.get(f"{LABEL_PREFIX}.customer"),
            provenance.customer,
        ),
        (
            f"label {LABEL_PREFIX}.config.sha256",
            labels.get(f"{LABEL_PREFIX}.config.sha256"),
            provenance.verbose_sha256,
        ),
    ]
    if provenance.base_digest:  # provenance.json of builds that recorded the resolved base
        pairs.append(
            (
                "label org.opencontainers.image.base.digest",
                labels.get("org.opencontainers.image.base.digest"),
                provenance.base_digest,
            )
        )
    analysis = found.files.get(ANALYSIS_PATH)
    pairs.append(
        (
            "/app/config/analysis.yaml sha256",
            analysis[0] if analysis else None,
            provenance.verbose_sha256,
        )
    )
    for model in provenance.models:
        pairs.append(
            (
                f"label {LABEL_PREFIX}.model.{model.name}.sha256",
                labels.get(f"{LABEL_PREFIX}.model.{model.name}.sha256"),
                model.dir_hash,
            )
        )
    annotations = image.manifest.get("annotations") or {}
    for key in ("org.opencontainers.image.revision", "org.opencontainers.image.base.digest"):
        if key in annotations:
            pairs.append((f"manifest annotation {key}", annotations.get(key), labels.get(key)))
    checks = []
    for name, actual, recorded in pairs:
        ok = actual == recorded
        detail = (
            "agrees with provenance.json"
            if ok
            else f"is {actual!r}, provenance.json records {recorded!r}"
        )
        checks.append(Check(name, ok, detail))
    return checks


def _artifact_document(
    image: OpenedImage, descriptor: Descriptor
) -> tuple[dict[str, Any], Descriptor, bytes]:
    manifest = json_object(
        image.manifest_bytes(descriptor.digest), f"attestation {descriptor.digest}"
    )
    layers = manifest.get("layers") or []
    if not layers:
        raise ImageError(f"attestation {descriptor.digest} has no layer")
    layer = Descriptor.from_dict(layers[0])
    return manifest, layer, image.blob(layer.digest)


@dataclass
class Attested:
    """What an image's attestations say: their facts, the provenance, the SBOM hash, the checks."""

    infos: list[AttestationInfo] = field(default_factory=list)
    statement: dict[str, Any] | None = None  # newest provenance Statement
    statements: list[dict[str, Any]] = field(default_factory=list)  # every one, newest first
    sbom_sha256: str | None = None
    checks: list[Check] = field(default_factory=list)


def read_attestations(
    image: OpenedImage, descriptors: Sequence[Descriptor], public_key: Path | None
) -> Attested:
    """Read and check an image's attestations (signatures too when ``public_key`` is given)."""
    out = Attested()
    newest = ""
    for descriptor in descriptors:
        try:
            manifest, layer, data = _artifact_document(image, descriptor)
        except ImageError as exc:
            out.checks.append(
                Check(f"attestation {short(descriptor.digest, 12)}", False, exc.message)
            )
            continue
        created = (manifest.get("annotations") or {}).get("org.opencontainers.image.created")
        info = AttestationInfo(
            descriptor.digest,
            "other",
            str(manifest.get("artifactType", "")),
            created,
            False,
            None,
            "unsigned",
        )
        statement: dict[str, Any] | None = None
        if layer.media_type == MEDIA_CYCLONEDX:
            info.kind = "sbom"
            out.sbom_sha256 = hashlib.sha256(data).hexdigest()
        elif layer.media_type in (MEDIA_INTOTO, MEDIA_DSSE):
            info.kind = "provenance"
            document = json_object(data, f"attestation {descriptor.digest}")
            if layer.media_type == MEDIA_DSSE:
                info.signed = True
                signatures = document.get("signatures") or []
                info.key_id = (
                    str(signatures[0].get("keyid"))
                    if signatures and isinstance(signatures[0], dict)
                    else None
                )
                payload = envelope_payload(document)
                if public_key is not None:
                    try:
                        payload = verify_envelope(document, public_key)
                        info.signature = "valid"
                    except AttestationError as exc:
                        info.signature = "INVALID"
                        out.checks.append(Check("provenance signature", False, exc.message))
                else:
                    info.signature = "not checked"
                statement = json_object(payload, "DSSE payload")
            else:
                statement = document
        out.infos.append(info)
        if statement is not None:
            out.statements.append(statement)
            if (created or "") >= newest:
                newest, out.statement = created or "", statement
    if out.statement is not None:  # newest first: a repeated build's own record leads
        out.statements.sort(key=lambda s: s is not out.statement)
    return out


def _statement_checks(
    image: OpenedImage,
    statement: Mapping[str, Any],
    provenance: Provenance,
    sbom_sha: str | None,
) -> list[Check]:
    subjects = {(s.get("digest") or {}).get("sha256") for s in statement.get("subject") or []}
    checks = [
        Check(
            "provenance subject",
            image.manifest_digest.removeprefix("sha256:") in subjects,
            "names this image's manifest digest"
            if image.manifest_digest.removeprefix("sha256:") in subjects
            else "names another image",
        )
    ]
    deps = (statement.get("predicate") or {}).get("buildDefinition", {}).get(
        "resolvedDependencies"
    ) or []
    recorded = {f"model:{m.name}/{f.name}": f.sha256 for m in provenance.models for f in m.files}
    attested = {
        d.get("name"): (d.get("digest") or {}).get("sha256")
        for d in deps
        if str(d.get("name", "")).startswith("model:")
    }
    checks.append(
        Check(
            "provenance model digests",
            attested == recorded,
            "match provenance.json"
            if attested == recorded
            else f"attested {sorted(attested.items())} vs recorded {sorted(recorded.items())}",
        )
    )
    commit = next(
        (d.get("digest", {}).get("gitCommit") for d in deps if d.get("name") == "config"), None
    )
    recorded_commit = provenance.config_commit
    checks.append(
        Check(
            "provenance config commit",
            commit == recorded_commit,
            f"{short(commit, 12)} vs recorded {short(recorded_commit, 12)}",
        )
    )
    byproducts = (statement.get("predicate") or {}).get("runDetails", {}).get("byproducts") or []
    sbom_digest = next(
        (
            (b.get("digest") or {}).get("sha256")
            for b in byproducts
            if b.get("mediaType") == MEDIA_CYCLONEDX
        ),
        None,
    )
    if sbom_sha is not None and sbom_digest is not None:
        checks.append(
            Check(
                "SBOM digest",
                sbom_sha == sbom_digest,
                "matches the provenance byproduct"
                if sbom_sha == sbom_digest
                else f"SBOM {short(sbom_sha, 12)} is not the attested {short(sbom_digest, 12)}",
            )
        )
    return checks


def attested_source(statement: Mapping[str, Any] | None) -> str | None:
    """``<url>#<folder>`` of the config repository a provenance Statement names, if any."""
    external = ((statement or {}).get("predicate") or {}).get("buildDefinition", {}).get(
        "externalParameters"
    ) or {}
    repository, folder = external.get("repository"), external.get("configPath")
    if not isinstance(repository, str) or not repository:
        return None
    return (
        f"{repository}#{folder}"
        if isinstance(folder, str) and folder not in ("", ".")
        else repository
    )


def attested_base(statement: Mapping[str, Any] | None) -> str | None:
    """The base image repository a provenance Statement names (``oci://<repo>:<tag>``), if any."""
    deps = ((statement or {}).get("predicate") or {}).get("buildDefinition", {}).get(
        "resolvedDependencies"
    ) or []
    uri = next((str(d.get("uri") or "") for d in deps if d.get("name") == "base-image"), "")
    if uri.startswith("oci://"):
        return uri.removeprefix("oci://").rpartition(":")[0] or None
    return uri or None


def _local_statements(settings: Settings, digest: str) -> list[dict[str, Any]]:
    """The provenance Statement a build on this machine wrote for ``digest`` (the build
    report's ``outputs.attestations``), when it names that digest as its subject."""
    path = settings.store_dir.parent / "attestations" / digest.partition(":")[2] / PROVENANCE_FILE
    try:
        statement = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return []
    if not isinstance(statement, dict):
        return []
    subjects = [
        (s.get("digest") or {}).get("sha256")
        for s in statement.get("subject") or []
        if isinstance(s, dict)
    ]
    return [statement] if digest.partition(":")[2] in subjects else []


def _release_for(
    source: str | None, digest: str, settings: Settings
) -> tuple[dict[str, Any] | None, str, ReleaseReview | None]:
    """The release record of this digest, read from the recorded config repository (``source``),
    and that release's review (what changed since the previous release, why, who approved it)."""
    if not source:
        return None, "release records not read: the image names no config repository", None
    try:
        customer = open_customer(source, settings)
    except BuilderError as exc:
        return None, f"release records not read: {exc}", None
    where = customer.records_where
    record = next((r for r in customer.records if r.manifest_digest == digest), None)
    if record is None:
        return None, f"no release record on {where} names this digest: not a recorded release", None
    found = {
        "path": record.path,
        "image": record.image,
        "built_at": record.built_at,
        "ci_url": record.ci_url,
    }
    note = f"released as {record.image} ({where}: {record.path})"
    try:
        review = release_review(customer, record)
    except BuilderError as exc:
        return found, f"{note}; approvals not read: {exc}", None
    return found, note, review


def _file_checks(files: Sequence[ModelFileStatus]) -> list[Check]:
    """One check per recorded or unexpected model file."""
    checks = []
    for f in files:
        where = f"/app/models/{f.model}/{f.file}"
        if f.status == FileState.OK:
            detail = f"sha256 {short(f.recorded_sha256, 12)} as recorded"
        elif f.status == FileState.MODIFIED:
            detail = (
                f"MODIFIED: sha256 {short(f.image_sha256, 12)} in the image, "
                f"{short(f.recorded_sha256, 12)} recorded"
            )
        elif f.status == FileState.MISSING:
            detail = "MISSING from the image"
        else:
            detail = "UNEXPECTED: not among the recorded model files"
        checks.append(Check(where, f.status == FileState.OK, detail))
    return checks


def _when_built(
    statement: Mapping[str, Any] | None, release: Mapping[str, Any] | None
) -> tuple[str | None, str | None, str | None]:
    """When the build ran, where that was read (the provenance attestation, else the release
    record), and its CI job's URL."""
    metadata = ((statement or {}).get("predicate") or {}).get("runDetails", {}).get(
        "metadata"
    ) or {}
    built_at, built_from = (
        metadata.get("finishedOn"),
        "provenance attestation" if metadata.get("finishedOn") else None,
    )
    if built_at is None and release and release.get("built_at"):
        built_at, built_from = release["built_at"], "release record"
    ci_url = metadata.get("invocationId") or (release or {}).get("ci_url")
    return built_at, built_from, ci_url


def explain(
    reference: str,
    settings: Settings,
    *,
    public_key: Path | None = None,
    insecure: bool | None = None,
    image: OpenedImage | None = None,
) -> Explanation:
    """Read an image's provenance back and check its model files and attestations."""
    if public_key is not None:
        load_public_key(public_key)  # a bad key file is a usage error, before any download
    opened = image is None
    image = image or open_image(reference, settings, insecure=insecure)
    labels = image.labels
    if "com.ivd.customer" not in labels:
        shown = ", ".join(sorted(labels)[:4]) or "none"
        raise _not_ours(image, f"its config has no com.ivd.customer label (labels: {shown})")
    layers = own_layers(image)
    if not layers:
        raise _not_ours(image, "no layer of it was made by ivd-image-builder")
    found = scan_files(image, layers)
    provenance = _read_provenance(image, found)
    files = _file_statuses(provenance, found)
    checks = [Check("layer digest", False, p) for p in found.problems] + _file_checks(files)
    checks += _consistency_checks(image, provenance, found)
    descriptors, where = image.referrers()
    attested = read_attestations(image, descriptors, public_key)
    checks += attested.checks
    if attested.statement is not None:
        checks += _statement_checks(image, attested.statement, provenance, attested.sbom_sha256)
    signatures = {a.signature for a in attested.infos}
    if public_key is not None and not signatures & {"valid", "INVALID"}:
        checks.append(Check("provenance signature", False, f"no signed provenance ({where})"))
    # Where the build read its config: the attached attestations, else (a docker archive
    # carries none) the attestation a build on this machine wrote next to its image store.
    statements = attested.statements or _local_statements(settings, image.manifest_digest)
    sources: list[str] = []
    for found_at in (
        provenance.config_repository,
        *(attested_source(s) for s in statements),
    ):
        if isinstance(found_at, str) and found_at and found_at not in sources:
            sources.append(found_at)
    release, release_note, review = _release_for(
        sources[0] if sources else None, image.manifest_digest, settings
    )
    base = base_of(labels, provenance)
    if base["repository"] is None:  # a location-free image: where the build pulled it from
        base["repository"] = next(filter(None, map(attested_base, statements)), None)
    built_at, built_from, ci_url = _when_built(attested.statement, release)
    if opened and isinstance(image, ArchiveImage):
        image.close()
    return Explanation(
        image=image.what if image.kind != "registry" else reference,
        kind=image.kind,
        manifest_digest=image.manifest_digest,
        config_digest=image.config_digest,
        customer=provenance.customer,
        provenance=provenance,
        base=base,
        labels=labels,
        created=labels.get("org.opencontainers.image.created"),
        built_at=built_at,
        built_at_source=built_from,
        files=files,
        attestations=attested.infos,
        attestations_where=where,
        release=release,
        release_note=release_note,
        checks=checks,
        ci_url=ci_url,
        sources=sources,
        review=review,
    )
