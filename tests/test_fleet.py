"""Fleet rebuilds: the fleet file, `plan`, `build-all` and release-record write-back.

Real git repositories (bare remotes, file:// and an authenticated smart-HTTP server running
`git http-backend`), the real CLI in subprocesses, and for the builds the test bed's Docker
engine (to make small base images) and registry (to count what it received).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import git
import pytest
import yaml
from helpers import (
    ANALYSIS_YAML,
    CARCINOMA_ID,
    CARCINOMA_TASK,
    CUSTOMER_YAML,
    MITOSIS_ID,
    MITOSIS_TASK,
    ROOT,
    SeedModel,
    commit_files,
    commit_lock,
    customer_repo,
    push_labelled_bases,
    run_cli,
    seed_models,
)

from builder.documents.build_report import BuildReport
from builder.documents.release_record import ReleaseRecord
from builder.errors import ConfigError, ReleaseGateError, WriteBackError
from builder.fleet.build_all import Pace
from builder.fleet.fleetfile import load_fleet, parse_release_version
from builder.fleet.plan import last_commits, plan
from builder.record import (
    RELEASES_BRANCH,
    ReleaseLog,
    WriteResult,
    release_record,
    write_release_records,
)
from builder.settings import load_settings
from testbed.githistory import customer_name, make_history, write_fleet

BASE_REPO = "ivd/fleet-base"
BASE_VERSIONS = ("2.3.4", "2.4.2", "2.5.0")
CARCINOMA = os.urandom(200 * 1024)
MITOSIS = b"mitosis-weights" * 2048
TOKEN = "glpat-Sup3rS3cretT0ken"


# -- helpers ------------------------------------------------------------------------------------


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def _bare_clone(work: Path, bare: Path) -> Path:
    _git("clone", "-q", "--bare", str(work), str(bare))
    return bare


def _folder_customer(repo: Path, name: str, base: str, *, threshold: float = 0.5) -> None:
    """A customer kept as a folder of a shared repository (like customers/ here)."""
    commit_files(
        repo,
        {
            f"{name}/customer.yaml": CUSTOMER_YAML.format(name=name, base=base),
            f"{name}/analysis.yaml": ANALYSIS_YAML.format(
                carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=threshold
            ),
        },
        f"{name}: config",
    )


def _write_fleet(path: Path, entries: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"fleet_version": 1, "customers": entries}, sort_keys=False))
    return path


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"not JSON (exit {result.returncode}): {result.stdout}\n{result.stderr}")
    return doc


def _records(bare: Path, branch: str = RELEASES_BRANCH) -> dict[str, dict[str, Any]]:
    """Release records on the branch of a repository: path -> parsed YAML."""
    repo = git.Repo(bare)
    try:
        tree = repo.commit(branch).tree
    except (git.BadName, ValueError):
        return {}
    return {
        str(blob.path): yaml.safe_load(blob.data_stream.read())
        for blob in tree.traverse()
        if isinstance(blob, git.Blob)
    }


def _fake_json(
    customer: str, commit: str, digest: str, *, version: str = "2.5.0", **changes: Any
) -> dict[str, Any]:
    """A `build --json` result as the pipeline writes it (write-back input only)."""
    report: dict[str, Any] = {
        "customer": customer,
        "image": f"registry.example.com/{customer}:{version}-{commit[:12]}",
        "tags": [
            f"registry.example.com/{customer}:{version}-{commit[:12]}",
            f"registry.example.com/{customer}:{version}",
        ],
        "manifest_digest": digest,
        "config_digest": "sha256:" + "c" * 64,
        "config_commit": commit,
        "base": {
            "repository": "registry.example.com/ivd/inference-base",
            "version": version,
            "digest": "sha256:" + "b" * 64,
        },
        "models": [
            {
                "name": "carcinoma_model",
                "sourcing": "auto",
                "registry_id": CARCINOMA_ID,
                "registry_name": "carcinoma",
                "task_id": CARCINOMA_TASK,
                "weights_uri": f"s3://production/{CARCINOMA_TASK}/",
                "dir_hash": "e" * 64,
                "files": [{"name": "model.onnx", "size": 3, "sha256": "d" * 64}],
            }
        ],
        "layers": [],
        "development": False,
        "bytes_downloaded": 0,
        "bytes_resumed": 0,
        "bytes_uploaded": 0,
        "outputs": {
            "registry": f"registry.example.com/{customer}:{version}-{commit[:12]}@{digest}"
        },
        "timings": {},
        "warnings": [],
    }
    report.update(changes)
    return report


def _fake_report(
    customer: str, commit: str, digest: str, *, version: str = "2.5.0", **changes: Any
) -> BuildReport:
    """:func:`_fake_json` read through its type, as the write-back gets it."""
    return BuildReport.from_dict(_fake_json(customer, commit, digest, version=version, **changes))


@pytest.fixture
def local_env(tmp_path: Path) -> dict[str, str]:
    """Settings for subprocesses: a local model registry, file: production, a private cache."""
    models = seed_models(
        tmp_path,
        [
            SeedModel(CARCINOMA_ID, CARCINOMA_TASK, "carcinoma v3", {"model.onnx": CARCINOMA}),
            SeedModel(MITOSIS_ID, MITOSIS_TASK, "mitosis v1", {"model.onnx": MITOSIS}),
        ],
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("BUILDER_", "CI_", "GIT_CONFIG"))
    }
    env.update(
        models.env(),
        BUILDER_CACHE_DIR=str(tmp_path / "cache"),
        BUILDER_IMAGE_REGISTRY="registry.example.com",
    )
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


# -- plan: the examples of this repository ------------------------------------------------------


def test_plan_the_example_fleet(local_env: dict[str, str]) -> None:
    result = _cli(local_env, "plan", "--base-version", "2.5.0", "--json")
    assert result.returncode == 0, result.stderr
    items = {i["customer"]: i for i in _json(result)["result"]["items"]}
    assert {n: i["status"] for n, i in items.items()} == {
        "customer-x": "rebuild",
        "customer-y": "rebuild",
        "customer-z": "skip",
    }
    assert items["customer-z"]["summary"] == "~=2.3.0 does not admit 2.5.0"
    assert items["customer-x"]["image"].startswith("registry.example.com/customer-x:2.5.0-")

    patch = _cli(local_env, "plan", "--base-version", "2.3.7", "--json")
    assert [i["customer"] for i in _json(patch)["result"]["items"] if i["status"] == "rebuild"] == [
        "customer-z"
    ]
    nobody = _cli(local_env, "plan", "--base-version", "3.0.0")
    assert nobody.returncode == 0, nobody.stderr
    assert "0 of 3 images to rebuild" in nobody.stdout
    assert "no customer admits base 3.0.0: nothing to rebuild" in nobody.stdout


def test_plan_bad_input_is_one_clear_line(local_env: dict[str, str], tmp_path: Path) -> None:
    unknown = _cli(local_env, "plan", "--base-version", "2.5.0", "--only", "customer-q")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        f"error: customer 'customer-q' is not in the fleet file {ROOT / 'customers' / 'fleet.yaml'} "
        "(listed: customer-x, customer-y, customer-z) (add it to the fleet file, or fix the name)"
    ]

    settings = load_settings(ROOT)
    with pytest.raises(ConfigError, match=r"'~=2\.5' is not a version like 2\.5\.0"):
        parse_release_version("~=2.5")
    cases = {
        "typo": (
            [{"name": "customer-x", "repo": "x", "branch": "main"}],
            r"typo\.yaml:\d+: customers\[0\]: unknown key 'branch'",
        ),
        "twice": (
            [{"name": "customer-x", "repo": "a"}, {"name": "customer-x", "repo": "b"}],
            r"twice\.yaml:\d+: customer 'customer-x' is listed twice",
        ),
        "secret": (
            [{"name": "customer-x", "repo": f"https://oauth2:{TOKEN}@gitlab.example.com/c/x.git"}],
            r"secret\.yaml:\d+: the URL of 'customer-x' holds credentials; remove them",
        ),
    }
    for name, (entries, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as info:
            load_fleet(_write_fleet(tmp_path / f"{name}.yaml", entries), settings)
        assert TOKEN not in str(info.value)
    with pytest.raises(ConfigError, match=r"no\.yaml: cannot read the fleet file"):
        load_fleet(tmp_path / "no.yaml", settings)


def test_plan_reports_each_faulty_customer_and_plans_the_others(
    local_env: dict[str, str], tmp_path: Path
) -> None:
    configs = tmp_path / "configs"
    _folder_customer(configs, "customer-a", "~=2.4")
    _folder_customer(configs, "customer-other", "~=2.4")
    commit_files(
        configs,
        {
            "customer-bad/customer.yaml": "version: 1\ncustomer: customer-bad\nbase_image: {verison: '2.5'}\n"
        },
        "bad config",
    )
    fleet = _write_fleet(
        configs / "fleet.yaml",
        [
            {"name": "customer-a", "repo": "customer-a"},
            {"name": "customer-gone", "repo": "customer-gone"},
            {"name": "customer-bad", "repo": "customer-bad"},
            {"name": "customer-renamed", "repo": "customer-other"},
            {"name": "customer-nowhere", "repo": (tmp_path / "nowhere.git").as_uri()},
        ],
    )
    result = _cli(local_env, "plan", "--base-version", "2.5.0", "--fleet", str(fleet), "--json")
    assert result.returncode == 8
    doc = _json(result)
    assert doc["ok"] is False
    assert doc["error"]["message"] == (
        "4 of 5 images could not be planned: customer-gone, customer-bad, customer-renamed, "
        "customer-nowhere; 1 of 5 images would be refused: customer-a"
    )
    items = {i["customer"]: i for i in doc["result"]["items"]}
    assert items["customer-a"]["status"] == "rebuild"
    assert "customer-a" in items["customer-a"]["image"]
    assert "not found" in items["customer-gone"]["summary"]
    assert re.search(
        r"customer\.yaml:3: base_image: unknown key 'verison'", items["customer-bad"]["summary"]
    )
    assert "whose customer.yaml names 'customer-other'" in items["customer-renamed"]["summary"]
    assert items["customer-nowhere"]["summary"].startswith("cannot clone file://")
    assert all(items[n]["error"]["exit_code"] == 2 for n in items if n != "customer-a")

    human = _cli(local_env, "plan", "--base-version", "2.5.0", "--fleet", str(fleet))
    assert human.returncode == 8
    assert (
        human.stderr.strip()
        .splitlines()[-1]
        .startswith("error: 4 of 5 images could not be planned")
    )
    assert re.search(r"customer-a\s+~=2.4\s+rebuild", human.stdout)


# -- build-all: progress --------------------------------------------------------------------------


def test_progress_pace_leaves_out_the_warm_up_and_follows_the_recent_builds() -> None:
    """The first build of each worker also starts it: an ETA from the run's average at the
    start overestimated the rest sixfold. The pace leaves the warm-up out, follows the last
    builds, and says nothing (None) rather than guess or print "ETA 0 s"."""
    pace = Pace(workers=2, builds=100, window=20)
    assert pace.rate is None and pace.eta is None
    pace.add(30.0)  # both workers' first builds: 30 s each, most of it starting up
    pace.add(30.5)
    assert pace.rate is None and pace.eta is None
    now = 30.5
    for _ in range(10):  # then a build every 2.5 s (two workers, 5 s each)
        now += 2.5
        pace.add(now)
    assert pace.rate == pytest.approx(24.0)
    assert pace.eta is not None and pace.eta == pytest.approx(88 * 2.5)
    average = (100 - 12) * now / 12  # the estimate from every build since the start
    assert average > 1.8 * pace.eta
    for _ in range(40):  # faster now (warm caches): the window follows within 20 builds
        now += 1.0
        pace.add(now)
    assert pace.rate == pytest.approx(60.0)
    for _ in range(48):
        now += 1.0
        pace.add(now)
    assert pace.eta is None  # done: nothing to estimate


# -- plan: one pass over history ---------------------------------------------------------------


def _rev_list(repo: Path, ref: str, folder: str) -> str | None:
    """The per-customer answer plan used to get: one history walk per folder."""
    return _git("rev-list", "--max-count=1", ref, "--", folder, cwd=repo) or None


@pytest.mark.parametrize("seed", [1, 2])
def test_single_pass_plan_answers_what_rev_list_answers_per_customer(
    tmp_path: Path, local_env: dict[str, str], seed: int
) -> None:
    """Many customers, side branches merged back (some merges changing files themselves),
    distinct commit times: each folder's last commit from the one pass equals git's own
    per-folder answer, at HEAD and at an older ref, for folders that are gone or never were."""
    customers = 40
    repo = make_history(tmp_path / "configs", customers, 260, seed=seed, model_id=CARCINOMA_ID)
    assert int(_git("rev-list", "--count", "--merges", "HEAD", cwd=repo)) > 20
    stamps = _git("log", "--format=%ct", "HEAD", cwd=repo).split()
    assert len(set(stamps)) == len(stamps)  # distinct commit times
    _git("rm", "-q", "-r", f"customers/{customer_name(3)}", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "drop 3", cwd=repo)
    folders = [f"customers/{customer_name(i)}" for i in range(customers)]
    folders += ["customers/never-there", "README.md", "customers"]
    side = _git("rev-list", "--merges", "-n1", "HEAD~5", cwd=repo) + "^2"  # a side branch
    for ref in ("HEAD", "HEAD~40", side):
        got = last_commits(repo, ref, folders)
        want = {folder: _rev_list(repo, ref, folder) for folder in folders}
        assert got == want, ref
    _check_answers_kept_for_the_next_pass(repo, folders, tmp_path / "plan-cache")
    # plan itself: each customer's config revision is that commit.
    settings = replace(load_settings(ROOT), cache_dir=tmp_path / "cache")
    fleet = load_fleet(write_fleet(repo, customers), settings)
    planned = plan(fleet, settings, "2.5.0")
    commits = {i.customer: i.commit for i in planned.items}
    for i in range(customers):
        if i == 3:
            assert planned.items[3].status == "error"
            assert "not found" in planned.items[3].summary
            continue
        assert commits[customer_name(i)] == _rev_list(repo, "HEAD", folders[i])
    assert len(planned.rebuild) == customers - 1


def _check_answers_kept_for_the_next_pass(repo: Path, folders: list[str], cache: Path) -> None:
    """With a cache, the next pass reads only the history added since: still git's answers,
    and a folder untouched since takes the kept answer at the old start commit."""
    first = last_commits(repo, "HEAD", folders, cache_dir=cache)
    (kept,) = cache.glob("*.json")
    planted = json.loads(kept.read_text())
    planted["answers"][folders[7]] = "f" * 40  # proof that the old start answers it
    git_id = ("-c", "user.name=t", "-c", "user.email=t@e")
    _git("checkout", "-q", "-b", "mr", cwd=repo)
    with (repo / folders[1] / "analysis.yaml").open("a") as file:
        file.write("# changed\n")
    _git(*git_id, "commit", "-qam", "mr", cwd=repo)
    _git("checkout", "-q", "main", cwd=repo)
    with (repo / folders[2] / "analysis.yaml").open("a") as file:
        file.write("# changed\n")
    _git(*git_id, "commit", "-qam", "direct", cwd=repo)
    _git(*git_id, "merge", "-q", "--no-ff", "-m", "merge mr", "mr", cwd=repo)
    again = last_commits(repo, "HEAD", folders, cache_dir=cache)
    assert again == {folder: _rev_list(repo, "HEAD", folder) for folder in folders}
    assert again[folders[7]] == first[folders[7]] and again[folders[1]] != first[folders[1]]
    kept.write_text(json.dumps(planted))
    assert last_commits(repo, "HEAD", folders, cache_dir=cache)[folders[7]] == "f" * 40
    # A branch forked before the kept commit and merged since: its folder waits at a commit
    # the short walk never reaches, so the whole history is read, still git's answers.
    assert json.loads(kept.read_text())["commit"] == _git("rev-parse", "HEAD", cwd=repo)
    _git("checkout", "-q", "-b", "old-fork", "HEAD~30", cwd=repo)
    (repo / folders[9]).mkdir(exist_ok=True)
    (repo / folders[9] / "NOTES.md").write_text("changed on an old fork\n")
    _git("add", folders[9], cwd=repo)
    _git(*git_id, "commit", "-qm", "old fork", cwd=repo)
    _git("checkout", "-q", "main", cwd=repo)
    _git(*git_id, "merge", "-q", "--no-ff", "-m", "merge old fork", "old-fork", cwd=repo)
    late = last_commits(repo, "HEAD", folders, cache_dir=cache)
    want = {folder: _rev_list(repo, "HEAD", folder) for folder in folders}
    assert late == {**want, folders[7]: "f" * 40}
    assert late[folders[9]] != again[folders[9]]
    kept.unlink()


def _record_for(remote: Path, customer: str, commit: str, version: str, digest: str) -> None:
    report = _fake_report(customer, commit, digest, version=version)
    log = ReleaseLog(str(remote), remote.parent / "writer-cache", RELEASES_BRANCH)
    log.write(release_record(report, config_source=remote.as_uri()))


def _plan_doc(planned: Any) -> dict[str, Any]:
    """A plan as the JSON document says it, less how long it took."""
    doc = dataclasses.asdict(planned)
    doc.pop("seconds")
    return doc


def _same_as_cold(fleet_file: Path, settings: Any, version: str, cold_dir: Path) -> Any:
    """Plan with the settings' cache (the index of earlier plans), and again with an empty
    cache: both must say the same, whatever happened in between."""
    warm = plan(load_fleet(fleet_file, settings), settings, version)
    cold_settings = replace(settings, cache_dir=cold_dir)
    cold = plan(load_fleet(fleet_file, cold_settings), cold_settings, version)
    assert _plan_doc(warm) == _plan_doc(cold)
    return warm


def _commit_all(repo: Path, message: str) -> str:
    _git("add", "-A", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", message, cwd=repo)
    return _git("rev-parse", "HEAD", cwd=repo)


def _check_rewritten_histories(
    repo: Path, bare: Path, fleet_file: Path, settings: Any, colds: Iterator[Path], work: Path
) -> None:
    """Configs reset and committed anew, the records branch force-pushed back, a record
    edited in place: every plan still equals a cold one."""
    # History rewritten: configs reset and committed anew, records branch force-pushed.
    _git("reset", "-q", "--hard", "HEAD~4", cwd=repo)
    (repo / "customers" / customer_name(1) / "analysis.yaml").write_text("analyses: []\n")
    _commit_all(repo, "rewritten")
    _git("push", "-q", "--force", "origin", "HEAD:main", cwd=repo)
    records = git.Repo(bare).commit(RELEASES_BRANCH)
    _git("update-ref", f"refs/heads/{RELEASES_BRANCH}", records.parents[0].hexsha, cwd=bare)
    rewritten = _same_as_cold(fleet_file, settings, "2.5.0", next(colds))
    assert rewritten.items[1].status == "error" and rewritten.items[5].status == "rebuild"
    # A record changed in place on the branch (not an append): everything is read again.
    _git("clone", "-q", "-b", RELEASES_BRANCH, str(bare), str(work))
    path = next((work / "releases" / customer_name(4)).iterdir())
    path.write_text(path.read_text().replace("4" * 64, "a" * 64))
    _commit_all(work, "edited")
    _git("push", "-q", "origin", f"HEAD:{RELEASES_BRANCH}", cwd=work)
    edited = _same_as_cold(fleet_file, settings, "2.5.0", next(colds))
    assert (edited.items[4].previous or {})["digest"] == "sha256:" + "a" * 64


def test_plan_index_never_answers_other_than_a_cold_plan(tmp_path: Path) -> None:
    """Re-plans read only what changed (the kept facts and records are used: planted ones
    show through), and after every kind of change the plan equals one made with an empty
    cache: a folder, a release record, the fleet file, the base version, a rewritten
    history of the configs and of the records branch."""
    repo = make_history(tmp_path / "configs", 8, 30, seed=3, model_id=CARCINOMA_ID)
    bare = _bare_clone(repo, tmp_path / "configs.git")
    _git("remote", "add", "origin", str(bare), cwd=repo)
    fleet_file = write_fleet(repo, 8)
    (repo / ".git" / "info" / "exclude").write_text("fleet.yaml\n")  # kept out of history
    # A base repository whose answer does not depend on when it is asked (an absent layout).
    no_base = f"oci:{tmp_path / 'no-base'}"
    settings = replace(load_settings(ROOT), cache_dir=tmp_path / "cache", base_repository=no_base)
    colds = (tmp_path / f"cold-{n}" for n in range(100))
    first = _same_as_cold(fleet_file, settings, "2.5.0", next(colds))
    assert [i.status for i in first.items] == ["rebuild"] * 8

    # The kept facts are what a re-plan uses: a planted constraint shows through ...
    (index_file,) = (settings.cache_dir / "plan").glob("customers-*.json")
    kept = json.loads(index_file.read_text())
    kept["customers"][customer_name(2)]["facts"]["constraint"] = "~=9.9"
    index_file.write_text(json.dumps(kept))
    planted = plan(load_fleet(fleet_file, settings), settings, "2.5.0")
    assert planted.items[2].status == "skip"
    # ... until that folder changes: then it is read again.
    folder = repo / "customers" / customer_name(2)
    (folder / "NOTES.md").write_text("changed\n")
    _commit_all(repo, "notes")
    _git("push", "-q", "origin", "HEAD:main", cwd=repo)
    assert _same_as_cold(fleet_file, settings, "2.5.0", next(colds)).items[2].status == "rebuild"

    # A release record: that image is released; a base bump makes it a base-only rebuild.
    commit = first.items[4].commit
    assert commit
    _record_for(bare, customer_name(4), commit, "2.5.0", "sha256:" + "4" * 64)
    released = _same_as_cold(fleet_file, settings, "2.5.0", next(colds))
    assert released.items[4].status == "released"
    assert _same_as_cold(fleet_file, settings, "2.5.1", next(colds)).items[4].change == "base"
    # The records index is what a re-plan uses while the branch has not moved.
    (log_index,) = (settings.cache_dir / "releases").glob("*/ivd-latest-records.json")
    honest = log_index.read_text()
    data = json.loads(honest)
    data["latest"][0][3]["manifest_digest"] = (
        "sha256:" + "0" * 64
    )  # [customer, variant, path, record]
    log_index.write_text(json.dumps(data))
    assert plan(load_fleet(fleet_file, settings), settings, "2.5.0").items[4].previous == {
        **(released.items[4].previous or {}),
        "digest": "sha256:" + "0" * 64,
    }
    log_index.write_text(honest)
    # Records added since: read incrementally, still a cold plan's answer.
    _record_for(bare, customer_name(5), first.items[5].commit or "", "2.5.0", "sha256:" + "5" * 64)
    assert _same_as_cold(fleet_file, settings, "2.5.0", next(colds)).items[5].status == "released"

    # The fleet file: an entry dropped, one renamed to a folder that names someone else.
    text = fleet_file.read_text()
    fleet_file.write_text(text.replace(f"- name: {customer_name(7)}\n", "- name: customer-new\n"))
    changed = _same_as_cold(fleet_file, settings, "2.5.0", next(colds))
    assert changed.items[-1].status == "error"
    fleet_file.write_text(text)

    _check_rewritten_histories(repo, bare, fleet_file, settings, colds, tmp_path / "work")


def test_plan_counts_already_released_apart_and_warns_on_a_base_downgrade(
    records_remote: Path, local_env: dict[str, str], tmp_path: Path
) -> None:
    commit = git.Repo(records_remote).commit("HEAD").hexsha
    _record_for(records_remote, "customer-a", commit, "2.5.0", "sha256:" + "5" * 64)
    fleet = _write_fleet(
        tmp_path / "fleet.yaml", [{"name": "customer-a", "repo": records_remote.as_uri()}]
    )
    same = _cli(local_env, "plan", "--base-version", "2.5.0", "--fleet", str(fleet), "--json")
    assert same.returncode == 0, same.stderr
    (item,) = _json(same)["result"]["items"]
    assert item["status"] == "released" and item["change"] == "none"
    assert item["summary"] == f"already released: {item['previous']['image']}"
    human = _cli(local_env, "plan", "--base-version", "2.5.0", "--fleet", str(fleet))
    assert "0 of 1 images to rebuild, 1 already released (1 customer," in human.stdout
    child = tmp_path / "child.yml"
    _cli(
        local_env,
        "plan",
        "--base-version",
        "2.5.0",
        "--fleet",
        str(fleet),
        "--gitlab-child",
        str(child),
    )
    assert "build:customer-a" not in child.read_text()  # nothing to do: no CI job

    down = _cli(local_env, "plan", "--base-version", "2.4.2", "--fleet", str(fleet), "--json")
    assert down.returncode == 8, down.stderr  # no lock: its release build would be refused
    (item,) = _json(down)["result"]["items"]
    assert item["status"] == "rebuild" and item["change"] == "base"
    assert [p.split(";")[0] for p in item["problems"]] == [
        "missing lock: no customer.lock.yaml committed"
    ]
    assert item["warnings"] == [
        f"base downgrade: customer-a was last released on 2.5.0 ({item['previous']['image']}); "
        "2.4.2 is older"
    ]
    assert "warning: base downgrade: customer-a was last released on 2.5.0" in down.stderr
    up = _json(_cli(local_env, "plan", "--base-version", "2.5.1", "--fleet", str(fleet), "--json"))
    assert up["result"]["items"][0]["warnings"] == []


def test_release_records_of_a_run_are_one_commit_per_repository(
    tmp_path: Path, local_env: dict[str, str]
) -> None:
    configs = tmp_path / "configs"
    for name in ("customer-a", "customer-b", "customer-c"):
        _folder_customer(configs, name, "~=2.4")
    bare = _bare_clone(configs, tmp_path / "configs.git")
    _git("remote", "add", "origin", str(bare), cwd=configs)
    settings = replace(load_settings(ROOT), cache_dir=tmp_path / "cache")
    head = git.Repo(configs).commit("HEAD").hexsha
    reports = [
        _fake_report(name, head, "sha256:" + str(n) * 64)
        for n, name in enumerate(("customer-a", "customer-b", "customer-c"), start=1)
    ]
    gpu = f"registry.example.com/customer-a:2.5.0-gpu-{head[:12]}"  # the same customer's gpu image
    reports.append(_fake_report("customer-a", head, "sha256:" + "9" * 64, image=gpu, tags=[gpu]))
    locations = {r.customer: str(configs / r.customer) for r in reports}
    written = write_release_records(reports, locations, settings)
    assert all(isinstance(w, WriteResult) and w.status == "written" for w in written)
    branch = git.Repo(bare).commit(RELEASES_BRANCH)
    assert not branch.parents  # one commit holds all four, both images of customer-a
    assert {w.commit for w in written if isinstance(w, WriteResult)} == {branch.hexsha}
    assert sorted(_records(bare)) == [
        f"releases/customer-a/2.5.0-{head[:12]}.yaml",
        f"releases/customer-a/2.5.0-gpu-{head[:12]}.yaml",
        f"releases/customer-b/2.5.0-{head[:12]}.yaml",
        f"releases/customer-c/2.5.0-{head[:12]}.yaml",
    ]
    assert str(branch.message).startswith("release: 4 images on base 2.5.0")
    # Read back per image: customer-a's gpu record does not hide its cpu one.
    log = ReleaseLog(str(bare), tmp_path / "reader", RELEASES_BRANCH)
    latest = log.latest_by_image(log.fetch())
    assert {str(k): r.manifest_digest[-1] for k, r in latest.items()} == {
        "customer-a": "1",
        "customer-a (gpu)": "9",
        "customer-b": "2",
        "customer-c": "3",
    }

    # Again: all present, no new commit; a changed digest is refused for that record only,
    # and a new record next to it still lands.
    later = _fake_report("customer-d", head, "sha256:" + "d" * 64)
    clash = replace(reports[1], manifest_digest="sha256:" + "e" * 64)
    again = write_release_records(
        [reports[0], clash, later],
        {**locations, "customer-d": str(configs / "customer-a")},
        settings,
    )
    assert isinstance(again[0], WriteResult) and again[0].status == "present"
    assert isinstance(again[1], WriteBackError)
    assert "refusing to overwrite a release record" in again[1].message
    assert isinstance(again[2], WriteResult) and again[2].status == "written"
    top = git.Repo(bare).commit(RELEASES_BRANCH)
    assert [p.hexsha for p in top.parents] == [branch.hexsha]  # on top, never forced


def test_records_of_one_second_are_ordered_as_the_branch_added_them(
    tmp_path: Path, local_env: dict[str, str]
) -> None:
    """Build times have whole seconds: two releases of one image in the same second are
    ordered by when the branch got them (not by their file names), alike for a full read,
    an incremental read of the plan index, and a customer's history."""
    configs = tmp_path / "configs"
    _folder_customer(configs, "customer-a", "~=2.4")
    first_commit = git.Repo(configs).commit("HEAD").hexsha
    _folder_customer(configs, "customer-a", "~=2.4", threshold=0.7)
    second_commit = git.Repo(configs).commit("HEAD").hexsha
    bare = _bare_clone(configs, tmp_path / "configs.git")
    same_second = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)
    records = [
        release_record(
            _fake_report("customer-a", commit, "sha256:" + digit * 64),
            config_source=f"{bare}#customer-a",
            built_at=same_second,
        )
        for commit, digit in ((first_commit, "1"), (second_commit, "2"))
    ]
    # the record added later gets the file name that sorts first, so a name order is wrong
    records.sort(key=lambda r: r.image, reverse=True)
    writer = ReleaseLog(str(bare), tmp_path / "writer", RELEASES_BRANCH)
    incremental = ReleaseLog(str(bare), tmp_path / "incremental", RELEASES_BRANCH)
    writer.write(records[0])
    assert incremental.latest_by_image(incremental.fetch())  # the index, at the first record
    writer.write(records[1])
    full = ReleaseLog(str(bare), tmp_path / "full", RELEASES_BRANCH)
    for log in (incremental, full):
        (latest,) = log.latest_by_image(log.fetch()).values()
        assert latest.image == records[1].image
    assert [r.image for r in full.records("customer-a", full.fetch())] == [r.image for r in records]


