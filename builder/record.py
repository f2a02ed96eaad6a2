"""Record stage: release records, one YAML file per released image on the ``ivd-releases``
branch of the customer repository, committed on top of the branch head and pushed without
force, retried when a concurrent writer got there first.

Records live on their own branch, not on the branch the config is built from: a record
commit there would change the config revision (the image tag and digest) of the very image
it records, and would trigger the customer's own pipeline again. Git credentials never enter
a URL that is recorded or printed (:mod:`builder.gitauth`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import (
    ThreadPoolExecutor,
)
from dataclasses import dataclass
from dataclasses import replace as _replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import git
import yaml
from gitdb.base import IStream  # type: ignore[import-untyped]
from packaging.version import Version

from builder import __version__
from builder.cook.load import canonical_repo_url, is_repo_url, open_source
from builder.documents import check_document
from builder.documents.build_report import BuildReport
from builder.documents.release_record import RECORD_VERSION, ReleaseRecord
from builder.documents.release_record import SCHEMA as RECORD_SCHEMA
from builder.errors import (
    BuilderError,
    ConfigError,
    ReleaseGateError,
    WriteBackError,
)
from builder.fsutil import cache_lock, write_atomic
from builder.gitauth import GIT_ENV
from builder.imagename import ImageKey, ImageName
from builder.redact import mask_secrets, strip_credentials
from builder.settings import Settings

#: Branch of the customer repository that holds the release records.
RELEASES_BRANCH: Final = "ivd-releases"
#: Folder of the records on that branch: ``releases/<customer>/<base version>-<config rev>.yaml``.
RECORDS_DIR: Final = "releases"
RECORD_HEADER: Final = (
    "# Release record written by `builder release-record` after a successful release build:\n"
    "# what shipped, from which config commit, models and base image. Append-only; do not edit.\n"
)

#: Threads for git work per customer or per repository (plan reads, record write-back).
PLAN_THREADS: Final = 8
#: Layout of the latest-record index kept next to each release log (bump on any change;
#: 3: records of one second ordered by when the branch added them, not by file name).
_INDEX_VERSION: Final = 3
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- release records ----------------------------------------------------------------------------


def record_remote(location: str) -> str:
    """Where a customer's release records live: its git URL, or for a folder the ``origin`` of
    the repository it is in (credentials stripped: the helper supplies them), else that
    repository itself (also for a bare repository: it is the server side)."""
    if is_repo_url(location):
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
        return strip_credentials(repo.remotes.origin.url)
    return str(Path(repo.working_tree_dir or location).resolve())


def record_path(name: ImageName) -> str:
    """``releases/<customer>/<immutable tag>.yaml``: one file per immutable tag."""
    return f"{RECORDS_DIR}/{name.customer}/{name.tag}.yaml"


def _record_folder(path: str) -> str | None:
    """The customer folder of a record file ``releases/<customer>/<tag>.yaml`` (else None)."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != RECORDS_DIR or not parts[2].endswith(".yaml"):
        return None
    return parts[1]


def record_image(record: ReleaseRecord, customer: str) -> ImageKey | None:
    """The image a record of ``customer``'s folder is of: that customer on the variant its
    image name says; None when the image is not an immutable name on the record's base."""
    try:
        name = record.name
    except ConfigError:
        return None
    return ImageKey(customer, name.variant) if name.immutable else None


