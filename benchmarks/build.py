"""Benchmark: the default backend (no daemon) against the docker backend, cold and after a base bump.

Runs on the test bed (a Docker engine, a loopback registry, the base OS image): builds an
image of N models of M MiB of incompressible weights plus a config layer with both backends,
pushes each to its own repository, then rebuilds after a config-only change. Numbers are
ratios against baselines measured in the same run: ``sha256sum`` over the weights (reading
and hashing the inputs once) and the docker backend (Dockerfile + docker SDK build and push).

    .venv/bin/python benchmarks/build.py [--models 2 --size-mb 500 --customers 10]

It measures the three figures of the README: (1) cold build and push, default vs docker
backend; (2) after a base image bump, rebuild and push of every customer sharing the models:
time and bytes uploaded per customer; (3) hashing and layer-writing throughput of the default
backend against `sha256sum` of the same files (the machine's limit).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.assemble import BaseImage, FileEntry, LayerSpec, assemble, resolve_base  # noqa: E402
from builder.deliver import push  # noqa: E402
from builder.docker_backend import build_with_docker, push_with_docker  # noqa: E402
from builder.oci import BlobStore  # noqa: E402
from testbed.base_os import ensure_base_image  # noqa: E402
from testbed.docker_engine import ensure_engine  # noqa: E402
from testbed.registry import start_registry  # noqa: E402

T = TypeVar("T")
SDE = 1_700_000_000
Weights = dict[str, list[tuple[Path, str]]]


def make_weights(directory: Path, models: int, size_mb: int) -> Weights:
    """Incompressible weight files (like float tensors) and their sha256, per model."""
    out: Weights = {}
    for i in range(models):
        name = f"model{i}"
        path = directory / f"{name}.onnx"
        sha = hashlib.sha256()
        with path.open("wb") as file:
            for _ in range(size_mb):
                block = os.urandom(1 << 20)
                sha.update(block)
                file.write(block)
        meta = directory / f"{name}.json"
        meta.write_bytes(b'{"classes": ["benign", "tumour"]}\n')
        out[name] = [(path, sha.hexdigest()), (meta, hashlib.sha256(meta.read_bytes()).hexdigest())]
    return out


def layer_specs(weights: Weights, config: bytes) -> list[LayerSpec]:
    """One layer per model (sha256 known, as from the fetch cache) and the config layer."""
    layers = [
        LayerSpec(
            name,
            [FileEntry(f"/app/models/{name}/{p.name}", p, 0o644, sha) for p, sha in files],
        )
        for name, files in weights.items()
    ]
    layers.append(LayerSpec("config", [FileEntry("/app/config/analysis.yaml", config)]))
    return layers


@dataclass
class Bench:
    """One benchmark run: the services, the base image and the timings."""

    client: Any
    registry_host: str
    base: BaseImage
    work: Path
    times: dict[str, float] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    uploaded: dict[str, int] = field(default_factory=dict)
    docker_tags: list[str] = field(default_factory=list)
    run: str = field(default_factory=lambda: secrets.token_hex(3))

    def timed(self, name: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = call()
        self.times[name] = time.perf_counter() - start
        return out

    def default(
        self,
        name: str,
        layers: Sequence[LayerSpec],
        store: BlobStore,
        *,
        repo: str = "default",
        push_it: bool = True,
    ) -> None:
        """Assemble (and push) with the default backend."""
        image = self.timed(
            f"{name}/assemble",
            lambda: assemble(
                self.base, layers, labels={}, annotations={}, source_date_epoch=SDE, store=store
            ),
        )
        self.digests[name] = image.manifest_digest
        if push_it:
            target = f"{self.registry_host}/bench-{self.run}/{repo}:{name}"
            report = self.timed(f"{name}/push", lambda: push(image, [target]))
            self.uploaded[name] = report.bytes_uploaded

    def docker(self, name: str, layers: Sequence[LayerSpec], *, repo: str = "docker") -> None:
        """Build and push with the docker backend."""
        tag = f"ivd-bench/docker:{self.run}-{name}"
        self.docker_tags.append(tag)
        self.timed(
            f"{name}/assemble",
            lambda: build_with_docker(
                self.base, layers, labels={}, source_date_epoch=SDE, client=self.client, tag=tag
            ),
        )
        target = f"{self.registry_host}/bench-{self.run}/docker-{repo}:{name}"
        self.timed(f"{name}/push", lambda: push_with_docker(self.client, tag, [target]))

    def total(self, name: str) -> float:
        return self.times[f"{name}/assemble"] + self.times[f"{name}/push"]


def report(bench: Bench, args: argparse.Namespace) -> list[str]:
    """The result table: absolute seconds, and ratios against the same-run baselines."""
    t = bench.times
    sha = t["sha256sum"]
    kib = 1024
    n, nd = args.customers, args.docker_customers
    default_rebuild = sum(bench.total(f"bump-{i}") for i in range(n)) / n
    docker_rebuild = sum(bench.total(f"docker-bump-{i}") for i in range(nd)) / nd
    uploads = [bench.uploaded[f"bump-{i}"] for i in range(n)]
    same = bench.digests["throughput"] == bench.digests["cold"]
    return [
        f"{args.models} models x {args.size_mb} MiB = {args.models * args.size_mb} MiB of incompressible weights",
        f"1. cold build+push: default {bench.total('cold'):7.2f} s, docker {bench.total('docker-cold'):7.2f} s"
        f"  -> default is {bench.total('docker-cold') / bench.total('cold'):5.1f}x faster (target >= 3x)",
        f"2. base bump 2.4.1 -> 2.4.2, rebuild+push per customer: default {default_rebuild:6.2f} s "
        f"(mean of {n}), docker {docker_rebuild:6.2f} s (mean of {nd})"
        f"  -> default is {docker_rebuild / default_rebuild:5.1f}x faster (target >= 20x)",
        f"   bytes uploaded per customer (default): max {max(uploads) / kib:.1f} KiB, "
        f"min {min(uploads) / kib:.1f} KiB (target < 64 KiB: manifest + config only)",
        f"3. sha256sum of the weights {sha:6.2f} s; hashing + layer writing {t['throughput/assemble']:6.2f} s"
        f"  -> {sha / t['throughput/assemble'] * 100:5.1f}% of sha256sum throughput (target >= 80%)",
        f"   same inputs, fresh blob store: manifest digest {'equal' if same else 'DIFFERENT'}",
    ]


def _push_base(client: Any, repository: str, base_os: str) -> None:
    """Base 2.4.1 (the test bed OS image) and 2.4.2 (one more small layer), both in the registry."""
    client.images.get(base_os).tag(repository, "2.4.1")
    dockerfile = f"FROM {repository}:2.4.1\nRUN echo 2.4.2 > /etc/ivd-base-version\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repository}:2.4.2", rm=True)
    for tag in ("2.4.1", "2.4.2"):
        for event in client.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise RuntimeError(f"pushing the base image failed: {event['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="default vs docker backend build benchmark")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--size-mb", type=int, default=500, help="MiB of weights per model")
    parser.add_argument(
        "--customers", type=int, default=10, help="customers rebuilt after the base bump"
    )
    parser.add_argument(
        "--docker-customers", type=int, default=2, help="of which also with the docker backend"
    )
    args = parser.parse_args(argv)

    engine = ensure_engine()
    registry = start_registry()
    client = engine.client()
    work = Path(tempfile.mkdtemp(prefix="ivd-bench-"))
    bench: Bench | None = None
    try:
        target = f"{registry.host}/ivd/inference-base"
        _push_base(client, target, ensure_base_image(engine))
        old, new = resolve_base(target, "2.4.1"), resolve_base(target, "2.4.2")
        bench = Bench(client, registry.host, old, work)
        (work / "weights").mkdir()
        weights = make_weights(work / "weights", args.models, args.size_mb)
        files = [str(p) for entries in weights.values() for p, _ in entries]
        bench.timed(
            "sha256sum",
            lambda: subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL),
        )
        store = BlobStore(work / "cache")
        configs = [
            layer_specs(weights, f"customer: c{i}\n".encode()) for i in range(args.customers)
        ]
        bench.default("cold", configs[0], store)
        bench.docker("docker-cold", configs[0])
        bench.default("throughput", configs[0], BlobStore(work / "fresh"), push_it=False)
        # Every customer on 2.4.1 first (not timed), then the base bump rebuild (timed).
        for i, layers in enumerate(configs):
            bench.default(f"setup-{i}", layers, store, repo=f"c{i}")
            if i < args.docker_customers:
                bench.docker(f"docker-setup-{i}", layers, repo=f"c{i}")
        bench.base = new
        for i, layers in enumerate(configs):
            bench.default(f"bump-{i}", layers, store, repo=f"c{i}")
            if i < args.docker_customers:
                bench.docker(f"docker-bump-{i}", layers, repo=f"c{i}")
        print("\n".join(report(bench, args)))
        return 0
    finally:
        for tag in bench.docker_tags if bench else []:
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)
        client.close()
        registry.stop()
        engine.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
