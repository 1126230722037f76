"""Micro-batching between HTTP handlers and the model: concurrent requests share one model call.

Handlers `await batcher.submit(query)`; the batcher's threads (one per variant by default)
each take the queued queries as a batch, run `run_batch(batch)` and hand the answers back to
the event loop. With two threads a second batch runs while the first one's thread waits for
the GIL or computes natively. A thread starts the next batch the moment the previous one
returns: the event loop, busy with HTTP, never sits between two batches (when it dispatched
them, the model idled ~35% of the time at saturation). A batch closes when it holds
`max_batch_size` queries or when its *oldest* query has waited `max_wait_s`; queries that
queued while the previous batch ran have usually waited long enough already, so under load
batches form without extra delay and at low load a lone request waits at most `max_wait_s`.
With `max_wait_s=0` (the server's default) nothing waits on purpose: a batch is whatever queued
while the previous one ran, so batches appear exactly when the model is the bottleneck.

`max_batch_size=1` turns batching off: each query goes straight to the thread pool.
`close()` refuses new queries and drains everything queued or running (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher is shutting down (or was replaced by a reload) and takes no new queries."""


class Batcher(Generic[T, R]):
    """Coalesce concurrent `submit` calls into calls of `run_batch(list[T]) -> list[R]`.

    Args:
        run_batch: blocking function answering a list of queries in order; runs on the
            batcher's own thread (in `executor` when batching is off).
        executor: thread pool for `run_batch` when max_batch_size is 1.
        max_batch_size: most queries per call; 1 = no batching.
        max_wait_s: longest a query waits for others to join its batch.
        on_batch: called with each batch's size, on a batching thread (metrics).
        name: the batching threads' name (numbered past one).
        threads: batches run at once; `run_batch` must then be safe to call concurrently.
        thread_init: called first on each batching thread (per-thread runtime settings).

    Example:
        >>> batcher = Batcher(lambda xs: [x * 2 for x in xs], ThreadPoolExecutor(2), 16, 0.001)
        >>> await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        [0, 2, 4]
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        executor: Executor,
        max_batch_size: int = 16,
        max_wait_s: float = 0.001,
        on_batch: Callable[[int], None] | None = None,
        name: str = "slimrec-batcher",
        threads: int = 1,
        thread_init: Callable[[], None] | None = None,
    ):
        if max_batch_size < 1 or max_wait_s < 0 or threads < 1:
            raise ValueError(
                f"max_batch_size and threads must be >= 1 and max_wait_s >= 0, got "
                f"{max_batch_size}, {threads}, {max_wait_s}"
            )
        self.run_batch, self.executor, self.name, self.n_threads = run_batch, executor, name, threads
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.on_batch = on_batch or (lambda size: None)
        self.thread_init = thread_init or (lambda: None)
        self._pending: deque[tuple[T, asyncio.Future, float]] = deque()  # guarded by _ready
        self._ready = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._direct: set[asyncio.Future] = set()
        self._closing = False

    @property
    def queued(self) -> int:
        """Queries waiting for a batch."""
        return len(self._pending)

    async def submit(self, query: T) -> R:
        """Queue one query and wait for its answer (exceptions of `run_batch` propagate).

        Raises:
            BatcherClosed: after `close()` was called.
        """
        if self._closing:
            raise BatcherClosed("the model is shutting down or was replaced; retry")
        loop = asyncio.get_running_loop()
        if self.max_batch_size == 1:
            return await self._run_direct(loop, query)
        future = loop.create_future()
        with self._ready:  # held by the batching thread only to take a batch: microseconds
            self._pending.append((query, future, time.monotonic()))
            self._ready.notify()
        if not self._threads:
            self._loop = loop
            many = self.n_threads > 1
            names = [f"{self.name}-{i}" if many else self.name for i in range(self.n_threads)]
            self._threads = [threading.Thread(target=self._work, name=name, daemon=True) for name in names]
            for thread in self._threads:
                thread.start()
        return await future

    async def close(self) -> None:
        """Stop taking queries and wait until every queued and running one is answered."""
        self._closing = True
        with self._ready:
            self._ready.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)  # the answers it posted are delivered first
        if self._direct:
            await asyncio.gather(*self._direct, return_exceptions=True)

    async def _run_direct(self, loop, query: T) -> R:
        future = loop.run_in_executor(self.executor, self.run_batch, [query])
        self._direct.add(future)
        try:
            self.on_batch(1)
            return (await asyncio.shield(future))[0]
        finally:
            future.add_done_callback(self._direct.discard)

    # --- the batching thread ---------------------------------------------------------------------

    def _work(self) -> None:
        """Take a batch, run it, post the answers to the loop; until closed and drained."""
        self.thread_init()
        while (batch := self._next_batch()) is not None:
            live = [(query, future) for query, future, _ in batch if not future.cancelled()]
            if not live:
                continue
            self.on_batch(len(live))
            outcome: tuple[Callable[..., None], list[asyncio.Future], Any]
            try:
                results = self.run_batch([query for query, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} answers for {len(live)} queries")
            except Exception as exc:  # one failing batch fails its queries, not the batcher
                outcome = (_fail, [future for _, future in live], exc)
            else:
                outcome = (_answer, [future for _, future in live], results)
            assert self._loop is not None  # start() set it before this thread began
            try:
                self._loop.call_soon_threadsafe(*outcome)
            except RuntimeError:  # the event loop is gone (its owner ended without close()): stop
                return

    def _next_batch(self) -> list[tuple[T, asyncio.Future, float]] | None:
        """The next batch: once it is full or its oldest query's wait is over; None when closed and empty."""
        with self._ready:
            while not self._pending:
                if self._closing:
                    return None
                self._ready.wait()
            deadline = self._pending[0][2] + self.max_wait_s
            while len(self._pending) < self.max_batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            return [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]


def _answer(futures: list[asyncio.Future], results: list) -> None:
    for future, result in zip(futures, results, strict=True):
        if not future.done():  # cancelled meanwhile (the request's deadline)
            future.set_result(result)


def _fail(futures: list[asyncio.Future], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
