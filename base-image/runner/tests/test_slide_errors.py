"""Damaged slides: the message names the file and what is wrong, at the right level."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile
from test_runner_errors import _assert_one_line_error, _run
from tilerunner.errors import SlideError
from tilerunner.slide import MAX_IMAGES, OpenSlideSlide, open_slide
from tilerunner_testlib import (
    IMAGE_LENGTH,
    IMAGE_WIDTH,
    ROWS_PER_STRIP,
    TILE_LENGTH,
    TILE_WIDTH,
    App,
    crafted_tiff,
)


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
        "directory zeroed": ({ifd: b"\x00" * 200}, "corrupt TIFF directory"),
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


# -------------------------------------------------------------- directories claiming absurd sizes

SIDE = 1 << 20  # what the reported slide claimed for its tiles (OpenSlide asked for 4 TB)

# (name, tags overwritten in the first directory, tiled, pages, what the one line says)
BOUNDS = [
    ("huge tile width and height", {TILE_WIDTH: SIDE, TILE_LENGTH: SIDE}, True, 1,
     f"tiles of {SIDE} x {SIDE} px ({SIDE * SIDE * 4} bytes each, decoded; at most"),
    ("huge tile width", {TILE_WIDTH: 1 << 24}, True, 1, f"tiles of {1 << 24} x 16 px"),
    ("huge tile height", {TILE_LENGTH: 1 << 24}, True, 1, f"tiles of 16 x {1 << 24} px"),
    ("huge image width", {IMAGE_WIDTH: SIDE + 1}, True, 1, f"claims {SIDE + 1} x 64 px"),
    ("huge image height", {IMAGE_LENGTH: 1 << 31}, True, 1, f"claims 64 x {1 << 31} px"),
    ("zero width", {IMAGE_WIDTH: 0}, True, 1, "corrupt TIFF directory: image 0 is 0 x 64 px (empty)"),
    ("zero height", {IMAGE_LENGTH: 0}, True, 1, "corrupt TIFF directory: image 0 is 64 x 0 px (empty)"),
    ("zero tile", {TILE_WIDTH: 0}, True, 1, "corrupt TIFF directory: image 0 has tiles of 0 x 16 px (empty)"),
    ("absurd tile count", {IMAGE_WIDTH: SIDE, IMAGE_LENGTH: SIDE}, True, 1,
     f"claims {(SIDE // 16) ** 2} tiles (at most"),
    ("huge strip", {IMAGE_WIDTH: SIDE, ROWS_PER_STRIP: SIDE, IMAGE_LENGTH: SIDE}, False, 1,
     f"strips of {SIDE} x {SIDE} px"),
    ("many levels", {}, True, MAX_IMAGES + 1, f"more than {MAX_IMAGES} image directories"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("tags", "tiled", "pages", "says"), [b[1:] for b in BOUNDS], ids=[b[0] for b in BOUNDS]
)
def test_directories_claiming_absurd_sizes_are_refused_before_any_reader_allocates(
    tmp_path: Path, tags: dict[int, int], tiled: bool, pages: int, says: str
) -> None:
    bad = crafted_tiff(tmp_path / "crafted.tiff", tags, pages=pages, tiled=tiled)
    with pytest.raises(SlideError) as info:
        open_slide(bad)
    message = str(info.value)
    assert message.startswith(f"slide {bad} "), message
    if "corrupt TIFF directory" not in says:
        assert message.startswith(f"slide {bad} is not a slide this runner reads: "), message
    assert says in message and "\n" not in message, message


def test_the_tile_size_that_aborted_openslide_is_one_line_and_exit_4(
    tmp_path: Path, app: App
) -> None:
    """In a subprocess: the reported file made OpenSlide abort the runner (SIGABRT, exit 134,
    no message) on its 4 TB tile buffer."""
    bad = crafted_tiff(tmp_path / "crafted.tiff", {TILE_WIDTH: SIDE, TILE_LENGTH: SIDE})
    out = tmp_path / "out"
    args = ["run", str(bad), "--config", str(app.config), "--app-dir", str(app.root)]
    proc = subprocess.run(
        [sys.executable, "-m", "tilerunner", "-q", *args, "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    _assert_one_line_error(proc.returncode, proc.stderr, "slide", str(bad), "tiles of 1048576")
    assert not out.exists() or not any(out.iterdir())


def test_a_slide_within_the_bounds_still_opens(tmp_path: Path) -> None:
    """The crafting itself is sound: untouched, the same file opens and reads."""
    good = crafted_tiff(tmp_path / "plain.tiff", {})
    slide = open_slide(good, mpp=4.0)
    assert slide.info.level_dimensions == ((64, 64),)
    assert slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)
    slide.close()
