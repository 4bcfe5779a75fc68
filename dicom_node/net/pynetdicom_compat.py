"""Every use of pynetdicom's private internals, in one guarded place.

Each patch below names what it relies on, and ``check()`` (run at import)
verifies that those attributes still exist with the expected shape.  A
pynetdicom release that renames or restructures them makes this import fail
loudly, naming the patch, instead of silently doing nothing (a renamed
``_run_loop_delay`` would just be a new attribute) or corrupting behaviour.
pyproject.toml pins pynetdicom to the versions tests/test_pynetdicom_compat.py
covers (and tests/test_hostile_peers.py runs against real peers).

Upstreamable: ``SharedContexts`` (a supported-contexts copy that does not
deep-copy), ``NodeServer.get_request`` (TLS handshake off the accept thread)
and the bounded reader (a length check in ``DULServiceProvider._read_pdu_data``
plus a ``recv_into`` based ``AssociationSocket.recv``) would each be a small
pull request to pynetdicom, and so would the C-STORE command sets encoded
without a pydicom Dataset (``install_store_encoding``); until then they live
here.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, Any, TypeGuard

import pynetdicom
from pynetdicom import _config, acse, dimse_messages, dimse_primitives, dul, evt, fsm, service_class, transport
from pynetdicom.ae import ApplicationEntity
from pynetdicom import association as association_module
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.timer import Timer
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from dicom_node.net.listener import BACKLOG, DEFER_NAP_S, Deferral, SharedListener
from dicom_node.net.pdu import BoundedPduReader, aborted_in_this_thread
from dicom_node.store.writeback import start_writeback

__all__ = ["SUPPORTED", "CompatError", "check", "SharedContexts", "install_wakeup",
           "install_response_guard", "install_store_encoding", "encode_store_response",
           "encode_store_request",
           "sending_without_pause", "negotiated", "install_pdu_reader", "NodeServer",
           "server_class", "register_server",
           "configure_process", "discard_partial_dataset", "received_write_error"]

log = logging.getLogger("dicom_node.net")

# The versions the tests cover (pyproject.toml pins the same range).
SUPPORTED = ((3, 0), (3, 1))


# What pynetdicom's DUL logs (at ERROR, once per connection) after our PDU
# reader aborted a connection: the reason is already logged, rate-limited.
_SHORT_READ = ("The received PDU is shorter than expected",
               "Connection closed before the entire PDU was received")


# The C-STORE command sets pynetdicom builds (PS3.7 9.3.1), in tag order.
_STORE_RQ_KEYWORDS = ("CommandGroupLength", "AffectedSOPClassUID", "CommandField", "MessageID", "Priority",
                      "CommandDataSetType", "AffectedSOPInstanceUID", "MoveOriginatorApplicationEntityTitle",
                      "MoveOriginatorMessageID")
_STORE_RSP_KEYWORDS = ("CommandGroupLength", "AffectedSOPClassUID", "CommandField", "MessageIDBeingRespondedTo",
                       "CommandDataSetType", "Status", "AffectedSOPInstanceUID", "OffendingElement",
                       "ErrorComment")


class CompatError(ImportError):
    """pynetdicom changed under a patch; the message names the patch."""


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError) as exc:
        raise CompatError(f"cannot read the source of {obj!r} to check a patch: {exc}") from exc


def _require(patch: str, condition: bool, what: str) -> None:
    if not condition:
        raise CompatError(f"pynetdicom {pynetdicom.__version__}: patch {patch!r} no longer "
                          f"applies: {what}. Update dicom_node/net/pynetdicom_compat.py.")


def check() -> None:
    """Verify every assumption the patches make; raises CompatError."""
    version = tuple(int(p) for p in pynetdicom.__version__.split(".")[:2])
    _require("version", SUPPORTED[0] <= version < SUPPORTED[1],
             f"supported {SUPPORTED[0]} <= version < {SUPPORTED[1]}")
    _require("SharedContexts", "deepcopy(self.server.contexts)"
             in _source(transport.RequestHandler._create_association),
             "RequestHandler._create_association no longer deep-copies server.contexts")
    reactor = _source(dul.DULServiceProvider.run_reactor)
    _require("install_wakeup", "self._run_loop_delay" in _source(dul.DULServiceProvider.__init__)
             and "time.sleep(self._run_loop_delay)" in reactor
             and "self._is_transport_event()" in reactor
             and "self.socket.ready" in _source(dul.DULServiceProvider._is_transport_event)
             and "self.to_provider_queue.put(primitive)" in _source(dul.DULServiceProvider.send_pdu)
             and "self._kill_thread = True" in _source(dul.DULServiceProvider.kill_dul)
             and isinstance(vars(transport.AssociationSocket).get("ready"), property)
             and "def close(self)" in _source(transport.AssociationSocket.close),
             "the DUL no longer polls socket.ready between naps of _run_loop_delay")
    reader = _source(dul.DULServiceProvider._read_pdu_data)
    _require("install_pdu_reader", "self.socket.recv(6)" in reader
             and "self.socket.recv(pdu_length)" in reader
             and "self._idle_timer.restart()" in reactor
             and "self._idle_timer = Timer(" in _source(dul.DULServiceProvider.__init__)
             and all(callable(getattr(Timer, name, None)) for name in ("start", "stop"))
             and all(message in reader for message in _SHORT_READ)
             and list(inspect.signature(transport.AssociationSocket.recv).parameters) == ["self", "nr_bytes"],
             "the DUL no longer reads a PDU as recv(6) then recv(pdu_length), restarting "
             "its _idle_timer after each")
    _require("negotiated", all('return "Sta6"' in _source(action) for action in (fsm.AE_3, fsm.AE_7))
             and "current_state" in _source(fsm.StateMachine.__init__),
             "sending or receiving A-ASSOCIATE-AC no longer moves the state machine to Sta6")
    reactor_loop = _source(Association._run_reactor)
    _require("install_response_guard",
             "self.dimse.get_msg(block=False)" in reactor_loop
             and "self._reactor_checkpoint.wait()" in reactor_loop
             and "self._reactor_checkpoint.clear()" in _source(Association.send_c_store)
             and "self.msg_queue.get(block=block" in _source(pynetdicom.dimse.DIMSEServiceProvider.get_msg)
             and isinstance(getattr(dimse_primitives.C_STORE, "is_valid_request", None), property),
             "the association reactor no longer polls DIMSE messages with get_msg(block=False) "
             "between pauses")
    _require("install_wakeup (reactor)", "time.sleep(0.001)" in reactor_loop
             and reactor_loop.index("time.sleep(0.001)") < reactor_loop.index("self.dimse.get_msg(block=False)")
             and isinstance(getattr(association_module, "time", None), types.ModuleType)
             and "self._reactor_checkpoint: threading.Event = threading.Event()" in _source(Association.__init__)
             and "self.msg_queue.put(" in _source(pynetdicom.dimse.DIMSEServiceProvider.receive_primitive)
             and "dul.to_user_queue.put(" in _source(fsm)
             and "self.dul.peek_next_pdu()" in _source(acse.ACSE.is_release_requested),
             "the association reactor no longer naps with time.sleep before polling its DIMSE queue")
    _require("sending_without_pause", "_is_paused" not in vars(Association)
             and "self._is_paused: bool = False" in _source(Association.__init__)
             and "while not self._is_paused:" in _source(Association.send_c_store)
             and "self._is_paused = True" in reactor_loop,
             "Association no longer waits on a plain _is_paused attribute for its reactor to pause")
    send_msg = _source(pynetdicom.dimse.DIMSEServiceProvider.send_msg)
    encode_msg = _source(dimse_messages.DIMSEMessage.encode_msg)
    _require("install_store_encoding",
             dimse_messages._COMMAND_SET_KEYWORDS.get("C-STORE-RSP") == _STORE_RSP_KEYWORDS
             and dimse_messages._COMMAND_SET_KEYWORDS.get("C-STORE-RQ") == _STORE_RQ_KEYWORDS
             and 'req._dataset_path = (fpath, offset)' in _source(Association.send_c_store)
             and "req.DataSet = BytesIO(bytestream)" in _source(Association.send_c_store)
             and "elif self._data_set_path is not None:" in encode_msg
             and '(context_id, b"\\x00" + f.read(max_pdu_length - 6))' in encode_msg
             and '(context_id, b"\\x02" + next(ds_fragments))' in encode_msg
             and "dimse_msg.primitive_to_message(primitive)" in send_msg
             and "evt.trigger(self.assoc, evt.EVT_DIMSE_SENT" in send_msg
             and "for pdata in dimse_msg.encode_msg(context_id, self.maximum_pdu_size):" in send_msg
             and "self.dul.send_pdu(pdata)" in send_msg
             and '(context_id, b"\\x03" + next(cmd_fragments))' in encode_msg
             and "fragment_length -= 6" in _source(dimse_messages.DIMSEMessage._generate_pdv_fragments)
             and callable(getattr(Association, "get_handlers", None)),
             "DIMSEServiceProvider.send_msg, encode_msg or the C-STORE command sets changed")
    _require("NodeServer.get_request",
             list(inspect.signature(AssociationServer.get_request).parameters) == ["self"]
             and "wrap_socket" in _source(AssociationServer.get_request)
             and "process_request_thread" in vars(ThreadedAssociationServer),
             "AssociationServer.get_request or process_request_thread changed")
    _require("register_server", "self._servers" in _source(ApplicationEntity.__init__)
             and "self.ae._servers.remove" in _source(AssociationServer.shutdown),
             "ApplicationEntity._servers is gone")
    _require("configure_process", isinstance(getattr(_config, "STORE_SEND_CHUNKED_DATASET", None), bool)
             and isinstance(getattr(_config, "STORE_RECV_CHUNKED_DATASET", None), bool),
             "_config.STORE_SEND/RECV_CHUNKED_DATASET are gone")
    _require("configure_process (log handlers)", getattr(_config, "LOG_HANDLER_LEVEL", None) in ("standard", "none")
             and 'LOG_HANDLER_LEVEL == "standard"' in _source(Association._bind_defaults),
             "_config.LOG_HANDLER_LEVEL no longer decides the standard DIMSE and PDU log handlers")
    _require("configure_process(receive_tmp_dir)",
             getattr(dimse_messages, "NamedTemporaryFile", None) is not None
             and "NamedTemporaryFile(delete=False" in _source(dimse_messages.DIMSEMessage.decode_msg),
             "DIMSEMessage.decode_msg no longer writes datasets with NamedTemporaryFile")
    _require("adopting the received file", "os.unlink(req._dataset_file.name)"
             in _source(service_class.StorageServiceClass.SCP),
             "StorageServiceClass.SCP no longer removes the received file after the handler")
    _require("discard_partial_dataset", "_data_set_file" in _source(dimse_messages.DIMSEMessage.__init__)
             and "self.message" in _source(pynetdicom.dimse.DIMSEServiceProvider.receive_primitive),
             "DIMSEMessage._data_set_file is gone")


check()


# -- 1. supported contexts shared between associations ---------------------------

class SharedContexts(list[PresentationContext]):
    """The server's supported contexts, copied shallowly per association.

    pynetdicom deep-copies them for every association (relies on
    ``RequestHandler._create_association`` calling ``deepcopy``); with 170
    storage classes times every transfer syntax that took ~0.15 s of CPU per
    association, capping one-instance associations (what many modalities
    send) at a few per second.  Negotiation only reads them, so one copy of
    each context object, sharing its syntax list, is enough.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [copy.copy(cx) for cx in self]


