"""models/two_tower.py: tower shapes and norms, the unknown-user path, the in-batch loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
from slimrec.models.ranker import RankerConfig
from slimrec.models.two_tower import TwoTower, TwoTowerConfig
from tiny_towers import SPACE, TABLES, TOWER, fit, two_tower, users
from torch import nn


# --- two-tower: shapes and norms ----------------------------------------------------------------
def test_tower_output_shapes_and_unit_norm():
    model = two_tower()
    with torch.no_grad():
        u = model.user_tower(**users([1, 2], [[0, 1, 2], [3, 4, 5]]))
        v = model.item_tower(torch.tensor([1, 2, 3, 4, 5]))
        catalogue = model.item_embeddings(SPACE.n_items, batch_size=2)  # 3 batches: 2 + 2 + 1
    assert u.shape == (2, 3) and v.shape == (5, 3)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(5))
    # item_embeddings covers item indices 0..4, i.e. codes 1..5, in order.
    torch.testing.assert_close(catalogue, v)


def test_unknown_user_embedding_depends_on_history():
    model = two_tower()
    with torch.no_grad():
        # user_code 0 (unknown: the padding row of the id table), no side features, three histories.
        a, b, a_again, empty = model.user_tower(
            torch.zeros(4, dtype=torch.long),
            torch.zeros(4, 4, dtype=torch.long),
            torch.tensor([[0, 1, 2], [0, 4, 5], [0, 1, 2], [0, 0, 0]]),
        )
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(a, a_again)
    # Even with nothing at all to go on, the embedding is finite and unit norm (no 0/0 in the pooling).
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty.norm(), torch.tensor(1.0))


def test_unknown_user_ignores_the_id_table():
    model = two_tower()
    history = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model.user_tower(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long), history)
        model.user_tower.user_embedding.weight[1:].add_(1.0)  # change every real user's row
        after = model.user_tower(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long), history)
    torch.testing.assert_close(before, after)


# --- the in-batch loss by hand -------------------------------------------------------------------


class FixedTower(nn.Module):
    """Returns fixed rows of `table` by the first input's codes (stands in for a real tower)."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, code, *_):
        return self.table[code]


def loss_with_fixed_towers(user_vectors, item_vectors, item_code, log_q, temperature=0.5) -> float:
    model = TwoTower(TwoTowerConfig(**{**TOWER.to_dict(), "temperature": temperature}), SPACE, TABLES)
    model.user_tower, model.item_tower = FixedTower(user_vectors), FixedTower(item_vectors)
    n = len(item_code)
    return model.in_batch_loss(
        torch.arange(n),
        torch.zeros(n, 4, dtype=torch.long),
        torch.zeros(n, 3, dtype=torch.long),
        torch.tensor(item_code),
        torch.tensor(log_q),
    ).item()


def test_in_batch_loss_masks_repeats_of_the_positive():
    # Rows (user, item): (a, 1), (b, 1), (c, 2); u_a = u_c = [1, 0], u_b = [0, 1]; v_1 = [1, 0], v_2 = [0, 1].
    # Temperature 0.5, log q = 0. Logits u . v / 0.5 against columns (item 1, item 1, item 2):
    #   row a: [2, 2, 0] -> column 2 is item 1 again, masked: [2, -, 0] -> loss log(1 + e^-2)
    #   row b: [0, 0, 2] -> column 1 is item 1 again, masked: [-, 0, 2] -> loss log(1 + e^2)
    #   row c: [2, 2, 0] -> item 2 is unique, nothing masked  -> loss -log(e^0 / (2e^2 + 1)) = log(1 + 2e^2)
    # Unmasked, rows a and b would instead cost log(2 + e^-2) and log(2 + e^2).
    # Item vectors by code; code 0 (no item) is never used.
    user_vectors, item_vectors = [[1, 0], [0, 1], [1, 0]], [[0, 0], [1, 0], [0, 1]]
    got = loss_with_fixed_towers(user_vectors, item_vectors, [1, 1, 2], [0.0, 0.0, 0.0])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)) + math.log(1 + 2 * math.exp(2))) / 3
    assert got == pytest.approx(expected, abs=1e-6)
    unmasked = (math.log(2 + math.exp(-2)) + math.log(2 + math.exp(2)) + math.log(1 + 2 * math.exp(2))) / 3
    assert got != pytest.approx(unmasked, abs=1e-3)


def test_in_batch_loss_two_users_same_item_is_zero():
    # Both rows have item 1: each row's only other column is masked, so each softmax has one
    # candidate left, the positive itself: loss = -log 1 = 0, whatever the vectors.
    loss = loss_with_fixed_towers([[1, 0], [0, 1]], [[0, 0], [1, 0]], [1, 1], [0.0, 0.0])
    assert loss == pytest.approx(0.0, abs=1e-7)


def test_in_batch_loss_subtracts_log_q_of_each_column():
    # Rows (a, 1), (b, 2); u_a = v_1 = [1, 0], u_b = v_2 = [0, 1]; temperature 0.5 -> raw [[2, 0], [0, 2]].
    # log q = [_, 0, -2] (item 2 rarer): columns minus log q -> [[2, 2], [0, 4]]
    #   row a: -log(e^2 / (e^2 + e^2)) = log 2;   row b: -log(e^4 / (1 + e^4)) = log(1 + e^-4)
    got = loss_with_fixed_towers([[1, 0], [0, 1]], [[0, 0], [1, 0], [0, 1]], [1, 2], [0.0, 0.0, -2.0])
    assert got == pytest.approx((math.log(2) + math.log(1 + math.exp(-4))) / 2, abs=1e-6)


def test_in_batch_loss_decreases_on_a_learnable_toy_problem():
    # User k always picks item k: four rows, one per user, the other three items as negatives.
    model = two_tower(seed=0).train()
    inputs = {
        **users([1, 2, 3, 4], [[0, 0, 0]] * 4),
        "item_code": torch.tensor([1, 2, 3, 4]),
        "log_q": torch.zeros(6),
    }
    losses = fit(lambda: model.in_batch_loss(**inputs), model.parameters(), steps=40)
    # Random unit vectors at temperature 0.1 give logits in [-10, 10]: seed 0 starts at about 5.1
    # and ends near 0.07 (the assertion leaves a wide margin).
    assert losses[-1] < 0.5 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": 0.0}, r"temperature must be in \(0, 1\], got 0.0"),
        ({"temperature": -0.05}, r"temperature must be in \(0, 1\], got -0.05"),
        ({"temperature": 1.5}, r"temperature must be in \(0, 1\], got 1.5"),
        ({"id_dim": -1}, "TwoTowerConfig.id_dim must be >= 1, got -1"),
        ({"feature_dim": 0}, "TwoTowerConfig.feature_dim must be >= 1, got 0"),
        ({"out_dim": -8}, "TwoTowerConfig.out_dim must be >= 1, got -8"),
        ({"dropout": 1.0}, "dropouts must be in"),
        ({"id_dropout": -0.1}, "dropouts must be in"),
    ],
)
def test_two_tower_config_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        TwoTowerConfig(**changes)


def test_configs_accept_lists_and_round_trip():
    # TOML gives lists; the configs store tuples, so a saved config rebuilds an equal one.
    config = TwoTowerConfig(user_hidden=[16, 8], item_hidden=[8])
    assert config.user_hidden == (16, 8) and config.item_hidden == (8,)
    assert TwoTowerConfig(**config.to_dict()) == config
    assert RankerConfig(**RankerConfig(deep=[4]).to_dict()) == RankerConfig(deep=(4,))
