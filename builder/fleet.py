"""Fleet rebuilds: which customers a base release reaches, building them all, and git records.

When a stable base image is released, every customer whose pinned base constraint admits it
gets a new image. The fleet file (``customers/fleet.yaml``) lists the customers and where
their configuration repositories are. This module:

- loads the fleet file (schema-checked, one line per error);
- plans a release: per customer, whether its constraint admits the version and what the new
  image changes compared with the last release record (base only, or config too);
- builds every admitted customer in parallel worker processes through
  :func:`builder.pipeline.build`, going on past one customer's failure;
- renders the GitLab child pipeline (one job per customer, ``resource_group`` per customer);
- writes release records back to the customer repository: one YAML file per image on the
  ``ivd-releases`` branch, committed on top of the branch head and pushed without force,
  retried when a concurrent writer got there first.

Release records live on their own branch, not on the branch the config is built from: a
record commit there would change the config revision (the image tag and digest) of the very
image it records, and would trigger the customer's own pipeline again.

Git credentials never enter a URL that is recorded or printed (:mod:`builder.gitauth`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import queue
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import asdict, dataclass, field
from dataclasses import replace as _replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import git
import yaml
from filelock import FileLock
from gitdb.base import IStream  # type: ignore[import-untyped]
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from builder import __version__, yamldoc
from builder.contracts import RepoSource
from builder.documents import FileDigest
from builder.documents.release_record import RECORD_VERSION, RecordModel, ReleaseRecord
from builder.errors import (
    BuilderError,
    ConfigError,
    ReleaseGateError,
    WriteBackError,
    error_dict,
    error_fields,
)
from builder.fsutil import write_atomic
from builder.gitauth import GIT_ENV
from builder.load import _URL, KnownRevision, canonical_repo_url, load_customer, open_source
from builder.oci import RegistryClient, parse_reference
from builder.pipeline import BuildRequest, build
from builder.provenance import variant_tag
from builder.redact import mask_secrets, redact_url
from builder.settings import Settings

FLEET_FILE: Final = "fleet.yaml"
FLEET_VERSION: Final = 1
#: Branch of the customer repository that holds the release records.
RELEASES_BRANCH: Final = "ivd-releases"
#: Folder of the records on that branch: ``releases/<customer>/<base version>-<config rev>.yaml``.
RECORDS_DIR: Final = "releases"
#: Threads for git work per customer or per repository (plan reads, record write-back).
PLAN_THREADS: Final = 8
#: GitLab refuses a generated child pipeline YAML larger than this.
MAX_CHILD_PIPELINE_BYTES: Final = 5 * 1024 * 1024
RECORD_HEADER: Final = (
    "# Release record written by `builder release-record` after a successful release build:\n"
    "# what shipped, from which config commit, models and base image. Append-only; do not edit.\n"
)


# -- the fleet file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetEntry:
    """One customer of the fleet."""

    name: str
    repo: str  # as written in the fleet file, credentials removed
    location: str  # what the load stage opens: a git URL or an absolute folder
    ref: str
    where: str  # "fleet.yaml:LINE", for messages

    @property
    def is_url(self) -> bool:
        return bool(_URL.match(self.location))


@dataclass(frozen=True)
class Fleet:
    path: Path
    entries: tuple[FleetEntry, ...]

    def select(self, names: Sequence[str]) -> Fleet:
        """The named customers only (all when ``names`` is empty); an unknown name is an error."""
        if not names:
            return self
        known = {entry.name: entry for entry in self.entries}
        for name in names:
            if name not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise ConfigError(
                    f"customer {name!r} is not in the fleet file {self.path} (listed: {listed})",
                    hint="add it to the fleet file, or fix the name",
                )
        wanted = set(names)
        return Fleet(self.path, tuple(e for e in self.entries if e.name in wanted))

    def entry(self, name: str) -> FleetEntry:
        return self.select([name]).entries[0]


def default_fleet_path(settings: Settings) -> Path:
    return settings.customers / FLEET_FILE


def load_fleet(path: Path | None, settings: Settings) -> Fleet:
    """Read and validate the fleet file; relative folders are relative to the file."""
    path = (path or default_fleet_path(settings)).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the fleet file: {exc.strerror or exc}",
            hint="pass --fleet FILE (default: fleet.yaml in the customers folder)",
        ) from None
    doc = yamldoc.parse(raw, str(path))
    yamldoc.validate(doc, "fleet")
    entries: list[FleetEntry] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(doc.data["customers"]):
        where = doc.where(("customers", index, "name"))
        name = item["name"]
        if name in seen:
            raise ConfigError(f"{where}: customer {name!r} is listed twice (first at {seen[name]})")
        seen[name] = where
        repo = item["repo"].strip()
        if _URL.match(repo):
            if redact_url(repo) != repo:
                raise ConfigError(
                    f"{doc.where(('customers', index, 'repo'))}: the URL of {name!r} holds "
                    "credentials; remove them",
                    hint="CI supplies them from BUILDER_GIT_TOKEN or CI_JOB_TOKEN",
                )
            location = repo
        else:
            location = str((path.parent / Path(repo).expanduser()).resolve())
        entries.append(
            FleetEntry(
                name=name,
                repo=repo,
                location=location,
                ref=str(item.get("ref", "HEAD")).strip(),
                where=where,
            )
        )
    return Fleet(path=path, entries=tuple(entries))


# -- versions -----------------------------------------------------------------------------------


def parse_release_version(text: str) -> Version:
    """The released base version (exact, not a constraint)."""
    try:
        return Version(text.strip())
    except InvalidVersion:
        raise ConfigError(
            f"base version {text!r} is not a version like 2.5.0",
            hint="give the released base image version, not a constraint",
        ) from None


def admits(constraint: str, version: Version) -> bool:
    """Whether a customer's pinned base (``2.4.1``, ``~=2.4``, ``>=2.4,<3``) admits ``version``,
    by the same rules the build uses to pick a base (pre-releases only when pinned exactly)."""
    spec = constraint.strip()
    if spec[:1].isdigit() or spec.startswith("v"):
        try:
            return Version(spec) == version
        except InvalidVersion:
            raise ConfigError(f"invalid base image version {constraint!r}") from None
    try:
        specifiers = SpecifierSet(spec)
    except InvalidSpecifier:
        raise ConfigError(
            f"invalid base image version constraint {constraint!r}",
            hint="use an exact version such as 2.4.1 or a PEP 440 specifier such as ~=2.4",
        ) from None
    exact = len(specifiers) == 1 and next(iter(specifiers)).operator in ("==", "===")
    return specifiers.contains(version, prereleases=exact)


# -- release records ----------------------------------------------------------------------------


def record_remote(location: str) -> str:
    """Where a customer's release records live: its git URL, or for a folder the ``origin`` of
    the repository it is in (credentials stripped: the helper supplies them), else that
    repository itself (also for a bare repository: it is the server side)."""
    if _URL.match(location):
        return location
    try:
        repo = git.Repo(location, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise ConfigError(
            f"{location}: not inside a git repository", hint="customer configs are read from git"
        ) from None
    if repo.bare:  # a repository on the server side: the records go into it
        return str(Path(repo.git_dir).resolve())
    with contextlib.suppress(AttributeError, ValueError):
        return redact_url(repo.remotes.origin.url)
    return str(Path(repo.working_tree_dir or location).resolve())


def record_path(customer: str, image: str) -> str:
    """``releases/<customer>/<base version>-<config rev>.yaml``: one file per immutable tag."""
    return f"{RECORDS_DIR}/{customer}/{image.rsplit(':', 1)[1]}.yaml"


def _git_message(exc: git.GitCommandError) -> str:
    """The useful part of a failed git command: a rejected ref, the remote's (hook's) last
    words, else the last error line; credentials masked."""

    def clean(value: object) -> list[str]:
        text = re.sub(r"^\s*(stderr|stdout): '", "", str(value or "")).rstrip().removesuffix("'")
        return [line.strip() for line in text.splitlines() if line.strip()]

    lines = clean(exc.stderr) + clean(exc.stdout)
    rejected = [line.split("\t")[-1] for line in lines if line.startswith("!")]
    remote = [line for line in lines if line.startswith("remote:")]
    errors = [line for line in lines if line.startswith(("error:", "fatal:"))]
    chosen = (
        (rejected[-1:] + remote[-1:]) or errors[-1:] or lines[-1:] or [f"git exited {exc.status}"]
    )
    return mask_secrets("; ".join(chosen))


@dataclass(frozen=True)
class WriteResult:
    remote: str  # credential-free
    branch: str
    path: str
    commit: str  # the branch commit holding the record
    status: str  # "written" or "present" (an identical record was already there)
    attempts: int


class ReleaseLog:
    """The release records of one customer repository: files on its ``ivd-releases`` branch,
    read and written through a small bare repository in the cache (no work tree)."""

    def __init__(self, remote: str, cache_dir: Path, branch: str = RELEASES_BRANCH) -> None:
        self.remote = remote
        self.branch = branch
        key = hashlib.sha256(f"{redact_url(remote)}\0{branch}".encode()).hexdigest()[:16]
        self.work = cache_dir / "releases" / key
        self.tracking = f"refs/ivd-records/{branch}"
        self.work.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.work) + ".lock", timeout=600)
        self.repo = git.Repo.init(self.work, bare=True, mkdir=True)

    @property
    def shown(self) -> str:
        return mask_secrets(self.remote)

    def fetch(self) -> str | None:
        """Fetch the branch; its head commit, or None when the branch does not exist yet."""
        try:
            self.repo.git.fetch(
                "--no-tags",
                "--quiet",
                self.remote,
                f"+refs/heads/{self.branch}:{self.tracking}",
                env=GIT_ENV,
            )
        except git.GitCommandError as exc:
            if "couldn't find remote ref" in str(exc.stderr):
                with contextlib.suppress(git.GitCommandError):
                    self.repo.git.update_ref("-d", self.tracking)
                return None
            raise WriteBackError(
                f"cannot fetch release records from {self.shown}: {_git_message(exc)}",
                hint="check the repository URL and the CI token's access",
            ) from None
        return str(self.repo.git.rev_parse(self.tracking))

    def records(self, customer: str, head: str | None) -> list[dict[str, Any]]:
        """The customer's records at ``head``, oldest build first (unreadable files skipped)."""
        return self._read_all(head, f"{RECORDS_DIR}/{customer}/").get(customer, [])

    def latest_records(self, head: str | None) -> dict[str, dict[str, Any]]:
        """Every customer's latest record at ``head`` (one tree listing for all customers)."""
        return {name: found[-1] for name, found in self._read_all(head, "").items() if found}

    def _read_all(self, head: str | None, prefix: str) -> dict[str, list[dict[str, Any]]]:
        """Records under ``releases/<prefix>`` at ``head`` by customer, oldest build first:
        one ``ls-tree`` and the blobs through gitpython's persistent ``cat-file``."""
        if head is None:
            return {}
        listing = self.repo.git.ls_tree("-r", head, "--", prefix or f"{RECORDS_DIR}/")
        out: dict[str, list[dict[str, Any]]] = {}
        for line in listing.splitlines():
            meta, _, path = line.partition("\t")
            parts = path.split("/")
            if len(parts) != 3 or parts[0] != RECORDS_DIR or not path.endswith(".yaml"):
                continue
            with contextlib.suppress(ValueError, yaml.YAMLError):
                raw = self.repo.odb.stream(bytes.fromhex(meta.split()[2])).read()
                data = yaml.safe_load(raw)
                if isinstance(data, dict) and data.get("record_version") == RECORD_VERSION:
                    out.setdefault(parts[1], []).append({**data, "_path": path})
        for found in out.values():
            found.sort(key=lambda r: str(r.get("built_at", "")))
        return out

    def _read(self, head: str | None, path: str) -> dict[str, Any] | None:
        if head is None:
            return None
        try:
            data = yaml.safe_load(self.repo.git.show(f"{head}:{path}"))
        except git.GitCommandError:
            return None
        return data if isinstance(data, dict) else {}

    def _commit(self, head: str | None, files: Mapping[str, bytes], message: str) -> str:
        """A commit on top of ``head`` adding ``files``, built with plumbing (no work tree)."""
        index = self.work / f"index-{os.getpid()}-{threading.get_ident()}"
        env = {**GIT_ENV, "GIT_INDEX_FILE": str(index), **_identity()}
        try:
            if head is None:
                self.repo.git.read_tree("--empty", env=env)
            else:
                self.repo.git.read_tree(head, env=env)
            lines = []
            for path, content in sorted(files.items()):
                stream = IStream("blob", len(content), io.BytesIO(content))
                lines.append(f"100644 {self.repo.odb.store(stream).binsha.hex()}\t{path}\n")
            self._update_index(lines, env)
            tree = self.repo.git.write_tree(env=env)
            parents = ["-p", head] if head else []
            return str(self.repo.git.commit_tree(tree, *parents, "-m", message, env=env))
        finally:
            index.unlink(missing_ok=True)

    def _update_index(self, lines: Sequence[str], env: Mapping[str, str]) -> None:
        """``git update-index --index-info``: every file of the batch in one process."""
        subprocess.run(
            ["git", "--git-dir", str(self.repo.git_dir), "update-index", "--add", "--index-info"],
            input="".join(lines).encode(),
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            timeout=120,
        )

    def write(
        self,
        record: ReleaseRecord,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        before_push: Callable[[int], None] | None = None,
    ) -> WriteResult:
        """Commit one record on top of the branch head and push it (never forced); see
        :meth:`write_many`."""
        (result,) = self.write_many(
            [record], attempts=attempts, backoff=backoff, before_push=before_push
        )
        if isinstance(result, BuilderError):
            raise result
        return result

    def write_many(
        self,
        records: Sequence[ReleaseRecord],
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        before_push: Callable[[int], None] | None = None,
    ) -> list[WriteResult | BuilderError]:
        """Commit every record in one commit on top of the branch head and push it (never
        forced). A rejected push (a concurrent writer, a hook) is retried on top of the new
        head, ``attempts`` times in all. Per record: an identical record already there is
        "present"; a different one is refused (that record only)."""
        paths = [record_path(r.customer, r.image) for r in records]
        last = ""
        with self._lock:
            for attempt in range(1, max(1, attempts) + 1):
                head = self.fetch()
                results: list[WriteResult | BuilderError | None] = []
                new: dict[str, bytes] = {}
                for record, path in zip(records, paths, strict=True):
                    existing = self._read(head, path)
                    if existing is None:
                        results.append(None)
                        new[path] = render_record(record)
                        continue
                    try:
                        results.append(self._already(existing, record, path, head or "", attempt))
                    except BuilderError as exc:
                        results.append(exc)
                if not new:
                    return [r for r in results if r is not None]
                commit = self._commit(head, new, _batch_message(records, new))
                if before_push is not None:
                    before_push(attempt)
                try:
                    self.repo.git.push(
                        "--porcelain",
                        self.remote,
                        f"{commit}:refs/heads/{self.branch}",
                        env=GIT_ENV,
                    )
                except git.GitCommandError as exc:
                    last = _git_message(exc)
                    if attempt < attempts:
                        time.sleep(
                            min(backoff * 2 ** (attempt - 1), 8.0) + random.uniform(0, backoff)
                        )
                    continue
                written = WriteResult(self.shown, self.branch, "", commit, "written", attempt)
                return [
                    r if r is not None else _replace(written, path=path)
                    for r, path in zip(results, paths, strict=True)
                ]
        failure = WriteBackError(
            f"release record {', '.join(paths)} not written to {self.shown} branch "
            f"{self.branch} after {attempts} attempts: push rejected: {last}",
            hint="the image is pushed; write the record later with "
            "`builder release-record --report FILE` (never force-push the branch)",
        )
        return [failure for _ in records]

    def _already(
        self,
        existing: Mapping[str, Any],
        record: ReleaseRecord,
        path: str,
        head: str,
        attempt: int,
    ) -> WriteResult:
        digest = existing.get("manifest_digest")
        if digest != record.manifest_digest:
            raise WriteBackError(
                f"{self.shown} branch {self.branch}: {path} already records {digest} for "
                f"{record.image}, this build is {record.manifest_digest}; "
                "refusing to overwrite a release record",
                hint="records are append-only; find out why the immutable tag moved",
            )
        return WriteResult(self.shown, self.branch, path, head, "present", attempt)


