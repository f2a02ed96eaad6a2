"""Benchmark: fleet planning and fleet builds as the fleet and its history grow.

    .venv/bin/python benchmarks/fleet.py [--sizes 50,500,5000 --unchanged 500 --build 50]

(1) ``plan``: a configuration repository with N customer folders (``customers/<name>``), a
real-shaped history (side branches merged back, distinct commit times) of 3N commits (at
least 1,500), and one release record per customer on its ``ivd-releases`` branch. Measured:
a cold plan (an empty cache: every customer read and validated, every record read), the
baseline, in the same run; a re-plan with nothing changed; a re-plan after 10 new commits
and 10 new release records (target at N = 500: under 1 s).
(2) ``build --all`` with nothing changed (``--unchanged N``): every image pushed (a small
stand-in image per customer in the test registry) and recorded; the run with the plan index
of the previous run against the same run with an empty cache (baseline). Target at N = 500:
under 5 s. Registry requests per image.
(3) ``build --all`` on the test bed (``--build N``: Docker engine for the base image,
loopback registry): a cold fleet run of N customers, pushed and recorded; a config-only
change of every customer; a base bump 2.5.0 -> 2.5.1. Seconds per image, and registry
requests per image: the image itself (blobs, manifest, tags), its attestations, the rest
(connection probes, base lookups). Prints bump / cold and bump / config change.

The machine may be shared: the figures are ratios against baselines from the same run.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.githistory import customer_name, make_history, write_fleet  # noqa: E402

if TYPE_CHECKING:
    from builder.documents.build_report import BuildReport

T = TypeVar("T")
WHO = ("-c", "user.name=b", "-c", "user.email=b@e")


def timed(func: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = func()
    return time.perf_counter() - start, value


def add_commits(repo: Path, customers: int, count: int) -> dict[str, str]:
    """``count`` more commits, each touching one customer (the history since the last
    plan); the customers' new config commits."""
    out = {}
    for i in range(count):
        name = customer_name(i * 7 % customers)
        path = repo / "customers" / name / "analysis.yaml"
        with path.open("a") as file:
            file.write(f"# change {i}\n")
        subprocess.run(["git", "-C", str(repo), *WHO, "commit", "-qam", f"change {i}"], check=True)
        out[name] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    return out


def fake_report(item: Any, digest: str) -> BuildReport:
    """A pushed release build's report for a plan item (what `builder build --json` says)."""
    from builder.documents.build_report import BuildReport

    version = item.image.rsplit(":", 1)[1].split("-", 1)[0]
    return BuildReport(
        customer=item.customer,
        image=item.image,
        tags=[item.image],
        manifest_digest=digest,
        config_digest="",
        config_commit=item.commit,
        base={"repository": "bench/base", "version": version, "digest": "sha256:" + "b" * 64},
        models=[],
        layers=[],
        development=False,
        outputs={"registry": f"{item.image}@{digest}"},
    )


def record_all(items: Sequence[Any], fleet: Any, settings: Any, digest: str) -> None:
    """One release record per item, written as a fleet run writes them (one commit)."""
    from builder.record import write_release_records

    locations = {e.name: e.location for e in fleet.entries}
    outcomes = write_release_records(
        [fake_report(i, digest) for i in items], locations, settings, backoff=0.1
    )
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert not failed, failed[0]


# -- (1) plan ---------------------------------------------------------------------------------


