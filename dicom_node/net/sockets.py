"""Socket tuning for DICOM associations, in both directions.

Lives here, not in send/ or receive/, so neither imports the other.
"""

from __future__ import annotations

import socket

__all__ = ["SEND_LOOP_DELAY", "RECEIVE_LOOP_DELAY", "tune_socket"]

# pynetdicom's DUL thread sleeps this long when it finds nothing to do (1 ms
# by default).  Each C-STORE round trip of a sender hits several such idle
# checks, so a shorter nap sends measurably faster (bench/send.py); the
# receiver keeps the default, where many idle associations would spin.
SEND_LOOP_DELAY = 0.0002
RECEIVE_LOOP_DELAY = 0.001


def tune_socket(sock: socket.socket, timeout_s: float | None) -> None:
    """TCP_NODELAY, and a timeout on every blocking call.

    Without TCP_NODELAY a peer that also leaves Nagle on (dcmtk, Orthanc)
    stalls about 40 ms per instance on delayed ACKs.  The timeout bounds a
    send to a peer that stopped reading, and any read not already bounded by
    the PDU reader (net.pdu)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
