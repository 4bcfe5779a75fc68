"""Socket tuning for DICOM associations, in both directions.

Lives here, not in send/ or receive/, so neither imports the other.
"""

from __future__ import annotations

import socket

__all__ = ["DUL_IDLE_WAIT_S", "tune_socket"]

# How long a DUL thread waits in select() for the peer or for us before it
# looks at its timers (pynetdicom_compat.install_wakeup): data and our own
# hand-offs wake it at once, so this bounds only timer checks and shutdown.
DUL_IDLE_WAIT_S = 0.005


def tune_socket(sock: socket.socket, timeout_s: float | None) -> None:
    """TCP_NODELAY, and a timeout on every blocking call.

    Without TCP_NODELAY a peer that also leaves Nagle on (dcmtk, Orthanc)
    stalls about 40 ms per instance on delayed ACKs.  The timeout bounds a
    send to a peer that stopped reading, and any read not already bounded by
    the PDU reader (net.pdu)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
