"""Post-training int8 quantization of an exported graph's dense layers (MatMul/Gemm) by ONNX Runtime.

Dense layers (MatMul/Gemm) are most of the time, so they are quantized by ONNX
Runtime on the exported graph, whose int8 kernels are what serving runs:
`quantize_onnx_dense(src, dst, OnnxQuantConfig(...))`. (`torch.ao.quantization` is
deprecated and torchao's CPU int8 is slower than ORT; see ../shared/MEASUREMENTS.md.)
Embedding tables are quantized before export, in PyTorch, for memory
(`slimrec.compression.quantize_embeddings`).

Why dynamic is the default for dense layers. Rankers exported by
`models.export.export_onnx` over the ml-100k catalogue, one request of 200 candidates,
1 intra-op thread; median of 9 interleaved rounds x 150 runs on a shared 2-vCPU AMD
EPYC (AVX-512 VNNI) whose other tenants moved fp32 between 5.5 and 10 ms (int8 barely
moved). Error vs the fp32 graph over 64 held-out requests (static calibrated on 16
others); "top-10" is the mean overlap of each request's top 10:

                          fp32     dynamic         static QDQ       static QDQ       dynamic, keep
                                   (default)       MinMax           Percentile       deep.0 in fp32
    teacher, random init  5.5-9.8  1.77 ms         1.89 ms          1.84 ms          2.96 ms
      1.50M params,       ms       35.0 dB, 0.28   29.3 dB, 0.42    31.0 dB, 0.97    40.2 dB, 0.14
      RankerConfig()      6.1 MB   top-10 0.945    0.902            0.922            0.975
    teacher, trained      ~10 ms   1.88 ms         1.88 ms          1.93 ms          3.06 ms
      ml-100k, real       6.1 MB   33.4 dB, 0.20   26.2 dB, 0.44    28.0 dB, 0.40    40.9 dB, 0.10
      requests                     top-10 0.936    0.905            0.914            0.989
    student, random init  0.50 ms  0.315 ms        0.375 ms         0.373 ms         0.385 ms
      137k params, id 32, 0.69 MB  33.0 dB, 0.14   27.0 dB, 0.27    28.4 dB, 0.58    38.7 dB, 0.07
      rank 32, (128, 64)           top-10 0.938    0.897            0.925            0.977
    (SQNR, max|d|/std; files: teacher 1.9 MB int8, 3.0 MB keeping deep.0; student 0.40 MB)

Dynamic is as fast or faster and 5-7 dB more accurate in every row: it scales each
request's activations by their own range, while static QDQ fixes one range per tensor
from calibration data (and needs representative feeds). Per-channel weights moved
SQNR by <= 0.2 dB for 1-4% more time, so the default is per-tensor. Most of the
remaining error comes from one layer, the first deep layer after the cross network:
`keep_fp32=("deep.0",)` buys 5-7 dB and top-10 0.975-0.989 for +1.1 ms on the teacher
and +0.07 ms on the student; it is not the default because module names are per model.

Example:
    quantize_embeddings_(ranker, EmbeddingQuantConfig(bits=8, min_rows=1000))
    export_onnx(ranker, "ranker", tmp / "ranker.onnx", history_len)
    quantize_onnx_dense(tmp / "ranker.onnx", out / "ranker.onnx", OnnxQuantConfig())
"""

from __future__ import annotations

import ast
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

SUPPORTED_VERSIONS = (1,)
ONNX_MODES = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class OnnxQuantConfig:
    """int8 quantization of an exported graph's MatMul/Gemm weights by ONNX Runtime.

    Args:
        mode: "dynamic" (activations scaled per request at run time; the default, see the
            module docstring) or "static" (QDQ, activation ranges fixed from `calibration`).
        per_channel: one weight scale per output column instead of per tensor.
        reduce_range: 7-bit weights, for x86 CPUs without VNNI, where u8 x s8 products can saturate.
        op_types: node types to quantize.
        keep_fp32: PyTorch module paths (e.g. "deep.0", "cross") whose nodes stay fp32,
            found through the scopes the dynamo exporter records on each node; the
            ranker's first deep layer is where most of its int8 error comes from.
            "Ranker/deep.0" applies to graphs exported from a Ranker only.
        calibration: static only: feed dicts (input name -> array), like serving's requests.
        calibration_method: static only: "minmax", "entropy" or "percentile".
    """

    version: int = 1
    mode: str = "dynamic"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    keep_fp32: tuple[str, ...] = ()
    calibration: Sequence[Mapping[str, np.ndarray]] | None = field(default=None, repr=False, compare=False)
    calibration_method: str = "minmax"

    def __post_init__(self):
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"OnnxQuantConfig.version {self.version!r} is not supported; "
                f"this slimrec reads {SUPPORTED_VERSIONS}"
            )
        if self.mode not in ONNX_MODES:
            raise ValueError(f"OnnxQuantConfig.mode must be one of {ONNX_MODES}, got {self.mode!r}")
        self.op_types = (self.op_types,) if isinstance(self.op_types, str) else tuple(self.op_types)
        if not self.op_types:
            raise ValueError("OnnxQuantConfig.op_types is empty: nothing would be quantized")
        self.keep_fp32 = (self.keep_fp32,) if isinstance(self.keep_fp32, str) else tuple(self.keep_fp32)
        if not all(isinstance(m, str) and m.strip(".") for m in self.keep_fp32):
            raise ValueError(
                f"OnnxQuantConfig.keep_fp32 must hold module paths like 'deep.0', got {self.keep_fp32!r}"
            )
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"OnnxQuantConfig.calibration_method must be one of {CALIBRATION_METHODS}, "
                f"got {self.calibration_method!r}"
            )
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError(
                "OnnxQuantConfig.calibration is only read by mode='static'; drop it or set the mode"
            )
        if self.mode == "static":
            if self.calibration is None or isinstance(self.calibration, Mapping) or not len(self.calibration):
                raise ValueError(
                    "OnnxQuantConfig(mode='static') needs calibration: a non-empty list of "
                    "feed dicts (input name -> array)"
                )
            self.calibration = tuple(self.calibration)
            if not all(isinstance(feed, Mapping) for feed in self.calibration):
                raise ValueError("OnnxQuantConfig.calibration must hold feed dicts (input name -> array)")

    def to_dict(self) -> dict:
        """JSON-ready; the calibration arrays are summarised by their count."""
        return {
            "version": self.version,
            "mode": self.mode,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "op_types": list(self.op_types),
            "keep_fp32": list(self.keep_fp32),
            "calibration_feeds": None if self.calibration is None else len(self.calibration),
            "calibration_method": self.calibration_method,
        }

    def quantize_graph(self, src_path: Path, dst_path: Path) -> None:
        """`quantize_onnx_dense` with this config: what the artifact writer calls after export."""
        quantize_onnx_dense(src_path, dst_path, self)


