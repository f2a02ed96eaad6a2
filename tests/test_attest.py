"""Attestations: SLSA provenance and CycloneDX SBOM documents, DSSE signing, OCI referrers.

The documents are checked by other people's code (the CycloneDX 1.6 JSON schema through
cyclonedx-python-lib, DSSE through securesystemslib), keys come from the openssl CLI, and the
referrers go to the real CNCF registry of the test bed (no referrers API: the tag schema) and
through a referrers-API front of it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import requests

from builder.attest.dsse import (
    MEDIA_DSSE,
    key_id,
    load_public_key,
    pae,
    sign_envelope,
    verify_envelope,
)
from builder.attest.referrers import attach_to_layout, make_attestations, push_referrers
from builder.attest.statement import (
    MEDIA_CYCLONEDX,
    MEDIA_INTOTO,
    SLSA_PROVENANCE,
    BuildFacts,
    ci_details,
)
from builder.documents import ModelRecord
from builder.errors import AttestationError, ConfigError
from builder.imagename import ImageName
from builder.oci import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    BlobStore,
    Descriptor,
    RegistryClient,
    canonical_json,
    fallback_tag,
    layout_referrers,
    registry_referrers,
)

WEIGHTS = b"weights-of-carcinoma" * 100


def openssl_keys(folder: Path, name: str = "key") -> tuple[Path, Path]:
    """An ECDSA P-256 key pair written by the openssl CLI (SEC1 private, SPKI public)."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(private)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)],
        check=True,
        capture_output=True,
    )
    return private, public


def facts(manifest: Descriptor, **over: Any) -> BuildFacts:
    """BuildFacts of a plausible build (two models: one from the registry, one in the repo)."""
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    values: dict[str, Any] = {
        "image": ImageName.parse("127.0.0.1:5000/customer-x:2.4.1-2f152add41f8"),
        "manifest": manifest,
        "config_digest": "sha256:" + "c" * 64,
        "customer": "customer-x",
        "repository": "https://git.example.com/ivd/customers",
        "config_path": "customers/customer-x",
        "analysis_path": "analysis.yaml",
        "ref": "main",
        "commit": "2f152add41f80657aec5deae86ffc674ed830657",
        "source_date_epoch": 1_700_000_000,
        "base": {
            "repository": "127.0.0.1:5000/ivd/inference-base",
            "version": "2.4.1",
            "digest": "sha256:" + "b" * 64,
        },
        "base_constraint": "~=2.4",
        "models": [
            ModelRecord.from_dict(m)
            for m in cast(
                list[dict[str, Any]],
                [
                    {
                        "name": "carcinoma_model",
                        "sourcing": "auto",
                        "registry_id": "a957f623e6d34159a07aec1b8323eb54",
                        "registry_name": "carcinoma v3",
                        "task_id": "5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e",
                        "weights_uri": "s3://production/5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e/",
                        "dir_hash": "d" * 64,
                        "files": [{"name": "model.onnx", "size": len(WEIGHTS), "sha256": sha}],
                    },
                    {
                        "name": "mitosis_model",
                        "sourcing": "manual",
                        "registry_id": None,
                        "registry_name": None,
                        "task_id": None,
                        "weights_uri": "repo:models/mitosis",
                        "dir_hash": "e" * 64,
                        "files": [
                            {"name": "labels.json", "size": 2, "sha256": "1" * 64},
                            {"name": "model.onnx", "size": 10, "sha256": "2" * 64},
                        ],
                    },
                ],
            )
        ],
        "verbose_sha256": "f" * 64,
        "development": False,
        "locked": True,
        "lock_sha256": "a" * 64,
        "started": datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC),
        "finished": datetime(2026, 11, 20, 10, 0, 42, tzinfo=UTC),
        "ci": ci_details(
            {
                "GITLAB_CI": "true",
                "CI": "true",
                "CI_SERVER_URL": "https://gitlab.example.com",
                "CI_PROJECT_PATH": "ivd/customer-images",
                "CI_RUNNER_ID": "42",
                "CI_JOB_URL": "https://gitlab.example.com/ivd/customer-images/-/jobs/1234",
            }
        ),
    }
    values.update(over)
    return BuildFacts(**values)


