"""The runner contract travels with the base image; the builder checks configs against it.

Bases here are OCI image layouts written in the test (a contract layer, the labels): no
Docker engine needed. The contract in them is the real one, computed from the runner's
plug-in classes in base-image/runner, so the cases below are what the runner really refuses.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, commit_files, run_cli

from builder.image.contract import CONTRACT_LABEL, CONTRACT_PATH, runner_contract_from_source
from builder.oci import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Descriptor, write_layout_index

CUSTOMER_X = ROOT / "customers" / "customer-x"
CUSTOMER_Z = ROOT / "customers" / "customer-z"


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def make_base(layout: Path, version: str, contract: bytes | None, label: str | None = None) -> str:
    """An OCI layout holding a tiny base image ``version`` with (or without) a contract."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = contract if contract is not None else b"no contract here\n"
        name = CONTRACT_PATH.lstrip("/") if contract is not None else "etc/motd"
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer = _blob(layout, buffer.getvalue())
    labels = {"com.ivd.runner.config-schemas": "1", "org.opencontainers.image.version": version}
    if contract is not None:
        labels[CONTRACT_LABEL] = label or hashlib.sha256(contract).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    }
    config_blob = _blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config_blob},
        "layers": [{"mediaType": OCI_LAYER, **layer}],
    }
    raw = json.dumps(manifest, sort_keys=True).encode()
    blob = _blob(layout, raw)
    write_layout_index(layout, Descriptor(OCI_MANIFEST, blob["digest"], blob["size"]), [version])
    return f"oci:{layout}"


@pytest.fixture(scope="module")
def contract() -> bytes:
    return runner_contract_from_source(ROOT / "base-image" / "runner")


@pytest.fixture
def env(tmp_path: Path, contract: bytes) -> dict[str, str]:
    return {
        "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        "BUILDER_PRODUCTION": f"file:{ROOT / 'demo' / 'production'}",
        "BUILDER_BASE_REPOSITORY": make_base(tmp_path / "base", "2.4.1", contract),
        "BUILDER_IMAGE_REGISTRY": "127.0.0.1:1/test",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }


def _customer(path: Path, source: Path, analysis: str | None = None, *, lock: bool = False) -> Path:
    """A customer repository with ``source``'s files (its analysis text replaced if given)."""
    files: dict[str, str | bytes] = {
        str(p.relative_to(source)): p.read_bytes()
        for p in sorted(source.rglob("*"))
        if p.is_file() and (lock or p.name != "customer.lock.yaml")
    }
    files["customer.yaml"] = re.sub(
        r'version: ".*"', 'version: "~=2.4"', (source / "customer.yaml").read_text()
    )
    if analysis is not None:
        files["analysis.yaml"] = analysis
    commit_files(path, files, "config")
    return path