def test_a_fleet_of_records_is_one_commit_whatever_its_size(
    tmp_path: Path, local_env: dict[str, str]
) -> None:
    """900 records in one batch: one commit whose message lists them all (longer than one
    command-line argument may be: 128 KiB), and one check that the remote has the commit."""
    configs = tmp_path / "configs"
    _folder_customer(configs, "customer-a", "~=2.4")
    bare = _bare_clone(configs, tmp_path / "configs.git")
    _git("remote", "add", "origin", str(bare), cwd=configs)
    head = git.Repo(configs).commit("HEAD").hexsha
    names = [f"customer-{n:04d}" for n in range(900)]
    reports = [_fake_report(name, head, "sha256:" + "f" * 64) for name in names]
    settings = replace(load_settings(ROOT), cache_dir=tmp_path / "cache")
    written = write_release_records(
        reports, dict.fromkeys(names, str(configs / "customer-a")), settings
    )
    assert {w.status for w in written if isinstance(w, WriteResult)} == {"written"}
    assert len(written) == 900
    commit = git.Repo(bare).commit(RELEASES_BRANCH)
    message = str(commit.message)
    assert len(message.encode()) > 128 * 1024 and message.count(" config ") == 900
    files = _git("ls-tree", "-r", "--name-only", RELEASES_BRANCH, cwd=bare).splitlines()
    assert not commit.parents and len(files) == 900


