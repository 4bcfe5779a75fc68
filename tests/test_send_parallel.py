"""The outbox SCU on several associations at once, and how it reads an
A-ASSOCIATE-RJ: against dcmtk's forking storescp and a pynetdicom SCP with an
association limit (both real peers)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import NODELAY_ENV, free_port, wait_for, write_ct_series
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pydantic import ValidationError

from dicom_node.config import Peer
from dicom_node.errors import SendError
from dicom_node.send import scu
from dicom_node.send.processes import SenderProcesses
from dicom_node.send.scu import StoreRequest, send_files, send_files_parallel

CT = "1.2.840.10008.5.1.4.1.1.2"


def _requests(files: list[Path]) -> list[StoreRequest]:
    return [StoreRequest(i, f, CT, str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
            for i, f in enumerate(files)]


@pytest.fixture
def sender_processes():
    processes = SenderProcesses(3)
    try:
        yield processes
    finally:
        processes.close()


@pytest.mark.parametrize("senders", ["threads", "processes"])
def test_parallel_send_delivers_every_object_over_several_associations(tmp_path: Path, senders: str,
                                                                       request) -> None:
    processes = request.getfixturevalue("sender_processes") if senders == "processes" else None
    files = write_ct_series(tmp_path / "series", n=12, size=64, seed="parallel")
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("w")
    scp = subprocess.Popen(["storescp", "-v", "--fork", "-od", str(received), "-aet", "STORESCP",
                            str(port)], env=NODELAY_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)],
                                        env=NODELAY_ENV, capture_output=True).returncode == 0, 20)
        peer = Peer(name="scp", ae_title="STORESCP", host="127.0.0.1", port=port)
        outcomes = send_files_parallel(peer, _requests(files), associations=3,
                                       calling_ae="DICOM_NODE", timeout_s=20, processes=processes)
        assert sorted(o.item_id for o in outcomes) == list(range(12))
        assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok]
        wait_for(lambda: len(list(received.iterdir())) == 12, 10)
    finally:
        scp.terminate()
        scp.wait(10)
        log.close()
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()}
    assert got == {r.sop_uid for r in _requests(files)}
    # The echo plus three sending associations.
    text = (tmp_path / "storescp.log").read_text()
    assert len(re.findall(r"Association Received", text)) == 4, text[-2000:]


@pytest.fixture
def limited_scp():
    """A pynetdicom SCP that holds one association at a time."""
    ae = AE(ae_title="LIMITED")
    ae.maximum_associations = 1
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        yield Peer(name="limited", ae_title="LIMITED", host="127.0.0.1", port=port)
    finally:
        server.shutdown()


def test_peer_at_its_association_limit_is_retried_not_dead(tmp_path: Path, limited_scp) -> None:
    requests = _requests(write_ct_series(tmp_path / "series", n=4, size=64, seed="limit"))
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(CTImageStorage)
    held = holder.associate("127.0.0.1", limited_scp.port, ae_title="LIMITED")
    assert held.is_established
    try:
        # The peer answers A-ASSOCIATE-RJ "rejected-transient, local limit exceeded".
        with pytest.raises(SendError) as info:
            send_files_parallel(limited_scp, requests, associations=2, calling_ae="DICOM_NODE",
                                timeout_s=20)
    finally:
        held.release()
    assert info.value.retryable and "transient" in info.value.reason
    # Once the peer has let the held association go, a retry goes through.
    def retry() -> list | None:
        try:
            return send_files_parallel(limited_scp, requests, associations=1,
                                       calling_ae="DICOM_NODE", timeout_s=20)
        except SendError as exc:
            assert exc.retryable
            return None
    outcomes = wait_for(retry, 10, interval=0.2)
    assert all(o.ok for o in outcomes), outcomes


def test_a_sender_process_that_dies_fails_its_objects_retryably_and_is_replaced(
        tmp_path: Path, sender_processes) -> None:
    """A batch whose sender processes died fails retryably (nothing is
    recorded as sent that was not acknowledged); the next batch starts new
    processes and goes through."""
    import os
    import signal

    requests = _requests(write_ct_series(tmp_path / "series", n=6, size=64, seed="dies"))
    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    peer = Peer(name="scp", ae_title="SCP", host="127.0.0.1", port=port)
    try:
        first = send_files_parallel(peer, requests, associations=3, calling_ae="N", timeout_s=20,
                                    processes=sender_processes)
        assert all(o.ok for o in first), first
        for pid in list(sender_processes._executor()._processes):  # noqa: SLF001 - the test kills them
            os.kill(pid, signal.SIGKILL)
        # Every share failed: as when no association could be made, the
        # dispatcher gets one retryable SendError for the whole batch.
        with pytest.raises(SendError, match="a sender process ended during the send") as info:
            send_files_parallel(peer, requests, associations=3, calling_ae="N", timeout_s=20,
                                processes=sender_processes)
        assert info.value.retryable
        again = send_files_parallel(peer, requests, associations=3, calling_ae="N", timeout_s=20,
                                    processes=sender_processes)
        assert all(o.ok for o in again), again
    finally:
        server.shutdown()


def test_a_failed_association_fails_only_its_own_objects(tmp_path: Path, monkeypatch) -> None:
    """Unit: objects are dealt round-robin; an association that cannot be made
    returns its objects with its reason, the others' outcomes are kept."""
    def fake_send(peer, share, **kwargs):
        if any(r.item_id == 1 for r in share):
            raise SendError(peer.name, "refused", retryable=True)
        return [scu.StoreOutcome(r.item_id, True, False, "status 0x0000") for r in share]

    monkeypatch.setattr(scu, "send_files", fake_send)
    requests = [StoreRequest(i, tmp_path / f"{i}.dcm", CT, str(i)) for i in range(7)]
    peer = Peer(name="p", ae_title="P", host="127.0.0.1", port=104)
    outcomes = {o.item_id: o for o in send_files_parallel(peer, requests, associations=3,
                                                          calling_ae="N")}
    assert sorted(outcomes) == list(range(7))
    assert {i for i, o in outcomes.items() if not o.ok} == {1, 4}
    assert all(o.retryable and "refused" in o.reason for o in outcomes.values() if not o.ok)


