"""Load stage: read customer.yaml and the short analysis YAML from a customer repo at a ref.

The files are read from a git commit (gitpython), never from the work tree unless asked, so
what is built is always something that is in git. A customer folder inside a larger
repository (the examples under customers/) is read the same way: its revision is the last
commit that touched that folder.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import git

from builder import yamldoc
from builder.contracts import CustomerSpec, ModelDecl, RepoSource
from builder.errors import ConfigError
from builder.fsutil import cache_lock
from builder.paths import UnsafePathError, normal_model_id, safe_join
from builder.redact import redact_url, strip_credentials
from builder.settings import Settings

CUSTOMER_FILE = "customer.yaml"
LOCK_FILE = "customer.lock.yaml"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)")


def is_repo_url(location: str) -> bool:
    """Whether ``location`` names a git repository by URL (``scheme://`` or scp-like
    ``user@host:path``), not a folder."""
    return _URL.match(location) is not None


def open_source(location: str, settings: Settings) -> RepoSource:
    """Find the repository and folder a customer name, path or git URL refers to.

    ``<repository>#<folder>`` names a folder inside a repository, the form images and release
    records use and print: a git URL (mirrored into the cache; a ``file://`` URL of a bare
    ``X.git`` recorded as ``X`` is found), a bare repository or a work tree.
    """
    if is_repo_url(location):
        url, _, folder = location.partition("#")
        source = _clone_or_fetch(_bare_sibling(url), settings.cache_dir / "repos")
        return _in_folder(source, folder)
    head, sep, folder = location.partition("#")
    if sep and not Path(location).expanduser().exists() and Path(head).expanduser().is_dir():
        return _in_folder(open_source(head, settings), folder)
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


def _in_folder(source: RepoSource, folder: str) -> RepoSource:
    """``source`` narrowed to ``folder`` (a relative path inside it; '' leaves it as it is)."""
    if not folder:
        return source
    rel = safe_relpath(folder, source.location, "folder")
    subdir = PurePosixPath(source.subdir, rel).as_posix() if source.subdir else rel
    return RepoSource(
        location=f"{source.location}#{rel}",
        root=source.root,
        subdir=subdir,
        url=f"{source.url.partition('#')[0]}#{subdir}",
    )


def _bare_sibling(url: str) -> str:
    """A ``file://`` URL of a missing ``X`` whose bare ``X.git`` is on this machine (canonical
    URLs drop ``.git``) as the URL of ``X.git``; any other URL as it is."""
    if url.startswith("file://"):
        path = Path(unquote(urlsplit(url).path))
        bare = path.with_name(f"{path.name}.git")
        if not path.exists() and bare.is_dir():
            return bare.as_uri()
    return url


_SCP_LIKE = re.compile(r"^(?:[^@/\s]+@)?(?P<host>[\w.-]+):(?P<path>(?!//).+)$")
#: Ports a URL may name without changing which server it means.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_repo_url(url: str) -> str:
    """One spelling per repository, whatever way it was reached: no credentials, query or
    fragment, no ``.git`` suffix or trailing slash, lowercase scheme and host, no default port;
    SSH (``git@host:path``, ``ssh://``, ``git+ssh://``) and ``git://`` as the ``https://``
    address of the same path; a local path or ``file://`` URL as one absolute ``file://`` URL.
    The attestation and the release record name the config repository this way."""
    url = re.sub(r"[?#].*\Z", "", strip_credentials(url.strip()), flags=re.DOTALL)
    scp = _SCP_LIKE.match(url) if "://" not in url else None
    if scp:
        url = f"ssh://{scp['host']}/{scp['path'].lstrip('/')}"
    elif "://" not in url:
        url = Path(url).expanduser().resolve().as_uri()
    parts = urlsplit(url)
    scheme = parts.scheme.lower().replace("git+ssh", "ssh").replace("ssh+git", "ssh")
    path = re.sub(r"/{2,}", "/", unquote(parts.path)).rstrip("/").removesuffix(".git").rstrip("/")
    if scheme == "file":
        return Path(posixpath.normpath(path or "/")).as_uri()
    host = (parts.hostname or "").lower()
    port = parts.port if scheme in _DEFAULT_PORTS else None
    if scheme in ("ssh", "git"):
        scheme = "https"  # the web address of the same project: the port is SSH's, not HTTPS's
    elif port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}{quote(path)}"


def _source_url(repo: git.Repo, root: Path, subdir: str) -> str:
    try:
        base = canonical_repo_url(repo.remotes.origin.url)
    except (AttributeError, ValueError):
        base = root.as_uri()
    return f"{base}#{subdir}" if subdir not in ("", ".") else base


def _clone_or_fetch(url: str, cache: Path) -> RepoSource:
    """A bare mirror of ``url`` in the cache. Credentials in the URL are used for the transfer
    only: the mirror's config names the redacted URL, so no password is ever stored on disk."""
    target = cache / hashlib.sha256(strip_credentials(url).encode()).hexdigest()[:16]
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}
    cache.mkdir(parents=True, exist_ok=True)
    # Parallel CI jobs share the cache: one process at a time creates or fetches a mirror.
    try:
        with cache_lock(Path(f"{target}.lock"), 600, ConfigError):
            _mirror(url, target, env)
    except git.GitCommandError as exc:
        # git's own message can echo the URL; make sure credentials never reach the output.
        lines = [
            ln.strip().removeprefix("stderr:").strip(" '\"")
            for ln in str(exc.stderr or exc).splitlines()
        ]
        detail = redact_url(next((ln for ln in reversed(lines) if ln), "git failed"))
        raise ConfigError(f"cannot clone {strip_credentials(url)}: {detail}") from None
    return RepoSource(
        location=strip_credentials(url), root=target, subdir="", url=canonical_repo_url(url)
    )


