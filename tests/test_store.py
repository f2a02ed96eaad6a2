"""The local image store: a locked index under many processes, prune, and builds with no server.

The build tests here need no Docker engine: the base is written into the store the way
`builder base build` writes it (an image the engine built, imported from `docker save` form),
and a real docker-registry (started and stopped by the test) plays the online side.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import git
import pytest
from helpers import (
    CARCINOMA_ID,
    CARCINOMA_TASK,
    MITOSIS_ID,
    MITOSIS_TASK,
    SeedModel,
    commit_files,
    commit_lock,
    customer_repo,
    run_cli,
    seed_models,
    served_over_http,
    write_production,
)
from test_assemble import base_layer_tar, synthetic_base_blobs

from builder.contracts import ProgressEvent
from builder.deliver import push, write_oci_layout
from builder.errors import ImageError
from builder.image.store import ImageStore, split_name
from builder.oci import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    RegistryClient,
    canonical_json,
    layout_blob_path,
    read_layout_index,
    sha256_digest,
    update_layout_index,
    write_layout_index,
)
from testbed.registry import start_registry

PROCESSES = 16
TAGS_EACH = 50


# -- helpers ---------------------------------------------------------------------------------


def _put_synthetic_base(
    store: ImageStore, references: list[str], labels: dict[str, str] | None = None
) -> Descriptor:
    """The synthetic base (Docker manifest, gzip layer) in the store under ``references``."""
    manifest, config, layer = synthetic_base_blobs(labels)
    for data in (config, layer):
        store.blobs.put_bytes(data)
    descriptor = Descriptor(DOCKER_MANIFEST, store.blobs.put_bytes(manifest), len(manifest))
    store.tag(descriptor, references)
    return descriptor


def _docker_save_archive(path: Path, reference: str, *, diff_id: str | None = None) -> bytes:
    """A classic `docker save` tar (manifest.json, <id>.json, <layer>/layer.tar); its config."""
    layer = base_layer_tar()
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"com.ivd.runner.config-schemas": "1"}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id or sha256_digest(layer)]},
        }
    )
    config_name = sha256_digest(config).split(":")[1] + ".json"
    members = {
        "manifest.json": json.dumps(
            [{"Config": config_name, "RepoTags": [reference], "Layers": ["abc/layer.tar"]}]
        ).encode(),
        config_name: config,
        "abc/layer.tar": layer,
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return config


def _tag_many(directory: str, worker: int, use_store: bool) -> None:
    """One writer process: TAGS_EACH tags, one index update each."""
    digest = sha256_digest(f"manifest {worker}".encode())
    descriptor = Descriptor(OCI_MANIFEST, digest, 100 + worker)
    store = ImageStore(directory) if use_store else None
    for i in range(TAGS_EACH):
        name = f"127.0.0.1:5000/customer-{worker}:{i}"
        if store is not None:
            store.tag(descriptor, [name])
        else:
            write_layout_index(Path(directory), descriptor, [name.rsplit(":", 1)[1] + f"-{worker}"])


def _hold_store(directory: str, ready: Any, release: Any) -> None:
    """A build in progress: holds the store shared until told to finish."""
    with ImageStore(directory).in_use():
        ready.set()
        release.wait(30)


# -- the index under concurrency -----------------------------------------------------------


@pytest.mark.parametrize("use_store", [False, True], ids=["oci-layout", "store"])
def test_concurrent_writers_keep_every_tag(tmp_path: Path, use_store: bool) -> None:
    """16 processes x 50 tags into one index: all 800 survive (one locked writer)."""
    directory = tmp_path / "layout"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_tag_many, args=(str(directory), w, use_store))
        for w in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    names = [e.ref_name for e in read_layout_index(directory)]
    assert len(names) == len(set(names)) == PROCESSES * TAGS_EACH
    index = json.loads((directory / "index.json").read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"


def test_a_broken_index_is_refused_not_overwritten(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    (store.root / "index.json").write_text('{"manifests": [1, 2]}')
    with pytest.raises(ImageError, match="not a valid image index"):
        _put_synthetic_base(store, ["r.example/x:1"])
    assert (store.root / "index.json").read_text() == '{"manifests": [1, 2]}'


# -- naming and resolving --------------------------------------------------------------------


def test_split_name() -> None:
    assert split_name("127.0.0.1:5000/ivd/base:2.4.2") == ("127.0.0.1:5000/ivd/base", "2.4.2")
    assert split_name(f"127.0.0.1:5000/ivd/base@sha256:{'a' * 64}") == (
        "127.0.0.1:5000/ivd/base",
        None,
    )
    assert split_name("127.0.0.1:5000/ivd/base") == ("127.0.0.1:5000/ivd/base", None)


def test_find_base_resolves_like_a_registry(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    repo = "127.0.0.1:5000/ivd/base"
    digest = _put_synthetic_base(
        store, [f"{repo}:2.4.1", f"{repo}:2.4.2", f"{repo}:2.5.0", "other.example/x:9.9.9"]
    ).digest
    base = store.find_base(repo, "~=2.4.0")
    assert (base.repository, base.version, base.digest, base.name) == (
        repo,
        "2.4.2",
        digest,
        f"{repo}:2.4.2",
    )
    assert base.labels["com.ivd.runner.config-schemas"] == "1,2"
    assert store.find_digest(repo, "2.4.2", digest) is not None
    assert store.find_digest("other.example/y", "2.4.2", digest) is None
    with pytest.raises(ImageError, match=r"no version of .* satisfies '~=3\.0'"):
        store.find_base(repo, "~=3.0")
    with pytest.raises(ImageError, match=r"has no image of r\.example/none"):
        store.find_base("r.example/none", "~=1.0")
    # a missing layer makes the image incomplete: not used, and said so
    _, _, layer = synthetic_base_blobs()
    store.blobs.path(sha256_digest(layer)).unlink()
    assert store.find_digest(repo, "2.4.2", digest) is None
    with pytest.raises(ImageError, match="lacks some of its blobs"):
        store.find_base(repo, "~=2.4.0")


def test_import_of_a_docker_save_archive(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    reference = "127.0.0.1:5000/ivd/base:3.1.0"
    config = _docker_save_archive(tmp_path / "saved.tar", reference)
    manifest = store.import_docker_archive(tmp_path / "saved.tar", reference)
    base = store.find_base("127.0.0.1:5000/ivd/base", "3.1.0")
    assert base.digest == manifest.digest
    assert base.config_descriptor.digest == sha256_digest(config)  # the engine's image id
    assert base.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    # same archive, same manifest: the import is deterministic
    again = ImageStore(tmp_path / "other").import_docker_archive(tmp_path / "saved.tar", reference)
    assert again.digest == manifest.digest
    # the stored image exports like a built one
    out = write_oci_layout(store.stored_image(reference), tmp_path / "export", ["3.1.0"])
    assert [e.descriptor.digest for e in read_layout_index(out)] == [manifest.digest]


def test_import_refuses_a_layer_that_does_not_match_its_diff_id(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    reference = "127.0.0.1:5000/ivd/base:3.1.0"
    _docker_save_archive(tmp_path / "bad.tar", reference, diff_id=sha256_digest(b"other"))
    with pytest.raises(ImageError, match="does not match its DiffID"):
        store.import_docker_archive(tmp_path / "bad.tar", reference)
    assert store.images() == []


# -- prune -----------------------------------------------------------------------------------


def test_prune_keeps_what_names_reach(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    base = _put_synthetic_base(store, ["127.0.0.1:5000/ivd/base:2.4.2"])
    # an image on top of the base that loses its name, and a stray blob
    manifest, _, layer = synthetic_base_blobs()
    doc = json.loads(manifest)
    extra = store.blobs.put_bytes(b"a customer layer")
    doc["layers"].append(
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": extra, "size": 16}
    )
    orphan = store.blobs.put_bytes(canonical_json(doc))
    stray = store.blobs.put_bytes(b"left over")
    store.blobs.save_layer_record("k-extra", {"digest": extra, "size": 16})
    store.blobs.save_layer_record("k-layer", {"digest": sha256_digest(layer), "size": len(layer)})
    (store.root / "tmp" / "blob-killed").write_bytes(b"partial")

    dry = store.prune(dry_run=True)
    assert (dry.blobs_removed, dry.images, dry.dry_run) == (3, 1, True)
    assert store.blobs.has(orphan) and store.blobs.has(stray)

    report = store.prune()
    assert (report.blobs_removed, report.blobs_kept) == (3, 3)
    assert report.bytes_removed == 16 + len(b"left over") + len(canonical_json(doc))
    for gone in (orphan, stray, extra):
        assert not store.blobs.has(gone)
    assert store.complete(base.digest)
    assert store.blobs.layer_record("k-layer") is not None
    assert not (store.root / "layers" / "k-extra.json").exists()
    assert not (store.root / "tmp" / "blob-killed").exists()
    assert store.prune().blobs_removed == 0


def test_prune_waits_for_running_builds(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    unnamed = store.blobs.put_bytes(b"written by a build, not tagged yet")
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_store, args=(str(store.root), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ImageError, match="in use by a build"):
            store.prune(wait=0.3)
        assert store.blobs.has(unnamed)
    finally:
        release.set()
        holder.join(30)
    assert store.prune(wait=5).blobs_removed == 1


def test_images_and_prune_commands(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    _put_synthetic_base(store, ["127.0.0.1:5000/ivd/base:2.4.2"])
    store.blobs.put_bytes(b"stray")
    env = {"BUILDER_IMAGE_STORE": str(store.root)}
    listed = run_cli("images", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)["result"]
    assert [i["reference"] for i in doc["images"]] == ["127.0.0.1:5000/ivd/base:2.4.2"]
    pruned = run_cli("images", "prune", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("removed 1 blobs")


# -- builds with no server ---------------------------------------------------------------------


def _customer_env(tmp_path: Path, base_repository: str, registry_host: str) -> dict[str, str]:
    models = seed_models(
        tmp_path,
        [
            SeedModel(CARCINOMA_ID, CARCINOMA_TASK, "carcinoma", {"model.onnx": b"c" * 5000}),
            SeedModel(MITOSIS_ID, MITOSIS_TASK, "mitosis", {"model.onnx": b"m" * 7000}),
        ],
    )
    return {
        **models.env(),
        "BUILDER_BASE_REPOSITORY": base_repository,
        "BUILDER_IMAGE_REGISTRY": registry_host,
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",  # no engine: none is needed
    }


def _build(env: dict[str, str], cache: Path, *args: str) -> dict[str, Any]:
    result = run_cli("build", *args, "--json", env={**env, "BUILDER_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)["result"]
    return report


def test_builds_with_no_registry_match_the_online_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`base build` into the store (+ --push); online build; registry gone: the store builds,
    plain and --locked --offline, to the same digest, without contacting any registry."""
    registry = start_registry()
    try:
        repository = f"{registry.host}/ivd/inference-base"
        env = _customer_env(tmp_path, repository, registry.host)
        laptop = tmp_path / "laptop-cache"  # where `builder base build` ran
        ci = tmp_path / "ci-cache"  # a runner that only ever saw the registry
        store = ImageStore(laptop / "oci")
        _docker_save_archive(tmp_path / "saved.tar", f"{repository}:2.4.2")
        stored = store.import_docker_archive(tmp_path / "saved.tar", f"{repository}:2.4.2")
        pushed = push(store.stored_image(f"{repository}:2.4.2"), [f"{repository}:2.4.2"])
        assert pushed.manifest_digest == stored.digest  # --push sends the stored manifest

        repo = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
        locked = run_cli("lock", str(repo), env={**env, "BUILDER_CACHE_DIR": str(ci)})
        assert locked.returncode == 0, locked.stderr
        commit_files(
            repo, {"customer.lock.yaml": (repo / "customer.lock.yaml").read_bytes()}, "lock"
        )
        online = _build(env, ci, str(repo))
        assert online["base"]["digest"] == stored.digest
        kept = {i.reference for i in ImageStore(ci / "oci").images()}
        assert f"{repository}@{stored.digest}" in kept  # pulled base kept by digest
        assert online["image"] in kept  # and the customer image is stored too
    finally:
        registry.stop()

    plain = _build(env, laptop, str(repo))
    assert plain["manifest_digest"] == online["manifest_digest"]
    assert any("local store" in w for w in plain["warnings"])
    for cache in (ci, laptop):
        offline = _build(
            # no model registry; the production setting stays (lock entries must lie under it)
            # but offline, the weights come from the verified cache alone
            {**env, "BUILDER_MODEL_REGISTRY": "local:/nowhere"},
            cache,
            str(repo),
            "--locked",
            "--offline",
        )
        assert offline["manifest_digest"] == online["manifest_digest"]

    # --locked --offline never contacts a registry: any attempt fails this in-process build.
    from builder.pipeline import BuildRequest, build
    from builder.settings import load_settings

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a registry was contacted")

    monkeypatch.setattr(RegistryClient, "__init__", refuse)
    for key, value in {**env, "BUILDER_CACHE_DIR": str(ci)}.items():
        monkeypatch.setenv(key, value)
    report = build(BuildRequest(str(repo), locked=True, offline=True), load_settings(tmp_path))
    assert report.manifest_digest == online["manifest_digest"]


