"""The SCP against dcmtk's echoscu and storescu and pynetdicom as raw senders."""

from __future__ import annotations

import io
import re
from pathlib import Path

from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pynetdicom import AE

from helpers import dataset_bytes, echoscu, storescu, wait_for, write_ct_series


def _spool_file(node, sop_uid: str) -> Path:
    rec = node.store().instance(sop_uid)
    assert rec is not None, f"instance {sop_uid} not in the store"
    return node.data_dir / "spool" / rec.path


def test_echo_and_multi_file_store_is_byte_identical(node_factory, tmp_path):
    node = node_factory(routes=[]).start()
    assert echoscu(node.port).returncode == 0
    files = write_ct_series(tmp_path / "in", n=12, size=64, seed="recv")
    storescu(node.port, files)
    store = node.store()
    assert store.count_instances() == 12
    for path in files:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        # storescu sends the file's dataset as encoded; we keep exactly those bytes.
        assert dataset_bytes(_spool_file(node, sop)) == dataset_bytes(path)
    series = store.series(str(dcmread(files[0]).SeriesInstanceUID))
    assert series.instance_count == 12 and series.modality == "CT"


def test_stored_bytes_equal_sent_bytes(node_factory, tmp_path):
    """pynetdicom sends a file's encoded dataset untouched; the spool must
    hold the same dataset bytes."""
    node = node_factory(routes=[]).start()
    [path] = write_ct_series(tmp_path / "in", n=1, size=64, seed="bytes")
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(dcmread(path).SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    sop = str(dcmread(path).SOPInstanceUID)
    assert dataset_bytes(_spool_file(node, sop)) == dataset_bytes(path)


def test_duplicate_replaces_and_is_counted(node_factory, tmp_path):
    node = node_factory(routes=[]).start()
    files = write_ct_series(tmp_path / "in", n=3, size=64, seed="dup")
    storescu(node.port, files)
    storescu(node.port, files[:1])
    assert node.store().count_instances() == 3
    wait_for(lambda: "dicom_node_duplicate_instances_total 1.0" in node.metrics(), 10,
             what="duplicate counted")


def test_unparseable_dataset_gets_failure_status_and_node_stays_up(node_factory, tmp_path):
    node = node_factory(routes=[]).start()
    [good] = write_ct_series(tmp_path / "in", n=1, size=64, seed="bad")
    ds = dcmread(good)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    raw = bytearray(buf.getvalue())
    # Corrupt the length of an element in the middle of the dataset.
    at = raw.index(b"\x08\x00\x60\x00")  # (0008,0060) Modality
    raw[at + 6:at + 8] = b"\xff\xff"
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(raw))
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    rsp = assoc.send_c_store(bad)
    assoc.release()
    assert 0xA900 <= rsp.Status <= 0xCFFF, hex(rsp.Status)
    assert node.store().count_instances() == 0
    assert "refused instance" in node.log()
    assert echoscu(node.port).returncode == 0


def test_unknown_calling_ae_is_rejected_with_reason(node_factory):
    node = node_factory(routes=[], node={"allow_any_caller": False},
                        peers=[{"name": "ct1", "ae_title": "CT_SCANNER", "host": "127.0.0.1",
                                "port": 104}]).start()
    ok = echoscu(node.port, aet="CT_SCANNER")
    assert ok.returncode == 0, ok.stderr
    refused = echoscu(node.port, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert 'result="rejected_calling_ae"' in node.metrics()


def test_host_check_rejects_known_ae_from_wrong_host(node_factory):
    node = node_factory(routes=[], node={"allow_any_caller": False},
                        peers=[{"name": "ct1", "ae_title": "CT_SCANNER", "host": "192.0.2.10",
                                "port": 104, "check_host": True}]).start()
    refused = echoscu(node.port, aet="CT_SCANNER")
    assert refused.returncode != 0
    assert 'result="rejected_calling_host"' in node.metrics()


def test_allow_any_caller_warns_at_start(node_factory):
    node = node_factory(routes=[]).start()
    assert "allow_any_caller is true" in node.log()


def test_receiver_processes_share_the_port(node_factory, tmp_path):
    import subprocess

    from helpers import NODELAY_ENV
    node = node_factory(routes=[], node={"receivers": 2, "workers": 0}).start()
    # Ready means every receiver process accepts, not only the node's own.
    assert node.log().count("listening for DICOM on") == 2
    series = [write_ct_series(tmp_path / f"s{i}", n=6, size=64, seed=f"multi{i}") for i in range(4)]
    procs = [subprocess.Popen(["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port),
                               *map(str, files)], env=NODELAY_ENV) for files in series]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    assert node.store().count_instances() == 24
    # Both processes' counters reach the one endpoint.
    wait_for(lambda: 'dicom_node_instances_received_total{modality="CT"} 24.0' in node.metrics(), 10,
             what="24 instances counted across receiver processes")
    # The four associations were spread over both processes (two each when
    # all four overlap; a short one may end before the next arrives).
    served = re.findall(r" (\S+) dicom_node\.receive: association from \S+ released", node.log())
    assert len(served) == 4 and len(set(served)) == 2, served


def _hold(port: int, aet: str):
    """An open association from ``aet``, held until released."""
    ae = AE(ae_title=aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established, f"{aet} could not associate"
    return assoc


def test_association_limits_total_and_per_peer(node_factory):
    node = node_factory(routes=[], node={"max_associations": 3},
                        peers=[{"name": "ct1", "ae_title": "CT1", "host": "127.0.0.1", "port": 104,
                                "max_associations": 1}]).start()
    held = [_hold(node.port, "CT1")]
    refused = echoscu(node.port, aet="CT1")
    assert refused.returncode != 0
    assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    assert echoscu(node.port, aet="OTHER").returncode == 0  # the limit is CT1's, not the node's
    held += [_hold(node.port, "A2"), _hold(node.port, "A3")]
    assert echoscu(node.port, aet="A4").returncode != 0  # node total reached
    metrics = node.metrics()
    assert 'result="rejected_peer_association_limit"' in metrics
    assert 'result="rejected_association_limit"' in metrics
    for assoc in held:
        assoc.release()
    wait_for(lambda: echoscu(node.port, aet="CT1").returncode == 0, 10, what="CT1 admitted again")


def test_peer_that_may_not_receive_results_is_refused_as_destination(tmp_path):
    import pytest
    import yaml

    from dicom_node.config import load_config
    from dicom_node.errors import ConfigError
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({
        "peers": [{"name": "ct1", "ae_title": "CT1", "host": "127.0.0.1", "port": 104,
                   "may_receive_results": False}],
        "destinations": [{"name": "back", "kind": "dicom", "peer": "ct1"}]}))
    with pytest.raises(ConfigError, match="may_receive_results: false"):
        load_config(path)
