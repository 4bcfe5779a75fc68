"""The node's exception tree.  Exceptions carry what the caller needs to decide."""

from __future__ import annotations

from typing import Any

__all__ = [
    "DicomNodeError",
    "ConfigError",
    "ManifestError",
    "ModelLoadError",
    "StoreError",
    "PipelineError",
    "ContractError",
    "InferenceUnavailable",
    "SkipSeries",
    "SendError",
    "JobStateError",
]


class DicomNodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration file is unreadable or invalid; the message names the key."""


class ManifestError(DicomNodeError):
    """A model manifest is unreadable or invalid; the message names the file and key."""


class ModelLoadError(DicomNodeError):
    """A model file is missing, has the wrong checksum or the wrong graph signature."""


class StoreError(DicomNodeError):
    """The spool or the database could not be written."""


class PipelineError(DicomNodeError):
    """A pipeline could not process a series; the job fails with this reason."""


class ContractError(PipelineError):
    """A model's inputs or outputs break its manifest (dtype, shape, value range);
    the job fails with this reason rather than report what the model said."""


class InferenceUnavailable(DicomNodeError):
    """A remote inference server could not answer now (unavailable, deadline
    exceeded, overloaded, connection refused).  Transient: the job is queued
    again after a backoff and never fails for good because of it."""

    retryable = True

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model}: inference server unavailable: {reason}")
        self.model = model
        self.reason = reason


class SkipSeries(DicomNodeError):
    """The series is not for this pipeline (a lateral CXR, say); recorded, not a failure."""


class SendError(DicomNodeError):
    """A C-STORE to a destination failed.

    ``retryable`` tells the dispatcher whether to back off and try again
    (connection refused, timeout, out of resources) or to give up at once
    (association rejected, SOP class not supported).
    """

    def __init__(self, destination: str, reason: str, *, status: int | None = None,
                 retryable: bool) -> None:
        super().__init__(f"destination {destination}: {reason}")
        self.destination = destination
        self.reason = reason
        self.status = status
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its fields (a sender process returns it to the
        # dispatcher): the default pickles the message, which __init__ does not take.
        return _send_error, (self.destination, self.reason, self.status, self.retryable)


def _send_error(destination: str, reason: str, status: int | None, retryable: bool) -> SendError:
    return SendError(destination, reason, status=status, retryable=retryable)


class JobStateError(DicomNodeError):
    """An operator action does not apply to the job in its present state
    (release or discard a job that is not held, retry a held one)."""
