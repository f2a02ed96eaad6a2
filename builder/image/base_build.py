"""Build (and push) the inference base image from base-image/ through the docker SDK.

The build is offline by construction: the wheels come from a wheelhouse on the host, checked
against the hash-pinned requirements, and the engine builds with ``network_mode="none"``.
The wheelhouse is filled by ``pip download`` on the host when it lacks files (unless
``download=False``, for air-gapped sites, where a missing wheel is an error). The runner's
own wheel is built from base-image/runner with the build backend from the same wheelhouse.

The version lives in base-image/VERSION only: it becomes the tag ``<repository>:<version>``,
the ``org.opencontainers.image.version`` label and the runner package's version. The GPU
variant is the same Debian base plus onnxruntime-gpu and NVIDIA's CUDA/cuDNN pip wheels (no
CUDA base image); it lives in its own repository, ``<repository>-gpu`` (variant_repository),
with the same version tags, so version constraints resolve alike for both variants. The
labels also carry the verbose-config schema versions the runner accepts, the ONNX Runtime
version, the variant and the CUDA runtime and cuDNN versions read from the lock.

No printing: progress goes to the optional callback, failures raise ImageError.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from builder.contracts import Progress, ProgressEvent
from builder.errors import ImageError
from builder.image.base import LABEL_VARIANT
from builder.image.base_os import BASE_OS_IMAGE, ensure_base_os
from builder.image.contract import CONTRACT_LABEL, runner_contract_from_source
from builder.image.store import ImageStore, save_from_docker
from builder.oci import push_image

BASE_DIR: Final = Path(__file__).resolve().parents[2] / "base-image"
VARIANTS: Final = ("cpu", "gpu")
#: The pins in requirements-gpu.txt whose versions the labels report.
CUDA_RUNTIME_WHEEL: Final = "nvidia-cuda-runtime"
CUDNN_WHEEL_PREFIX: Final = "nvidia-cudnn-cu"
LABEL_VERSION: Final = "org.opencontainers.image.version"
LABEL_SCHEMAS: Final = "com.ivd.runner.config-schemas"
LABEL_ORT: Final = "com.ivd.runner.onnxruntime"
LABEL_CUDA: Final = "com.ivd.runner.cuda"
LABEL_CUDNN: Final = "com.ivd.runner.cudnn"
#: sha256 over everything a build reads (Dockerfile, lock, runner wheel, arguments, base id).
LABEL_INPUTS: Final = "com.ivd.base.build-inputs"
#: Verbose-config schema versions the runner in base-image/runner accepts.
CONFIG_SCHEMAS: Final = "1"
_VERSION_RE: Final = re.compile(r"^\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.]+)?$")
_BUILD_TIMEOUT: Final = 1800
_PIP_TIMEOUT: Final = 900


@dataclass(frozen=True)
class BaseImageBuild:
    """The result of a base image build."""

    reference: str  # <repository>:<tag>
    image_id: str  # sha256:... of the image config
    version: str
    labels: dict[str, str]
    variant: str = "cpu"
    digest: str | None = None  # manifest digest in the registry, when pushed
    store: str | None = None  # the local image store it was written into
    store_digest: str | None = None  # its manifest digest there (= the pushed one)
    log: list[str] = field(default_factory=list, repr=False)  # the engine's build output


@dataclass(frozen=True)
class Requirement:
    """One pinned requirement of the base image: name, exact version and allowed hashes."""

    name: str
    version: str
    hashes: frozenset[str]


def read_version(base_dir: Path = BASE_DIR) -> str:
    """The base image version from base-image/VERSION."""
    path = base_dir / "VERSION"
    try:
        version = path.read_text().strip()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from None
    if not _VERSION_RE.match(version):
        raise ImageError(f"{path}: {version!r} is not a version like 2.4.1")
    return version


def parse_requirements(path: Path) -> list[Requirement]:
    """`name==version --hash=sha256:...` entries (continuation lines joined, comments dropped)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from None
    joined = re.sub(r"\\\s*\n", " ", text)
    reqs = []
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
        if not match or not hashes:
            raise ImageError(f"{path}: {line!r} is not `name==version --hash=sha256:...`")
        reqs.append(Requirement(match.group(1).lower(), match.group(2), hashes))
    return reqs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _index(wheelhouse: Path) -> dict[str, Path]:
    """sha256 -> wheel file of every wheel in the folder."""
    return {_sha256(p): p for p in sorted(wheelhouse.glob("*.whl"))}


