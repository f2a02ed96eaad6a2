"""ONNX Runtime sessions: device choice, preprocessing compiled into the graph, I/O binding.

Each model file is loaded once per run (one session per distinct file + preprocessing, shared
by every analysis and feature using it). A small graph is prepended to the model: it takes
the uint8 NHWC tiles the reader produces, casts and transposes them and applies the
preprocessing plug-ins, so normalisation happens inside ORT (on the GPU with CUDA) and the
host never makes float32 copies of tiles. Inputs/outputs go through I/O binding.

On the CPU a batch is split into chunks that the inference threads take from one queue, each
chunk run by a single-threaded session call (`cpu_plan`): no join of all threads after every
operator, and a thread the scheduler (or a reader thread) preempts takes fewer chunks. Per
tile the arithmetic is the same as a whole-batch run, so the outputs are bit-identical
(tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tilerunner.config import ModelSpec, RunConfig
from tilerunner.cuda import cuda_status
from tilerunner.errors import ConfigError, DeviceError, ModelError
from tilerunner.plugins import FEATURES
from tilerunner.plugins.postprocessing import Kind, Prediction, raw_kind

log = logging.getLogger("tilerunner")
_STATS_LOCK = threading.Lock()

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ELEM_FLOAT, _ELEM_UINT8 = 1, 2


def select_providers(
    requested: str, available: Sequence[str], cuda_problem: str = ""
) -> tuple[str, list[str]]:
    """(device, providers) for --device auto|cpu|cuda given ORT's available providers.

    `cuda_problem` is why an installed CUDA provider cannot run here (tilerunner.cuda): auto
    then takes the CPU (the caller logs the reason), cuda is an error naming it.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu or cuda")
    if requested == "cuda" and CUDA not in available:
        raise DeviceError(
            "--device cuda: this ONNX Runtime has no CUDAExecutionProvider (providers: "
            f"{', '.join(available)}); use the gpu variant of the base image or --device cpu"
        )
    if requested == "cuda" and cuda_problem:
        raise DeviceError(
            f"--device cuda: CUDAExecutionProvider is installed but not usable: {cuda_problem}; "
            "use --device auto or cpu to run on the CPU"
        )
    if requested in ("cuda", "auto") and CUDA in available and not cuda_problem:
        return "cuda", [CUDA, CPU]
    return "cpu", [CPU]


def ort_version() -> str:
    """The ONNX Runtime version in use."""
    import onnxruntime

    return str(onnxruntime.__version__)