def bench_plan(sizes: list[int], work: Path) -> None:
    from builder.fleet.fleetfile import load_fleet
    from builder.fleet.plan import plan
    from builder.settings import load_settings

    print("plan: cold (empty cache, the baseline) vs re-plans with the plan index")
    print(
        f"{'N':>6} {'commits':>8} {'records':>8} {'cold s':>8} {'nothing s':>10} "
        f"{'10+10 s':>8} {'10+10 / cold':>13}"
    )
    for n in sizes:
        commits = max(3 * n, 1500)
        repo = make_history(work / f"repo-{n}", n, commits)
        (repo / ".git" / "info" / "exclude").write_text("fleet.yaml\n")
        fleet_file = write_fleet(repo, n)
        settings = replace(
            load_settings(ROOT), cache_dir=work / f"cache-{n}", base_repository="127.0.0.1:9/none"
        )
        fleet = load_fleet(fleet_file, settings)
        record_all(plan(fleet, settings, "2.5.0").items, fleet, settings, "sha256:" + "1" * 64)

        def run(cache: Path, settings: Any = settings, fleet_file: Path = fleet_file) -> Any:
            local = replace(settings, cache_dir=cache)
            return plan(load_fleet(fleet_file, local), local, "2.5.0")

        cold, result = timed(lambda: run(work / f"cold-{n}"))  # noqa: B023
        assert len(result.released) == n, result.items[:1]
        run(settings.cache_dir)  # the index of the last plan
        nothing, _ = timed(lambda: run(settings.cache_dir))  # noqa: B023
        first = {i.customer: i for i in result.items}
        changed_items = [  # the 10 customers' new images, recorded as a fleet run would
            SimpleNamespace(
                customer=name,
                commit=commit,
                image=f"{first[name].image.rsplit('-', 1)[0]}-{commit[:12]}",
            )
            for name, commit in add_commits(repo, n, 10).items()
        ]
        record_all(changed_items, fleet, settings, "sha256:" + "2" * 64)
        changed, again = timed(lambda: run(settings.cache_dir))  # noqa: B023
        assert len(again.released) == n, len(again.released)
        print(
            f"{n:>6} {commits:>8} {n + 10:>8} {cold:>8.2f} {nothing:>10.2f} {changed:>8.2f} "
            f"{changed / cold:>12.1%}",
            flush=True,
        )


# -- (2) nothing changed ----------------------------------------------------------------------


def bench_unchanged(n: int, work: Path) -> None:
    """``build --all`` when every image is already pushed and recorded."""
    from builder.fleet.build_all import build_all
    from builder.fleet.fleetfile import load_fleet
    from builder.fleet.plan import plan
    from builder.oci import OCI_CONFIG, OCI_MANIFEST, RegistryClient, canonical_json
    from builder.oci import sha256_digest as digest_of
    from builder.settings import load_settings
    from testbed.registry import start_registry

    registry = start_registry()
    try:
        repo = make_history(work / f"unchanged-{n}", n, max(3 * n, 1500))
        settings = replace(
            load_settings(ROOT),
            cache_dir=work / "unchanged-cache",
            image_registry=f"{registry.host}/still",
            base_repository="127.0.0.1:9/none",
        )
        fleet_file = write_fleet(repo, n)
        fleet = load_fleet(fleet_file, settings)
        planned = plan(fleet, settings, "2.5.0")
        config = canonical_json({"architecture": "amd64", "os": "linux", "rootfs": {}})
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": [],
            }
        )
        client = RegistryClient(registry.host)
        for item in planned.items:  # a stand-in image under each immutable tag
            path, tag = f"still/{item.customer}", str(item.image).rsplit(":", 1)[1]
            client.upload_blob(path, digest_of(config), len(config), config)
            client.put_manifest(path, tag, manifest, OCI_MANIFEST)
        record_all(planned.items, fleet, settings, digest_of(manifest))
        plan(fleet, settings, "2.5.0")  # the plan index a previous run leaves

        def run(cache: Path) -> dict[str, int]:
            local = replace(settings, cache_dir=cache)
            report = build_all(
                load_fleet(fleet_file, local), local, "2.5.0", push=True, record=True
            )
            return report.counts()

        cold, counts = timed(lambda: run(work / "unchanged-cold"))
        assert counts["unchanged"] == n, counts
        since = len(registry.requests())
        warm, counts = timed(lambda: run(settings.cache_dir))
        assert counts["unchanged"] == n, counts
        sent = [r for r in registry.requests()[since:] if r.path != "/v2/"]
        print(f"\nbuild --all, nothing changed, {n} images pushed and recorded:")
        print(f"  empty cache (baseline)  {cold:7.2f} s")
        print(
            f"  plan index kept         {warm:7.2f} s ({warm / cold:.1%} of the baseline; "
            f"target under 5 s), {len(sent) / n:.1f} registry requests per image"
        )
    finally:
        registry.stop()


