"""The worker as a site operator and an attacker would try it, against a real RabbitMQ.

Allowed folders (slide roots, output root, symlinks resolved), job-id identity, bounded
reasons and logs, a full output disk (a real tmpfs of 64 KiB in the worker's own mount
namespace), permanent against transient errors across a broker restart, and a clean exit 7
when the broker stays away while a job runs. Helpers: worker_testlib.py.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tilerunner.paths import UnsafePathError, filesystem_type, resolve_within
from tilerunner.worker.logs import REASON_LIMIT
from tilerunner.worker.store import JOBS_DIR, LOCKS_DIR
from tilerunner_testlib import App
from worker_testlib import (
    RabbitMQ,
    Site,
    assert_no_leftovers,
    free_port,
    in_tmpfs,
    job,
    start_broker,
    tilerunner,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

FULL_DISK = "64k"  # room for the small files of a result, not for its PNG overlays


def _reasons(dead: list[tuple[object, bytes]]) -> dict[str, str]:
    """job_id -> x-tilerunner-reason of dead letters."""
    return {
        json.loads(body)["job_id"]: props.headers["x-tilerunner-reason"]  # type: ignore[attr-defined]
        for props, body in dead
    }


# --------------------------------------------------------------------------- no broker


def test_paths_resolve_within_follows_symlinks_and_names_the_roots(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "in").symlink_to(root / "sub", target_is_directory=True)
    (root / "out").symlink_to(other, target_is_directory=True)
    assert resolve_within(root / "in" / "x.svs", [other, root], what="slide", option="-o") == (
        root / "sub" / "x.svs"
    )
    assert resolve_within(root, [root], what="output", option="-o") == root
    with pytest.raises(UnsafePathError) as info:
        resolve_within(root / "out" / "x.svs", [root], what="slide", option="--slide-root")
    assert str(info.value) == (
        f"slide {root}/out/x.svs is outside the allowed folders {root} (it resolves to "
        f"{other}/x.svs); put it under one of them or add its folder with --slide-root"
    )
    for bad in (Path(f"{root}/a\nb"), Path(f"{tmp_path}/rootx/y")):  # a newline; a name prefix
        with pytest.raises(UnsafePathError):
            resolve_within(bad, [root], what="slide", option="-o")


def test_filesystem_type_reads_the_deepest_mount(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 22 0:27 / /out rw,relatime - tmpfs tmpfs rw\n"
        "31 22 0:28 / /out/vol rw - xfs /dev/sdb rw\n"
        "32 22 0:29 / /with\\040space rw - ramfs ramfs rw\n"
    )
    assert filesystem_type(Path("/out/x"), mountinfo) == "tmpfs"
    assert filesystem_type(Path("/out/vol/a"), mountinfo) == "xfs"
    assert filesystem_type(Path("/outside"), mountinfo) == "ext4"
    assert filesystem_type(Path("/with space/r"), mountinfo) == "ramfs"
    assert filesystem_type(Path("/x"), tmp_path / "none") is None


def test_worker_refuses_to_start_without_its_folders(wapp: App, tmp_path: Path) -> None:
    """Checked before the models load or the broker is called: one line, the class's code."""
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    base = ["worker", "--amqp", url, "--app-dir", str(wapp.root), "--metrics-port", "0"]
    missing = tmp_path / "missing"
    proc = tilerunner(*base, "--slide-root", str(tmp_path), "--output-root", str(missing))
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tilerunner: error: output root {missing} does not exist or is not a folder; mount the "
        "results volume there or fix --output-root / TILERUNNER_OUTPUT_ROOT"
    )
    proc = tilerunner(*base, "--slide-root", str(missing), "--output-root", str(tmp_path))
    assert proc.returncode == 4, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"tilerunner: error: slide root {missing} does not exist or is not a folder")
    )
    # the same from the environment (the compose file's other way to set them)
    env = {**os.environ, "TILERUNNER_SLIDE_ROOTS": f"{tmp_path}:{missing}"}
    env["TILERUNNER_OUTPUT_ROOT"] = str(tmp_path)
    proc = tilerunner(*base, env=env)
    assert proc.returncode == 4, proc.stderr
    assert f"slide root {missing} does not exist" in proc.stderr.strip().splitlines()[-1]
    env["TILERUNNER_SLIDE_ROOTS"], env["TILERUNNER_OUTPUT_ROOT"] = str(tmp_path), str(missing)
    proc = tilerunner(*base, env=env)
    assert proc.returncode == 5, proc.stderr
    assert f"output root {missing} does not exist" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / ".tilerunner-locks").exists()


