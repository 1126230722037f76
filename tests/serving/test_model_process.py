"""Model calls in child processes (`--model-process`): the same answers as in-process, a dead or
hung child replaced, a child that cannot load refused, and every child stopped with the server."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest
from serving_fixtures import ADMIN_TOKEN, copy_artifact, running_server
from slimrec.serving import model_process
from slimrec.serving.model_process import ModelProcessError, ModelProcesses
from slimrec.serving.queries import build_query, run_queries
from slimrec.serving.variants import load_variant


@pytest.fixture(scope="module")
def variant(tiny_teacher):
    return load_variant("full", tiny_teacher)


def queries(variant):
    """Known users, a new user with a history, a genre filter, k from 1 to 50."""
    users = list(variant.user_index)[:6]
    items = list(variant.item_index)[:5]
    genre = sorted(variant.genre_masks)[0]
    return [
        build_query(variant, users[0], 10),
        build_query(variant, users[1], 50, exclude_seen=False),
        build_query(variant, "someone-new", 20, history=items),
        build_query(variant, users[2], 5, include_genres=[genre]),
        build_query(variant, users[3], 1, history=items[:2]),
    ]


def assert_same_answers(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.fallback == b.fallback


def test_children_answer_as_the_server_process_would_and_stop_on_close(variant):
    processes = ModelProcesses("full", variant.path, size=2, ort_threads=1, index_threads=1)
    pids = processes.pids
    try:
        assert len(set(pids)) == 2 and os.getpid() not in pids
        batch = queries(variant)
        assert_same_answers(processes.run(batch, 200), run_queries(variant, batch, 200))
    finally:
        processes.close()
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids
    )
    with pytest.raises(ModelProcessError, match="closed"):
        processes.run(queries(variant), 200)


def wait_until_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Until the pid has exited (a zombie until its parent reaps it: not reaped here)."""
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"pid {pid} still running"
        time.sleep(0.05)


def test_a_killed_child_costs_at_most_one_batch_and_is_replaced(variant):
    processes = ModelProcesses("full", variant.path, size=1, ort_threads=1, index_threads=1)
    try:
        [first] = processes.pids
        os.kill(first, signal.SIGKILL)
        wait_until_dead(first)
        batch = queries(variant)
        try:  # whether the death shows before this batch is sent or only on its pipe is a race
            processes.run(batch, 200)
        except ModelProcessError as exc:
            assert "exited" in str(exc) and exc.broken
        assert_same_answers(processes.run(batch, 200), run_queries(variant, batch, 200))
        [second] = processes.pids
        assert second != first
    finally:
        processes.close()


def test_a_hung_child_fails_its_batch_and_is_replaced(variant, monkeypatch):
    monkeypatch.setattr(model_process, "CALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(model_process, "STOP_TIMEOUT_S", 1.0)
    processes = ModelProcesses("full", variant.path, size=1, ort_threads=1, index_threads=1)
    try:
        [first] = processes.pids
        os.kill(first, signal.SIGSTOP)  # alive, never answers
        with pytest.raises(ModelProcessError, match="no answer") as raised:
            processes.run(queries(variant), 200)
        assert raised.value.broken
        wait_until_dead(first)  # stopped by its handle: terminate, then kill
        batch = queries(variant)
        assert_same_answers(processes.run(batch, 200), run_queries(variant, batch, 200))
        assert processes.pids != [first]
    finally:
        processes.close()


def test_an_error_in_a_child_fails_the_batch_and_keeps_the_child(variant):
    processes = ModelProcesses("full", variant.path, size=1, ort_threads=1, index_threads=1)
    try:
        [pid] = processes.pids
        bad = build_query(variant, list(variant.user_index)[0], 10)
        bad.user = variant.model.n_users + 5  # an index past the tables: the model raises
        with pytest.raises(ModelProcessError, match="IndexError") as raised:
            processes.run([bad], 200)
        assert not raised.value.broken
        assert processes.pids == [pid]
        assert len(processes.run(queries(variant), 200)) == 5
    finally:
        processes.close()


def test_a_child_that_cannot_load_the_artifact_says_why(tmp_path, tiny_teacher):
    broken = copy_artifact(tiny_teacher, tmp_path / "broken")
    (broken / "ranker.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelProcessError, match="ranker.onnx"):
        ModelProcesses("full", broken, size=1, ort_threads=1, index_threads=1)


def child_pids(server, model_only: bool = True) -> set[int]:
    """The server's model processes (or all its children: multiprocessing's resource tracker too)."""
    children = psutil.Process(server.process.pid).children()
    return {c.pid for c in children if not model_only or "spawn_main" in " ".join(c.cmdline())}


def test_server_with_model_processes_answers_reloads_and_stops_its_children(tmp_path, tiny_teacher):
    artifacts = tmp_path / "artifacts"
    v1 = copy_artifact(tiny_teacher, artifacts / "v1")
    copy_artifact(tiny_teacher, artifacts / "v2")  # the reload's target
    body = {"user_id": "196", "k": 10, "history": ["1", "50"]}
    with running_server(tmp_path, {"full": v1}) as plain:
        expected = plain.client.post("/v1/recommend", json=body).json()["items"]
    with running_server(
        tmp_path, {"full": v1}, "--model-process", env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN}
    ) as server:
        first = child_pids(server)
        assert len(first) == 1
        assert server.client.post("/v1/recommend", json=body).json()["items"] == expected
        reloaded = server.client.post(
            "/admin/variants/full/reload",
            json={"path": "v2"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert reloaded.status_code == 200, reloaded.text
        assert server.client.post("/v1/recommend", json=body).json()["items"] == expected
        for pid in first:  # the replaced variant's child stops once its batcher has drained
            with pytest.raises(psutil.NoSuchProcess):
                psutil.Process(pid).wait(20)
                psutil.Process(pid)
        assert len(child_pids(server)) == 1 and not child_pids(server) & first
        children = child_pids(server, model_only=False)
    assert server.process.returncode == 0
    for pid in children:  # the model process and multiprocessing's resource tracker end with it
        wait_until_dead(pid)
