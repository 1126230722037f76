"""DCN-v2 ranking model (Wang et al., WWW 2021) over a request's candidate list.

Input is one row per request and a [B, C] block of candidate item codes, so the
user side (features, history) is computed once per request, not once per candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from slimrec.artifact.features import FeatureSpace
from slimrec.models.two_tower import masked_mean, mlp
from torch import nn


@dataclass
class RankerConfig:
    id_dim: int = 64
    feature_dim: int = 16
    n_cross: int = 3
    cross_rank: int | None = None  # None: full-rank W; r: the low-rank U V^T form of DCN-v2
    deep: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.1
    # Hide the side features of this share of training lists, as a new user who sends none is
    # seen: otherwise the "unknown" rows are never trained and new users are ranked through them.
    new_user_dropout: float = 0.0

    def __post_init__(self):
        self.deep = tuple(self.deep)
        if self.id_dim < 1 or self.feature_dim < 1 or self.n_cross < 0:
            raise ValueError(f"invalid RankerConfig sizes: {self}")
        if not 0 <= self.new_user_dropout < 1:
            raise ValueError(f"RankerConfig.new_user_dropout must be in [0, 1), got {self.new_user_dropout}")
        if self.cross_rank is not None and self.cross_rank < 1:
            raise ValueError(f"RankerConfig.cross_rank must be >= 1 or None, got {self.cross_rank}")

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The fields that shape the weights; the dropouts only change how they are trained."""
        return {k: v for k, v in asdict(self).items() if k not in ("dropout", "new_user_dropout")}


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l, with W full or low-rank (U V^T)."""

    def __init__(self, dim: int, rank: int | None):
        super().__init__()
        # low-rank: Sequential(Linear(dim, r, bias=False), Linear(r, dim))
        self.w: nn.Linear | nn.Sequential
        if rank is None:
            self.w = nn.Linear(dim, dim)
        else:
            self.w = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


class Ranker(nn.Module):
    """(user_code [B], user_features [B, 4], history [B, N], candidates [B, C]) -> logits [B, C].

    The user is described by side features and history only, not an id embedding: the
    ranker trains on lists cut from the fitted sequences, and a user-id embedding fitted
    on the whole sequence would memorise the very items a list asks it to predict.
    `user_code` stays an input so every served model has the same signature.
    """

    # buffers, declared for type checkers (nn.Module.__getattr__ types them Tensor | Module)
    item_rows: torch.Tensor
    item_genres: torch.Tensor
    item_year: torch.Tensor

    def __init__(self, config: RankerConfig, space: FeatureSpace, tables: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        d, f = config.id_dim, config.feature_dim
        self.register_buffer("item_rows", tables["item_rows"].long())
        self.register_buffer("item_genres", tables["item_genres"].to(torch.uint8))
        self.register_buffer("item_year", tables["item_year"].long())
        self.item_embedding = nn.Embedding(int(tables["item_rows"].max()) + 1, d, padding_idx=0)
        self.feature_embeddings = nn.ModuleList(nn.Embedding(n, f) for n in space.user_vocab_sizes)
        self.genre_projection = nn.Linear(tables["item_genres"].shape[1], f)
        self.year_embedding = nn.Embedding(space.n_year_buckets, f)
        self.input_dim = dim = (4 * f + d) + (d + 2 * f) + d + d
        self.cross = nn.ModuleList(CrossLayer(dim, config.cross_rank) for _ in range(config.n_cross))
        self.deep = mlp([dim, *config.deep], config.dropout)
        self.deep_activation = nn.ReLU()
        self.head = nn.Linear(config.deep[-1] if config.deep else dim, 1)

    def forward(self, user_code, user_features, history, candidates) -> torch.Tensor:
        b, c = candidates.shape
        mask = history > 0
        h = self.item_embedding(self.item_rows[history])  # shares the item table: [B, N, d]
        h_mean = masked_mean(h, mask)
        if self.training and self.config.new_user_dropout:
            new = torch.rand(b, device=user_features.device) < self.config.new_user_dropout
            user_features = user_features.masked_fill(new[:, None], 0)
        feats = [emb(user_features[:, j]) for j, emb in enumerate(self.feature_embeddings)]
        user = torch.cat([*feats, h_mean], dim=1)

        item = self.item_embedding(self.item_rows[candidates])  # [B, C, d]
        item_side = torch.cat(
            [
                item,
                self.genre_projection(self.item_genres[candidates].to(self.genre_projection.weight.dtype)),
                self.year_embedding(self.item_year[candidates]),
            ],
            dim=2,
        )
        # Target-aware attention over the history (DIN-style): which past items resemble this one.
        att = torch.einsum("bcd,bnd->bcn", item, h) / item.shape[-1] ** 0.5
        att = torch.softmax(att.masked_fill(~mask.unsqueeze(1), -1e9), dim=-1)
        h_target = torch.einsum("bcn,bnd->bcd", att, h) * mask.any(1).view(b, 1, 1).to(h.dtype)
        x0 = torch.cat(
            [user.unsqueeze(1).expand(b, c, -1), item_side, h_target, h_mean.unsqueeze(1) * item], dim=2
        )
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if len(self.deep):
            x = self.deep_activation(self.deep(x))
        return self.head(x).squeeze(-1)
