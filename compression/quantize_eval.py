"""How far a quantized model is from its reference: output error, side-by-side latency, weight bytes.

`quantization_error` compares two arrays of scores or embeddings; `compare_sessions` runs
two ONNX models on the same feeds (and, if asked, times them interleaved);
`onnx_weight_bytes` counts an ONNX model's weights by dtype.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from slimrec.artifact.ort import session
from slimrec.compression.quantize_onnx import feed_for


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


def compare_sessions(
    ref_path: Path | str,
    q_path: Path | str,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    k: int = 10,
    threads: int = 1,
    timing_runs: int = 0,
) -> dict:
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
    prepared = [
        [feed_for([i.name for i in s.get_inputs()], f, str(p)) for f in feeds]
        for s, p in zip(sessions, (ref_path, q_path), strict=True)
    ]
    outputs = [
        np.concatenate([s.run(None, f)[0] for f in fs]) for s, fs in zip(sessions, prepared, strict=True)
    ]
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
        name = (
            onnx.TensorProto.DataType.Name(tensor.data_type).lower()
            if tensor.data_type in _FOUR_BIT
            else dtype.name
        )
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
