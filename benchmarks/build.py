"""Benchmark: the default backend (no daemon) against the docker backend, cold and on rebuild.

Runs on the test bed (a Docker engine, a loopback registry, the base OS image): builds an
image of N models of M MiB of incompressible weights plus a config layer with both backends,
pushes each to its own repository, then rebuilds after a config-only change. Numbers are
ratios against baselines measured in the same run: ``sha256sum`` over the weights (reading
and hashing the inputs once) and the docker backend (Dockerfile + docker SDK build and push).

    .venv/bin/python benchmarks/build.py --models 3 --size-mb 128
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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

    def default(self, name: str, layers: Sequence[LayerSpec], store: BlobStore) -> None:
        """Assemble and push with the default backend."""
        image = self.timed(
            f"{name}/assemble",
            lambda: assemble(
                self.base, layers, labels={}, annotations={}, source_date_epoch=SDE, store=store
            ),
        )
        target = f"{self.registry_host}/bench-{self.run}/default:{name}"
        report = self.timed(f"{name}/push", lambda: push(image, [target]))
        self.digests[name] = image.manifest_digest
        self.uploaded[name] = report.bytes_uploaded

    def docker(self, name: str, layers: Sequence[LayerSpec]) -> None:
        """Build and push with the docker backend."""
        tag = f"ivd-bench/docker:{self.run}-{name}"
        self.docker_tags.append(tag)
        self.timed(
            f"{name}/assemble",
            lambda: build_with_docker(
                self.base, layers, labels={}, source_date_epoch=SDE, client=self.client, tag=tag
            ),
        )
        target = f"{self.registry_host}/bench-{self.run}/docker:{name}"
        self.timed(f"{name}/push", lambda: push_with_docker(self.client, tag, [target]))

    def total(self, name: str) -> float:
        return self.times[f"{name}/assemble"] + self.times[f"{name}/push"]


def report(bench: Bench, models: int, size_mb: int) -> list[str]:
    """The result table: absolute seconds, and ratios against the same-run baselines."""
    t = bench.times
    sha = t["sha256sum"]
    mib = 1 << 20
    same = bench.digests["rebuild"] == bench.digests["fresh-cache"]
    return [
        f"{models} models x {size_mb} MiB = {models * size_mb} MiB of weights, plus a config layer",
        f"sha256sum of the weights (baseline)   {sha:7.2f} s",
        f"default assemble, cold                {t['cold/assemble']:7.2f} s  "
        f"= {t['cold/assemble'] / sha:5.2f} x sha256sum",
        f"default assemble, fresh cache         {t['fresh-cache/assemble']:7.2f} s  "
        f"= {t['fresh-cache/assemble'] / sha:5.2f} x sha256sum",
        f"cold build+push: default {bench.total('cold'):6.2f} s, "
        f"docker {bench.total('docker-cold'):6.2f} s  "
        f"-> docker/default = {bench.total('docker-cold') / bench.total('cold'):5.2f}",
        f"rebuild, config changed: default {bench.total('rebuild'):6.2f} s "
        f"(uploaded {bench.uploaded['rebuild'] / mib:.3f} MiB), "
        f"docker {bench.total('docker-rebuild'):6.2f} s  "
        f"-> docker/default = {bench.total('docker-rebuild') / bench.total('rebuild'):5.2f}",
        f"same inputs, fresh cache: manifest digest {'equal' if same else 'DIFFERENT'}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="default vs docker backend build benchmark")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=128, help="MiB of weights per model")
    args = parser.parse_args(argv)

    engine = ensure_engine()
    registry = start_registry()
    client = engine.client()
    work = Path(tempfile.mkdtemp(prefix="ivd-bench-"))
    bench: Bench | None = None
    try:
        target = f"{registry.host}/ivd/inference-base"
        client.images.get(ensure_base_image(engine)).tag(target, "2.4.1")
        for event in client.api.push(target, tag="2.4.1", stream=True, decode=True):
            if "error" in event:
                raise RuntimeError(f"pushing the base image failed: {event['error']}")
        bench = Bench(client, registry.host, resolve_base(target, "~=2.4"), work)
        (work / "weights").mkdir()
        weights = make_weights(work / "weights", args.models, args.size_mb)
        files = [str(p) for entries in weights.values() for p, _ in entries]
        bench.timed(
            "sha256sum",
            lambda: subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL),
        )
        store = BlobStore(work / "cache")
        cold = layer_specs(weights, b"analyses: [cold]\n")
        warm = layer_specs(weights, b"analyses: [warm]\n")
        bench.default("cold", cold, store)
        bench.docker("docker-cold", cold)
        bench.default("rebuild", warm, store)
        bench.docker("docker-rebuild", warm)
        bench.default("fresh-cache", warm, BlobStore(work / "fresh"))
        print("\n".join(report(bench, args.models, args.size_mb)))
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
