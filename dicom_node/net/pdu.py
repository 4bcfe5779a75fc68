"""Bounds on what a peer's PDU may cost us: memory by its declared length,
time by deadlines, checked before anything is allocated or waited for.

pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then
``recv(length)``; ``BoundedPduReader.recv`` replaces the transport's ``recv``
(installed by ``pynetdicom_compat.install_pdu_reader``).  A length over the
bound of its PDU type, a PDU that does not arrive within the network timeout,
or an A-ASSOCIATE-RQ that does not arrive within the negotiation timeout
(ARTIM) aborts the connection: we send an A-ABORT, shut the socket down and
hand pynetdicom a short read, which its state machine treats as the
transport closing (Evt17).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HARD_MAX_PDU", "ASSOCIATE_MAX", "PduLimits", "BoundedPduReader", "advertised_max_pdu",
           "aborted_in_this_thread"]

# Our largest P-DATA-TF, whatever node.max_pdu says (0 means "unlimited" in
# DICOM; we advertise this instead).  Each association holds about two PDUs
# in memory at once, so this is the per-peer memory constant; dcmtk's
# storescp accepts at most 128 KiB, so 4 MiB leaves every real sender room.
HARD_MAX_PDU = 4 * 1024 * 1024

# A-ASSOCIATE-RQ/-AC: the protocol allows 128 presentation contexts; 128 x
# (8 + 68 for the abstract syntax + 25 x 68 for full-length transfer
# syntaxes) is about 222 KiB, plus a 32 KiB user identity token.  The
# largest real requests we know (dcmtk storescu proposing every storage
# class with 3-4 syntaxes) are under 64 KiB.
ASSOCIATE_MAX = 256 * 1024

# A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP and A-ABORT have a 4-byte body (PS3.8 9.3).
_FIXED_MAX = 64

# Some implementations count the PDV item header (6 bytes) outside the
# negotiated maximum length; tolerate that much over.
_P_DATA_SLACK = 16

_HEADER = 6
_CHUNK = 1 << 20

# A-ABORT PDU, source 2 (service provider), PS3.8 9.3.8.
_REASON_NOT_SPECIFIED = 0x00
_REASON_INVALID_PARAMETER = 0x06


# Set in a DUL thread whose reader aborted the connection, so the short read
# pynetdicom then logs (one ERROR per connection, the reason already logged
# by us, rate-limited) can be filtered out (pynetdicom_compat).
_thread = threading.local()


def aborted_in_this_thread() -> bool:
    return getattr(_thread, "aborted", False)


def advertised_max_pdu(configured: int) -> int:
    """The maximum PDU length we tell peers: node.max_pdu, with 0 (unlimited)
    and anything over the hard cap replaced by the cap we enforce."""
    return HARD_MAX_PDU if configured == 0 else min(configured, HARD_MAX_PDU)


@dataclass(frozen=True)
class PduLimits:
    # The P-DATA-TF variable-field length we advertised (advertised_max_pdu).
    max_pdu: int
    # Every PDU, once its first byte arrived, must be complete within this.
    network_timeout_s: float
    # Acceptor only: the A-ASSOCIATE-RQ must be complete this long after the
    # connection opened (ARTIM, PS3.8 9.1.5).  None for a requestor, where
    # pynetdicom's ACSE timeout bounds the wait for the answer.
    negotiation_timeout_s: float | None = None

    def bound(self, pdu_type: int) -> int | None:
        """Largest length accepted for a PDU type; None for unknown types,
        whose body pynetdicom never reads (it aborts on the type)."""
        if pdu_type in (0x01, 0x02):
            return ASSOCIATE_MAX
        if pdu_type == 0x04:
            return self.max_pdu + _P_DATA_SLACK
        if pdu_type in (0x03, 0x05, 0x06, 0x07):
            return _FIXED_MAX
        return None


# Called with (label, reason): label is one of "pdu_too_large",
# "negotiation_timeout", "stalled_pdu" (bounded, for metrics).
OnViolation = Callable[[str, str], None]


class BoundedPduReader:
    """What a transport's ``recv`` becomes: reads into one buffer of the
    declared size (no 4 KiB reads and bytearray extensions, which cost 128
    calls per 512 KiB slice), after checking that size and within deadlines."""

    def __init__(self, sock: socket.socket, limits: PduLimits, on_violation: OnViolation,
                 is_established: Callable[[], bool], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sock = sock
        self._limits = limits
        self._on_violation = on_violation
        self._is_established = is_established
        self._clock = clock
        self._opened = clock()
        self._deadline = 0.0
        self._deadline_label = "stalled_pdu"
        self._body_pending = False
        self.failed = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self.failed:
            return bytearray()
        if nr_bytes == _HEADER and not self._body_pending:
            return self._read_header()
        self._body_pending = False
        return self._read(nr_bytes)

    # -- one PDU ----------------------------------------------------------------

    def _read_header(self) -> bytearray:
        now = self._clock()
        self._deadline = now + self._limits.network_timeout_s
        self._deadline_label = "stalled_pdu"
        artim = self._limits.negotiation_timeout_s
        if artim is not None and not self._is_established() and self._opened + artim < self._deadline:
            self._deadline = self._opened + artim
            self._deadline_label = "negotiation_timeout"
        header = self._read(_HEADER)
        if len(header) < _HEADER:
            return header  # closed, or a deadline passed: pynetdicom sees Evt17
        pdu_type, _, length = struct.unpack(">BBL", header)
        bound = self._limits.bound(pdu_type)
        if bound is not None and length > bound:
            self._fail("pdu_too_large",
                       f"PDU type 0x{pdu_type:02X} declares {length} bytes, over our maximum "
                       f"of {bound}", _REASON_INVALID_PARAMETER)
            return bytearray()
        self._body_pending = True
        return header

    def _read(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        while nr_read < nr_bytes:
            if not self._wait_readable():
                self._fail(self._deadline_label, self._stall_reason(nr_read, nr_bytes),
                           _REASON_NOT_SPECIFIED)
                return bytearray()
            try:
                n = self._sock.recv_into(view[nr_read:], min(nr_bytes - nr_read, _CHUNK))
            except (TimeoutError, ssl.SSLWantReadError):
                continue  # the deadline check above decides
            if not n:
                return buffer[:nr_read]  # peer closed: pynetdicom handles the short read
            nr_read += n
        return buffer

    def _wait_readable(self) -> bool:
        """Wait for data until the PDU's deadline; False when it passed."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True  # decrypted bytes already buffered; poll cannot see them
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            return False
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(remaining * 1000))

    def _stall_reason(self, nr_read: int, nr_bytes: int) -> str:
        if self._deadline_label == "negotiation_timeout":
            return (f"association not requested within {self._limits.negotiation_timeout_s:g} s "
                    f"of connecting ({nr_read} of {nr_bytes} bytes of a PDU read)")
        return (f"PDU not complete within {self._limits.network_timeout_s:g} s "
                f"({nr_read} of {nr_bytes} bytes read)")

    def _fail(self, label: str, reason: str, diagnostic: int) -> None:
        self.failed = True
        _thread.aborted = True
        try:
            self._on_violation(label, reason)
        finally:
            _abort(self._sock, diagnostic)


def _abort(sock: socket.socket, diagnostic: int) -> None:
    """Best effort: tell the peer (A-ABORT), then end the connection so the
    DUL's next read sees it closed.  A peer that stopped reading gets 1 s."""
    pdu = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, diagnostic)
    try:
        sock.settimeout(1.0)
        sock.sendall(pdu)
    except (OSError, ValueError):
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
