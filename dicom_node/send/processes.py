"""Sender processes: a destination's parallel associations, each share of
the objects sent from a process of its own.

One sending association is CPU-bound in pynetdicom's Python, and threads of
one process share its interpreter lock: on threads, 4 associations sent no
faster than one (396 against 429 objects/s into a forking storescp on 2
cores), on 4 processes 754 (storescu 1512).  The processes only send; the
outcomes come back to the dispatcher, which alone records them, so a
sender process that dies loses nothing: its objects come back as
retryable and are sent again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from threading import Lock

from dicom_node.config import Peer
from dicom_node.errors import SendError
from dicom_node.net import pynetdicom_compat
from dicom_node.observability.logs import setup_logging
from dicom_node.security.tls import ClientContexts
from dicom_node.send.scu import StoreOutcome, StoreRequest, send_share

__all__ = ["SenderProcesses"]


class SenderProcesses:
    """Up to ``processes`` sender processes, started when first needed and
    kept for later batches (starting one took 0.4 s here: a new interpreter
    and its imports)."""

    def __init__(self, processes: int, log_level: str = "INFO", json_logs: bool = False) -> None:
        self.processes = processes
        self._logging = (log_level, json_logs)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = Lock()

    def send(self, peer: Peer, shares: Sequence[Sequence[StoreRequest]], *, calling_ae: str,
             timeout_s: float) -> list[list[StoreOutcome] | SendError]:
        """send_files for each share, at most ``processes`` at once: its
        outcomes, or the SendError that ended it (a dead sender process
        gives a retryable one)."""
        pool = self._executor()
        futures: list[Future[list[StoreOutcome] | SendError]] = [
            pool.submit(_send_share, peer, list(share), calling_ae, timeout_s) for share in shares]
        results: list[list[StoreOutcome] | SendError] = []
        for future in futures:
            try:
                results.append(future.result())
            except BrokenProcessPool:
                self._forget(pool)
                results.append(SendError(peer.name, "a sender process ended during the send", retryable=True))
        return results

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start, initargs=self._logging)
            return self._pool

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        """A broken pool takes no more work: the next send starts a new one."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)


# Per sender process: TLS contexts built once, reused by every share.
_CONTEXTS: ClientContexts | None = None


def _start(log_level: str, json_logs: bool) -> None:
    global _CONTEXTS
    multiprocessing.current_process().name = f"sender-{os.getpid()}"  # in each log line
    setup_logging(log_level, json_logs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops them
    pynetdicom_compat.configure_process(send_chunked=True)  # files sent as written
    _CONTEXTS = ClientContexts()


def _send_share(peer: Peer, share: list[StoreRequest], calling_ae: str,
                timeout_s: float) -> list[StoreOutcome] | SendError:
    return send_share(peer, share, calling_ae, timeout_s, _CONTEXTS)
