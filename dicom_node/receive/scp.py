"""The DICOM SCP: C-ECHO and C-STORE of every storage SOP class.

Handlers are thin: they get what they need through their arguments, persist,
and return a status.  Success is answered only after the instance is fsync'd
into the spool and recorded in the store.  Nothing here waits on inference.
"""

from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Config
from dicom_node.limits import DiskWatermark
from dicom_node.net import pynetdicom_compat as compat
from dicom_node.net.listener import SharedListener
from dicom_node.net.pdu import BoundedPduReader, PduLimits, advertised_max_pdu
from dicom_node.net.refusals import RefusalLog
from dicom_node.net.sockets import DUL_IDLE_WAIT_S, tune_socket
from dicom_node.observability.logs import RepeatLog, escape
from dicom_node.observability.metrics import Metrics
from dicom_node.receive.header import BadInstance, Header, InflateBound, read_header
from dicom_node.receive.status import StoreStatus
from dicom_node.security.tls import server_context
from dicom_node.store.db import InstanceRecord, Store
from dicom_node.store.spool import Spool

if TYPE_CHECKING:
    from dicom_node.store.reconcile import ReconcileReport

__all__ = ["Receiver", "supported_transfer_syntaxes", "storage_sop_classes",
           "reconcile_spool"]

log = logging.getLogger("dicom_node.receive")

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
# Transient, DUL service provider (presentation related), local limit exceeded.
_REJECT_LIMIT = (0x02, 0x03, 0x02)
# Rejected-transient, by the presentation-related service provider, temporary
# congestion: the sender may try again later (disk below the watermark).
_REJECT_CONGESTION = (0x02, 0x03, 0x01)
# The same local-limit rejection as a raw A-ASSOCIATE-RJ PDU, for connections
# over node.max_connections, which are refused before pynetdicom sees them.
_RJ_LIMIT_PDU = bytes([0x03, 0, 0, 0, 0, 4, 0, *_REJECT_LIMIT])
# What a refused connection may have sent already, read (and dropped) before
# closing so the close is a FIN after our A-ASSOCIATE-RJ, not a reset.
_DRAIN_BYTES = 256 * 1024

# Deflated datasets already in the spool were bounded at reception; at start
# only memory is bounded (ratio above deflate's ~1032:1 maximum).
_RECONCILE_BOUND = InflateBound(ratio=2048, max_pixel_bytes=1 << 40)


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


