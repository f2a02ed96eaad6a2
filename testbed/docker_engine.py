"""A Docker engine for tests: reuse one that answers, else start a private ``dockerd``.

The private daemon runs without a bridge and without iptables (``--bridge=none``), so
containers must use ``network_mode="host"`` (loopback services are reachable) or
``network_mode="none"``; the default bridge network does not exist. Its data root lives in
the machine-wide cache, so imported and pulled images survive between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from filelock import FileLock

from builder.image.base_os import unmount_under
from testbed._util import (
    Service,
    ServiceError,
    cache_root,
    ensure_command,
    pid_alive,
    spawn,
    stop_process,
    wait_until,
)

START_TIMEOUT = 120.0
SYSTEM_SOCKET = "unix:///var/run/docker.sock"


def _answers(host: str) -> bool:
    """True if a Docker engine answers a ping at `host` within a few seconds."""
    try:
        client = docker.DockerClient(base_url=host, timeout=5)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _lock() -> FileLock:
    """Serialises start, reuse and stop of the private dockerd between test-bed runs."""
    return FileLock(str(cache_root() / "dockerd.lock"), timeout=START_TIMEOUT + 120)


def _lease_dir() -> Path:
    leases = cache_root() / "dockerd.leases"
    leases.mkdir(exist_ok=True)
    return leases


def _read_state() -> dict[str, Any] | None:
    try:
        state = json.loads((cache_root() / "dockerd.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


@dataclass
class Engine(Service):
    """A Docker engine the test bed talks to.

    `started` is true in the run that started the private dockerd. Runs that use the
    private dockerd hold a lease on it; the last one to stop() shuts it down, so concurrent
    test runs on one machine can share it. Other engines (DOCKER_HOST, the system socket)
    are never stopped.
    """

    host: str
    started: bool = False
    log: Path | None = None
    _lease: str | None = field(default=None, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def client(self, timeout: int = 600) -> docker.DockerClient:
        """A new docker SDK client for this engine (the caller closes it)."""
        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def env(self) -> dict[str, str]:
        """Environment for subprocesses that should use this engine."""
        return {"DOCKER_HOST": self.host}

    def stop(self) -> None:
        """Release our lease; stop the private dockerd if no other live run holds one."""
        if self._lease is None:
            return
        with _lock():
            (_lease_dir() / self._lease).unlink(missing_ok=True)
            self._lease = None
            for lease in _lease_dir().iterdir():
                pid = lease.name.partition(".")[0]
                if pid.isdigit() and pid_alive(int(pid)):
                    return  # another user still holds a lease; the last one stops it
                lease.unlink(missing_ok=True)
            state = _read_state()
            if state and state.get("host") == self.host:
                _shutdown(state, self._proc)
        self._proc = None


def _is_dockerd_of(pid: int, rundir: Path) -> bool:
    """True if `pid` is the dockerd we started with `rundir` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and cmdline[0].endswith(b"dockerd")
        and str(rundir).encode() in b" ".join(cmdline)
    )


