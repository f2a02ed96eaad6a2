"""Writing results: staged in a hidden folder, moved into place only when the run succeeded.

Layout of `--out DIR` after a run (one folder per analysis):

    DIR/<analysis>/summary.json                  counts, areas, tiles, device, models, timings
    DIR/<analysis>/<feature>.geojson             FeatureCollection for QuPath (level-0 pixels)
    DIR/<analysis>/<feature>.<heatmap>.npy       float32 (rows, cols) on the feature's tile grid
    DIR/<analysis>/<feature>.<heatmap>.png       heatmap over a slide thumbnail

While running, files go to DIR/.tilerunner-partial-*/; a failed or interrupted run leaves no
analysis folder behind (at most that hidden staging folder if the process was killed).
All files except the `run` section of summary.json are deterministic.

Every write failure becomes an OutputError naming the file; a full disk (ENOSPC, EDQUOT) is a
DiskFullError, which the worker retries (space can be freed) while other output errors are
permanent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tilerunner.errors import OutputError

STAGING_PREFIX = ".tilerunner-partial-"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OutputError):
    """No space left (or quota exceeded) on the device of an output file."""


def output_error(exc: OSError, path: Path | str, doing: str = "write") -> OutputError:
    """The OutputError for `exc` raised while `doing` `path`: one line naming the path."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in DISK_FULL:
        return DiskFullError(
            f"cannot {doing} {path}: {reason} (the output disk is full); free space there "
            "or mount a larger volume"
        )
    return OutputError(f"cannot {doing} {path}: {reason}")


@contextlib.contextmanager
def writing(path: Path | str, doing: str = "write") -> Iterator[None]:
    """Turn an OSError raised in the block into output_error(...) naming `path`."""
    try:
        yield
    except OSError as exc:
        raise output_error(exc, path, doing) from None


class OutputStage:
    """A staging folder inside the output folder, committed by renames at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.staging: Path | None = None
        self._analyses: list[str] = []

    def prepare(self) -> None:
        """Create the output folder and the staging folder (fails early if not writable)."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if exc.errno in DISK_FULL:
                raise output_error(exc, self.out_dir, "create a folder in") from None
            raise OutputError(
                f"output folder {self.out_dir} is not writable ({reason}); "
                "choose another --out or fix its permissions"
            ) from None

    def analysis_dir(self, name: str) -> Path:
        """The staging folder of one analysis (created on first use)."""
        assert self.staging is not None, "prepare() first"
        path = self.staging / name
        with writing(path, "create"):
            path.mkdir()
        self._analyses.append(name)
        return path

    def analysis_dir_path(self, name: str) -> Path:
        """The staged folder of an analysis created by analysis_dir()."""
        assert self.staging is not None and name in self._analyses
        return self.staging / name

    def commit(self) -> list[Path]:
        """Move each staged analysis folder into place, replacing an older one."""
        assert self.staging is not None
        done = []
        try:
            for name in self._analyses:
                dest = self.out_dir / name
                if dest.exists() or dest.is_symlink():
                    dest.rename(self.staging / f".old-{name}")
                (self.staging / name).rename(dest)
                done.append(dest)
        except OSError as exc:
            raise output_error(exc, self.out_dir, "move results into") from None
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        return done

    def abort(self) -> None:
        """Remove the staging folder and everything in it."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def _dump(path: Path, doc: Any, *, indent: int | None = None) -> None:
    seps = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(doc, sort_keys=True, indent=indent, separators=seps, allow_nan=False)
    with writing(path):
        path.write_text(text + "\n")


def write_geojson(path: Path, features: list[dict[str, Any]]) -> None:
    """A GeoJSON FeatureCollection (QuPath: File > Import objects)."""
    _dump(path, {"type": "FeatureCollection", "features": features})


def write_json(path: Path, doc: Any) -> None:
    """Write `doc` as indented, sorted JSON (a full disk becomes DiskFullError)."""
    _dump(path, doc, indent=2)


def write_heatmap(path: Path, array: np.ndarray) -> None:
    """Write a float32 heatmap as .npy (no pickles)."""
    with writing(path):
        np.save(path, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


def _colourise(values: np.ndarray, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """RGB and alpha for values in [0, 1]; NaN (not computed) is transparent."""
    finite = np.isfinite(values)
    v = np.clip(np.nan_to_num(values), 0.0, 1.0)
    rgb = np.empty((*values.shape, 3), np.float32)
    rgb[:] = np.asarray(colour, np.float32)
    # low values in yellow, high in the feature's colour
    low = np.asarray((250, 220, 40), np.float32)
    rgb = low + (rgb - low) * v[..., None]
    alpha = np.where(finite, 0.15 + 0.6 * v, 0.0).astype(np.float32)
    return rgb, alpha


def write_overlay(
    path: Path,
    thumbnail: np.ndarray,
    heatmap: np.ndarray,
    *,
    colour: tuple[int, int, int],
    grid_px: tuple[float, float],
    points: np.ndarray | None = None,
    max_size: int = 1024,
) -> None:
    """PNG of the heatmap blended over the thumbnail; `grid_px` is a tile's size in thumbnail px.

    `points` (thumbnail pixel coordinates) are drawn as small rings (detections).
    """
    from PIL import Image, ImageDraw

    th, tw = thumbnail.shape[:2]
    scale = min(1.0, max_size / max(th, tw))
    ow, oh = max(1, round(tw * scale)), max(1, round(th * scale))
    base = np.asarray(
        Image.fromarray(np.ascontiguousarray(thumbnail)).resize((ow, oh), Image.Resampling.BOX),
        np.float32,
    )
    values = heatmap.astype(np.float32)
    finite = np.isfinite(values)
    if finite.any():
        top = float(np.nanmax(values))
        if top > 1.0:
            values = values / top
    rgb, alpha = _colourise(values, colour)
    # nearest-neighbour expansion of the tile grid onto the output pixels
    ys = np.minimum((np.arange(oh) + 0.5) / scale / grid_px[1], heatmap.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(ow) + 0.5) / scale / grid_px[0], heatmap.shape[1] - 1).astype(int)
    a = alpha[ys[:, None], xs[None, :]][..., None]
    out = base * (1.0 - a) + rgb[ys[:, None], xs[None, :]] * a
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if points is not None and len(points):
        draw = ImageDraw.Draw(image)
        r = max(2, round(max(ow, oh) / 300))
        for x, y in points * scale:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(20, 20, 20), width=1)
    with writing(path):
        image.save(path, format="PNG", compress_level=6)


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
