"""Load stage: customer repos read at a ref, validated, every bad input one clear line."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

import git
import pytest
import yaml
from helpers import (
    ANALYSIS_YAML,
    CARCINOMA_ID,
    CUSTOMER_YAML,
    MITOSIS_ID,
    MITOSIS_TASK,
    ROOT,
    commit_files,
    customer_repo,
    offline_settings,
    run_cli,
)

from builder.cook.load import load_customer
from builder.errors import ConfigError
from builder.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return offline_settings(tmp_path)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return customer_repo(tmp_path / "cx", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)


def _analysis(**kw: object) -> str:
    return ANALYSIS_YAML.format(carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.5, **kw)


def _error(
    repo: Path, settings: Settings, files: dict[str, str | bytes | None], **kw: object
) -> str:
    commit_files(repo, files, "change")
    with pytest.raises(ConfigError) as info:
        load_customer(str(repo), settings, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_reads_committed_files_at_ref(repo: Path, settings: Settings) -> None:
    spec = load_customer(str(repo), settings)
    assert spec.customer == "customer-x"
    assert spec.base_version == "~=2.4"
    assert [m.name for m in spec.models] == ["carcinoma_model", "mitosis_model"]
    assert spec.models[0].reference == CARCINOMA_ID
    assert spec.commit_time == 1_700_000_000
    assert len(spec.commit) == 40


def test_ignores_uncommitted_changes_unless_worktree(repo: Path, settings: Settings) -> None:
    (repo / "customer.yaml").write_text(CUSTOMER_YAML.format(name="customer-dirty", base="2.4.1"))
    assert load_customer(str(repo), settings).customer == "customer-x"
    assert load_customer(str(repo), settings, worktree=True).customer == "customer-dirty"


def test_older_ref_gives_older_config(repo: Path, settings: Settings) -> None:
    first = load_customer(str(repo), settings).commit
    commit_files(
        repo,
        {"customer.yaml": CUSTOMER_YAML.format(name="customer-x", base="2.5.0")},
        "bump",
        when=1_700_000_100,
    )
    assert load_customer(str(repo), settings).base_version == "2.5.0"
    assert load_customer(str(repo), settings, ref=first).base_version == "~=2.4"


def test_folder_in_larger_repo_uses_last_commit_touching_it(
    tmp_path: Path, settings: Settings
) -> None:
    mono = tmp_path / "mono"
    commit_files(
        mono,
        {
            "customers/cx/customer.yaml": CUSTOMER_YAML.format(name="customer-x", base="2.4.1"),
            "customers/cx/analysis.yaml": _analysis(),
        },
        "add cx",
        when=1_700_000_000,
    )
    config_commit = load_customer(str(mono / "customers" / "cx"), settings).commit
    commit_files(mono, {"README.md": "unrelated"}, "unrelated", when=1_700_009_999)
    spec = load_customer(str(mono / "customers" / "cx"), settings)
    assert spec.commit == config_commit
    assert spec.commit_time == 1_700_000_000


def test_customer_found_by_name_under_customers_folder(tmp_path: Path, settings: Settings) -> None:
    customer_repo(settings.customers / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    assert load_customer("customer-x", settings).customer == "customer-x"


def test_unknown_customer(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="customer 'nobody' not found"):
        load_customer("nobody", settings)


def test_ref_that_does_not_exist(repo: Path, settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"ref 'v9\.9' does not exist"):
        load_customer(str(repo), settings, ref="v9.9")


def test_malformed_yaml_names_file_and_line(repo: Path, settings: Settings) -> None:
    message = _error(
        repo, settings, {"analysis.yaml": "analyses:\n- name: breast\n  models: [unclosed\n"}
    )
    assert "analysis.yaml" in message and "invalid YAML" in message
    assert ":4:" in message or ":3:" in message


def test_duplicate_keys(repo: Path, settings: Settings) -> None:
    message = _error(
        repo,
        settings,
        {"customer.yaml": "version: 1\ncustomer: a\ncustomer: b\nbase_image: {version: '2.4.1'}\n"},
    )
    assert "customer.yaml" in message and ":3:" in message and "duplicate key 'customer'" in message


def test_unknown_key_with_did_you_mean(repo: Path, settings: Settings) -> None:
    message = _error(
        repo,
        settings,
        {
            "analysis.yaml": _analysis().replace(
                "      reference: " + MITOSIS_ID, "      refrence: " + MITOSIS_ID
            )
        },
    )
    assert "analysis.yaml" in message and ":9:" in message
    assert "unknown key 'refrence'" in message and "did you mean 'reference'" in message


def test_wrong_type(repo: Path, settings: Settings) -> None:
    message = _error(
        repo,
        settings,
        {"customer.yaml": "version: 1\ncustomer: customer-x\nbase_image: {version: 2.4}\n"},
    )
    assert (
        "customer.yaml:3" in message
        and "base_image.version" in message
        and "not of type 'string'" in message
    )


def test_bad_customer_name(repo: Path, settings: Settings) -> None:
    message = _error(
        repo, settings, {"customer.yaml": CUSTOMER_YAML.format(name="Customer_X", base="2.4.1")}
    )
    assert "customer.yaml:2" in message and "does not match" in message


def test_feature_naming_undeclared_model(repo: Path, settings: Settings) -> None:
    message = _error(
        repo,
        settings,
        {
            "analysis.yaml": _analysis().replace(
                "segmentation_model: mitosis_model", "segmentation_model: mitosis_modle"
            )
        },
    )
    assert (
        "analysis.yaml:15" in message
        and "'mitosis_modle'" in message
        and "does not declare" in message
    )


@pytest.mark.parametrize(
    "reference", ["../other-customer/weights", "/etc/passwd", "models/../../x"]
)
def test_manual_reference_cannot_escape(repo: Path, settings: Settings, reference: str) -> None:
    analysis = _analysis().replace(
        f"sourcing: auto\n      reference: {MITOSIS_ID}",
        f"sourcing: manual\n      reference: {reference}",
    )
    message = _error(repo, settings, {"analysis.yaml": analysis})
    assert (
        "must be a relative path inside the customer folder" in message
        and "analysis.yaml:9" in message
    )


def test_model_name_cannot_escape(repo: Path, settings: Settings) -> None:
    message = _error(
        repo,
        settings,
        {
            "analysis.yaml": _analysis()
            .replace("    mitosis_model:", "    ../mitosis:")
            .replace("segmentation_model: mitosis_model", "segmentation_model: mitosis")
        },
    )
    assert (
        "invalid name '../mitosis'" in message
        and "analyses[0].models" in message
        and "analysis.yaml:7" in message
    )


def test_analysis_path_cannot_escape(repo: Path, settings: Settings) -> None:
    message = _error(
        repo,
        settings,
        {
            "customer.yaml": CUSTOMER_YAML.format(name="customer-x", base="2.4.1")
            + "analysis: ../secrets.yaml\n"
        },
    )
    assert "analysis '../secrets.yaml' must be a relative path" in message


def test_alias_bomb_is_refused(repo: Path, settings: Settings) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in range(1, 7):
        bomb += (
            f"{chr(97 + level)}: &{chr(97 + level)} ["
            + ", ".join([f"*{chr(96 + level)}"] * 10)
            + "]\n"
        )
    message = _error(repo, settings, {"analysis.yaml": bomb})
    assert "aliases expand to more than" in message


def test_manual_model_reads_weights_from_the_same_commit(repo: Path, settings: Settings) -> None:
    analysis = _analysis().replace(
        f"sourcing: auto\n      reference: {MITOSIS_ID}",
        "sourcing: manual\n      reference: weights/mitosis\n      params: {file: model.onnx}",
    )
    commit_files(
        repo,
        {"analysis.yaml": analysis, "weights/mitosis/model.onnx": b"committed"},
        "ship weights",
    )
    (repo / "weights/mitosis/model.onnx").write_bytes(b"dirty")
    spec = load_customer(str(repo), settings)
    assert spec.manual_files == {"weights/mitosis/model.onnx": b"committed"}


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        (
            "git@gitlab.example.com:ivd/customers/customer-x.git",
            "https://gitlab.example.com/ivd/customers/customer-x",
        ),
        (
            "https://gitlab-ci-token:s3cr3t@gitlab.example.com/ivd/customers/customer-x.git",
            "https://gitlab.example.com/ivd/customers/customer-x",
        ),
        (
            "ssh://git@gitlab.example.com:2222/ivd/customers/customer-x.git",
            "https://gitlab.example.com/ivd/customers/customer-x",
        ),
        (
            "https://gitlab.example.com/ivd/customers/customer-x",
            "https://gitlab.example.com/ivd/customers/customer-x",
        ),
        ("git+ssh://git@GitLab.Example.com/ivd/cx.git/", "https://gitlab.example.com/ivd/cx"),
        ("ssh://gitlab.example.com:22//ivd//cx.git", "https://gitlab.example.com/ivd/cx"),
        ("git://gitlab.example.com/ivd/cx", "https://gitlab.example.com/ivd/cx"),
        (
            "HTTPS://deploy:tok@GITLAB.example.com:443/ivd/cx.git#main",
            "https://gitlab.example.com/ivd/cx",
        ),
        ("http://127.0.0.1:8080/ivd/cx.git/", "http://127.0.0.1:8080/ivd/cx"),
        ("http://127.0.0.1:80/ivd/cx", "http://127.0.0.1/ivd/cx"),
        ("file:///srv/git/cx.git/", "file:///srv/git/cx"),
        ("file://localhost/srv/git/./cx.git", "file:///srv/git/cx"),
        ("/srv/git/cx.git", "file:///srv/git/cx"),
        ("/srv/git//cx/", "file:///srv/git/cx"),
    ],
)
def test_source_url_is_one_spelling_without_secrets(url: str, canonical: str) -> None:
    from builder.cook.load import canonical_repo_url

    assert canonical_repo_url(url) == canonical


def test_a_folder_of_a_repository_is_named_repository_hash_folder(
    tmp_path: Path, settings: Settings
) -> None:
    """``<repository>#<folder>``, the form images and records use, opens a folder of a work
    tree, of a bare repository (no work tree at all) and of a git URL alike."""
    import subprocess

    configs = tmp_path / "configs"
    files = {
        "customers/customer-y/customer.yaml": CUSTOMER_YAML.format(name="customer-y", base="2.4.1"),
        "customers/customer-y/analysis.yaml": _analysis(),
    }
    commit = commit_files(configs, files, "configs")
    bare = tmp_path / "server" / "configs.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(configs), str(bare)], check=True)
    for location in (
        f"{configs}#customers/customer-y",
        f"{bare}#customers/customer-y",
        f"{bare.as_uri()}#customers/customer-y",
    ):
        spec = load_customer(location, settings)
        assert (spec.customer, spec.commit, spec.source.subdir) == (
            "customer-y",
            commit,
            "customers/customer-y",
        )
        assert spec.source.url.endswith("#customers/customer-y")
    with pytest.raises(ConfigError, match="folder 'customers/nobody' is not in git"):
        load_customer(f"{bare}#customers/nobody", settings)
    with pytest.raises(ConfigError, match="must be a relative path inside"):
        load_customer(f"{bare.as_uri()}#../escape", settings)


def test_declared_repository_is_canonical_and_credential_free(
    repo: Path, settings: Settings
) -> None:
    """customer.yaml ``repository``: recorded in canonical form; credentials are refused."""
    declared = CUSTOMER_YAML.format(name="customer-x", base="2.4.1")
    commit_files(
        repo, {"customer.yaml": declared + "repository: git@gitlab.example.com:ivd/cx.git\n"}, "id"
    )
    assert load_customer(str(repo), settings).repository == "https://gitlab.example.com/ivd/cx"
    commit_files(
        repo,
        {"customer.yaml": declared + "repository: https://bot:s3cret@gitlab.example.com/ivd/cx\n"},
        "oops",
    )
    with pytest.raises(ConfigError, match="holds credentials") as raised:
        load_customer(str(repo), settings)
    assert "s3cret" not in str(raised.value)
    commit_files(repo, {"customer.yaml": declared + "repository: ../cx\n"}, "a path")
    with pytest.raises(ConfigError, match="repository"):
        load_customer(str(repo), settings)


def test_git_url_is_cloned_then_fetched(repo: Path, settings: Settings) -> None:
    url = repo.as_uri()
    first = load_customer(url, settings)
    assert first.customer == "customer-x" and first.source.url == url
    commit_files(
        repo,
        {"customer.yaml": CUSTOMER_YAML.format(name="customer-x", base="2.5.0")},
        "bump",
        when=1_700_000_200,
    )
    second = load_customer(url, settings)  # the cached clone is fetched, not re-cloned
    assert second.base_version == "2.5.0" and second.commit != first.commit
    assert len([p for p in (settings.cache_dir / "repos").iterdir() if p.is_dir()]) == 1


def test_parallel_jobs_share_the_git_caches(repo: Path, settings: Settings) -> None:
    """CI runs a fleet's child jobs side by side on one cache: the first clone of a repository
    and the first release-record log of a remote must not trip over each other."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from builder.record import RELEASES_BRANCH, ReleaseLog

    workers = 6
    barrier = Barrier(workers)

    def job(_: int) -> tuple[str, str | None]:
        barrier.wait()
        spec = load_customer(repo.as_uri(), settings)
        log = ReleaseLog(repo.as_uri(), settings.cache_dir, RELEASES_BRANCH)
        return spec.commit, log.fetch()

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(job, range(workers)))
    assert len({commit for commit, _ in results}) == 1
    assert all(head is None for _, head in results)  # no records branch yet, and no error


