"""The GitLab pipelines, run locally with gitlab-ci-local (from the npm registry).

The YAML of this repository's pipeline, the generated child pipeline and the customer template
parse, their rules pick the right jobs per event, and jobs run with gitlab-ci-local's shell
executor: `plan`, a generated per-customer build job (build, push to the test registry, release
record), and the customer template's validate, lock-check and build jobs (the build job's smoke
run uses the test bed's Docker engine, overriding the template's Docker-in-Docker service as a
runner with its own engine would). Not exercised here: the `test` and `base-image` jobs (they need a privileged
runner / Docker-in-Docker), the trigger job itself (gitlab-ci-local does not run downstream
pipelines: the child YAML is run as its own pipeline instead) and `workflow:rules`, which
gitlab-ci-local does not apply.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import git
import pytest
import yaml
from helpers import ROOT, commit_files, commit_lock, run_cli
from test_fleet import _records, push_fleet_bases

#: The newest gitlab-ci-local that runs on this machine's Node 20 (4.74 and later need Node 22).
GCL_VERSION = "4.72.0"
PREDEFINED = ("CI_COMMIT_TAG", "CI_COMMIT_BRANCH", "CI_PIPELINE_SOURCE", "CI_DEFAULT_BRANCH")


@pytest.fixture(scope="module")
def fleet_bases(docker_engine: Any, oci_registry: Any, base_os_image: str) -> str:
    return push_fleet_bases(docker_engine, oci_registry, base_os_image)


def _tool_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ivd-test-tools"


@pytest.fixture(scope="session")
def gitlab_ci_local() -> Path:
    """gitlab-ci-local, installed from npm into a cache folder when missing (and rsync, which
    it copies the project with, from Debian)."""
    if shutil.which("rsync") is None:
        for step in (["apt-get", "install", "-y", "-q", "rsync"], ["apt-get", "update", "-q"]):
            subprocess.run(step, capture_output=True, check=False, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "rsync"], capture_output=True, check=False
        )
        if shutil.which("rsync") is None:
            pytest.fail("rsync is missing and apt-get could not install it", pytrace=False)
    prefix = _tool_cache() / f"gitlab-ci-local-{GCL_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "gitlab-ci-local"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is missing: install nodejs and npm (Debian packages)", pytrace=False)
        installed = subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(prefix),
                f"gitlab-ci-local@{GCL_VERSION}",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if installed.returncode != 0:
            pytest.fail(
                f"npm install gitlab-ci-local failed: {installed.stderr[-2000:]}", pytrace=False
            )
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=False
    )
    if version.stdout.strip() != GCL_VERSION:
        pytest.fail(
            f"gitlab-ci-local does not run: {version.stdout}{version.stderr}"[-2000:], pytrace=False
        )
    return binary


def _gcl(
    binary: Path,
    project: Path,
    *args: str,
    variables: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run gitlab-ci-local in `project`; jobs see `variables` (and builder on PATH)."""
    command = [str(binary), *args, "--ignore-predefined-vars", ",".join(PREDEFINED), "--no-color"]
    if file:
        command += ["--file", file]
    for key, value in (variables or {}).items():
        command += ["--variable", f"{key}={value}"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "GITLAB_"))}
    full_env.update(env or {})
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(
        command, cwd=project, capture_output=True, text=True, env=full_env, check=False, timeout=900
    )


def _jobs(binary: Path, project: Path, file: str | None = None, **variables: str) -> set[str]:
    """The jobs a pipeline would run for an event (gitlab-ci-local --list-json)."""
    listed = _gcl(binary, project, "--list-json", variables=variables, file=file)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    jobs = json.loads(listed.stdout[listed.stdout.index("[") :])
    return {job["name"] for job in jobs if job["when"] != "never"}


def _passed(result: subprocess.CompletedProcess[str], *jobs: str) -> None:
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    for job in jobs:
        assert re.search(rf"PASS\s+{re.escape(job)}\b", result.stdout), result.stdout[-4000:]


