"""history, diff, explain, verify and the audit report, end to end through the real CLI.

One customer repository gets real history (config, lock, threshold change, model swap, base
bump, two releases with signed attestations), built against the test-bed registry with real
images. The report is rendered by headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    ANALYSIS_YAML,
    CARCINOMA_ID,
    CARCINOMA_TASK,
    CUSTOMER_YAML,
    MITOSIS_ID,
    MITOSIS_TASK,
    SeedModel,
    commit_files,
    push_labelled_bases,
    run_cli,
    seed_models,
)
from test_attest import openssl_keys

from builder.audit.text import human_date

BASE_REPO = "ivd/audit-base"
BASE_VERSIONS = ("2.4.1", "2.5.0")
MITOSIS2_ID = "9b0e6d1c2a3f4e5d8c7b6a5f4e3d2c1b"
MITOSIS2_TASK = "77c1e2d3c4b5a6978877665544332211"
CARCINOMA = os.urandom(128 * 1024)  # incompressible: an uncompressed layer
MITOSIS = b"mitosis-weights" * 2048
MITOSIS2 = b"mitosis-weights-v2" * 2048
T0 = 1_780_000_000
DAY = 86_400
QUALITY = "Dr. Quality <quality@example.com>"
REVIEWER = "Dr. Rev Iewer <rev@example.com>"
SWAP_REASON = "The fine-tuned mitosis model lowers false positives on stain B."


@dataclass
class World:
    """The customer repository, its builds and the environment the CLI runs in."""

    repo: Path
    env: dict[str, str]
    key: Path
    public: Path
    commits: dict[str, str] = field(default_factory=dict)
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)  # build reports
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # their release records
    layouts: dict[str, Path] = field(default_factory=dict)
    archive: Path = Path()
    base_repository: str = ""


def _later(built_at: str, *, days: int) -> str:
    """A build time ``days`` after ``built_at`` (records are ordered by build time)."""
    moment = datetime.fromisoformat(built_at.replace("Z", "+00:00")) + timedelta(days=days)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(record: dict[str, Any]) -> str:
    return human_date(record["built_at"])


def cli_json(world: World, *args: str, code: int = 0) -> dict[str, Any]:
    result = run_cli(*args, "--json", env=world.env)
    if result.returncode != code:
        failed = re.findall(r'"detail": "[^"]*",\s*"name": "[^"]*",\s*"ok": false', result.stdout)
        raise AssertionError(
            f"exit {result.returncode}: {failed or result.stdout[-2000:]} {result.stderr[-2000:]}"
        )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc["result"] if doc.get("ok") else doc


def cli_fail(world: World, *args: str) -> tuple[int, str]:
    result = run_cli(*args, env=world.env)
    assert result.returncode != 0, result.stdout
    return result.returncode, result.stderr.strip().splitlines()[-1]


def lock_and_commit(world: World, message: str, when: int) -> str:
    locked = run_cli("lock", str(world.repo), env=world.env)
    assert locked.returncode == 0, locked.stderr
    lock = (world.repo / "customer.lock.yaml").read_bytes()
    return commit_files(world.repo, {"customer.lock.yaml": lock}, message, when=when)


def record_release(world: World, report: dict[str, Any], job: str) -> dict[str, Any]:
    """Record a pushed release the way CI does: `builder release-record` onto the repo's
    ivd-releases branch. Returns the record as committed."""
    path = world.repo.parent / f"report-{len(world.releases)}.json"
    path.write_text(json.dumps({"builder_result_version": 1, "ok": True, "result": report}))
    env = {**world.env, "CI_JOB_URL": job}
    done = run_cli(
        "release-record", "--report", str(path), "--repo", str(world.repo), "--json", env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (written,) = json.loads(done.stdout)["result"]["records"]
    text = subprocess.run(
        ["git", "-C", str(world.repo), "show", f"ivd-releases:{written['path']}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    record: dict[str, Any] = yaml.safe_load(text)
    record["_path"] = written["path"]
    return record


def build(world: World, name: str, *extra: str) -> dict[str, Any]:
    layout = world.repo.parent / f"layout-{name}"
    report = cli_json(
        world,
        "build",
        str(world.repo),
        "--push",
        "--oci-layout",
        str(layout),
        "--sign-key",
        str(world.key),
        *extra,
    )
    world.layouts[name] = layout
    return report


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    docker_engine: Any,
    oci_registry: Any,
    base_os_image: str,
) -> World:
    """Config history with locks, a threshold change, a model swap, a base bump, two releases."""
    root = tmp_path_factory.mktemp("audit")
    repository = push_labelled_bases(
        docker_engine,
        oci_registry.host,
        base_os_image,
        BASE_REPO,
        dict.fromkeys(BASE_VERSIONS, "1"),
    )
    models = seed_models(
        root,
        [
            SeedModel(CARCINOMA_ID, CARCINOMA_TASK, "carcinoma v3", {"model.onnx": CARCINOMA}),
            SeedModel(MITOSIS_ID, MITOSIS_TASK, "mitosis v1", {"model.onnx": MITOSIS}),
            SeedModel(MITOSIS2_ID, MITOSIS2_TASK, "mitosis v2", {"model.onnx": MITOSIS2}),
        ],
    )
    key, public = openssl_keys(root)
    env = {
        **docker_engine.env(),
        **models.env(),
        "BUILDER_BASE_REPOSITORY": repository,
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/audit",
        "BUILDER_CACHE_DIR": str(root / "cache"),
        "CI_JOB_URL": "https://gitlab.example.com/ivd/images/-/jobs/1",
    }
    w = World(repo=root / "customer-x", env=env, key=key, public=public, base_repository=repository)

    def config(*, base: str, mitosis: str, threshold: float, message: str, when: int) -> str:
        files = {
            "customer.yaml": CUSTOMER_YAML.format(name="customer-x", base=base),
            "analysis.yaml": ANALYSIS_YAML.format(
                carcinoma=CARCINOMA_ID, mitosis=mitosis, threshold=threshold
            ),
        }
        return commit_files(w.repo, files, message, when=when)

    w.commits["initial"] = config(
        base="2.4.1", mitosis=MITOSIS_ID, threshold=0.5, message="initial config", when=T0
    )
    w.commits["lock1"] = lock_and_commit(
        w, f"lock models and base\n\nApproved-by: {QUALITY}", T0 + DAY
    )
    first = build(w, "r1", "--docker-archive", str(root / "r1.tar"))
    w.archive = root / "r1.tar"
    w.releases["r1"] = first
    w.records["r1"] = record_release(w, first, "https://gitlab.example.com/ivd/images/-/jobs/1")
    w.commits["threshold"] = config(
        base="2.4.1",
        mitosis=MITOSIS_ID,
        threshold=0.6,
        message="raise carcinoma threshold",
        when=T0 + 3 * DAY,
    )
    # the parameter change's approval sits on its re-lock commit (the reviewer's report)
    w.commits["lock2"] = lock_and_commit(w, f"relock\n\nApproved-by: {REVIEWER}", T0 + 4 * DAY)
    w.commits["swap"] = config(
        base="2.4.1",
        mitosis=MITOSIS2_ID,
        threshold=0.6,
        message=f"mitosis v2\n\n{SWAP_REASON}",
        when=T0 + 5 * DAY,
    )
    w.commits["lock3"] = lock_and_commit(w, "relock for mitosis v2", T0 + 6 * DAY)
    w.commits["bump"] = config(
        base="2.5.0", mitosis=MITOSIS2_ID, threshold=0.6, message="base 2.5.0", when=T0 + 7 * DAY
    )
    w.commits["lock4"] = lock_and_commit(
        w, f"relock for base 2.5.0\n\nApproved-by: {QUALITY}", T0 + 8 * DAY
    )
    second = build(w, "r2")
    w.releases["r2"] = second
    w.records["r2"] = record_release(w, second, "https://gitlab.example.com/ivd/images/-/jobs/2")
    assert first["config_commit"] == w.commits["lock1"]
    assert second["config_commit"] == w.commits["lock4"]
    return w


# -- history and diff --------------------------------------------------------------------


def test_history_tells_each_revision_in_resolved_terms(world: World) -> None:
    hist = cli_json(world, "history", str(world.repo))
    entries = hist["entries"]
    order = ["initial", "lock1", "threshold", "lock2", "swap", "lock3", "bump", "lock4"]
    assert [e["revision"]["commit"] for e in entries] == [world.commits[k] for k in order]
    texts = {
        name: [c["text"] for c in e["changes"]] for name, e in zip(order, entries, strict=True)
    }
    # The first revision has no lock: its models come from the registry as it is now, and the
    # history says so instead of presenting them as a recorded state.
    now = " [registry as it is now, not a recorded value]"
    assert texts["initial"] == [
        f'carcinoma_model: "carcinoma v3" {CARCINOMA_ID[:8]} (task {CARCINOMA_TASK[:8]}){now}',
        f'mitosis_model: "mitosis v1" {MITOSIS_ID[:8]} (task {MITOSIS_TASK[:8]}){now}',
        "base constraint 2.4.1",
    ]
    unrecorded = [c for c in entries[0]["changes"] if c["unrecorded"]]
    assert len(unrecorded) == 2
    assert any(t.startswith("base pinned 2.4.1 (") for t in texts["lock1"])
    assert "models pinned by customer.lock.yaml" in texts["lock1"]
    assert "Carcinoma threshold 0.5 -> 0.6" in texts["threshold"]
    assert (
        f'mitosis_model: "mitosis v1" {MITOSIS_ID[:8]} (task {MITOSIS_TASK[:8]}) -> '
        f'"mitosis v2" {MITOSIS2_ID[:8]} (task {MITOSIS2_TASK[:8]}){now}'
    ) in texts["swap"]
    assert "base constraint 2.4.1 -> 2.5.0" in texts["bump"]
    assert "base pinned 2.4.1 -> 2.5.0" in texts["lock4"]
    # who approved what: a release's approval covers every change since the previous release
    approvals = {
        name: (e["approval"]["status"], [a["who"] for a in e["approval"]["approvals"]])
        for name, e in zip(order, entries, strict=True)
    }
    assert approvals == {
        "initial": ("covered", [QUALITY]),
        "lock1": ("approved", [QUALITY]),
        "threshold": ("covered", [REVIEWER, QUALITY]),  # lock2's approval, then lock4's
        "lock2": ("approved", [REVIEWER, QUALITY]),
        "swap": ("covered", [QUALITY]),
        "lock3": ("covered", [QUALITY]),
        "bump": ("covered", [QUALITY]),
        "lock4": ("approved", [QUALITY]),
    }
    threshold = entries[2]["approval"]
    assert threshold["later"] == world.commits["lock2"]
    assert threshold["release"] == world.releases["r2"]["image"]
    assert threshold["sentence"] == (
        f'covered by the approval on the later revision {world.commits["lock2"][:12]} "relock": '
        f"Approved-by: {REVIEWER}; Approved-by: {QUALITY}, released as "
        f"{world.releases['r2']['image']}"
    )
    assert entries[4]["revision"]["reason"] == f"mitosis v2\n\n{SWAP_REASON}"
    assert hist["unapproved"] == []
    first = entries[0]
    assert (
        first["revision"]["author"] == "Test Author"
        and first["revision"]["message"] == "initial config"
    )
    assert first["revision"]["date"] == "2026-05-28T20:26:40Z"
    released = {
        e["revision"]["commit"]: [r["image"] for r in e["releases"]]
        for e in entries
        if e["releases"]
    }
    assert released == {
        world.commits["lock1"]: [world.releases["r1"]["image"]],
        world.commits["lock4"]: [world.releases["r2"]["image"]],
    }
    assert hist["problems"] == []
    # Between a config change and its lock, the stale lock is not used, and the output says so.
    assert any("stale" in n for n in entries[2]["config"]["notes"])

    human = run_cli("history", str(world.repo), env=world.env)
    assert human.returncode == 0, human.stderr
    assert (
        f"released: {world.releases['r2']['image']}@{world.releases['r2']['manifest_digest']}"
        in human.stdout
    )
    assert f"    {SWAP_REASON}" in human.stdout.splitlines()
    assert f"    approved: Approved-by: {REVIEWER}" in human.stdout


def test_diff_between_releases(world: World) -> None:
    result = cli_json(
        world, "diff", str(world.repo), world.commits["lock1"], world.commits["lock4"]
    )
    texts = [c["text"] for c in result["changes"]]
    assert texts == [
        f'mitosis_model: "mitosis v1" {MITOSIS_ID[:8]} (task {MITOSIS_TASK[:8]}) -> '
        f'"mitosis v2" {MITOSIS2_ID[:8]} (task {MITOSIS2_TASK[:8]})',
        "Carcinoma threshold 0.5 -> 0.6",
        "base constraint 2.4.1 -> 2.5.0",
        "base pinned 2.4.1 -> 2.5.0",
    ]
    # each change names the revisions that made it; each revision its reason and approval
    made = {c["text"]: c["revisions"] for c in result["changes"]}
    assert made["Carcinoma threshold 0.5 -> 0.6"] == [world.commits["threshold"]]
    assert made["base pinned 2.4.1 -> 2.5.0"] == [world.commits["lock4"]]
    order = ["threshold", "lock2", "swap", "lock3", "bump", "lock4"]
    assert [r["revision"]["commit"] for r in result["revisions"]] == [
        world.commits[k] for k in order
    ]
    assert [r["approval"]["status"] for r in result["revisions"]] == [
        "covered", "approved", "covered", "covered", "covered", "approved"
    ]  # fmt: skip
    human = run_cli("diff", str(world.repo), world.commits["lock1"][:10], "HEAD", env=world.env)
    assert human.returncode == 0, human.stderr
    line = next(ln for ln in human.stdout.splitlines() if "Carcinoma threshold" in ln)
    assert line == f"  Carcinoma threshold 0.5 -> 0.6  [{world.commits['threshold'][:12]}]"
    assert f"      approved: Approved-by: {REVIEWER}" in human.stdout
    same = cli_json(world, "diff", str(world.repo), "HEAD", "HEAD")
    assert same["changes"] == []


def test_diff_of_a_revision_that_does_not_exist(world: World) -> None:
    code, line = cli_fail(world, "diff", str(world.repo), "v9.9", "HEAD")
    assert code == 2
    assert "'v9.9' does not exist: it is neither a ref of the customer repository nor a " in line
    assert "release of customer-x (2 recorded on " in line
    code, line = cli_fail(world, "history", str(world.repo), "--ref", "0" * 40)
    assert code == 2 and "does not exist" in line


# -- explain -----------------------------------------------------------------------------


def _check(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in result["checks"] if c["name"] == name)


@pytest.mark.parametrize("form", ["registry", "layout", "archive"])
def test_explain_reads_everything_back(world: World, form: str) -> None:
    release = world.releases["r1"]
    reference = {
        "registry": release["image"],
        "layout": f"oci:{world.layouts['r1']}:{release['image'].rsplit(':', 1)[1]}",
        "archive": str(world.archive),
    }[form]
    result = (
        cli_json(world, "explain", reference, "--public-key", str(world.public))
        if form != "archive"
        else cli_json(world, "explain", reference)
    )
    assert result["ok_checks"] is True
    assert result["manifest_digest"] == release["manifest_digest"]
    prov = result["provenance"]
    assert prov["customer"] == "customer-x"
    assert prov["config"]["commit"] == world.commits["lock1"]
    # A location-free image records no repository (customer.yaml declares none): the
    # attestation attached to it (a docker archive: the one this machine's build wrote) does.
    assert prov["config"]["repository"] is None
    assert result["sources"] == [world.repo.as_uri()]
    assert result["base"] == {**release["base"], "constraint": "2.4.1"}
    models = {m["name"]: m for m in prov["models"]}
    assert models["mitosis_model"]["registry_id"] == MITOSIS_ID
    assert models["mitosis_model"]["task_id"] == MITOSIS_TASK
    assert {f["status"] for f in result["files"]} == {"ok"}
    sha = {(f["model"], f["file"]): f["image_sha256"] for f in result["files"]}
    assert sha[("carcinoma_model", "model.onnx")] == hashlib.sha256(CARCINOMA).hexdigest()
    assert prov["builder"]["name"] == "ivd-image-builder"
    tag = release["image"].rsplit(":", 1)[1]
    assert result["release"]["path"] == f"releases/customer-x/{tag}.yaml"
    assert "branch ivd-releases" in result["release_note"]
    if form == "archive":  # docker archives carry no referrers: the time comes from the record
        assert result["attestations"] == []
        assert (result["built_at"], result["built_at_source"]) == (
            world.records["r1"]["built_at"],
            "release record",
        )
    else:
        kinds = {a["kind"]: a for a in result["attestations"]}
        assert kinds["provenance"]["signature"] == "valid"
        assert "sbom" in kinds
        assert result["built_at_source"] == "provenance attestation"
        assert result["ci_url"] == "https://gitlab.example.com/ivd/images/-/jobs/1"
        assert _check(result, "provenance subject")["ok"]
        assert _check(result, "SBOM digest")["ok"]
    verdict = result["verdict"]
    assert verdict["recorded_release"] is True and verdict["files_intact"] is True
    if form == "archive":  # no attestations travel in a docker archive: say unsigned
        assert (verdict["signed"], verdict["signature"]) == (False, "unsigned")
    else:
        assert (verdict["signed"], verdict["signature"]) == (True, "valid")
        assert len(verdict["signed_by"]) == 1
    human = run_cli("explain", reference, env=world.env)
    assert human.returncode == 0, human.stderr
    first = human.stdout.splitlines()[0]
    if form == "archive":
        assert first == (
            "verdict      recorded release: yes | signed: no (unsigned) | files intact: yes"
        )
    else:  # without --public-key the signature is attached but not checked
        assert first.startswith("verdict      recorded release: yes | signed: yes, by key ")
        assert first.endswith("(not checked) | files intact: yes")
    assert "checks" not in human.stdout.split("release      ", 1)[1]
    assert f"mitosis_model: {MITOSIS_ID} (mitosis v1) task {MITOSIS_TASK}" in human.stdout
    assert f"sha256 {hashlib.sha256(CARCINOMA).hexdigest()}  ok" in human.stdout


def test_explain_with_another_public_key_fails_the_signature(world: World, tmp_path: Path) -> None:
    _, other = openssl_keys(tmp_path, "other")
    result = cli_json(
        world, "explain", world.releases["r2"]["image"], "--public-key", str(other), code=10
    )
    assert result["ok_checks"] is False
    assert (
        "no signature of the DSSE envelope verifies"
        in _check(result, "provenance signature")["detail"]
    )


def test_explain_an_image_not_built_by_the_tool(world: World) -> None:
    code, line = cli_fail(world, "explain", f"{world.base_repository}:2.4.1")
    assert code == 6
    assert "was not built by ivd-image-builder" in line and "com.ivd.customer" in line


def test_explain_bad_references(world: World, tmp_path: Path) -> None:
    code, line = cli_fail(world, "explain", str(tmp_path / "nothing-here"))
    assert code == 6 and "no such OCI layout or docker archive" in line
    code, line = cli_fail(world, "explain", f"oci:{world.layouts['r1']}:no-such-tag")
    assert code == 6 and "no image 'no-such-tag'" in line
    (tmp_path / "notes.txt").write_text("not an image")
    code, line = cli_fail(world, "explain", str(tmp_path / "notes.txt"))
    assert code == 6 and "not a readable docker archive" in line


def _tamper(layout: Path, tag: str, model: str, data: bytes) -> str:
    """Replace a model file inside its layer and re-seal the image (new diff_id, config,
    manifest), keeping labels and provenance.json: what an attacker with write access does."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
    )
    blob = layout / "blobs" / "sha256"
    manifest = json.loads((blob / entry["digest"][7:]).read_bytes())
    position = next(
        i
        for i, d in enumerate(manifest["layers"])
        if d.get("annotations", {}).get("com.ivd.layer.name") == model
    )
    old = manifest["layers"][position]
    gzipped = old["mediaType"].endswith("+gzip")
    raw = (blob / old["digest"][7:]).read_bytes()
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw) if gzipped else raw)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for member in src:
            if member.isfile():
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
            else:
                dst.addfile(member)
    diff_id = "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    layer = gzip.compress(out.getvalue(), mtime=0) if gzipped else out.getvalue()
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    (blob / digest[7:]).write_bytes(layer)
    config = json.loads((blob / manifest["config"]["digest"][7:]).read_bytes())
    config["rootfs"]["diff_ids"][position] = diff_id
    config_bytes = json.dumps(config).encode()
    (blob / hashlib.sha256(config_bytes).hexdigest()).write_bytes(config_bytes)
    manifest["config"].update(
        digest="sha256:" + hashlib.sha256(config_bytes).hexdigest(), size=len(config_bytes)
    )
    manifest["layers"][position] = dict(old, digest=digest, size=len(layer))
    manifest_bytes = json.dumps(manifest).encode()
    (blob / hashlib.sha256(manifest_bytes).hexdigest()).write_bytes(manifest_bytes)
    entry.update(
        digest="sha256:" + hashlib.sha256(manifest_bytes).hexdigest(), size=len(manifest_bytes)
    )
    (layout / "index.json").write_text(json.dumps(index))
    return str(entry["digest"])