def _batch_message(records: Sequence[ReleaseRecord], new: Mapping[str, bytes]) -> str:
    """The commit message: one record in detail, or a batch with one line per record."""
    fresh = [r for r in records if record_path(r.customer, r.image) in new]
    if len(fresh) == 1:
        record = fresh[0]
        message = (
            f"release: {record.customer} {record.image.rsplit(':', 1)[1]} "
            f"{record.manifest_digest}\n\nbase {record.base_version} "
            f"{record.base_digest}\nconfig {record.config_commit}\n"
        )
    else:
        versions = sorted({r.base_version for r in fresh})
        message = f"release: {len(fresh)} images on base {', '.join(versions)}\n\n" + "".join(
            f"{r.customer} {r.image.rsplit(':', 1)[1]} {r.manifest_digest} "
            f"config {r.config_commit}\n"
            for r in fresh
        )
    ci = next((r.ci_url for r in fresh if r.ci_url), None)
    return message + (f"CI job: {ci}\n" if ci else "")


def _identity() -> dict[str, str]:
    """The committer of release records: the standard GIT_* variables, else the builder bot."""
    name = os.environ.get("GIT_AUTHOR_NAME") or "ivd-image-builder"
    email = os.environ.get("GIT_AUTHOR_EMAIL") or "ivd-image-builder@localhost"
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME") or name,
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL") or email,
    }