def test_tilerunner_run_on_a_full_disk_exits_with_the_output_code(
    wapp: App, flat_slide: Path, tmp_path: Path
) -> None:
    out = tmp_path / "full"
    out.mkdir()
    args = ["run", str(flat_slide), "--out", str(out / "x"), "--app-dir", str(wapp.root)]
    proc = tilerunner(*args, "--device", "cpu", wrap=in_tmpfs(out, FULL_DISK))
    assert proc.returncode == 5, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tilerunner: error: cannot write {out / 'x'}/"), last
    assert "No space left on device (the output disk is full)" in last
    assert "internal error" not in proc.stderr


def test_a_full_disk_raised_anywhere_is_an_output_error(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's backstop: an ENOSPC no writer wrapped still exits 5, naming the file."""
    from tilerunner.cli import _dispatch

    def full(_args: argparse.Namespace) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/out/x/y.png")

    assert _dispatch(full, argparse.Namespace(verbose=False)) == 5
    assert capsys.readouterr().err == (
        "tilerunner: error: No space left on device writing /out/x/y.png (the output disk is "
        "full); free space there or choose another --out\n"
    )


# --------------------------------------------------------------------------- real broker


def test_jobs_outside_the_allowed_folders_are_refused_at_once(
    site: Callable[..., Site],
    blank_slide: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = site("roots")
    w = s.worker()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    outside = elsewhere / "x.tiff"
    shutil.copyfile(blank_slide, outside)  # a valid slide, in no slide root
    (s.slides / "link.tiff").symlink_to(outside)
    (s.slides / "inside.tiff").symlink_to(blank_slide)  # into another slide root: fine
    (s.out / "link-out").symlink_to(elsewhere, target_is_directory=True)
    (s.out / "r-5").symlink_to(elsewhere / "r-5", target_is_directory=True)
    s.submit("r-1", outside)
    s.submit("r-2", s.slides / "link.tiff")
    s.submit("r-3", blank_slide, elsewhere / "out")
    s.submit("r-4", blank_slide, s.out / "link-out")
    s.submit("r-5", blank_slide)
    s.submit("ok-6", s.slides / "inside.tiff")
    reasons = _reasons(s.client.dead(5, on_fail=w.tail))
    prefix = "failed with a permanent error (not retried): job refused: "
    slide_roots = ", ".join(str(r) for r in s.slide_roots)
    roots = f"{s.out}; put it under one of them or add its folder with --output-root"
    assert reasons == {
        "r-1": f"{prefix}slide {outside} is outside the allowed folders "
        f"{slide_roots}; put it under one of them or add its folder with --slide-root",
        "r-2": f"{prefix}slide {s.slides / 'link.tiff'} is outside the allowed folders "
        f"{slide_roots} (it resolves to {outside}); put it under one of them or add its "
        "folder with --slide-root",
        "r-3": f"{prefix}output {elsewhere / 'out'} is outside the allowed folders {roots}",
        "r-4": f"{prefix}output {s.out / 'link-out'} is outside the allowed folders {s.out} "
        f"(it resolves to {elsewhere}); put it under one of them or add its folder with "
        "--output-root",
        "r-5": f"{prefix}results folder {s.out / 'r-5'} is a symbolic link; links are not "
        "followed: remove it",
    }
    results = {r["job_id"]: r for r in s.client.results(6, on_fail=w.tail)}
    assert results["ok-6"]["status"] == "done" and results["ok-6"]["slide"].endswith("inside.tiff")
    assert all(results[j]["status"] == "failed" and results[j]["attempt"] == 1 for j in reasons)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["x.tiff"]  # nothing written there
    assert w.metric("tilerunner_jobs_failed_total", action="retry") == 0
    assert_no_leftovers(s.out)


def test_stale_lock_files_and_records_are_removed_at_start(site: Callable[..., Site]) -> None:
    """A worker killed mid-job leaves its lock file; deleted results leave their record."""
    s = site("prune")
    locks, records = s.out / LOCKS_DIR, s.out / JOBS_DIR
    locks.mkdir()
    records.mkdir()
    (locks / "killed.lock").write_text("")
    (records / "gone.json").write_text(json.dumps({"folder": str(s.out / "gone")}))
    (s.out / "kept").mkdir()
    (s.out / "kept" / "job.json").write_text("{}")
    (records / "kept.json").write_text(json.dumps({"folder": str(s.out / "kept")}))
    w = s.worker()
    (pruned,) = w.events("pruned")
    assert pruned["msg"].startswith("removed 1 stale lock file(s) and 1 record(s) of deleted")
    assert sorted(p.name for p in locks.iterdir()) == []
    assert sorted(p.name for p in records.iterdir()) == ["kept.json"]


def test_a_used_job_id_is_never_recomputed_for_another_payload(
    site: Callable[..., Site], flat_slide: Path, blank_slide: Path
) -> None:
    s = site("identity")
    w = s.worker()
    s.submit("id-1", flat_slide)
    (first,) = s.client.results(on_fail=w.tail)
    assert first["status"] == "done"
    folder = s.out / "id-1"
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    foreign = s.out / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's\n")

    s.submit("id-1", blank_slide)  # another slide under the same job id
    s.submit("foreign", blank_slide)  # a folder the worker did not write
    s.submit("id-1", flat_slide, s.out / "elsewhere")  # the same id, another results folder
    s.submit("id-1", flat_slide, analyses=["breast"])  # the same job: answered from results
    dead = s.client.dead(3, on_fail=w.tail)
    reasons = _reasons(dead[:2])
    assert _reasons(dead[2:])["id-1"] == (
        "failed with a permanent error (not retried): job refused: job id id-1 already names "
        f"another job whose results are in {folder}; they are kept: submit this job under a "
        "new job id"
    )
    assert not (s.out / "elsewhere" / "id-1").exists()
    assert reasons["id-1"].startswith(
        "failed with a permanent error (not retried): job refused: job id id-1 already names "
        f"another job whose results are in {folder} (slide {flat_slide} (this job: {blank_slide})"
    )
    assert reasons["id-1"].endswith("they are kept: submit this job under a new job id")
    assert reasons["foreign"].endswith(
        f"{foreign} exists but holds no tilerunner result (job.json); it is left alone: move it "
        "away or submit the job under a new job id"
    )
    results = s.client.results(4, on_fail=w.tail)
    # a refusal for the job id's sake is the refused message's, never a status of id-1
    # (which reads: done, done), under the message's own identity
    assert [(r["job_id"], r["status"], r["reused"]) for r in results] == [
        (None, "failed", False),
        ("foreign", "failed", False),
        (None, "failed", False),
        ("id-1", "done", True),
    ]
    refused = [job("id-1", blank_slide, s.out), job("id-1", flat_slide, s.out / "elsewhere")]
    assert [results[0]["message_id"], results[2]["message_id"]] == [
        "sha256:" + hashlib.sha256(json.dumps(doc).encode()).hexdigest() for doc in refused
    ]
    assert [results[0]["reason"], results[2]["reason"]] == [
        reasons["id-1"],
        _reasons(dead[2:])["id-1"],
    ]
    assert results[3]["files"] == first["files"]
    after = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert after == before  # the first job's files, untouched
    assert (foreign / "notes.txt").read_text() == "someone else's\n"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert_no_leftovers(s.out)


def test_huge_fields_give_short_reasons_and_logs(
    site: Callable[..., Site], blank_slide: Path
) -> None:
    s = site("huge")
    w = s.worker()
    huge = "y" * 3_000_000
    long_path = s.slides / ("z" * 200) / ("z" * 200) / "missing.svs"
    s.client.submit({**job("h-1", blank_slide, s.out), "job_version": huge})
    s.client.submit(job("h-2", blank_slide, s.out, analyses=[huge]))
    s.client.submit(job("h-3", Path("/" + huge), s.out))
    s.client.submit(job("h-4", long_path, s.out))  # a long but valid path: SlideError
    dead = s.client.dead(4, on_fail=w.tail)
    reasons = _reasons(dead)
    assert sorted(reasons) == ["h-1", "h-2", "h-3", "h-4"]
    for reason in reasons.values():
        assert len(reason) <= REASON_LIMIT + 40 and "\n" not in reason
    assert "missing.svs" in reasons["h-4"]
    results = s.client.results(4, on_fail=w.tail)
    assert all(len(json.dumps(r)) < 4 * REASON_LIMIT for r in results)
    assert {r["reason"] for r in results} == set(reasons.values())
    assert w.log.stat().st_size < 100_000  # the log does not echo 3 MB fields
    assert w.proc.poll() is None


def test_full_disk_is_transient_named_and_a_broker_restart_is_no_failure(
    rabbitmq: RabbitMQ, site: Callable[..., Site], flat_slide: Path
) -> None:
    """Output root on a full 64 KiB tmpfs; the broker restarts while the first attempt runs.

    The restart is not a failure: the job still gets its three failed attempts (two retries,
    then the dead letter), each reason naming the file that did not fit.
    """
    s = site("full")
    w = s.worker(
        "--max-attempts", "3", "--batch-size", "4", delay=0.2, wrap=in_tmpfs(s.out, FULL_DISK)
    )
    (warning,) = w.events("output_root_in_memory")
    assert warning["level"] == "warning"
    assert warning["msg"].startswith(f"output root {s.out} is on a tmpfs (memory) ")
    assert "results there vanish when the" in warning["msg"]

    s.submit("f-1", flat_slide)
    wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
    rabbitmq.restart()
    ((props, _body),) = s.client.dead(on_fail=w.tail)
    reason = props.headers["x-tilerunner-reason"]
    assert reason.startswith(
        f"failed 3 time(s), last: DiskFullError: cannot write {s.out}/.f-1.partial-"
    ), reason
    assert ".png: No space left on device (the output disk is full); free space" in reason
    assert props.headers["x-tilerunner-failures"] == 3
    assert props.headers["x-tilerunner-attempts"] >= 4  # + the delivery the restart cut short
    retries = w.events("job_retry")
    assert len(retries) == 2 and all("DiskFullError" in r["reason"] for r in retries)
    assert w.events("broker_down") and w.events("job_orphaned")
    (result,) = s.client.results(on_fail=w.tail)
    assert result["status"] == "failed" and result["reason"] == reason
    assert result["attempt"] == props.headers["x-tilerunner-attempts"]
    assert w.proc.poll() is None


def test_broker_timeout_mid_job_stops_the_job_and_exits_7(
    wapp: App, flat_slide: Path, tmp_path: Path
) -> None:
    """The broker goes away for good while a job runs: exit 7, the job thread stopped first
    (no SIGABRT from a thread left inside ONNX Runtime), nothing half-written."""
    with start_broker() as broker:
        s = Site(broker, wapp, "gone", tmp_path)
        try:
            w = s.worker("--broker-timeout", "2", "--batch-size", "2", delay=0.5)
            s.submit("g-1", flat_slide)
            wait_for(w.mid_job, "the job to be under way", on_fail=w.tail)
            broker.stop()
            assert w.wait_exit() == 7, w.tail()
        finally:
            s.close()
    text = w.text()
    assert (
        text.strip()
        .splitlines()[-1]
        .startswith("tilerunner: error: no connection to the broker at ")
    )
    assert "giving up" in text and "terminate called" not in text
    (cancel,) = [e for e in w.events("job_cancel") if e["job_id"] == "g-1"]
    assert "the worker is exiting" in cancel["msg"]
    assert not w.events("job_abandoned")
    # cancelled at its next batch, or (if it was writing) committed whole before the exit
    assert not (s.out / "g-1").exists() or (s.out / "g-1" / "job.json").is_file()
    assert_no_leftovers(s.out)
