"""Post-training quantization: row-wise int8/int4 embedding tables, int8 dense layers in ONNX Runtime.

Two steps, because the two kinds of weights pay off differently:

* Embedding tables are most of the bytes and none of the time (a 200-row lookup is
  ~20 µs), so they are quantized for memory, in PyTorch, before export:
  `quantize_embeddings_(model, EmbeddingQuantConfig(...))` swaps each `nn.Embedding`
  for a `QuantizedEmbedding` (torchrec-style: per-row scale, optional per-row offset,
  8-bit or 4-bit codes). Its forward is Gather(int8) -> Cast -> Mul, so the exported
  ONNX initializer is the int8 table itself and the file really shrinks. On the trained
  ml-100k teacher ranker (tables of >= 100 rows), 8-bit tables alone measured SQNR
  48.5 dB and top-10 overlap 0.998 vs fp32; 4-bit ones 23.4 dB and 0.88, too lossy for
  the ranker's item table, which also feeds its attention.
* Dense layers (MatMul/Gemm) are most of the time, so they are quantized by ONNX
  Runtime on the exported graph, whose int8 kernels are what serving runs:
  `quantize_onnx_dense(src, dst, OnnxQuantConfig(...))`. (`torch.ao.quantization` is
  deprecated and torchao's CPU int8 is slower than ORT; see ../shared/MEASUREMENTS.md.)

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from slimrec.artifact.ort import session
from torch import nn

SUPPORTED_VERSIONS = (1,)
EMBEDDING_BITS = (4, 8)
ONNX_MODES = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _check_version(owner: str, version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{owner}.version {version!r} is not supported; "
                         f"this slimrec reads {SUPPORTED_VERSIONS}")


# --- embedding tables --------------------------------------------------------------------------


@dataclass
class EmbeddingQuantConfig:
    """Which `nn.Embedding` tables to quantize, and how.

    Args:
        bits: 8 or 4 (4-bit packs two codes per uint8 byte).
        symmetric: codes q * scale with scale = max|row| / 127 (or / 7); False adds a
            per-row offset (the row minimum, torchrec's "bias"): q * scale + offset.
        min_rows: tables with fewer rows are left in fp32 (small feature vocabularies
            cost nothing); checked before `filter_fn`.
        filter_fn: `filter_fn(module, name)` -> False to skip the table, True for
            `bits`, or 4 / 8 to give it its own width (torchrec per_table_weight_dtype).
    """

    version: int = 1
    bits: int = 8
    symmetric: bool = True
    min_rows: int = 0
    filter_fn: Callable[[nn.Module, str], bool | int] | None = None

    def __post_init__(self):
        _check_version("EmbeddingQuantConfig", self.version)
        if self.bits not in EMBEDDING_BITS:
            raise ValueError(f"EmbeddingQuantConfig.bits must be one of {EMBEDDING_BITS}, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"EmbeddingQuantConfig.symmetric must be a bool, got {self.symmetric!r}")
        if not isinstance(self.min_rows, int) or self.min_rows < 0:
            raise ValueError(f"EmbeddingQuantConfig.min_rows must be an int >= 0, got {self.min_rows!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError("EmbeddingQuantConfig.filter_fn must be callable(module, name) or None")

    def to_dict(self) -> dict:
        """JSON-ready; a filter_fn is code, not configuration, and is left out."""
        return {"version": self.version, "bits": self.bits, "symmetric": self.symmetric,
                "min_rows": self.min_rows}

    def bits_for(self, module: nn.Embedding, name: str) -> int | None:
        """The width for this table, or None to leave it in fp32."""
        if module.num_embeddings < self.min_rows:
            return None
        choice = True if self.filter_fn is None else self.filter_fn(module, name)
        if isinstance(choice, bool) or choice is None:
            return self.bits if choice else None
        if choice not in EMBEDDING_BITS:
            raise ValueError(f"filter_fn returned {choice!r} for table {name!r}; "
                             f"return a bool or one of {EMBEDDING_BITS}")
        return int(choice)


def quantize_rows(weight: torch.Tensor, bits: int, symmetric: bool):
    """Row-wise codes for a [rows, d] table: (codes [rows, d] int16, scale [rows], offset [rows] | None).

    Symmetric codes are signed (|q| <= 2^(bits-1) - 1); asymmetric ones are 0..2^bits - 1.
    Every element is within scale / 2 of its dequantized value; an all-zero row gets
    scale 0, so it dequantizes to exactly zero.
    """
    w = weight.detach().to(torch.float64)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / qmax
        low = None
        shifted = w
        lo_code, hi_code = -qmax, qmax
    else:
        low = w.amin(dim=1)
        scale = (w.amax(dim=1) - low) / (2**bits - 1)
        shifted = w - low[:, None]
        lo_code, hi_code = 0, 2**bits - 1
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(shifted / safe[:, None]).clamp(lo_code, hi_code).to(torch.int16)
    offset = None if low is None else low.to(torch.float32)
    return codes, scale.to(torch.float32), offset


class QuantizedEmbedding(nn.Module):
    """An `nn.Embedding` stored as row-wise int8 (or packed int4) codes with float32 scales.

    Buffers (plain tensors, so they go to safetensors as they are):
        weight_q  int8 [rows, d] (8-bit symmetric), uint8 [rows, d] (8-bit asymmetric),
                  uint8 [rows, ceil(d / 2)] (4-bit: element 2j in the low nibble, 2j+1 in the high)
        scale     float32 [rows]
        offset    float32 [rows], asymmetric only: x = q * scale + offset
    4-bit symmetric codes are stored biased by 8 (nibble = q + 8), so both nibble
    schemes unpack with two BitwiseAnd masks and no shifts: the exporter mistranslates
    a uint8 right shift (an arithmetic-shift emulation that mixes int8 and uint8).

    Example:
        table = QuantizedEmbedding.from_float(nn.Embedding(1000, 64, padding_idx=0), bits=8)
        table(torch.tensor([[1, 2, 0]]))  # [1, 3, 64] float32, row 0 all zero
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, symmetric: bool = True,
                 padding_idx: int | None = None):
        super().__init__()
        if bits not in EMBEDDING_BITS:
            raise ValueError(f"QuantizedEmbedding bits must be one of {EMBEDDING_BITS}, got {bits!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.symmetric, self.padding_idx = bits, symmetric, padding_idx
        width = embedding_dim if bits == 8 else (embedding_dim + 1) // 2
        dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
        self.register_buffer("weight_q", torch.zeros(num_embeddings, width, dtype=dtype))
        self.register_buffer("scale", torch.zeros(num_embeddings))
        self.register_buffer("offset", None if symmetric else torch.zeros(num_embeddings))
        nibble_weights = torch.tensor([1.0, 1 / 16]) if bits == 4 else None  # low, high nibble
        self.register_buffer("_nibble_weights", nibble_weights, persistent=False)

    @property
    def _code_bias(self) -> int:
        return 8 if self.bits == 4 and self.symmetric else 0

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int = 8, symmetric: bool = True) -> QuantizedEmbedding:
        if embedding.max_norm is not None:
            raise ValueError("cannot quantize an nn.Embedding with max_norm: its forward renormalises rows")
        rows, dim = embedding.weight.shape
        out = cls(rows, dim, bits, symmetric, embedding.padding_idx)
        codes, scale, offset = quantize_rows(embedding.weight, bits, symmetric)
        codes = codes + out._code_bias  # a zero row (the padding row) gets scale 0: exactly zero again
        if bits == 4:
            codes = F.pad(codes, (0, dim % 2), value=out._code_bias)
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        out.weight_q.copy_(codes.to(out.weight_q.dtype))
        out.scale.copy_(scale)
        if offset is not None:
            out.offset.copy_(offset)
        return out.to(embedding.weight.device)

    def _codes(self, idx: torch.Tensor) -> torch.Tensor:
        """Float codes [..., d] of the rows idx: Gather on the int table, then Cast."""
        q = F.embedding(idx, self.weight_q)
        if self.bits == 8:
            return q.float()
        nibbles = torch.stack([q & 0x0F, q & 0xF0], dim=-1).float() * self._nibble_weights
        codes = nibbles.flatten(-2)
        codes = codes[..., : self.embedding_dim] if self.embedding_dim % 2 else codes
        return codes - self._code_bias if self._code_bias else codes

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self._codes(idx) * F.embedding(idx, self.scale.unsqueeze(1))
        if self.offset is not None:
            x = x + F.embedding(idx, self.offset.unsqueeze(1))
        return x

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The whole table as float32 [rows, d]."""
        return self.forward(torch.arange(self.num_embeddings, device=self.scale.device))

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, {kind}{pad}"


def quantize_embeddings_(model: nn.Module, config: EmbeddingQuantConfig | None = None) -> nn.Module:
    """Replace the `nn.Embedding` modules of `model` by `QuantizedEmbedding`, in place.

    A table registered under several names (tied weights) is quantized once, by the
    decision for its first name, and stays shared.

    Args:
        model: any module holding nn.Embedding submodules (e.g. TwoTower, Ranker).
        config: EmbeddingQuantConfig; default 8-bit symmetric, every table.
    Returns:
        `model`, for chaining.
    Example:
        quantize_embeddings_(two_tower, EmbeddingQuantConfig(
            filter_fn=lambda m, name: 4 if name.endswith("item_embedding") else m.num_embeddings > 100))
    """
    config = config or EmbeddingQuantConfig()
    if isinstance(model, nn.Embedding):
        raise ValueError("quantize_embeddings_ replaces submodules; for a bare nn.Embedding "
                         "use QuantizedEmbedding.from_float(table, bits)")
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Embedding):
            continue
        if id(module) not in done:
            bits = config.bits_for(module, name)
            done[id(module)] = module if bits is None else QuantizedEmbedding.from_float(
                module, bits, config.symmetric)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, done[id(module)])
    return model


# --- dense layers, in ONNX Runtime ------------------------------------------------------------


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
        _check_version("OnnxQuantConfig", self.version)
        if self.mode not in ONNX_MODES:
            raise ValueError(f"OnnxQuantConfig.mode must be one of {ONNX_MODES}, got {self.mode!r}")
        self.op_types = (self.op_types,) if isinstance(self.op_types, str) else tuple(self.op_types)
        if not self.op_types:
            raise ValueError("OnnxQuantConfig.op_types is empty: nothing would be quantized")
        self.keep_fp32 = (self.keep_fp32,) if isinstance(self.keep_fp32, str) else tuple(self.keep_fp32)
        if not all(isinstance(m, str) and m.strip(".") for m in self.keep_fp32):
            raise ValueError(f"OnnxQuantConfig.keep_fp32 must hold module paths like 'deep.0', "
                             f"got {self.keep_fp32!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"OnnxQuantConfig.calibration_method must be one of {CALIBRATION_METHODS}, "
                             f"got {self.calibration_method!r}")
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("OnnxQuantConfig.calibration is only read by mode='static'; "
                             "drop it or set the mode")
        if self.mode == "static":
            if self.calibration is None or isinstance(self.calibration, Mapping) or not len(self.calibration):
                raise ValueError("OnnxQuantConfig(mode='static') needs calibration: a non-empty list of "
                                 "feed dicts (input name -> array)")
            self.calibration = tuple(self.calibration)
            if not all(isinstance(feed, Mapping) for feed in self.calibration):
                raise ValueError("OnnxQuantConfig.calibration must hold feed dicts (input name -> array)")

    def to_dict(self) -> dict:
        """JSON-ready; the calibration arrays are summarised by their count."""
        return {"version": self.version, "mode": self.mode, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "op_types": list(self.op_types),
                "keep_fp32": list(self.keep_fp32),
                "calibration_feeds": None if self.calibration is None else len(self.calibration),
                "calibration_method": self.calibration_method}

    def quantize_graph(self, src_path: Path, dst_path: Path) -> None:
        """`quantize_onnx_dense` with this config: what the artifact writer calls after export."""
        quantize_onnx_dense(src_path, dst_path, self)


def quantize_onnx_dense(src_path: Path | str, dst_path: Path | str,
                        config: OnnxQuantConfig | None = None) -> Path:
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
        common = dict(op_types_to_quantize=list(config.op_types), nodes_to_exclude=excluded,
                      per_channel=config.per_channel,
                      reduce_range=config.reduce_range, weight_type=QuantType.QInt8)
        if config.mode == "dynamic":
            quantize_dynamic(prepared, dst, extra_options={"MatMulConstBOnly": True}, **common)
        else:
            methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
            reader = _FeedReader(prepared, config.calibration)
            quantize_static(prepared, dst, reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8,  # u8 x s8: the fast VNNI path
                            calibrate_method=methods[config.calibration_method],
                            extra_options={"MatMulConstBOnly": True,
                                           # keep MatMul outputs in float: bias add and x0 * (.) follow
                                           "OpTypesToExcludeOutputQuantization": list(config.op_types)},
                            **common)
    return dst


def _nodes_of_modules(src: Path, prepared: Path, op_types: Sequence[str],
                      modules: Sequence[str]) -> list[str]:
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
        hits = [n for n, path in scopes.items()
                if any(p == module or p.startswith(module + ".") for p in path)]
        if not hits:
            known = sorted({p for path in scopes.values() for p in path[1:-1]}) or "none recorded"
            raise ValueError(f"keep_fp32: no {'/'.join(op_types)} node of {src.name} ({root or '?'}) belongs "
                             f"to module {module!r}; modules with such nodes: {known}")
        names += hits
    kept = {node.name for node in onnx.load(str(prepared), load_external_data=False).graph.node}
    lost = sorted(set(names) - kept)
    if lost:
        raise RuntimeError(f"keep_fp32: pre-processing renamed or fused nodes {lost}; cannot exclude them")
    return names


def _feed_for(names: Sequence[str], feed: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The declared inputs out of `feed` (an exporter may drop an unused one)."""
    missing = [n for n in names if n not in feed]
    if missing:
        raise ValueError(f"{where}: feed lacks input(s) {missing}; it has {sorted(feed)}")
    return {n: np.asarray(feed[n]) for n in names}