def _mirror(url: str, target: Path, env: dict[str, str]) -> None:
    """Create or update the bare mirror ``target`` of ``url`` (the caller holds its lock)."""
    repo = git.Repo(target) if target.exists() else git.Repo.init(target, bare=True)
    if "origin" in repo.remotes:  # also scrubs a mirror made by an older version
        repo.remotes.origin.set_url(strip_credentials(url))
    else:
        repo.create_remote("origin", strip_credentials(url))
    # Fetch from the URL given, not from the stored remote: the credentials stay in memory.
    repo.git.fetch(
        url,
        "+refs/heads/*:refs/heads/*",
        "+refs/tags/*:refs/tags/*",
        "--prune",
        "--force",
        "--no-write-fetch-head",
        env=env,
    )
    # HEAD of the mirror follows the remote's default branch (main, master, ...).
    for line in str(repo.git.ls_remote("--symref", url, "HEAD", env=env)).splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            repo.git.symbolic_ref("HEAD", line.removeprefix("ref: ").split("\t")[0])


def _has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (C0 or DEL)."""
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _ascii(value: object) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Snapshot:
    """The customer folder's files at one revision (or in the work tree)."""

    source: RepoSource
    commit: str
    commit_time: int
    tree: git.Tree | None  # None: read from the work tree

    def _rel(self, relpath: str) -> str:
        return (
            PurePosixPath(self.source.subdir, relpath).as_posix() if self.source.subdir else relpath
        )

    def _refuse_link(self, rel: str) -> UnsafePathError:
        try:
            shown = self.origin(PurePosixPath(rel).relative_to(self.source.subdir).as_posix())
        except ValueError:
            shown = str(self.source.root / rel)
        where = "in git" if self.tree is not None else "in the work tree"
        return UnsafePathError(
            f"{shown} is a symbolic link {where}; links are never followed",
            hint="commit the file itself instead of a link to it",
        )

    def _check_name(self, rel: str) -> None:
        """Refuse a file name with control characters (a newline would end up in an image path)."""
        if _has_control(rel):
            try:
                shown = PurePosixPath(rel).relative_to(self.source.subdir).as_posix()
            except ValueError:
                shown = rel
            raise UnsafePathError(
                f"{PurePosixPath(self.source.location).as_posix()}: file name {shown!r} holds "
                "control characters",
                hint="rename the file",
            )

    @cached_property
    def _folder(self) -> git.Tree | None:
        """The customer folder's tree (None: not a folder in git), looked up by path in git's
        own ``cat-file`` process rather than by parsing every tree on the way: in a shared
        repository the ``customers`` tree grows with the fleet, and each customer would parse
        it again."""
        assert self.tree is not None
        subdir = self.source.subdir
        if not subdir:
            return self.tree
        walked: list[str] = []
        for part in PurePosixPath(subdir).parts:
            walked.append(part)
            path = "/".join(walked)
            try:
                header = self.tree.repo.git.get_object_header(f"{self.tree.hexsha}:{path}")
            except ValueError:
                return None
            sha, kind = (_ascii(v) for v in header[:2])  # bytes at run time, str in the stubs
            if kind != "tree":
                self._check_not_link(path)
                return None
        return git.Tree(self.tree.repo, bytes.fromhex(sha), path=subdir)

    def _check_not_link(self, path: str) -> None:
        """Refuse ``path`` if git holds it as a symbolic link (one ``ls-tree``: rare path)."""
        assert self.tree is not None
        listed = self.tree.repo.git.ls_tree("--full-tree", self.tree.hexsha, "--", path)
        if listed.startswith("120000 "):
            raise self._refuse_link(path)

    def _git_item(self, rel: str) -> git.Blob | git.Tree | None:
        """The tree entry at ``rel``, refusing a symlink anywhere on the way."""
        if _has_control(rel):
            return None  # no such name in a folder this builder reads (and cat-file's input)
        item: Any = self._folder
        subdir = self.source.subdir
        walked = list(PurePosixPath(subdir).parts) if subdir else []
        for part in PurePosixPath(rel).parts[len(walked) :]:
            if not isinstance(item, git.Tree):
                return None
            walked.append(part)
            try:
                item = item / part
            except KeyError:
                return None
            if isinstance(item, git.Blob) and item.mode == git.Blob.link_mode:
                raise self._refuse_link("/".join(walked))
        return item if isinstance(item, git.Blob | git.Tree) else None

    def _work_path(self, rel: str) -> Path:
        """The work-tree path of ``rel``, refusing a symlink anywhere on the way."""
        walk = self.source.root
        for part in PurePosixPath(rel).parts:
            walk = walk / part
            if walk.is_symlink():
                raise self._refuse_link(walk.relative_to(self.source.root).as_posix())
        return safe_join(self.source.root, rel, what="config file")

    def read(self, relpath: str, *, yaml: bool = False) -> bytes | None:
        """The file's bytes, or None; a ``yaml`` file over the size limit is refused unread."""
        rel = self._rel(relpath)
        if self.tree is None:
            path = self._work_path(rel)
            if not path.is_file():
                return None
            if yaml:
                yamldoc.check_size(path.stat().st_size, self.origin(relpath))
            return path.read_bytes()
        blob = self._git_item(rel)
        if not isinstance(blob, git.Blob):
            return None
        if yaml:
            yamldoc.check_size(blob.size, self.origin(relpath))
        return bytes(blob.data_stream.read())

    def list_files(self, relfolder: str) -> list[str]:
        """Files below a folder, relative to it, sorted; a symlink among them is refused."""
        rel = self._rel(relfolder)
        if self.tree is None:
            base = self._work_path(rel)
            found: list[str] = []
            for folder, dirs, files in os.walk(base):
                for name in (*dirs, *files):
                    path = Path(folder, name).relative_to(self.source.root).as_posix()
                    if (Path(folder) / name).is_symlink():
                        raise self._refuse_link(path)
                    self._check_name(path)
                found.extend(
                    (Path(folder) / name).relative_to(base).as_posix()
                    for name in files
                    if (Path(folder) / name).is_file()
                )
            return sorted(found)
        tree = self._git_item(rel)
        if not isinstance(tree, git.Tree):
            return []
        out = []
        for item in tree.traverse():
            if isinstance(item, git.Blob):
                if item.mode == git.Blob.link_mode:
                    raise self._refuse_link(str(item.path))
                self._check_name(str(item.path))
                out.append(PurePosixPath(item.path).relative_to(tree.path).as_posix())
        return sorted(out)

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
        if worktree and ref == "HEAD":  # a new repository: nothing committed yet
            return _uncommitted(source)
        raise ConfigError(
            f"{source.location}: ref {ref!r} does not exist",
            hint="use a branch, tag or commit of the customer repo",
        ) from None
    if source.subdir:
        # The config revision is the last commit that changed the customer folder, so commits
        # elsewhere in a shared repository do not change the image.
        touched = next(repo.iter_commits(commit, paths=source.subdir, max_count=1), None)
        if touched is None:
            if worktree:  # a new customer folder (`builder init`), not committed yet
                return _uncommitted(source, commit)
            raise ConfigError(
                f"{source.location}: folder {source.subdir!r} is not in git at {ref!r}",
                hint="commit it first, or read the work tree with --worktree",
            )
        commit = touched
    return _Snapshot(
        source=source,
        commit=commit.hexsha,
        commit_time=int(commit.committed_date),
        tree=None if worktree else commit.tree,
    )


