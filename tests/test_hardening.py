"""Hardening: bad or hostile input is refused in one line; nothing from outside gets in.

One test (or parametrised family) per class of problem: symlinks out of the customer repo,
names that are not anchored, YAML that crashes or exhausts the parser, locks that name host
files, secrets in messages, and writes that leave something half-written.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import unittest.mock
from collections.abc import Callable, Iterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import git
import hypothesis
import pytest
import yaml
from helpers import (
    ANALYSIS_YAML,
    CUSTOMER_YAML,
    commit_files,
    customer_repo,
    model_record,
    offline_settings,
    run_cli,
    served_over_http,
    task_record,
)
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from builder import yamldoc
from builder.cook.load import load_customer
from builder.cook.lock import make_lock, models_from_lock, read_lock
from builder.cook.stage import cook
from builder.deliver import write_docker_archive
from builder.errors import BuilderError, ConfigError, ImageError
from builder.image.base import resolve_base
from builder.oci import BlobStore
from builder.settings import Settings

SECRET = "TOP-SECRET-HOST-CONTENT root:x:0:0"
AUTO_ID = "0123456789abcdef0123456789abcdef"  # any id: load never asks the registry


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return offline_settings(tmp_path)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return customer_repo(tmp_path / "cx", carcinoma=AUTO_ID, mitosis=AUTO_ID.upper())


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host folder outside the customer repo holding something that must never ship."""
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "passwd").write_text(SECRET + "\n")
    (folder / "model.onnx").write_text(SECRET)
    return folder


def _analysis(manual: str = "weights/mitosis") -> str:
    return ANALYSIS_YAML.format(carcinoma=AUTO_ID, mitosis=AUTO_ID, threshold=0.5).replace(
        f"sourcing: auto\n      reference: {AUTO_ID}\n  features",
        f"sourcing: manual\n      reference: {manual}\n  features",
    )