def _shutdown(state: dict[str, Any], proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the private dockerd described by `state`, wait, clean its run dir."""
    pid = int(state.get("pid", 0))
    rundir = Path(str(state.get("rundir", "")))
    if proc is not None and proc.pid == pid:
        stop_process(proc, timeout=45)
    elif pid > 0 and pid_alive(pid) and _is_dockerd_of(pid, rundir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 45
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):  # still ours (alive, so the id was not reused): kill its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    (cache_root() / "dockerd.json").unlink(missing_ok=True)
    if rundir.name.startswith("ivd-dockerd-"):
        unmount_under(rundir)  # dockerd leaves its netns bind mount behind
        shutil.rmtree(rundir, ignore_errors=True)


def _dockerd_flags(dockerd: str) -> set[str]:
    try:
        out = subprocess.run(
            [dockerd, "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {w.split("=")[0].rstrip(",") for w in (out.stdout + out.stderr).split() if w[:2] == "--"}


def ensure_engine(timeout: float = START_TIMEOUT) -> Engine:
    """Return an engine that answers: $DOCKER_HOST, the system socket, the private dockerd
    (shared with other test-bed runs on this machine), or a newly started private dockerd."""
    for host in (os.environ.get("DOCKER_HOST", ""), SYSTEM_SOCKET):
        if host and _answers(host):
            return Engine(host=host)
    with _lock():
        state = _read_state()
        if state and _answers(str(state.get("host"))):
            engine = Engine(host=str(state["host"]))
        else:
            if state:  # a dead or wedged one from an aborted run
                _shutdown(state, None)
            engine = _start_dockerd(timeout)
        engine._lease = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
        (_lease_dir() / engine._lease).touch()
        return engine


def _start_dockerd(timeout: float) -> Engine:
    """Start the private dockerd (installing Debian docker.io if needed) and wait for it."""
    dockerd = ensure_command("dockerd", "docker.io")
    if os.geteuid() != 0:
        raise ServiceError("starting dockerd needs root; or set DOCKER_HOST to a running engine")
    data_root = cache_root() / "docker"
    data_root.mkdir(parents=True, exist_ok=True)
    # Short path: unix socket paths (ours and containerd's under exec-root) are length-limited.
    rundir = Path(tempfile.mkdtemp(prefix="ivd-dockerd-", dir="/tmp"))
    (rundir / "daemon.json").write_text("{}\n")  # ignore /etc/docker/daemon.json
    host = f"unix://{rundir / 'docker.sock'}"
    log = rundir / "dockerd.log"
    cmd = [
        dockerd,
        f"--config-file={rundir / 'daemon.json'}",
        f"--data-root={data_root}",
        f"--exec-root={rundir / 'exec'}",
        f"--pidfile={rundir / 'docker.pid'}",
        f"--host={host}",
        "--iptables=false",
        "--bridge=none",
    ]
    if "--ip6tables" in _dockerd_flags(dockerd):
        cmd.append("--ip6tables=false")
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"}
    env.pop("DOCKER_HOST", None)
    # Not tied to our lifetime: a concurrent run may still hold a lease when we finish.
    proc = spawn(cmd, log, env=env, die_with_parent=False)
    state = {"host": host, "pid": proc.pid, "rundir": str(rundir)}
    try:
        wait_until(lambda: _answers(host), timeout=timeout, what="dockerd", proc=proc, log=log)
    except BaseException:
        _shutdown(state, proc)
        raise
    (cache_root() / "dockerd.json").write_text(json.dumps(state) + "\n")
    return Engine(host=host, started=True, log=log, _proc=proc)


HELD_LEASE = "held"  # a lease named <dockerd pid>.held lives as long as that dockerd


def hold() -> str:
    """Start or reuse an engine for a user's shell (scripts/dockerd); its DOCKER_HOST.

    A private dockerd gets a lease named after its own pid, so it outlives this process and
    test runs that end meanwhile do not stop it; :func:`release` gives that lease back."""
    engine = ensure_engine()
    if engine._lease is not None:
        with _lock():
            state = _read_state() or {}
            (_lease_dir() / engine._lease).unlink(missing_ok=True)
            (_lease_dir() / f"{state.get('pid', os.getpid())}.{HELD_LEASE}").touch()
    return engine.host


def release() -> None:
    """Give back the lease :func:`hold` took; stop the private dockerd if nothing else holds it."""
    for lease in _lease_dir().glob(f"*.{HELD_LEASE}"):
        lease.unlink(missing_ok=True)
    state = _read_state()
    if state:
        Engine(host=str(state["host"]), _lease=f"{os.getpid()}.release").stop()


def main(argv: list[str] | None = None) -> int:
    """``start`` (default): print ``export DOCKER_HOST=...`` for an engine that answers;
    ``stop``: release it (scripts/dockerd)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["stop"]:
        release()
        print("unset DOCKER_HOST")
        return 0
    if args and args[0] not in ("start",):
        print("usage: scripts/dockerd [start|stop]", file=sys.stderr)
        return 2
    try:
        host = hold()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"export DOCKER_HOST={host}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
