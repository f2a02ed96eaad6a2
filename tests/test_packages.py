"""Weights packages (ClearML system tag `package`): extracted as the SDK extracts them, and
hostile archives refused in one line each (builder/cook/packages.py)."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from builder.cook import packages
from builder.cook.packages import PackedFile, archive_kind, extract_package
from builder.errors import FetchError

LABEL = "s3://training/t/models/model_package.zip"


def _zip(path: Path, entries: dict[str, bytes], *, method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zipped:
        for name, data in entries.items():
            zipped.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tarred:
        for info, data in members:
            tarred.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _refused(archive: Path, kind: str, tmp_path: Path, *expected: str) -> None:
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FetchError) as caught:
        extract_package(archive, kind, target, LABEL)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(LABEL), message
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "evil").exists()


def test_a_package_as_the_sdk_writes_it(tmp_path: Path) -> None:
    """Model.update_weights_package: ZIP_STORED, names relative to the packed folder."""
    archive = _zip(
        tmp_path / "model_package.zip",
        {"model.onnx": b"weights", "labels/classes.txt": b"tumour\n", "labels/": b""},
    )
    out = tmp_path / "out"
    out.mkdir()
    files = extract_package(archive, ".zip", out, LABEL)
    assert files == [PackedFile("labels/classes.txt", 7), PackedFile("model.onnx", 7)]
    assert (out / "labels" / "classes.txt").read_bytes() == b"tumour\n"


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_tar_packages_are_extracted_too(tmp_path: Path, suffix: str) -> None:
    """StorageManager._extract_to_cache extracts .tar.gz and .tgz as well."""
    info = tarfile.TarInfo("./model.onnx")
    info.size = 7
    archive = _tar(tmp_path / f"model{suffix}", [(info, b"weights")])
    out = tmp_path / "out"
    out.mkdir()
    assert archive_kind(archive.name) == suffix
    assert extract_package(archive, suffix, out, LABEL) == [PackedFile("model.onnx", 7)]


@pytest.mark.parametrize(
    ("name", "kind"),
    [("m.ZIP", ".zip"), ("a/b/model.Tar.Gz", ".tar.gz"), ("x.tgz", ".tgz"), ("m.onnx", None)],
)
def test_archive_kinds_are_the_sdks(name: str, kind: str | None) -> None:
    assert archive_kind(name) == kind


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a/../../evil", "ok/\nevil"])
def test_an_entry_leaving_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "p.zip", {"model.onnx": b"w", name: b"x"})
    _refused(archive, ".zip", tmp_path, "entry")


def test_a_symlink_entry_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "p.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        link = zipfile.ZipInfo("model.onnx")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(link, "/etc/passwd")
    _refused(archive, ".zip", tmp_path, "'model.onnx' is a symbolic link")


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_links_and_special_tar_entries_are_refused(tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("model.onnx")
    info.type = kind
    info.linkname = "/etc/passwd"
    archive = _tar(tmp_path / "p.tar.gz", [(info, None)])
    _refused(archive, ".tar.gz", tmp_path, "'model.onnx'")


def test_a_name_given_twice_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "p.zip"
    with zipfile.ZipFile(archive, "w") as zipped, pytest.warns(UserWarning, match="Duplicate"):
        zipped.writestr("model.onnx", b"first")
        zipped.writestr("./model.onnx", b"second")
        zipped.writestr("model.onnx", b"third")
    _refused(archive, ".zip", tmp_path, "'model.onnx' is given twice")


@pytest.mark.parametrize("entries", [["a", "a/b"], ["a/b", "a"]])
def test_a_file_and_a_folder_of_one_name_are_refused(tmp_path: Path, entries: list[str]) -> None:
    archive = _zip(tmp_path / "p.zip", dict.fromkeys(entries, b"x"))
    _refused(archive, ".zip", tmp_path, "entry 'a")


def test_a_zip_bomb_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "p.zip", {"model.onnx": bytes(20 << 20)}, method=zipfile.ZIP_DEFLATED)
    _refused(archive, ".zip", tmp_path, "a zip bomb")


def test_absurd_sizes_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Sizes the archive claims (its central directory) are checked before extraction."""
    archive = _zip(tmp_path / "p.zip", {f"part{i}.bin": b"x" for i in range(17)})
    raw = bytearray(archive.read_bytes())
    start = 0
    while (at := raw.find(b"PK\x01\x02", start)) >= 0:
        raw[at + 20 : at + 28] = (0xFFFFFFF0).to_bytes(4, "little") * 2  # compressed, real size
        start = at + 4
    archive.write_bytes(bytes(raw))
    _refused(archive, ".zip", tmp_path, "an absurd size")
    assert not any((tmp_path / "out").iterdir())


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "p.zip", {f"f{i}": b"" for i in range(packages.MAX_ENTRIES + 1)})
    _refused(archive, ".zip", tmp_path, f"more than {packages.MAX_ENTRIES:,} entries")


def test_an_encrypted_entry_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "p.zip", {"model.onnx": b"w"})
    raw = bytearray(archive.read_bytes())
    central = raw.find(b"PK\x01\x02")
    raw[central + 8] |= 0x1  # general purpose flag bit 0: encrypted
    archive.write_bytes(bytes(raw))
    _refused(archive, ".zip", tmp_path, "is encrypted")


@pytest.mark.parametrize(
    ("content", "kind"), [(b"not a zip at all", ".zip"), (b"\x1f\x8b broken", ".tgz")]
)
def test_a_corrupt_archive_is_one_line(tmp_path: Path, content: bytes, kind: str) -> None:
    archive = tmp_path / f"p{kind}"
    archive.write_bytes(content)
    _refused(archive, kind, tmp_path, f"not a valid {kind} archive")


def test_an_empty_package_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "p.zip", {"labels/": b""})
    _refused(archive, ".zip", tmp_path, "holds no files")