def render_record(record: ReleaseRecord) -> bytes:
    """The record file: a header comment, then the keys in a fixed, readable order."""
    body = yaml.safe_dump(record.to_dict(), sort_keys=False, default_flow_style=False, width=100)
    return (RECORD_HEADER + body).encode("utf-8")


def _ci_context(env: Mapping[str, str]) -> dict[str, str]:
    names = {"ci_url": "CI_JOB_URL", "ci_pipeline_url": "CI_PIPELINE_URL"}
    return {key: mask_secrets(env[var], env) for key, var in names.items() if env.get(var)}


def release_record(
    report: Mapping[str, Any],
    *,
    config_source: str,
    built_at: datetime | None = None,
    env: Mapping[str, str] | None = None,
) -> ReleaseRecord:
    """The release record of one build report (``builder build --json`` result).

    Only stable release builds are recorded: pushed to a registry, not a development build,
    on a final (not pre-release) base version. ``config_source`` is the canonical source URL
    (``<repo>#<folder>`` for a folder inside a repository), as in the image labels.
    """
    env = os.environ if env is None else env
    missing = [
        k
        for k in ("customer", "image", "manifest_digest", "config_commit", "base", "models")
        if not report.get(k) and k != "models"
    ]
    if missing:
        raise WriteBackError(
            f"build report lacks {', '.join(missing)}; is it a `build --json` report?"
        )
    customer = report["customer"]
    if report.get("development"):
        raise ReleaseGateError(
            f"{customer}: a development build (unpublished models) gets no release record",
            hint="release builds only",
        )
    if not (report.get("outputs") or {}).get("registry"):
        raise WriteBackError(
            f"{customer}: {report['image']} was not pushed; a release record needs a pushed image",
            hint="build with --push",
        )
    base = report["base"]
    if Version(str(base["version"])).is_prerelease:
        raise ReleaseGateError(
            f"{customer}: base {base['version']} is a pre-release; only stable builds are recorded"
        )
    repository, _, folder = config_source.partition("#")
    ci = _ci_context(env)
    return ReleaseRecord(
        customer=customer,
        config_repository=repository,
        config_path=folder or ".",
        config_commit=report["config_commit"],
        image=report["image"],
        manifest_digest=report["manifest_digest"],
        tags=tuple(report.get("tags") or [report["image"]]),
        base_repository=base["repository"],
        base_version=base["version"],
        base_digest=base["digest"],
        models=tuple(
            RecordModel(
                name=m.get("name"),
                sourcing=m.get("sourcing"),
                registry_id=m.get("registry_id"),
                task_id=m.get("task_id"),
                dir_hash=m.get("dir_hash"),
                files=tuple(
                    FileDigest(name=f.get("name"), sha256=f.get("sha256"), size=f.get("size"))
                    for f in m.get("files") or []
                ),
            )
            for m in report.get("models") or []
        ),
        built_at=(built_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        builder_version=__version__,
        ci_url=ci.get("ci_url"),
        ci_pipeline_url=ci.get("ci_pipeline_url"),
    )


def config_source(location: str, settings: Settings) -> str:
    """The canonical, credential-free source URL of a customer location (as in the labels)."""
    if _URL.match(location):
        return canonical_repo_url(location)
    return open_source(location, settings).url


def write_release_record(
    report: Mapping[str, Any],
    location: str,
    settings: Settings,
    *,
    branch: str = RELEASES_BRANCH,
    attempts: int = 5,
    backoff: float = 1.0,
    before_push: Callable[[int], None] | None = None,
    dry_run: bool = False,
) -> WriteResult:
    """Record one pushed release build in the customer repository at ``location``.

    Refused (WriteBackError) when that repository lacks the config commit the image was built
    from; ``dry_run`` checks everything and writes nothing (status "would write"/"present").
    """
    record = release_record(report, config_source=config_source(location, settings))
    log = ReleaseLog(record_remote(location), settings.cache_dir, branch)
    commit = record.config_commit
    if not remote_has_commit(log, commit):
        raise WriteBackError(
            f"{log.shown} does not have config commit {commit[:12]} that "
            f"{record.image} was built from; refusing to record it there",
            hint="push the customer branch first, or name the right repository with --repo",
        )
    if dry_run:
        head = log.fetch()
        path = record_path(record.customer, record.image)
        status = "would write" if log._read(head, path) is None else "present"
        return WriteResult(log.shown, branch, path, head or "", status, 0)
    return log.write(record, attempts=attempts, backoff=backoff, before_push=before_push)


def remote_has_commit(log: ReleaseLog, commit: str) -> bool:
    """Whether ``commit`` is reachable from a branch or tag of the log's remote repository."""
    try:
        log.repo.git.fetch(
            "--no-tags",
            "--quiet",
            log.remote,
            "+refs/heads/*:refs/ivd-remote/heads/*",
            "+refs/tags/*:refs/ivd-remote/tags/*",
            env=GIT_ENV,
        )
    except git.GitCommandError as exc:
        raise WriteBackError(
            f"cannot fetch {log.shown}: {_git_message(exc)}",
            hint="check the repository URL and the CI token's access",
        ) from None
    try:
        found = log.repo.git.for_each_ref("--contains", commit, "--count=1", "refs/ivd-remote/")
    except git.GitCommandError:  # an object the remote never had
        return False
    return bool(found.strip())


def write_release_records(
    reports: Sequence[Mapping[str, Any]],
    locations: Mapping[str, str],
    settings: Settings,
    *,
    branch: str = RELEASES_BRANCH,
    attempts: int = 5,
    backoff: float = 1.0,
) -> dict[str, WriteResult | BuilderError]:
    """Record many pushed release builds: one commit (and one push) per customer repository
    for all its records, not one per record. ``locations`` maps each report's customer to its
    repository location. The result per customer is what was written, or why not."""
    out: dict[str, WriteResult | BuilderError] = {}
    by_remote: dict[str, list[ReleaseRecord]] = {}
    sources: dict[str, str] = {}
    for report in reports:
        customer = str(report.get("customer"))
        try:
            location = locations[customer]
            if location not in sources:
                sources[location] = config_source(location, settings)
            record = release_record(report, config_source=sources[location])
            by_remote.setdefault(record_remote(location), []).append(record)
        except BuilderError as exc:
            out[customer] = exc

    def write(remote: str, records: list[ReleaseRecord]) -> list[WriteResult | BuilderError]:
        try:
            log = ReleaseLog(remote, settings.cache_dir, branch)
            for record in records:  # never record an image whose commit the target lacks
                commit = record.config_commit
                if not remote_has_commit(log, commit):
                    raise WriteBackError(
                        f"{log.shown} does not have config commit {commit[:12]} that "
                        f"{record.image} was built from; refusing to record it there",
                        hint="push the customer branch first, or name the right repository "
                        "with --repo",
                    )
            return log.write_many(records, attempts=attempts, backoff=backoff)
        except BuilderError as exc:
            return [exc for _ in records]

    with ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:  # repositories in parallel
        done = pool.map(write, by_remote, by_remote.values())
        for records, results in zip(by_remote.values(), done, strict=True):
            for record, result in zip(records, results, strict=True):
                out[record.customer] = result
    return out


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


# -- GitLab child pipeline ----------------------------------------------------------------------


def _job_name(customer: str) -> str:
    return f"build:{customer}"


def render_child_pipeline(
    fleet_plan: FleetPlan,
    *,
    fleet_file: str,
    image: str | None = None,
    push: bool = True,
    record: bool = True,
) -> str:
    """The child pipeline YAML: one job per customer to rebuild (customers whose config could
    not be read get one too, so their failure shows in CI while the others proceed).

    Jobs are generated rather than one ``parallel:matrix`` (capped at 200 permutations); each
    job has ``resource_group: ivd-build-<name>`` so two pipelines never build one customer at
    the same time, and keeps its build report as an artifact.
    """
    version = fleet_plan.base_version
    doc: dict[str, Any] = {
        "stages": ["build"],
        "variables": {"BASE_VERSION": version, "FLEET_FILE": fleet_file},
    }
    default: dict[str, Any] = {"before_script": [". ci/builder-env.sh"]}
    if image:
        default["image"] = image
    doc["default"] = default
    flags = (" --push" if push else "") + (" --record" if record else "")
    targets = [item for item in fleet_plan.items if item.status in ("rebuild", "error")]
    for item in targets:
        doc[_job_name(item.customer)] = {
            "stage": "build",
            "resource_group": f"ivd-build-{item.customer}",
            "variables": {"CUSTOMER": item.customer},
            "script": [
                "mkdir -p reports",
                'builder build-all --fleet "$FLEET_FILE" --base-version "$BASE_VERSION" '
                f'--only "$CUSTOMER"{flags} --report "reports/$CUSTOMER.json"',
            ],
            "artifacts": {
                "when": "always",
                "paths": ["reports/"],
                "expire_in": "never",
            },
        }
    if not targets:
        doc["nothing to rebuild"] = {
            "stage": "build",
            "before_script": [],
            "script": [f'echo "no customer of {fleet_file} admits base {version}"'],
        }
    header = (
        f"# Generated by `builder plan --base-version {version} --gitlab-child` from {fleet_file}.\n"
        "# One job per customer; do not edit.\n"
    )
    text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
    if len(text.encode()) > MAX_CHILD_PIPELINE_BYTES:
        raise ConfigError(
            f"the child pipeline for {len(targets)} customers is {len(text.encode()):,} bytes, "
            f"over GitLab's {MAX_CHILD_PIPELINE_BYTES:,}",
            hint="split the fleet file into several fleets, one child pipeline each",
        )
    return text


# -- build all ----------------------------------------------------------------------------------


@dataclass
class CustomerResult:
    customer: str
    # "built"; "unchanged" (its image is already there: nothing to build); "skipped" (the
    # constraint does not admit the version); "failed"
    status: str
    summary: str = ""
    report: dict[str, Any] | None = None  # the build report (`builder build --json` result)
    record: dict[str, Any] | None = None  # the release record written, with --record
    error: dict[str, Any] | None = None
    variant: str = "cpu"  # the base image variant of this build
    seconds: float = 0.0


@dataclass
class FleetReport:
    base_version: str
    fleet: str
    results: list[CustomerResult]
    plan_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> list[CustomerResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        out = {"built": 0, "unchanged": 0, "skipped": 0, "failed": 0}
        for result in self.results:
            out[result.status] = out.get(result.status, 0) + 1
        return out


@dataclass(frozen=True)
class FleetProgress:
    """Where a fleet run stands after one more customer finished (the CLI renders it)."""

    result: CustomerResult  # the customer that just finished
    done: int  # customers finished, of ``total``
    total: int
    counts: Mapping[str, int]  # by status, so far
    builds_done: int  # builds finished (the rate counts these), of ``builds``
    builds: int
    elapsed: float  # seconds since the builds started

    @property
    def rate(self) -> float:
        """Builds per minute so far (0 before the first)."""
        return 60.0 * self.builds_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until the last build ends at the rate so far (None before the first)."""
        if self.builds_done == self.builds:
            return 0.0
        if not self.builds_done:
            return None
        return (self.builds - self.builds_done) * self.elapsed / self.builds_done


@dataclass(frozen=True)
class _Job:
    customer: str
    location: str
    ref: str
    base_version: str
    settings: Settings
    push: bool
    image_registry: str | None
    base_repository: str | None
    insecure: bool | None
    variant: str = "cpu"
    primary: bool = True  # the customer's first variant

    @property
    def key(self) -> str:
        """The customer, with the variant appended for every variant but its first."""
        return self.customer if self.primary else f"{self.customer} ({self.variant})"


_events: Any = None  # the worker processes' event queue (set by _init_worker)


def _init_worker(events: Any) -> None:
    global _events  # noqa: PLW0603 - one queue per worker process, set once at start
    _events = events


def _build_one(job: _Job) -> dict[str, Any]:
    """Build one customer in a worker process; never raises (the result says what failed)."""

    def on_stage(name: str) -> None:
        if _events is not None:
            _events.put((job.key, name))

    request = BuildRequest(
        customer=job.location,
        ref=job.ref,
        base_version=job.base_version,
        base_repository=job.base_repository,
        variant=job.variant,
        image_registry=job.image_registry,
        push=job.push,
        insecure=job.insecure,
    )
    started = time.perf_counter()
    try:
        report = build(request, job.settings, on_stage=on_stage)
    except BuilderError as exc:
        return {"status": "failed", "error": error_dict(exc), "seconds": _since(started)}
    except Exception as exc:  # one customer's crash must not stop the fleet
        message = f"unexpected {type(exc).__name__}: {exc}"
        return {
            "status": "failed",
            "error": error_fields(type(exc).__name__, message, None, 1),
            "seconds": _since(started),
        }
    return {"status": "built", "report": report.to_dict(), "seconds": _since(started)}


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _run_jobs(
    jobs: list[_Job],
    workers: int,
    on_event: Callable[[str, str], None] | None,
    on_done: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run the builds in ``workers`` spawned processes (isolated: the ClearML SDK keeps
    process-wide state, and each build has its own main thread for its deadlines);
    ``on_done`` gets each customer's outcome as soon as it is known."""
    if not jobs:
        return
    context = multiprocessing.get_context("spawn")
    events = context.Queue()

    def drain() -> None:
        while True:
            try:
                customer, stage = events.get_nowait()
            except queue.Empty:
                return
            if on_event:
                on_event(customer, stage)

    with ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(jobs))),
        mp_context=context,
        initializer=_init_worker,
        initargs=(events,),
    ) as pool:
        pending: dict[Future[dict[str, Any]], str] = {
            pool.submit(_build_one, job): job.key for job in jobs
        }
        while pending:
            done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                customer = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as exc:  # a worker that died (OOM, signal)
                    outcome = {
                        "status": "failed",
                        "error": {
                            "type": type(exc).__name__,
                            "message": f"build worker died: {exc}",
                            "hint": None,
                            "exit_code": 1,
                        },
                    }
                on_done(customer, outcome)
    drain()
    events.close()


