"""ONNX Runtime sessions, kept free of PyTorch so that serving never imports training code."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path | str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; 1 intra-op thread unless told otherwise (batch-1 serving), 0 = all cores."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_INPUT_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> its input names


def run_session(sess: ort.InferenceSession, **feeds: np.ndarray) -> np.ndarray:
    """Run a session on the inputs it declares (an exporter may drop an unused one)."""
    names = _INPUT_NAMES.get(sess)
    if names is None:  # get_inputs() builds new objects on every call: ask once per session
        names = _INPUT_NAMES[sess] = [i.name for i in sess.get_inputs()]
    return sess.run(None, {name: feeds[name] for name in names})[0]