def test_tampered_model_file_is_flagged_by_explain_and_verify(world: World, tmp_path: Path) -> None:
    layout = tmp_path / "tampered"
    shutil.copytree(world.layouts["r1"], layout)
    tag = world.releases["r1"]["image"].rsplit(":", 1)[1]
    forged = bytearray(CARCINOMA)
    forged[1000] ^= 0xFF
    digest = _tamper(layout, tag, "carcinoma_model", bytes(forged))
    reference = f"oci:{layout}:{tag}"

    result = cli_json(world, "explain", reference, code=10)
    check = _check(result, "/app/models/carcinoma_model/model.onnx")
    assert not check["ok"] and check["detail"].startswith("MODIFIED")
    assert _check(result, "/app/models/mitosis_model/model.onnx")["ok"]
    assert result["release"] is None  # the digest changed
    assert result["attestations"] == []  # the signed attestations name the original digest
    assert result["sources"] == []  # so nothing names the config repository any more
    human = run_cli("explain", reference, env=world.env)
    assert human.returncode == 10
    assert (
        f"FAILED       /app/models/carcinoma_model/model.onnx: MODIFIED: sha256 {hashlib.sha256(forged).hexdigest()[:12]}"
        in human.stdout
    )

    code, line = cli_fail(world, "verify", reference)
    assert code == 2 and "the image records no config repository" in line and "--repo" in line
    verified = cli_json(world, "verify", reference, "--repo", str(world.repo), code=10)
    assert verified["match"] is False
    assert verified["manifest_digest"] == digest
    assert verified["rebuilt_digest"] == world.releases["r1"]["manifest_digest"]
    assert any(
        d.startswith("/app/models/carcinoma_model/model.onnx: ") for d in verified["differences"]
    )
    assert any(d.startswith("layer carcinoma_model: ") for d in verified["differences"])


