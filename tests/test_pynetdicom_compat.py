"""Each patch of pynetdicom internals in dicom_node/net/pynetdicom_compat.py,
and the import-time guard that fails loudly when pynetdicom changes under it.
In-process and fast; the same patches run against real peers in
test_hostile_peers.py, test_receive.py and test_tls.py."""

from __future__ import annotations

import copy
import socket
import struct
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import AE, _config, dimse_messages, dul, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.presentation import build_context

from dicom_node.net import listener as listener_module
from dicom_node.net import pynetdicom_compat as compat
from dicom_node.net.pdu import HARD_MAX_PDU, BoundedPduReader, PduLimits, advertised_max_pdu


# -- the guard -----------------------------------------------------------------------

def test_check_passes_on_the_installed_pynetdicom():
    compat.check()
    low, high = compat.SUPPORTED
    assert low <= tuple(int(p) for p in pynetdicom.__version__.split(".")[:2]) < high


def test_check_fails_loudly_on_an_unsupported_version(monkeypatch):
    monkeypatch.setattr(pynetdicom, "__version__", "4.0.0")
    with pytest.raises(compat.CompatError, match="'version'"):
        compat.check()


def test_check_names_the_patch_whose_attribute_went_away(monkeypatch):
    def renamed_init(self, assoc):  # a release that renamed _run_loop_delay
        self.loop_delay = 0.001

    monkeypatch.setattr(dul.DULServiceProvider, "__init__", renamed_init)
    with pytest.raises(compat.CompatError, match="install_wakeup"):
        compat.check()


def test_check_notices_a_dul_that_no_longer_polls_the_socket(monkeypatch):
    def reads_blocking(self):  # a release whose DUL blocks on the socket itself
        return self.socket.recv_blocking()

    monkeypatch.setattr(dul.DULServiceProvider, "_is_transport_event", reads_blocking)
    with pytest.raises(compat.CompatError, match="install_wakeup"):
        compat.check()


def test_check_notices_a_changed_pdu_read(monkeypatch):
    def reads_differently(self):
        self.socket.recv_pdu()

    monkeypatch.setattr(dul.DULServiceProvider, "_read_pdu_data", reads_differently)
    with pytest.raises(compat.CompatError, match="install_pdu_reader"):
        compat.check()


def test_check_notices_a_renamed_idle_timer(monkeypatch):
    def renamed_timer(self, assoc):  # _run_loop_delay kept, the idle timer renamed
        self._run_loop_delay = 0.001
        self.network_timer = None

    monkeypatch.setattr(dul.DULServiceProvider, "__init__", renamed_timer)
    with pytest.raises(compat.CompatError, match="install_pdu_reader"):
        compat.check()


def test_check_notices_an_association_accept_that_no_longer_reaches_sta6(monkeypatch):
    from pynetdicom import fsm

    def accept_elsewhere(dul):
        return "Sta6b"

    monkeypatch.setattr(fsm, "AE_7", accept_elsewhere)
    with pytest.raises(compat.CompatError, match="negotiated"):
        compat.check()


# -- the patches ------------------------------------------------------------------------

def test_shared_contexts_copy_shallowly():
    cx = build_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    [copied] = copy.deepcopy(compat.SharedContexts([cx]))
    assert copied is not cx  # negotiation may set fields on its own copy...
    assert copied._transfer_syntax is cx._transfer_syntax  # ...but the syntax list is shared


def test_install_wakeup_wakes_the_dul_on_data_and_on_our_hand_offs():
    assoc = Association(AE(), "requestor")
    ours, theirs = socket.socketpair()
    try:
        from pynetdicom.transport import AssociationSocket

        assoc.dul.socket = AssociationSocket(assoc, client_socket=ours)
        assoc.dul.socket._is_connected = True
        compat.install_wakeup(assoc, 2.0)
        assert assoc.dul._run_loop_delay == 0.0
        start = time.monotonic()
        assert not assoc.dul.socket.ready  # nothing: waits the whole idle wait
        assert time.monotonic() - start >= 1.9
        threading.Timer(0.1, lambda: theirs.sendall(b"x")).start()
        start = time.monotonic()
        assert assoc.dul.socket.ready  # the peer's data ends the wait at once
        assert time.monotonic() - start < 1.0
        ours.recv(1)
        threading.Timer(0.1, lambda: assoc.dul.to_provider_queue.put("primitive")).start()
        start = time.monotonic()
        assert not assoc.dul.socket.ready  # our hand-off ends it too
        assert time.monotonic() - start < 1.0
        assert assoc.dul.to_provider_queue.get(False) == "primitive"
        threading.Timer(0.1, assoc.dul.kill_dul).start()
        start = time.monotonic()
        assert not assoc.dul.socket.ready
        assert time.monotonic() - start < 1.0 and assoc.dul._kill_thread
    finally:
        ours.close()
        theirs.close()


