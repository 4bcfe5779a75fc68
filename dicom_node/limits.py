"""Resource limits shared by the receiver, the worker and readiness: the
disk watermark, the declared size of pixel data, and what an encapsulated
frame's own codestream declares.

All are about refusing early: an instance is refused before it is written
when the disk is nearly full, and before any pixel buffer is allocated when
its header declares more pixel data than ``node.max_pixel_bytes``.  Decoders
size their output from the codestream (a JPEG 2000 SIZ marker, a JPEG SOF),
not from the DICOM header, so each frame's codestream header is read too and
must agree with the DICOM header before anything decodes it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PIXEL_TAGS", "CodestreamError", "CodestreamHeader", "DiskWatermark",
           "check_encapsulated_frames", "codestream_header", "declared_pixel_bytes"]

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


# -- codestream headers ----------------------------------------------------------

# Transfer syntaxes by the codestream family their frames hold.
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203"}
_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
         "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_RLE = "1.2.840.10008.1.2.5"

# JPEG start-of-frame markers (ITU T.81 B.1.1.3: C0-CF less DHT C4, JPG C8,
# DAC CC) and JPEG-LS SOF55 (T.87).  Markers without a length segment.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class CodestreamError(ValueError):
    """A frame's codestream is unreadable or disagrees with the DICOM header."""


