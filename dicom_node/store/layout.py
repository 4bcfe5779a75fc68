"""Where everything lives under ``node.data_dir``: one object, built from the
config once, passed to every stage, so no module spells a path of its own.

::

    node.db             SQLite: instances, series, jobs, outbox (WAL)
    spool/              received instances, spool/STUDY/SERIES/SOP.dcm
    spool/.tmp/         files being written; renamed into place when durable
    outgoing/job-N/     result objects of job N, until retention removes them
    .metrics/           prometheus-client multiprocess files, only when no
                        memory-backed folder is available (see metrics_dir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.store.spool import TMP_NAME

if TYPE_CHECKING:
    from dicom_node.config import Config

__all__ = ["DataDir"]


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def of(cls, config: Config) -> DataDir:
        return cls(config.data_dir)

    @property
    def db(self) -> Path:
        return self.root / "node.db"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def tmp(self) -> Path:
        """Same file system as the spool and outgoing/, so a rename into
        either is atomic."""
        return self.spool / TMP_NAME

    @property
    def outgoing(self) -> Path:
        return self.root / "outgoing"

    def job_results(self, job_id: int) -> Path:
        return self.outgoing / f"job-{job_id}"

    @property
    def metrics_fallback(self) -> Path:
        return self.root / ".metrics"
