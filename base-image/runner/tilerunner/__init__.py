"""Tile runner: verbose analysis config + whole-slide image -> heatmaps, GeoJSON, summary."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tilerunner")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

#: Verbose-config schema versions this runner accepts (image label com.ivd.runner.config-schemas).
CONFIG_SCHEMA_VERSIONS = (1,)
