"""Spool reconciliation at start: make the store agree with the spool.

The receiver commits its records without waiting for the WAL fsync (the file
itself is fsync'd before Success), so after a power cut the spool is the
truth for what was received.  But not every file in the spool is current: an
instance sent again in another series leaves its earlier copy behind until
the receiver removes it, and a crash can come between the two.  Such a copy
must never be indexed again, or it moves the instance back to the old series
and orphans the acknowledged newer copy.

Which copy is current: the one received last, i.e. written last.  Spool files
are written once (atomic rename of a new file) and never modified, so the
file's modification time is the time it was received.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.store.db import InstanceRecord, Store
from dicom_node.store.spool import Spool

__all__ = ["IndexEntry", "ReconcileReport", "reconcile"]

log = logging.getLogger("dicom_node.store")


@dataclass(frozen=True)
class IndexEntry:
    """What indexing a spooled file needs, read from its header."""
    record: InstanceRecord
    modality: str
    expected_count: int | None


@dataclass
class ReconcileReport:
    # Files whose record was lost (a crash before the commit reached disk).
    indexed: int = 0
    # Earlier copies of an instance received again elsewhere, removed.
    superseded: int = 0
    # Files that cannot be read, left alone for an operator.
    unreadable: int = 0

    def __bool__(self) -> bool:
        return bool(self.indexed or self.superseded or self.unreadable)

    def describe(self) -> str:
        return (f"indexed {self.indexed} spooled instances whose record was lost, removed "
                f"{self.superseded} superseded copies of replaced instances, left "
                f"{self.unreadable} unreadable files alone")


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def reconcile(spool: Spool, store: Store, read: Callable[[Path, str], IndexEntry],
              unreadable: tuple[type[BaseException], ...] = (OSError, ValueError)) -> ReconcileReport:
    """Index the spooled files the store does not know, and remove those that
    an indexed newer copy of the same instance supersedes.

    ``read(path, relative_path)`` reads a file's header; it raises one of
    ``unreadable`` for a file that cannot be indexed.  Unknown files are taken
    oldest first, so when several copies of one instance are unknown the
    newest ends up indexed whatever order the folders list in.
    """
    report = ReconcileReport()
    known = store.instance_paths()
    unknown = []
    for path in spool.files():
        rel = str(path.relative_to(spool.root))
        if rel not in known:
            mtime = _mtime_ns(path)
            if mtime is not None:
                unknown.append((mtime, rel, path))
    for mtime, rel, path in sorted(unknown):
        try:
            entry = read(path, rel)
        except unreadable as exc:
            log.warning("spooled file %s is unreadable, left alone: %s", rel, exc)
            report.unreadable += 1
            continue
        current = store.instance(entry.record.sop_uid)
        current_path = spool.root / current.path if current is not None else None
        current_mtime = _mtime_ns(current_path) if current_path is not None else None
        if current_mtime is not None and current_mtime >= mtime:
            # The store's copy was received later: this one is stale.
            _remove(spool, path)
            report.superseded += 1
            continue
        store.record_instance(entry.record, modality=entry.modality, calling_ae="",
                              called_ae="", expected_count=entry.expected_count)
        report.indexed += 1
        if current_path is not None and current_mtime is not None and current_path != path:
            _remove(spool, current_path)
            report.superseded += 1
    return report


def _remove(spool: Spool, path: Path) -> None:
    path.unlink(missing_ok=True)
    if spool.durable:
        spool.sync_folder(path.parent)
