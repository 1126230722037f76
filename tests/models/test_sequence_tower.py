"""models/sequence_tower.py, the two-tower's attention option: causality, padding, new users, full softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from slimrec.models.sequence_tower import SequenceEncoder
from slimrec.models.two_tower import TwoTower, TwoTowerConfig
from tiny_towers import SPACE, TABLES, TOWER, fit, two_tower, users
from torch import nn

ATTENTION = TwoTowerConfig(
    **{**TOWER.to_dict(), "history_encoder": "attention", "encoder_heads": 2, "encoder_dropout": 0.0}
)


def encoder(seed: int = 0, history_len: int = 5) -> SequenceEncoder:
    torch.manual_seed(seed)
    return SequenceEncoder(n_rows=8, dim=4, history_len=history_len, layers=2, heads=2, dropout=0.0).eval()


def test_tower_shapes_unit_norm_and_history_matters():
    model = two_tower(config=ATTENTION)
    with torch.no_grad():
        u = model.user_tower(**users([1, 2, 1], [[0, 1, 2], [3, 4, 5], [0, 2, 1]]))
    assert u.shape == (3, 3)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(3))
    # Same user, same items in another order: the encoder sees positions, unlike a mean.
    assert not torch.allclose(u[0], u[2], atol=1e-4)


def test_later_items_do_not_change_earlier_positions():
    enc = encoder()
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 6, 7]])  # positions 3 and 4 differ
    with torch.no_grad():
        out_a, out_b = enc.sequence(a, a > 0), enc.sequence(b, b > 0)
    torch.testing.assert_close(out_a[:, :3], out_b[:, :3])
    assert not torch.allclose(out_a[:, 3:], out_b[:, 3:], atol=1e-4)


def test_last_only_readout_equals_the_full_sequence_last_position():
    enc = encoder()
    rows = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        full = enc.sequence(rows, rows > 0)[:, -1]
        torch.testing.assert_close(enc(rows, rows > 0), full)


def test_left_padding_is_invisible_to_real_items():
    # Right-aligned [0, 0, 1, 2, 3]: the padded positions are never keys of a real item, so their
    # position vectors (the only thing that differs between one padded slot and another) cannot
    # reach the output, and a shorter window holding the same items gives the same encoding.
    enc = encoder()
    rows = torch.tensor([[0, 0, 1, 2, 3]])
    with torch.no_grad():
        before = enc(rows, rows > 0)
        enc.position[:2].add_(5.0)
        after = enc(rows, rows > 0)
        shorter = enc(rows[:, 2:], rows[:, 2:] > 0)  # N = 3: positions counted from the end
    torch.testing.assert_close(before, after)
    torch.testing.assert_close(before, shorter)


@pytest.mark.parametrize("training", [False, True])
def test_all_padding_rows_are_finite(training):
    # A new user with no history (what the server sends): every key is padding, yet each query
    # keeps its own diagonal, so no softmax row is empty and nothing is NaN, forward or backward.
    config = TwoTowerConfig(**{**ATTENTION.to_dict(), "encoder_dropout": 0.2})
    model = two_tower(config=config).train(training)
    inputs = users([0, 0], [[0, 0, 0], [0, 0, 1]])
    u = model.user_tower(**inputs)
    assert torch.isfinite(u).all()
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))
    u.sum().backward()
    grads = [p.grad for p in model.user_tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_embedding_pruning_finds_the_history_table():
    # compression.prune_embeddings reaches the history table as `history.embedding`, for either encoder.
    model = two_tower(config=ATTENTION)
    assert isinstance(model.user_tower.history.embedding, nn.Embedding)
    assert model.user_tower.history.embedding.padding_idx == 0


# --- the full softmax ----------------------------------------------------------------------------


class FixedTower(nn.Module):
    """Returns fixed rows of `table` by the first input's codes (stands in for a real tower)."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table)
        self.item_rows = torch.arange(len(table))  # the catalogue size the loss reads: len - 1 items

    def forward(self, code, *_):
        return self.table[code]


