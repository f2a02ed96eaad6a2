"""`builder smoke IMAGE`: prove a built image starts, loads its config and every model, and
analyses a slide in its own runtime.

The image makes its own sample slide (``tilerunner demo slide``, the synthetic slides of the
runner package) in a first container; a second container runs the image as shipped (its
entrypoint, ``run SLIDE --out DIR``) on it, with no network. Files go in and out through the
engine's archive API (``put_archive``/``get_archive``), never bind mounts, so a remote engine
(Docker-in-Docker in CI) works the same. The run passes when the runner exits 0 and every
analysis of the image's config wrote its summary.json, made from that very config (its
sha256), with every feature of the analysis.

The image is taken from the local image store when it holds the reference (what `build`
wrote: loaded into the engine unless the engine already has that image id), else from the
engine, else pulled from its registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final

from builder import deliver, yamldoc
from builder.errors import ImageError
from builder.image.engine import docker_client
from builder.image.store import ImageStore, split_name
from builder.pipeline import CONFIG_DIR

#: Where the sample slide is made (by the image's user) and copied to for the run (owned by
#: root there, as the engine's archive copy makes it, readable by all), and where the runner
#: writes its results (a new folder in the world-writable /tmp).
WORK: Final = "/tmp/ivd-smoke"
SLIDE: Final = f"{WORK}/slide.tiff"
OUT: Final = "/tmp/ivd-smoke-out"
#: The sample slide: small enough for seconds on a CPU, large enough to hold tissue,
#: carcinoma regions and mitoses at the demo models' resolution.
SLIDE_SIZE: Final = 2048
SLIDE_SEED: Final = 7
#: Bytes of a container's log kept for the one-line message of a failure.
_LOG_TAIL = 4000
#: What the engine is for here, and what checks without one (the no-engine line says it).
_NEEDED_FOR = (
    "`builder smoke` runs the image in it; without one, `builder validate` and `builder lock` "
    "check the model files and the runner contract"
)


@dataclass
class SmokeReport:
    """What the smoke run of one image found (the `--json` result)."""

    image: str
    image_id: str  # the engine's id of the image run (its config digest)
    source: str  # where the image came from: "store" (loaded), "engine" or "registry" (pulled)
    slide: dict[str, Any]  # size, seed of the generated sample slide
    exit_code: int
    analyses: dict[str, list[str]] = field(default_factory=dict)  # analysis -> features found
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict, for the JSON output."""
        return asdict(self)


def smoke(image: str, store: ImageStore, *, timeout: int = 600) -> SmokeReport:
    """Run ``image`` on a generated sample slide and check its summaries (ImageError in one
    line, naming the image and what failed, when it does not pass or no engine answers)."""
    started = time.monotonic()
    client = docker_client(60, needed_for=_NEEDED_FOR)
    try:
        image_id, source = _image_in_engine(client, image, store)
        slide = _run(
            client,
            image_id,
            ["demo", "slide", SLIDE, "--size", str(SLIDE_SIZE), "--seed", str(SLIDE_SEED)],
            timeout,
            what=f"{image}: the image could not generate its sample slide",
        )
        config_bytes = _read_file(client, image_id, f"{CONFIG_DIR}/analysis.yaml", image)
        outputs, code, logs = _run_on(client, image_id, slide, timeout)
    finally:
        client.close()
    report = SmokeReport(
        image=image,
        image_id=image_id,
        source=source,
        slide={"size": SLIDE_SIZE, "seed": SLIDE_SEED},
        exit_code=code,
        seconds=round(time.monotonic() - started, 1),
    )
    if code != 0:
        raise ImageError(
            f"{image}: the runner exited {code} on the sample slide: {_last_line(logs)}",
            hint="the image does not load its config or a model; `builder explain` shows what "
            "it was built from",
        )
    report.analyses = _check_summaries(image, config_bytes, outputs)
    return report


def _check_summaries(
    image: str, config_bytes: bytes, outputs: Mapping[str, bytes]
) -> dict[str, list[str]]:
    """Every analysis of the config has ``<analysis>/summary.json`` made from this config with
    every feature; the features found per analysis (ImageError naming what is missing)."""
    config = yamldoc.parse(config_bytes, f"{image}:{CONFIG_DIR}/analysis.yaml").data or {}
    sha = hashlib.sha256(config_bytes).hexdigest()
    found: dict[str, list[str]] = {}
    for analysis in config.get("analyses") or []:
        name = str(analysis.get("name"))
        raw = outputs.get(f"{name}/summary.json")
        if raw is None:
            raise ImageError(f"{image}: the sample run wrote no {name}/summary.json")
        deterministic = json.loads(raw).get("deterministic") or {}
        if (deterministic.get("config") or {}).get("sha256") != sha:
            raise ImageError(
                f"{image}: {name}/summary.json was not made from the image's own "
                f"{CONFIG_DIR}/analysis.yaml (sha256 {sha[:12]})"
            )
        features = sorted(deterministic.get("features") or {})
        wanted = [str(f.get("name") or f.get("cls")) for f in analysis.get("features") or []]
        missing = [f for f in wanted if f not in features]
        if missing:
            raise ImageError(
                f"{image}: {name}/summary.json lacks features {', '.join(missing)} "
                f"(has: {', '.join(features) or 'none'})"
            )
        found[name] = features
    if not found:
        raise ImageError(f"{image}: {CONFIG_DIR}/analysis.yaml names no analysis")
    return found


