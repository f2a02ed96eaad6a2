"""Starters for the real services the tests and the demo run against.

Each module starts one real thing on loopback (or reuses one that already answers), waits
until it answers within a bounded time, and stops only what it started:

- :mod:`testbed.docker_engine` -- a Docker engine (Debian ``docker.io``)
- :mod:`testbed.registry` -- a CNCF distribution registry (Debian ``docker-registry``)
- :mod:`testbed.s3` -- moto in server mode
- :mod:`testbed.clearml_emulator` -- the clearml-server REST endpoints the SDK calls
- :mod:`testbed.base_os` -- a debootstrapped bookworm image standing in for python:3.11-slim
- :mod:`testbed.rabbitmq` -- a private Debian ``rabbitmq-server`` node

Missing Debian packages are installed with ``apt-get install -y`` on first use.
"""

from testbed._util import ServiceError, cache_root

__all__ = ["ServiceError", "cache_root"]
