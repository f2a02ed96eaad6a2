"""Shared test helpers: customer repositories with real git history, running the real CLI."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git

from builder.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

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
    mitosis_model:
      sourcing: auto
      reference: {mitosis}
  features:
  - cls: Carcinoma
    models: {{classification_model: carcinoma_model}}
    params: {{threshold: {threshold}}}
  - cls: Mitosis
    models: {{segmentation_model: mitosis_model}}
    depends_on: [Carcinoma]
"""


def commit_files(
    repo_dir: Path,
    files: Mapping[str, str | bytes | None],
    message: str,
    *,
    when: int = 1_700_000_000,
) -> str:
    """Write (or delete, for None) files and commit them with a fixed date; returns the commit id."""
    repo = git.Repo.init(repo_dir) if not (repo_dir / ".git").exists() else git.Repo(repo_dir)
    for rel, content in files.items():
        path = repo_dir / rel
        if content is None:
            repo.index.remove([rel], working_tree=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        repo.index.add([rel])
    date = f"{when} +0000"
    actor = git.Actor("Test Author", "author@example.com")
    commit = repo.index.commit(
        message, author=actor, committer=actor, author_date=date, commit_date=date
    )
    return commit.hexsha


def customer_repo(
    path: Path,
    *,
    name: str = "customer-x",
    base: str = "~=2.4",
    carcinoma: str,
    mitosis: str,
    threshold: float = 0.5,
    when: int = 1_700_000_000,
) -> Path:
    commit_files(
        path,
        {
            "customer.yaml": CUSTOMER_YAML.format(name=name, base=base),
            "analysis.yaml": ANALYSIS_YAML.format(
                carcinoma=carcinoma, mitosis=mitosis, threshold=threshold
            ),
        },
        "initial config",
        when=when,
    )
    return path


@contextmanager
def served_over_http(folder: Path) -> Iterator[str]:
    """``127.0.0.1:PORT``: ``folder`` served over plain HTTP by a real HTTP server (git's dumb
    protocol reads a bare repository in it after ``git update-server-info``)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real `builder` CLI in a subprocess (the ClearML SDK keeps process-wide state)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "builder", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
        check=False,
    )


def commit_lock(
    folder: Path, env: Mapping[str, str], *, when: int = 1_700_000_000
) -> subprocess.CompletedProcess[str]:
    """`builder lock FOLDER` (a customer repository, or a folder of one) and commit the lock:
    a release build ships only what a committed lock pins. Returns the lock run."""
    locked = run_cli("lock", str(folder), "--ref", "HEAD", env=env)
    assert locked.returncode == 0, locked.stdout + locked.stderr
    root = Path(git.Repo(folder, search_parent_directories=True).working_tree_dir or folder)
    lock = folder / "customer.lock.yaml"
    rel = lock.resolve().relative_to(root.resolve()).as_posix()
    commit_files(root, {rel: lock.read_bytes()}, f"{folder.name}: lock", when=when)
    return locked


def repository_snapshot(tmp_path: Path, names: Sequence[str]) -> tuple[Path, Path]:
    """Files and folders of this repository (``names``) as a fresh git repository on branch
    main, and its origin, a local bare repository it was pushed to: (project, origin)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        else:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    repo = git.Repo.init(project, initial_branch="main")
    repo.git.add("-A")
    actor = git.Actor("Test Author", "author@example.com")
    repo.index.commit("snapshot", author=actor, committer=actor)
    origin = tmp_path / "origin.git"
    git.Repo.init(origin, bare=True)
    repo.create_remote("origin", str(origin)).push("main")  # CI builds what the server has
    return project, origin


CARCINOMA_ID = "a957f623e6d34159a07aec1b8323eb54"
MITOSIS_ID = "3fcf116cae4f461a85bea1fd4913993f"
CARCINOMA_TASK = "5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e"
MITOSIS_TASK = "81a2d3c4e5f60718293a4b5c6d7e8f90"
PROJECT_ID = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"  # models and tasks hold the project's id

DESIGN = (
    '{"preprocessing": [{"cls": "Normalization", "params": {"factor": 255.0}}],'
    ' "postprocessing": [{"cls": "BinaryClassification", "params": {"threshold": 0.5}}],'
    ' "params": {"file": "model.onnx", "tile_size": 64, "mpp": 2.0}}'
)


def model_record(
    model_id: str, task_id: str, *, name: str, ready: bool = True, design: str = DESIGN
) -> dict[str, object]:
    """A model record in ClearML's shape (the local registry and the emulator share it)."""
    return {
        "id": model_id,
        "name": name,
        "task": task_id,
        "uri": f"s3://training-artifacts/{task_id}/models/model.onnx",
        "ready": ready,
        "framework": "ONNX",
        "tags": ["demo"],
        "project": PROJECT_ID,
        "design": {"design": design},
    }


def task_record(task_id: str, *, status: str = "completed") -> dict[str, object]:
    return {
        "id": task_id,
        "name": f"train {task_id[:6]}",
        "type": "training",
        "status": status,
        "project": PROJECT_ID,
    }


def write_local_registry(
    folder: Path, models: list[dict[str, object]], tasks: list[dict[str, object]]
) -> Path:
    import yaml

    for kind, records in (("models", models), ("tasks", tasks)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for record in records:
            (folder / kind / f"{record['id']}.yaml").write_text(
                yaml.safe_dump(record, sort_keys=True)
            )
    return folder


def local_settings(tmp_path: Path, registry: Path) -> Any:
    """Settings for a local registry folder and the production store at tmp_path/production."""
    from builder.settings import Settings

    return Settings(
        customers=tmp_path / "customers",
        model_registry=f"local:{registry}",
        production=f"file:{tmp_path / 'production'}",
        base_repository="127.0.0.1:1/ivd/inference-base",
        image_registry="127.0.0.1:1",
        cache_dir=tmp_path / "cache",
    )


def write_production(
    folder: Path,
    task_id: str,
    model_id: str,
    files: Mapping[str, bytes],
    *,
    manifest: bool = True,
) -> None:
    """One model's production folder (``<task id>/<model id>/``), with the publish manifest
    `builder publish` writes there."""
    import hashlib
    import json

    target = folder / task_id / model_id
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (target / name).write_bytes(data)
    if manifest:
        entries = [
            {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in sorted(files.items())
        ]
        (target / "publish-manifest.json").write_text(
            json.dumps(
                {"manifest_version": 1, "model_id": model_id, "task_id": task_id, "files": entries}
            )
        )


@dataclass(frozen=True)
class SeedModel:
    """One model for :func:`seed_models`: its registry record, its task and its weights."""

    model_id: str
    task_id: str
    name: str
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class LocalModels:
    """A local model registry and a file: production store, as :func:`seed_models` left them."""

    registry: Path
    production: Path

    def env(self) -> dict[str, str]:
        """The settings that point a `builder` subprocess at them."""
        return {
            "BUILDER_MODEL_REGISTRY": f"local:{self.registry}",
            "BUILDER_PRODUCTION": f"file:{self.production}",
        }


def seed_models(root: Path, models: Sequence[SeedModel]) -> LocalModels:
    """The local registry + production store most build tests need: under ``root/registry``
    each model's record and its completed task, under ``root/production`` its weights with
    the publish manifest."""
    registry = write_local_registry(
        root / "registry",
        [model_record(m.model_id, m.task_id, name=m.name) for m in models],
        [task_record(m.task_id) for m in models],
    )
    for m in models:
        write_production(root / "production", m.task_id, m.model_id, m.files)
    return LocalModels(registry=registry, production=root / "production")


def push_labelled_bases(
    docker_engine: Any,
    registry_host: str,
    base_os_image: str,
    repo: str,
    versions: Mapping[str, str],
    extra_labels: Mapping[str, str] | None = None,
) -> str:
    """Small base images (no runner: fast) carrying the runner's schema label, pushed to the
    test registry as ``<registry_host>/<repo>:<version>``; ``versions`` maps a version to the
    config schema versions its (pretend) runner accepts. Returns the repository."""
    import io

    client = docker_engine.client()
    repository = f"{registry_host}/{repo}"
    for version, schemas in versions.items():
        labels = f'com.ivd.runner.config-schemas="{schemas}" org.opencontainers.image.version="{version}"'
        labels += "".join(f' {k}="{v}"' for k, v in (extra_labels or {}).items())
        dockerfile = f"FROM {base_os_image}\nLABEL {labels}\n"
        client.images.build(
            fileobj=io.BytesIO(dockerfile.encode()),
            tag=f"{repository}:{version}",
            rm=True,
            network_mode="none",
        )
        for line in client.images.push(repository, tag=version, stream=True, decode=True):
            assert "error" not in line, line
    return repository


def offline_settings(tmp_path: Path) -> Settings:
    """Settings whose model registry, store and image registries are unreachable (load tests)."""
    return Settings(
        customers=tmp_path / "customers",
        model_registry="local:/nonexistent",
        production="file:/nonexistent",
        base_repository="127.0.0.1:1/ivd/inference-base",
        image_registry="127.0.0.1:1",
        cache_dir=tmp_path / "cache",
    )


# -- the clearml SDK against the test bed's emulation -----------------------------------

CLEARML_CONF = """\
api {{
    api_server: "{url}"
    web_server: "{url}"
    files_server: "{url}"
    credentials {{ access_key: "{key}", secret_key: "{secret}" }}
    http.retries {{
        total: 2, connect: 2, read: 2, redirect: 2, status: 2,
        backoff_factor: 0.2, backoff_max: 2
    }}
    http.wait_on_maintenance_forever: false
}}
"""


def make_clearml_env(server: Any, home: Path) -> dict[str, str]:
    """Environment for a subprocess that uses the clearml SDK against `server`."""
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "clearml.conf"
    conf.write_text(
        CLEARML_CONF.format(url=server.url, key=server.access_key, secret=server.secret_key)
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLEARML_", "TRAINS_", "ALLEGRO_", "AWS_"))
    }
    env.update(
        HOME=str(home),
        CLEARML_CONFIG_FILE=str(conf),
        CLEARML_API_HOST=server.url,
        CLEARML_WEB_HOST=server.url,
        CLEARML_FILES_HOST=server.url,
        CLEARML_API_ACCESS_KEY=server.access_key,
        CLEARML_API_SECRET_KEY=server.secret_key,
        CLEARML_CACHE_DIR=str(home / "clearml-cache"),
        CLEARML_NO_DEFAULT_SERVER="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    return env
