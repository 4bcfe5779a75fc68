"""Refusals logged once per peer and reason, not once per connection.

A flood of connections from one host must not turn into a flood of log
lines: the first refusal of a (peer, reason) pair is logged, repeats within
the window are only counted, and the next line after the window says how
many were left out.  Metrics count every refusal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RefusalLog"]

# Pairs remembered at once: a spoofed-source flood cannot grow this without
# bound; the oldest pair is forgotten (and may be logged again).
_MAX_KEYS = 4096


class RefusalLog:
    def __init__(self, logger: logging.Logger, *, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._window = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # (peer, reason) -> [time last logged, refusals left out since]
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def warning(self, peer: str, reason: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless this (peer, reason) was logged within
        the window; returns whether it was logged."""
        now = self._clock()
        with self._lock:
            entry = self._seen.get((peer, reason))
            if entry is not None and now - entry[0] < self._window:
                entry[1] += 1
                return False
            left_out = int(entry[1]) if entry is not None else 0
            self._seen[(peer, reason)] = [now, 0]
            self._seen.move_to_end((peer, reason))
            while len(self._seen) > _MAX_KEYS:
                self._seen.popitem(last=False)
        if left_out:
            message += " (%d more from this peer for this reason in the last %.0f s not logged)"
            args = (*args, left_out, self._window)
        self._log.warning(message, *args)
        return True