# -- verify ------------------------------------------------------------------------------


def test_verify_rebuilds_bit_for_bit(world: World) -> None:
    release = world.releases["r2"]
    result = cli_json(world, "verify", release["image"])
    assert result["match"] is True, result["differences"]
    assert result["rebuilt_digest"] == release["manifest_digest"]
    assert result["commit"] == world.commits["lock4"] and result["locked"] is True
    assert result["differences"] == []
    human = run_cli(
        "verify",
        f"oci:{world.layouts['r1']}:{world.releases['r1']['image'].rsplit(':', 1)[1]}",
        env=world.env,
    )
    assert human.returncode == 0, human.stdout + human.stderr
    assert "MATCH" in human.stdout.splitlines()


def test_verify_needs_the_recorded_commit(world: World, tmp_path: Path) -> None:
    """A clone without the recorded commit: one line saying what is missing."""
    clone = tmp_path / "shallow"
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    commit_files(clone, {"customer.yaml": "x: 1\n"}, "unrelated")
    code, line = cli_fail(world, "verify", world.releases["r1"]["image"], "--repo", str(clone))
    assert (
        code == 2
        and f"cannot read the recorded config commit {world.commits['lock1'][:12]}" in line
    )


# -- release records ---------------------------------------------------------------------


def _own_records(clone: Path) -> None:
    """Make a clone hold its own release records (no origin to read them from)."""
    subprocess.run(
        ["git", "-C", str(clone), "branch", "ivd-releases", "origin/ivd-releases"], check=True
    )
    subprocess.run(["git", "-C", str(clone), "remote", "remove", "origin"], check=True)


