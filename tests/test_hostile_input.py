"""Hostile input that reaches the store: codestream bombs inside honest DICOM
headers, unreadable spooled files, a duplicate across series plus a restart,
log-forging UIDs and patient data in routing attributes."""

from __future__ import annotations

import io
import logging
import os
import resource
import struct
from pathlib import Path

import numpy as np
import openjpeg
import pydicom
import pytest
from helpers import REPO, storescu, wait_for, write_ct_series
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless
from pynetdicom import AE

from dicom_node.config import Config
from dicom_node.limits import CodestreamError, check_encapsulated_frames
from dicom_node.observability.logs import RepeatLog, escape, setup_logging
from dicom_node.route.router import WITHHELD_KEYWORDS, RouteFacts, decide
from dicom_node.store.db import InstanceRecord, Store
from dicom_node.store.reconcile import IndexEntry, reconcile
from dicom_node.store.spool import Spool
from dicom_node.infer.worker import Worker

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
GiB = 1024 ** 3


def _config(data_dir: Path) -> Config:
    return Config.model_validate({
        "node": {"data_dir": str(data_dir)},
        "destinations": [{"name": "out", "kind": "folder", "path": "out"}],
        "routes": [{"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise",
                    "destinations": ["out"], "match": [{"keyword": "Modality", "equals": "CT"}]}],
        "inference": {"providers": ["CPUExecutionProvider"],
                      "models_dir": str(REPO / "models_onnx")},
        "base_dir": str(data_dir.parent),
    })


def _spool_job(tmp_path: Path, datasets: list) -> tuple[Config, Store, int, list[InstanceRecord]]:
    """Datasets spooled and recorded as one series, and a queued job for it."""
    config = _config(tmp_path / "data")
    store = Store(config.data_dir / "node.db")
    spool = Spool(config.data_dir / "spool", durable=False)
    records = []
    for ds in datasets:
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        target = spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                str(ds.SOPInstanceUID))
        spool.write(target, buf.getvalue())
        rec = InstanceRecord(sop_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
                             study_uid=str(ds.StudyInstanceUID),
                             series_uid=str(ds.SeriesInstanceUID),
                             transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                             path=str(target.relative_to(spool.root)), size=len(buf.getvalue()))
        store.record_instance(rec, modality="CT", calling_ae="SCU", called_ae="DICOM_NODE",
                              expected_count=None)
        records.append(rec)
    uid = records[0].series_uid
    job_id = store.complete_series([store.series(uid)], route="ct", pipeline="ct_denoise",
                                   model="ct_denoise", group_key=uid)
    return config, store, job_id, records


def _ct(tmp_path: Path, seed: str, n: int = 2) -> list:
    return [dcmread(p) for p in write_ct_series(tmp_path / seed, n=n, size=64, seed=seed)]


# -- codestreams that disagree with their header ------------------------------------


