"""Fleet plan: per customer, whether its constraint admits a base release and what a new
image would change against its last release record; one pass over history for all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import (
    ThreadPoolExecutor,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import git
from packaging.version import InvalidVersion, Version

from builder.contracts import RepoSource
from builder.cook.load import KnownRevision, load_customer, open_source
from builder.errors import (
    BuilderError,
    ConfigError,
    error_dict,
)
from builder.fleet.fleetfile import Fleet, FleetEntry, admits, parse_release_version
from builder.fsutil import write_atomic
from builder.gitauth import GIT_ENV
from builder.image.provenance import variant_tag
from builder.record import PLAN_THREADS, RELEASES_BRANCH, ReleaseLog, record_remote
from builder.redact import mask_secrets
from builder.settings import Settings

# -- plan ---------------------------------------------------------------------------------------


@dataclass
class PlanItem:
    """What a base release means for one customer."""

    customer: str
    repo: str
    ref: str
    # "rebuild"; "released" (this config commit is already released on this base version:
    # nothing to do); "skip" (the constraint does not admit the version); "error".
    status: str
    constraint: str | None = None
    commit: str | None = None
    image: str | None = None  # the immutable tag the rebuild will push
    change: str | None = None  # "base", "config+base", "config", "none", "first"
    summary: str = ""
    previous: dict[str, Any] | None = None  # the latest release record, abridged
    changed_files: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    variants: list[str] = field(default_factory=lambda: ["cpu"])  # each is built
    warnings: list[str] = field(default_factory=list)


@dataclass
class FleetPlan:
    base_version: str
    fleet: str
    items: list[PlanItem]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long planning took

    @property
    def rebuild(self) -> list[PlanItem]:
        return [item for item in self.items if item.status == "rebuild"]

    @property
    def released(self) -> list[PlanItem]:
        return [item for item in self.items if item.status == "released"]

    @property
    def errors(self) -> list[PlanItem]:
        return [item for item in self.items if item.status == "error"]


def _owners(name: str, folders: frozenset[str]) -> set[str]:
    """The folders of ``folders`` that hold the file ``name`` (or are that file)."""
    parts = name.split("/")
    return {
        prefix
        for depth in range(1, len(parts) + 1)
        if (prefix := "/".join(parts[:depth])) in folders
    }


def last_commits(
    root: Path, ref: str, folders: Sequence[str], *, cache_dir: Path | None = None
) -> dict[str, str | None]:
    """For each folder of the repository at ``root``, the commit that
    ``git rev-list --max-count=1 REF -- FOLDER`` names (None: not in history at ``ref``),
    found for all folders in one pass instead of one history walk per folder.

    git's default history simplification makes each folder's walk one chain: from a commit
    whose folder equals that of a parent, the walk goes on with the first such parent only;
    a commit that differs from every parent (a root commit: that holds the folder) is the
    answer. So all folders still pending at a commit move on together: commits are read in
    topological order, each diffed against its parents by one ``git diff-tree --stdin``
    process, and the pass stops as soon as every folder has its answer.

    With ``cache_dir`` the answers are kept for the start commit: a later pass lists and
    walks only the commits added since (``rev-list HEAD ^KEPT``) and takes the kept answers
    for what is still pending there (a commit's ancestry never changes), so re-planning does
    not grow with the length of history. Only when a folder waits elsewhere (a branch merged
    since that forked before the kept commit) does it read the whole history again.
    """
    wanted = frozenset(f.strip("/") for f in folders)
    found: dict[str, str | None] = dict.fromkeys(wanted)
    repo = git.Repo(root)
    try:
        head = repo.git.rev_parse("--verify", "--end-of-options", f"{ref}^{{commit}}", env=GIT_ENV)
    except git.GitCommandError:
        raise ConfigError(
            f"{root}: ref {ref!r} does not exist",
            hint="use a branch, tag or commit of the customer repo",
        ) from None
    if "" in wanted:  # the repository itself: the ref's commit
        found[""] = head
    folders_only = wanted - {""}
    if not folders_only:
        return found
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    cache = cache_dir / f"{key}.json" if cache_dir is not None else None
    known = _cached_answers(cache) if cache is not None else None
    if known is not None and _is_ancestor(repo, known[0], head):
        # Only the history added since the kept pass: what is still pending when the walk
        # reaches the kept start commit takes its answers there. A folder pending anywhere
        # else (a merged branch forked before it) or new since needs the whole history.
        left = _pass(root, _graph(repo, head, exclude=known[0]), head, folders_only, found)
        if left.keys() <= {known[0]} and left.get(known[0], set()) <= known[1].keys():
            found.update({f: known[1][f] for f in left.get(known[0], set())})
        else:
            found.update(dict.fromkeys(folders_only))
            _pass(root, _graph(repo, head), head, folders_only, found, known)
    else:
        _pass(root, _graph(repo, head), head, folders_only, found, known)
    if cache is not None:
        answers = {f: found[f] for f in folders_only}
        if known is not None and known[0] == head:
            answers = {**known[1], **answers}
        with contextlib.suppress(OSError, BuilderError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps({"commit": head, "answers": answers}, sort_keys=True)
            write_atomic(cache, data.encode())
    return found


def _is_ancestor(repo: git.Repo, ancestor: str, commit: str) -> bool:
    """Whether ``ancestor`` is in ``commit``'s history (False for a commit gone after a
    rewrite or a garbage collection)."""
    try:
        repo.git.merge_base("--is-ancestor", ancestor, commit, env=GIT_ENV)
    except git.GitCommandError:
        return False
    return True


def _graph(repo: git.Repo, head: str, *, exclude: str | None = None) -> list[list[str]]:
    """``git rev-list --topo-order --parents`` rows from ``head`` (without ``exclude``'s
    history): each commit followed by its parents."""
    args = ["--topo-order", "--parents", head] + ([f"^{exclude}"] if exclude else [])
    listing = repo.git.rev_list(*args, "--", env=GIT_ENV)
    return [line.split() for line in listing.splitlines() if line.strip()]


def _pass(
    root: Path,
    graph: Sequence[Sequence[str]],
    head: str,
    folders: frozenset[str],
    found: dict[str, str | None],
    known: tuple[str, Mapping[str, str | None]] | None = None,
) -> dict[str, set[str]]:
    """One walk down ``graph`` (see :func:`last_commits`) filling ``found``; returns the
    folders still pending, by the commit they wait at (a commit outside ``graph``)."""
    pending: dict[str, set[str]] = {head: set(folders)}
    if not graph:
        return pending
    parents = {row[0]: list(row[1:]) for row in graph}
    # One input line per (commit, parent) pair, a root commit alone; with --always each line
    # gets its header even when the diff is empty, so the k-th block answers the k-th line.
    lines = [(row[0], p) for row in graph for p in (row[1:] or [""])]
    tops = sorted({f.split("/", 1)[0] for f in folders})
    command = [
        "git",
        "-C",
        str(root),
        "diff-tree",
        "--stdin",
        "--always",
        "--root",
        "-r",
        "--name-only",
        "--no-renames",
        "--format=%x1e%H",
        "--",
        *tops,
    ]
    with subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **GIT_ENV},
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None

        def feed(stream: IO[str]) -> None:
            try:
                for commit, parent in lines:
                    stream.write(f"{commit} {parent}\n" if parent else f"{commit}\n")
            except OSError:  # the reader stopped early and killed git: a broken pipe
                pass
            finally:
                with contextlib.suppress(OSError):
                    stream.close()

        writer = threading.Thread(target=feed, args=(proc.stdin,), daemon=True)
        writer.start()
        _walk(lines, parents, _diff_blocks(proc.stdout, folders), pending, found, known)
        proc.kill()
        writer.join(timeout=5)
    return pending


def _cached_answers(path: Path) -> tuple[str, dict[str, str | None]] | None:
    """The answers a previous pass kept: (its start commit, folder -> commit); None when
    there are none or they cannot be read (then the pass reads the whole history)."""
    try:
        data = json.loads(path.read_text("utf-8"))
        commit, answers = str(data["commit"]), dict(data["answers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not re.fullmatch(r"[0-9a-f]{40,64}", commit):
        return None
    return commit, {str(k): (str(v) if v else None) for k, v in answers.items()}


def _walk(
    lines: Sequence[tuple[str, str]],
    parents: Mapping[str, Sequence[str]],
    blocks: Iterator[set[str]],
    pending: dict[str, set[str]],
    found: dict[str, str | None],
    known: tuple[str, Mapping[str, str | None]] | None = None,
) -> None:
    """Move the pending folders down history, block by block of diff-tree output, until
    none is left (see :func:`last_commits`); at ``known``'s commit its answers are taken."""
    index = 0
    while pending and index < len(lines):
        commit = lines[index][0]
        changed = [next(blocks, set()) for _ in parents[commit] or [""]]
        index += len(changed)
        # Each pending set belongs to one commit only, so it is moved and changed in
        # place: a commit costs what it touches, not the number of folders pending.
        rest = pending.pop(commit, set())
        if known is not None and commit == known[0]:
            for folder in rest & known[1].keys():
                found[folder] = known[1][folder]
            rest -= known[1].keys()
        for parent, touched in zip(parents[commit], changed, strict=False):
            if not rest:
                break
            hit = rest & touched
            rest -= hit  # what equals this parent goes on with it
            if rest:
                _merge_pending(pending, parent, rest)
            rest = hit
        if not parents[commit]:
            rest &= changed[0]  # a root commit: only where it holds the folder
        for folder in rest:
            found[folder] = commit