class Receiver:
    """Owns the pynetdicom AE and its server thread."""

    def __init__(self, config: Config, store: Store, spool: Spool, metrics: Metrics,
                 *, listener: SharedListener | None = None, warn: bool = True) -> None:
        self.warn = warn
        self.config = config
        self.store = store
        self.spool = spool
        self.metrics = metrics
        # The listening socket shared with the other receiver processes, if any.
        self.listener = listener
        self._server: compat.NodeServer | None = None
        # Associations we admitted (reserved in _on_requested, so two at once
        # cannot both take the last slot) -> calling AE.  Pruned of dead
        # threads when counted, so a missed close event cannot leak a slot.
        self._open: dict[Association, str] = {}
        self._lock = threading.Lock()
        # Established associations -> what they did, for the one log line
        # at release or abort: [calling AE, peer, start, instances, bytes, refused].
        self._tally: dict[Association, list[Any]] = {}
        node = config.node
        self._limits = PduLimits(max_pdu=advertised_max_pdu(node.max_pdu),
                                 network_timeout_s=node.network_timeout_s,
                                 negotiation_timeout_s=node.acse_timeout_s)
        self._inflate_bound = InflateBound(ratio=node.max_inflate_ratio,
                                           max_pixel_bytes=node.max_pixel_bytes)
        self._refusals = RefusalLog(log)
        self._bugs = RepeatLog(log)
        # Back-pressure: free space of the spool's file system against the floor.
        self.watermark = DiskWatermark(spool.root, config.node.min_free_bytes)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = self._limits.max_pdu
        # pynetdicom's own limit counts every acceptor thread, negotiating or
        # not; ours (_refusal, NodeServer.admit) count properly, so its is set
        # where it never decides.
        ae.maximum_associations = node.connection_limit + node.max_associations
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
        if compat.receive_tmp_dir() != self.spool.tmp:
            # Datasets must go to files on the spool's file system; without
            # this pynetdicom would hold each one in memory (or in /tmp).
            raise RuntimeError("pynetdicom_compat.configure_process(receive_tmp_dir=spool.tmp) "
                               "was not called in this process's entry point")
        if node.allow_any_caller and self.warn:
            log.warning("node.allow_any_caller is true: any calling AE may store to %s; "
                        "list peers and set it to false in production", node.ae_title)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = cast(compat.NodeServer, self.ae.make_server(
            (node.host, node.port), evt_handlers=cast(Any, handlers),
            server_class=compat.server_class(shared_listener=self.listener), ssl_context=self._tls_context()))
        server.on_tls_failure = self._on_tls_failure
        server.admit = self._admit
        server.contexts = compat.SharedContexts(server.contexts)
        thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        thread.start()
        compat.register_server(self.ae, server)
        self._server = server
        if self.listener is not None:
            self.listener.mark_listening()
        host, port = server.server_address[:2]
        log.info("listening for DICOM on %s:%d as %s (at most %d connections, %d associations)",
                 host, port, node.ae_title, node.connection_limit, node.max_associations)
        return host, port

    def stop(self) -> None:
        """Stop accepting associations and let the running ones finish."""
        if self._server is not None:
            if self.listener is not None:
                self.listener.mark_listening(False)
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
        host = _host(address)
        # Keyed by OpenSSL's reason name too: an unknown CA and a missing
        # certificate from one host are two things to tell the operator.
        self._refusals.warning(host, f"tls:{reason.split(':')[0][:64]}",
                               "TLS handshake from %s failed, connection closed: %s",
                               ":".join(map(str, address[:2])), escape(reason))
        self.metrics.associations.labels(result="rejected_tls").inc()

    # -- connections: the cap, socket tuning, PDU bounds ------------------------

    def _admit(self, sock: socket.socket, address: Any, open_connections: int) -> bool:
        """NodeServer.verify_request: refuse a connection over the cap before
        any thread is started for it."""
        limit = self.config.node.connection_limit
        if open_connections < limit:
            return True
        host = _host(address)
        self.metrics.associations.labels(result="rejected_connection_limit").inc()
        self._refusals.warning(host, "connection_limit",
                               "connection from %s refused: %d connections open, node.max_connections "
                               "is %d", host, open_connections, limit)
        _refuse_connection(sock)
        return False

    def _on_conn_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        transport = assoc.dul.socket
        if transport is None or transport.socket is None:
            return
        tune_socket(transport.socket, self.config.node.network_timeout_s)
        host = _host(event.address)  # type: ignore[attr-defined]  # EVT_CONN_OPEN carries it
        reader = BoundedPduReader(transport.socket, self._limits,
                                  lambda label, reason: self._on_violation(host, label, reason),
                                  lambda: compat.negotiated(assoc))
        compat.install_pdu_reader(assoc, reader)
        compat.install_wakeup(assoc, DUL_IDLE_WAIT_S)
        compat.install_store_encoding(assoc)

    def _on_violation(self, host: str, label: str, reason: str) -> None:
        self.metrics.associations.labels(result=f"aborted_{label}").inc()
        self._refusals.warning(host, label, "connection from %s aborted: %s", host, reason)

    # -- association policy ---------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        if rq is None:
            raise RuntimeError("EVT_REQUESTED without the A-ASSOCIATE request")
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host = assoc.requestor.address
        reason = self._admit_association(assoc, calling, called, host)
        if reason is None:
            return
        which, rsd = reason
        self._refusals.warning(host, which, "association from %s@%s to %s rejected: %s",
                               escape(calling), host, escape(called), which)
        self.metrics.associations.labels(result=f"rejected_{which}").inc()
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _admit_association(self, assoc: Association, calling: str, called: str,
                           host: str) -> tuple[str, tuple[int, int, int]] | None:
        """None, with a slot reserved for ``assoc``, or why it is refused."""
        reason = self._refusal(calling, called, host)
        if reason is not None:
            return reason
        node = self.config.node
        known = self.config.peer_by_ae(calling)
        # Limits are per receiver process (node.receivers > 1 multiplies them).
        with self._lock:
            for other in [a for a in self._open if not a.is_alive()]:
                del self._open[other]
            if len(self._open) >= node.max_associations:
                return "association_limit", _REJECT_LIMIT
            mine = sum(1 for ae in self._open.values() if ae == calling)
            if known is not None and known.max_associations is not None and mine >= known.max_associations:
                return "peer_association_limit", _REJECT_LIMIT
            self._open[assoc] = calling
            self.metrics.associations_active.set(len(self._open))
        return None

    def _refusal(self, calling: str, called: str, host: str) -> tuple[str, tuple[int, int, int]] | None:
        node = self.config.node
        if node.require_called_ae and called != node.ae_title:
            return "called_ae", _REJECT_CALLED_AE
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
        rq = event.assoc.requestor
        with self._lock:
            self._tally[event.assoc] = [str(rq.ae_title).strip(), f"{rq.address}:{rq.port}",
                                        time.monotonic(), 0, 0, 0]

    def _count(self, assoc: Association, size: int | None) -> None:
        """One instance stored (its size) or refused (None), for the association's line."""
        with self._lock:
            tally = self._tally.get(assoc)
            if tally is not None:
                if size is None:
                    tally[5] += 1
                else:
                    tally[3] += 1
                    tally[4] += size

    def _on_closed(self, event: evt.Event) -> None:
        # Released, aborted, or the connection closed (also mid-dataset).
        compat.discard_partial_dataset(event.assoc)
        with self._lock:
            if self._open.pop(event.assoc, None) is not None:
                self.metrics.associations_active.set(len(self._open))
            tally = self._tally.pop(event.assoc, None)
        if tally is not None:
            # One line per association: who, from where, what, how long.
            calling, peer, started, instances, size, refused = tally
            how = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted"}.get(
                getattr(event.event, "name", ""), "closed")
            duration = time.monotonic() - started
            level = logging.WARNING if how != "released" or refused else logging.INFO
            log.log(level, "association from %s@%s %s after %.1f s: %d instances, %s, %d refused",
                    escape(calling), escape(peer), how, duration, instances, _size(size), refused,
                    extra={"calling_ae": escape(calling), "peer": escape(peer), "end": how,
                           "instances": instances, "bytes": size, "refused": refused,
                           "duration_s": round(duration, 3)})

    # -- DIMSE ----------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return StoreStatus.SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """Persist the instance exactly as sent and answer only when durable."""
        request_uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")
        try:
            status = self._store(event, request_uid)
            if status != StoreStatus.SUCCESS:
                self._count(event.assoc, None)
            return status
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answer 0x0110, never A7xx or crash
            self._bugs.report(f"C-STORE of {escape(request_uid)} failed on an unexpected error: "
                              f"{type(exc).__name__}: {escape(exc)}",
                              key=f"{type(exc).__name__} at {_where(exc)}", exc_info=True)
            self.metrics.store_failures.labels(status=StoreStatus.PROCESSING_FAILURE.label).inc()
            self._count(event.assoc, None)
            return StoreStatus.PROCESSING_FAILURE

    def _store(self, event: evt.Event, request_uid: str) -> int:
        # -- back-pressure: keep the last free space for what is already spooled.
        if self.watermark.below():
            return self._refuse(request_uid, StoreStatus.OUT_OF_RESOURCES, self.watermark.describe())
        # pynetdicom wrote the dataset to a file in the spool's .tmp as it
        # arrived (configure_process); it removes that name after we return.
        received: Path | None = event.dataset_path
        if received is None:
            return self._refuse(request_uid, StoreStatus.CANNOT_UNDERSTAND, "C-STORE request without a dataset")
        failed = compat.received_write_error(received)
        if failed is not None:
            received.unlink(missing_ok=True)
            why = "disk full" if failed.errno == errno.ENOSPC else f"cannot write: {failed.strerror}"
            return self._refuse(request_uid, StoreStatus.OUT_OF_RESOURCES, f"{why} while receiving")
        try:
            header = read_header(received, self._inflate_bound)
        except BadInstance as exc:
            return self._refuse(request_uid, exc.status, exc.reason)
        problem = self._mismatch(header, request_uid, str(event.request.AffectedSOPClassUID or ""))
        if problem is not None:
            return self._refuse(request_uid, *problem)
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(event.assoc.acceptor.ae_title).strip()
        path = self.spool.path_for(header.study_uid, header.series_uid, header.sop_uid)
        rel = str(path.relative_to(self.spool.root))
        try:
            previous = self.store.instance(header.sop_uid)
            size = received.stat().st_size
            self.spool.adopt(received, path)
            self.watermark.note_written(size)
            replaced = self.store.record_instance(
                InstanceRecord(sop_uid=header.sop_uid, sop_class=header.sop_class,
                               study_uid=header.study_uid, series_uid=header.series_uid,
                               transfer_syntax=str(event.context.transfer_syntax),
                               path=rel, size=size),
                modality=header.modality, calling_ae=calling, called_ae=called,
                expected_count=header.expected_count)
            if previous is not None:
                # Same instance in another series: the record now points at
                # the new copy, so the old file goes (reconciliation would
                # also recognise it as older after a crash here).
                self.spool.remove_superseded(previous.path, rel)
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else f"cannot write: {exc.strerror}"
            return self._refuse(request_uid, StoreStatus.OUT_OF_RESOURCES, why)
        except sqlite3.OperationalError as exc:
            # Locked, busy, disk I/O: transient, the sender may retry.
            return self._refuse(request_uid, StoreStatus.OUT_OF_RESOURCES, f"cannot record: {exc}")
        self.metrics.instances_received.labels(modality=_label(header.modality)).inc()
        self.metrics.bytes_received.labels(modality=_label(header.modality)).inc(size)
        self._count(event.assoc, size)
        if replaced:
            self.metrics.duplicates.inc()
            log.info("replaced instance %s of series %s", header.sop_uid, header.series_uid)
        return StoreStatus.SUCCESS

    def _mismatch(self, header: Header, request_uid: str,
                  request_class: str) -> tuple[StoreStatus, str] | None:
        if header.sop_uid != request_uid:
            return (StoreStatus.DATASET_MISMATCH,
                    f"dataset SOP Instance UID {header.sop_uid} differs from the request's")
        # The context (and routing, and the SOP class we send results under)
        # must agree with the data: an MR-labelled CT is refused, PS3.4 B.2.3.
        if header.sop_class != request_class:
            return StoreStatus.DATASET_MISMATCH, (f"dataset SOP Class UID {header.sop_class} differs "
                                                  f"from the request's {escape(request_class)}")
        # -- resource limit: a decompression bomb never reaches the spool.
        limit = self.config.node.max_pixel_bytes
        if header.pixel_bytes > limit:
            return StoreStatus.PIXELS_TOO_LARGE, (f"declared pixel data of {header.pixel_bytes} bytes "
                                                  f"exceeds node.max_pixel_bytes {limit}")
        return None

    def _refuse(self, sop_uid: str, status: StoreStatus, reason: str) -> int:
        log.warning("refused instance %s: %s (status 0x%04X)", escape(sop_uid) or "<none>",
                    escape(reason, 400), status)
        self.metrics.store_failures.labels(status=status.label).inc()
        return status


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _host(address: Any) -> str:
    return str(address[0]) if isinstance(address, (tuple, list)) and address else str(address)


