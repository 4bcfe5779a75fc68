"""Retention: remove finished work once nothing can need it.

Two things grow without bound on a node that runs for months: the spool of
received instances and ``data/outgoing/job-N`` folders of results.  A pass
removes the spooled files and rows of expired series (``Store.expired_series``:
not receiving, every job ended) and the result folders of jobs whose outbox
items were all sent or are dead letters.  Results copied to folder
destinations belong to the site and are never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.store.db import OutboxItem, Store
from dicom_node.store.layout import DataDir

__all__ = ["RetentionReport", "purge_outgoing", "purge_spool", "remove_result_files", "run_retention"]

log = logging.getLogger("dicom_node.retention")

_DAY_S = 86400.0
# Ids per SQL query (well under SQLite's variable limit).
_BATCH = 500


@dataclass(frozen=True)
class RetentionReport:
    series: int = 0
    instances: int = 0
    result_folders: int = 0
    bytes_freed: int = 0


def remove_result_files(items: Iterable[OutboxItem]) -> int:
    """Delete the files of discarded outbox items (one file per result object,
    in as many rows as it had destinations), and their outgoing/job-N folder
    when nothing else is in it.  Returns how many files there were."""
    files = {Path(item.path) for item in items}
    for path in files:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in files}:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty, or gone already
    return len(files)


def run_retention(store: Store, data: DataDir, *, spool_days: float, results_days: float,
                  now: float | None = None) -> RetentionReport:
    """One pass over spool and outgoing; ``now`` lets tests control the age."""
    now = time.time() if now is None else now
    series, instances, spool_bytes = purge_spool(store, data.spool, now - spool_days * _DAY_S)
    folders, result_bytes = purge_outgoing(store, data.outgoing, now - results_days * _DAY_S)
    report = RetentionReport(series, instances, folders, spool_bytes + result_bytes)
    if series or folders:
        log.info("retention removed %d series (%d instances) and %d result folders, %d bytes",
                 series, instances, folders, report.bytes_freed)
    return report


def purge_spool(store: Store, spool_root: Path, older_than: float) -> tuple[int, int, int]:
    """Remove expired series; returns (series, instances, bytes)."""
    series = instances = freed = 0
    while True:
        uids = store.expired_series(older_than, limit=_BATCH)
        if not uids:
            break
        for uid in uids:
            removed = store.purge_series(uid, older_than)
            if not removed:
                continue
            series += 1
            folders: set[Path] = set()
            for rel, received_at in removed:
                path = spool_root / rel
                freed += _unlink_recorded(path, received_at)
                instances += 1
                folders.add(path.parent)
            for folder in folders:
                _remove_empty(folder, stop=spool_root)
        if len(uids) < _BATCH:
            break
    return series, instances, freed


def _unlink_recorded(path: Path, received_at: float) -> int:
    """Remove the file recorded at ``received_at``, not a newer copy.

    A duplicate of the same SOP Instance UID may have been written to the
    same path after the rows were deleted and before its own record (the
    receiver writes, then records).  That copy is newer than the recorded
    reception, and its record recreates the series, so it stays.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    if st.st_mtime > received_at:
        log.info("kept %s: replaced by a newer copy after it expired", path.name)
        return 0
    path.unlink(missing_ok=True)
    return st.st_size


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to ``stop`` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (a new instance arrived) or already gone
            return
        folder = folder.parent


def purge_outgoing(store: Store, outgoing: Path, older_than: float) -> tuple[int, int]:
    """Remove expired ``job-N`` result folders; returns (folders, bytes)."""
    if not outgoing.is_dir():
        return 0, 0
    folders: dict[int, Path] = {}
    for entry in outgoing.iterdir():
        if entry.is_dir() and entry.name.startswith("job-") and entry.name[4:].isdigit():
            folders[int(entry.name[4:])] = entry
    ids = sorted(folders)
    removed = freed = 0
    for start in range(0, len(ids), _BATCH):
        for job_id in store.expired_result_jobs(ids[start:start + _BATCH], older_than):
            freed += _remove_tree(folders[job_id], outgoing)
            removed += 1
    return removed, freed


def _remove_tree(folder: Path, outgoing: Path) -> int:
    """Rename out of the way first, so a job requeued by an operator in the
    meantime writes a fresh folder instead of into one being deleted."""
    trash = outgoing / f".expired-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, trash)
    except OSError as exc:
        log.warning("cannot remove result folder %s: %s", folder.name, exc.strerror)
        return 0
    size = sum(p.stat().st_size for p in trash.rglob("*") if p.is_file())
    shutil.rmtree(trash, ignore_errors=True)
    return size