def _merge_pending(pending: dict[str, set[str]], commit: str, folders: set[str]) -> None:
    """Add ``folders`` (handed over) to what is pending at ``commit``, the smaller set into
    the larger."""
    there = pending.get(commit)
    if there is None:
        pending[commit] = folders
    elif len(there) >= len(folders):
        there |= folders
    else:
        folders |= there
        pending[commit] = folders


def _diff_blocks(stream: IO[str], folders: frozenset[str]) -> Iterator[set[str]]:
    """The folders each diff of ``git diff-tree --stdin --format=%x1e%H`` output touches."""
    current: set[str] | None = None
    for line in stream:
        if line.startswith("\x1e"):
            if current is not None:
                yield current
            current = set()
        elif line.strip() and current is not None:
            current |= _owners(line.rstrip("\n"), folders)
    if current is not None:
        yield current


def _local_sources(entries: Sequence[FleetEntry], settings: Settings) -> dict[str, RepoSource]:
    """Each local customer folder's source, the repository found once per parent folder
    (``customers/a``, ``customers/b``... share one lookup); unresolvable ones are left out:
    their own load reports them."""
    parents: dict[Path, RepoSource | None] = {}
    out: dict[str, RepoSource] = {}
    for entry in entries:
        folder = Path(entry.location)
        if entry.is_url or not folder.is_dir():
            continue
        if (folder / ".git").exists():  # a repository of its own
            with contextlib.suppress(BuilderError):
                out[entry.name] = open_source(entry.location, settings)
            continue
        if folder.parent not in parents:
            try:
                parents[folder.parent] = open_source(str(folder.parent), settings)
            except BuilderError:
                parents[folder.parent] = None
        parent = parents[folder.parent]
        if parent is None or not folder.resolve().is_relative_to(parent.root):
            continue
        subdir = folder.resolve().relative_to(parent.root).as_posix()
        url = parent.url.partition("#")[0]
        out[entry.name] = RepoSource(entry.location, parent.root, subdir, f"{url}#{subdir}")
    return out


