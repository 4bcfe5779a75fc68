"""The outbox dispatcher: drain pending results to their destinations.

Exponential backoff with a cap for transient failures; permanent failures
and items older than ``dead_after_s`` go to dead letters, where
``dicom-node outbox retry`` can revive them.  State lives in the store, so a
restart carries on where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from threading import Event
from typing import Any

from dicom_node.config import (
    Config,
    DicomDestination,
    DicomwebDestination,
    FolderDestination,
    Peer,
    SenderDestination,
)
from dicom_node.errors import SendError
from dicom_node.observability.logs import RepeatLog
from dicom_node.observability.metrics import Metrics
from dicom_node.send.dicomweb import send_dicomweb
from dicom_node.send.processes import SenderProcesses
from dicom_node.send.scu import StoreOutcome, StoreRequest, send_files_parallel
from dicom_node.store.db import OutboxItem, Store
from dicom_node.security.tls import ClientContexts
from dicom_node.store.layout import DataDir
from dicom_node.store.spool import atomic_write

__all__ = ["Dispatcher", "backoff"]

log = logging.getLogger("dicom_node.send")


def backoff(attempts: int, initial: float, cap: float) -> float:
    return min(cap, initial * (2 ** max(0, attempts)))


class Dispatcher:
    def __init__(self, config: Config, store: Store, metrics: Metrics, *,
                 data: DataDir | None = None, log_level: str = "INFO", json_logs: bool = False) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.tmp = (data or DataDir.of(config)).tmp
        # A peer's parallel associations send from processes of their own
        # (send/processes.py), started at its first batch.
        most = max((p.send_associations for p in config.peers), default=1)
        self._processes = SenderProcesses(most, log_level, json_logs) if most > 1 else None
        # Built once per peer, not per batch.
        self._tls = ClientContexts()
        self._failures = RepeatLog(log)
        # Destinations failing now -> [first reason, failed attempts since]:
        # one line when a destination starts failing, one when it recovers,
        # not one per object per retry.
        self._failing: dict[str, list[Any]] = {}
        # Dead letters: the first of each destination and reason, then a count.
        self._dead = RepeatLog(log, logging.ERROR, every_s=300)

    def close(self) -> None:
        """Stop the sender processes (after run_forever has returned)."""
        if self._processes is not None:
            self._processes.close()

    # How often an idle outbox looks for due items (one indexed read): the
    # wait is part of every job's time to results.
    POLL_S = 0.05

    def run_forever(self, stop: Event, poll_s: float = POLL_S) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
                self._failures.clear("outbox passes work again")
            except Exception as exc:  # noqa: BLE001 - edge of the stage: log, keep draining
                self._failures.report(f"outbox pass failed; retrying: {type(exc).__name__}: {exc}",
                                      key=type(exc).__name__, exc_info=True)
                busy = False
            if not busy:
                stop.wait(poll_s)

    def run_once(self, now: float | None = None) -> bool:
        """Send what is due; True if anything was attempted."""
        items = self.store.due_outbox(now)
        if not items:
            return False
        groups: dict[tuple[str, str], list[OutboxItem]] = defaultdict(list)
        callers: dict[int, str] = {}  # one job lookup per job, not per object
        for item in items:
            if item.job_id not in callers:
                callers[item.job_id] = self._calling_ae(item)
            groups[(item.destination, callers[item.job_id])].append(item)
        for (dest_name, calling), batch in groups.items():
            self._send_batch(dest_name, calling, batch)
        return True

    def _calling_ae(self, item: OutboxItem) -> str:
        job = self.store.job(item.job_id)
        return job.calling_ae if job else ""

    def _send_batch(self, dest_name: str, source_ae: str, batch: list[OutboxItem]) -> None:
        try:
            dest = self.config.destination(dest_name)
        except KeyError:
            for item in batch:
                self._fail(item, f"destination {dest_name!r} is no longer configured", retryable=False)
            return
        if isinstance(dest, FolderDestination):
            outcomes = [self._copy(item, self.config.folder_path(dest)) for item in batch]
        else:
            try:
                requests = [StoreRequest(i.id, Path(i.path), i.sop_class, i.sop_uid) for i in batch]
                if isinstance(dest, DicomwebDestination):
                    outcomes = send_dicomweb(dest, requests)
                else:
                    peer = self._peer(dest, source_ae)
                    outcomes = send_files_parallel(
                        peer, requests, associations=peer.send_associations,
                        calling_ae=self.config.node.ae_title,
                        timeout_s=self.config.outbox.connect_timeout_s, tls_contexts=self._tls,
                        processes=self._processes)
            except SendError as exc:
                for item in batch:
                    self._fail(item, exc.reason, retryable=exc.retryable)
                if exc.retryable:
                    self._note_failure(dest_name, exc.reason, batch)
                return
        self._record(dest_name, batch, outcomes)

    def _peer(self, dest: DicomDestination | SenderDestination, source_ae: str) -> Peer:
        if isinstance(dest, DicomDestination):
            return self.config.peer(dest.peer)
        peer = self.config.peer_by_ae(source_ae)
        if peer is None:
            raise SendError(dest.name, f"sender AE {source_ae!r} is not a known peer; "
                            "add it to peers to send results back to it", retryable=False)
        if not peer.may_receive_results:
            raise SendError(dest.name, f"peer {peer.name} has may_receive_results: false",
                            retryable=False)
        return peer

    def _copy(self, item: OutboxItem, folder: Path) -> StoreOutcome:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / Path(item.path).name, Path(item.path).read_bytes(), self.tmp)
        except OSError as exc:
            return StoreOutcome(item.id, False, True, f"cannot write to {folder}: {exc.strerror}")
        return StoreOutcome(item.id, True, False, "copied")

    def _record(self, dest_name: str, batch: list[OutboxItem], outcomes: list[StoreOutcome]) -> None:
        by_id = {item.id: item for item in batch}
        sent = [o.item_id for o in outcomes if o.ok]
        if sent:
            self.store.mark_sent(sent)
            self.metrics.send_attempts.labels(destination=dest_name, result="sent").inc(len(sent))
            self._observe_latency(dest_name, [by_id[i] for i in sent])
            self._note_recovery(dest_name)
            per_job: dict[int, int] = defaultdict(int)
            for item_id in sent:
                per_job[by_id[item_id].job_id] += 1
            for job_id, count in sorted(per_job.items()):
                # One line per delivery: destination, count, job.
                log.info("delivered %d result objects of job %d to %s", count, job_id, dest_name,
                         extra={"destination": dest_name, "job_id": job_id, "count": count})
        failed = [o for o in outcomes if not o.ok]
        for outcome in failed:
            self._fail(by_id[outcome.item_id], outcome.reason, retryable=outcome.retryable)
        again = [o for o in failed if o.retryable]  # dead letters are logged as such
        if again:
            self._note_failure(dest_name, again[0].reason, [by_id[o.item_id] for o in again])

    def _note_failure(self, dest_name: str, reason: str, items: list[OutboxItem]) -> None:
        """A destination that starts failing logs once, with how many objects
        wait for it; later failures are counted for the recovery line."""
        state = self._failing.get(dest_name)
        if state is not None:
            state[1] += 1
            return
        self._failing[dest_name] = [reason, 1]
        jobs = sorted({i.job_id for i in items})
        log.warning("destination %s failing: %s; %d result objects (jobs %s) wait and are retried "
                    "with backoff (up to %.0f s apart)", dest_name, reason, len(items),
                    ",".join(map(str, jobs)), self.config.outbox.retry_max_s,
                    extra={"destination": dest_name, "count": len(items), "job_id": jobs,
                           "reason": reason})

    def _note_recovery(self, dest_name: str) -> None:
        state = self._failing.pop(dest_name, None)
        if state is not None:
            log.info("destination %s delivering again after %d failed attempts (first: %s)",
                     dest_name, state[1], state[0],
                     extra={"destination": dest_name, "failed_attempts": state[1]})

    def _observe_latency(self, dest_name: str, items: list[OutboxItem]) -> None:
        now = time.time()
        for job_id in {i.job_id for i in items}:
            job = self.store.job(job_id)
            if job is not None:
                self.metrics.end_to_end_seconds.labels(pipeline=job.pipeline,
                                                       destination=dest_name).observe(now - job.completed_at)

    def _fail(self, item: OutboxItem, reason: str, *, retryable: bool) -> None:
        now = time.time()
        settings = self.config.outbox
        too_old = now - item.created_at >= settings.dead_after_s
        if not retryable or too_old:
            why = reason if not retryable else f"{reason}; gave up after {settings.dead_after_s:g} s"
            self.store.mark_dead(item.id, why)
            self.metrics.send_attempts.labels(destination=item.destination, result="dead").inc()
            self._dead.report(f"result objects to {item.destination} became dead letters: {why} "
                              "(dicom-node outbox list --state dead; outbox retry)",
                              key=f"{item.destination}: {why}")
            return
        delay = backoff(item.attempts, settings.retry_initial_s, settings.retry_max_s)
        self.store.mark_retry(item.id, now + delay, reason)
        self.metrics.send_attempts.labels(destination=item.destination, result="retry").inc()
        log.debug("result %s to %s failed (%s); retry in %.0f s", item.sop_uid,
                  item.destination, reason, delay)
