"""Benchmark: fleet planning and fleet builds as the fleet and its history grow.

    .venv/bin/python benchmarks/fleet.py [--sizes 50,500,2000 --history 1,3 --build 20]

(1) ``plan``: a configuration repository with N customer folders (``customers/<name>``) and a
real-shaped history (side branches merged back, distinct commit times) of H commits, H a
multiple of N; planned by the single-pass plan and, as the baseline measured in the same run,
by one ``git rev-list --max-count=1 HEAD -- customers/<name>`` per customer (what plan did
before). Prints seconds per customer; plan time should not grow with H.
(2) ``build-all`` on the test bed (Docker engine for the base image, loopback registry):
a cold fleet run of N customers, pushed, then the same run again with nothing changed. Prints
the nothing-changed run as a fraction of the cold one.

The machine may be shared: the figures are ratios against baselines from the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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


def bench_plan(sizes: list[int], history: list[int], work: Path) -> None:
    from builder.fleet import load_fleet, plan
    from builder.settings import load_settings

    settings = load_settings(ROOT)
    print("plan: seconds per customer (single pass) vs one rev-list per customer (before)")
    print(
        f"{'N':>6} {'commits':>8} {'plan s':>8} {'s/cust':>8} {'rev-list s/cust':>16} {'ratio':>6}"
    )
    for n in sizes:
        for factor in history:
            commits = max(3 * n, 1500) * factor if n >= 500 else 3 * n * factor
            repo = make_history(work / f"repo-{n}-{commits}", n, commits)
            fleet = load_fleet(write_fleet(repo, n), settings)
            os.environ["BUILDER_CACHE_DIR"] = str(work / "cache")
            seconds, result = timed(lambda: plan(fleet, settings, "2.5.0"))  # noqa: B023
            assert len(result.rebuild) == n, result.errors[:1]
            before = rev_list_baseline(repo, n, 30)
            per = seconds / n
            print(
                f"{n:>6} {commits:>8} {seconds:>8.2f} {per:>8.4f} {before:>16.4f} "
                f"{before / per:>5.1f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,500,2000", help="fleet sizes N")
    parser.add_argument("--history", default="1,3", help="history length factors")
    parser.add_argument("--build", type=int, default=20, help="customers of the build run")
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        bench_plan(
            [int(n) for n in args.sizes.split(",")],
            [int(h) for h in args.history.split(",")],
            work,
        )


if __name__ == "__main__":
    main()