class _FeedReader(CalibrationDataReader):
    """CalibrationDataReader over feed dicts, restricted to the model's inputs."""

    def __init__(self, model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]]):
        names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
        self._feeds = iter([_feed_for(names, f, "calibration") for f in feeds])

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


# --- error and size ---------------------------------------------------------------------------


def quantization_error(reference: np.ndarray, quantized: np.ndarray, k: int = 10) -> dict:
    """How far `quantized` is from `reference` (same shape; [B, C] scores or [B, D] embeddings).

    Returns:
        max_abs: max |quantized - reference|
        max_abs_over_std: max_abs / std(reference), scale-free
        sqnr_db: 10 log10(sum ref^2 / sum (q - ref)^2); inf when identical
        min_cosine: (2-D only) the worst row's cosine similarity
        top{k}_overlap, top{k}_overlap_min: (2-D only) mean and worst fraction of each
            row's top-k (by reference) also in the quantized top-k; k is cut to C if C < k
    """
    ref, q = np.asarray(reference, np.float64), np.asarray(quantized, np.float64)
    if ref.shape != q.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, quantized {q.shape}")
    if ref.size == 0:
        raise ValueError("empty arrays")
    delta = q - ref
    max_abs = float(np.abs(delta).max())
    std = float(ref.std())
    noise = float((delta**2).sum())
    out = {
        "max_abs": max_abs,
        "max_abs_over_std": max_abs / std if std > 0 else (0.0 if max_abs == 0 else float("inf")),
        "sqnr_db": float(10 * np.log10((ref**2).sum() / noise)) if noise > 0 else float("inf"),
    }
    if ref.ndim == 2:
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(q, axis=1)
        cos = (ref * q).sum(1) / np.where(norms > 0, norms, 1.0)
        out["min_cosine"] = float(cos.min())
        kk = min(k, ref.shape[1])
        top_ref = np.argpartition(-ref, kk - 1, axis=1)[:, :kk]
        top_q = np.argpartition(-q, kk - 1, axis=1)[:, :kk]
        overlap = np.array([len(np.intersect1d(a, b)) / kk for a, b in zip(top_ref, top_q, strict=True)])
        out[f"top{k}_overlap"] = float(overlap.mean())
        out[f"top{k}_overlap_min"] = float(overlap.min())
    return out