# -- 2. the DUL's idle wait ---------------------------------------------------------

class _WaitingSocket(transport.AssociationSocket):
    """An AssociationSocket whose ``ready`` waits for data from the peer or a
    wake-up from our side (up to ``_idle_wait_s``) instead of answering at once.

    pynetdicom's DUL thread polls: it checks for work, and when there is none
    sleeps ``_run_loop_delay`` (1 ms).  A C-STORE round trip meets several
    such naps (PDUs trickling in, the response waiting to be sent), which
    capped one association's rate; shorter naps made idle associations spin.
    Waiting in select() on the socket and a wake-up socket answers at once
    and costs nothing while idle.  Relies on ``DULServiceProvider.run_reactor``
    calling ``_is_transport_event`` (which reads ``socket.ready``) whenever
    the user queue is empty, and on ``send_pdu`` / ``kill_dul`` being how our
    side hands the DUL work (checked at import).
    """

    _wake: socket.socket | None = None
    _wake_sender: socket.socket | None = None
    _idle_wait_s = 0.005

    @property
    def ready(self) -> bool:
        sock, wake = self.socket, self._wake
        if sock is None or not self._is_connected or wake is None:
            time.sleep(self._idle_wait_s)  # nothing to wait on: nap as pynetdicom would
        elif not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            try:
                readable, _, _ = select.select([sock, wake], [], [], self._idle_wait_s)
            except (OSError, ValueError):  # closed under us: pynetdicom's check reports it
                readable = []
            if wake in readable:
                _drain(wake)
        return bool(super().ready)

    def close(self) -> None:
        super().close()
        for end in (self._wake, self._wake_sender):
            if end is not None:
                end.close()


