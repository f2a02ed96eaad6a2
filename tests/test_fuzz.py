"""Fuzzing what the builder reads from outside: no input ends in an internal error (exit 70).

The target (testbed/fuzz.py) reads customer.yaml, analysis.yaml, the lock, the fleet file,
registry records, model designs and publish manifests the way the builder does. The kept
corpus (tests/data/fuzz-corpus: what earlier runs found, plus the inputs of issue 31) is
replayed every run; a coverage-guided run (atheris) of bounded time runs as a slow test, and
`scripts/fuzz.py` runs longer and keeps what it finds.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import yamldoc
from testbed import fuzz

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "fuzz-corpus"


@pytest.fixture(scope="module")
def world() -> Iterator[fuzz.World]:
    with fuzz.temporary_world() as made:
        yield made


def test_every_seed_document_is_read(world: fuzz.World) -> None:
    """The world is valid as it stands: each document alone and with the whole world."""
    for kind in fuzz.KINDS:
        world.reset()
        world.read_alone(kind)
        world.read(kind)


def test_the_kept_corpus_replays_clean(world: fuzz.World) -> None:
    inputs = fuzz.corpus_files([CORPUS])
    assert len(inputs) > 100 and any(p.name.startswith("issue-31-") for p in inputs)
    assert fuzz.replay(world, [CORPUS]) == []


def test_an_internal_error_is_found(world: fuzz.World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target tells a bug (any exception but a one-line BuilderError) from a refusal."""
    seed = world.seed("customer")
    assert fuzz.exercise(world, seed) is None
    assert fuzz.exercise(world, seed.replace(b"version: 1", b"version: [")) is None

    def broken(*_: object) -> None:
        raise KeyError("missing")

    monkeypatch.setattr(yamldoc, "validate", broken)
    found = fuzz.exercise(world, seed)
    assert found is not None and found.startswith("customer: internal error")
    assert "KeyError" in found


@pytest.mark.slow
def test_coverage_guided_fuzzing_finds_no_internal_error(tmp_path: Path) -> None:
    """30 s of atheris from the kept corpus (which it does not change): zero exit-70s."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--seconds", "30",
         "--findings", str(tmp_path / "findings")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("fuzz: ") and summary.endswith(" 0 internal errors (exit 70)")
    assert int(summary.split()[1]) > 0  # it ran
    assert not (tmp_path / "findings").exists()