@contextmanager
def _reading_association() -> Iterator[tuple[Association, socket.socket]]:
    """A requestor association whose transport reads through our PDU reader
    from one end of a socket pair; the other end is the peer."""
    from pynetdicom.transport import AssociationSocket

    assoc = Association(AE(), "requestor")
    ours, theirs = socket.socketpair()
    try:
        assoc.dul.socket = AssociationSocket(assoc, client_socket=ours)
        reader = BoundedPduReader(ours, PduLimits(max_pdu=16384, network_timeout_s=2),
                                  lambda *_: None, lambda: True)
        compat.install_pdu_reader(assoc, reader)
        yield assoc, theirs
    finally:
        ours.close()
        theirs.close()


def test_install_pdu_reader_replaces_the_transports_recv():
    with _reading_association() as (assoc, peer):
        peer.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
        assert assoc.dul.socket.recv(6)[:1] == b"\x05"
        assert assoc.dul.socket.recv(4) == bytes(4)


def test_reading_a_pdu_holds_the_idle_timer_until_the_dul_restarts_it():
    """A stalled PDU is timed by our reader from its first byte; pynetdicom's
    idle timer, started at the previous PDU, must not expire under it."""
    with _reading_association() as (assoc, peer):
        idle = assoc.dul._idle_timer
        idle.timeout = 0.05
        idle.start()
        peer.sendall(struct.pack(">BBL", 0x05, 0, 4))
        time.sleep(0.1)
        assert idle.expired  # unheld, it would abort the association now
        assoc.dul.socket.recv(6)
        time.sleep(0.1)
        assert not idle.expired  # held while the PDU's body is awaited
        idle.restart()  # what the DUL does once the PDU is in
        time.sleep(0.1)
        assert idle.expired


@contextmanager
def _servers_on_one_listener(count: int) -> Iterator[tuple[int, list]]:
    """``count`` echo servers (as in receiver processes) on one shared listener."""
    assert compat.server_class() is compat.NodeServer and compat.NodeServer.shared_listener is None
    listener = listener_module.open_shared_listener("127.0.0.1", 0, count)
    port = listener.sock.getsockname()[1]
    servers = []
    try:
        for index in range(count):
            ae = AE()
            ae.add_supported_context("1.2.840.10008.1.1")
            server = ae.make_server(("127.0.0.1", port),
                                    server_class=compat.server_class(shared_listener=listener.for_process(index)))
            assert server.socket is listener.sock and server.server_address[1] == port
            threading.Thread(target=server.serve_forever, daemon=True).start()
            compat.register_server(ae, server)
            servers.append(server)
        yield port, servers
    finally:
        for server in servers:
            server.shutdown()
        listener.sock.close()


def _echo_association(port: int):
    scu = AE()
    scu.add_requested_context("1.2.840.10008.1.1")
    assoc = scu.associate("127.0.0.1", port)
    assert assoc.is_established
    return assoc


def test_two_servers_share_one_listener_and_each_accepts_from_it():
    """The one that loses an accept race waits for the next connection
    instead of blocking or failing."""
    with _servers_on_one_listener(2) as (port, servers):
        served = set()
        for server in servers:
            server.bind(evt.EVT_C_ECHO, lambda event, s=server: served.add(id(s)) or 0x0000)
        for _ in range(20):
            assoc = _echo_association(port)
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        assert len(served) >= 1