def _drain(wake: socket.socket) -> None:
    try:
        while wake.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


def install_wakeup(assoc: Association, idle_wait_s: float) -> None:
    """Make this association's DUL thread wait on its socket and on our
    hand-offs instead of napping (see ``_WaitingSocket``), and its reactor
    leave its nap when it has work (``_ReactorTime``).  ``idle_wait_s``
    bounds how late the DUL notices anything else (timers, a killed thread)."""
    provider = assoc.dul
    transport_socket = provider.socket
    if transport_socket is None:
        raise ValueError("association has no transport socket yet")
    receiver, sender = socket.socketpair()
    receiver.setblocking(False)
    sender.setblocking(False)

    def wake() -> None:
        try:
            sender.send(b"\0")
        except OSError:  # full: a wake-up is already pending; closed: it ended
            pass

    queue = provider.to_provider_queue
    put, kill = queue.put, provider.kill_dul

    def waking_put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    def waking_kill() -> None:
        kill()
        wake()

    # Instance attributes over the methods, on purpose: this association only.
    queue.put = waking_put  # type: ignore[method-assign]
    provider.kill_dul = waking_kill  # type: ignore[method-assign]
    transport_socket.__class__ = _WaitingSocket
    waiting: _WaitingSocket = transport_socket  # type: ignore[assignment]
    waiting._wake, waiting._wake_sender, waiting._idle_wait_s = receiver, sender, idle_wait_s
    provider._run_loop_delay = 0.0
    _wake_reactor(assoc)


