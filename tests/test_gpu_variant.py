"""The GPU variant of the base image, built and checked on this GPU-less machine.

The variant is the same Debian base plus onnxruntime-gpu and NVIDIA's CUDA 13 / cuDNN 9 pip
wheels from the machine-wide wheelhouse (~/.cache/ivd-testbed/wheelhouse/gpu, 1.6 GB, filled
once). Without a GPU nothing can run on CUDA here, so these tests check everything up to the
driver: every library the CUDA provider needs resolves once the runner has preloaded the
wheels (only the driver's libcuda.so.1, which the NVIDIA container toolkit mounts, is
missing); `tilerunner info` says the provider is installed and why it is not usable;
`--device auto` falls back to the CPU in one line with the same results as the host, and
`--device cuda` fails in one line with exit code 6. A customer-x image on the GPU base is
built, explained and verified bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path
from typing import Any
from zipfile import ZipFile

import pytest
from helpers import ROOT, commit_files, commit_lock, push_labelled_bases, run_cli
from packaging.requirements import Requirement as PipRequirement

from builder.cook.load import load_customer
from builder.errors import ConfigError, ImageError
from builder.image.base_build import (
    BASE_DIR,
    BaseImageBuild,
    build_base_image,
    cuda_versions,
    ensure_wheelhouse,
    parse_requirements,
    read_version,
    variant_repository,
)
from builder.pipeline import build_variant
from builder.settings import load_settings
from testbed._util import cache_root

RUNNER_TESTS = ROOT / "base-image" / "runner" / "tests"
if str(RUNNER_TESTS) not in sys.path:
    sys.path.insert(0, str(RUNNER_TESTS))

from tilerunner_testlib import App, cached, code_key, slide, verbose_config  # noqa: E402

WHEELHOUSE = cache_root() / "wheelhouse" / "gpu"
GPU_LOCK = BASE_DIR / "requirements-gpu.txt"
NO_DRIVER = "no NVIDIA driver: libcuda.so.1 not found"
PY = "/opt/tilerunner/bin/python"


# --------------------------------------------------------------------------- no engine needed


def test_variant_repository_and_labels_from_the_lock() -> None:
    assert (
        variant_repository("r.example/ivd/inference-base", "cpu") == "r.example/ivd/inference-base"
    )
    assert variant_repository("r.example/ivd/base", "gpu") == "r.example/ivd/base-gpu"
    assert variant_repository("r.example/ivd/base-gpu", "gpu") == "r.example/ivd/base-gpu"
    assert variant_repository("oci:/layouts/base", "gpu") == "oci:/layouts/base"
    with pytest.raises(ImageError, match="variant 'tpu'"):
        variant_repository("r/x", "tpu")
    reqs = parse_requirements(GPU_LOCK)
    pins = {r.name: r.version for r in reqs}
    cuda, cudnn = cuda_versions(reqs, GPU_LOCK)
    assert cuda == ".".join(pins["nvidia-cuda-runtime"].split(".")[:2])
    assert cuda.startswith("13.") and cudnn.startswith("9.")
    cpu_lock = BASE_DIR / "requirements-cpu.txt"
    with pytest.raises(ImageError, match="pins no nvidia-cuda-runtime"):
        cuda_versions(parse_requirements(cpu_lock), cpu_lock)


def _customer(tmp_path: Path, variant_line: str) -> Path:
    """customer-x's committed files in a repository of their own, with a variant line."""
    source = ROOT / "customers" / "customer-x"
    files = {p.name: p.read_text() for p in sorted(source.iterdir()) if p.is_file()}
    files.pop("customer.lock.yaml", None)  # the variant line changes customer.yaml: not locked
    text = files["customer.yaml"]
    files["customer.yaml"] = text.replace("base_image:\n", f"base_image:\n{variant_line}", 1)
    assert files["customer.yaml"] != text or not variant_line
    repo = tmp_path / "customer-x"
    commit_files(repo, files, "customer-x with a base image variant")
    return repo


def test_customer_yaml_variant_key(tmp_path: Path) -> None:
    settings = load_settings(ROOT)
    plain = load_customer(str(_customer(tmp_path / "a", "")), settings)
    assert plain.variants == ("cpu",) and build_variant(plain, None) == "cpu"
    with pytest.raises(ConfigError, match=r"variant of customer-x is cpu, not gpu"):
        build_variant(plain, "gpu")
    both = load_customer(str(_customer(tmp_path / "b", "  variant: [gpu, cpu]\n")), settings)
    assert both.variants == ("gpu", "cpu")
    assert build_variant(both, None) == "gpu" and build_variant(both, "cpu") == "cpu"
    gpu = load_customer(str(_customer(tmp_path / "c", "  variant: gpu\n")), settings)
    assert gpu.variants == ("gpu",)
    with pytest.raises(ConfigError, match=r"customer\.yaml:\d+.*variant") as err:
        load_customer(str(_customer(tmp_path / "d", "  variant: tpu\n")), settings)
    assert "\n" not in err.value.message


