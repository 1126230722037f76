"""Two-tower retrieval model (Yi et al., RecSys 2019: in-batch softmax with logQ correction).

The user tower embeds (user code, side features, recent history); the item tower
embeds an item code through buffers holding the catalogue's side features.
Both outputs are L2-normalised, so a dot product is a cosine. The history is pooled
(`HistoryPooling`) or encoded by causal self-attention (`models.sequence_tower`, SASRec);
the loss is the in-batch softmax or, for catalogues small enough, a full softmax.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from slimrec.artifact.features import FeatureSpace
from slimrec.models.distributed import gather_rows, global_mean, world_size
from slimrec.models.sequence_tower import SequenceEncoder, next_item_loss, next_item_targets
from torch import nn

HISTORY_ENCODERS = ("pooled", "attention")
LOSSES = ("in_batch", "full", "auto")
# "auto" takes the full softmax up to this many items: a [batch, items] logit matrix and the
# item tower over the whole catalogue each step (ML-1M's 3,706 items: a few ms a step).
FULL_SOFTMAX_MAX_ITEMS = 20_000


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
    history_encoder: str = "pooled"  # HISTORY_ENCODERS: mean/attention/last pooling, or SASRec's encoder
    encoder_layers: int = 2  # "attention" only: transformer blocks, heads per block, their dropout
    encoder_heads: int = 2
    encoder_dropout: float = 0.2
    loss: str = "in_batch"  # LOSSES: sampled in-batch softmax (logQ), full softmax, or full when it fits
    # "attention" only: train as SASRec does, one row per window of history_len items, every
    # position predicting the next item (models.sequence_tower.window_rows): the same targets
    # as one row per item, at about 1 / history_len of the encoder's cost per epoch.
    all_positions: bool = True

    def __post_init__(self):
        self.user_hidden, self.item_hidden = tuple(self.user_hidden), tuple(self.item_hidden)
        for name in ("id_dim", "feature_dim", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"TwoTowerConfig.temperature must be in (0, 1], got {self.temperature}")
        if not 0 <= self.id_dropout < 1 or not 0 <= self.dropout < 1:
            raise ValueError("TwoTowerConfig dropouts must be in [0, 1)")
        if self.history_encoder not in HISTORY_ENCODERS:
            got = self.history_encoder
            raise ValueError(f"TwoTowerConfig.history_encoder must be one of {HISTORY_ENCODERS}, got {got!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"TwoTowerConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.encoder_layers < 1 or self.encoder_heads < 1 or self.id_dim % self.encoder_heads:
            raise ValueError(
                "TwoTowerConfig.encoder_layers and encoder_heads must be >= 1 and encoder_heads must "
                f"divide id_dim, got {self.encoder_layers}, {self.encoder_heads} (id_dim {self.id_dim})"
            )
        if not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"TwoTowerConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

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

    last: torch.Tensor  # buffer (not saved): one-hot weights on the most recent position

    def __init__(self, n_rows: int, dim: int, history_len: int):
        super().__init__()
        self.embedding = nn.Embedding(n_rows, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(history_len, dim))
        self.query = nn.Parameter(torch.randn(dim) / dim**0.5)
        self.register_buffer("last", (torch.arange(history_len) == history_len - 1).float(), persistent=False)
        self.out_dim = 3 * dim

    def forward(self, history_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embedding(history_rows)  # [B, N, d]
        m = mask.to(h.dtype)  # [B, N]
        # Elementwise, not `h @ query`: a MatMul with a constant operand is what int8 dense
        # quantization rewrites (compression.quantize_onnx), and this is attention, not a layer.
        logits = ((h + self.position) * self.query).sum(-1).masked_fill(~mask, -1e9)
        # The three poolings as one [B, 3, N] @ [B, N, d] product: on CPU, [B, N, 1] * [B, N, d]
        # broadcast multiplies and their backward took a third of a training step.
        weights = torch.stack(
            [
                m / m.sum(1, keepdim=True).clamp(min=1.0),
                torch.softmax(logits, dim=1) * m,
                self.last.expand_as(m),
            ],
            dim=1,
        )
        return torch.bmm(weights, h).flatten(1)  # [mean, attended, last], each [B, d]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, N, d] over the positions where mask [B, N] is True -> [B, d] (0 if none)."""
    m = mask.to(values.dtype)
    weights = m / m.sum(1, keepdim=True).clamp(min=1.0)
    return torch.bmm(weights.unsqueeze(1), values).squeeze(1)


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
        self.history: HistoryPooling | SequenceEncoder = (
            HistoryPooling(n_item_rows, config.id_dim, space.history_len)
            if config.history_encoder == "pooled"
            else SequenceEncoder(
                n_item_rows,
                config.id_dim,
                space.history_len,
                config.encoder_layers,
                config.encoder_heads,
                config.encoder_dropout,
            )
        )
        d_in = config.id_dim + 4 * config.feature_dim + self.history.out_dim
        self.mlp = mlp([d_in, *config.user_hidden, config.out_dim], config.dropout)

    def user_parts(self, user_code: torch.Tensor, user_features: torch.Tensor) -> torch.Tensor:
        """[B, id_dim + 4 * feature_dim]: the id (hidden at random in training) and side features."""
        rows = self.user_rows[user_code]
        if self.training and self.id_dropout:
            rows = rows.masked_fill(torch.rand(rows.shape, device=rows.device) < self.id_dropout, 0)
        feats = [emb(user_features[:, j]) for j, emb in enumerate(self.feature_embeddings)]
        return torch.cat([self.user_embedding(rows), *feats], dim=1)

    def forward(self, user_code: torch.Tensor, user_features: torch.Tensor, history: torch.Tensor):
        pooled = self.history(self.item_rows[history], history > 0)
        x = torch.cat([self.user_parts(user_code, user_features), pooled], dim=1)
        return F.normalize(self.mlp(x), dim=-1)

    def position_embeddings(self, user_code, user_features, history, keep: torch.Tensor) -> torch.Tensor:
        """[T, out_dim]: the embedding at each position where `keep` [B, N] is True, each position
        reading the history up to itself ("attention" encoder only)."""
        assert isinstance(self.history, SequenceEncoder), "position_embeddings needs the attention encoder"
        seq = self.history.sequence(self.item_rows[history], history > 0)  # [B, N, d]
        parts = self.user_parts(user_code, user_features)  # [B, p]
        row = torch.arange(len(history), device=history.device).unsqueeze(1).expand_as(keep)[keep]
        x = torch.cat([parts[row], seq[keep]], dim=1)
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
            rows = rows.masked_fill(torch.rand(rows.shape, device=rows.device) < self.id_dropout, 0)
        x = torch.cat(
            [
                self.item_embedding(rows),
                self.genre_projection(self.item_genres[item_code].to(self.genre_projection.weight.dtype)),
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

    def retrieval_loss(self, user_code, user_features, history, item_code, log_q) -> torch.Tensor:
        """The configured loss (`TwoTowerConfig.loss`) on one batch of (user inputs, positive item)."""
        n_items = len(self.item_tower.item_rows) - 1
        kind = self.config.loss
        full = kind == "full" or (kind == "auto" and n_items <= FULL_SOFTMAX_MAX_ITEMS)
        if self.trains_all_positions:
            if not full and world_size() > 1:
                raise ValueError(
                    "distributed training of the attention encoder needs the full softmax "
                    f"(TwoTowerConfig.loss 'full', or 'auto' with <= {FULL_SOFTMAX_MAX_ITEMS:,} items)"
                )
            keep, targets = next_item_targets(history, item_code)
            u = self.user_tower.position_embeddings(user_code, user_features, history, keep)
            loss = next_item_loss(u, targets, self.item_tower, self.config, None if full else log_q)
            return global_mean(loss, len(targets))
        if full:
            loss = self.full_softmax_loss(user_code, user_features, history, item_code)
        else:
            loss = self.in_batch_loss(user_code, user_features, history, item_code, log_q)
        return global_mean(loss, len(item_code))

    @property
    def trains_all_positions(self) -> bool:
        """Whether training rows are windows whose every position predicts its next item."""
        return self.config.history_encoder == "attention" and self.config.all_positions

    def full_softmax_loss(self, user_code, user_features, history, item_code) -> torch.Tensor:
        """Softmax over the whole catalogue (every item a negative, so no sampling bias to correct)."""
        u = self.user_tower(user_code, user_features, history)
        v = self.item_tower(torch.arange(1, len(self.item_tower.item_rows), device=item_code.device))
        return F.cross_entropy(u @ v.T / self.config.temperature, item_code - 1)

    def in_batch_loss(self, user_code, user_features, history, item_code, log_q) -> torch.Tensor:
        """Sampled softmax over the (global) batch's items, logQ-corrected; repeats of the positive
        are masked. Under DDP the columns are every process's items (`gather_rows`)."""
        u = self.user_tower(user_code, user_features, history)
        v, offset = gather_rows(self.item_tower(item_code))
        codes, _ = gather_rows(item_code)
        logits = u @ v.T / self.config.temperature - self.config.logq_weight * log_q[codes].unsqueeze(0)
        own = torch.arange(len(item_code), device=item_code.device) + offset  # each row's positive column
        same_item = item_code.unsqueeze(1) == codes.unsqueeze(0)
        same_item[torch.arange(len(item_code), device=item_code.device), own] = False
        return F.cross_entropy(logits.masked_fill(same_item, -1e9), own)

    @torch.no_grad()
    def item_embeddings(self, n_items: int, batch_size: int = 65536) -> torch.Tensor:
        """[n_items, out_dim] for the whole catalogue (item index i has code i + 1), in batches."""
        device = self.item_tower.item_rows.device
        chunks = [
            self.item_tower(torch.arange(s + 1, min(s + batch_size, n_items) + 1, device=device))
            for s in range(0, n_items, batch_size)
        ]
        return torch.cat(chunks)