def _one_line_error(repo: Path, settings: Settings, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_customer(str(repo), settings, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- symlinks: refused in the work tree and in git, naming the path -----------------------------


def _commit_link(repo: Path, rel: str, target: Path) -> None:
    """Commit ``rel`` as a symbolic link to ``target`` (git records it as mode 120000)."""
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        git.Repo(repo).git.rm("-r", "--cached", "--quiet", rel)
        if path.is_dir() and not path.is_symlink():
            for child in sorted(path.rglob("*"), reverse=True):
                child.unlink() if not child.is_dir() else child.rmdir()
            path.rmdir()
        else:
            path.unlink()
    path.symlink_to(target)
    handle = git.Repo(repo)
    handle.git.add(rel)
    handle.git.commit("-q", "-m", f"link {rel}")


LINKS = {
    "weights file": ("weights/mitosis/model.onnx", "model.onnx"),
    "weights folder": ("weights/mitosis", "."),
    "analysis.yaml": ("analysis.yaml", "passwd"),
    "customer.yaml": ("customer.yaml", "passwd"),
}


@pytest.mark.parametrize("worktree", [False, True], ids=["git", "worktree"])
@pytest.mark.parametrize("case", sorted(LINKS))
def test_symlinks_are_refused_naming_the_path(
    repo: Path, settings: Settings, outside: Path, case: str, worktree: bool
) -> None:
    commit_files(
        repo,
        {"analysis.yaml": _analysis(), "weights/mitosis/model.onnx": b"real weights"},
        "manual model",
    )
    rel, target = LINKS[case]
    _commit_link(repo, rel, outside / target)
    message = _one_line_error(repo, settings, worktree=worktree)
    assert "symbolic link" in message and rel in message
    assert "TOP-SECRET" not in message


@pytest.mark.parametrize("worktree", [False, True], ids=["git", "worktree"])
def test_file_names_with_control_characters_are_refused(
    repo: Path, settings: Settings, worktree: bool
) -> None:
    commit_files(
        repo,
        {"analysis.yaml": _analysis(), "weights/mitosis/model\n.onnx": b"weights"},
        "odd name",
    )
    message = _one_line_error(repo, settings, worktree=worktree)
    assert "'weights/mitosis/model\\n.onnx'" in message and "control characters" in message
    commit_files(
        repo,
        {
            "weights/mitosis/model\n.onnx": None,
            "customer.yaml": CUSTOMER_YAML.format(name="customer-x", base="2.4.1")
            + 'analysis: "analysis.yaml\\n"\n',
        },
        "odd analysis path",
    )
    assert "control characters" in _one_line_error(repo, settings, worktree=worktree)


def test_symlink_cli_refuses_in_one_line(repo: Path, outside: Path) -> None:
    _commit_link(repo, "analysis.yaml", outside / "passwd")
    for extra in ((), ("--worktree",)):
        result = run_cli("validate", str(repo), *extra)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "TOP-SECRET" not in result.stderr
        assert "analysis.yaml is a symbolic link" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --- names: the whole string must match (no trailing newline) -----------------------------------


def _schema_patterns() -> Iterator[tuple[str, str]]:
    """Every ``pattern`` in every JSON schema shipped by the builder and the tile runner."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    yield where, value
                else:
                    yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{where}/{index}")

    for package in ("builder.schemas", "tilerunner.schemas"):
        for file in resources.files(package).iterdir():
            if file.name.endswith(".json"):
                yield from walk(json.loads(file.read_text("utf-8")), f"{package}:{file.name}")


@pytest.mark.parametrize(("where", "pattern"), sorted(set(_schema_patterns())))
def test_schema_patterns_do_not_accept_a_trailing_newline(where: str, pattern: str) -> None:
    # jsonschema applies `pattern` with re.search, where `$` also matches before a final "\n".
    samples = ["a", "a0", "customer-x", "Carcinoma", "/data", "0" * 64, "sha256:" + "0" * 64]
    matching = [s for s in samples if re.search(pattern, s)]
    if pattern.startswith("^") and not pattern.startswith("^/"):
        assert matching, f"{where}: no sample matches {pattern}"
        for sample in matching:
            assert not re.search(pattern, sample + "\n"), f"{where}: {pattern} accepts a newline"


NAME_CASES = {
    "customer": ("customer.yaml", CUSTOMER_YAML.format(name='"customer-x\\n"', base="2.4.1")),
    "analysis": (
        "analysis.yaml",
        ANALYSIS_YAML.format(carcinoma=AUTO_ID, mitosis=AUTO_ID, threshold=0.5).replace(
            "name: breast", 'name: "breast\\n"'
        ),
    ),
    "model": (
        "analysis.yaml",
        ANALYSIS_YAML.format(carcinoma=AUTO_ID, mitosis=AUTO_ID, threshold=0.5)
        .replace("    mitosis_model:", '    "mitosis_model\\n":')
        .replace("segmentation_model: mitosis_model", 'segmentation_model: "mitosis_model\\n"'),
    ),
    "base repository": (
        "customer.yaml",
        CUSTOMER_YAML.format(name="customer-x", base="2.4.1")
        + '  repository: "127.0.0.1:5000/ivd/base\\n"\n',
    ),
}


@pytest.mark.parametrize("case", sorted(NAME_CASES))
def test_names_with_a_newline_are_refused(repo: Path, settings: Settings, case: str) -> None:
    rel, text = NAME_CASES[case]
    commit_files(repo, {rel: text}, f"bad {case} name")
    message = _one_line_error(repo, settings)
    assert rel in message and ("\\n" in message or "does not match" in message)


def test_customer_name_with_newline_cli(repo: Path) -> None:
    commit_files(
        repo, {"customer.yaml": CUSTOMER_YAML.format(name='"customer-x\\n"', base="2.4.1")}, "nl"
    )
    result = run_cli("validate", str(repo))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "customer.yaml:2" in result.stderr


# --- YAML that used to crash or exhaust the parser ----------------------------------------------

BAD_YAML: dict[str, tuple[bytes, str]] = {
    "not UTF-8": (b"version: 1\ncustomer: \xff\xfe\n", "not UTF-8"),
    "NUL byte": (b"version: 1\x00\n", "NUL byte"),
    "binary": (bytes(range(256)) * 4, "NUL byte"),
    "control character": (b"version: \x07\n", "not allowed"),
    "deep lists": (b"[" * 50_000 + b"]" * 50_000, f"deeper than {yamldoc.MAX_DEPTH}"),
    "deep flow maps": (b"{a: " * 5_000 + b"1" + b"}" * 5_000, f"deeper than {yamldoc.MAX_DEPTH}"),
    "deep block maps": (
        "".join("  " * i + f"k{i}:\n" for i in range(300)).encode(),
        f"deeper than {yamldoc.MAX_DEPTH}",
    ),
    "deep through aliases": (
        b"a: &a " + b"[" * 60 + b"1" + b"]" * 60 + b"\nb: &b " + b"[" * 60 + b"*a" + b"]" * 60,
        f"deeper than {yamldoc.MAX_DEPTH}",
    ),
    "recursive alias": (b"a: &a [1, *a]\n", "recursive alias"),
    "recursive mapping alias": (b"a: &a {b: *a}\n", "recursive alias"),
    "100,000-digit integer": (b"version: " + b"9" * 100_000 + b"\n", "digits"),
    "impossible date": (b"version: 2024-13-45\n", "month must be"),
    "list as a key": (b"? [1, 2]\n: 3\n", "cannot be a key"),
    "empty !!int": (b"version: !!int ''\n", "!!int '' cannot be read"),
    "empty !!float": (b"version: !!float ''\n", "!!float '' cannot be read"),
    "bad !!timestamp": (b"version: !!timestamp soon\n", "!!timestamp 'soon' cannot be read"),
    "bad !!bool": (b"version: !!bool maybe\n", "!!bool 'maybe' cannot be read"),
    "a date": (b"version: 2024-01-31\n", "version: a date is not allowed here"),
    "a timestamp": (b"version: 2024-01-31T10:00:00Z\n", "a timestamp is not allowed"),
    "a set": (b"version: !!set {a, b}\n", "a set (!!set) is not allowed"),
    "!!binary": (b"version: !!binary aGVsbG8=\n", "binary data (!!binary) is not allowed"),
    "pairs": (b"version: !!omap [a: 1]\n", "a pair (!!omap/!!pairs) is not allowed"),
    "NaN": (b"version: .nan\n", "nan (not a finite number)"),
    "Infinity": (b"a: {b: -.inf}\n", "a.b: -inf (not a finite number)"),
    "mixed-type keys": (b"{true: 1, x: 2}\n", "key True is not a string"),
    "an integer key": (b"a: {1: x}\n", "a: key 1 is not a string"),
    "a newline in a key": (b'"a\\nb": 1\n', "key 'a\\nb' holds a control character"),
    "too big": (
        b"a: [" + b"1," * (yamldoc.MAX_DOCUMENT_BYTES // 2) + b"1]\n",
        "over the size limit",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_yaml_is_one_line_naming_the_limit(case: str) -> None:
    data, expected = BAD_YAML[case]
    with pytest.raises(ConfigError) as info:
        yamldoc.parse(data, "customers/x/analysis.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("customers/x/analysis.yaml")
    assert expected in message


def test_size_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(*args: object) -> None:
        raise AssertionError("the parser ran on an oversized input")

    monkeypatch.setattr(yamldoc, "_StrictLoader", no_parsing)
    with pytest.raises(ConfigError, match="size limit"):
        yamldoc.parse(b"#" * (yamldoc.MAX_DOCUMENT_BYTES + 1), "big.yaml")


@pytest.mark.parametrize("worktree", [False, True], ids=["git", "worktree"])
def test_oversized_config_is_refused_before_reading(
    repo: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch, worktree: bool
) -> None:
    big = b"# padding\n" * (yamldoc.MAX_DOCUMENT_BYTES // 10 + 1)
    commit_files(repo, {"analysis.yaml": big}, "huge analysis")

    real_decode = yamldoc._decode

    def small_only(text: str | bytes, origin: str) -> str:
        assert len(text) < len(big), "an oversized file was read and handed to the parser"
        return real_decode(text, origin)

    monkeypatch.setattr(yamldoc, "_decode", small_only)
    message = _one_line_error(repo, settings, worktree=worktree)
    assert f"{len(big)} bytes, over the size limit" in message and "analysis.yaml" in message


def test_plain_large_document_is_not_an_alias_problem() -> None:
    numbers = "values: [" + ", ".join(str(i) for i in range(25_000)) + "]\n"
    assert len(yamldoc.parse(numbers, "numbers.yaml").data["values"]) == 25_000
    bomb = "a: &a [" + ", ".join(["1"] * 200) + "]\nb: [" + ", ".join(["*a"] * 200) + "]\n"
    with pytest.raises(ConfigError, match="aliases expand to more than") as info:
        yamldoc.parse(bomb, "bomb.yaml")
    assert "alias-expansion limit" in str(info.value)


@pytest.mark.parametrize(
    "case",
    ["not UTF-8", "deep lists", "recursive alias", "too big", "a newline in a key", "empty !!int"],
)
def test_bad_yaml_through_the_cli(repo: Path, case: str) -> None:
    commit_files(repo, {"analysis.yaml": BAD_YAML[case][0]}, case)
    result = run_cli("validate", str(repo))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert BAD_YAML[case][1] in result.stderr


#: Values YAML can hold and JSON cannot, as a feature's params (the runner contract check
#: used to crash on them: exit 70); each is refused where it is written.
PARAM_VALUES = {
    "date": "2024-01-01",
    "set": "!!set {a, b}",
    "binary": "!!binary aGVsbG8=",
    "mixed-type keys": "{true: 1, x: 2}",
    "NaN": ".nan",
    "Infinity": ".inf",
    "empty !!float": "!!float ''",
    "bad !!timestamp": "!!timestamp tomorrow",
}


@pytest.mark.parametrize("case", sorted(PARAM_VALUES))
def test_params_outside_json_are_refused_at_their_line(
    repo: Path, settings: Settings, case: str
) -> None:
    text = ANALYSIS_YAML.format(carcinoma=AUTO_ID, mitosis=AUTO_ID, threshold=0.5)
    text = text.replace("params: {threshold: 0.5}", f"params: {{threshold: {PARAM_VALUES[case]}}}")
    (repo / "analysis.yaml").write_text(text)
    message = _one_line_error(repo, settings, worktree=True)
    line = 1 + text.splitlines().index(next(ln for ln in text.splitlines() if "threshold" in ln))
    assert f"analysis.yaml:{line}" in message, message


def test_a_param_date_through_the_cli(repo: Path) -> None:
    text = ANALYSIS_YAML.format(carcinoma=AUTO_ID, mitosis=AUTO_ID, threshold="2024-01-01")
    commit_files(repo, {"analysis.yaml": text}, "a date as a param")
    for args in (("validate", str(repo)), ("validate", "--json", str(repo))):
        result = run_cli(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "features[0].params.threshold: a date is not allowed" in result.stdout


def test_schema_error_does_not_print_the_file(repo: Path, settings: Settings) -> None:
    commit_files(repo, {"analysis.yaml": SECRET + " " + "x" * 5000 + "\n"}, "not a mapping")
    message = _one_line_error(repo, settings)
    assert "TOP-SECRET" not in message and len(message) < 300


def test_repo_reached_through_a_link_still_loads(tmp_path: Path, settings: Settings) -> None:
    # A repo whose customer folder itself is reached through a link is read at its real path.
    real = customer_repo(tmp_path / "real", carcinoma=AUTO_ID, mitosis=AUTO_ID)
    (tmp_path / "alias").symlink_to(real)
    assert load_customer(str(tmp_path / "alias"), settings).customer == "customer-x"


# --- the lock: entries only from the production store or the customer repo, sha256 required ----

TASK = "5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e"


@pytest.fixture
def locked_world(
    repo: Path, settings: Settings, tmp_path: Path
) -> tuple[Path, Settings, dict[str, Any]]:
    """A customer with one registry model (weights in a file: production store) and one manual
    model, and the valid lock for it, as `builder lock` would write it (not yet committed)."""
    production = tmp_path / "production"
    (production / TASK).mkdir(parents=True)
    weights = b"registry weights"
    (production / TASK / "model.onnx").write_bytes(weights)
    commit_files(
        repo,
        {"analysis.yaml": _analysis(), "weights/mitosis/model.onnx": b"manual weights"},
        "manual model",
    )
    settings = replace(settings, production=f"file:{production}")
    spec = load_customer(str(repo), settings)
    entry = {
        "sourcing": "auto",
        "model_id": AUTO_ID,
        "registry_name": "carcinoma",
        "task_id": TASK,
        "task_status": "completed",
        "project": "p",
        "framework": "ONNX",
        "tags": [],
        "published": True,
        "weights_uri": f"file:{production}/{TASK}/",
        "files": [
            {
                "name": "model.onnx",
                "uri": f"file:{production}/{TASK}/model.onnx",
                "size": len(weights),
                "sha256": hashlib.sha256(weights).hexdigest(),
            }
        ],
        "preprocessing": [],
        "postprocessing": [],
        "params": {"file": "model.onnx"},
    }
    manual = dict(
        entry,
        sourcing="manual",
        model_id=None,
        task_id=None,
        weights_uri="repo:weights/mitosis",
        files=[
            {
                "name": "model.onnx",
                "uri": "repo:weights/mitosis/model.onnx",
                "size": 14,
                "sha256": hashlib.sha256(b"manual weights").hexdigest(),
            }
        ],
    )
    lock = make_lock(spec, (), None).to_dict()  # a raw mapping, edited into hostile shapes
    lock["models"] = {"carcinoma_model": entry, "mitosis_model": manual}
    return repo, settings, lock


def _commit_lock(repo: Path, lock: dict[str, Any]) -> None:
    commit_files(repo, {"customer.lock.yaml": yamldoc.dump(lock)}, "lock")


def test_valid_lock_is_used(locked_world: tuple[Path, Settings, dict[str, Any]]) -> None:
    repo, settings, lock = locked_world
    _commit_lock(repo, lock)
    cooked = cook(str(repo), settings, locked=True)
    assert [f.uri for m in cooked.models for f in m.files] == [
        lock["models"]["carcinoma_model"]["files"][0]["uri"],
        "repo:weights/mitosis/model.onnx",
    ]


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    """A change to one key of the lock (dotted path; '{root}' in text is the tmp folder)."""

    def change(lock: dict[str, Any], root: Path) -> None:
        *parents, last = path.split(".")
        node: Any = lock
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        shown = value.format(root=root) if isinstance(value, str) else value
        if shown is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = shown

    return change


_DELETE = object()
_AUTO_FILE = "models.carcinoma_model.files.0"
_MANUAL_FILE = "models.mitosis_model.files.0"

HOSTILE_LOCKS: dict[str, tuple[Callable[[dict[str, Any], Path], None], str]] = {
    "host file": (_set(f"{_AUTO_FILE}.uri", "file:{root}/host/passwd"), "not under the production"),
    "relative host file": (
        _set(f"{_AUTO_FILE}.uri", "file:etc/passwd"),
        "not under the production",
    ),
    "dot-dot out of the store": (
        _set(f"{_AUTO_FILE}.uri", "file:{root}/production/" + TASK + "/../../host/passwd"),
        "not under the production",
    ),
    "the store root itself": (_set(f"{_AUTO_FILE}.uri", "file:{root}/production"), "not under"),
    "prefix lookalike": (
        _set(f"{_AUTO_FILE}.uri", "file:{root}/production-evil/x/model.onnx"),
        "not under the production",
    ),
    "another scheme": (_set(f"{_AUTO_FILE}.uri", "https://evil.example/model.onnx"), "not under"),
    "other bucket": (_set(f"{_AUTO_FILE}.uri", "s3://other/model.onnx"), "not under"),
    "sha256 null": (_set(f"{_AUTO_FILE}.sha256", None), "sha256"),
    "sha256 missing": (_set(f"{_AUTO_FILE}.sha256", _DELETE), "'sha256' is a required property"),
    "sha256 not hex": (_set(f"{_AUTO_FILE}.sha256", "x" * 64), "sha256"),
    "size missing": (_set(f"{_AUTO_FILE}.size", _DELETE), "'size' is a required"),
    "file name escapes": (_set(f"{_AUTO_FILE}.name", "../../etc/cron.d/x"), "relative path"),
    "manual from outside": (
        _set(f"{_MANUAL_FILE}.uri", "repo:../../host/passwd"),
        "not a committed file of manual model",
    ),
    "manual as a host file": (
        _set(f"{_MANUAL_FILE}.uri", "file:{root}/host/passwd"),
        "not a committed file of manual model",
    ),
    "manual weights changed": (
        _set(f"{_MANUAL_FILE}.sha256", "0" * 64),
        "file weights/mitosis/model.onnx 000000000000 -> ",
    ),
    "model not declared": (_set("models.extra_model", {}), "'sourcing' is a required property"),
    "wrong customer": (_set("customer", "customer-y"), "stale"),
    "models not a mapping": (_set("models", [1, 2]), "is not of type 'object'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LOCKS))
def test_hostile_lock_is_refused(
    locked_world: tuple[Path, Settings, dict[str, Any]], tmp_path: Path, case: str
) -> None:
    repo, settings, lock = locked_world
    (tmp_path / "host").mkdir(exist_ok=True)
    (tmp_path / "host" / "passwd").write_text(SECRET)
    change, expected = HOSTILE_LOCKS[case]
    change(lock, tmp_path)
    _commit_lock(repo, lock)
    with pytest.raises(ConfigError) as info:
        cook(str(repo), settings, locked=True)
    message = str(info.value)
    assert "\n" not in message and expected in message and "customer.lock.yaml" in message


def test_too_deep_lock_is_one_line(locked_world: tuple[Path, Settings, dict[str, Any]]) -> None:
    repo, settings, lock = locked_world
    text = yamldoc.dump(lock) + b"deep: " + b"[" * 10_000 + b"]" * 10_000 + b"\n"
    commit_files(repo, {"customer.lock.yaml": text}, "deep lock")
    with pytest.raises(ConfigError, match="deeper than"):
        cook(str(repo), settings, locked=True)


def test_hostile_lock_through_the_cli(
    locked_world: tuple[Path, Settings, dict[str, Any]], tmp_path: Path
) -> None:
    repo, settings, lock = locked_world
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "passwd").write_text(SECRET)
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    lock["models"]["carcinoma_model"]["files"][0].update(
        uri=f"file:{tmp_path}/host/passwd", sha256=digest, size=len(SECRET)
    )
    _commit_lock(repo, lock)
    layout = tmp_path / "layout"
    env = {
        "BUILDER_PRODUCTION": settings.production,
        "BUILDER_CACHE_DIR": str(tmp_path / "cache"),
        "BUILDER_MODEL_REGISTRY": "local:/nowhere",
    }
    result = run_cli("build", str(repo), "--locked", "--oci-layout", str(layout), env=env)
    assert result.returncode == 2, result.stderr
    assert "not under the production store" in result.stderr and "Traceback" not in result.stderr
    assert not layout.exists()
    cache = tmp_path / "cache"
    assert not any(p.read_bytes() == SECRET.encode() for p in cache.rglob("*") if p.is_file())


# --- secrets: never printed, never stored ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("https://deploy:p@ss@w0rd@gitlab.example.com/g/r.git", "w0rd"),
        ("https://deploy:p@ss@w0rd@gitlab.example.com/g/r.git", "p@ss"),
        ("https://gitlab.example.com/g/r.git?private_token=glpat-123456", "glpat"),
        ("https://h/r.git?a=1&private_token=glpat-123456#frag", "glpat"),
        ("fatal: unable to access 'https://oauth2:tok3n@h/r.git/': 403", "tok3n"),
        ("s3://b/k?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIAXYZ", "AKIAXYZ"),
        ("https://deploy:pa/ss-w0rd@gitlab.example.com/g/r.git", "ss-w0rd"),
        ("https://deploy:pa:ss:w0rd@gitlab.example.com/g/r.git", "w0rd"),
        ("pushing deploy:s3cr3t@registry.example.com:5000/ivd/x:1", "s3cr3t"),
    ],
)
def test_secrets_are_masked_in_any_text(text: str, secret: str) -> None:
    from builder.cook.load import canonical_repo_url
    from builder.redact import redact_url

    assert secret not in redact_url(text)
    if text.startswith("https://"):
        assert secret not in canonical_repo_url(text)
        assert canonical_repo_url(text).startswith(
            ("https://gitlab.example.com/g/r", "https://h/r")
        )


def test_a_remembered_password_is_masked_anywhere() -> None:
    """A password given in a URL (an argument) is masked wherever it turns up, also where no
    URL pattern finds it: a space in it, git's message quoting it alone, percent-encoded."""
    from builder.redact import mask_secrets, remember_url_secrets, strip_credentials

    url = "http://alice:pa ss/w@rd:x@gitlab.example.com/g/r.git"
    remember_url_secrets(["build", url, "--push"])
    for text in (url, "fatal: password 'pa ss/w@rd:x' refused", "pa%20ss%2Fw%40rd%3Ax"):
        assert "pa ss" not in mask_secrets(text) and "%20ss" not in mask_secrets(text)
    assert strip_credentials(url) == "http://gitlab.example.com/g/r.git"


def test_secrets_never_reach_the_cli_output(tmp_path: Path) -> None:
    url = f"https://deploy:p@ss@w0rd@127.0.0.1:9/{tmp_path.name}.git?private_token=glpat-98765"
    env = {"BUILDER_CACHE_DIR": str(tmp_path / "cache"), "MY_DEPLOY_TOKEN": "tok-abcdef-123"}
    for args in (("validate", url), ("validate", "--json", url), ("validate", "tok-abcdef-123")):
        result = run_cli(*args, env=env)
        assert result.returncode == 2, result.stderr
        output = result.stdout + result.stderr
        for secret in ("w0rd", "p@ss", "glpat", "tok-abcdef-123"):
            assert secret not in output, (args, output)
        assert "Traceback" not in output


@pytest.fixture
def http_git(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A customer repo served over plain HTTP (git's dumb protocol) by a real HTTP server."""

    work = customer_repo(tmp_path / "served-work", carcinoma=AUTO_ID, mitosis=AUTO_ID)
    served = tmp_path / "www"
    served.mkdir()
    git.Repo.clone_from(work, served / "customer.git", bare=True)
    bare = git.Repo(served / "customer.git")
    bare.git.branch("-m", bare.active_branch.name, "trunk")  # a default branch git would not guess
    bare.git.update_server_info()
    with served_over_http(served) as host:
        yield f"{host}/customer.git", work


def test_clone_credentials_are_not_stored(
    http_git: tuple[str, Path], settings: Settings, tmp_path: Path
) -> None:
    where, work = http_git
    url = f"http://deploy:s3cr%40tpass@{where}"
    first = load_customer(url, settings)
    commit_files(
        work, {"customer.yaml": CUSTOMER_YAML.format(name="customer-y", base="2.4.1")}, "y"
    )
    git.Repo(tmp_path / "www" / "customer.git").git.fetch(str(work), "+HEAD:refs/heads/trunk")
    git.Repo(tmp_path / "www" / "customer.git").git.update_server_info()
    again = load_customer(url, settings)  # fetched again, with the credentials of this call
    assert (first.customer, again.customer) == ("customer-x", "customer-y")
    assert "s3cr" not in again.source.location and "s3cr" not in again.source.url
    stored = [p for p in (settings.cache_dir / "repos").rglob("*") if p.is_file()]
    assert stored
    for path in stored:
        data = path.read_bytes()
        assert b"s3cr" not in data, path


# --- atomic outputs: a docker archive, temporary blobs of a killed assemble -----------------------


@pytest.fixture
def small_image(tmp_path: Path) -> Any:
    """An image assembled (no daemon) on the synthetic base of the assemble tests."""
    from test_assemble import build, make_base_layout, model_tree

    make_base_layout(tmp_path / "bases")
    base = resolve_base(f"oci:{tmp_path / 'bases'}", "~=1.0")
    return build(base, model_tree(tmp_path / "weights"), BlobStore(tmp_path / "store"))


def test_docker_archive_on_a_full_disk_keeps_the_old_one(
    small_image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    out = tmp_path / "out"
    out.mkdir()
    archive = out / "image.tar"
    write_docker_archive(small_image, archive, ["ivd/customer-x:1"])
    good = archive.read_bytes()
    real_addfile = tarfile.TarFile.addfile
    calls = 0

    def disk_fills_up(self: tarfile.TarFile, info: tarfile.TarInfo, fileobj: Any = None) -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", disk_fills_up)
    with pytest.raises(ImageError, match="No space left on device"):
        write_docker_archive(small_image, archive, ["ivd/customer-x:2"])
    assert archive.read_bytes() == good  # the good archive is untouched
    assert sorted(p.name for p in out.iterdir()) == ["image.tar"]  # no partial file left
    with pytest.raises(ImageError):
        write_docker_archive(small_image, out / "new.tar", ["ivd/customer-x:2"])
    assert sorted(p.name for p in out.iterdir()) == ["image.tar"]


def test_the_temporary_archive_of_a_killed_export_is_removed(
    small_image: Any, tmp_path: Path
) -> None:
    """`build --docker-archive` killed halfway leaves its temporary file next to the archive;
    the next export to that file removes it (never one another export is still writing)."""
    out = tmp_path / "out"
    out.mkdir()
    archive = out / "image.tar"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from builder.deliver import _replaced_on_success\n"
        "with _replaced_on_success(Path(sys.argv[1])) as f:\n"
        "    f.write(b'x' * (1 << 20)); f.flush(); print('writing', flush=True); time.sleep(600)\n"
    )
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(archive)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    leftovers = sorted(out.glob(".image.tar.*.tmp"))
    assert len(leftovers) == 2
    old = time.time() - 3600
    for path in leftovers:
        os.utime(path, (old, old))
    writers[0].send_signal(signal.SIGKILL)  # kill -9: no clean-up ran
    writers[0].wait(timeout=30)
    write_docker_archive(small_image, archive, ["ivd/customer-x:1"])
    try:
        assert len(list(out.glob(".image.tar.*.tmp"))) == 1  # the live writer's file is kept
        assert tarfile.is_tarfile(archive)
    finally:
        writers[1].kill()
        writers[1].wait(timeout=30)


def test_temporary_blobs_of_a_killed_assemble_are_removed(tmp_path: Path) -> None:

    store_dir = tmp_path / "store"
    script = (
        "import sys, time\n"
        "from builder.oci import BlobStore\n"
        "with BlobStore(sys.argv[1]).writer() as w:\n"
        "    w.write(b'x' * (1 << 20)); w.flush(); print('writing', flush=True); time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(store_dir)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "writing"
    store = BlobStore(store_dir)
    with store.writer() as live:  # another build, still writing
        live.write(b"in use")
        old = time.time() - 3600
        for path in (store_dir / "tmp").iterdir():
            os.utime(path, (old, old))
        BlobStore(store_dir)  # the writer in the child still holds its file: kept
        assert len(list((store_dir / "tmp").iterdir())) == 2
        child.send_signal(signal.SIGKILL)  # kill -9: no clean-up ran in the child
        child.wait(timeout=30)
        BlobStore(store_dir)  # the next build sweeps what the dead one left, not ours
        assert len(list((store_dir / "tmp").iterdir())) == 1
    assert list((store_dir / "tmp").iterdir()) == []
    assert store.has("sha256:" + hashlib.sha256(b"in use").hexdigest())


# --- property-based: any bytes, any YAML structure: a result or one error line ------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**40, max_value=10**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["customer-x\n", "../x", "/etc/passwd", "a" * 300, "~=2.4", "auto", ""])
)
_KEYS = st.text(max_size=12) | st.integers() | st.booleans() | st.none()
ANY_YAML_VALUE = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)
PROPERTY = hypothesis.settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_VALID_CUSTOMER = {"version": 1, "customer": "customer-x", "base_image": {"version": "~=2.4"}}
_VALID_ANALYSIS = yaml.safe_load(
    ANALYSIS_YAML.format(carcinoma=AUTO_ID, mitosis=AUTO_ID, threshold=0.5)
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a parsed document (the root included)."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """A valid document with one value somewhere replaced by anything YAML can hold."""
    doc = copy.deepcopy(document)
    path = draw(st.sampled_from(_paths(doc)))
    value = draw(ANY_YAML_VALUE)
    if not path:
        return value
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def _refused_in_one_line(call: Callable[[], object]) -> None:
    try:
        call()
    except BuilderError as exc:
        assert "\n" not in str(exc), str(exc)
        assert exc.exit_code in (2, 5, 7), exc  # config, weights, stale lock


@PROPERTY
@given(data=st.binary(max_size=400))
def test_any_bytes_parse_or_fail_in_one_line(data: bytes) -> None:
    _refused_in_one_line(lambda: yamldoc.parse(data, "f.yaml"))


@PROPERTY
@given(text=st.text(alphabet=st.sampled_from(list("[]{}:-&*!|>'\"#%@`,?\n\t ab1")), max_size=80))
def test_any_yaml_like_text_parses_or_fails_in_one_line(text: str) -> None:
    _refused_in_one_line(lambda: yamldoc.parse(text, "f.yaml"))


@PROPERTY
@given(value=ANY_YAML_VALUE, schema_name=st.sampled_from(yamldoc.schema_names()))
def test_any_structure_validates_or_fails_in_one_line(value: Any, schema_name: str) -> None:
    text = yaml.safe_dump(value, allow_unicode=True)
    _refused_in_one_line(lambda: yamldoc.validate(yamldoc.parse(text, "f.yaml"), schema_name))


@PROPERTY
@given(customer=mutated(_VALID_CUSTOMER), analysis=mutated(_VALID_ANALYSIS))
def test_any_config_loads_or_fails_in_one_line(
    repo: Path, settings: Settings, customer: Any, analysis: Any
) -> None:
    (repo / "customer.yaml").write_text(yaml.safe_dump(customer, allow_unicode=True))
    (repo / "analysis.yaml").write_text(yaml.safe_dump(analysis, allow_unicode=True))
    _refused_in_one_line(lambda: load_customer(str(repo), settings, worktree=True))


@pytest.fixture
def committed_lock(
    locked_world: tuple[Path, Settings, dict[str, Any]],
) -> tuple[Path, Settings, dict[str, Any]]:
    repo, settings, lock = locked_world
    _commit_lock(repo, lock)
    return repo, settings, lock


@PROPERTY
@given(data=st.data())
def test_any_lock_is_used_or_refused_in_one_line(
    committed_lock: tuple[Path, Settings, dict[str, Any]], data: st.DataObject
) -> None:
    repo, settings, lock = committed_lock
    spec = load_customer(str(repo), settings)
    changed = data.draw(mutated(lock))
    text = yaml.safe_dump(changed, allow_unicode=True).encode()
    with unittest.mock.patch("builder.cook.lock.read_committed_file", return_value=text):

        def use() -> None:
            pinned = read_lock(spec)
            if pinned is not None:
                models = models_from_lock(spec, pinned, production=settings.production)
                for model in models:  # whatever is accepted lies in the store or the repo
                    for f in model.files:
                        assert f.sha256 and (
                            f.uri.startswith(settings.production + "/")
                            or f.uri.removeprefix("repo:") in spec.manual_files
                        )

        _refused_in_one_line(use)


@hypothesis.settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=200))
def test_random_files_through_the_cli(repo: Path, data: bytes) -> None:
    (repo / "analysis.yaml").write_bytes(data)
    result = run_cli("validate", "--worktree", str(repo))
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 2) and len(result.stderr.strip().splitlines()) <= 1


# --- registry records and publish manifests: bad bytes, missing fields, wrong types -------------


@pytest.fixture
def registry_world(
    repo: Path, settings: Settings, tmp_path: Path
) -> tuple[Path, Settings, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A local registry and a production store for the auto models of ``repo``."""
    weights = b"registry weights"
    production = tmp_path / "production"
    (production / TASK / AUTO_ID).mkdir(parents=True)
    (production / TASK / AUTO_ID / "model.onnx").write_bytes(weights)
    model = model_record(AUTO_ID, TASK, name="carcinoma")
    task = task_record(TASK)
    manifest = {
        "manifest_version": 1,
        "task_id": TASK,
        "model_id": AUTO_ID,
        "files": [
            {
                "name": "model.onnx",
                "size": len(weights),
                "sha256": hashlib.sha256(weights).hexdigest(),
            }
        ],
    }
    commit_files(
        repo,
        {"analysis.yaml": _analysis(), "weights/mitosis/model.onnx": b"manual weights"},
        "one auto model",
    )
    settings = replace(
        settings,
        model_registry=f"local:{tmp_path / 'registry'}",
        production=f"file:{production}",
    )
    return repo, settings, model, task, manifest


def _write_registry(
    settings: Settings, model: Any, task: Any, manifest: Any, raw: bytes | None = None
) -> None:
    folder = Path(settings.model_registry.removeprefix("local:"))
    for kind, record in (("models", model), ("tasks", task)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        (folder / kind / f"{(AUTO_ID if kind == 'models' else TASK)}.yaml").write_text(
            yaml.safe_dump(record, allow_unicode=True)
        )
    path = (
        Path(settings.production.removeprefix("file:")) / TASK / AUTO_ID / "publish-manifest.json"
    )
    path.write_bytes(raw if raw is not None else json.dumps(manifest, default=str).encode())


BAD_MANIFESTS = {
    "not UTF-8": b"\xff\xfe{}",
    "not JSON": b"{files: [",
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "a list": b"[]",
    "files missing name": json.dumps({"files": [{"size": 16, "sha256": "0" * 64}]}).encode(),
    "files not a list": json.dumps({"files": {"name": "model.onnx"}}).encode(),
    "size not a number": json.dumps(
        {"files": [{"name": "model.onnx", "size": "16", "sha256": "0" * 64}]}
    ).encode(),
    "sha256 not hex": json.dumps(
        {"files": [{"name": "model.onnx", "size": 16, "sha256": "zz"}]}
    ).encode(),
    "NaN size": b'{"files": [{"name": "model.onnx", "size": NaN, "sha256": "00"}]}',
    "Infinity size": b'{"files": [{"name": "model.onnx", "size": -Infinity, "sha256": "00"}]}',
    "newline in a key": b'{"files\\nx": []}',
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_publish_manifest_is_one_line(
    registry_world: tuple[Path, Settings, Any, Any, Any], case: str
) -> None:
    repo, settings, model, task, manifest = registry_world
    _write_registry(settings, model, task, manifest, raw=BAD_MANIFESTS[case])
    with pytest.raises(BuilderError) as info:
        cook(str(repo), settings)
    message = str(info.value)
    assert "\n" not in message and "publish-manifest.json" in message, message


BAD_RECORDS = {
    "model without task": ("model", "task", _DELETE),
    "model without id": ("model", "id", _DELETE),
    "model task is a list": ("model", "task", [1, 2]),
    "model tags a number": ("model", "tags", 5),
    "model design params a list": ("model", "design", {"design": '{"params": [1, 2]}'}),
    "model design plugin params a list": (
        "model",
        "design",
        {"design": '{"preprocessing": [{"cls": "X", "params": [1]}]}'},
    ),
    "model design a JSON list": ("model", "design", {"design": "[1, 2]"}),
    "model design an infinite number": (
        "model",
        "design",
        {"design": '{"params": {"file": "model.onnx", "tile_size": 64, "mpp": 1e999}}'},
    ),
    "task without status": ("task", "status", _DELETE),
    "task status a mapping": ("task", "status", {"a": 1}),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_registry_record_is_one_line(
    registry_world: tuple[Path, Settings, Any, Any, Any], case: str
) -> None:
    repo, settings, model, task, manifest = registry_world
    which, key, value = BAD_RECORDS[case]
    record = model if which == "model" else task
    if value is _DELETE:
        del record[key]
    else:
        record[key] = value
    _write_registry(settings, model, task, manifest)
    with pytest.raises(BuilderError) as info:
        cook(str(repo), settings)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 3, message


def test_registry_record_with_bad_bytes(
    registry_world: tuple[Path, Settings, Any, Any, Any],
) -> None:
    repo, settings, model, task, manifest = registry_world
    _write_registry(settings, model, task, manifest)
    folder = Path(settings.model_registry.removeprefix("local:"))
    (folder / "models" / f"{AUTO_ID}.yaml").write_bytes(b"id: \xff\xfe\x00")
    with pytest.raises(BuilderError) as info:
        cook(str(repo), settings)
    assert "\n" not in str(info.value) and f"{AUTO_ID}.yaml" in str(info.value)


@PROPERTY
@given(data=st.data())
def test_any_registry_record_resolves_or_fails_in_one_line(
    registry_world: tuple[Path, Settings, Any, Any, Any], data: st.DataObject
) -> None:
    repo, settings, model, task, manifest = registry_world
    _write_registry(
        settings, data.draw(mutated(model)), data.draw(mutated(task)), data.draw(mutated(manifest))
    )

    def resolve_all() -> None:
        cook(str(repo), settings, allow_unpublished=True)

    try:
        resolve_all()
    except BuilderError as exc:
        assert "\n" not in str(exc), str(exc)
        assert exc.exit_code in (2, 3, 4, 5), exc


# --- lock files in the caches: never followed through a link ------------------------------------


def test_no_lock_file_in_the_caches_is_followed(
    repo: Path, settings: Settings, outside: Path
) -> None:
    """Every lock file in the caches (weights downloads, repository mirrors, release-record
    logs) replaced by a link to a host file: the next run locks a file of its own, and the host
    file is neither truncated nor written (``filelock`` opened its path with O_TRUNC)."""
    from builder.cook.fetch import Cache
    from builder.record import RELEASES_BRANCH, ReleaseLog

    def use_the_caches() -> None:
        load_customer(repo.as_uri(), settings)
        ReleaseLog(repo.as_uri(), settings.cache_dir, RELEASES_BRANCH).fetch()
        with Cache(settings.cache_dir / "weights").lock("sha256-of-a-file"):
            pass

    use_the_caches()
    locks = sorted(settings.cache_dir.rglob("*.lock"))
    assert {p.parent.name for p in locks} >= {"locks", "repos", "releases"}
    for lock in locks:
        lock.unlink()
        lock.symlink_to(outside / "passwd")
    use_the_caches()
    assert (outside / "passwd").read_text() == SECRET + "\n"
    assert all(lock.is_file() and not lock.is_symlink() for lock in locks)


def test_a_held_cache_lock_times_out_in_one_line(tmp_path: Path) -> None:
    """A second holder waits at most its limit, then gets the error class it asked for."""
    from builder.errors import FetchError
    from builder.fsutil import cache_lock

    path = tmp_path / "x.lock"
    with (
        cache_lock(path, 5, FetchError),
        pytest.raises(FetchError) as info,
        cache_lock(path, 0.3, FetchError),
    ):
        pass
    assert str(info.value).startswith(f"{path} is locked by another build for more than 0 s")
