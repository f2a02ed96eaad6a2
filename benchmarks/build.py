"""Benchmark: N customers sharing M models, default backend (no daemon) against the docker backend.

The real case: every customer has its own config repository, so its own commit time
(SOURCE_DATE_EPOCH), and the same models. Runs on the test bed (a Docker engine, loopback
registries, the base OS image) and measures, per phase, the default backend for every customer
and the docker backend (Dockerfile + docker SDK build and push, the baseline) for the first
``--docker-customers``, interleaved customer by customer so machine load hits both alike:

1. cold build + push (the first customer tars and uploads the weights; the others share them);
2. a config-only change per customer (a new commit: new config bytes, new commit time), with
   the registry requests each push made (counted at the registry);
3. a base image bump 2.4.1 -> 2.4.2 per customer, with its registry requests;
4. registry storage after all of them, against the weights' size (each backend has its own
   registry, so the figure is the default backend's alone);
5. hashing + layer writing of the weights into an empty blob store against ``sha256sum`` of
   the same files, alternated ``--rounds`` times.

    .venv/bin/python benchmarks/build.py [--models 2 --size-mb 500 --customers 10]

Every figure is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.deliver import push  # noqa: E402
from builder.image.assemble import FileEntry, LayerSpec, assemble  # noqa: E402
from builder.image.base import BaseImage, resolve_base  # noqa: E402
from builder.image.docker_backend import build_with_docker, push_with_docker  # noqa: E402
from builder.oci import BlobStore  # noqa: E402
from testbed.base_os import ensure_base_image  # noqa: E402
from testbed.docker_engine import ensure_engine  # noqa: E402
from testbed.registry import Registry, start_registry  # noqa: E402

T = TypeVar("T")
SDE = 1_700_000_000
DAY = 86_400
MIB = 1 << 20
Weights = dict[str, list[tuple[Path, str]]]
PHASES = ("cold", "config", "bump")


def make_weights(directory: Path, models: int, size_mb: int) -> Weights:
    """Incompressible weight files (like float tensors) and their sha256, per model."""
    out: Weights = {}
    for i in range(models):
        name = f"model{i}"
        path = directory / f"{name}.onnx"
        sha = hashlib.sha256()
        with path.open("wb") as file:
            for _ in range(size_mb):
                block = os.urandom(MIB)
                sha.update(block)
                file.write(block)
        meta = directory / f"{name}.json"
        meta.write_bytes(b'{"classes": ["benign", "tumour"]}\n')
        out[name] = [(path, sha.hexdigest()), (meta, hashlib.sha256(meta.read_bytes()).hexdigest())]
    return out


def layer_specs(weights: Weights, config: bytes) -> list[LayerSpec]:
    """One layer per model (sha256 known, as from the fetch cache) and the stamped config layer."""
    layers = [
        LayerSpec(
            name,
            [FileEntry(f"/app/models/{name}/{p.name}", p, 0o644, sha) for p, sha in files],
        )
        for name, files in weights.items()
    ]
    layers.append(
        LayerSpec("config", [FileEntry("/app/config/analysis.yaml", config)], stamped=True)
    )
    return layers


@dataclass(frozen=True)
class Customer:
    """One customer at one config commit: its config bytes and commit time."""

    index: int
    config: bytes
    commit_time: int

    @property
    def repo(self) -> str:
        return f"c{self.index}"


def customers_at(count: int, revision: int) -> list[Customer]:
    """Every customer's config at ``revision``; each has its own commit time (days apart)."""
    return [
        Customer(
            i,
            f"customer: c{i}\nrevision: {revision}\nthreshold: 0.{5 + revision}\n".encode(),
            SDE + i * DAY + revision * 3_600 + i * 17,
        )
        for i in range(count)
    ]


def registry_floor(registry: Registry, repository: str) -> float:
    """Seconds the registry itself needs for what a config-only re-stack must send: two
    small new blobs (a config layer, an image config), each a POST and a PUT, both at once,
    then the manifest; over bare keep-alive ``http.client`` connections, no builder code.
    The least any client could take against this registry on this machine."""
    host, port = registry.host.rsplit(":", 1)
    connections = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(2)]

    def call(
        conn: http.client.HTTPConnection,
        method: str,
        url: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response

    def upload(conn: http.client.HTTPConnection, data: bytes) -> None:
        location = call(conn, "POST", f"/v2/{repository}/blobs/uploads/").getheader("Location")
        assert location, "no upload session"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        url = f"{location}{'&' if '?' in location else '?'}digest={digest}"
        status = call(conn, "PUT", url, data, {"Content-Type": "application/octet-stream"}).status
        assert status == 201, status

    blobs = [
        secrets.token_bytes(1400),
        b'{"architecture":"amd64","os":"linux","rootfs":{}}' + secrets.token_hex(8).encode(),
    ]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": len(blobs[1]),
                "digest": "sha256:" + hashlib.sha256(blobs[1]).hexdigest(),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "size": len(blobs[0]),
                    "digest": "sha256:" + hashlib.sha256(blobs[0]).hexdigest(),
                }
            ],
        }
    ).encode()
    try:
        call(connections[0], "GET", "/v2/")  # connected before the clock starts, as ours are
        call(connections[1], "GET", "/v2/")
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(upload, connections, blobs))
        headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        status = call(
            connections[0], "PUT", f"/v2/{repository}/manifests/floor", manifest, headers
        ).status
        assert status == 201, status
        return time.perf_counter() - start
    finally:
        for conn in connections:
            conn.close()


