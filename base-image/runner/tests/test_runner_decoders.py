"""Who decodes JPEG tiles: the choice, the one-line fallbacks, and the batched GPU path.

No GPU here. The real nvImageCodec wheel imports on a machine without one and fails when a
decoder is made (`RuntimeError: CUDA Runtime failure: '#35'`, seen with
nvidia-nvimgcodec-cu13 0.9.0.20): the fault-injection tests below raise exactly that. The
batched path itself is exercised through `CpuStandIn`, a stand-in with nvImageCodec's
Python API (Decoder, DecodeParams, ColorSpec, Image.cpu()) that decodes on the CPU with
imagecodecs: it tests the runner's stream building, batching, caching and identity check,
not NVIDIA's decoder, which is still to be run on a lent GPU.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import imagecodecs
import numpy as np
import pytest
import tifffile
from tilerunner import decoders
from tilerunner.config import load_config
from tilerunner.errors import DeviceError, SlideError
from tilerunner.grid import make_grid
from tilerunner.pipeline import BatchReader, RunOptions, run
from tilerunner.slide import TiffSlide, attach_decoder, open_slide
from tilerunner_testlib import App, slide

# --------------------------------------------------------------------------- stand-ins


class _Image:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def cpu(self) -> np.ndarray:
        return self.array


class CpuStandIn:
    """nvImageCodec's Python API over imagecodecs (whole standalone JPEG streams only)."""

    __version__ = "stand-in"
    offset = 0  # added to every pixel: a decoder whose pixels differ
    fail_index: int | None = None  # a stream it "cannot decode" (returns None, like the GPU)
    calls: ClassVar[list[int]] = []  # batch sizes, one entry per decode call

    class ColorSpec:
        RGB = "rgb"

    class DecodeParams:
        def __init__(self, color_spec: str) -> None:
            self.color_spec = color_spec

    class Decoder:
        def __init__(self, device_id: int = 0, options: str = "") -> None:
            assert ":fancy_upsampling=1" in options

        def decode(self, streams: Sequence[bytes], params: Any = None) -> list[_Image | None]:
            CpuStandIn.calls.append(len(streams))
            out: list[_Image | None] = []
            for i, data in enumerate(streams):
                if i == CpuStandIn.fail_index:
                    out.append(None)
                    continue
                array = imagecodecs.jpeg8_decode(bytes(data))  # no tables argument: standalone
                out.append(_Image(np.clip(array.astype(int) + CpuStandIn.offset, 0, 255)))
            return out


class NoGpu:
    """The real wheel on a machine without a GPU: imports, cannot make a decoder."""

    class Decoder:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("CUDA Runtime failure: '#35' at .../device_utils.h:32")


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[CpuStandIn]:
    monkeypatch.setattr(CpuStandIn, "offset", 0)
    monkeypatch.setattr(CpuStandIn, "fail_index", None)
    monkeypatch.setattr(CpuStandIn, "calls", [])
    monkeypatch.setattr(decoders, "_import_nvimgcodec", lambda: CpuStandIn)
    return CpuStandIn


def _absent() -> Any:
    raise ImportError("No module named 'nvidia'")


@pytest.fixture(scope="module")
def deflate_slide() -> Path:
    return slide("deflate", width=4096, seed=4, compression="deflate")


# --------------------------------------------------------------------------- choice


def test_which_requests_try_the_gpu() -> None:
    assert decoders.wanted("auto", "cuda") and decoders.wanted("nvimgcodec", "cpu")
    assert not decoders.wanted("auto", "cpu") and not decoders.wanted("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown decoder 'gpu'; use auto, cpu, nvimgcodec"):
        decoders.wanted("gpu", "cuda")


@pytest.mark.parametrize(
    ("loader", "why"),
    [
        (_absent, "nvImageCodec is not installed (No module named 'nvidia'"),
        (lambda: NoGpu, "nvImageCodec cannot make a GPU decoder here: CUDA Runtime failure"),
    ],
)
def test_no_library_or_no_gpu_falls_back_in_one_line_or_fails_when_asked(
    loader: Any, why: str
) -> None:
    def probe(decoder: decoders.BatchDecoder) -> int:
        raise AssertionError("never reached")

    choice = decoders.choose("auto", "cuda", 7, probe, loader)
    assert choice.factory is None and why in choice.note and "\n" not in choice.note
    assert choice.note.endswith("tiles decoded on the CPU")
    assert decoders.choose("auto", "cpu", 7, probe, loader) == decoders.Choice(None, "")
    with pytest.raises(DeviceError, match=re.escape(f"--decoder nvimgcodec: {why}")) as err:
        decoders.choose("nvimgcodec", "cuda", 7, probe, loader)
    assert err.value.exit_code == 6 and "\n" not in str(err.value)


