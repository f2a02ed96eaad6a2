"""`build` end to end through the real CLI: real registry, real Docker engine, real skopeo."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    CARCINOMA_ID,
    CARCINOMA_TASK,
    MITOSIS_ID,
    MITOSIS_TASK,
    SeedModel,
    commit_files,
    commit_lock,
    customer_repo,
    model_record,
    push_labelled_bases,
    run_cli,
    seed_models,
    write_local_registry,
    write_production,
)

BASE_REPO = "ivd/test-base"
#: version -> config schema versions its runner accepts
BASE_VERSIONS = {"2.3.4": "1", "2.4.1": "1", "2.4.2": "1", "3.0.0": "2"}
CARCINOMA = os.urandom(256 * 1024)  # incompressible, like real weights
MITOSIS = b"mitosis-weights" * 4096


@pytest.fixture(scope="module")
def base_images(docker_engine: Any, oci_registry: Any, base_os_image: str) -> str:
    """Small bases in the registry with the runner's schema label (no runner: fast)."""
    return push_labelled_bases(
        docker_engine, oci_registry.host, base_os_image, BASE_REPO, BASE_VERSIONS
    )


@pytest.fixture
def env(tmp_path: Path, oci_registry: Any, docker_engine: Any, base_images: str) -> dict[str, str]:
    models = seed_models(
        tmp_path,
        [
            SeedModel(CARCINOMA_ID, CARCINOMA_TASK, "carcinoma v3", {"model.onnx": CARCINOMA}),
            SeedModel(
                MITOSIS_ID,
                MITOSIS_TASK,
                "mitosis v1",
                {"model.onnx": MITOSIS, "labels.json": b'{"1": "mitosis"}'},
            ),
        ],
    )
    return {
        **docker_engine.env(),
        **models.env(),
        "BUILDER_BASE_REPOSITORY": base_images,
        # A namespace per test: the registry is shared by the whole session.
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/{re.sub('[^a-z0-9]+', '-', tmp_path.name.lower()).strip('-')}",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }


@pytest.fixture
def repo(tmp_path: Path, env: dict[str, str]) -> Path:
    """customer-x with its lock committed: what a release (--push) needs."""
    path = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    commit_lock(path, env)
    return path


def _build(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = run_cli("build", *args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)["result"]
    return report


def _fail(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = run_cli("build", *args, env=env)
    assert result.returncode != 0
    return result.returncode, result.stderr.strip().splitlines()[-1]


def test_build_push_pull_run(
    env: dict[str, str], repo: Path, docker_engine: Any, oci_registry: Any
) -> None:
    report = _build(env, str(repo), "--push")
    spec_commit = report["config_commit"]
    registry = env["BUILDER_IMAGE_REGISTRY"]
    assert (
        report["image"] == f"{registry}/customer-x:2.4.2-{spec_commit[:12]}"
    )  # ~=2.4 picks the newest 2.4.x
    assert report["tags"][1] == f"{registry}/customer-x:2.4.2"
    assert [layer["name"] for layer in report["layers"] if layer["new"]] == [
        "carcinoma_model",
        "mitosis_model",
        "config",
    ]

    client = docker_engine.client()
    pulled = client.images.pull(f"{registry}/customer-x", tag=f"2.4.2-{spec_commit[:12]}")
    assert pulled.attrs["RepoDigests"][0].endswith(report["manifest_digest"])
    labels = pulled.labels
    assert labels["org.opencontainers.image.revision"] == spec_commit
    assert labels["com.ivd.model.carcinoma_model.id"] == CARCINOMA_ID
    assert labels["com.ivd.development-build"] == "false"
    listing = client.containers.run(
        pulled.id,
        ["sh", "-c", "cd /app/models && find . -type f | sort | xargs sha256sum"],
        entrypoint=[],
        network_mode="none",
        remove=True,
    ).decode()
    assert f"{hashlib.sha256(CARCINOMA).hexdigest()}  ./carcinoma_model/model.onnx" in listing
    assert f"{hashlib.sha256(MITOSIS).hexdigest()}  ./mitosis_model/model.onnx" in listing
    config = client.containers.run(
        pulled.id,
        ["cat", "/app/config/analysis.yaml"],
        entrypoint=[],
        network_mode="none",
        remove=True,
    )
    assert (
        yaml.safe_load(config)["analyses"][0]["models"]["mitosis_model"]["reference"]
        == "models/mitosis_model/"
    )
    # skopeo, a client no one here wrote, reads it from the registry.
    inspect = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{report['image']}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspect.stdout)["Digest"] == report["manifest_digest"]


def _git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


def test_one_commit_one_digest_from_two_clones_reached_differently(
    env: dict[str, str], repo: Path, tmp_path: Path
) -> None:
    """One commit, two machines: clones with different ``origin`` spellings (a local path; an
    SSH address that is not even the server they were cloned from), the base registry reached
    as 127.0.0.1:PORT and as localhost:PORT, the production store spelled as an absolute path
    and relative to the working directory, other caches, umask and TZ. One image digest,
    unlocked and locked; the image names none of these locations."""
    production = env["BUILDER_PRODUCTION"].removeprefix("file:")
    assert run_cli("lock", str(repo), env=env).returncode == 0
    commit_files(repo, {"customer.lock.yaml": (repo / "customer.lock.yaml").read_bytes()}, "lock")
    server = tmp_path / "server" / "customer-x.git"
    _git("clone", "-q", "--bare", str(repo), str(server))
    laptop, ci = tmp_path / "laptop" / "customer-x", tmp_path / "ci" / "build"
    _git("clone", "-q", str(server), str(laptop))  # origin: /.../server/customer-x.git
    _git("clone", "-q", server.as_uri(), str(ci))
    _git("-C", str(ci), "remote", "set-url", "origin", "git@gitlab.example.com:ivd/customer-x.git")
    base = env["BUILDER_BASE_REPOSITORY"]
    assert base.startswith("127.0.0.1:")
    laptop_env = {**env, "BUILDER_CACHE_DIR": str(tmp_path / "laptop-cache")}
    ci_env = {
        **env,
        "BUILDER_CACHE_DIR": str(tmp_path / "ci-cache"),
        "BUILDER_BASE_REPOSITORY": base.replace("127.0.0.1:", "localhost:", 1),
        "BUILDER_IMAGE_REGISTRY": env["BUILDER_IMAGE_REGISTRY"].replace("127.0.0.1:", "localhost:"),
        "BUILDER_PRODUCTION": f"file:{os.path.relpath(production, tmp_path)}/",
        "TZ": "Pacific/Kiritimati",
    }
    digests = set()
    for extra in ((), ("--locked",)):
        first = _build(laptop_env, str(laptop), *extra)
        old_umask = os.umask(0o077)
        try:
            result = run_cli("build", str(ci), *extra, "--json", env=ci_env, cwd=tmp_path)
        finally:
            os.umask(old_umask)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        second = json.loads(result.stdout)["result"]
        assert second["manifest_digest"] == first["manifest_digest"]
        digests.add(first["manifest_digest"])
    assert len(digests) == 1
    # Pushed through either alias, it is one image; the tag stays where it is.
    pushed = _build(laptop_env, str(laptop), "--locked", "--push")
    again = run_cli("build", str(ci), "--locked", "--push", "--json", env=ci_env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["result"]["manifest_digest"] == pushed["manifest_digest"]
    inspect = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{pushed['image']}"],
        capture_output=True,
        text=True,
        check=True,
    )
    labels = json.loads(inspect.stdout)["Labels"]
    assert labels["com.ivd.layer-format"] == "3"
    assert not {"org.opencontainers.image.source", "org.opencontainers.image.base.name"} & set(
        labels
    )


def test_rebuild_reuses_every_layer(env: dict[str, str], repo: Path, oci_registry: Any) -> None:
    _build(env, str(repo), "--push")
    before = len(oci_registry.blob_uploads())
    again = _build(env, str(repo), "--push")
    # No blob is sent again; what is (the manifest per tag, the referrers index) is counted.
    assert again["bytes_uploaded"] < 16 * 1024
    assert len(oci_registry.blob_uploads()) == before
    assert {layer["push"] for layer in again["layers"]} == {"present"}


def test_base_bump_uploads_only_manifest_and_config(
    env: dict[str, str], repo: Path, oci_registry: Any
) -> None:
    old = _build(env, str(repo), "--push", "--base-version", "2.4.1")
    new = _build(env, str(repo), "--push", "--base-version", "2.4.2")
    assert old["manifest_digest"] != new["manifest_digest"]
    model_layers = {layer["digest"] for layer in old["layers"] if layer["name"].endswith("_model")}
    assert model_layers <= {layer["digest"] for layer in new["layers"]}
    assert new["bytes_uploaded"] < 64 * 1024
    # Model and config layers are all reused: only the image config and manifests are new.
    assert {layer["push"] for layer in new["layers"]} == {"present"}


def test_immutable_tag_is_refused_then_forced(env: dict[str, str], tmp_path: Path) -> None:
    """The registry refuses to move an immutable tag and says which inputs differ, side by
    side; --force moves it and says what it overwrote. (Unlocked development builds: a
    release's lock would refuse the re-published weights first, exit 7.)"""
    repo = customer_repo(tmp_path / "dev", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    first = _build(env, str(repo), "--push", "--allow-unlocked")
    # Same config commit, other weights under the same task: the immutable tag would move.
    write_production(
        tmp_path / "production",
        CARCINOMA_TASK,
        CARCINOMA_ID,
        {"model.onnx": b"re-published by mistake"},
    )
    ci = {**env, "BUILDER_CACHE_DIR": str(tmp_path / "ci-cache")}  # an empty local store
    code, line = _fail(ci, str(repo), "--push", "--allow-unlocked")
    before = {m["name"]: m["dir_hash"] for m in first["models"]}["carcinoma_model"]
    assert code == 6 and f"{first['image']} is an immutable tag and already points to" in line
    assert "refusing to move it" in line and first["manifest_digest"] in line
    differs = line.split("What differs: ", 1)[1]
    assert differs.startswith("verbose config sha256: ")  # the sizes and sha256 it lists
    assert f"model carcinoma_model sha256: {before[:12]} (tagged) vs " in differs
    assert "config commit" not in differs and "base digest" not in differs
    forced = _build(ci, str(repo), "--push", "--allow-unlocked", "--force")
    now = {m["name"]: m["dir_hash"] for m in forced["models"]}["carcinoma_model"]
    (warning,) = [w for w in forced["warnings"] if w.startswith("FORCED: immutable tag")]
    assert f"it pointed to {first['manifest_digest']}, now {forced['manifest_digest']}" in warning
    assert f"model carcinoma_model sha256: {before[:12]} (tagged) vs {now[:12]} (this build)" in (
        warning
    )


def test_locked_offline_build_needs_no_registry(env: dict[str, str], repo: Path) -> None:
    locked = run_cli("lock", str(repo), env=env)
    assert locked.returncode == 0, locked.stderr
    commit_files(repo, {"customer.lock.yaml": (repo / "customer.lock.yaml").read_bytes()}, "lock")
    online = _build(env, str(repo))
    offline_env = {
        **env,
        "BUILDER_MODEL_REGISTRY": "local:/nowhere",
    }
    offline = _build(offline_env, str(repo), "--locked", "--offline")
    assert offline["manifest_digest"] == online["manifest_digest"]
    shutil.rmtree(Path(env["BUILDER_CACHE_DIR"]) / "weights")
    code, line = _fail(offline_env, str(repo), "--locked", "--offline")
    assert code == 5 and "--offline forbids downloading" in line


def test_base_whose_runner_rejects_the_config(env: dict[str, str], repo: Path) -> None:
    code, line = _fail(env, str(repo), "--base-version", "3.0.0")
    assert code == 6 and "accepts config schema versions 2, not 1" in line


def test_constraint_no_base_satisfies(env: dict[str, str], repo: Path) -> None:
    code, line = _fail(env, str(repo), "--base-version", "~=4.0")
    assert code == 6 and "~=4.0" in line and "2.4.1" in line


def test_missing_base_tag(env: dict[str, str], repo: Path) -> None:
    code, line = _fail(env, str(repo), "--base-version", "2.4.9")
    assert code == 6 and "2.4.9" in line


def test_docker_archive_and_oci_layout(
    env: dict[str, str], repo: Path, tmp_path: Path, docker_engine: Any
) -> None:
    report = _build(
        env,
        str(repo),
        "--docker-archive",
        str(tmp_path / "image.tar"),
        "--oci-layout",
        str(tmp_path / "layout"),
    )
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{tmp_path / 'layout'}:{report['image'].rsplit(':', 1)[1]}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspect.stdout)["Digest"] == report["manifest_digest"]
    loaded = subprocess.run(
        ["docker", "load", "-i", str(tmp_path / "image.tar")],
        capture_output=True,
        text=True,
        env={**os.environ, **docker_engine.env()},
        check=True,
    )
    assert report["image"] in loaded.stdout


def test_development_build_is_labelled(env: dict[str, str], repo: Path, tmp_path: Path) -> None:
    write_local_registry(
        Path(env["BUILDER_MODEL_REGISTRY"].removeprefix("local:")),
        [model_record(MITOSIS_ID, MITOSIS_TASK, name="m", ready=False)],
        [],
    )
    code, line = _fail(env, str(repo))
    assert code == 4 and "not published" in line
    report = _build(env, str(repo), "--allow-unpublished", "--oci-layout", str(tmp_path / "dev"))
    assert report["development"] is True
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{tmp_path / 'dev'}:{report['image'].rsplit(':', 1)[1]}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspect.stdout)["Labels"]["com.ivd.development-build"] == "true"


# -- layer identity: model layers shared across commits and customers -----------------------------

LATER = 1_700_000_000 + 400 * 86_400  # another customer's (or a later) commit time


def _stored_blobs(registry: Any) -> dict[str, int]:
    """digest -> size of every blob the registry keeps on disk (filesystem driver layout)."""
    root = registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return {f"sha256:{p.parent.name}": p.stat().st_size for p in root.glob("*/*/data")}


def _uploaded_digests(registry: Any, since: int) -> set[str]:
    """Digests of the blob uploads the registry completed (PUT ...?digest=) after ``since``."""
    return {
        m.group(1)
        for r in registry.blob_uploads(since)
        if r.method == "PUT" and (m := re.search(r"digest=(sha256(?::|%3A)[0-9a-f]{64})", r.path))
    }


def _image_blobs(report: dict[str, Any]) -> dict[str, int]:
    return {
        **{layer["digest"]: layer["size"] for layer in report["layers"]},
        report["config_digest"]: -1,
    }


def _by_name(report: dict[str, Any]) -> dict[str, str]:
    return {layer["name"]: layer["digest"] for layer in report["layers"] if layer["new"]}


def test_config_only_change_uploads_config_layer_and_image_config_only(
    env: dict[str, str], repo: Path, oci_registry: Any
) -> None:
    """A new config commit: at the registry, only the config layer and image config arrive."""
    first = _build(env, str(repo), "--push")
    customer_repo(repo, carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, threshold=0.7, when=LATER)
    commit_lock(repo, env, when=LATER)
    mark, stored = len(oci_registry.requests()), _stored_blobs(oci_registry)
    second = _build(env, str(repo), "--push")
    old, new = _by_name(first), _by_name(second)
    assert {name for name in new if new[name] != old[name]} == {"config"}
    assert second["manifest_digest"] != first["manifest_digest"]
    uploaded = {d.replace("%3A", ":") for d in _uploaded_digests(oci_registry, mark)}
    image = _image_blobs(second)
    assert uploaded & image.keys() == {new["config"], second["config_digest"]}
    # Nothing of the image beyond those two reached the registry's storage either.
    arrived = set(_stored_blobs(oci_registry)) - set(stored)
    assert arrived & image.keys() == {new["config"], second["config_digest"]}
    sizes = _stored_blobs(oci_registry)
    # bytes_uploaded counts every byte sent (issue 22): these two blobs, the manifests and the
    # attestations; together still under the 64 KiB a config-only change may cost
    assert second["bytes_uploaded"] >= sizes[new["config"]] + sizes[second["config_digest"]]
    assert second["bytes_uploaded"] < 64 * 1024
    pushes = {layer["name"]: layer["push"] for layer in second["layers"] if layer["new"]}
    assert pushes == {
        "carcinoma_model": "present",
        "mitosis_model": "present",
        "config": "uploaded",
    }
    # The image manifest went up under its two tags (one repository: not by digest first).
    manifests = [r.path for r in oci_registry.manifest_puts(mark) if "/customer-x/" in r.path]
    refs = {path.rsplit("/manifests/", 1)[1] for path in manifests}
    assert {tag.rsplit(":", 1)[1] for tag in second["tags"]} <= refs
    assert second["manifest_digest"] not in refs


def test_two_customers_sharing_a_model_store_one_blob(
    env: dict[str, str], tmp_path: Path, oci_registry: Any
) -> None:
    """Other customer, other commit time, even another cache: the model layers are one blob each."""
    x_repo = customer_repo(tmp_path / "x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    y_repo = customer_repo(
        tmp_path / "y", name="customer-y", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID, when=LATER
    )
    commit_lock(x_repo, env)
    commit_lock(y_repo, env, when=LATER)
    x = _build(env, str(x_repo), "--push")
    stored = _stored_blobs(oci_registry)
    y = _build(env, str(y_repo), "--push")
    models = {n: d for n, d in _by_name(x).items() if n != "config"}
    assert models and {n: _by_name(y)[n] for n in models} == models
    assert _by_name(x)["config"] != _by_name(y)["config"]
    # Pushed to customer-y's repository by a cross-repository mount: no weight bytes sent.
    pushes = {layer["name"]: layer["push"] for layer in y["layers"] if layer["new"]}
    assert {pushes[n] for n in models} == {"mounted"}
    assert y["bytes_uploaded"] < 64 * 1024
    # A third customer built on a machine with an empty cache: the same digests again.
    z_repo = customer_repo(
        tmp_path / "z",
        name="customer-z",
        carcinoma=CARCINOMA_ID,
        mitosis=MITOSIS_ID,
        when=LATER + 7,
    )
    commit_lock(z_repo, env, when=LATER + 7)
    z = _build({**env, "BUILDER_CACHE_DIR": str(tmp_path / "other-cache")}, str(z_repo), "--push")
    assert {n: _by_name(z)[n] for n in models} == models
    after = _stored_blobs(oci_registry)
    assert set(models.values()) <= set(stored)  # stored by the first customer ...
    grown = {d: after[d] for d in set(after) - set(stored)}
    assert not set(models.values()) & set(grown)  # ... and by no one after


def test_verify_rebuilds_an_image_made_before_layer_format_2(
    env: dict[str, str], repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image whose model layers carry the commit time (format 1, no label) still MATCHes."""
    from builder.image.assemble import LAYER_FORMAT_LABEL
    from builder.pipeline import BuildRequest, build
    from builder.settings import load_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    old = build(BuildRequest(str(repo), push=True, layer_format=1), load_settings(tmp_path))
    # Another cache: in this one the immutable tag names the old image (and stays so).
    current = _build({**env, "BUILDER_CACHE_DIR": str(tmp_path / "now")}, str(repo))
    assert _by_name(current)["mitosis_model"] != next(
        layer.digest for layer in old.layers if layer.name == "mitosis_model"
    )
    result = run_cli("verify", old.image, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    verified = json.loads(result.stdout)["result"]
    assert verified["match"] is True, verified["differences"]
    assert any("image format 1 (model layers stamped" in note for note in verified["notes"])
    labels = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{old.image}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["Labels"]
    assert LAYER_FORMAT_LABEL not in labels


#: The image tests/data/format2-image holds: built by the code before images became
#: location-free (format 2), from the inputs :func:`_format2_inputs` recreates.
FORMAT2_DIGEST = "sha256:fd27b55e3b7b22b3be7f735bdd2df047b5acd7fe4413bbed9701adcf562a7094"
FORMAT2_TAG = "2.4.1-e5b4168d0b58"


def _format2_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The inputs of tests/data/format2-image, byte for byte: a synthetic base layout, fixed
    weights, a customer commit with fixed dates and an https ``origin``, every location spelled
    relative to ``tmp_path`` (the working directory), the builder version fixed."""
    import git
    from test_assemble import make_base_layout

    import builder.image.provenance

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builder.image.provenance, "__version__", "0.0.0-golden")
    make_base_layout(tmp_path / "base", ("2.4.1",))
    seed_models(
        tmp_path,
        [
            SeedModel(
                CARCINOMA_ID, CARCINOMA_TASK, "carcinoma v3", {"model.onnx": b"carcinoma" * 1000}
            ),
            SeedModel(MITOSIS_ID, MITOSIS_TASK, "mitosis v1", {"model.onnx": b"mitosis" * 1000}),
        ],
    )
    repo = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    git.Repo(repo).create_remote("origin", "https://gitlab.example.com/ivd/customer-x.git")
    settings = {
        "BUILDER_MODEL_REGISTRY": "local:registry",
        "BUILDER_PRODUCTION": "file:production",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
        "BUILDER_BASE_REPOSITORY": "oci:base",
        "BUILDER_IMAGE_REGISTRY": "registry.example:5000",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    return repo


def test_an_image_of_format_2_built_before_the_change_still_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image pushed by the code before location-free images (format 2: it records the
    clone's origin, the base's name and the production store's spelling) verifies as MATCH:
    verify rebuilds it with format 2 and the locations it recorded. The same inputs build
    that digest again with format 2, and another one (format 3, no location) by default."""
    from builder.audit.verify import verify
    from builder.image.assemble import LAYER_FORMAT_LABEL
    from builder.pipeline import BuildRequest, build
    from builder.settings import load_settings

    repo = _format2_inputs(tmp_path, monkeypatch)
    layout = tmp_path / "format2-image"
    shutil.copytree(Path(__file__).parent / "data" / "format2-image", layout)
    settings = load_settings(tmp_path)
    result = verify(f"oci:{layout}:{FORMAT2_TAG}", settings, repo=repo)
    assert result.manifest_digest == FORMAT2_DIGEST
    assert result.match, result.differences
    assert any(note.startswith("built with image format 2 (") for note in result.notes)
    again = build(BuildRequest(str(repo), layer_format=2), settings)
    assert again.manifest_digest == FORMAT2_DIGEST
    now = build(BuildRequest(str(repo)), replace_cache(settings, tmp_path / "now"))
    assert now.manifest_digest != FORMAT2_DIGEST
    labels = json.loads(
        (Path(now.outputs["store"]) / "blobs" / "sha256" / now.config_digest[7:]).read_bytes()
    )["config"]["Labels"]
    assert labels[LAYER_FORMAT_LABEL] == "3"
    assert "org.opencontainers.image.source" not in labels
    assert "org.opencontainers.image.base.name" not in labels


def replace_cache(settings: Any, cache: Path) -> Any:
    """``settings`` with another cache (and so another local image store)."""
    import dataclasses

    return dataclasses.replace(settings, cache_dir=cache)