#: The revision of a work tree with nothing committed yet (a dirty development build's tag
#: says ``000000000000-dirty``) and its time (1980-01-01, as zip and wheels use).
UNCOMMITTED: Final = "0" * 40
UNCOMMITTED_TIME: Final = 315532800


def _uncommitted(source: RepoSource, head: git.Commit | None = None) -> _Snapshot:
    """The work tree of a folder no commit has touched yet: its revision is the zero id (the
    development build is tagged and labelled dirty) at the time of ``head``, when there is one."""
    when = int(head.committed_date) if head is not None else UNCOMMITTED_TIME
    return _Snapshot(source=source, commit=UNCOMMITTED, commit_time=when, tree=None)


def safe_relpath(value: str, where: str, what: str) -> str:
    """A relative path that stays inside its folder (no absolute paths, no '..')."""
    path = PurePosixPath(value.strip())
    if (
        value.strip() == ""
        or path.is_absolute()
        or ".." in path.parts
        or "\\" in value
        or _has_control(value)
    ):
        raise ConfigError(
            f"{where}: {what} {value[:120]!r} must be a relative path inside the customer folder "
            "(no '..', not absolute, no control characters)"
        )
    return path.as_posix()


def _parse(snapshot: _Snapshot, relpath: str, schema: str) -> yamldoc.Document:
    raw = snapshot.read(relpath, yaml=True)
    if raw is None:
        raise ConfigError(
            f"{snapshot.origin(relpath)}: file not found",
            hint="check the path and that it is committed",
        )
    doc = yamldoc.parse(raw, snapshot.origin(relpath))
    yamldoc.validate(doc, schema)
    return doc


