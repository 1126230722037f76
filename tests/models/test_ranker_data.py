"""models/ranker_data.py: the ranker's lists, built in chunks, equal those built at once."""

from __future__ import annotations

import numpy as np
import torch
from slimrec.models.features import build_feature_space
from slimrec.models.fold import FIT_TRAIN, Fold
from slimrec.models.presets import train_config
from slimrec.models.ranker_data import user_embeddings_before
from slimrec.models.split import protocol_split
from slimrec.models.two_tower import TwoTower


def test_user_embeddings_before_a_cut_do_not_depend_on_the_chunk(ml100k):
    split = protocol_split(ml100k)
    fold = Fold.create(FIT_TRAIN, ml100k, split, build_feature_space(ml100k, 20))
    torch.manual_seed(0)
    model = TwoTower(train_config("tiny").two_tower, fold.space, fold.tables)
    users = np.repeat(np.arange(25), 2)
    cut = fold.split.user_start[users] + np.tile([3, 12], 25)
    chunked = user_embeddings_before(model, fold, users, cut, chunk=7)
    assert chunked.shape == (50, model.config.out_dim)
    at_once = user_embeddings_before(model, fold, users, cut, chunk=10**6)
    np.testing.assert_allclose(chunked, at_once, atol=1e-6)  # matmul blocking varies with batch size
    assert not np.allclose(chunked[0], chunked[1])  # the cut matters: another history, another user
