"""The main job on the bundled demo, end to end, with real components only.

1. a Docker engine (reused, or a private dockerd); no registry: none is needed;
2. `builder base build`: the inference base image, offline inside, from a host wheelhouse,
   written into the local image store (the builder's default settings, as a user's own
   commands later use them). The first time it also makes its base OS (Debian bookworm with
   Python 3.11 by debootstrap from the Debian mirror, no Docker Hub) and downloads the
   wheelhouse from PyPI, each step shown as it goes;
3. `build customer-x --load --oci-layout out/...`: the customer image from customers/ with the
   bundled local model registry (demo/registry) and weights folder (demo/production), on the
   base from the store; it lands in the store too, in the Docker engine and as a layout folder;
4. `docker run` of that image on a synthetic sample slide, mounted read-only.

Files it makes land under out/demo/; the base and customer images stay in the local image
store, so `build customer-x` works afterwards with no server running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.docker_engine import ensure_engine  # noqa: E402

OUT = ROOT / "out" / "demo"
CUSTOMER = "customer-x"
RUNNER_UID = 10001  # the base image's non-root user


def step(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def run(*args: str, env: dict[str, str], echo: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (its stderr shows progress); stop the demo with its message if it fails."""
    result = subprocess.run(args, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, check=False)
    if echo or result.returncode != 0:
        print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        sys.exit(
            f"demo: `{' '.join(args[:3])} ...` failed (exit {result.returncode}); see the message above"
        )
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo takes no options: --help (or anything unknown) prints usage and runs nothing."""
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description=__doc__.split("\n\n")[0],
        epilog="Steps:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    step("starting a Docker engine (for the base image build and the sample run only)")
    engine = ensure_engine()
    try:
        # The builder's own defaults (builder.toml, the user cache): what `build` uses later.
        env = {**os.environ, **engine.env()}
        builder = [sys.executable, "-m", "builder"]
        step(
            "builder base build  (ONNX Runtime + tile runner, offline from a wheelhouse, into the "
            "local image store; the first time also the base OS by debootstrap, ~3 min, and the "
            "wheelhouse from PyPI)"
        )
        run(*builder, "base", "build", env=env)

        step(
            f"build {CUSTOMER} --load  (bundled demo registry and weights; demo models, NOT clinical)"
        )
        layout = OUT / f"{CUSTOMER}.oci"
        built = run(
            *builder,
            "build",
            CUSTOMER,
            "--load",
            "--oci-layout",
            str(layout),
            "--json",
            env=env,
            echo=False,
        )
        report = json.loads(built.stdout)["result"]
        for layer in report["layers"]:
            if layer["new"]:
                print(f"layer {layer['name']:<16} {layer['size']:>10,} B  {layer['digest'][:19]}")
        print(f"image {report['image']}@{report['manifest_digest']}")

        step("sample slide: a synthetic pyramidal TIFF with known carcinoma regions and mitoses")
        slides = OUT / "slides"
        slide = slides / "demo-slide.tiff"
        if not slide.exists():
            run(
                sys.executable,
                "-m",
                "tilerunner",
                "demo",
                "slide",
                str(slide),
                "--size",
                "8192",
                env=env,
            )

        step(f"docker run {report['image']} run /slides/{slide.name}")
        results = OUT / "results"
        results.mkdir(parents=True, exist_ok=True)
        os.chown(results, RUNNER_UID, RUNNER_UID)
        run(
            "docker", "run", "--rm", "--network", "none",
            "-v", f"{slides}:/slides:ro", "-v", f"{results}:/out",
            report["image"], "run", f"/slides/{slide.name}", "--out", "/out/demo-slide", "--no-progress",
            env=env,
        )  # fmt: skip
        summary_files = sorted(results.glob("demo-slide/**/summary.json"))
        step("done")
        print(f"image      {report['image']}@{report['manifest_digest']}")
        print(
            f"           in the local image store {report['outputs']['store']} (`builder images`)"
        )
        print("           loaded into the Docker engine at", engine.host)
        print(
            f"OCI layout {layout}  (skopeo inspect oci:{layout}:{report['image'].rsplit(':', 1)[1]})"
        )
        print(f"results    {results / 'demo-slide'}")
        for path in summary_files:
            features = json.loads(path.read_text())["deterministic"]["features"]
            found = ", ".join(
                f"{name}: {f.get('regions', f.get('count'))}"
                for name, f in sorted(features.items())
            )
            print(f"summary    {path}  ({found})")
        print(
            "\nThe base and customer images stay in the local image store. Rebuild customer-x with"
            "\nno server running (no registry, no Docker engine); both give the digest above:"
            f"\n  .venv/bin/build {CUSTOMER}"
            f"\n  .venv/bin/build {CUSTOMER} --locked --offline"
            "\nSend it on with --push (a registry), --load (a Docker engine) or --oci-layout DIR."
            "\nThe Docker engine keeps running only if it was already running before."
        )
        return 0
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