# --------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def gpu_base(docker_engine: Any, base_os_image: str) -> BaseImageBuild:
    """The GPU base, built in the engine (not pushed: 3 GB through docker push's gzip would
    cost minutes per session; the customer test uses an OCI layout of it instead)."""
    client = docker_engine.client()
    built = build_base_image(
        docker_client=client,
        repository="ivd-test/inference-base",
        base_from=base_os_image,
        wheelhouse=WHEELHOUSE,
        push=False,
        variant="gpu",
    )
    # the image this build replaced (3 GB, untagged now) must not pile up in the cached engine
    client.images.prune(filters={"dangling": True, "label": "com.ivd.runner.variant=gpu"})
    return built


@pytest.fixture(scope="module")
def gpu_layout(gpu_base: BaseImageBuild, docker_engine: Any) -> Path:
    """The GPU base as an OCI image layout (uncompressed layers), cached machine-wide by image
    id: `skopeo copy docker-daemon: oci:`; older copies are removed (3 GB each)."""
    from filelock import FileLock

    root = cache_root() / "oci-gpu-base"
    root.mkdir(parents=True, exist_ok=True)
    layout = root / gpu_base.image_id.split(":")[1][:16]
    with FileLock(str(root / ".lock")):
        for old in root.iterdir():
            if old.is_dir() and old != layout:
                shutil.rmtree(old, ignore_errors=True)
        if not (layout / "index.json").is_file():
            tmp = root / f".tmp-{layout.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(
                [
                    *("skopeo", "copy", "--quiet", "--dest-oci-accept-uncompressed-layers"),
                    *("--src-daemon-host", docker_engine.host),
                    f"docker-daemon:{gpu_base.reference}",
                    f"oci:{tmp}:{gpu_base.version}",
                ],
                check=True,
                capture_output=True,
                timeout=900,
            )
            tmp.rename(layout)
    return layout


def test_lock_has_every_library_onnxruntime_gpu_asks_for() -> None:
    """The `cuda` and `cudnn` extras of the pinned onnxruntime-gpu wheel (its own METADATA)
    are all satisfied by the lock, and so is every NVIDIA wheel's own dependency (with
    nvImageCodec's `nvjpeg` extra: the GPU JPEG decoder of --decoder)."""
    pinned = ensure_wheelhouse(WHEELHOUSE, [GPU_LOCK], download=True)
    pins = {r.name: r.version for r in parse_requirements(GPU_LOCK)}
    wheels = {p.name: p for p in pinned.values()}
    ort = next(p for n, p in wheels.items() if n.startswith("onnxruntime_gpu-"))
    nvidia = [p for n, p in wheels.items() if n.startswith("nvidia_")]
    asked: list[tuple[str, str]] = []
    for wheel in [ort, *nvidia]:
        with ZipFile(wheel) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
        for line in meta.get_all("Requires-Dist") or []:
            req = PipRequirement(line)
            for extra in ("cuda", "cudnn", "nvjpeg", None):
                env = {"extra": extra or ""}
                if (req.marker is None) == (extra is None) and (
                    req.marker is None or req.marker.evaluate(env)
                ):
                    asked.append((wheel.name, str(req)))
                    name = req.name.lower()
                    assert name in pins, f"{wheel.name} needs {req}, not in the lock"
                    assert req.specifier.contains(pins[name]), f"{req} vs {pins[name]}"
    named = {re.split(r"[~=<>!; ]", r)[0] for _, r in asked}
    assert {"nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-nvjpeg"} <= named


@pytest.mark.docker
@pytest.mark.slow
def test_gpu_base_repository_tag_and_labels(gpu_base: BaseImageBuild) -> None:
    version = read_version()
    assert gpu_base.reference == f"ivd-test/inference-base-gpu:{version}"
    cuda, cudnn = cuda_versions(parse_requirements(GPU_LOCK), GPU_LOCK)
    labels = gpu_base.labels
    assert labels["com.ivd.runner.variant"] == "gpu"
    assert (labels["com.ivd.runner.cuda"], labels["com.ivd.runner.cudnn"]) == (cuda, cudnn)
    assert labels["com.ivd.runner.onnxruntime"] == "1.31.1"
    assert labels["org.opencontainers.image.version"] == version