def _artifact(project: Path, job: str, path: str) -> Path:
    """A job's artifact (gitlab-ci-local encodes ':' and ' ' in the job's folder name)."""
    folders = project / ".gitlab-ci-local" / "artifacts"
    pattern = re.sub(r"[^A-Za-z0-9_-]", ".*", job)
    (folder,) = [f for f in folders.iterdir() if re.fullmatch(pattern, f.name)]
    return folder / path


def _snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """This repository's pipeline files, customers (with a fleet file) and demo registry as a
    fresh git repository whose origin is a local bare repository (records are pushed there)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in (".gitlab-ci.yml", "ci", "customers", "builder.toml", "demo"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        else:
            shutil.copy2(source, project / name)
    repo = git.Repo.init(project, initial_branch="main")
    repo.git.add("-A")
    actor = git.Actor("Test Author", "author@example.com")
    repo.index.commit("snapshot", author=actor, committer=actor)
    origin = tmp_path / "origin.git"
    git.Repo.init(origin, bare=True)
    repo.create_remote("origin", str(origin)).push("main")  # CI builds what the server has
    return project, origin


def test_pipeline_rules_per_event(gitlab_ci_local: Path, tmp_path: Path) -> None:
    project, _ = _snapshot(tmp_path)
    assert _jobs(gitlab_ci_local, project) == {"test"}
    assert _jobs(gitlab_ci_local, project, CI_PIPELINE_SOURCE="merge_request_event") == {"test"}
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_TAG="base-v2.5.0") == {
        "test",
        "base-image",
        "plan",
        "fleet",
    }
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_TAG="v2.5.0-docs") == {"test"}


def test_plan_job_generates_a_child_pipeline_whose_jobs_build_push_and_record(
    gitlab_ci_local: Path, tmp_path: Path, oci_registry: Any, fleet_bases: str
) -> None:
    project, origin = _snapshot(tmp_path)
    tag = {"CI_COMMIT_TAG": "base-v2.5.0"}
    cache = tmp_path / "cache"
    planned = _gcl(
        gitlab_ci_local,
        project,
        "plan",
        "--force-shell-executor",
        variables={**tag, "BUILDER_CACHE_DIR": str(cache)},
    )
    _passed(planned, "plan")
    artifacts = project / ".gitlab-ci-local" / "artifacts" / "plan"
    child_text = (artifacts / "child-pipeline.yml").read_text()
    plan_doc = json.loads((artifacts / "plan.json").read_text())
    assert plan_doc["ok"] is True
    assert [i["customer"] for i in plan_doc["result"]["items"] if i["status"] == "rebuild"] == [
        "customer-x",
        "customer-y",
    ]
    child = yaml.safe_load(child_text)
    jobs = {name: job for name, job in child.items() if isinstance(job, dict) and "script" in job}
    assert set(jobs) == {"build:customer-x", "build:customer-y"}
    assert {job["resource_group"] for job in jobs.values()} == {
        "ivd-build-customer-x",
        "ivd-build-customer-y",
    }
    assert all(job["artifacts"]["when"] == "always" for job in jobs.values())
    assert child["variables"]["BASE_VERSION"] == "2.5.0"

    # The child pipeline parses, and its customer-x job runs for real: build, push, record.
    (project / "child-pipeline.yml").write_text(child_text)
    assert _jobs(gitlab_ci_local, project, file="child-pipeline.yml") == set(jobs)
    namespace = re.sub("[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")
    registry = f"{oci_registry.host}/{namespace}"
    variables = {
        "BUILDER_BASE_REPOSITORY": fleet_bases,
        "BUILDER_IMAGE_REGISTRY": registry,
        "BUILDER_CACHE_DIR": str(cache),
        "CI_JOB_URL": "https://gitlab.example.com/ivd/builder/-/jobs/7",
    }
    built = _gcl(
        gitlab_ci_local,
        project,
        "build:customer-x",
        "--force-shell-executor",
        variables=variables,
        file="child-pipeline.yml",
    )
    _passed(built, "build:customer-x")
    report = json.loads(
        _artifact(project, "build:customer-x", "reports/customer-x.json").read_text()
    )
    (result,) = report["result"]["results"]
    assert result["status"] == "built"
    assert result["report"]["image"].startswith(f"{registry}/customer-x:2.5.0-")
    records = _records(origin)
    assert list(records) == [result["record"]["path"]]
    record = records[result["record"]["path"]]
    assert record["manifest_digest"] == result["report"]["manifest_digest"]
    assert record["config"]["path"] == "customers/customer-x"
    assert record["ci_url"] == "https://gitlab.example.com/ivd/builder/-/jobs/7"


def test_a_release_no_customer_admits_gives_a_valid_child_pipeline(
    gitlab_ci_local: Path, tmp_path: Path
) -> None:
    project, _ = _snapshot(tmp_path)
    env = {"BUILDER_CACHE_DIR": str(tmp_path / "cache")}
    child = project / "child-pipeline.yml"
    result = run_cli(
        "plan", "--base-version", "3.0.0", "--gitlab-child", str(child), env=env, cwd=project
    )
    assert result.returncode == 0, result.stderr
    assert "no customer admits base 3.0.0" in result.stdout
    ran = _gcl(gitlab_ci_local, project, "--file", "child-pipeline.yml", "--force-shell-executor")
    _passed(ran, "nothing to rebuild")
    assert "no customer of customers/fleet.yaml admits base 3.0.0" in ran.stdout


def test_a_large_fleet_is_generated_jobs_not_a_matrix(
    gitlab_ci_local: Path, tmp_path: Path
) -> None:
    """GitLab caps parallel:matrix at 200 permutations: the child pipeline lists one job per
    customer instead, and 250 of them still parse."""
    from builder.fleet.gitlab import render_child_pipeline
    from builder.fleet.plan import FleetPlan, PlanItem

    items = [PlanItem(f"customer-{n:03d}", f"./c{n}", "HEAD", "rebuild") for n in range(250)]
    text = render_child_pipeline(
        FleetPlan("2.5.0", "customers/fleet.yaml", items), fleet_file="customers/fleet.yaml"
    )
    assert "parallel" not in text
    project, _ = _snapshot(tmp_path)
    (project / "big.yml").write_text(text)
    assert len(_jobs(gitlab_ci_local, project, file="big.yml")) == 250


# -- the customer repository template ----------------------------------------------------------


def _customer_project(
    tmp_path: Path, env: dict[str, str], *, lock: bool = True, engine: str | None = None
) -> tuple[Path, Path]:
    """A customer repository (demo models) that includes ci/customer.gitlab-ci.yml, with a
    committed lock (unless not ``lock``), on branch main; origin is a local bare repository.
    With ``engine``, ivd:build uses that Docker engine instead of a Docker-in-Docker service,
    as a customer whose runner has its own engine would override it."""
    project = tmp_path / "customer-w"
    shutil.copytree(ROOT / "customers" / "customer-x", project)
    (project / "customer.yaml").write_text(
        (project / "customer.yaml").read_text().replace("customer-x", "customer-w")
    )
    (project / "customer.lock.yaml").unlink()
    (project / "ci").mkdir()
    shutil.copy2(ROOT / "ci" / "customer.gitlab-ci.yml", project / "ci" / "customer.gitlab-ci.yml")
    pipeline = "include:\n  - local: ci/customer.gitlab-ci.yml\n"
    if engine:
        build = {"services": [], "variables": {"DOCKER_HOST": engine}}
        pipeline += yaml.safe_dump({"ivd:build": build})
    (project / ".gitlab-ci.yml").write_text(pipeline)
    repo = git.Repo.init(project)
    repo.git.checkout("-b", "main")
    commit_files(project, {p: (project / p).read_bytes() for p in repo.untracked_files}, "config")
    if lock:
        commit_lock(project, env)
    origin = tmp_path / "customer-w.git"
    git.Repo.init(origin, bare=True)
    repo.create_remote("origin", str(origin)).push("main")  # CI builds what the server has
    return project, origin


def test_customer_template_refuses_to_release_without_a_committed_lock(
    gitlab_ci_local: Path, tmp_path: Path, oci_registry: Any, docker_engine: Any
) -> None:
    namespace = re.sub("[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")
    env = {
        "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        "BUILDER_PRODUCTION": f"file:{ROOT / 'demo' / 'production'}",
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{namespace}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }
    project, origin = _customer_project(tmp_path, env, lock=False, engine=docker_engine.host)
    since = len(oci_registry.requests())
    built = _gcl(gitlab_ci_local, project, "ivd:build", "--force-shell-executor", variables=env)
    assert built.returncode != 0
    assert re.search(r"FAIL\s+.*ivd:build", built.stdout), built.stdout[-3000:]
    assert "no customer.lock.yaml committed" in built.stdout and "`builder lock`" in built.stdout
    assert not [r for r in oci_registry.requests()[since:] if namespace in r.path]
    assert _records(origin) == {}


def test_customer_template_validates_merge_requests_and_builds_the_default_branch(
    gitlab_ci_local: Path,
    tmp_path: Path,
    oci_registry: Any,
    inference_base: str,
    docker_engine: Any,
) -> None:
    namespace = re.sub("[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")
    env = {
        "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        "BUILDER_PRODUCTION": f"file:{ROOT / 'demo' / 'production'}",
        "BUILDER_BASE_REPOSITORY": inference_base,
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{namespace}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }
    project, origin = _customer_project(tmp_path, env, engine=docker_engine.host)
    mr = {"CI_PIPELINE_SOURCE": "merge_request_event"}
    assert _jobs(gitlab_ci_local, project, **mr) == {"ivd:validate", "ivd:lock-check"}
    assert _jobs(gitlab_ci_local, project) == {"ivd:build"}  # the default branch
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_TAG="site-acceptance-1") == {"ivd:build"}
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_BRANCH="feature") == set()

    checks = ("ivd:validate", "ivd:lock-check")
    ran = _gcl(gitlab_ci_local, project, *checks, "--force-shell-executor", variables={**mr, **env})
    _passed(ran, *checks)

    built = _gcl(gitlab_ci_local, project, "ivd:build", "--force-shell-executor", variables=env)
    _passed(built, "ivd:build")
    # the image ran on a sample slide before it was pushed, and the pushed one is that image
    assert re.search(r"smoke +\S+: passed in", built.stdout), built.stdout[-4000:]
    smoked = json.loads(_artifact(project, "ivd:build", "smoke-build.json").read_text())
    assert "registry" not in smoked["result"]["outputs"]
    report = json.loads(_artifact(project, "ivd:build", "build-report.json").read_text())
    assert report["result"]["manifest_digest"] == smoked["result"]["manifest_digest"]
    ((path, record),) = _records(origin).items()
    assert record["customer"] == "customer-w"
    assert record["manifest_digest"] == report["result"]["manifest_digest"]
    assert record["config"]["commit"] == git.Repo(project).head.commit.hexsha
    version = (ROOT / "base-image" / "VERSION").read_text().strip()
    assert path == f"releases/customer-w/{version}-{record['config']['commit'][:12]}.yaml"

    # A merge request that changes the analysis without re-locking: lock-check fails.
    analysis = (
        (project / "analysis.yaml")
        .read_text()
        .replace("min_region_area_um2: 500", "min_region_area_um2: 400", 1)
    )
    assert analysis != (project / "analysis.yaml").read_text()
    commit_files(project, {"analysis.yaml": analysis}, "threshold")
    drift = _gcl(
        gitlab_ci_local,
        project,
        "ivd:lock-check",
        "--force-shell-executor",
        variables={**mr, **env},
    )
    assert drift.returncode != 0
    assert re.search(r"FAIL\s+.*ivd:lock-check", drift.stdout), drift.stdout[-3000:]
    assert "drifted" in drift.stdout
