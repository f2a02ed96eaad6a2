"""Load stage: read customer.yaml and the short analysis YAML from a customer repo at a ref.

The files are read from a git commit (gitpython), never from the work tree unless asked, so
what is built is always something that is in git. A customer folder inside a larger
repository (the examples under customers/) is read the same way: its revision is the last
commit that touched that folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import git

from builder import yamldoc
from builder.contracts import CustomerSpec, ModelDecl, RepoSource
from builder.errors import ConfigError
from builder.settings import Settings

CUSTOMER_FILE = "customer.yaml"
LOCK_FILE = "customer.lock.yaml"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)")
_CREDENTIALS_IN_URL = re.compile(r"(?<=://)[^/@]+@")


def redact_url(url: str) -> str:
    """Drop user:password@ from a URL before it is recorded or printed."""
    return _CREDENTIALS_IN_URL.sub("", url)


def open_source(location: str, settings: Settings) -> RepoSource:
    """Find the repository and folder a customer name, path or git URL refers to."""
    if _URL.match(location):
        return _clone_or_fetch(location, settings.cache_dir / "repos")
    path = Path(location).expanduser()
    if not path.exists() and not path.is_absolute():
        path = settings.customers / location
    if not path.is_dir():
        raise ConfigError(
            f"customer {location!r} not found: no folder {location} and none in {settings.customers}",
            hint="give a path, a git URL, or a name under the customers folder",
        )
    try:
        repo = git.Repo(path, search_parent_directories=True)
    except git.InvalidGitRepositoryError:
        raise ConfigError(
            f"{path}: not inside a git repository", hint="customer configs are read from git"
        ) from None
    root = Path(repo.working_tree_dir or path).resolve()
    subdir = path.resolve().relative_to(root).as_posix()
    return RepoSource(
        location=location,
        root=root,
        subdir="" if subdir == "." else subdir,
        url=_source_url(repo, root, subdir),
    )


_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>(?!//).+)$")


def canonical_repo_url(url: str) -> str:
    """One spelling per repository, so clones over SSH, HTTPS or a local path record the same
    source (it is part of the image labels, hence of the digest): no credentials, no ``.git``."""
    url = redact_url(url.strip())
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        url = f"https://{scp['host']}/{scp['path']}"
    elif url.startswith(("ssh://", "git://")):
        rest = url.split("://", 1)[1].split("@")[-1]
        host, _, path = rest.partition("/")
        url = f"https://{host.split(':')[0]}/{path}"
    elif "://" not in url:
        url = Path(url).expanduser().resolve().as_uri()
    return url.removesuffix("/").removesuffix(".git")


def _source_url(repo: git.Repo, root: Path, subdir: str) -> str:
    try:
        base = canonical_repo_url(repo.remotes.origin.url)
    except (AttributeError, ValueError):
        base = root.as_uri()
    return f"{base}#{subdir}" if subdir not in ("", ".") else base


def _clone_or_fetch(url: str, cache: Path) -> RepoSource:
    target = cache / hashlib.sha256(redact_url(url).encode()).hexdigest()[:16]
    try:
        if target.exists():
            repo = git.Repo(target)
            repo.remotes.origin.fetch(
                "+refs/heads/*:refs/heads/*", tags=True, prune=True, force=True
            )
        else:
            cache.mkdir(parents=True, exist_ok=True)
            git.Repo.clone_from(url, target, bare=True, env={"GIT_TERMINAL_PROMPT": "0"})
    except git.GitCommandError as exc:
        # git's own message can echo the URL; make sure credentials never reach the output.
        lines = [ln.strip(" '\"") for ln in str(exc.stderr or exc).splitlines()]
        detail = redact_url(next((ln for ln in reversed(lines) if ln), "git failed"))
        raise ConfigError(f"cannot clone {redact_url(url)}: {detail}") from None
    return RepoSource(location=redact_url(url), root=target, subdir="", url=canonical_repo_url(url))


@dataclass(frozen=True)
class _Snapshot:
    """The customer folder's files at one revision (or in the work tree)."""

    source: RepoSource
    commit: str
    commit_time: int
    tree: git.Tree | None  # None: read from the work tree

    def read(self, relpath: str) -> bytes | None:
        rel = (
            PurePosixPath(self.source.subdir, relpath).as_posix() if self.source.subdir else relpath
        )
        if self.tree is None:
            path = self.source.root / rel
            return path.read_bytes() if path.is_file() else None
        try:  # "<commit>:<path>" through the repository's persistent `git cat-file --batch`
            _, kind, _, data = self.tree.repo.git.get_object_data(f"{self.commit}:{rel}")
        except ValueError:  # missing
            return None
        kind_name: Any = kind  # gitpython's annotation says str; at run time it is bytes
        return bytes(data) if kind_name in ("blob", b"blob") else None

    def list_files(self, relfolder: str) -> list[str]:
        """Files below a folder, relative to it, sorted."""
        rel = (
            PurePosixPath(self.source.subdir, relfolder).as_posix()
            if self.source.subdir
            else relfolder
        )
        if self.tree is None:
            base = self.source.root / rel
            return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        try:
            folder = self.tree / rel
        except KeyError:
            return []
        if not isinstance(folder, git.Tree):
            return []
        return sorted(
            PurePosixPath(item.path).relative_to(folder.path).as_posix()
            for item in folder.traverse()
            if isinstance(item, git.Blob)
        )

    def origin(self, relpath: str) -> str:
        return PurePosixPath(self.source.location, relpath).as_posix()


@dataclass(frozen=True)
class KnownRevision:
    """What a caller loading many customers of one repository already knows (the fleet plan):
    the folder's source, the open repository (shared: no new git processes) and the folder's
    last commit at the ref, so no per-customer history walk is needed."""

    source: RepoSource
    repo: git.Repo
    commit: str