@pytest.mark.docker
@pytest.mark.slow
def test_same_inputs_reuse_the_built_image(
    gpu_base: BaseImageBuild, docker_engine: Any, base_os_image: str
) -> None:
    """A second build from the same inputs (another repository name) reuses the image instead
    of sending the 1.6 GB wheelhouse to the engine again; its labels are checked all the same."""
    again = build_base_image(
        docker_client=docker_engine.client(),
        repository="ivd-test/again",
        base_from=base_os_image,
        wheelhouse=WHEELHOUSE,
        push=False,
        variant="gpu",
        download=False,
    )
    assert again.image_id == gpu_base.image_id
    assert again.reference == f"ivd-test/again-gpu:{gpu_base.version}"
    assert again.log and again.log[0].startswith("reused ")
    assert again.labels["com.ivd.base.build-inputs"] == gpu_base.labels["com.ivd.base.build-inputs"]
    docker_engine.client().images.remove(again.reference)


def _sh(client: Any, image: str, script: str) -> str:
    out = client.containers.run(
        image, ["-c", script], entrypoint=["/bin/sh"], network_mode="none", remove=True
    )
    return bytes(out).decode()


LDD_SCRIPT = r"""
set -eu
site=$(__PY__ -c 'import onnxruntime, os; print(os.path.dirname(os.path.dirname(onnxruntime.__file__)))')
dirs=$(__PY__ -c 'import os
from tilerunner.cuda import preload
libs, missing = preload()
assert not missing, missing
print(":".join(sorted({os.path.dirname(p) for p in libs.values()})))')
echo "== dirs $dirs"
for lib in "$site"/onnxruntime/capi/libonnxruntime_providers_cuda.so "$site"/nvidia/cudnn/lib/libcudnn*.so.9; do
  echo "== preloaded $lib"
  LD_LIBRARY_PATH="$dirs" ldd "$lib"
done
echo "== bare $site/onnxruntime/capi/libonnxruntime_providers_cuda.so"
ldd "$site"/onnxruntime/capi/libonnxruntime_providers_cuda.so
""".replace("__PY__", PY)


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:]
            out[current] = []
        elif current:
            out[current].append(line.strip())
    return out


@pytest.mark.docker
@pytest.mark.slow
def test_cuda_provider_libraries_resolve_after_preload(
    gpu_base: BaseImageBuild, docker_engine: Any
) -> None:
    """ldd of the CUDA provider and of every cuDNN library, with the directories
    preload_dlls() loaded the wheels from: nothing missing but the driver's libcuda.so.1.
    Without them the provider's CUDA libraries are missing (so the check can fail)."""
    sections = _sections(_sh(docker_engine.client(), gpu_base.reference, LDD_SCRIPT))
    dirs = next(k for k in sections if k.startswith("dirs "))[5:].split(":")
    assert any(d.endswith("/nvidia/cu13/lib") for d in dirs), dirs
    assert any(d.endswith("/nvidia/cudnn/lib") for d in dirs), dirs
    preloaded = {k: v for k, v in sections.items() if k.startswith("preloaded ")}
    assert len(preloaded) >= 8  # the provider + libcudnn.so.9 and its sub-libraries
    for name, lines in preloaded.items():
        missing = [line for line in lines if "not found" in line]
        assert all(line.startswith("libcuda.so.1 ") for line in missing), (name, missing)
    provider = next(v for k, v in preloaded.items() if k.endswith("providers_cuda.so"))
    resolved = {line.split(" => ")[0]: line for line in provider if " => /" in line}
    for soname in ("libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudart.so.13"):
        assert "/nvidia/cu13/lib/" in resolved[soname], resolved.get(soname)
    bare = next(v for k, v in sections.items() if k.startswith("bare "))
    assert "libcublasLt.so.13 => not found" in bare


def _info(client: Any, image: str) -> dict[str, Any]:
    out = client.containers.run(image, ["info"], network_mode="none", remove=True, stderr=True)
    return dict(json.loads(bytes(out)))  # stderr included: it must be empty


