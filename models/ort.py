"""ONNX Runtime sessions, kept free of PyTorch so that serving never imports training code."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def session(path: Path | str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; 1 intra-op thread unless told otherwise (batch-1 serving), 0 = all cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