def test_full_softmax_loss_by_hand():
    # Catalogue of 3 items: v_1 = [1, 0], v_2 = [0, 1], v_3 = [-1, 0]; temperature 0.5.
    # Rows (u_a = [1, 0], item 1), (u_b = [0, 1], item 3): logits u . v / 0.5
    #   row a: [2, 0, -2], target item 1 -> log(e^2 + 1 + e^-2) - 2
    #   row b: [0, 2, 0],  target item 3 -> log(2 + e^2) - 0
    # The in-batch loss would see only items 1 and 3 and subtract log q; the full one sees all three.
    model = TwoTower(TwoTowerConfig(**{**TOWER.to_dict(), "temperature": 0.5, "loss": "full"}), SPACE, TABLES)
    model.user_tower = FixedTower([[1, 0], [0, 1]])
    model.item_tower = FixedTower([[0, 0], [1, 0], [0, 1], [-1, 0]])
    got = model.retrieval_loss(
        torch.tensor([0, 1]),
        torch.zeros(2, 4, dtype=torch.long),
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([1, 3]),
        torch.tensor([0.0, 5.0, 5.0, 5.0]),  # ignored: no sampling bias to correct
    ).item()
    expected = (math.log(math.exp(2) + 1 + math.exp(-2)) - 2 + math.log(2 + math.exp(2))) / 2
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("loss", "full"), [("in_batch", False), ("full", True), ("auto", True)])
def test_retrieval_loss_follows_the_config(loss, full, monkeypatch):
    model = two_tower(config=TwoTowerConfig(**{**TOWER.to_dict(), "loss": loss}))
    called = []
    monkeypatch.setattr(model, "full_softmax_loss", lambda *a: called.append("full") or torch.tensor(0.0))
    monkeypatch.setattr(model, "in_batch_loss", lambda *a: called.append("in_batch") or torch.tensor(0.0))
    model.retrieval_loss(*users([1], [[0, 1, 2]]).values(), torch.tensor([1]), torch.zeros(6))
    assert called == ["full" if full else "in_batch"]  # "auto": 5 items fit the full softmax


def test_auto_loss_samples_in_batch_past_the_size_limit(monkeypatch):
    monkeypatch.setattr("slimrec.models.two_tower.FULL_SOFTMAX_MAX_ITEMS", 4)  # the tiny catalogue has 5
    model = two_tower(config=TwoTowerConfig(**{**TOWER.to_dict(), "loss": "auto"}))
    called = []
    monkeypatch.setattr(model, "in_batch_loss", lambda *a: called.append("in_batch") or torch.tensor(0.0))
    model.retrieval_loss(*users([1], [[0, 1, 2]]).values(), torch.tensor([1]), torch.zeros(6))
    assert called == ["in_batch"]


def test_attention_tower_learns_a_sequential_toy_problem():
    # The next item is the one after the last seen (1 -> 2 -> 3 -> 4 -> 5), users anonymous
    # (code 0): only the history's order can tell the rows apart.
    model = two_tower(seed=0, config=TwoTowerConfig(**{**ATTENTION.to_dict(), "loss": "full"})).train()
    inputs = {
        **users([0, 0, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]),
        "item_code": torch.tensor([2, 3, 4, 5]),
        "log_q": torch.zeros(6),
    }
    losses = fit(lambda: model.retrieval_loss(**inputs), model.parameters(), steps=200)
    model.eval()
    with torch.no_grad():
        scores = model.user_tower(*list(inputs.values())[:3]) @ model.item_embeddings(SPACE.n_items).T
    assert scores.argmax(1).tolist() == [1, 2, 3, 4]  # item index = code - 1
    # Seed 0 starts at about 12.3 and ends near 0.003 (wide margin below).
    assert losses[-1] < 0.05 * losses[0]


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"history_encoder": "lstm"}, "history_encoder must be one of"),
        ({"loss": "sampled"}, "loss must be one of"),
        ({"encoder_layers": 0}, "encoder_layers and encoder_heads must be >= 1"),
        ({"id_dim": 6, "encoder_heads": 4}, "encoder_heads must divide id_dim, got 2, 4 \\(id_dim 6\\)"),
        ({"encoder_dropout": 1.0}, r"encoder_dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        TwoTowerConfig(**changes)


def test_config_round_trips_with_the_encoder_fields():
    assert TwoTowerConfig(**ATTENTION.to_dict()) == ATTENTION


# --- training every position: windows and their targets ------------------------------------------


def test_windows_tile_each_users_sequence_so_every_item_is_a_target_once():
    from slimrec.models.sequence_tower import next_item_targets, window_rows

    # User 7 has rows 0..6 (item code = row + 1), user 9 rows 7..8; windows of history_len 3.
    users_of_rows = np.array([7] * 7 + [9] * 2)
    ends = np.flatnonzero(window_rows(users_of_rows, 3))
    assert ends.tolist() == [0, 3, 6, 8]  # each user's last row, then every third before it
    # Each window's history: the up-to-3 rows of its user before it, right-aligned, 0-padded.
    first = {7: 0, 9: 7}
    history = torch.tensor(
        [
            [0] * (3 - len(r)) + [p + 1 for p in r]
            for r in (range(max(first[users_of_rows[e]], e - 3), e) for e in ends)
        ]
    )
    keep, targets = next_item_targets(history, torch.from_numpy(ends + 1))
    # Every row but each user's first (row 0 and row 7: nothing before them to predict from).
    assert sorted(targets.tolist()) == [2, 3, 4, 5, 6, 7, 9]
    assert keep.sum() == len(targets)