SUBJECT = Descriptor(OCI_MANIFEST, "sha256:" + "9" * 64, 1234)


class TestDocuments:
    def test_statement_is_slsa_v1_provenance_of_the_image(self) -> None:
        """Subject = manifest digest; parameters, dependencies and run details as specified."""
        statement = make_attestations(facts(SUBJECT)).statement
        assert statement["_type"] == "https://in-toto.io/Statement/v1"
        assert statement["predicateType"] == SLSA_PROVENANCE
        assert statement["subject"] == [
            {
                "name": "127.0.0.1:5000/customer-x:2.4.1-2f152add41f8",
                "digest": {"sha256": "9" * 64},
            }
        ]
        definition = statement["predicate"]["buildDefinition"]
        assert definition["externalParameters"] == {
            "repository": "https://git.example.com/ivd/customers",
            "configPath": "customers/customer-x",
            "ref": "main",
            "customer": "customer-x",
            "locked": True,
        }
        deps = {d["name"]: d for d in definition["resolvedDependencies"]}
        assert deps["config"]["digest"] == {"gitCommit": "2f152add41f80657aec5deae86ffc674ed830657"}
        assert deps["config"]["uri"].startswith("git+https://git.example.com/ivd/customers@2f152a")
        assert deps["base-image"]["digest"] == {"sha256": "b" * 64}
        carcinoma = deps["model:carcinoma_model/model.onnx"]
        assert carcinoma["digest"] == {"sha256": hashlib.sha256(WEIGHTS).hexdigest()}
        assert carcinoma["annotations"]["clearmlModelId"] == "a957f623e6d34159a07aec1b8323eb54"
        assert carcinoma["annotations"]["clearmlTaskId"] == "5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e"
        assert carcinoma["uri"] == "s3://production/5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e/model.onnx"
        assert "clearmlModelId" not in deps["model:mitosis_model/labels.json"]["annotations"]
        run = statement["predicate"]["runDetails"]
        assert run["builder"]["id"] == "https://gitlab.example.com/ivd/customer-images/-/runners/42"
        assert run["metadata"] == {
            "invocationId": "https://gitlab.example.com/ivd/customer-images/-/jobs/1234",
            "startedOn": "2026-11-20T10:00:00Z",
            "finishedOn": "2026-11-20T10:00:42Z",
        }

    def test_sbom_is_valid_cyclonedx_1_6_with_ml_models(self) -> None:
        """The official CycloneDX 1.6 schema accepts it; bom-refs match the provenance names."""
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator

        attestations = make_attestations(facts(SUBJECT))
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(
            attestations.sbom_bytes.decode()
        )
        assert error is None, str(error)[:500]
        models = [
            c for c in attestations.sbom["components"] if c["type"] == "machine-learning-model"
        ]
        assert [m["name"] for m in models] == ["carcinoma_model", "mitosis_model"]
        props = {p["name"]: p["value"] for p in models[0]["properties"]}
        assert props["ivd:clearml:model-id"] == "a957f623e6d34159a07aec1b8323eb54"
        assert props["ivd:clearml:task-id"] == "5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e"
        file_refs = {f["bom-ref"] for m in models for f in m["components"]}
        deps = attestations.statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        assert file_refs == {d["name"] for d in deps if d["name"].startswith("model:")}
        byproducts = attestations.statement["predicate"]["runDetails"]["byproducts"]
        sbom_entry = next(b for b in byproducts if b["mediaType"] == MEDIA_CYCLONEDX)
        assert sbom_entry["digest"]["sha256"] == hashlib.sha256(attestations.sbom_bytes).hexdigest()

    def test_local_build_has_local_builder_id_and_no_invocation(self) -> None:
        """Outside CI the builder id says so, and there is no CI job to name."""
        statement = make_attestations(facts(SUBJECT, ci={})).statement
        assert statement["predicate"]["runDetails"]["builder"]["id"].endswith(":local")
        assert "invocationId" not in statement["predicate"]["runDetails"]["metadata"]


