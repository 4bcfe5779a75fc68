"""The DICOM SCP: C-ECHO and C-STORE of every storage SOP class.

Handlers are thin: they get what they need through their arguments, persist,
and return a status.  Success is answered only after the instance is fsync'd
into the spool and recorded in the store.  Nothing here waits on inference.
"""

from __future__ import annotations

import copy
import errno
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Config
from dicom_node.limits import PIXEL_TAGS, DiskWatermark, declared_pixel_bytes
from dicom_node.observability.metrics import Metrics
from dicom_node.security.tls import server_context
from dicom_node.send.scu import tune_association
from dicom_node.store.db import InstanceRecord, Store
from dicom_node.store.spool import Spool, is_valid_uid

__all__ = ["Receiver", "STATUS", "supported_transfer_syntaxes", "storage_sop_classes",
           "reconcile_spool"]

log = logging.getLogger("dicom_node.receive")

# C-STORE statuses (PS3.4 Annex B.2.3 and pynetdicom's storescp).
STATUS = {
    "success": 0x0000,
    "out_of_resources": 0xA700,
    "dataset_mismatch": 0xA900,
    "cannot_understand": 0xC210,
    "invalid_uid": 0xC211,
    "processing_failure": 0x0110,
    # Declared pixel data above node.max_pixel_bytes.  A Cxxx "Error: cannot
    # understand" rather than A700: senders treat A7xx as transient and retry,
    # but this instance will never fit, so retrying only repeats the refusal.
    "pixels_too_large": 0xC220,
}

# Tags the receiver reads; the pixel data is never decoded here.
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "ImagesInAcquisition", "NumberOfSlices", *PIXEL_TAGS]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
# Transient, DUL service provider (presentation related), local limit exceeded.
_REJECT_LIMIT = (0x02, 0x03, 0x02)
# Rejected-transient, by the presentation-related service provider, temporary
# congestion: the sender may try again later (disk below the watermark).
_REJECT_CONGESTION = (0x02, 0x03, 0x01)


# When a context proposes several syntaxes pynetdicom takes the first of ours
# that was proposed: prefer what keeps the sender's pixels exactly (explicit
# VR, then lossless compression), then lossy compression over asking a sender
# to decompress, and Implicit VR and Big Endian last.
_PREFERRED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70",
              "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201",
              "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.81",
              "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.50",
              "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.1.99"]
_LAST = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]