# -- 2a. the association reactor's nap ----------------------------------------------

class _ReactorTime(types.ModuleType):
    """``pynetdicom.association``'s ``time``, whose ``sleep`` an association's
    reactor thread leaves as soon as its association has work.

    The reactor serves DIMSE requests in a loop that naps ``time.sleep(0.001)``
    before each look at the DIMSE queue, so every received C-STORE waited
    for the rest of a nap (about 0.5 ms of a ~4.8 ms round trip on one
    association) before its handler ran.  The nap keeps its length, so an
    idle association costs what it did; only a thread ``install_wakeup``
    registered is woken early, by a decoded message, a PDU for the user
    (A-RELEASE, A-ABORT) or a request for the reactor to pause.  Relies on
    ``Association._run_reactor`` napping with ``time.sleep`` from its module
    and polling ``dimse.get_msg`` after it (checked at import)."""

    def __init__(self) -> None:
        super().__init__("time")
        self.__dict__.update(vars(time))
        self.sleep = self._sleep

    @staticmethod
    def _sleep(seconds: float) -> None:
        wake: threading.Event | None = getattr(threading.current_thread(), "_dicom_node_wake", None)
        if wake is None:
            time.sleep(seconds)
        elif wake.wait(seconds):
            # Cleared before the reactor looks, so a later hand-off sets it again.
            wake.clear()


# Every association reactor naps through it; a thread without a wake-up naps as before.
association_module.time = _ReactorTime()  # type: ignore[attr-defined]


def _wake_reactor(assoc: Association) -> None:
    """Wake ``assoc``'s reactor from its nap whenever our side or the DUL
    hands it something (see ``_ReactorTime``); this association only."""
    wake = threading.Event()
    messages, user_queue = assoc.dimse.msg_queue, assoc.dul.to_user_queue
    checkpoint = assoc._reactor_checkpoint
    put_message, put_user, clear = messages.put, user_queue.put, checkpoint.clear

    def message_put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put_message(item, block, timeout)
        wake.set()

    def user_put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put_user(item, block, timeout)
        wake.set()

    def checkpoint_clear() -> None:
        clear()
        wake.set()

    # Instance attributes over the methods, on purpose: this association only.
    messages.put = message_put  # type: ignore[method-assign]
    user_queue.put = user_put  # type: ignore[method-assign]
    checkpoint.clear = checkpoint_clear  # type: ignore[method-assign]
    assoc._dicom_node_wake = wake  # type: ignore[attr-defined]  # read by _ReactorTime._sleep


# -- 2b. responses kept for the request that waits for them -------------------------

# The DIMSE providers install_response_guard has guarded.
_GUARDED: weakref.WeakSet[Any] = weakref.WeakSet()


def install_response_guard(assoc: Association) -> None:
    """Let the association's reactor take only requests from the DIMSE queue,
    never the response a send_c_store or send_c_echo is waiting for.

    pynetdicom pauses the reactor around each request with a checkpoint, but
    the reactor marks itself paused just before it waits: when the
    checkpoint is still set it goes on, and the sender, seeing it marked
    paused, sends.  The reactor's next get_msg(block=False) can then take
    the response, drop it as unexpected, and leave the sender waiting for
    the DIMSE timeout (seen here: one object in about 2000 stalled 30 s, and
    its association was aborted).  A request at the head of the queue is
    still served as before."""
    dimse = assoc.dimse
    waiting_get = dimse.get_msg
    messages = dimse.msg_queue

    def get_msg(block: bool = False) -> Any:
        if block:
            return waiting_get(block=True)
        with messages.mutex:
            if messages.queue and messages.queue[0][1].is_valid_request:
                item = messages.queue.popleft()
                messages.not_full.notify()
                return item
        return None, None

    # An instance attribute over the method, on purpose: this association only.
    dimse.get_msg = get_msg  # type: ignore[method-assign]
    _GUARDED.add(dimse)