class TestDSSE:
    def test_pae_is_the_dsse_encoding(self) -> None:
        """The DSSE spec's own example."""
        assert (
            pae("http://example.com/HelloWorld", b"hello world")
            == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        )

    def test_envelope_verifies_here_and_with_securesystemslib(self, tmp_path: Path) -> None:
        """Signed with an openssl-made key; verified by us and by an independent DSSE library."""
        from securesystemslib.dsse import Envelope
        from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]  # no __all__ there

        private, public = openssl_keys(tmp_path)
        payload = canonical_json(make_attestations(facts(SUBJECT)).statement)
        envelope = sign_envelope(payload, private)
        assert envelope["payloadType"] == MEDIA_INTOTO
        assert verify_envelope(envelope, public) == payload
        pub = load_public_key(public)
        assert envelope["signatures"][0]["keyid"] == key_id(pub)
        key = SSlibKey.from_crypto(pub, keyid=key_id(pub), scheme="ecdsa-sha2-nistp256")
        verified = Envelope.from_dict(json.loads(json.dumps(envelope))).verify([key], 1)
        assert list(verified) == [key_id(pub)]

    def test_altered_payload_or_other_key_fails(self, tmp_path: Path) -> None:
        """A changed byte or another key: one clear error, never a silent pass."""
        private, _ = openssl_keys(tmp_path, "signer")
        _, other = openssl_keys(tmp_path, "other")
        envelope = sign_envelope(b'{"a":1}', private)
        with pytest.raises(AttestationError, match="no signature of the DSSE envelope verifies"):
            verify_envelope(envelope, other)
        forged = dict(envelope, payload=base64.b64encode(b'{"a":2}').decode())
        with pytest.raises(AttestationError):
            verify_envelope(forged, tmp_path / "signer.pub.pem")

    def test_wrong_key_files_say_what_is_wrong(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """RSA, encrypted-without-password, a private key given as public: one line each."""
        rsa = tmp_path / "rsa.pem"
        subprocess.run(
            [
                "openssl",
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                str(rsa),
            ],
            check=True,
            capture_output=True,
        )
        with pytest.raises(ConfigError, match="not an ECDSA P-256 key"):
            sign_envelope(b"x", rsa)
        private, public = openssl_keys(tmp_path)
        encrypted = tmp_path / "enc.pem"
        subprocess.run(
            [
                "openssl",
                "pkcs8",
                "-topk8",
                "-in",
                str(private),
                "-out",
                str(encrypted),
                "-passout",
                "pass:s3cret",
            ],
            check=True,
            capture_output=True,
        )
        monkeypatch.delenv("BUILDER_SIGN_KEY_PASSWORD", raising=False)
        with pytest.raises(ConfigError, match="BUILDER_SIGN_KEY_PASSWORD"):
            sign_envelope(b"x", encrypted)
        monkeypatch.setenv("BUILDER_SIGN_KEY_PASSWORD", "s3cret")
        assert verify_envelope(sign_envelope(b"x", encrypted), public) == b"x"
        with pytest.raises(ConfigError, match="private key; give the public one"):
            load_public_key(private)
        with pytest.raises(ConfigError, match="cannot read"):
            load_public_key(tmp_path / "missing.pem")


# -- attaching -----------------------------------------------------------------------------


def _tiny_image() -> tuple[bytes, bytes, bytes]:
    """(layer, config, manifest) of a one-file image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    layer = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [{"mediaType": OCI_LAYER, "digest": diff_id, "size": len(layer)}],
        }
    )
    return layer, config, manifest


def _push_tiny(client: RegistryClient, path: str) -> Descriptor:
    layer, config, manifest = _tiny_image()
    for blob in (layer, config):
        client.upload_blob(path, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob), blob)
    digest = client.put_manifest(path, "v1", manifest, OCI_MANIFEST)
    return Descriptor(OCI_MANIFEST, digest, len(manifest))


def test_layout_referrers_and_skopeo_still_reads_the_image(tmp_path: Path) -> None:
    """Artifacts land in the layout's index without ref names; the image stays readable."""
    layout = tmp_path / "layout"
    layer, config, manifest = _tiny_image()
    for blob in (layer, config, manifest):
        path = layout / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    subject = Descriptor(
        OCI_MANIFEST, "sha256:" + hashlib.sha256(manifest).hexdigest(), len(manifest)
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            dict(subject.to_dict(), annotations={"org.opencontainers.image.ref.name": "v1"})
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    attestations = make_attestations(facts(subject))
    added = attach_to_layout(layout, attestations)
    attach_to_layout(layout, attestations)  # idempotent
    found = layout_referrers(layout, subject.digest)
    assert sorted(d.digest for d in found) == sorted(d.digest for d in added)
    assert {d.extra["artifactType"] for d in found} == {MEDIA_INTOTO, MEDIA_CYCLONEDX}
    assert len(json.loads((layout / "index.json").read_text())["manifests"]) == 3
    inspect = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout}:v1"], capture_output=True, check=True
    )
    assert inspect.stdout == manifest


