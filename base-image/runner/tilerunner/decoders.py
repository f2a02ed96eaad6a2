"""Who decodes a TIFF slide's stored JPEG tiles: the CPU (imagecodecs) or the GPU (nvImageCodec).

`--decoder auto` (the default) decodes on the GPU only when the run's models are on CUDA,
NVIDIA's nvImageCodec (`nvidia-nvimgcodec-cu13`, in the gpu variant of the image) imports and
makes a GPU decoder, the slide's tiles are JPEG, and probe tiles come out pixel-identical to
the CPU decoder (the same rule as the tile fast path against OpenSlide: the reader must not
change the results). Otherwise the CPU decodes and the runner logs one line saying why.
`--decoder nvimgcodec` asks for the GPU even when its pixels differ (the largest difference on
the probe tiles is recorded in summary.json's reader) and is a device error (exit 6) when it
cannot run; `--decoder cpu` never tries.

On the GPU a batch of tiles is decoded in one call (nvJPEG, the A100/H100 hardware JPEG
engine where present) and copied back to the host (~200 KB per stored tile), where the reader
cuts and assembles tiles as before; the CPU then only parses the TIFF and copies pixels.
Stream layout follows tifffile's JPEG path (`tifffile.TiffPage.decode`): a TIFF JPEG tile is
an abbreviated stream whose tables are in the JPEGTables tag; an RGB (not YCbCr) tile gets an
Adobe APP14 marker saying "no colour transform", as libjpeg is told by imagecodecs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tilerunner.errors import DeviceError

DECODERS = ("auto", "cpu", "nvimgcodec")
_JPEG = 7  # TIFF Compression: JPEG ("new-style")
_PHOTOMETRIC_RGB = 2
# APP14 "Adobe", version 100, flags 0/0, transform 0: the three channels are RGB as stored
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class BatchDecoder(Protocol):
    """Decodes many complete JPEG streams at once into RGB uint8 (h, w, 3) arrays."""

    name: str

    def decode(self, streams: Sequence[bytes]) -> list[np.ndarray]:
        """One array per stream, in order; raises on a stream it cannot decode."""
        ...


def jpeg_stream(tables: bytes | None, data: bytes, photometric: int) -> bytes:
    """A standalone JPEG stream for one TIFF tile: its JPEGTables spliced in, and the Adobe
    marker for RGB-coded tiles so that no decoder converts them from YCbCr."""
    body = data[2:] if data[:2] == b"\xff\xd8" else data
    head = b"\xff\xd8"
    if photometric == _PHOTOMETRIC_RGB:
        head += _ADOBE_RGB
    if tables:
        inner = tables[2:] if tables[:2] == b"\xff\xd8" else tables
        if inner[-2:] == b"\xff\xd9":
            inner = inner[:-2]
        head += inner
    return head + body


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """nvImageCodec prints on fd 2 when optional codec libraries (nvJPEG2000, nvTIFF) are
    absent; the runner says what matters in one line of its own."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class NvImageCodecDecoder:
    """JPEG streams decoded on the GPU by nvImageCodec, pixels copied back to the host."""

    name = "nvimgcodec"

    def __init__(self, module: Any, device_id: int = 0) -> None:
        self._nv = module
        with _quiet_stderr():
            # fancy upsampling of subsampled chroma, as libjpeg-turbo does by default
            self._decoder = module.Decoder(device_id=device_id, options=":fancy_upsampling=1")
        self._params = module.DecodeParams(color_spec=module.ColorSpec.RGB)
        self.version = str(getattr(module, "__version__", "?"))

    def decode(self, streams: Sequence[bytes]) -> list[np.ndarray]:
        """One GPU batch; raises ValueError naming the first stream that failed."""
        images = self._decoder.decode(list(streams), params=self._params)
        out = []
        for i, image in enumerate(images):
            if image is None:
                raise ValueError(f"nvImageCodec could not decode stream {i} of the batch")
            out.append(np.asarray(image.cpu())[..., :3])
        return out


def _import_nvimgcodec() -> Any:
    from nvidia import nvimgcodec  # type: ignore[import-not-found,unused-ignore]

    return nvimgcodec


@dataclass(frozen=True)
class Choice:
    """The decoder chosen for a slide: a factory (one decoder per reader thread) or None for
    the CPU path, and the line that says why."""

    factory: Callable[[], BatchDecoder] | None
    note: str


def gpu_decoder_factory(loader: Callable[[], Any] | None = None) -> Callable[[], Any]:
    """A factory of GPU decoders, after making one (raises RuntimeError saying why not)."""
    try:
        module = (loader or _import_nvimgcodec)()
    except ImportError as exc:
        raise RuntimeError(
            f"nvImageCodec is not installed ({exc}; the gpu variant of the image has it)"
        ) from None
    try:
        NvImageCodecDecoder(module)
    except Exception as exc:  # the library reports a missing GPU or driver as RuntimeError
        text = " ".join(str(exc).split())[:200]
        raise RuntimeError(f"nvImageCodec cannot make a GPU decoder here: {text}") from None
    return lambda: NvImageCodecDecoder(module)


def wanted(requested: str, device: str) -> bool:
    """Whether `--decoder requested` with models on `device` tries the GPU at all."""
    if requested not in DECODERS:
        raise DeviceError(f"unknown decoder {requested!r}; use {', '.join(DECODERS)}")
    return requested == "nvimgcodec" or (requested == "auto" and device == "cuda")


def choose(
    requested: str,
    device: str,
    compression: int,
    probe: Callable[[BatchDecoder], int],
    loader: Callable[[], Any] | None = None,
) -> Choice:
    """The decoder for a slide whose tiles use TIFF `compression`, models on `device`.

    `probe(decoder)` decodes probe tiles with `decoder` and returns the largest pixel
    difference to the CPU decoder (raising if it cannot decode them)."""
    if not wanted(requested, device):
        return Choice(None, "")
    why = ""
    diff = -1
    factory: Callable[[], Any] | None = None
    if compression != _JPEG:
        why = f"the slide's tiles are not JPEG (TIFF compression {compression})"
    else:
        try:
            factory = gpu_decoder_factory(loader)
            diff = probe(factory())
        except Exception as exc:
            why = " ".join(str(exc).split())[:300]
            factory = None
    if factory is not None and (diff == 0 or requested == "nvimgcodec"):
        shown = "identical" if diff == 0 else f"max |difference| {diff}"
        return Choice(factory, f"tiles decoded on the GPU by nvImageCodec ({shown} to the CPU)")
    if factory is not None:
        why = (
            f"nvImageCodec's pixels differ from the CPU decoder's on probe tiles (max |difference| "
            f"{diff}); --decoder nvimgcodec accepts that"
        )
    if requested == "nvimgcodec":
        raise DeviceError(f"--decoder nvimgcodec: {why}; use --decoder auto or cpu")
    return Choice(None, f"decoder: GPU decoding not used ({why}); tiles decoded on the CPU")