def test_pixels_that_differ_are_taken_only_when_asked(stand_in: type[CpuStandIn]) -> None:
    auto = decoders.choose("auto", "cuda", 7, lambda d: 1)
    assert auto.factory is None and "differ from the CPU decoder's" in auto.note
    asked = decoders.choose("nvimgcodec", "cuda", 7, lambda d: 1)
    assert asked.factory is not None and "max |difference| 1" in asked.note
    same = decoders.choose("auto", "cuda", 7, lambda d: 0)
    assert same.factory is not None and "(identical to the CPU)" in same.note
    deflate = decoders.choose("auto", "cuda", 8, lambda d: 0)
    assert deflate.factory is None and "not JPEG (TIFF compression 8)" in deflate.note


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("which", ["synthetic", "aperio"])
def test_standalone_streams_decode_to_the_tiff_readers_pixels(
    which: str, small_slide: Path, cmu_slide: Path
) -> None:
    """JPEGTables spliced in (and the Adobe marker for RGB tiles): any JPEG decoder gives
    the pixels tifffile + imagecodecs give, on a synthetic and a real Aperio slide."""
    path = small_slide if which == "synthetic" else cmu_slide
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage) and page.compression == 7
        fh = tf.filehandle
        for index in (0, len(page.dataoffsets) // 2, len(page.dataoffsets) - 1):
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            expected, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
            stream = decoders.jpeg_stream(page.jpegtables, data, int(page.photometric))
            got = imagecodecs.jpeg8_decode(stream)
            assert np.array_equal(got, np.asarray(expected).reshape(shape[-3:])), index


# --------------------------------------------------------------------------- batched path


def test_gpu_path_reads_the_same_tiles_in_one_call_per_batch(
    stand_in: type[CpuStandIn], small_slide: Path
) -> None:
    cpu = open_slide(small_slide)
    gpu = attach_decoder(open_slide(small_slide), "nvimgcodec", "cpu")
    assert isinstance(gpu, TiffSlide)
    assert "tiles decoded on the GPU by nvImageCodec (identical to the CPU)" in gpu.info.reader
    grid = make_grid(cpu.info, 0.5, 224)
    coords = np.array([(c, r) for r in range(grid.rows) for c in range(grid.cols)])[:40]
    stand_in.calls.clear()
    a = list(BatchReader(cpu, grid, coords, batch_size=16, workers=1, prefetch=2))
    b = list(BatchReader(gpu, grid, coords, batch_size=16, workers=1, prefetch=2))
    assert all(np.array_equal(x.tiles, y.tiles) for x, y in zip(a, b, strict=True))
    assert len(stand_in.calls) == 3 and sum(stand_in.calls) > 0  # one decode call per batch


def test_a_stream_the_gpu_cannot_decode_is_a_slide_error(
    stand_in: type[CpuStandIn], small_slide: Path
) -> None:
    gpu = attach_decoder(open_slide(small_slide), "nvimgcodec", "cpu")
    stand_in.fail_index = 0
    grid = make_grid(gpu.info, 0.5, 224)
    with pytest.raises(SlideError, match="nvimgcodec cannot decode segments of level"):
        list(BatchReader(gpu, grid, np.array([[3, 3]]), batch_size=4, workers=0, prefetch=1))


def test_openslide_and_deflate_slides_stay_on_the_cpu(
    stand_in: type[CpuStandIn],
    small_slide: Path,
    deflate_slide: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tilerunner"):
        through = attach_decoder(open_slide(small_slide, reader="openslide"), "auto", "cuda")
        flat = attach_decoder(open_slide(deflate_slide), "auto", "cuda")
    assert "GPU" not in through.info.reader and "GPU" not in flat.info.reader
    lines = [r.getMessage() for r in caplog.records]
    assert any("read through OpenSlide (vendor generic-tiff)" in x for x in lines), lines
    assert any("not JPEG (TIFF compression 8)" in x for x in lines), lines
    with pytest.raises(DeviceError, match="--decoder nvimgcodec: the slide is read through"):
        attach_decoder(open_slide(small_slide, reader="openslide"), "nvimgcodec", "cuda")


def test_run_with_the_gpu_decoder_gives_the_cpu_files(
    stand_in: type[CpuStandIn], tmp_path: Path, app: App, small_slide: Path
) -> None:
    """End to end: the same result files as the CPU decoder, and the summary says who
    decoded (a decoder that cannot run stops the run before any output: exit 6)."""
    cfg = load_config(app.config, app.root)
    base = RunOptions(device="cpu", batch_size=16, workers=2)
    cpu = run(cfg, small_slide, tmp_path / "cpu", base).analyses["breast"]
    opts = RunOptions(device="cpu", batch_size=16, workers=2, decoder="nvimgcodec")
    gpu = run(cfg, small_slide, tmp_path / "gpu", opts).analyses["breast"]
    first = json.loads((cpu / "summary.json").read_text())["deterministic"]
    second = json.loads((gpu / "summary.json").read_text())["deterministic"]
    assert first["outputs"] == second["outputs"]
    assert "decoded on the GPU by nvImageCodec" in second["slide"]["reader"]
    assert "GPU" not in first["slide"]["reader"]
    decoders_absent = pytest.MonkeyPatch()
    decoders_absent.setattr(decoders, "_import_nvimgcodec", _absent)
    try:
        with pytest.raises(DeviceError, match="nvImageCodec is not installed"):
            run(cfg, small_slide, tmp_path / "none", opts)
    finally:
        decoders_absent.undo()
    assert not (tmp_path / "none" / "breast").exists()
