"""Micro-batching between HTTP handlers and the model: concurrent requests share one model call.

Handlers `await batcher.submit(query)`; one collector task per batcher gathers queued
queries into a batch and runs `run_batch(batch)` in a thread pool, so ONNX Runtime and
FAISS never block the event loop. A batch closes when it holds `max_batch_size` queries or
when its *oldest* query has waited `max_wait_s`; queries that queued while the previous
batch ran have usually waited long enough already, so under load batches form without
extra delay and at low load a lone request waits at most `max_wait_s`. With `max_wait_s=0`
(the server's default) nothing waits on purpose: a batch is whatever queued while the
previous one ran, so batches appear exactly when the model is the bottleneck.

One batch runs at a time per batcher (one per variant): while it runs, the next one fills.
`max_batch_size=1` turns batching off: each query goes straight to the thread pool.
`close()` refuses new queries and drains everything queued or running (graceful shutdown).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher is shutting down (or was replaced by a reload) and takes no new queries."""


class Batcher(Generic[T, R]):
    """Coalesce concurrent `submit` calls into calls of `run_batch(list[T]) -> list[R]`.

    Args:
        run_batch: blocking function answering a list of queries in order; runs in `executor`.
        executor: thread pool for `run_batch`.
        max_batch_size: most queries per call; 1 = no batching.
        max_wait_s: longest a query waits for others to join its batch.
        on_batch: called on the event loop with each batch's size (metrics).

    Example:
        >>> batcher = Batcher(lambda xs: [x * 2 for x in xs], ThreadPoolExecutor(2), 16, 0.001)
        >>> await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        [0, 2, 4]
    """

    def __init__(self, run_batch: Callable[[list[T]], list[R]], executor: Executor,
                 max_batch_size: int = 16, max_wait_s: float = 0.001,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_s >= 0, got "
                             f"{max_batch_size}, {max_wait_s}")
        self.run_batch, self.executor = run_batch, executor
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.on_batch = on_batch or (lambda size: None)
        self._pending: deque[tuple[T, asyncio.Future, float]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._collector: asyncio.Task | None = None
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
        if self._collector is None:
            self._wakeup = asyncio.Event()
            self._collector = loop.create_task(self._collect())
        future = loop.create_future()
        self._pending.append((query, future, loop.time()))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stop taking queries and wait until every queued and running one is answered."""
        self._closing = True
        if self._collector is not None:
            self._wakeup.set()
            await self._collector
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

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_batch(loop)
            size = min(len(self._pending), self.max_batch_size)
            batch = [self._pending.popleft() for _ in range(size)]
            live = [(query, future) for query, future, _ in batch if not future.done()]  # drop cancelled
            if live:
                await self._run(loop, live)

    async def _wait_for_batch(self, loop) -> None:
        """Return when the batch is full, its oldest query's deadline passed, or we are closing."""
        deadline = self._pending[0][2] + self.max_wait_s
        while len(self._pending) < self.max_batch_size and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    async def _run(self, loop, live: list[tuple[T, asyncio.Future]]) -> None:
        self.on_batch(len(live))
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, [q for q, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} answers for {len(live)} queries")
        except Exception as exc:  # one failing batch fails its queries, not the collector
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)
