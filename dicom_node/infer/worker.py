"""Workers: claim a job, run its pipeline, write results, queue them to send.

Each worker is its own process, so a model that crashes or runs out of memory
takes down that worker and fails (or retries) that job, never the receiver.
Results are written as the pipeline finishes them (store/results.py), but
made visible and queued in the outbox in one step after it has returned: a
crash before that step reruns the job, and because result UIDs are
deterministic the rerun writes the same objects again.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from threading import Event
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError

from prometheus_client import CollectorRegistry

from dicom_node.config import Config
from dicom_node.errors import DicomNodeError, InferenceUnavailable, PipelineError, SkipSeries
from dicom_node.infer.engine import ModelRegistry
from dicom_node.limits import CodestreamError, check_encapsulated_frames, declared_pixel_bytes
from dicom_node.observability.logs import RepeatLog, escape
from dicom_node.observability.metrics import Metrics
from dicom_node.pipelines.base import PipelineInput, check_pair, get_pipeline
from dicom_node.store.db import Job, JobState, OutboxEntry, Store
from dicom_node.store.layout import DataDir
from dicom_node.store.results import ResultFiles

__all__ = ["Worker", "is_disk_full", "result_dir"]

log = logging.getLogger("dicom_node.worker")

# What dcmread raises on a truncated, corrupt or vanished spool file.
_UNREADABLE = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError,
               struct.error)
# Requeue delay after a full disk: first, then doubling up to the last.
_DISK_FULL_BACKOFF_S = (1.0, 30.0)
# The same after a remote inference server could not answer (transient).
_INFERENCE_BACKOFF_S = (2.0, 60.0)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT from a write, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


# LogRecord's own attributes: a summary key must not shadow one in ``extra=``.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _int_or_one(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return 1
    return n if n > 0 else 1


def result_dir(config: Config, job_id: int) -> Path:
    return DataDir.of(config).job_results(job_id)


class Worker:
    def __init__(self, config: Config, store: Store, name: str | None = None,
                 metrics: Metrics | None = None, *, data: DataDir | None = None) -> None:
        self.config = config
        self.data = data or DataDir.of(config)
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.store = store
        self.name = name or f"worker-{os.getpid()}"
        inf = config.inference
        self.models = ModelRegistry.from_settings(config.models_dir, inf)
        self.spool_root = self.data.spool
        self.tmp = self.data.tmp
        self._stop = Event()
        # A full disk repeats the same error for every job: say it once, then count.
        self._disk_full = RepeatLog(log, logging.WARNING)
        # So does a remote inference server that is away.
        self._server_away = RepeatLog(log, logging.WARNING)
        self._provider: str | None = None
        # Counters a dashboard or alert rule reads exist from the start, at 0,
        # for every pipeline a route uses (not only after the first event).
        for pipeline in sorted({r.pipeline for r in config.routes}):
            for counter in (self.metrics.jobs_held, self.metrics.jobs_deferred):
                counter.labels(pipeline=pipeline)

    # An idle worker looks for a job this often (a read, see Store.claim_job):
    # the wait is part of every job's time to results.
    POLL_S = 0.05

    def run_forever(self, stop: Event, poll_s: float = POLL_S) -> None:
        self._stop = stop
        while not stop.is_set():
            try:
                if not self.run_one():
                    stop.wait(poll_s)
            except (OSError, sqlite3.OperationalError) as exc:
                # Claiming or ending a job writes to the database: on a full
                # disk wait and try again rather than die and be restarted.
                if not is_disk_full(exc):
                    raise
                self._disk_full.report(f"{self.name}: database write failed, disk full: {exc}",
                                       key="database writes")
                stop.wait(_DISK_FULL_BACKOFF_S[0])
                self._requeue_own()

    def _requeue_own(self) -> None:
        """A job whose end could not be recorded is still 'running' under
        this worker, which runs one job at a time: put it back."""
        try:
            self.store.requeue_running(self.name, self.config.jobs.max_attempts + 1,
                                       reason="disk full while ending the job")
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                raise

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job = self.store.claim_job(self.name)
        if job is None:
            return False
        log.debug("job %d: %s on %d series (attempt %d)", job.id, job.pipeline,
                  len(job.series_uids), job.attempts)
        started = time.perf_counter()
        self._provider = None
        try:
            results, summary, held = self._run(job)
        except SkipSeries as exc:
            self._end(job, "skipped", str(exc))
            self._log_job(job, "skipped", started, str(exc))
            return True
        except InferenceUnavailable as exc:
            # When the server answers again the model is checked again at load.
            self.models.forget(job.model)
            self._defer(job, exc)
            return True
        except DicomNodeError as exc:
            self._end(job, "failed", str(exc))
            self._log_job(job, "failed", started, str(exc), level=logging.ERROR)
            return True
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                self._end(job, "failed", f"{type(exc).__name__}: {exc}")
                log.exception("job %d failed unexpectedly", job.id)
                return True
            self._defer(job, exc)
            return True
        except Exception as exc:  # noqa: BLE001 - edge of the stage: record, keep the worker
            self._end(job, "failed", f"{type(exc).__name__}: {exc}")
            log.exception("job %d failed unexpectedly", job.id)
            return True
        if held:
            self._hold(job, held, results)
            return True
        try:
            self._end(job, "done", None, results)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                raise
            self._defer(job, exc)
            return True
        self._disk_full.clear("disk writable again")
        self._server_away.clear("inference server answering again")
        facts = ", ".join(f"{k} {v}" for k, v in summary.items()
                          if not k.endswith("_s") and k not in ("series", "outcome"))
        outcome = summary.get("outcome")
        self._log_job(job, "done", started,
                      f"{len(results)} result objects queued"
                      + (f", outcome {outcome}" if outcome else "") + (f" ({facts})" if facts else ""),
                      results=len(results), outcome=outcome,
                      **{k: v for k, v in summary.items() if k != "outcome" and k not in _RESERVED})
        return True

    def _log_job(self, job: Job, state: str, started: float, detail: str,
                 level: int = logging.INFO, **fields: object) -> None:
        """The one line per job: pipeline, model, provider, duration, outcome."""
        duration = time.perf_counter() - started
        provider = self._provider or "no provider"
        log.log(level, "job %d %s in %.2f s: %s with model %s on %s, attempt %d: %s", job.id, state,
                duration, job.pipeline, job.model, provider, job.attempts, detail,
                extra={"job_id": job.id, "state": state, "route": job.route,
                       "pipeline": job.pipeline, "model": job.model, "provider": self._provider,
                       "duration_s": round(duration, 3), "attempt": job.attempts,
                       "series_uid": list(job.series_uids), **fields})

    def _defer(self, job: Job, exc: BaseException) -> None:
        """Queue a job that hit a full disk (or a remote inference server
        that could not answer) again after a backoff: both are transient, so
        it neither fails the job nor uses one of its attempts.  The requeue
        itself writes to the database, which may be on the same full disk:
        retry it (logged once, then counted) until it lands or the worker is
        told to stop, when the node's stop requeues the job instead."""
        away = isinstance(exc, InferenceUnavailable)
        first, most = _INFERENCE_BACKOFF_S if away else _DISK_FULL_BACKOFF_S
        delay = min(first * 2 ** min(job.deferrals, 30), most)
        if away:
            reason = f"{exc}; retrying after {delay:g} s"
        else:
            reason = f"disk full ({exc.__class__.__name__}: {exc}); retrying after {delay:g} s"
        while True:
            try:
                self.store.defer_job(job.id, time.time() + delay, reason)
                break
            except (OSError, sqlite3.OperationalError) as again:
                if not is_disk_full(again):
                    raise
                self._disk_full.report(f"job {job.id}: cannot requeue, disk still full: {again}",
                                       key="requeueing a job")
                if self._stop.wait(delay):
                    return
        if isinstance(exc, InferenceUnavailable):
            self._server_away.report(f"job {job.id} deferred: {reason}", key=f"model {exc.model}")
        else:
            self._disk_full.report(f"job {job.id} deferred: {reason}", key="writing results")
        self.metrics.jobs_deferred.labels(pipeline=job.pipeline).inc()

    def _end(self, job: Job, state: str, reason: str | None,
             results: Sequence[OutboxEntry] = ()) -> None:
        self.store.finish_job(job.id, state, reason, results)
        self.metrics.jobs_finished.labels(pipeline=job.pipeline, state=state).inc()

    def _hold(self, job: Job, reasons: tuple[str, ...],
              results: list[OutboxEntry]) -> None:
        """End a job whose result the pipeline found implausible: its files
        are written and recorded (the store holds them from sending) so that
        an operator can review, release or discard them."""
        reason = "; ".join(reasons)
        self._end(job, JobState.HELD, reason, results)
        self.metrics.jobs_held.labels(pipeline=job.pipeline).inc()
        # Reasons name measures and values only: no patient data in the log.
        log.warning("job %d held, not sent: %s with model %s: %s (%d result objects; "
                    "dicom-node jobs --release %d or --discard %d)", job.id, job.pipeline,
                    job.model, reason, len(results), job.id, job.id)

    def _run(self, job: Job) -> tuple[list[OutboxEntry], dict[str, Any], tuple[str, ...]]:
        route = self.config.route(job.route)
        pipeline = get_pipeline(job.pipeline)
        model = self.models.get(job.model)
        self._provider = model.provider
        unusable = check_pair(job.pipeline, model.manifest)
        if unusable:
            raise PipelineError(f"job {job.id}: " + "; ".join(unusable))
        self.metrics.model_info.labels(model=model.manifest.name, version=model.manifest.version,
                                       provider=model.provider).set(1)
        datasets = self._load(job)
        options = {"batch_size": self.config.inference.batch_size, **route.options}
        with ResultFiles(self.data.job_results(job.id), self.tmp, job.id) as files:
            result = pipeline.run(PipelineInput(job.id, job.route, datasets, options, files.early), model)
            started = time.perf_counter()
            paths = files.complete(result.datasets)
        # Writing what was not handed over early and making all durable.
        timings = {**result.timings, "write": time.perf_counter() - started}
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(pipeline=job.pipeline, stage=stage).observe(seconds)
        if "inference" in timings:
            self.metrics.inference_seconds.labels(
                model=model.manifest.name, provider=model.provider,
                backend=getattr(model, "backend", "onnxruntime")).observe(timings["inference"])
        destinations = route.result_destinations.get(result.outcome or "", route.destinations)
        queued = [OutboxEntry(dest, str(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
                  for dest in destinations for ds, path in zip(result.datasets, paths, strict=False)]
        summary = dict(result.summary, outcome=result.outcome) if result.outcome else dict(result.summary)
        summary.update({f"{k}_s": round(v, 3) for k, v in timings.items()})
        return queued, summary, tuple(result.held)

    def _load(self, job: Job) -> list[Dataset]:
        """Read every instance of the job's series.  An unreadable one fails
        the job, naming it: the series would be incomplete, and a result
        computed on part of a volume must not be sent as if it were whole."""
        datasets: list[Dataset] = []
        for series_uid in job.series_uids:
            for rec in self.store.instances_of(series_uid):
                path = self.spool_root / rec.path
                try:
                    ds = dcmread(path)
                except _UNREADABLE as exc:
                    if is_disk_full(exc):
                        raise
                    raise DicomNodeError(
                        f"instance {rec.sop_uid} of series {series_uid} is unreadable "
                        f"({type(exc).__name__}: {escape(exc)}); the series is incomplete") from exc
                self._check_pixels(ds, rec.sop_uid)
                datasets.append(ds)
        return datasets

    def _check_pixels(self, ds: Dataset, sop_uid: str) -> None:
        """Fail the job before a pipeline decodes pixels whose declared size is
        over the limit: decoders allocate the declared size up front, whatever
        the (tiny) encoded data holds.  The receiver refuses such instances;
        this covers spooled files from before a lower limit, or re-indexed ones.
        Decoders size their buffer from each frame's codestream, not from the
        DICOM header, so for encapsulated pixel data every frame's codestream
        header must agree with the DICOM header too."""
        limit = self.config.node.max_pixel_bytes
        declared = declared_pixel_bytes(ds)
        if declared > limit:
            raise DicomNodeError(f"instance {sop_uid}: declared pixel data of {declared} bytes "
                                 f"exceeds node.max_pixel_bytes {limit}")
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
            return
        frames = _int_or_one(ds.get("NumberOfFrames"))
        try:
            check_encapsulated_frames(ds, generate_frames(ds.PixelData, number_of_frames=frames),
                                      str(syntax), limit)
        except CodestreamError as exc:
            raise DicomNodeError(f"instance {sop_uid}: {exc}") from None
        except (ValueError, struct.error) as exc:  # pydicom: broken item tags or offsets
            raise DicomNodeError(f"instance {sop_uid}: cannot split encapsulated pixel data "
                                 f"into {frames} frames: {exc}") from None
