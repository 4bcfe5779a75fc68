"""Read-only views of the store: what the status page and the CLI's
listings show."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from dicom_node.store.db import OutboxState

__all__ = ["StoreViews"]


class StoreViews:
    """Read-only queries on the store for the status page and the CLI's
    listings: their own read-only connection per thread, so neither can
    write, and no SQL outside store/."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute(sql, params).fetchall()]

    def series(self, limit: int = 50, unrouted: bool = False) -> list[dict[str, Any]]:
        where = "WHERE route IS NULL AND unrouted_reason IS NOT NULL" if unrouted else ""
        return self._rows(
            f"""SELECT series_uid, study_uid, modality, calling_ae, called_ae, first_at, last_at,
                       instance_count, expected_count, state, route, unrouted_reason, completed_at
                FROM series {where} ORDER BY last_at DESC LIMIT ?""", (limit,))

    def jobs(self, state: str | None = None, limit: int = 50, job_id: int | None = None) -> list[dict[str, Any]]:
        where: str
        params: tuple[Any, ...]
        if job_id is not None:
            where, params = "WHERE j.id=?", (job_id, 1)
        else:
            where, params = ("WHERE j.state=?", (state, limit)) if state else ("", (limit,))
        rows = self._rows(
            f"""SELECT j.id, j.route, j.pipeline, j.model, j.state, j.attempts, j.worker, j.reason,
                       j.calling_ae, j.series_uids, j.created_at, j.started_at, j.finished_at,
                       j.deferrals,
                       (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id) AS results,
                       (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state='sent') AS sent,
                       (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state='dead') AS dead
                FROM jobs j {where} ORDER BY j.id DESC LIMIT ?""", params)
        for row in rows:
            row["series_uids"] = json.loads(row["series_uids"])
            start, end = row["started_at"], row["finished_at"]
            row["duration_s"] = round(end - start, 3) if start and end and end >= start else None
            row["outcome"] = _outcome(row)
        return rows

    def job(self, job_id: int) -> dict[str, Any] | None:
        rows = self.jobs(job_id=job_id)
        if not rows:
            return None
        job = rows[0]
        job["outbox"] = self._rows(
            """SELECT id, destination, sop_uid, sop_class, state, attempts, created_at, sent_at,
                      last_error FROM outbox WHERE job_id=? ORDER BY id""", (job_id,))
        return job

    def job_counts(self) -> dict[str, int]:
        rows = self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def outbox_items(self, *, state: str | None = None, destination: str | None = None,
                     job_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        where, params = _where([("state=?", state), ("destination=?", destination), ("job_id=?", job_id)])
        return self._rows(f"SELECT * FROM outbox{where} ORDER BY id DESC LIMIT ?", (*params, limit))

    def job_rows(self, *, state: str | None = None, route: str | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
        where, params = _where([("state=?", state), ("route=?", route)])
        return self._rows(f"SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ?", (*params, limit))

    def series_rows(self, *, state: str | None = None, route: str | None = None,
                    unrouted: bool = False, limit: int = 50) -> list[dict[str, Any]]:
        where, params = _where([("state=?", state), ("route=?", route),
                                ("route IS NULL AND state='complete'", True if unrouted else None)])
        return self._rows(f"SELECT * FROM series{where} ORDER BY last_at DESC LIMIT ?", (*params, limit))

    def outbox(self) -> dict[str, dict[str, Any]]:
        per: dict[str, dict[str, Any]] = {}
        for r in self._rows("SELECT destination, state, COUNT(*) AS n FROM outbox GROUP BY destination, state"):
            per.setdefault(r["destination"], {})[r["state"]] = r["n"]
        last = {r["destination"]: r for r in self._rows(
            """SELECT destination, last_error, state, MAX(id) AS id FROM outbox
               WHERE last_error IS NOT NULL AND state IN ('pending','dead')
               GROUP BY destination""")}
        sent = {r["destination"]: r["at"] for r in self._rows(
            "SELECT destination, MAX(sent_at) AS at FROM outbox WHERE state='sent' GROUP BY destination")}
        out = {}
        for dest in sorted(set(per) | set(last)):
            counts = {s.value: per.get(dest, {}).get(s.value, 0) for s in OutboxState}
            out[dest] = {"counts": counts, "last_error": last.get(dest, {}).get("last_error"),
                         "last_sent_at": sent.get(dest)}
        return out


def _outcome(job: dict[str, Any]) -> str:
    state = job["state"]
    if state == "done":
        text = f"{job['results']} result objects"
        if job["results"]:
            text += f", {job['sent']} sent" + (f", {job['dead']} dead" if job["dead"] else "")
        return text
    if state == "held":
        return f"{job['results']} result objects held for review"
    if state == "running":
        return f"running on {job['worker'] or '?'}"
    if state == "queued":
        return "waiting" + (f" (deferred {job['deferrals']}x)" if job["deferrals"] else "")
    return state


def _where(filters: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """`` WHERE a=? AND b=?`` for the filters given (value not None); a
    value of True is a clause without a parameter."""
    used = [(clause, value) for clause, value in filters if value is not None]
    sql = " WHERE " + " AND ".join(c for c, _ in used) if used else ""
    return sql, [v for _, v in used if v is not True]