def _known_revisions(entries: Sequence[FleetEntry], settings: Settings) -> dict[str, KnownRevision]:
    """Each local customer folder's config revision (the last commit touching it), from one
    pass per repository and ref, with one shared open repository per repository."""
    sources = _local_sources(entries, settings)
    groups: dict[tuple[Path, str], list[str]] = {}
    for entry in entries:
        if entry.name in sources:
            groups.setdefault((sources[entry.name].root, entry.ref), []).append(entry.name)
    repos: dict[Path, git.Repo] = {}
    out: dict[str, KnownRevision] = {}
    for (root, ref), names in groups.items():
        try:
            folders = [sources[name].subdir for name in names]
            commits = last_commits(root, ref, folders, cache_dir=settings.cache_dir / "plan")
        except BuilderError:
            continue  # the customers' own loads report it
        repo = repos.setdefault(root, git.Repo(root))
        for name in names:
            commit = commits.get(sources[name].subdir)
            if commit:
                out[name] = KnownRevision(sources[name], repo, commit)
    return out


def _changed_files(location: str, settings: Settings, old: str, new: str) -> list[str] | None:
    """Files of the customer folder changed between two config commits (None: unknown)."""
    source = open_source(location, settings)
    repo = git.Repo(source.root)
    paths = [source.subdir] if source.subdir else []
    try:
        names = repo.git.diff("--name-only", old, new, "--", *paths).splitlines()
    except git.GitCommandError:
        return None
    prefix = f"{source.subdir}/" if source.subdir else ""
    return sorted(n.removeprefix(prefix) for n in names if n)