def quantize_onnx_dense(
    src_path: Path | str, dst_path: Path | str, config: OnnxQuantConfig | None = None
) -> Path:
    """Write `src_path`'s graph to `dst_path` with int8 MatMul/Gemm weights.

    The graph is first shape-inferred and constant-folded (`quant_pre_process`). Its
    symbolic shape pass is skipped: it fails on the dynamo exporter's Reshape of a
    dynamic shape, and ONNX's own shape inference is enough for MatMul weights.
    Only MatMuls with a constant weight are quantized (never attention's act x act).

    Args:
        src_path: fp32 ONNX model (e.g. from slimrec.models.export.export_onnx).
        dst_path: where to write the quantized model; same inputs and outputs.
        config: OnnxQuantConfig; default dynamic, per-tensor.
    Returns:
        `dst_path` as a Path.
    """
    config = config or OnnxQuantConfig()
    src, dst = Path(src_path), Path(dst_path)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model at {src}")
    with tempfile.TemporaryDirectory() as tmp, _quiet_ort():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        excluded = _nodes_of_modules(src, prepared, config.op_types, config.keep_fp32)
        common = dict(
            op_types_to_quantize=list(config.op_types),
            nodes_to_exclude=excluded,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8,
        )
        if config.mode == "dynamic":
            quantize_dynamic(prepared, dst, extra_options={"MatMulConstBOnly": True}, **common)
        else:
            methods = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }
            if config.calibration is None:  # __post_init__ checked it, but fields can be reassigned
                raise ValueError(
                    "OnnxQuantConfig(mode='static') needs calibration: a non-empty list of "
                    "feed dicts (input name -> array)"
                )
            reader = _FeedReader(prepared, config.calibration)
            quantize_static(
                prepared,
                dst,
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,  # u8 x s8: the fast VNNI path
                calibrate_method=methods[config.calibration_method],
                extra_options={
                    "MatMulConstBOnly": True,
                    # keep MatMul outputs in float: bias add and x0 * (.) follow
                    "OpTypesToExcludeOutputQuantization": list(config.op_types),
                },
                **common,
            )
    return dst


def _nodes_of_modules(
    src: Path, prepared: Path, op_types: Sequence[str], modules: Sequence[str]
) -> list[str]:
    """Names of the `op_types` nodes that the exporter scoped under any of `modules` (or their children).

    "Class/path" entries apply only to graphs exported from that class (package.py runs one
    config over the user tower and the ranker); elsewhere an entry must match, so a typo fails.
    """
    if not modules:
        return []
    scopes: dict[str, list[str]] = {}
    root = ""
    for node in onnx.load(str(src), load_external_data=False).graph.node:
        if node.op_type in op_types:
            meta = {p.key: p.value for p in node.metadata_props}
            scopes[node.name] = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
            # namespace reads ": models.ranker.Ranker/deep: ...": the exported root class first
            root = meta.get("namespace", "").lstrip(": ").split("/")[0].rsplit(".", 1)[-1] or root
    names = []
    for entry in modules:
        owner, _, module = entry.rpartition("/")
        if owner and owner != root:
            continue
        hits = [
            n for n, path in scopes.items() if any(p == module or p.startswith(module + ".") for p in path)
        ]
        if not hits:
            known = sorted({p for path in scopes.values() for p in path[1:-1]}) or "none recorded"
            raise ValueError(
                f"keep_fp32: no {'/'.join(op_types)} node of {src.name} ({root or '?'}) belongs "
                f"to module {module!r}; modules with such nodes: {known}"
            )
        names += hits
    kept = {node.name for node in onnx.load(str(prepared), load_external_data=False).graph.node}
    lost = sorted(set(names) - kept)
    if lost:
        raise RuntimeError(f"keep_fp32: pre-processing renamed or fused nodes {lost}; cannot exclude them")
    return names


def feed_for(names: Sequence[str], feed: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The declared inputs out of `feed` (an exporter may drop an unused one)."""
    missing = [n for n in names if n not in feed]
    if missing:
        raise ValueError(f"{where}: feed lacks input(s) {missing}; it has {sorted(feed)}")
    return {n: np.asarray(feed[n]) for n in names}


class _FeedReader(CalibrationDataReader):
    """CalibrationDataReader over feed dicts, restricted to the model's inputs."""

    def __init__(self, model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]]):
        names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
        self._feeds = iter([feed_for(names, f, "calibration") for f in feeds])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # part of the CalibrationDataReader protocol; one pass is all ORT needs
        pass


class _quiet_ort:
    """ORT's quantizer logs advice through the root logger at WARNING; keep the CLI readable."""

    def __enter__(self):
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._level)
