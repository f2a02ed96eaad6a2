"""`builder smoke IMAGE`: the built image runs, in the test bed's Docker engine, on a sample
slide it generates itself, and its summaries are checked; an image that cannot load a model
fails in one line; no engine is one line."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli


@pytest.fixture(scope="module")
def built(
    inference_base: str, oci_registry: Any, docker_engine: Any, tmp_path_factory: Any
) -> Iterator[tuple[dict[str, str], Path]]:
    """customer-x built on the real base into a local image store (not pushed, not loaded):
    the CLI environment and the build's JSON report. What the tests put into the shared
    engine is removed afterwards."""
    work = tmp_path_factory.mktemp("smoke")
    env = {
        **docker_engine.env(),
        "BUILDER_BASE_REPOSITORY": inference_base,
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/smoke",
        "BUILDER_CACHE_DIR": str(work / "cache"),
    }
    result = run_cli("build", "customer-x", "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = work / "build.json"
    report.write_text(result.stdout)
    yield env, report
    _remove(docker_engine, BROKEN, *json.loads(result.stdout)["result"]["tags"])


#: The damaged copy of the image the failing case builds in the engine (one per test run:
#: concurrent runs share the engine).
BROKEN = f"ivd-smoke-test/broken:{os.getpid()}"


def _remove(docker_engine: Any, *tags: str) -> None:
    """Untag images in the engine (shared by concurrent test runs: only our own tags)."""
    import docker.errors

    client = docker_engine.client()
    for tag in tags:
        try:
            client.images.remove(tag)
        except docker.errors.DockerException:
            continue  # never put there by this run


@pytest.fixture(scope="module")
def passed(built: tuple[dict[str, str], Path]) -> dict[str, Any]:
    """`builder smoke --report BUILD.json --json` once: the image goes from the local image
    store into the engine, and runs there; the JSON result."""
    env, report_file = built
    ran = run_cli("smoke", "--report", str(report_file), "--json", env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result: dict[str, Any] = json.loads(ran.stdout)["result"]
    return result


def test_smoke_runs_the_image_from_the_store_on_a_slide_it_generates(
    built: tuple[dict[str, str], Path], passed: dict[str, Any]
) -> None:
    report = json.loads(built[1].read_text())["result"]
    assert passed["image"].endswith(f"/customer-x@{report['manifest_digest']}")
    assert passed["source"] == "store" and passed["image_id"] == report["config_digest"]
    assert passed["exit_code"] == 0
    assert passed["analyses"] == {"breast": ["Carcinoma", "Mitosis"]}
    assert passed["slide"]["size"] > 0


def test_an_image_whose_model_file_is_corrupt_fails_in_one_line(
    built: tuple[dict[str, str], Path], passed: dict[str, Any], docker_engine: Any
) -> None:
    env, _ = built
    # The same image (in the engine since the passing run) with one model file replaced after
    # the build, as a damaged or tampered layer would: only the runner in the image sees it.
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (
            (
                "Dockerfile",
                f"FROM {passed['image_id']}\nCOPY bad.onnx /app/models/mitosis_model/model.onnx\n",
            ),
            ("bad.onnx", "not an onnx model\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data.encode())
            tar.addfile(info, io.BytesIO(data.encode()))
    context.seek(0)
    docker_engine.client().images.build(
        fileobj=context, custom_context=True, tag=BROKEN, network_mode="none", rm=True
    )
    ran = run_cli("smoke", BROKEN, env=env)
    assert ran.returncode == 6, ran.stdout + ran.stderr
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith(f"error: {BROKEN}: the runner exited "), line
    assert "mitosis_model" in line and "sha256" in line, line


def test_no_engine_is_one_line(tmp_path: Path) -> None:
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock", "BUILDER_CACHE_DIR": str(tmp_path)}
    ran = run_cli("smoke", "127.0.0.1:1/customer-x:2.4.2-abc", env=env)
    assert ran.returncode == 6, ran.stdout + ran.stderr
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("error: no Docker engine at ") and "builder validate" in line, line
    as_json = run_cli("smoke", "127.0.0.1:1/customer-x:2.4.2-abc", "--json", env=env)
    assert json.loads(as_json.stdout)["error"]["exit_code"] == 6
