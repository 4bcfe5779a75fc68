"""Series completion: decide when a series (or a study's group of series) is
whole, route it, and queue one job for it.

A series is complete when no instance arrived for its route's quiet period,
when the instance count the data announced is reached, or when an operator
says so.  Late instances reopen a series; the next completion queues a new
job for the updated series.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.config import Config, Route
from dicom_node.observability.logs import RepeatLog, escape
from dicom_node.observability.metrics import Metrics
from dicom_node.store.header import read_header_dataset
from dicom_node.route.router import RouteFacts, decide
from dicom_node.store.db import SeriesRecord, Store
from dicom_node.store.layout import DataDir

__all__ = ["Completer", "read_header"]

log = logging.getLogger("dicom_node.complete")

# Unrouted series still wait for quiet before we say so, to log once, not per instance.
_UNROUTED_QUIET_S = 10.0

# What reading a spooled header raises when the file is truncated, corrupt or
# gone: the series cannot be routed, and the reason says so.  Anything else
# is a bug, and must not pass for a routing decision.
_UNREADABLE = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError,
               struct.error)


def read_header(path: Path) -> Dataset:
    return read_header_dataset(path)


@dataclass(frozen=True)
class _Pending:
    series: SeriesRecord
    route: Route | None
    reason: str


class Completer:
    def __init__(self, config: Config, store: Store, metrics: Metrics, *,
                 data: DataDir | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.spool_root = (data or DataDir.of(config)).spool
        # Routing reads a file; remember each series' decision until something
        # it depends on changes, instead of re-reading every pass.
        self._decisions: dict[str, tuple[tuple[object, ...], Route | None, str]] = {}
        self._uses_count = any(m.keyword == "InstanceCount" for r in config.routes for m in r.match)
        self._failures = RepeatLog(log, logging.ERROR)

    def run_once(self, now: float | None = None) -> list[int]:
        """One pass over the receiving series; returns the ids of queued jobs."""
        now = time.time() if now is None else now
        receiving = self.store.receiving_series()
        live = {s.series_uid for s in receiving}
        self._decisions = {k: v for k, v in self._decisions.items() if k in live}
        pending = []
        for s in receiving:
            try:
                pending.append(self._route(s))
            except Exception as exc:  # noqa: BLE001 - a bug on one series must not stop the rest
                # Not an "unrouted" decision: the series stays receiving and
                # is tried again next pass; the bug is logged once, then counted.
                self._failures.report(f"routing series {s.series_uid} failed, retrying: "
                                      f"{type(exc).__name__}: {exc}",
                                      key=f"{s.series_uid} {type(exc).__name__}", exc_info=True)
        jobs: list[int] = []
        by_study: dict[tuple[str, str], list[_Pending]] = defaultdict(list)
        for p in pending:
            if p.route is not None and p.route.group_by == "study":
                by_study[(p.route.name, p.series.study_uid)].append(p)
                continue
            if self._is_due([p.series], p.route, now):
                jobs += self._complete([p], p.series.series_uid, now)
        for (_, study_uid), group in by_study.items():
            if self._is_due([g.series for g in group], group[0].route, now):
                jobs += self._complete(group, study_uid, now)
        return jobs

    def _route(self, series: SeriesRecord) -> _Pending:
        key = (series.generation, series.calling_ae, series.called_ae,
               series.instance_count if self._uses_count else None)
        cached = self._decisions.get(series.series_uid)
        if cached is None or cached[0] != key:
            route, reason = self._decide(series)
            cached = (key, route, reason)
            self._decisions[series.series_uid] = cached
        return _Pending(series, cached[1], cached[2])

    def _decide(self, series: SeriesRecord) -> tuple[Route | None, str]:
        first = self.store.first_instance(series.series_uid)
        if first is None:
            return None, "series has no instances"
        try:
            header = read_header(self.spool_root / first.path)
        except _UNREADABLE as exc:
            return None, f"cannot read instance {first.sop_uid}: {type(exc).__name__}: {escape(exc)}"
        facts = RouteFacts(header, calling_ae=series.calling_ae, called_ae=series.called_ae,
                           instance_count=series.instance_count)
        decision = decide(list(self.config.routes), facts)
        return decision.route, decision.reason

    @staticmethod
    def _is_due(group: list[SeriesRecord], route: Route | None, now: float) -> bool:
        if any(s.complete_requested for s in group):
            return True
        quiet = route.quiet_seconds if route is not None else _UNROUTED_QUIET_S
        if now - max(s.last_at for s in group) >= quiet:
            return True
        if len(group) == 1 and route is not None and route.group_by == "series":
            s = group[0]
            return s.expected_count is not None and s.instance_count >= s.expected_count
        return False

    def _complete(self, group: list[_Pending], group_key: str, now: float) -> list[int]:
        route = group[0].route
        series = [g.series for g in group]
        if route is None:
            self.store.set_route(series[0].series_uid, None, group[0].reason)
            self.store.complete_series(series, route=None, pipeline=None, model=None,
                                       group_key=group_key, now=now)
            self.metrics.series_unrouted.inc()
            first = series[0]
            log.info("series %s complete (%d instances from %s), unrouted: %s", first.series_uid,
                     first.instance_count, escape(first.calling_ae), group[0].reason,
                     extra={"series_uid": first.series_uid, "study_uid": first.study_uid,
                            "calling_ae": escape(first.calling_ae),
                            "instances": first.instance_count, "route": None,
                            "unrouted_reason": group[0].reason})
            return []
        for s in series:
            self.store.set_route(s.series_uid, route.name, None)
        job_id = self.store.complete_series(series, route=route.name, pipeline=route.pipeline,
                                            model=route.model, group_key=group_key, now=now)
        if job_id is None:
            return []  # an instance arrived meanwhile; its quiet period starts again
        self.metrics.series_completed.labels(route=route.name).inc(len(series))
        instances = sum(s.instance_count for s in series)
        what = "" if len(series) == 1 else f"{len(series)} series, "
        callers = ",".join(sorted({escape(s.calling_ae) for s in series}))
        log.info("%s %s complete (%s%d instances from %s): route %s, job %d", route.group_by,
                 group_key, what, instances, callers, route.name, job_id,
                 extra={"series_uid": [s.series_uid for s in series] if len(series) > 1
                        else series[0].series_uid, "study_uid": series[0].study_uid,
                        "calling_ae": callers, "instances": instances, "route": route.name,
                        "job_id": job_id})
        return [job_id]