def _declared_models(doc: yamldoc.Document) -> tuple[tuple[ModelDecl, ...], list[str]]:
    """Models of all analyses, unique by name (the same name must mean the same model), and
    every problem found on the way (malformed ids and paths, models declared twice
    differently, features using undeclared models), none hiding another. Auto references
    are normalised to the server's id form; a malformed one is kept as written."""
    found: dict[str, tuple[ModelDecl, Mapping[str, Any]]] = {}
    problems: list[str] = []
    for a_index, analysis in enumerate(doc.data["analyses"]):
        models: Mapping[str, Mapping[str, Any]] = analysis["models"]
        for name, entry in models.items():
            path = ("analyses", a_index, "models", name)
            reference = entry["reference"].strip()
            try:
                reference = _reference(
                    entry["sourcing"], reference, doc.where((*path, "reference"))
                )
            except ConfigError as exc:
                problems.append(exc.message)
            decl = ModelDecl(name=name, sourcing=entry["sourcing"], reference=reference)
            previous = found.get(name)
            if previous is not None and previous[1] != entry:
                problems.append(
                    f"{doc.where(path)}: model {name!r} is declared differently in two analyses; "
                    "give them different names"
                )
            found[name] = (decl, entry)
        for f_index, feature in enumerate(analysis["features"]):
            for role, model_name in feature["models"].items():
                if model_name not in models:
                    where = doc.where(("analyses", a_index, "features", f_index, "models", role))
                    known = ", ".join(sorted(models))
                    problems.append(
                        f"{where}: feature {feature['cls']!r} uses model {model_name!r}, which "
                        f"analysis {analysis['name']!r} does not declare (declared: {known})"
                    )
    return tuple(decl for _, (decl, _) in sorted(found.items())), problems


