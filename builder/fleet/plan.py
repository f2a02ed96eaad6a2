"""Fleet plan: per image (customer x variant), whether its constraint admits a base release,
what a new image would change against its last release record, and what would make its
release build fail; work proportional to what changed, not to the fleet or its history.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

import git
import yaml
from packaging.version import InvalidVersion, Version

from builder.contracts import CustomerSpec, RepoSource
from builder.cook.load import (
    CUSTOMER_FILE,
    LOCK_FILE,
    KnownRevision,
    load_customer,
    open_source,
    read_committed_file,
)
from builder.cook.lock import input_drift, parse_lock
from builder.documents.release_record import ReleaseRecord
from builder.errors import BuilderError, ConfigError, ImageError, error_dict
from builder.fleet.fleetfile import Fleet, FleetEntry, admits, parse_release_version
from builder.fleet.index import CustomerFacts, LockState, PlanIndex
from builder.fsutil import write_atomic
from builder.gitauth import GIT_ENV
from builder.image.base import resolve_base, select_version
from builder.image.base_build import variant_repository
from builder.image.store import ImageStore
from builder.imagename import ImageKey, ImageName
from builder.oci import RegistryClient, RetryPolicy, split_repository
from builder.record import PLAN_THREADS, RELEASES_BRANCH, ReleaseLog, record_remote
from builder.redact import mask_secrets
from builder.settings import Settings

#: One quick try per base registry: a plan says "not checked" rather than wait on retries.
_BASE_PROBE: Final = RetryPolicy(attempts=1, connect_timeout=3.0, read_timeout=15.0)

# -- plan ---------------------------------------------------------------------------------------


class PlanStatus(StrEnum):
    """What a base release means for one image."""

    REBUILD = "rebuild"
    RELEASED = "released"  # this config commit is already released on this base and variant
    SKIP = "skip"  # the constraint does not admit the version
    ERROR = "error"  # the customer could not be read (its item has no variant)


class Change(StrEnum):
    """What a rebuild changes against the image's latest release record."""

    FIRST = "first"  # no release recorded yet
    NONE = "none"  # the same config on the same base: already released
    BASE = "base"
    CONFIG = "config"
    CONFIG_AND_BASE = "config+base"


@dataclass
class PlanItem:
    """What a base release means for one image: a customer built on one base variant."""

    customer: str
    repo: str
    ref: str
    status: PlanStatus
    variant: str | None = "cpu"
    constraint: str | None = None
    commit: str | None = None
    image: str | None = None  # the immutable tag the rebuild will push
    change: Change | None = None
    summary: str = ""
    previous: dict[str, Any] | None = None  # the image's latest release record, abridged
    changed_files: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    lock: LockState | None = None  # None: not read
    base: str | None = None  # the base repository of its variant (images to rebuild)
    # Why a release build of this image will be refused: told before it builds.
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> ImageKey | None:
        """The image, or None for a customer that could not be read."""
        return None if self.variant is None else ImageKey(self.customer, self.variant)

    @property
    def name(self) -> str:
        """``customer-x``, ``customer-x (gpu)``: how lines and counters name the image."""
        return str(self.key or self.customer)


@dataclass
class FleetPlan:
    """The plan of one base release: one item per image, in fleet file order."""

    base_version: str
    fleet: str
    items: list[PlanItem]
    notes: list[str] = field(default_factory=list)
    # Folders next to the fleet file holding a customer.yaml that the fleet file does not list.
    unlisted: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long planning took

    @property
    def rebuild(self) -> list[PlanItem]:
        """The images to rebuild on the base release."""
        return [item for item in self.items if item.status == PlanStatus.REBUILD]

    @property
    def released(self) -> list[PlanItem]:
        """The images whose config commit is already released on this base and variant."""
        return [item for item in self.items if item.status == PlanStatus.RELEASED]

    @property
    def errors(self) -> list[PlanItem]:
        """The customers whose configuration could not be read, so nothing is planned for them."""
        return [item for item in self.items if item.status == PlanStatus.ERROR]

    @property
    def blocked(self) -> list[PlanItem]:
        """Images to rebuild whose release build will be refused (see ``problems``)."""
        return [item for item in self.rebuild if item.problems]

    @property
    def customers(self) -> int:
        """How many customers the plan covers."""
        return len({item.customer for item in self.items})


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
            write_atomic(cache, data.encode(), durable=False)
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
        folder = Path(entry.location)  # absolute and resolved by the fleet file's reader
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
        if parent is None or not folder.is_relative_to(parent.root):
            continue
        subdir = folder.relative_to(parent.root).as_posix()
        url = parent.url.partition("#")[0]
        out[entry.name] = RepoSource(entry.location, parent.root, subdir, f"{url}#{subdir}")
    return out


