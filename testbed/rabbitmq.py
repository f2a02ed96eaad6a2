"""A private RabbitMQ node (Debian ``rabbitmq-server``) on free loopback ports.

It gets its own epmd (on a free port, started and stopped by us), its own Erlang
distribution port, node name, mnesia and log dirs and cookie, so it neither collides with
nor touches a system broker. Guest/guest is allowed because clients connect from loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testbed._util import (
    Service,
    ServiceError,
    ensure_command,
    free_port,
    spawn,
    stop_process,
    wait_until,
)

START_TIMEOUT = 120.0
SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # the Debian wrapper su's away
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def amqp_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True if an AMQP 0-9-1 broker answers the protocol header with Connection.Start."""
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.settimeout(2)
        sock.sendall(AMQP_HEADER)
        frame = sock.recv(7)
        return len(frame) == 7 and frame[0] == 1  # frame type 1 = method frame


def _port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@dataclass
class RabbitMQ(Service):
    """A running broker we started."""

    port: int
    root: Path
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """AMQP URL, e.g. amqp://guest:guest@127.0.0.1:PORT/."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log(self) -> Path:
        """The broker's console log."""
        return self.root / "rabbitmq.log"

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop the broker node (keeping epmd and the data) and start it again on the same port."""
        stop_process(self._procs.pop(), timeout=30)
        self._procs.append(spawn([str(SERVER_SCRIPT)], self.log, env=self._env, cwd=self.root))
        wait_until(
            lambda: amqp_answers(self.port),
            timeout=timeout, what="rabbitmq-server (restarted)", proc=self._procs[-1], log=self.log,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the broker, then its epmd, then delete its data."""
        for proc in reversed(self._procs):
            stop_process(proc, timeout=30)
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def start_rabbitmq(timeout: float = START_TIMEOUT) -> RabbitMQ:
    """Start rabbitmq-server (installing it if needed) and wait until it speaks AMQP."""
    ensure_command("rabbitmq-server", "rabbitmq-server")
    epmd = ensure_command("epmd", "erlang-base")
    if not SERVER_SCRIPT.is_file():
        raise ServiceError(f"{SERVER_SCRIPT} is missing; reinstall the rabbitmq-server package")
    root = Path(tempfile.mkdtemp(prefix="ivd-rabbitmq-"))
    (root / "home").mkdir()
    (root / "enabled_plugins").write_text("[].\n")
    amqp_port, dist_port, epmd_port = free_port(), free_port(), free_port()
    (root / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n")
    env = {
        **os.environ,
        "HOME": str(root / "home"),  # the Erlang cookie lands here
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODENAME": f"ivd-testbed-{amqp_port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    broker = RabbitMQ(port=amqp_port, root=root, _env=env)
    try:
        broker._procs.append(spawn([epmd, "-port", str(epmd_port)], root / "epmd.log", env=env))
        # erl would start an epmd of its own (not ours to stop) if ours were not up yet
        wait_until(
            lambda: _port_open(epmd_port),
            timeout=15, what="epmd", proc=broker._procs[0], log=root / "epmd.log",
        )  # fmt: skip
        broker._procs.append(spawn([str(SERVER_SCRIPT)], broker.log, env=env, cwd=root))
        wait_until(
            lambda: amqp_answers(amqp_port),
            timeout=timeout, what="rabbitmq-server", proc=broker._procs[-1], log=broker.log,
        )  # fmt: skip
    except BaseException:
        broker.stop()
        raise
    return broker