def test_permanent_rejection_is_not_retryable(tmp_path: Path, limited_scp) -> None:
    wrong = limited_scp.model_copy(update={"ae_title": "SOMEONE_ELSE"})
    requests = _requests(write_ct_series(tmp_path / "series", n=1, size=64, seed="perm"))
    # pynetdicom's SCP refuses an unknown called AE permanently (result 1).
    with pytest.raises(SendError) as info:
        send_files(wrong, requests, calling_ae="DICOM_NODE", timeout_s=10)
    assert not info.value.retryable and "permanent" in info.value.reason


def test_send_associations_is_bounded_at_load() -> None:
    base = {"name": "p", "ae_title": "P", "host": "127.0.0.1", "port": 104}
    assert Peer(**base).send_associations == 1
    assert Peer(**base, send_associations=4).send_associations == 4
    for bad in (0, 9):
        with pytest.raises(ValidationError, match="send_associations"):
            Peer(**base, send_associations=bad)


def test_one_status_table_for_c_store_and_stow_rs() -> None:
    from dicom_node.send import statuses

    assert statuses.is_success(0x0000) and statuses.is_success(0xB007)
    assert not statuses.is_success(0xA700) and not statuses.is_success(0x0110)
    assert statuses.is_permanent(0xA900) and statuses.is_permanent(0xC221)
    assert statuses.is_permanent(0x0122) and not statuses.is_permanent(0xA702)
    assert statuses.describe(0x0122) == "0x0122 (SOP class not supported)"
    assert statuses.describe(0xA900) == "0xA900"


def test_a_send_error_crosses_a_process_boundary_whole() -> None:
    """A sender process returns its SendError to the dispatcher pickled."""
    import pickle

    error = pickle.loads(pickle.dumps(SendError("pacs", "refused", status=0xA700, retryable=True)))
    assert (error.destination, error.reason, error.status, error.retryable) == ("pacs", "refused", 0xA700, True)
    assert str(error) == "destination pacs: refused"
