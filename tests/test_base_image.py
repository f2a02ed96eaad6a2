"""The inference base image: built offline in the real engine, labelled, pushed, and working.

The build uses the test bed's bookworm stand-in for python:3.11-slim-bookworm and a
wheelhouse cached machine-wide (filled once by `pip download`). The built image then runs
the tile runner as a non-root user with no network on a synthetic slide and must give the
same results as the runner on the host.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from builder.errors import ImageError
from builder.image.base_build import (
    BASE_DIR,
    BaseImageBuild,
    build_base_image,
    ensure_wheelhouse,
    parse_requirements,
    read_version,
)
from testbed._util import cache_root

RUNNER_TESTS = Path(__file__).resolve().parents[1] / "base-image" / "runner" / "tests"
if str(RUNNER_TESTS) not in sys.path:
    sys.path.insert(0, str(RUNNER_TESTS))

from tilerunner_testlib import App, cached, code_key, slide, verbose_config  # noqa: E402

WHEELHOUSE = cache_root() / "wheelhouse" / "cpu"


# --------------------------------------------------------------------------- no engine needed


def test_version_lives_in_one_file() -> None:
    version = read_version()
    assert version == (BASE_DIR / "VERSION").read_text().strip()
    runner_version = BASE_DIR / "runner" / "VERSION"
    assert runner_version.is_symlink() and runner_version.resolve() == BASE_DIR / "VERSION"


def test_requirements_are_hash_pinned_and_complete() -> None:
    for variant in ("cpu", "gpu"):
        reqs = {r.name: r for r in parse_requirements(BASE_DIR / f"requirements-{variant}.txt")}
        ort = "onnxruntime" if variant == "cpu" else "onnxruntime-gpu"
        assert ort in reqs and "tilerunner" not in reqs
        source = (BASE_DIR / f"requirements-{variant}.in").read_text().splitlines()
        for raw in source:
            line = raw.split(" #", 1)[0].strip()  # pip's inline comments
            if line and not line.startswith("#"):
                name, version = line.split("==")
                assert reqs[name.lower()].version == version, raw
        assert all(len(r.hashes) >= 1 for r in reqs.values())


def test_incomplete_wheelhouse_without_download_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"lacks attrs==.* and \d+ more.*make-wheelhouse"):
        ensure_wheelhouse(tmp_path, [BASE_DIR / "requirements-cpu.txt"], download=False)


DEBOOTSTRAP_LOG = """\
I: Retrieving InRelease
I: Checking Release signature
I: Retrieving Packages
I: Resolving dependencies of required packages...
I: Retrieving adduser 3.134
I: Validating adduser 3.134
I: Retrieving apt 2.6.1
I: Validating apt 2.6.1
I: Retrieving bash 5.2.15-2+b13
I: Validating bash 5.2.15-2+b13
I: Extracting adduser...
I: Extracting apt...
I: Installing core packages...
W: a warning line is kept in the log only
I: Unpacking required packages...
I: Unpacking adduser...
I: Configuring required packages...
I: Configuring adduser...
I: Base system installed successfully.
"""


def test_debootstrap_progress_names_each_step_and_counts_packages_per_phase() -> None:
    """The minutes of debootstrap are never silent: each step, and how many packages each
    pass over them handled, as one line; the whole output still goes to the log."""
    import io

    from builder.image.base_os import debootstrap_progress

    stages: list[str] = []
    log = io.StringIO()
    debootstrap_progress(
        DEBOOTSTRAP_LOG.splitlines(keepends=True), lambda e: stages.append(str(e.stage)), log
    )
    assert log.getvalue() == DEBOOTSTRAP_LOG
    assert [re.sub(r", \d+ s$", "", s) for s in stages] == [
        "debootstrap: Retrieving InRelease",
        "debootstrap: Checking Release signature",
        "debootstrap: Retrieving Packages",
        "debootstrap: Resolving dependencies of required packages",
        "debootstrap: retrieving 3 packages",
        "debootstrap: extracting 2 packages",
        "debootstrap: Installing core packages",
        "debootstrap: Unpacking required packages",
        "debootstrap: unpacking 1 packages",
        "debootstrap: Configuring required packages",
        "debootstrap: configuring 1 packages",
        "debootstrap: Base system installed successfully",
    ]


def test_each_wheel_pip_fetches_is_reported(tmp_path: Path) -> None:
    """`pip download` of the wheelhouse (1.6 GB for gpu) says which wheel it is on."""
    from builder.contracts import ProgressEvent
    from builder.image.base_build import _pip_download

    wheel = next(WHEELHOUSE.glob("attrs-*.whl"))
    version = wheel.name.split("-")[1]
    events: list[ProgressEvent] = []
    _pip_download(
        ["download", "--no-deps", "--no-index", "--find-links", str(WHEELHOUSE),
         f"attrs=={version}", "-d", str(tmp_path)],
        "test download",
        1,
        events.append,
    )  # fmt: skip
    assert [e.stage for e in events] == [f"wheelhouse [1/1] {wheel.name}"]
    assert (tmp_path / wheel.name).is_file()
    with pytest.raises(ImageError, match=r"test download failed: .*no-such-dist"):
        _pip_download(
            ["download", "--no-index", "no-such-dist==1", "-d", str(tmp_path)],
            "test download",
            1,
            None,
        )


def test_logs_get_a_line_per_step_and_long_transfers_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In CI logs (no terminal) a long transfer shows how far it is every 15 s; a short one
    and counted steps add no lines of their own."""
    from builder.cli import _common
    from builder.contracts import ProgressEvent

    clock = [100.0]
    monkeypatch.setattr("builder.cli._common.time.monotonic", lambda: clock[0])
    lines = _common.StageLines()
    for seconds, event in [
        (0, ProgressEvent(stage="building x")),
        (1, ProgressEvent("build", 1, 31)),
        (2, ProgressEvent("push small", 5, 10)),
        (3, ProgressEvent("push small", 10, 10)),
        (4, ProgressEvent("exporting x", 1_000_000_000, 3_000_000_000)),
        (10, ProgressEvent("exporting x", 1_500_000_000, 3_000_000_000)),
        (20, ProgressEvent("exporting x", 2_000_000_000, 3_000_000_000)),
        (25, ProgressEvent("exporting x", 3_000_000_000, 3_000_000_000)),
    ]:
        clock[0] = 100.0 + seconds
        lines(event)
    assert capsys.readouterr().err.splitlines() == [
        "[   0.0 s] building x",
        "[  20.0 s] exporting x: 2.00 GB of 3.00 GB (67%)",
        "[  25.0 s] exporting x: 3.00 GB of 3.00 GB (100%)",
    ]