X_ANALYSIS = (CUSTOMER_X / "analysis.yaml").read_text()
Z_ANALYSIS = (CUSTOMER_Z / "analysis.yaml").read_text()


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (name, customer folder, analysis text, the token on the offending line, needles)
BAD = [
    (
        "unknown feature class",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "- cls: Mitosis", "- cls: Mitossis"),
        "Mitossis",
        ["features[1].cls", "'Mitossis'", "did you mean 'Mitosis'"],
    ),
    (
        "unknown depends_on",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "depends_on: [Carcinoma]", "depends_on: [Carcinom]"),
        "Carcinom]",
        ["depends_on[0]", "'Carcinom'", "did you mean 'Carcinoma'"],
    ),
    (
        "param typo",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "min_region_area_um2: 500", "min_region_area_mu2: 500"),
        "min_region_area_mu2",
        ["params.min_region_area_mu2", "did you mean 'min_region_area_um2'"],
    ),
    (
        "string where a number is due",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "min_region_area_um2: 500", "min_region_area_um2: big"),
        "min_region_area_um2: big",
        ["min_region_area_um2 must be a number >= 0", '"big"'],
    ),
    (
        "range",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "merge_distance_um: 4.0", "merge_distance_um: -1"),
        "merge_distance_um",
        ["merge_distance_um must be a number >= 0, not -1"],
    ),
    (
        "list items out of range",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "merge_distance_um: 4.0", "color: [1, 2, 300]"),
        "color:",
        ["color must be a list of 3 integers in [0, 255]"],
    ),
    (
        "model role typo",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "{classification_model: ", "{classification_modle: "),
        "classification_modle",
        ["no model role 'classification_modle'", "did you mean 'classification_model'"],
    ),
    (
        "nested analysis params",
        CUSTOMER_X,
        _sub(
            X_ANALYSIS,
            "  features:\n",
            "  params:\n    tissue: {min_tile_fraction: 2}\n  features:\n",
        ),
        "min_tile_fraction",
        ["tissue.min_tile_fraction must be a number in (0, 1]", "not 2"],
    ),
    (
        "nested unknown key",
        CUSTOMER_X,
        _sub(
            X_ANALYSIS,
            "  features:\n",
            "  params:\n    tissue: {min_saturaton: 0.1}\n  features:\n",
        ),
        "min_saturaton",
        ["tissue.min_saturaton", "unknown key 'min_saturaton'", "did you mean 'min_saturation'"],
    ),
    (
        "nested params out of order",
        CUSTOMER_X,
        _sub(
            X_ANALYSIS,
            "  features:\n",
            "  params:\n    tissue: {min_saturation: 0.3, max_saturation: 0.2}\n  features:\n",
        ),
        "min_saturation: 0.3",
        ["tissue.max_saturation", "max_saturation must be >= min_saturation (0.3), not 0.2"],
    ),
    (
        "manual model params out of order",
        CUSTOMER_Z,
        _sub(Z_ANALYSIS, "max_area_um2: 200.0", "max_area_um2: 2.0"),
        "max_area_um2: 2.0",
        ["postprocessing[0].params.max_area_um2", "must be >= min_area_um2 (12.0), not 2.0"],
    ),
    (
        "manual model divisor list",
        CUSTOMER_Z,
        _sub(Z_ANALYSIS, "std: [0.25, 0.25, 0.25]", "std: [0.25, 0, 0.25]"),
        "std: [0.25, 0, 0.25]",
        ["preprocessing[1].params.std", "std must be"],
    ),
    (
        "manual model postprocessing class",
        CUSTOMER_Z,
        _sub(Z_ANALYSIS, "{cls: MaskToObjects,", "{cls: MaskToObject,"),
        "MaskToObject,",
        ["postprocessing[0].cls", "did you mean 'MaskToObjects'"],
    ),
    (
        "manual model preprocessing param type",
        CUSTOMER_Z,
        _sub(Z_ANALYSIS, "{factor: 255.0}", "{factor: true}"),
        "factor: true",
        ["preprocessing[0].params.factor", "factor must be a number (not 0), not true"],
    ),
    (
        "manual model chain ends in the wrong kind",
        CUSTOMER_Z,
        _sub(
            Z_ANALYSIS,
            "{cls: MaskToObjects, params: {threshold: 0.6, min_area_um2: 12.0, max_area_um2: 200.0}}",
            "{cls: ArgMax}",
        ),
        "segmentation_model: mitosis_model",
        ["Mitosis needs objects from segmentation_model", "gives labelmap or labels"],
    ),
    (
        "manual model chain that cannot work whatever the model gives",
        CUSTOMER_Z,
        _sub(
            Z_ANALYSIS,
            "{cls: MaskToObjects, params: {threshold: 0.6, min_area_um2: 12.0, max_area_um2: 200.0}}",
            "{cls: ArgMax}\n      - {cls: BinaryClassification}",
        ),
        "{cls: BinaryClassification}",
        ["postprocessing[1]", "takes scores but gets labelmap or labels"],
    ),
    (
        "analysis name used twice",
        CUSTOMER_X,
        X_ANALYSIS
        + X_ANALYSIS.split("analyses:\n", 1)[1].replace("- name: breast", "- name: breast # again"),
        "- name: breast # again",
        ["analysis name 'breast' is used twice"],
    ),
    (
        "enum in model params (runner's config schema)",
        CUSTOMER_Z,
        _sub(Z_ANALYSIS, "input_layout: NCHW", "input_layout: NCHV"),
        "input_layout: NCHV",
        ["input_layout", "NCHV"],
    ),
]


def _line_of(text: str, token: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if token in line)


