"""Benchmark: fleet planning and fleet builds as the fleet and its history grow.

    .venv/bin/python benchmarks/fleet.py [--sizes 50,500,2000 --history 1,3 --build 20]

(1) ``plan``: a configuration repository with N customer folders (``customers/<name>``) and a
real-shaped history (side branches merged back, distinct commit times) of H commits, H a
multiple of N; planned by the single-pass plan and, as the baseline measured in the same run,
by one ``git rev-list --max-count=1 HEAD -- customers/<name>`` per customer (what plan did
before). Prints seconds per customer, the history pass alone (cold: no answers kept yet),
and a re-plan after 10 new commits (the pass reads only those: it should not grow with H).
(2) ``build-all`` on the test bed (Docker engine for the base image, loopback registry):
a cold fleet run of N customers, pushed, then the same run again with nothing changed. Prints
the nothing-changed run as a fraction of the cold one.

The machine may be shared: the figures are ratios against baselines from the same run.
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.githistory import customer_name, make_history, write_fleet  # noqa: E402

T = TypeVar("T")


def timed(func: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = func()
    return time.perf_counter() - start, value


def rev_list_baseline(repo: Path, customers: int, sample: int) -> float:
    """Seconds per customer of the per-customer history walk (on ``sample`` customers)."""
    picked = random.Random(1).sample(range(customers), min(sample, customers))
    start = time.perf_counter()
    for i in picked:
        folder = f"customers/{customer_name(i)}"
        subprocess.run(
            ["git", "-C", str(repo), "rev-list", "--max-count=1", "HEAD", "--", folder],
            check=True,
            capture_output=True,
        )
    return (time.perf_counter() - start) / len(picked)


def add_commits(repo: Path, customers: int, count: int) -> None:
    """``count`` more commits, each touching one customer (the history since the last plan)."""
    for i in range(count):
        path = repo / "customers" / customer_name(i * 7 % customers) / "analysis.yaml"
        with path.open("a") as file:
            file.write(f"# change {i}\n")
        who = ("-c", "user.name=b", "-c", "user.email=b@e")
        subprocess.run(["git", "-C", str(repo), *who, "commit", "-qam", f"change {i}"], check=True)


def bench_plan(sizes: list[int], history: list[int], work: Path) -> None:
    from builder.fleet.fleetfile import load_fleet
    from builder.fleet.plan import last_commits, plan
    from builder.settings import load_settings

    settings = replace(load_settings(ROOT), cache_dir=work / "cache")
    print("plan: seconds per customer (single pass) vs one rev-list per customer (before)")
    print(
        f"{'N':>6} {'commits':>8} {'plan s':>8} {'s/cust':>8} {'history pass s':>15} "
        f"{'re-plan s':>10} {'rev-list s/cust':>16} {'ratio':>6}"
    )
    for n in sizes:
        for factor in history:
            commits = max(3 * n, 1500) * factor if n >= 500 else 3 * n * factor
            repo = make_history(work / f"repo-{n}-{commits}", n, commits)
            fleet = load_fleet(write_fleet(repo, n), settings)
            seconds, result = timed(lambda: plan(fleet, settings, "2.5.0"))  # noqa: B023
            assert len(result.rebuild) == n, result.errors[:1]
            folders = [f"customers/{customer_name(i)}" for i in range(n)]
            walk, _ = timed(lambda: last_commits(repo, "HEAD", folders))  # noqa: B023
            add_commits(repo, n, 10)
            again, _ = timed(lambda: plan(fleet, settings, "2.5.0"))  # noqa: B023
            before = rev_list_baseline(repo, n, 30)
            per = seconds / n
            print(
                f"{n:>6} {commits:>8} {seconds:>8.2f} {per:>8.4f} {walk:>15.2f} {again:>10.2f} "
                f"{before:>16.4f} {before / per:>5.1f}x",
                flush=True,
            )


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


def bench_build(customers: int, jobs: int, work: Path) -> None:
    """A cold fleet run (pushed, recorded) against the same run with nothing changed."""
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
        settings = replace(
            load_settings(ROOT),
            model_registry=f"local:{ROOT / 'demo' / 'registry'}",
            production=f"file:{ROOT / 'demo' / 'production'}",
            base_repository=base,
            image_registry=f"{registry.host}/bench",
            cache_dir=work / "build-cache",
        )
        fleet = load_fleet(write_fleet(repo, customers), settings)

        def run() -> dict[str, int]:
            report = build_all(fleet, settings, "2.5.0", jobs=jobs, push=True, record=True)
            return report.counts()

        cold, counts = timed(run)
        assert counts["built"] == customers, counts
        since = len(registry.requests())
        warm, counts = timed(run)
        assert counts["unchanged"] == customers, counts
        requests = [r for r in registry.requests()[since:] if r.path != "/v2/"]
        print(f"\nbuild-all, {customers} customers, {jobs} jobs, pushed and recorded:")
        print(f"  cold run            {cold:8.2f} s  ({cold / customers:.3f} s per customer)")
        print(
            f"  nothing changed     {warm:8.2f} s  ({warm / customers:.3f} s per customer, "
            f"{len(requests) / customers:.1f} registry requests per customer)"
        )
        print(f"  nothing changed / cold = {warm / cold:.1%}")
    finally:
        registry.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,500,2000", help="fleet sizes N")
    parser.add_argument("--history", default="1,3", help="history length factors")
    parser.add_argument("--build", type=int, default=20, help="customers of the build run")
    parser.add_argument("--jobs", type=int, default=2, help="customers built at once")
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        bench_plan(
            [int(n) for n in args.sizes.split(",")],
            [int(h) for h in args.history.split(",")],
            work,
        )
        if not args.skip_build:
            bench_build(args.build, args.jobs, work)


if __name__ == "__main__":
    main()
