"""Pruning: smaller Linear layers, exact no-ops, SVD cross layers, shared rare rows, unstructured zeros."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from slimrec.artifact.features import FeatureSpace
from slimrec.compression.prune import PruneConfig, prune_, prune_summary
from slimrec.compression.prune_embeddings import embedding_rows, model_tables, share_rare_rows_
from slimrec.compression.prune_layers import cross_rank, hidden_unit_pairs, reduce_cross_rank_
from slimrec.compression.prune_unstructured import (
    apply_masks_,
    magnitude_prune_,
    sparse_storage_bytes,
    sparsity_masks,
)
from slimrec.models.export import export_onnx, parity
from slimrec.models.ranker import CrossLayer, Ranker, RankerConfig
from slimrec.models.two_tower import TwoTower, TwoTowerConfig
from torch import nn

N_USERS, N_ITEMS, HISTORY = 6, 10, 5


def space() -> FeatureSpace:
    return FeatureSpace(
        n_users=N_USERS,
        n_items=N_ITEMS,
        history_len=HISTORY,
        genders=["F", "M"],
        occupations=["a", "b", "c"],
        zip_prefixes=["10", "20"],
        genres=["x", "y", "z"],
    )


def tables() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "user_rows": torch.arange(N_USERS + 1),
        "item_rows": torch.arange(N_ITEMS + 1),
        "item_genres": torch.randint(0, 2, (N_ITEMS + 1, 3), generator=g).to(torch.uint8),
        "item_year": torch.randint(0, 5, (N_ITEMS + 1,), generator=g),
    }


def two_tower(**overrides) -> TwoTower:
    torch.manual_seed(0)
    config = TwoTowerConfig(
        id_dim=8, feature_dim=4, user_hidden=(32, 16), item_hidden=(16,), out_dim=8, **overrides
    )
    return TwoTower(config, space(), tables()).eval()


def ranker(cross_rank: int | None = None) -> Ranker:
    torch.manual_seed(0)
    config = RankerConfig(id_dim=8, feature_dim=4, n_cross=2, cross_rank=cross_rank, deep=(32, 16))
    return Ranker(config, space(), tables()).eval()


def user_inputs(users=(1, 2, 3, 4), history=None):
    g = torch.Generator().manual_seed(2)
    users = torch.tensor(users)
    if history is None:
        history = torch.randint(0, N_ITEMS + 1, (len(users), HISTORY), generator=g)
    return users, torch.randint(0, 2, (len(users), 4), generator=g), history


def ranker_inputs():
    users, features, history = user_inputs()
    return users, features, history, torch.arange(1, 4 * 3 + 1).view(4, 3) % N_ITEMS + 1


def outputs(model, items=None):
    items = torch.arange(1, N_ITEMS + 1) if items is None else items
    with torch.no_grad():
        if isinstance(model, Ranker):
            return (model(*ranker_inputs()),)
        return model.user_tower(*user_inputs()), model.item_tower(items)


def linear_shapes(seq: nn.Sequential) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for m in seq if isinstance(m, nn.Linear)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- structured: hidden units ---------------------------------------------------------------------


def test_prune_two_tower_rebuilds_smaller_layers_and_keeps_the_embedding_dim():
    model = two_tower()
    before = copy.deepcopy(model)
    prune_(model, PruneConfig(keep_fraction=0.5, min_units=4))

    # user MLP in = 8 id + 4*4 features + 3*8 history = 48; 32 -> 16 and 16 -> 8 units; out dim stays 8.
    assert linear_shapes(model.user_tower.mlp) == [(16, 48), (8, 16), (8, 8)]
    assert linear_shapes(model.item_tower.mlp) == [(8, 16), (8, 8)]  # in = 8 id + 2*4 side features
    assert n_params(model) < n_params(before)
    u, v = outputs(model)
    assert u.shape == (4, 8) and v.shape == (N_ITEMS, 8)

    # The config follows, so the pruned model rebuilds from it and loads strictly.
    assert model.config.user_hidden == (16, 8) and model.config.item_hidden == (8,)
    assert before.config.user_hidden == (32, 16)  # the old config object is not mutated
    rebuilt = TwoTower(model.config, space(), model_tables(model)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(outputs(rebuilt), outputs(model), strict=True))

    summary = prune_summary(before, model)
    assert summary["params"]["user_tower.mlp"]["after"] < summary["params"]["user_tower.mlp"]["before"]
    assert summary["params"]["user_tower.user_embedding"]["ratio"] == 1.0
    # MACs = sum of in*out: user 48*32 + 32*16 + 16*8 = 2176 -> 48*16 + 16*8 + 8*8 = 960.
    assert summary["macs_per_example"]["user_tower"] == {"before": 2176, "after": 960, "ratio": 960 / 2176}


def test_prune_ranker_shrinks_deep_head_and_cross_then_trains_and_exports(tmp_path):
    model = ranker()
    before = copy.deepcopy(model)
    dim = model.input_dim  # 6 * 4 + 4 * 8 = 56
    prune_(model, PruneConfig(keep_fraction=0.5, min_units=4, cross_keep_fraction=0.25))

    assert linear_shapes(model.deep) == [(16, dim), (8, 16)]
    assert model.head.in_features == 8  # the last deep layer's units fed the head, so it shrank too
    assert [cross_rank(c) for c in model.cross] == [14, 14] and model.config.cross_rank == 14
    assert model.config.deep == (16, 8)
    assert n_params(model) < n_params(before)
    assert outputs(model)[0].shape == (4, 3)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # after pruning: parameters were replaced
    logits = model(*ranker_inputs())
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss.backward()
    head = model.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(head, model.head.weight)

    path = export_onnx(model, "ranker", tmp_path / "ranker.onnx", HISTORY)
    assert parity(model, "ranker", path, HISTORY) < 1e-4


def test_pruned_user_tower_exports_with_parity(tmp_path):
    model = prune_(two_tower(), PruneConfig(keep_fraction=0.25, min_units=2))
    path = export_onnx(model.user_tower, "user_tower", tmp_path / "user.onnx", HISTORY)
    assert parity(model.user_tower, "user_tower", path, HISTORY) < 1e-4


@pytest.mark.parametrize("build", [two_tower, ranker, lambda: ranker(cross_rank=6)])
def test_keep_everything_is_an_exact_no_op(build):
    model = build()
    expected = outputs(model)
    prune_(model, PruneConfig(keep_fraction=1.0, cross_keep_fraction=1.0))
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), expected, strict=True))


def hand_mlp() -> nn.Sequential:
    """2 -> 4 -> 1. Unit scores ||(W_in row, b)|| * |W_out col|: 1*1, 3*1, 0.5*1, 1*2 = [1, 3, 0.5, 2]."""
    mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 1))
    with torch.no_grad():
        mlp[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.3, 0.4], [1.0, 0.0]]))
        mlp[0].bias.zero_()
        mlp[3].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 2.0]]))
    return mlp


def test_weight_norm_keeps_the_highest_scoring_units():
    mlp = hand_mlp()
    w_in, w_out = mlp[0].weight.clone(), mlp[3].weight.clone()
    prune_(mlp, PruneConfig(keep_fraction=0.5, min_units=1))
    assert torch.equal(mlp[0].weight, w_in[[1, 3]])  # scores 3 and 2 win; order is kept
    assert torch.equal(mlp[3].weight, w_out[:, [1, 3]])
    assert isinstance(mlp[2], nn.Dropout)


def test_weight_norm_counts_the_bias_and_respects_min_units():
    mlp = hand_mlp()
    with torch.no_grad():
        mlp[0].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # unit 2: ||(0.3, 0.4, 5)|| > 5, top score
    prune_(mlp, PruneConfig(keep_fraction=0.25, min_units=2))
    assert mlp[0].out_features == 2
    assert torch.equal(mlp[0].bias, torch.tensor([0.0, 5.0]))  # units 1 (score 3) and 2 (score ~5)


def test_taylor_prunes_a_dead_unit_that_weight_norm_would_keep():
    mlp = hand_mlp()
    with torch.no_grad():
        mlp[0].bias.copy_(torch.tensor([0.0, -100.0, 0.0, 0.0]))  # unit 1 never fires on x >= 0
    x = torch.rand(64, 2)
    expected = mlp.eval()(x)

    def losses():
        for chunk in x.split(16):
            yield mlp(chunk).sum()

    prune_(mlp, PruneConfig(keep_fraction=0.75, min_units=1, importance="taylor"), losses)
    assert mlp[0].out_features == 3 and -100.0 not in mlp[0].bias.tolist()
    assert torch.allclose(mlp(x), expected)  # a dead unit contributed nothing
    assert mlp[0].weight.grad is None  # importance leaves parameter gradients alone


def test_taylor_on_the_ranker_and_two_tower_losses():
    model = ranker()
    args = ranker_inputs()

    def ranker_losses():
        for _ in range(2):
            logits = model(*args)
            yield nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    prune_(model, PruneConfig(keep_fraction=0.5, min_units=2, importance="taylor"), ranker_losses)
    assert linear_shapes(model.deep) == [(16, model.input_dim), (8, 16)] and model.head.in_features == 8
    assert model.training is False  # the mode it came in with

    towers = two_tower()
    users, features, history = user_inputs()
    items = torch.tensor([1, 2, 3, 4])
    log_q = torch.zeros(N_ITEMS + 1)
    prune_(
        towers,
        PruneConfig(keep_fraction=0.5, min_units=2, importance="taylor"),
        lambda: (towers.in_batch_loss(users, features, history, items, log_q) for _ in range(2)),
    )
    assert linear_shapes(towers.user_tower.mlp) == [(16, 48), (8, 16), (8, 8)]


def test_taylor_needs_batches_and_fresh_losses():
    with pytest.raises(ValueError, match="importance_batches"):
        prune_(hand_mlp(), PruneConfig(importance="taylor"))
    mlp = hand_mlp()
    precomputed = [mlp(torch.rand(4, 2)).sum() for _ in range(2)]
    with pytest.raises(ValueError, match="generator"):
        prune_(mlp, PruneConfig(importance="taylor", min_units=1), precomputed)


def test_filter_fn_skips_modules_and_pairs_skip_cross_factors():
    model = two_tower()
    prune_(
        model,
        PruneConfig(
            keep_fraction=0.5, min_units=1, filter_fn=lambda module, name: not name.startswith("item_tower")
        ),
    )
    assert linear_shapes(model.item_tower.mlp) == [(16, 16), (8, 16)]
    assert linear_shapes(model.user_tower.mlp)[0] == (16, 48)
    names = [p.name for p in hidden_unit_pairs(ranker(cross_rank=6))]
    assert names == ["deep.0", "deep.3"]  # the low-rank cross Sequential has no ReLU: not an MLP


# --- cross layers ---------------------------------------------------------------------------------


def nearly_rank_3_cross(dim: int = 12) -> CrossLayer:
    torch.manual_seed(0)
    layer = CrossLayer(dim, None)
    with torch.no_grad():
        layer.w.weight.copy_(torch.randn(dim, 3) @ torch.randn(3, dim) + 1e-4 * torch.randn(dim, dim))
    return layer


def test_svd_cross_at_full_rank_reproduces_outputs():
    layer = nearly_rank_3_cross()
    x0, x = torch.randn(5, 12), torch.randn(5, 12)
    expected = layer(x0, x)
    reduce_cross_rank_(layer, 12)
    assert isinstance(layer.w, nn.Sequential) and cross_rank(layer) == 12
    assert torch.allclose(layer(x0, x), expected, atol=1e-5)


def test_svd_cross_at_reduced_rank_is_close_and_smaller():
    layer = nearly_rank_3_cross()
    w = layer.w.weight.detach().clone()
    x0, x = torch.randn(5, 12), torch.randn(5, 12)
    expected, params = layer(x0, x), n_params(layer)
    reduce_cross_rank_(layer, 4)
    got = layer(x0, x)
    assert n_params(layer) == 2 * 12 * 4 + 12 < params == 12 * 12 + 12
    assert ((got - expected).norm() / expected.norm()) < 1e-3
    # Eckart-Young: the spectral error of the rank-4 W is the 5th singular value of W.
    product = layer.w[1].weight @ layer.w[0].weight
    sigma = torch.linalg.svdvals(w)
    assert torch.isclose(torch.linalg.matrix_norm(w - product, ord=2), sigma[4], rtol=1e-2)


def test_low_rank_cross_drops_its_weakest_rank_dims():
    torch.manual_seed(0)
    layer = CrossLayer(10, 6)
    with torch.no_grad():  # rank dims with ||U col|| * ||V row|| = 1e-3, 1, 1e-3, 1, 1, 1e-3
        scale = torch.tensor([1e-3, 1, 1e-3, 1, 1, 1e-3])
        layer.w[0].weight.copy_(torch.linalg.qr(torch.randn(10, 6)).Q.T * scale[:, None])
        layer.w[1].weight.copy_(torch.linalg.qr(torch.randn(10, 6)).Q)
    w = (layer.w[1].weight @ layer.w[0].weight).detach()
    reduce_cross_rank_(layer, 3)
    assert cross_rank(layer) == 3 and n_params(layer) == 2 * 10 * 3 + 10
    # Only the three 1e-3 directions went: the spectral error is 1e-3 (dropping a unit one would be 1).
    error = float(torch.linalg.matrix_norm(w - (layer.w[1].weight @ layer.w[0].weight).detach(), ord=2))
    assert error == pytest.approx(1e-3, rel=1e-2)
    same = layer.w
    reduce_cross_rank_(layer, 3)
    assert layer.w is same  # nothing removed: untouched
    with pytest.raises(ValueError, match="rank"):
        reduce_cross_rank_(layer, 4)


def test_full_rank_cross_is_left_alone_when_factors_would_not_be_smaller():
    model = ranker()
    prune_(model, PruneConfig(keep_fraction=1.0, cross_keep_fraction=0.5))  # 2 * dim * dim/2 == dim^2
    assert all(isinstance(c.w, nn.Linear) for c in model.cross) and model.config.cross_rank is None


# --- embedding rows -------------------------------------------------------------------------------

USER_COUNTS = np.array([5, 0, 3, 1, 9, 2])  # users 1, 3, 5 (codes) are frequent at min_count 3
ITEM_COUNTS = np.array([4, 1, 4, 0, 4, 4, 2, 4, 1, 4])  # items (codes) 1, 3, 5, 6, 8, 10 are frequent
FREQUENT_USERS, RARE_USERS = [1, 3, 5], [2, 4, 6]
FREQUENT_ITEMS, RARE_ITEMS = [1, 3, 5, 6, 8, 10], [2, 4, 7, 9]


def test_share_rare_rows_two_tower():
    model = two_tower()
    before = copy.deepcopy(model)
    frequent_history = torch.tensor([[0, 0, 1, 3, 5], [6, 8, 10, 1, 1], [0, 0, 0, 0, 3]])
    inputs = user_inputs(FREQUENT_USERS, frequent_history)
    share_rare_rows_(model, USER_COUNTS, ITEM_COUNTS, min_count=3)

    assert embedding_rows(model) == {
        "user_tower.user_embedding": 4,
        "user_tower.history.embedding": 7,
        "item_tower.item_embedding": 7,
    }
    assert model.user_tower.user_rows.tolist() == [0, 1, 0, 2, 0, 3, 0]
    assert (model.item_tower.item_rows[RARE_ITEMS] == 0).all()
    assert torch.equal(model.user_tower.item_rows, model.item_tower.item_rows)
    # Frequent ids keep their exact vectors, rare ones now share the fallback row.
    old, new = before.user_tower.user_embedding.weight, model.user_tower.user_embedding.weight
    assert torch.equal(new[model.user_tower.user_rows[FREQUENT_USERS]], old[FREQUENT_USERS])
    with torch.no_grad():
        assert torch.equal(model.user_tower(*inputs), before.user_tower(*inputs))
        assert torch.equal(
            model.item_tower(torch.tensor(FREQUENT_ITEMS)), before.item_tower(torch.tensor(FREQUENT_ITEMS))
        )
        before.user_tower.user_rows[RARE_USERS] = 0  # what "unknown user" means in the old model
        rare = user_inputs(RARE_USERS, frequent_history)
        assert torch.equal(model.user_tower(*rare), before.user_tower(*rare))

    rebuilt = TwoTower(model.config, space(), model_tables(model))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    summary = prune_summary(before, model)
    rows = summary["embedding_rows"]["item_tower.item_embedding"]
    assert rows == {"before": 11, "after": 7, "ratio": 7 / 11}


def test_share_rare_rows_ranker_through_prune_():
    model = ranker()
    before = copy.deepcopy(model)
    history = torch.tensor([[0, 0, 1, 3, 5], [6, 8, 10, 1, 1]])
    candidates = torch.tensor([[1, 3, 5], [6, 8, 10]])
    args = (torch.tensor([1, 2]), torch.zeros(2, 4, dtype=torch.long), history, candidates)
    with pytest.raises(ValueError, match="counts"):
        prune_(model, PruneConfig(keep_fraction=1.0, embedding_min_count=3))
    prune_(model, PruneConfig(keep_fraction=1.0, embedding_min_count=3), item_counts=ITEM_COUNTS)
    assert embedding_rows(model) == {"item_embedding": 7}
    with torch.no_grad():
        assert torch.equal(model(*args), before(*args))
    with pytest.raises(ValueError, match="item_counts must have shape"):
        share_rare_rows_(model, None, ITEM_COUNTS[:-1], min_count=3)


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("keep_fraction", 0.0),
        ("keep_fraction", 1.5),
        ("importance", "random"),
        ("min_units", 0),
        ("cross_keep_fraction", 0.0),
        ("embedding_min_count", -1),
        ("unstructured_sparsity", 1.0),
        ("version", 2),
        ("filter_fn", "all"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"PruneConfig.{field}"):
        PruneConfig(**{field: value})


def test_config_round_trips_without_filter_fn():
    config = PruneConfig(keep_fraction=0.3, filter_fn=lambda m, n: True)
    assert "filter_fn" not in config.to_dict()
    assert PruneConfig.from_dict(config.to_dict()).keep_fraction == 0.3
    with pytest.raises(ValueError, match="unknown PruneConfig fields"):
        PruneConfig.from_dict({"keep_fractoin": 0.3})


# --- unstructured ---------------------------------------------------------------------------------


def test_unstructured_sparsity_and_sparse_storage():
    model = ranker()
    dense_storage = sparse_storage_bytes(model)
    assert dense_storage["csr_bytes"] > dense_storage["dense_bytes"]  # CSR only pays off when sparse
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    prune_(model, PruneConfig(keep_fraction=1.0, prune_cross_rank=False, unstructured_sparsity=0.9))

    storage = sparse_storage_bytes(model)
    assert storage["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert storage["csr_bytes"] < storage["dense_bytes"] == dense_storage["dense_bytes"]
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # zeros, not fewer weights
    assert sparse_storage_bytes(model, value_bytes=1)["csr_bytes"] < storage["csr_bytes"]


def test_masks_keep_zeros_through_fine_tuning():
    model = magnitude_prune_(ranker(), 0.8)
    masks = sparsity_masks(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(*ranker_inputs()).sum().backward()
    optimizer.step()
    apply_masks_(model, masks)
    assert sparse_storage_bytes(model)["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_summary_is_plain_json():
    before = ranker()
    after = prune_(copy.deepcopy(before), PruneConfig(unstructured_sparsity=0.5))
    summary = prune_summary(before, after)
    json.dumps(summary, allow_nan=False)  # the artifact writer refuses NaN
    assert summary["linear_sparsity"]["ratio"] is None and summary["linear_sparsity"]["after"] > 0.49
    assert summary["params"]["total"]["after"] < summary["params"]["total"]["before"]