def test_missing_base_points_to_base_build(tmp_path: Path) -> None:
    env = _customer_env(tmp_path, "127.0.0.1:9/ivd/inference-base", "127.0.0.1:9")
    repo = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    result = run_cli("build", str(repo), env={**env, "BUILDER_CACHE_DIR": str(tmp_path / "c")})
    assert result.returncode == 6
    line = result.stderr.strip().splitlines()[-1]
    assert "cannot reach registry 127.0.0.1:9" in line and "local image store" in line
    assert "`builder base build`" in line
    offline = run_cli(
        "build", str(repo), "--offline", env={**env, "BUILDER_CACHE_DIR": str(tmp_path / "c")}
    )
    assert offline.returncode == 6
    assert "`builder base build`" in offline.stderr.strip().splitlines()[-1]


def test_a_build_without_output_flags_says_not_pushed(tmp_path: Path) -> None:
    repository = "127.0.0.1:9/ivd/inference-base"
    env = _customer_env(tmp_path, repository, "127.0.0.1:9")
    cache = tmp_path / "cache"
    _put_synthetic_base(ImageStore(cache / "oci"), [f"{repository}:2.4.2"])
    repo = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    result = run_cli("build", str(repo), env={**env, "BUILDER_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "built, not pushed:" in result.stdout
    assert (
        "--push" in result.stdout and "--load" in result.stdout and "--oci-layout" in result.stdout
    )
    names = {e.ref_name for e in read_layout_index(cache / "oci")}
    # the immutable tag and the moving base-version tag are both in the store
    assert "127.0.0.1:9/customer-x:2.4.2" in names
    image = next(n for n in sorted(n for n in names if n) if "/customer-x:2.4.2-" in n)
    assert any(
        (e.descriptor.annotations or {}).get(REF_NAME) == image
        for e in read_layout_index(cache / "oci")
    )
    assert (cache / "oci" / "oci-layout").is_file()


#: A base repository on a registry that never answers (port 9): the store serves the base.
_NO_REGISTRY_BASE = "127.0.0.1:9/ivd/inference-base"


def _built_once(tmp_path: Path) -> tuple[dict[str, str], Path, ImageStore, Path, dict[str, Any]]:
    """customer-x built once on the synthetic base 2.4.2 of a store with no registry: (env,
    cache, store, customer repo, build report)."""
    env = _customer_env(tmp_path, _NO_REGISTRY_BASE, "127.0.0.1:9")
    cache = tmp_path / "cache"
    store = ImageStore(cache / "oci")
    _put_synthetic_base(store, [f"{_NO_REGISTRY_BASE}:2.4.2"])
    repo = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    return env, cache, store, repo, _build(env, cache, str(repo))


def test_the_local_store_keeps_an_immutable_tag_unless_forced(tmp_path: Path) -> None:
    """The local image store refuses to move an immutable tag, as a registry does, naming
    which inputs differ; --force moves it and says what it overwrote. A work-tree build's
    -dirty tag moves with the edits it is built from."""
    env, cache, store, repo, first = _built_once(tmp_path)
    image = first["image"]
    # Same config commit, other weights under the same task: the immutable tag would move.
    write_production(tmp_path / "production", CARCINOMA_TASK, CARCINOMA_ID, {"model.onnx": b"x"})
    refused = run_cli("build", str(repo), env={**env, "BUILDER_CACHE_DIR": str(cache)})
    assert refused.returncode == 6, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert f"{image} is an immutable tag in the local image store {cache / 'oci'}" in line
    before = {m["name"]: m["dir_hash"] for m in first["models"]}["carcinoma_model"]
    assert f"model carcinoma_model sha256: {before[:12]} (tagged) vs " in line
    assert "--force" in line
    stored = store.lookup(image)
    assert stored is not None and stored.digest == first["manifest_digest"]  # untouched
    forced = _build(env, cache, str(repo), "--force")
    (warning,) = [w for w in forced["warnings"] if w.startswith("FORCED:")]
    assert warning.startswith(f"FORCED: immutable tag {image} in the local image store")
    assert f"it pointed to {first['manifest_digest']}, now {forced['manifest_digest']}" in warning
    stored = store.lookup(image)
    assert stored is not None and stored.digest == forced["manifest_digest"]
    for threshold in ("0.6", "0.7"):
        (repo / "analysis.yaml").write_text(
            (repo / "analysis.yaml")
            .read_text()
            .replace("threshold: 0.5", f"threshold: {threshold}")
        )
        dirty = _build(env, cache, str(repo), "--worktree")
        assert dirty["image"].endswith("-dirty")
        (repo / "analysis.yaml").write_text(
            (repo / "analysis.yaml")
            .read_text()
            .replace(f"threshold: {threshold}", "threshold: 0.5")
        )
    dirty_stored = store.lookup(dirty["image"])
    assert dirty_stored is not None and dirty_stored.digest == dirty["manifest_digest"]


def test_a_base_rebuilt_in_the_store_moves_the_tag_of_its_images(tmp_path: Path) -> None:
    """`base build` replaced the store's base of one version (a development base): the tag of
    the same config's image moves to the image on the new base, saying so; a difference beyond
    the base is still refused."""
    env, cache, store, repo, first = _built_once(tmp_path)
    base = f"{_NO_REGISTRY_BASE}:2.4.2"
    _put_synthetic_base(store, [base], {"com.ivd.base.build-inputs": "new"})
    second = _build(env, cache, str(repo))
    assert second["image"] == first["image"]
    assert second["manifest_digest"] != first["manifest_digest"]
    (moved,) = [w for w in second["warnings"] if "rebuilt in this store" in w]
    assert f"moved from {first['manifest_digest']} to {second['manifest_digest']}" in moved
    stored = store.lookup(first["image"])
    assert stored is not None and stored.digest == second["manifest_digest"]
    # The base rebuilt again and other weights under the same task: refused, as before.
    _put_synthetic_base(store, [base], {"com.ivd.base.build-inputs": "again"})
    write_production(tmp_path / "production", CARCINOMA_TASK, CARCINOMA_ID, {"model.onnx": b"x"})
    refused = run_cli("build", str(repo), env={**env, "BUILDER_CACHE_DIR": str(cache)})
    assert refused.returncode == 6, refused.stderr
    assert "is an immutable tag in the local image store" in refused.stderr
    stored = store.lookup(first["image"])
    assert stored is not None and stored.digest == second["manifest_digest"]


def test_verify_rebuilds_on_a_base_that_only_the_local_store_holds(tmp_path: Path) -> None:
    """No registry anywhere: an image built on the local store's base verifies as MATCH from
    another folder, no base repository configured (the attestation names it; the base, by
    digest, comes from this machine's store)."""
    repository = "127.0.0.1:9/ivd/inference-base"
    env = _customer_env(tmp_path, repository, "127.0.0.1:9")
    cache = tmp_path / "cache"
    _put_synthetic_base(ImageStore(cache / "oci"), [f"{repository}:2.4.2"])
    repo = customer_repo(tmp_path / "customer-x", carcinoma=CARCINOMA_ID, mitosis=MITOSIS_ID)
    layout = tmp_path / "layout"
    built = _build(env, cache, str(repo), "--oci-layout", str(layout))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    reference = f"oci:{layout}:{built['image'].rsplit(':', 1)[1]}"
    models = {k: v for k, v in env.items() if k != "BUILDER_BASE_REPOSITORY"}  # no lock here
    result = run_cli(
        "verify",
        reference,
        "--json",
        env={**models, "BUILDER_BASE_REPOSITORY": "", "BUILDER_CACHE_DIR": str(cache)},
        cwd=elsewhere,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    doc = json.loads(result.stdout)["result"]
    assert doc["match"] is True and doc["rebuilt_digest"] == built["manifest_digest"]
    assert doc["repository"] == repo.as_uri()


def test_an_engine_image_goes_through_the_store_to_a_registry_and_back(
    docker_engine: Any, oci_registry: Any, base_os_image: str, tmp_path: Path
) -> None:
    """What `builder base build --push` does after the engine built the image: docker save ->
    store (gzip layers, DiffIDs checked) -> push; the engine then pulls and runs that manifest."""
    import docker.errors

    from builder.image.store import save_from_docker

    client = docker_engine.client()
    reference = f"{oci_registry.host}/store-test/base:1.0.0"
    client.images.build(
        fileobj=io.BytesIO(f"FROM {base_os_image}\nLABEL com.ivd.store-test=yes\n".encode()),
        tag=reference,
        rm=True,
        network_mode="none",
    )
    store = ImageStore(tmp_path / "store")
    exported: list[int] = []
    steps: set[str] = set()

    def seen(event: ProgressEvent) -> None:
        exported.append(event.done)
        steps.add(event.what)

    stored = save_from_docker(client, reference, store, seen)
    image_id = client.images.get(reference).id
    assert exported and exported[-1] > 0  # the bytes exported, then compressed, were reported
    assert steps == {f"exporting {reference}", f"compressing {reference}"}
    # the same image again: nothing exported (a 3 GB GPU base took minutes), same manifest
    assert save_from_docker(client, reference, store, lambda e: exported.append(-1)) == stored
    other = f"{oci_registry.host}/store-test/other:1.0.0"  # the same image by another name
    client.images.get(reference).tag(other)
    assert save_from_docker(client, other, store, lambda e: exported.append(-1)) == stored
    assert -1 not in exported and store.lookup(other) is not None
    assert (
        store.find_base(f"{oci_registry.host}/store-test/base", "1.0.0").config_descriptor.digest
        == image_id
    )
    pushed = push(store.stored_image(reference), [reference])
    assert pushed.manifest_digest == stored.digest
    client.images.remove(reference, force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(reference)
    pulled = client.images.pull(reference.rsplit(":", 1)[0], tag="1.0.0")
    assert pulled.id == image_id
    assert pulled.attrs["RepoDigests"][0].endswith(stored.digest)
    out = client.containers.run(
        pulled.id, ["cat", "/etc/os-release"], entrypoint=[], network_mode="none", remove=True
    )
    assert b"bookworm" in out


def test_base_resolution_order(tmp_path: Path) -> None:
    """Pinned digest in the store: used with no registry call; --offline: the store only; a
    pin the store lacks offline, or a registry base other than the pin: one clear line."""
    from builder.documents.lock import LockedBase
    from builder.image.base_resolution import resolve_base_image

    store = ImageStore(tmp_path / "store")
    repository = "127.0.0.1:9/ivd/base"  # nothing listens there
    digest = _put_synthetic_base(store, [f"{repository}:2.4.2"]).digest
    pinned = LockedBase(repository, "2.4.2", digest=digest)
    assert resolve_base_image(repository, "~=2.4", store, pinned=pinned).digest == digest
    assert resolve_base_image(repository, "~=2.4", store, offline=True).version == "2.4.2"
    other = LockedBase(repository, "2.4.2", digest="sha256:" + "0" * 64)
    with pytest.raises(ImageError, match="pinned by the lock is not in the local image store"):
        resolve_base_image(repository, "~=2.4", store, pinned=other, offline=True)
    with pytest.raises(ImageError, match="builder base build") as info:
        resolve_base_image("127.0.0.1:9/ivd/none", "~=2.4", store, offline=True)
    assert "has no image of 127.0.0.1:9/ivd/none" in str(info.value)
    # an oci: layout base that differs from the pin is refused with the lock's hint
    layout = tmp_path / "layout"
    write_oci_layout(store.stored_image(f"{repository}:2.4.2"), layout, ["2.4.2"])
    with pytest.raises(ImageError, match="but the lock pins") as drift:
        resolve_base_image(
            f"oci:{layout}", "~=2.4", store, pinned=replace(other, repository=f"oci:{layout}")
        )
    assert "builder lock" in (drift.value.hint or "")


# -- the store is a trust boundary: no link followed, every blob checked ------------------------

BASE = "127.0.0.1:9/ivd/inference-base"  # nothing listens there: builds run --offline
MANUAL_ANALYSIS = """\
analyses:
- name: breast
  models:
    mitosis_model:
      sourcing: manual
      reference: weights/mitosis
  features:
  - cls: Mitosis
    models: {segmentation_model: mitosis_model}
"""
OUTSIDE = b"TOP-SECRET-HOST-CONTENT root:x:0:0\n"


@dataclass(frozen=True)
class StoreWorld:
    """A customer with one manual model and a store holding the synthetic base and its image."""

    repo: Path
    store: Path
    cache: Path

    def env(self) -> dict[str, str]:
        return {
            "BUILDER_CACHE_DIR": str(self.cache),
            "BUILDER_IMAGE_STORE": str(self.store),
            "BUILDER_BASE_REPOSITORY": BASE,
            "BUILDER_IMAGE_REGISTRY": "127.0.0.1:9",
            "BUILDER_MODEL_REGISTRY": "local:/nowhere",
        }

    def copy(self, where: Path) -> StoreWorld:
        """This world under ``where`` (the built store copied: each test plants its own links)."""
        shutil.copytree(self.store, where / "store", symlinks=True)
        return StoreWorld(self.repo, where / "store", where / "cache")

    def blob(self, layer: str) -> Path:
        """The blob file of the stored customer image's layer ``layer`` (or "base", "manifest",
        "config")."""
        store = ImageStore(self.store)
        image = next(i for i in store.images() if "/customer-x:2.4.2-" in i.reference)
        manifest = json.loads(store.blobs.read_bytes(image.digest))
        if layer == "manifest":
            return store.blobs.path(image.digest)
        if layer == "config":
            return store.blobs.path(manifest["config"]["digest"])
        for entry in manifest["layers"]:
            name = (entry.get("annotations") or {}).get("com.ivd.layer.name", "base")
            if name == layer:
                return store.blobs.path(entry["digest"])
        raise AssertionError(layer)


def run_in_process(
    *args: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> tuple[int, str, str]:
    """The real CLI in this process (fast: no interpreter start): exit code, stdout, stderr."""
    from builder.cli import main

    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        code = contextvars.copy_context().run(main, list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def store_world(tmp_path_factory: pytest.TempPathFactory) -> StoreWorld:
    root = tmp_path_factory.mktemp("store-world")
    repo = root / "customer-x"
    commit_files(
        repo,
        {
            "customer.yaml": "version: 1\ncustomer: customer-x\nbase_image:\n  version: '~=2.4'\n",
            "analysis.yaml": MANUAL_ANALYSIS,
            "weights/mitosis/model.onnx": b"m" * 70_000,
        },
        "config",
    )
    world = StoreWorld(repo, root / "store", root / "cache")
    _put_synthetic_base(ImageStore(world.store), [f"{BASE}:2.4.2"])
    built = run_cli("build", str(repo), "--offline", env=world.env())
    assert built.returncode == 0, built.stderr
    return world


#: Every path the store uses, planted as a link (a folder link for folders).
STORE_PATHS = [
    "tmp",
    "layers",
    "verified",
    "pushed",
    "blobs",
    "blobs/sha256",
    ".gc.lock",
    ".index.json.lock",
    "index.json",
    "oci-layout",
    "blob:mitosis_model",
    "blob:base",
    "blob:manifest",
    "blob:config",
    "layer record",
    "verified record",
    "tmp entry",
]
#: Every command that opens the store (the export one writes an OCI layout and an archive).
STORE_COMMANDS = {
    "build": ("build", "{repo}", "--offline"),
    "export": (
        "build",
        "{repo}",
        "--offline",
        "--oci-layout",
        "{out}/layout",
        "--docker-archive",
        "{out}/image.tar",
    ),
    "images": ("images",),
    "prune": ("images", "prune"),
    "verify": ("images", "verify"),
}


def _plant(world: StoreWorld, where: str, host: Path) -> Path:
    """Replace ``where`` in the store by a link pointing outside it; returns the link."""
    root = world.store
    if where.startswith("blob:"):
        path = world.blob(where.removeprefix("blob:"))
        outside = host / path.name  # the real blob moved out: its digest still matches
        shutil.move(path, outside)
    elif where in ("layer record", "verified record"):
        folder = root / ("layers" if where == "layer record" else "verified")
        path = sorted(folder.iterdir())[0]
        outside = host / "record"
        outside.write_bytes(path.read_bytes())
        path.unlink()
    elif where == "tmp entry":
        path, outside = root / "tmp" / "blob-stale", host / "victim"
        outside.write_bytes(OUTSIDE)
    elif (root / where).is_dir():
        path, outside = root / where, host / where.replace("/", "-")
        shutil.move(path, outside)
        (outside / "victim").write_bytes(OUTSIDE)
    else:
        path, outside = root / where, host / "victim"
        outside.write_bytes(OUTSIDE)
        path.unlink(missing_ok=True)
    path.symlink_to(outside, target_is_directory=outside.is_dir())
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file under ``folder``: inode, links, size and sha256 (what a write or a hard link
    made from outside would change)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path.relative_to(folder))] = (info.st_ino, info.st_nlink, info.st_size, digest)
    return out


@pytest.mark.parametrize("where", STORE_PATHS)
def test_no_link_in_the_store_is_followed(
    store_world: StoreWorld,
    tmp_path: Path,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """A link at any path of the store, under every store command: nothing outside is read,
    written or deleted; each command either replaces the link (and works) or refuses in one
    line naming it."""
    host = tmp_path / "host"
    host.mkdir()
    for command, template in STORE_COMMANDS.items():
        world = store_world.copy(tmp_path / command)
        out = tmp_path / command / "out"
        (host / command).mkdir()
        link = _plant(world, where, host / command)
        before = _snapshot(host)
        args = [a.format(repo=world.repo, out=out) for a in template]
        code, stdout, stderr = run_in_process(
            *args, env=world.env(), monkeypatch=monkeypatch, capsys=capsys
        )
        assert _snapshot(host) == before, (command, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if code in (0, 10):  # 10: `images verify` found (and removed) the bad entry
            assert command != "verify" or not link.is_symlink(), stdout
        else:
            assert code == 6 and len(errors) == 1, (command, code, stderr)
            assert "symbolic link" in errors[0] or "lacks some of its blobs" in errors[0]
        for path in out.rglob("*") if out.exists() else []:
            assert not path.is_symlink() and (path.is_dir() or OUTSIDE not in path.read_bytes())
        assert OUTSIDE.decode() not in stdout + stderr


def _flip_byte(path: Path) -> None:
    """Corrupt one byte in the middle of a blob file, in place (as a bad disk or editor would)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with path.open("r+b") as file:
        file.write(data)


def _build_json(
    world: StoreWorld, *args: str, monkeypatch: pytest.MonkeyPatch, capsys: Any, env: Any = None
) -> tuple[int, dict[str, Any], str]:
    code, stdout, stderr = run_in_process(
        "build", str(world.repo), "--json", *args,
        env={**world.env(), **(env or {})}, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    return code, json.loads(stdout), stderr


def test_attestations_go_to_the_cache_wherever_the_store_is(
    store_world: StoreWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    world = store_world.copy(tmp_path / "elsewhere")
    code, built, _ = _build_json(world, "--offline", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, built
    written = Path(built["result"]["outputs"]["attestations"])
    assert written.parent == world.cache / "attestations"
    assert (written / "provenance.intoto.json").is_file()
    assert not (world.store.parent / "attestations").exists()


def test_a_corrupt_blob_is_noticed_and_repaired(
    store_world: StoreWorld,
    oci_registry: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """One flipped byte in a model layer and in a base layer of the store: a rebuild with
    --push notices both (one line each), builds the model layer again and fetches the base
    layer again from the registry, to the same digest; exports check every blob in full."""
    repository = f"{oci_registry.host}/store-corrupt/inference-base"
    world = store_world.copy(tmp_path)
    store = ImageStore(world.store)
    _docker_save_archive(tmp_path / "saved.tar", f"{repository}:2.4.2")
    store.import_docker_archive(tmp_path / "saved.tar", f"{repository}:2.4.2")
    push(store.stored_image(f"{repository}:2.4.2"), [f"{repository}:2.4.2"])
    online = {"BUILDER_BASE_REPOSITORY": repository, "BUILDER_IMAGE_REGISTRY": oci_registry.host}
    # a release (--push) ships what a committed lock pins: this customer, locked, in a clone
    # (the same model files: the same layer blobs as the stored image's)
    git.Repo.clone_from(world.repo, tmp_path / "locked")
    commit_lock(tmp_path / "locked", {**world.env(), **online})
    world = replace(world, repo=tmp_path / "locked")
    code, first, _ = _build_json(world, monkeypatch=monkeypatch, capsys=capsys, env=online)
    assert code == 0, first
    digest = first["result"]["manifest_digest"]
    model, base = world.blob("mitosis_model"), world.blob("base")

    _flip_byte(model)
    _flip_byte(base)
    code, pushed, _ = _build_json(
        world, "--push", monkeypatch=monkeypatch, capsys=capsys, env=online
    )
    assert code == 0, pushed
    assert pushed["result"]["manifest_digest"] == digest
    removed = [w for w in pushed["result"]["warnings"] if "does not match its digest" in w]
    assert len(removed) == 2 and all("\n" not in w for w in removed), removed
    assert {model.name[:12], base.name[:12]} == {w.split("sha256:")[1][:12] for w in removed}
    assert hashlib.sha256(model.read_bytes()).hexdigest() == model.name  # rebuilt
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base.name  # fetched again

    # A flip that leaves size and times as they were (bit rot): only a full hash sees it.
    # Exports hash in full: the bad layer is removed, the next build writes it anew.
    _flip_byte(model)
    record = world.store / "verified" / model.name
    info = model.stat()
    record.write_text(json.dumps([info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]))
    out = tmp_path / "out"
    export = (
        "--offline",
        "--oci-layout",
        str(out / "layout"),
        "--docker-archive",
        str(out / "a.tar"),
    )
    code, failed, _ = _build_json(
        world, *export, monkeypatch=monkeypatch, capsys=capsys, env=online
    )
    assert code == 6 and "removed as corrupt" in failed["error"]["message"], failed
    assert not (out / "a.tar").exists() and not model.exists()
    code, exported, _ = _build_json(
        world, *export, monkeypatch=monkeypatch, capsys=capsys, env=online
    )
    assert code == 0 and exported["result"]["manifest_digest"] == digest, exported
    for blob in (out / "layout" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    with tarfile.open(out / "a.tar") as tar:
        for member in tar.getmembers():
            if member.name.startswith("blobs/sha256/") and member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1]


def test_images_verify_hashes_every_blob(
    store_world: StoreWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`builder images verify` (fsck): sound store, exit 0; a corrupt blob whose record still
    matches is found, removed, and the images lacking it named; exit 10."""
    world = store_world.copy(tmp_path)
    code, stdout, _ = run_in_process(
        "images", "verify", env=world.env(), monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 0 and "all sound" in stdout, stdout
    model = world.blob("mitosis_model")
    info = model.stat()
    _flip_byte(model)
    os.utime(model, ns=(info.st_atime_ns, info.st_mtime_ns))
    record = world.store / "verified" / model.name
    after = model.stat()
    record.write_text(
        json.dumps([after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns])
    )
    code, stdout, _ = run_in_process(
        "images", "verify", env=world.env(), monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 10, stdout
    assert f"removed   blob sha256:{model.name[:12]}" in stdout
    assert "incomplete 127.0.0.1:9/customer-x:2.4.2" in stdout
    assert not model.exists()


# -- secrets never print: a customer URL with a password, built -----------------------------------


@pytest.fixture(scope="module")
def served_repo(store_world: StoreWorld) -> Iterator[str]:
    """``host:port/customer-x.git``: the store world's customer repo served over plain HTTP
    (git's dumb protocol) by a real HTTP server."""
    served = store_world.repo.parent / "www"
    served.mkdir()
    bare = git.Repo.clone_from(store_world.repo, served / "customer-x.git", bare=True)
    bare.git.update_server_info()
    with served_over_http(served) as host:
        yield f"{host}/customer-x.git"


PASSWORDS = ["Sup3rSecretPass", "pa/ss-w0rd", "pa ss-w0rd", "p@ss-w0rd", "pa:ss-w0rd"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_in_the_customer_url_never_prints(
    store_world: StoreWorld,
    served_repo: str,
    tmp_path: Path,
    password: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """`build http://alice:PASSWORD@host/cust.git`: neither the human result (its push:/load:/
    export: hints) nor the JSON one nor an error shows the password, whatever it holds; the
    cache's mirror never stores it."""
    world = store_world.copy(tmp_path)
    url = f"http://alice:{password}@{served_repo}"
    outputs = []
    for extra in ((), ("--json",)):
        code, stdout, stderr = run_in_process(
            "build",
            url,
            "--offline",
            *extra,
            env=world.env(),
            monkeypatch=monkeypatch,
            capsys=capsys,
        )
        assert code != 70, stderr
        outputs.append(stdout + stderr)
        if password == PASSWORDS[0]:  # a URL git accepts: built, with its hints
            assert code == 0, stderr
            assert "push:   build http://127.0.0.1:" in stdout or '"ok": true' in stdout
    for text in outputs:
        for part in {password, *(p for p in re.split(r"[/@: ]", password) if len(p) >= 4)}:
            assert part not in text, (password, text)
    for config in (world.cache / "repos").glob("*/config"):
        assert password.split("-", maxsplit=1)[0] not in config.read_text(), config.read_text()


REGISTRIES_WITH_CREDENTIALS = {
    "--registry": (("--registry", "alice:Regis7ryPass@127.0.0.1:9"), {}),
    "BUILDER_IMAGE_REGISTRY": (
        (),
        {"BUILDER_IMAGE_REGISTRY": "https://bob:Regis7ry Pass@127.0.0.1:9"},
    ),
    "--base-repository": (("--base-repository", "alice:Regis7ryPass@127.0.0.1:9/ivd/base"), {}),
    "BUILDER_BASE_REPOSITORY": ((), {"BUILDER_BASE_REPOSITORY": "a:Regis7ry/Pass@127.0.0.1:9/b"}),
}


@pytest.mark.parametrize("case", sorted(REGISTRIES_WITH_CREDENTIALS))
def test_a_registry_with_credentials_is_refused_before_anything_is_named(
    store_world: StoreWorld, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    world = store_world.copy(tmp_path)
    index = (world.store / "index.json").read_bytes()
    args, env = REGISTRIES_WITH_CREDENTIALS[case]
    code, stdout, stderr = run_in_process(
        "build", str(world.repo), "--offline", *args,
        env={**world.env(), **env}, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and f"{case}" in stderr and "holds credentials" in stderr
    assert "Regis7ry" not in stdout + stderr and "Pass" not in stdout + stderr
    assert (world.store / "index.json").read_bytes() == index


def test_a_stored_name_with_credentials_is_listed_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A store written before such names were refused: `builder images` never shows them."""
    store = ImageStore(tmp_path / "store")
    _put_synthetic_base(store, ["alice:Regis7ryPass@127.0.0.1:9/customer-x:1.0"])
    env = {"BUILDER_IMAGE_STORE": str(store.root)}
    for extra in ((), ("--json",)):
        code, stdout, stderr = run_in_process(
            "images", *extra, env=env, monkeypatch=monkeypatch, capsys=capsys
        )
        assert code == 0, stderr
        assert "127.0.0.1:9/customer-x:1.0" in stdout and "Regis7ry" not in stdout + stderr


def test_a_base_repository_with_credentials_in_customer_yaml_is_refused(
    store_world: StoreWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    world = store_world.copy(tmp_path)
    repo = tmp_path / "repo"
    shutil.copytree(world.repo, repo)
    (repo / "customer.yaml").write_text(
        "version: 1\ncustomer: customer-x\nbase_image:\n  version: '~=2.4'\n"
        "  repository: alice:Regis7ryPass@127.0.0.1:9/ivd/inference-base\n"
    )
    code, stdout, stderr = run_in_process(
        "build", str(repo), "--worktree", "--offline",
        env=world.env(), monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "customer.yaml: base_image.repository holds credentials" in stderr
    assert "Regis7ry" not in stdout + stderr


def test_verify_rebuilds_an_image_of_the_store_with_no_registry(
    store_world: StoreWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """An image built into the store only (no registry anywhere), named by its registry
    reference: `builder verify` reads it from the store (a note says so), rebuilds it on the
    base the store holds, and finds the same digest."""
    world = store_world.copy(tmp_path)
    stored = next(
        i for i in ImageStore(world.store).images() if "/customer-x:2.4.2-" in i.reference
    )
    code, stdout, stderr = run_in_process(
        "verify",
        stored.reference,
        "--json",
        env=world.env(),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0, stdout + stderr
    result = json.loads(stdout)["result"]
    assert result["match"] and result["rebuilt_digest"] == stored.digest
    notes = " ".join(result["notes"])
    assert f"read {stored.reference} from the local image store" in notes


@pytest.mark.parametrize("where", ["blobs", "blobs/sha256", "index.json", "a blob"])
def test_an_oci_layout_target_is_not_written_through_a_link(
    store_world: StoreWorld, tmp_path: Path, where: str
) -> None:
    """`--oci-layout DIR` writes into DIR's own folders: a link there is refused in one line
    (a linked blob is replaced), and nothing outside is written."""
    store = ImageStore(store_world.store)
    image = store.stored_image(f"{BASE}:2.4.2")
    host, target = tmp_path / "host", tmp_path / "layout"
    host.mkdir()
    (host / "victim").write_bytes(OUTSIDE)
    (target / "blobs" / "sha256").mkdir(parents=True)
    if where == "a blob":
        link = layout_blob_path(target, image.config_digest)
        link.symlink_to(host / "victim")
    else:
        link = target / where
        shutil.rmtree(link, ignore_errors=True)
        link.symlink_to(host if where != "index.json" else host / "victim")
    before = _snapshot(host)
    if where == "a blob":
        write_oci_layout(image, target, ["2.4.2"])
        assert not link.is_symlink() and sha256_digest(link.read_bytes()) == image.config_digest
    else:
        with pytest.raises(ImageError, match="is a symbolic link") as info:
            write_oci_layout(image, target, ["2.4.2"])
        assert "\n" not in str(info.value) and str(link) in str(info.value)
    assert _snapshot(host) == before


BAD_INDEXES = {
    "not JSON": b"{",
    "a list": b"[1]",
    "manifests not a list": b'{"manifests": 3}',
    "an empty descriptor": b'{"manifests": [{}]}',
    "annotations a list": json.dumps(
        {
            "manifests": [
                {"digest": "sha256:" + "0" * 64, "mediaType": "x", "size": 1, "annotations": [1]}
            ]
        }
    ).encode(),
    "a bad digest": b'{"manifests": [{"digest": "sha256:00", "mediaType": "x", "size": 1}]}',
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_a_broken_store_index_is_one_line(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    store = ImageStore(tmp_path / "store")
    (store.root / "index.json").write_bytes(BAD_INDEXES[case])
    for command in (("images",), ("images", "prune"), ("images", "verify")):
        code, _, stderr = run_in_process(
            *command,
            env={"BUILDER_IMAGE_STORE": str(store.root)},
            monkeypatch=monkeypatch,
            capsys=capsys,
        )
        assert code == 6 and stderr.count("\n") == 1 and "index.json" in stderr, stderr
        assert (store.root / "index.json").read_bytes() == BAD_INDEXES[case]


def test_prune_keeps_the_attestations_of_the_images_it_keeps(
    store_world: StoreWorld, tmp_path: Path
) -> None:
    """Every build attaches its provenance and SBOM to the store (as referrers, so `verify`
    works from the store alone); prune keeps them while the image is named, and removes
    them, index entries included, with it."""
    from builder.oci import layout_referrers

    world = store_world.copy(tmp_path)
    store = ImageStore(world.store)
    image = next(i for i in store.images() if "/customer-x:2.4.2-" in i.reference)
    attached = layout_referrers(store.root, image.digest)
    assert len(attached) >= 2
    store.prune()
    assert layout_referrers(store.root, image.digest) == attached
    for item in attached:
        assert store.blobs.has(item.digest)

    def unname(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [i for i in items if i.get("digest") != image.digest]

    update_layout_index(store.root, unname)
    store.prune()
    assert layout_referrers(store.root, image.digest) == []
    assert not any(store.blobs.has(item.digest) for item in attached)
    assert all(e.ref_name for e in read_layout_index(store.root))
