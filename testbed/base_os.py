"""The base OS image standing in for ``python:3.11-slim-bookworm`` (no Docker Hub here).

A ``debootstrap --variant=minbase`` bookworm rootfs with python3, venv, pip and CA
certificates, tarred once into the machine-wide cache and ``docker import``-ed as
:data:`IMAGE`. Like the real image, ``python`` and ``pip`` resolve, ``pip install`` into
the system interpreter is allowed (the PEP 668 marker is removed), and ``CMD`` is python3.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from filelock import FileLock

from testbed._util import ServiceError, cache_root, ensure_command, tail, unmount_under
from testbed.docker_engine import Engine
from testbed.registry import Registry

IMAGE = "ivd-testbed/python:3.11-slim-bookworm"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SOURCE_DATE_EPOCH = 1747699200  # 2025-05-20: mtimes in the tarball are clamped to this
CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
RECIPE_VERSION = "1"  # bump when the rootfs post-processing changes
DEBOOTSTRAP_TIMEOUT = 1500.0
RECIPE_LABEL = "org.ivd.testbed.recipe"


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


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses for bookworm ($IVD_TESTBED_DEBIAN_MIRROR wins)."""
    if os.environ.get("IVD_TESTBED_DEBIAN_MIRROR"):
        return os.environ["IVD_TESTBED_DEBIAN_MIRROR"]
    etc = Path("/etc/apt")
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


def rootfs_tarball(mirror: str | None = None) -> Path:
    """Path of the cached rootfs tarball, building it with debootstrap on first use."""
    base = cache_root() / "base-os"
    base.mkdir(parents=True, exist_ok=True)
    tarball = base / f"{SUITE}-python3-{recipe_key()}.tar"
    with FileLock(str(tarball) + ".lock", timeout=DEBOOTSTRAP_TIMEOUT + 300):
        if tarball.is_file():
            return tarball
        debootstrap = ensure_command("debootstrap", "debootstrap")
        tar = ensure_command("tar", "tar")
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=base))
        log = base / "debootstrap.log"
        root = work / "root"
        cmd = [
            debootstrap, "--variant=minbase", "--include=" + ",".join(PACKAGES),
            SUITE, str(root), mirror or apt_mirror(),
        ]  # fmt: skip
        try:
            with log.open("wb") as out:
                try:
                    done = subprocess.run(
                        cmd, stdout=out, stderr=subprocess.STDOUT,
                        timeout=DEBOOTSTRAP_TIMEOUT, check=False,
                    )  # fmt: skip
                except subprocess.TimeoutExpired as exc:
                    raise ServiceError(f"debootstrap timed out:\n{tail(log)}") from exc
            if done.returncode != 0:
                raise ServiceError(f"debootstrap failed ({done.returncode}):\n{tail(log)}")
            _clean_rootfs(root)
            partial = work / "rootfs.tar"
            subprocess.run(
                [
                    tar, "--sort=name", "--numeric-owner", "--owner=0", "--group=0",
                    f"--mtime=@{SOURCE_DATE_EPOCH}", "--clamp-mtime",
                    "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*",
                    "-C", str(root), "-cf", str(partial), ".",
                ],
                check=True, timeout=600, capture_output=True,
            )  # fmt: skip
            partial.replace(tarball)
        finally:
            unmount_under(work)  # a failed debootstrap can leave proc/sys mounted
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def ensure_base_image(engine: Engine, tag: str = IMAGE) -> str:
    """Import the base OS image into `engine` unless it is already there; return `tag`."""
    key = recipe_key()
    client = engine.client()
    try:
        try:
            image = client.images.get(tag)
            if (image.labels or {}).get(RECIPE_LABEL) == key:
                return tag
        except Exception:
            pass
        tarball = rootfs_tarball()
        repository, _, version = tag.rpartition(":")
        client.api.import_image(
            src=str(tarball),
            repository=repository,
            tag=version,
            changes=[*CHANGES, f"LABEL {RECIPE_LABEL}={key}"],
        )
        try:
            client.images.get(tag)
        except Exception as exc:
            raise ServiceError(f"docker import of {tarball} did not create {tag}: {exc}") from exc
        return tag
    finally:
        client.close()


def push_to(
    engine: Engine, registry: Registry, tag: str = IMAGE, repository: str | None = None
) -> str:
    """Tag `tag` into `registry` and push it with the engine; return ``host/repo@sha256:...``."""
    repo_path = repository or tag.rpartition(":")[0]
    version = tag.rpartition(":")[2]
    target = f"{registry.host}/{repo_path}"
    client = engine.client()
    try:
        client.images.get(tag).tag(target, version)
        auth = registry.auth_config()
        error = ""
        for line in client.api.push(
            target, tag=version, stream=True, decode=True, auth_config=auth
        ):
            error = error or str(line.get("error", ""))
        if error:
            raise ServiceError(f"push of {target}:{version} failed: {error}")
        digest = client.images.get_registry_data(f"{target}:{version}", auth_config=auth).id
        return f"{target}@{digest}"
    finally:
        client.close()