def _in_registry(
    items: Sequence[PlanItem], registry: str, insecure: bool | None
) -> dict[str, str | None]:
    """The digest each item's immutable tag points to in ``registry`` (None: not there, or
    the registry could not tell): one manifest HEAD per customer, one client per host."""
    clients: dict[str, RegistryClient | None] = {}
    out: dict[str, str | None] = {}
    for item in items:
        out[item.customer] = None
        ref = parse_reference(_image(item, registry))
        try:
            if ref.registry not in clients:
                clients[ref.registry] = RegistryClient(ref.registry, insecure=insecure)
            client = clients[ref.registry]
            if client is not None and ref.tag:
                out[item.customer] = client.manifest_digest(ref.path, ref.tag)
        except BuilderError:
            clients.setdefault(ref.registry, None)  # the build will say what is wrong
    return out


def _image(item: PlanItem, registry: str) -> str:
    """The item's immutable tag in ``registry``."""
    return f"{registry}/{item.customer}:{(item.image or '').rsplit(':', 1)[-1]}"


def _unchanged(
    items: Sequence[PlanItem],
    *,
    push: bool,
    record: bool,
    registry: str,
    insecure: bool | None,
) -> dict[str, str]:
    """Customers with nothing to build, and why: the immutable tag ``<version>-<config
    rev>`` is already in the registry (rebuilding gives the same digest or is refused), and,
    with ``record``, its release record is written. Without ``push``: what the release
    records say is already released."""
    if not push:
        return {
            i.customer: f"already released: {(i.previous or {}).get('image')}"
            for i in items
            if i.status == "released"
        }
    present = _in_registry(items, registry, insecure)
    out: dict[str, str] = {}
    for item in items:
        digest = present[item.customer]
        if digest is None or (record and item.status != "released"):
            continue  # not there, or there without its release record: build (and record)
        out[item.customer] = f"already in the registry: {_image(item, registry)}@{digest}"
    return out


