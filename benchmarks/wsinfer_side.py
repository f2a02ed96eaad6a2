#!/usr/bin/env python3
"""The WSInfer side of benchmarks/runner.py --suite wsinfer; runs in the benchmark venv.

Not run by hand: benchmarks/runner.py creates the venv (torch, torchvision, wsinfer from
benchmarks/requirements-wsinfer.txt) and calls this file with that venv's Python.

* ``export OUT ARCH``: the benchmark ResNet (benchmarks/resnet.py weights) loaded into
  `torchvision.models.<arch>`, saved as TorchScript with WSInfer's model config (the
  ImageNet transform), plus the logits of a fixed random batch, so that the caller checks that
  WSInfer's network and the runner's ONNX compute the same function.
* ``run SLIDE MODEL_DIR OUT``: WSInfer 0.6's own steps on one slide, as `wsinfer run` does
  them: tissue segmentation and patching, then `run_inference` (torch DataLoader with
  `--num-workers` processes, batch 32, level-0 reads resized to the model's spacing). Prints
  one JSON line: tiles, seconds and CPU seconds (this process and its DataLoader workers) of
  the inference pass, patching seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resnet  # noqa: E402  (benchmarks/ is not a package)

CONFIG = "config.json"
WEIGHTS = "model.pt"


def export(out: Path, arch: str, seed: int) -> None:
    """TorchScript + WSInfer config + reference logits of `arch` with the benchmark weights."""
    import numpy as np

    torch = importlib.import_module("torch")  # the benchmark venv's; untyped here
    torchvision = importlib.import_module("torchvision")
    weights = resnet.state_dict(arch, classes=2, seed=seed)
    model = getattr(torchvision.models, arch)(num_classes=2)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise SystemExit(f"state dict does not fit {arch}: {missing} {unexpected}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out / WEIGHTS))
    config: dict[str, Any] = {
        "spec_version": "1.0",
        "architecture": arch,
        "num_classes": 2,
        "class_names": ["other", "positive"],
        "patch_size_pixels": 224,
        "spacing_um_px": 0.5,
        "transform": [
            {"name": "Resize", "arguments": {"size": 224}},
            {"name": "ToTensor"},
            {
                "name": "Normalize",
                "arguments": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            },
        ],
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    x = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(config["transform"][2]["arguments"]["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(config["transform"][2]["arguments"]["std"]).view(1, 3, 1, 1)
        logits = model((t - mean) / std).numpy()
    np.save(out / "probe-tiles.npy", x)
    np.save(out / "probe-logits.npy", logits)


def run(slide: Path, model_dir: Path, out: Path, batch_size: int, workers: int) -> None:
    """WSInfer's patching then its inference loop on `slide`; one JSON line of figures."""
    import os

    os.environ["WSINFER_FORCE_CPU"] = "1"
    # the benchmark venv's modules, untyped here (wsinfer/cli/infer.py calls them the same way)
    local_model = importlib.import_module("wsinfer.modellib.models").LocalModelTorchScript
    run_inference = importlib.import_module("wsinfer.modellib.run_inference").run_inference
    patch = importlib.import_module("wsinfer.patchlib").segment_and_patch_directory_of_slides
    model_config = importlib.import_module("wsinfer_zoo.client").ModelConfiguration

    wsi_dir = out / "slides"
    wsi_dir.mkdir(parents=True, exist_ok=True)
    link = wsi_dir / slide.name
    if not link.exists():
        link.symlink_to(slide)
    results = out / "results"
    config = model_config.from_dict(json.loads((model_dir / CONFIG).read_text()))
    model = local_model(config=config, model_path=str(model_dir / WEIGHTS))
    t0 = time.perf_counter()
    patch(
        wsi_dir=wsi_dir,
        save_dir=results,
        patch_size_px=config.patch_size_pixels,
        patch_spacing_um_px=config.spacing_um_px,
    )
    patch_s = time.perf_counter() - t0
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, c0 = time.perf_counter(), time.process_time()
    failed_patching, failed_inference = run_inference(
        wsi_dir=wsi_dir,
        results_dir=results,
        model_info=model,
        batch_size=batch_size,
        num_workers=workers,
    )
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
    if failed_patching or failed_inference:
        raise SystemExit(
            f"WSInfer failed: patching {failed_patching}, inference {failed_inference}"
        )
    [csv] = (results / "model-outputs-csv").glob("*.csv")
    tiles = sum(1 for _ in csv.open()) - 1
    # VmHWM, not ru_maxrss: the latter counts the parent's memory from before the exec
    status = Path("/proc/self/status").read_text().splitlines()
    rss = next(int(x.split()[1]) for x in status if x.startswith("VmHWM:")) / 1024
    figures = {"tiles": tiles, "tiles_s": wall, "tiles_cpu_s": cpu, "patch_s": patch_s}
    print(json.dumps({**figures, "peak_rss_mb": rss, "csv": str(csv)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("out", type=Path)
    e.add_argument("arch", choices=sorted(resnet.ARCHS))
    e.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("slide", type=Path)
    r.add_argument("model_dir", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "export":
        export(args.out, args.arch, args.seed)
    else:
        run(args.slide, args.model_dir, args.out, args.batch_size, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
