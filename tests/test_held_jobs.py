"""Held results: an implausible result is written, never sent, until an
operator releases or discards it.

A real Store, a real Worker and the real outbox dispatcher; the pipeline is a
tiny one registered here whose held reasons come from the route's options,
so one pipeline gives both a held and an ordinary result.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from helpers import REPO, write_ct_series
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from dicom_node.config import Config, load_config
from dicom_node.errors import JobStateError
from dicom_node.infer.engine import OnnxModel
from dicom_node.observability.metrics import Metrics, StoreCollector
from dicom_node.pipelines.base import (
    PipelineInput,
    PipelineResult,
    get_pipeline,
    register,
)
from dicom_node.send.outbox import Dispatcher
from dicom_node.store.db import InstanceRecord, JobState, OutboxState, Store
from dicom_node.store.retention import run_retention
from dicom_node.store.layout import DataDir
from dicom_node.store.spool import Spool
from dicom_node.infer.worker import Worker, result_dir

PIPELINE = "test_held_copy"
REASONS = ("LVEDV 2116.0 ml outside plausible 10-500 ml", "LVEF 5.0 % outside plausible 20-90 %")


@register
class _CopyPipeline:
    """Returns a copy of each input with a derived UID; ignores the model.
    The route's ``held`` option is the list of reasons it reports."""

    name = PIPELINE
    # Its held reasons come from the route; the measures are ct_denoise's so
    # that the shipped ct_denoise manifest's range overrides are accepted.
    plausible: ClassVar[dict[str, tuple[float, float]]] = dict(
        getattr(get_pipeline("ct_denoise"), "plausible", {}))

    def check_model(self, manifest: object) -> list[str]:
        return []  # any model: it is never run

    def run(self, job: PipelineInput, model: OnnxModel) -> PipelineResult:
        out = []
        for ds in job.datasets:
            ds = copy.deepcopy(ds)
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.9"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out.append(ds)
        return PipelineResult(out, summary={"copied": len(out)},
                              held=tuple(job.options.get("held", ())))


def _route(name: str, held: tuple[str, ...] = ()) -> dict:
    # The shipped ct_denoise model: the worker's ModelRegistry loads it, the
    # pipeline ignores it.
    return {"name": name, "pipeline": PIPELINE, "model": "ct_denoise",
            "destinations": ["out", "archive"], "match": [{"keyword": "Modality", "equals": "CT"}],
            "options": {"held": list(held)}}


@pytest.fixture
def node(tmp_path: Path) -> tuple[Config, Store, Metrics]:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": {"data_dir": str(tmp_path / "data")},
        "destinations": [{"name": "out", "kind": "folder", "path": "out"},
                         {"name": "archive", "kind": "folder", "path": "archive"}],
        "routes": [_route("held", REASONS), _route("plain")],
        "inference": {"providers": ["CPUExecutionProvider"]}}))
    config = load_config(cfg)
    return config, Store(config.data_dir / "node.db"), Metrics(CollectorRegistry())


def _queue_job(config: Config, store: Store, tmp_path: Path, route: str, seed: str) -> int:
    """Spool a 2-slice CT series and queue a job for it on ``route``."""
    spool = Spool(config.data_dir / "spool")
    files = write_ct_series(tmp_path / seed, n=2, size=32, seed=seed)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        spool.write(path, f.read_bytes())
        store.record_instance(InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID,
                                             ds.SeriesInstanceUID, str(ds.file_meta.TransferSyntaxUID),
                                             str(path.relative_to(spool.root)), f.stat().st_size),
                              modality="CT", calling_ae="MOD", called_ae="DICOM_NODE",
                              expected_count=None, now=100.0)
    series = store.series(str(ds.SeriesInstanceUID))
    job_id = store.complete_series([series], route=route, pipeline=PIPELINE, model="ct_denoise",
                                   group_key=series.series_uid, now=101.0)
    assert job_id is not None
    return job_id


