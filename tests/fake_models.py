"""Small valid ONNX graphs that are wrong for slimrec in one way each: for the artifact-refusal tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def fake_user_tower(
    n_users: int,
    history_len: int,
    dim: int,
    user_input: str = "user_code",
    feature_type: int = TensorProto.INT64,
) -> bytes:
    """A valid ONNX user tower: embedding lookup of the user code, [B] -> [B, dim]; other inputs unused."""
    weights = np.random.default_rng(0).normal(size=(n_users + 1, dim)).astype(np.float32)
    table = numpy_helper.from_array(weights, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", user_input], ["user_embedding"], axis=0)],
        "user_tower",
        [
            helper.make_tensor_value_info(user_input, TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("user_features", feature_type, ["batch", 4]),
            helper.make_tensor_value_info("history", TensorProto.INT64, ["batch", history_len]),
        ],
        [helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["batch", dim])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fake_ranker_without_candidates(history_len: int) -> bytes:
    """A ranker that ignores candidates entirely (input missing): [B, N] history -> [B, N] scores."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["history"], ["logits"], to=TensorProto.FLOAT)],
        "ranker",
        [helper.make_tensor_value_info("history", TensorProto.INT64, ["batch", history_len])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", history_len])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