def test_bad_arguments_fail_before_any_work() -> None:
    with pytest.raises(ImageError, match="variant"):
        build_base_image(
            docker_client=None,
            repository="x/y",
            base_from="b",
            wheelhouse=None,
            push=False,
            variant="tpu",
        )
    with pytest.raises(ImageError, match="without tag"):
        build_base_image(
            docker_client=None, repository="x/y:1", base_from="b", wheelhouse=None, push=False
        )


# --------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def built(
    docker_engine: Any, oci_registry: Any, base_os_image: str, tmp_path_factory: Any
) -> BaseImageBuild:
    from builder.image.store import ImageStore

    steps: list[tuple[str, int, int]] = []
    result = build_base_image(
        store=ImageStore(tmp_path_factory.mktemp("store")),
        docker_client=docker_engine.client(),
        repository=f"{oci_registry.host}/ivd/inference-base",
        base_from=base_os_image,
        wheelhouse=WHEELHOUSE,
        push=True,
        progress=lambda e: steps.append((e.what, e.done, e.total)),
    )
    assert any(what == "wheelhouse" and done == total for what, done, total in steps)
    assert any(what == "build" for what, _, _ in steps)
    return result


@pytest.mark.docker
def test_an_image_built_from_the_base_is_never_reused_as_the_base(
    docker_engine: Any, base_os_image: str, tmp_path: Path
) -> None:
    """A customer image in the engine (loaded, smoke-tested) inherits every label of its base,
    the build-inputs key too: the base build must not take it for the base it built before."""
    import io
    import os

    from builder.image.base_build import LABEL_INPUTS, LABEL_VERSION, _built_before

    key = f"test-{os.getpid()}-{tmp_path.name}"
    client = docker_engine.client()
    tag = f"ivd-test/customer-like:{os.getpid()}"
    dockerfile = f'FROM {base_os_image}\nLABEL {LABEL_INPUTS}="{key}" {LABEL_VERSION}="2.4.1-abc"\n'
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, network_mode="none")
    try:
        base = f"ivd-test/base-like:{os.getpid()}"
        assert _built_before(client, base, key, {LABEL_VERSION: "2.4.1"}) is None
        found = _built_before(client, base, key, {LABEL_VERSION: "2.4.1-abc"})
        assert found == client.images.get(tag).id  # the label check, not the key, decides
        client.images.remove(base)
    finally:
        client.images.remove(tag)


