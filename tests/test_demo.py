"""The bundled demo: what scripts/make_demo_registry.py writes is what is committed, and every
example customer cooks against it."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from builder.cook.stage import cook
from builder.settings import load_settings

sys.path.insert(0, str(ROOT / "scripts"))
from make_demo_registry import write_demo


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_committed_demo_is_what_the_script_writes(tmp_path: Path) -> None:
    write_demo(tmp_path)
    for sub in ("registry", "production"):
        assert _tree(tmp_path / sub) == _tree(ROOT / "demo" / sub)
        for rel in _tree(tmp_path / sub):
            assert filecmp.cmp(tmp_path / sub / rel, ROOT / "demo" / sub / rel, shallow=False), rel


def test_runner_and_builder_ship_the_same_verbose_schema() -> None:
    builder_copy = ROOT / "builder" / "schemas" / "analysis-verbose.schema.json"
    runner_copy = (
        ROOT
        / "base-image"
        / "runner"
        / "tilerunner"
        / "schemas"
        / "analysis-verbose-v1.schema.json"
    )
    assert builder_copy.read_bytes() == runner_copy.read_bytes()


@pytest.mark.parametrize("customer", ["customer-x", "customer-y", "customer-z"])
def test_example_customers_cook_against_the_demo(customer: str) -> None:
    cooked = cook(customer, load_settings(ROOT))
    assert cooked.spec.customer == customer and not cooked.development
    assert all(f.sha256 for m in cooked.models for f in m.files)