def supported_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom knows, in order of preference: we store
    the bytes as sent, so the only limit is what a pipeline can decode later."""
    known = [str(ts) for ts in AllTransferSyntaxes]
    first = [ts for ts in _PREFERRED if ts in known]
    last = [ts for ts in _LAST if ts in known]
    return first + [ts for ts in known if ts not in first and ts not in last] + last


def storage_sop_classes() -> list[str]:
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


@dataclass(frozen=True)
class _Header:
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    expected_count: int | None
    # Decoded size the header declares (see dicom_node.limits).
    pixel_bytes: int = 0
    # From the file meta: what the sender's context used.
    transfer_syntax: str = ""


class _SharedContexts(list):
    """The server's supported contexts, copied shallowly per association.

    pynetdicom deep-copies them for every association; with 170 storage
    classes times every transfer syntax that took ~0.15 s of CPU per
    association, capping one-instance associations (what many modalities
    send) at a few per second.  Negotiation only reads them, so one copy of
    each context object, sharing its syntax list, is enough.
    """

    def __deepcopy__(self, memo: dict) -> list:
        return [copy.copy(cx) for cx in self]


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on every accepted socket.

    Without it a peer that also leaves Nagle on (dcmtk, Orthanc) stalls about
    40 ms per instance on delayed ACKs.  SO_REUSEPORT lets several receiver
    processes share one port.
    """

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        # Not super(): with TLS pynetdicom would run the handshake here, in the
        # one thread that accepts, where a silent client stalls every other.
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    # -- TLS: the handshake runs in the connection's own thread ---------------
    # Set by the Receiver: called with the client's address and the reason.
    on_tls_failure: Callable[[Any, str], None] | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._tls_handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _tls_handshake(self, sock: ssl.SSLSocket, address: Any) -> bool:
        """Finish the handshake within the network timeout.  A failure (bad or
        missing client certificate, a plain DICOM client, a timeout) closes
        this connection only and is reported; the server keeps serving."""
        previous = sock.gettimeout()
        sock.settimeout(self.ae.network_timeout)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # socket.timeout and resets are OSErrors
            if self.on_tls_failure is not None:
                self.on_tls_failure(address, _tls_reason(exc))
            return False
        sock.settimeout(previous)
        return True


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason, e.g. 'CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate'."""
    if isinstance(exc, socket.timeout):
        return "no TLS handshake within the network timeout"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    detail = getattr(exc, "verify_message", None)
    return f"{reason}: {detail}" if detail else str(reason)


class Receiver:
    """Owns the pynetdicom AE and its server thread."""

    def __init__(self, config: Config, store: Store, spool: Spool, metrics: Metrics,
                 *, reuse_port: bool = False, warn: bool = True) -> None:
        self.warn = warn
        self.config = config
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.reuse_port = reuse_port
        self._server: _NodeServer | None = None
        self._open: dict[int, str] = {}  # established association -> calling AE
        self._lock = threading.Lock()
        # Back-pressure: free space of the spool's file system against the floor.
        self.watermark = DiskWatermark(spool.root, config.node.min_free_bytes)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.network_timeout_s
        syntaxes = supported_transfer_syntaxes()
        ae.add_supported_context(Verification, syntaxes)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, syntaxes)
        return ae

    def start(self) -> tuple[str, int]:
        node = self.config.node
        if node.allow_any_caller and self.warn:
            log.warning("node.allow_any_caller is true: any calling AE may store to %s; "
                        "list peers and set it to false in production", node.ae_title)
        handlers = [
            (evt.EVT_CONN_OPEN, tune_association),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        _NodeServer.reuse_port = self.reuse_port
        server = self.ae.make_server((node.host, node.port), evt_handlers=handlers,
                                     server_class=_NodeServer, ssl_context=self._tls_context())
        server.on_tls_failure = self._on_tls_failure
        server.contexts = _SharedContexts(server.contexts)
        thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        self._server = server
        host, port = server.server_address[:2]
        log.info("listening for DICOM on %s:%d as %s", host, port, node.ae_title)
        return host, port

    def stop(self) -> None:
        """Stop accepting associations and let the running ones finish."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self._server is None else self._server.server_address[:2]

    # -- TLS (node.tls) -------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.node.tls
        if tls is None:
            return None
        clients = ("required" if tls.require_client_certificate
                   else "verified when presented" if tls.ca_file else "not asked for")
        log.info("DICOM port accepts TLS only (TLS 1.2 or newer); client certificates %s", clients)
        return server_context(tls)

    def _on_tls_failure(self, address: Any, reason: str) -> None:
        # Nothing DICOM was exchanged yet: the log carries an address and
        # OpenSSL's reason, never patient data.
        log.warning("TLS handshake from %s failed, connection closed: %s",
                    ":".join(map(str, address[:2])), reason)
        self.metrics.associations.labels(result="rejected_tls").inc()

    # -- association policy ---------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host = assoc.requestor.address
        reason = self._refusal(calling, called, host)
        if reason is None:
            return
        which, rsd = reason
        log.warning("association from %s@%s to %s rejected: %s", calling, host, called, which)
        self.metrics.associations.labels(result=f"rejected_{which}").inc()
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _refusal(self, calling: str, called: str, host: str) -> tuple[str, tuple[int, int, int]] | None:
        node = self.config.node
        if node.require_called_ae and called != node.ae_title:
            return "called_ae", _REJECT_CALLED_AE
        # Limits are per receiver process (node.receivers > 1 multiplies them).
        with self._lock:
            total = len(self._open)
            mine = sum(1 for ae in self._open.values() if ae == calling)
        if total >= node.max_associations:
            return "association_limit", _REJECT_LIMIT
        known = self.config.peer_by_ae(calling)
        if known is not None and known.max_associations is not None and mine >= known.max_associations:
            return "peer_association_limit", _REJECT_LIMIT
        # -- back-pressure: a congested node says so before any instance is sent.
        if node.refuse_associations_below_watermark and self.watermark.below():
            return "disk_below_watermark", _REJECT_CONGESTION
        if node.allow_any_caller:
            return None
        peer = self.config.peer_by_ae(calling)
        if peer is None or not peer.may_send:
            return "calling_ae", _REJECT_CALLING_AE
        if peer.check_host and not _same_host(peer.host, host):
            return "calling_host", _REJECT_CALLING_AE
        return None

    def _on_established(self, event: evt.Event) -> None:
        self.metrics.associations.labels(result="accepted").inc()
        with self._lock:
            self._open[id(event.assoc)] = str(event.assoc.requestor.ae_title).strip()
            self.metrics.associations_active.set(len(self._open))

    def _on_closed(self, event: evt.Event) -> None:
        # Only associations we counted as established (not rejected ones).
        with self._lock:
            self._open.pop(id(event.assoc), None)
            self.metrics.associations_active.set(len(self._open))

    # -- DIMSE ----------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS["success"]

    def _on_store(self, event: evt.Event) -> int:
        """Persist the instance exactly as sent and answer only when durable."""
        request_uid = str(event.request.AffectedSOPInstanceUID or "")
        # -- back-pressure: keep the last free space for what is already spooled.
        if self.watermark.below():
            return self._refuse(request_uid, "out_of_resources", self.watermark.describe())
        try:
            data = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001 - edge of the stage: answer, never crash
            return self._refuse(request_uid, "cannot_understand", f"cannot read encoded dataset: {exc}")
        try:
            header = _read_header(data)
        except _BadInstance as exc:
            return self._refuse(request_uid, exc.status, exc.reason)
        if header.sop_uid != request_uid:
            return self._refuse(request_uid, "dataset_mismatch",
                                f"dataset SOP Instance UID {header.sop_uid} differs from the request's")
        # The context (and routing, and the SOP class we send results under)
        # must agree with the data: an MR-labelled CT is refused, PS3.4 B.2.3.
        request_class = str(event.request.AffectedSOPClassUID or "")
        if header.sop_class != request_class:
            return self._refuse(request_uid, "dataset_mismatch",
                                f"dataset SOP Class UID {header.sop_class} differs from the "
                                f"request's {request_class}")
        # -- resource limit: a decompression bomb never reaches the spool.
        if header.pixel_bytes > self.config.node.max_pixel_bytes:
            return self._refuse(request_uid, "pixels_too_large",
                                f"declared pixel data of {header.pixel_bytes} bytes exceeds "
                                f"node.max_pixel_bytes {self.config.node.max_pixel_bytes}")
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(event.assoc.acceptor.ae_title).strip()
        try:
            path = self.spool.path_for(header.study_uid, header.series_uid, header.sop_uid)
            self.spool.write(path, data)
            self.watermark.note_written(len(data))
            replaced = self.store.record_instance(
                InstanceRecord(sop_uid=header.sop_uid, sop_class=header.sop_class,
                               study_uid=header.study_uid, series_uid=header.series_uid,
                               transfer_syntax=str(event.context.transfer_syntax),
                               path=str(path.relative_to(self.spool.root)), size=len(data)),
                modality=header.modality, calling_ae=calling, called_ae=called,
                expected_count=header.expected_count)
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else f"cannot write: {exc.strerror}"
            return self._refuse(request_uid, "out_of_resources", why)
        except Exception as exc:  # noqa: BLE001 - sqlite errors and the like
            return self._refuse(request_uid, "out_of_resources", f"cannot record: {exc}")
        self.metrics.instances_received.labels(modality=_label(header.modality)).inc()
        self.metrics.bytes_received.labels(modality=_label(header.modality)).inc(len(data))
        if replaced:
            self.metrics.duplicates.inc()
            log.info("replaced instance %s of series %s", header.sop_uid, header.series_uid)
        return STATUS["success"]

    def _refuse(self, sop_uid: str, status: str, reason: str) -> int:
        log.warning("refused instance %s: %s (status 0x%04X)", sop_uid or "<none>", reason, STATUS[status])
        self.metrics.store_failures.labels(status=f"0x{STATUS[status]:04X}").inc()
        return STATUS[status]


