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

T = TypeVar("T")
START = 1_700_000_000

CUSTOMER_YAML = """\
version: 1
customer: {name}
base_image:
  version: "{base}"
"""
ANALYSIS_YAML = """\
analyses:
- name: breast
  models:
    carcinoma_model:
      sourcing: auto
      reference: {carcinoma}
  features:
  - cls: Carcinoma
    models: {{classification_model: carcinoma_model}}
    params: {{threshold: {threshold}}}
"""


def customer_name(index: int) -> str:
    return f"customer-{index:04d}"


def _data(text: str) -> str:
    raw = text.encode()
    return f"data {len(raw)}\n{text}\n"


def make_history(
    path: Path,
    customers: int,
    commits: int,
    *,
    model_id: str = "a" * 32,
    base: str = "~=2.4",
    seed: int = 0,
) -> Path:
    """A git repository at ``path`` with ``customers`` folders ``customers/<name>`` and
    ``commits`` commits shaped like a GitLab project: the first adds every customer; then
    mostly merge requests (one to three commits on a side branch, often a commit on main in
    between, a merge commit), some merges that change a file themselves, some direct commits;
    each commit has its own commit time. Written with ``git fast-import`` (fast)."""
    rng = random.Random(seed)
    names = [customer_name(i) for i in range(customers)]
    stream: list[str] = []
    clock = [START]
    mark = [0]

    def commit(
        branch: str, message: str, files: dict[str, str], parent: int, merge: int = 0
    ) -> int:
        mark[0] += 1
        clock[0] += 60
        lines = [
            f"commit refs/heads/{branch}",
            f"mark :{mark[0]}",
            f"committer Bench <bench@example.com> {clock[0]} +0000",
            _data(message).rstrip("\n"),
        ]
        if parent:
            lines.append(f"from :{parent}")
        if merge:
            lines.append(f"merge :{merge}")
        for file, text in sorted(files.items()):
            lines.append(f"M 100644 inline {file}")
            lines.append(_data(text).rstrip("\n"))
        stream.append("\n".join(lines) + "\n")
        return mark[0]

    def edit(name: str) -> dict[str, str]:
        threshold = round(rng.uniform(0.1, 0.9), 4)
        return {
            f"customers/{name}/analysis.yaml": ANALYSIS_YAML.format(
                carcinoma=model_id, threshold=threshold
            )
        }

    first: dict[str, str] = {"README.md": "customer configurations\n"}
    for name in names:
        first[f"customers/{name}/customer.yaml"] = CUSTOMER_YAML.format(name=name, base=base)
        first.update(edit(name))
    main = commit("main", "all customers", first, 0)
    made = 1
    while made < commits:
        kind = rng.random()
        if kind < 0.25 or commits - made < 3:  # a direct commit on main
            main = commit("main", "direct", edit(rng.choice(names)), main)
            made += 1
            continue
        side, changed = main, {}
        for _ in range(rng.randint(1, 2)):
            change = edit(rng.choice(names))
            changed.update(change)
            side = commit("side", "mr", change, side)
            made += 1
        if rng.random() < 0.5:  # main moved on meanwhile
            main = commit("main", "meanwhile", edit(rng.choice(names)), main)
            made += 1
        if rng.random() < 0.15:  # the merge itself changes a file (a conflict resolution)
            changed.update(edit(rng.choice(names)))
        main = commit("main", "merge", changed, main, merge=side)
        made += 1
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(
        ["git", "-C", str(path), "fast-import", "--quiet"],
        input="".join(stream).encode(),
        check=True,
    )
    subprocess.run(["git", "-C", str(path), "reset", "-q", "--hard", "main"], check=True)
    return path


def write_fleet(repo: Path, customers: int) -> Path:
    """A fleet file (outside git) listing every customer folder of ``repo``."""
    lines = ["fleet_version: 1", "customers:"]
    for i in range(customers):
        lines += [f"- name: {customer_name(i)}", f"  repo: ./customers/{customer_name(i)}"]
    path = repo / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(func: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = func()
    return time.perf_counter() - start, value


def rev_list_baseline(repo: Path, customers: int, sample: int) -> float:
    """Seconds per customer of the per-customer history walk (on ``sample`` customers)."""
    picked = random.Random(1).sample(range(customers), min(sample, customers))
    start = time.perf_counter()
    for i in picked:
        subprocess.run(
            ["git", "-C", str(repo), "rev-list", "--max-count=1", "HEAD", "--"]
            + [f"customers/{customer_name(i)}"],
            check=True,
            capture_output=True,
        )
    return (time.perf_counter() - start) / len(picked)


def bench_plan(sizes: list[int], history: list[int], work: Path) -> None:
    from builder.fleet import load_fleet, plan
    from builder.settings import load_settings

    settings = load_settings(ROOT)
    print("plan: seconds per customer (single pass) vs one rev-list per customer (before)")
    print(f"{'N':>6} {'commits':>8} {'plan s':>8} {'s/cust':>8} {'rev-list s/cust':>16} {'ratio':>6}")
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
