"""Write the bundled demo: a local model registry (demo/registry) and production store (demo/production).

The ONNX models come from tilerunner.demo_models (deterministic, DEMO ONLY, NOT CLINICAL); the
records have the shape a clearml-server answers with (32-hex ids, `project` as a project id with
its name in `projects/<id>.yaml`), the production folder the layout `builder publish` writes
(`<task id>/<model id>/model.onnx` + `publish-manifest.json` naming the model). Re-running writes byte-identical files, and
tests/test_demo.py checks that the committed demo is what this script writes.

    python scripts/make_demo_registry.py [--out demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import yaml
from tilerunner.demo_models import write_demo_models

#: demo model name -> (registry id, task id, registry name, published)
MODELS = {
    "carcinoma-demo": (
        "a957f623e6d34159a07aec1b8323eb54",
        "5c6b4a2b1e8d4a1f9f0e3c2d1b0a9f8e",
        "carcinoma v3 (demo)",
        True,
    ),
    "mitosis-demo": (
        "3fcf116cae4f461a85bea1fd4913993f",
        "81a2d3c4e5f60718293a4b5c6d7e8f90",
        "mitosis v1 (demo)",
        True,
    ),
    "carcinoma-demo-ft": (
        "9b0e6d1c2a3f4e5d8c7b6a5f4e3d2c1b",
        "77c1e2d3c4b5a69788796a5b4c3d2e1f",
        "carcinoma v3 fine-tuned stain B (demo)",
        True,
    ),
    "mitosis-demo-ft": (
        "2d4f6a8c0e1b3d5f7a9c1e3b5d7f9a1c",
        "64b2c3d4e5f60718293a4b5c6d7e8f91",
        "mitosis v1 fine-tuned stain B (demo)",
        True,
    ),
}
#: A candidate that is not published yet: shows the release gate (`--allow-unpublished`).
CANDIDATE = (
    "c0ffee00c0ffee00c0ffee00c0ffee00",
    "0ddba11c0ffee00c0ffee00c0ffee001",
    "mitosis v2 candidate (demo)",
)
PUBLISHED_AT = "2026-11-01T00:00:00Z"
#: The demo project: models and tasks hold its id, as on a ClearML server.
PROJECT_ID, PROJECT_NAME = "4e1c3b2a5d6f47988a9b0c1d2e3f4a5b", "pathology/demo"


def _record(
    model_id: str,
    task_id: str,
    name: str,
    ready: bool,
    design: Mapping[str, object],
    description: str,
) -> dict[str, object]:
    return {
        "id": model_id,
        "name": name,
        "task": task_id,
        "uri": f"s3://training-artifacts/pathology/{task_id}/models/model.onnx",
        "ready": ready,
        "framework": "ONNX",
        "tags": ["demo", "not-clinical"],
        "project": PROJECT_ID,
        "system_tags": [],
        "comment": description,
        # ClearML keeps a model's configuration as text (HOCON or JSON) in design.design.
        "design": {"design": json.dumps(design, indent=2, sort_keys=True)},
    }


def _write_yaml(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=True, width=100))


def write_demo(out: Path) -> None:
    registry, production = out / "registry", out / "production"
    for folder in (registry, production):
        shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = {m.name: m for m in write_demo_models(Path(tmp))}
        for name, (model_id, task_id, title, ready) in MODELS.items():
            m = models[name]
            design = {
                "preprocessing": m.preprocessing,
                "postprocessing": m.postprocessing,
                "params": m.params,
            }
            _write_yaml(
                registry / "models" / f"{model_id}.yaml",
                _record(model_id, task_id, title, ready, design, m.description),
            )
            _write_yaml(
                registry / "tasks" / f"{task_id}.yaml",
                {
                    "id": task_id,
                    "name": f"train {name}",
                    "type": "training",
                    "status": "completed",
                    "project": PROJECT_ID,
                },
            )
            folder = production / task_id / model_id
            folder.mkdir(parents=True)
            shutil.copyfile(m.path, folder / "model.onnx")
            manifest = {
                "manifest_version": 1,
                "model_id": model_id,
                "model_name": title,
                "task_id": task_id,
                "source_uri": f"s3://training-artifacts/pathology/{task_id}/models/model.onnx",
                "files": [{"name": "model.onnx", "size": m.size, "sha256": m.sha256}],
                "published_by": "demo",
                "published_at": PUBLISHED_AT,
            }
            (folder / "publish-manifest.json").write_text(
                json.dumps(manifest, indent=2, sort_keys=True) + "\n"
            )
        _write_yaml(
            registry / "projects" / f"{PROJECT_ID}.yaml",
            {"id": PROJECT_ID, "name": PROJECT_NAME, "basename": PROJECT_NAME.rsplit("/", 1)[-1]},
        )
        model_id, task_id, title = CANDIDATE
        m = models["mitosis-demo-ft"]
        design = {
            "preprocessing": m.preprocessing,
            "postprocessing": m.postprocessing,
            "params": m.params,
        }
        _write_yaml(
            registry / "models" / f"{model_id}.yaml",
            _record(model_id, task_id, title, False, design, m.description),
        )
        _write_yaml(
            registry / "tasks" / f"{task_id}.yaml",
            {
                "id": task_id,
                "name": "train mitosis v2",
                "type": "training",
                "status": "in_progress",
                "project": PROJECT_ID,
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "demo")
    write_demo(parser.parse_args().out)


if __name__ == "__main__":
    main()