class _BadInstance(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _read_header(data: bytes) -> _Header:
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        values = {tag: ds.get(tag) for tag in _HEADER_TAGS}
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError,
            NotImplementedError, OverflowError) as exc:
        raise _BadInstance("cannot_understand", f"unparseable dataset: {exc}") from exc
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        value = values[key]
        if value is None or not is_valid_uid(str(value)):
            raise _BadInstance("invalid_uid", f"missing or invalid {key} {str(value)!r:.80}")
    return _Header(
        sop_class=str(values["SOPClassUID"]), sop_uid=str(values["SOPInstanceUID"]),
        study_uid=str(values["StudyInstanceUID"]), series_uid=str(values["SeriesInstanceUID"]),
        modality=str(values["Modality"] or ""),
        expected_count=_positive_int(values["ImagesInAcquisition"]) or _positive_int(values["NumberOfSlices"]),
        pixel_bytes=declared_pixel_bytes(values),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
    )


def _positive_int(value: object) -> int | None:
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


_MODALITIES = {"CT", "MR", "CR", "DX", "MG", "US", "NM", "PT", "XA", "RF", "OT", "SC", "SR",
               "SEG", "PR", "KO", "DOC", "IO", "PX", "ES", "XC", "OP", "RTIMAGE", "RTSTRUCT",
               "RTPLAN", "RTDOSE", "REG"}


def _label(modality: str) -> str:
    """Bound metric label cardinality: unknown modalities collapse to 'other'."""
    return modality if modality in _MODALITIES else "other"


def _same_host(configured: str, actual: str) -> bool:
    if configured == actual:
        return True
    try:
        return actual in {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except OSError:
        return False




def reconcile_spool(spool: Spool, store: Store) -> int:
    """Index spooled files the store does not know.

    The receiver commits its records without waiting for the WAL fsync (the
    file itself is fsync'd before Success), so after a power cut the spool
    is the truth.  Returns how many files were indexed.
    """
    known = store.instance_paths()
    indexed = 0
    for path in spool.files():
        rel = str(path.relative_to(spool.root))
        if rel in known:
            continue
        try:
            data = path.read_bytes()
            header = _read_header(data)
        except (OSError, _BadInstance) as exc:
            log.warning("spooled file %s is unreadable, left alone: %s", rel, exc)
            continue
        store.record_instance(
            InstanceRecord(sop_uid=header.sop_uid, sop_class=header.sop_class,
                           study_uid=header.study_uid, series_uid=header.series_uid,
                           transfer_syntax=header.transfer_syntax, path=rel, size=len(data)),
            modality=header.modality, calling_ae="", called_ae="", expected_count=header.expected_count)
        indexed += 1
    return indexed
