"""Typed documents: each reads back what it writes, and writes the bytes it always wrote."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any, cast

import pytest
import yaml
from helpers import run_cli

from builder import __version__, yamldoc
from builder.audit.text import base_of
from builder.contracts import WeightFile
from builder.cook.lock import render
from builder.documents import FileDigest, ModelRecord
from builder.documents.build_report import BuildReport, LayerReport
from builder.documents.lock import Lock
from builder.documents.provenance import Provenance
from builder.documents.publish_manifest import PublishManifest
from builder.documents.release_record import ReleaseRecord
from builder.errors import ConfigError, ImageError
from builder.image.provenance import provenance_document
from builder.record import release_record, render_record

DATA = Path(__file__).parent / "data" / "documents"

#: A `build --json` report of a pushed release build (one registry and one manual model).
REPORT: dict[str, Any] = {
    "customer": "customer-x",
    "image": "reg.example/customer-x:2.4.1-0123456789ab",
    "tags": ["reg.example/customer-x:2.4.1-0123456789ab", "reg.example/customer-x:2.4.1"],
    "manifest_digest": "sha256:" + "a" * 64,
    "config_commit": "0123456789ab" + "c" * 28,
    "base": {
        "repository": "reg.example/ivd/inference-base",
        "version": "2.4.1",
        "digest": "sha256:" + "b" * 64,
    },
    "models": [
        {
            "name": "carcinoma_model",
            "sourcing": "auto",
            "registry_id": "m1",
            "registry_name": "c",
            "task_id": "t1",
            "weights_uri": "s3://p/t1/m1/",
            "dir_hash": "d" * 64,
            "files": [{"name": "model.onnx", "size": 12, "sha256": "e" * 64}],
        },
        {
            "name": "manual_model",
            "sourcing": "manual",
            "registry_id": None,
            "registry_name": None,
            "task_id": None,
            "weights_uri": "repo:models/x",
            "dir_hash": "f" * 64,
            "files": [],
        },
    ],
    "development": False,
    "outputs": {"registry": "x"},
}


def _report() -> BuildReport:
    """:data:`REPORT` read through its type, as the write-back gets it."""
    rest = {"config_digest": "sha256:" + "1" * 64, "layers": [], "timings": {}, "warnings": []}
    sizes = dict.fromkeys(("bytes_downloaded", "bytes_resumed", "bytes_uploaded"), 0)
    return BuildReport.from_dict({**REPORT, **rest, **sizes})


def _record() -> ReleaseRecord:
    return release_record(
        _report(),
        config_source="https://git.example/cfg.git#customers/x",
        built_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        env={"CI_JOB_URL": "https://ci/job/1", "CI_PIPELINE_URL": "https://ci/p/2"},
    )


def test_release_record_bytes_and_round_trip() -> None:
    """The record file is byte for byte what fleet always wrote, and reads back equal."""
    golden = (DATA / "release-record.yaml").read_text("utf-8")
    golden = golden.replace("builder_version: 0.1.0", f"builder_version: {__version__}")
    record = _record()
    assert render_record(record).decode() == golden
    assert ReleaseRecord.from_dict(record.to_dict()) == record
    assert ReleaseRecord.from_dict({**yaml.safe_load(golden), "_path": "x"}) == record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"manifest_digest": "latest"}, "manifest_digest 'latest' is missing or malformed"),
        ({"config": {"repository": "r", "path": "."}}, "config.commit '' is missing or malformed"),
        ({"image": ""}, "image '' is missing or malformed"),
    ],
)
def test_release_record_malformed(change: dict[str, Any], message: str) -> None:
    """A malformed record is one ConfigError naming where it was read and the bad key."""
    data = {**_record().to_dict(), **change}
    with pytest.raises(ConfigError, match=r"^somewhere: ") as caught:
        ReleaseRecord.from_dict(data, "somewhere")
    assert message in str(caught.value)


@pytest.mark.parametrize("worktree", [False, True])
def test_provenance_bytes_and_round_trip(worktree: bool) -> None:
    """provenance.json is byte for byte what it always was (image digests depend on it)."""
    spec = NS(
        customer="customer-x",
        source=NS(
            url="https://git.example/cfg.git#customers/x",
            subdir=None if worktree else "customers/x",
        ),
        commit="c" * 40,
        analysis_path="analysis.yaml",
        worktree=worktree,
        base_version="~=2.4",
        commit_time=1767322800,
    )
    auto = NS(
        name="carcinoma_model",
        sourcing="auto",
        model_id="m1",
        registry_name="carcinoma",
        task_id="t1",
        weights_uri="s3://p/t1/m1/",
        files=(WeightFile("model.onnx", "s3://p/t1/m1/model.onnx", size=12, sha256="e" * 64),),
    )
    manual = NS(
        name="manual_model",
        sourcing="manual",
        model_id=None,
        registry_name=None,
        task_id=None,
        weights_uri="repo:models/x",
        files=(),
    )
    document = provenance_document(
        cast(Any, spec),
        cast(Any, (auto, manual)),
        verbose_sha256="a" * 64,
        development=worktree,
        source=spec.source.url,
    )
    golden = (DATA / "provenance.jsonl").read_text("utf-8").splitlines()[int(worktree)]
    golden = golden.replace('"version":"0.1.0"', f'"version":"{__version__}"')
    assert yamldoc.canonical_json(document.to_dict()).decode() == golden
    assert Provenance.from_dict(document.to_dict()) == document


def _written_provenance() -> dict[str, Any]:
    """provenance.json as this version writes it (the golden document, not a work tree)."""
    return dict(json.loads((DATA / "provenance.jsonl").read_text("utf-8").splitlines()[0]))


#: The resolved base that builders before the constraint-only record wrote into ``base_image``.
OLDER_BASE: dict[str, Any] = {
    "repository": "reg.example/ivd/inference-base",
    "version": "2.4.1",
    "digest": "sha256:" + "b" * 64,
}


def test_provenance_of_an_older_builder_reads_through_the_type() -> None:
    """An image's record from a builder that also wrote the resolved base reads as an image's
    record (``recorded=True``): the base is kept in typed fields, explain's base reads it, and
    the document is shown as the image holds it. The form this version writes refuses it, and
    a current record reads the same either way (no base fields)."""
    older = _written_provenance()
    older["base_image"] = {**older["base_image"], **OLDER_BASE}
    read = Provenance.from_dict(older, "img", recorded=True)
    assert (read.base_repository, read.base_version, read.base_digest) == tuple(OLDER_BASE.values())
    assert read.to_dict() == older
    assert base_of({}, read) == {**OLDER_BASE, "constraint": older["base_image"]["constraint"]}
    with pytest.raises(ConfigError, match=r"^img: base_image \{"):
        Provenance.from_dict(older, "img")
    current = Provenance.from_dict(_written_provenance(), "img", recorded=True)
    assert current == Provenance.from_dict(_written_provenance())
    assert (current.base_repository, current.base_version, current.base_digest) == (None,) * 3
    assert current.to_dict() == _written_provenance()


def _broken(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """An older builder's provenance.json with the key at ``path`` set (``...``: removed)."""
    data = _written_provenance()
    data["base_image"] = {**data["base_image"], **OLDER_BASE}
    *parents, last = path
    node: Any = data
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("base_image", "digest"), 5, "base_image.digest 5 is missing or malformed"),
        (("base_image", "constraint"), ..., "base_image.constraint '' is missing or malformed"),
        (("models", 0, "name"), ..., "models[0].name '' is missing or malformed"),
        (("config", "commit"), None, "config.commit None is missing or malformed"),
        (("base_image", "size"), 1, "base_image {"),
    ],
)
def test_malformed_provenance_is_one_config_error(
    path: tuple[str | int, ...], value: Any, message: str
) -> None:
    """A malformed record, even read as an image's own, is one ConfigError line naming where
    it was read and the key (explain turns it into an ImageError)."""
    with pytest.raises(ConfigError) as caught:
        Provenance.from_dict(_broken(path, value), "img", recorded=True)
    assert str(caught.value).startswith(f"img: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)


PROVENANCE_MEMBER = "app/config/provenance.json"
FORMAT2_IMAGE = Path(__file__).parent / "data" / "format2-image"


def _with_provenance(layout: Path, raw: bytes) -> None:
    """Put ``raw`` as /app/config/provenance.json into the image layer that holds it (the
    layer no longer hashes to its digest, as when an attacker edits a blob in place)."""
    for blob in (layout / "blobs" / "sha256").iterdir():
        try:
            with tarfile.open(blob, "r:gz") as tar:
                members = [(m, tar.extractfile(m)) for m in tar.getmembers()]
                if PROVENANCE_MEMBER not in {m.name for m, _ in members}:
                    continue
                files = [(m, f.read() if f else None) for m, f in members]
        except tarfile.TarError:
            continue
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for member, data in files:
                content = raw if member.name == PROVENANCE_MEMBER else data
                member.size = len(content) if content is not None else member.size
                tar.addfile(member, io.BytesIO(content) if content is not None else None)
        blob.write_bytes(out.getvalue())
        return
    raise AssertionError("no layer holds provenance.json")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "/app/config/provenance.json is not JSON (altered?)"),
        (
            json.dumps({**_written_provenance(), "provenance_version": 2}).encode(),
            "/app/config/provenance.json has provenance_version 2, which this version cannot read",
        ),
        (
            json.dumps(_broken(("models", 0, "files"), "x")).encode(),
            "app/config/provenance.json: models[0].files 'x' is missing or malformed",
        ),
    ],
)
def test_explain_refuses_a_malformed_provenance_in_one_line(
    tmp_path: Path, raw: bytes, message: str
) -> None:
    """`builder explain` of an image whose provenance.json is altered: one error line of the
    image class (exit 6), no traceback, whether it is not JSON, of another version or breaks
    the schema."""
    layout = tmp_path / "image"
    shutil.copytree(FORMAT2_IMAGE, layout)
    _with_provenance(layout, raw)
    done = run_cli("explain", f"oci:{layout}:2.4.1", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert done.returncode == ImageError.exit_code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]


