"""`slimrec serve --workers N`: uvicorn's worker supervisor, each worker on its own listening socket.

uvicorn binds one socket and every worker accepts from it. A worker woken by a burst of new
connections accepts all that are queued, so a client that opens its connections at once (wrk,
a connection pool) can find every one of them on one worker while the others idle: with two
workers and wrk's 16 connections, 2 runs in 3 kept 0.94-0.96 of the 2 cores busy (ml-100k,
compressed). libuv's UV_TCP_SINGLE_ACCEPT (accept one, then yield) left 4 runs at 1.02-1.62
cores. Here each worker listens on its own SO_REUSEPORT socket bound to the same
address, and the kernel spreads new connections over them by a hash of the client's address
and port.

uvicorn's supervisor still restarts dead workers and handles signals; a worker it restarts
listens on every socket (uvicorn hands its replacement the whole list), which serves as before
and only spreads less evenly.
"""

from __future__ import annotations

import logging
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

logger = logging.getLogger("uvicorn.error")


class ReusePortMultiprocess(Multiprocess):
    """uvicorn's Multiprocess starting worker i on `sockets[i]` (one socket per worker)."""

    def init_processes(self) -> None:
        for sock in self.sockets:
            process = Process(self.config, [sock])
            process.start()
            self.processes.append(process)


def reuse_port_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """`n` sockets bound to (host, port) with SO_REUSEPORT, not yet listening (the workers listen).
    Port 0: a free port, chosen by the kernel, for all.

    Raises:
        OSError: the address is in use, also by another server's SO_REUSEPORT sockets (which
            would otherwise share our port and take part of our traffic).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # binds only where nothing else is
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def serve_workers(config: Config) -> int:
    """Run `config.workers` uvicorn workers until a signal stops them; the command's exit code
    (3, uvicorn's startup failure, when the address cannot be bound)."""
    try:
        sockets = reuse_port_sockets(config.host, config.port, config.workers)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return STARTUP_FAILURE
    port = sockets[0].getsockname()[1]
    logger.info("Uvicorn running on http://%s:%d with %d workers", config.host, port, config.workers)
    try:
        ReusePortMultiprocess(config, sockets).run()
    finally:
        for sock in sockets:
            sock.close()
    return 0