def _sources(
    entries: Sequence[FleetEntry], settings: Settings, pool: ThreadPoolExecutor
) -> dict[str, RepoSource]:
    """Each customer's source: local folders with one lookup per parent folder, repositories
    named by URL cloned or fetched on threads. One that cannot be opened is left out: its own
    load says why."""
    out = _local_sources(entries, settings)
    remote = [entry for entry in entries if entry.is_url]

    def opened(entry: FleetEntry) -> RepoSource | None:
        try:
            return open_source(entry.location, settings)
        except BuilderError:
            return None

    for entry, source in zip(remote, pool.map(opened, remote), strict=True):
        if source is not None:
            out[entry.name] = source
    return out


def _known_revisions(
    entries: Sequence[FleetEntry], sources: Mapping[str, RepoSource], settings: Settings
) -> dict[str, KnownRevision]:
    """Each customer's config revision (the last commit touching its folder at its ref), from
    one pass per repository and ref, with one shared open repository per repository."""
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


def _lock_state(spec: CustomerSpec, repo: git.Repo | None) -> tuple[LockState, str]:
    """Whether the committed lock pins this config, from git alone (stale: the config files
    changed since it was made), and why not."""
    raw = read_committed_file(spec, LOCK_FILE, repo=repo)
    if raw is None:
        return LockState.MISSING, f"no {LOCK_FILE} committed"
    try:
        drift = input_drift(spec, parse_lock(raw, spec), repo=repo)
    except BuilderError as exc:
        return LockState.UNREADABLE, exc.message
    return (LockState.STALE, "; ".join(drift)) if drift else (LockState.CURRENT, "")


def _facts_of(spec: CustomerSpec, repo: git.Repo | None) -> CustomerFacts:
    lock, detail = _lock_state(spec, repo)
    return CustomerFacts(
        customer=spec.customer,
        constraint=spec.base_version,
        base_repository=spec.base_repository,
        variants=spec.variants,
        commit=spec.commit,
        lock=lock,
        lock_detail=detail,
    )


def _read_facts(
    entry: FleetEntry, settings: Settings, known: KnownRevision | None, index: PlanIndex
) -> CustomerFacts:
    """The customer's facts at its config revision: from the index when its folder's
    revision is the one kept there, else read (git only) and kept for the next plan."""
    if known is None:  # no revision found: the load says why (or finds it after all)
        return _facts_of(load_customer(entry.location, settings, ref=entry.ref), None)
    key = f"{known.source.url}\0{known.commit}"
    facts = index.get(entry.name, key)
    if facts is None:
        spec = load_customer(entry.location, settings, ref=entry.ref, known=known)
        facts = _facts_of(spec, known.repo)
        index.put(entry.name, key, facts)
    return facts


def _shown(entry: FleetEntry) -> str:
    """The entry's repository fit to print (a folder holds no credentials; the fleet file
    refuses them in URLs, and secrets from the environment are masked in these)."""
    return mask_secrets(entry.repo) if entry.is_url else entry.repo


def _error_item(entry: FleetEntry, exc: BuilderError) -> PlanItem:
    error = error_dict(exc)
    return PlanItem(
        customer=entry.name,
        repo=_shown(entry),
        ref=entry.ref,
        status=PlanStatus.ERROR,
        variant=None,
        summary=error["message"],
        error=error,
    )


