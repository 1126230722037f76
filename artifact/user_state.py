"""User state -> model inputs: history windows and seen items, the one place both are built.

Training, offline evaluation and serving all read a user's state through these functions,
so the model sees byte-identical inputs for the same user on either side.
"""

from __future__ import annotations

import numpy as np


def histories_before(
    item_codes: np.ndarray, user_start: np.ndarray, positions: np.ndarray, history_len: int
) -> np.ndarray:
    """The last `history_len` item codes before each position, within the same user.

    Args:
        item_codes: int [n] item codes in protocol order (users contiguous).
        user_start: int [b] start position of the user of each requested position.
        positions: int [b] rows whose history we want (the history excludes the row itself).
    Returns:
        int64 [b, history_len], right-aligned (most recent last), 0-padded on the left.
    """
    offsets = np.arange(history_len, 0, -1)
    idx = positions[:, None] - offsets[None, :]
    valid = idx >= user_start[:, None]
    return np.where(valid, item_codes[np.maximum(idx, 0)], 0).astype(np.int64)