def _classify(
    item: PlanItem,
    entry: FleetEntry,
    settings: Settings,
    version: Version,
    previous: dict[str, Any] | None,
) -> None:
    if previous is None:
        item.change, item.summary = (
            "first",
            f"first recorded release: config {item.commit and item.commit[:12]} on {version}",
        )
        return
    old_commit = str((previous.get("config") or {}).get("commit", ""))
    old_base = str((previous.get("base_image") or {}).get("version", ""))
    item.previous = {
        "image": previous.get("image"),
        "digest": previous.get("manifest_digest"),
        "config_commit": old_commit,
        "base_version": old_base,
        "built_at": previous.get("built_at"),
        "record": previous.get("_path"),
    }
    with contextlib.suppress(InvalidVersion):
        if Version(old_base) > version:
            item.warnings.append(
                f"base downgrade: {entry.name} was last released on {old_base} "
                f"({item.previous['image']}); {version} is older"
            )
    same_base = old_base == str(version)
    if old_commit == item.commit:
        item.change = "none" if same_base else "base"
        if same_base:
            item.status = "released"
            item.summary = f"already released: {item.previous['image']}"
        else:
            item.summary = (
                f"base only: {old_base} -> {version}, config unchanged ({old_commit[:12]})"
            )
        return
    changed = _changed_files(entry.location, settings, old_commit, item.commit or "HEAD")
    item.changed_files = changed or []
    item.change = "config" if same_base else "config+base"
    what = f"{len(changed)} file(s) changed" if changed is not None else "history not found"
    base = "" if same_base else f", base {old_base} -> {version}"
    item.summary = f"config too: {old_commit[:12]} -> {(item.commit or '')[:12]} ({what}){base}"


def _load_item(
    entry: FleetEntry, settings: Settings, version: Version, known: KnownRevision | None
) -> PlanItem:
    """Load one customer (git only: no model or image registry calls) at its config revision
    found by the single pass, or at its ref when the pass had no answer for it."""
    item = PlanItem(
        customer=entry.name, repo=mask_secrets(entry.repo), ref=entry.ref, status="error"
    )
    try:
        spec = load_customer(entry.location, settings, ref=entry.ref, known=known)
        if spec.customer != entry.name:
            raise ConfigError(
                f"{entry.where}: fleet entry {entry.name!r} points at {item.repo}, whose "
                f"customer.yaml names {spec.customer!r}",
                hint="fix the name in the fleet file or the repository",
            )
        item.constraint, item.commit = spec.base_version, spec.commit
        if not admits(spec.base_version, version):
            item.status, item.change = "skip", None
            item.summary = f"{spec.base_version} does not admit {version}"
            return item
        item.status, item.variants = "rebuild", list(spec.variants)
        tag = variant_tag(str(version), spec.variants[0])
        item.image = f"{settings.image_registry}/{spec.customer}:{tag}-{spec.config_rev}"
    except BuilderError as exc:
        item.error = error_dict(exc)
        item.summary = item.error["message"]
    return item


