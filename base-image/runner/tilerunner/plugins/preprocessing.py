"""Preprocessing plug-ins: float32 tile arithmetic compiled into the model's ONNX graph.

The runner hands uint8 tiles to ONNX Runtime; a small graph in front of the model casts
them to float32, puts them in the model's layout and applies these steps, so normalisation
runs inside ORT (on the GPU with CUDA) instead of as float32 copies on the host. Each class
also has a numpy `apply` with the same arithmetic, used by tests to check the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tilerunner.param_schema import constraint
from tilerunner.plugins.registry import Registry


class GraphSink(Protocol):
    """What a preprocessing step needs to add nodes (see models.PreGraph)."""

    def const(self, value: np.ndarray, prefix: str = ...) -> str:
        """Add a constant tensor; its name."""

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        """Add a node; the name of its output."""


class Preprocessor(Protocol):
    """A preprocessing step, compiled into the model's graph (and in numpy for checks)."""

    def onnx(self, g: GraphSink, x: str, layout: str) -> str:
        """Add nodes computing this step on float32 tensor `x`; return the output name."""
        ...

    def apply(self, x: np.ndarray, layout: str) -> np.ndarray:
        """The same arithmetic in numpy (reference implementation)."""
        ...


PREPROCESSING: Registry[Preprocessor] = Registry("preprocessing")
_NON_ZERO = {"not": {"const": 0}}  # a divisor


def _channel_shape(layout: str) -> tuple[int, ...]:
    return (1, 3, 1, 1) if layout == "NCHW" else (1, 1, 1, 3)


def _per_channel(value: float | Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size not in (1, 3):
        raise ValueError(f"{name} must be a number or a list of 3 numbers (one per channel)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return np.broadcast_to(arr, (3,)).astype(np.float32)


@PREPROCESSING.register
@dataclass(frozen=True)
class Normalization:
    """x / factor (e.g. factor 255 maps uint8 to [0, 1])."""

    factor: float = field(default=255.0, metadata=constraint(**_NON_ZERO))

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int | float) or isinstance(self.factor, bool):
            raise ValueError("factor must be a number")
        if not self.factor or not np.isfinite(self.factor):
            raise ValueError("factor must be a finite non-zero number")

    def onnx(self, g: GraphSink, x: str, layout: str) -> str:
        """x / factor, as graph nodes."""
        return g.op("Div", [x, g.const(np.array(self.factor, np.float32), "factor")])

    def apply(self, x: np.ndarray, layout: str) -> np.ndarray:
        """x / factor, in numpy."""
        return np.asarray(x / np.float32(self.factor), np.float32)


@PREPROCESSING.register
@dataclass(frozen=True)
class MeanStd:
    """(x - mean) / std per channel (numbers or lists of 3, RGB order)."""

    mean: float | list[float] = field(
        default_factory=lambda: [0.0, 0.0, 0.0], metadata=constraint(minItems=3, maxItems=3)
    )
    std: float | list[float] = field(
        default_factory=lambda: [1.0, 1.0, 1.0],
        metadata=constraint(
            minItems=3, maxItems=3, items={"type": "number", "not": {"const": 0}}, **_NON_ZERO
        ),
    )

    def __post_init__(self) -> None:
        _per_channel(self.mean, "mean")
        std = _per_channel(self.std, "std")
        if np.any(std == 0):
            raise ValueError("std must be non-zero")

    def onnx(self, g: GraphSink, x: str, layout: str) -> str:
        """(x - mean) / std per channel, as graph nodes."""
        shape = _channel_shape(layout)
        mean = g.const(_per_channel(self.mean, "mean").reshape(shape), "mean")
        std = g.const(_per_channel(self.std, "std").reshape(shape), "std")
        return g.op("Div", [g.op("Sub", [x, mean]), std])

    def apply(self, x: np.ndarray, layout: str) -> np.ndarray:
        """(x - mean) / std per channel, in numpy."""
        shape = _channel_shape(layout)
        mean = _per_channel(self.mean, "mean").reshape(shape)
        std = _per_channel(self.std, "std").reshape(shape)
        return np.asarray((x - mean) / std, np.float32)