def test_associations_held_open_at_once_land_on_two_servers():
    with _servers_on_one_listener(2) as (port, servers):
        split = 0
        for _ in range(10):
            first = _echo_association(port)
            second = _echo_association(port)
            loads = sorted(server.open_connections() for server in servers)
            split += loads == [1, 1]
            first.release()
            second.release()
            wait_until = time.monotonic() + 5
            while any(server.open_connections() for server in servers) and time.monotonic() < wait_until:
                time.sleep(0.01)
        assert split >= 9, f"{split} of 10 pairs split across the two servers"


def test_a_loaded_server_leaves_a_waiting_connection_to_an_idle_one_for_a_bounded_time():
    listener = listener_module.open_shared_listener("127.0.0.1", 0, 2)
    ae = AE()
    ae.add_supported_context("1.2.840.10008.1.1")
    port = listener.sock.getsockname()[1]
    server = ae.make_server(("127.0.0.1", port),
                            server_class=compat.server_class(shared_listener=listener.for_process(0)))
    client = socket.create_connection(("127.0.0.1", port))
    try:
        server._pending.add(1)  # one connection open here; process 1 posted none
        start = time.monotonic()
        deferred = 0
        while True:
            try:
                accepted, _ = server.get_request()
                break
            except BlockingIOError:
                deferred += 1
        took = time.monotonic() - start
        accepted.close()
        assert deferred >= 5 and listener_module.MAX_DEFER_S <= took < 0.5, (deferred, took)
        assert listener.loads[0] == 1
    finally:
        client.close()
        server.server_close()


def test_the_load_board_compares_with_the_other_processes_only():
    listener = listener_module.open_shared_listener("127.0.0.1", 0, 3)
    try:
        first, second = listener.for_process(0), listener.for_process(1)
        first.post(2)
        second.post(2)
        assert first.lighter_elsewhere(2)  # process 2 has posted nothing yet: 0
        listener.for_process(2).post(3)
        assert not first.lighter_elsewhere(2)  # its own post is not compared
        assert second.lighter_elsewhere(3) and not second.lighter_elsewhere(2)
        with pytest.raises(ValueError, match="receiver index 3"):
            listener.for_process(3)
    finally:
        listener.sock.close()


def test_a_deferral_lasts_a_bounded_time_per_waiting_connection():
    deferral = listener_module.Deferral()
    start = time.monotonic()
    while deferral.may_defer():
        time.sleep(listener_module.DEFER_NAP_S)
        assert time.monotonic() - start < 1
    assert time.monotonic() - start >= listener_module.MAX_DEFER_S
    time.sleep(10 * listener_module.DEFER_NAP_S)  # a later connection: deferred afresh
    assert deferral.may_defer()


def test_register_server_lets_pynetdicom_shut_it_down():
    ae = AE()
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.make_server(("127.0.0.1", 0), server_class=compat.server_class())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    compat.register_server(ae, server)
    assert server in ae._servers
    server.shutdown()  # removes itself from ae._servers (raises if it was not there)
    thread.join(5)
    assert server not in ae._servers


def test_configure_process_puts_received_datasets_in_the_given_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", _config.STORE_SEND_CHUNKED_DATASET)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", _config.LOG_HANDLER_LEVEL)
    monkeypatch.setattr(compat, "_receive_tmp_dir", None)
    compat.configure_process(send_chunked=True, receive_tmp_dir=tmp_path / ".tmp")
    assert _config.STORE_SEND_CHUNKED_DATASET and _config.STORE_RECV_CHUNKED_DATASET
    assert compat.receive_tmp_dir() == tmp_path / ".tmp"
    # Called as pynetdicom's decode_msg calls it.
    handle = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    handle.write(b"x")
    handle.close()
    made = Path(handle.name)
    assert made.parent == tmp_path / ".tmp" and made.suffix == ".part"  # cleaned at start


def test_discard_partial_dataset_removes_the_file(tmp_path):
    part = tmp_path / "recv-1.part"
    handle = part.open("wb")
    message = types.SimpleNamespace(_data_set_file=handle)
    assoc = types.SimpleNamespace(dimse=types.SimpleNamespace(message=message))
    compat.discard_partial_dataset(assoc)  # type: ignore[arg-type]
    assert not part.exists() and handle.closed
    compat.discard_partial_dataset(types.SimpleNamespace(dimse=types.SimpleNamespace(message=None)))  # type: ignore[arg-type]


