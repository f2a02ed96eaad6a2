"""Typed documents: each reads back what it writes, and writes the bytes it always wrote."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any, cast

import pytest
import yaml

from builder import __version__, yamldoc
from builder.contracts import WeightFile
from builder.cook.lock import render
from builder.documents import FileDigest, ModelRecord
from builder.documents.build_report import BuildReport, LayerReport
from builder.documents.lock import Lock
from builder.documents.provenance import Provenance
from builder.documents.publish_manifest import PublishManifest
from builder.documents.release_record import ReleaseRecord
from builder.errors import ConfigError
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