def storage_bytes(registry: Registry) -> int:
    """Bytes of every file the registry stores (blobs, links, manifests)."""
    return sum(
        (Path(d) / f).stat().st_size
        for d, _, files in os.walk(registry.root / "data")
        for f in files
    )


@dataclass
class Bench:
    """One benchmark run: the services, the base image, and what was measured."""

    client: Any
    registry: Registry
    docker_registry: Registry
    weights: Weights
    store: BlobStore
    base: BaseImage
    times: dict[str, float] = field(default_factory=dict)
    floors: list[float] = field(default_factory=list)  # registry_floor, once per config change
    uploaded: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # registry requests per push
    docker_tags: list[str] = field(default_factory=list)
    run: str = field(default_factory=lambda: secrets.token_hex(3))

    def timed(self, name: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = call()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return out

    def default(self, phase: str, customer: Customer) -> None:
        """Assemble and push one customer's image with the default backend."""
        name = f"{phase}/{customer.repo}"
        layers = layer_specs(self.weights, customer.config)
        image = self.timed(
            name,
            lambda: assemble(
                self.base,
                layers,
                labels={"com.ivd.customer": customer.repo},
                annotations={},
                source_date_epoch=customer.commit_time,
                store=self.store,
            ),
        )
        target = f"{self.registry.host}/bench-{self.run}/{customer.repo}:{phase}"
        mark = len(self.registry.requests())
        report = self.timed(name, lambda: push(image, [target]))
        self.uploaded[name] = report.bytes_uploaded
        self.requests[name] = len(self.registry.requests()[mark:])

    def docker(self, phase: str, customer: Customer) -> None:
        """Build and push one customer's image with the docker backend."""
        name = f"docker-{phase}/{customer.repo}"
        tag = f"ivd-bench/{customer.repo}:{self.run}-{phase}"
        self.docker_tags.append(tag)
        layers = layer_specs(self.weights, customer.config)
        self.timed(
            name,
            lambda: build_with_docker(
                self.base,
                layers,
                labels={"com.ivd.customer": customer.repo},
                source_date_epoch=customer.commit_time,
                client=self.client,
                tag=tag,
            ),
        )
        target = f"{self.docker_registry.host}/bench-{self.run}/{customer.repo}:{phase}"
        self.timed(name, lambda: push_with_docker(self.client, tag, [target]))

    def phase(self, phase: str, customers: Sequence[Customer], docker_customers: int) -> None:
        """Every customer with the default backend, the first few also with docker, alternated."""
        for customer in customers:
            self.default(phase, customer)
            if phase == "config":
                self.floors.append(registry_floor(self.registry, f"bench-{self.run}/floor"))
            if customer.index < docker_customers:
                self.docker(phase, customer)

    def mean(self, prefix: str, customers: Sequence[int]) -> float:
        return statistics.fmean(self.times[f"{prefix}/c{i}"] for i in customers)


def throughput(bench: Bench, work: Path, rounds: int) -> tuple[float, float, bool]:
    """(sha256sum seconds, hashing + layer writing seconds, same digest every round).

    Alternated round by round, the order flipped each round, so load and the page cache
    favour neither; each round writes the layers into an empty blob store.
    """
    files = [str(p) for entries in bench.weights.values() for p, _ in entries]
    customer = customers_at(1, 0)[0]
    layers = layer_specs(bench.weights, customer.config)
    digests = set()
    sha = write = 0.0
    for r in range(rounds):
        for step in ("sha", "write") if r % 2 == 0 else ("write", "sha"):
            start = time.perf_counter()
            if step == "sha":
                subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)
                sha += time.perf_counter() - start
                continue
            fresh = work / f"fresh-{r}"
            image = assemble(
                bench.base,
                layers,
                labels={},
                annotations={},
                source_date_epoch=customer.commit_time,
                store=BlobStore(fresh),
            )
            write += time.perf_counter() - start
            digests.add(image.manifest_digest)
            shutil.rmtree(fresh)
    return sha, write, len(digests) == 1


