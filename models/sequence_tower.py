"""A causal self-attention history encoder for the user tower (SASRec, Kang & McAuley, ICDM 2018).

The history arrives right-aligned and 0-padded on the left (`artifact.user_state`), so the
most recent item sits at the last position and learned positions count from the end: the
same items get the same positions whatever the padding. Each position attends to itself and
to the real items before it; the last position's output, after a final layer norm, is the
encoding the tower uses. A padded position never serves as a key for a real one, and every
query keeps its own diagonal, so no softmax row is empty: an all-padding history (a new user
with nothing sent) gives a finite output, never 0/0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASKED = -1e9  # finite: exp() underflows to exactly 0 and exports to ONNX as a plain constant


class CausalSelfAttention(nn.Module):
    """Multi-head attention over [B, N, d] where `allowed` [B, 1, N, N] says which keys a query sees."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, N, d] -> [B, N, d], or [B, 1, d] for the last query alone (`last_only`)."""
        b, n, d = x.shape
        # [B, N, 3d] -> three [B, H, N, d/H]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed = q[:, :, -1:], allowed[:, :, -1:]
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # [B, H, N, N]
        weights = torch.softmax(scores.masked_fill(~allowed, MASKED), dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, q.shape[2], d))


class Block(nn.Module):
    """Pre-norm transformer block; the feed-forward keeps the width (SASRec's point-wise FFN)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        y = self.dropout(self.attention(self.norm1(x), allowed, last_only))
        x = (x[:, -1:] if last_only else x) + y
        return x + self.dropout(self.ffn(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """Encodes a 0-padded, right-aligned history of item rows [B, N] into [B, dim] (its last position).

    Same interface as `two_tower.HistoryPooling` (`embedding`, `out_dim`, `forward(rows, mask)`),
    so the user tower, embedding pruning and export treat both alike.
    """

    causal: torch.Tensor  # buffer (not saved): [N, N], True where a query may see a key

    def __init__(self, n_rows: int, dim: int, history_len: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(n_rows, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(history_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        causal = torch.ones(history_len, history_len, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)
        self.out_dim = dim

    def sequence(
        self, history_rows: torch.Tensor, mask: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """Every position's output [B, N, dim]; position t depends only on positions <= t.

        `last_only`: the last position's alone, [B, 1, dim]; the last block then computes one
        query per row instead of N (the other positions' outputs would be thrown away).
        """
        n = history_rows.shape[1]
        scale = self.embedding.embedding_dim**0.5  # SASRec's: item vectors on the positions' scale
        x = self.dropout(self.embedding(history_rows) * scale + self.position[-n:])
        eye = torch.eye(n, dtype=torch.bool, device=mask.device)
        # [B, 1, N, N]: causal, keys that are real items, and always the query itself.
        allowed = ((self.causal[-n:, -n:] & mask[:, None, :]) | eye).unsqueeze(1)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only and i == len(self.blocks) - 1)
        return self.norm(x[:, -1:] if last_only else x)

    def forward(self, history_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.sequence(history_rows, mask, last_only=True)[:, 0]


# --- training every position (SASRec) ------------------------------------------------------------


def window_rows(users: np.ndarray, history_len: int) -> np.ndarray:
    """Which of a user-sorted run of fitted rows end a training window, as a bool mask.

    A row's history is the `history_len` rows before it, so the row itself plus its history
    predict `history_len` targets (`next_item_targets`). Keeping each user's last row and every
    `history_len`-th before it makes the windows tile the sequence: every item is a target once.

    Example:
        >>> window_rows(np.array([7, 7, 7, 7, 7, 9, 9]), 2).tolist()
        [True, False, True, False, True, False, True]
    """
    n = len(users)
    last_of_user = np.r_[users[1:] != users[:-1], True] if n else np.zeros(0, bool)
    group_end = np.flatnonzero(last_of_user)  # index of each user's last row
    ends = group_end[np.searchsorted(group_end, np.arange(n))]  # each row's user's last index
    return (ends - np.arange(n)) % history_len == 0


def next_item_targets(history: torch.Tensor, item_code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, N], targets [T]): position t of a window predicts the item after it (history[t + 1],
    or the row's own item at the last position), where both it and its target are real items."""
    following = torch.cat([history[:, 1:], item_code.unsqueeze(1)], dim=1)
    keep = (history > 0) & (following > 0)
    return keep, following[keep]


def next_item_loss(
    u: torch.Tensor, targets: torch.Tensor, item_tower: nn.Module, config, log_q
) -> torch.Tensor:
    """Softmax cross-entropy of user embeddings u [T, D] against their target item codes [T].

    log_q None: over the whole catalogue. Else over the distinct targets of the batch, each
    column's logit lowered by logq_weight * log q (the sampled softmax's correction).
    """
    if not len(targets):
        return u.sum() * 0.0  # a batch of first items only: nothing to predict, no NaN
    if log_q is None:
        every_item = torch.arange(1, len(item_tower.item_rows), device=u.device)
        logits = u @ item_tower(every_item).T / config.temperature
        return F.cross_entropy(logits, targets - 1)
    codes, column = torch.unique(targets, return_inverse=True)
    logits = u @ item_tower(codes).T / config.temperature - config.logq_weight * log_q[codes].unsqueeze(0)
    return F.cross_entropy(logits, column)
