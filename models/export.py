"""ONNX export of the towers and the ranker, with a parity check against PyTorch.

Signatures (every variant, full or compressed, exports the same ones):
    user_tower: user_code int64 [B], user_features int64 [B, 4], history int64 [B, N] -> user_embedding [B, D]
    item_tower: item_code int64 [M] -> item_embedding [M, D]
    ranker:     user_code, user_features, history, candidates int64 [B, C] -> logits [B, C]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from slimrec.artifact.ort import session

if TYPE_CHECKING:
    import onnx

USER_INPUTS = ("user_code", "user_features", "history")
RANKER_INPUTS = (*USER_INPUTS, "candidates")
SIGNATURES = {
    "user_tower": (USER_INPUTS, ("user_embedding",)),
    "item_tower": (("item_code",), ("item_embedding",)),
    "ranker": (RANKER_INPUTS, ("logits",)),
}
PARITY_TOLERANCE = 1e-4  # max |ONNX - PyTorch| an fp32 export may show


def example_inputs(history_len: int, batch: int = 2, candidates: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "user_code": torch.arange(1, batch + 1),
        "user_features": torch.zeros(batch, 4, dtype=torch.long),
        "history": torch.randint(0, 3, (batch, history_len), generator=g),
        "candidates": torch.arange(1, batch * candidates + 1).view(batch, candidates),
        "item_code": torch.arange(1, candidates + 1),
    }


def export_onnx(
    module: torch.nn.Module, kind: str, path: Path, history_len: int, graphs: ExportCache | None = None
) -> Path:
    """Export `module` as `kind` (a SIGNATURES key) with dynamic batch (and candidate) axes.

    `graphs`: a module built like one exported before gets that graph with its own weights
    (`ExportCache`), checked by `parity`; otherwise it is exported and remembered there.
    """
    if graphs is not None and graphs.write(module, kind, path, history_len):
        return path
    inputs, outputs = SIGNATURES[kind]
    ex = example_inputs(history_len)
    args = tuple(ex[name] for name in inputs)
    batch, cands = torch.export.Dim("batch"), torch.export.Dim("candidates")
    dynamic = {"candidates": {0: batch, 1: cands}, "item_code": {0: cands}}
    shapes = tuple(dynamic.get(name, {0: batch}) for name in inputs)
    module.eval()
    with _quiet(), _torchlib_registry_once():
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
    if graphs is not None:
        graphs.add(module, kind, path, history_len)
    compact_tables(path)
    return path


@dataclass
class _Graph:
    model: onnx.ModelProto  # as exported (metadata stripped, tables not yet compacted)
    # module tensor -> the initializers holding it: (name, "same" | "T" (transposed) | "1" (unit
    # dims appended)); the exporter renames, pre-transposes (MatMul) and unsqueezes some.
    swaps: dict[str, list[tuple[str, str]]]
    folded: str  # digest of the module's other tensors, which the graph may hold in any form


class ExportCache:
    """Exported graphs by module structure, so that each architecture is traced once.

    torch.onnx's dynamo exporter takes seconds a graph, all of it tracing; a compression run
    writes the same few architectures many times (two folds, several stages). A module whose
    classes, tensor names and dtypes match a graph exported before, and whose tensors the
    graph does not hold as plain initializers (constants the exporter folded) are equal, gets
    that graph with its own weights swapped in. Shapes may differ (a pruned layer): the
    swapped graph is checked by `parity` like any export, and exported afresh if it fails.
    """

    def __init__(self) -> None:
        self.graphs: dict[tuple, list[_Graph]] = {}
        self.reused = 0

    def add(self, module: torch.nn.Module, kind: str, path: Path, history_len: int) -> None:
        import onnx

        model = onnx.load(str(path))
        tensors = module_tensors(module)
        swaps = initializer_swaps(tensors, model.graph.initializer)
        entry = _Graph(model, swaps, digest(tensors, frozenset(swaps)))
        self.graphs.setdefault(structure(module, kind, history_len), []).append(entry)

    def write(self, module: torch.nn.Module, kind: str, path: Path, history_len: int) -> bool:
        """Write `module`'s graph to `path` from a cached one; False when none fits (export it)."""
        import onnx
        from onnx import numpy_helper

        tensors = module_tensors(module)
        for entry in self.graphs.get(structure(module, kind, history_len), []):
            if digest(tensors, frozenset(entry.swaps)) != entry.folded:
                continue
            model = onnx.ModelProto()
            model.CopyFrom(entry.model)
            del model.graph.value_info[:]  # intermediate shapes, stale when a layer's width changed
            given = {t.name: t for t in model.graph.initializer}
            for name, places in entry.swaps.items():
                for init, how in places:
                    value = tensors[name].T if how == "T" else tensors[name]
                    value = value.reshape(*value.shape, *[1] * (len(given[init].dims) - value.ndim))
                    given[init].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init))
            onnx.save(model, str(path))
            compact_tables(path)
            try:
                ok = parity(module, kind, path, history_len) <= PARITY_TOLERANCE
            except Exception:  # onnxruntime rejects the graph (a shape the exporter baked in)
                ok = False
            if ok:
                self.reused += 1
                return True
        return False


