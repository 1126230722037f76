"""Lookup-table compaction of exported graphs: same outputs through ONNX Runtime, fewer bytes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from slimrec.models.onnx_tables import compact_lookup_tables

N = 5000  # rows: above MIN_ELEMENTS


def lookup_graph(extra_use: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ids [B] -> rows (int64 table, two copies, GatherND and Gather), genres (0/1 bytes), year."""
    rng = np.random.default_rng(0)
    tables = {
        "rows_a": rng.integers(0, 70_000, N).astype(np.int64),  # fits int32, not int16
        "year": rng.integers(0, 40, N).astype(np.int64),  # fits uint8
        "genres": (rng.random((N, 19)) < 0.2).astype(np.uint8),
    }
    tables["rows_b"] = tables["rows_a"].copy()  # what the exporter does for a second use
    nodes = [
        helper.make_node("Unsqueeze", ["ids", "axis"], ["ids_nd"]),
        helper.make_node("GatherND", ["rows_a", "ids_nd"], ["rows_out"]),
        helper.make_node("Gather", ["rows_b", "ids"], ["rows_out_b"], axis=0),
        helper.make_node("Gather", ["year", "ids"], ["year_out"], axis=0),
        helper.make_node("GatherND", ["genres", "ids_nd"], ["genres_out"]),
    ]
    outputs = [
        ("rows_out", TensorProto.INT64, ["B"]),
        ("rows_out_b", TensorProto.INT64, ["B"]),
        ("year_out", TensorProto.INT64, ["B"]),
        ("genres_out", TensorProto.UINT8, ["B", 19]),
    ]
    if extra_use:  # the table is also read whole: not a lookup table, leave it as it is
        nodes.append(helper.make_node("ReduceMax", ["year"], ["year_max"], keepdims=0))
        outputs.append(("year_max", TensorProto.INT64, []))
    initializers = [numpy_helper.from_array(v, k) for k, v in tables.items()]
    initializers.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])
    graph = helper.make_graph(
        nodes, "lookups", [ids], [helper.make_tensor_value_info(*o) for o in outputs], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return model, tables


def run(model: onnx.ModelProto, ids: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})


def test_compaction_keeps_every_output_and_shrinks_the_tables():
    model, tables = lookup_graph()
    ids = np.array([0, 1, 2, N - 1, 17, 17], np.int64)
    expected = run(model, ids)
    stats = compact_lookup_tables(model)
    onnx.checker.check_model(model)
    got = run(model, ids)
    assert [g.dtype for g in got] == [e.dtype for e in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(got[3], tables["genres"][ids])
    assert (stats["deduplicated"], stats["narrowed"], stats["packed"]) == (1, 2, 1)
    dtypes = {t.name: numpy_helper.to_array(t).dtype for t in model.graph.initializer}
    assert dtypes["rows_a"] == np.int32 and dtypes["year"] == np.uint8 and "rows_b" not in dtypes
    # int64 rows 2 x 8 B -> 4 B, year 8 B -> 1 B, genres 19 B -> 3 B per row
    assert stats["bytes_after"] < stats["bytes_before"] * 0.2


def test_a_table_read_other_than_by_row_lookups_is_left_alone():
    model, tables = lookup_graph(extra_use=True)
    ids = np.array([3, 4], np.int64)
    expected = run(model, ids)
    compact_lookup_tables(model)
    year = next(t for t in model.graph.initializer if t.name == "year")
    assert year.data_type == TensorProto.INT64
    for g, e in zip(run(model, ids), expected, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("values", [np.array([0, 2**40] * 600, np.int64), np.array([-1, 2] * 600, np.int64)])
def test_narrowest_type_holds_every_value(values):
    from slimrec.models.onnx_tables import _narrowest

    narrow = _narrowest(values)
    assert narrow is None if values.max() > 2**31 else np.array_equal(values.astype(narrow), values)


@pytest.mark.parametrize("width", [9, 16, 19])
def test_packed_multi_hot_rows_unpack_to_the_same_bytes_for_a_batch_of_lists(width):
    """Candidates come as [B, C] ids; every width, with and without padding bits in the last byte."""
    genres = (np.random.default_rng(width).random((N, width)) < 0.3).astype(np.uint8)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["genres", "ids"], ["out"], axis=0)],
        "lists",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "C"])],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, ["B", "C", width])],
        [numpy_helper.from_array(genres, "genres")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert compact_lookup_tables(model)["packed"] == 1
    onnx.checker.check_model(model)
    ids = np.array([[0, N - 1, 7], [7, 3, 3]], np.int64)
    (got,) = run(model, ids)
    assert got.dtype == np.uint8 and got.shape == (2, 3, width)
    np.testing.assert_array_equal(got, genres[ids])