def _items(
    entry: FleetEntry, facts: CustomerFacts, registry: str, version: Version
) -> list[PlanItem]:
    """One item per variant the customer runs (ConfigError for a customer that is not
    what its fleet entry says, or whose constraint is not one)."""
    repo = _shown(entry)
    if facts.customer != entry.name:
        raise ConfigError(
            f"{entry.where}: fleet entry {entry.name!r} points at {repo}, whose "
            f"customer.yaml names {facts.customer!r}",
            hint="fix the name in the fleet file or the repository",
        )
    admitted = admits(facts.constraint, version)
    items = []
    for variant in facts.variants:
        item = PlanItem(
            customer=entry.name,
            repo=repo,
            ref=entry.ref,
            status=PlanStatus.REBUILD if admitted else PlanStatus.SKIP,
            variant=variant,
            constraint=facts.constraint,
            commit=facts.commit,
            lock=facts.lock,
        )
        if admitted:
            name = ImageName.of_build(registry, facts.customer, str(version), variant, facts.commit)
            item.image = name.reference
        else:
            item.summary = f"{facts.constraint} does not admit {version}"
        items.append(item)
    return items


def _changed_files(source: RepoSource, repo: git.Repo, old: str, new: str) -> list[str] | None:
    """Files of the customer folder changed between two config commits (None: unknown)."""
    paths = [source.subdir] if source.subdir else []
    try:
        names = repo.git.diff("--name-only", old, new, "--", *paths).splitlines()
    except git.GitCommandError:
        return None
    prefix = f"{source.subdir}/" if source.subdir else ""
    return sorted(n.removeprefix(prefix) for n in names if n)


def _classify(
    item: PlanItem,
    version: Version,
    previous: ReleaseRecord | None,
    changed: Callable[[str, str], list[str] | None],
) -> None:
    """Compare the item with its image's latest release record; ``changed(old, new)`` lists
    the files of the customer folder changed between two config commits."""
    if previous is None:
        item.change, item.summary = (
            Change.FIRST,
            f"first recorded release: config {item.commit and item.commit[:12]} on {version}",
        )
        return
    old_commit, old_base = previous.config_commit, previous.base_version
    item.previous = {
        "image": previous.image,
        "digest": previous.manifest_digest,
        "config_commit": old_commit,
        "base_version": old_base,
        "built_at": previous.built_at,
        "record": previous.path,
    }
    with contextlib.suppress(InvalidVersion):
        if Version(old_base) > version:
            item.warnings.append(
                f"base downgrade: {item.name} was last released on {old_base} "
                f"({item.previous['image']}); {version} is older"
            )
    same_base = old_base == str(version)
    if old_commit == item.commit:
        item.change = Change.NONE if same_base else Change.BASE
        if same_base:
            item.status = PlanStatus.RELEASED
            item.summary = f"already released: {item.previous['image']}"
        else:
            item.summary = (
                f"base only: {old_base} -> {version}, config unchanged ({old_commit[:12]})"
            )
        return
    files = changed(old_commit, item.commit or "HEAD")
    item.changed_files = files or []
    item.change = Change.CONFIG if same_base else Change.CONFIG_AND_BASE
    what = f"{len(files)} file(s) changed" if files is not None else "history not found"
    base = "" if same_base else f", base {old_base} -> {version}"
    item.summary = f"config too: {old_commit[:12]} -> {(item.commit or '')[:12]} ({what}){base}"


@dataclass
class _Records:
    """One remote's release records, fetched once per plan: the latest per image."""

    latest: dict[ImageKey, ReleaseRecord] = field(default_factory=dict)
    error: str | None = None


def _read_remote(remote: str, settings: Settings, branch: str) -> _Records:
    try:
        log = ReleaseLog(remote, settings.cache_dir, branch)
        return _Records(latest=log.latest_by_image(log.fetch()))
    except BuilderError as exc:
        return _Records(error=mask_secrets(exc.message))


def _record_remotes(
    entries: Sequence[FleetEntry],
    items: Mapping[str, list[PlanItem]],
    known: Mapping[str, KnownRevision],
) -> dict[str, str]:
    """Where each customer with an image to rebuild keeps its release records (looked up
    once per repository); a customer whose remote is unknown gets that said in its items."""
    by_root: dict[Path, str] = {}
    out: dict[str, str] = {}
    for entry in entries:
        todo = [item for item in items[entry.name] if item.status == PlanStatus.REBUILD]
        if not todo:
            continue
        root = known[entry.name].source.root if entry.name in known else None
        try:
            if root is not None and root in by_root:
                out[entry.name] = by_root[root]
                continue
            out[entry.name] = record_remote(entry.location)
        except BuilderError as exc:
            for item in todo:
                item.change = None
                item.summary = f"previous release unknown ({mask_secrets(exc.message)})"
            continue
        if root is not None:
            by_root[root] = out[entry.name]
    return out


