"""Plain data passed between the pipeline stages (load -> resolve -> expand -> fetch -> assemble).

Every stage takes and returns these frozen dataclasses, so each can be tested alone and the
lock file is a faithful serialisation of what the build used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Version of the verbose analysis config the expand stage writes and the runner reads.
VERBOSE_SCHEMA_VERSION = 1
#: Version of the lock file layout.
LOCK_VERSION = 1


@dataclass(frozen=True)
class ProgressEvent:
    """The one progress event of every long run: ``what`` (a file, layer, blob, step) at
    ``done`` of ``total`` bytes or steps; or, with ``stage``, a stage of a build starting
    (``cook``, ``fetch``, ...). ``subject`` names the customer in a fleet run."""

    what: str = ""
    done: int = 0
    total: int = 0
    stage: str | None = None
    subject: str | None = None


#: Progress callback every long stage takes.
Progress = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class RepoSource:
    """Where a customer's configuration lives: a git repository and a folder inside it."""

    location: str  # what the user named: a path, a folder under customers/, or a git URL
    root: Path  # the git work tree (a clone in the cache for URLs)
    subdir: str  # posix path of the customer folder inside the repo, "" for the repo root
    url: str  # canonical source URI recorded in labels (remote URL or file path, no secrets)


@dataclass(frozen=True)
class ModelDecl:
    """One model as the short analysis YAML names it."""

    name: str  # key under `models:` (also the folder name in the image)
    sourcing: str  # "auto" (registry id) or "manual" (path inside the customer repo)
    reference: str  # registry model id, or a repo-relative folder for manual sourcing


@dataclass(frozen=True)
class CustomerSpec:
    """customer.yaml plus the short analysis, read from one commit of the customer repo."""

    customer: str
    base_version: str  # exact "2.4.1" or a PEP 440 specifier such as "~=2.4"
    base_repository: str | None  # None: the project default
    analysis_path: str  # relative to the customer folder
    analysis: Mapping[str, Any]  # the short analysis document as parsed
    models: tuple[ModelDecl, ...]  # unique by name, sorted by name
    source: RepoSource
    ref: str  # the ref the user asked for
    commit: str  # 40-hex commit id the files were read at
    commit_time: int  # committer time of `commit`: SOURCE_DATE_EPOCH for the build
    worktree: bool = False  # read from the uncommitted work tree (development builds only)
    # Files of manually sourced models, read from the same commit: path in repo folder -> bytes
    manual_files: Mapping[str, bytes] = field(default_factory=dict)
    # base image variants the customer runs (customer.yaml base_image.variant); first = default
    variants: tuple[str, ...] = ("cpu",)
    # read from the work tree because these files (repository paths) differ from HEAD
    uncommitted: tuple[str, ...] = ()
    # customer.yaml `repository`, canonical: the repository's address as the committed files
    # declare it (the same on every machine, unlike the clone's observed origin); None: not given
    repository: str | None = None


@dataclass(frozen=True)
class Plugin:
    """A runner plug-in chosen by class name and configured by params."""

    cls: str
    params: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The form configs, locks and reports write: ``{cls, params}``."""
        return {"cls": self.cls, "params": dict(self.params)}


@dataclass(frozen=True)
class WeightFile:
    """One file of a model's weights, addressed where it is fetched from."""

    name: str  # posix path relative to the model folder
    uri: str  # s3://bucket/<task id>/<name>, file:///..., or repo:<path> for manual models
    size: int | None = None
    sha256: str | None = None  # None until known (manifest, lock or fetch)


@dataclass(frozen=True)
class ResolvedModel:
    """A model declaration resolved against the registry and the production store."""

    name: str
    sourcing: str
    model_id: str | None  # registry id; None for manually sourced models
    registry_name: str | None
    task_id: str | None
    task_status: str | None
    project: str | None  # project name (as people type it)
    framework: str | None
    tags: tuple[str, ...]
    published: bool
    weights_uri: str  # production prefix (s3://bucket/<task id>/<model id>/) or repo:<folder>
    files: tuple[WeightFile, ...]
    preprocessing: tuple[Plugin, ...]
    postprocessing: tuple[Plugin, ...]
    params: Mapping[str, Any]
    project_id: str | None = None  # the registry's project id (what model records hold)
    system_tags: tuple[str, ...] = ()  # registry system tags, e.g. "archived"


@dataclass(frozen=True)
class BaseImageRef:
    """The inference base image, addressed by digest once resolved."""

    repository: str  # e.g. 127.0.0.1:5000/ivd/inference-base
    version: str  # exact version the constraint resolved to
    digest: str | None = None  # sha256:... of the manifest
    variant: str = "cpu"  # its com.ivd.runner.variant label: cpu or gpu

    @property
    def reference(self) -> str:
        """The image reference to pull: by digest once resolved, else by version tag."""
        return (
            f"{self.repository}@{self.digest}"
            if self.digest
            else f"{self.repository}:{self.version}"
        )
