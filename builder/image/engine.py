"""The Docker engine, for the few jobs it is the right tool for (building the base image,
``--load``, the docker backend): reached once, or refused in one line that says what to start.
"""

from __future__ import annotations

import os
from typing import Any, Final

from builder.errors import ImageError

#: Where the docker SDK looks when DOCKER_HOST is not set.
DEFAULT_HOST: Final = "unix:///var/run/docker.sock"
#: What to start when no engine answers (the README's "Building the base images" says more).
START_HINT: Final = (
    "start the Docker engine (`systemctl start docker`) or set DOCKER_HOST to a running one; "
    'in a checkout of the builder, `eval "$(bash scripts/dockerd)"` starts a private one'
)


def docker_client(timeout: int, *, needed_for: str = "") -> Any:
    """A docker SDK client of the engine at DOCKER_HOST (or the default socket), pinged once.

    ImageError in one line when none answers, naming the address tried and ``needed_for``
    (what the engine is needed for), with what to start as the hint.
    """
    import docker
    from docker.errors import DockerException

    host = os.environ.get("DOCKER_HOST") or DEFAULT_HOST
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (DockerException, OSError) as exc:
        where = "" if os.environ.get("DOCKER_HOST") else " (DOCKER_HOST is not set)"
        purpose = f"; {needed_for}" if needed_for else ""
        raise ImageError(
            f"no Docker engine at {host}{where}: {_reason(exc)}{purpose}", hint=START_HINT
        ) from None
    return client


def _reason(exc: Exception) -> str:
    """Why the engine did not answer, in a few words (the SDK nests the socket error twice)."""
    text = " ".join(str(exc).split())
    for marker, words in (
        ("FileNotFoundError", "no such socket"),
        ("ConnectionRefusedError", "connection refused"),
        ("Connection refused", "connection refused"),
        ("PermissionError", "permission denied on the socket"),
        ("timed out", "it did not answer in time"),
    ):
        if marker in text:
            return words
    return text if len(text) <= 160 else text[:157] + "..."
