"""The SQLite store and the completer's rules, in-process."""

from __future__ import annotations

import threading

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from prometheus_client import CollectorRegistry

from dicom_node.complete.completer import Completer
from dicom_node.config import load_config
from dicom_node.observability.metrics import Metrics
from dicom_node.store.db import InstanceRecord, Store
from dicom_node.store.spool import Spool, is_valid_uid
from helpers import write_ct_series


def _rec(sop: str, series: str = "1.2.3", study: str = "1.2") -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.2", study_uid=study,
                          series_uid=series, transfer_syntax="1.2.840.10008.1.2.1",
                          path=f"{study}/{series}/{sop}.dcm", size=10)


def _record(store: Store, rec: InstanceRecord, now: float, expected: int | None = None) -> bool:
    return store.record_instance(rec, modality="CT", calling_ae="A", called_ae="B",
                                 expected_count=expected, now=now)


def test_duplicate_and_reopen_after_completion(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    assert _record(store, _rec("1.1"), 100.0) is False
    assert _record(store, _rec("1.1"), 101.0) is True
    assert store.count_instances() == 1
    series = store.series("1.2.3")
    job = store.complete_series([series], route="r", pipeline="p", model="m", group_key="1.2.3", now=105)
    assert job is not None and store.series("1.2.3").state == "complete"
    _record(store, _rec("1.4"), 200.0)  # late instance
    reopened = store.series("1.2.3")
    assert reopened.state == "receiving" and reopened.generation == 1 and reopened.instance_count == 2
    second = store.complete_series([reopened], route="r", pipeline="p", model="m", group_key="1.2.3", now=205)
    assert second != job


def test_completion_loses_the_race_to_a_new_instance(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    _record(store, _rec("1.1"), 100.0)
    stale = store.series("1.2.3")
    _record(store, _rec("1.2"), 101.0)
    assert store.complete_series([stale], route="r", pipeline="p", model="m", group_key="k") is None
    assert store.series("1.2.3").state == "receiving"


def test_two_workers_never_claim_the_same_job(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for i in range(20):
        _record(store, _rec(f"1.{i}", series=f"9.{i}"), 100.0)
        store.complete_series([store.series(f"9.{i}")], route="r", pipeline="p", model="m",
                              group_key=f"9.{i}")
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(name: str) -> None:
        s = Store(tmp_path / "db.sqlite")
        while (job := s.claim_job(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20


def test_requeue_then_fail_after_max_attempts(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    _record(store, _rec("1.1"), 100.0)
    store.complete_series([store.series("1.2.3")], route="r", pipeline="p", model="m", group_key="k")
    for _ in range(2):
        assert store.claim_job("w") is not None
        store.requeue_running("w", max_attempts=2, reason="worker died")
    job = store.jobs()[0]
    assert job.state == "failed" and "worker died after 2 attempts" in job.reason


def test_outbox_backoff_dead_and_retry(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    _record(store, _rec("1.1"), 100.0)
    job_id = store.complete_series([store.series("1.2.3")], route="r", pipeline="p", model="m",
                                   group_key="k")
    store.claim_job("w")
    store.finish_job(job_id, "done", None, [("pacs", "/x.dcm", "5.5", "1.2")], now=1000.0)
    [item] = store.due_outbox(now=1000.0)
    store.mark_retry(item.id, 2000.0, "refused")
    assert store.due_outbox(now=1500.0) == []
    store.mark_dead(item.id, "gave up")
    assert store.outbox_items()[0].state == "dead"
    assert store.retry_dead() == 1
    assert store.outbox_items()[0].state == "pending"


def test_uids_are_checked_before_they_become_paths(tmp_path):
    spool = Spool(tmp_path / "spool")
    assert not is_valid_uid("1.2.3/../../x")
    assert not is_valid_uid("1." * 40)
    for bad in ("1.2.3/../../x", "..", "1.2\x00", ""):
        try:
            spool.path_for("1.2", bad, "1.3")
        except ValueError as exc:
            assert "invalid Series UID" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted as a path component")


def _completer(tmp_path, routes):
    cfg = tmp_path / "node.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump({
        "node": {"data_dir": str(tmp_path / "data")},
        "destinations": [{"name": "d", "kind": "folder", "path": "x"}], "routes": routes}))
    config = load_config(cfg)
    store = Store(config.data_dir / "node.db")
    return config, store, Completer(config, store, Metrics(CollectorRegistry()))


def _ingest(config, store, files, now, expected=None):
    from pydicom import dcmread
    spool = Spool(config.data_dir / "spool")
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        spool.write(path, f.read_bytes())
        store.record_instance(InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID,
                                             ds.SeriesInstanceUID, "1.2.840.10008.1.2.1",
                                             str(path.relative_to(spool.root)), 1),
                              modality="CT", calling_ae="A", called_ae="B", expected_count=expected, now=now)


def test_quiet_period_expected_count_and_unrouted(tmp_path):
    route = {"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise", "destinations": ["d"],
             "quiet_seconds": 10, "match": [{"keyword": "Modality", "equals": "CT"}]}
    config, store, completer = _completer(tmp_path, [route])
    files = write_ct_series(tmp_path / "a", n=3, size=32, seed="quiet")
    _ingest(config, store, files[:2], now=100.0)
    assert completer.run_once(now=105.0) == []
    assert len(completer.run_once(now=110.5)) == 1
    # The data announces 3 images: the third completes the series at once.
    files_b = write_ct_series(tmp_path / "b", n=3, size=32, seed="count")
    _ingest(config, store, files_b, now=200.0, expected=3)
    assert len(completer.run_once(now=200.1)) == 1
    # An MR series matches no route: completed, recorded with the reason, no job.
    mr = write_ct_series(tmp_path / "c", n=1, size=32, seed="mr")
    from pydicom import dcmread
    ds = dcmread(mr[0])
    ds.Modality = "MR"
    ds.save_as(mr[0])
    _ingest(config, store, mr, now=300.0)
    assert completer.run_once(now=311.0) == []
    assert "Modality is 'MR'" in store.series(str(ds.SeriesInstanceUID)).unrouted_reason


def test_group_by_study_waits_for_the_whole_study(tmp_path):
    route = {"name": "cine", "pipeline": "ct_denoise", "model": "ct_denoise", "destinations": ["d"],
             "quiet_seconds": 5, "group_by": "study", "match": [{"keyword": "Modality", "equals": "CT"}]}
    config, store, completer = _completer(tmp_path, [route])
    a = write_ct_series(tmp_path / "a", n=2, size=32, seed="study", series_description="slice 1")
    b = write_ct_series(tmp_path / "b", n=2, size=32, seed="study", series_description="slice 2")
    # Same seed: same study; give the second its own series.
    from pydicom import dcmread
    for f in b:
        ds = dcmread(f)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    _ingest(config, store, a, now=100.0)
    _ingest(config, store, b, now=103.0)
    assert completer.run_once(now=106.0) == []  # study not quiet yet
    [job_id] = completer.run_once(now=108.5)
    assert len(store.job(job_id).series_uids) == 2


def test_folder_syncs_share_one_fsync_and_cover_every_request(tmp_path, monkeypatch):
    """Eight threads ask for a folder fsync at once: each returns only after an
    fsync that started after it asked, and they share far fewer than eight."""
    import time

    from dicom_node.store import spool as spool_module

    runs: list[tuple[float, float]] = []

    def slow_fsync(path):
        start = time.monotonic()
        time.sleep(0.05)
        runs.append((start, time.monotonic()))

    monkeypatch.setattr(spool_module, "fsync_dir", slow_fsync)
    syncs = spool_module.FolderSyncs()
    asked: dict[int, tuple[float, float]] = {}
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        start = time.monotonic()
        syncs.sync(tmp_path)
        asked[i] = (start, time.monotonic())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(asked) == 8
    assert len(runs) <= 3, runs
    for start, end in asked.values():
        assert any(run_start >= start and run_end <= end for run_start, run_end in runs)
    assert syncs._folders == {}  # nothing kept once nobody waits


def test_folder_sync_failure_reaches_the_caller_and_the_next_one_retries(tmp_path, monkeypatch):
    from dicom_node.store import spool as spool_module

    calls = []

    def failing_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "fsync_dir", failing_once)
    syncs = spool_module.FolderSyncs()
    with pytest.raises(OSError):
        syncs.sync(tmp_path)
    syncs.sync(tmp_path)
    assert len(calls) == 2


def test_durable_batch_writes_every_file_or_none(tmp_path, monkeypatch):
    from dicom_node.store import spool as spool_module

    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    (out / "0.dcm").write_bytes(b"old")
    synced: list[str] = []
    real_fsync = spool_module._fsync_path
    monkeypatch.setattr(spool_module, "_fsync_path", lambda p: synced.append(p.name) or real_fsync(p))
    with spool_module.DurableBatch(tmp) as batch:
        for i in range(6):
            batch.write(out / f"{i}.dcm", bytes([i]) * 1000)
        assert not (out / "1.dcm").exists()  # nothing under its final name before the commit
    assert [(out / f"{i}.dcm").read_bytes() for i in range(6)] == [bytes([i]) * 1000 for i in range(6)]
    assert len(synced) == 6 and list(tmp.iterdir()) == []

    with pytest.raises(RuntimeError):
        with spool_module.DurableBatch(tmp) as batch:
            batch.write(out / "0.dcm", b"new")
            batch.write(out / "7.dcm", b"new")
            raise RuntimeError("the pipeline failed half way")
    assert (out / "0.dcm").read_bytes() == bytes(1000) and not (out / "7.dcm").exists()
    assert list(tmp.iterdir()) == []

    def broken(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_fsync_path", broken)
    with pytest.raises(OSError):
        with spool_module.DurableBatch(tmp) as batch:
            batch.write(out / "8.dcm", b"x")
    assert not (out / "8.dcm").exists() and list(tmp.iterdir()) == []


def _result(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.7", uid, "X"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_result_files_written_early_appear_only_with_the_whole_job(tmp_path, monkeypatch):
    """Results handed over early are written and fsynced while the pipeline
    runs, but none is under its final name before the job's every file is
    durable; the returned order is the job's result order."""
    from pydicom import dcmread

    from dicom_node.store import spool as spool_module
    from dicom_node.store.results import ResultFiles

    tmp, folder = tmp_path / "tmp", tmp_path / "out" / "job-7"
    tmp.mkdir()
    fsynced: list[str] = []
    real_fsync = spool_module._fsync_path
    monkeypatch.setattr(spool_module, "_fsync_path", lambda p: fsynced.append(p.name) or real_fsync(p))
    first, second, third = _result("1.2.3.1"), _result("1.2.3.2"), _result("1.2.3.3")
    with ResultFiles(folder, tmp, 7) as files:
        files.early(second)
        files.early(first)
        files._pool.submit(lambda: None).result()  # both early writes done
        parts = list(tmp.iterdir())
        assert len(parts) == 2 and not any(folder.glob("*.dcm"))
        paths = files.complete([first, second, third])
        assert not any(folder.glob("*.dcm"))
    assert [p.name for p in paths] == ["1.2.3.1.dcm", "1.2.3.2.dcm", "1.2.3.3.dcm"]
    assert [str(dcmread(p).SOPInstanceUID) for p in paths] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    # The early ones were fsynced as written (os.fsync), only the last one at the commit.
    assert len(fsynced) == 1 and list(tmp.iterdir()) == []


def test_result_files_leave_nothing_for_a_failed_job_or_a_result_not_returned(tmp_path):
    from dicom_node.errors import DicomNodeError
    from dicom_node.store.results import ResultFiles

    tmp, folder = tmp_path / "tmp", tmp_path / "job-8"
    tmp.mkdir()
    with pytest.raises(RuntimeError):
        with ResultFiles(folder, tmp, 8) as files:
            files.early(_result("1.2.3.1"))
            raise RuntimeError("the pipeline failed after handing a result over")
    # Not even the folder made for the early result stays behind.
    assert not folder.exists() and list(tmp.iterdir()) == []

    kept, dropped = _result("1.2.3.1"), _result("1.2.3.2")
    with ResultFiles(folder, tmp, 8) as files:
        files.early(dropped)
        files.early(kept)
        files.complete([kept])
    assert [p.name for p in folder.iterdir()] == ["1.2.3.1.dcm"] and list(tmp.iterdir()) == []

    with pytest.raises(DicomNodeError, match=r"job 9: pipeline produced invalid SOP Instance UID '1\.x'"):
        with ResultFiles(tmp_path / "job-9", tmp, 9) as files:
            files.early(_result("1.x"))
            files.complete([_result("1.2.3.4")] + list(d for d, _ in files._early.values()))
    assert not (tmp_path / "job-9").exists() and list(tmp.iterdir()) == []


def test_result_files_of_an_earlier_attempt_are_removed_by_the_next(tmp_path):
    """A worker killed mid-job leaves the files it wrote early; the job's
    next attempt removes them, and leaves other jobs' and other writers' alone.
    A block left without complete() (no result list) commits nothing."""
    from dicom_node.store.results import ResultFiles

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with ResultFiles(tmp_path / "job-5", tmp, 5) as files:
        files.early(_result("1.2.3.1"))
    assert not (tmp_path / "job-5").exists() and list(tmp.iterdir()) == []
    for name in ("job-5-0123abcd.part", "job-51-0123abcd.part", "0123abcd.part"):
        (tmp / name).write_bytes(b"x")
    with ResultFiles(tmp_path / "job-5", tmp, 5) as files:
        assert sorted(p.name for p in tmp.iterdir()) == ["0123abcd.part", "job-51-0123abcd.part"]
        files.complete([_result("1.2.3.2")])
    assert [p.name for p in (tmp_path / "job-5").iterdir()] == ["1.2.3.2.dcm"]
    # A failed attempt never removes a folder that holds files.
    with pytest.raises(RuntimeError):
        with ResultFiles(tmp_path / "job-5", tmp, 5) as files:
            files.early(_result("1.2.3.3"))
            files._pool.submit(lambda: None).result()
            raise RuntimeError("failed")
    assert [p.name for p in (tmp_path / "job-5").iterdir()] == ["1.2.3.2.dcm"]
