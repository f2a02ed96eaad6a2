"""Built-in plug-ins, selected by `cls` in the config and configured by `params`.

To add one, write a class in the module of its kind and register it with the decorator of
that kind's registry; nothing else needs to change.
"""

from __future__ import annotations

from tilerunner.plugins.features import FEATURES
from tilerunner.plugins.postprocessing import POSTPROCESSING
from tilerunner.plugins.preprocessing import PREPROCESSING

__all__ = ["FEATURES", "POSTPROCESSING", "PREPROCESSING"]