def _build_order(record: ReleaseRecord, added: Mapping[str, int]) -> tuple[str, int, str]:
    """Records sort by build time; build times have whole seconds, so on a tie the record
    the branch added later is the later one (``added``: path -> place in the order the
    branch added them), then the path (a file whose addition history cannot tell)."""
    return record.built_at, added.get(record.path, -1), record.path


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
    """Where one release record went: remote, branch, path, the commit holding it, and
    whether it was written or already there."""

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
        key = hashlib.sha256(f"{strip_credentials(remote)}\0{branch}".encode()).hexdigest()[:16]
        self.work = cache_dir / "releases" / key
        self.tracking = f"refs/ivd-records/{branch}"
        self.work.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = Path(f"{self.work}.lock")
        with self._locked():  # parallel CI jobs of one repository share this cache folder
            self.repo = git.Repo.init(self.work, bare=True, mkdir=True)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """This log's cache folder, held by one process (parallel CI jobs share the cache)."""
        return cache_lock(self._lock_path, 600, WriteBackError)

    @property
    def shown(self) -> str:
        """The remote fit to print (secrets masked)."""
        return mask_secrets(self.remote)

    @property
    def where(self) -> str:
        """``<remote> branch <branch>``: where the records are, as messages name it."""
        return f"{self.shown} branch {self.branch}"

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

    def records(self, customer: str, head: str | None) -> list[ReleaseRecord]:
        """The customer's records at ``head``, oldest build first (files that are no YAML
        record of this version skipped); a malformed record is a ConfigError naming it."""
        if head is None:
            return []
        prefix = f"{RECORDS_DIR}/{customer}/"
        found = [
            record
            for blob, path in self._listing(head, prefix)
            if (record := self._parse(blob, path)) is not None
        ]
        added = self._added_order(head, prefix)
        return sorted(found, key=lambda r: _build_order(r, added))

    def latest_by_image(self, head: str | None) -> dict[ImageKey, ReleaseRecord]:
        """Each image's latest record at ``head`` (latest ``built_at``; on a tie the one the
        branch added last, see :func:`_build_order`).

        Kept in an index next to the log: the next call reads only the record files added
        since the indexed head (records are append-only). Anything else (a record changed or
        removed, the branch rewritten, an unreadable index) reads the whole branch again, so
        the answer is always the one a full read gives.
        """
        if head is None:
            return {}
        kept = self._read_index()
        latest = None
        if kept is not None and kept[0] == head:
            latest = kept[1]
        elif kept is not None:
            latest = self._added_since(kept[0], head, kept[1])
        if latest is None:
            prefix = f"{RECORDS_DIR}/"
            latest = self._fold({}, self._listing(head, prefix), self._added_order(head, prefix))
        self._write_index(head, latest)
        return latest

    def _listing(self, head: str, prefix: str) -> list[tuple[str, str]]:
        """(blob id, path) of every record file under ``prefix`` at ``head`` (one ls-tree)."""
        out = []
        for line in self.repo.git.ls_tree("-r", head, "--", prefix).splitlines():
            meta, _, path = line.partition("\t")
            if _record_folder(path) is not None:
                out.append((meta.split()[2], path))
        return out

    def _parse(self, blob: str, path: str) -> ReleaseRecord | None:
        """One record file through gitpython's persistent ``cat-file`` (None: not a record
        of this version; ConfigError: a malformed one)."""
        try:
            raw = self.repo.odb.stream(bytes.fromhex(blob)).read()
            data = yaml.load(raw, Loader=_YAML_LOADER)  # a safe loader (libyaml's when present)
        except (ValueError, yaml.YAMLError):
            return None
        if not isinstance(data, dict) or data.get("record_version") != RECORD_VERSION:
            return None
        return _replace(ReleaseRecord.from_dict(data, f"{self.where}: {path}"), path=path)

    def _added_order(self, revisions: str, prefix: str) -> dict[str, int]:
        """Each record file under ``prefix`` by its place in the order ``revisions`` added
        them (one ``git log``; a file added again counts where it was added last)."""
        listing = self.repo.git.log(
            "--reverse",
            "--diff-filter=A",
            "--no-renames",
            "--name-only",
            "--format=",
            revisions,
            "--",
            prefix,
            env=GIT_ENV,
        )
        paths = (line for line in listing.splitlines() if line.strip())
        return {path: place for place, path in enumerate(paths)}

    def _fold(
        self,
        latest: dict[ImageKey, ReleaseRecord],
        files: Sequence[tuple[str, str]],
        added: Mapping[str, int],
    ) -> dict[ImageKey, ReleaseRecord]:
        """``latest`` with the record files ``files`` taken in (malformed ones left out);
        ``added`` orders records of the same second (see :func:`_build_order`): files not in
        it, as those of ``latest``, were added before all that are."""
        out = dict(latest)
        for blob, path in files:
            customer = _record_folder(path)
            try:
                record = self._parse(blob, path)
            except ConfigError:
                continue
            key = record_image(record, customer) if record and customer else None
            if record is None or key is None:
                continue
            if key not in out or _build_order(record, added) > _build_order(out[key], added):
                out[key] = record
        return out

    def _added_since(
        self, old: str, head: str, latest: dict[ImageKey, ReleaseRecord]
    ) -> dict[ImageKey, ReleaseRecord] | None:
        """``latest`` (the index at ``old``) moved to ``head`` by reading only the record files
        added since; None when history is not a pure append of files since ``old``."""
        try:
            self.repo.git.merge_base("--is-ancestor", old, head, env=GIT_ENV)
            raw = self.repo.git.diff_tree(
                "-r", "--raw", "--no-renames", "--no-abbrev", old, head, "--", f"{RECORDS_DIR}/"
            )
        except git.GitCommandError:
            return None
        added = []
        for line in raw.splitlines():
            meta, _, path = line.partition("\t")
            fields = meta.split()
            if len(fields) != 5 or fields[4] != "A":
                return None  # a record changed or removed: read them all again
            added.append((fields[3], path))
        return self._fold(latest, added, self._added_order(f"{old}..{head}", f"{RECORDS_DIR}/"))

    @property
    def _index_path(self) -> Path:
        return self.work / "ivd-latest-records.json"

    def _read_index(self) -> tuple[str, dict[ImageKey, ReleaseRecord]] | None:
        """The kept index: (its head, image -> latest record); None when absent or not
        readable as written by :meth:`_write_index` (its records were checked when read from
        the branch: they are not checked again)."""
        try:
            data = json.loads(self._index_path.read_text("utf-8"))
            if data["version"] != _INDEX_VERSION or data["branch"] != self.branch:
                return None
            head = str(data["head"])
            latest = {
                ImageKey(str(c), str(v)): ReleaseRecord.from_checked(r, str(p))
                for c, v, p, r in data["latest"]
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return (head, latest) if re.fullmatch(r"[0-9a-f]{40,64}", head) else None

    def _write_index(self, head: str, latest: Mapping[ImageKey, ReleaseRecord]) -> None:
        """Keep ``latest`` at ``head`` for the next read (a cache: failures are ignored)."""
        rows = [[k.customer, k.variant, r.path, r.to_dict()] for k, r in sorted(latest.items())]
        data = {"version": _INDEX_VERSION, "branch": self.branch, "head": head, "latest": rows}
        with contextlib.suppress(OSError, BuilderError):  # a cache: the next read rebuilds it
            write_atomic(self._index_path, json.dumps(data, sort_keys=True).encode(), durable=False)

    def _read(self, head: str | None, path: str) -> ReleaseRecord | None:
        """The record at ``path`` on ``head`` (None: no file there); one that is not a
        readable record is a WriteBackError (nothing is written over it)."""
        if head is None:
            return None
        try:
            raw = self.repo.git.show(f"{head}:{path}")
        except git.GitCommandError:
            return None
        try:
            data = yaml.safe_load(raw)
            if isinstance(data, dict):
                return ReleaseRecord.from_dict(data, f"{self.where}: {path}")
            why = f"{self.where}: {path} is not a release record"
        except yaml.YAMLError:
            why = f"{self.where}: {path} is not YAML"
        except ConfigError as exc:
            why = exc.message
        raise WriteBackError(
            f"{why}; refusing to write a release record over it",
            hint="records are append-only; find out who wrote it before recording again",
        )

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
            self._git_stdin(["update-index", "--add", "--index-info"], "".join(lines), env)
            tree = self.repo.git.write_tree(env=env)
            parents = ["-p", head] if head else []
            # The message on stdin: a fleet's batch lists thousands of records, too long for
            # an argument.
            return self._git_stdin(["commit-tree", tree, *parents], message, env).strip()
        finally:
            index.unlink(missing_ok=True)

    def _git_stdin(self, args: Sequence[str], data: str, env: Mapping[str, str]) -> str:
        """One git plumbing command fed ``data`` on stdin (the whole batch in one process)."""
        done = subprocess.run(
            ["git", "--git-dir", str(self.repo.git_dir), *args],
            input=data.encode(),
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            timeout=120,
        )
        return done.stdout.decode()

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
        paths = [record_path(r.name) for r in records]
        last = ""
        with self._locked():
            for attempt in range(1, max(1, attempts) + 1):
                head = self.fetch()
                results: list[WriteResult | BuilderError | None] = []
                new: dict[str, bytes] = {}
                for record, path in zip(records, paths, strict=True):
                    try:
                        existing = self._read(head, path)
                        if existing is not None:
                            results.append(self._already(existing, record, path, head, attempt))
                            continue
                    except BuilderError as exc:
                        results.append(exc)
                        continue
                    results.append(None)
                    new[path] = render_record(record)
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
        existing: ReleaseRecord,
        record: ReleaseRecord,
        path: str,
        head: str | None,
        attempt: int,
    ) -> WriteResult:
        """ "present" when ``existing`` records the same digest, else a WriteBackError."""
        digest = existing.manifest_digest
        if digest != record.manifest_digest:
            raise WriteBackError(
                f"{self.shown} branch {self.branch}: {path} already records {digest} for "
                f"{record.image}, this build is {record.manifest_digest}; "
                "refusing to overwrite a release record",
                hint="records are append-only; find out why the immutable tag moved",
            )
        return WriteResult(self.shown, self.branch, path, head or "", "present", attempt)