def report(
    bench: Bench, args: argparse.Namespace, storage: int, hashing: tuple[float, float, bool]
) -> list[str]:
    """The result lines: absolute seconds, and ratios against the same-run baselines."""
    n, nd = args.customers, args.docker_customers
    every, docked = range(n), range(nd)
    weights = args.models * args.size_mb * MIB
    lines = [
        f"{n} customers (distinct commit times) sharing {args.models} models x {args.size_mb} MiB "
        f"of incompressible weights; docker backend for {nd} of them",
        f"1. cold build+push, first customer: default {bench.times['cold/c0']:7.2f} s, docker "
        f"{bench.times['docker-cold/c0']:7.2f} s -> {bench.times['docker-cold/c0'] / bench.times['cold/c0']:6.1f}x",
    ]
    if n > 1:
        rest = range(1, n)
        up = max(bench.uploaded[f"cold/c{i}"] for i in rest)
        lines.append(
            f"   cold, every further customer (models shared): default {bench.mean('cold', rest):6.2f} s "
            f"(mean of {n - 1}), max {up / 1024:.1f} KiB uploaded"
        )
    for number, phase, what in ((2, "config", "config-only change"), (3, "bump", "base bump")):
        default, docker = bench.mean(phase, every), bench.mean(f"docker-{phase}", docked)
        uploads = [bench.uploaded[f"{phase}/c{i}"] for i in every]
        requests = [bench.requests[f"{phase}/c{i}"] for i in every]
        lines += [
            f"{number}. {what}, rebuild+push per customer: default {default:6.3f} s (mean of {n}), "
            f"docker {docker:7.2f} s (mean of {nd}) -> {docker / default:6.1f}x faster (target >= 100x)",
            f"   uploaded per customer (default): max {max(uploads) / 1024:.1f} KiB, "
            f"min {min(uploads) / 1024:.1f} KiB (target < 64 KiB)",
            f"   registry requests per customer (default, one tag): max {max(requests)}, "
            f"min {min(requests)} (target <= 6)",
        ]
        if phase == "config":
            floor = statistics.median(bench.floors)
            lines.append(
                f"   the registry's own floor for those writes (bare HTTP, uploads at once): "
                f"{floor * 1000:5.1f} ms (median of {len(bench.floors)}) -> default = "
                f"{default / floor:4.1f}x the floor; docker / floor = {docker / floor:6.1f}x, the "
                "most any builder could reach against this registry"
            )
    lines.append(
        f"4. registry storage after all phases (default backend): {storage / MIB:8.1f} MiB for "
        f"{weights / MIB:.0f} MiB of weights -> {(storage - weights) / weights * 100:+5.2f}% "
        "(target within 5%)"
    )
    sha, write, same = hashing
    lines += [
        f"5. sha256sum of the weights {sha:6.2f} s; hashing + layer writing {write:6.2f} s "
        f"({args.rounds} rounds alternated) -> {sha / write * 100:5.1f}% of sha256sum throughput "
        "(target >= 90%)",
        f"   same inputs, fresh blob store every round: manifest digest {'equal' if same else 'DIFFERENT'}",
    ]
    return lines


def _push_bases(client: Any, repository: str, base_os: str, docker_registry: str) -> None:
    """Base 2.4.1 (the test bed OS image) and 2.4.2 (one more small layer), in both registries."""
    client.images.get(base_os).tag(repository, "2.4.1")
    dockerfile = f"FROM {repository}:2.4.1\nRUN echo 2.4.2 > /etc/ivd-base-version\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repository}:2.4.2", rm=True)
    mirror = f"{docker_registry}/{repository.split('/', 1)[1]}"
    for tag in ("2.4.1", "2.4.2"):
        client.images.get(f"{repository}:{tag}").tag(mirror, tag)
        for target in (repository, mirror):
            for event in client.api.push(target, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise RuntimeError(f"pushing the base image failed: {event['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="default vs docker backend build benchmark")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--size-mb", type=int, default=500, help="MiB of weights per model")
    parser.add_argument("--customers", type=int, default=10)
    parser.add_argument(
        "--docker-customers", type=int, default=2, help="of which also with the docker backend"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternated hashing rounds")
    args = parser.parse_args(argv)
    if not 1 <= args.docker_customers <= args.customers:
        parser.error("--docker-customers must be between 1 and --customers")

    engine = ensure_engine()
    registry, docker_registry = start_registry(), start_registry()
    client = engine.client()
    work = Path(tempfile.mkdtemp(prefix="ivd-bench-"))
    bench: Bench | None = None
    try:
        target = f"{registry.host}/ivd/inference-base"
        _push_bases(client, target, ensure_base_image(engine), docker_registry.host)
        old, new = resolve_base(target, "2.4.1"), resolve_base(target, "2.4.2")
        (work / "weights").mkdir()
        weights = make_weights(work / "weights", args.models, args.size_mb)
        bench = Bench(client, registry, docker_registry, weights, BlobStore(work / "cache"), old)
        hashing = throughput(bench, work, args.rounds)
        before = storage_bytes(registry)
        bench.phase("cold", customers_at(args.customers, 0), args.docker_customers)
        bench.phase("config", customers_at(args.customers, 1), args.docker_customers)
        bench.base = new
        bench.phase("bump", customers_at(args.customers, 1), args.docker_customers)
        storage = storage_bytes(registry) - before
        print("\n".join(report(bench, args, storage, hashing)))
        return 0
    finally:
        for tag in bench.docker_tags if bench else []:
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)
        client.close()
        registry.stop()
        docker_registry.stop()
        engine.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