# -- release records: write-back --------------------------------------------------------------


@pytest.fixture
def records_remote(tmp_path: Path) -> Path:
    """A customer repository on a 'server' (bare), with one config commit."""
    work = customer_repo(
        tmp_path / "work", name="customer-a", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID
    )
    return _bare_clone(work, tmp_path / "customer-a.git")


def test_a_record_the_reader_would_refuse_is_never_written() -> None:
    """The writer checks a record with the reader's own check: a report whose model has no
    dir_hash (or a malformed digest) fails before anything is committed; a report file whose
    model has none is refused when it is read."""
    data = _fake_json("customer-a", "1" * 40, "sha256:" + "1" * 64)
    data["models"][0].pop("dir_hash")
    with pytest.raises(ConfigError, match=r"models\[0\]\.dir_hash"):
        BuildReport.from_dict(data)
    report = _fake_report("customer-a", "1" * 40, "sha256:" + "1" * 64)
    report.models[0] = replace(report.models[0], dir_hash="not a hash")
    with pytest.raises(WriteBackError, match=r"models\[0\]\.dir_hash"):
        release_record(report, config_source="https://git.example.com/customer-a.git")
    report = _fake_report("customer-a", "1" * 40, "sha256:" + "1" * 7)
    with pytest.raises(WriteBackError, match="manifest_digest"):
        release_record(report, config_source="https://git.example.com/customer-a.git")


