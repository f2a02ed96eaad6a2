"""Configuration repositories with real-shaped history, for the fleet tests and benchmark.

:func:`make_history` writes, with ``git fast-import``, a repository of N customer folders
(``customers/<name>``) and H commits shaped like a GitLab project's: merge requests merged
back (some merges changing a file themselves), direct commits, distinct commit times.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

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
