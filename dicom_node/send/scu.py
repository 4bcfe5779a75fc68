"""C-STORE SCU: send result files to a DICOM peer on one association.

Files are sent as written (pynetdicom reads and sends the encoded dataset,
once the service entry point called pynetdicom_compat.configure_process),
and our socket sets TCP_NODELAY so a dcmtk or Orthanc peer never makes us wait
on delayed ACKs.  Failures raise SendError with ``retryable`` set so the
outbox decides from fields, not from message text.
"""

from __future__ import annotations

import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context

from dicom_node.config import Peer
from dicom_node.errors import SendError
from dicom_node.net import pynetdicom_compat as compat
from dicom_node.net.pdu import BoundedPduReader, PduLimits, advertised_max_pdu
from dicom_node.net.sockets import DUL_IDLE_WAIT_S, tune_socket
from dicom_node.security.tls import ClientContexts, TlsError
from dicom_node.send import statuses

if TYPE_CHECKING:  # send/processes.py imports this module
    from dicom_node.send.processes import SenderProcesses

__all__ = ["StoreRequest", "StoreOutcome", "send_files", "send_files_parallel", "send_share", "tls_args"]

log = logging.getLogger("dicom_node.send")



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


def connection_tuner(limits: PduLimits, peer_name: str) -> evt.EventHandlerType:
    """EVT_CONN_OPEN handler for every association we request (C-STORE and
    C-ECHO): no Nagle delay, a DUL that waits on the socket, socket timeouts,
    PDUs from the peer bounded by our maximum PDU, and responses kept for the
    request waiting on them."""
    def on_violation(label: str, reason: str) -> None:
        log.warning("association with %s aborted: %s", peer_name, reason)

    def tune(event: evt.Event) -> None:
        assoc = event.assoc
        transport = assoc.dul.socket
        if transport is None or transport.socket is None:
            return
        tune_socket(transport.socket, limits.network_timeout_s)
        reader = BoundedPduReader(transport.socket, limits, on_violation,
                                  lambda: compat.negotiated(assoc))
        compat.install_pdu_reader(assoc, reader)
        compat.install_wakeup(assoc, DUL_IDLE_WAIT_S)
        compat.install_response_guard(assoc)
        compat.install_store_encoding(assoc)
    return (evt.EVT_CONN_OPEN, tune)


def _rejection_watcher(results: list[int]) -> evt.EventHandlerType:
    """EVT_ACSE_RECV handler keeping the A-ASSOCIATE-RJ result (1 permanent,
    2 transient): a peer at its association limit answers transient, and
    that must be retried, not sent to dead letters."""
    def watch(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)  # set per event by pynetdicom
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            results.append(int(primitive.result))
    return (evt.EVT_ACSE_RECV, watch)


def send_files_parallel(peer: Peer, requests: Sequence[StoreRequest], *, associations: int,
                        calling_ae: str, timeout_s: float = 30.0,
                        tls_contexts: ClientContexts | None = None,
                        processes: SenderProcesses | None = None) -> list[StoreOutcome]:
    """Send over up to ``associations`` associations at once, the objects dealt
    round-robin: from ``processes`` when given (one process per association,
    up to their number), else from threads of this one.  Raises SendError
    only when no association could be made; the objects of a failed
    association come back as outcomes with its reason."""
    count = max(1, min(associations, len(requests)))
    if processes is not None:
        count = min(count, processes.processes)
    if count == 1:
        return send_files(peer, requests, calling_ae=calling_ae, timeout_s=timeout_s,
                          tls_contexts=tls_contexts)
    shares = [list(requests[i::count]) for i in range(count)]
    if processes is not None:
        results = processes.send(peer, shares, calling_ae=calling_ae, timeout_s=timeout_s)
    else:
        contexts = tls_contexts or ClientContexts()
        with ThreadPoolExecutor(count, thread_name_prefix=f"send-{peer.name}") as pool:
            results = list(pool.map(lambda share: send_share(peer, share, calling_ae, timeout_s, contexts),
                                    shares))
    errors = [r for r in results if isinstance(r, SendError)]
    if len(errors) == count:
        raise errors[0]
    outcomes: list[StoreOutcome] = []
    for share, result in zip(shares, results, strict=True):
        if isinstance(result, SendError):
            outcomes += [StoreOutcome(r.item_id, False, result.retryable, result.reason) for r in share]
        else:
            outcomes += result
    return outcomes


