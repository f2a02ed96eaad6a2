#!/usr/bin/env python3
"""Write the demo ONNX models (DEMO ONLY, NOT CLINICAL) deterministically into a folder.

    python scripts/make_demo_models.py OUT_DIR [--only carcinoma-demo ...]

Writes OUT_DIR/<name>/model.onnx for carcinoma-demo, carcinoma-demo-ft, mitosis-demo and
mitosis-demo-ft, and OUT_DIR/demo-models.json (sha256, size, params, pre/postprocessing).
Same code -> byte-identical files. See base-image/README.md for what each model does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tilerunner.demo_models import CATALOGUE, write_demo_models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="+", choices=sorted(CATALOGUE), default=None)
    args = parser.parse_args()
    for model in write_demo_models(args.out, args.only):
        print(f"{model.sha256}  {model.size:>8}  {model.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
