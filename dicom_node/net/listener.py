"""One listening socket shared by the node's receiver processes, and the
board in shared memory on which they balance its connections.

The receiver's server (pynetdicom_compat.NodeServer) accepts from it; this
module is only the socket, the board and the timing of a deferral.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["BACKLOG", "MAX_DEFER_S", "DEFER_NAP_S", "Deferral", "SharedListener", "open_shared_listener"]

# The listen backlog (socketserver's default is 5): a burst of connects
# waits in the kernel, costing no thread, until accepted or refused by the
# receiver's admission check; with 5, the rest of a burst waits on SYN retries.
BACKLOG = 128

# How long a receiver process leaves a waiting connection to a less loaded
# one before taking it itself (that one may be busy in Python and slow to
# accept), and its nap between looks.  20 ms left 3 of 4 associations on one
# process in one of three runs on a loaded 2-core machine; 100 ms none of five.
MAX_DEFER_S = 0.1
DEFER_NAP_S = 0.001


class Deferral:
    """Times one run of deferrals: looks closer together than a few naps
    belong to one waiting connection, which is deferred for MAX_DEFER_S."""

    def __init__(self) -> None:
        self._first = self._last = -1.0

    def may_defer(self) -> bool:
        now = time.monotonic()
        if now - self._last > 5 * DEFER_NAP_S:
            self._first = now
        self._last = now
        return now - self._first < MAX_DEFER_S


@dataclass(frozen=True)
class SharedListener:
    """One listening socket for the node's receiver processes, and a board
    in shared memory where each posts how many connections it has open.

    Every process's server wakes for a waiting connection; one that sees a
    less loaded process leaves it to that one for up to MAX_DEFER_S.
    First come, first served put two or three of one sender's associations
    on one process in a third of the runs, halving what they got.  Posts
    are made on accept and on close, so a stale count can only make another
    look busier than it is (this process then accepts, as before)."""

    sock: socket.socket
    loads: Any  # multiprocessing RawArray of int, one per receiver process
    listening: Any  # RawArray of 0/1, one per receiver process: its server accepts
    index: int = 0

    def for_process(self, index: int) -> SharedListener:
        if not 0 <= index < len(self.loads):
            raise ValueError(f"receiver index {index} outside 0..{len(self.loads) - 1}")
        return replace(self, index=index)

    def post(self, load: int) -> None:
        self.loads[self.index] = load

    def lighter_elsewhere(self, load: int) -> bool:
        return any(other < load for i, other in enumerate(self.loads) if i != self.index)

    def mark_listening(self, listening: bool = True) -> None:
        self.listening[self.index] = int(listening)

    def not_listening(self) -> list[int]:
        """Indices of the receiver processes whose server does not accept yet."""
        return [i for i, flag in enumerate(self.listening) if not flag]


def open_shared_listener(host: str, port: int, processes: int) -> SharedListener:
    """A listening socket for ``processes`` receiver processes, posted as
    index 0 (the opener's); see SharedListener."""
    sock = socket.create_server((host, port), backlog=BACKLOG,
                                family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    # spawn passes a RawArray to the child processes it starts with it.
    spawn = multiprocessing.get_context("spawn")
    return SharedListener(sock, spawn.RawArray("i", processes), spawn.RawArray("b", processes))