@pytest.mark.parametrize(
    ("name", "source", "analysis", "token", "needles"), BAD, ids=[b[0] for b in BAD]
)
def test_build_refuses_what_the_runner_refuses(
    tmp_path: Path,
    env: dict[str, str],
    name: str,
    source: Path,
    analysis: str,
    token: str,
    needles: list[str],
) -> None:
    repo = _customer(tmp_path / "cust", source, analysis)
    out = tmp_path / "image"
    result = run_cli("build", str(repo), "--oci-layout", str(out), env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert lines[-1].startswith("error: "), result.stderr
    message = lines[-1]
    assert f"analysis.yaml:{_line_of(analysis, token)}: " in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not out.exists()  # nothing half-written
    # validate answers the same, before any build
    checked = run_cli("validate", str(repo), env=env)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"analysis.yaml:{_line_of(analysis, token)}: " in checked.stderr
    # and the runner itself refuses the verbose config
    _runner_refuses(tmp_path, repo, env, source, analysis)


def _runner_refuses(
    tmp_path: Path, repo: Path, env: dict[str, str], source: Path, analysis: str
) -> None:
    """The verbose form of ``analysis`` is refused by tilerunner's own loader too."""
    from tilerunner.config import parse_config
    from tilerunner.errors import ConfigError as RunnerConfigError

    good = _customer(tmp_path / "good", source)
    expanded = run_cli("expand", str(good), "--json", env=env)
    assert expanded.returncode == 0, expanded.stderr
    verbose = json.loads(expanded.stdout)["result"]["config"]
    app = tmp_path / "app"
    for model in verbose["analyses"][0]["models"].values():
        folder = app / model["reference"]
        folder.mkdir(parents=True, exist_ok=True)
        weights = model["provenance"]["weights_uri"]  # as the image records it
        origin = (
            source / weights.removeprefix("repo:")
            if weights.startswith("repo:")
            else ROOT / "demo" / "production" / weights.removeprefix("production:")
        )
        shutil.copy(origin / model["params"]["file"], folder / model["params"]["file"])
    parse_config(verbose, Path("analysis.yaml"), app)  # the good config runs
    bad = dict(verbose)
    bad["analyses"] = []
    for short in yaml.safe_load(analysis)["analyses"]:
        bad_analysis = dict(verbose["analyses"][0])
        bad_analysis["name"] = short["name"]
        for key in ("features", "params"):
            if key in short:
                bad_analysis[key] = short[key]
        for m_name, m_short in short["models"].items():
            if m_short.get("sourcing") == "manual":
                model = dict(bad_analysis["models"][m_name])
                for key in ("preprocessing", "postprocessing", "params"):
                    if key in m_short:
                        model[key] = m_short[key]
                bad_analysis["models"] = {**bad_analysis["models"], m_name: model}
        bad["analyses"].append(bad_analysis)
    with pytest.raises(RunnerConfigError):
        from tilerunner.models import EngineOptions, ModelStore

        config = parse_config(bad, Path("analysis.yaml"), app)
        # chain kinds are checked when the models load: the only case that needs ONNX models
        ModelStore(EngineOptions(device="cpu")).load(config)


def test_every_problem_is_listed_and_the_good_config_builds(
    tmp_path: Path, env: dict[str, str]
) -> None:
    bad = _sub(
        _sub(X_ANALYSIS, "- cls: Mitosis", "- cls: Mitossis"),
        "min_region_area_um2: 500",
        "min_region_area_mu2: 500",
    )
    repo = _customer(tmp_path / "cust", CUSTOMER_X, bad)
    result = run_cli("build", str(repo), "--json", env=env)
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert "Mitossis" in error["message"] and "min_region_area_mu2" in error["message"]
    assert "[2 problems]" in error["message"]
    good = _customer(tmp_path / "good", CUSTOMER_X)
    built = run_cli("build", str(good), "--oci-layout", str(tmp_path / "out"), "--json", env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "out" / "index.json").is_file()


def test_validate_lists_config_and_contract_problems_together_in_line_order(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A malformed model id does not hide an unknown plug-in, nor an undeclared model slot:
    one run of validate, every problem, in file:line order."""
    model_id = yaml.safe_load(X_ANALYSIS)["analyses"][0]["models"]["carcinoma_model"]["reference"]
    bad = _sub(
        _sub(
            _sub(X_ANALYSIS, model_id, "a957f623-nope"),
            "- cls: Mitosis",
            "- cls: Mitossis",
        ),
        "segmentation_model: mitosis_model",
        "segmentation_model: mitosis_modle",
    )
    repo = _customer(tmp_path / "cust", CUSTOMER_X, bad)
    result = run_cli("validate", str(repo), "--json", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    found = [int(n) for n in re.findall(r"analysis\.yaml:(\d+): ", message)]
    expected = [_line_of(bad, t) for t in ("a957f623-nope", "Mitossis", "mitosis_modle")]
    assert found == expected, message
    assert "[3 problems]" in message and "did you mean 'Mitosis'" in message


def test_registry_plugins_are_checked_at_the_reference_line(
    tmp_path: Path, env: dict[str, str]
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(ROOT / "demo" / "registry", registry)
    analysis = yaml.safe_load(X_ANALYSIS)
    model_id = analysis["analyses"][0]["models"]["carcinoma_model"]["reference"]
    record_path = registry / "models" / f"{model_id}.yaml"
    record = yaml.safe_load(record_path.read_text())
    design = json.loads(record["design"]["design"])
    design["postprocessing"] = [{"cls": "BinaryClassification", "params": {"treshold": 0.5}}]
    record["design"]["design"] = json.dumps(design)
    record_path.write_text(yaml.safe_dump(record))
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    result = run_cli("build", str(repo), env={**env, "BUILDER_MODEL_REGISTRY": f"local:{registry}"})
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    line = _line_of(X_ANALYSIS, model_id)
    assert f"analysis.yaml:{line}: " in message
    assert f"model carcinoma_model ({model_id}, from the registry)" in message
    assert "'treshold'" in message and "did you mean 'threshold'" in message


def test_contract_is_cached_by_base_digest(tmp_path: Path, env: dict[str, str]) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    first = run_cli("validate", str(repo), "--json", env=env)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)["result"]
    assert doc["contract"]["checked"] is True
    cached = list((tmp_path / "cache" / "contracts").glob("*.json"))
    assert len(cached) == 1
    # the layout's contract layer gone: the cache answers (offline, --locked builds)
    layout = Path(env["BUILDER_BASE_REPOSITORY"].removeprefix("oci:"))
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.split(":")[1]).read_text())
    (layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]).unlink()
    again = run_cli("validate", str(repo), "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["result"]["contract"]["checked"] is True


def test_a_tampered_contract_is_refused(
    tmp_path: Path, env: dict[str, str], contract: bytes
) -> None:
    base = make_base(tmp_path / "tampered", "2.4.1", contract, label="0" * 64)
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    result = run_cli("validate", str(repo), env={**env, "BUILDER_BASE_REPOSITORY": base})
    assert result.returncode == 6, result.stderr
    assert "does not match its label" in result.stderr


def test_validate_says_when_the_contract_is_not_checked(
    tmp_path: Path, env: dict[str, str]
) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    old = make_base(tmp_path / "old", "2.4.1", None)
    result = run_cli("validate", str(repo), env={**env, "BUILDER_BASE_REPOSITORY": old})
    assert result.returncode == 0, result.stderr
    assert "declares no runner contract" in result.stderr
    assert "runner contract NOT checked" in result.stdout
    missing = run_cli(
        "validate",
        str(repo),
        "--json",
        env={**env, "BUILDER_BASE_REPOSITORY": f"oci:{tmp_path / 'nowhere'}"},
    )
    assert missing.returncode == 0, missing.stderr
    doc = json.loads(missing.stdout)["result"]
    assert doc["contract"]["checked"] is False
    assert any("runner contract not checked" in n for n in doc["notes"])


# -- release guards: what cannot ship by accident ---------------------------------------------


def test_release_builds_refuse_a_stale_lock_and_say_what_changed(
    tmp_path: Path, env: dict[str, str]
) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X, lock=True)
    changed = _sub(X_ANALYSIS, "min_region_area_um2: 500", "min_region_area_um2: 400")
    commit_files(repo, {"analysis.yaml": changed}, "smaller regions, lock not updated")
    check = run_cli("lock", str(repo), "--check", env=env)
    assert check.returncode == 7, check.stderr
    for args in (("--push",), ("--locked",), ("--locked", "--push")):
        result = run_cli("build", str(repo), *args, env=env)
        assert result.returncode == 7, (args, result.stdout + result.stderr)
        line = result.stderr.strip().splitlines()[-1]
        assert "customer.lock.yaml is stale" in line, line
        assert (
            "analysis.yaml: analyses[breast].features[Carcinoma].params.min_region_area_um2 "
            "500 -> 400" in line
        ), line
    # a development build (not pushed) still builds, and says nothing is pinned wrongly
    dev = run_cli("build", str(repo), "--oci-layout", str(tmp_path / "dev"), env=env)
    assert dev.returncode == 0, dev.stderr


def test_lock_check_notes_a_newer_base_and_refuses_a_moved_pinned_tag(
    tmp_path: Path, env: dict[str, str], contract: bytes
) -> None:
    """A base released after the lock is not the config's drift (a note; --locked still
    builds on the pinned base); the pinned version's tag moved to another image is."""
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    locked = run_cli("lock", str(repo), env=env)
    assert locked.returncode == 0, locked.stderr
    commit_files(repo, {"customer.lock.yaml": (repo / "customer.lock.yaml").read_bytes()}, "lock")
    layout = tmp_path / "base"
    make_base(layout, "2.4.2", contract)  # a base release the constraint ~=2.4 admits
    check = run_cli("lock", str(repo), "--check", env=env)
    assert check.returncode == 0, check.stderr
    assert "note: base image 2.4.2 is released (the lock pins 2.4.1)" in check.stderr
    built = run_cli("build", str(repo), "--locked", "--json", env=env)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["result"]["base"]["version"] == "2.4.1"
    make_base(layout, "2.4.1", contract + b"\n")  # the pinned tag now names another image
    moved = run_cli("lock", str(repo), "--check", env=env)
    assert moved.returncode == 7, moved.stderr
    last = moved.stderr.strip().splitlines()[-1]
    assert f"base image oci:{layout}:2.4.1 is sha256:" in last and "(the tag was moved)" in last


def test_worktree_builds_are_dirty_and_never_pushed(tmp_path: Path, env: dict[str, str]) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    (repo / "analysis.yaml").write_text(
        _sub(X_ANALYSIS, "min_region_area_um2: 500", "min_region_area_um2: 450")
    )
    from_git = run_cli("build", str(repo), "--oci-layout", str(tmp_path / "git"), env=env)
    assert from_git.returncode == 0, from_git.stderr
    assert "warning: " in from_git.stderr and "uncommitted changes" in from_git.stderr
    pushed = run_cli("build", str(repo), "--worktree", "--push", env=env)
    assert pushed.returncode == 4, pushed.stderr
    assert "cannot be pushed as a release" in pushed.stderr.strip().splitlines()[-1]
    out = tmp_path / "dirty"
    built = run_cli("build", str(repo), "--worktree", "--oci-layout", str(out), "--json", env=env)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)["result"]
    assert report["image"].endswith("-dirty") and report["development"] is True
    from builder.oci import LayoutImage

    image = LayoutImage(out, report["image"].rsplit(":", 1)[1])
    assert image.labels["com.ivd.config.dirty"] == "true"
    assert image.labels["com.ivd.development-build"] == "true"


