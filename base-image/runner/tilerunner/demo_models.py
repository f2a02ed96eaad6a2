"""Demo ONNX models for the synthetic slides: DEMO ONLY, NOT FOR CLINICAL USE.

Built with the onnx helper API, no training framework. They really detect what they claim
on the synthetic slides of :mod:`tilerunner.synthetic`, and nothing else:

* ``carcinoma`` - tile classifier, a standard 5-layer CNN (16-64 channels, 0.74 GFLOP per
  224 px tile, ~70k parameters) whose convolutions are set by design as a colour/texture
  filter bank (stain tiers, edges, multi-scale smoothing and density thresholds) and whose
  linear head is fitted (ridge LDA, float64 numpy) on tiles rendered from a training layout.
  Output ``prob`` [N, 1]: probability that the tile is carcinoma.
* ``mitosis`` - segmentation, a 3-layer fully convolutional blob detector (very dark,
  round, ~6 um) with output ``mask`` [N, 1, 224, 224]: per-pixel mitosis probability.

Each has a "fine-tuned" variant for a second customer whose scanner renders the stain
lighter and bluer (synthetic palette "B"): the carcinoma head is refitted on both palettes
and the mitosis darkness thresholds are lowered.

Determinism: weights are rounded to multiples of 2**-12 (head: 2**-10) and stored as float32,
the graph is built in a fixed order, and no timestamps are written, so the same code writes
byte-identical files (sha256 printed by the script).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilerunner import synthetic

TILE = 224
MPP = 0.5
OPSET = 17
IR_VERSION = 8
_Q = 4096.0
_QH = 1024.0
DEMO_NOTICE = "DEMO MODEL - NOT FOR CLINICAL USE. Detects features of synthetic slides only."


def _q(a: np.ndarray, scale: float = _Q) -> np.ndarray:
    """Round to a fixed grid so that tiny float differences across machines vanish."""
    return (np.round(np.asarray(a, np.float64) * scale) / scale).astype(np.float32)


@dataclass(frozen=True)
class DemoModel:
    """A demo model as written: where, its digest, and the config it expects."""

    name: str
    path: Path
    sha256: str
    size: int
    params: dict[str, Any]
    preprocessing: list[dict[str, Any]]
    postprocessing: list[dict[str, Any]]
    description: str


# --------------------------------------------------------------------------- kernels


def _gauss(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return np.asarray(k / k.sum())


_BLUR3 = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
_SOBEL_X = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 4.0
_DIAG = np.array([[0.0, 1, 2], [-1, 0, 1], [-2, -1, 0]]) / 4.0


class _Graph:
    """Tiny builder over onnx.helper that keeps node and initializer order fixed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        from onnx import numpy_helper

        name = self._id(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self._id(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, w: np.ndarray, b: np.ndarray, stride: int = 1, relu: bool = True) -> str:
        k = w.shape[-1]
        y = self.op(
            "Conv",
            [x, self.const(_q(w), "w"), self.const(_q(b), "b")],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
        )
        return self.op("Relu", [y]) if relu else y

    def model(
        self,
        inp: str,
        in_shape: list[Any],
        out: str,
        out_shape: list[Any],
        final_name: str,
        meta: dict[str, str],
    ) -> Any:
        from onnx import TensorProto, helper

        self.nodes.append(helper.make_node("Identity", [out], [final_name], name="output"))
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(final_name, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="tilerunner.demo_models",
            producer_version="1",
            doc_string=DEMO_NOTICE,
        )
        for key, value in sorted(meta.items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model


# --------------------------------------------------------------------------- carcinoma


Layer = tuple[np.ndarray, np.ndarray, int]  # (weights OIHW, bias, stride), quantised


def _carcinoma_layers() -> list[Layer]:
    """Filter bank + smoothing/density convolutions (each followed by ReLU)."""
    w1 = np.zeros((16, 3, 3, 3))
    b1 = np.zeros(16)
    ch = 0
    for t in (0.2, 0.35, 0.5, 0.65):  # hematoxylin-like: absorbance in red
        w1[ch, 0] = -_BLUR3
        b1[ch] = 1.0 - t
        ch += 1
    for t in (0.1, 0.18):  # eosin-like: red minus green
        w1[ch, 0], w1[ch, 1] = _BLUR3, -_BLUR3
        b1[ch] = -t
        ch += 1
    for t in (0.05, 0.15):  # blue minus green: purple hue
        w1[ch, 2], w1[ch, 1] = _BLUR3, -_BLUR3
        b1[ch] = -t
        ch += 1
    for t in (0.3, 0.5):  # darkness
        w1[ch, :] = -_BLUR3 / 3.0
        b1[ch] = 1.0 - t
        ch += 1
    for k in (_SOBEL_X, -_SOBEL_X, _SOBEL_X.T, -_SOBEL_X.T, _DIAG, -_DIAG):  # nuclear edges
        w1[ch, 0] = -k
        ch += 1
    layers: list[Layer] = [(_q(w1 * 4.0), _q(b1 * 4.0), 1)]  # x4: keep activations O(1)

    def smooth(cin: int, cout: int, stride: int, thresholds: list[float]) -> Layer:
        w = np.zeros((cout, cin, 3, 3))
        b = np.zeros(cout)
        for j in range(cout):
            w[j, j % cin] = _BLUR3
            b[j] = -thresholds[j // cin]
        return _q(w), _q(b), stride

    layers.append(smooth(16, 32, 2, [0.0, 0.35]))
    layers.append(smooth(32, 32, 1, [0.0]))
    layers.append(smooth(32, 64, 2, [0.0, 0.25]))
    layers.append(smooth(64, 64, 1, [0.0]))
    return layers


def _backbone_graph(g: _Graph, x: str, layers: list[Layer]) -> str:
    for w, b, stride in layers:
        x = g.conv(x, w, b, stride)
    return g.op("Flatten", [g.op("GlobalAveragePool", [x])])


def _forward_numpy(x: np.ndarray, layers: list[Layer]) -> np.ndarray:
    """The backbone in float64 numpy, visiting only non-zero taps (sparse filter bank).

    Used to fit the head: elementwise float64 arithmetic in a fixed order gives the same
    features on every machine, where ORT's float32 kernels differ in the last bits by CPU.
    """
    h = x.astype(np.float64)
    for w, b, stride in layers:
        n, _, size, _ = h.shape
        k = w.shape[-1]
        pad = k // 2
        out_size = (size + 2 * pad - k) // stride + 1
        padded = np.pad(h, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        out = np.empty((n, w.shape[0], out_size, out_size))
        span = stride * (out_size - 1) + 1
        for j in range(w.shape[0]):
            acc = np.full((n, out_size, out_size), float(b[j]))
            for c, dy, dx in zip(*np.nonzero(w[j]), strict=True):
                acc += (
                    float(w[j, c, dy, dx])
                    * padded[:, c, dy : dy + span : stride, dx : dx + span : stride]
                )
            out[:, j] = np.maximum(acc, 0.0)
        h = out
    return np.asarray(h.mean(axis=(2, 3)))


def _render_training_tiles(
    palettes: tuple[str, ...], per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tiles (N, 224, 224, 3) uint8 and labels (1 carcinoma, 0 not) from a training layout."""
    tiles: list[np.ndarray] = []
    labels: list[int] = []
    for p_index, palette in enumerate(palettes):
        spec = synthetic.make_spec(8192, 8192, seed=424242 + p_index, palette=palette)
        rng = np.random.default_rng(7 + p_index)
        size_um = TILE * MPP
        counts = {"carcinoma": 0, "stroma": 0, "glass": 0}
        want = {"carcinoma": per_class, "stroma": per_class, "glass": per_class // 2}
        for _ in range(20000):
            if all(counts[k] >= want[k] for k in counts):
                break
            x0 = rng.uniform(0, spec.width * spec.mpp - size_um)
            y0 = rng.uniform(0, spec.height * spec.mpp - size_um)
            xs = np.linspace(x0, x0 + size_um, 9)
            gx, gy = np.meshgrid(xs, np.linspace(y0, y0 + size_um, 9))
            in_t = np.zeros(gx.shape, bool)
            in_c = np.zeros(gx.shape, bool)
            for blob in spec.tissue:
                in_t |= blob.contains(gx, gy)
            for blob in spec.carcinoma:
                in_c |= blob.contains(gx, gy)
            kind = (
                "carcinoma"
                if in_c.all()
                else "stroma"
                if in_t.all() and not in_c.any()
                else "glass"
                if not in_t.any()
                else None
            )
            if kind is None or counts[kind] >= want[kind]:
                continue
            counts[kind] += 1
            px, py = round(x0 / MPP), round(y0 / MPP)
            tiles.append(synthetic.render_region(spec, px, py, TILE, TILE, MPP))
            labels.append(1 if kind == "carcinoma" else 0)
    return np.stack(tiles), np.asarray(labels)


def _fit_head(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge LDA: w = (S + lambda I)^-1 (mu1 - mu0), scaled so the class means sit at +-4."""
    f = np.round(features.astype(np.float64) * 1024.0) / 1024.0
    pos, neg = f[labels == 1], f[labels == 0]
    mu1, mu0 = pos.mean(0), neg.mean(0)
    cov = (np.cov(pos, rowvar=False) + np.cov(neg, rowvar=False)) / 2.0
    lam = 0.05 * float(np.trace(cov)) / cov.shape[0] + 1e-6
    w = np.linalg.solve(cov + lam * np.eye(cov.shape[0]), mu1 - mu0)
    s1, s0 = float(mu1 @ w), float(mu0 @ w)
    scale = 8.0 / (s1 - s0)
    w = w * scale
    bias = -(s1 + s0) / 2.0 * scale
    return w, bias


def build_carcinoma(variant: str = "base") -> Any:
    """The carcinoma tile classifier (float32 NCHW input in [0, 1], output prob [N, 1])."""
    palettes = ("A",) if variant == "base" else ("A", "B")
    layers = _carcinoma_layers()
    tiles, labels = _render_training_tiles(palettes, per_class=32)
    x = tiles.transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    features = np.concatenate([_forward_numpy(x[i : i + 8], layers) for i in range(0, len(x), 8)])
    w, bias = _fit_head(features, labels)
    g = _Graph(f"carcinoma_{variant}")
    feats = _backbone_graph(g, "input", layers)
    logit = g.op(
        "Gemm",
        [
            feats,
            g.const(_q(w[:, None], _QH), "head_w"),
            g.const(_q(np.array([bias]), _QH), "head_b"),
        ],
    )
    prob = g.op("Sigmoid", [logit])
    return g.model(
        "input",
        ["N", 3, TILE, TILE],
        prob,
        ["N", 1],
        "prob",
        {
            "demo": "true",
            "not_for_clinical_use": "true",
            "task": "tile-classification",
            "tile_size": str(TILE),
            "mpp": str(MPP),
            "variant": variant,
            "classes": "not-carcinoma,carcinoma",
        },
    )


# --------------------------------------------------------------------------- mitosis

#: Normalisation the mitosis model expects: z = (x/255 - 0.5) / 0.25.
MITOSIS_MEAN = 0.5
MITOSIS_STD = 0.25


def build_mitosis(variant: str = "base") -> Any:
    """The mitosis blob detector (input z = (x - 0.5)/0.25, output mask [N, 1, 224, 224])."""
    shift = 0.0 if variant == "base" else -0.06  # fine-tuned: lighter "B" stain
    g = _Graph(f"mitosis_{variant}")
    blur = _gauss(5, 1.0)
    # z = (x - m)/s  ->  x = s*z + m ; a colour test "t - x_c > 0" becomes  -s*k*z_c + k*(t - m)
    s, m = MITOSIS_STD, MITOSIS_MEAN
    tests = [  # (channel weights on x, threshold): fires when sum(c * x) < threshold
        ((1.0, 0.0, 0.0), 0.28 - shift),  # very dark red: absorbance > 0.72
        ((0.0, 1.0, 0.0), 0.15 - shift),  # very dark green
        ((1 / 3, 1 / 3, 1 / 3), 0.25 - shift),  # very dark overall
        ((1.0, 0.0, 0.0), 0.24 - shift),
        ((0.0, 1.0, 0.0), 0.12 - shift),
        ((1 / 3, 1 / 3, 1 / 3), 0.21 - shift),
        ((0.5, 0.5, 0.0), 0.22 - shift),
        ((0.5, 0.0, 0.5), 0.30 - shift),
    ]
    k = 12.0
    w1 = np.zeros((8, 3, 5, 5))
    b1 = np.zeros(8)
    for j, (cw, thr) in enumerate(tests):
        for c in range(3):
            w1[j, c] = -k * s * cw[c] * blur
        b1[j] = k * (thr - m * sum(cw))
    h = g.conv("input", w1, b1)
    w2 = np.zeros((8, 8, 5, 5))
    for j in range(8):
        w2[j, j] = _gauss(5, 1.5)
    h = g.conv(h, w2, np.zeros(8))
    w3 = np.zeros((1, 8, 5, 5))
    for j in range(8):
        w3[0, j] = _gauss(5, 1.0) * 1.5
    logit = g.conv(h, w3, np.array([-3.0]), relu=False)
    mask = g.op("Sigmoid", [logit])
    return g.model(
        "input",
        ["N", 3, TILE, TILE],
        mask,
        ["N", 1, TILE, TILE],
        "mask",
        {
            "demo": "true",
            "not_for_clinical_use": "true",
            "task": "segmentation",
            "tile_size": str(TILE),
            "mpp": str(MPP),
            "variant": variant,
            "classes": "background,mitosis",
        },
    )


# --------------------------------------------------------------------------- catalogue

CARCINOMA_PARAMS = {
    "file": "model.onnx",
    "tile_size": TILE,
    "mpp": MPP,
    "input_layout": "NCHW",
    "classes": ["not-carcinoma", "carcinoma"],
}
CARCINOMA_PRE = [{"cls": "Normalization", "params": {"factor": 255.0}}]
CARCINOMA_POST = [{"cls": "BinaryClassification", "params": {"threshold": 0.5}}]
MITOSIS_PARAMS = {
    "file": "model.onnx",
    "tile_size": TILE,
    "mpp": MPP,
    "input_layout": "NCHW",
    "classes": ["background", "mitosis"],
}
MITOSIS_PRE = [
    {"cls": "Normalization", "params": {"factor": 255.0}},
    {"cls": "MeanStd", "params": {"mean": [MITOSIS_MEAN] * 3, "std": [MITOSIS_STD] * 3}},
]
MITOSIS_POST = [
    {
        "cls": "MaskToObjects",
        "params": {"threshold": 0.5, "min_area_um2": 12.0, "max_area_um2": 200.0},
    },
]

CATALOGUE: dict[str, tuple[str, str, str]] = {
    # name: (builder, variant, description)
    "carcinoma-demo": ("carcinoma", "base", "carcinoma tile classifier, synthetic stain A"),
    "carcinoma-demo-ft": ("carcinoma", "finetuned", "carcinoma classifier refit for stain B"),
    "mitosis-demo": ("mitosis", "base", "mitosis blob segmentation, synthetic stain A"),
    "mitosis-demo-ft": ("mitosis", "finetuned", "mitosis segmentation tuned for stain B"),
}


def write_demo_models(out_dir: Path, names: list[str] | None = None) -> list[DemoModel]:
    """Write each demo model to `<out_dir>/<name>/model.onnx` plus `demo-models.json`."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[DemoModel] = []
    for name in names or sorted(CATALOGUE):
        kind, variant, description = CATALOGUE[name]
        model = build_carcinoma(variant) if kind == "carcinoma" else build_mitosis(variant)
        onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString(deterministic=True)
        target = out_dir / name / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".onnx.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        carc = kind == "carcinoma"
        written.append(
            DemoModel(
                name=name,
                path=target,
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                params=dict(CARCINOMA_PARAMS if carc else MITOSIS_PARAMS),
                preprocessing=list(CARCINOMA_PRE if carc else MITOSIS_PRE),
                postprocessing=list(CARCINOMA_POST if carc else MITOSIS_POST),
                description=f"{description}. {DEMO_NOTICE}",
            )
        )
    manifest = [
        {
            "name": m.name,
            "file": f"{m.name}/model.onnx",
            "sha256": m.sha256,
            "size": m.size,
            "params": m.params,
            "preprocessing": m.preprocessing,
            "postprocessing": m.postprocessing,
            "description": m.description,
        }
        for m in written
    ]
    (out_dir / "demo-models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return written


def flops_per_tile(kind: str) -> float:
    """Multiply-adds x2 per 224 px tile of the demo architectures (for the benchmark)."""
    if kind == "carcinoma":
        layers = [
            (3, 16, 3, 224),
            (16, 32, 3, 112),
            (32, 32, 3, 112),
            (32, 64, 3, 56),
            (64, 64, 3, 56),
        ]
    else:
        layers = [(3, 8, 5, 224), (8, 8, 5, 224), (8, 1, 5, 224)]
    return float(sum(2 * cin * cout * k * k * hw * hw for cin, cout, k, hw in layers))


__all__ = [
    "CATALOGUE",
    "DEMO_NOTICE",
    "DemoModel",
    "build_carcinoma",
    "build_mitosis",
    "flops_per_tile",
    "write_demo_models",
]
