"""The tool's own environment: one hash-pinned lock, checked before install, equal to the image.

A tool that promises "same inputs, same result" installs the same way every time: these tests
fail when the lock is stale, when the installed environment is not the locked one, and when a
package the base image also ships is pinned differently on the host.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT as REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import lock_env

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", re.MULTILINE)


def _pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a hash-pinned requirements file."""
    text = path.read_text(encoding="utf-8")
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in PIN.findall(text)}


def _copy_inputs(dest: Path) -> None:
    for name in (
        *lock_env.INPUTS,
        lock_env.LOCK.name,
        "scripts/lock_env.py",
        "scripts/bootstrap.sh",
    ):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)


def test_committed_lock_matches_its_inputs() -> None:
    assert lock_env.check(REPO_ROOT) is None


def test_stale_lock_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    _copy_inputs(tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"rich>=13.0",', '"rich>=13.0",\n  "tqdm",'))
    done = subprocess.run(
        [sys.executable, "scripts/lock_env.py", "--check", "--root", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "requirements-host.txt is stale" in done.stderr
    assert "scripts/lock_env.py" in done.stderr
    # bootstrap stops before it installs anything from the stale lock
    boot = subprocess.run(
        ["bash", "scripts/bootstrap.sh"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert boot.returncode == 1
    assert "stale" in boot.stderr
    assert not (tmp_path / ".venv").exists()


def test_a_changed_image_pin_also_makes_the_lock_stale(tmp_path: Path) -> None:
    _copy_inputs(tmp_path)
    image = tmp_path / "base-image/requirements-cpu.txt"
    image.write_text(image.read_text().replace("onnxruntime==1.", "onnxruntime==9."))
    assert "stale" in (lock_env.check(tmp_path) or "")


def test_host_pins_equal_the_base_image_pins() -> None:
    host = _pins(REPO_ROOT / "requirements-host.txt")
    image = _pins(REPO_ROOT / "base-image/requirements-cpu.txt")
    shared = sorted(set(host) & set(image))
    assert "onnxruntime" in shared and "numpy" in shared
    differ = {name: (host[name], image[name]) for name in shared if host[name] != image[name]}
    assert differ == {}


@pytest.mark.parametrize("name", ["onnxruntime", "numpy", "clearml", "pytest", "mypy", "ruff"])
def test_installed_environment_is_the_locked_one(name: str) -> None:
    locked = _pins(REPO_ROOT / "requirements-host.txt")[name]
    assert importlib.metadata.version(name) == locked


def test_every_lock_entry_carries_a_hash() -> None:
    text = (REPO_ROOT / "requirements-host.txt").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    assert entries
    for entry in entries:
        if "==" in entry:
            assert "--hash=sha256:" in entry, entry.splitlines()[0]


PIP_INSTALL = re.compile(r"pip[\"']?\s+install\b[^\n]*")


@pytest.mark.parametrize(
    "path",
    [".gitlab-ci.yml", "ci/customer.gitlab-ci.yml", "ci/builder-env.sh", "scripts/bootstrap.sh"],
)
def test_ci_installs_only_pinned_or_local_code(path: str) -> None:
    """No CI job or set-up script installs "whatever the index has" (dependency confusion)."""
    text = (REPO_ROOT / path).read_text().replace("\\\n", " ")  # join continued lines
    assert "BUILDER_PIP_SPEC" not in text
    for match in PIP_INSTALL.finditer(text):
        command = match.group(0)
        pinned = "--require-hashes" in command
        local_only = "--no-deps" in command and "--no-index" in command
        assert pinned or local_only, f"{path}: unpinned install: {command}"


def test_customer_template_builds_the_builder_from_a_release_tag() -> None:
    text = (REPO_ROOT / "ci/customer.gitlab-ci.yml").read_text()
    assert re.search(r"BUILDER_REF: v\d+\.\d+\.\d+", text)
    assert ". ci/builder-env.sh" in text
    assert "CI_JOB_TOKEN}@" not in text  # the token never goes into a URL
