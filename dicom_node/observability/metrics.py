"""Every metric the node exports, defined in one place on a registry passed in.

Names carry their unit; labels are bounded (modality, route, pipeline,
destination, status, model, execution provider) and never carry UIDs or
patient data.

The node runs several processes and uses prometheus-client's multiprocess
mode: counters and histograms add up across processes; gauges say how
(``multiprocess_mode``).  What every process can read from the store or the
host (jobs, outbox, disk, GPU, build) is computed at scrape time by the
collectors below instead, so it needs no sharing at all.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from dicom_node import __version__
from dicom_node.store.db import Store

__all__ = ["MULTIPROC_ENV", "Metrics", "RuntimeCollector", "StoreCollector", "exposition_registry",
           "gpu_memory_used_bytes"]

log = logging.getLogger("dicom_node.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition_registry(metrics_registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: every process's metrics when the node runs
    several (prometheus-client's multiprocess mode), else this process's."""
    if not os.environ.get(MULTIPROC_ENV):
        return metrics_registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
    return registry

_STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# A scrape must not hang on a wedged driver.
_NVIDIA_SMI_TIMEOUT_S = 2.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.associations = Counter(
            "dicom_node_associations", "Associations requested, by result",
            ["result"], registry=registry)
        self.associations_active = Gauge(
            "dicom_node_associations_active", "Associations currently open", registry=registry,
            multiprocess_mode="livesum")
        self.instances_received = Counter(
            "dicom_node_instances_received", "Instances stored and acknowledged",
            ["modality"], registry=registry)
        self.bytes_received = Counter(
            "dicom_node_received_bytes", "Bytes of instances stored", ["modality"],
            registry=registry)
        self.store_failures = Counter(
            "dicom_node_store_failures", "C-STORE requests refused, by DIMSE status",
            ["status"], registry=registry)
        self.duplicates = Counter(
            "dicom_node_duplicate_instances", "Instances that replaced an earlier copy",
            registry=registry)
        self.series_completed = Counter(
            "dicom_node_series_completed", "Series (or study groups) completed, by route",
            ["route"], registry=registry)
        self.series_unrouted = Counter(
            "dicom_node_series_unrouted", "Series completed that no route matched",
            registry=registry)
        self.jobs_finished = Counter(
            "dicom_node_jobs_finished", "Jobs ended, by pipeline and final state",
            ["pipeline", "state"], registry=registry)
        self.jobs_held = Counter(
            "dicom_node_jobs_held", "Jobs whose result was implausible and held from sending",
            ["pipeline"], registry=registry)
        self.jobs_deferred = Counter(
            "dicom_node_jobs_deferred", "Jobs queued again after a full disk or an unavailable inference server (not an attempt)",
            ["pipeline"], registry=registry)
        self.stage_seconds = Histogram(
            "dicom_node_stage_seconds", "Time per pipeline stage",
            ["pipeline", "stage"], buckets=_STAGE_BUCKETS, registry=registry)
        self.send_attempts = Counter(
            "dicom_node_send_attempts", "Result objects sent, by destination and result",
            ["destination", "result"], registry=registry)
        self.end_to_end_seconds = Histogram(
            "dicom_node_end_to_end_seconds",
            "Series completion to the destination's acknowledgement of the last result",
            ["pipeline", "destination"], buckets=_STAGE_BUCKETS, registry=registry)
        self.inference_seconds = Histogram(
            "dicom_node_inference_seconds",
            "Time a job spent in model inference, by model, execution provider and backend "
            "(onnxruntime in process, or kserve)",
            ["model", "provider", "backend"], buckets=_STAGE_BUCKETS, registry=registry)
        # 1 per model a live worker has loaded.  livemax: a worker that dies
        # takes its models with it (service._forget_process), and two workers
        # with the same model show as one series rather than a sum of 2.
        self.model_info = Gauge(
            "dicom_node_model_info", "Models loaded by live workers (value 1)",
            ["model", "version", "provider"], registry=registry, multiprocess_mode="livemax")


class StoreCollector(Collector):
    """Gauges read from the store at scrape time, so every process's work is
    counted without sharing memory: jobs by state, queue age, outbox, disk."""

    def __init__(self, store: Store, data_dir: Path, *, min_free_bytes: int | None = None) -> None:
        self.store = store
        self.data_dir = data_dir
        # node.min_free_bytes; None: no watermark gauge.
        self.min_free_bytes = min_free_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs by pipeline and state",
                                 labels=["pipeline", "state"])
        for (pipeline, state), n in sorted(self.store.job_counts().items()):
            jobs.add_metric([pipeline, state], n)
        yield jobs
        oldest = self.store.oldest_queued_at()
        yield GaugeMetricFamily("dicom_node_oldest_queued_job_age_seconds",
                                "Age of the oldest queued job (0 when none)",
                                value=0.0 if oldest is None else max(0.0, time.time() - oldest))
        outbox = GaugeMetricFamily("dicom_node_outbox", "Outbox items by destination and state",
                                   labels=["destination", "state"])
        for (dest, state), n in sorted(self.store.outbox_counts().items()):
            outbox.add_metric([dest, state], n)
        yield outbox
        queued = sum(n for (_, state), n in self.store.job_counts().items() if state == "queued")
        yield GaugeMetricFamily("dicom_node_queue_depth", "Jobs queued and not yet claimed",
                                value=queued)
        yield GaugeMetricFamily("dicom_node_spool_bytes",
                                "Bytes of received instances held in the spool",
                                value=self.store.spool_bytes())
        usage = shutil.disk_usage(self.data_dir)
        yield GaugeMetricFamily("dicom_node_disk_free_bytes", "Free bytes on the data dir's file system",
                                value=usage.free)
        if self.min_free_bytes is not None:
            # Read at scrape time like the free bytes: every receiver process
            # compares the same file system with the same floor.
            yield GaugeMetricFamily("dicom_node_disk_below_watermark",
                                    "1 while free space is below node.min_free_bytes and new "
                                    "instances are refused, else 0",
                                    value=float(usage.free < self.min_free_bytes))


class RuntimeCollector(Collector):
    """Build information, and GPU memory where ``nvidia-smi`` exists.

    Read at scrape time in the serving process: Info metrics do not work in
    multiprocess mode, and the GPU reading is the device's, not a process's.
    """

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        yield InfoMetricFamily("dicom_node_build", "Version of dicom-node and of Python",
                               value={"version": __version__,
                                      "python": platform.python_version()})
        used = gpu_memory_used_bytes()
        if used is None:
            return
        gpu = GaugeMetricFamily("dicom_node_gpu_memory_used_bytes",
                                "GPU memory in use (all processes), per GPU index",
                                labels=["gpu"])
        for index, value in enumerate(used):
            gpu.add_metric([str(index)], value)
        yield gpu


def gpu_memory_used_bytes() -> list[float] | None:
    """Memory used on each GPU, from nvidia-smi; None where there is no
    nvidia-smi or it gives no usable answer (no GPU, driver mismatch)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=True)
        # MiB per line, one line per GPU.
        values = [float(line) * 1024 * 1024 for line in out.stdout.split()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("nvidia-smi gave no GPU memory reading: %s", exc)
        return None
    return values or None