def _image_in_engine(client: Any, image: str, store: ImageStore) -> tuple[str, str]:
    """The engine's id of ``image`` and where it came from: the local image store (loaded
    unless the engine has that id already), else the engine, else its registry (pulled)."""
    import docker.errors

    stored = _stored_reference(store, image)
    if stored is not None:
        assembled = store.stored_image(stored)
        image_id = assembled.config_digest
        try:
            client.images.get(image_id)
        except docker.errors.ImageNotFound:
            deliver.load_into_docker(assembled, [stored], client)
        return image_id, "store"
    try:
        return str(client.images.get(image).id), "engine"
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.DockerException as exc:
        raise ImageError(
            f"{image}: the Docker engine failed: {deliver.docker_message(exc)}"
        ) from None
    try:
        return str(client.images.pull(image).id), "registry"
    except docker.errors.DockerException as exc:
        raise ImageError(
            f"{image} is in neither the local image store, the Docker engine nor its "
            f"registry: {deliver.docker_message(exc)}",
            hint="build it first (`build CUSTOMER`), or name an image you can pull",
        ) from None


def _stored_reference(store: ImageStore, image: str) -> str | None:
    """The store's name for ``image`` (``repo:tag``, or ``repo@digest`` matched by digest)."""
    repository, tag = split_name(image)
    if tag is not None or "@" not in image:
        return image if store.lookup(image) else None
    digest = image.split("@", 1)[1]
    return next(
        (
            i.reference
            for i in store.images()
            if i.digest == digest and split_name(i.reference)[0] == repository
        ),
        None,
    )


def _run(client: Any, image_id: str, command: list[str], timeout: int, *, what: str) -> bytes:
    """Run ``command`` in a container of the image; the tar of WORK it leaves behind."""
    container = client.containers.create(image_id, command, network_mode="none")
    try:
        code, logs = _start_and_wait(container, timeout)
        if code != 0:
            raise ImageError(f"{what} (exit {code}): {_last_line(logs)}")
        stream, _ = container.get_archive(WORK)
        return b"".join(stream)
    finally:
        container.remove(force=True)


def _run_on(
    client: Any, image_id: str, slide: bytes, timeout: int
) -> tuple[dict[str, bytes], int, str]:
    """The image as shipped (its entrypoint) on the slide: (its output files by path under
    OUT, exit code, log)."""
    container = client.containers.create(
        image_id, ["run", SLIDE, "--out", OUT, "--no-progress"], network_mode="none"
    )
    try:
        container.put_archive(str(PurePosixPath(WORK).parent), slide)
        code, logs = _start_and_wait(container, timeout)
        outputs: dict[str, bytes] = {}
        if code == 0:
            stream, _ = container.get_archive(OUT)
            outputs = _files(b"".join(stream), PurePosixPath(OUT).name)
        return outputs, code, logs
    finally:
        container.remove(force=True)


def _start_and_wait(container: Any, timeout: int) -> tuple[int, str]:
    """Start a container and wait for it (killed after ``timeout`` s): exit code, log tail."""
    import requests

    container.start()
    try:
        code = int(container.wait(timeout=timeout).get("StatusCode", 1))
    except requests.exceptions.RequestException:  # the docker SDK's read timeout
        container.kill()
        raise ImageError(f"the smoke run did not finish in {timeout} s") from None
    logs = container.logs(stdout=True, stderr=True, tail=50).decode("utf-8", "replace")
    return code, logs[-_LOG_TAIL:]


def _read_file(client: Any, image_id: str, path: str, image: str) -> bytes:
    """One file of the image (a created, never started, container)."""
    import docker.errors

    container = client.containers.create(image_id, ["true"], network_mode="none")
    try:
        stream, _ = container.get_archive(path)
        files = _files(b"".join(stream), "")
    except docker.errors.NotFound:
        raise ImageError(f"{image} has no {path}: not an image this builder made") from None
    finally:
        container.remove(force=True)
    return next(iter(files.values()))


def _files(archive: bytes, prefix: str) -> dict[str, bytes]:
    """Regular files of a tar (``get_archive``), by path with ``prefix/`` removed."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                name = PurePosixPath(member.name)
                parts = name.parts[1:] if prefix and name.parts[:1] == (prefix,) else name.parts
                out["/".join(parts)] = handle.read()
    return out


def _last_line(logs: str) -> str:
    lines = [line.strip() for line in logs.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"