def _is_safe_folder(reference: str) -> bool:
    """Whether a manual reference may be listed (an unsafe one is reported, never read)."""
    try:
        safe_relpath(reference, "", "")
    except ConfigError:
        return False
    return True


def _reference(sourcing: str, reference: str, where: str) -> str:
    """A model reference checked: a folder inside the customer repo (manual), or a registry
    model id in any canonical UUID spelling, normalised to the server's 32 lowercase hex."""
    if sourcing == "manual":
        return safe_relpath(reference, where, "manual model reference")
    return normal_model_id(reference, what=f"{where}: model id")


def _declared_repository(customer: Mapping[str, Any], origin: str) -> str | None:
    """customer.yaml ``repository`` in canonical form; credentials in it are refused."""
    declared = customer.get("repository")
    if declared is None:
        return None
    if redact_url(declared) != declared:
        raise ConfigError(
            f"{origin}: repository {redact_url(declared)!r} holds credentials; remove them",
            hint="CI supplies them from BUILDER_GIT_TOKEN or CI_JOB_TOKEN",
        )
    if not is_repo_url(declared):
        raise ConfigError(
            f"{origin}: repository {declared[:120]!r} is not a git URL",
            hint="give the address every clone shares, e.g. https://gitlab.example.com/group/repo.git",
        )
    return canonical_repo_url(declared)


def _variants(value: str | list[str]) -> tuple[str, ...]:
    """customer.yaml base_image.variant (schema-checked: cpu, gpu or a list of them)."""
    return (value,) if isinstance(value, str) else tuple(value)


def work_tree_changes(source: RepoSource) -> tuple[str, ...]:
    """Files of the customer folder whose work-tree state differs from HEAD (modified, added,
    deleted, untracked), repository-relative and sorted; () for a clone in the cache (a git
    URL: no work tree anyone edits)."""
    if not (source.root / ".git").exists():
        return ()
    try:
        status = git.Repo(source.root).git.status(
            "--porcelain", "--untracked-files=all", "--", source.subdir or "."
        )
    except git.GitCommandError:
        return ()
    return tuple(sorted({line[3:].strip() for line in status.splitlines() if line.strip()}))


def shown_files(files: Sequence[str], limit: int = 5) -> str:
    """A few file names for a one-line message (``a, b and 3 more``)."""
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


@dataclass(frozen=True)
class Loaded:
    """A customer's configuration as read, and what is wrong with it (file:line order)."""

    spec: CustomerSpec
    problems: tuple[str, ...]


