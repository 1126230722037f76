"""models/ranker.py: the DCN-v2 ranker's shapes, independence of rows and candidates, config checks."""

from __future__ import annotations

import pytest
import torch
from slimrec.models.ranker import RankerConfig
from tiny_towers import RANKER, ranker, users

# --- two-tower: shapes and norms ----------------------------------------------------------------


# --- ranker ---------------------------------------------------------------------------------------


def ranker_inputs(candidates: list[list[int]], histories: list[list[int]] | None = None):
    b = len(candidates)
    inputs = users(list(range(1, b + 1)), histories or [[0, 1, 2]] * b)
    return {**inputs, "candidates": torch.tensor(candidates)}


@pytest.mark.parametrize(
    "config",
    [
        RANKER,
        # Low-rank cross layers (U V^T), two deep layers:
        RankerConfig(id_dim=4, feature_dim=2, n_cross=1, cross_rank=2, deep=(8, 4), dropout=0.0),
        # No cross layer and no deep layer: the head reads x0 directly.
        RankerConfig(id_dim=4, feature_dim=2, n_cross=0, deep=(), dropout=0.0),
    ],
)
def test_ranker_logit_shape(config):
    model = ranker(config=config)
    with torch.no_grad():
        logits = model(**ranker_inputs([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_ranker_padded_candidates_do_not_affect_the_others():
    model = ranker()
    with torch.no_grad():
        short = model(**ranker_inputs([[3, 1]]))
        padded = model(**ranker_inputs([[3, 1, 0, 0]]))
        other = model(**ranker_inputs([[3, 1, 5, 2]]))
    torch.testing.assert_close(padded[:, :2], short)
    torch.testing.assert_close(other[:, :2], short)


def test_ranker_rows_are_independent():
    model = ranker()
    inputs = ranker_inputs([[1, 2], [3, 0], [5, 4]], [[0, 1, 2], [0, 0, 0], [4, 5, 3]])
    with torch.no_grad():
        batch = model(**inputs)
        for j in range(3):
            alone = model(**{name: value[j : j + 1] for name, value in inputs.items()})
            torch.testing.assert_close(batch[j : j + 1], alone)


def test_ranker_scores_depend_on_the_history():
    model = ranker()
    with torch.no_grad():
        a = model(**ranker_inputs([[1, 2]], [[0, 1, 2]]))
        b = model(**ranker_inputs([[1, 2]], [[0, 4, 5]]))
    assert not torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id_dim": -1}, "id_dim=-1"),
        ({"feature_dim": 0}, "feature_dim=0"),
        ({"n_cross": -1}, "n_cross=-1"),
        ({"cross_rank": 0}, "cross_rank must be >= 1 or None, got 0"),
    ],
)
def test_ranker_config_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        RankerConfig(**changes)


def test_new_user_dropout_shows_training_lists_as_new_users_and_leaves_serving_alone():
    inputs = ranker_inputs([[1, 2, 3], [4, 5, 1]])
    assert inputs["user_features"].any()
    as_new_user = {**inputs, "user_features": torch.zeros_like(inputs["user_features"])}
    always = ranker(config=RankerConfig(**{**RANKER.to_dict(), "new_user_dropout": 0.999999}))
    with torch.no_grad():
        served, new_user = always.eval()(**inputs), always(**as_new_user)
        trained = always.train()(**inputs)
    torch.testing.assert_close(trained, new_user)  # every list hid its user's features
    assert not torch.allclose(served, new_user)  # in eval mode the features are read
    never = ranker()
    with torch.no_grad():
        torch.testing.assert_close(never.train()(**inputs), never.eval()(**inputs))


def test_new_user_dropout_is_a_probability():
    with pytest.raises(ValueError, match="new_user_dropout"):
        RankerConfig(new_user_dropout=1.0)
