#!/usr/bin/env python3
"""Write a synthetic pyramidal TIFF slide and its ground truth (DEMO DATA, NOT CLINICAL).

    python scripts/make_slide.py OUT.tiff [--size 8192] [--seed 1] [--palette A|B]
        [--no-tissue] [--no-pyramid] [--compression jpeg|deflate] [--vendor generic|aperio]
        [--workers N]

Levels are top-level IFDs (OpenSlide reads them as a pyramid), mpp is in the resolution tags
(or an Aperio description). OUT.truth.json beside it lists tissue and carcinoma polygons and
mitosis centres in level-0 pixels. --size 50000 makes the benchmark slide (a few minutes).
"""

from __future__ import annotations

import sys

from tilerunner.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["demo", "slide", *sys.argv[1:]]))