# -- the PDU reader on its own -------------------------------------------------------------

def _reader_pair(max_pdu: int = 16384, timeout: float = 2.0):
    ours, theirs = socket.socketpair()
    violations: list[tuple[str, str]] = []
    reader = BoundedPduReader(ours, PduLimits(max_pdu=max_pdu, network_timeout_s=timeout,
                                              negotiation_timeout_s=timeout),
                              lambda label, reason: violations.append((label, reason)),
                              lambda: True)
    return reader, ours, theirs, violations


def test_reader_refuses_a_length_over_the_bound_before_reading_it():
    reader, ours, theirs, violations = _reader_pair()
    try:
        theirs.sendall(b"\x04\x00\xff\xff\xff\xff")
        assert reader.recv(6) == b""  # short: pynetdicom sees the connection closed
        assert violations == [("pdu_too_large", "PDU type 0x04 declares 4294967295 bytes, "
                                                "over our maximum of 16400")]
        theirs.settimeout(2)
        assert theirs.recv(10)[:1] == b"\x07"  # A-ABORT
        assert reader.recv(6) == b""
    finally:
        ours.close()
        theirs.close()


def test_reader_aborts_a_pdu_that_stalls_past_the_timeout():
    reader, ours, theirs, violations = _reader_pair(timeout=0.3)
    try:
        theirs.sendall(struct.pack(">BBL", 0x04, 0, 100) + bytes(10))
        assert len(reader.recv(6)) == 6
        assert reader.recv(100) == b""
        assert violations[0][0] == "stalled_pdu" and "10 of 100 bytes" in violations[0][1]
    finally:
        ours.close()
        theirs.close()


def test_reader_reads_a_whole_pdu_in_one_buffer():
    reader, ours, theirs, violations = _reader_pair()
    try:
        body = bytes(range(256)) * 40
        theirs.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
        assert reader.recv(6) == struct.pack(">BBL", 0x04, 0, len(body))
        assert reader.recv(len(body)) == body
        assert not violations
    finally:
        ours.close()
        theirs.close()


def test_max_pdu_zero_means_the_hard_cap():
    assert advertised_max_pdu(0) == HARD_MAX_PDU
    assert advertised_max_pdu(1 << 40) == HARD_MAX_PDU
    assert advertised_max_pdu(16384) == 16384


def test_short_read_after_our_abort_is_not_logged_again(tmp_path, monkeypatch, caplog):
    import logging

    from dicom_node.net import pdu

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", _config.STORE_SEND_CHUNKED_DATASET)
    compat.configure_process(send_chunked=False)
    dul_log = logging.getLogger(dul.__name__)
    seen: list[str] = []

    def in_a_dul_thread(aborted: bool) -> None:
        if aborted:
            pdu._thread.aborted = True
        record = dul_log.makeRecord(dul_log.name, logging.ERROR, __file__, 1,
                                    "The received PDU is shorter than expected (6 of 1006 bytes received)",
                                    (), None)
        if all(f.filter(record) for f in dul_log.filters):
            seen.append("logged")

    for aborted in (True, False):
        thread = threading.Thread(target=in_a_dul_thread, args=(aborted,))
        thread.start()
        thread.join(5)
    assert seen == ["logged"]  # only where the abort was not ours


def test_negotiated_as_soon_as_the_dul_has_sent_the_accept():
    """A peer answering our A-ASSOCIATE-AC at once is read before the
    association's thread sets is_established; its first P-DATA must be timed
    by the network timeout, not as negotiation."""
    assoc = Association(AE(), "acceptor")
    assoc.dul.state_machine.transition("Sta3")  # request received, answer not sent
    assert not compat.negotiated(assoc)
    assoc.dul.state_machine.transition("Sta6")  # AC sent by the DUL (AE-7)
    assert not assoc.is_established and compat.negotiated(assoc)