class _SendingWithoutPause(Association):
    """An association whose reactor reads as paused (see sending_without_pause);
    what the reactor writes is kept, for when the class is restored."""

    @property
    def _is_paused(self) -> bool:
        return True

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        self.__dict__["_is_paused"] = value


@contextmanager
def sending_without_pause(assoc: Association) -> Iterator[None]:
    """Within the block, a send_c_store on ``assoc`` does not wait for the
    association's reactor to pause.

    Each send clears the reactor's checkpoint, then polls (0.1 ms naps)
    until the reactor, which naps 1 ms between rounds, marks itself paused:
    about 10 % of our C-STORE rate (367 -> 405 objects/s into storescp).
    The pause only keeps the reactor from taking the response, which
    install_response_guard (required here) already ensures, under the DIMSE
    queue's lock.  Outside the block (A-RELEASE included) the association
    waits for the pause as pynetdicom does."""
    if assoc.dimse not in _GUARDED:
        raise RuntimeError("sending_without_pause needs install_response_guard on the association")
    original = assoc.__class__
    assoc.__class__ = _SendingWithoutPause
    try:
        yield
    finally:
        assoc.__class__ = original


# -- 2c. C-STORE messages encoded directly ------------------------------------------

_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
_DATA_SET, _NO_DATA_SET = 0x0001, 0x0101


def _element(tag: int, value: bytes) -> bytes:
    """One element in Implicit VR Little Endian, the command set's encoding."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _uid(value: str) -> bytes:
    data = str(value).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _command_set(elements: list[tuple[int, bytes | None]]) -> bytes:
    """The command set of ``(tag, value)`` in tag order (None: left out),
    with its group length first."""
    body = b"".join(_element(tag, value) for tag, value in elements if value is not None)
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def _short(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and 0 <= value <= 0xFFFF


def _store_command(primitive: dimse_primitives.C_STORE, command: int,
                   middle: list[tuple[int, bytes | None]]) -> bytes | None:
    """A C-STORE command set: the affected SOP class, the command field,
    ``middle`` and the affected SOP instance, in tag order; None where a
    UID cannot be written as ASCII."""
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    try:
        return _command_set([
            (0x00000002, None if sop_class is None else _uid(sop_class)),
            (0x00000100, _us(command)),
            *middle,
            (0x00001000, None if sop_instance is None else _uid(sop_instance)),
        ])
    except UnicodeEncodeError:
        return None


def encode_store_response(rsp: dimse_primitives.C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE response, byte for byte as
    pynetdicom encodes it, or None where the response has an element this
    does not write (an offending element, an error comment) or a value that
    does not fit."""
    status, message_id = rsp.Status, rsp.MessageIDBeingRespondedTo
    if (rsp.OffendingElement is not None or rsp.ErrorComment is not None
            or not _short(status) or not _short(message_id)):
        return None
    return _store_command(rsp, _C_STORE_RSP, [(0x00000120, _us(message_id)), (0x00000800, _us(_NO_DATA_SET)),
                                              (0x00000900, _us(status))])


