"""Micro-batching between HTTP handlers and the model: concurrent requests share one model call.

Handlers `await batcher.submit(query)`; the batcher's threads (one per variant by default)
each take the queued queries as a batch, run `run_batch(batch)` and hand the answers back to
the event loop. With two threads a second batch runs while the first one's thread waits for
the GIL or computes natively. A thread starts the next batch the moment the previous one
returns: the event loop, busy with HTTP, never sits between two batches (when it dispatched
them, the model idled ~35% of the time at saturation).

When a batch closes. A lone request never waits: after a batch of one (light load), the next
batch is whatever is queued. Under concurrent load (the previous batch held several queries) a
batch waits to fill: it closes when it holds `max_batch_size` queries, when its oldest query
has waited `max_wait_s`, or when no query has arrived for ARRIVAL_GAP_S (the event loop has
delivered what it had), whichever comes first. Taking whatever is queued at once made a thread
with a free core run batches of ~7 at 16 concurrent requests (ml-100k, compressed): each batch
pays ONNX Runtime's per-call cost and two thread hand-offs: server CPU per request 672-739 us;
with this rule and a 2 ms cap, batches of 8.8-9.5 and 586-639 us at the same throughput.
With `max_wait_s=0` nothing waits: a batch is whatever queued while the previous one ran.

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

# Under load, a filling batch closes once no query has arrived for this long: the event loop
# delivers a parsed request every ~0.1-0.3 ms while it has any, so a longer silence means none.
ARRIVAL_GAP_S = 0.0005
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
        self._last_size = 0  # the previous batch's size: more than one means concurrent load

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
            # A thread waits for the first query or for a full batch; a filling batch's thread
            # wakes on its own clock (deadline, arrival gap), not once per query.
            if len(self._pending) == 1 or len(self._pending) >= self.max_batch_size:
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
        """The next batch (see the module docstring for when it closes); None when closed and empty."""
        with self._ready:
            while not self._pending:
                if self._closing:
                    return None
                self._ready.wait()
            if self._last_size > 1:  # under concurrent load: let the batch fill
                deadline = self._pending[0][2] + self.max_wait_s
                while len(self._pending) < self.max_batch_size and not self._closing:
                    now = time.monotonic()
                    until = min(deadline, self._pending[-1][2] + ARRIVAL_GAP_S)
                    if until <= now:
                        break
                    self._ready.wait(until - now)
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
            self._last_size = len(batch)
            return batch


def _answer(futures: list[asyncio.Future], results: list) -> None:
    for future, result in zip(futures, results, strict=True):
        if not future.done():  # cancelled meanwhile (the request's deadline)
            future.set_result(result)


def _fail(futures: list[asyncio.Future], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
