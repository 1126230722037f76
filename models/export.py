"""ONNX export of the towers and the ranker, with a parity check against PyTorch.

Signatures (every variant, full or compressed, exports the same ones):
    user_tower: user_code int64 [B], user_features int64 [B, 4], history int64 [B, N] -> user_embedding [B, D]
    item_tower: item_code int64 [M] -> item_embedding [M, D]
    ranker:     user_code, user_features, history, candidates int64 [B, C] -> logits [B, C]
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from slimrec.artifact.ort import session

USER_INPUTS = ("user_code", "user_features", "history")
RANKER_INPUTS = (*USER_INPUTS, "candidates")
SIGNATURES = {
    "user_tower": (USER_INPUTS, ("user_embedding",)),
    "item_tower": (("item_code",), ("item_embedding",)),
    "ranker": (RANKER_INPUTS, ("logits",)),
}


def example_inputs(history_len: int, batch: int = 2, candidates: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "user_code": torch.arange(1, batch + 1),
        "user_features": torch.zeros(batch, 4, dtype=torch.long),
        "history": torch.randint(0, 3, (batch, history_len), generator=g),
        "candidates": torch.arange(1, batch * candidates + 1).view(batch, candidates),
        "item_code": torch.arange(1, candidates + 1),
    }


def export_onnx(module: torch.nn.Module, kind: str, path: Path, history_len: int) -> Path:
    """Export `module` as `kind` (a SIGNATURES key) with dynamic batch (and candidate) axes."""
    inputs, outputs = SIGNATURES[kind]
    ex = example_inputs(history_len)
    args = tuple(ex[name] for name in inputs)
    batch, cands = torch.export.Dim("batch"), torch.export.Dim("candidates")
    dynamic = {"candidates": {0: batch, 1: cands}, "item_code": {0: cands}}
    shapes = tuple(dynamic.get(name, {0: batch}) for name in inputs)
    module.eval()
    with _quiet():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes=shapes,
            verbose=False,
        )
        program.save(str(path))
    strip_metadata(path)
    compact_tables(path)
    return path


def compact_tables(path: Path) -> dict[str, int]:
    """Deduplicate, narrow and bit-pack the graph's lookup tables (`models.onnx_tables`); lossless."""
    import onnx
    from slimrec.models.onnx_tables import compact_lookup_tables

    model = onnx.load(str(path))
    stats = compact_lookup_tables(model)
    onnx.save(model, str(path))
    return stats


KEPT_NODE_METADATA = ("namespace", "pkg.torch.onnx.name_scopes")  # module names: quantization reads them


def strip_metadata(path: Path) -> None:
    """Drop the exporter's stack traces and FX dumps from every node (local source paths, most of a
    small model's bytes); keep the module names that say which layer a node belongs to."""
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            kept = [(p.key, p.value) for p in node.metadata_props if p.key in KEPT_NODE_METADATA]
            del node.metadata_props[:]
            for key, value in kept:
                node.metadata_props.add(key=key, value=value)
            node.doc_string = ""
    onnx.save(model, str(path))


def parity(module: torch.nn.Module, kind: str, path: Path, history_len: int, seed: int = 0) -> float:
    """Max |ONNX - PyTorch| over random valid inputs (batch 5, 7 candidates)."""
    inputs, _ = SIGNATURES[kind]
    g = torch.Generator().manual_seed(seed)
    n_users, n_items = (
        len(module.user_rows) - 1 if hasattr(module, "user_rows") else 5,
        len(module.item_rows) - 1,
    )
    feeds = {
        "user_code": torch.randint(0, n_users + 1, (5,), generator=g),
        "user_features": torch.zeros(5, 4, dtype=torch.long),
        "history": torch.randint(0, n_items + 1, (5, history_len), generator=g),
        "candidates": torch.randint(1, n_items + 1, (5, 7), generator=g),
        "item_code": torch.randint(1, n_items + 1, (7,), generator=g),
    }
    args = [feeds[name] for name in inputs]
    module.eval()
    with torch.no_grad():
        expected = module(*args).numpy()
    got = session(path).run(None, {n: a.numpy() for n, a in zip(inputs, args, strict=True)})[0]
    return float(np.abs(got - expected).max())


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings per call; keep the CLI output readable."""
    sink = io.StringIO()
    previous = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(previous)
