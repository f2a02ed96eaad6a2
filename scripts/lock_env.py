#!/usr/bin/env python3
"""Write or check requirements-host.txt, the hash-pinned lock of the host environment.

The host environment is the builder, the tile runner and their test extras (pyproject.toml,
base-image/runner/pyproject.toml) plus the tools of requirements-host.in. Every package the
base image also installs is pinned to the image's version: base-image/requirements-cpu.txt
(itself generated from requirements-cpu.in) is the one place those pins live, and it is
passed to the resolver as constraints, so host and image cannot drift.

    .venv/bin/python scripts/lock_env.py          # refresh the lock (uv pip compile)
    python3 scripts/lock_env.py --check           # exit 1 if an input changed since

The lock's header records the sha256 of its inputs; `--check` (run by scripts/bootstrap.sh
before installing) needs only the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-host.txt"
INPUTS = (
    "pyproject.toml",
    "base-image/runner/pyproject.toml",
    "requirements-host.in",
    "base-image/requirements-cpu.txt",
)
HEADER = "# inputs-sha256: "
REFRESH = ".venv/bin/python scripts/lock_env.py"
# The host is Debian bookworm: CPython 3.11, glibc 2.36, x86_64 (as the base image).
TARGET = ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_36")


def _dependency_view(path: Path) -> bytes:
    """What of an input decides the resolution: for a pyproject.toml only the build system and
    the project's Python and dependencies (tool settings such as ruff's do not stale the lock)."""
    if path.name != "pyproject.toml":
        return path.read_bytes()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    project = data.get("project", {})
    view = {
        "build-system": data.get("build-system"),
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies"),
        "optional-dependencies": project.get("optional-dependencies"),
    }
    return json.dumps(view, sort_keys=True).encode()


def inputs_digest(root: Path = ROOT) -> str:
    """sha256 over the lock's inputs (names and dependency views, in a fixed order)."""
    digest = hashlib.sha256()
    for name in INPUTS:
        digest.update(name.encode() + b"\0" + _dependency_view(root / name) + b"\0")
    return digest.hexdigest()


def recorded_digest(lock: Path) -> str | None:
    """The inputs digest written in the lock's header, or None."""
    try:
        lines = lock.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(HEADER):
            return line[len(HEADER) :].strip()
    return None


def image_constraints(requirements: Path) -> str:
    """`name==version` lines of a hash-pinned requirements file (hashes and comments dropped)."""
    pins = []
    for line in requirements.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip().rstrip("\\").strip()
        if "==" in text and not text.startswith("--"):
            pins.append(text)
    return "\n".join(pins) + "\n"


def check(root: Path = ROOT) -> str | None:
    """None when the lock matches its inputs, else one line saying what to do."""
    lock = root / LOCK.name
    recorded = recorded_digest(lock)
    if recorded is None:
        return f"{lock.name} is missing or has no '{HEADER.strip()}' line: run {REFRESH}"
    if recorded != inputs_digest(root):
        changed = ", ".join(INPUTS)
        return (
            f"{lock.name} is stale: one of {changed} changed since it was written; "
            f"run {REFRESH} and commit the result"
        )
    return None


def refresh(root: Path = ROOT) -> Path:
    """Resolve the inputs with uv and write the lock with its inputs digest."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("lock_env: uv is not installed; run bash scripts/bootstrap.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "image-constraints.txt"
        constraints.write_text(image_constraints(root / "base-image/requirements-cpu.txt"))
        out = Path(tmp) / "host.txt"
        # Seeded with the current lock: uv keeps its pins and changes only what the inputs need.
        if (root / LOCK.name).is_file():
            shutil.copyfile(root / LOCK.name, out)
        subprocess.run(
            [uv, "pip", "compile", "--quiet", "--generate-hashes", "--extra", "test",
             "--no-header", "--constraint", str(constraints), *TARGET, "-o", str(out),
             "pyproject.toml", "base-image/runner/pyproject.toml", "requirements-host.in"],
            cwd=root, check=True,
        )  # fmt: skip
        body = out.read_text(encoding="utf-8")
    header = (
        "# The host environment (builder, tile runner, test extras, tools), hash-pinned.\n"
        f"# Generated by scripts/lock_env.py: do not edit. Refresh: {REFRESH}\n"
        f"{HEADER}{inputs_digest(root)}\n"
    )
    target = root / LOCK.name
    target.write_text(header + body, encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the lock is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        problem = check(args.root)
        if problem:
            print(f"lock_env: {problem}", file=sys.stderr)
            return 1
        return 0
    print(refresh(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