def initializer_swaps(tensors: dict[str, np.ndarray], initializers) -> dict[str, list[tuple[str, str]]]:
    """Which initializers hold each module tensor: by name, else by value (as is, transposed, or
    with unit dims appended). A value held by several tensors is ambiguous and left out."""
    from onnx import numpy_helper

    found: dict[str, list[tuple[str, str]]] = {}
    claimed: dict[str, set[str]] = {}  # initializer -> the tensors that matched it
    arrays = {t.name: numpy_helper.to_array(t) for t in initializers}
    for name, value in tensors.items():
        for init, array in arrays.items():
            if array.dtype != value.dtype or array.size != value.size:
                continue
            if init == name and array.shape == value.shape:
                how = "same"
            elif init in tensors:
                continue  # another tensor's own initializer
            elif array.shape == value.shape + (1,) * (array.ndim - value.ndim) and np.array_equal(
                array.reshape(value.shape), value
            ):
                how = "same" if array.ndim == value.ndim else "1"
            elif value.ndim == 2 and array.shape == value.T.shape and np.array_equal(array, value.T):
                how = "T"
            else:
                continue
            found.setdefault(name, []).append((init, how))
            claimed.setdefault(init, set()).add(name)
    ambiguous = {n for names in claimed.values() if len(names) > 1 for n in names}
    return {n: places for n, places in found.items() if n not in ambiguous}


def module_tensors(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer (persistent or not) of `module`, by its name, as NumPy."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.detach().cpu().numpy() for name, t in named}


def structure(module: torch.nn.Module, kind: str, history_len: int) -> tuple:
    """What a graph depends on besides tensor values and shapes: classes, tensor names, dtypes."""
    modules = tuple((name, type(m).__qualname__) for name, m in module.named_modules())
    tensors = tuple(
        (name, str(t.dtype), t.dim()) for name, t in [*module.named_parameters(), *module.named_buffers()]
    )
    return kind, history_len, modules, tensors


def digest(tensors: dict[str, np.ndarray], skip: frozenset[str]) -> str:
    """sha256 over the shapes and bytes of `tensors` not in `skip`."""
    h = hashlib.sha256()
    for name in sorted(set(tensors) - skip):
        value = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{value.dtype}:{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


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


_REGISTRIES: dict = {}  # opset -> torch.onnx's op registry, built once per process


@contextlib.contextmanager
def _torchlib_registry_once():
    """torch.onnx rebuilds its op registry from torchlib on every export (~0.6 s of a ~2.5 s
    export); it only changes when a custom translation table is passed, which `export_onnx`
    never does, so within this context every export shares one registry per opset."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # another torch layout: export as it comes
        yield
        return
    build = ONNXRegistry.__dict__["from_torchlib"]  # the classmethod object, restored as it was

    def from_torchlib(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build.__func__(cls, *args, **kwargs)
        return _REGISTRIES[key]

    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = build


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
