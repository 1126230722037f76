"""Write a trained (or compressed) model into an artifact directory, in the served form.

One model occupies a `prefix` inside an artifact: "" for the served model
(fitted on train + valid), "selection/" for its twin fitted on train only,
which `slimrec evaluate` scores on validation and the quality gate compares.

Files per prefix:
    user_tower.onnx, ranker.onnx      served by ONNX Runtime
    item_tower.onnx                   offline: the index already holds the item vectors
    items.faiss                       the item index
    tables.safetensors                user features, each user's fitted items (history and
                                      exclusions), items by popularity
    weights.safetensors               offline: PyTorch state dicts, where compression starts from
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from slimrec.artifact import ArtifactWriter
from slimrec.artifact.index import IndexSpec, build_item_index
from slimrec.models.csr import csr_from_pairs
from slimrec.models.export import PARITY_TOLERANCE, ExportCache, export_onnx, parity
from slimrec.models.fold import Fold


class DenseQuantizer(Protocol):
    """Rewrites an exported graph with quantized dense layers; compression's OnnxQuantConfig is one."""

    def quantize_graph(self, src_path: Path, dst_path: Path) -> None: ...

    def to_dict(self) -> dict: ...


SERVED_PREFIX = ""
SELECTION_PREFIX = "selection/"


