"""C-ECHO SCU: is a DICOM peer there, and does it accept our AE title?

Used by the status page's "echo" action (and available to ``dicom-node
echo``).  Answers with an outcome, never raises for a peer that is down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Peer
from dicom_node.errors import SendError
from dicom_node.net.pdu import PduLimits, advertised_max_pdu
from dicom_node.security.tls import ClientContexts

__all__ = ["EchoResult", "echo_peer"]


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str
    seconds: float


def echo_peer(peer: Peer, *, calling_ae: str, timeout_s: float = 10.0) -> EchoResult:
    """One association with a Verification context and one C-ECHO."""
    from dicom_node.send.scu import connection_tuner, tls_args

    started = time.perf_counter()

    def result(ok: bool, detail: str) -> EchoResult:
        return EchoResult(ok, detail, round(time.perf_counter() - started, 3))

    ae = AE(ae_title=calling_ae)
    for attr in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attr, timeout_s)
    ae.add_requested_context(Verification)
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        tls = tls_args(peer, ClientContexts())
    except SendError as exc:
        return result(False, str(exc))
    limits = PduLimits(max_pdu=advertised_max_pdu(ae.maximum_pdu_size), network_timeout_s=timeout_s)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls,
                         evt_handlers=[connection_tuner(limits, peer.name)])
    if assoc.is_rejected:
        return result(False, f"association rejected by {where} (calling AE {calling_ae} "
                             "not known there, or wrong called AE)")
    if not assoc.is_established:
        return result(False, f"cannot connect to {where} (refused, aborted or timed out)")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if status is None or "Status" not in status:
        return result(False, f"{where} did not answer the C-ECHO")
    code = int(status.Status)
    if code != 0x0000:
        return result(False, f"{where} answered C-ECHO with status 0x{code:04X}")
    return result(True, f"{where} answered C-ECHO (success)")