def test_record_is_retried_on_top_of_a_concurrent_push(
    records_remote: Path, tmp_path: Path
) -> None:
    commit = git.Repo(records_remote).commit("HEAD").hexsha
    other = _fake_report("customer-a", "1" * 40, "sha256:" + "1" * 64, version="2.4.2")
    record = release_record(
        _fake_report("customer-a", commit, "sha256:" + "2" * 64),
        config_source=records_remote.as_uri(),
    )
    log = ReleaseLog(str(records_remote), tmp_path / "cache", RELEASES_BRANCH)
    rival = ReleaseLog(str(records_remote), tmp_path / "rival-cache", RELEASES_BRANCH)
    rival.write(release_record(other, config_source=records_remote.as_uri()))
    first_head = git.Repo(records_remote).commit(RELEASES_BRANCH).hexsha
    pushed_between: list[str] = []

    def concurrent_writer(attempt: int) -> None:
        if attempt == 1:  # another job pushes after we fetched, before we push
            third = _fake_report("customer-a", "3" * 40, "sha256:" + "3" * 64, version="2.4.3")
            rival.write(release_record(third, config_source=records_remote.as_uri()))
            pushed_between.append(git.Repo(records_remote).commit(RELEASES_BRANCH).hexsha)

    result = log.write(record, backoff=0.01, before_push=concurrent_writer)
    assert result.status == "written" and result.attempts == 2
    repo = git.Repo(records_remote)
    head = repo.commit(RELEASES_BRANCH)
    assert head.hexsha == result.commit
    # Linear history, nothing lost, nothing forced: ours sits on top of the concurrent commit.
    assert [c.hexsha for c in head.parents] == pushed_between
    assert repo.commit(pushed_between[0]).parents[0].hexsha == first_head
    assert sorted(_records(records_remote)) == [
        "releases/customer-a/2.4.2-111111111111.yaml",
        "releases/customer-a/2.4.3-333333333333.yaml",
        f"releases/customer-a/2.5.0-{commit[:12]}.yaml",
    ]
    saved = _records(records_remote)[f"releases/customer-a/2.5.0-{commit[:12]}.yaml"]
    assert saved["record_version"] == 1 and saved["manifest_digest"] == "sha256:" + "2" * 64
    assert ReleaseRecord.from_dict(saved) == record  # the reader reads what the writer wrote
    # The config branch is untouched: records never move what is built.
    assert repo.commit("HEAD").hexsha == commit

    again = log.write(record)
    assert again.status == "present"
    with pytest.raises(Exception, match="refusing to overwrite a release record"):
        log.write(replace(record, manifest_digest="sha256:" + "9" * 64))