def _batch_message(records: Sequence[ReleaseRecord], new: Mapping[str, bytes]) -> str:
    """The commit message: one record in detail, or a batch with one line per record."""
    fresh = [r for r in records if record_path(r.name) in new]
    if len(fresh) == 1:
        record = fresh[0]
        message = (
            f"release: {record.customer} {record.name.tag} "
            f"{record.manifest_digest}\n\nbase {record.base_version} "
            f"{record.base_digest}\nconfig {record.config_commit}\n"
        )
    else:
        versions = sorted({r.base_version for r in fresh})
        message = f"release: {len(fresh)} images on base {', '.join(versions)}\n\n" + "".join(
            f"{r.customer} {r.name.tag} {r.manifest_digest} config {r.config_commit}\n"
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


def _release_name(report: BuildReport) -> ImageName:
    """The image a report names, refused unless it is a stable release build: pushed, not a
    development build, an immutable name on a final (not pre-release) base version."""
    customer = report.customer
    if report.development:
        raise ReleaseGateError(
            f"{customer}: a development build (unpublished models, no committed lock, or "
            "uncommitted files) gets no release record",
            hint="release builds only",
        )
    if not report.outputs.get("registry"):
        raise WriteBackError(
            f"{customer}: {report.image} was not pushed; a release record needs a pushed image",
            hint="build with --push",
        )
    if Version(report.base["version"]).is_prerelease:
        raise ReleaseGateError(
            f"{customer}: base {report.base['version']} is a pre-release; only stable builds "
            "are recorded"
        )
    try:
        name = report.name
    except ConfigError as exc:
        raise WriteBackError(f"{customer}: {exc.message}") from None
    if not name.immutable or name.dirty:
        raise WriteBackError(f"{customer}: {report.image} is not the immutable tag of a release")
    return name


def release_record(
    report: BuildReport,
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
        for k in ("customer", "image", "manifest_digest", "config_commit")
        if not getattr(report, k)
    ]
    if missing:
        raise WriteBackError(
            f"build report lacks {', '.join(missing)}; is it a `build --json` report?"
        )
    _release_name(report)
    repository, _, folder = config_source.partition("#")
    ci = _ci_context(env)
    record = ReleaseRecord(
        customer=report.customer,
        config_repository=repository,
        config_path=folder or ".",
        config_commit=report.config_commit,
        image=report.image,
        manifest_digest=report.manifest_digest,
        tags=tuple(report.tags or [report.image]),
        base_repository=report.base["repository"],
        base_version=report.base["version"],
        base_digest=report.base["digest"],
        models=tuple(m.recorded() for m in report.models),
        built_at=(built_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        builder_version=__version__,
        ci_url=ci.get("ci_url"),
        ci_pipeline_url=ci.get("ci_pipeline_url"),
    )
    # Never write what the reader would refuse: the record goes through the reader's check.
    try:
        check_document(record.to_dict(), RECORD_SCHEMA, f"{report.customer}: release record", "")
    except ConfigError as exc:
        raise WriteBackError(
            f"{exc.message}; is it the `build --json` report of a release build?"
        ) from None
    return record


def config_source(location: str, settings: Settings) -> str:
    """The canonical, credential-free source URL of a customer location (``<url>#<folder>``
    for a folder of a repository), as the attestation names it."""
    if is_repo_url(location):
        url, _, folder = location.partition("#")
        return f"{canonical_repo_url(url)}#{folder}" if folder else canonical_repo_url(url)
    return open_source(location, settings).url


def write_release_record(
    report: BuildReport,
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
    if commits_missing(log, [commit]):
        raise WriteBackError(
            f"{log.shown} does not have config commit {commit[:12]} that "
            f"{record.image} was built from; refusing to record it there",
            hint="push the customer branch first, or name the right repository with --repo",
        )
    if dry_run:
        head = log.fetch()
        path = record_path(record.name)
        status = "would write" if log._read(head, path) is None else "present"
        return WriteResult(log.shown, branch, path, head or "", status, 0)
    return log.write(record, attempts=attempts, backoff=backoff, before_push=before_push)


def commits_missing(log: ReleaseLog, commits: Iterable[str]) -> set[str]:
    """Which of ``commits`` no branch or tag of the log's remote repository reaches: one
    fetch of its refs and one history listing for all of them (a fleet records thousands)."""
    try:
        log.repo.git.fetch(
            "--no-tags",
            "--quiet",
            "--prune",
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
    wanted = set(commits)
    tips = log.repo.git.for_each_ref("--format=%(objectname)", "refs/ivd-remote/").split()
    if not tips or not wanted:
        return wanted
    reached = set(log.repo.git.rev_list(*tips, "--").split())
    return wanted - reached


def write_release_records(
    reports: Sequence[BuildReport],
    locations: Mapping[str, str],
    settings: Settings,
    *,
    branch: str = RELEASES_BRANCH,
    attempts: int = 5,
    backoff: float = 1.0,
) -> list[WriteResult | BuilderError]:
    """Record many pushed release builds: one commit (and one push) per customer repository
    for all its records (every variant of every customer there), not one per record.
    ``locations`` maps each report's customer to its repository location. The result, in the
    order of ``reports``, is what was written for each, or why not."""
    out: dict[int, WriteResult | BuilderError] = {}
    by_remote: dict[str, list[tuple[int, ReleaseRecord]]] = {}
    sources: dict[str, str] = {}
    for n, report in enumerate(reports):
        try:
            location = locations[report.customer]
            if location not in sources:
                sources[location] = config_source(location, settings)
            record = release_record(report, config_source=sources[location])
            by_remote.setdefault(record_remote(location), []).append((n, record))
        except BuilderError as exc:
            out[n] = exc

    def write(
        remote: str, batch: list[tuple[int, ReleaseRecord]]
    ) -> list[WriteResult | BuilderError]:
        records = [record for _, record in batch]
        try:
            log = ReleaseLog(remote, settings.cache_dir, branch)
            missing = commits_missing(log, [r.config_commit for r in records])
            for record in records:  # never record an image whose commit the target lacks
                commit = record.config_commit
                if commit in missing:
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
        for batch, results in zip(by_remote.values(), done, strict=True):
            for (n, _record), result in zip(batch, results, strict=True):
                out[n] = result
    return [out[n] for n in range(len(reports))]