def test_build_report_round_trip() -> None:
    """The build report's JSON form is its dataclass fields, and reads back equal."""
    report = BuildReport(
        customer="customer-x",
        image=REPORT["image"],
        tags=list(REPORT["tags"]),
        manifest_digest=REPORT["manifest_digest"],
        config_digest="sha256:" + "1" * 64,
        config_commit=REPORT["config_commit"],
        base=dict(REPORT["base"]),
        models=[ModelRecord.from_dict(m) for m in REPORT["models"]],
        layers=[
            LayerReport("base", "sha256:" + "2" * 64, 10, "application/x", False),
            LayerReport("config", "sha256:" + "3" * 64, 20, "application/x", True, "uploaded"),
        ],
        development=False,
        outputs={"registry": "x"},
        timings={"cook": 0.5},
        warnings=["w"],
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data == json.loads(json.dumps(asdict(report)))  # the fields, models as written
    assert data["models"] == REPORT["models"]
    assert BuildReport.from_dict(data) == report
    with pytest.raises(ConfigError, match="manifest_digest"):
        BuildReport.from_dict({**data, "manifest_digest": 1})


def test_publish_manifest_bytes_and_round_trip() -> None:
    """publish-manifest.json keeps its keys and bytes; an older one without the optional keys
    still reads."""
    manifest = PublishManifest(
        files=(FileDigest("model.onnx", 12, "e" * 64),),
        model_id="m1",
        model_name="carcinoma",
        task_id="t1",
        source_uri="s3://training/t1/model.onnx",
        published_by="ci",
        published_at="2026-01-02T03:04:05Z",
    )
    golden = (
        '{\n  "files": [\n    {\n      "name": "model.onnx",\n      "sha256": "'
        + "e" * 64
        + '",\n      "size": 12\n    }\n  ],\n  "manifest_version": 1,\n  "model_id": "m1",\n'
        '  "model_name": "carcinoma",\n  "published_at": "2026-01-02T03:04:05Z",\n'
        '  "published_by": "ci",\n  "source_uri": "s3://training/t1/model.onnx",\n'
        '  "task_id": "t1"\n}'
    )
    assert manifest.to_bytes().decode() == golden
    assert PublishManifest.from_dict(json.loads(golden)) == manifest
    old = PublishManifest.from_dict({"files": [manifest.files[0].to_dict()]})
    assert old.files == manifest.files and old.model_id is None


@pytest.mark.parametrize("customer", ["customer-x", "customer-y", "customer-z"])
def test_lock_reads_and_writes_the_committed_lock_byte_for_byte(customer: str) -> None:
    """The bundled customers' committed locks (written by `builder lock` before the Lock type
    existed) read into a Lock that renders the very same bytes, and round-trips."""
    path = Path(__file__).parents[1] / "customers" / customer / "customer.lock.yaml"
    raw = path.read_bytes()
    lock = Lock.from_dict(yaml.safe_load(raw), str(path))
    assert render(lock) == raw
    assert Lock.from_dict(lock.to_dict()) == lock
    assert lock.customer == customer and lock.models


def test_lock_refuses_a_malformed_entry_in_one_line() -> None:
    path = Path(__file__).parents[1] / "customers" / "customer-x" / "customer.lock.yaml"
    data = yaml.safe_load(path.read_bytes())
    name = sorted(data["models"])[0]
    data["models"][name]["files"][0]["sha256"] = "not-a-digest"
    with pytest.raises(ConfigError, match=rf"models\.{name}\.files\[0\]\.sha256") as info:
        Lock.from_dict(data, "customer.lock.yaml")
    assert "\n" not in str(info.value)
