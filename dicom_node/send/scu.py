"""C-STORE SCU: send result files to a DICOM peer on one association.

Files are sent as written (pynetdicom reads and sends the encoded dataset),
and our socket sets TCP_NODELAY so a dcmtk or Orthanc peer never makes us wait
on delayed ACKs.  Failures raise SendError with ``retryable`` set so the
outbox decides from fields, not from message text.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from dicom_node.config import Peer
from dicom_node.errors import SendError

__all__ = ["StoreRequest", "StoreOutcome", "send_files", "status_is_success", "tune_association"]

log = logging.getLogger("dicom_node.send")

# Statuses after which sending the same object again cannot succeed.
_PERMANENT = {0x0122: "SOP class not supported", 0x0124: "not authorized",
              0x0210: "duplicate invocation", 0x0211: "unrecognized operation",
              0x0212: "mistyped argument"}


@dataclass(frozen=True)
class StoreRequest:
    item_id: int
    path: Path
    sop_class: str
    sop_uid: str


@dataclass(frozen=True)
class StoreOutcome:
    item_id: int
    ok: bool
    retryable: bool
    reason: str


# pynetdicom's DUL thread sleeps this long when it finds nothing to do (1 ms
# by default); each C-STORE round trip hits several such idle checks, so a
# shorter nap sends measurably faster (bench/send.py) at a little idle CPU.
_LOOP_DELAY = 0.0002


def status_is_success(status: int) -> bool:
    # 0x0000 success; 0xB000, 0xB006, 0xB007 warnings: the peer stored it.
    return status == 0x0000 or (status & 0xF000) == 0xB000


def tune_association(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: no Nagle delay, shorter DUL idle naps."""
    event.assoc.dul._run_loop_delay = _LOOP_DELAY
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_files(peer: Peer, requests: Sequence[StoreRequest], *, calling_ae: str,
               timeout_s: float = 30.0, max_pdu: int = 262144) -> list[StoreOutcome]:
    """Send on one association.  Raises SendError when no association could be
    made; per-object failures come back as outcomes."""
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    classes = sorted({r.sop_class for r in requests})
    if len(classes) > 128:
        raise SendError(peer.name, f"{len(classes)} SOP classes in one batch", retryable=False)
    contexts = [build_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for c in classes]
    assoc = ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, tune_association)])
    if assoc.is_rejected:
        raise SendError(peer.name, f"association rejected by {peer.ae_title}", retryable=False)
    if not assoc.is_established:
        raise SendError(peer.name, f"cannot connect to {peer.host}:{peer.port} "
                        f"(refused, aborted or timed out)", retryable=True)
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    outcomes: list[StoreOutcome] = []
    try:
        for req in requests:
            if req.sop_class not in accepted:
                outcomes.append(StoreOutcome(req.item_id, False, False,
                                             f"{peer.ae_title} does not accept SOP class {req.sop_class}"))
                continue
            outcomes.append(_store_one(assoc, req, peer))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    done = {o.item_id for o in outcomes}
    outcomes += [StoreOutcome(r.item_id, False, True, "association ended before it was sent")
                 for r in requests if r.item_id not in done]
    return outcomes


def _store_one(assoc, req: StoreRequest, peer: Peer) -> StoreOutcome:
    try:
        rsp = assoc.send_c_store(req.path)
    except (OSError, ValueError, AttributeError) as exc:
        return StoreOutcome(req.item_id, False, False, f"cannot send {req.path.name}: {exc}")
    status = int(rsp.get("Status", -1)) if rsp else -1
    if status < 0:
        return StoreOutcome(req.item_id, False, True, "no response (timeout or abort)")
    if status_is_success(status):
        return StoreOutcome(req.item_id, True, False, f"status 0x{status:04X}")
    if status in _PERMANENT or (status & 0xF000) in (0xA900, 0xC000):
        why = _PERMANENT.get(status, "refused")
        return StoreOutcome(req.item_id, False, False, f"{peer.ae_title} {why} (0x{status:04X})")
    return StoreOutcome(req.item_id, False, True, f"{peer.ae_title} status 0x{status:04X}")