def test_the_reactor_takes_requests_but_leaves_responses_to_the_waiting_sender():
    """pynetdicom's reactor could take a C-STORE response meant for the
    send_c_store waiting on it (a race around its pause checkpoint), which
    then waited for the DIMSE timeout; with the guard, its non-blocking
    get_msg takes only requests."""
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    assoc = Association(AE(), "requestor")
    compat.install_response_guard(assoc)
    response = C_STORE()
    response.MessageIDBeingRespondedTo, response.Status = 1, 0x0000
    request = C_ECHO()
    request.MessageID, request.AffectedSOPClassUID = 2, "1.2.840.10008.1.1"
    assert response.is_valid_response and request.is_valid_request
    assoc.dimse.msg_queue.put((1, response))
    assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's poll
    assert assoc.dimse.get_msg(block=True) == (1, response)  # the waiting sender
    assoc.dimse.msg_queue.put((3, request))
    assert assoc.dimse.get_msg(block=False) == (3, request)
    assert assoc.dimse.get_msg(block=False) == (None, None)


def test_sending_without_pause_reads_the_reactor_as_paused_only_within_the_block():
    """Inside the block a send does not wait for the reactor to pause (it
    reads as paused); what the reactor sets is kept for after, when the
    association waits for the pause as before (A-RELEASE).  An association
    without the response guard is refused: the pause is what keeps an
    unguarded reactor off the responses."""
    assoc = Association(AE(), "requestor")
    with pytest.raises(RuntimeError, match="install_response_guard"):
        with compat.sending_without_pause(assoc):
            pass
    compat.install_response_guard(assoc)
    assoc._is_paused = False
    with compat.sending_without_pause(assoc):
        assert assoc._is_paused is True
        assoc._is_paused = False  # the reactor resuming
        assert assoc._is_paused is True
        assoc._is_paused = True
        assoc._is_paused = False
    assert type(assoc) is Association and assoc._is_paused is False
    with pytest.raises(ValueError):
        with compat.sending_without_pause(assoc):
            raise ValueError("a send failed")
    assert type(assoc) is Association


def test_check_notices_a_send_that_no_longer_waits_on_is_paused(monkeypatch):
    def sends(self, dataset, msg_id=1, priority=2, originator_aet=None, originator_id=None):
        self._reactor_checkpoint.clear()  # pauses, but waits on an event instead
        self._reactor_paused.wait()
        return self.dimse.send_msg(dataset, 1)

    monkeypatch.setattr(Association, "send_c_store", sends)
    with pytest.raises(compat.CompatError, match="sending_without_pause"):
        compat.check()


def test_check_notices_a_reactor_that_no_longer_polls_dimse_messages(monkeypatch):
    def waits_instead(self):
        self.dimse.get_msg(block=True)

    monkeypatch.setattr(Association, "_run_reactor", waits_instead)
    with pytest.raises(compat.CompatError, match="install_response_guard"):
        compat.check()


# -- the association reactor's nap ---------------------------------------------------

def _nap_in_thread(seconds: float, wake: threading.Event | None) -> float:
    """How long pynetdicom.association's time.sleep(seconds) lasted in a
    thread that carries ``wake`` as an association's reactor does."""
    from pynetdicom import association as association_module

    took: list[float] = []

    def nap() -> None:
        start = time.monotonic()
        association_module.time.sleep(seconds)
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=nap)
    if wake is not None:
        thread._dicom_node_wake = wake  # type: ignore[attr-defined]
    thread.start()
    thread.join(10)
    return took[0]


def test_a_reactor_leaves_its_nap_when_woken_and_naps_in_full_otherwise():
    assert _nap_in_thread(0.2, None) >= 0.19  # an unregistered thread naps as before
    wake = threading.Event()
    assert _nap_in_thread(0.2, wake) >= 0.19  # not woken: the whole nap
    threading.Timer(0.05, wake.set).start()
    assert _nap_in_thread(5.0, wake) < 2.0
    assert not wake.is_set()  # cleared for the next hand-off


def test_install_wakeup_wakes_the_reactor_on_messages_user_pdus_and_pause_requests():
    from pynetdicom.transport import AssociationSocket

    assoc = Association(AE(), "requestor")
    ours, theirs = socket.socketpair()
    try:
        assoc.dul.socket = AssociationSocket(assoc, client_socket=ours)
        compat.install_wakeup(assoc, 2.0)
        wake = assoc._dicom_node_wake
        for hand_off in (lambda: assoc.dimse.msg_queue.put((1, "message")),
                         lambda: assoc.dul.to_user_queue.put("A-RELEASE"),
                         assoc._reactor_checkpoint.clear):
            wake.clear()
            hand_off()
            assert wake.is_set()
        assert assoc.dimse.msg_queue.get(False) == (1, "message")
        assert assoc.dul.to_user_queue.get(False) == "A-RELEASE"
        assert not assoc._reactor_checkpoint.is_set()
    finally:
        ours.close()
        theirs.close()