def _hook(bare: Path, failures: int) -> Path:
    """A pre-receive hook that declines the first `failures` pushes."""
    counter = bare / "hook-count"
    hook = bare / "hooks" / "pre-receive"
    hook.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"\n'
        f'if [ "$n" -le {failures} ]; then echo "protected branch: push $n declined"; exit 1; fi\n'
    )
    hook.chmod(0o755)
    return counter


def test_record_push_rejected_then_retried_then_clear_error(
    records_remote: Path, local_env: dict[str, str], tmp_path: Path
) -> None:
    commit = git.Repo(records_remote).commit("HEAD").hexsha
    report = tmp_path / "build.json"
    envelope = {"builder_result_version": 1, "command": "build", "ok": True}
    report.write_text(
        json.dumps({**envelope, "result": _fake_json("customer-a", commit, "sha256:" + "4" * 64)})
    )
    counter = _hook(records_remote, failures=2)
    env = {**local_env, "CI_JOB_URL": "https://gitlab.example.com/ivd/fleet/-/jobs/42"}
    ok = _cli(
        env,
        "release-record",
        "--report",
        str(report),
        "--repo",
        str(records_remote),
        "--attempts",
        "3",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    assert counter.read_text().strip() == "3"
    (written,) = _json(ok)["result"]["records"]
    assert written["status"] == "written" and written["attempts"] == 3
    record = _records(records_remote)[written["path"]]
    assert record["ci_url"] == "https://gitlab.example.com/ivd/fleet/-/jobs/42"
    # The source as the image labels name it: the repository's origin, canonical.
    origin = (tmp_path / "work").as_uri()
    assert record["config"] == {"repository": origin, "path": ".", "commit": commit}
    message = git.Repo(records_remote).commit(RELEASES_BRANCH).message
    assert "CI job: https://gitlab.example.com/ivd/fleet/-/jobs/42" in message

    _hook(records_remote, failures=99)
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(_fake_json("customer-a", commit, "sha256:" + "5" * 64, version="2.5.1"))
    )
    refused = _cli(
        local_env,
        "release-record",
        "--report",
        str(other),
        "--repo",
        str(records_remote),
        "--attempts",
        "2",
    )
    assert refused.returncode == 9
    line = refused.stderr.strip().splitlines()[-1]
    assert "after 2 attempts: push rejected" in line and "protected branch: push" in line
    assert "never force-push" in line
    assert len(_records(records_remote)) == 1


def test_record_refuses_what_is_not_a_release(
    records_remote: Path, local_env: dict[str, str], tmp_path: Path
) -> None:
    commit = git.Repo(records_remote).commit("HEAD").hexsha
    digest = "sha256:" + "6" * 64
    cases = [
        (
            _fake_report("customer-a", commit, digest, development=True),
            ReleaseGateError,
            "development build",
        ),
        (_fake_report("customer-a", commit, digest, outputs={}), WriteBackError, "was not pushed"),
        (
            _fake_report("customer-a", commit, digest, version="2.6.0rc1"),
            ReleaseGateError,
            "pre-release",
        ),
    ]
    for report, error, words in cases:
        with pytest.raises(error, match=words):
            release_record(report, config_source=records_remote.as_uri())
    empty = tmp_path / "empty.json"
    empty.write_text(
        json.dumps({"builder_result_version": 1, "ok": True, "result": {"results": []}})
    )
    nothing = _cli(
        local_env, "release-record", "--report", str(empty), "--repo", str(records_remote)
    )
    assert nothing.returncode == 2
    assert "no successful build in this report" in nothing.stderr.strip().splitlines()[-1]
    assert _records(records_remote) == {}


