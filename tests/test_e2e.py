"""The whole product, end to end: base image built, customer-x built on it by the builder from
customers/ and the bundled demo, run by the Docker engine on a slide mounted read-only, with
the same results as the runner on the host."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from helpers import ROOT, run_cli


def _extract(client: Any, image: str, path: str, into: Path) -> None:
    """Copy a folder out of an image (docker create + get_archive), as `docker cp` does."""
    container = client.containers.create(image, ["true"], network_mode="none")
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(into, filter="data")
    finally:
        container.remove()


def _comparable(summary: dict[str, Any]) -> dict[str, Any]:
    deterministic: dict[str, Any] = summary["deterministic"]
    deterministic["slide"].pop("file")  # /slides/... in the container, a host path here
    return deterministic


def test_customer_image_analyses_a_slide_like_the_host(
    inference_base: str, oci_registry: Any, docker_engine: Any, tmp_path: Path
) -> None:
    env = {
        **docker_engine.env(),
        "BUILDER_BASE_REPOSITORY": inference_base,
        "BUILDER_IMAGE_REGISTRY": f"{oci_registry.host}/e2e",
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }
    built = run_cli("build", "customer-x", "--push", "--json", env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    image = json.loads(built.stdout)["result"]["image"]

    slides = tmp_path / "slides"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tilerunner",
            "demo",
            "slide",
            str(slides / "s.tiff"),
            "--size",
            "4096",
            "--seed",
            "11",
        ],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    client = docker_engine.client()
    client.images.pull(image)
    logs = client.containers.run(
        image,
        ["run", "/slides/s.tiff", "--out", "/out/s", "--no-progress"],
        volumes={
            str(slides): {"bind": "/slides", "mode": "ro"},
            str(out): {"bind": "/out", "mode": "rw"},
        },
        network_mode="none",
        remove=True,
        stderr=True,
    )
    assert b"tilerunner: done:" in logs, logs
    in_image = json.loads((out / "s" / "breast" / "summary.json").read_text())

    # The same config and models, taken out of the image, run by the runner installed on the host.
    _extract(client, image, "/app", tmp_path / "host")
    host = subprocess.run(
        [
            sys.executable,
            "-m",
            "tilerunner",
            "run",
            str(slides / "s.tiff"),
            "--app-dir",
            str(tmp_path / "host" / "app"),
            "--out",
            str(tmp_path / "host-out"),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert host.returncode == 0, host.stderr
    on_host = json.loads((tmp_path / "host-out" / "breast" / "summary.json").read_text())
    assert _comparable(in_image) == _comparable(on_host)
    features = in_image["deterministic"]["features"]
    assert features["Carcinoma"]["regions"] >= 1 and features["Mitosis"]["count"] >= 1
    # The provenance of every model in the results is what the builder recorded in the image.
    provenance = json.loads((tmp_path / "host" / "app" / "config" / "provenance.json").read_text())
    recorded = {m["name"]: m["files"][0]["sha256"] for m in provenance["models"]}
    assert {
        name: m["sha256"] for name, m in in_image["deterministic"]["models"].items()
    } == recorded
