"""Resource limits shared by the receiver, the worker and readiness: the
disk watermark and the declared size of pixel data.

Both are about refusing early: an instance is refused before it is written
when the disk is nearly full, and before any pixel buffer is allocated when
its header declares more pixel data than ``node.max_pixel_bytes``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PIXEL_TAGS", "DiskWatermark", "declared_pixel_bytes"]

log = logging.getLogger("dicom_node.limits")

# The header attributes that fix the size of the decoded pixel data.
PIXEL_TAGS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]

# statvfs costs ~3 us here against ~10 ms per received instance, so this is
# not about speed: a cached value also keeps a slow network file system off
# the C-STORE path.  Refresh at least this often...
_REFRESH_S = 0.5


def _int(value: Any, default: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return default
    return n if n > 0 else default


def declared_pixel_bytes(header: Any) -> int:
    """Bytes the decoded pixel data would take, from the header alone (0 when
    the instance declares no image).  ``header`` is a pydicom Dataset or any
    mapping-like object with ``get``; missing or broken values count as 1 frame,
    1 sample, 8 bits, so a bomb cannot hide behind a malformed NumberOfFrames."""
    rows = _int(header.get("Rows"), 0)
    columns = _int(header.get("Columns"), 0)
    if not rows or not columns:
        return 0
    frames = _int(header.get("NumberOfFrames"), 1)
    samples = _int(header.get("SamplesPerPixel"), 1)
    bits = _int(header.get("BitsAllocated"), 8)
    return (rows * columns * frames * samples * bits + 7) // 8


class DiskWatermark:
    """Whether the data dir's file system has fewer free bytes than the floor.

    The free-space reading is cached; between readings the bytes written
    through ``note_written`` are subtracted, and a reading is taken at once
    when that estimate crosses the floor, so a burst of large instances cannot
    overshoot it by more than one instance.  Logs once when the state changes.
    """

    def __init__(self, path: Path, floor: int, *,
                 statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.floor = floor
        self._statvfs = statvfs
        self._clock = clock
        self._lock = threading.Lock()
        self._free = 0
        self._read_at = float("-inf")
        self._written = 0
        self._below: bool | None = None

    def free_bytes(self) -> int:
        """Free bytes (for unprivileged users, as ``df`` shows), read now."""
        st = self._statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def below(self) -> bool:
        """True when the free space is under the floor (cached reading)."""
        with self._lock:
            now = self._clock()
            estimate = self._free - self._written
            # Read again when stale, or when writes since an above-floor
            # reading may have crossed it (while below, staleness is enough).
            crossing = self._free >= self.floor > estimate
            if now - self._read_at >= _REFRESH_S or crossing:
                try:
                    self._free = self.free_bytes()
                except OSError as exc:
                    # Cannot tell: keep receiving rather than refuse everything;
                    # the write itself still fails cleanly on a full disk.
                    log.warning("cannot read free space of %s: %s", self.path, exc.strerror)
                    self._free = self.floor
                self._read_at = now
                self._written = 0
                estimate = self._free
            below = estimate < self.floor
            if below != self._below:
                self._log_change(below, estimate)
                self._below = below
            return below

    def note_written(self, size: int) -> None:
        with self._lock:
            self._written += size

    def describe(self) -> str:
        return f"{self._free} bytes free on the data dir, below node.min_free_bytes {self.floor}"

    def _log_change(self, below: bool, free: int) -> None:
        if below:
            log.warning("data dir has %d bytes free, below node.min_free_bytes %d: refusing new "
                        "instances (0xA700) until space returns; spooled work goes on", free, self.floor)
        elif self._below is not None:
            log.info("data dir has %d bytes free again (node.min_free_bytes %d): accepting instances",
                     free, self.floor)