def _j2k_bomb(ds) -> None:
    """A real 64x64 JPEG 2000 codestream whose SIZ marker is patched to declare
    65535 x 65535 (one tile): the decoder would allocate ~8 GiB."""
    pixels = np.zeros((64, 64), dtype=np.uint16)
    codestream = bytearray(openjpeg.encode(pixels, bits_stored=12))
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    struct.pack_into(">II", codestream, 8, 65535, 65535)  # Xsiz, Ysiz
    struct.pack_into(">II", codestream, 24, 65535, 65535)  # XTsiz, YTsiz
    assert openjpeg.get_parameters(bytes(codestream))["rows"] == 65535, "a decodable header"
    ds.PixelData = encapsulate([bytes(codestream)])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _jpeg_mismatch(ds) -> None:
    """A real baseline JPEG of 64x64 whose SOF declares 64 x 4096 lines."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">H", data, sof + 5, 4096)  # Y (lines)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([bytes(data)])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _rle_mismatch(ds) -> None:
    """An RLE frame of 6 segments (16-bit RGB) under a 16-bit grayscale header
    (2 segments)."""
    segments = [bytes([0x81, 0]) * 32 for _ in range(6)]
    offsets = [64]
    for seg in segments[:-1]:
        offsets.append(offsets[-1] + len(seg))
    header = struct.pack("<16I", 6, *offsets, *([0] * (15 - len(offsets))))
    ds.PixelData = encapsulate([header + b"".join(segments)])
    ds.file_meta.TransferSyntaxUID = RLELossless


@pytest.mark.parametrize("make, reason", [
    (_j2k_bomb, "codestream declares 65535x65535x1 samples of 12 bits (8589672450 bytes), "
                "over node.max_pixel_bytes"),
    (_jpeg_mismatch, "codestream declares 64x4096 with 1 components of 8 bits, the DICOM "
                     "header 64x64"),
    (_rle_mismatch, "RLE header declares 6 segments, the DICOM header's SamplesPerPixel 1 x "
                    "BitsAllocated 16 needs 2"),
], ids=["jpeg2000-65535", "jpeg-baseline-sof", "rle-segments"])
def test_codestream_disagreeing_with_header_fails_job_before_decoding(tmp_path, make, reason):
    datasets = _ct(tmp_path, f"cs-{make.__name__}")
    make(datasets[1])
    config, store, job_id, records = _spool_job(tmp_path, datasets)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert Worker(config, store, "w-test").run_one()
    job = store.job(job_id)
    assert job.state == "failed", job
    assert f"instance {records[1].sop_uid}: frame 1: {reason}" in job.reason
    # ru_maxrss is in KiB: never the gigabytes the codestream declares.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 256 * 1024


def test_honest_codestreams_of_pydicoms_corpus_pass():
    """JPEG 2000, JPEG baseline and extended, JPEG-LS and RLE (8, 16, 32 bit,
    multi-frame, RGB) as written by other toolkits agree with their headers."""
    names = ["JPEG2000.dcm", "MR_small_jp2klossless.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_dcmtk.dcm",
             "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_rle.dcm",
             "SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_32bit.dcm", "rtdose_rle.dcm",
             "MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"]
    checked = 0
    for name in names:
        path = TEST_FILES / name
        if not path.exists():
            continue
        ds = dcmread(path)
        frames = int(ds.get("NumberOfFrames") or 1)
        assert check_encapsulated_frames(
            ds, generate_frames(ds.PixelData, number_of_frames=frames),
            str(ds.file_meta.TransferSyntaxUID), 2 * GiB) == frames, name
        checked += 1
    assert checked >= 8


def test_truncated_codestream_names_the_frame():
    ds = dcmread(TEST_FILES / "JPEG2000.dcm")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    with pytest.raises(CodestreamError, match="frame 1: JPEG 2000 SIZ marker is truncated"):
        check_encapsulated_frames(ds, iter([frame[:20]]), str(ds.file_meta.TransferSyntaxUID),
                                  2 * GiB)


# -- an unreadable spooled instance --------------------------------------------------


def test_unreadable_spooled_instance_fails_the_job_naming_it(tmp_path):
    """The job must not report done on part of a series."""
    config, store, job_id, records = _spool_job(tmp_path, _ct(tmp_path, "unreadable", n=3))
    (config.data_dir / "spool" / records[2].path).write_bytes(b"DICM but not really")
    assert Worker(config, store, "w-test").run_one()
    job = store.job(job_id)
    assert job.state == "failed"
    assert f"instance {records[2].sop_uid} of series {records[2].series_uid} is unreadable" \
        in job.reason and "the series is incomplete" in job.reason


# -- duplicates across series ----------------------------------------------------------


def _reassign(paths: list[Path], study_uid: str, series_uid: str, folder: Path) -> list[Path]:
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        out.append(folder / f"{i:03d}.dcm")
        dcmwrite(out[-1], ds, enforce_file_format=True)
    return out


def test_duplicate_in_another_series_stays_replaced_after_restart(node_factory, tmp_path):
    node = node_factory(routes=[], node={"workers": 0}).start()
    series_a = write_ct_series(tmp_path / "a", n=3, size=64, seed="dup-a")
    storescu(node.port, series_a)
    head = dcmread(series_a[0], stop_before_pixels=True)
    uid_a, sop = str(head.SeriesInstanceUID), str(head.SOPInstanceUID)
    uid_b = uid_a + ".2"
    # The same instance, re-sent corrected into series B with one more image.
    series_b = _reassign([series_a[0], *write_ct_series(tmp_path / "b0", n=1, size=64,
                                                          seed="dup-b")],
                         str(head.StudyInstanceUID), uid_b, tmp_path / "b")
    storescu(node.port, series_b)
    store = node.store()
    assert store.instance(sop).series_uid == uid_b
    spool = node.data_dir / "spool"
    assert not list(spool.glob(f"*/{uid_a}/{sop}.dcm")), "the replaced copy's file is removed at once"
    # As if the node had died between recording the new copy and removing the
    # old file: reconciliation must still keep the newer one.
    stale = spool / store.instance(sop).path
    old = spool / str(head.StudyInstanceUID) / uid_a / f"{sop}.dcm"
    old.write_bytes(series_a[0].read_bytes())
    os.utime(old, (stale.stat().st_mtime - 5, stale.stat().st_mtime - 5))
    assert node.stop() == 0

    node.start()
    store = node.store()
    assert store.instance(sop).series_uid == uid_b, "the replaced copy came back"
    assert {r.sop_uid for r in store.instances_of(uid_b)} == \
        {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series_b}
    assert store.series(uid_b).instance_count == 2
    assert store.series(uid_a).instance_count == 2
    assert not list(spool.glob(f"*/{uid_a}/{sop}.dcm")), "stale copy left in series A"
    assert (spool / store.instance(sop).path).exists()
    log = node.log()
    assert "spool reconciliation: indexed 0 spooled instances whose record was lost, " \
           "removed 1 superseded copies" in log
    assert "whose record was lost in a crash" not in log


def test_reconcile_keeps_the_newest_copy_when_its_record_was_lost(tmp_path):
    """A power cut lost the record of the newer copy (series B): B is indexed,
    the stale A copy removed; a second pass finds nothing."""
    store = Store(tmp_path / "node.db")
    spool = Spool(tmp_path / "spool", durable=False)
    [ds] = _ct(tmp_path, "lost", n=1)

    def put(series_uid: str, record: bool) -> Path:
        ds.SeriesInstanceUID = series_uid
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        path = spool.path_for(str(ds.StudyInstanceUID), series_uid, str(ds.SOPInstanceUID))
        spool.write(path, buf.getvalue())
        if record:
            store.record_instance(_entry(path, spool).record, modality="CT", calling_ae="",
                                  called_ae="", expected_count=None)
        return path

    old = put("1.2.3.1", record=True)
    new = put("1.2.3.2", record=False)
    # Received a second apart (file times can be as coarse as a few ms).
    stamp = new.stat().st_mtime_ns - 10 ** 9
    os.utime(old, ns=(stamp, stamp))
    report = reconcile(spool, store, lambda p, rel: _entry(p, spool))
    assert (report.indexed, report.superseded) == (1, 1)
    assert store.instance(str(ds.SOPInstanceUID)).series_uid == "1.2.3.2"
    assert new.exists() and not old.exists()
    assert not reconcile(spool, store, lambda p, rel: _entry(p, spool))


def _entry(path: Path, spool: Spool) -> IndexEntry:
    ds = dcmread(path, stop_before_pixels=True)
    return IndexEntry(InstanceRecord(
        sop_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        path=str(path.relative_to(spool.root)), size=path.stat().st_size), "CT", None)


# -- logs and routing reasons ------------------------------------------------------------


def test_escape_and_the_text_formatter_never_pass_control_characters(capsys):
    assert escape("1.2\n3\r\x00\x1b[31m\x85\u2028") == "1.2\\n3\\r\\0\\x1b[31m\\x85\\u2028"
    assert escape("9" * 300).endswith("...(+44 chars)")
    setup_logging("INFO")
    try:
        logging.getLogger("dicom_node.test").warning("refused %s", "1.2\nCRITICAL forged\x00")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("dicom_node.test").exception("with traceback\n")
    finally:
        logging.getLogger().handlers[:] = []
    err = capsys.readouterr().err
    assert "refused 1.2\\nCRITICAL forged\\0" in err
    assert "\x00" not in err and not any(line.startswith("CRITICAL") for line in err.splitlines())
    assert "Traceback (most recent call last):\n" in err, "our own tracebacks keep their lines"


def test_repeat_log_says_once_then_counts(caplog):
    clock = [0.0]
    repeat = RepeatLog(logging.getLogger("dicom_node.test"), logging.ERROR, every_s=60,
                       clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="dicom_node.test"):
        for i in range(240):  # two minutes of a loop failing every 0.5 s
            clock[0] = i * 0.5
            repeat.report("completion pass failed: disk full")
        repeat.clear()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "completion pass failed: disk full"
    assert len(lines) == 3, lines
    assert "again 120 times in the last 60 s" in lines[1]
    assert "recovered after 240 failures" in lines[2]


def test_reasons_name_patient_attributes_never_their_values(tmp_path):
    import yaml
    from pydicom import Dataset

    from dicom_node.config import load_config

    assert {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDescription",
            "InstitutionName", "ReferringPhysicianName", "OtherPatientIDs",
            "PatientAddress"} <= WITHHELD_KEYWORDS
    ops = [{"equals": "X"}, {"one_of": ["X", "Y"]}, {"regex": "^X"}, {"contains": "X"},
           {"range": {"min": 1000}}]
    routes = [{"name": f"r{i}", "pipeline": "p", "model": "m", "destinations": ["d"],
               "match": [{"keyword": kw, **op}]}
              for i, (kw, op) in enumerate((kw, op) for kw in ("PatientID", "PatientWeight")
                                            for op in ops)]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"destinations": [{"name": "d", "kind": "folder",
                                                      "path": "x"}], "routes": routes}))
    ds = Dataset()
    ds.PatientID, ds.PatientWeight = "PHI123456", "87.5"
    reason = decide(list(load_config(path).routes), RouteFacts(ds)).reason
    assert "PHI123456" not in reason and "87.5" not in reason
    assert "PatientID is <value withheld>, not 'X'" in reason
    # Other attributes show their value, escaped.
    ds = Dataset()
    ds.Modality = "CT\nCRITICAL"
    [route] = _modality_route(tmp_path)
    assert "Modality is 'CT\\\\nCRITICAL', not 'MR'" in decide([route], RouteFacts(ds)).reason


def _modality_route(tmp_path: Path) -> list:
    import yaml

    from dicom_node.config import load_config

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "destinations": [{"name": "d", "kind": "folder", "path": "x"}],
        "routes": [{"name": "mr", "pipeline": "p", "model": "m", "destinations": ["d"],
                    "match": [{"keyword": "Modality", "equals": "MR"}]}]}))
    return list(load_config(path).routes)


def _store_raw(port: int, ds) -> int:
    """C-STORE a dataset whatever its UIDs hold (pynetdicom does not check)."""
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CT_IMAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_phi_and_forged_lines_never_reach_the_node_log(node_factory, tmp_path):
    route = {"name": "pid", "pipeline": "ct_denoise", "model": "ct_denoise",
             "destinations": ["out"], "quiet_seconds": 0.5,
             "match": [{"keyword": "PatientID", "equals": "SOMEONE-ELSE"}]}
    node = node_factory(routes=[route], node={"workers": 0}).start()
    files = write_ct_series(tmp_path / "phi", n=2, size=64, seed="phi", patient_id="PHI123456")
    storescu(node.port, files)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert node.cli("complete", series_uid).returncode == 0
    series = wait_for(lambda: (s := node.store().series(series_uid)) and s.state == "complete"
                      and s, 30, 0.1, "series completed unrouted")
    assert series.route is None and "PatientID is <value withheld>" in series.unrouted_reason
    assert "PHI123456" not in series.unrouted_reason

    forged = "1.2.3\n2026-12-01 00:00:00,000 CRITICAL forged line"
    for uid in (forged, "1.2.3\x00\x00\x1b[2J"):
        ds = dcmread(files[0])
        ds.SOPInstanceUID = uid
        status = _store_raw(node.port, ds)
        assert status != 0x0000, hex(status)
    wait_for(lambda: node.log().count("refused instance") >= 2, 10, 0.1, "refusals logged")
    raw = node.log_path.read_bytes()
    assert b"PHI123456" not in raw
    assert b"\x00" not in raw
    lines = raw.decode(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("2026-12-01 00:00:00,000 CRITICAL")]
    assert any("1.2.3\\n2026-12-01" in line for line in lines)


# -- completion: a bug is not a routing decision ------------------------------------------


def test_completion_bug_is_retried_not_recorded_as_unrouted(tmp_path, monkeypatch, caplog):
    from prometheus_client import CollectorRegistry

    from dicom_node.complete import completer as completer_module
    from dicom_node.observability.metrics import Metrics

    config, store, _, records = _spool_job(tmp_path, _ct(tmp_path, "bug", n=1))
    uid = str(dcmread(tmp_path / "data" / "spool" / records[0].path).SeriesInstanceUID)
    store.record_instance(records[0], modality="CT", calling_ae="SCU", called_ae="DICOM_NODE",
                          expected_count=None)  # reopens the series
    completer = completer_module.Completer(config, store, Metrics(CollectorRegistry()))

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in routing")

    monkeypatch.setattr(completer_module, "decide", broken)
    with caplog.at_level(logging.ERROR, logger="dicom_node.complete"):
        for _ in range(5):
            assert completer.run_once(now=10 ** 10) == []
    series = store.series(uid)
    assert series.state == "receiving" and series.unrouted_reason is None
    assert len([r for r in caplog.records if "a bug in routing" in r.getMessage()]) == 1

    monkeypatch.undo()
    (tmp_path / "data" / "spool" / records[0].path).write_bytes(b"not DICOM")
    assert completer.run_once(now=10 ** 10) == []
    assert f"cannot read instance {records[0].sop_uid}" in store.series(uid).unrouted_reason
