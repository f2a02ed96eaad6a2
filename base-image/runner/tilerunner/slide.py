"""Whole-slide image access: OpenSlide first, a tifffile reader for plain TIFFs it rejects.

`open_slide` checks the file before any tile work (exists, is a slide, TIFF tile data inside
the file, resolution known) and raises SlideError with one line saying what is wrong.
Regions come back as RGB uint8 arrays; transparent areas (outside the scanned region) are
white. Each worker thread reads through its own handle (`Slide.clone`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tilerunner import decoders
from tilerunner.errors import DeviceError, SlideError

# tifffile logs what it cannot parse; the runner reports it as a SlideError instead
logging.getLogger("tifffile").addHandler(logging.NullHandler())
log = logging.getLogger("tilerunner")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class SlideInfo:
    """What the runner needs to know about a slide, and what the summary records."""

    path: Path
    reader: str  # "openslide 4.0.1" or "tifffile 2026.3.3"
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str  # "slide" or "override"

    @property
    def level_mpps(self) -> list[float]:
        """Microns per pixel of each level."""
        return [self.mpp * d for d in self.level_downsamples]

    def describe(self) -> dict[str, Any]:
        """The slide as summary.json records it (file, reader, levels)."""
        return {
            "file": self.path.name,
            "size_bytes": self.path.stat().st_size,
            "reader": self.reader,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "levels": [
                {"dimensions": list(d), "downsample": round(ds, 6), "mpp": round(self.mpp * ds, 6)}
                for d, ds in zip(self.level_dimensions, self.level_downsamples, strict=True)
            ],
        }


class Slide(Protocol):
    """A whole-slide image open for reading (OpenSlide or tifffile)."""

    info: SlideInfo

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` at `level`, top-left at level-0 `location`."""
        ...

    def prefetch(self, locations: list[tuple[int, int]], level: int, size: tuple[int, int]) -> None:
        """Decode at once what the next reads of these regions need (a GPU decodes batches)."""
        ...

    def clone(self) -> Slide:
        """A new handle on the same file, for another thread."""
        ...

    def close(self) -> None:
        """Release the file handle."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _rgba_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Composite RGBA over white (OpenSlide gives transparent pixels outside scanned areas)."""
    alpha = arr[..., 3]
    if alpha.min() == 255:
        return arr[..., :3]
    a = alpha[..., None].astype(np.uint16)
    rgb = (arr[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideSlide:
    """A slide read by OpenSlide (openslide-python over the openslide-bin library)."""

    def __init__(
        self, path: Path, info: SlideInfo | None = None, mpp_override: float | None = None
    ):
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        # OpenSlide errors are sticky: after one failed read every later call on the handle
        # fails with the same message. Remember the first, so a later read at another level
        # reports where the damage really is.
        self._failure: str | None = None
        self.info = info or self._info(path, mpp_override)

    def _info(self, path: Path, mpp_override: float | None) -> SlideInfo:
        import openslide

        props = self._osr.properties
        mpp, source = mpp_override, "override"
        if mpp is None:
            mpp, source = _mpp_from_props(props), "slide"
        if mpp is None:
            raise SlideError(
                f"slide {path} has no resolution metadata (openslide.mpp-x); "
                "pass --mpp with the scanner's microns per pixel"
            )
        return SlideInfo(
            path=path,
            reader=f"openslide {openslide.__library_version__} "
            f"(openslide-python {openslide.__version__})",
            vendor=str(props.get("openslide.vendor", "unknown")),
            dimensions=(int(self._osr.dimensions[0]), int(self._osr.dimensions[1])),
            level_dimensions=tuple((int(w), int(h)) for w, h in self._osr.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
            mpp=mpp,
            mpp_source=source,
        )

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` at `level`, top-left at level-0 `location`."""
        import openslide

        if self._failure is not None:
            raise SlideError(self._failure)
        try:
            image = self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            self._failure = (
                f"slide {self.info.path} is corrupt or truncated: tile data of level {level} "
                f"does not decode (reading {size[0]}x{size[1]} px at level-0 {location}): "
                f"{_one_line(exc)}"
            )
            raise SlideError(self._failure) from None
        return _rgba_to_rgb(np.asarray(image))

    def prefetch(self, locations: list[tuple[int, int]], level: int, size: tuple[int, int]) -> None:
        """Nothing: OpenSlide decodes inside read_region."""

    def clone(self) -> OpenSlideSlide:
        """A new handle on the same file, for another thread."""
        return OpenSlideSlide(self.info.path, self.info)

    def close(self) -> None:
        """Release the OpenSlide handle."""
        self._osr.close()


def _mpp_from_props(props: Any) -> float | None:
    for key in ("openslide.mpp-x", "openslide.mpp-y", "aperio.MPP"):
        try:
            value = float(props[key])
        except (KeyError, ValueError, TypeError):
            continue
        if value > 0 and math.isfinite(value):
            return value
    return None


# --------------------------------------------------------------------------- tifffile


class TiffSlide:
    """Plain pyramidal (or single-level) TIFF read with tifffile + imagecodecs.

    For TIFFs OpenSlide rejects (strips instead of tiles, pyramids in SubIFDs). Decoded
    segments (tiles or strips) are kept in a small LRU cache per handle, so a row-major
    walk decodes each stored tile about once.
    """

    _CACHE_MAX = 128  # segments (<= ~25 MB): two rows of the level being read, at most this

    def __init__(
        self,
        path: Path,
        info: SlideInfo | None = None,
        mpp_override: float | None = None,
        decoder: Callable[[], decoders.BatchDecoder] | None = None,
    ):
        import tifffile

        self._decoder_factory = decoder
        self._decoder = decoder() if decoder else None  # None: segments decoded one by one
        self._pinned: dict[tuple[int, int], np.ndarray] = {}  # the last prefetch's segments
        self._tf = tifffile.TiffFile(str(path))
        if not self._tf.series:
            self._tf.close()
            raise SlideError(_no_directory(path))
        series = self._tf.series[0]
        self._pages = [lvl.keyframe for lvl in series.levels]
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._capacity = []
        for page in self._pages:
            if page.samplesperpixel < 3 or page.dtype != np.uint8:
                self._tf.close()
                raise SlideError(
                    f"slide {path} is not an 8-bit RGB image tifffile can tile (image "
                    f"{page.index}: {page.samplesperpixel} samples per pixel of {page.dtype}); "
                    "if it should be, its TIFF directory is corrupt"
                )
            across = math.ceil(
                page.imagewidth / (page.tilewidth if page.is_tiled else page.imagewidth)
            )
            self._capacity.append(min(self._CACHE_MAX, 2 * across + 8))
        self.info = info or self._info(path, mpp_override)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level, as the TIFF directories say."""
        return tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)

    def _info(self, path: Path, mpp_override: float | None) -> SlideInfo:
        import tifffile

        dims = self.level_dimensions
        mpp, source = mpp_override, "override"
        if mpp is None:
            mpp, source = _mpp_from_tiff(self._pages[0]), "slide"
        if mpp is None:
            raise SlideError(
                f"slide {path} has no resolution metadata (TIFF resolution tags or Aperio MPP); "
                "pass --mpp with the scanner's microns per pixel"
            )
        w0, h0 = dims[0]
        downs = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        return SlideInfo(
            path=path,
            reader=f"tifffile {tifffile.__version__}",
            vendor="generic-tiff",
            dimensions=dims[0],
            level_dimensions=dims,
            level_downsamples=downs,
            mpp=mpp,
            mpp_source=source,
        )

    @property
    def compression(self) -> int:
        """The TIFF compression of the finest level's tiles (7: JPEG)."""
        return int(self._pages[0].compression)

    def _data(self, level: int, index: int) -> bytes:
        page = self._pages[level]
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        with self._lock:
            fh = self._tf.filehandle
            fh.seek(offset)
            return bytes(fh.read(count))

    def decode_with(
        self, decoder: decoders.BatchDecoder, level: int, indices: list[int]
    ) -> list[np.ndarray]:
        """The segments `indices` of `level` decoded by `decoder` in one batch."""
        page = self._pages[level]
        streams = [
            decoders.jpeg_stream(page.jpegtables, self._data(level, i), int(page.photometric))
            for i in indices
        ]
        try:
            return decoder.decode(streams)
        except Exception as exc:
            raise SlideError(
                f"slide {self.info.path}: {decoder.name} cannot decode segments of level "
                f"{level}: {_one_line(exc)}"
            ) from None

    def _segments(
        self, level: int, location: tuple[int, int], size: tuple[int, int]
    ) -> Iterator[int]:
        """Indices of the stored segments a region at `level` overlaps."""
        page = self._pages[level]
        ds = self.info.level_downsamples[level]
        x0, y0 = math.floor(location[0] / ds), math.floor(location[1] / ds)
        width, length = int(page.imagewidth), int(page.imagelength)
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = math.ceil(width / tw)
        cx0, cx1 = max(0, x0) // tw, (min(width, x0 + size[0]) - 1) // tw
        cy0, cy1 = max(0, y0) // th, (min(length, y0 + size[1]) - 1) // th
        for ty in range(cy0, cy1 + 1):
            for tx in range(cx0, cx1 + 1):
                yield ty * across + tx

    def prefetch(self, locations: list[tuple[int, int]], level: int, size: tuple[int, int]) -> None:
        """With a batch decoder: decode every segment these regions need in one call."""
        if self._decoder is None or not self._pages[level].is_tiled:
            return
        wanted = sorted({i for loc in locations for i in self._segments(level, loc, size)})
        todo = [i for i in wanted if (level, i) not in self._cache]
        arrays = self.decode_with(self._decoder, level, todo) if todo else []
        self._pinned = dict(zip(((level, i) for i in todo), arrays, strict=True))

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        cached = self._pinned.get(key)
        if cached is None:
            cached = self._cache.get(key)
        if cached is not None:
            self._cache[key] = cached
            self._cache.move_to_end(key)
            return cached
        page = self._pages[level]
        data = self._data(level, index)
        try:
            seg, _indices, shape = page.decode(
                data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader
            )
        except Exception as exc:
            raise SlideError(
                f"slide {self.info.path} is corrupt: segment {index} of level {level} "
                f"does not decode: {_one_line(exc)}"
            ) from None
        if seg is None:
            raise SlideError(f"slide {self.info.path} is corrupt: segment {index} is empty")
        arr = np.asarray(seg).reshape(shape[-3], shape[-2], -1)[..., :3]
        self._cache[key] = arr
        while len(self._cache) > self._capacity[level]:
            self._cache.popitem(last=False)
        return arr

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` at `level`, top-left at level-0 `location`."""
        page = self._pages[level]
        ds = self.info.level_downsamples[level]
        x0, y0 = math.floor(location[0] / ds), math.floor(location[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        width, length = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
        else:
            tw, th = width, int(page.rowsperstrip or length)
        across = math.ceil(width / tw)
        cx0, cx1 = max(0, x0) // tw, min(width, x0 + w) - 1
        cy0, cy1 = max(0, y0) // th, min(length, y0 + h) - 1
        if cx1 < max(0, x0) or cy1 < max(0, y0):
            return out
        for ty in range(cy0, cy1 // th + 1):
            for tx in range(cx0, cx1 // tw + 1):
                seg = self._segment(level, ty * across + tx)
                sx0, sy0 = tx * tw, ty * th
                ix0, iy0 = max(x0, sx0), max(y0, sy0)
                ix1 = min(x0 + w, sx0 + seg.shape[1], width)
                iy1 = min(y0 + h, sy0 + seg.shape[0], length)
                if ix1 <= ix0 or iy1 <= iy0:
                    continue
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = seg[
                    iy0 - sy0 : iy1 - sy0, ix0 - sx0 : ix1 - sx0
                ]
        return out

    def use_decoder(self, factory: Callable[[], decoders.BatchDecoder], note: str) -> None:
        """Decode through `factory`'s decoders from now on (this handle and its clones)."""
        self._decoder_factory, self._decoder = factory, factory()
        self.info = replace(self.info, reader=f"{self.info.reader}; {note}")

    def clone(self) -> TiffSlide:
        """A new handle on the same file, for another thread."""
        return TiffSlide(self.info.path, self.info, decoder=self._decoder_factory)

    def close(self) -> None:
        """Release the tifffile handle."""
        self._tf.close()


def _mpp_from_tiff(page: Any) -> float | None:
    desc = str(getattr(page, "description", "") or "")
    match = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc)
    if match:
        value = float(match.group(1))
        if value > 0:
            return value
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if not num or not den:
        return None
    per_unit = num / den
    um = {2: 25400.0, 3: 10000.0}.get(unit)
    if um is None or per_unit <= 1.0:  # unit "none" or the 1 px/inch default: no real resolution
        return None
    return float(um / per_unit)


# --------------------------------------------------------------------------- opening


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _header_problem(path: Path) -> str | None:
    """What is wrong with a TIFF header, or None if it is whole and points inside the file.

    The header is 8 bytes (16 for BigTIFF): byte order, magic, offset of the first directory
    (IFD); a damaged header points outside the file or at something that is not a directory."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(16)
    if head[:4] not in _TIFF_MAGIC:
        return None
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    if len(head) < (16 if big else 8):
        return f"slide {path} has a corrupt TIFF header: the file ends inside it ({size} bytes)"
    offset = int.from_bytes(head[8:16] if big else head[4:8], "little" if order == "<" else "big")
    if offset < (16 if big else 8) or offset >= size:
        return (
            f"slide {path} has a corrupt TIFF header: it points to the first image directory "
            f"at byte {offset}, outside the file ({size} bytes)"
        )
    return None


def _no_directory(path: Path) -> str:
    return _header_problem(path) or (
        f"slide {path} has a corrupt TIFF header or first image directory: no image found"
    )


#: Bounds checked before OpenSlide or tifffile allocate anything for a TIFF: a damaged or
#: crafted directory can claim any size, and OpenSlide aborts the whole process (SIGABRT, no
#: message) when an allocation fails, e.g. the 4 TB buffer of a 1,048,576 px tile.
MAX_SIDE = 1 << 20  # px a side of one image (25 x 75 mm at 0.1 um/px is 750,000 px)
MAX_SEGMENT_BYTES = 256 << 20  # one tile or strip decoded (an 8192 x 8192 px RGBA tile)
MAX_SEGMENTS = 1 << 24  # tiles or strips of one image
MAX_IMAGES = 1024  # image directories in one file (a slide has a handful; z-stacks dozens)


def _bounds_problem(index: int, page: Any) -> str | None:
    """What an image directory claims beyond the bounds above, in words, or None; an
    empty image or tile is not a size but a corrupt directory (said so, with "corrupt: ")."""
    w, h = int(page.imagewidth), int(page.imagelength)
    if w < 1 or h < 1:
        return f"corrupt: image {index} is {w} x {h} px (empty)"
    if max(w, h) > MAX_SIDE:
        return f"image {index} claims {w} x {h} px (at most {MAX_SIDE} px a side)"
    tags = page.tags
    if "TileWidth" in tags or "TileLength" in tags:  # tags, not tifffile's view of them
        what, sw, sh = "tiles", int(tags.valueof(322, 0)), int(tags.valueof(323, 0))
    else:
        what, sw, sh = "strips", w, min(int(tags.valueof(278, h) or h), h)
    if sw < 1 or sh < 1:
        return f"corrupt: image {index} has {what} of {sw} x {sh} px (empty)"
    pixel = max(4, int(page.samplesperpixel) * max(1, int(page.bitspersample) // 8))
    # a Hamamatsu NDPI level is one JPEG strip that OpenSlide decodes in parts
    if sw * sh * pixel > MAX_SEGMENT_BYTES and not (what == "strips" and page.is_ndpi):
        return (
            f"image {index} claims {what} of {sw} x {sh} px ({sw * sh * pixel} bytes each, "
            f"decoded; at most {MAX_SEGMENT_BYTES})"
        )
    count = -(-w // sw) * -(-h // sh)
    if count > MAX_SEGMENTS:
        return f"image {index} claims {count} {what} (at most {MAX_SEGMENTS})"
    return None


def _check_page(path: Path, index: int, page: Any, size: int) -> None:
    """SlideError if an image directory claims absurd sizes or data past the end of the file."""
    problem = _bounds_problem(index, page)
    if problem is not None and problem.startswith("corrupt: "):
        raise SlideError(
            f"slide {path} has a corrupt TIFF directory: {problem.removeprefix('corrupt: ')}"
        )
    if problem is not None:
        raise SlideError(
            f"slide {path} is not a slide this runner reads: {problem}; the file is corrupt "
            "or was not written by a scanner"
        )
    offsets = getattr(page, "dataoffsets", ())
    counts = getattr(page, "databytecounts", ())
    if not len(offsets):
        return
    end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
    if end > size:
        raise SlideError(
            f"slide {path} is truncated: image {index} needs {end} bytes but the "
            f"file has {size}; copy it again"
        )


def preflight_tiff(path: Path) -> None:
    """Check every image directory before any reader allocates for it: sizes within the
    bounds above (else OpenSlide may abort the process), tile data inside the file (catches
    truncated copies), at most MAX_IMAGES directories."""
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(str(path)) as tf:
            index = -1
            for index, page in enumerate(tf.pages):
                if index >= MAX_IMAGES:
                    raise SlideError(
                        f"slide {path} is not a slide this runner reads: it has more than "
                        f"{MAX_IMAGES} image directories; the file is corrupt or was not "
                        "written by a scanner"
                    )
                _check_page(path, index, page, size)
            if index < 0:
                raise SlideError(_no_directory(path))
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(
            _header_problem(path)
            or f"slide {path} is a corrupt TIFF (its header or an image directory): {_one_line(exc)}"
        ) from None


#: OpenSlide vendors whose levels are plain TIFF directories tifffile can read tile by tile.
_FAST_VENDORS = ("generic-tiff", "aperio")


def _fast_path(osr: OpenSlideSlide) -> Slide:
    """The same slide read tile by tile with tifffile + imagecodecs, if pixel-identical.

    OpenSlide's read_region costs ~2 ms of CPU per 224 px tile (ARGB compositing and
    conversions); decoding the stored JPEG/deflate tiles directly costs ~0.5 ms. Metadata
    stays OpenSlide's, and the fast reader is used only when probe regions of the finest and
    coarsest levels come out identical from both readers; otherwise OpenSlide reads.
    """
    import tifffile

    info = osr.info
    if info.vendor not in _FAST_VENDORS:
        return osr
    try:
        fast = TiffSlide(info.path, info=info)
    except Exception:
        return osr
    if fast.level_dimensions != info.level_dimensions:
        fast.close()
        return osr
    last = len(info.level_dimensions) - 1
    probes = []
    for level in sorted({0, last}):
        w, h = info.level_dimensions[level]
        size = (min(w, 512), min(h, 512))
        ds = info.level_downsamples[level]
        probes.append((level, (round((w - size[0]) / 2 * ds), round((h - size[1]) / 2 * ds)), size))
    same = True
    for lvl, loc, size in probes:
        try:
            expected = osr.read_region(loc, lvl, size)  # a SlideError here is the slide's own
        except SlideError:
            fast.close()
            raise
        try:
            same = same and np.array_equal(expected, fast.read_region(loc, lvl, size))
        except SlideError:
            same = False
    if not same:
        fast.close()
        return osr
    fast.info = SlideInfo(
        path=info.path,
        reader=f"{info.reader}; tiles decoded by tifffile {tifffile.__version__} "
        "(checked identical)",
        vendor=info.vendor,
        dimensions=info.dimensions,
        level_dimensions=info.level_dimensions,
        level_downsamples=info.level_downsamples,
        mpp=info.mpp,
        mpp_source=info.mpp_source,
    )
    osr.close()
    return fast


def _open_any(path: Path, mpp: float | None, tiff: bool) -> Slide:
    """OpenSlide, else (for TIFFs it rejects) tifffile; SlideError when neither can."""
    import openslide

    try:
        return OpenSlideSlide(path, mpp_override=mpp)
    except openslide.OpenSlideUnsupportedFormatError:
        if not tiff:
            raise SlideError(
                f"{path} is not a whole-slide image (OpenSlide does not recognise the format)"
            ) from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"slide {path} is corrupt: {_one_line(exc)}") from None
    try:
        return TiffSlide(path, mpp_override=mpp)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(
            f"{path} is not a whole-slide image OpenSlide or tifffile can read: {_one_line(exc)}"
        ) from None


def decoder_difference(slide: TiffSlide, decoder: decoders.BatchDecoder) -> int:
    """Largest pixel difference between `decoder` and the CPU on probe segments (up to 4 at
    the centre of the finest and of the coarsest level)."""
    worst = 0
    for level in sorted({0, len(slide.info.level_dimensions) - 1}):
        page = slide._pages[level]
        count = len(page.dataoffsets)
        indices = sorted({min(count - 1, max(0, count // 2 + d)) for d in (-1, 0, 1, 2)})
        got = slide.decode_with(decoder, level, indices)
        for index, array in zip(indices, got, strict=True):
            cpu = slide._segment(level, index)
            if array.shape != cpu.shape:
                raise ValueError(f"{decoder.name} gives shape {array.shape}, the CPU {cpu.shape}")
            diff = np.abs(array.astype(np.int16) - cpu.astype(np.int16))
            worst = max(worst, int(diff.max()))
    return worst


def attach_decoder(slide: Slide, requested: str, device: str) -> Slide:
    """Give a TIFF slide the decoder `--decoder` asks for with models on `device` (see
    tilerunner.decoders); logs one line when auto falls back to the CPU."""
    if not decoders.wanted(requested, device):
        return slide
    if not isinstance(slide, TiffSlide):
        why = f"the slide is read through OpenSlide (vendor {slide.info.vendor})"
        if requested == "nvimgcodec":
            raise DeviceError(f"--decoder nvimgcodec: {why}; use --decoder auto or cpu")
        log.warning("decoder: GPU decoding not used (%s); tiles decoded on the CPU", why)
        return slide
    choice = decoders.choose(
        requested, device, slide.compression, lambda d: decoder_difference(slide, d)
    )
    if choice.factory is not None:
        slide.use_decoder(choice.factory, choice.note)
    elif choice.note:
        log.warning("%s", choice.note)
    return slide


def open_slide(path: Path, *, mpp: float | None = None, reader: str = "auto") -> Slide:
    """Open `path` with OpenSlide, or tifffile for plain TIFFs OpenSlide rejects.

    reader "auto" lets tifffile decode the tiles of TIFF-based slides when that gives the same
    pixels as OpenSlide (see _fast_path); "openslide" always reads through OpenSlide.
    """
    if reader not in ("auto", "openslide"):
        raise SlideError(f"unknown reader {reader!r}; use auto or openslide")
    if not path.exists():
        raise SlideError(f"slide {path} not found")
    if not path.is_file():
        raise SlideError(f"slide {path} is not a file")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise SlideError(f"--mpp must be a positive number, not {mpp}")
    try:
        tiff = _is_tiff(path)
    except OSError as exc:
        raise SlideError(f"slide {path} cannot be read: {_one_line(exc)}") from None
    if tiff:
        preflight_tiff(path)
    slide = _open_any(path, mpp, tiff)
    # read one pixel of the coarsest level: catches slides that open but cannot decode
    last = len(slide.info.level_dimensions) - 1
    w, h = slide.info.level_dimensions[last]
    if w < 1 or h < 1:
        raise SlideError(f"slide {path} has an empty level {last}")
    slide.read_region((0, 0), last, (1, 1))
    if reader == "auto" and isinstance(slide, OpenSlideSlide):
        return _fast_path(slide)
    return slide