# -- (3) fleet builds on the test bed ---------------------------------------------------------


def _demo_model() -> str:
    """A model id of the bundled demo registry (its weights are in demo/production)."""
    import yaml

    analysis = yaml.safe_load((ROOT / "customers" / "customer-x" / "analysis.yaml").read_text())
    return str(analysis["analyses"][0]["models"]["carcinoma_model"]["reference"])


def _push_base(client: Any, repository: str, base_os: str, version: str) -> None:
    """A small base image with the runner's schema label, pushed to the test registry."""
    labels = f'com.ivd.runner.config-schemas="1" org.opencontainers.image.version="{version}"'
    dockerfile = f"FROM {base_os}\nLABEL {labels}\n"
    client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repository}:{version}", rm=True
    )
    for event in client.api.push(repository, tag=version, stream=True, decode=True):
        if "error" in event:
            raise RuntimeError(f"pushing the base image failed: {event['error']}")


def split_requests(requests: Iterable[Any], reports: Sequence[BuildReport]) -> Counter[str]:
    """Registry requests by what they were for: ``image`` (its blobs and its manifest under
    its tags), ``check`` (reading its immutable tag: the fleet's one batch), ``attestation``
    (referrers, fallback tags, artifact manifests and documents), ``other`` (connection
    probes, base lookups). An upload's POST counts with the PUT that follows it in the same
    repository (builds of one repository do not overlap)."""
    blobs = {d for r in reports for d in [r.config_digest, *(x.digest for x in r.layers)]}
    refs = {r.manifest_digest for r in reports}
    refs |= {t.rsplit(":", 1)[1] for r in reports for t in r.tags}
    out: Counter[str] = Counter()
    pending: dict[str, int] = {}  # repository -> POSTs waiting for their PUT
    for request in requests:
        parts = urlsplit(request.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        repository = path.removeprefix("/v2/").split("/blobs/")[0].split("/manifests/")[0]
        if "/blobs/uploads/" in path and request.method == "POST" and "mount" not in query:
            pending[repository] = pending.get(repository, 0) + 1
            continue
        if "/referrers/" in path or "/manifests/sha256-" in path:
            kind = "attestation"
        elif "/manifests/" in path and path.rsplit("/manifests/", 1)[1] in refs:
            kind = "image" if request.method == "PUT" else "check"
        elif "/manifests/" in path:
            kind = "attestation"
        elif "/blobs/" in path:
            digest = (query.get("digest") or query.get("mount") or [path.rsplit("/", 1)[1]])[0]
            kind = "image" if digest in blobs else "attestation"
            if request.method == "PUT" and pending.get(repository):
                pending[repository] -= 1
                out[kind] += 1
        else:
            kind = "other"
        out[kind] += 1
    return out


def commit_locks(repo: Path, customers: int, settings: Any, message: str) -> None:
    """``builder lock`` for every customer, committed: a release build ships only what a
    committed lock pins."""
    from builder.pipeline import lock_customer

    for i in range(customers):
        lock_customer(str(repo / "customers" / customer_name(i)), settings)
    subprocess.run(["git", "-C", str(repo), "add", "-A", "customers"], check=True)
    subprocess.run(["git", "-C", str(repo), *WHO, "commit", "-qm", message], check=True)


def report_build(
    figures: dict[str, tuple[float, Counter[str]]],
    stages: dict[str, dict[str, float]],
    customers: int,
    jobs: int,
) -> None:
    """Print (3): seconds and registry requests per image, where the time went, the ratios."""
    print(f"\nbuild --all, {customers} customers, {jobs} jobs, pushed and recorded:")
    print(
        f"  {'run':<22} {'s':>8} {'s/image':>8}   registry requests per image: "
        "image itself / tag check / attestations / other"
    )
    names = {
        "cold": "cold",
        "config": "config-only change",
        "bump": "base bump 2.5.0->2.5.1",
    }
    for name, (seconds, counts) in figures.items():
        per = {k: counts[k] / customers for k in ("image", "check", "attestation", "other")}
        print(
            f"  {names[name]:<22} {seconds:8.2f} {seconds / customers:8.3f}   "
            f"{per['image']:.1f} / {per['check']:.1f} / {per['attestation']:.1f} / "
            f"{per['other']:.1f}"
        )
    print("  where it went, mean seconds per image (plan: the run's, shared by all):")
    for name, counter in stages.items():
        parts = ", ".join(f"{k} {v / customers:.3f}" for k, v in counter.items())
        print(f"    {names[name]:<22} {parts}")
    bump, cold, config = figures["bump"][0], figures["cold"][0], figures["config"][0]
    print(f"  bump / cold = {bump / cold:.1%}; bump / config-only change = {bump / config:.2f}")
    config_image = figures["config"][1]["image"] / customers
    bump_image = figures["bump"][1]["image"] / customers
    print(
        f"  requests for the image itself per re-stack: config-only change "
        f"{config_image:.1f}, base bump {bump_image:.1f} (target <= 6)"
    )


def bench_build(customers: int, jobs: int, work: Path) -> None:
    """A cold fleet run (pushed, recorded), a config-only change of every customer, then
    a base bump: seconds and registry requests per image."""
    from builder.fleet.build_all import build_all
    from builder.fleet.fleetfile import load_fleet
    from builder.settings import load_settings
    from testbed.base_os import ensure_base_image
    from testbed.docker_engine import ensure_engine
    from testbed.registry import start_registry

    engine = ensure_engine()
    registry = start_registry()
    try:
        base = f"{registry.host}/ivd/fleet-base"
        _push_base(engine.client(), base, ensure_base_image(engine), "2.5.0")
        repo = make_history(work / "build-repo", customers, 2 * customers, model_id=_demo_model())
        (repo / ".git" / "info" / "exclude").write_text("fleet.yaml\n")
        settings = replace(
            load_settings(ROOT),
            model_registry=f"local:{ROOT / 'demo' / 'registry'}",
            production=f"file:{ROOT / 'demo' / 'production'}",
            base_repository=base,
            image_registry=f"{registry.host}/bench",
            cache_dir=work / "build-cache",
        )
        fleet = load_fleet(write_fleet(repo, customers), settings)
        commit_locks(repo, customers, settings, "locks")
        figures: dict[str, tuple[float, Counter[str]]] = {}
        stages: dict[str, dict[str, float]] = {}

        def run(name: str, version: str) -> None:
            since = len(registry.requests())
            seconds, report = timed(
                lambda: build_all(fleet, settings, version, jobs=jobs, push=True, record=True)
            )
            assert report.counts()["built"] == customers, [r.summary for r in report.failed][:1]
            reports = [r.report for r in report.results if r.report]
            figures[name] = seconds, split_requests(registry.requests()[since:], reports)
            spent = stages[name] = {"plan": report.plan_seconds * customers}
            for result in report.results:
                for stage, took in (result.report.timings if result.report else {}).items():
                    spent[stage] = spent.get(stage, 0.0) + took
                spent["build"] = spent.get("build", 0.0) + result.seconds

        run("cold", "2.5.0")
        for i in range(customers):  # every customer's config changes
            path = repo / "customers" / customer_name(i) / "analysis.yaml"
            path.write_text(path.read_text().replace("threshold: ", "threshold: 0.0", 1))
        subprocess.run(["git", "-C", str(repo), *WHO, "commit", "-qam", "all"], check=True)
        commit_locks(repo, customers, settings, "locks after the change")
        run("config", "2.5.0")
        _push_base(engine.client(), base, ensure_base_image(engine), "2.5.1")
        run("bump", "2.5.1")
        report_build(figures, stages, customers, jobs)
    finally:
        registry.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,500,5000", help="fleet sizes N of the plan")
    parser.add_argument("--unchanged", type=int, default=500, help="images of (2); 0: skip")
    parser.add_argument("--build", type=int, default=50, help="customers of (3); 0: skip")
    parser.add_argument("--jobs", type=int, default=2, help="images built at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        bench_plan([int(n) for n in args.sizes.split(",") if n], work)
        if args.unchanged:
            bench_unchanged(args.unchanged, work)
        if args.build:
            bench_build(args.build, args.jobs, work)


if __name__ == "__main__":
    main()
