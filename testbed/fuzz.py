"""The fuzz target of everything the builder reads from outside (``scripts/fuzz.py`` drives it).

One small world on disk (a customer repository with one registry model and one manual model,
a local model registry, a production store with its publish manifest, the customer's lock and
a fleet file) and one entry point, :func:`exercise`: the first byte of an input picks which
document of the world it replaces, the rest is that document's bytes (``@ROOT@`` stands for
the world's folder, so a lock's paths stay valid). The document is then read the way the
builder reads it: alone, by its own reader (fast: most inputs), or, when the first byte's
high bit is set, with the whole world (``cook``: load, validate, resolve or read the lock,
expand, the runner contract check, the verbose config's bytes). Bad input
must end in a :class:`~builder.errors.BuilderError` of one line; anything else is what the
CLI reports as an internal error (exit 70), and is written to the findings folder.

``scripts/fuzz.py`` runs atheris (libFuzzer, coverage-guided) over :func:`exercise`;
``tests/test_fuzz.py`` fuzzes for a bounded time in the suite and replays the kept corpus
(``tests/data/fuzz-corpus``) every run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import git
import yaml

from builder import yamldoc
from builder.cook.fetch import Cache
from builder.cook.load import load_customer
from builder.cook.lock import make_lock, models_from_lock, parse_lock, render
from builder.cook.registries.opener import open_registry
from builder.cook.stage import complete_hashes, cook
from builder.cook.storage import open_store, read_manifest
from builder.errors import BuilderError
from builder.fleet.fleetfile import load_fleet
from builder.image.contract import (
    Contract,
    check_config,
    parse_contract,
    require_valid,
    runner_contract_from_source,
)
from builder.settings import Settings

ROOT: Final = Path(__file__).resolve().parents[1]
PLACEHOLDER: Final = b"@ROOT@"
AUTO_ID: Final = "0123456789abcdef0123456789abcdef"
TASK_ID: Final = "fedcba9876543210fedcba9876543210"
PROJECT_ID: Final = "00112233445566778899aabbccddeeff"
WEIGHTS: Final = b"registry weights"
MANUAL_WEIGHTS: Final = b"manual weights"
DESIGN: Final = {
    "preprocessing": [{"cls": "Normalization", "params": {"factor": 255.0}}],
    "postprocessing": [{"cls": "BinaryClassification", "params": {"threshold": 0.5}}],
    "params": {"file": "model.onnx", "tile_size": 64, "mpp": 2.0},
}
CUSTOMER: Final = b'version: 1\ncustomer: customer-x\nbase_image:\n  version: "~=2.4"\n'
ANALYSIS: Final = f"""\
analyses:
- name: breast
  models:
    carcinoma_model:
      sourcing: auto
      reference: {AUTO_ID}
    mitosis_model:
      sourcing: manual
      reference: weights/mitosis
      preprocessing:
      - {{cls: Normalization, params: {{factor: 255.0}}}}
      - {{cls: MeanStd, params: {{mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}}}
      postprocessing:
      - {{cls: MaskToObjects, params: {{threshold: 0.6, min_area_um2: 12.0, max_area_um2: 200.0}}}}
      params: {{file: model.onnx, tile_size: 64, mpp: 0.5, classes: [background, mitosis]}}
  features:
  - cls: Carcinoma
    models: {{classification_model: carcinoma_model}}
    params: {{min_region_area_um2: 500}}
  - cls: Mitosis
    models: {{segmentation_model: mitosis_model}}
    depends_on: [Carcinoma]
    params: {{merge_distance_um: 4.0}}
""".encode()
FLEET: Final = b"fleet_version: 1\ncustomers:\n- name: customer-x\n  repo: repo\n"


@dataclass(frozen=True)
class Document:
    """One document of the world: where it lives (relative to the world) and how it is read."""

    path: str
    read: str  # "cook", "locked" or "fleet"


#: The documents an input can replace, by the input's first byte (modulo their number).
DOCUMENTS: Final = {
    "customer": Document("repo/customer.yaml", "cook"),
    "analysis": Document("repo/analysis.yaml", "cook"),
    "lock": Document("repo/customer.lock.yaml", "locked"),
    "fleet": Document("fleet.yaml", "fleet"),
    "model": Document(f"registry/models/{AUTO_ID}.yaml", "cook"),
    "task": Document(f"registry/tasks/{TASK_ID}.yaml", "cook"),
    "design": Document(f"registry/models/{AUTO_ID}.yaml", "cook"),  # the design text alone
    "manifest": Document(f"production/{TASK_ID}/{AUTO_ID}/publish-manifest.json", "cook"),
}
KINDS: Final = tuple(DOCUMENTS)


def _record(design: str) -> bytes:
    record = {
        "id": AUTO_ID,
        "name": "carcinoma",
        "task": TASK_ID,
        "uri": f"s3://training-artifacts/{TASK_ID}/models/model.onnx",
        "ready": True,
        "framework": "ONNX",
        "tags": ["demo"],
        "project": PROJECT_ID,
        "design": {"design": design},
    }
    return yaml.safe_dump(record, sort_keys=True).encode()


class World:
    """The folder every input is read in; :meth:`reset` puts every document back."""

    def __init__(self, folder: Path, contract: Contract | None = None) -> None:
        self.folder = folder
        self.settings = Settings(
            customers=folder,
            model_registry=f"local:{folder / 'registry'}",
            production=f"file:{folder / 'production'}",
            base_repository="127.0.0.1:1/ivd/inference-base",
            image_registry="127.0.0.1:1",
            cache_dir=folder / "cache",
            root=folder,
        )
        design = json.dumps(DESIGN, sort_keys=True)
        task = {"id": TASK_ID, "name": "train", "type": "training", "status": "completed"}
        manifest = {
            "manifest_version": 1,
            "task_id": TASK_ID,
            "model_id": AUTO_ID,
            "files": [
                {
                    "name": "model.onnx",
                    "size": len(WEIGHTS),
                    "sha256": hashlib.sha256(WEIGHTS).hexdigest(),
                }
            ],
        }
        self.valid: dict[str, bytes] = {
            "customer": CUSTOMER,
            "analysis": ANALYSIS,
            "fleet": FLEET,
            "model": _record(design),
            "task": yaml.safe_dump(task, sort_keys=True).encode(),
            "design": design.encode(),
            "manifest": json.dumps(manifest, indent=2, sort_keys=True).encode(),
        }
        (folder / "production" / TASK_ID / AUTO_ID).mkdir(parents=True)
        (folder / "production" / TASK_ID / AUTO_ID / "model.onnx").write_bytes(WEIGHTS)
        (folder / "registry" / "tasks").mkdir(parents=True)
        (folder / "registry" / "models").mkdir(parents=True)
        (folder / "repo" / "weights" / "mitosis").mkdir(parents=True)
        (folder / "repo" / "weights" / "mitosis" / "model.onnx").write_bytes(MANUAL_WEIGHTS)
        self.valid["lock"] = b""
        self.reset()
        repo = git.Repo.init(folder / "repo")
        repo.index.add(["customer.yaml", "analysis.yaml", "weights/mitosis/model.onnx"])
        actor = git.Actor("Fuzz", "fuzz@example.com")
        repo.index.commit("world", author=actor, committer=actor)
        cooked = complete_hashes(
            cook(str(folder / "repo"), self.settings), Cache(folder / "cache" / "weights")
        )
        self.valid["lock"] = render(make_lock(cooked.spec, cooked.models, None))
        self.spec = load_customer(str(folder / "repo"), self.settings, worktree=True)
        self.reset()
        self.contract = contract or parse_contract(
            runner_contract_from_source(ROOT / "base-image" / "runner"), "the runner's source"
        )

    def reset(self) -> None:
        """Every document as it was: valid."""
        for kind in KINDS:
            self.place(kind, self.valid[kind])

    def place(self, kind: str, body: bytes) -> None:
        """Write ``body`` as the document ``kind`` (``@ROOT@`` replaced by the world's folder)."""
        body = body.replace(PLACEHOLDER, str(self.folder).encode())
        if kind == "design":
            body = _record(body.decode("utf-8", "replace"))
        (self.folder / DOCUMENTS[kind].path).write_bytes(body)

    def seed(self, kind: str, *, whole: bool = False) -> bytes:
        """The valid document ``kind`` as a fuzz input (read alone, or with the whole world)."""
        first = KINDS.index(kind) | (0x80 if whole else 0)
        return bytes([first]) + self.valid[kind].replace(str(self.folder).encode(), PLACEHOLDER)

    def read_alone(self, kind: str) -> None:
        """Read the document ``kind`` by its own reader, as the builder does."""
        path = self.folder / DOCUMENTS[kind].path
        if kind in ("customer", "analysis"):
            doc = yamldoc.parse(path.read_bytes(), str(path))
            yamldoc.validate(doc, "customer" if kind == "customer" else "analysis-short")
        elif kind == "lock":
            models_from_lock(
                self.spec,
                parse_lock(path.read_bytes(), self.spec),
                production=self.settings.production,
            )
        elif kind == "fleet":
            load_fleet(path, self.settings)
        elif kind in ("model", "design"):
            open_registry(self.settings.model_registry).get_model(AUTO_ID)
        elif kind == "task":
            open_registry(self.settings.model_registry).get_task(TASK_ID)
        else:
            read_manifest(open_store(self.settings.production), f"{TASK_ID}/{AUTO_ID}")

    def read(self, kind: str) -> None:
        """Read the whole world as a build does, with the document ``kind`` in it."""
        how = DOCUMENTS[kind].read
        if how == "fleet":
            load_fleet(self.folder / "fleet.yaml", self.settings)
            return
        cooked = cook(
            str(self.folder / "repo"),
            self.settings,
            worktree=True,
            locked=how == "locked",
            allow_unpublished=True,
        )
        require_valid(
            check_config(cooked.spec, self.contract, cooked.models, cooked.verbose), self.contract
        )
        yamldoc.dump(cooked.verbose)


def exercise(world: World, data: bytes) -> str | None:
    """Read one input; None when it was read or refused in one line, else what went wrong
    (the traceback of an internal error, or a refusal that is not one line)."""
    if not data:
        return None
    kind = KINDS[data[0] % len(KINDS)]
    world.reset()
    world.place(kind, data[1:])
    try:
        if data[0] & 0x80:
            world.read(kind)
        else:
            world.read_alone(kind)
    except BuilderError as exc:
        if "\n" in exc.message or "\n" in (exc.hint or ""):
            return f"{kind}: a refusal of more than one line: {exc!r}"
    except Exception:  # what the CLI would report as an internal error, exit 70
        return f"{kind}: internal error\n{traceback.format_exc()}"
    return None


def write_finding(findings: Path, data: bytes, problem: str) -> Path:
    """Keep an input that went wrong (and why) under ``findings``; return its path."""
    findings.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()  # a file name, as libFuzzer names its inputs
    (findings / f"{name}.txt").write_text(problem, encoding="utf-8")
    path = findings / name
    path.write_bytes(data)
    return path


@contextmanager
def temporary_world() -> Iterator[World]:
    """A world in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fuzz-world-") as tmp:
        yield World(Path(tmp))


def corpus_files(folders: Iterable[Path]) -> list[Path]:
    """The inputs of corpus folders (libFuzzer's: one input per file), sorted."""
    return sorted(p for folder in folders for p in folder.iterdir() if p.is_file())


def replay(world: World, folders: Iterable[Path]) -> list[tuple[Path, str]]:
    """Every input of the corpus folders read once; the ones that went wrong, and why."""
    found = []
    for path in corpus_files(folders):
        problem = exercise(world, path.read_bytes())
        if problem is not None:
            found.append((path, problem))
    return found