@pytest.mark.docker
@pytest.mark.slow
def test_info_lists_cuda_installed_and_why_not_usable(
    gpu_base: BaseImageBuild, docker_engine: Any
) -> None:
    info = _info(docker_engine.client(), gpu_base.reference)
    assert "CUDAExecutionProvider" in info["providers"]
    cuda = info["cuda"]
    assert cuda["installed"] is True and cuda["usable"] is False
    assert cuda["reason"].startswith(NO_DRIVER) and "--gpus" in cuda["reason"]
    assert cuda["missing"] == [] and cuda["ort_cuda"].startswith("13")
    for soname in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcudnn.so.9"):
        assert soname in cuda["libraries"], sorted(cuda["libraries"])
    pins = {r.name: r.version for r in parse_requirements(GPU_LOCK)}
    assert cuda["wheels"] == {k: pins[k] for k in cuda["wheels"]}
    assert cuda["wheels"]["nvidia-cudnn-cu13"] == pins["nvidia-cudnn-cu13"]
    assert info["device_auto"] == "cpu"


def _models(tmp: Path) -> None:
    from tilerunner import demo_models

    demo_models.write_demo_models(tmp)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, App, Path]:
    """An app folder (demo models + verbose config) and a slide, readable by uid 10001."""
    from tilerunner import demo_models, synthetic

    models = cached(f"models-{code_key(demo_models, synthetic)}", _models)
    slide_path = slide("image-test", width=4096, seed=11)
    root = tmp_path_factory.mktemp("gpu-work")
    app = App(root / "app", models)
    app.write(verbose_config(models))
    shutil.copy(slide_path, root / "slide.tiff")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    return root, app, slide_path


