"""Workers: claim a job, run its pipeline, write results, queue them to send.

Each worker is its own process, so a model that crashes or runs out of memory
takes down that worker and fails (or retries) that job, never the receiver.
Results are written and queued in the outbox in one step after the pipeline
has finished: a crash before that step reruns the job, and because result
UIDs are deterministic the rerun writes the same objects again.
"""

from __future__ import annotations

import logging
import os
import time
from io import BytesIO
from pathlib import Path
from threading import Event

from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite

from prometheus_client import CollectorRegistry

from dicom_node.config import Config
from dicom_node.errors import DicomNodeError, SkipSeries
from dicom_node.infer.engine import ModelRegistry
from dicom_node.limits import declared_pixel_bytes
from dicom_node.observability.metrics import Metrics
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node.store.db import Job, Store
from dicom_node.store.spool import atomic_write, is_valid_uid

__all__ = ["Worker", "result_dir"]

log = logging.getLogger("dicom_node.worker")


def result_dir(config: Config, job_id: int) -> Path:
    return config.data_dir / "outgoing" / f"job-{job_id}"


class Worker:
    def __init__(self, config: Config, store: Store, name: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.store = store
        self.name = name or f"worker-{os.getpid()}"
        inf = config.inference
        self.models = ModelRegistry(config.models_dir, inf.providers, inf.device_id,
                                    inf.intra_op_threads)
        self.spool_root = config.data_dir / "spool"
        self.tmp = config.data_dir / "spool" / ".tmp"

    def run_forever(self, stop: Event, poll_s: float = 0.2) -> None:
        while not stop.is_set():
            if not self.run_one():
                stop.wait(poll_s)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job = self.store.claim_job(self.name)
        if job is None:
            return False
        log.info("job %d: %s on %d series (attempt %d)", job.id, job.pipeline,
                 len(job.series_uids), job.attempts)
        started = time.perf_counter()
        try:
            results, summary = self._run(job)
        except SkipSeries as exc:
            self._end(job, "skipped", str(exc))
            log.info("job %d skipped: %s", job.id, exc)
            return True
        except DicomNodeError as exc:
            self._end(job, "failed", str(exc))
            log.error("job %d failed: %s", job.id, exc)
            return True
        except Exception as exc:  # noqa: BLE001 - edge of the stage: record, keep the worker
            self._end(job, "failed", f"{type(exc).__name__}: {exc}")
            log.exception("job %d failed unexpectedly", job.id)
            return True
        self._end(job, "done", None, results)
        log.info("job %d done in %.2f s: %d result objects queued (%s)", job.id,
                 time.perf_counter() - started, len(results), summary)
        return True

    def _end(self, job: Job, state: str, reason: str | None,
             results: list[tuple[str, str, str, str]] = ()) -> None:
        self.store.finish_job(job.id, state, reason, results)
        self.metrics.jobs_finished.labels(pipeline=job.pipeline, state=state).inc()

    def _run(self, job: Job) -> tuple[list[tuple[str, str, str, str]], dict]:
        route = self.config.route(job.route)
        pipeline = get_pipeline(job.pipeline)
        model = self.models.get(job.model)
        self.metrics.model_info.labels(model=model.manifest.name, version=model.manifest.version,
                                       provider=model.provider).set(1)
        datasets = self._load(job)
        options = {"batch_size": self.config.inference.batch_size, **route.options}
        result = pipeline.run(PipelineInput(job.id, job.route, datasets, options), model)
        started = time.perf_counter()
        paths = self._write(job.id, result.datasets)
        timings = {**result.timings, "write": time.perf_counter() - started}
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(pipeline=job.pipeline, stage=stage).observe(seconds)
        if "inference" in timings:
            self.metrics.inference_seconds.labels(model=model.manifest.name,
                                                  provider=model.provider).observe(timings["inference"])
        destinations = route.result_destinations.get(result.outcome or "", route.destinations)
        queued = [(dest, str(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
                  for dest in destinations for ds, path in zip(result.datasets, paths)]
        summary = dict(result.summary, outcome=result.outcome) if result.outcome else dict(result.summary)
        summary.update({f"{k}_s": round(v, 3) for k, v in timings.items()})
        return queued, summary

    def _load(self, job: Job) -> list[Dataset]:
        datasets = []
        for series_uid in job.series_uids:
            for rec in self.store.instances_of(series_uid):
                path = self.spool_root / rec.path
                try:
                    ds = dcmread(path)
                except Exception as exc:  # noqa: BLE001 - one bad file is skipped, not fatal
                    log.warning("job %d: skipped unreadable instance %s: %s", job.id, rec.sop_uid, exc)
                    continue
                self._check_pixel_size(ds, rec.sop_uid)
                datasets.append(ds)
        return datasets

    def _check_pixel_size(self, ds: Dataset, sop_uid: str) -> None:
        """Fail the job before a pipeline decodes pixels whose declared size is
        over the limit: decoders allocate the declared size up front, whatever
        the (tiny) encoded data holds.  The receiver refuses such instances;
        this covers spooled files from before a lower limit, or re-indexed ones."""
        limit = self.config.node.max_pixel_bytes
        declared = declared_pixel_bytes(ds)
        if declared > limit:
            raise DicomNodeError(f"instance {sop_uid}: declared pixel data of {declared} bytes "
                                 f"exceeds node.max_pixel_bytes {limit}")

    def _write(self, job_id: int, datasets: list[Dataset]) -> list[Path]:
        folder = result_dir(self.config, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not is_valid_uid(uid):
                raise DicomNodeError(f"job {job_id}: pipeline produced invalid SOP Instance UID {uid!r}")
            buffer = BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            path = folder / f"{uid}.dcm"
            atomic_write(path, buffer.getbuffer(), self.tmp)
            paths.append(path)
        return paths

