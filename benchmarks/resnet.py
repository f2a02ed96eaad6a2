"""ResNet-18 / ResNet-50 with generated weights, as ONNX built with the onnx helper API.

Benchmark models, not clinical ones: torchvision's architecture (`torchvision/models/resnet.py`,
v1.5: the stride of a bottleneck sits on its 3x3 convolution) with weights drawn from a seeded
generator the way torchvision initialises an untrained network (Kaiming-normal convolutions,
fan-out; unit batch-norm scale) plus random batch-norm statistics, so that the network computes
something less trivial than an identity. Nothing is downloaded and torch is not needed: the
weights are a state dict in torchvision's names (`layer2.0.downsample.1.running_var`), so the
WSInfer comparison loads the very same numbers into `torchvision.models.resnet18()`.

The graph is what an export from torch gives: Conv (no bias) + BatchNormalization + Relu,
MaxPool, residual Add, GlobalAveragePool, Flatten, Gemm; input `input` float32 [N, 3, 224, 224]
(NCHW, ImageNet-normalised by the runner's MeanStd preprocessing), output `logits` [N, classes].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
# Multiply-accumulates per 224 px tile x 2 (torchvision's documented GFLOPS x 2)
GFLOP_PER_TILE = {"resnet18": 3.64, "resnet50": 8.18}
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
OPSET = 17


@dataclass(frozen=True)
class _Conv:
    name: str  # state-dict prefix of the conv ("layer1.0.conv1"), its BN is `bn`
    bn: str
    cin: int
    cout: int
    k: int
    stride: int


def _blocks(arch: str) -> Iterator[tuple[str, list[_Conv], _Conv | None]]:
    """(block prefix, its convolutions in order, the downsample conv or None)."""
    kind, counts = ARCHS[arch]
    expansion = 4 if kind == "bottleneck" else 1
    cin = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
        for b in range(count):
            stride = 2 if stage > 0 and b == 0 else 1
            p = f"layer{stage + 1}.{b}"
            cout = planes * expansion
            if kind == "bottleneck":
                convs = [
                    _Conv(f"{p}.conv1", f"{p}.bn1", cin, planes, 1, 1),
                    _Conv(f"{p}.conv2", f"{p}.bn2", planes, planes, 3, stride),
                    _Conv(f"{p}.conv3", f"{p}.bn3", planes, cout, 1, 1),
                ]
            else:
                convs = [
                    _Conv(f"{p}.conv1", f"{p}.bn1", cin, planes, 3, stride),
                    _Conv(f"{p}.conv2", f"{p}.bn2", planes, planes, 3, 1),
                ]
            down = None
            if stride != 1 or cin != cout:
                down = _Conv(f"{p}.downsample.0", f"{p}.downsample.1", cin, cout, 1, stride)
            yield p, convs, down
            cin = cout


def state_dict(arch: str, classes: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights in torchvision's names (without `num_batches_tracked`)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def conv(c: _Conv) -> None:
        std = np.sqrt(2.0 / (c.cout * c.k * c.k))  # kaiming_normal_, mode="fan_out"
        out[f"{c.name}.weight"] = (rng.standard_normal((c.cout, c.cin, c.k, c.k)) * std).astype(
            np.float32
        )
        out[f"{c.bn}.weight"] = rng.uniform(0.6, 1.0, c.cout).astype(np.float32)
        out[f"{c.bn}.bias"] = rng.uniform(-0.1, 0.1, c.cout).astype(np.float32)
        out[f"{c.bn}.running_mean"] = rng.uniform(-0.2, 0.2, c.cout).astype(np.float32)
        out[f"{c.bn}.running_var"] = rng.uniform(1.0, 2.0, c.cout).astype(np.float32)

    conv(_Conv("conv1", "bn1", 3, 64, 7, 2))
    width = 64
    for _prefix, convs, down in _blocks(arch):
        for c in convs:
            conv(c)
        if down:
            conv(down)
        width = convs[-1].cout
    bound = 1.0 / np.sqrt(width)
    out["fc.weight"] = rng.uniform(-bound, bound, (classes, width)).astype(np.float32)
    out["fc.bias"] = rng.uniform(-bound, bound, classes).astype(np.float32)
    return out


def build(arch: str, weights: dict[str, np.ndarray], tile: int = 224) -> Any:
    """The ONNX ModelProto of `arch` with `weights` (from state_dict)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []
    used: set[str] = set()

    def init(name: str) -> str:
        if name not in used:
            used.add(name)
            inits.append(numpy_helper.from_array(weights[name], name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(x: str, c: _Conv, relu: bool) -> str:
        pad = c.k // 2
        y = node("Conv", [x, init(f"{c.name}.weight")], c.name, kernel_shape=[c.k, c.k],
                 strides=[c.stride, c.stride], pads=[pad] * 4)  # fmt: skip
        bn = [init(f"{c.bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        y = node("BatchNormalization", [y, *bn], c.bn, epsilon=1e-5)
        return node("Relu", [y], f"{c.bn}.relu") if relu else y

    x = conv_bn("input", _Conv("conv1", "bn1", 3, 64, 7, 2), relu=True)
    x = node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for prefix, convs, down in _blocks(arch):
        y = x
        for i, c in enumerate(convs):
            y = conv_bn(y, c, relu=i < len(convs) - 1)
        skip = conv_bn(x, down, relu=False) if down else x
        x = node("Relu", [node("Add", [y, skip], f"{prefix}.add")], f"{prefix}.relu")
    x = node("Flatten", [node("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    classes = weights["fc.bias"].shape[0]
    logits = node("Gemm", [x, init("fc.weight"), init("fc.bias")], "logits", transB=1)
    graph = helper.make_graph(
        nodes,
        arch,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, tile, tile])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "ivd-benchmarks"
    helper.set_model_props(model, {"tile_size": str(tile), "note": "BENCHMARK MODEL, random"})
    return model


def write(arch: str, path: Path, classes: int = 2, seed: int = 0) -> Path:
    """Write `arch` with generated weights to `path` (same bytes for the same arguments)."""
    import onnx

    model = build(arch, state_dict(arch, classes, seed))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.rename(path)
    return path