def build_all(
    fleet: Fleet,
    settings: Settings,
    base_version: str,
    *,
    jobs: int = 2,
    push: bool = False,
    record: bool = False,
    force: bool = False,
    image_registry: str | None = None,
    base_repository: str | None = None,
    insecure: bool | None = None,
    branch: str = RELEASES_BRANCH,
    record_attempts: int = 5,
    on_event: Callable[[str, str], None] | None = None,
    on_planned: Callable[[FleetPlan], None] | None = None,
    on_progress: Callable[[FleetProgress], None] | None = None,
) -> FleetReport:
    """Build what changed for every customer whose constraint admits ``base_version``,
    ``jobs`` at a time.

    Incremental: a customer whose immutable tag is already in the registry (with its
    release record, under ``record``) is "unchanged" at the cost of one manifest HEAD;
    ``force`` rebuilds every admitted customer. A customer that fails (unreadable
    repository, invalid config, registry error) is reported and the others go on. With
    ``record`` (implies a pushed, stable build) the release records of the successful builds
    are written back, one commit per customer repository for the whole run.
    ``on_event`` gets build stages, ``on_planned`` the plan, ``on_progress`` each finished
    customer with the counts, rate and ETA.
    """
    if record and not push:
        raise ConfigError("--record needs --push: only pushed images get a release record")
    started = time.perf_counter()
    fleet_plan = plan(fleet, settings, base_version, branch=branch)
    if on_planned:
        on_planned(fleet_plan)
    registry = image_registry or settings.image_registry
    candidates = [i for i in fleet_plan.items if i.status in ("rebuild", "released")]
    unchanged = (
        {}
        if force
        else _unchanged(candidates, push=push, record=record, registry=registry, insecure=insecure)
    )
    entries = {e.name: e for e in fleet.entries}
    keys = {e.name: [e.name] for e in fleet.entries}  # one result per variant built
    to_build = [
        _Job(
            customer=item.customer,
            location=entries[item.customer].location,
            ref=item.commit or entries[item.customer].ref,  # what plan saw, even if it moves
            base_version=fleet_plan.base_version,
            settings=settings,
            push=push,
            image_registry=image_registry,
            base_repository=base_repository,
            insecure=insecure,
            variant=variant,
            primary=n == 0,
        )
        for item in candidates
        if item.customer not in unchanged
        for n, variant in enumerate(item.variants)
    ]
    jobs_by_key = {job.key: job for job in to_build}
    for job in to_build:
        keys[job.customer] = [j.key for j in to_build if j.customer == job.customer]
    results: dict[str, CustomerResult] = {}
    counts = dict.fromkeys(("built", "unchanged", "skipped", "failed"), 0)
    builds_started = time.perf_counter()
    builds_done = 0

    def finish(result: CustomerResult, *, key: str | None = None, built: bool = False) -> None:
        nonlocal builds_done
        results[key or result.customer] = result
        counts[result.status] = counts.get(result.status, 0) + 1
        builds_done += built
        if on_progress:
            on_progress(
                FleetProgress(
                    result,
                    len(results),
                    len(fleet_plan.items),
                    dict(counts),
                    builds_done,
                    len(to_build),
                    time.perf_counter() - builds_started,
                )
            )

    for item in fleet_plan.items:
        if item.status == "error":
            finish(CustomerResult(item.customer, "failed", item.summary, error=item.error))
        elif item.status == "skip":
            finish(CustomerResult(item.customer, "skipped", item.summary))
        elif item.customer in unchanged:
            finish(CustomerResult(item.customer, "unchanged", unchanged[item.customer]))

    def on_done(key: str, outcome: dict[str, Any]) -> None:
        job = jobs_by_key[key]
        seconds = float(outcome.get("seconds") or 0.0)
        if outcome["status"] != "built":
            error = outcome["error"]
            result = CustomerResult(
                job.customer, "failed", error["message"], error=error, variant=job.variant
            )
        else:
            report = outcome["report"]
            summary = f"{report['image']}@{report['manifest_digest']}"
            result = CustomerResult(
                job.customer, "built", summary, report=report, variant=job.variant
            )
        result.seconds = seconds
        finish(result, key=key, built=True)

    _run_jobs(to_build, jobs, on_event, on_done)
    if record:
        _record_all(results, entries, settings, branch, record_attempts, on_event)
    ordered = [results[key] for e in fleet.entries for key in keys[e.name]]
    return FleetReport(
        base_version=fleet_plan.base_version,
        fleet=str(fleet.path),
        results=ordered,
        plan_seconds=fleet_plan.seconds,
        seconds=_since(started),
    )


def _record_all(
    results: Mapping[str, CustomerResult],
    entries: Mapping[str, FleetEntry],
    settings: Settings,
    branch: str,
    attempts: int,
    on_event: Callable[[str, str], None] | None,
) -> None:
    """Write the release records of the run's builds: one commit per repository."""
    built = [r for r in results.values() if r.status == "built" and r.report]
    written: dict[tuple[str, str], WriteResult | BuilderError] = {}
    for variant in sorted({r.variant for r in built}):  # per variant: one record per customer
        group = [r for r in built if r.variant == variant]
        outcomes = write_release_records(
            [r.report for r in group if r.report],
            {r.customer: entries[r.customer].location for r in group},
            settings,
            branch=branch,
            attempts=attempts,
        )
        written.update({(customer, variant): o for customer, o in outcomes.items()})
    for result in built:
        outcome = written.get((result.customer, result.variant))
        if isinstance(outcome, WriteResult):
            result.record = asdict(outcome)
            if on_event:
                on_event(result.customer, f"recorded {outcome.path} ({outcome.status})")
        elif isinstance(outcome, BuilderError):
            result.status, result.error = "failed", error_dict(outcome)
            result.summary = f"built and pushed, but not recorded: {result.error['message']}"
