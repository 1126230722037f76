"""The micro-batcher: coalescing, limits, errors, draining; and batched answers equal unbatched ones."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from slimrec.serving import batcher as batcher_module
from slimrec.serving.batcher import Batcher, BatcherClosed
from slimrec.serving.queries import build_query, run_queries
from slimrec.serving.variants import load_variant


class Recorder:
    """run_batch that doubles its inputs slowly and records the batch sizes it saw."""

    def __init__(self, delay_s: float = 0.005, fail_on: int | None = None):
        self.sizes: list[int] = []
        self.delay_s, self.fail_on = delay_s, fail_on
        self.threads: set[str] = set()

    def __call__(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in xs:
            raise RuntimeError(f"boom on {self.fail_on}")
        return [2 * x for x in xs]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2, thread_name_prefix="test-model") as pool:
        yield pool


def test_concurrent_submits_are_coalesced(executor):
    run = Recorder()

    async def main():
        batcher = Batcher(run, executor, max_batch_size=8, max_wait_s=0.01)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(30)))
        await batcher.close()
        return results

    assert asyncio.run(main()) == [2 * i for i in range(30)]
    assert max(run.sizes) > 1 and max(run.sizes) <= 8
    assert sum(run.sizes) == 30
    assert threading.main_thread().name not in run.threads  # never on the event loop


def test_two_threads_run_two_batches_at_once_and_close_drains_both(executor):
    second_started = threading.Event()
    run = Recorder(delay_s=0)

    def overlapping(xs):
        if 1 in xs:  # the first batch finishes only once another one has started beside it
            assert second_started.wait(timeout=5), "no second batch ran while the first did"
        else:
            second_started.set()
        return run(xs)

    async def main():
        batcher = Batcher(overlapping, executor, max_batch_size=4, max_wait_s=0, threads=2, name="b")
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the first batch (of one) is running, waiting for a second batch
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 10)]
        await asyncio.sleep(0)
        close = asyncio.ensure_future(batcher.close())
        results = await asyncio.gather(first, *rest)
        await close
        return results

    assert asyncio.run(main()) == [2 * i for i in range(1, 10)]
    assert run.threads == {"b-0", "b-1"} and sum(run.sizes) == 9 and max(run.sizes) <= 4


def test_each_batching_thread_runs_thread_init_before_its_first_batch(executor):
    initialised: set[str] = set()
    seen_uninitialised: list[str] = []

    def run(xs):
        if threading.current_thread().name not in initialised:
            seen_uninitialised.append(threading.current_thread().name)
        time.sleep(0.002)
        return xs

    async def main():
        batcher = Batcher(
            run,
            executor,
            max_batch_size=2,
            max_wait_s=0,
            threads=3,
            name="t",
            thread_init=lambda: initialised.add(threading.current_thread().name),
        )
        await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.close()

    asyncio.run(main())
    assert initialised == {"t-0", "t-1", "t-2"} and not seen_uninitialised


def test_lone_request_waits_at_most_max_wait(executor):
    run = Recorder(delay_s=0)

    async def main():
        batcher = Batcher(run, executor, max_batch_size=64, max_wait_s=0.02)
        started = time.perf_counter()
        assert await batcher.submit(3) == 6
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.5
    assert run.sizes == [1]


def test_a_lone_request_never_waits_for_company(executor):
    # max_wait is a cap for batches under concurrent load, not a delay for a request alone.
    run = Recorder(delay_s=0)

    async def main():
        batcher = Batcher(run, executor, max_batch_size=64, max_wait_s=2.0)
        took = []
        for x in range(3):
            started = time.perf_counter()
            assert await batcher.submit(x) == 2 * x
            took.append(time.perf_counter() - started)
        await batcher.close()
        return took

    assert max(asyncio.run(main())) < 0.5
    assert run.sizes == [1, 1, 1]


def test_under_load_a_batch_fills_until_arrivals_pause(executor, monkeypatch):
    # After a batch of several (concurrent load), the next batch waits for queries that keep
    # arriving (here 20 ms apart, within a widened arrival gap) and closes when they stop,
    # long before max_wait. Taking whatever was queued would have run [2] and then [2].
    monkeypatch.setattr(batcher_module, "ARRIVAL_GAP_S", 0.1)
    run = Recorder(delay_s=0)

    async def main():
        batcher = Batcher(run, executor, max_batch_size=64, max_wait_s=5.0)
        await asyncio.gather(*(batcher.submit(x) for x in range(4)))
        started = time.perf_counter()

        async def later(x):
            await asyncio.sleep(0.02)
            return await batcher.submit(x)

        answers = await asyncio.gather(batcher.submit(10), batcher.submit(11), later(12), later(13))
        took = time.perf_counter() - started
        await batcher.close()
        return answers, took

    answers, took = asyncio.run(main())
    assert answers == [20, 22, 24, 26]
    assert run.sizes[-1] == 4, run.sizes
    assert took < 2.0  # closed by the pause in arrivals, not by max_wait (5 s)


def test_batch_size_one_turns_batching_off(executor):
    run = Recorder()

    async def main():
        batcher = Batcher(run, executor, max_batch_size=1, max_wait_s=0.01)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert run.sizes == [1] * 10


def test_errors_fail_their_batch_and_the_batcher_keeps_working(executor):
    run = Recorder(fail_on=5)

    async def main():
        batcher = Batcher(run, executor, max_batch_size=4, max_wait_s=0.01)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(8)), return_exceptions=True)
        second = await batcher.submit(100)
        return first, second

    first, second = asyncio.run(main())
    assert any(isinstance(r, RuntimeError) and "boom on 5" in str(r) for r in first)
    assert [r for r in first if not isinstance(r, Exception)] and second == 200


def test_close_drains_queued_queries_and_refuses_new_ones(executor):
    run = Recorder(delay_s=0.02)

    async def main():
        batcher = Batcher(run, executor, max_batch_size=4, max_wait_s=0.001)
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(12)]
        await asyncio.sleep(0)  # queued, mostly not yet run
        await batcher.close()
        assert all(task.done() for task in pending)
        with pytest.raises(BatcherClosed):
            await batcher.submit(1)
        return [task.result() for task in pending]

    assert asyncio.run(main()) == [2 * i for i in range(12)]


def test_a_cancelled_request_does_not_break_its_batch(executor):
    run = Recorder(delay_s=0.01)

    async def main():
        batcher = Batcher(run, executor, max_batch_size=8, max_wait_s=0.02)
        doomed = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        doomed.cancel()
        return await kept

    assert asyncio.run(main()) == 4


# --- the real model: a batch answers exactly what each query gets alone --------------------------


@pytest.fixture(scope="module")
def variant(tiny_teacher):
    return load_variant("full", tiny_teacher)


def mixed_queries(variant):
    """Known users (with and without history), new users, filters, different k, a fallback."""
    ids = variant.item_ids
    return [
        build_query(variant, "1", 10),
        build_query(variant, "196", 5, history=[ids[0], ids[49]]),
        build_query(variant, "22", 20, exclude_seen=False),
        build_query(variant, "new-a", 10, history=[ids[241], ids[301], "no-such-item"]),
        build_query(variant, "new-b", 7, history=[ids[10]], features={"age": 30, "gender": "F"}),
        build_query(variant, "300", 10, include_genres=["Comedy"]),
        build_query(variant, "301", 3, include_genres=["Comedy"]),
        build_query(variant, "302", 10, exclude_genres=["Drama", "Comedy"]),
        build_query(variant, "new-c", 10),  # popularity fallback
        build_query(variant, "5", 200),
    ]


def assert_same_answers(batched, alone):
    for b, a in zip(batched, alone, strict=True):
        np.testing.assert_array_equal(b.items, a.items)
        assert b.fallback == a.fallback
        if a.scores is not None:
            np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-5)


def test_batched_answers_equal_unbatched(variant):
    queries = mixed_queries(variant)
    batched = run_queries(variant, queries, n_candidates=200)
    alone = [run_queries(variant, [q], n_candidates=200)[0] for q in queries]
    assert_same_answers(batched, alone)
    assert all(len(a.items) == q.k for a, q in zip(alone, queries, strict=True))
    assert batched[8].fallback == "popular" and batched[0].batch_size == len(queries)


def test_batcher_over_the_model_coalesces_and_matches(variant, executor):
    queries = mixed_queries(variant) * 3
    sizes = []

    async def main():
        batcher = Batcher(
            lambda qs: run_queries(variant, qs, 200),
            executor,
            max_batch_size=16,
            max_wait_s=0.02,
            on_batch=sizes.append,
        )
        results = await asyncio.gather(*(batcher.submit(q) for q in queries))
        await batcher.close()
        return results

    batched = asyncio.run(main())
    assert max(sizes) > 1
    assert_same_answers(batched, [run_queries(variant, [q], 200)[0] for q in queries])


def test_rows_under_different_filters_are_retrieved_apart_and_ranked_together(variant):
    """`recommend(filters=...)` gives each row what a call for its filter group alone gives."""
    model, masks = variant.model, variant.genre_masks
    batch = model.known_users(np.array([0, 1, 2, 3, 4]))
    comedy, not_drama = masks["Comedy"], ~masks["Drama"]
    groups = [(np.array([0, 3]), comedy), (np.array([1]), None), (np.array([2, 4]), not_drama)]
    together = model.recommend(batch, 10, 200, filters=groups)
    for rows, allowed in groups:
        apart = model.recommend(model.known_users(rows), 10, 200, allowed=allowed)
        np.testing.assert_array_equal(together.items[rows], apart.items)
        np.testing.assert_allclose(together.scores[rows], apart.scores, rtol=1e-5, atol=1e-5)
        if allowed is not None:
            assert allowed[together.items[rows]].all()