def _run(client: Any, image: str, root: Path, out: str, device: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `tilerunner run` in the image (no network)."""
    container = client.containers.run(
        image,
        [
            *("run", "/work/slide.tiff", "--out", f"/work/{out}", "--app-dir", "/work/app"),
            *("--device", device, "--workers", "1", "--no-progress"),
        ],
        volumes={str(root): {"bind": "/work", "mode": "rw"}},
        network_mode="none",
        detach=True,
    )
    try:
        code = int(container.wait(timeout=600)["StatusCode"])
        err = bytes(container.logs(stdout=False, stderr=True)).decode()
    finally:
        container.remove(force=True)
    return code, err.splitlines()


@pytest.mark.docker
@pytest.mark.slow
def test_device_auto_falls_back_in_one_line_and_cuda_fails_in_one_line(
    gpu_base: BaseImageBuild, docker_engine: Any, work: tuple[Path, App, Path], tmp_path: Path
) -> None:
    from tilerunner.config import load_config
    from tilerunner.pipeline import RunOptions, run

    root, app, slide_path = work
    client = docker_engine.client()
    (root / "out-cuda").mkdir(mode=0o777)
    (root / "out-cuda").chmod(0o777)
    code, lines = _run(client, gpu_base.reference, root, "out-cuda", "cuda")
    assert code == 6, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "tilerunner: error: --device cuda: CUDAExecutionProvider is installed but not usable: "
        + NO_DRIVER
    ), lines
    assert list((root / "out-cuda").iterdir()) == []  # nothing half-written

    (root / "out-auto").mkdir(mode=0o777)
    (root / "out-auto").chmod(0o777)
    code, lines = _run(client, gpu_base.reference, root, "out-auto", "auto")
    assert code == 0, lines
    fallback = [line for line in lines if "CUDA" in line]
    assert len(fallback) == 1, lines
    assert fallback[0].startswith(f"tilerunner: device: CUDA not usable ({NO_DRIVER}")
    assert fallback[0].endswith("; running on the CPU")
    assert any(line.startswith("tilerunner: done:") and " on cpu;" in line for line in lines)
    in_image = json.loads((root / "out-auto" / "breast" / "summary.json").read_text())
    report = run(
        load_config(app.config, app.root), slide_path, tmp_path / "host", RunOptions("cpu")
    )
    on_host = report.summaries["breast"]
    assert in_image["deterministic"]["device"] == "cpu"
    assert in_image["deterministic"]["features"] == on_host["deterministic"]["features"]
    assert in_image["deterministic"]["outputs"] == on_host["deterministic"]["outputs"]


# --------------------------------------------------------------------------- customer-x on GPU


def _cli_json(*args: str, env: dict[str, str], code: int = 0) -> dict[str, Any]:
    proc = run_cli(*args, "--json", env=env, timeout=900)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout)["result"])


@pytest.mark.docker
@pytest.mark.slow
def test_customer_x_gpu_image_is_built_explained_and_verified(
    gpu_base: BaseImageBuild, gpu_layout: Path, docker_engine: Any, tmp_path: Path
) -> None:
    """customer-x with `variant: [cpu, gpu]`, built on the GPU base (an OCI layout here),
    written to an OCI layout, explained and rebuilt bit for bit by `verify`."""
    repo = _customer(tmp_path, "  variant: [cpu, gpu]\n")
    env = {**docker_engine.env(), "BUILDER_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "image"
    base = f"oci:{gpu_layout}"
    args = ("--variant", "gpu", "--base-repository", base, "--oci-layout", str(out))
    built = _cli_json("build", str(repo), *args, env=env)
    version = read_version()
    assert built["base"]["repository"] == base and built["base"]["version"] == version
    rev = built["image"].rsplit("-", 1)[1]
    assert built["image"].endswith(f"/customer-x:{version}-gpu-{rev}")
    assert any(t.endswith(f"/customer-x:{version}-gpu") for t in built["tags"])
    reference = f"oci:{out}:{version}-gpu-{rev}"

    explained = _cli_json("explain", reference, env=env)
    assert explained["ok_checks"] is True, explained
    labels = explained["labels"]
    assert labels["com.ivd.runner.variant"] == "gpu"
    for key in ("com.ivd.runner.cuda", "com.ivd.runner.cudnn", "com.ivd.runner.onnxruntime"):
        assert labels[key] == gpu_base.labels[key]
    assert labels["org.opencontainers.image.base.digest"] == built["base"]["digest"]

    verified = _cli_json("verify", reference, env=env)
    assert verified["match"] is True, verified["differences"]
    assert verified["rebuilt_digest"] == built["manifest_digest"]

    # the same customer's default (first) variant is cpu: a gpu base is refused for it
    proc = run_cli("build", str(repo), "--base-repository", base, env=env)
    assert proc.returncode == 6, proc.stderr
    assert "is the gpu variant, but this build needs cpu" in proc.stderr


@pytest.mark.docker
def test_fleet_builds_every_variant_a_customer_needs(
    docker_engine: Any, oci_registry: Any, base_os_image: str, tmp_path: Path
) -> None:
    """customer.yaml `variant: [cpu, gpu]`: build-all builds both images, each on its own base
    (small labelled stand-in bases: the variant logic, not the runtime, is under test)."""
    version = "2.4.77"
    bases = push_labelled_bases(
        docker_engine, oci_registry.host, base_os_image, "fleet-variants/base", {version: "1"}
    )
    push_labelled_bases(
        docker_engine,
        oci_registry.host,
        base_os_image,
        "fleet-variants/base-gpu",
        {version: "1"},
        extra_labels={"com.ivd.runner.variant": "gpu"},
    )
    repo = _customer(tmp_path, "  variant: [cpu, gpu]\n")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet_version: 1\ncustomers:\n- name: customer-x\n  repo: {repo}\n")
    registry = f"{oci_registry.host}/fleet-variants"
    env = {
        **docker_engine.env(),
        "BUILDER_BASE_REPOSITORY": bases,
        "BUILDER_IMAGE_REGISTRY": registry,
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
    }
    commit_lock(repo, env)  # the fleet builds releases: locked
    # One plan item per image
    planned = _cli_json("plan", "--base-version", version, "--fleet", str(fleet), env=env)
    assert [(i["customer"], i["variant"]) for i in planned["items"]] == [
        ("customer-x", "cpu"),
        ("customer-x", "gpu"),
    ]
    result = _cli_json(
        "build-all", "--base-version", version, "--fleet", str(fleet), "--push", env=env
    )
    built = {r["variant"]: r for r in result["results"]}
    assert {v: r["status"] for v, r in built.items()} == {"cpu": "built", "gpu": "built"}
    cpu, gpu = built["cpu"]["report"], built["gpu"]["report"]
    assert cpu["base"]["repository"] == bases and gpu["base"]["repository"] == f"{bases}-gpu"
    rev = cpu["image"].rsplit("-", 1)[1]
    assert cpu["image"] == f"{registry}/customer-x:{version}-{rev}"
    assert gpu["image"] == f"{registry}/customer-x:{version}-gpu-{rev}"
    assert cpu["manifest_digest"] != gpu["manifest_digest"]
    # a base in the gpu repository whose label says cpu is refused for a gpu build, in one line
    plain = push_labelled_bases(
        docker_engine, oci_registry.host, base_os_image, "fleet-variants/plain-gpu", {version: "1"}
    )
    args = ("--variant", "gpu", "--base-repository", plain.removesuffix("-gpu"))
    proc = run_cli("build", str(repo), *args, env=env)
    assert proc.returncode == 6, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if "error" in x]
    assert "is the cpu variant, but this build needs gpu" in line, proc.stderr


def test_bench_script_is_ready_without_a_gpu() -> None:
    """benchmarks/gpu.py parses its arguments and refuses, in one line, to run without a GPU."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--image", "none", "--check-only"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvidia" in lines[0].lower(), proc.stderr
