"""A variant's model calls in child processes, each with its own GIL (`model_process = true`).

In the server process the batching thread releases the GIL in every ONNX Runtime, FAISS and
large numpy call, then waits for the event loop to hand it back: about 25 waits for a batch
of 16, which then takes twice its solo time. A child process runs the same `run_queries` with
nobody to wait for; the batching thread only sends the batch down a pipe and waits for the
answers. The pipe, held only by this process and the children it spawned, carries pickles
that one of them made from its own objects (parsed queries, answers), never a client's bytes.

The cost: each child loads (and verifies) the artifact again, so the model's memory is paid
once in the server process (request checks, the popularity fallback) and once per child.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from multiprocessing.connection import Connection

from slimrec.serving.queries import Answer, Query

log = logging.getLogger("slimrec.serving")

READY_TIMEOUT_S = 300.0  # a child loads and verifies the artifact: seconds, minutes at 1M items
CALL_TIMEOUT_S = 120.0  # a batch that takes longer than this means a hung child: replace it
STOP_TIMEOUT_S = 15.0  # a child asked to stop gets this long before it is killed


class ModelProcessError(RuntimeError):
    """A child failed a batch (its error, or its death); the batch's requests get a fallback.

    `broken`: the child died or hung and must be replaced (an error it reported leaves it usable).
    """

    def __init__(self, message: str, broken: bool = True):
        super().__init__(message)
        self.broken = broken


def _child_main(conn: Connection, name: str, path: str, ort_threads: int, index_threads: int) -> None:
    """The child: load the variant, then answer batches until the pipe closes or says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the server stops us
    from slimrec.artifact.index import drop_interrupt_checks, set_search_threads
    from slimrec.serving.queries import run_queries
    from slimrec.serving.variants import load_variant

    try:
        set_search_threads(index_threads)
        drop_interrupt_checks()
        variant = load_variant(name, path, ort_threads, cache_known_users=True)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if call is None:
            return
        queries, n_candidates = call
        try:
            conn.send(("ok", run_queries(variant, queries, n_candidates)))
        except Exception as exc:  # an exception object may not pickle; its text always does
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Child:
    """One spawned child and our end of its pipe."""

    def __init__(self, args: tuple):
        self.stopped = False
        context = multiprocessing.get_context("spawn")  # never fork a process running threads
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=_child_main, args=(child_end, *args), daemon=True, name=f"slimrec-model-{args[0]}"
        )
        self.process.start()
        child_end.close()
        try:
            self._expect_ready()
        except BaseException:
            self.stop()
            raise

    def _expect_ready(self) -> None:
        if not self.conn.poll(READY_TIMEOUT_S):
            raise ModelProcessError(
                f"model process {self.process.pid}: not ready after {READY_TIMEOUT_S:.0f} s"
            )
        try:
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(STOP_TIMEOUT_S)
            raise ModelProcessError(
                f"model process {self.process.pid} exited with {self.process.exitcode} while loading"
            ) from None
        if kind != "ready":
            raise ModelProcessError(f"model process could not load the variant: {detail}")

    def run(self, queries: list[Query], n_candidates: int) -> list[Answer]:
        try:
            self.conn.send((queries, n_candidates))
            if not self.conn.poll(CALL_TIMEOUT_S):
                raise ModelProcessError(
                    f"model process {self.process.pid}: no answer after {CALL_TIMEOUT_S:.0f} s"
                )
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(1.0)
            raise ModelProcessError(
                f"model process {self.process.pid} exited (code {self.process.exitcode})"
            ) from None
        if kind != "ok":
            raise ModelProcessError(f"model process {self.process.pid}: {detail}", broken=False)
        return detail

    def stop(self) -> None:
        """Ask it to finish, then terminate and kill it by its own handle if it has not."""
        self.stopped = True
        try:
            self.conn.send(None)
        except OSError:
            pass  # already gone
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class ModelProcesses:
    """`size` children holding one variant; `run` uses whichever is free.

    A child that fails a batch by dying or hanging is replaced before its next batch; the
    failed batch raises ModelProcessError, so its requests get the usual run-time fallback.

    Args:
        name, path: the variant, as load_variant takes them.
        size: children, one per thread that makes model calls (batch_threads).
        ort_threads, index_threads: the server's settings for model calls.

    Raises:
        ModelProcessError: a child could not load the variant (its error is in the message).
    """

    def __init__(self, name: str, path, size: int, ort_threads: int, index_threads: int):
        self._args = (name, str(path), ort_threads, index_threads)
        self._free: queue.Queue[_Child | None] = queue.Queue()
        self._children: list[_Child] = []
        self._lock = threading.Lock()  # guards _children while a replacement starts
        self._closed = False
        try:
            for _ in range(size):
                self._add(_Child(self._args))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [pid for child in self._children if (pid := child.process.pid) is not None]

    def _add(self, child: _Child) -> None:
        with self._lock:
            self._children.append(child)
        self._free.put(child)

    def run(self, queries: list[Query], n_candidates: int) -> list[Answer]:
        """What run_queries(variant, queries, n_candidates) returns, computed in a child."""
        child = None if self._closed else self._free.get()
        if child is None:  # closed: wake the next waiter too
            self._free.put(None)
            raise ModelProcessError("model processes are closed", broken=False)
        try:
            if child.stopped or not child.process.is_alive():
                child = self._replace(child)
            return child.run(queries, n_candidates)
        except ModelProcessError as exc:
            if exc.broken:  # hung or dead: a late answer must never meet the next batch
                child.stop()
            raise
        finally:
            self._free.put(child)  # a stopped child is replaced when next taken

    def _replace(self, dead: _Child) -> _Child:
        log.error(
            "model process %s (variant %s) exited with %s; starting another",
            dead.process.pid,
            self._args[0],
            dead.process.exitcode,
        )
        dead.stop()
        fresh = _Child(self._args)
        with self._lock:
            self._children = [fresh if child is dead else child for child in self._children]
        return fresh

    def close(self) -> None:
        """Stop every child (after the batcher has drained: nothing is running)."""
        self._closed = True
        with self._lock:
            children, self._children = self._children, []
        self._free.put(None)
        for child in children:
            child.stop()