def test_check_notices_a_reactor_that_no_longer_naps_with_time_sleep(monkeypatch):
    source = compat._source

    def without_nap(obj):
        text = source(obj)
        return text.replace("time.sleep(0.001)", "self._wait()") if obj is Association._run_reactor else text

    monkeypatch.setattr(compat, "_source", without_nap)
    with pytest.raises(compat.CompatError, match="install_wakeup \\(reactor\\)"):
        compat.check()


# -- writeback of received files -----------------------------------------------------

def test_a_received_file_starts_its_writeback_as_it_arrives_and_at_its_end(tmp_path, monkeypatch):
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(compat, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    received = compat._ReceiveFile(tmp_path)
    parts = [bytes([k]) * 100_000 for k in range(3)]
    for part in parts:
        received.write(part)
    assert started == [(0, 200_000)]  # once 128 kB had come
    received.close()
    assert started == [(0, 200_000), (200_000, 100_000)]  # and the rest at the end
    assert Path(received.name).read_bytes() == b"".join(parts)


def test_writeback_is_available_on_linux_and_harmless_on_a_real_file(tmp_path):
    import sys

    from dicom_node.store import writeback

    if sys.platform.startswith("linux"):
        assert writeback.available()
    path = tmp_path / "f"
    with path.open("wb") as fh:
        fh.write(b"x" * 300_000)
        fh.flush()
        writeback.start_writeback(fh.fileno(), 0, 0)
    assert path.stat().st_size == 300_000


# -- C-STORE messages encoded directly ----------------------------------------------

def _store_rsp(status: int = 0x0000, message_id: int = 7, sop_class: str | None = "1.2.840.10008.5.1.4.1.1.2",
               sop_instance: str | None = "1.2.3.4.5.6.7.8.9") -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = status
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    return rsp


def _store_rq(message_id: int = 3, priority: int | None = 2, sop_class: str | None = "1.2.840.10008.5.1.4.1.1.4",
              sop_instance: str | None = "1.2.3.4.5.6.7.8.9.10", data: bytes = b"\x08\x00" * 40) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = message_id
    if priority is not None:  # else the primitive's default
        rq.Priority = priority
    if sop_class is not None:
        rq.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rq.AffectedSOPInstanceUID = sop_instance
    rq.DataSet = BytesIO(data)
    return rq


def _pynetdicom_pdvs(primitive: C_STORE, context_id: int, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    message = (dimse_messages.C_STORE_RSP() if primitive.MessageIDBeingRespondedTo is not None
               else dimse_messages.C_STORE_RQ())
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(context_id, max_pdu)]


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xA900, 0xC000, 0x0110, 0xFFFF])
@pytest.mark.parametrize(("sop_class", "sop_instance"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6.7.8.9"),  # odd and even lengths
    ("1.2.840.10008.5.1.4.1.1.12.1", "2.25.123456789012345678901234567890123456"),
    (None, "1.2.3"), ("1.2.3", None), (None, None), ("", ""),
])
@pytest.mark.parametrize("message_id", [0, 1, 65535])
def test_a_store_response_is_encoded_as_pynetdicom_encodes_it(status, sop_class, sop_instance, message_id):
    rsp = _store_rsp(status, message_id, sop_class, sop_instance)
    command = compat.encode_store_response(rsp)
    assert command is not None
    assert [[(3, b"\x03" + command)]] == _pynetdicom_pdvs(rsp, 3, 16384)