def test_record_dry_run_names_the_target_and_a_missing_commit_is_refused(
    records_remote: Path, local_env: dict[str, str], tmp_path: Path
) -> None:
    commit = git.Repo(records_remote).commit("HEAD").hexsha
    report = tmp_path / "build.json"
    report.write_text(json.dumps(_fake_json("customer-a", commit, "sha256:" + "7" * 64)))
    args = ("release-record", "--report", str(report), "--repo", str(records_remote))
    dry = _cli(local_env, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would record registry.example.com/customer-a:2.5.0-{commit[:12]}" in dry.stderr
    assert f"on {records_remote.resolve()} branch {RELEASES_BRANCH}" in dry.stderr
    assert dry.stdout.startswith("would write")
    assert _records(records_remote) == {}  # nothing written
    # a commit the target repository does not have: refused, nothing written (exit 9)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(_fake_json("customer-a", "ab" * 20, "sha256:" + "8" * 64)))
    refused = _cli(
        local_env, "release-record", "--report", str(unknown), "--repo", str(records_remote)
    )
    assert refused.returncode == 9, refused.stderr
    assert f"does not have config commit {'ab' * 6}" in refused.stderr.strip().splitlines()[-1]
    assert _records(records_remote) == {}
    # non-interactive: no question asked, the record is written
    done = _cli(local_env, *args)
    assert done.returncode == 0, done.stderr
    assert len(_records(records_remote)) == 1


def test_concurrent_writers_never_lose_a_record(
    records_remote: Path, local_env: dict[str, str], tmp_path: Path
) -> None:
    """Several CLI processes (separate caches, like separate CI jobs) write at once."""
    procs = []
    for index in range(3):
        path = tmp_path / f"r{index}.json"
        path.write_text(
            json.dumps(
                _fake_json(
                    "customer-a",
                    git.Repo(records_remote).commit("HEAD").hexsha,  # a commit it has
                    "sha256:" + f"{index}" * 64,
                    version=f"2.4.{index + 1}",
                )
            )
        )
        env = {**local_env, "BUILDER_CACHE_DIR": str(tmp_path / f"cache-{index}")}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "builder",
                    "release-record",
                    "--report",
                    str(path),
                    "--repo",
                    str(records_remote),
                    "--attempts",
                    "8",
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    assert len(_records(records_remote)) == 3
    history = _git("rev-list", "--parents", RELEASES_BRANCH, cwd=records_remote).splitlines()
    assert len(history) == 3 and all(len(line.split()) <= 2 for line in history)  # linear


# -- credentials: an authenticated smart-HTTP git server ----------------------------------------


class _GitHTTP(BaseHTTPRequestHandler):
    """`git http-backend` behind HTTP basic auth, as GitLab serves repositories."""

    root: Path
    accepted: set[str]
    seen_auth: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        header = self.headers.get("Authorization", "")
        self.seen_auth.append(header)
        if header not in self.accepted:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="gitlab"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "REMOTE_USER": "ci",
            "REMOTE_ADDR": "127.0.0.1",
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _serve
    do_POST = _serve


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    root = tmp_path / "srv"
    root.mkdir()
    seen: list[str] = []
    handler = type(
        "Handler",
        (_GitHTTP,),
        {
            "root": root,
            "seen_auth": seen,
            "accepted": {
                "Basic " + base64.b64encode(f"{user}:{TOKEN}".encode()).decode()
                for user in ("oauth2", "gitlab-ci-token")
            },
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, seen
    finally:
        server.shutdown()
        server.server_close()


def test_private_repositories_with_a_ci_token_that_never_leaks(
    git_server: tuple[str, Path, list[str]], local_env: dict[str, str], tmp_path: Path
) -> None:
    url, root, seen = git_server
    work = customer_repo(
        tmp_path / "w", name="customer-p", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID
    )
    _bare_clone(work, root / "customer-p.git")
    fleet = _write_fleet(
        tmp_path / "fleet.yaml", [{"name": "customer-p", "repo": f"{url}/customer-p.git"}]
    )
    args = ("plan", "--base-version", "2.5.0", "--fleet", str(fleet), "--json")

    anonymous = _cli(local_env, *args)
    assert anonymous.returncode == 8  # no token: a clear per-customer error, no prompt, no hang
    (item,) = _json(anonymous)["result"]["items"]
    assert item["summary"].startswith(f"cannot clone {url}/customer-p.git")

    wrong_server = {
        **local_env,
        "BUILDER_GIT_TOKEN": TOKEN,
        "BUILDER_GIT_SERVER": "https://gitlab.example.com",
    }
    assert _cli(wrong_server, *args).returncode == 8  # the token goes to its own server only
    assert all(TOKEN not in base64.b64decode(h.split()[1]).decode() for h in seen if h)

    for env in (
        {**local_env, "BUILDER_GIT_TOKEN": TOKEN, "BUILDER_GIT_SERVER": url},
        {
            **local_env,
            "CI_JOB_TOKEN": TOKEN,
            "CI_SERVER_URL": url,
            "BUILDER_CACHE_DIR": str(tmp_path / "c2"),
        },
    ):
        result = _cli(env, *args)
        assert result.returncode == 8, result.stdout + result.stderr  # read; it has no lock
        (item,) = _json(result)["result"]["items"]
        assert item["status"] == "rebuild" and item["repo"] == f"{url}/customer-p.git"
        assert item["lock"] == "missing" and len(item["problems"]) == 1
        assert TOKEN not in result.stdout + result.stderr

    # Write-back over the same authenticated HTTP remote.
    commit = git.Repo(work).commit("HEAD").hexsha
    report = tmp_path / "build.json"
    report.write_text(json.dumps(_fake_json("customer-p", commit, "sha256:" + "7" * 64)))
    env = {**local_env, "BUILDER_GIT_TOKEN": TOKEN, "BUILDER_GIT_SERVER": url}
    pushed = _cli(env, "release-record", "--report", str(report), "--fleet", str(fleet), "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert TOKEN not in pushed.stdout + pushed.stderr
    record = _records(root / "customer-p.git")[f"releases/customer-p/2.5.0-{commit[:12]}.yaml"]
    assert record["config"]["repository"] == f"{url}/customer-p"
    # Nothing written to disk holds the token: cache clones, their config, the record.
    cache = Path(local_env["BUILDER_CACHE_DIR"])
    for path in cache.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in yaml.safe_dump(record)


# -- build-all end to end -----------------------------------------------------------------------


def push_fleet_bases(docker_engine: Any, oci_registry: Any, base_os_image: str) -> str:
    """Small base images (no runner) with the runner's schema label, in the test registry."""
    return push_labelled_bases(
        docker_engine,
        oci_registry.host,
        base_os_image,
        BASE_REPO,
        dict.fromkeys(BASE_VERSIONS, "1"),
    )


@pytest.fixture(scope="module")
def fleet_bases(docker_engine: Any, oci_registry: Any, base_os_image: str) -> str:
    return push_fleet_bases(docker_engine, oci_registry, base_os_image)


def _uploaded_digests(registry: Any, since: int) -> set[str]:
    """Digests of the blobs whose upload the registry completed (PUT ...?digest=)."""
    found = set()
    for request in registry.blob_uploads(since=since):
        match = re.search(r"digest=sha256(?::|%3A)([0-9a-f]{64})", request.path)
        if request.method == "PUT" and match:
            found.add(f"sha256:{match.group(1)}")
    return found


def _fleet_workspace(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path, Path]:
    """customer-a in its own repository (reached by URL); customer-b and -c folders of a
    shared repository, each with its lock committed; customer-bad an invalid config;
    customer-gone a repository that is not there. Returns (fleet file, customer-a's work
    clone, customer-a's remote)."""
    work_a = customer_repo(
        tmp_path / "work-a", name="customer-a", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID
    )
    commit_lock(work_a, env)
    remote_a = _bare_clone(work_a, tmp_path / "customer-a.git")
    configs = tmp_path / "configs"
    _folder_customer(configs, "customer-b", ">=2.4,<3", threshold=0.7)
    _folder_customer(configs, "customer-c", "~=2.3.0")
    for name in ("customer-b", "customer-c"):
        commit_lock(configs / name, env)
    commit_files(
        configs, {"customer-bad/customer.yaml": "version: 1\ncustomer: customer-bad\n"}, "bad"
    )
    fleet = _write_fleet(
        configs / "fleet.yaml",
        [
            {"name": "customer-a", "repo": remote_a.as_uri()},
            {"name": "customer-b", "repo": "./customer-b"},
            {"name": "customer-c", "repo": "./customer-c"},
            {"name": "customer-bad", "repo": "./customer-bad"},
            {"name": "customer-gone", "repo": (tmp_path / "gone.git").as_uri()},
        ],
    )
    return fleet, work_a, remote_a


def _check_first_records(old: dict[str, Any], remote_a: Path, configs: Path) -> None:
    """customer-a's record in its own repository, customer-b's in the shared one."""
    rec_a = _records(remote_a)
    rev_a = old["customer-a"]["config_commit"][:12]
    record = rec_a[f"releases/customer-a/2.4.2-{rev_a}.yaml"]
    assert len(rec_a) == 1
    assert record["record_version"] == 1 and record["customer"] == "customer-a"
    assert record["image"] == old["customer-a"]["image"]
    assert record["manifest_digest"] == old["customer-a"]["manifest_digest"]
    assert record["base_image"] == old["customer-a"]["base"]
    assert record["config"]["commit"] == old["customer-a"]["config_commit"]
    assert {m["registry_id"] for m in record["models"]} == {CARCINOMA_ID, MITOSIS_ID}
    shas = {f["sha256"] for m in record["models"] for f in m["files"]}
    assert hashlib.sha256(CARCINOMA).hexdigest() in shas
    rec_b = _records(configs)
    rev_b = old["customer-b"]["config_commit"][:12]
    assert list(rec_b) == [f"releases/customer-b/2.4.2-{rev_b}.yaml"]
    assert rec_b[f"releases/customer-b/2.4.2-{rev_b}.yaml"]["config"]["path"] == "customer-b"
    # The records branch is separate: the config branch (what is built) has not moved.
    assert git.Repo(configs).active_branch.name != RELEASES_BRANCH
    assert "releases" not in {p.name for p in configs.iterdir()}


def _check_base_bump_uploads(
    old: dict[str, Any], new: dict[str, Any], registry: Any, since: int
) -> None:
    """Model layers reused (never uploaded); only image configs and the small config layer
    (its provenance.json names the base digest) reach the registry, plus manifests."""
    uploaded = _uploaded_digests(registry, since)
    for name in ("customer-a", "customer-b"):
        layers_old = {layer["name"]: layer["digest"] for layer in old[name]["layers"]}
        layers_new = {layer["name"]: layer for layer in new[name]["layers"]}
        for model in ("carcinoma_model", "mitosis_model"):
            assert layers_new[model]["digest"] == layers_old[model]
            assert layers_new[model]["push"] == "present"
            assert layers_new[model]["digest"] not in uploaded
        assert new[name]["config_digest"] in uploaded  # the new image config
        assert new[name]["manifest_digest"] != old[name]["manifest_digest"]
    config_layers = {
        layer["digest"] for r in new.values() for layer in r["layers"] if layer["name"] == "config"
    }
    # Each new image also gets its provenance and SBOM attached (OCI referrers).
    attestations = {
        "sha256:" + hashlib.sha256(doc.read_bytes()).hexdigest()
        for r in new.values()
        for doc in Path(r["outputs"]["attestations"]).iterdir()
    }
    assert uploaded <= {r["config_digest"] for r in new.values()} | config_layers | attestations
    assert sum(r["bytes_uploaded"] for r in new.values()) < 64 * 1024
    puts = registry.manifest_puts(since)
    assert {p.path.split("/manifests/")[0].rsplit("/", 1)[1] for p in puts} == {
        "customer-a",
        "customer-b",
    }
    assert {p.path.rsplit("/", 1)[1] for p in puts} >= {"2.5.0"}


def _registry_env(
    local_env: dict[str, str], tmp_path: Path, oci_registry: Any, fleet_bases: str
) -> tuple[str, dict[str, str]]:
    """A registry namespace of the test's own, and the CLI environment pushing there."""
    namespace = re.sub("[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")
    env = {
        **local_env,
        "BUILDER_BASE_REPOSITORY": fleet_bases,
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{namespace}",
    }
    return namespace, env


def test_build_all_rebuilds_the_fleet_and_records_what_shipped(
    local_env: dict[str, str], tmp_path: Path, oci_registry: Any, fleet_bases: str
) -> None:
    _, env = _registry_env(local_env, tmp_path, oci_registry, fleet_bases)
    fleet, work_a, remote_a = _fleet_workspace(tmp_path, env)
    common = ("--fleet", str(fleet), "--jobs", "2", "--push", "--record", "--json")

    first = _cli(env, "build-all", "--base-version", "2.4.2", *common)
    assert first.returncode == 8, first.stderr
    doc = _json(first)
    assert doc["ok"] is False
    assert doc["error"]["message"] == "2 of 5 images failed: customer-bad, customer-gone"
    results = {r["customer"]: r for r in doc["result"]["results"]}
    assert {n: r["status"] for n, r in results.items()} == {
        "customer-a": "built",
        "customer-b": "built",
        "customer-c": "skipped",
        "customer-bad": "failed",
        "customer-gone": "failed",
    }
    assert "'base_image' is a required property" in results["customer-bad"]["summary"]
    assert results["customer-gone"]["summary"].startswith("cannot clone")
    old = {n: results[n]["report"] for n in ("customer-a", "customer-b")}
    _check_first_records(old, remote_a, fleet.parent)

    since = len(oci_registry.requests())
    only = ("--only", "customer-a", "--only", "customer-b")
    second = _cli(env, "build-all", "--base-version", "2.5.0", *only, *common)
    assert second.returncode == 0, second.stdout + second.stderr
    new = {r["customer"]: r["report"] for r in _json(second)["result"]["results"]}
    _check_base_bump_uploads(old, new, oci_registry, since)
    assert len(_records(remote_a)) == 2

    # plan now knows what shipped: base only; the same base: nothing; a config commit: config too.
    planned = _json(_cli(env, "plan", "--base-version", "2.5.1", "--fleet", str(fleet), "--json"))
    assert planned["ok"] is False  # customer-bad and customer-gone are still broken
    items = {i["customer"]: i for i in planned["result"]["items"]}
    assert items["customer-a"]["change"] == "base"
    assert items["customer-a"]["summary"].startswith("base only: 2.5.0 -> 2.5.1")
    assert items["customer-b"]["previous"]["base_version"] == "2.5.0"
    assert items["customer-c"]["status"] == "skip"

    analysis = ANALYSIS_YAML.format(carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.6)
    commit_files(work_a, {"analysis.yaml": analysis}, "threshold", when=1_700_000_100)
    _git("push", "-q", str(remote_a), "HEAD", cwd=work_a)
    args = ("plan", "--fleet", str(fleet), "--only", "customer-a", "--json")
    (item,) = _json(_cli(env, *args, "--base-version", "2.5.1"))["result"]["items"]
    assert item["change"] == "config+base" and item["changed_files"] == ["analysis.yaml"]
    assert item["summary"].startswith("config too:")


def test_build_dash_all_takes_build_alls_options() -> None:
    """`build --all` is `builder build-all`: every build-all option is a build option, and the
    single-customer options are refused with --all (and the fleet ones without it)."""
    from builder.cli.build import build
    from builder.cli.fleet import build_all

    def flags(command: Any) -> set[str]:
        return {opt for p in command.params for opt in p.opts if opt.startswith("-")}

    assert flags(build_all) <= flags(build)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_")}
    for args, needle in (
        (["--all", "--base-version", "2.5.0", "--load"], "--load does not go with --all"),
        (["customer-x", "--record"], "--record goes with --all only"),
        (["--all", "--base-version", "2.5.0", "--record"], "--record needs --push"),
    ):
        refused = run_cli("build", *args, env=env)
        assert refused.returncode == 2 and needle in refused.stderr, (args, refused.stderr)


def test_build_all_record_says_where_first_and_dry_run_writes_nothing(
    local_env: dict[str, str], tmp_path: Path, oci_registry: Any, fleet_bases: str
) -> None:
    """With --record the repository and branch of every record are named before any build;
    --dry-run shows what would be built, pushed and recorded where, and touches nothing."""
    _, env = _registry_env(local_env, tmp_path, oci_registry, fleet_bases)
    fleet, _, remote_a = _fleet_workspace(tmp_path, env)
    configs = fleet.parent
    report = tmp_path / "dry-run.json"
    since = len(oci_registry.requests())
    args = ("--all", "--base-version", "2.4.2", "--fleet", str(fleet), "--push", "--record")
    dry = _cli(env, "build", *args, "--only", "customer-a", "--only", "customer-b",
               "--dry-run", "--report", str(report))  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"would record {remote_a.as_uri()} branch ivd-releases (customer-a)" in dry.stderr
    assert f"would record {configs} branch ivd-releases (customer-b)" in dry.stderr
    registry = env["BUILDER_IMAGE_REGISTRY"]
    assert re.search(
        rf"customer-b\s+would build and push {re.escape(registry)}/customer-b:2\.4\.2-[0-9a-f]{{12}}, "
        rf"record on {re.escape(str(configs))} branch ivd-releases",
        dry.stdout,
    ), dry.stdout
    assert dry.stdout.rstrip().endswith("dry run: nothing built, pushed or recorded")
    document = json.loads(report.read_text())
    assert document["command"] == "build-all" and document["result"]["dry_run"] is True
    # Nothing written anywhere (the plan reads each base repository's tags, nothing more).
    writes = [r for r in oci_registry.requests()[since:] if r.method not in ("GET", "HEAD")]
    assert writes == [] and not _records(remote_a)
    assert not _records(configs)
    # on a terminal it asks first; "n" builds nothing
    command = shlex.join([sys.executable, "-m", "builder", "build", *args, "--only", "customer-b"])
    asked = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        input="n\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert asked.returncode == 130, asked.stdout
    assert "build, push and push release records to 1 repository (branch ivd-releases)?" in (
        asked.stdout
    )
    writes = [r for r in oci_registry.requests()[since:] if r.method not in ("GET", "HEAD")]
    assert writes == [] and not _records(configs)
    # a real run (no terminal: no question) names the targets first, then builds
    real = _cli(env, "build", *args, "--only", "customer-c", "--report", str(report))
    assert real.returncode == 0, real.stdout + real.stderr
    assert real.stderr.splitlines()[0] == (
        f"records go to {configs} branch ivd-releases (customer-c)"
    )
    (result,) = json.loads(report.read_text())["result"]["results"]
    assert result["status"] == "skipped"  # ~=2.3.0 does not admit 2.4.2


def _sent_bytes(registry: Any, since: int, repository: str) -> int:
    """Bytes the registry received for ``repository`` (``ns/name``) since request ``since``:
    each completed blob upload (PUT ...?digest=) and each manifest PUT, sized from what the
    registry now serves for them."""
    import urllib.request

    total = 0
    for request in registry.requests()[since:]:
        path = request.path.split("?")[0]
        if request.method != "PUT" or not path.startswith(f"/v2/{repository}/"):
            continue
        if "/blobs/uploads/" in path:
            digest = re.search(r"digest=(sha256(?::|%3A)[0-9a-f]{64})", request.path)
            assert digest, request.path
            url = f"{registry.url}/v2/{repository}/blobs/{digest.group(1).replace('%3A', ':')}"
            head = urllib.request.Request(url, method="HEAD")
        else:
            url = f"{registry.url}{path}"
            head = urllib.request.Request(url, method="GET")
            head.add_header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            )
        try:
            with urllib.request.urlopen(head, timeout=30) as response:
                total += int(response.headers["Content-Length"])
        except OSError as exc:
            pytest.fail(f"{head.get_method()} {url}: {exc}")
    return total


def test_build_all_is_incremental_shows_progress_and_counts_every_byte(
    local_env: dict[str, str], tmp_path: Path, oci_registry: Any, fleet_bases: str
) -> None:
    namespace, env = _registry_env(local_env, tmp_path, oci_registry, fleet_bases)
    configs = tmp_path / "configs"
    _folder_customer(configs, "customer-b", ">=2.4,<3")
    _folder_customer(configs, "customer-c", "~=2.5")
    for name in ("customer-b", "customer-c"):
        commit_lock(configs / name, env)
    fleet = _write_fleet(
        tmp_path / "fleet.yaml",
        [{"name": n, "repo": str(configs / n)} for n in ("customer-b", "customer-c")],
    )
    args = ("build-all", "--base-version", "2.5.0", "--fleet", str(fleet), "--push", "--json")

    since = len(oci_registry.requests())
    cold = _cli(env, *args, "--record")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    first = {r["customer"]: r for r in _json(cold)["result"]["results"]}
    assert {n: r["status"] for n, r in first.items()} == dict.fromkeys(first, "built")
    # Progress on stderr, also under --json: the plan, then one line per finished customer.
    # Two builds on two workers are both warm-up builds: no pace or ETA is guessed from them.
    lines = cold.stderr.strip().splitlines()
    assert lines[0].startswith("planned 2 images of 2 customers in ")
    assert re.match(r"\[1/2\] 1 built, 0 unchanged, 0 failed \| customer-. built in ", lines[1])
    assert re.match(r"\[2/2\] 2 built, 0 unchanged, 0 failed \| customer-. built in ", lines[2])
    assert len(lines) == 3
    # Every byte sent is in the report, the attestations (provenance, SBOM) included.
    for name, result in first.items():
        report = result["report"]
        assert report["bytes_uploaded"] == _sent_bytes(oci_registry, since, f"{namespace}/{name}")
    records = _records(configs)
    assert len(records) == 2
    assert len({r["record"]["commit"] for r in first.values()}) == 1  # one commit for both

    # Nothing changed: nothing built, one manifest HEAD per customer, nothing written.
    since = len(oci_registry.requests())
    again = _cli(env, *args, "--record")
    assert again.returncode == 0, again.stdout + again.stderr
    results = {r["customer"]: r for r in _json(again)["result"]["results"]}
    assert {n: r["status"] for n, r in results.items()} == dict.fromkeys(results, "unchanged")
    image = first["customer-b"]["report"]["image"]
    digest = first["customer-b"]["report"]["manifest_digest"]
    assert results["customer-b"]["summary"] == f"already in the registry: {image}@{digest}"
    requests = [r for r in oci_registry.requests()[since:] if r.path != "/v2/"]
    assert sorted((r.method, r.path.split("/manifests/")[0]) for r in requests) == [
        ("HEAD", f"/v2/{namespace}/customer-b"),
        ("HEAD", f"/v2/{namespace}/customer-c"),
    ]
    # Nothing to build: the plan and one closing line, no pace, no "ETA 0 s" per image.
    assert again.stderr.strip().splitlines()[1:] == ["[2/2] 0 built, 2 unchanged, 0 failed"]
    assert _records(configs) == records

    # A config change rebuilds that customer only; --force rebuilds all, same digests.
    analysis = ANALYSIS_YAML.format(carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.6)
    commit_files(
        configs, {"customer-c/analysis.yaml": analysis}, "c: threshold", when=1_700_000_500
    )
    commit_lock(configs / "customer-c", env, when=1_700_000_500)  # a release ships locked
    changed = _json(_cli(env, *args))
    assert {r["customer"]: r["status"] for r in changed["result"]["results"]} == {
        "customer-b": "unchanged",
        "customer-c": "built",
    }
    forced = _json(_cli(env, *args, "--force"))
    rebuilt = {r["customer"]: r for r in forced["result"]["results"]}
    assert {n: r["status"] for n, r in rebuilt.items()} == dict.fromkeys(rebuilt, "built")
    assert rebuilt["customer-b"]["report"]["manifest_digest"] == digest


def _locked_customer(configs: Path, name: str, env: dict[str, str], variants: str = "") -> None:
    """A customer folder committed with a current lock made by `builder lock`."""
    text = CUSTOMER_YAML.format(name=name, base="~=2.5")
    if variants:
        text = text.replace("base_image:\n", f"base_image:\n  variant: {variants}\n", 1)
    _folder_customer(configs, name, "~=2.5")
    commit_files(configs, {f"{name}/customer.yaml": text}, f"{name}: variants")
    locked = _cli(env, "lock", str(configs / name))
    assert locked.returncode == 0, locked.stdout + locked.stderr
    _commit_all(configs, f"{name}: lock")


def test_plan_tells_what_a_release_build_would_refuse_before_it_builds(
    local_env: dict[str, str], tmp_path: Path, oci_registry: Any, fleet_bases: str
) -> None:
    """A stale lock, a missing lock, a variant with no base of the version: each image says
    so in `plan` (human and --json), exit 8; and a customer folder the fleet file misses."""
    _, env = _registry_env(local_env, tmp_path, oci_registry, fleet_bases)
    configs = tmp_path / "configs"
    _locked_customer(configs, "customer-ok", env)
    _locked_customer(configs, "customer-stale", env)
    _locked_customer(configs, "customer-w", env, "[cpu, gpu]")  # no gpu base exists
    _folder_customer(configs, "customer-nolock", "~=2.5")
    analysis = ANALYSIS_YAML.format(carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.7)
    commit_files(configs, {"customer-stale/analysis.yaml": analysis}, "stale: threshold")
    _folder_customer(configs, "customer-unlisted", "~=2.5")
    names = ("customer-ok", "customer-stale", "customer-w", "customer-nolock")
    fleet = _write_fleet(configs / "fleet.yaml", [{"name": n, "repo": f"./{n}"} for n in names])
    args = ("plan", "--base-version", "2.5.0", "--fleet", str(fleet))

    doc = _json(_cli(env, *args, "--json"))
    items = {(i["customer"], i["variant"]): i for i in doc["result"]["items"]}
    assert {k: i["lock"] for k, i in items.items()} == {
        ("customer-ok", "cpu"): "current",
        ("customer-stale", "cpu"): "stale",
        ("customer-w", "cpu"): "current",
        ("customer-w", "gpu"): "current",
        ("customer-nolock", "cpu"): "missing",
    }
    problems = {k: i["problems"] for k, i in items.items()}
    assert problems[("customer-ok", "cpu")] == problems[("customer-w", "cpu")] == []
    (stale,) = problems[("customer-stale", "cpu")]
    assert stale.startswith("stale lock: analysis.yaml: ") and "threshold" in stale
    assert "builder lock" in stale
    (missing,) = problems[("customer-nolock", "cpu")]
    assert missing.startswith("missing lock: no customer.lock.yaml committed; a release build")
    (gpu,) = problems[("customer-w", "gpu")]
    assert gpu.startswith(f"no gpu base of 2.5.0: registry {oci_registry.host} has no ")
    assert f"{BASE_REPO}-gpu" in gpu and "builder base build --variant gpu --push" in gpu
    assert all(i["status"] == "rebuild" for i in items.values())
    assert doc["result"]["unlisted"] == ["customer-unlisted"]
    assert doc["error"]["message"] == (
        "3 of 5 images would be refused: customer-stale, customer-w (gpu), customer-nolock"
    )

    human = _cli(env, *args)
    assert human.returncode == 8
    assert "5 images to rebuild, 3 would be refused (4 customers," in human.stdout
    assert re.search(r"customer-w \(gpu\)\s+~=2.5\s+rebuild", human.stdout)
    refused = [
        line.split("REFUSED: ")[1] for line in human.stdout.splitlines() if "REFUSED" in line
    ]
    assert refused == [stale, gpu, missing]
    assert (
        "customer-unlisted/customer.yaml is not in fleet.yaml: a base release does not rebuild it"
        in human.stdout
    )


def test_a_failed_variant_is_built_by_the_next_run_without_force(
    local_env: dict[str, str],
    tmp_path: Path,
    oci_registry: Any,
    docker_engine: Any,
    base_os_image: str,
) -> None:
    """customer-w runs [cpu, gpu]; the gpu build fails (no gpu base yet) while cpu ships and
    is recorded. The next `build --all` (no --force) builds the gpu image: state, plan and
    records are per image, and the counters count images."""
    namespace, env = _registry_env(local_env, tmp_path, oci_registry, "")
    env["BUILDER_BASE_REPOSITORY"] = push_labelled_bases(
        docker_engine, oci_registry.host, base_os_image, f"{namespace}/base", {"2.5.0": "1"}
    )
    configs = tmp_path / "configs"
    _locked_customer(configs, "customer-w", env, "[cpu, gpu]")
    fleet = _write_fleet(
        tmp_path / "fleet.yaml", [{"name": "customer-w", "repo": str(configs / "customer-w")}]
    )
    args = ("build-all", "--base-version", "2.5.0", "--fleet", str(fleet), "--push", "--record")

    first = _cli(env, *args, "--json")
    assert first.returncode == 8, first.stdout + first.stderr
    doc = _json(first)
    assert doc["error"]["message"] == "1 of 2 images failed: customer-w (gpu)"
    results = {r["variant"]: r for r in doc["result"]["results"]}
    assert {v: r["status"] for v, r in results.items()} == {"cpu": "built", "gpu": "failed"}
    assert "base-gpu" in results["gpu"]["summary"]
    assert re.search(r"^\[2/2\] 1 built, 0 unchanged, 1 failed \| customer-w", first.stderr, re.M)
    rev = results["cpu"]["report"]["image"].rsplit("-", 1)[1]
    assert list(_records(configs)) == [f"releases/customer-w/2.5.0-{rev}.yaml"]

    planned = _json(_cli(env, "plan", "--base-version", "2.5.0", "--fleet", str(fleet), "--json"))
    status = {i["variant"]: (i["status"], i["change"]) for i in planned["result"]["items"]}
    assert status == {"cpu": ("released", "none"), "gpu": ("rebuild", "first")}

    push_labelled_bases(
        docker_engine,
        oci_registry.host,
        base_os_image,
        f"{namespace}/base-gpu",
        {"2.5.0": "1"},
        extra_labels={"com.ivd.runner.variant": "gpu"},
    )
    second = _cli(env, *args, "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    again = {r["variant"]: r["status"] for r in _json(second)["result"]["results"]}
    assert again == {"cpu": "unchanged", "gpu": "built"}
    assert sorted(_records(configs)) == [
        f"releases/customer-w/2.5.0-{rev}.yaml",
        f"releases/customer-w/2.5.0-gpu-{rev}.yaml",
    ]
    human = _cli(env, *args)
    assert human.returncode == 0, human.stderr
    assert "0 built, 2 unchanged, 0 skipped, 0 failed of 2 images" in human.stdout