def load_customer(
    location: str,
    settings: Settings,
    *,
    ref: str | None = "HEAD",
    worktree: bool = False,
    known: KnownRevision | None = None,
) -> CustomerSpec:
    """Read and validate a customer's configuration at ``ref`` (or the work tree); one
    ConfigError lists every problem. ``ref=None``: what is on disk (see :func:`read_customer`)."""
    loaded = read_customer(location, settings, ref=ref, worktree=worktree, known=known)
    if loaded.problems:
        raise yamldoc.problems_error(loaded.problems)
    return loaded.spec


def read_customer(
    location: str,
    settings: Settings,
    *,
    ref: str | None = "HEAD",
    worktree: bool = False,
    known: KnownRevision | None = None,
) -> Loaded:
    """A customer's configuration at ``ref`` with every consistency problem of its analysis
    listed rather than raised (what `validate` reports in one run); schema errors still raise,
    all of them at once, since nothing after them can be trusted.

    ``ref=None`` reads what is on disk: the work tree when the customer folder has uncommitted
    changes (the spec lists them in ``uncommitted``), else HEAD: engineers edit the work tree.
    """
    source = known.source if known is not None else open_source(location, settings)
    changes: tuple[str, ...] = ()
    if ref is None:
        changes = () if worktree else work_tree_changes(source)
        worktree = worktree or bool(changes)
    snapshot = _snapshot(source, ref or "HEAD", worktree, known)
    customer = _parse(snapshot, CUSTOMER_FILE, "customer").data
    analysis_path = safe_relpath(
        customer.get("analysis", "analysis.yaml"), snapshot.origin(CUSTOMER_FILE), "analysis"
    )
    analysis_doc = _parse(snapshot, analysis_path, "analysis-short")
    models, problems = _declared_models(analysis_doc)
    bad_references = {d.reference for d in models if not _is_safe_folder(d.reference)}
    manual: dict[str, bytes] = {}
    for decl in models:
        if decl.sourcing != "manual" or decl.reference in bad_references:
            continue
        files = snapshot.list_files(decl.reference)
        if not files:
            problems.append(
                f"{snapshot.origin(analysis_path)}: manual model {decl.name!r}: folder "
                f"{decl.reference!r} has no files in {'the work tree' if worktree else 'git'}"
            )
        for name in files:
            manual[f"{decl.reference}/{name}"] = snapshot.read(f"{decl.reference}/{name}") or b""
    base = customer["base_image"]
    spec = CustomerSpec(
        repository=_declared_repository(customer, snapshot.origin(CUSTOMER_FILE)),
        customer=customer["customer"],
        base_version=base["version"].strip(),
        base_repository=base.get("repository"),
        variants=_variants(base.get("variant", "cpu")),
        analysis_path=analysis_path,
        analysis=analysis_doc.data,
        models=models,
        source=source,
        ref=ref or "HEAD",
        commit=snapshot.commit,
        commit_time=snapshot.commit_time,
        worktree=worktree,
        manual_files=manual,
        uncommitted=changes,
    )
    return Loaded(spec, tuple(yamldoc.in_file_order(problems)))


def read_committed_files(
    spec: CustomerSpec, relpaths: Sequence[str], *, repo: git.Repo | None = None
) -> dict[str, bytes | None]:
    """Files of the customer folder at the same revision the spec was read at, the folder
    looked up once for all (through ``repo``, an open repository of the spec's source, when
    the caller has one)."""
    repo = repo or git.Repo(spec.source.root)
    snapshot = _Snapshot(
        spec.source,
        spec.commit,
        spec.commit_time,
        None if spec.worktree else repo.commit(spec.commit).tree,
    )
    return {relpath: snapshot.read(relpath) for relpath in relpaths}


def read_committed_file(
    spec: CustomerSpec, relpath: str, *, repo: git.Repo | None = None
) -> bytes | None:
    """A file of the customer folder at the same revision the spec was read at."""
    return read_committed_files(spec, [relpath], repo=repo)[relpath]