@pytest.mark.parametrize("max_pdu", [0, 256, 4096, 16384])
@pytest.mark.parametrize("size", [2, 80, 249, 250, 251, 500, 9000])
@pytest.mark.parametrize(("message_id", "priority", "sop_class", "sop_instance"), [
    (1, 2, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5.6.7.8.9.10"), (65535, 0, "1.2.3", "1.2.34"),
    (7, None, None, "1.2.3"), (0, 1, "1.2.3", None),
])
def test_a_store_request_is_sent_as_pynetdicom_sends_it(max_pdu, size, message_id, priority, sop_class,
                                                         sop_instance, tmp_path):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    from_memory = _store_rq(message_id, priority, sop_class, sop_instance, data)
    expected = _pynetdicom_pdvs(from_memory, 5, max_pdu)
    fragments = compat._store_fragments(from_memory, max_pdu)
    assert fragments is not None and [[(5, f)] for f in fragments] == expected
    # The same data set from a file after a file meta, as send_c_store gives it.
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"M" * 300 + data)
    from_file = _store_rq(message_id, priority, sop_class, sop_instance)
    from_file.DataSet = None
    from_file._dataset_path = (path, 300)
    assert _pynetdicom_pdvs(from_file, 5, max_pdu) == expected
    fragments = compat._store_fragments(from_file, max_pdu)
    assert fragments is not None and [[(5, f)] for f in fragments] == expected


def test_store_messages_this_does_not_encode_are_left_to_pynetdicom():
    rsp = _store_rsp(0xC000)
    rsp.ErrorComment = "cannot understand"
    assert compat.encode_store_response(rsp) is None
    rsp = _store_rsp(0xA900)
    rsp.OffendingElement = [0x00100010]
    assert compat.encode_store_response(rsp) is None
    moved = _store_rq()
    moved.MoveOriginatorApplicationEntityTitle = "MOVER"
    moved.MoveOriginatorMessageID = 3
    assert compat.encode_store_request(moved) is None and compat._store_fragments(moved, 16384) is None
    empty = _store_rq(data=b"")
    assert compat._store_fragments(empty, 16384) is None


class _Dimse:
    def __init__(self, max_pdu: int) -> None:
        self.maximum_pdu_size = max_pdu
        self.sent: list[object] = []
        self.by_pynetdicom: list[object] = []
        self.dul = types.SimpleNamespace(send_pdu=self.sent.append)

    def send_msg(self, primitive: object, context_id: int) -> None:
        self.by_pynetdicom.append(primitive)


def _installed(max_pdu: int = 16384, handlers: list | None = None) -> _Dimse:
    dimse = _Dimse(max_pdu)
    assoc = types.SimpleNamespace(dimse=dimse, get_handlers=lambda event: list(handlers or []))
    compat.install_store_encoding(assoc)  # type: ignore[arg-type]
    return dimse


@pytest.mark.parametrize("primitive", [_store_rsp(), _store_rq(data=b"\x10\x00" * 3000)])
def test_install_store_encoding_sends_the_pdvs_pynetdicom_would(primitive):
    dimse = _installed(max_pdu=4096)
    dimse.send_msg(primitive, 5)
    assert not dimse.by_pynetdicom
    assert [p.presentation_data_value_list for p in dimse.sent] == _pynetdicom_pdvs(primitive, 5, 4096)


def test_install_store_encoding_leaves_the_rest_to_pynetdicom():
    commented = _store_rsp(0xC000)
    commented.ErrorComment = "no"
    echo = C_ECHO()
    echo.MessageID = 1
    for dimse, primitive in [(_installed(), echo), (_installed(), commented),
                             (_installed(max_pdu=64), _store_rsp()),  # would need two PDVs
                             (_installed(handlers=[(print, None)]), _store_rsp())]:
        dimse.send_msg(primitive, 1)
        assert dimse.by_pynetdicom == [primitive] and not dimse.sent


def test_check_notices_a_changed_send_msg(monkeypatch):
    def send_msg(self, primitive, context_id):  # a release that encodes elsewhere
        self.dul.send_pdu(primitive.encode())

    monkeypatch.setattr(pynetdicom.dimse.DIMSEServiceProvider, "send_msg", send_msg)
    with pytest.raises(compat.CompatError, match="install_store_encoding"):
        compat.check()


def test_configure_process_drops_the_debug_log_handlers_the_node_never_shows(monkeypatch):
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", _config.STORE_SEND_CHUNKED_DATASET)
    compat.configure_process(send_chunked=False)
    assert _config.LOG_HANDLER_LEVEL == "none"
    assert Association(AE(), "requestor").get_handlers(evt.EVT_DIMSE_RECV) == []