@pytest.mark.parametrize(
    ("args", "needed_for"),
    [
        (["build", "{repo}", "--load"], "--oci-layout DIR or --docker-archive FILE need none"),
        (["build", "{repo}", "--backend", "docker"], "the default backend needs none"),
        (["base", "build", "--variant", "gpu"], "`builder base build` builds with it"),
    ],
    ids=["load", "docker-backend", "base-build"],
)
def test_every_command_that_needs_the_engine_says_what_to_start(
    tmp_path: Path, env: dict[str, str], args: list[str], needed_for: str
) -> None:
    """No engine: one line naming the address tried, what the engine was for and what to
    start, exit 6, before any work (nothing downloaded, nothing built)."""
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    socket = tmp_path / "no-docker.sock"
    result = run_cli(
        *[a.format(repo=repo) for a in args], env={**env, "DOCKER_HOST": f"unix://{socket}"}
    )
    assert result.returncode == 6, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no Docker engine at unix://{socket}: no such socket; "), last
    assert needed_for in last and "systemctl start docker" in last
    assert "scripts/dockerd" in last
    assert not (tmp_path / "cache" / "weights").exists()  # failed before any work


def test_closing_hints_follow_the_options_used(tmp_path: Path, env: dict[str, str]) -> None:
    """After a --worktree (-dirty) build no push is suggested (it cannot be pushed); after an
    export the image is not "in the local image store only", and that export is not offered."""
    from builder.cli.build import not_pushed_lines

    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    (repo / "analysis.yaml").write_text(
        _sub(X_ANALYSIS, "min_region_area_um2: 500", "min_region_area_um2: 450")
    )
    dirty = run_cli("build", str(repo), "--worktree", env=env)
    assert dirty.returncode == 0, dirty.stderr
    assert f"build {repo} --push " not in dirty.stdout
    assert "a --worktree (-dirty) build cannot be pushed: commit, then" in dirty.stdout
    exported = run_cli("build", str(repo), "--oci-layout", str(tmp_path / "out"), env=env)
    assert exported.returncode == 0, exported.stderr
    assert f"is in the local image store and the OCI layout {tmp_path / 'out'}" in exported.stdout
    assert "--oci-layout DIR" not in exported.stdout and f"build {repo} --push" in exported.stdout
    loaded = not_pushed_lines("r/c:1", "sha256:x", "c", {"store": "s", "docker": "c:1"})
    assert (
        loaded[0]
        == "built, not pushed: r/c:1@sha256:x is in the local image store and the Docker engine"
    )
    assert not any("--load" in line for line in loaded)