def _platform_args(base_dir: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(base_dir / "lock_requirements.py"), "--platform-args"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ImageError(f"{base_dir / 'lock_requirements.py'} failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    # a fixed SOURCE_DATE_EPOCH makes the runner wheel byte-identical between builds, so the
    # engine's layer cache is hit when nothing changed
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=_PIP_TIMEOUT, env=env
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: pip did not finish in {_PIP_TIMEOUT} s") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise ImageError(f"{what} failed: {tail}")


#: pip's line for each distribution it fetches (from an index, its cache or a local folder).
_DOWNLOADING = re.compile(
    r"^\s*(?:Downloading|Using cached|Processing) (\S+?)(?: \(([\d.,]+ [kMG]?i?B)\))?(?: \(.*\))?$"
)


def _pip_download(args: list[str], what: str, expected: int, progress: Progress | None) -> None:
    """`pip download` with each wheel it starts to download reported as it goes (a GPU
    wheelhouse is 1.6 GB: minutes with nothing to show otherwise)."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    errors: list[str] = []
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
        )
    except OSError as exc:
        raise ImageError(f"{what} failed: {exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    count = 0
    try:
        for line in proc.stdout:
            found = _DOWNLOADING.match(line.rstrip())
            if found and progress:
                count += 1
                name = found.group(1).rsplit("/", 1)[-1]
                size = f" ({found.group(2)})" if found.group(2) else ""
                progress(ProgressEvent(stage=f"wheelhouse [{count}/{expected}] {name}{size}"))
        errors = proc.stderr.read().splitlines()
        proc.wait(timeout=max(1.0, _PIP_TIMEOUT - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ImageError(f"{what}: pip did not finish in {_PIP_TIMEOUT} s") from None
    if proc.returncode != 0:
        raise ImageError(f"{what} failed: {' '.join(errors[-3:])}")


def _user_cache() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_path("ivd-builder"))


def default_wheelhouse(variant: str) -> Path:
    """Machine-wide wheelhouse cache: <user cache>/ivd-builder/wheelhouse/<variant>."""
    return _user_cache() / "wheelhouse" / variant


def ensure_wheelhouse(
    wheelhouse: Path,
    requirements: Iterable[Path],
    *,
    download: bool = True,
    base_dir: Path = BASE_DIR,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Check (and with `download`, complete) the wheelhouse; return {sha256: wheel} for the pins.

    Every pinned distribution must be present as a file whose sha256 is one of its hashes.
    Missing ones are fetched with `pip download --require-hashes` for the image's platform.
    """
    reqs = [r for path in requirements for r in parse_requirements(path)]
    wheelhouse.mkdir(parents=True, exist_ok=True)
    have = _index(wheelhouse)
    missing = [r for r in reqs if not r.hashes & have.keys()]
    if missing and download:
        if progress:
            progress(ProgressEvent("wheelhouse", len(reqs) - len(missing), len(reqs)))
            progress(
                ProgressEvent(
                    stage=f"wheelhouse: downloading {len(missing)} of {len(reqs)} pinned wheels "
                    f"from the index into {wheelhouse}"
                )
            )
        files = list(requirements)
        _pip_download(
            [
                "download",
                "--no-deps",
                "--require-hashes",
                "--progress-bar",
                "off",
                *_platform_args(base_dir),
                *[a for f in files for a in ("-r", str(f))],
                "-d",
                str(wheelhouse),
            ],
            f"pip download into {wheelhouse}",
            len(missing),
            progress,
        )
        have = _index(wheelhouse)
        missing = [r for r in reqs if not r.hashes & have.keys()]
    if missing:
        names = ", ".join(f"{r.name}=={r.version}" for r in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ImageError(
            f"wheelhouse {wheelhouse} lacks {names}{more} (or holds files with other hashes)",
            hint="run base-image/make-wheelhouse.sh on a connected host and copy the folder",
        )
    if progress:
        progress(ProgressEvent("wheelhouse", len(reqs), len(reqs)))
    return {h: have[h] for r in reqs for h in sorted(r.hashes & have.keys())[:1]}


def build_runner_wheel(
    wheelhouse: Path, out_dir: Path, version: str, base_dir: Path = BASE_DIR
) -> Path:
    """Build tilerunner-<version>-py3-none-any.whl offline (backend from the wheelhouse)."""
    _pip(
        [
            "wheel",
            "--no-deps",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            "--wheel-dir",
            str(out_dir),
            str(base_dir / "runner"),
        ],
        "building the runner wheel",
    )
    wheel = out_dir / f"tilerunner-{version}-py3-none-any.whl"
    if not wheel.is_file():
        found = ", ".join(p.name for p in out_dir.glob("tilerunner-*.whl")) or "nothing"
        raise ImageError(
            f"the runner wheel should be {wheel.name} but pip built {found}",
            hint="base-image/runner/VERSION must link to base-image/VERSION",
        )
    return wheel


def variant_repository(repository: str, variant: str) -> str:
    """Where a variant of the base image lives: ``repository`` (cpu), ``repository-gpu`` (gpu).

    Idempotent (``x-gpu`` stays ``x-gpu``), so a recorded GPU base repository can be passed
    back in. An ``oci:`` layout is named by the user as it is; the variant label of what it
    holds is checked by the customer build instead.
    """
    if variant not in VARIANTS:
        raise ImageError(f"unknown base image variant {variant!r} (cpu or gpu)")
    if variant == "cpu" or repository.startswith("oci:") or repository.endswith(f"-{variant}"):
        return repository
    return f"{repository}-{variant}"


def cuda_versions(reqs: list[Requirement], path: Path) -> tuple[str, str]:
    """(CUDA runtime major.minor, cuDNN major.minor.patch) of the NVIDIA wheels pinned in a lock."""
    cuda = next((r.version for r in reqs if r.name == CUDA_RUNTIME_WHEEL), None)
    cudnn = next((r.version for r in reqs if r.name.startswith(CUDNN_WHEEL_PREFIX)), None)
    if not cuda or not cudnn:
        raise ImageError(
            f"{path} pins no {CUDA_RUNTIME_WHEEL} or {CUDNN_WHEEL_PREFIX}<major> wheel",
            hint="the GPU variant takes CUDA and cuDNN from NVIDIA's pip wheels; "
            "see base-image/requirements-gpu.in",
        )
    return ".".join(cuda.split(".")[:2]), ".".join(cudnn.split(".")[:3])


def _onnxruntime_version(reqs: list[Requirement], path: Path) -> str:
    for r in reqs:
        if r.name in ("onnxruntime", "onnxruntime-gpu"):
            return r.version
    raise ImageError(f"{path} pins no onnxruntime or onnxruntime-gpu")


def _context(
    tar_path: Path, base_dir: Path, requirements: Path, wheels: Iterable[Path], runner: Path
) -> None:
    """The build context: Dockerfile, requirements.txt, wheels/ (the pins), runner/ (runner)."""

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(tar_path, "w") as tf:
        add(tf, "Dockerfile", (base_dir / "Dockerfile").read_bytes())
        add(tf, "requirements.txt", requirements.read_bytes())
        entries = [(f"wheels/{w.name}", w) for w in sorted(set(wheels), key=lambda p: p.name)]
        for arcname, wheel in [*entries, (f"runner/{runner.name}", runner)]:
            info = tf.gettarinfo(str(wheel), arcname=arcname)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with wheel.open("rb") as fh:
                tf.addfile(info, fh)


def _inputs_key(
    base_dir: Path, requirements: Path, runner: Path, buildargs: dict[str, str], base_id: str
) -> str:
    """sha256 over every input of the build (the wheels enter through the hash-pinned lock)."""
    h = hashlib.sha256()
    for part in (
        (base_dir / "Dockerfile").read_bytes(),
        requirements.read_bytes(),
        runner.read_bytes(),
        json.dumps(buildargs, sort_keys=True).encode(),
        base_id.encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _built_before(
    docker_client: Any, reference: str, key: str, labels: dict[str, str]
) -> str | None:
    """Id of an image in the engine built from exactly these inputs (tagged `reference`).

    Every image built FROM the base (a customer image loaded or smoke-tested in the engine)
    inherits its labels, the inputs key too: only an image whose labels are all the base's
    own ``labels`` (its version, not a customer's ``<version>-<rev>``) is the base."""
    from docker.errors import DockerException

    try:
        found = docker_client.images.list(filters={"label": f"{LABEL_INPUTS}={key}"})
        image = next(
            (i for i in found if all((i.labels or {}).get(k) == v for k, v in labels.items())),
            None,
        )
        if image is None:
            return None
        if reference not in (image.tags or []):
            repository, _, tag = reference.rpartition(":")
            image.tag(repository, tag)
        return str(image.id)
    except DockerException:
        return None  # not fatal: build it


def _base_id(docker_client: Any, base_from: str) -> str:
    from docker.errors import DockerException

    try:
        return str(docker_client.images.get(base_from).id)
    except DockerException:
        return ""  # not local: the build says so (it never pulls)


def _run_build(
    docker_client: Any,
    context: Path,
    tag: str,
    buildargs: dict[str, str],
    progress: Progress | None,
    extra_labels: dict[str, str] | None = None,
) -> tuple[str, list[str]]:
    """Stream the engine's build; return (image id, output lines) or raise ImageError."""
    from docker.errors import APIError, DockerException

    log: list[str] = []
    image_id = ""
    steps = 0
    try:
        with context.open("rb") as fh:
            stream = docker_client.api.build(
                fileobj=fh,
                custom_context=True,
                tag=tag,
                buildargs=buildargs,
                labels=extra_labels,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                network_mode="none",
                timeout=_BUILD_TIMEOUT,
            )
            for chunk in stream:
                if "error" in chunk:
                    detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                    tail = " | ".join(line for line in log[-3:] if line)
                    raise ImageError(
                        f"building {tag} failed: {' '.join(detail.split())}"
                        + (f" (after: {tail})" if tail else "")
                    )
                text = str(chunk.get("stream", "")).strip()
                if text:
                    log.extend(text.splitlines())
                    step = re.match(r"Step (\d+)/(\d+) : (.*)", text)
                    if step and progress:
                        steps = int(step.group(2))
                        instruction = " ".join(step.group(3).split())
                        if len(instruction) > 100:
                            instruction = instruction[:97] + "..."
                        progress(
                            ProgressEvent(
                                stage=f"build step {step.group(1)}/{steps}: {instruction}"
                            )
                        )
                        progress(ProgressEvent("build", int(step.group(1)), steps))
                aux = chunk.get("aux") or {}
                if aux.get("ID"):
                    image_id = str(aux["ID"])
    except (APIError, DockerException) as exc:
        raise ImageError(f"building {tag} failed: {' '.join(str(exc).split())[:300]}") from None
    if progress and steps:
        progress(ProgressEvent("build", steps, steps))
    if not image_id:
        try:
            image_id = str(docker_client.images.get(tag).id)
        except Exception as exc:
            raise ImageError(f"building {tag} gave no image: {exc}") from None
    return image_id, log


def _push(docker_client: Any, repository: str, tag: str, progress: Progress | None) -> str:
    """Push and return the manifest digest the registry reported."""
    from docker.errors import APIError, DockerException

    digest = ""
    try:
        for chunk in docker_client.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise ImageError(
                    f"pushing {repository}:{tag} failed: {detail}",
                    hint="check the registry address and your docker login",
                )
            detail = chunk.get("progressDetail") or {}
            if progress and detail.get("total"):
                progress(
                    ProgressEvent(
                        f"push {chunk.get('id', '')}",
                        int(detail.get("current", 0)),
                        int(detail["total"]),
                    ),
                )
            digest = str((chunk.get("aux") or {}).get("Digest") or digest)
    except (APIError, DockerException) as exc:
        raise ImageError(
            f"pushing {repository}:{tag} failed: {' '.join(str(exc).split())}"
        ) from None
    if not digest:
        raise ImageError(f"pushing {repository}:{tag}: the registry reported no digest")
    return digest


def _check_arguments(repository: str, variant: str) -> None:
    """Arguments that are wrong before any work: an unknown variant, a repository that is no
    bare name."""
    if variant not in VARIANTS:
        raise ImageError(f"unknown base image variant {variant!r} (cpu or gpu)")
    if not repository or ":" in repository.rsplit("/", 1)[-1] or "@" in repository:
        raise ImageError(
            f"repository {repository!r} must be a name without tag or digest",
            hint="e.g. registry.example.com/ivd/inference-base",
        )


def _expected_labels(
    contract_sha: str, version: str, ort: str, cuda: str, cudnn: str, variant: str
) -> dict[str, str]:
    """The labels a base image must carry (checked on the built image)."""
    return {
        CONTRACT_LABEL: contract_sha,
        LABEL_VERSION: version,
        LABEL_SCHEMAS: CONFIG_SCHEMAS,
        LABEL_ORT: ort,
        LABEL_CUDA: cuda,
        LABEL_CUDNN: cudnn,
        LABEL_VARIANT: variant,
    }


def _build_args(
    base_from: str, contract_sha: str, version: str, ort: str, cuda: str, cudnn: str, variant: str
) -> dict[str, str]:
    """The Dockerfile's build arguments (the context's folder and file names included)."""
    return {
        "BASE_IMAGE": base_from,
        "VERSION": version,
        "ORT_VERSION": ort,
        "CUDA_VERSION": cuda,
        "CUDNN_VERSION": cudnn,
        "VARIANT": variant,
        "WHEELHOUSE": "wheels",
        "RUNNER_WHEELHOUSE": "runner",
        "REQUIREMENTS": "requirements.txt",
        "CONTRACT_SHA256": contract_sha,
    }


def _reuse(image_id: str, reference: str, progress: Progress | None) -> tuple[str, list[str]]:
    """An image built before from the same inputs, told as a build that had nothing to do."""
    log = [f"reused {image_id}: built before from the same inputs"]
    if progress:
        progress(ProgressEvent(stage=f"{reference}: {log[0]} (no build)"))
        progress(ProgressEvent("build", 1, 1))
    return image_id, log


def _send_and_build(
    docker_client: Any,
    context: Path,
    reference: str,
    base_from: str,
    buildargs: dict[str, str],
    key: str,
    progress: Progress | None,
) -> tuple[str, list[str]]:
    """Send the build context to the engine and build (saying how big the context is)."""
    if progress:
        size = context.stat().st_size
        progress(
            ProgressEvent(
                stage=f"building {reference} on {base_from} "
                f"(sending a {size / 1e6:,.0f} MB context to the engine)"
            )
        )
    return _run_build(docker_client, context, reference, buildargs, progress, {LABEL_INPUTS: key})


def _checked_labels(
    docker_client: Any, reference: str, labels: Mapping[str, str]
) -> dict[str, str]:
    """The built image's labels (ImageError when one of ``labels`` differs)."""
    got = dict(docker_client.images.get(reference).labels or {})
    wrong = {k: (got.get(k), v) for k, v in labels.items() if got.get(k) != v}
    if wrong:
        raise ImageError(f"{reference} was built with unexpected labels: {json.dumps(wrong)}")
    return got


def build_base_image(
    *,
    docker_client: Any,
    repository: str,
    base_from: str,
    wheelhouse: Path | None,
    push: bool,
    variant: str = "cpu",
    download: bool = True,
    base_dir: Path = BASE_DIR,
    progress: Progress | None = None,
    store: ImageStore | None = None,
    base_os_cache: Path | None = None,
    debian_mirror: str | None = None,
) -> BaseImageBuild:
    """Build base-image/ as `<variant repository>:<version>` (and push it when `push`).

    With `store` (the CLI always passes the local image store) the image is written there as
    `<variant repository>:<tag>`, and `push` sends exactly that manifest to the registry, so
    builds against the store and against the registry give the same digests.

    `base_from` is the Python 3.11 base for both variants: :data:`BASE_OS_IMAGE` (the
    default) is made with debootstrap from a Debian mirror when the engine lacks it (its
    rootfs cached in `base_os_cache`), anything else (python:3.11-slim-bookworm) is the
    engine's to find or pull. `wheelhouse` None means the machine-wide cache
    (default_wheelhouse). Raises ImageError naming what failed.
    """
    _check_arguments(repository, variant)
    version = read_version(base_dir)
    repository = variant_repository(repository, variant)
    requirements = base_dir / f"requirements-{variant}.txt"
    build_reqs = base_dir / "requirements-build.txt"
    reqs = parse_requirements(requirements)
    ort = _onnxruntime_version(reqs, requirements)
    cuda, cudnn = ("none", "none") if variant == "cpu" else cuda_versions(reqs, requirements)
    house = wheelhouse or default_wheelhouse(variant)
    pinned = ensure_wheelhouse(
        house, [requirements, build_reqs], download=download, base_dir=base_dir, progress=progress
    )
    image_hashes = {h for r in reqs for h in r.hashes}
    wheels = [p for h, p in pinned.items() if h in image_hashes]
    contract_sha = hashlib.sha256(runner_contract_from_source(base_dir / "runner")).hexdigest()
    labels = _expected_labels(contract_sha, version, ort, cuda, cudnn, variant)
    buildargs = _build_args(base_from, contract_sha, version, ort, cuda, cudnn, variant)
    reference = f"{repository}:{version}"
    if base_from == BASE_OS_IMAGE:
        ensure_base_os(
            docker_client,
            base_os_cache or _user_cache() / "base-os",
            mirror=debian_mirror,
            progress=progress,
        )
    with tempfile.TemporaryDirectory(prefix="ivd-base-image-") as tmp:
        runner = build_runner_wheel(house, Path(tmp), version, base_dir)
        base_id = _base_id(docker_client, base_from)
        key = _inputs_key(base_dir, requirements, runner, buildargs, base_id)
        # the same inputs built before: reuse that image rather than send the wheelhouse
        # (1.6 GB for gpu) to the engine only to hit its layer cache at every step
        reused = _built_before(docker_client, reference, key, labels) if base_id else None
        if reused:
            image_id, log = _reuse(reused, reference, progress)
        else:
            context = Path(tmp) / "context.tar"
            _context(context, base_dir, requirements, wheels, runner)
            image_id, log = _send_and_build(
                docker_client, context, reference, base_from, buildargs, key, progress
            )
    got = _checked_labels(docker_client, reference, labels)
    stored, digest = _deliver(docker_client, reference, store, push=push, progress=progress)
    return BaseImageBuild(
        reference=reference,
        image_id=image_id,
        version=version,
        labels=got,
        variant=variant,
        digest=digest,
        store=str(store.root) if store is not None else None,
        store_digest=stored,
        log=log,
    )


def _deliver(
    docker_client: Any,
    reference: str,
    store: ImageStore | None,
    *,
    push: bool,
    progress: Progress | None,
) -> tuple[str | None, str | None]:
    """Store the built image (and push that stored manifest); (store digest, pushed digest).
    Without a store, push from the engine."""
    if store is None:
        repository, _, tag = reference.rpartition(":")
        return None, _push(docker_client, repository, tag, progress) if push else None
    with store.in_use():
        if progress:
            progress(ProgressEvent(stage=f"storing {reference} in {store.root}"))
        stored = save_from_docker(docker_client, reference, store, progress).digest
        if push and progress:
            progress(ProgressEvent(stage=f"pushing {reference}"))
        return stored, _push_stored(store, reference, progress) if push else None


def _push_stored(store: ImageStore, reference: str, progress: Progress | None) -> str:
    """Push the stored image `reference` to its registry, byte for byte; return its digest."""
    return push_image(store.stored_image(reference), reference, progress=progress)