def send_share(peer: Peer, share: Sequence[StoreRequest], calling_ae: str, timeout_s: float,
               contexts: ClientContexts | None) -> list[StoreOutcome] | SendError:
    """One association's share of a parallel send: its outcomes, or the
    SendError that kept the association from being made."""
    try:
        return send_files(peer, share, calling_ae=calling_ae, timeout_s=timeout_s, tls_contexts=contexts)
    except SendError as exc:
        return exc


def send_files(peer: Peer, requests: Sequence[StoreRequest], *, calling_ae: str,
               timeout_s: float = 30.0, max_pdu: int = 262144,
               tls_contexts: ClientContexts | None = None) -> list[StoreOutcome]:
    """Send on one association.  Raises SendError when no association could be
    made; per-object failures come back as outcomes.  ``tls_contexts``: the
    caller's built contexts, reused across sends; one is built when absent."""
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = advertised_max_pdu(max_pdu)
    limits = PduLimits(max_pdu=advertised_max_pdu(max_pdu), network_timeout_s=timeout_s)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    classes = sorted({r.sop_class for r in requests})
    if 2 * len(classes) > 128:
        raise SendError(peer.name, f"{len(classes)} SOP classes in one batch", retryable=False)
    # One context per syntax, so the peer can accept the exact one our files use.
    contexts = [build_context(c, [ts]) for c in classes for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
    rejections: list[int] = []
    assoc = ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
                         evt_handlers=[connection_tuner(limits, peer.name), _rejection_watcher(rejections)],
                         tls_args=tls_args(peer, tls_contexts or ClientContexts()))
    if assoc.is_rejected:
        transient = rejections == [0x02]
        raise SendError(peer.name, f"association rejected by {peer.ae_title} "
                        f"({'transient' if transient else 'permanent'})", retryable=transient)
    if not assoc.is_established:
        # pynetdicom logs the TLS error itself (certificate not trusted, ...).
        why = ("refused, aborted, timed out or TLS handshake failed" if peer.tls
               else "refused, aborted or timed out")
        raise SendError(peer.name, f"cannot connect to {peer.host}:{peer.port} ({why})",
                        retryable=True)
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    outcomes: list[StoreOutcome] = []
    try:
        with compat.sending_without_pause(assoc):
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


def tls_args(peer: Peer, contexts: ClientContexts) -> tuple[ssl.SSLContext, str] | None:
    """(context, server name) for pynetdicom when the peer is configured for TLS.
    The host goes along as the name to check when tls.check_hostname is set."""
    if peer.tls is None:
        return None
    try:
        return contexts.get(peer.tls), peer.host
    except TlsError as exc:  # the files were checked at start; one changed since
        raise SendError(peer.name, f"peers.{peer.name}.tls: {exc}", retryable=True) from exc


def _store_one(assoc: Association, req: StoreRequest, peer: Peer) -> StoreOutcome:
    try:
        try:
            # As written, without decoding: pynetdicom reads the file's meta
            # and sends it on the context accepted for its transfer syntax.
            rsp = assoc.send_c_store(req.path)
        except ValueError:
            # No accepted context has the file's syntax (a peer taking only
            # Implicit VR, say): a decoded copy, which pynetdicom converts.
            # Checking the syntax first cost a second read of the file meta
            # on every object (about 5 % of the send rate).
            rsp = assoc.send_c_store(dcmread(req.path))
    except (OSError, ValueError, AttributeError) as exc:
        return StoreOutcome(req.item_id, False, False, f"cannot send {req.path.name}: {exc}")
    status = int(rsp.get("Status", -1)) if rsp else -1
    if status < 0:
        return StoreOutcome(req.item_id, False, True, "no response (timeout or abort)")
    if statuses.is_success(status):
        return StoreOutcome(req.item_id, True, False, f"status 0x{status:04X}")
    if statuses.is_permanent(status):
        return StoreOutcome(req.item_id, False, False, f"{peer.ae_title} refused: {statuses.describe(status)}")
    return StoreOutcome(req.item_id, False, True, f"{peer.ae_title} status 0x{status:04X}")
