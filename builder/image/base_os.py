"""The base OS of the inference base image, made without Docker Hub: Debian bookworm with
Python 3.11 by ``debootstrap`` from a Debian mirror, imported into the Docker engine.

``builder base build`` builds on :data:`BASE_OS_IMAGE` by default and makes it here when the
engine lacks it, so the base image needs nothing but a Debian mirror and PyPI (for the
wheelhouse). It stands in for ``python:3.11-slim-bookworm`` (which ``--from`` still takes):
a ``debootstrap --variant=minbase`` rootfs with python3, venv, pip and CA certificates, where
``python`` and ``pip`` resolve, ``pip install`` into the system interpreter is allowed (the PEP
668 marker is removed) and ``CMD`` is python3. The rootfs tarball is cached by a key of its
recipe (suite, packages, image settings) and reused by every later import; the test bed and
the demo use the same functions with their own cache folder.

No printing: progress goes to the optional callback (debootstrap's phases), failures raise
ImageError.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from builder.contracts import Progress, ProgressEvent
from builder.errors import ImageError
from builder.fsutil import cache_lock

#: The default ``--from`` of ``builder base build``: made here, never pulled.
BASE_OS_IMAGE: Final = "ivd/python:3.11-bookworm"
SUITE: Final = "bookworm"
PACKAGES: Final = ("python3", "python3-venv", "python3-pip", "ca-certificates")
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
#: Overrides the mirror read from /etc/apt (the test bed's older name is read too).
MIRROR_ENV: Final = ("BUILDER_DEBIAN_MIRROR", "IVD_TESTBED_DEBIAN_MIRROR")
SOURCE_DATE_EPOCH: Final = 1747699200  # 2025-05-20: mtimes in the tarball are clamped to this
CHANGES: Final = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
RECIPE_VERSION: Final = "1"  # bump when the rootfs post-processing changes
#: Label of the base OS image: the recipe key it was made from (inherited by the base images).
RECIPE_LABEL: Final = "com.ivd.base-os.recipe"
DEBOOTSTRAP_TIMEOUT: Final = 1500.0
#: debootstrap's per-package verbs, and the phase each belongs to (it validates as it retrieves).
_PHASES: Final = {
    "Retrieving": "retrieving",
    "Validating": "retrieving",
    "Extracting": "extracting",
    "Unpacking": "unpacking",
    "Configuring": "configuring",
}
#: One package's line: "I: Retrieving adduser 3.134", "I: Unpacking adduser..." (not a step
#: such as "I: Unpacking required packages..." or "I: Retrieving Packages").
_PACKAGE_STEP = re.compile(
    r"^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) (\S+?)(?:\.\.\.| \S*\d\S*)\s*$"
)


def recipe_key() -> str:
    """Short hash of everything that shapes the rootfs; names the cached tarball."""
    text = "|".join((RECIPE_VERSION, SUITE, "minbase", *PACKAGES, *CHANGES))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in [*text.splitlines(), ""]:
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            if current:
                stanzas.append(current)
            current = {}
        elif ":" in line and not line[0].isspace():
            key, value = line.split(":", 1)
            current[key.strip().lower()] = value.strip()
    return stanzas


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for bookworm ($BUILDER_DEBIAN_MIRROR wins)."""
    for name in MIRROR_ENV:
        if os.environ.get(name):
            return os.environ[name]
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in lists:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for st in _deb822_stanzas(path.read_text()):
            enabled = st.get("enabled", "yes").lower() != "no"
            if (
                enabled
                and "deb" in st.get("types", "").split()
                and SUITE in st.get("suites", "").split()
            ):
                return st.get("uris", DEFAULT_MIRROR).split()[0]
    return DEFAULT_MIRROR


def _clean_rootfs(root: Path) -> None:
    """Make the rootfs look like a slim image: no apt caches/logs, python aliases, pip allowed."""
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for p in root.glob(pattern):
            if p.is_file():
                p.unlink()
    for name in (
        "bootstrap.log",
        "dpkg.log",
        "alternatives.log",
        "apt/history.log",
        "apt/term.log",
    ):
        (root / "var/log" / name).unlink(missing_ok=True)
    for name in ("etc/resolv.conf", "etc/hostname", "var/cache/ldconfig/aux-cache"):
        (root / name).unlink(missing_ok=True)
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    local_bin = root / "usr/local/bin"
    local_bin.mkdir(parents=True, exist_ok=True)
    for alias, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        link = local_bin / alias
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target)


