"""The node's exception tree.  Exceptions carry what the caller needs to decide."""

from __future__ import annotations

__all__ = [
    "DicomNodeError",
    "ConfigError",
    "ManifestError",
    "ModelLoadError",
    "StoreError",
    "PipelineError",
    "SkipSeries",
    "SendError",
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
