"""Every metric the node exports, defined in one place on a registry passed in.

Names carry their unit; labels are bounded (modality, route, pipeline,
destination, status) and never carry UIDs or patient data.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from dicom_node.store.db import Store

__all__ = ["Metrics", "StoreCollector", "exposition_registry", "MULTIPROC_ENV"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition_registry(metrics_registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: every process's metrics when the node runs
    several (prometheus-client's multiprocess mode), else this process's."""
    if not os.environ.get(MULTIPROC_ENV):
        return metrics_registry
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry

_STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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


class StoreCollector(Collector):
    """Gauges read from the store at scrape time, so every process's work is
    counted without sharing memory: jobs by state, queue age, outbox, disk."""

    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir

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
        usage = shutil.disk_usage(self.data_dir)
        yield GaugeMetricFamily("dicom_node_disk_free_bytes", "Free bytes on the data dir's file system",
                                value=usage.free)
