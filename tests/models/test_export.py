"""ONNX export of a tiny two-tower and ranker: parity with PyTorch and dynamic batch / candidate axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slimrec.artifact.features import FeatureSpace
from slimrec.models.export import SIGNATURES, export_onnx, parity, session
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.two_tower import TwoTower, TwoTowerConfig

HISTORY_LEN = 4
# 6 users, 9 items; users 5, 6 and items 8, 9 never fitted (they share row 0), as after a real fold.
SPACE = FeatureSpace(
    n_users=6,
    n_items=9,
    history_len=HISTORY_LEN,
    genders=["F", "M"],
    occupations=["a"],
    zip_prefixes=["12", "94"],
    genres=["Comedy", "Drama", "Horror"],
)
TABLES = {
    "user_rows": torch.tensor([0, 1, 2, 3, 4, 0, 0]),
    "item_rows": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0]),
    "item_genres": torch.tensor(
        [
            [0, 0, 0],
            [1, 0, 0],
            [0, 1, 0],
            [0, 0, 1],
            [1, 1, 0],
            [0, 1, 1],
            [1, 0, 1],
            [1, 1, 1],
            [0, 0, 0],
            [1, 0, 0],
        ],
        dtype=torch.uint8,
    ),
    "item_year": torch.tensor([0, 1, 5, 9, 12, 15, 16, 20, 22, 0]),
}
PARITY_LIMIT = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (module, path)} for the three served graphs, exported once for the module."""
    torch.manual_seed(0)
    model = TwoTower(
        TwoTowerConfig(id_dim=8, feature_dim=4, user_hidden=(16,), item_hidden=(16,), out_dim=8),
        SPACE,
        TABLES,
    ).eval()
    rank = Ranker(
        RankerConfig(id_dim=8, feature_dim=4, n_cross=2, cross_rank=4, deep=(16,)), SPACE, TABLES
    ).eval()
    out = tmp_path_factory.mktemp("onnx")
    modules = {"user_tower": model.user_tower, "item_tower": model.item_tower, "ranker": rank}
    return {
        kind: (module, export_onnx(module, kind, out / f"{kind}.onnx", HISTORY_LEN))
        for kind, module in modules.items()
    }


def random_inputs(kind: str, batch: int, candidates: int, seed: int) -> dict[str, np.ndarray]:
    """Valid int64 inputs: any user code (0 = unknown), 0-padded histories, real item codes."""
    rng = np.random.default_rng(seed)
    history = rng.integers(0, SPACE.n_items + 1, (batch, HISTORY_LEN))
    history[:, :1] = 0  # left padding, as served
    feeds = {
        "user_code": rng.integers(0, SPACE.n_users + 1, batch),
        "user_features": np.stack([rng.integers(0, n, batch) for n in SPACE.user_vocab_sizes], axis=1),
        "history": history,
        "candidates": rng.integers(1, SPACE.n_items + 1, (batch, candidates)),
        "item_code": rng.integers(1, SPACE.n_items + 1, candidates),
    }
    return {name: feeds[name].astype(np.int64) for name in SIGNATURES[kind][0]}


def run_both(module, path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sess = session(path)
    declared = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {name: feeds[name] for name in declared})[0]
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    return got, expected


@pytest.mark.parametrize("kind", ["user_tower", "item_tower", "ranker"])
def test_parity_with_pytorch(exported, kind):
    module, path = exported[kind]
    assert path.is_file() and path.stat().st_size > 0
    assert parity(module, kind, path, HISTORY_LEN) < PARITY_LIMIT


@pytest.mark.parametrize("kind", ["user_tower", "item_tower", "ranker"])
def test_graph_signature(exported, kind):
    _, path = exported[kind]
    sess = session(path)
    inputs, outputs = SIGNATURES[kind]
    assert [o.name for o in sess.get_outputs()] == list(outputs)
    # Inputs are the signature's, in order; an exporter may drop one the graph never reads.
    declared = [i.name for i in sess.get_inputs()]
    assert declared == [name for name in inputs if name in declared]
    assert all(i.type == "tensor(int64)" for i in sess.get_inputs())


@pytest.mark.parametrize("batch", [1, 7])
def test_user_tower_dynamic_batch(exported, batch):
    got, expected = run_both(*exported["user_tower"], random_inputs("user_tower", batch, 1, seed=batch))
    assert got.shape == (batch, 8)
    np.testing.assert_allclose(got, expected, atol=PARITY_LIMIT)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("n_items", [1, 3, 11])
def test_item_tower_dynamic_items(exported, n_items):
    got, expected = run_both(*exported["item_tower"], random_inputs("item_tower", 1, n_items, seed=n_items))
    assert got.shape == (n_items, 8)
    np.testing.assert_allclose(got, expected, atol=PARITY_LIMIT)


@pytest.mark.parametrize(("batch", "candidates"), [(1, 3), (1, 11), (7, 3), (7, 11)])
def test_ranker_dynamic_batch_and_candidates(exported, batch, candidates):
    feeds = random_inputs("ranker", batch, candidates, seed=10 * batch + candidates)
    got, expected = run_both(*exported["ranker"], feeds)
    assert got.shape == (batch, candidates)
    np.testing.assert_allclose(got, expected, atol=PARITY_LIMIT)


