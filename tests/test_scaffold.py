"""`builder init`: a new customer from nothing to a pushed, recorded, verified image.

The walkthrough is the README's own block ("Starting a customer"), run line by line as
written, in a copy of this repository's customers and demo registry whose origin is a local
bare repository, against the test registry and a base image (an OCI layout) that carries the
real runner contract.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import git
import pytest
import yaml
from helpers import CARCINOMA_ID, MITOSIS_ID, ROOT, repository_snapshot, run_cli
from test_contract import make_base
from test_fleet import _records

from builder.image.contract import runner_contract_from_source


def _readme_steps() -> list[str]:
    """The command lines of the README's "Starting a customer" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Starting a customer", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def contract() -> bytes:
    return runner_contract_from_source(ROOT / "base-image" / "runner")


def _project(tmp_path: Path) -> tuple[Path, Path]:
    """This repository's customers, demo registry and settings as a fresh git repository whose
    origin is a local bare repository."""
    return repository_snapshot(tmp_path, ("customers", "demo", "builder.toml"))


@pytest.fixture
def env(tmp_path: Path, contract: bytes, oci_registry: Any) -> dict[str, str]:
    namespace = re.sub("[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")
    return {
        "BUILDER_BASE_REPOSITORY": make_base(tmp_path / "base", "2.4.1", contract),
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{namespace}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
        "GIT_AUTHOR_NAME": "Engineer",
        "GIT_AUTHOR_EMAIL": "engineer@example.com",
        "GIT_COMMITTER_NAME": "Engineer",
        "GIT_COMMITTER_EMAIL": "engineer@example.com",
    }


def test_the_readme_walkthrough_from_init_to_a_verified_release(
    tmp_path: Path, env: dict[str, str]
) -> None:
    project, origin = _project(tmp_path)
    steps = _readme_steps()
    assert steps[1].startswith("builder init customer-w"), steps
    shell_env = {**os.environ, **env}
    shell_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{shell_env['PATH']}"
    outputs = []
    for step in steps:
        ran = subprocess.run(
            ["bash", "-c", f"set -euo pipefail; {step}"],
            cwd=project,
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert ran.returncode == 0, f"{step}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
        outputs.append(ran)
    by_command = dict(zip(steps, outputs, strict=True))

    folder = project / "customers" / "customer-w"
    analysis = yaml.safe_load((folder / "analysis.yaml").read_text())
    (only,) = analysis["analyses"]
    assert {m["reference"] for m in only["models"].values()} == {CARCINOMA_ID, MITOSIS_ID}
    assert [(f["cls"], f["models"]) for f in only["features"]] == [
        ("Carcinoma", {"classification_model": "carcinoma_model"}),
        ("Mitosis", {"segmentation_model": "mitosis_model"}),
    ]
    fleet = yaml.safe_load((project / "customers" / "fleet.yaml").read_text())
    assert {"name": "customer-w", "repo": "./customer-w"} in fleet["customers"]
    validated = next(o for s, o in by_command.items() if s.startswith("builder validate"))
    assert "valid in the work tree (nothing committed yet)" in validated.stdout
    assert "runner contract of base image" in validated.stdout  # checked, not skipped
    dev = next(o for s, o in by_command.items() if s.startswith("build customer-w --worktree"))
    assert re.search(r"customer-w:2\.4\.1-000000000000-dirty", dev.stdout), dev.stdout

    report = json.loads((project / "build.json").read_text())["result"]
    commit = git.Repo(project).head.commit.hexsha
    assert report["config_commit"] == commit and report["development"] is False
    assert report["outputs"]["registry"].startswith(f"{env['BUILDER_IMAGE_REGISTRY']}/customer-w:")
    records = _records(origin)
    assert list(records) == [f"releases/customer-w/2.4.1-{commit[:12]}.yaml"]
    (record,) = records.values()
    assert record["manifest_digest"] == report["manifest_digest"]
    verified = outputs[-1]
    assert "MATCH" in verified.stdout, verified.stdout + verified.stderr


def test_init_refuses_to_overwrite_and_says_what_is_wrong(
    tmp_path: Path, env: dict[str, str]
) -> None:
    project, _ = _project(tmp_path)

    def init(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("init", *args, env=env, cwd=project)

    fleet = project / "customers" / "fleet.yaml"
    before = fleet.read_bytes()
    cases = [
        (["customer-x", "-m", CARCINOMA_ID], 2, "customer.yaml, analysis.yaml, customer.lock.yaml already there"),
        (["Customer_W", "-m", CARCINOMA_ID], 2, "customer name 'Customer_W' is not lowercase"),
        (["customer-w", "-m", "carcinoma v9"], 3, "(did you mean a957f623e6d34159a07aec1b8323eb54 (carcinoma v3 (demo))?)"),
        (["customer-w", "-m", "carcinoma v3 (demo)", "--fleet", str(fleet), "--path", str(tmp_path / "x")], 0, ""),
        (["customer-w", "-m", CARCINOMA_ID, "--path", str(tmp_path / "y")], 2, "'customer-w' is already in the fleet"),
        (["customer-v", "-m", "0000000000000000000000000000000f"], 3, "not found"),
    ]  # fmt: skip
    for args, code, needle in cases:
        result = init(*args)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        if code:
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and needle in last, (args, last)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # the one success: its own repository (git init), and one entry added to the fleet file
    assert (tmp_path / "x" / ".git").is_dir()
    added = fleet.read_bytes()[len(before) :].decode()
    assert added == f"- name: customer-w\n  repo: {os.path.relpath(tmp_path / 'x', fleet.parent)}\n"
    assert not (tmp_path / "y").exists()  # nothing written by a refused init
    as_json = run_cli(
        "init", "customer-u", "-m", "3fcf116c", "--no-fleet", "--json", env=env, cwd=project
    )
    document = json.loads(as_json.stdout)
    assert document["ok"] is True and document["command"] == "init"
    (model,) = document["result"]["models"]
    assert (model["model_id"], model["feature"], model["role"]) == (
        MITOSIS_ID,
        "Mitosis",
        "segmentation_model",
    )
    assert document["result"]["fleet"] is None and fleet.read_bytes() == before + added.encode()