@dataclass(frozen=True)
class CodestreamHeader:
    """What a frame's codestream says it decodes to.  ``rows`` is 0 when a
    JPEG defers the height to a DNL marker."""
    rows: int
    columns: int
    samples: int
    precision: int  # bits per sample, the largest over components

    def decoded_bytes(self) -> int:
        return max(self.rows, 1) * self.columns * self.samples * ((self.precision + 7) // 8)


def _u16(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise CodestreamError("codestream ends inside its header")
    return int(struct.unpack_from(">H", data, at)[0])


def _j2k_siz(data: bytes, at: int) -> CodestreamHeader:
    """The SIZ segment right after SOC (ITU T.800 A.5.1)."""
    if data[at:at + 4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("JPEG 2000 codestream does not start with SOC and SIZ markers")
    body = at + 6  # SOC, SIZ marker, Lsiz
    if body + 36 > len(data):
        raise CodestreamError("JPEG 2000 SIZ marker is truncated")
    _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">HIIII", data, body)
    csiz = _u16(data, body + 34)
    if csiz == 0 or body + 36 + 3 * csiz > len(data):
        raise CodestreamError(f"JPEG 2000 SIZ marker declares {csiz} components it does not hold")
    precision = max((data[body + 36 + 3 * i] & 0x7F) + 1 for i in range(csiz))
    if xsiz <= xosiz or ysiz <= yosiz:
        raise CodestreamError(f"JPEG 2000 SIZ marker declares an empty image ({xsiz}x{ysiz} "
                              f"from offset {xosiz},{yosiz})")
    return CodestreamHeader(ysiz - yosiz, xsiz - xosiz, csiz, precision)


def _jp2_codestream(data: bytes) -> int:
    """Offset of the codestream inside a JP2 file: its jp2c box (ISO 15444-1 I.4)."""
    at = 0
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if length == 1:  # XLBox follows
            if at + 16 > len(data):
                break
            length = struct.unpack_from(">Q", data, at + 8)[0]
            header = 16
        if kind == b"jp2c":
            return at + header
        if length == 0 or length < header:
            break
        at += length
    raise CodestreamError("JP2 file holds no jp2c codestream box")


def _jpeg_sof(data: bytes) -> CodestreamHeader:
    """The first SOF segment of a JPEG or JPEG-LS stream (T.81 B.2.2, T.87 C.2.2)."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("JPEG codestream does not start with an SOI marker")
    at = 2
    while at < len(data):
        if data[at] != 0xFF:
            raise CodestreamError(f"JPEG codestream has no marker at byte {at}")
        while at < len(data) and data[at] == 0xFF:  # fill bytes
            at += 1
        if at >= len(data):
            break
        marker = data[at]
        at += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any SOF
            break
        length = _u16(data, at)
        if marker in _SOF:
            if length < 8 or at + 8 > len(data):
                raise CodestreamError("JPEG SOF marker is truncated")
            precision = data[at + 2]
            rows, columns = struct.unpack_from(">HH", data, at + 3)
            samples = data[at + 7]
            if not columns or not samples:
                raise CodestreamError(f"JPEG SOF declares {columns} columns and {samples} components")
            return CodestreamHeader(rows, columns, samples, precision)
        if length < 2:
            raise CodestreamError(f"JPEG marker 0xFF{marker:02X} has length {length}")
        at += length
    raise CodestreamError("JPEG codestream has no SOF marker before its scan")


def codestream_header(frame: bytes, transfer_syntax: str) -> CodestreamHeader | None:
    """What an encapsulated frame declares, read from its first bytes without
    decoding; None for transfer syntaxes whose frames are not checked here
    (RLE has no dimensions of its own, video is not decoded by pipelines)."""
    if transfer_syntax in _J2K:
        if frame[:4] == b"\xff\x4f\xff\x51":
            return _j2k_siz(frame, 0)
        return _j2k_siz(frame, _jp2_codestream(frame))
    if transfer_syntax in _JPEG:
        return _jpeg_sof(frame)
    return None


def _rle_segments(frame: bytes) -> int:
    """Segment count of an RLE frame's 64-byte header (PS3.5 G.3.1), after
    checking its offsets fall inside the frame in order."""
    if len(frame) < 64:
        raise CodestreamError(f"RLE frame of {len(frame)} bytes is shorter than its 64-byte header")
    header = struct.unpack_from("<16I", frame, 0)
    count = header[0]
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header declares {count} segments (1 to 15 allowed)")
    offsets = header[1:count + 1]
    if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)) \
            or offsets[-1] >= len(frame):
        raise CodestreamError("RLE header's segment offsets are not increasing inside the frame")
    return int(count)


def check_encapsulated_frames(header: Any, frames: Iterator[bytes], transfer_syntax: str,
                              max_pixel_bytes: int) -> int:
    """Check every frame's codestream against the DICOM header and the limit.

    ``header`` gives Rows, Columns, SamplesPerPixel, BitsAllocated (a pydicom
    Dataset).  Raises CodestreamError naming the frame and the disagreement;
    returns how many frames were checked.  Precision may be below
    BitsAllocated (12-bit data in 16-bit words) but never above: the decoder
    would write samples wider than the buffer the pipeline reads."""
    rows = _int(header.get("Rows"), 0)
    columns = _int(header.get("Columns"), 0)
    samples = _int(header.get("SamplesPerPixel"), 1)
    allocated = _int(header.get("BitsAllocated"), 8)
    checked = 0
    for index, frame in enumerate(frames, start=1):
        checked = index
        if transfer_syntax == _RLE:
            expected = samples * ((allocated + 7) // 8)
            found = _rle_segments(frame)
            if found != expected:
                raise CodestreamError(
                    f"frame {index}: RLE header declares {found} segments, the DICOM header's "
                    f"SamplesPerPixel {samples} x BitsAllocated {allocated} needs {expected}")
            continue
        try:
            declared = codestream_header(frame, transfer_syntax)
        except CodestreamError as exc:
            raise CodestreamError(f"frame {index}: {exc}") from None
        if declared is None:
            continue
        if declared.decoded_bytes() > max_pixel_bytes:
            raise CodestreamError(
                f"frame {index}: codestream declares {declared.columns}x{declared.rows}x"
                f"{declared.samples} samples of {declared.precision} bits "
                f"({declared.decoded_bytes()} bytes), over node.max_pixel_bytes {max_pixel_bytes}")
        wanted = (rows, columns, samples)
        found_dims = (declared.rows or rows, declared.columns, declared.samples)
        if found_dims != wanted or declared.precision > allocated:
            raise CodestreamError(
                f"frame {index}: codestream declares {declared.columns}x{declared.rows} with "
                f"{declared.samples} components of {declared.precision} bits, the DICOM header "
                f"{columns}x{rows} with SamplesPerPixel {samples} and BitsAllocated {allocated}")
    return checked