def unmount_under(root: Path) -> None:
    """Lazily unmount every mount point below `root` (a failed debootstrap leaves proc/sys)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(root).rstrip("/") + "/"
    points = [m.split()[1] for m in mounts if len(m.split()) > 1]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def debootstrap_progress(lines: Iterable[str], progress: Progress | None, log: Any) -> None:
    """Copy debootstrap's output to ``log``; report its steps (``I: Resolving dependencies``,
    ``I: Installing core packages``, ...) and, for each run over the packages (retrieving,
    extracting, unpacking, configuring), how many packages it handled in how long."""
    phase, count, started = "", 0, time.monotonic()

    def report() -> None:
        if phase and progress:
            seconds = time.monotonic() - started
            progress(ProgressEvent(stage=f"debootstrap: {phase} {count} packages, {seconds:.0f} s"))

    for line in lines:
        log.write(line)
        if not line.startswith("I: "):
            continue
        step = _PACKAGE_STEP.match(line)
        if step is None:
            report()
            phase = ""
            if progress:
                progress(ProgressEvent(stage=f"debootstrap: {line[3:].strip().rstrip('.')}"))
            continue
        verb = _PHASES[step.group(1)]
        if verb != phase:
            report()
            phase, count, started = verb, 0, time.monotonic()
        count += verb != "retrieving" or step.group(1) == "Retrieving"
    report()


def rootfs_tarball(
    cache: Path, *, mirror: str | None = None, progress: Progress | None = None
) -> Path:
    """The cached rootfs tarball under ``cache``, made with debootstrap on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{SUITE}-python3-{recipe_key()}.tar"
    with cache_lock(Path(f"{tarball}.lock"), DEBOOTSTRAP_TIMEOUT + 300, ImageError):
        if tarball.is_file():
            return tarball
        debootstrap = shutil.which("debootstrap") or shutil.which(
            "debootstrap", path="/usr/sbin:/sbin"
        )
        if debootstrap is None:
            raise ImageError(
                "making the base OS needs debootstrap, which is not installed",
                hint="apt-get install debootstrap (scripts/bootstrap.sh installs it), "
                "or pass --from an image the Docker engine has",
            )
        if os.geteuid() != 0:
            raise ImageError(
                "making the base OS with debootstrap needs root",
                hint="run as root once (the tarball is cached), or pass --from an image the "
                "Docker engine has",
            )
        source = mirror or apt_mirror()
        if progress:
            progress(
                ProgressEvent(
                    stage=f"debootstrap {SUITE} from {source} (once; cached in {cache}, "
                    "about 3 minutes)"
                )
            )
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
        log = cache / "debootstrap.log"
        root = work / "root"
        cmd = [
            debootstrap, "--variant=minbase", "--include=" + ",".join(PACKAGES),
            SUITE, str(root), source,
        ]  # fmt: skip
        try:
            _run_debootstrap(cmd, log, progress)
            _clean_rootfs(root)
            partial = work / "rootfs.tar"
            subprocess.run(
                [
                    "tar", "--sort=name", "--numeric-owner", "--owner=0", "--group=0",
                    f"--mtime=@{SOURCE_DATE_EPOCH}", "--clamp-mtime",
                    "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*",
                    "-C", str(root), "-cf", str(partial), ".",
                ],
                check=True, timeout=600, capture_output=True,
            )  # fmt: skip
            partial.replace(tarball)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ImageError(f"making the base OS tarball failed: {exc}") from None
        finally:
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def _run_debootstrap(cmd: list[str], log: Path, progress: Progress | None) -> None:
    """Run debootstrap with its output in ``log`` and its phases reported; ImageError on failure."""
    with log.open("w", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + DEBOOTSTRAP_TIMEOUT
        try:
            debootstrap_progress(proc.stdout, progress, out)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ImageError(
                f"debootstrap did not finish in {DEBOOTSTRAP_TIMEOUT:.0f} s (log: {log})"
            ) from None
    if proc.returncode != 0:
        raise ImageError(
            f"debootstrap failed (exit {proc.returncode}): {_tail(log)}",
            hint=f"see {log}; a different mirror: --debian-mirror URL or BUILDER_DEBIAN_MIRROR",
        )


def ensure_base_os(
    docker_client: Any,
    cache: Path,
    *,
    tag: str = BASE_OS_IMAGE,
    mirror: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Import the base OS image into the engine as ``tag`` unless it is there (same recipe)."""
    from docker.errors import DockerException

    key = recipe_key()
    try:
        if (docker_client.images.get(tag).labels or {}).get(RECIPE_LABEL) == key:
            return tag
    except DockerException:
        pass
    tarball = rootfs_tarball(cache, mirror=mirror, progress=progress)
    if progress:
        progress(ProgressEvent(stage=f"importing {tarball.name} into the engine as {tag}"))
    repository, _, version = tag.rpartition(":")
    try:
        docker_client.api.import_image(
            src=str(tarball),
            repository=repository,
            tag=version,
            changes=[*CHANGES, f"LABEL {RECIPE_LABEL}={key}"],
        )
        docker_client.images.get(tag)
    except DockerException as exc:
        raise ImageError(f"importing {tarball} as {tag} failed: {exc}") from None
    return tag