def _run_held(node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> int:
    config, store, metrics = node
    job_id = _queue_job(config, store, tmp_path, "held", "held")
    with caplog.at_level("WARNING", logger="dicom_node.worker"):
        assert Worker(config, store, metrics=metrics).run_one()
    return job_id


def _folder_files(config: Config, name: str) -> list[Path]:
    folder = config.folder_path(config.destination(name))
    return sorted(folder.rglob("*.dcm")) if folder.exists() else []


def test_held_result_is_written_recorded_and_never_sent(node, tmp_path, caplog):
    config, store, metrics = node
    job_id = _run_held(node, tmp_path, caplog)

    job = store.job(job_id)
    assert job.state == JobState.HELD == "held"
    assert job.reason == "; ".join(REASONS)
    items = store.outbox_items(job_id)
    assert len(items) == 4  # 2 objects x 2 destinations
    assert {i.state for i in items} == {OutboxState.HELD}
    assert all(Path(i.path).is_file() and Path(i.path).parent == result_dir(config, job_id)
               for i in items)
    # Nothing is due, and the dispatcher sends nothing, however late it runs.
    assert store.due_outbox(now=1e12) == []
    assert Dispatcher(config, store, metrics).run_once(now=1e12) is False
    assert _folder_files(config, "out") == [] and _folder_files(config, "archive") == []

    registry = metrics.registry
    assert registry.get_sample_value("dicom_node_jobs_held_total", {"pipeline": PIPELINE}) == 1.0
    assert registry.get_sample_value("dicom_node_jobs_finished_total",
                                     {"pipeline": PIPELINE, "state": "held"}) == 1.0
    scrape = CollectorRegistry()
    scrape.register(StoreCollector(store, config.data_dir))
    assert scrape.get_sample_value("dicom_node_jobs", {"pipeline": PIPELINE, "state": "held"}) == 1.0

    [line] = [r for r in caplog.records if r.name == "dicom_node.worker" and r.levelname == "WARNING"]
    message = line.getMessage()
    assert f"job {job_id} held" in message and PIPELINE in message and "ct_denoise" in message
    assert all(reason in message for reason in REASONS)
    # No patient data: the synthetic series' name and IDs are not in the line.
    source = dcmread(next((tmp_path / "held").glob("*.dcm")), stop_before_pixels=True)
    assert str(source.PatientName) not in message and source.PatientID not in message


def test_ordinary_result_is_unchanged(node, tmp_path):
    config, store, metrics = node
    job_id = _queue_job(config, store, tmp_path, "plain", "plain")
    assert Worker(config, store, metrics=metrics).run_one()
    assert store.job(job_id).state == "done" and store.job(job_id).reason is None
    assert {i.state for i in store.outbox_items(job_id)} == {"pending"}
    assert metrics.registry.get_sample_value("dicom_node_jobs_held_total",
                                             {"pipeline": PIPELINE}) == 0


def test_release_sends_the_held_result(node, tmp_path, caplog):
    config, store, metrics = node
    job_id = _run_held(node, tmp_path, caplog)
    released = store.release_job(job_id, now=5000.0)
    assert len(released) == 4
    assert {i.state for i in store.outbox_items(job_id)} == {"pending"}
    # The dead-letter age counts from the release, not from the hold.
    assert {i.created_at for i in store.outbox_items(job_id)} == {5000.0}
    job = store.job(job_id)
    assert job.state == "done"
    assert job.reason == "released by operator after: " + "; ".join(REASONS)
    assert Dispatcher(config, store, metrics).run_once(now=5001.0)
    assert len(_folder_files(config, "out")) == 2 and len(_folder_files(config, "archive")) == 2
    assert {i.state for i in store.outbox_items(job_id)} == {"sent"}
    with pytest.raises(JobStateError, match=f"job {job_id} is done, not held"):
        store.release_job(job_id)


def test_discard_deletes_the_held_result_unsent(node, tmp_path, caplog):
    _, store, _ = node
    job_id = _run_held(node, tmp_path, caplog)
    files = {Path(i.path) for i in store.outbox_items(job_id)}
    discarded = store.discard_job(job_id)
    assert {Path(i.path) for i in discarded} == files
    assert {i.state for i in store.outbox_items(job_id)} == {"discarded"}
    assert store.job(job_id).state == "discarded"
    assert store.due_outbox(now=1e12) == []
    with pytest.raises(JobStateError, match="is discarded, not held"):
        store.discard_job(job_id)
    with pytest.raises(JobStateError, match="not found"):
        store.discard_job(999)


def test_retry_of_a_held_job_is_refused(node, tmp_path, caplog):
    _, store, _ = node
    job_id = _run_held(node, tmp_path, caplog)
    with pytest.raises(JobStateError, match=f"release it with --release {job_id}"):
        store.requeue_job(job_id)
    assert store.job(job_id).state == "held"
    # Once discarded the job has ended like any other and may run again.
    store.discard_job(job_id)
    assert store.requeue_job(job_id)


def test_retention_keeps_held_results_and_removes_discarded(node, tmp_path, caplog):
    config, store, _ = node
    job_id = _run_held(node, tmp_path, caplog)
    folder = result_dir(config, job_id)
    far = 1e12  # everything is older than any cutoff
    run_retention(store, DataDir(config.data_dir), spool_days=1, results_days=1, now=far)
    assert len(list(folder.glob("*.dcm"))) == 2
    # The input stays too: the operator may want to look at what was held.
    assert store.count_instances() == 2
    store.discard_job(job_id)
    assert store.expired_result_jobs([job_id], older_than=far) == [job_id]
    report = run_retention(store, DataDir(config.data_dir), spool_days=1, results_days=1, now=far)
    assert report.result_folders == 1 and report.series == 1
    assert not folder.exists()


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "dicom-node"), "-c", str(config_path), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_lists_releases_discards_and_refuses(node, tmp_path, caplog):
    config, store, metrics = node
    cfg = tmp_path / "node.yaml"
    released = _run_held(node, tmp_path, caplog)
    discarded = _queue_job(config, store, tmp_path, "held", "second")
    assert Worker(config, store, metrics=metrics).run_one()

    listed = _cli(cfg, "jobs", "--state", "held")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:2] == ["ID", "STATE"]
    assert [line.split()[:2] for line in rows] == [[str(discarded), "held"], [str(released), "held"]]
    assert REASONS[0] in listed.stdout

    retry = _cli(cfg, "jobs", "--retry", str(released))
    assert retry.returncode == 2
    assert f"job {released} is held" in retry.stderr and f"--release {released}" in retry.stderr

    ok = _cli(cfg, "jobs", "--release", str(released))
    assert ok.returncode == 0, ok.stderr
    assert f"job {released} released by operator" in ok.stdout
    assert "released by operator after: " + REASONS[0] in ok.stderr  # the audit log line
    assert {i.state for i in store.outbox_items(released)} == {"pending"}
    again = _cli(cfg, "jobs", "--release", str(released))
    assert again.returncode == 2
    assert again.stderr.strip() == f"dicom-node: job {released} is done, not held"

    files = [Path(i.path) for i in store.outbox_items(discarded)]
    gone = _cli(cfg, "jobs", "--discard", str(discarded))
    assert gone.returncode == 0, gone.stderr
    assert f"job {discarded} discarded" in gone.stdout and "discarded by operator" in gone.stderr
    assert not any(f.exists() for f in files) and not result_dir(config, discarded).exists()
    assert {i.state for i in store.outbox_items(discarded)} == {"discarded"}
    assert store.job(discarded).state == "discarded"

    unknown = _cli(cfg, "jobs", "--discard", "999")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "dicom-node: job 999 not found"
    bad_state = _cli(cfg, "jobs", "--state", "bogus")
    assert bad_state.returncode == 2 and "invalid choice" in bad_state.stderr