def _add_record(clone: Path, name: str, record: dict[str, Any]) -> None:
    """Commit one more file on the clone's ivd-releases branch (through a scratch work tree)."""
    work = clone.parent / f"records-{name}"
    subprocess.run(
        ["git", "-C", str(clone), "worktree", "add", "-q", str(work), "ivd-releases"], check=True
    )
    commit_files(
        work, {f"releases/customer-x/{name}.yaml": yaml.safe_dump(record)}, f"record {name}"
    )
    subprocess.run(["git", "-C", str(clone), "worktree", "remove", str(work)], check=True)


def test_release_record_problems(world: World, tmp_path: Path) -> None:
    """A record naming a commit that is not in the history, then a malformed record."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(world.repo), str(clone)], check=True)
    _own_records(clone)
    orphan = dict(world.records["r2"])
    orphan.pop("_path")
    orphan["config"] = dict(orphan["config"], commit="0" * 40)
    orphan["image"] += "-orphan"
    _add_record(clone, "orphan", orphan)
    hist = cli_json(world, "history", str(clone))
    assert hist["problems"] == [
        f"{clone} branch ivd-releases: releases/customer-x/orphan.yaml: config commit "
        f"000000000000 is not a revision of {clone} at HEAD"
    ]
    assert len(hist["releases"]) == 3
    broken = dict(orphan, manifest_digest="latest")
    _add_record(clone, "broken", broken)
    code, line = cli_fail(world, "history", str(clone))
    assert code == 2
    assert (
        "releases/customer-x/broken.yaml: manifest_digest 'latest' is missing or malformed" in line
    )


def test_audit_verify_fails_when_a_release_cannot_be_verified(world: World, tmp_path: Path) -> None:
    """`audit --verify` exits 10 when a recorded release could not be verified and says why in
    one line; neither that line nor the report names a path of this machine's cache."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(world.repo), str(clone)], check=True)
    _own_records(clone)
    lost = dict(world.records["r2"])
    lost.pop("_path")
    lost["manifest_digest"] = "sha256:" + "0" * 64  # an image the registry does not have
    work = clone.parent / "records-lost"
    subprocess.run(
        ["git", "-C", str(clone), "worktree", "add", "-q", str(work), "ivd-releases"], check=True
    )
    commit_files(
        work,
        {
            world.records["r1"]["_path"]: None,
            world.records["r2"]["_path"]: None,
            "releases/customer-x/lost.yaml": yaml.safe_dump(lost),
        },
        "only a release whose image is gone",
    )
    subprocess.run(["git", "-C", str(clone), "worktree", "remove", str(work)], check=True)
    html = tmp_path / "audit.html"
    result = run_cli("audit", str(clone), "--html", str(html), "--verify", env=world.env)
    assert result.returncode == 10, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("not verified: ")]
    assert line.startswith(f"not verified: {lost['image']}: ")
    assert "0000000000" in line  # what could not be read
    cache = world.env["BUILDER_CACHE_DIR"]
    assert cache not in result.stderr and cache not in html.read_text()


def test_history_and_audit_without_release_records(world: World, tmp_path: Path) -> None:
    """No records branch at all: history and the report say nothing was released."""
    clone = tmp_path / "norecords"
    subprocess.run(
        ["git", "clone", "-q", "--single-branch", str(world.repo), str(clone)], check=True
    )
    subprocess.run(["git", "-C", str(clone), "remote", "remove", "origin"], check=True)
    hist = cli_json(world, "history", str(clone))
    assert hist["releases"] == [] and all(e["releases"] == [] for e in hist["entries"])
    report = tmp_path / "audit.html"
    cli_json(world, "audit", str(clone), "--html", str(report))
    assert "No release of <strong>customer-x</strong> is recorded" in report.read_text()


# -- the HTML report ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (a fresh CI machine lacks it)."""
    from testbed._util import ensure_command

    return ensure_command("chromium", "chromium")


def _high(fd: int) -> int:
    """``fd`` moved to a number above 9, so that putting pipes on 3 and 4 clobbers none."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-separated JSON on file descriptors 3 and 4), so a test can load a page with screen or
    print media at a given width, read its layout and take screenshots; no extra library."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser, self._writer = (_high(fd) for fd in os.pipe())
        self._reader, from_browser = (_high(fd) for fd in os.pipe())
        # the browser reads commands on fd 3 and answers on fd 4: bash puts the pipes there
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', chromium,
             "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return dict(reply.get("result") or {})
            self.events.append(reply)

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._reader, 1 << 16)
            assert chunk, "chromium closed the DevTools pipe"
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    def load(self, page: Path, *, width: int, media: str = "screen") -> None:
        """Open ``page`` in a window ``width`` CSS pixels wide with ``media`` styles applied."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=900,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.call("Emulation.setEmulatedMedia", session=True, media=media)
        self.events.clear()
        self.call("Page.navigate", session=True, url=page.as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive())

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True)  # fmt: skip
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """The whole page (not only the window) as a PNG."""
        shot = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True)  # fmt: skip
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def console(self) -> list[str]:
        """Console messages, uncaught exceptions and browser log entries (failed or refused
        loads, CSP violations) since the load."""
        out = []
        for event in self.events:
            if event.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value")) for a in event["params"]["args"]))
            elif event.get("method") == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                out.append(str((details.get("exception") or {}).get("description") or details))
            elif event.get("method") == "Log.entryAdded":
                out.append(str(event["params"]["entry"].get("text")))
        return out

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close")
        self.process.wait(timeout=30)
        os.close(self._writer)
        os.close(self._reader)


#: Every identifier element: how many line boxes it takes and whether it fits its box.
_IDENTIFIERS = """
[...document.querySelectorAll('.id')].map(el => {
  const box = el.getBoundingClientRect();
  const holder = el.closest('td, li, p, div, h3, dd').getBoundingClientRect();
  return {text: el.textContent, lines: el.getClientRects().length,
          overflow: Math.max(0, box.right - holder.right)};
})
"""


def identifier_problems(tools: DevTools) -> list[str]:
    """Identifiers broken across lines or sticking out of their cell, as readable lines."""
    found = tools.evaluate(_IDENTIFIERS)
    assert found, "no identifier on the page"
    return [
        f"{i['text']!r}: {i['lines']} lines, {i['overflow']:.0f} px beyond its box"
        for i in found
        if i["lines"] != 1 or i["overflow"] > 1
    ]


@pytest.fixture
def devtools(chromium: str, tmp_path: Path) -> Any:
    tools = DevTools(chromium, tmp_path / "profile")
    yield tools
    tools.close()


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.resources: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "a":  # a link is followed by the reader, never loaded by the page
            self.links += [v or "" for k, v in attrs if k == "href"]
            return
        self.resources += [
            v or "" for k, v in attrs if k in ("src", "href", "srcset", "data", "poster")
        ]

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    @property
    def text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.parts))


#: A4 less the report's 12 mm side margins (186 mm) in CSS pixels: the printed line's width.
PRINT_WIDTH = round(186 / 25.4 * 96)


