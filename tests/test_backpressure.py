"""Back-pressure and resource limits: the disk watermark, decompression
bombs, and retention of finished work."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pynetdicom
import pytest
from helpers import REPO, echoscu, http_get, storescu, wait_for, write_ct_series
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pynetdicom import AE

from dicom_node.config import Config
from dicom_node.limits import DiskWatermark, declared_pixel_bytes
from dicom_node.store.db import InstanceRecord, Store
from dicom_node.store.retention import run_retention
from dicom_node.store.layout import DataDir
from dicom_node.store.spool import Spool
from dicom_node.infer.worker import Worker, result_dir

MiB = 1024 * 1024
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# -- a small file system --------------------------------------------------------


def _mount(args: list[str]) -> bool:
    return subprocess.run(args, capture_output=True, timeout=60, check=False).returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 64 MiB file system: tmpfs if mounting is permitted, else a loop
    device, else (no privilege at all) the test's own file system with a
    floor placed relative to its current free space.  Yields (dir, how)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    how = None
    image = tmp_path / "fs.img"
    if _mount(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)]):
        how = "tmpfs"
    else:
        with image.open("wb") as f:
            f.truncate(64 * MiB)
        if (_mount(["mkfs.ext4", "-q", "-F", str(image)])
                and _mount(["mount", "-o", "loop", str(image), str(mnt)])):
            how = "loop"
    yield mnt, how or "shared"
    if how is not None:
        # Lazy: the node may still hold files open while the fixture ends.
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60, check=False)
    image.unlink(missing_ok=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, size: int) -> None:
    """Write real (not sparse) bytes so the file system really loses them."""
    chunk = b"\xa5" * MiB
    with path.open("wb") as f:
        for _ in range(size // MiB + 1):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _raw_store(port: int, path: Path, sop_class: str = CT_IMAGE) -> int:
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _metric(node, name: str) -> float | None:
    for line in node.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# -- disk watermark -------------------------------------------------------------


def test_disk_watermark_refuses_then_recovers_without_restart(node_factory, small_fs, tmp_path):
    """Fill the data dir's file system below ``node.min_free_bytes``: new
    instances get 0xA700, readiness and the gauge say why, acknowledged
    instances stay; delete the filler and storing works again, no restart.

    The file system is a 64 MiB tmpfs when mounting is permitted (it was where
    this was written: tests run as root), else a 64 MiB ext4 loop device, else
    the test's own file system with the floor set 48 MiB under its free space
    (shared with other processes, so that path is the least exact).
    """
    fs, how = small_fs
    data = fs / "data"
    data.mkdir()
    floor = 32 * MiB if how != "shared" else _free(fs) - 48 * MiB
    node = node_factory(routes=[], node={"data_dir": str(data), "min_free_bytes": floor,
                                         "workers": 0})
    node.data_dir = data  # for node.store()
    node.start()
    first = write_ct_series(tmp_path / "a", n=4, size=64, seed="wm-a")
    storescu(node.port, first)
    assert node.store().count_instances() == 4
    assert _metric(node, "dicom_node_disk_below_watermark") == 0.0
    spooled = {p: (data / "spool" / node.store().instance(_sop(p)).path).read_bytes() for p in first}

    filler = fs / "filler.bin"
    _fill(filler, _free(fs) - floor + 4 * MiB)
    assert _free(fs) < floor, (how, _free(fs), floor)

    # The receiver's reading is cached for up to ~0.5 s; readiness shares it,
    # so once readiness fails the receiver refuses too.
    wait_for(lambda: not node.ready(), 10, 0.1, f"readiness failing below the watermark ({how})")
    later = write_ct_series(tmp_path / "b", n=3, size=64, seed="wm-b")
    assert _raw_store(node.port, later[0]) == 0xA700
    # storescu exits with the high byte of the last failed DIMSE status.
    assert storescu(node.port, later, check=False).returncode == 0xA7
    assert node.store().count_instances() == 4
    log = node.log()
    assert "below node.min_free_bytes" in log and f"{floor}" in log
    assert f"refused instance {_sop(later[0])}" in log
    status, body = http_get(f"http://127.0.0.1:{node.http_port}/readyz")
    assert status == 503
    assert "below node.min_free_bytes" in json.loads(body)["checks"]["disk"]
    assert _metric(node, "dicom_node_disk_below_watermark") == 1.0
    # The node still answers, and nothing acknowledged was lost.
    assert echoscu(node.port).returncode == 0
    for path, content in spooled.items():
        assert (data / "spool" / node.store().instance(_sop(path)).path).read_bytes() == content

    filler.unlink()
    wait_for(node.ready, 10, 0.2, "readiness back once space returned")
    storescu(node.port, later)
    assert node.store().count_instances() == 7
    assert _metric(node, "dicom_node_disk_below_watermark") == 0.0
    assert "bytes free again" in node.log()


def test_associations_refused_below_watermark_when_configured(node_factory):
    """With refuse_associations_below_watermark the node rejects associations
    as transient congestion (a floor no disk reaches keeps it below)."""
    node = node_factory(routes=[], node={"min_free_bytes": 2 ** 60, "workers": 0,
                                         "refuse_associations_below_watermark": True})
    node.start(wait=False)
    wait_for(lambda: http_get(f"http://127.0.0.1:{node.http_port}/readyz")[0] == 503, 60, 0.1,
             "readiness answering 503")
    refused = echoscu(node.port)
    assert refused.returncode != 0
    assert "Temporary Congestion" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert 'result="rejected_disk_below_watermark"' in node.metrics()


def test_watermark_reads_free_space_at_most_every_half_second_unless_crossing():
    calls: list[int] = []
    free = [100 * MiB]
    clock = [0.0]

    class _St:
        f_frsize = 1

        @property
        def f_bavail(self) -> int:
            return free[0]

    def statvfs(_path: Path) -> _St:
        calls.append(1)
        return _St()

    mark = DiskWatermark(Path("."), 50 * MiB, statvfs=statvfs, clock=lambda: clock[0])
    assert not mark.below() and len(calls) == 1
    for _ in range(100):
        assert not mark.below()
    assert len(calls) == 1, "cached between refreshes"
    # Writes that bring the estimate under the floor force a reading at once.
    free[0] = 10 * MiB
    mark.note_written(60 * MiB)
    assert mark.below() and len(calls) == 2
    free[0] = 100 * MiB
    assert mark.below() and len(calls) == 2, "still cached"
    clock[0] = 0.6
    assert not mark.below() and len(calls) == 3


# -- decompression bombs ----------------------------------------------------------


def _bomb(tmp_path: Path) -> Path:
    """A valid header declaring 65535 x 65535 x 10000 frames of 16 bits
    (~86 TB decoded) with 16 bytes of pixel data."""
    [good] = write_ct_series(tmp_path / "src", n=1, size=64, seed="bomb")
    ds = dcmread(good)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 10000
    ds.PixelData = b"\x00" * 16
    path = tmp_path / "bomb.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    assert declared_pixel_bytes(ds) == 65535 * 65535 * 10000 * 2
    return path


def test_decompression_bomb_is_refused_and_node_keeps_answering(node_factory, tmp_path, monkeypatch):
    node = node_factory(routes=[], node={"workers": 0}).start()
    bomb = _bomb(tmp_path)
    # Send the file as written, not re-encoded by pydicom.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assert _raw_store(node.port, bomb) == 0xC220
    # storescu exits with the high byte of the failed DIMSE status.
    assert storescu(node.port, [bomb], check=False).returncode == 0xC2
    assert node.store().count_instances() == 0
    assert not list((node.data_dir / "spool").glob("*/*/*.dcm"))
    assert f"refused instance {_sop(bomb)}: declared pixel data of {65535 * 65535 * 10000 * 2}" \
        in node.log()
    assert 'status="0xC220"' in node.metrics()
    assert echoscu(node.port).returncode == 0
    # A normal instance is still welcome.
    storescu(node.port, write_ct_series(tmp_path / "ok", n=1, size=64, seed="after-bomb"))
    assert node.store().count_instances() == 1


def _config(data_dir: Path, **node: object) -> Config:
    return Config.model_validate({
        "node": {"data_dir": str(data_dir), **node},
        "destinations": [{"name": "out", "kind": "folder", "path": "out"}],
        "routes": [{"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise",
                    "destinations": ["out"], "match": [{"keyword": "Modality", "equals": "CT"}]}],
        "inference": {"providers": ["CPUExecutionProvider"],
                      "models_dir": str(REPO / "models_onnx")},
        "base_dir": str(data_dir.parent),
    })


def _record(store: Store, spool: Spool, path: Path) -> InstanceRecord:
    ds = dcmread(path, stop_before_pixels=True)
    target = spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                            str(ds.SOPInstanceUID))
    spool.write(target, path.read_bytes())
    rec = InstanceRecord(sop_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
                         study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                         transfer_syntax="1.2.840.10008.1.2.1",
                         path=str(target.relative_to(spool.root)), size=target.stat().st_size)
    store.record_instance(rec, modality="CT", calling_ae="SCU", called_ae="DICOM_NODE",
                          expected_count=None)
    return rec


def test_worker_fails_job_of_spooled_bomb_without_allocating(tmp_path):
    """A bomb already in the spool (received before the limit was lowered, or
    re-indexed after a crash) fails its job with the reason; the worker never
    allocates the declared size."""
    config = _config(tmp_path / "data")
    store = Store(config.data_dir / "node.db")
    spool = Spool(config.data_dir / "spool", durable=False)
    rec = _record(store, spool, _bomb(tmp_path))
    job_id = store.complete_series([store.series(rec.series_uid)], route="ct",
                                   pipeline="ct_denoise", model="ct_denoise", group_key=rec.series_uid)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert Worker(config, store, "w-test").run_one()
    job = store.job(job_id)
    assert job.state == "failed"
    assert f"instance {rec.sop_uid}" in job.reason and "node.max_pixel_bytes" in job.reason
    # ru_maxrss is in KiB: the model and pydicom, not gigabytes of pixels.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 512 * 1024


# -- retention --------------------------------------------------------------------


def _result(config: Config, job_id: int, name: str) -> Path:
    folder = result_dir(config, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    path.write_bytes(b"result")
    return path


def test_retention_removes_only_what_nothing_needs(tmp_path):
    config = _config(tmp_path / "data")
    store = Store(config.data_dir / "node.db")
    spool = Spool(config.data_dir / "spool", durable=False)

    def series(name: str) -> list[InstanceRecord]:
        paths = write_ct_series(tmp_path / name, n=2, size=32, seed=name)
        return [_record(store, spool, p) for p in paths]

    def job(recs: list[InstanceRecord]) -> int:
        uid = recs[0].series_uid
        return store.complete_series([store.series(uid)], route="ct", pipeline="ct_denoise",
                                     model="ct_denoise", group_key=uid)

    done, queued, receiving, pending = series("done"), series("queued"), series("recv"), series("pend")
    done_job, pending_job, queued_job = job(done), job(pending), job(queued)
    for job_id in (done_job, pending_job):  # the third stays queued: its series must stay
        assert store.claim_job("w").id == job_id
    done_out = _result(config, done_job, "r1")
    pending_out = _result(config, pending_job, "r2")
    store.finish_job(done_job, "done", results=[("out", str(done_out), "1.2.3.1", CT_IMAGE)])
    store.finish_job(pending_job, "done", results=[("out", str(pending_out), "1.2.3.2", CT_IMAGE)])
    store.mark_sent([i.id for i in store.outbox_items(done_job)])
    folder_copy = config.data_dir / "out" / "r1.dcm"  # a folder destination's copy
    folder_copy.parent.mkdir(parents=True)
    folder_copy.write_bytes(b"site copy")

    # Within the age nothing goes.
    report = run_retention(store, DataDir(config.data_dir), spool_days=7, results_days=7)
    assert report.series == 0 and report.result_folders == 0

    # Ages 0, a moment later: everything finished is old enough.
    later = time.time() + 1
    report = run_retention(store, DataDir(config.data_dir), spool_days=0, results_days=0, now=later)
    assert (report.series, report.instances, report.result_folders) == (2, 4, 1)
    for rec in done + pending:  # every job ended: files, rows and folders go
        assert store.instance(rec.sop_uid) is None
        assert not (spool.root / rec.path).exists()
    assert store.series(done[0].series_uid) is None
    assert not (spool.root / done[0].study_uid).exists()
    for rec in queued + receiving:  # a queued job, a series still receiving: kept
        assert store.instance(rec.sop_uid) is not None
        assert (spool.root / rec.path).exists()
    assert not result_dir(config, done_job).exists()
    assert pending_out.read_bytes() == b"result", "a pending outbox item keeps its folder"
    assert folder_copy.read_bytes() == b"site copy"
    assert store.outbox_items(pending_job)[0].state == "pending"
    assert store.job(queued_job).state == "queued"

    # Once sent, the pending job's folder goes too; a new instance of a purged
    # series is received into a fresh folder.
    store.mark_sent([i.id for i in store.outbox_items(pending_job)], now=later - 0.5)
    assert run_retention(store, DataDir(config.data_dir), spool_days=0, results_days=0,
                         now=later).result_folders == 1
    assert not result_dir(config, pending_job).exists()
    again = write_ct_series(tmp_path / "done", n=1, size=32, seed="done")
    assert _record(store, spool, again[0]).series_uid == done[0].series_uid
    assert store.series(done[0].series_uid).instance_count == 1


def test_retention_loop_runs_in_the_node(node_factory, tmp_path):
    """The service's loop purges a completed, unrouted series with age 0."""
    node = node_factory(routes=[], node={"workers": 0},
                        extra={"retention": {"spool_days": 0, "results_days": 0,
                                             "interval_s": 0.5}}).start()
    files = write_ct_series(tmp_path / "in", n=3, size=64, seed="ret-loop")
    storescu(node.port, files)
    assert node.store().count_instances() == 3
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert node.cli("complete", series_uid).returncode == 0
    wait_for(lambda: node.store().count_instances() == 0, 30, 0.2, "retention purged the series")
    assert not list((node.data_dir / "spool").glob("*/*/*.dcm"))
    assert "retention removed 1 series (3 instances)" in node.log()