def _where(exc: BaseException) -> str:
    """file:line where an exception was raised, to key 'log its traceback once'."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def _refuse_connection(sock: socket.socket) -> None:
    """Answer a connection over the cap with A-ASSOCIATE-RJ (transient, local
    limit exceeded) and let the server close it.  Never blocks: this runs in
    the one accepting thread.  TLS connections are closed without it (no
    handshake was made to send it in)."""
    if isinstance(sock, ssl.SSLSocket):
        return
    try:
        sock.setblocking(False)
        sock.send(_RJ_LIMIT_PDU)
        drained = 0
        while drained < _DRAIN_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass  # BlockingIOError included: nothing more to read now


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




def reconcile_spool(spool: Spool, store: Store) -> ReconcileReport:
    """Index spooled files the store does not know, and remove superseded
    copies of instances received again elsewhere (store/reconcile.py).
    Returns a ReconcileReport, false when there was nothing to do."""
    from dicom_node.store.reconcile import IndexEntry, reconcile

    def read(path: Path, rel: str) -> IndexEntry:
        # From the file, header only (deflated ones inflated in bounded steps).
        header = read_header(path, _RECONCILE_BOUND)
        return IndexEntry(
            InstanceRecord(sop_uid=header.sop_uid, sop_class=header.sop_class,
                           study_uid=header.study_uid, series_uid=header.series_uid,
                           transfer_syntax=header.transfer_syntax, path=rel,
                           size=path.stat().st_size),
            header.modality, header.expected_count)

    return reconcile(spool, store, read, unreadable=(OSError, BadInstance))
