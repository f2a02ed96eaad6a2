#!/usr/bin/env python3
"""Fuzz what the builder reads from outside with atheris (libFuzzer, coverage-guided).

The target is :func:`testbed.fuzz.exercise`: customer.yaml, analysis.yaml, the lock, the fleet
file, registry records, model designs and publish manifests, each read the way the builder
reads it. An input that ends in anything but a one-line ``BuilderError`` is what the CLI
reports as an internal error (exit 70): it is kept under --findings and counted.

    .venv/bin/python scripts/fuzz.py                   # 10 minutes from the kept corpus
    .venv/bin/python scripts/fuzz.py --seconds 30      # what the suite runs (tests/test_fuzz.py)
    .venv/bin/python scripts/fuzz.py --keep            # then merge what adds coverage into it
    .venv/bin/python scripts/fuzz.py --replay          # read the kept corpus once, no fuzzing

The kept corpus is tests/data/fuzz-corpus (the suite replays it every run). Prints one line,
``fuzz: N runs in S s, K internal errors (exit 70)``, and exits 1 when K > 0.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # testbed/ is a top-level package of the repository
CORPUS = ROOT / "tests" / "data" / "fuzz-corpus"
#: Modules whose branches guide the fuzzer: the readers, the schemas, YAML itself.
INSTRUMENTED = [
    "builder.yamldoc",
    "builder.cook",
    "builder.documents",
    "builder.image.contract",
    "builder.fleet.fleetfile",
    "builder.paths",
    "tilerunner.param_schema",
    "yaml",
    "jsonschema",
]
_RUNS = re.compile(r"Done (\d+) runs in")


def _child(findings: Path, libfuzzer_args: list[str]) -> None:
    """The fuzzing process itself: libFuzzer ends it when its time is up."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        from testbed import fuzz
    world_context = fuzz.temporary_world()
    world = world_context.__enter__()  # libFuzzer exits the process: nothing after Fuzz() runs

    def one(data: bytes) -> None:
        problem = fuzz.exercise(world, data)
        if problem is not None:
            path = fuzz.write_finding(findings, data, problem)
            print(f"fuzz: FINDING {path}: {problem.splitlines()[0]}", file=sys.stderr, flush=True)

    # libFuzzer runs argv[0] through the shell for -merge=1: this process again, as a child.
    itself = shlex.join([sys.executable, __file__, "--child", "--findings", str(findings)])
    atheris.Setup([itself, *libfuzzer_args], one)
    atheris.Fuzz()


def _replay(folders: list[Path]) -> int:
    from testbed import fuzz

    with fuzz.temporary_world() as world:
        found = fuzz.replay(world, folders)
        inputs = len(fuzz.corpus_files(folders))
    for path, problem in found:
        print(f"fuzz: {path}: {problem}", file=sys.stderr)
    print(f"fuzz: replayed {inputs} inputs, {len(found)} internal errors (exit 70)")
    return 1 if found else 0


def _seed(folder: Path) -> None:
    """The valid documents of the world, as the first inputs of a new corpus."""
    from testbed import fuzz

    folder.mkdir(parents=True, exist_ok=True)
    with fuzz.temporary_world() as world:
        for kind in fuzz.KINDS:
            (folder / f"seed-{kind}").write_bytes(world.seed(kind))
            (folder / f"seed-{kind}-whole").write_bytes(world.seed(kind, whole=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=600, help="fuzzing time (default 600)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the kept corpus")
    parser.add_argument("--findings", type=Path, help="keep failing inputs here (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="merge new coverage into --corpus")
    parser.add_argument("--replay", action="store_true", help="read --corpus once, no fuzzing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if args.child:
        _child(args.findings, extra)
        return 0
    if args.replay:
        return _replay([args.corpus])
    if not args.corpus.is_dir():
        _seed(args.corpus)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp) / "corpus"  # libFuzzer adds to its first folder: never the kept one
        shutil.copytree(args.corpus, work)
        findings = args.findings or Path(tmp) / "findings"
        child = [sys.executable, __file__, "--child", "--findings", str(findings)]
        start = time.monotonic()
        done = subprocess.run(
            [*child, f"-max_total_time={args.seconds}", "-timeout=30", "-rss_limit_mb=4096",
             *extra, str(work), str(args.corpus)],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - start
        runs = _RUNS.findall(done.stderr)
        found = sorted(p for p in findings.glob("*") if p.suffix == "") if findings.is_dir() else []
        for path in found:
            print(f"fuzz: {path}: {path.with_suffix('.txt').read_text()}", file=sys.stderr)
        if done.returncode != 0 or not runs:
            print(done.stderr[-4000:], file=sys.stderr)
            print(f"fuzz: the fuzzer failed (exit {done.returncode})", file=sys.stderr)
            return 2
        if args.keep:
            merged = subprocess.run(
                [*child, "-merge=1", str(args.corpus), str(work)],
                capture_output=True, text=True, cwd=ROOT, check=False,
            )  # fmt: skip
            if merged.returncode != 0:
                print(merged.stderr[-4000:], file=sys.stderr)
                return 2
        print(f"fuzz: {runs[-1]} runs in {seconds:.0f} s, {len(found)} internal errors (exit 70)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
