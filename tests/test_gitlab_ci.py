"""The GitLab pipelines, run locally with gitlab-ci-local (from the npm registry).

The YAML of this repository's pipeline, the generated child pipeline and the customer template
parse, their rules pick the right jobs per event, and the jobs run with gitlab-ci-local's shell
executor against the test bed: a base release (`base-image` against the test bed's Docker
engine instead of Docker-in-Docker, CPU variant, then `plan`, then every job of the generated
child pipeline, which build from their locks, push and record), and the customer template on
the default branch and on merge requests, before and after a base release (its build job smokes
the image in the test bed's engine, overriding the template's Docker-in-Docker service as a
runner with an engine of its own would), and without a lock (no release). Every job checks
its CI/CD variables first: one line names a missing one. Not exercised here: the `test` job
(a privileged runner), the trigger job itself (gitlab-ci-local does not run downstream
pipelines: the child YAML is run as its own pipeline instead), the GPU variant of `base-image`
(its 1.6 GB wheelhouse; `builder base build --variant gpu` is tested in test_gpu_variant.py),
`cache:` and `workflow:rules`, which gitlab-ci-local does not apply.
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
from helpers import (
    ROOT,
    commit_files,
    commit_lock,
    repository_snapshot,
    run_cli,
)
from test_fleet import _records

import builder
from builder.image.base_build import read_version
from testbed._util import cache_root

#: The newest gitlab-ci-local that runs on this machine's Node 20 (4.74 and later need Node 22).
GCL_VERSION = "4.72.0"
PREDEFINED = ("CI_COMMIT_TAG", "CI_COMMIT_BRANCH", "CI_PIPELINE_SOURCE", "CI_DEFAULT_BRANCH")


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
    return repository_snapshot(
        tmp_path,
        (".gitlab-ci.yml", "ci", "customers", "builder.toml", "demo", "base-image/VERSION"),
    )


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
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_TAG="v0.1.0") == {"test", "builder-release"}


def test_the_builder_ref_of_the_customer_template_is_this_release() -> None:
    """The template clones the builder at BUILDER_REF: it must name the tag a release of this
    version gets (v<version>), which the `builder-release` job checks when the tag is pushed."""
    import tomllib

    template = yaml.safe_load((ROOT / "ci" / "customer.gitlab-ci.yml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == builder.__version__
    assert template["variables"]["BUILDER_REF"] == f"v{version}"


def test_a_builder_release_tag_is_checked_against_the_version(
    gitlab_ci_local: Path, tmp_path: Path
) -> None:
    project, _ = _snapshot(tmp_path)
    shutil.copy2(ROOT / "pyproject.toml", project / "pyproject.toml")
    good = _gcl(
        gitlab_ci_local,
        project,
        "builder-release",
        "--force-shell-executor",
        variables={"CI_COMMIT_TAG": f"v{builder.__version__}"},
    )
    _passed(good, "builder-release")
    bad = _gcl(
        gitlab_ci_local,
        project,
        "builder-release",
        "--force-shell-executor",
        variables={"CI_COMMIT_TAG": "v9.9.9"},
    )
    assert bad.returncode != 0
    assert f"error: tag v9.9.9 is not the builder version v{builder.__version__}" in bad.stdout


def _namespace(tmp_path: Path) -> str:
    return re.sub("[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")


def _missing_variable_stops_the_job(
    ran: subprocess.CompletedProcess[str], job: str, name: str
) -> None:
    """The job failed at its start, on one line naming the variable."""
    assert ran.returncode != 0
    assert re.search(rf"FAIL\s+{re.escape(job)}\b", ran.stdout), ran.stdout[-3000:]
    # the job's line (gitlab-ci-local repeats a failed job's last line in its summary)
    # (gitlab-ci-local passes a job's stderr on as its own)
    output = (ran.stdout + ran.stderr).splitlines()
    lines = {ln.split("> ", 1)[-1] for ln in output if "> error:" in ln}
    assert len(lines) == 1, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert lines.pop().startswith(f"error: CI/CD variable {name} is not set"), lines


def _child_jobs(text: str, version: str, customers: list[str]) -> dict[str, Any]:
    """The generated child pipeline's jobs: one per customer, each in its resource group,
    building from its lock, pushing and recording, its report kept."""
    child = yaml.safe_load(text)
    assert child["variables"]["BASE_VERSION"] == version
    jobs = {name: job for name, job in child.items() if isinstance(job, dict) and "script" in job}
    assert set(jobs) == {f"build:{c}" for c in customers}
    assert {job["resource_group"] for job in jobs.values()} == {f"ivd-build-{c}" for c in customers}
    assert all("--locked --push --record" in job["script"][-1] for job in jobs.values())
    assert all(job["artifacts"]["when"] == "always" for job in jobs.values())
    return jobs


def _check_child_reports(
    project: Path, origin: Path, customers: list[str], image_prefix: str, base_digest: str
) -> None:
    """Each child job built its customer on the released base, pushed it and recorded it."""
    records = _records(origin)
    for customer in customers:
        report = json.loads(
            _artifact(project, f"build:{customer}", f"reports/{customer}.json").read_text()
        )
        (result,) = report["result"]["results"]
        assert result["status"] == "built"
        assert result["report"]["image"].startswith(image_prefix.format(customer))
        assert result["report"]["base"]["digest"] == base_digest  # the base the release pushed
        record = records[result["record"]["path"]]
        assert record["manifest_digest"] == result["report"]["manifest_digest"]
        assert record["config"]["path"] == f"customers/{customer}"
        assert record["ci_url"] == "https://gitlab.example.com/ivd/builder/-/jobs/7"
    assert len(records) == len(customers)


def test_a_base_release_builds_the_base_plans_and_the_child_jobs_build_push_and_record(
    gitlab_ci_local: Path,
    tmp_path: Path,
    oci_registry: Any,
    docker_engine: Any,
    base_os_image: str,
) -> None:
    """Tag base-v<VERSION>: `base-image` (CPU, against the test bed's engine) pushes the base,
    `plan` reaches the customers whose constraint admits it and writes the child pipeline,
    whose jobs build each customer from its lock on that base, push it and record it."""
    project, origin = _snapshot(tmp_path)
    version = read_version()
    tag = {"CI_COMMIT_TAG": f"base-v{version}"}
    cache = tmp_path / "cache"
    registry = f"{oci_registry.host}/{_namespace(tmp_path)}"
    common = {
        **tag,
        "BUILDER_CACHE_DIR": str(cache),
        "BUILDER_BASE_REPOSITORY": f"{registry}/inference-base",
        "BUILDER_IMAGE_REGISTRY": registry,
    }
    # the CPU wheelhouse the job keeps in its cache: seeded from the test bed's (no download)
    seeded = cache_root() / "wheelhouse" / "cpu"
    if seeded.is_dir():
        shutil.copytree(seeded, project / ".wheelhouse" / "cpu", copy_function=os.link)

    # The test bed's engine stands in for the docker:dind service, which gitlab-ci-local would
    # start in a container network even under the shell executor.
    pipeline = project / ".gitlab-ci.yml"
    dind = "  services:\n    - docker:27-dind\n"
    assert pipeline.read_text().count(dind) == 1
    pipeline.write_text(pipeline.read_text().replace(dind, ""))
    unset = _gcl(gitlab_ci_local, project, "base-image", "--force-shell-executor", variables=tag)
    _missing_variable_stops_the_job(unset, "base-image", "BUILDER_BASE_REPOSITORY")
    base_job = {
        **common,
        "DOCKER_HOST": docker_engine.host,  # instead of the docker:dind service
        "BUILDER_BASE_FROM": base_os_image,
        "BUILDER_BASE_VARIANTS": "cpu",
        # kept between sessions: the engine's image (reused by its inputs) is stored once
        "BUILDER_IMAGE_STORE": str(cache_root() / "gitlab-ci-base-store"),
    }
    based = _gcl(
        gitlab_ci_local, project, "base-image", "--force-shell-executor", variables=base_job
    )
    _passed(based, "base-image")
    # progress on the job's stderr (gitlab-ci-local passes it on as its own), in plain lines
    lines = based.stderr.splitlines()
    progress = [ln for ln in lines if re.match(r"base-image > \[ *[\d.]+ s\] ", ln)]
    assert any(" storing " in ln for ln in progress), based.stderr[-4000:]
    assert any(" pushing " in ln for ln in progress), progress
    base = json.loads(_artifact(project, "base-image", "base-image-cpu.json").read_text())
    base_digest = base["result"]["digest"]
    assert base["result"]["reference"] == f"{registry}/inference-base:{version}"

    planned = _gcl(gitlab_ci_local, project, "plan", "--force-shell-executor", variables=common)
    _passed(planned, "plan")
    artifacts = project / ".gitlab-ci-local" / "artifacts" / "plan"
    child_text = (artifacts / "child-pipeline.yml").read_text()
    plan_doc = json.loads((artifacts / "plan.json").read_text())
    assert plan_doc["ok"] is True
    reached = [i["customer"] for i in plan_doc["result"]["items"] if i["status"] == "rebuild"]
    assert reached == ["customer-x", "customer-y"]  # customer-z: ~=2.3.0 does not admit it
    jobs = _child_jobs(child_text, version, reached)

    # The child pipeline parses and runs, all of it: build from the lock, push, record.
    (project / "child-pipeline.yml").write_text(child_text)
    assert _jobs(gitlab_ci_local, project, file="child-pipeline.yml") == set(jobs)
    no_token = _gcl(
        gitlab_ci_local,
        project,
        "build:customer-x",
        "--force-shell-executor",
        variables=common,
        file="child-pipeline.yml",
    )
    _missing_variable_stops_the_job(no_token, "build:customer-x", "BUILDER_GIT_TOKEN")
    built = _gcl(
        gitlab_ci_local,
        project,
        "--force-shell-executor",
        variables={
            **common,
            "BUILDER_GIT_TOKEN": "glpat-not-used-for-a-local-origin",
            "CI_JOB_URL": "https://gitlab.example.com/ivd/builder/-/jobs/7",
        },
        file="child-pipeline.yml",
    )
    _passed(built, *jobs)
    assert "glpat-not-used" not in built.stdout
    _check_child_reports(project, origin, reached, f"{registry}/{{}}:{version}-", base_digest)


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
    from builder.fleet.plan import FleetPlan, PlanItem, PlanStatus

    items = [
        PlanItem(f"customer-{n:03d}", f"./c{n}", "HEAD", PlanStatus.REBUILD) for n in range(250)
    ]
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
    With ``engine``, ivd:build smokes the image in that Docker engine instead of a
    Docker-in-Docker service (which gitlab-ci-local would start even under the shell
    executor), as a customer whose runner has an engine of its own overrides it."""
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
        pipeline += yaml.safe_dump(
            {"ivd:build": {"services": [], "variables": {"DOCKER_HOST": engine}}}
        )
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


def _real_bases(docker_engine: Any, inference_base: str, repository: str, *versions: str) -> str:
    """The real inference base (its runner and contract: `builder smoke` runs on it) pushed
    as ``repository:<version>`` for each of ``versions``, relabelled with that version: base
    releases a customer's constraint admits. Returns the repository."""
    import io

    client = docker_engine.client()
    for version in versions:
        dockerfile = (
            f"FROM {inference_base}:{read_version()}\n"
            f'LABEL org.opencontainers.image.version="{version}"\n'
        )
        client.images.build(
            fileobj=io.BytesIO(dockerfile.encode()),
            tag=f"{repository}:{version}",
            network_mode="none",
            rm=True,
        )
        for line in client.images.push(repository, tag=version, stream=True, decode=True):
            assert "error" not in line, line
    return repository


def test_customer_template_refuses_to_release_without_a_committed_lock(
    gitlab_ci_local: Path, tmp_path: Path, oci_registry: Any, docker_engine: Any
) -> None:
    namespace = _namespace(tmp_path)
    env = {
        "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        "BUILDER_PRODUCTION": f"file:{ROOT / 'demo' / 'production'}",
        "BUILDER_BASE_REPOSITORY": f"{oci_registry.host}/{namespace}/base",
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{namespace}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
        "BUILDER_GIT_TOKEN": "glpat-not-used-for-a-local-origin",
    }
    project, origin = _customer_project(tmp_path, env, lock=False, engine=docker_engine.host)
    since = len(oci_registry.requests())
    built = _gcl(gitlab_ci_local, project, "ivd:build", "--force-shell-executor", variables=env)
    assert built.returncode != 0
    assert re.search(r"FAIL\s+.*ivd:build", built.stdout), built.stdout[-3000:]
    output = built.stdout + built.stderr
    assert "no customer.lock.yaml committed" in output and "`builder lock`" in output
    assert not [r for r in oci_registry.requests()[since:] if namespace in r.path]
    assert _records(origin) == {}


def test_customer_template_validates_merge_requests_and_builds_the_default_branch(
    gitlab_ci_local: Path,
    tmp_path: Path,
    oci_registry: Any,
    docker_engine: Any,
    inference_base: str,
) -> None:
    namespace = _namespace(tmp_path)
    bases = _real_bases(
        docker_engine, inference_base, f"{oci_registry.host}/{namespace}/base", "2.4.2"
    )
    env = {
        "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        "BUILDER_PRODUCTION": f"file:{ROOT / 'demo' / 'production'}",
        "BUILDER_BASE_REPOSITORY": bases,
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{namespace}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }
    project, origin = _customer_project(tmp_path, env, engine=docker_engine.host)
    mr = {"CI_PIPELINE_SOURCE": "merge_request_event"}
    token = {"BUILDER_GIT_TOKEN": "glpat-not-used-for-a-local-origin"}
    assert _jobs(gitlab_ci_local, project, **mr) == {"ivd:validate", "ivd:lock-check"}
    assert _jobs(gitlab_ci_local, project) == {"ivd:build"}  # the default branch
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_TAG="site-acceptance-1") == {"ivd:build"}
    assert _jobs(gitlab_ci_local, project, CI_COMMIT_BRANCH="feature") == set()

    checks = ("ivd:validate", "ivd:lock-check")
    ran = _gcl(gitlab_ci_local, project, *checks, "--force-shell-executor", variables={**mr, **env})
    _passed(ran, *checks)
    unset = {k: v for k, v in env.items() if k != "BUILDER_PRODUCTION"}
    missing = _gcl(
        gitlab_ci_local,
        project,
        "ivd:validate",
        "--force-shell-executor",
        variables={**mr, **unset},
    )
    _missing_variable_stops_the_job(missing, "ivd:validate", "BUILDER_PRODUCTION")

    def build() -> dict[str, Any]:
        built = _gcl(
            gitlab_ci_local,
            project,
            "ivd:build",
            "--force-shell-executor",
            variables={**env, **token},
        )
        _passed(built, "ivd:build")
        # the image ran on a sample slide before it was pushed, and the pushed one is that image
        assert re.search(r"smoke +\S+: passed in", built.stdout), built.stdout[-4000:]
        smoked = json.loads(_artifact(project, "ivd:build", "smoke-build.json").read_text())
        assert "registry" not in smoked["result"]["outputs"]
        report = json.loads(_artifact(project, "ivd:build", "build-report.json").read_text())
        result: dict[str, Any] = report["result"]
        assert result["manifest_digest"] == smoked["result"]["manifest_digest"]
        return result

    first = build()
    ((path, record),) = _records(origin).items()
    assert record["customer"] == "customer-w"
    assert record["manifest_digest"] == first["manifest_digest"]
    assert record["config"]["commit"] == git.Repo(project).head.commit.hexsha
    assert path == f"releases/customer-w/2.4.2-{record['config']['commit'][:12]}.yaml"

    # A base release (2.5.0, admitted by ~=2.4) changes nothing the merge request did: its
    # checks pass, and say that a newer base is there; the default branch still builds, from
    # the lock, on the pinned 2.4.2 (the fleet rebuild is what ships 2.5.0).
    _real_bases(docker_engine, inference_base, bases, "2.5.0")
    after = _gcl(
        gitlab_ci_local, project, *checks, "--force-shell-executor", variables={**mr, **env}
    )
    _passed(after, *checks)
    assert "note: base image 2.5.0 is released (the lock pins 2.4.2)" in after.stderr
    again = build()
    assert again["base"]["version"] == "2.4.2"
    assert again["manifest_digest"] == first["manifest_digest"]
    assert len(_records(origin)) == 1  # the identical record is accepted, not duplicated

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
    assert "min_region_area_um2 500 -> 400" in drift.stdout