def compare_sessions(ref_path: Path | str, q_path: Path | str,
                     feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
                     k: int = 10, threads: int = 1, timing_runs: int = 0) -> dict:
    """Run two ONNX models on the same feeds and compare their first outputs.

    Args:
        ref_path, q_path: the reference (fp32) and quantized models.
        feeds: one feed dict or a list of them (input name -> array); outputs are
            concatenated along axis 0, e.g. [n_requests * B, C] ranker logits.
        k: for the top-k overlap.
        threads: intra-op threads of both sessions (1 = batch-1 serving).
        timing_runs: > 0 adds ref_ms / quantized_ms, medians over this many passes
            over the feeds, the two models interleaved so machine load hits both alike.
    Returns:
        quantization_error(...) of the outputs, plus the timings if asked.
    """
    feeds = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    if not feeds:
        raise ValueError("compare_sessions needs at least one feed")
    sessions = [session(ref_path, threads), session(q_path, threads)]
    prepared = [[_feed_for([i.name for i in s.get_inputs()], f, str(p)) for f in feeds]
                for s, p in zip(sessions, (ref_path, q_path), strict=True)]
    outputs = [np.concatenate([s.run(None, f)[0] for f in fs])
               for s, fs in zip(sessions, prepared, strict=True)]
    result = quantization_error(outputs[0], outputs[1], k)
    if timing_runs > 0:
        times: list[list[float]] = [[], []]
        for _ in range(timing_runs):
            for j, (s, fs) in enumerate(zip(sessions, prepared, strict=True)):
                for f in fs:
                    t0 = time.perf_counter()
                    s.run(None, f)
                    times[j].append(time.perf_counter() - t0)
        result["ref_ms"], result["quantized_ms"] = (float(np.median(t)) * 1e3 for t in times)
    return result


def onnx_weight_bytes(path: Path | str) -> dict[str, int]:
    """Bytes of an ONNX model's weights (initializers and Constant tensors) by dtype, plus "total".

    Example: {"float32": 40_960, "int8": 1_478_656, "int64": 27_000, "total": 1_546_616}
    """
    model = onnx.load(str(path))
    out: dict[str, int] = {}

    def add(tensor: onnx.TensorProto) -> None:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        n = int(np.prod(tensor.dims, dtype=np.int64))
        nbytes = (n + 1) // 2 if tensor.data_type in _FOUR_BIT else n * dtype.itemsize
        name = onnx.TensorProto.DataType.Name(tensor.data_type).lower() if tensor.data_type in _FOUR_BIT \
            else dtype.name
        out[name] = out.get(name, 0) + nbytes

    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            add(tensor)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    add(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    out["total"] = sum(out.values())
    return out


_FOUR_BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
