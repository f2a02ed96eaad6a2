"""Damaged slides: the message names the file and what is wrong, at the right level."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
import tifffile
from test_runner_errors import _assert_one_line_error, _run
from tilerunner.errors import SlideError
from tilerunner.slide import OpenSlideSlide, open_slide
from tilerunner_testlib import App


def _damaged(small_slide: Path, tmp_path: Path, name: str, edit: dict[int, bytes]) -> Path:
    """A copy of the small slide with ``edit`` (offset -> bytes) written over it."""
    bad = tmp_path / name
    shutil.copy(small_slide, bad)
    with bad.open("r+b") as fh:
        for offset, data in edit.items():
            fh.seek(offset)
            fh.write(data)
    return bad


def _first_ifd(path: Path) -> int:
    with tifffile.TiffFile(path) as tf:
        return int(tf.pages[0].offset)


def _level_tiles(
    path: Path, level: int, around: tuple[float, float], count: int
) -> dict[int, bytes]:
    """Garbage over ``count`` stored tiles of ``level`` around a relative position."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level]
        assert isinstance(page, tifffile.TiffPage)
        across = -(-int(page.imagewidth) // int(page.tilewidth))
        down = -(-int(page.imagelength) // int(page.tilelength))
        row, col = int(around[1] * down), int(around[0] * across)
        spans = {}
        for r in range(max(0, row - count), min(down, row + count)):
            for c in range(max(0, col - count), min(across, col + count)):
                index = r * across + c
                offset, size = int(page.dataoffsets[index]), int(page.databytecounts[index])
                spans[offset] = b"\xff\xd8\x00garbage" + b"\x00" * (size - 10)
        return spans


def header_cases(small_slide: Path) -> dict[str, tuple[dict[int, bytes], str]]:
    size = small_slide.stat().st_size
    ifd = _first_ifd(small_slide)
    return {
        "header points past the end": (
            {4: struct.pack("<I", size + 1000)},
            f"points to the first image directory at byte {size + 1000}, outside the file",
        ),
        "header with random bytes": ({4: os.urandom(4)[:3] + b"\xf0"}, "corrupt TIFF header"),
        "header truncated": ({}, "ends inside it"),
        "directory with too many tags": ({ifd: b"\xff\xff"}, "corrupt TIFF"),
        "directory zeroed": ({ifd: b"\x00" * 200}, "TIFF directory is corrupt"),
    }


CASES = [
    "header points past the end",
    "header with random bytes",
    "header truncated",
    "directory with too many tags",
    "directory zeroed",
]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_header_names_file_and_problem(
    small_slide: Path, tmp_path: Path, case: str
) -> None:
    edit, expected = header_cases(small_slide)[case]
    bad = _damaged(small_slide, tmp_path, "bad.tiff", edit)
    if case == "header truncated":
        bad.write_bytes(small_slide.read_bytes()[:6])
    with pytest.raises(SlideError) as info:
        open_slide(bad)
    message = str(info.value)
    assert str(bad) in message and expected in message, message
    assert "list index out of range" not in message and "\n" not in message


def test_corrupt_header_through_the_runner_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], app: App, small_slide: Path
) -> None:
    bad = _damaged(small_slide, tmp_path, "bad.tiff", {4: struct.pack("<I", 1 << 31)})
    code, err = _run(capsys, app, bad, tmp_path / "out")
    _assert_one_line_error(code, err, "slide", str(bad), "corrupt TIFF header")


@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_corrupt_level0_tile_is_reported_as_level_0(
    small_slide: Path, tmp_path: Path, reader: str
) -> None:
    """Damage in the middle of level 0 (where the reader checks its fast path) is reported as
    level 0, also by reads of other levels after it (OpenSlide's errors are sticky)."""
    bad = _damaged(small_slide, tmp_path, "bad.tiff", _level_tiles(small_slide, 0, (0.5, 0.5), 2))
    if reader == "auto":
        with pytest.raises(SlideError, match=r"level 0 does not decode") as info:
            open_slide(bad)
        assert str(bad) in str(info.value) and "level 3" not in str(info.value)
        return
    slide = open_slide(bad, reader="openslide")
    assert isinstance(slide, OpenSlideSlide)
    w, h = slide.info.level_dimensions[0]
    with pytest.raises(SlideError, match="level 0"):
        slide.read_region((w // 2 - 256, h // 2 - 256), 0, (512, 512))
    with pytest.raises(SlideError) as later:  # a read of level 3 afterwards
        slide.read_region((0, 0), 3, (64, 64))
    assert "level 0" in str(later.value) and "level 3" not in str(later.value)
    slide.close()