def encode_store_request(rq: dimse_primitives.C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE request with a data set, byte
    for byte as pynetdicom encodes it, or None where it has a move
    originator or a value this does not write."""
    message_id, priority = rq.MessageID, rq.Priority
    if (rq.MoveOriginatorApplicationEntityTitle is not None or rq.MoveOriginatorMessageID is not None
            or not _short(message_id) or not (priority is None or _short(priority))):
        return None
    return _store_command(rq, _C_STORE_RQ, [(0x00000110, _us(message_id)),
                                            (0x00000700, None if priority is None else _us(priority)),
                                            (0x00000800, _us(_DATA_SET))])


def _data_set_fragments(primitive: dimse_primitives.C_STORE, limit: int) -> Iterator[bytes] | None:
    """A request's data set as encode_msg fragments it (control byte first),
    read from its file as it is sent; None where it has none."""
    data_set = primitive.DataSet
    path = getattr(primitive, "_dataset_path", None)
    if isinstance(data_set, BytesIO) and data_set.getvalue():
        return _fragments(data_set.getvalue(), limit)
    if data_set is None and isinstance(path, tuple) and len(path) == 2:
        return _file_fragments(Path(path[0]), int(path[1]), limit)
    return None


def _fragments(data: bytes, limit: int) -> Iterator[bytes]:
    size = len(data) if limit == 0 else limit - 6
    for start in range(0, len(data), size):
        yield (b"\x02" if start + size >= len(data) else b"\x00") + data[start:start + size]


def _file_fragments(path: Path, offset: int, limit: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        length = f.seek(0, 2) - f.seek(offset)
        size = length if limit == 0 else limit - 6
        count = max(1, -(-length // size)) if size else 1
        for i in range(count):
            yield (b"\x02" if i == count - 1 else b"\x00") + f.read(size)


def _store_fragments(primitive: Any, limit: int) -> Iterator[bytes] | None:
    """Every PDV of a C-STORE message as pynetdicom's encode_msg makes
    them, or None for anything this does not encode (left to pynetdicom)."""
    if type(primitive) is not dimse_primitives.C_STORE:
        return None
    if primitive.MessageIDBeingRespondedTo is not None:
        command, data = encode_store_response(primitive), None
    else:
        command = encode_store_request(primitive)
        data = _data_set_fragments(primitive, limit) if command is not None else None
        if data is None:
            return None
    # The whole command set in one PDV, as encode_msg makes it where it fits.
    if command is None or (limit != 0 and len(command) > limit - 6):
        return None
    return itertools.chain([b"\x03" + command], data or ())


def install_store_encoding(assoc: Association) -> None:
    """Send the association's C-STORE requests and responses from the
    encoders above.

    pynetdicom builds a pydicom Dataset per message, validating each value,
    and encodes it twice (once for the group length): about 0.4 ms of
    Python a message, a sixth of a receiver's time per instance.  The PDVs
    sent are the same (tests/test_pynetdicom_compat.py).  Any other
    message, one these do not encode, or an association with EVT_DIMSE_SENT
    handlers (which get pynetdicom's message object) goes through
    pynetdicom's own send_msg."""
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def fast_send_msg(primitive: Any, context_id: int) -> None:
        fragments = (None if assoc.get_handlers(evt.EVT_DIMSE_SENT)
                     else _store_fragments(primitive, dimse.maximum_pdu_size))
        if fragments is None:
            send_msg(primitive, context_id)
            return
        for fragment in fragments:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, fragment))
            dimse.dul.send_pdu(pdata)

    # An instance attribute over the method, on purpose: this association only.
    dimse.send_msg = fast_send_msg  # type: ignore[method-assign]


# -- 3. the bounded PDU reader -------------------------------------------------------

def negotiated(assoc: Association) -> bool:
    """Whether the association is past negotiation, as the DUL sees it.

    ``is_established`` is set by the association's thread after it handed
    the A-ASSOCIATE-AC to the DUL; a peer answering the AC at once is read by
    the DUL before that, and its first P-DATA was timed as negotiation (the
    ACSE timeout, and the wrong reason).  The DUL's own state moves to Sta6
    when it sends or receives the AC, before it reads the next PDU."""
    return bool(assoc.is_established) or assoc.dul.state_machine.current_state == "Sta6"