def test_audit_report_renders_in_chromium(world: World, devtools: DevTools, tmp_path: Path) -> None:
    """The page a reviewer reads, rendered by Chromium on screen and with print styles at the
    width of an A4 line: the five questions answered up top, no identifier broken across
    lines or sticking out of its cell, nothing loaded from anywhere."""
    report = tmp_path / "audit.html"
    summary = cli_json(world, "audit", str(world.repo), "--html", str(report))
    assert summary["revisions"] == 8 and summary["releases"] == 2
    assert summary["unapproved"] == []
    html = report.read_text()
    assert "url(" not in html and "@import" not in html
    parsed = _Text()
    parsed.feed(html)
    assert all(link.startswith("https://") for link in parsed.links)
    assert parsed.resources == [] and not parsed.tags & {
        "script",
        "link",
        "img",
        "iframe",
        "object",
    }
    shots = Path(os.environ.get("AUDIT_SCREENSHOTS") or tmp_path)
    for media, width in (("screen", 1200), ("screen", 760), ("print", PRINT_WIDTH)):
        devtools.load(report, width=width, media=media)
        assert devtools.console() == []
        assert identifier_problems(devtools) == [], (media, width)
        devtools.screenshot(shots / f"audit-{media}-{width}.png")
    devtools.load(report, width=1200)
    text = re.sub(r"\s+", " ", devtools.evaluate("document.body.innerText"))
    r1, r2 = world.releases["r1"], world.releases["r2"]
    tag1, tag2 = r1["image"].rpartition(":")[2], r2["image"].rpartition(":")[2]
    for expected in (
        "Audit report: customer-x",
        f"What runs at customer-x The newest release, built {_when(world.records['r2'])}: "
        f"{r2['image']} digest {r2['manifest_digest']}",
        f"Where each model came from carcinoma_model: carcinoma v3 · registry model {CARCINOMA_ID}"
        f" · training task {CARCINOMA_TASK} model.onnx sha256 {hashlib.sha256(CARCINOMA).hexdigest()}",
        f"Who approved it Approved: Approved-by: {REVIEWER}; Approved-by: {QUALITY}",
        f"What changed since the previous release, and why Since {tag1}",
        "Does it rebuild Not checked in this report",
        "allowed by the configuration: 2.5.0 pinned by the lock of the current revision: 2.5.0",
        r1["manifest_digest"],
        "Carcinoma threshold 0.5 → 0.6",
        f'mitosis_model: "mitosis v1" {MITOSIS_ID[:8]} (task {MITOSIS_TASK[:8]}) → '
        f'"mitosis v2" {MITOSIS2_ID[:8]} (task {MITOSIS2_TASK[:8]})',
        "base shipped 2.4.1 → 2.5.0",
        f"Release {tag2}",
        f"Changed since {tag1}",
        f"Covered by the approval on the later revision {world.commits['lock2'][:12]} “relock”: "
        f"Approved-by: {REVIEWER}",
        SWAP_REASON,
        MITOSIS2_TASK,
        "raise carcinoma threshold",
        "https://gitlab.example.com/ivd/images/-/jobs/2",
        "How to read this report",
    ):
        assert expected in text, expected
    assert "NOT APPROVED" not in text[: text.index("5. How to read this report")]
    lineage = text[text.index("4. Model lineage") : text.index("5. How to read this report")]
    assert lineage.index(MITOSIS_ID) < lineage.index(MITOSIS2_ID)

    # The checks are not vacuous: the same browser sees a script error, a fetch and a broken
    # identifier.
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><img src="http://127.0.0.1:9/x.png"><script>noSuchFunction()</script>'
        '<p style="width: 8em">digest <code class="id">sha256:' + "0" * 64 + "</code></p>"
        "</body></html>"
    )
    devtools.load(bad, width=800)
    assert any("noSuchFunction" in line for line in devtools.console())
    assert len(identifier_problems(devtools)) == 1


# -- the reviewer's path: a customer name or an image reference, nothing else ---------------


def _bare_env(world: World) -> dict[str, str]:
    """The environment of a reviewer: the Docker engine and a cache, no project settings."""
    env = {k: v for k, v in world.env.items() if not k.startswith("BUILDER_")}
    env["BUILDER_CACHE_DIR"] = world.env["BUILDER_CACHE_DIR"]
    for key in [k for k in os.environ if k.startswith("BUILDER_")]:
        env[key] = ""  # run_cli merges os.environ: blank out anything the test process has
    return env


def test_explain_by_customer_name(world: World) -> None:
    """`explain customer-x`: the newest release record, narrowed by base line or date."""
    env = {**world.env, "BUILDER_CUSTOMERS": str(world.repo.parent)}
    r1, r2 = world.releases["r1"], world.releases["r2"]
    newest = run_cli("explain", "customer-x", "--json", env=env)
    assert newest.returncode == 0, newest.stdout + newest.stderr
    doc = json.loads(newest.stdout)["result"]
    assert doc["manifest_digest"] == r2["manifest_digest"]
    assert doc["selected"]["release_image"] == r2["image"]
    assert doc["selected"]["records_total"] == 2
    assert doc["selected"]["registry_note"].endswith("points to this release")
    assert doc["verdict"]["recorded_release"] is True

    older = json.loads(
        run_cli("explain", "customer-x", "--base-version", "2.4", "--json", env=env).stdout
    )["result"]
    assert older["manifest_digest"] == r1["manifest_digest"]
    as_of = json.loads(
        run_cli(
            "explain", "customer-x", "--at", world.records["r1"]["built_at"], "--json", env=env
        ).stdout
    )["result"]
    assert as_of["manifest_digest"] == r1["manifest_digest"]
    # the moving 2.4.1 tag still points to r1
    assert as_of["selected"]["registry_note"].endswith("points to this release")

    human = run_cli("explain", "customer-x", env=env)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].startswith("verdict      recorded release: yes")
    assert lines[1].startswith("shipped      customer-x: newest of 2 matching release record(s)")

    none = run_cli("explain", "customer-x", "--base-version", "1.0", env=env)
    assert none.returncode == 2
    (line,) = none.stderr.strip().splitlines()
    assert "customer customer-x: no release record for base 1.0" in line
    assert "explain an image by its reference" in line
    wrong = run_cli("explain", r2["image"], "--at", "2026-01-01", env=env)
    assert wrong.returncode == 2 and "go with a customer name" in wrong.stderr


def test_verify_from_anywhere_with_only_the_reference(world: World, tmp_path: Path) -> None:
    """No --repo, no project settings, another working directory: still MATCH (the recorded
    repository and production store are used, not the caller's)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(
        "verify", world.releases["r2"]["image"], "--json", env=_bare_env(world), cwd=elsewhere
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    doc = json.loads(result.stdout)["result"]
    assert doc["match"] is True, doc["differences"]


def _run_git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


def _folder_configs(world: World, path: Path) -> Path:
    """A configuration repository holding customer-y in customers/customer-y, locked; its
    customer.yaml declares the repository's address (a server this test cannot reach)."""
    folder = "customers/customer-y"
    declared = "repository: https://gitlab.example.com/ivd/configs.git\n"
    commit_files(
        path,
        {
            f"{folder}/customer.yaml": CUSTOMER_YAML.format(name="customer-y", base="2.4.1")
            + declared,
            f"{folder}/analysis.yaml": ANALYSIS_YAML.format(
                carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.5
            ),
            "README.md": "customer configurations\n",
        },
        "customer-y",
        when=T0,
    )
    locked = run_cli("lock", str(path / folder), env=world.env)
    assert locked.returncode == 0, locked.stderr
    lock = (path / folder / "customer.lock.yaml").read_bytes()
    commit_files(path, {f"{folder}/customer.lock.yaml": lock}, "lock customer-y", when=T0 + DAY)
    return path


