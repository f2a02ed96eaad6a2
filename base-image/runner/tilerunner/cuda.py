"""Is the CUDA execution provider usable here, and if not, why (one line)?

The GPU variant of the base image carries onnxruntime-gpu and NVIDIA's CUDA/cuDNN pip wheels;
``onnxruntime.preload_dlls()`` loads those libraries from site-packages/nvidia/*/lib so that
the CUDA provider library finds them. What the image cannot carry is the NVIDIA driver
(libcuda.so.1): the host provides it (the NVIDIA container toolkit mounts it with
``docker run --gpus all``). This module loads the wheels' libraries, then asks the driver
API directly (cuInit, cuDriverGetVersion, cuDeviceGetCount) instead of letting ORT fail
deep inside session creation, so ``--device auto`` can fall back in one clear line and
``--device cuda`` can fail with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

CUDA = "CUDAExecutionProvider"
DRIVER_LIBRARY = "libcuda.so.1"
#: pip distributions whose versions `tilerunner info` reports (present in the GPU variant).
_WHEELS = (
    "onnxruntime-gpu",
    "nvidia-cuda-runtime",
    "nvidia-cublas",
    "nvidia-cufft",
    "nvidia-curand",
    "nvidia-cuda-nvrtc",
    "nvidia-nvjitlink",
    "nvidia-cudnn-cu13",
)


@dataclass(frozen=True)
class CudaStatus:
    """What ORT offers and whether CUDA can run here; `reason` is empty when usable."""

    installed: bool  # this ONNX Runtime build has the CUDA provider
    usable: bool
    reason: str
    ort_cuda: str | None = None  # CUDA version ORT was built for ("13.0")
    driver_cuda: str | None = None  # CUDA version the driver supports ("13.1"), if any
    devices: int = 0
    libraries: dict[str, str] = field(default_factory=dict)  # soname -> loaded path
    missing: tuple[str, ...] = ()  # libraries preload_dlls could not load
    wheels: dict[str, str] = field(default_factory=dict)  # distribution -> version

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for `tilerunner info`."""
        return {
            "installed": self.installed,
            "usable": self.usable,
            "reason": self.reason,
            "ort_cuda": self.ort_cuda,
            "driver_cuda": self.driver_cuda,
            "devices": self.devices,
            "libraries": dict(sorted(self.libraries.items())),
            "missing": list(self.missing),
            "wheels": dict(sorted(self.wheels.items())),
        }


def _ort_cuda_version() -> str | None:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    return str(getattr(info, "cuda_version", "") or "") or None


def _loaded_nvidia_libraries() -> dict[str, str]:
    """soname -> path of the shared objects from site-packages/nvidia mapped into this process."""
    found: dict[str, str] = {}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return found
    for line in maps:
        parts = line.split(None, 5)
        path = parts[5] if len(parts) == 6 else ""
        if "/nvidia/" in path and ".so" in path:
            found.setdefault(Path(path).name, path)
    return found


@functools.cache
def preload() -> tuple[dict[str, str], tuple[str, ...]]:
    """Load the CUDA/cuDNN wheels' libraries once: (loaded soname -> path, failed names).

    onnxruntime.preload_dlls() prints failures on stdout; they are captured, so `info --json`
    and worker logs stay clean. A CPU build of ORT has nothing to load.
    """
    import onnxruntime as ort

    fn = getattr(ort, "preload_dlls", None)
    if fn is None or not _ort_cuda_version():
        return {}, ()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as exc:  # a broken install: reported as missing, never raised here
            print(f"Failed to load nvidia libraries: {exc}")
    failed = tuple(
        line.split(":", 1)[0].removeprefix("Failed to load ").strip()
        for line in out.getvalue().splitlines()
        if line.startswith("Failed to load")
    )
    return _loaded_nvidia_libraries(), failed


def _cu_error(lib: ctypes.CDLL, rc: int) -> str:
    name = ctypes.c_char_p()
    try:
        if lib.cuGetErrorName(rc, ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode()} ({rc})"
    except AttributeError:
        pass
    return f"CUresult {rc}"


def _driver(ort_major: int | None) -> tuple[str | None, int, str]:
    """(driver CUDA version, device count, reason or "") from the CUDA driver API."""
    try:
        lib = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return (
            None,
            0,
            f"no NVIDIA driver: {DRIVER_LIBRARY} not found (a container needs a GPU and the "
            "NVIDIA container toolkit: docker run --gpus all)",
        )
    version = ctypes.c_int(0)
    rc = lib.cuDriverGetVersion(ctypes.byref(version))
    driver = f"{version.value // 1000}.{version.value % 1000 // 10}" if rc == 0 else None
    rc = lib.cuInit(0)
    if rc != 0:
        return driver, 0, f"the NVIDIA driver cannot start CUDA: cuInit: {_cu_error(lib, rc)}"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return driver, 0, f"no CUDA device: cuDeviceGetCount: {_cu_error(lib, rc)}"
    if count.value < 1:
        return driver, 0, "no CUDA device visible (check CUDA_VISIBLE_DEVICES / --gpus)"
    if ort_major is not None and version.value // 1000 < ort_major:
        return (
            driver,
            count.value,
            f"the NVIDIA driver supports CUDA {driver}, this ONNX Runtime needs CUDA "
            f"{ort_major}.x; update the host's driver",
        )
    return driver, count.value, ""


def _wheels() -> dict[str, str]:
    found = {}
    for name in _WHEELS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def cuda_status(available: list[str] | None = None) -> CudaStatus:
    """Probe the CUDA provider: installed in ORT? libraries loaded? driver and a device?"""
    import onnxruntime as ort

    providers = list(available if available is not None else ort.get_available_providers())
    ort_cuda = _ort_cuda_version()
    if CUDA not in providers:
        return CudaStatus(
            installed=False,
            usable=False,
            reason="this ONNX Runtime build has no CUDAExecutionProvider (use the gpu "
            "variant of the base image)",
            ort_cuda=ort_cuda,
            wheels=_wheels(),
        )
    libraries, missing = preload()
    major = int(ort_cuda.split(".")[0]) if ort_cuda and ort_cuda[0].isdigit() else None
    driver, devices, driver_problem = _driver(major)
    problems = [f"CUDA libraries missing: {', '.join(missing)}"] if missing else []
    reason = "; ".join([*problems, *([driver_problem] if driver_problem else [])])
    return CudaStatus(
        installed=True,
        usable=not reason,
        reason=reason,
        ort_cuda=ort_cuda,
        driver_cuda=driver,
        devices=devices,
        libraries=libraries,
        missing=missing,
        wheels=_wheels(),
    )
