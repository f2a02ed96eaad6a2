"""Image references: ``registry/path[:tag][@digest]``, repositories, and when plain HTTP is used."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from builder.errors import ImageError
from builder.oci.descriptor import check_digest

_LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost"})


@dataclass(frozen=True)
class Reference:
    """A parsed image reference ``registry/path[:tag][@digest]``."""

    registry: str
    path: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.path}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def repository(self) -> str:
        """``registry/path`` without tag or digest."""
        return f"{self.registry}/{self.path}"


def split_repository(repository: str) -> tuple[str, str]:
    """Split ``host[:port]/path`` into host and path; the host part is mandatory."""
    if "://" in repository:
        raise ImageError(f"{repository!r}: give the repository without a URL scheme")
    host, _, path = repository.partition("/")
    if not path or not ("." in host or ":" in host or host == "localhost" or host.startswith("[")):
        raise ImageError(
            f"{repository!r} does not name a registry",
            hint="use a full repository such as registry.example.com/ivd/inference-base",
        )
    if path != path.lower() or path.startswith("/") or path.endswith("/") or "//" in path:
        raise ImageError(f"invalid repository path {path!r} in {repository!r}")
    return host, path


def parse_reference(ref: str) -> Reference:
    """Parse a full reference ``registry/path:tag`` (or ``@sha256:...``)."""
    name, _, digest = ref.partition("@")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
    host, path = split_repository(name)
    if digest:
        check_digest(digest)
    return Reference(host, path, tag or None, digest or None)


def is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` is this machine (plain HTTP is then allowed automatically)."""
    name = host
    if name.startswith("["):
        name = name[1 : name.index("]")]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def use_plain_http(host: str, insecure: bool | None) -> bool:
    """HTTP for loopback registries (``insecure=None``) or when asked; HTTPS otherwise."""
    return is_loopback(host) if insecure is None else insecure