def test_ranker_padding_candidates_through_onnx(exported):
    # Candidate code 0 (padding) must not change the scores of the real candidates beside it.
    feeds = random_inputs("ranker", 2, 3, seed=3)
    padded = {**feeds, "candidates": np.hstack([feeds["candidates"], np.zeros((2, 2), np.int64)])}
    sess = session(exported["ranker"][1])
    declared = [i.name for i in sess.get_inputs()]
    short = sess.run(None, {n: feeds[n] for n in declared})[0]
    long = sess.run(None, {n: padded[n] for n in declared})[0]
    np.testing.assert_allclose(long[:, :3], short, atol=1e-6)


# --- the attention history encoder (models.sequence_tower) ----------------------------------------


@pytest.fixture(scope="module")
def attention_tower(tmp_path_factory):
    """(user tower with the causal self-attention encoder, its ONNX path)."""
    torch.manual_seed(0)
    config = TwoTowerConfig(
        id_dim=8, feature_dim=4, user_hidden=(16,), item_hidden=(16,), out_dim=8, history_encoder="attention"
    )
    tower = TwoTower(config, SPACE, TABLES).user_tower.eval()
    return tower, export_onnx(tower, "user_tower", tmp_path_factory.mktemp("onnx") / "user.onnx", HISTORY_LEN)


def test_attention_user_tower_parity(attention_tower):
    module, path = attention_tower
    assert parity(module, "user_tower", path, HISTORY_LEN) < PARITY_LIMIT
    for batch in (1, 7):
        got, expected = run_both(module, path, random_inputs("user_tower", batch, 1, seed=batch))
        assert got.shape == (batch, 8)
        np.testing.assert_allclose(got, expected, atol=PARITY_LIMIT)


def test_attention_user_tower_serves_users_with_no_history(attention_tower):
    # What the server sends for a new user with nothing yet: code 0, no features, all padding.
    module, path = attention_tower
    feeds = random_inputs("user_tower", 3, 1, seed=5)
    feeds["user_code"][:] = 0
    feeds["history"][:] = 0
    feeds["history"][2, -1] = 4  # and one with a single item, beside them
    got, expected = run_both(module, path, feeds)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=PARITY_LIMIT)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


# --- ExportCache: one trace per architecture ----------------------------------------------------


def test_export_cache_reuses_a_graph_for_other_weights_and_pruned_widths(tmp_path):
    from slimrec.models.export import ExportCache

    def ranker(seed: int, deep: tuple[int, ...], rank: int) -> Ranker:
        torch.manual_seed(seed)
        config = RankerConfig(id_dim=8, feature_dim=4, n_cross=2, cross_rank=rank, deep=deep)
        return Ranker(config, SPACE, TABLES).eval()

    graphs = ExportCache()
    export_onnx(ranker(0, (16,), 4), "ranker", tmp_path / "a.onnx", HISTORY_LEN, graphs)
    assert graphs.reused == 0
    # Other weights, narrower layers (as pruning leaves them): the same graph, checked by parity.
    for name, module in (("b", ranker(1, (16,), 4)), ("c", ranker(2, (8,), 2))):
        path = export_onnx(module, "ranker", tmp_path / f"{name}.onnx", HISTORY_LEN, graphs)
        assert parity(module, "ranker", path, HISTORY_LEN) < PARITY_LIMIT
        got, expected = run_both(module, path, random_inputs("ranker", 3, 5, seed=1))
        np.testing.assert_allclose(got, expected, atol=PARITY_LIMIT)
    assert graphs.reused == 2
    # Other lookup tables (the exporter may fold them into the graph): traced again, not reused.
    other = {**TABLES, "item_year": TABLES["item_year"].flip(0)}
    torch.manual_seed(0)
    module = Ranker(RankerConfig(id_dim=8, feature_dim=4, n_cross=2, cross_rank=4, deep=(16,)), SPACE, other)
    path = export_onnx(module.eval(), "ranker", tmp_path / "d.onnx", HISTORY_LEN, graphs)
    assert parity(module, "ranker", path, HISTORY_LEN) < PARITY_LIMIT


def test_exports_share_one_op_registry_and_write_the_same_graph(tmp_path):
    from slimrec.models import export
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    torch.manual_seed(0)
    module = Ranker(RankerConfig(id_dim=8, feature_dim=4, n_cross=1, deep=(8,)), SPACE, TABLES).eval()
    built = []
    original = ONNXRegistry.__dict__["from_torchlib"]

    def counting(cls, *args, **kwargs):
        built.append(args)
        return original.__func__(cls, *args, **kwargs)

    export._REGISTRIES.clear()
    ONNXRegistry.from_torchlib = classmethod(counting)
    try:
        for name in ("a", "b"):
            export_onnx(module, "ranker", tmp_path / f"{name}.onnx", HISTORY_LEN)
    finally:
        ONNXRegistry.from_torchlib = original
    assert len(built) == 1  # the second export reused the first one's registry
    assert ONNXRegistry.__dict__["from_torchlib"] is original  # restored after each export
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert parity(module, "ranker", tmp_path / "b.onnx", HISTORY_LEN) < PARITY_LIMIT
