"""Tiny two-tower and ranker models over a 4-user, 5-item space, for the model tests."""

from __future__ import annotations

import math

import torch
from slimrec.artifact.features import FeatureSpace
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.two_tower import TwoTower, TwoTowerConfig

# 4 users, 5 items, histories of 3; every id fitted (row = code), 2 genres, a few years.
SPACE = FeatureSpace(
    n_users=4,
    n_items=5,
    history_len=3,
    genders=["F", "M"],
    occupations=["a", "b"],
    zip_prefixes=["12"],
    genres=["Comedy", "Drama"],
)
TABLES = {
    "user_rows": torch.arange(5),
    "item_rows": torch.arange(6),
    "item_genres": torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [1, 0], [0, 1]], dtype=torch.uint8),
    "item_year": torch.tensor([0, 3, 5, 7, 9, 11]),
}
TOWER = TwoTowerConfig(
    id_dim=4,
    feature_dim=2,
    user_hidden=(8,),
    item_hidden=(8,),
    out_dim=3,
    temperature=0.1,
    id_dropout=0.0,
    dropout=0.0,
)
RANKER = RankerConfig(id_dim=4, feature_dim=2, n_cross=2, deep=(8,), dropout=0.0)


def two_tower(seed: int = 0, config: TwoTowerConfig = TOWER) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(config, SPACE, TABLES).eval()


def ranker(seed: int = 0, config: RankerConfig = RANKER) -> Ranker:
    torch.manual_seed(seed)
    return Ranker(config, SPACE, TABLES).eval()


def users(codes: list[int], histories: list[list[int]]) -> dict[str, torch.Tensor]:
    return {
        "user_code": torch.tensor(codes),
        "user_features": torch.tensor([[3, 1, 2, 1]] * len(codes)),
        "history": torch.tensor(histories),
    }


def fit(loss, parameters, steps: int, lr: float = 0.02) -> list[float]:
    """`steps` Adam steps on `loss()`; the losses seen, each checked finite."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert all(math.isfinite(x) for x in losses), losses
    return losses