@dataclass
class _Records:
    """One remote's release records, fetched once per plan: the latest per customer."""

    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def _read_remote(remote: str, settings: Settings, branch: str) -> _Records:
    try:
        log = ReleaseLog(remote, settings.cache_dir, branch)
        return _Records(latest=log.latest_records(log.fetch()))
    except BuilderError as exc:
        return _Records(error=mask_secrets(exc.message))


def _finish_item(
    item: PlanItem, entry: FleetEntry, settings: Settings, version: Version, records: _Records
) -> None:
    if records.error is not None:
        item.change, item.summary = None, f"previous release unknown ({records.error})"
        return
    _classify(item, entry, settings, version, records.latest.get(entry.name))


def _record_remotes(
    entries: Sequence[FleetEntry], items: Mapping[str, PlanItem], known: Mapping[str, KnownRevision]
) -> dict[str, str]:
    """Where each customer to rebuild keeps its release records (looked up once per
    repository); a customer whose remote is unknown gets that said in its summary."""
    by_root: dict[Path, str] = {}
    out: dict[str, str] = {}
    for entry in entries:
        item = items[entry.name]
        if item.status != "rebuild":
            continue
        root = known[entry.name].source.root if entry.name in known else None
        try:
            if root is not None and root in by_root:
                out[entry.name] = by_root[root]
                continue
            out[entry.name] = record_remote(entry.location)
        except BuilderError as exc:
            item.change = None
            item.summary = f"previous release unknown ({mask_secrets(exc.message)})"
            continue
        if root is not None:
            by_root[root] = out[entry.name]
    return out


def plan(
    fleet: Fleet,
    settings: Settings,
    base_version: str,
    *,
    branch: str = RELEASES_BRANCH,
    threads: int = PLAN_THREADS,
) -> FleetPlan:
    """Per customer: does its constraint admit ``base_version``, and what would change.

    The repository is read once: one pass over history per repository and ref finds every
    customer folder's config revision (:func:`last_commits`), each releases branch is fetched
    once per remote, and what must be done per customer (reading and validating its files,
    listing changed files) runs on ``threads`` threads.
    """
    started = time.perf_counter()
    version = parse_release_version(base_version)
    entries = fleet.entries
    known = _known_revisions(entries, settings)
    items: dict[str, PlanItem] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        # Customers the pass answered share an open repository (one git process, not
        # thread-safe) and are read here; the others (clones, fetches) on the threads.
        others = {
            e.name: pool.submit(_load_item, e, settings, version, None)
            for e in entries
            if e.name not in known
        }
        for entry in entries:
            if entry.name in known:
                items[entry.name] = _load_item(entry, settings, version, known[entry.name])
        items.update({name: future.result() for name, future in others.items()})
        remotes = _record_remotes(entries, items, known)
        wanted = sorted(set(remotes.values()))
        fetched = dict(
            zip(wanted, pool.map(lambda r: _read_remote(r, settings, branch), wanted), strict=True)
        )
        finishing = [
            pool.submit(_finish_item, items[e.name], e, settings, version, fetched[remotes[e.name]])
            for e in entries
            if e.name in remotes
        ]
        for future in finishing:
            future.result()
    ordered = [items[e.name] for e in entries]
    result = FleetPlan(base_version=str(version), fleet=str(fleet.path), items=ordered)
    if not result.rebuild and not result.released and not result.errors:
        result.notes.append(f"no customer admits base {version}: nothing to rebuild")
    result.seconds = round(time.perf_counter() - started, 3)
    return result
