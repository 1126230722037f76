"""Two-tower retrieval model (Yi et al., RecSys 2019: in-batch softmax with logQ correction).

The user tower embeds (user code, side features, recent history); the item tower
embeds an item code through buffers holding the catalogue's side features.
Both outputs are L2-normalised, so a dot product is a cosine.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from slimrec.artifact.features import FeatureSpace
from torch import nn


@dataclass
class TwoTowerConfig:
    id_dim: int = 128
    feature_dim: int = 16
    user_hidden: tuple[int, ...] = (1024, 512)
    item_hidden: tuple[int, ...] = (512, 256)
    out_dim: int = 128
    temperature: float = 0.05
    logq_weight: float = 1.0  # 1: full sampling-bias correction; lower keeps some popularity signal
    id_dropout: float = 0.2  # hide the id this often in training, so id-less users/items still embed
    dropout: float = 0.1

    def __post_init__(self):
        self.user_hidden, self.item_hidden = tuple(self.user_hidden), tuple(self.item_hidden)
        for name in ("id_dim", "feature_dim", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"TwoTowerConfig.temperature must be in (0, 1], got {self.temperature}")
        if not 0 <= self.id_dropout < 1 or not 0 <= self.dropout < 1:
            raise ValueError("TwoTowerConfig dropouts must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear-ReLU(-Dropout) stack; the last layer is linear only."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class HistoryPooling(nn.Module):
    """Pools a 0-padded, right-aligned history of item rows into [mean, attention, last]."""

    def __init__(self, n_rows: int, dim: int, history_len: int):
        super().__init__()
        self.embedding = nn.Embedding(n_rows, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(history_len, dim))
        self.query = nn.Parameter(torch.randn(dim) / dim**0.5)
        self.out_dim = 3 * dim

    def forward(self, history_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embedding(history_rows)  # [B, N, d]
        m = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = ((h + self.position) * self.query).sum(-1).masked_fill(~mask, -1e9)
        attended = (torch.softmax(logits, dim=1).unsqueeze(-1) * h * m).sum(1)
        return torch.cat([mean, attended, h[:, -1]], dim=1)


class UserTower(nn.Module):
    """(user_code [B], user_features [B, 4], history [B, N]) -> [B, out_dim], unit norm."""

    # buffers, declared for type checkers (nn.Module.__getattr__ types them Tensor | Module)
    user_rows: torch.Tensor
    item_rows: torch.Tensor

    def __init__(
        self,
        config: TwoTowerConfig,
        space: FeatureSpace,
        user_rows: torch.Tensor,
        item_rows: torch.Tensor,
        n_user_rows: int,
        n_item_rows: int,
    ):
        super().__init__()
        self.register_buffer("user_rows", user_rows.long())  # user code -> id-embedding row
        self.register_buffer("item_rows", item_rows.long())  # item code -> history-embedding row
        self.id_dropout = config.id_dropout
        self.user_embedding = nn.Embedding(n_user_rows, config.id_dim, padding_idx=0)
        self.feature_embeddings = nn.ModuleList(
            nn.Embedding(n, config.feature_dim) for n in space.user_vocab_sizes
        )
        self.history = HistoryPooling(n_item_rows, config.id_dim, space.history_len)
        d_in = config.id_dim + 4 * config.feature_dim + self.history.out_dim
        self.mlp = mlp([d_in, *config.user_hidden, config.out_dim], config.dropout)

    def forward(self, user_code: torch.Tensor, user_features: torch.Tensor, history: torch.Tensor):
        rows = self.user_rows[user_code]
        if self.training and self.id_dropout:
            rows = rows.masked_fill(torch.rand(rows.shape) < self.id_dropout, 0)
        feats = [emb(user_features[:, j]) for j, emb in enumerate(self.feature_embeddings)]
        pooled = self.history(self.item_rows[history], history > 0)
        x = torch.cat([self.user_embedding(rows), *feats, pooled], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """(item_code [M]) -> [M, out_dim], unit norm; side features come from buffers."""

    # buffers, declared for type checkers (nn.Module.__getattr__ types them Tensor | Module)
    item_rows: torch.Tensor
    item_genres: torch.Tensor
    item_year: torch.Tensor

    def __init__(
        self,
        config: TwoTowerConfig,
        space: FeatureSpace,
        item_rows: torch.Tensor,
        item_genres: torch.Tensor,
        item_year: torch.Tensor,
        n_item_rows: int,
    ):
        super().__init__()
        self.register_buffer("item_rows", item_rows.long())
        self.register_buffer("item_genres", item_genres.to(torch.uint8))
        self.register_buffer("item_year", item_year.long())
        self.id_dropout = config.id_dropout
        self.item_embedding = nn.Embedding(n_item_rows, config.id_dim, padding_idx=0)
        self.genre_projection = nn.Linear(item_genres.shape[1], config.feature_dim)
        self.year_embedding = nn.Embedding(space.n_year_buckets, config.feature_dim)
        d_in = config.id_dim + 2 * config.feature_dim
        self.mlp = mlp([d_in, *config.item_hidden, config.out_dim], config.dropout)

    def forward(self, item_code: torch.Tensor) -> torch.Tensor:
        rows = self.item_rows[item_code]
        if self.training and self.id_dropout:
            rows = rows.masked_fill(torch.rand(rows.shape) < self.id_dropout, 0)
        x = torch.cat(
            [
                self.item_embedding(rows),
                self.genre_projection(self.item_genres[item_code].float()),
                self.year_embedding(self.item_year[item_code]),
            ],
            dim=1,
        )
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, config: TwoTowerConfig, space: FeatureSpace, tables: dict[str, torch.Tensor]):
        """`tables`: user_rows [n_users+1], item_rows [n_items+1], item_genres, item_year (see features)."""
        super().__init__()
        self.config = config
        n_user_rows = int(tables["user_rows"].max()) + 1
        n_item_rows = int(tables["item_rows"].max()) + 1
        self.user_tower = UserTower(
            config, space, tables["user_rows"], tables["item_rows"], n_user_rows, n_item_rows
        )
        self.item_tower = ItemTower(
            config, space, tables["item_rows"], tables["item_genres"], tables["item_year"], n_item_rows
        )

    def in_batch_loss(self, user_code, user_features, history, item_code, log_q) -> torch.Tensor:
        """Sampled softmax over the batch's items, logQ-corrected; repeats of the positive are masked."""
        u = self.user_tower(user_code, user_features, history)
        v = self.item_tower(item_code)
        logits = u @ v.T / self.config.temperature - self.config.logq_weight * log_q[item_code].unsqueeze(0)
        same_item = item_code.unsqueeze(0) == item_code.unsqueeze(1)
        eye = torch.eye(len(item_code), dtype=torch.bool)
        logits = logits.masked_fill(same_item & ~eye, -1e9)
        return F.cross_entropy(logits, torch.arange(len(item_code)))

    @torch.no_grad()
    def item_embeddings(self, n_items: int, batch_size: int = 65536) -> torch.Tensor:
        """[n_items, out_dim] for the whole catalogue (item index i has code i + 1), in batches."""
        chunks = [
            self.item_tower(torch.arange(s + 1, min(s + batch_size, n_items) + 1))
            for s in range(0, n_items, batch_size)
        ]
        return torch.cat(chunks)