def test_a_mistyped_feature_class_is_one_problem_not_a_cascade(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """`cls: Carcinom` makes the feature's name "Carcinom"; Mitosis' `depends_on: [Carcinoma]`
    is right once the class is: one problem (on cls), never a second one suggesting the typo."""
    bad = _sub(X_ANALYSIS, "- cls: Carcinoma", "- cls: Carcinom")
    repo = _customer(tmp_path / "cust", CUSTOMER_X, bad)
    result = run_cli("validate", str(repo), env=env)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "features[0].cls: unknown feature plug-in 'Carcinom' (did you mean 'Carcinoma'?" in last
    assert "depends_on" not in last and "problems]" not in last
    # a depends_on that is itself mistyped is still reported, with the right suggestion
    typo = _customer(tmp_path / "typo", CUSTOMER_X, _sub(bad, "[Carcinoma]", "[Carcinomx]"))
    both = run_cli("validate", str(typo), env=env)
    assert "no feature 'Carcinomx'" in both.stderr and "[2 problems]" in both.stderr


def test_logs_show_bytes_files_and_seconds_per_stage(tmp_path: Path, env: dict[str, str]) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    result = run_cli("build", str(repo), "--oci-layout", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    summaries = {
        m["stage"]: m
        for m in re.finditer(
            r"^--> (?P<stage>[a-z ]+): (?P<files>\d+) files?, (?P<bytes>[\d,]+) B, "
            r"(?P<seconds>[\d.]+) s$",
            result.stderr,
            re.MULTILINE,
        )
    }
    assert {"cook", "base", "fetch", "assemble", "deliver"} <= set(summaries), result.stderr
    fetched = int(summaries["fetch"]["bytes"].replace(",", ""))
    assert int(summaries["fetch"]["files"]) >= 2 and fetched > 0
    # the layers written hold at least the weights fetched
    assert int(summaries["assemble"]["bytes"].replace(",", "")) >= fetched


# -- the real base image -----------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_real_base_image_ships_its_contract_and_the_build_checks_it(
    docker_engine: Any, oci_registry: Any, base_os_image: str, tmp_path: Path, contract: bytes
) -> None:
    """`builder base build` labels the image with the sha256 of /opt/tilerunner/contract.json
    (the image checks the file against it while building); the builder reads it back from the
    registry, from the small last layer only, and refuses a config the runner would refuse."""
    from builder.image.base import resolve_base
    from builder.image.base_build import build_base_image, read_version
    from builder.image.contract import read_base_contract
    from testbed._util import cache_root

    built = build_base_image(
        docker_client=docker_engine.client(),
        repository=f"{oci_registry.host}/ivd/contract-base",
        base_from=base_os_image,
        wheelhouse=cache_root() / "wheelhouse" / "cpu",
        push=True,
    )
    sha = hashlib.sha256(contract).hexdigest()
    assert built.labels[CONTRACT_LABEL] == sha
    printed = docker_engine.client().containers.run(
        built.reference, ["contract", "--sha256"], network_mode="none", remove=True
    )
    assert printed.decode().strip() == sha
    base = resolve_base(f"{oci_registry.host}/ivd/contract-base", read_version())
    read = read_base_contract(base, tmp_path / "cache")
    assert read is not None and read.sha256 == sha
    # only the contract layer was downloaded, not the runtime
    downloaded = list((tmp_path / "cache" / "oci" / "blobs" / "sha256").glob("*"))
    assert sum(p.stat().st_size for p in downloaded) < 1 << 20
    repo = _customer(
        tmp_path / "cust",
        CUSTOMER_X,
        _sub(X_ANALYSIS, "depends_on: [Carcinoma]", "depends_on: [Carcinom]"),
    )
    result = run_cli(
        "validate",
        str(repo),
        env={
            "BUILDER_BASE_REPOSITORY": f"{oci_registry.host}/ivd/contract-base",
            "BUILDER_CACHE_DIR": str(tmp_path / "cache2"),
            "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        },
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "did you mean 'Carcinoma'" in result.stderr


def test_every_release_gate_reason_is_in_the_json_error(
    tmp_path: Path, env: dict[str, str]
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(ROOT / "demo" / "registry", registry)
    analysis = yaml.safe_load(X_ANALYSIS)["analyses"][0]["models"]
    ids = [m["reference"] for m in analysis.values()]
    for model_id in ids:
        path = registry / "models" / f"{model_id}.yaml"
        path.write_text(path.read_text().replace("ready: true", "ready: false"))
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    result = run_cli(
        "build", str(repo), "--json", env={**env, "BUILDER_MODEL_REGISTRY": f"local:{registry}"}
    )
    assert result.returncode == 4, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["message"].startswith(f"{len(ids)} release gates failed: ")
    for model_id in ids:
        assert f"({model_id}) is not published" in error["message"]
    assert "more)" not in error["message"]


# -- a release is pinned and loads: no lock, no release; a file the model lacks, no image ------


def _fleet(tmp_path: Path, repo: Path) -> Path:
    """A fleet file naming one customer repository (by path)."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {"fleet_version": 1, "customers": [{"name": "customer-x", "repo": str(repo)}]}
        )
    )
    return fleet


def test_no_committed_lock_no_release_unless_a_labelled_development_build(
    tmp_path: Path, env: dict[str, str], oci_registry: Any
) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X)  # no customer.lock.yaml
    registry = {**env, "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/unlocked"}
    for args in (("--locked",), ("--locked", "--push")):
        refused = run_cli("build", str(repo), *args, "--json", env=registry)
        assert refused.returncode == 7, (args, refused.stdout + refused.stderr)
        error = json.loads(refused.stdout)["error"]
        assert "no customer.lock.yaml committed" in error["message"], error
        assert "`builder lock`" in error["hint"], error
    lines = run_cli("build", str(repo), "--push", env=registry).stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "no customer.lock.yaml committed" in errors[0], lines
    assert "`builder lock`" in errors[0]
    # the fleet builds releases, pushed or not: the customer fails with exit 7, the run with 8
    fleet = _fleet(tmp_path, repo)
    for push in ((), ("--push",)):
        ran = run_cli(
            "build",
            "--all",
            "--base-version",
            "2.4.1",
            "--fleet",
            str(fleet),
            *push,
            "--json",
            env=registry,
        )
        assert ran.returncode == 8, ran.stdout + ran.stderr
        (result,) = json.loads(ran.stdout)["result"]["results"]
        assert result["status"] == "failed" and result["error"]["exit_code"] == 7, result
        assert "`builder lock`" in result["error"]["hint"]
    # a local build is not a release; --allow-unlocked pushes a labelled development build
    assert run_cli("build", str(repo), "--oci-layout", str(tmp_path / "l"), env=env).returncode == 0
    dev = run_cli("build", str(repo), "--push", "--allow-unlocked", "--json", env=registry)
    assert dev.returncode == 0, dev.stdout + dev.stderr
    report = json.loads(dev.stdout)["result"]
    assert report["development"] is True and "registry" in report["outputs"]
    assert any("no customer.lock.yaml committed" in w for w in report["warnings"])
    from helpers import offline_settings

    from builder.image.contents import open_image

    pushed = open_image(report["image"], offline_settings(tmp_path / "read"))
    assert pushed.labels["com.ivd.development-build"] == "true"
    (tmp_path / "dev.json").write_text(dev.stdout)
    recorded = run_cli(
        "release-record", "--report", str(tmp_path / "dev.json"), "--repo", str(repo), env=env
    )
    assert recorded.returncode == 4, recorded.stdout + recorded.stderr
    assert "development build" in recorded.stderr


def test_a_release_of_head_refuses_uncommitted_edits(
    tmp_path: Path, env: dict[str, str], oci_registry: Any
) -> None:
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    assert run_cli("lock", str(repo), env=env).returncode == 0
    commit_files(repo, {"customer.lock.yaml": (repo / "customer.lock.yaml").read_text()}, "lock")
    (repo / "analysis.yaml").write_text(
        _sub(X_ANALYSIS, "min_region_area_um2: 500", "min_region_area_um2: 450")
    )
    registry = {**env, "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/dirty"}
    refused = run_cli("build", str(repo), "--push", env=registry)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "has uncommitted changes (analysis.yaml)" in line and "--ref" in line, line
    # naming the commit says which one ships: the committed config, locked and pushed
    named = run_cli("build", str(repo), "--ref", "HEAD", "--push", "--json", env=registry)
    assert named.returncode == 0, named.stdout + named.stderr
    assert json.loads(named.stdout)["result"]["development"] is False


def _production_with(tmp_path: Path, model_id: str, rename: str) -> Path:
    """A copy of the demo production store in which ``model_id``'s model.onnx is stored
    under another name (ClearML keeps the uploaded file's own name), its manifest to match."""
    production = tmp_path / "production"
    shutil.copytree(ROOT / "demo" / "production", production)
    (folder,) = production.glob(f"*/{model_id}")
    (folder / "model.onnx").rename(folder / rename)
    manifest = json.loads((folder / "publish-manifest.json").read_text())
    manifest["files"][0]["name"] = rename
    (folder / "publish-manifest.json").write_text(json.dumps(manifest))
    return production


def test_a_file_the_config_loads_that_the_model_lacks_is_refused_at_lock_and_build(
    tmp_path: Path, env: dict[str, str]
) -> None:
    model_id = yaml.safe_load(X_ANALYSIS)["analyses"][0]["models"]["carcinoma_model"]["reference"]
    production = _production_with(tmp_path, model_id, "best.onnx")
    bad = {**env, "BUILDER_PRODUCTION": f"file:{production}"}
    repo = _customer(tmp_path / "cust", CUSTOMER_X)
    line_no = _line_of(X_ANALYSIS, model_id)
    for args in (("lock",), ("lock", "--check"), ("build", "--oci-layout", str(tmp_path / "o"))):
        result = run_cli(*args[:1], str(repo), *args[1:], env=bad)
        assert result.returncode == 2, (args, result.stdout + result.stderr)
        (line,) = result.stderr.strip().splitlines()[-1:]
        assert f"analysis.yaml:{line_no}: " in line, line
        assert f"model carcinoma_model ({model_id}, from the registry)" in line, line
        assert "params.file names 'model.onnx'" in line and "its files: best.onnx" in line, line
    assert not (repo / "customer.lock.yaml").exists() and not (tmp_path / "o").exists()

    # A lock pinning other files than the config loads (edited, or made by an older builder):
    # validate and a --locked build refuse it from the lock alone, before any download.
    assert run_cli("lock", str(repo), env=env).returncode == 0
    lock_text = (repo / "customer.lock.yaml").read_text()
    commit_files(
        repo,
        {"customer.lock.yaml": lock_text.replace("- name: model.onnx", "- name: best.onnx", 1)},
        "lock",
    )
    for args in (("validate",), ("build", "--locked")):
        result = run_cli(*args[:1], str(repo), *args[1:], env=env)
        assert result.returncode == 2, (args, result.stdout + result.stderr)
        assert "params.file names 'model.onnx'" in result.stderr, result.stderr


def test_a_model_file_path_must_stay_in_its_model_folder(
    tmp_path: Path, env: dict[str, str]
) -> None:
    for index, escape in enumerate(("../../../../etc/passwd", "/etc/passwd")):
        analysis = _sub(Z_ANALYSIS, "params: {file: model.onnx,", f"params: {{file: '{escape}',")
        repo = _customer(tmp_path / f"cust{index}", CUSTOMER_Z, analysis)
        for command in ("validate", "lock", "build"):
            result = run_cli(command, str(repo), env=env)
            assert result.returncode == 2, (command, result.stdout + result.stderr)
            line = result.stderr.strip().splitlines()[-1]
            assert f"analysis.yaml:{_line_of(analysis, escape)}: " in line, line
            assert f"params.file '{escape}' leaves the model folder" in line, line
            assert "model mitosis_model (folder models/mitosis)" in line, line


def test_any_param_the_contract_marks_as_a_model_file_is_checked(
    tmp_path: Path, env: dict[str, str], contract: bytes
) -> None:
    """The class, not `params.file` alone: a plug-in param the runner's contract marks
    x-model-file (here a lookup table of MeanStd) must name a file of its model."""
    from tilerunner.param_schema import MODEL_FILE

    data = json.loads(contract)
    params = data["plugins"]["preprocessing"]["MeanStd"]["params"]["properties"]
    params["lut"] = {"type": "string", MODEL_FILE: True}
    marked = make_base(tmp_path / "marked", "2.4.1", json.dumps(data).encode())
    ok = _sub(Z_ANALYSIS, "std: [0.25, 0.25, 0.25]}", "std: [0.25, 0.25, 0.25], lut: model.onnx}")
    bad = _sub(Z_ANALYSIS, "std: [0.25, 0.25, 0.25]}", "std: [0.25, 0.25, 0.25], lut: lut.bin}")
    good_repo = _customer(tmp_path / "good", CUSTOMER_Z, ok)
    bad_repo = _customer(tmp_path / "bad", CUSTOMER_Z, bad)
    marked_env = {**env, "BUILDER_BASE_REPOSITORY": marked}
    assert run_cli("validate", str(good_repo), env=marked_env).returncode == 0
    refused = run_cli("validate", str(bad_repo), env=marked_env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert f"analysis.yaml:{_line_of(bad, 'lut: lut.bin')}: " in line, line
    assert "preprocessing[1].params.lut names 'lut.bin'" in line, line