@pytest.mark.docker
@pytest.mark.slow
def test_tag_labels_and_push(built: BaseImageBuild, oci_registry: Any) -> None:
    version = read_version()
    assert built.reference == f"{oci_registry.host}/ivd/inference-base:{version}"
    assert built.labels["org.opencontainers.image.version"] == version
    assert built.labels["com.ivd.runner.config-schemas"] == "1"
    assert built.labels["com.ivd.runner.onnxruntime"] == "1.31.1"
    assert built.labels["com.ivd.runner.cuda"] == "none"
    assert built.labels["com.ivd.runner.cudnn"] == "none"
    assert built.labels["com.ivd.runner.variant"] == "cpu"
    assert built.digest and built.digest.startswith("sha256:")
    assert built.image_id.startswith("sha256:")
    # written into the local image store, and exactly that manifest pushed
    from builder.image.store import ImageStore

    assert built.store is not None and built.digest == built.store_digest
    stored = ImageStore(built.store).lookup(built.reference)
    assert stored is not None and stored.digest == built.digest
    assert ImageStore(built.store).complete(built.digest)


@pytest.mark.docker
@pytest.mark.slow
def test_image_config_non_root_entrypoint(built: BaseImageBuild, docker_engine: Any) -> None:
    client = docker_engine.client()
    config = client.images.get(built.reference).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/tilerunner/bin/tilerunner"]
    assert "TILERUNNER_APP_DIR=/app" in config["Env"]
    assert "ORT_DISABLE_TELEMETRY=1" in config["Env"]  # and so nothing extra on stderr:
    out = client.containers.run(
        built.reference, ["info"], network_mode="none", remove=True, stderr=True
    )
    info = json.loads(out)
    assert info["cuda"]["installed"] is False and info["device_auto"] == "cpu"
    assert info["tilerunner"] == built.version
    assert info["config_schemas"] == [1]
    assert info["onnxruntime"] == "1.31.1"
    assert "CPUExecutionProvider" in info["providers"]
    whoami = client.containers.run(
        built.reference,
        ["-c", "import os; print(os.getuid())"],
        entrypoint=["/opt/tilerunner/bin/python"],
        network_mode="none",
        remove=True,
    )
    assert whoami.strip() == b"10001"


def _models(tmp: Path) -> None:
    from tilerunner import demo_models

    demo_models.write_demo_models(tmp)


@pytest.mark.docker
@pytest.mark.slow
def test_image_analyses_a_slide_like_the_host(
    built: BaseImageBuild, docker_engine: Any, tmp_path: Path
) -> None:
    """Offline, non-root, /app layout: same outputs as the runner in the host venv."""
    from tilerunner import demo_models, synthetic
    from tilerunner.config import load_config
    from tilerunner.pipeline import RunOptions, run

    models = cached(f"models-{code_key(demo_models, synthetic)}", _models)
    slide_path = slide("image-test", width=4096, seed=11)
    work = tmp_path / "work"
    app = App(work / "app", models)
    app.write(verbose_config(models))
    shutil.copy(slide_path, work / "slide.tiff")
    (work / "out").mkdir()
    for path in [work, *work.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    client = docker_engine.client()
    logs = client.containers.run(
        built.reference,
        [
            "run",
            "/work/slide.tiff",
            "--out",
            "/work/out",
            "--app-dir",
            "/work/app",
            "--config",
            "/work/app/config/analysis.yaml",
            "--device",
            "auto",
            "--workers",
            "1",
        ],
        volumes={str(work): {"bind": "/work", "mode": "rw"}},
        network_mode="none",
        remove=True,
        stdout=True,
        stderr=True,
    )
    assert b"tilerunner: done:" in logs, logs
    in_image = json.loads((work / "out" / "breast" / "summary.json").read_text())
    report = run(
        load_config(app.config, app.root),
        slide_path,
        tmp_path / "host",
        RunOptions(device="cpu", workers=1),
    )
    on_host = report.summaries["breast"]
    for summary in (in_image, on_host):
        summary["deterministic"]["config"].pop("sha256")
        summary["deterministic"]["slide"].pop("file")
    assert in_image["deterministic"]["device"] == "cpu"
    assert in_image["deterministic"]["features"] == on_host["deterministic"]["features"]
    assert in_image["deterministic"]["outputs"] == on_host["deterministic"]["outputs"]
    assert (work / "out" / "breast" / "summary.json").stat().st_uid == 10001