def install_pdu_reader(assoc: Association, reader: BoundedPduReader) -> None:
    """Make this association's transport read PDUs through ``reader``
    (replaces ``AssociationSocket.recv`` on the instance).

    While a PDU is being read, the reader's deadline is the network timeout:
    pynetdicom's idle timer is held (started and stopped, so it reads as not
    expired) and restarted by the DUL once the PDU is in.  Otherwise both
    timers run, the idle one started a PDU earlier, and the association
    reactor aborts a stalled PDU first, without our reason or count."""
    transport_socket = assoc.dul.socket
    if transport_socket is None:
        raise ValueError("association has no transport socket yet")
    idle: Timer = assoc.dul._idle_timer

    def recv(_self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
        idle.start()
        idle.stop()
        return reader.recv(nr_bytes)

    # An instance attribute over the method, on purpose: this socket only.
    transport_socket.recv = types.MethodType(recv, transport_socket)  # type: ignore[method-assign]


# -- 4. the server: TLS handshake in the connection's thread, a connection cap -----

class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with three changes.

    * ``get_request`` without ``super()``: with TLS pynetdicom would run the
      handshake there, in the one thread that accepts, where a silent client
      stalls every other.  The handshake runs in the connection's thread,
      within the network timeout.
    * ``verify_request`` asks ``admit`` (set by the receiver) before a thread
      is started, so connections beyond the cap cost no thread.
    * ``open_connections`` counts connections still negotiating as well as
      established ones.
    """

    # A listening socket shared by the node's receiver processes, set on a
    # subclass by server_class(), never mutated here.  Each process accepts
    # from it, leaving a connection to a less loaded one (see SharedListener);
    # with SO_REUSEPORT the kernel dealt them by address hash and 4
    # associations from one sender often all landed on one process.
    shared_listener: SharedListener | None = None
    request_queue_size = BACKLOG  # socketserver's default, 5, is too short for a burst

    # Set by the receiver.  admit(sock, address, open_connections) -> bool
    admit: Callable[[socket.socket, Any, int], bool] | None = None
    on_tls_failure: Callable[[Any, str], None] | None = None

    def server_bind(self) -> None:
        shared = self.shared_listener
        if shared is None:
            super().server_bind()
            return
        self._listener().close()  # the one socketserver made: unused
        self.socket = shared.sock
        self.server_address = shared.sock.getsockname()

    def server_activate(self) -> None:
        if self.shared_listener is None:
            super().server_activate()

    def _listener(self) -> socket.socket:
        # socketserver sets it in __init__; pynetdicom types it Optional.
        if self.socket is None:
            raise RuntimeError("the server's socket is closed")
        return self.socket

    def get_request(self) -> tuple[socket.socket, Any]:
        # A shared listener is non-blocking: when another process took the
        # connection, accept() raises BlockingIOError, which socketserver
        # ignores (an OSError from get_request) until the next one.  So does
        # a connection left to a less loaded process.
        shared = self.shared_listener
        if shared is not None:
            load = self.open_connections()
            shared.post(load)
            if shared.lighter_elsewhere(load) and self._deferral.may_defer():
                time.sleep(DEFER_NAP_S)
                raise BlockingIOError("left to a less loaded receiver process")
        client, address = self._listener().accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    # -- connection cap ---------------------------------------------------------

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        # Accepted, not yet handed to an Association (TLS handshake, set-up).
        self._pending: set[int] = set()
        # Handed over: counted until their thread has ended.
        self._handed: set[Association] = set()
        self._deferral = Deferral()
        self.bind(evt.EVT_CONN_OPEN, self._handed_over)
        if self.shared_listener is not None:
            self.bind(evt.EVT_CONN_CLOSE, self._closing)

    def open_connections(self) -> int:
        """Connections open now: negotiating or established."""
        with self._count_lock:
            return self._count()

    def _count(self) -> int:
        # ident is None: created, thread not started yet (still ours to count).
        self._handed = {a for a in self._handed if a.ident is None or a.is_alive()}
        return len(self._pending) + len(self._handed)

    def _handed_over(self, event: evt.Event) -> None:
        # EVT_CONN_OPEN, in the connection's thread just before the
        # Association's thread starts: moves it from pending to handed over
        # in one step, so it is never counted twice or not at all.
        transport_socket = event.assoc.dul.socket
        with self._count_lock:
            if transport_socket is not None:
                self._pending.discard(id(transport_socket.socket))
            self._handed.add(event.assoc)

    def _closing(self, event: evt.Event) -> None:
        # EVT_CONN_CLOSE, while the closing association's thread still runs:
        # post the load without it, so that a process whose associations
        # ended is not passed over for the next connection.
        if self.shared_listener is not None:
            self.shared_listener.post(max(0, self.open_connections() - 1))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._count_lock:
            count = self._count()
        if self.admit is not None and not self.admit(request, client_address, count):
            return False
        with self._count_lock:
            self._pending.add(id(request))
            load = self._count()
        if self.shared_listener is not None:
            self.shared_listener.post(load)
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket) and not self._tls_handshake(request, client_address):
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:  # no-op once handed over
                self._pending.discard(id(request))

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
                self.on_tls_failure(address, tls_reason(exc))
            return False
        sock.settimeout(previous)
        return True


def tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason, e.g. 'CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate'."""
    if isinstance(exc, socket.timeout):
        return "no TLS handshake within the network timeout"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    detail = getattr(exc, "verify_message", None)
    return f"{reason}: {detail}" if detail else str(reason)


def server_class(*, shared_listener: SharedListener | None = None) -> type[NodeServer]:
    """The server class for ``AE.make_server``: NodeServer itself, or a
    subclass adopting ``shared_listener`` (bind runs in the constructor, so
    the socket is a class attribute of a subclass made for it instead of a
    mutation of NodeServer shared by every server)."""
    if shared_listener is None:
        return NodeServer
    return type("NodeServerShared", (NodeServer,), {"shared_listener": shared_listener})


def register_server(ae: ApplicationEntity, server: AssociationServer) -> None:
    """Record a server we started ourselves (``make_server`` plus our own
    thread, as ``AE.start_server`` does) so ``AE.shutdown`` and
    ``server.shutdown`` (which removes it from the private ``ae._servers``)
    treat it as theirs."""
    ae._servers.append(server)  # type: ignore[arg-type]


# -- 5. process-wide switches (set once, by the service entry points) --------------

_receive_tmp_dir: Path | None = None


# Received files whose writing failed (disk full), by path: the C-STORE
# handler answers 0xA700 for them instead of pynetdicom's thread dying with
# the OSError and aborting the association.
_write_failures: dict[str, OSError] = {}


# Start writeback of a received file after this many new bytes, and at its end.
_WRITEBACK_STEP = 128 * 1024


class _ReceiveFile:
    """The file pynetdicom writes a received dataset into, which keeps an
    OSError (ENOSPC, EIO) for the handler instead of raising it in the DUL
    thread (upstreamable as an error path in DIMSEMessage.decode_msg), and
    starts its writeback as it arrives (store/writeback.py)."""

    def __init__(self, tmp_dir: Path) -> None:
        self._fh: IO[bytes] | None = None
        self._written = 0  # bytes so far
        self._started = 0  # bytes whose writeback was started
        try:
            self._fh = tempfile.NamedTemporaryFile(mode="wb", delete=False, dir=tmp_dir,
                                                   prefix="recv-", suffix=".part")
            self.name = self._fh.name
        except OSError as exc:
            self.name = str(tmp_dir / f"recv-failed-{id(self)}.part")
            _write_failures[self.name] = exc

    @property
    def file(self) -> _ReceiveFile:  # pynetdicom calls .file.flush()
        return self

    def _guard(self, op: Callable[[], Any]) -> None:
        if self._fh is None or self.name in _write_failures:
            return
        try:
            op()
        except OSError as exc:
            _write_failures[self.name] = exc
            try:  # give the space back at once; the handler refuses this one
                self._fh.truncate(0)
            except OSError:
                pass

    def write(self, data: bytes) -> int:
        self._guard(lambda: self._fh.write(data))  # type: ignore[union-attr]
        self._written += len(data)
        if self._written - self._started >= _WRITEBACK_STEP:
            self._guard(self._start_writeback)
        return len(data)

    def _start_writeback(self) -> None:
        """Flush and let the kernel start writing back what came so far, so
        the handler's fsync finds most of the file on its way to disk."""
        fh = self._fh
        assert fh is not None
        fh.flush()
        start_writeback(fh.fileno(), self._started, self._written - self._started)
        self._started = self._written

    def flush(self) -> None:
        self._guard(lambda: self._fh.flush())  # type: ignore[union-attr]

    def close(self) -> None:
        if self._fh is not None:
            if self._written > self._started:
                self._guard(self._start_writeback)
            try:
                self._fh.close()
            except OSError as exc:
                _write_failures.setdefault(self.name, exc)


def received_write_error(path: Path) -> OSError | None:
    """The error that cut short writing this received dataset, if any (and forget it)."""
    return _write_failures.pop(str(path), None)


def _temporary_file(tmp_dir: Path) -> Callable[..., Any]:
    def make(*_args: Any, **_kwargs: Any) -> _ReceiveFile:
        # In the spool's .tmp: the same file system, so adopting a received
        # file is a rename, and *.part so an interrupted one is cleaned at start.
        return _ReceiveFile(tmp_dir)
    return make


def configure_process(*, send_chunked: bool, receive_tmp_dir: Path | None = None) -> None:
    """Set pynetdicom's process-wide switches.

    ``send_chunked``: send a file's encoded dataset as written instead of
    decoding and re-encoding it (which cost more than the network in
    bench/send.py); needs an accepted context with the file's exact syntax
    (send/scu.py falls back to a decoded dataset otherwise).
    ``receive_tmp_dir``: write every received C-STORE dataset to a file in
    this folder (STORE_RECV_CHUNKED_DATASET; the handler gets its path)
    instead of holding it in memory."""
    global _receive_tmp_dir
    _config.STORE_SEND_CHUNKED_DATASET = send_chunked
    # pynetdicom's standard handlers format a DEBUG summary of every PDU and
    # DIMSE message, a tenth of a receiver's Python time per instance, for
    # a logger the node holds at WARNING (observability/logs.py).  Only
    # associations made after this call are affected, so it runs at start.
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        _config.LOG_HANDLER_LEVEL = "none"
    _quiet_our_aborts()
    if receive_tmp_dir is None:
        return
    receive_tmp_dir.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _temporary_file(receive_tmp_dir)  # type: ignore[attr-defined]
    _receive_tmp_dir = receive_tmp_dir




class _OurAbortFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (aborted_in_this_thread() and str(record.msg).startswith(_SHORT_READ))


def _quiet_our_aborts() -> None:
    dul_log = logging.getLogger(dul.__name__)
    if not any(isinstance(f, _OurAbortFilter) for f in dul_log.filters):
        dul_log.addFilter(_OurAbortFilter())


def receive_tmp_dir() -> Path | None:
    """Where received datasets are written (None: configure_process not called)."""
    return _receive_tmp_dir if _config.STORE_RECV_CHUNKED_DATASET else None


def discard_partial_dataset(assoc: Association) -> None:
    """Remove the file of a C-STORE dataset whose transfer the association
    ended in the middle of (pynetdicom removes it only after the handler ran,
    so an abort would leave it until the next start)."""
    message = getattr(assoc.dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    try:
        handle.close()
    except (OSError, ValueError):
        pass
    Path(handle.name).unlink(missing_ok=True)