def _build_then_verify_elsewhere(
    world: World, tmp_path: Path, target: Path, namespace: str, *, gone: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Push a build of ``target``, remove ``gone`` (the clone it was built from), then verify
    the image by its reference alone from an empty folder with no project settings."""
    registry = world.env["BUILDER_IMAGE_REGISTRY"] + f"-{namespace}"
    env = {**world.env, "BUILDER_IMAGE_REGISTRY": registry}
    built = run_cli("build", str(target), "--push", "--json", env=env)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    report: dict[str, Any] = json.loads(built.stdout)["result"]
    shutil.rmtree(gone)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("verify", report["image"], "--json", env=_bare_env(world), cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    doc: dict[str, Any] = json.loads(result.stdout)["result"]
    assert doc["match"] is True, doc["differences"]
    assert not any(elsewhere.iterdir())  # nothing written where it ran
    return report, doc


def test_verify_clones_a_recorded_bare_repository(world: World, tmp_path: Path) -> None:
    """An image built from a clone of a bare repository: the attestation names the bare path
    (without .git); verify finds it and rebuilds bit for bit from another folder."""
    bare = tmp_path / "server" / "customer-x.git"
    _run_git("clone", "-q", "--bare", str(world.repo), str(bare))
    work = tmp_path / "work" / "customer-x"
    _run_git("clone", "-q", str(bare), str(work))
    _run_git("-C", str(work), "checkout", "-q", world.commits["lock1"])
    _, doc = _build_then_verify_elsewhere(world, tmp_path, work, "bare", gone=work.parent)
    assert doc["repository"] == bare.with_name("customer-x").as_uri()


def test_verify_a_folder_customer_in_a_bare_repository(world: World, tmp_path: Path) -> None:
    """A customer folder inside a bare server repository (``file:///srv/configs#customers/
    customer-y``): `verify REF` from an empty folder reads the folder out of the bare
    repository itself (no work tree anywhere) and says MATCH."""
    configs = _folder_configs(world, tmp_path / "configs")
    bare = tmp_path / "server" / "configs.git"
    _run_git("clone", "-q", "--bare", str(configs), str(bare))
    shutil.rmtree(configs)
    work = tmp_path / "work" / "configs"
    _run_git("clone", "-q", str(bare), str(work))
    report, doc = _build_then_verify_elsewhere(
        world, tmp_path, work / "customers" / "customer-y", "folder", gone=work.parent
    )
    # The image records the declared address (unreachable here); the attestation names where
    # the build read the folder, and that is where verify found it.
    labels = doc["explanation"]["labels"]
    assert labels["org.opencontainers.image.source"] == (
        "https://gitlab.example.com/ivd/configs#customers/customer-y"
    )
    assert doc["repository"] == f"{bare.with_name('configs').as_uri()}#customers/customer-y"
    assert doc["commit"] == report["config_commit"] and doc["locked"] is True
    human = run_cli("verify", report["image"], env=_bare_env(world), cwd=tmp_path)
    assert human.returncode == 0 and "MATCH" in human.stdout.splitlines()


def test_verify_an_image_built_from_a_clone_of_a_work_tree(world: World, tmp_path: Path) -> None:
    """Built from a clone whose origin is another work tree that has its own origin (an
    https server): verify opens that work tree, rebuilds, and the digest matches (nothing
    of either origin is in the image)."""
    upstream = _folder_configs(world, tmp_path / "upstream")
    _run_git(
        "-C", str(upstream), "remote", "add", "origin", "https://gitlab.example.com/ivd/configs.git"
    )
    laptop = tmp_path / "laptop" / "configs"
    _run_git("clone", "-q", str(upstream), str(laptop))
    _, doc = _build_then_verify_elsewhere(
        world, tmp_path, laptop / "customers" / "customer-y", "worktree", gone=laptop.parent
    )
    assert doc["repository"] == f"{upstream.as_uri()}#customers/customer-y"


def test_verify_clones_a_recorded_http_repository(world: World, tmp_path: Path) -> None:
    """A repository served over HTTP on loopback (git's dumb HTTP protocol, a plain web server):
    the attestation names its http address; verify clones it into the cache and says MATCH."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "www"
    bare = served / "customer-x"  # served as http://127.0.0.1:PORT/customer-x
    _run_git("clone", "-q", "--bare", str(world.repo), str(bare))
    _run_git("-C", str(bare), "update-server-info")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/customer-x"
        work = tmp_path / "work" / "customer-x"
        _run_git("clone", "-q", url, str(work))
        report, doc = _build_then_verify_elsewhere(world, tmp_path, work, "http", gone=work.parent)
    finally:
        server.shutdown()
        server.server_close()
    assert doc["repository"] == url
    assert doc["commit"] == report["config_commit"]


def test_diff_says_default_for_unset_values() -> None:
    from builder.audit.history import ResolvedConfig, diff_configs

    def config(params: dict[str, Any]) -> ResolvedConfig:
        return ResolvedConfig(
            commit="0" * 40,
            customer="customer-x",
            base_constraint="2.4.1",
            base_repository=None,
            base=None,
            models={},
            analyses={
                "breast": {
                    "features": {"Carcinoma": {"cls": "Carcinoma", "params": params}},
                    "settings": {},
                }
            },
            resolved_from="lock",
        )

    (change,) = diff_configs(config({}), config({"min_region_area_um2": 750}))
    assert change.text == "Carcinoma min_region_area_um2 (default) -> 750"
    assert (change.lead, change.was, change.now) == (
        "Carcinoma min_region_area_um2",
        "(default)",
        "750",
    )
    assert change.unrecorded is False


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _reviewed_clone(
    world: World, tmp_path: Path, records: dict[str, dict[str, Any]] | None = None
) -> tuple[Path, dict[str, str]]:
    """A clone whose origin is an https GitLab address (git rewrites it to a server copy of
    the repository, holding ``records`` as extra release records) with one change merged
    through a merge request carrying an approval trailer."""
    server = tmp_path / "server" / "customer-x.git"
    subprocess.run(["git", "clone", "-q", "--mirror", str(world.repo), str(server)], check=True)
    for name, record in (records or {}).items():
        _add_record(server, name, record)
    clone = tmp_path / "reviewed" / "customer-x"
    subprocess.run(["git", "clone", "-q", str(server), str(clone)], check=True)
    web = "https://gitlab.example.com/ivd/customer-x"
    _git(clone, "remote", "set-url", "origin", f"{web}.git")
    env = {
        **world.env,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.{server.as_uri()}.insteadOf",
        "GIT_CONFIG_VALUE_0": f"{web}.git",
    }
    default = _git(clone, "rev-parse", "--abbrev-ref", "HEAD")
    _git(clone, "checkout", "-q", "-b", "raise-threshold")
    analysis = (clone / "analysis.yaml").read_text().replace("0.6", "0.7")
    commit_files(clone, {"analysis.yaml": analysis}, "raise threshold to 0.7", when=T0 + 9 * DAY)
    _git(clone, "checkout", "-q", default)
    merge_env = {
        **os.environ,
        "GIT_AUTHOR_DATE": f"@{T0 + 10 * DAY} +0000",
        "GIT_COMMITTER_DATE": f"@{T0 + 10 * DAY} +0000",
    }
    subprocess.run(
        [
            "git", "-C", str(clone), "-c", "user.name=Merger", "-c", "user.email=m@example.com",
            "merge", "-q", "--no-ff", "raise-threshold",
            "-m", "Merge branch 'raise-threshold' into 'main'",
            "-m", "See merge request ivd/customer-x!7",
            "-m", "Approved-by: Dr. Rev Iewer <rev@example.com>\nReviewed-by: QA Person <qa@example.com>",
        ],
        env=merge_env, check=True, capture_output=True,
    )  # fmt: skip
    return clone, env


def test_report_shows_approvals_links_and_unrecorded_tags(world: World, tmp_path: Path) -> None:
    clone, env = _reviewed_clone(world, tmp_path)
    # an image pushed without a release record (a development build of an unreleased revision)
    dev = cli_json(world, "build", str(world.repo), "--ref", world.commits["lock2"], "--push")
    report = tmp_path / "audit.html"
    result = run_cli("audit", str(clone), "--html", str(report), "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["result"]
    assert {t["digest"] for t in summary["unrecorded_tags"]} == {dev["manifest_digest"]}
    html = report.read_text()
    parsed = _Text()
    parsed.feed(html)
    text = parsed.text
    merged = _git(clone, "rev-parse", "HEAD^2")
    assert "Approved-by: Dr. Rev Iewer <rev@example.com>" in text
    assert "Reviewed-by: QA Person <qa@example.com>" in text
    assert "merge request ivd/customer-x!7" in text
    assert f'href="https://gitlab.example.com/ivd/customer-x/-/commit/{merged}"' in html
    assert 'href="https://gitlab.example.com/ivd/customer-x/-/merge_requests/7"' in html
    assert "https://gitlab.example.com/ivd/images/-/jobs/2" in html
    assert "Carcinoma threshold 0.6 → 0.7" in text
    assert '<del class="was">0.6</del> → <ins class="now">0.7</ins>' in html
    assert "Images in the registry without a release record" in text
    assert dev["manifest_digest"] in text
    assert "signed by key" in text and "Changes not released yet (2)" in text
    for word in ("HEAD", str(tmp_path), "file://"):
        at = text.find(word)
        assert at < 0, f"{word!r} in the report: ...{text[max(0, at - 120) : at + 60]}..."
    assert "branch " in text and " UTC" in text
    assert "mitosis v2" in text  # model names next to ids


def _rebuilt_on_another_base(world: World) -> dict[str, Any]:
    """A release record of r2's revision rebuilt on base 2.5.1 (a fleet rebuild without a
    configuration change), with a CI job address too long for one printed line."""
    record = {k: v for k, v in world.records["r2"].items() if k != "_path"}
    repository = record["image"].rpartition(":")[0]
    tag = f"2.5.1-{world.commits['lock4'][:12]}"
    return {
        **record,
        "image": f"{repository}:{tag}",
        "tags": [f"{repository}:{tag}", f"{repository}:2.5.1"],
        "manifest_digest": "sha256:" + "2" * 64,
        "base_image": {**record["base_image"], "version": "2.5.1", "digest": "sha256:" + "1" * 64},
        "built_at": _later(record["built_at"], days=2),
        "ci_url": "https://gitlab.example.com/ivd/fleet/customers-of-the-breast-line/-/jobs/"
        "123456789?pipeline=987654321&variant=cpu",
    }


def _pdf_pages(pdf: Path) -> list[str]:
    """The text of each page, laid out as printed (one printed line per text line)."""
    from testbed._util import ensure_command

    pdftotext = ensure_command("pdftotext", "poppler-utils")
    text = subprocess.run(
        [pdftotext, "-layout", "-enc", "UTF-8", str(pdf), "-"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [page for page in text.split("\f") if page.strip()]


def _identifiers(html: str) -> list[str]:
    """The text of every identifier element of the report."""
    found = re.findall(r'class="id"[^>]*>(?:<a [^>]*>)?([^<]+)<', html)
    return sorted({unescape(t) for t in found})


def _check_printed(pdf: Path, html: str, generated: str, tmp_path: Path) -> str:
    """A printed report: every page numbered and dated, every identifier on one printed line,
    nothing drawn into the side margins. Returns the whole text."""
    from PIL import Image

    from testbed._util import ensure_command

    pages = _pdf_pages(pdf)
    assert len(pages) >= 3
    for number, page in enumerate(pages, 1):
        assert f"Page {number} of {len(pages)}" in page, f"page {number} has no page number"
        assert f"generated {generated}" in page, f"page {number} has no generation date"
    lines = [line for page in pages for line in page.splitlines()]
    for ident in _identifiers(html):
        assert any(ident in line for line in lines), f"{ident!r} is broken across lines"
    pdftoppm = ensure_command("pdftoppm", "poppler-utils")
    prefix = tmp_path / pdf.stem
    subprocess.run([pdftoppm, "-r", "40", "-png", str(pdf), str(prefix)], check=True)
    rendered = sorted(tmp_path.glob(f"{pdf.stem}*.png"))
    assert len(rendered) == len(pages)
    for png in rendered:
        image = Image.open(png).convert("L")
        width, height = image.size
        margin = int(width * 0.035)  # the 12 mm side margins of an A4 page are ~5.7 %
        for box in ((0, 0, margin, height), (width - margin, 0, width, height)):
            lowest, _ = image.crop(box).getextrema()
            assert isinstance(lowest, int) and lowest > 235, (
                f"{png.name}: something is drawn in the page margin"
            )
    return re.sub(r"\s+", " ", "\n".join(pages))


def test_report_pdf_pages_numbered_dated_identifiers_whole(
    world: World, chromium: str, tmp_path: Path
) -> None:
    """`builder audit --pdf` (WeasyPrint) and Chromium's Print to PDF of the HTML: A4 pages,
    each with its number and the generation date; every identifier on one printed line (a CI
    address too long for one is shortened, its full value in a numbered note)."""
    long_job = _rebuilt_on_another_base(world)
    clone, env = _reviewed_clone(world, tmp_path, {"rebuilt": long_job})
    report, pdf = tmp_path / "audit.html", tmp_path / "audit.pdf"
    done = run_cli("audit", str(clone), "--html", str(report), "--pdf", str(pdf), "--json", env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(done.stdout)["result"]["pdf"] == str(pdf)
    html = report.read_text()
    generated = re.search(r"generated ([^\"]+ UTC)", html)
    assert generated is not None
    assert f'title="{long_job["ci_url"]}"'.replace("&", "&amp;") in html
    notes = html[html.index('id="notes"') :]
    assert long_job["ci_url"].replace("&", "&amp;") in notes

    printed = _check_printed(pdf, html, generated[1], tmp_path)
    # the shortened address in its place, the full one in the notes (wrapped only there)
    assert long_job["ci_url"] in "".join(printed[printed.rindex("Notes") :].split())
    for expected in (
        "Audit report: customer-x",
        "Approved-by: Dr. Rev Iewer",
        "ivd/customer-x!7",
        "Carcinoma threshold 0.6 → 0.7",
        "What runs at",
        # one statement of the base: allowed, pinned, shipped, and why pinned and shipped differ
        "shipped in the newest release: 2.5.1",
        "the release was built on base 2.5.1, while the lock of its revision pins 2.5.0",
        "base shipped 2.5.0 → 2.5.1",
        "How to read this report",
    ):
        assert expected in printed, expected
    assert "https://gitlab.example.com/ivd/customer-x" in printed  # the repository, on paper

    chromium_pdf = tmp_path / "chromium.pdf"
    result = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--no-pdf-header-footer",
            f"--print-to-pdf={chromium_pdf}", report.as_uri(),
        ],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and chromium_pdf.is_file(), result.stderr[-2000:]
    assert "Approved-by: Dr. Rev Iewer" in _check_printed(
        chromium_pdf, html, generated[1], tmp_path
    )


# -- the five questions, by name and by image reference, from an empty directory -------------


def _reviewer(world: World, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A reviewer's machine: an empty working directory, no project settings and no BUILDER_*
    variables, only the user's own settings file naming where the fleet file lies. The fleet
    file lists customer-x by the file:// URL of its repository (no folder of that name)."""
    fleet = tmp_path / "fleet-project"
    fleet.mkdir()
    (fleet / "fleet.yaml").write_text(
        yaml.safe_dump(
            {"fleet_version": 1, "customers": [{"name": "customer-x", "repo": world.repo.as_uri()}]}
        )
    )
    config = tmp_path / "config"
    (config / "ivd-builder").mkdir(parents=True)
    (config / "ivd-builder" / "builder.toml").write_text(f'[builder]\ncustomers = "{fleet}"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    return {**_bare_env(world), "XDG_CONFIG_HOME": str(config)}, empty


def _run(env: dict[str, str], cwd: Path, *args: str, code: int = 0) -> dict[str, Any]:
    done = run_cli(*args, "--json", env=env, cwd=cwd)
    assert done.returncode == code, done.stdout[-3000:] + done.stderr[-2000:]
    return dict(json.loads(done.stdout)["result"])


@pytest.mark.parametrize("by", ["name", "image"])
def test_five_questions_from_an_empty_directory(world: World, tmp_path: Path, by: str) -> None:
    """What runs at the site, where each model came from, who approved it, what changed since
    the last release and why, and does it rebuild: by the customer's name (resolved through
    the fleet file the user's settings point at) and by the image reference alone."""
    env, empty = _reviewer(world, tmp_path)
    r1, r2 = world.releases["r1"], world.releases["r2"]
    target = "customer-x" if by == "name" else r2["image"]

    # 1. what runs at customer-x
    shipped = _run(env, empty, "explain", target)
    assert shipped["manifest_digest"] == r2["manifest_digest"]
    assert shipped["verdict"]["recorded_release"] is True and shipped["ok_checks"] is True
    if by == "name":
        assert shipped["selected"]["found"].startswith("fleet file ")
        assert shipped["selected"]["registry_note"].endswith("points to this release")
    # 2. where each model came from
    models = {m["name"]: m for m in shipped["provenance"]["models"]}
    assert (models["mitosis_model"]["registry_id"], models["mitosis_model"]["task_id"]) == (
        MITOSIS2_ID,
        MITOSIS2_TASK,
    )
    assert {f["status"] for f in shipped["files"]} == {"ok"}
    # 3. who approved it: every change since the previous release is covered
    review = shipped["review"]
    assert review["previous"]["image"] == r1["image"]
    covered = {r["revision"]["commit"]: r["approval"] for r in review["revisions"]}
    assert covered[world.commits["threshold"]]["later"] == world.commits["lock2"]
    assert {a["status"] for a in covered.values()} == {"approved", "covered"}
    human = run_cli("explain", target, env=env, cwd=empty)
    assert human.returncode == 0, human.stderr
    assert f"approved     Approved-by: {REVIEWER}; Approved-by: {QUALITY}" in human.stdout
    # 4. what changed since the last release, and why
    # (a location-free image names its repository through its attestation: `sources`)
    changed = _run(env, empty, "diff", "customer-x" if by == "name" else shipped["sources"][0],
        r1["image"].rpartition(":")[2] if by == "name" else r1["image"],
        target if by == "image" else r2["image"].rpartition(":")[2])  # fmt: skip
    texts = [c["text"] for c in changed["changes"]]
    assert "Carcinoma threshold 0.5 -> 0.6" in texts
    assert "base shipped 2.4.1 -> 2.5.0" in texts  # two releases: the base as shipped
    # read from the locks, though this machine configures no production store
    assert (
        f'mitosis_model: "mitosis v1" {MITOSIS_ID[:8]} (task {MITOSIS_TASK[:8]}) -> '
        f'"mitosis v2" {MITOSIS2_ID[:8]} (task {MITOSIS2_TASK[:8]})'
    ) in texts
    reasons = [r["revision"]["reason"] for r in changed["revisions"]]
    assert f"mitosis v2\n\n{SWAP_REASON}" in reasons
    assert changed["point_a"]["via"] == "release" and changed["point_b"]["via"] == "release"
    # 5. does it rebuild
    rebuilt = _run(env, empty, "verify", target)
    assert rebuilt["match"] is True, rebuilt["differences"]


def test_unknown_customer_says_where_it_looked(world: World, tmp_path: Path) -> None:
    env, empty = _reviewer(world, tmp_path)
    done = run_cli("explain", "customer-q", env=env, cwd=empty)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "customer 'customer-q' not found" in line
    assert "not in the fleet file" in line and "(listed: customer-x)" in line
    assert "BUILDER_CUSTOMERS" in line


def test_repository_strings_the_tool_prints_are_accepted(world: World, tmp_path: Path) -> None:
    """`URL#folder` for a folder customer (a file:// repository on this machine, read in
    place, and an https one mirrored into the cache), and a bare repository named without its
    .git, as explain and history print them."""
    mono = tmp_path / "mono"
    files = {
        f"customers/customer-x/{name}": (world.repo / name).read_bytes()
        for name in ("customer.yaml", "analysis.yaml", "customer.lock.yaml")
    }
    commit_files(mono, files, "customer-x in the fleet repository", when=T0 + 20 * DAY)
    env = {
        **_bare_env(world),
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.{mono.as_uri()}.insteadOf",
        "GIT_CONFIG_VALUE_0": "https://gitlab.example.com/ivd/fleet.git",
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    printed = _run(env, empty, "history", f"{mono.as_uri()}#customers/customer-x")
    assert printed["repository"] == f"{mono.as_uri()}#customers/customer-x"
    again = _run(env, empty, "history", printed["repository"])  # what it printed, back in
    assert again["entries"][0]["revision"] == printed["entries"][0]["revision"]
    remote = _run(
        env, empty, "history", "https://gitlab.example.com/ivd/fleet.git#customers/customer-x"
    )
    assert remote["repository"] == "https://gitlab.example.com/ivd/fleet#customers/customer-x"
    assert [e["revision"]["commit"] for e in remote["entries"]] == [
        e["revision"]["commit"] for e in printed["entries"]
    ]
    bare = tmp_path / "server" / "customer-x.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(world.repo), str(bare)], check=True)
    named = _run(env, empty, "history", bare.with_name("customer-x").as_uri())
    assert len(named["entries"]) == 8 and len(named["releases"]) == 2
    escape = run_cli("history", f"{mono.as_uri()}#../outside", env=env, cwd=empty)
    assert escape.returncode == 2 and "must be a relative path inside" in escape.stderr


def test_unapproved_change_and_rules_of_their_time(world: World, tmp_path: Path) -> None:
    """A released change no approval covers is flagged by history, diff, explain's review and
    the report; a released revision that today's validation refuses is read as written and
    said to predate the rule, not called broken."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(world.repo), str(clone)], check=True)
    _own_records(clone)
    customer = (clone / "customer.yaml").read_text()
    old_style = commit_files(
        clone,
        {"customer.yaml": customer + "maintainer: site lab\n"},  # a key today's schema refuses
        "record the site's maintainer",
        when=T0 + 11 * DAY,
    )
    record = {k: v for k, v in world.records["r2"].items() if k != "_path"}
    repository = record["image"].rpartition(":")[0]
    tag = f"2.5.0-{old_style[:12]}"
    _add_record(clone, tag, {
        **record, "config": {**record["config"], "commit": old_style},
        "image": f"{repository}:{tag}", "tags": [f"{repository}:{tag}"],
        "manifest_digest": "sha256:" + "3" * 64, "built_at": _later(record["built_at"], days=1),
    })  # fmt: skip
    hist = cli_json(world, "history", str(clone))
    last = hist["entries"][-1]
    assert last["revision"]["commit"] == old_style
    assert last["error"] is None and last["config"] is not None
    assert last["rule_note"].startswith("written before a rule this builder applies today")
    assert "was released" in last["rule_note"] and "maintainer" in last["rule_note"]
    assert last["approval"]["status"] == "unapproved"
    assert hist["unapproved"] == [old_style]
    human = run_cli("history", str(clone), env=world.env)
    assert "could not be read" not in human.stdout
    assert (
        f"    ! NOT APPROVED: no approval covers this change, released as {repository}:{tag}"
        in human.stdout
    )
    assert f'not approved: {old_style[:12]} "record the site\'s maintainer" was released' in (
        human.stderr
    )

    changed = cli_json(world, "diff", str(clone), world.commits["lock4"], tag)
    assert changed["unapproved"] == [old_style]
    report = tmp_path / "audit.html"
    summary = cli_json(world, "audit", str(clone), "--html", str(report))
    assert summary["unapproved"] == [old_style]
    parsed = _Text()
    parsed.feed(report.read_text())
    assert "Released changes that no approval covers" in parsed.text
    assert "NOT APPROVED" in parsed.text


def _record(commit: str, image: str) -> Any:
    from builder.documents.release_record import ReleaseRecord

    return ReleaseRecord(
        customer="customer-x", config_repository="file:///r", config_path=".",
        config_commit=commit, image=image, manifest_digest="sha256:" + "0" * 64, tags=(image,),
        base_repository="r/base", base_version="2.4.1", base_digest="sha256:" + "1" * 64,
        models=(), built_at="2026-01-01T00:00:00Z", builder_version="0",
    )  # fmt: skip


def test_an_approval_covers_what_it_contains_and_nothing_else() -> None:
    """Parallel branches: an approval on one branch does not cover the other branch's change;
    it covers its own ancestors up to the previous release, never a change after it."""
    from builder.audit.approvals import Approval, Review, coverage

    # newest first, parents rewritten to revisions: a <- b, a <- c, m merges b and c, d after m
    graph = {"d": ("m",), "m": ("b", "c"), "c": ("a",), "b": ("a",), "a": ()}

    def review(commit: str, *who: str, request: str | None = None) -> Review:
        approvals = tuple(Approval("Approved-by", w, commit) for w in who)
        return Review(commit, commit.upper(), approvals, None, request)

    reviews = {c: review(c) for c in graph}
    reviews["c"] = review("c", "Dr. C")
    found = coverage(graph, reviews, [_record("m", "img:1")])
    assert {c: f.status for c, f in found.items()} == {
        "a": "covered", "b": "unapproved", "c": "approved", "m": "unapproved", "d": "pending"
    }  # fmt: skip
    assert (found["a"].later, found["a"].later_subject) == ("c", "C")
    assert found["b"].release == "img:1" and found["d"].release is None
    assert found["b"].sentence == "NOT APPROVED: no approval covers this change, released as img:1"

    # an earlier release at a: a belongs to it (nothing approved it), b to the later one, which a
    # merge request (the merge commit's) covers together with everything it contains
    reviews["m"] = review("m", request="ivd/x!7")
    found = coverage(graph, reviews, [_record("a", "img:0"), _record("m", "img:1")])
    assert {c: f.status for c, f in found.items()} == {
        "a": "unapproved", "b": "covered", "c": "approved", "m": "approved", "d": "pending"
    }  # fmt: skip
    assert found["b"].merge_requests == ("ivd/x!7",) and found["b"].covered


def test_customer_or_image() -> None:
    from builder.audit.locate import is_customer

    for customer in ("customer-x", "file:///srv/fleet#customers/x", "git@host:grp/x.git",
                     "https://gitlab.example.com/ivd/x#customers/x"):  # fmt: skip
        assert is_customer(customer), customer
    for image in ("127.0.0.1:5000/x:2.5.0-1a2b", "host/x@sha256:" + "0" * 64,
                  "x@sha256:" + "0" * 64, "oci:/tmp/layout:tag", "docker-archive:/tmp/a.tar"):  # fmt: skip
        assert not is_customer(image), image
