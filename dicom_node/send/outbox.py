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

from dicom_node.config import (Config, DicomDestination, FolderDestination, Peer,
                               SenderDestination)
from dicom_node.errors import SendError
from dicom_node.observability.metrics import Metrics
from dicom_node.send.scu import StoreOutcome, StoreRequest, send_files
from dicom_node.store.db import OutboxItem, Store
from dicom_node.store.spool import atomic_write

__all__ = ["Dispatcher", "backoff"]

log = logging.getLogger("dicom_node.send")


def backoff(attempts: int, initial: float, cap: float) -> float:
    return min(cap, initial * (2 ** max(0, attempts)))


class Dispatcher:
    def __init__(self, config: Config, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.tmp = config.data_dir / "spool" / ".tmp"

    def run_forever(self, stop: Event, poll_s: float = 0.25) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - edge of the stage: log, keep draining
                log.exception("outbox pass failed; retrying")
                busy = False
            if not busy:
                stop.wait(poll_s)

    def run_once(self, now: float | None = None) -> bool:
        """Send what is due; True if anything was attempted."""
        items = self.store.due_outbox(now)
        if not items:
            return False
        groups: dict[tuple[str, str], list[OutboxItem]] = defaultdict(list)
        for item in items:
            groups[(item.destination, self._calling_ae(item))].append(item)
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
                peer = self._peer(dest, source_ae)
                outcomes = send_files(
                    peer, [StoreRequest(i.id, Path(i.path), i.sop_class, i.sop_uid) for i in batch],
                    calling_ae=self.config.node.ae_title,
                    timeout_s=self.config.outbox.connect_timeout_s)
            except SendError as exc:
                for item in batch:
                    self._fail(item, exc.reason, retryable=exc.retryable)
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
            log.info("sent %d result objects to %s", len(sent), dest_name)
        for outcome in outcomes:
            if not outcome.ok:
                self._fail(by_id[outcome.item_id], outcome.reason, retryable=outcome.retryable)

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
            log.error("result %s to %s is a dead letter: %s", item.sop_uid, item.destination, why)
            return
        delay = backoff(item.attempts, settings.retry_initial_s, settings.retry_max_s)
        self.store.mark_retry(item.id, now + delay, reason)
        self.metrics.send_attempts.labels(destination=item.destination, result="retry").inc()
        log.warning("result %s to %s failed (%s); retry in %.0f s", item.sop_uid,
                    item.destination, reason, delay)