def test_git_url_that_cannot_be_cloned(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(
        ConfigError, match=r"cannot clone https://127\.0\.0\.1:9/.*: fatal: unable to access"
    ) as info:
        load_customer(f"https://user:hunter2@127.0.0.1:9/{tmp_path.name}.git", settings)
    assert "hunter2" not in str(info.value)


def test_commit_id_that_does_not_exist(repo: Path, settings: Settings) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_customer(str(repo), settings, ref="0123456789abcdef0123456789abcdef01234567")


# -- through the CLI: what validate, expand and lock read, and how they report ------------------


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """The bundled demo registry and weights; no base image (an empty OCI layout path:
    validate and lock say so and go on, with no registry to wait for)."""
    return {
        "BUILDER_MODEL_REGISTRY": f"local:{ROOT / 'demo' / 'registry'}",
        "BUILDER_PRODUCTION": f"file:{ROOT / 'demo' / 'production'}",
        "BUILDER_BASE_REPOSITORY": f"oci:{tmp_path / 'no-base'}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }


def test_validate_expand_and_lock_read_the_edit_and_say_so(repo: Path, tmp_path: Path) -> None:
    env = _cli_env(tmp_path)
    head = git.Repo(repo).head.commit.hexsha
    edited = _analysis().replace("threshold: 0.5", "threshold: 0.9")
    (repo / "analysis.yaml").write_text(edited)

    checked = run_cli("validate", str(repo), env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"valid in the work tree (uncommitted changes; HEAD {head[:12]})" in checked.stdout
    assert "model ids not checked against a registry" in checked.stdout
    assert f"note: uncommitted changes in {repo} (analysis.yaml)" in checked.stderr
    at_head = run_cli("validate", str(repo), "--ref", "HEAD", "--json", env=env)
    doc = json.loads(at_head.stdout)["result"]
    assert doc["commit"] == head and doc["uncommitted"] == [] and doc["registry_checked"] is False

    expanded = run_cli("expand", str(repo), "--json", env=env)
    assert expanded.returncode == 0, expanded.stderr
    result = json.loads(expanded.stdout)["result"]
    assert result["uncommitted"] == ["analysis.yaml"]
    features = result["config"]["analyses"][0]["features"]
    assert features[0]["params"] == {"threshold": 0.9}

    locked = run_cli("lock", str(repo), env=env)
    assert locked.returncode == 0, locked.stderr
    assert "uncommitted changes in" in locked.stderr and "analysis.yaml" in locked.stderr
    lock = yaml.safe_load((repo / "customer.lock.yaml").read_text())
    assert lock["inputs"]["analysis.yaml"] == hashlib.sha256(edited.encode()).hexdigest()
    # committed together, HEAD is what was locked: the check passes on the commit
    commit_files(
        repo,
        {"analysis.yaml": edited, "customer.lock.yaml": (repo / "customer.lock.yaml").read_text()},
        "threshold 0.9, locked",
    )
    again = run_cli("lock", str(repo), "--check", "--ref", "HEAD", env=env)
    assert again.returncode == 0, again.stderr
    assert "uncommitted" not in again.stderr


def test_validate_lists_every_problem_of_the_file_in_line_order(repo: Path, tmp_path: Path) -> None:
    analysis = (
        _analysis()
        .replace(CARCINOMA_ID, "not-an-id")
        .replace("segmentation_model: mitosis_model", "segmentation_model: mitosis_modle")
        .replace(
            f"sourcing: auto\n      reference: {MITOSIS_ID}",
            "sourcing: manual\n      reference: ../x",
        )
    )
    commit_files(repo, {"analysis.yaml": analysis}, "three mistakes")
    result = run_cli("validate", str(repo), env=_cli_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    found = [int(n) for n in re.findall(r"analysis\.yaml:(\d+): ", line)]
    lines = analysis.splitlines()
    expected = [
        next(i for i, text in enumerate(lines, 1) if token in text)
        for token in ("not-an-id", "../x", "mitosis_modle")
    ]
    assert found == expected, line
    assert "[3 problems]" in line
    # schema errors too: every one at once, in line order
    schema_bad = _analysis().replace(
        "  - cls: Carcinoma\n", "  - cls: Carcinoma\n    colour: red\n"
    )
    schema_bad = schema_bad.replace("- name: breast\n", "- name: breast\n  descripton: x\n")
    commit_files(repo, {"analysis.yaml": schema_bad}, "two unknown keys")
    result = run_cli("validate", str(repo), env=_cli_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.index("'descripton'") < message.index("'colour'"), message
    assert "[2 problems]" in message


def test_dashed_uuid_model_ids_are_read_as_the_servers_ids(repo: Path, tmp_path: Path) -> None:
    """The blueprint's config names models by canonical UUIDs: accepted in any case,
    normalised to the server's 32 lowercase hex digits for lookups, the lock and provenance;
    a history with both spellings reads as one model."""
    env = _cli_env(tmp_path)
    dashed = str(uuid.UUID(CARCINOMA_ID)).upper()
    commit_files(repo, {"analysis.yaml": _analysis().replace(CARCINOMA_ID, dashed)}, "dashed")
    dashed_rev = git.Repo(repo).head.commit.hexsha
    assert run_cli("validate", str(repo), env=env).returncode == 0
    expanded = run_cli("expand", str(repo), "--json", env=env)
    assert expanded.returncode == 0, expanded.stderr
    models = json.loads(expanded.stdout)["result"]["config"]["analyses"][0]["models"]
    assert models["carcinoma_model"]["provenance"]["registry_id"] == CARCINOMA_ID
    assert run_cli("lock", str(repo), env=env).returncode == 0
    lock = yaml.safe_load((repo / "customer.lock.yaml").read_text())
    assert lock["models"]["carcinoma_model"]["model_id"] == CARCINOMA_ID
    # publish finds the model by its dashed id (then stops: the demo's training store is not
    # reachable here; the message names the model's own training artifact)
    published = run_cli("publish", str(uuid.UUID(MITOSIS_ID)), "--dry-run", env=env)
    assert f"pathology/{MITOSIS_TASK}/models/model.onnx" in published.stderr, published.stderr
    assert "is not a model id" not in published.stderr
    # respelled in a later revision: the same model, no alarm in history or diff
    commit_files(repo, {"analysis.yaml": _analysis()}, "32-hex again", when=1_700_000_100)
    diffed = run_cli("diff", str(repo), dashed_rev, "HEAD", env=env)
    assert diffed.returncode == 0, diffed.stderr
    assert "no change in resolved terms" in diffed.stdout, diffed.stdout
    history = run_cli("history", str(repo), "--json", env=env)
    assert history.returncode == 0, history.stderr
    entries = json.loads(history.stdout)["result"]["entries"]
    assert all(e["error"] is None for e in entries), entries
    for bad in (CARCINOMA_ID[:-1], f"{dashed[:-1]}g", f"'{{{dashed}}}'"):
        commit_files(repo, {"analysis.yaml": _analysis().replace(CARCINOMA_ID, bad)}, "bad")
        refused = run_cli("validate", str(repo), env=env)
        assert refused.returncode == 2, refused.stdout
        assert "is not a model id (32 hex digits, or a UUID" in refused.stderr
