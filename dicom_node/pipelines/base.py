"""What every pipeline is: series in, result datasets out.

Pipelines do not talk to the network or the database.  They get decoded
datasets and a loaded model, and return DICOM datasets; the worker writes
them and queues them for sending.  A new pipeline is one class registered
under its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

from pydicom import Dataset

from dicom_node.infer.engine import OnnxModel

__all__ = ["PipelineInput", "PipelineResult", "Pipeline", "register", "get_pipeline", "pipeline_names"]


@dataclass(frozen=True)
class PipelineInput:
    job_id: int
    route: str
    # Every instance of the job's series, decoded (pixel data loads on access).
    datasets: list[Dataset]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineResult:
    datasets: list[Dataset]
    # Stage name -> seconds, for the metrics.
    timings: dict[str, float] = field(default_factory=dict)
    # Free-form facts for the job log (counts, measurements), no patient data.
    summary: dict[str, Any] = field(default_factory=dict)
    # A result class (e.g. "abnormal") that a route may send elsewhere.
    outcome: str | None = None


class Pipeline(Protocol):
    name: ClassVar[str]

    def run(self, job: PipelineInput, model: OnnxModel) -> PipelineResult: ...


_REGISTRY: dict[str, Callable[[], Pipeline]] = {}


def register(cls: type) -> type:
    """Class decorator: make a pipeline available to routes by its ``name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"pipeline class {cls.__name__} needs a 'name' class attribute")
    if name in _REGISTRY:
        raise ValueError(f"pipeline {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def get_pipeline(name: str) -> Pipeline:
    _load_builtin()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def pipeline_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Importing registers them; done lazily so a pipeline's heavy imports
    # do not slow down the receiver.
    from dicom_node.pipelines import cardiac_seg, ct_denoise, cxr_triage  # noqa: F401
