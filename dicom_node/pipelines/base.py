"""What every pipeline is: series in, result datasets out.

Pipelines do not talk to the network or the database.  They get decoded
datasets and a loaded model, and return DICOM datasets; the worker writes
them and queues them for sending.  A new pipeline is one class registered
under its name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from collections.abc import Callable

import cv2
from pydicom import Dataset

from dicom_node.infer.manifest import ModelManifest
from dicom_node.infer.runner import InferenceModel

__all__ = ["PipelineInput", "PipelineResult", "Pipeline", "StageTimer", "register", "get_pipeline",
           "pipeline_names", "plausible_ranges", "unknown_plausible_keys", "implausible",
           "require_task", "check_pair", "configure_threads"]


# The pipelines split their work over small thread pools of their own (the
# next radiograph decoded and the last capture drawn while the model reads
# one; the ROI search slice by slice), two threads at least.
_POOLED_THREADS = 2


def configure_threads() -> None:
    """Once per worker process, before its first job: on a machine with no
    more cores than the pipelines' pools have threads, OpenCV's own threads
    inside every call only contend with them (2 cores: the CXR pipeline
    42.0 -> 37.7 ms a radiograph, interleaved A/B).  With more cores OpenCV
    keeps its default."""
    if (os.cpu_count() or 1) <= _POOLED_THREADS:
        cv2.setNumThreads(1)


@dataclass(frozen=True)
class PipelineInput:
    job_id: int
    route: str
    # Every instance of the job's series, decoded (pixel data loads on access).
    datasets: list[Dataset]
    options: dict[str, Any] = field(default_factory=dict)
    # Hands a finished result to the worker to be written while the pipeline
    # goes on; it must still be in PipelineResult.datasets, and is not to be
    # changed after.  A pipeline that never calls it loses nothing.
    early: Callable[[Dataset], None] = lambda ds: None


@dataclass(frozen=True)
class PipelineResult:
    datasets: list[Dataset]
    # Stage name -> seconds, for the metrics.
    timings: dict[str, float] = field(default_factory=dict)
    # Free-form facts for the job log (counts, measurements), no patient data.
    summary: dict[str, Any] = field(default_factory=dict)
    # A result class (e.g. "abnormal") that a route may send elsewhere.
    outcome: str | None = None
    # Why the result is implausible, one reason per measure naming the value
    # and the range, e.g. "LVEDV 2116.0 ml outside plausible 10-500 ml".  Non-
    # empty: the worker writes every dataset but holds them from sending
    # until an operator releases or discards the job.  No patient data.
    held: tuple[str, ...] = ()


class Pipeline(Protocol):
    name: ClassVar[str]
    # Plausible range of each measure the pipeline reports; a manifest's
    # ``plausible`` overrides them by name and may name no other measure.
    plausible: ClassVar[dict[str, tuple[float, float]]]

    def run(self, job: PipelineInput, model: InferenceModel) -> PipelineResult: ...

    def check_model(self, manifest: ModelManifest) -> list[str]:
        """What makes this model unusable for this pipeline (empty: usable)."""
        ...


class StageTimer:
    """Seconds per stage, summed over repeated stages (one per image, say)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def plausible_ranges(pipeline: Pipeline, manifest: ModelManifest) -> dict[str, tuple[float, float]]:
    """The pipeline's ranges with the manifest's overrides."""
    return {**pipeline.plausible, **manifest.plausible}


def unknown_plausible_keys(pipeline: Pipeline, manifest: ModelManifest) -> list[str]:
    unknown = sorted(set(manifest.plausible) - set(pipeline.plausible))
    if not unknown:
        return []
    return [f"{manifest.name}.yaml plausible: {', '.join(unknown)} not reported by pipeline "
            f"{pipeline.name} (it reports {', '.join(sorted(pipeline.plausible))})"]


def implausible(values: dict[str, float | None], ranges: dict[str, tuple[float, float]],
                units: dict[str, str] | None = None) -> tuple[str, ...]:
    """One reason per measure outside its range; measures not reported are skipped."""
    out = []
    for name, value in values.items():
        if value is None or name not in ranges:
            continue
        low, high = ranges[name]
        if not (low <= value <= high) or value != value:
            unit = (units or {}).get(name, "")
            out.append(f"{name} {value:.4g}{unit} outside plausible {low:g}-{high:g}{unit}")
    return tuple(out)


def require_task(manifest: ModelManifest, task: str, pipeline: str) -> list[str]:
    if manifest.task != task:
        return [f"model {manifest.name} is a {manifest.task} model; {pipeline} needs {task}"]
    return []


_REGISTRY: dict[str, Callable[[], Pipeline]] = {}


def register(cls: type) -> type:
    """Class decorator: make a pipeline available to routes by its ``name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"pipeline class {cls.__name__} needs a 'name' class attribute")
    known = _REGISTRY.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"pipeline {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def _table() -> dict[str, str]:
    """Every pipeline a route may name: built-in ones and entry points."""
    from dicom_node.pipelines import BUILTIN, ENTRY_POINT_GROUP

    table = dict(BUILTIN)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in table:
            raise ValueError(f"pipeline entry point {entry.name!r} ({entry.value}) shadows a built-in one")
        table[entry.name] = entry.value
    return table


def _load(name: str) -> Callable[[], Pipeline] | None:
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    target = _table().get(name)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return register(cls)


def get_pipeline(name: str) -> Pipeline:
    cls = _load(name)
    if cls is None:
        raise KeyError(f"unknown pipeline {name!r} (known: {', '.join(pipeline_names())})")
    return cls()


def pipeline_names() -> list[str]:
    return sorted(set(_table()) | set(_REGISTRY))


def check_pair(pipeline_name: str, manifest: ModelManifest) -> list[str]:
    """Can this pipeline use this model?  Used at config load, by
    ``models verify`` and by the worker before it runs a job."""
    try:
        pipeline = get_pipeline(pipeline_name)
    except KeyError as exc:
        return [str(exc.args[0])]
    return pipeline.check_model(manifest) + unknown_plausible_keys(pipeline, manifest)