class PreGraph:
    """Builder for the uint8 -> model-input graph (implements preprocessing.GraphSink)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"tilerunner_pre_{prefix}_{self._n}"

    def const(self, value: np.ndarray, prefix: str = "const") -> str:
        """Add a constant tensor; its name."""
        from onnx import numpy_helper

        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        """Add a node; the name of its output."""
        from onnx import helper

        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _dims(value_info: Any) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


@dataclass
class Session:
    """One ORT session over a composed model, shared by every ModelSpec using it."""

    key: str
    sha256: str
    session: Any
    device: str
    input_name: str
    output_name: str
    output_rank: int
    fixed_batch: int | None
    tile_size: int
    layout: str
    load_s: float
    stats: dict[str, float] = field(default_factory=lambda: {"tiles": 0, "infer_s": 0.0})
    pool: ThreadPoolExecutor | None = None  # CPU: runs the sub-batches of one call at once
    splits: int = 1

    def run(self, tiles: np.ndarray) -> np.ndarray:
        """Raw output for uint8 NHWC tiles, chunked/padded to a fixed batch if the model has one."""
        if self.pool is not None and self.splits > 1 and len(tiles) > 1:
            n = len(tiles)
            # up to 4 chunks per thread (of >= 4 tiles) from one queue: a thread the scheduler
            # held back takes fewer, instead of the others waiting for its fixed share
            chunks = max(min(self.splits, n), min(self.splits * 4, n // 4))
            parts = np.array_split(np.arange(n), chunks)
            futures = [self.pool.submit(self._run, tiles[p[0] : p[-1] + 1]) for p in parts]
            return np.concatenate([f.result() for f in futures])
        if self.fixed_batch and len(tiles) != self.fixed_batch:
            outs = []
            for i in range(0, len(tiles), self.fixed_batch):
                chunk = tiles[i : i + self.fixed_batch]
                n = len(chunk)
                if n < self.fixed_batch:
                    pad = np.zeros((self.fixed_batch - n, *chunk.shape[1:]), np.uint8)
                    chunk = np.concatenate([chunk, pad])
                outs.append(self._run(chunk)[:n])
            return np.concatenate(outs)
        return self._run(tiles)

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        t0 = time.perf_counter()
        tiles = np.ascontiguousarray(tiles)
        binding = self.session.io_binding()
        if self.device == "cuda":  # uint8 crosses PCIe (4x less than float32), normalised on GPU
            value = ort.OrtValue.ortvalue_from_numpy(tiles, "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, value)
        else:
            binding.bind_cpu_input(self.input_name, tiles)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()[0]
        with _STATS_LOCK:  # sub-batches of one call finish in pool threads
            self.stats["tiles"] += len(tiles)
            self.stats["infer_s"] += time.perf_counter() - t0
        return np.asarray(out)


@dataclass
class ModelRunner:
    """A ModelSpec bound to its session: uint8 tiles in, postprocessed Prediction out."""

    spec: ModelSpec
    session: Session
    final_kind: Kind
    stats: dict[str, float] = field(
        default_factory=lambda: {"tiles": 0, "calls": 0, "infer_s": 0.0, "post_s": 0.0}
    )

    def predict(self, tiles: np.ndarray) -> Prediction:
        """Run a batch of uint8 tiles through the model and its postprocessing."""
        t0 = time.perf_counter()
        raw = self.session.run(tiles)
        t1 = time.perf_counter()
        pred = Prediction.from_raw(raw, self.spec.mpp)
        for step in self.spec.postprocessing:
            pred = step.apply(pred)
        self.stats["tiles"] += len(tiles)
        self.stats["calls"] += 1
        self.stats["infer_s"] += t1 - t0
        self.stats["post_s"] += time.perf_counter() - t1
        return pred


def _check_input(model: Any, dims: list[int | None], name: str, spec: ModelSpec, where: str) -> str:
    """The input's layout, after checking its rank, channels and size against the params."""
    if len(dims) != 4:
        raise ModelError(
            f"{where}: the model input {name!r} has rank {len(dims)}; "
            "expected a 4-d image batch (NCHW or NHWC)"
        )
    layout = spec.input_layout or ("NCHW" if dims[1] == 3 else "NHWC" if dims[3] == 3 else "")
    if not layout:
        raise ModelError(
            f"{where}: cannot tell the input layout from shape {dims}; "
            "set params.input_layout to NCHW or NHWC"
        )
    hw = dims[2:4] if layout == "NCHW" else dims[1:3]
    channels = dims[1] if layout == "NCHW" else dims[3]
    if channels not in (None, 3):
        raise ModelError(f"{where}: the model input has {channels} channels; tiles are RGB (3)")
    shown = "x".join("?" if d is None else str(d) for d in dims)
    if any(d is not None and d != spec.tile_size for d in hw):
        raise ModelError(
            f"{where}: the model input is {shown} ({layout}) but params.tile_size is "
            f"{spec.tile_size}; fix the model's registry params or the model"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    declared = meta.get("tile_size", "")
    if declared.isdigit() and int(declared) != spec.tile_size:
        raise ModelError(
            f"{where}: the model declares tile_size {declared} in its "
            f"metadata but params.tile_size is {spec.tile_size}"
        )
    return layout


def _compose(model: Any, spec: ModelSpec, where: str) -> tuple[Any, str, int | None, str]:
    """Prepend the uint8 -> input graph; return (model, output name, fixed batch, layout)."""
    from onnx import TensorProto, compose, helper

    g = model.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(
            f"{where}: the model has {len(inputs)} inputs; the runner feeds exactly "
            "one image tensor"
        )
    inp = inputs[0]
    dims = _dims(inp)
    layout = _check_input(model, dims, inp.name, spec, where)
    outputs = [o.name for o in g.output]
    output = spec.output or outputs[0]
    if output not in outputs:
        raise ModelError(
            f"{where}: params.output {output!r} is not a model output "
            f"(outputs: {', '.join(outputs)})"
        )
    elem = inp.type.tensor_type.elem_type
    if elem not in (_ELEM_FLOAT, _ELEM_UINT8):
        raise ModelError(
            f"{where}: model input type {TensorProto.DataType.Name(elem)} is not "
            "supported (float32 or uint8)"
        )
    if elem == _ELEM_UINT8 and spec.preprocessing:
        raise ModelError(
            f"{where}: the model takes uint8 input, so it normalises itself; "
            "remove the preprocessing steps"
        )
    fixed = dims[0] if dims[0] else None
    batch_dim: Any = fixed if fixed else "N"
    pre = PreGraph()
    x = "tiles"
    if elem == _ELEM_FLOAT:
        x = pre.op("Cast", [x], to=TensorProto.FLOAT)
    if layout == "NCHW":
        x = pre.op("Transpose", [x], perm=[0, 3, 1, 2])
    for step in spec.preprocessing:
        x = step.onnx(pre, x, layout)
    x_out = pre.op("Identity", [x])
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    version = opsets[0].version if opsets else 17
    pre_model = helper.make_model(
        helper.make_graph(
            pre.nodes,
            "tilerunner_pre",
            [
                helper.make_tensor_value_info(
                    "tiles", TensorProto.UINT8, [batch_dim, spec.tile_size, spec.tile_size, 3]
                )
            ],
            [helper.make_tensor_value_info(x_out, elem, None)],
            pre.inits,
        ),
        opset_imports=[helper.make_opsetid("", version)],
        ir_version=model.ir_version,
    )
    merged = compose.merge_models(pre_model, model, io_map=[(x_out, inp.name)], outputs=[output])
    return merged, output, fixed, layout


def _provider_options(device: str) -> list[dict[str, str]]:
    if device == "cuda":
        return [{"device_id": "0", "cudnn_conv_algo_search": "DEFAULT"}, {}]
    return [{}]


@dataclass(frozen=True)
class EngineOptions:
    """How ONNX Runtime sessions are made: device, threads, spinning."""

    device: str = "auto"
    threads: int = 0  # CPU inference threads; 0: one per core this process may use
    spin: bool = False  # let ORT threads spin-wait (faster alone, slower next to readers)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's cpuset counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuPlan:
    """How the CPU's inference threads are used for one model.

    `splits` threads run the chunks of each call (Session.run), each chunk a session call
    with `intra_op` ORT threads. Batch-parallel (intra_op 1, splits = threads) is the
    default: ORT's intra-op pool joins all its threads after every operator (~60 per
    ResNet-18 call), and on a busy machine each join waits for whichever thread was
    preempted; chunks from one queue let a preempted thread take fewer instead. Measured
    on this 2-core VM at load ~10 (ResNet-18, batch 32): 27 ms of CPU per tile split vs
    30-33 ms with 2 intra-op threads, outputs bit-identical. A model whose batch dimension
    is fixed cannot be split: it gets the threads inside each call instead.
    """

    intra_op: int
    splits: int


def cpu_plan(threads: int, fixed_batch: int | None, cores: int | None = None) -> CpuPlan:
    """The CpuPlan for `threads` inference threads (0: one per usable core)."""
    n = threads if threads > 0 else (cores or usable_cores())
    if (fixed_batch is not None and fixed_batch > 0) or n == 1:
        return CpuPlan(intra_op=n, splits=1)
    return CpuPlan(intra_op=1, splits=n)


def session_options(options: EngineOptions, device: str, plan: CpuPlan | None = None) -> Any:
    """ONNX Runtime session options for a model (`plan`: its CpuPlan on the CPU).

    All graph optimisations (constant folding, Conv+BatchNorm and Conv+activation fusion,
    the NCHWc blocked layout with AVX-512/AVX2 kernels: without the layout step ResNet-18
    costs 2.2x the CPU per tile here), deterministic compute, one inter-op thread (the
    graph is a chain), spin-waiting only when asked (it burns the cores the reader threads
    and other processes need), and the memory arena (activations are reused across calls).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if device == "cpu" and plan is not None:
        so.intra_op_num_threads = plan.intra_op
    else:
        so.intra_op_num_threads = max(0, options.threads)
    so.inter_op_num_threads = 1
    so.use_deterministic_compute = True
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    return so


class ModelStore:
    """Loads every model of a config once and checks it against its spec and features."""

    def __init__(self, options: EngineOptions, available: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        self.options = options
        self.available = list(available if available is not None else ort.get_available_providers())
        problem = ""
        if options.device != "cpu" and CUDA in self.available:
            problem = cuda_status(self.available).reason
        self.device, self.providers = select_providers(options.device, self.available, problem)
        if problem and options.device == "auto":
            log.warning("device: CUDA not usable (%s); running on the CPU", problem)
        self._sessions: dict[str, Session] = {}
        self.runners: dict[tuple[str, str], ModelRunner] = {}  # (analysis, model) -> runner
        self._pool: ThreadPoolExecutor | None = None

    def _cpu_pool(self, splits: int) -> ThreadPoolExecutor | None:
        """The threads that run sub-batches (shared by all sessions: one call at a time)."""
        if splits <= 1:
            return None
        if self._pool is None:  # every splitting session of a store has the same `threads`
            self._pool = ThreadPoolExecutor(splits, thread_name_prefix="inference")
        return self._pool

    def _load(self, spec: ModelSpec) -> Session:
        import onnxruntime as ort

        where = f"model {spec.name!r} ({spec.file})"
        t0 = time.perf_counter()
        data, sha = _read_checked(spec, where)
        pre_key = json.dumps(
            [spec.preprocessing_spec, spec.input_layout, spec.output, spec.tile_size],
            sort_keys=True,
            default=str,
        )
        key = hashlib.sha256(f"{sha}|{pre_key}".encode()).hexdigest()
        if key in self._sessions:
            return self._sessions[key]
        composed, output, fixed, layout = _compose(_parse_onnx(data, spec, where), spec, where)
        plan = cpu_plan(self.options.threads, fixed) if self.device == "cpu" else None
        try:
            with warnings.catch_warnings():  # ORT warns about unavailable providers: we check
                warnings.simplefilter("ignore", UserWarning)
                session = ort.InferenceSession(
                    composed.SerializeToString(),
                    session_options(self.options, self.device, plan),
                    providers=self.providers,
                    provider_options=_provider_options(self.device),
                )
        except Exception as exc:
            raise ModelError(f"{where}: ONNX Runtime cannot load it: {_line(exc)}") from None
        device = "cuda" if CUDA in session.get_providers() else "cpu"
        if self.device == "cuda" and device != "cuda":
            if self.options.device == "cuda":
                raise DeviceError(
                    f"{where}: CUDA provider failed to initialise (driver or "
                    "libraries missing); use --device cpu"
                )
            log.warning("CUDA provider failed to initialise for %s; using the CPU", spec.name)
            self.device, self.providers = "cpu", [CPU]
        probe = np.zeros((fixed or 1, spec.tile_size, spec.tile_size, 3), np.uint8)
        sess = Session(
            key=key,
            sha256=sha,
            session=session,
            device=device,
            input_name="tiles",
            output_name=output,
            output_rank=0,
            fixed_batch=fixed,
            tile_size=spec.tile_size,
            layout=layout,
            load_s=0.0,
        )
        if plan is not None:  # a CUDA session that fell back keeps ORT's threads, unsplit
            sess.splits = plan.splits
            sess.pool = self._cpu_pool(plan.splits)
        try:
            out = sess.run(probe)
        except Exception as exc:
            raise ModelError(
                f"{where}: a test inference on a blank tile failed: {_line(exc)}"
            ) from None
        sess.output_rank = out.ndim
        sess.stats = {"tiles": 0, "infer_s": 0.0}
        sess.load_s = time.perf_counter() - t0
        self._sessions[key] = sess
        return sess

    def load(self, config: RunConfig) -> None:
        """Load all models of all analyses and check postprocessing chains and feature roles."""
        for analysis in config.analyses:
            for name, spec in analysis.models.items():
                sess = self._load(spec)
                kind = raw_kind(sess.output_rank)
                for i, step in enumerate(spec.postprocessing):
                    try:
                        kind = step.output_kind(kind)
                    except ValueError as exc:
                        raise ConfigError(
                            f"{config.path}: analysis {analysis.name!r} model {name!r} "
                            f"postprocessing[{i}] ({type(step).__name__}): {exc}"
                        ) from None
                self.runners[(analysis.name, name)] = ModelRunner(spec, sess, kind)
            for feature in analysis.features:
                cls = FEATURES.get(feature.cls, str(config.path))
                for role, model_name in feature.models.items():
                    got = self.runners[(analysis.name, model_name)].final_kind
                    want = cls.roles[role]
                    if got is not want:
                        raise ConfigError(
                            f"{config.path}: analysis {analysis.name!r} feature "
                            f"{feature.name!r}: {role} {model_name!r} gives {got.value} after "
                            f"postprocessing but {feature.cls} needs {want.value}"
                        )

    @property
    def sessions(self) -> list[Session]:
        """Every distinct session loaded (one per model file and preprocessing)."""
        return list(self._sessions.values())


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:240] or type(exc).__name__


def _read_checked(spec: ModelSpec, where: str) -> tuple[bytes, str]:
    """The model file's bytes and sha256, checked against the config's provenance."""
    try:
        data = spec.file.read_bytes()
    except OSError as exc:
        raise ModelError(f"{where}: cannot be read: {exc.strerror}") from None
    sha = hashlib.sha256(data).hexdigest()
    expected = spec.expected_sha256
    if expected and expected != sha:
        raise ModelError(
            f"{where}: sha256 {sha[:16]}... does not match the config's provenance "
            f"{expected[:16]}...; the model file was altered or corrupted"
        )
    return data, sha


def _parse_onnx(data: bytes, spec: ModelSpec, where: str) -> Any:
    """The ONNX model in ``data``, external tensors read from the model's folder."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(spec.folder))
    except Exception as exc:
        raise ModelError(f"{where}: not a valid ONNX model: {_line(exc)}") from None
    return model
