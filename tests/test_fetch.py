"""Fetch stage: weights from file: and s3:// (real moto server) into the verified cache."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.contracts import ResolvedModel, WeightFile
from builder.cook import fetch as fetch_module
from builder.cook.fetch import Cache, fetch
from builder.cook.storage import S3Store
from builder.errors import FetchError

BUCKET = "prod-models"


def _model(*files: WeightFile) -> ResolvedModel:
    return ResolvedModel(
        name="m",
        sourcing="auto",
        model_id="id",
        registry_name="n",
        task_id="t",
        task_status="completed",
        project=None,
        framework=None,
        tags=(),
        published=True,
        weights_uri="x",
        files=files,
        preprocessing=(),
        postprocessing=(),
        params={},
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def s3(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.create_bucket(BUCKET)
    return s3_server.client()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(fetch_module, "CHUNK_SIZE", 64 * 1024)
    return 64 * 1024


def test_file_source_is_cached_and_verified(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "w.onnx").write_bytes(data)
    wf = WeightFile(
        name="w.onnx", uri=f"file:{tmp_path / 'w.onnx'}", size=len(data), sha256=_sha(data)
    )
    cache = Cache(tmp_path / "cache")
    first = fetch((_model(wf),), cache, manual_files={})
    assert first.bytes_downloaded == len(data)
    assert first.files[0].path.read_bytes() == data
    second = fetch((_model(wf),), cache, manual_files={})
    assert second.bytes_downloaded == 0 and not second.files[0].downloaded


def test_corrupt_cache_entry_is_fetched_again(tmp_path: Path) -> None:
    data = b"weights" * 1000
    (tmp_path / "w").write_bytes(data)
    wf = WeightFile(name="w", uri=f"file:{tmp_path / 'w'}", size=len(data), sha256=_sha(data))
    cache = Cache(tmp_path / "cache")
    entry = fetch((_model(wf),), cache, manual_files={}).files[0].path
    stat = entry.stat()
    entry.write_bytes(data[:-1] + b"X")  # same size, bit rot, mtime restored: still caught
    os.utime(entry, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = fetch((_model(wf),), cache, manual_files={})
    assert again.files[0].downloaded and entry.read_bytes() == data


def test_sha256_mismatch_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"tampered")
    wf = WeightFile(name="w", uri=f"file:{tmp_path / 'w'}", size=8, sha256=_sha(b"original"))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch((_model(wf),), cache, manual_files={})
    assert not any((cache.root / "blobs" / "sha256").iterdir())
    assert not any((cache.root / "tmp").iterdir())


def test_offline_needs_the_cache(tmp_path: Path) -> None:
    wf = WeightFile(name="w", uri="s3://nowhere/w", size=1, sha256=_sha(b"x"))
    with pytest.raises(FetchError, match="not in the cache and --offline"):
        fetch((_model(wf),), Cache(tmp_path / "cache"), manual_files={}, offline=True)


def test_s3_parallel_ranged_download(s3: Any, tmp_path: Path, small_chunks: int) -> None:
    data = os.urandom(small_chunks * 7 + 123)
    s3.put_object(Bucket=BUCKET, Key="task1/model.onnx", Body=data)
    wf = WeightFile(
        name="model.onnx", uri=f"s3://{BUCKET}/task1/model.onnx", size=len(data), sha256=_sha(data)
    )
    seen: list[int] = []
    result = fetch(
        (_model(wf),),
        Cache(tmp_path / "cache"),
        manual_files={},
        jobs=4,
        progress=lambda e: seen.append(e.done),
    )
    assert result.files[0].path.read_bytes() == data
    assert max(seen) == len(data)


def test_s3_interrupted_download_resumes(
    s3: Any, tmp_path: Path, small_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(small_chunks * 6)
    s3.put_object(Bucket=BUCKET, Key="task1/big.bin", Body=data)
    wf = WeightFile(
        name="big.bin", uri=f"s3://{BUCKET}/task1/big.bin", size=len(data), sha256=_sha(data)
    )
    cache = Cache(tmp_path / "cache")
    real_stream = S3Store.stream

    def flaky(self: S3Store, key: str, start: int, end: int) -> Iterator[bytes]:
        if start >= small_chunks * 3:
            raise FetchError("injected: connection reset")
        return real_stream(self, key, start, end)

    monkeypatch.setattr(S3Store, "stream", flaky)
    with pytest.raises(FetchError, match="injected"):
        fetch((_model(wf),), cache, manual_files={}, jobs=1)
    assert not (cache.root / "blobs" / "sha256" / wf.sha256).exists()  # type: ignore[operator]
    monkeypatch.setattr(S3Store, "stream", real_stream)

    fetched: list[tuple[int, int]] = []

    def recording(self: S3Store, key: str, start: int, end: int) -> Iterator[bytes]:
        fetched.append((start, end))
        return real_stream(self, key, start, end)

    monkeypatch.setattr(S3Store, "stream", recording)
    labels: set[str] = set()
    result = fetch(
        (_model(wf),),
        cache,
        manual_files={},
        jobs=1,
        progress=lambda e: labels.add(e.what),
    )
    assert result.files[0].path.read_bytes() == data
    assert (
        min(start for start, _ in fetched) == small_chunks * 3
    )  # the first three chunks were kept
    # ... and it says so: resumed, not the full size "downloaded"
    assert result.files[0].status == "resumed"
    assert result.files[0].resumed_bytes == small_chunks * 3
    assert (result.bytes_downloaded, result.bytes_resumed) == (small_chunks * 3,) * 2
    assert labels == {"m/big.bin (resumed)"}


def test_s3_missing_object(s3: Any, tmp_path: Path) -> None:
    wf = WeightFile(name="x", uri=f"s3://{BUCKET}/nope/x", size=10, sha256=_sha(b"0123456789"))
    with pytest.raises(FetchError, match=r"s3://prod-models/nope/x failed: NoSuchKey"):
        fetch((_model(wf),), Cache(tmp_path / "cache"), manual_files={})


def test_s3_endpoint_down_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    wf = WeightFile(name="x", uri=f"s3://{BUCKET}/t/x", size=10, sha256=_sha(b"0123456789"))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(FetchError, match="S3 endpoint unreachable") as info:
        fetch((_model(wf),), cache, manual_files={})
    assert "s3cr3t-value" not in str(info.value)
    assert not any((cache.root / "blobs" / "sha256").iterdir())


def test_two_processes_share_the_cache(s3: Any, s3_server: Any, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    s3.put_object(Bucket=BUCKET, Key="t/shared.bin", Body=data)
    script = (
        "import sys; from pathlib import Path\n"
        "from builder.contracts import WeightFile\n"
        "from builder.cook.fetch import Cache, fetch\n"
        "from test_fetch import _model\n"
        f"wf = WeightFile(name='s', uri='s3://{BUCKET}/t/shared.bin', size={len(data)}, sha256='{_sha(data)}')\n"
        "r = fetch((_model(wf),), Cache(Path(sys.argv[1])), manual_files={})\n"
        "print(r.files[0].path)\n"
    )
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(Path(__file__).parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "cache")],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] and Path(outputs[0]).read_bytes() == data


def _weights_file(tmp_path: Path, chunks: int, chunk: int) -> tuple[bytes, WeightFile]:
    data = os.urandom(chunks * chunk)
    (tmp_path / "big.bin").write_bytes(data)
    wf = WeightFile(
        name="big.bin", uri=f"file:{tmp_path / 'big.bin'}", size=len(data), sha256=_sha(data)
    )
    return data, wf


def test_disk_full_removes_the_partial_download(
    tmp_path: Path, small_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, wf = _weights_file(tmp_path, 8, small_chunks)
    cache = Cache(tmp_path / "cache")
    real_pwrite = os.pwrite
    written = 0

    def disk_fills_up(fd: int, block: bytes, offset: int) -> int:
        nonlocal written
        if written + len(block) > small_chunks * 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written += len(block)
        return real_pwrite(fd, block, offset)

    monkeypatch.setattr(os, "pwrite", disk_fills_up)
    with pytest.raises(FetchError) as info:
        fetch((_model(wf),), cache, manual_files={}, jobs=2)
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    assert "partial download was removed" in str(info.value)
    assert list((cache.root / "tmp").iterdir()) == []  # nothing left to keep the disk full
    assert list((cache.root / "blobs" / "sha256").iterdir()) == []
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    again = fetch((_model(wf),), cache, manual_files={})  # space freed: the next run works
    assert again.files[0].path.read_bytes() == data and again.files[0].status == "downloaded"


def test_disk_full_while_storing_a_manual_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path / "cache")
    wf = WeightFile(name="w", uri="repo:models/m/w", size=4, sha256=_sha(b"wxyz"))

    def full(self: Path, data: bytes) -> int:
        self.open("wb").close()  # the file was created, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(FetchError, match="No space left"):
        fetch((_model(wf),), cache, manual_files={"models/m/w": b"wxyz"})
    assert list((cache.root / "tmp").iterdir()) == []


def test_repo_file_must_match_its_sha256(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    wf = WeightFile(name="w", uri="repo:models/m/w", size=4, sha256=_sha(b"old!"))
    with pytest.raises(FetchError, match="does not match its sha256"):
        fetch((_model(wf),), cache, manual_files={"models/m/w": b"new!"})
    missing = WeightFile(name="w", uri="repo:../../etc/passwd", size=4, sha256=_sha(b"old!"))
    with pytest.raises(FetchError, match="not a committed file"):
        fetch((_model(missing),), cache, manual_files={"models/m/w": b"new!"})