def state_tensors(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def fold_tables(fold: Fold) -> dict[str, np.ndarray]:
    """What serving needs about users and items beyond the models, as plain arrays."""
    pos = fold.fit_positions
    indptr, items = csr_from_pairs(fold.split.user[pos], fold.split.item[pos], fold.dataset.n_users)
    return {
        "user_features": fold.user_features.astype(np.int32),
        "fitted_indptr": indptr.astype(np.int64),
        "fitted_items": items.astype(np.int32),  # protocol order: the last ones are the history
        "popular_items": np.argsort(-fold.item_popularity, kind="stable").astype(np.int32),
    }


def write_model(
    writer: ArtifactWriter,
    prefix: str,
    fold: Fold,
    two_tower: torch.nn.Module,
    ranker: torch.nn.Module,
    index_spec: IndexSpec,
    dense_quant: DenseQuantizer | None = None,
    graphs: ExportCache | None = None,
) -> dict:
    """Export one model under `prefix`; returns its config entry, with the ONNX parity measured.

    `graphs`: architectures already exported, reused with this model's weights (`ExportCache`).

    With `dense_quant` (an OnnxQuantConfig) the served graphs' dense layers are quantized by
    ONNX Runtime after export; their deviation from PyTorch is then recorded, not enforced.
    The item tower stays as exported: the index holds its vectors, and exact retrieval is
    measured against it.
    """
    role = "served" if prefix == SERVED_PREFIX else "offline"
    n = fold.space.history_len
    parity_max = {}
    for kind, module in (
        ("user_tower", two_tower.user_tower),
        ("item_tower", two_tower.item_tower),
        ("ranker", ranker),
    ):
        path = export_onnx(module, kind, writer.path(f"{prefix}{kind}.onnx"), n, graphs)
        quantized = dense_quant is not None and kind != "item_tower"
        if quantized:
            fp32 = path.with_suffix(".fp32.onnx")
            path.rename(fp32)
            dense_quant.quantize_graph(fp32, path)
            fp32.unlink()
        parity_max[kind] = parity(module, kind, path, n)
        if parity_max[kind] > PARITY_TOLERANCE and not quantized:
            raise RuntimeError(f"ONNX export of {kind} differs from PyTorch by {parity_max[kind]:.2e}")
        writer.set_role(f"{prefix}{kind}.onnx", "offline" if kind == "item_tower" else role)

    with torch.no_grad():
        item_emb = two_tower.item_embeddings(fold.dataset.n_items).numpy()
    index = build_item_index(item_emb, index_spec)
    index.save(writer.path(f"{prefix}items.faiss"))
    writer.set_role(f"{prefix}items.faiss", role)
    writer.write_tensors(f"{prefix}tables.safetensors", fold_tables(fold))
    writer.set_role(f"{prefix}tables.safetensors", role)
    weights = {**state_tensors("two_tower", two_tower), **state_tensors("ranker", ranker)}
    writer.write_tensors(f"{prefix}weights.safetensors", weights)
    writer.set_role(f"{prefix}weights.safetensors", "offline")
    return {
        "fold": fold.name,
        "index": index_spec.to_dict(),
        "onnx_parity_max_abs": parity_max,
        "embedding_dim": int(item_emb.shape[1]),
        "dense_quantization": None if dense_quant is None else dense_quant.to_dict(),
    }


def write_catalogue(writer: ArtifactWriter, fold: Fold) -> None:
    """Raw ids and item metadata (titles, genres) for the API; shared by every prefix."""
    d = fold.dataset
    writer.write_json(
        "catalogue.json",
        {
            "user_ids": list(d.users.raw_ids),
            "item_ids": list(d.items.raw_ids),
            "titles": list(d.items.title),
            "genres": list(d.items.genres),
        },
    )


def parameter_count(module: torch.nn.Module) -> int:
    """Trainable parameters plus quantized embedding codes (int8 tables live in buffers)."""
    quantized = sum(m.num_embeddings * m.embedding_dim for m in module.modules() if hasattr(m, "weight_q"))
    return sum(p.numel() for p in module.parameters()) + quantized


def model_entry(models, index_spec: IndexSpec) -> dict:
    """The manifest's description of one fitted model (see models.train.FoldModels)."""
    return {
        "retrieval_weight": models.retrieval_weight,
        "temperature": models.two_tower.config.temperature,
        "epochs": {"retrieval": models.retrieval.epochs, "ranker": models.ranking.epochs},
        "train_seconds": {"retrieval": models.retrieval.seconds, "ranker": models.ranking.seconds},
        "parameters": {
            "two_tower": parameter_count(models.two_tower),
            "user_tower": parameter_count(models.two_tower.user_tower),
            "item_tower": parameter_count(models.two_tower.item_tower),
            "ranker": parameter_count(models.ranker),
        },
        "index": index_spec.to_dict(),
    }


def write_fitted_artifact(
    out,
    variant: str,
    selected,
    final,
    config: dict,
    data: dict,
    index_spec: IndexSpec,
    dense_quant: DenseQuantizer | None = None,
    graphs: ExportCache | None = None,
) -> ArtifactWriter:
    """Write both fitted models (selection and served) of a variant; returns the committed writer.

    `graphs` (default: a new one) lets the second model, and later artifacts given the same
    cache, reuse graphs of the same architecture rather than export them again.
    """
    entries = {}
    graphs = ExportCache() if graphs is None else graphs
    writer = ArtifactWriter(out, variant, config={}, data=data)
    try:
        for prefix, models in ((SERVED_PREFIX, final), (SELECTION_PREFIX, selected)):
            entries[prefix] = {
                **model_entry(models, index_spec),
                **write_model(
                    writer,
                    prefix,
                    models.fold,
                    models.two_tower,
                    models.ranker,
                    index_spec,
                    dense_quant,
                    graphs,
                ),
            }
        write_catalogue(writer, final.fold)
        writer.set("config", {**config, "feature_space": final.fold.space.to_dict(), "models": entries})
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return writer


def read_state(artifact, prefix: str, module_prefix: str) -> dict[str, torch.Tensor]:
    tensors = artifact.read_tensors(f"{prefix}weights.safetensors")
    cut = len(module_prefix) + 1
    return {
        k[cut:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith(module_prefix + ".")
    }


def read_teacher(artifact, prefix: str, fold: Fold):
    """Rebuild the teacher's PyTorch models of one prefix from its config and weights (strict)."""
    from slimrec.models.ranker import Ranker
    from slimrec.models.train import TrainConfig
    from slimrec.models.two_tower import TwoTower

    config = TrainConfig.from_dict(artifact.config["train"])
    two_tower = TwoTower(config.two_tower, fold.space, fold.tables)
    ranker = Ranker(config.ranker, fold.space, fold.tables)
    for name, module in (("two_tower", two_tower), ("ranker", ranker)):
        try:
            module.load_state_dict(read_state(artifact, prefix, name), strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{artifact.file(prefix + 'weights.safetensors')}: {name} weights do not match "
                f"the manifest's config: {str(exc).splitlines()[0]}"
            ) from None
        module.eval()
    return config, two_tower, ranker