def _missing_bases(
    repositories: set[str], version: str, settings: Settings, insecure: bool | None
) -> tuple[dict[str, str], list[str]]:
    """Which base repositories have no image of ``version`` (repository -> why), looked up
    once each in its registry, else in the local image store as a build would; and notes
    for those that could not be looked up."""
    missing: dict[str, str] = {}
    notes: list[str] = []
    store = ImageStore(settings.store_dir)
    for repository in sorted(repositories):
        with contextlib.suppress(ImageError):
            store.find_base(repository, version)
            continue
        try:
            if repository.startswith("oci:"):
                resolve_base(repository, version)
                continue
            host, path = split_repository(repository)
            client = RegistryClient(host, insecure=insecure, retry=_BASE_PROBE)
        except ImageError as exc:
            notes.append(f"base {repository}:{version} not checked: {exc.message}")
            continue
        try:
            select_version(client.list_tags(path), version, what=f"base image {repository}")
        except ImageError as exc:
            missing[repository] = exc.message
    return missing, notes


def _problems(
    items: Sequence[PlanItem],
    facts: Mapping[str, CustomerFacts],
    settings: Settings,
    version: str,
    *,
    base_repository: str | None,
    insecure: bool | None,
) -> list[str]:
    """Say, per image to rebuild, what will make its release build fail: a lock that is
    missing, stale or unreadable; no base image of this version for its variant. Returns
    notes on what could not be checked."""
    todo = [item for item in items if item.status == PlanStatus.REBUILD and item.variant]
    for item in todo:
        own = facts[item.customer].base_repository
        repository = base_repository or own or settings.base_repository
        item.base = variant_repository(repository, item.variant or "cpu")
    missing, notes = _missing_bases({i.base for i in todo if i.base}, version, settings, insecure)
    for item in todo:
        customer = facts[item.customer]
        if customer.lock != LockState.CURRENT:
            item.problems.append(
                f"{customer.lock} lock: {customer.lock_detail}; a release build refuses it "
                "(run `builder lock`, review and commit the result)"
            )
        if item.base in missing:
            item.problems.append(
                f"no {item.variant} base of {version}: {missing[item.base]} "
                f"(build and push it: `builder base build --variant {item.variant} --push`)"
            )
    return notes


def _unlisted(fleet: Fleet) -> list[str]:
    """Folders next to the fleet file holding a customer.yaml of a customer the fleet file
    does not list (not as a folder, nor by name): a base release would pass them by."""
    names = fleet.names
    found = []
    with contextlib.suppress(OSError):
        for child in sorted(fleet.path.parent.iterdir()):
            file = child / CUSTOMER_FILE
            if not file.is_file() or str(child.resolve()) in fleet.folders:
                continue
            try:  # a checkout of a customer listed by URL is no stranger
                named = (yaml.safe_load(file.read_bytes()) or {}).get("customer")
            except (OSError, yaml.YAMLError, AttributeError):
                named = None
            if named not in names:
                found.append(child.name)
    return found


def _finish(
    items: Sequence[PlanItem], records: _Records, version: Version, known: KnownRevision | None
) -> None:
    """Classify one customer's images to rebuild against their latest release records."""
    changes: dict[tuple[str, str], list[str] | None] = {}

    def changed(old: str, new: str) -> list[str] | None:
        if (old, new) not in changes:  # the same for every variant of the customer
            changes[(old, new)] = (
                None if known is None else _changed_files(known.source, known.repo, old, new)
            )
        return changes[(old, new)]

    for item in items:
        if item.status != PlanStatus.REBUILD or item.key is None:
            continue
        if records.error is not None:
            item.change, item.summary = None, f"previous release unknown ({records.error})"
            continue
        _classify(item, version, records.latest.get(item.key), changed)


