"""Small helpers shared by the service starters: ports, cache dir, apt, waiting, stopping."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from filelock import FileLock

APT_TIMEOUT = 900.0  # seconds for one apt-get run


class ServiceError(RuntimeError):
    """A test-bed service could not be installed, started or reached."""


class Service:
    """A started service handle; ``with start_x() as x:`` stops it at the end of the block."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def cache_root() -> Path:
    """Machine-wide cache: $IVD_TESTBED_CACHE, else $XDG_CACHE_HOME/ivd-testbed, else ~/.cache."""
    env = os.environ.get("IVD_TESTBED_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(xdg) / "ivd-testbed"
    root.mkdir(parents=True, exist_ok=True)
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    try:
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"`{' '.join(cmd)}` failed: {exc}") from exc


def ensure_command(command: str, package: str) -> str:
    """Path of `command`; installs Debian `package` with apt-get when it is missing."""
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        raise ServiceError(f"{command} is missing; install it with: apt-get install -y {package}")
    with FileLock(str(cache_root() / "apt.lock"), timeout=APT_TIMEOUT):
        install = ("install", "-y", "--no-install-recommends", package)
        result = _apt_get(*install)
        if result.returncode != 0:  # most often: no package lists yet on a fresh machine
            _apt_get("update")
            result = _apt_get(*install)
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if result.returncode != 0 or not found:
        raise ServiceError(
            f"apt-get install -y {package} did not provide {command} "
            f"(exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    return found


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    interval: float = 0.2,
) -> None:
    """Poll `check` until it is true; raise ServiceError with the log tail on timeout or exit."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            why = f"exited with code {proc.returncode}"
            break
        if time.monotonic() > deadline:
            why = f"did not answer within {timeout:.0f} s"
            break
        time.sleep(interval)
    detail = f"\n--- last lines of {log} ---\n{tail(log)}" if log else ""
    raise ServiceError(f"{what} {why}{detail}")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM the child when the test process dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def spawn(
    cmd: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout: Path | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a service in its own session, its output appended to `log` (stdout to `stdout`
    if given); unless told otherwise it is SIGTERMed when the test process dies."""
    with log.open("ab") as err, (stdout or log).open("ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509
        )


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM a process we started, wait, then SIGKILL its process group if it lingers.

    The process must have been started with ``start_new_session=True`` so that its group
    holds only what it spawned. The group is killed only while the leader is still unreaped,
    so the group id cannot have been reused by an unrelated process.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
