"""Benchmark: `models list` against a ClearML server holding more than one page of models.

Seeds the test bed's clearml-server emulation (server paging: at most ``max_page_size`` per
page, 500 by default, ``--max-page-size`` for a deployment that lowers it) with server-shaped
data and lists every non-archived model two ways, in the same run, through the real clearml
SDK (APIClient over the builder's capped StrictSession):

* baseline: what the builder did before, generalised to all pages: ``models.get_all`` for
  the ids, then one ``models.get_by_id`` per model (design parsed per model);
* builder: :meth:`ClearMLRegistry.list_models`: every page with ``only_fields``, no refetch
  (archived models are read and left out by the builder, so archiving meanwhile shifts none).

    .venv/bin/python benchmarks/models_list.py [--models 1000] [--max-page-size 500]

Prints requests and seconds of each, and the ratios baseline / builder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.clearml_emulator import ClearMLEmulator, realistic_seed  # noqa: E402

CONF = """\
api {{
    api_server: "{url}"
    credentials {{ access_key: "{key}", secret_key: "{secret}" }}
    http.retries {{ total: 2, connect: 2, read: 2, redirect: 2, status: 2,
                   backoff_factor: 0.2, backoff_max: 2 }}
    http.wait_on_maintenance_forever: false
}}
"""


def _seed_for(listed: int) -> dict[str, list[dict[str, object]]]:
    """Server-shaped data with `listed` non-archived models (about 1 in 7 is archived)."""
    total = listed
    while True:
        data = realistic_seed(models=total)
        visible = sum("archived" not in m["system_tags"] for m in data["models"])
        if visible >= listed:
            return data
        total += listed - visible


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000, help="models to list (non-archived)")
    parser.add_argument("--max-page-size", type=int, default=500, help="the server's page cap")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        ClearMLEmulator(max_page_size=args.max_page_size) as server,
    ):
        server.seed(_seed_for(args.models))
        conf = Path(tmp) / "clearml.conf"
        conf.write_text(
            CONF.format(url=server.url, key=server.access_key, secret=server.secret_key)
        )
        os.environ.update(
            CLEARML_CONFIG_FILE=str(conf),
            CLEARML_API_HOST=server.url,
            CLEARML_API_ACCESS_KEY=server.access_key,
            CLEARML_API_SECRET_KEY=server.secret_key,
            CLEARML_CACHE_DIR=str(Path(tmp) / "cache"),
        )
        from builder.cook.registries import parse_design
        from builder.cook.registries.clearml import ClearMLRegistry

        registry = ClearMLRegistry()
        registry._api()  # log in before timing either way
        api = registry._api()

        server.clear_journal()
        start = time.perf_counter()
        ids = [
            m.id
            for m in registry._get_all(
                "models", {"system_tags": ["-archived"], "only_fields": ["id"]}
            )
        ]
        for model_id in ids:
            m = api.models.get_by_id(model=model_id)
            with contextlib.suppress(Exception):  # the old code failed on free-text designs
                parse_design(m.design, model_id)
        baseline_s, baseline_calls = time.perf_counter() - start, len(server.journal)

        server.clear_journal()
        start = time.perf_counter()
        listed = registry.list_models()
        builder_s, builder_calls = time.perf_counter() - start, len(server.journal)

    assert len(listed) == len(ids), (len(listed), len(ids))
    print(f"models listed: {len(listed)} (server page cap {args.max_page_size})")
    print(
        f"baseline (get_all + get_by_id per model): {baseline_calls:5d} requests {baseline_s:7.2f} s"
    )
    print(
        f"builder  (all pages, only_fields)        : {builder_calls:5d} requests {builder_s:7.2f} s"
    )
    print(
        f"ratio baseline/builder: requests {baseline_calls / builder_calls:.1f}x, "
        f"time {baseline_s / builder_s:.1f}x"
    )


if __name__ == "__main__":
    main()