def _snapshot(
    source: RepoSource, ref: str, worktree: bool, known: KnownRevision | None = None
) -> _Snapshot:
    if known is not None:
        commit = known.repo.commit(known.commit)
        return _Snapshot(source, commit.hexsha, int(commit.committed_date), commit.tree)
    repo = git.Repo(source.root)
    try:
        # rev-parse --verify: gitpython alone accepts any 40-hex string as a commit id.
        commit = repo.commit(repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}"))
    except (git.BadName, ValueError, git.GitCommandError):
        raise ConfigError(
            f"{source.location}: ref {ref!r} does not exist",
            hint="use a branch, tag or commit of the customer repo",
        ) from None
    if source.subdir:
        # The config revision is the last commit that changed the customer folder, so commits
        # elsewhere in a shared repository do not change the image.
        touched = next(repo.iter_commits(commit, paths=source.subdir, max_count=1), None)
        if touched is None:
            raise ConfigError(
                f"{source.location}: folder {source.subdir!r} is not in git at {ref!r}",
                hint="commit it first",
            )
        commit = touched
    return _Snapshot(
        source=source,
        commit=commit.hexsha,
        commit_time=int(commit.committed_date),
        tree=None if worktree else commit.tree,
    )


def safe_relpath(value: str, where: str, what: str) -> str:
    """A relative path that stays inside its folder (no absolute paths, no '..')."""
    path = PurePosixPath(value.strip())
    if value.strip() == "" or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ConfigError(
            f"{where}: {what} {value!r} must be a relative path inside the customer folder (no '..', not absolute)"
        )
    return path.as_posix()


def _parse(snapshot: _Snapshot, relpath: str, schema: str) -> yamldoc.Document:
    raw = snapshot.read(relpath)
    if raw is None:
        raise ConfigError(
            f"{snapshot.origin(relpath)}: file not found",
            hint="check the path and that it is committed",
        )
    doc = yamldoc.parse(raw, snapshot.origin(relpath))
    yamldoc.validate(doc, schema)
    return doc


def _declared_models(doc: yamldoc.Document) -> tuple[ModelDecl, ...]:
    """Models of all analyses, unique by name; the same name must mean the same model."""
    found: dict[str, tuple[ModelDecl, Mapping[str, Any]]] = {}
    for a_index, analysis in enumerate(doc.data["analyses"]):
        models: Mapping[str, Mapping[str, Any]] = analysis["models"]
        for name, entry in models.items():
            path = ("analyses", a_index, "models", name)
            reference = entry["reference"].strip()
            if entry["sourcing"] == "manual":
                reference = safe_relpath(
                    reference, doc.where((*path, "reference")), "manual model reference"
                )
            decl = ModelDecl(name=name, sourcing=entry["sourcing"], reference=reference)
            previous = found.get(name)
            if previous is not None and previous[1] != entry:
                raise ConfigError(
                    f"{doc.where(path)}: model {name!r} is declared differently in two analyses; give them different names"
                )
            found[name] = (decl, entry)
        for f_index, feature in enumerate(analysis["features"]):
            for role, model_name in feature["models"].items():
                if model_name not in models:
                    where = doc.where(("analyses", a_index, "features", f_index, "models", role))
                    known = ", ".join(sorted(models))
                    raise ConfigError(
                        f"{where}: feature {feature['cls']!r} uses model {model_name!r}, which analysis "
                        f"{analysis['name']!r} does not declare (declared: {known})"
                    )
    return tuple(decl for _, (decl, _) in sorted(found.items()))


def load_customer(
    location: str,
    settings: Settings,
    *,
    ref: str = "HEAD",
    worktree: bool = False,
    known: KnownRevision | None = None,
) -> CustomerSpec:
    """Read and validate a customer's configuration at ``ref`` (or the work tree)."""
    source = known.source if known is not None else open_source(location, settings)
    snapshot = _snapshot(source, ref, worktree, known)
    customer = _parse(snapshot, CUSTOMER_FILE, "customer").data
    analysis_path = safe_relpath(
        customer.get("analysis", "analysis.yaml"), snapshot.origin(CUSTOMER_FILE), "analysis"
    )
    analysis_doc = _parse(snapshot, analysis_path, "analysis-short")
    models = _declared_models(analysis_doc)
    manual: dict[str, bytes] = {}
    for decl in models:
        if decl.sourcing != "manual":
            continue
        files = snapshot.list_files(decl.reference)
        if not files:
            raise ConfigError(
                f"{snapshot.origin(analysis_path)}: manual model {decl.name!r}: folder {decl.reference!r} has no files in git"
            )
        for name in files:
            manual[f"{decl.reference}/{name}"] = snapshot.read(f"{decl.reference}/{name}") or b""
    base = customer["base_image"]
    return CustomerSpec(
        customer=customer["customer"],
        base_version=base["version"].strip(),
        base_repository=base.get("repository"),
        analysis_path=analysis_path,
        analysis=analysis_doc.data,
        models=models,
        source=source,
        ref=ref,
        commit=snapshot.commit,
        commit_time=snapshot.commit_time,
        worktree=worktree,
        manual_files=manual,
    )


def read_committed_file(spec: CustomerSpec, relpath: str) -> bytes | None:
    """A file of the customer folder at the same revision the spec was read at."""
    repo = git.Repo(spec.source.root)
    snapshot = _Snapshot(
        spec.source,
        spec.commit,
        spec.commit_time,
        None if spec.worktree else repo.commit(spec.commit).tree,
    )
    return snapshot.read(relpath)