def _read_customers(
    entries: Sequence[FleetEntry],
    settings: Settings,
    index: PlanIndex,
    pool: ThreadPoolExecutor,
) -> tuple[dict[str, KnownRevision], dict[str, CustomerFacts | BuilderError]]:
    """Each customer's config revision (one pass per repository) and facts at it (from the
    index when unchanged), or why it could not be read."""
    sources = _sources(entries, settings, pool)
    known = _known_revisions(entries, sources, settings)
    # Customers the pass answered share an open repository (one git process, not
    # thread-safe) and are read here; the others on the threads.
    others = {
        e.name: pool.submit(_read_facts, e, settings, None, index)
        for e in entries
        if e.name not in known
    }
    facts: dict[str, CustomerFacts | BuilderError] = {}
    for entry in entries:
        try:
            if entry.name in known:
                facts[entry.name] = _read_facts(entry, settings, known[entry.name], index)
            else:
                facts[entry.name] = others[entry.name].result()
        except BuilderError as exc:
            facts[entry.name] = exc
    return known, facts


def _plan_items(
    entries: Sequence[FleetEntry],
    facts: Mapping[str, CustomerFacts | BuilderError],
    registry: str,
    version: Version,
) -> dict[str, list[PlanItem]]:
    """Each customer's items: one per variant, or one error item."""
    items: dict[str, list[PlanItem]] = {}
    for entry in entries:
        found = facts[entry.name]
        try:
            if isinstance(found, BuilderError):
                raise found
            items[entry.name] = _items(entry, found, registry, version)
        except BuilderError as exc:
            items[entry.name] = [_error_item(entry, exc)]
    return items


def _read_records(
    remotes: Mapping[str, str], settings: Settings, branch: str, pool: ThreadPoolExecutor
) -> dict[str, _Records]:
    """Each remote's latest release records, one fetch per remote, on the threads."""
    wanted = sorted(set(remotes.values()))
    read = pool.map(lambda r: _read_remote(r, settings, branch), wanted)
    return dict(zip(wanted, read, strict=True))


def _notes(result: FleetPlan, fleet: Fleet) -> list[str]:
    """What the plan says besides its items: nothing admitted, folders not in the fleet."""
    notes = []
    if not result.rebuild and not result.released and not result.errors:
        notes.append(f"no customer admits base {result.base_version}: nothing to rebuild")
    for folder in result.unlisted:
        notes.append(
            f"{folder}/{CUSTOMER_FILE} is not in {fleet.path.name}: a base release does not "
            "rebuild it (add it to the fleet file, or remove the folder)"
        )
    return notes


def plan(
    fleet: Fleet,
    settings: Settings,
    base_version: str,
    *,
    branch: str = RELEASES_BRANCH,
    threads: int = PLAN_THREADS,
    base_repository: str | None = None,
    image_registry: str | None = None,
    insecure: bool | None = None,
) -> FleetPlan:
    """Per image (customer x variant): does its constraint admit ``base_version``, what would
    change, and what would make its release build fail; each image to rebuild named in
    ``image_registry`` (default: the setting).

    The work is proportional to what changed: one pass over each repository's history since
    the last plan finds every customer folder's config revision (:func:`last_commits`), a
    customer whose revision is the one kept in the plan index is not read again, and each
    releases branch is fetched once per remote with only the records added since read
    (:meth:`ReleaseLog.latest_by_image`). Clones, fetches and record reads run on
    ``threads`` threads. Besides git, one tag listing per base repository and variant
    checks that the base exists.
    """
    started = time.perf_counter()
    version = parse_release_version(base_version)
    entries = fleet.entries
    index = PlanIndex.open(settings.cache_dir, fleet.path)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        known, facts = _read_customers(entries, settings, index, pool)
        items = _plan_items(entries, facts, image_registry or settings.image_registry, version)
        remotes = _record_remotes(entries, items, known)
        records = _read_records(remotes, settings, branch, pool)
    for entry in entries:
        if entry.name in remotes:
            _finish(items[entry.name], records[remotes[entry.name]], version, known.get(entry.name))
    index.save()
    ordered = [item for e in entries for item in items[e.name]]
    result = FleetPlan(
        base_version=str(version), fleet=str(fleet.path), items=ordered, unlisted=_unlisted(fleet)
    )
    readable = {name: f for name, f in facts.items() if isinstance(f, CustomerFacts)}
    result.notes += _problems(
        ordered,
        readable,
        settings,
        str(version),
        base_repository=base_repository,
        insecure=insecure,
    )
    result.notes += _notes(result, fleet)
    result.seconds = round(time.perf_counter() - started, 3)
    return result