def test_tag_schema_fallback_on_the_cncf_registry(oci_registry: Any, tmp_path: Path) -> None:
    """distribution 2.8 has no referrers API: the sha256-<hex> index is written and merged."""
    client = RegistryClient(oci_registry.host)
    path = "attest/tag-schema"
    subject = _push_tiny(client, path)
    answer = requests.get(f"{oci_registry.url}/v2/{path}/referrers/{subject.digest}", timeout=10)
    assert answer.status_code == 404  # the real registry really lacks the API
    private, _ = openssl_keys(tmp_path)
    first = push_referrers(
        f"{oci_registry.host}/{path}", make_attestations(facts(subject), private)
    )
    assert first.mode == "tag-schema" and first.tag == fallback_tag(subject.digest)
    repository = f"{oci_registry.host}/{path}"
    second = push_referrers(repository, make_attestations(facts(subject, ci={})))
    assert second.manifests[1] == first.manifests[1]  # the SBOM is the same document
    # The same build definition pushed again later (a re-run of the same push): nothing new.
    again = push_referrers(
        repository,
        make_attestations(facts(subject, ci={}, finished=datetime(2026, 11, 21, tzinfo=UTC))),
    )
    assert again.manifests == second.manifests
    # Another CI job is another build run: its provenance is attached as well.
    other_job = ci_details({"CI_JOB_URL": "https://gitlab.example.com/ivd/images/-/jobs/99"})
    third = push_referrers(repository, make_attestations(facts(subject, ci=other_job)))
    index = requests.get(
        f"{oci_registry.url}/v2/{path}/manifests/{first.tag}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        timeout=10,
    ).json()
    digests = [m["digest"] for m in index["manifests"]]
    assert sorted(digests) == sorted({*first.manifests, *second.manifests, *third.manifests})
    assert len(digests) == 4  # signed and unsigned provenance, another job's, one SBOM
    types = {m["digest"]: m["artifactType"] for m in index["manifests"]}
    assert types[first.manifests[0]] == MEDIA_DSSE and types[second.manifests[0]] == MEDIA_INTOTO
    found, mode = registry_referrers(client, path, subject.digest)
    assert mode == "tag-schema" and sorted(d.digest for d in found) == sorted(digests)
    artifact = json.loads(client.get_manifest(path, first.manifests[0])[0])
    assert artifact["subject"]["digest"] == subject.digest
    assert artifact["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"


def test_attestations_ask_only_what_no_one_remembers(oci_registry: Any, tmp_path: Path) -> None:
    """With a blob store, a repository's later attestations skip asking for the empty config
    and read the referrers tag with one GET; a store that wrongly remembers the empty config
    (another registry's storage wiped) still ends with every artifact attached."""
    client = RegistryClient(oci_registry.host)
    store = BlobStore(tmp_path / "store")
    path = "attest/counted"
    repository = f"{oci_registry.host}/{path}"
    first_subject = _push_tiny(client, path)
    push_referrers(repository, make_attestations(facts(first_subject)), store=store)
    other = canonical_json(dict(json.loads(_tiny_image()[2]), annotations={"n": "2"}))
    subject = Descriptor(
        OCI_MANIFEST, client.put_manifest(path, "v2", other, OCI_MANIFEST), len(other)
    )
    mark = len(oci_registry.requests())
    pushed = push_referrers(repository, make_attestations(facts(subject)), store=store)
    sent = oci_registry.requests()[mark:]
    empty = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    assert not [r for r in sent if empty in r.path]  # remembered, not asked or sent
    assert [r.method for r in sent if "/manifests/sha256-" in r.path] == ["GET", "PUT", "GET"]
    assert sorted(d.digest for d in registry_referrers(client, path, subject.digest)[0]) == sorted(
        pushed.manifests
    )
    # A repository the store believes holds the empty config, but where it never went.
    fresh = "attest/forgotten"
    fresh_subject = _push_tiny(client, fresh)
    store.note_present(oci_registry.host, fresh, [empty])
    again = push_referrers(
        f"{oci_registry.host}/{fresh}", make_attestations(facts(fresh_subject)), store=store
    )
    found = registry_referrers(client, fresh, fresh_subject.digest)[0]
    assert sorted(d.digest for d in found) == sorted(again.manifests)
    assert client.blob_exists(fresh, empty)


class _ReferrersFront(BaseHTTPRequestHandler):
    """A registry front that adds the OCI 1.1 referrers API to the CNCF registry behind it:
    it indexes manifests with a subject as they are PUT, and forwards everything else."""

    upstream = ""
    index: dict[str, list[dict[str, Any]]] = {}  # noqa: RUF012 - one front per test

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if method == "GET" and "/referrers/" in self.path:
            digest = self.path.rsplit("/", 1)[1].split("?")[0]
            data = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": self.index.get(digest, []),
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
        }
        answer = requests.request(
            method,
            self.upstream + self.path,
            data=body or None,
            headers=headers,
            timeout=30,
            allow_redirects=False,
        )
        if method == "PUT" and "/manifests/" in self.path and answer.status_code == 201:
            manifest = json.loads(body)
            if manifest.get("subject"):
                entry = {
                    "mediaType": manifest["mediaType"],
                    "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                    "size": len(body),
                    "artifactType": manifest.get("artifactType"),
                }
                self.index.setdefault(manifest["subject"]["digest"], []).append(entry)
        self.send_response(answer.status_code)
        for key, value in answer.headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(
                    key, value.replace(self.upstream, f"http://{self.headers['Host']}")
                )
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(answer.content)

    def do_GET(self) -> None:
        self._forward("GET")

    def do_HEAD(self) -> None:
        self._forward("HEAD")

    def do_PUT(self) -> None:
        self._forward("PUT")

    def do_POST(self) -> None:
        self._forward("POST")

    def do_PATCH(self) -> None:
        self._forward("PATCH")


@pytest.fixture
def referrers_registry(oci_registry: Any) -> Iterator[str]:
    """host:port of a referrers-API front of the test-bed registry, on loopback."""
    handler = type("Front", (_ReferrersFront,), {"upstream": oci_registry.url, "index": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_referrers_api_is_used_when_the_registry_has_it(
    referrers_registry: str, oci_registry: Any
) -> None:
    """No fallback tag is written when the registry indexes referrers itself."""
    client = RegistryClient(referrers_registry)
    path = "attest/api"
    subject = _push_tiny(client, path)
    result = push_referrers(f"{referrers_registry}/{path}", make_attestations(facts(subject)))
    assert result.mode == "referrers-api" and result.tag is None
    found, mode = registry_referrers(client, path, subject.digest)
    assert mode == "referrers-api"
    assert sorted(d.digest for d in found) == sorted(result.manifests)
    assert client.manifest_digest(path, fallback_tag(subject.digest)) is None
