"""The embedded SQLite store: instances, series, jobs, outbox.

Every arrow of the flow that crosses a process or a restart goes through this
database, so a crash anywhere loses nothing and repeats nothing that already
finished.  WAL mode lets the receiver, the workers and the sender write
concurrently; ``synchronous=FULL`` makes a commit durable before we answer a
C-STORE with Success.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple
from enum import StrEnum
from pathlib import Path
from collections.abc import Iterator, Sequence

from dicom_node.errors import JobStateError

__all__ = [
    "Store",
    "JobState",
    "OutboxState",
    "InstanceRecord",
    "SeriesRecord",
    "Job",
    "OutboxItem",
    "OutboxEntry",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid        TEXT PRIMARY KEY,
    sop_class      TEXT NOT NULL,
    study_uid      TEXT NOT NULL,
    series_uid     TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path           TEXT NOT NULL,
    size           INTEGER NOT NULL,
    calling_ae     TEXT NOT NULL,
    called_ae      TEXT NOT NULL,
    received_at    REAL NOT NULL,
    replaced       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);

CREATE TABLE IF NOT EXISTS series (
    series_uid     TEXT PRIMARY KEY,
    study_uid      TEXT NOT NULL,
    modality       TEXT NOT NULL DEFAULT '',
    calling_ae     TEXT NOT NULL,
    called_ae      TEXT NOT NULL,
    first_at       REAL NOT NULL,
    last_at        REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    expected_count INTEGER,
    -- receiving -> complete; a late instance puts it back to receiving
    state          TEXT NOT NULL DEFAULT 'receiving',
    generation     INTEGER NOT NULL DEFAULT 0,
    route          TEXT,
    unrouted_reason TEXT,
    completed_at   REAL,
    -- set by `dicom-node complete`: complete at the next pass, quiet or not
    complete_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);

CREATE TABLE IF NOT EXISTS jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    route          TEXT NOT NULL,
    pipeline       TEXT NOT NULL,
    model          TEXT NOT NULL,
    group_key      TEXT NOT NULL,
    series_uids    TEXT NOT NULL,
    generation     INTEGER NOT NULL,
    calling_ae     TEXT NOT NULL,
    -- queued -> running -> done | failed | skipped | held;
    -- held -> done (released by an operator) | discarded
    state          TEXT NOT NULL DEFAULT 'queued',
    attempts       INTEGER NOT NULL DEFAULT 0,
    worker         TEXT,
    reason         TEXT,
    created_at     REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL,
    completed_at   REAL NOT NULL,
    -- a job deferred after a full disk is not claimed before this time
    not_before     REAL,
    deferrals      INTEGER NOT NULL DEFAULT 0,
    UNIQUE(route, group_key, generation)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);

CREATE TABLE IF NOT EXISTS outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id         INTEGER NOT NULL REFERENCES jobs(id),
    destination    TEXT NOT NULL,
    path           TEXT NOT NULL,
    sop_uid        TEXT NOT NULL,
    sop_class      TEXT NOT NULL,
    -- pending -> sent | dead; held -> pending (released) | discarded
    state          TEXT NOT NULL DEFAULT 'pending',
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_at        REAL NOT NULL,
    created_at     REAL NOT NULL,
    sent_at        REAL,
    last_error     TEXT,
    UNIQUE(destination, sop_uid, job_id)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_at);

-- readiness writes and deletes one row here (the older _probe table had no row)
CREATE TABLE IF NOT EXISTS _write_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
"""

# Columns added after the first release: (table, column, declaration).  A
# database made by an older version gets them at open; CREATE TABLE above has
# them for new ones.
_ADDED_COLUMNS = [
    ("jobs", "not_before", "REAL"),
    ("jobs", "deferrals", "INTEGER NOT NULL DEFAULT 0"),
]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, decl in _ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column in have:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        except sqlite3.OperationalError as exc:
            # Another process opening the same database added it first.
            if "duplicate column" not in str(exc):
                raise


class JobState(StrEnum):
    """A job's ``state`` column.  StrEnum, so members compare equal to the
    plain strings the rest of the node and the database use."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    # The pipeline found its result implausible: written, never sent, until
    # an operator releases (-> done) or discards it.
    HELD = "held"
    DISCARDED = "discarded"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    # Results of a held job: the dispatcher only sends pending items.
    HELD = "held"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class InstanceRecord:
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str
    size: int


@dataclass(frozen=True)
class SeriesRecord:
    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    called_ae: str
    first_at: float
    last_at: float
    instance_count: int
    expected_count: int | None
    state: str
    generation: int
    route: str | None
    unrouted_reason: str | None
    complete_requested: int


@dataclass(frozen=True)
class Job:
    id: int
    route: str
    pipeline: str
    model: str
    group_key: str
    series_uids: tuple[str, ...]
    generation: int
    calling_ae: str
    state: str
    attempts: int
    reason: str | None
    completed_at: float
    # Times the job was queued again after a full disk (not attempts).
    deferrals: int = 0


class OutboxEntry(NamedTuple):
    """A result file to queue for one destination (finish_job's input)."""

    destination: str
    path: str
    sop_uid: str
    sop_class: str


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    destination: str
    path: str
    sop_uid: str
    sop_class: str
    state: str
    attempts: int
    next_at: float
    created_at: float
    last_error: str | None
    sent_at: float | None = None


_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: Path) -> threading.RLock:
    """One lock per database file and process, shared by every Store on it."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = threading.RLock()
        return lock


class Store:
    """A connection per thread to one SQLite file.

    Methods are small transactions named after the step of the flow that uses
    them.  ``BEGIN IMMEDIATE`` takes the write lock up front, so two workers
    can never claim the same job.
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        """``synchronous="NORMAL"`` skips the WAL fsync at commit: for the
        receiver, whose instance files are fsync'd on their own and re-indexed
        from the spool at start should a power cut drop the last commits."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.synchronous = synchronous
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = _write_lock(path)
        self._local = threading.local()
        # executescript manages its own transaction.
        self._conn().executescript(_SCHEMA)
        _add_missing_columns(self._conn())

    # -- plumbing -------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        # Writers of this process queue on a lock, not on SQLite's busy
        # handler, which sleeps 1, 2, 5, 10... ms between tries: with several
        # associations recording instances at once those naps, not the
        # commits, set the pace.  Other processes still meet the handler.
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def check_writable(self) -> None:
        """Raise if the database cannot take a write (for readiness).  A row
        is written and deleted, so the commit really appends to the WAL and
        syncs it; a statement that changes nothing (CREATE TABLE IF NOT
        EXISTS) commits without writing a page and passes on a full disk."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO _write_probe (id, at) VALUES (1, ?)", (time.time(),))
            db.execute("DELETE FROM _write_probe WHERE id=1")

    # -- receive ----------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord, *, modality: str, calling_ae: str,
                        called_ae: str, expected_count: int | None,
                        now: float | None = None) -> bool:
        """Record a stored instance and touch its series.  Returns True if the
        SOP Instance UID was already known (the file was replaced)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            old = db.execute("SELECT series_uid FROM instances WHERE sop_uid=?",
                             (rec.sop_uid,)).fetchone()
            db.execute(
                """INSERT INTO instances (sop_uid, sop_class, study_uid, series_uid,
                       transfer_syntax, path, size, calling_ae, called_ae, received_at)
                   VALUES (?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(sop_uid) DO UPDATE SET sop_class=excluded.sop_class,
                       study_uid=excluded.study_uid, series_uid=excluded.series_uid,
                       transfer_syntax=excluded.transfer_syntax, path=excluded.path,
                       size=excluded.size, calling_ae=excluded.calling_ae,
                       called_ae=excluded.called_ae, received_at=excluded.received_at,
                       replaced=replaced+1""",
                (rec.sop_uid, rec.sop_class, rec.study_uid, rec.series_uid,
                 rec.transfer_syntax, rec.path, rec.size, calling_ae, called_ae, now))
            moved = old is not None and old["series_uid"] != rec.series_uid
            if moved:
                self._recount(db, old["series_uid"])
            db.execute(
                """INSERT INTO series (series_uid, study_uid, modality, calling_ae, called_ae,
                       first_at, last_at, instance_count, expected_count)
                   VALUES (?,?,?,?,?,?,?,0,?)
                   ON CONFLICT(series_uid) DO UPDATE SET last_at=excluded.last_at,
                       calling_ae=excluded.calling_ae, called_ae=excluded.called_ae,
                       expected_count=COALESCE(excluded.expected_count, expected_count),
                       -- a late instance reopens a completed series: a new job follows
                       generation=generation + (state='complete'),
                       state='receiving'""",
                (rec.series_uid, rec.study_uid, modality, calling_ae, called_ae,
                 now, now, expected_count))
            if old is None or moved:
                # Counting rows per insert would make a 2,000-slice series quadratic.
                db.execute("UPDATE series SET instance_count=instance_count+1 WHERE series_uid=?",
                           (rec.series_uid,))
        return old is not None

    @staticmethod
    def _recount(db: sqlite3.Connection, series_uid: str) -> None:
        db.execute("""UPDATE series SET instance_count=(SELECT COUNT(*) FROM instances
                      WHERE series_uid=?) WHERE series_uid=?""", (series_uid, series_uid))

    def instance_paths(self) -> set[str]:
        return {r["path"] for r in self._conn().execute("SELECT path FROM instances")}

    def instances_of(self, series_uid: str) -> list[InstanceRecord]:
        rows = self._conn().execute(
            """SELECT sop_uid, sop_class, study_uid, series_uid, transfer_syntax, path, size
               FROM instances WHERE series_uid=? ORDER BY received_at, sop_uid""",
            (series_uid,)).fetchall()
        return [InstanceRecord(**dict(r)) for r in rows]

    def first_instance(self, series_uid: str) -> InstanceRecord | None:
        row = self._conn().execute(
            """SELECT sop_uid, sop_class, study_uid, series_uid, transfer_syntax, path, size
               FROM instances WHERE series_uid=? ORDER BY received_at, sop_uid LIMIT 1""",
            (series_uid,)).fetchone()
        return InstanceRecord(**dict(row)) if row else None

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        row = self._conn().execute(
            """SELECT sop_uid, sop_class, study_uid, series_uid, transfer_syntax, path, size
               FROM instances WHERE sop_uid=?""", (sop_uid,)).fetchone()
        return InstanceRecord(**dict(row)) if row else None

    def spool_bytes(self) -> int:
        """Bytes of the spooled files, from the sizes recorded at reception:
        one SQL sum, no walk of the spool at every scrape."""
        return int(self._conn().execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0])

    def count_instances(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    # -- complete and route -----------------------------------------------------

    def receiving_series(self) -> list[SeriesRecord]:
        rows = self._conn().execute("SELECT * FROM series WHERE state='receiving'").fetchall()
        return [_series(r) for r in rows]

    def series(self, series_uid: str) -> SeriesRecord | None:
        row = self._conn().execute("SELECT * FROM series WHERE series_uid=?",
                                   (series_uid,)).fetchone()
        return _series(row) if row else None

    def series_of_study(self, study_uid: str) -> list[SeriesRecord]:
        rows = self._conn().execute("SELECT * FROM series WHERE study_uid=?",
                                    (study_uid,)).fetchall()
        return [_series(r) for r in rows]

    def request_completion(self, series_uid: str) -> bool:
        with self._tx() as db:
            cur = db.execute("""UPDATE series SET complete_requested=1
                                WHERE series_uid=? AND state='receiving'""", (series_uid,))
        return cur.rowcount == 1

    def set_route(self, series_uid: str, route: str | None, reason: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET route=?, unrouted_reason=? WHERE series_uid=?",
                       (route, reason, series_uid))

    def complete_series(self, series: list[SeriesRecord], *, route: str | None,
                        pipeline: str | None, model: str | None, group_key: str,
                        now: float | None = None) -> int | None:
        """Mark series complete and, when routed, queue one job for them, in one
        transaction.  A series that received an instance since it was read is
        left alone (its quiet period starts again).  Returns the job id."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for s in series:
                row = db.execute("SELECT last_at, generation, state FROM series WHERE series_uid=?",
                                 (s.series_uid,)).fetchone()
                if row is None or row["last_at"] != s.last_at or row["state"] != "receiving":
                    return None
            uids = sorted(s.series_uid for s in series)
            for uid in uids:
                db.execute("""UPDATE series SET state='complete', completed_at=?,
                              complete_requested=0 WHERE series_uid=?""", (now, uid))
            if route is None:
                return None
            generation = sum(s.generation for s in series)
            cur = db.execute(
                """INSERT INTO jobs (route, pipeline, model, group_key, series_uids, generation,
                       calling_ae, created_at, completed_at)
                   VALUES (?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(route, group_key, generation) DO UPDATE SET
                       series_uids=excluded.series_uids, state='queued', attempts=0,
                       reason=NULL, completed_at=excluded.completed_at,
                       not_before=NULL, deferrals=0
                   RETURNING id""",
                (route, pipeline, model, group_key, json.dumps(uids), generation,
                 series[0].calling_ae, now, now))
            return int(cur.fetchone()[0])

    # -- jobs -------------------------------------------------------------------

    def claim_job(self, worker: str, now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        # A read first: idle workers poll often, and a write transaction per
        # poll would take the write lock from the receivers every time.
        waiting = self._conn().execute(
            """SELECT 1 FROM jobs WHERE state='queued' AND (not_before IS NULL OR not_before <= ?)
               LIMIT 1""", (now,)).fetchone()
        if waiting is None:
            return None
        with self._tx() as db:
            row = db.execute(
                """UPDATE jobs SET state='running', worker=?, started_at=?, attempts=attempts+1
                   WHERE id=(SELECT id FROM jobs WHERE state='queued'
                             AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT 1)
                   RETURNING *""", (worker, now, now)).fetchone()
        return _job(row) if row else None

    def defer_job(self, job_id: int, not_before: float, reason: str) -> bool:
        """Queue a running job again, not to be claimed before ``not_before``
        (after a full disk).  The attempt it used is given back: a transient
        condition of the node must not use up ``jobs.max_attempts``."""
        with self._tx() as db:
            cur = db.execute(
                """UPDATE jobs SET state='queued', worker=NULL, not_before=?, reason=?,
                       attempts=MAX(attempts-1, 0), deferrals=deferrals+1
                   WHERE id=? AND state='running'""", (not_before, reason, job_id))
        return cur.rowcount == 1

    def finish_job(self, job_id: int, state: str, reason: str | None = None,
                   results: Sequence[OutboxEntry] = (),
                   now: float | None = None) -> None:
        """End a job.  ``results`` are queued in the outbox in the same transaction, so a crash either keeps
        both or neither.  A held job's results are recorded as held: the row
        state follows the job state, so a held job can never have an item
        the dispatcher would send."""
        now = time.time() if now is None else now
        item_state = OutboxState.HELD if state == JobState.HELD else OutboxState.PENDING
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, reason=?, finished_at=? WHERE id=?",
                       (state, reason, now, job_id))
            db.executemany(
                """INSERT INTO outbox (job_id, destination, path, sop_uid, sop_class,
                       state, next_at, created_at) VALUES (?,?,?,?,?,?,?,?)
                   ON CONFLICT(destination, sop_uid, job_id) DO UPDATE SET
                       path=excluded.path, state=excluded.state, attempts=0,
                       next_at=excluded.next_at""",
                [(job_id, d, p, u, c, str(item_state), now, now) for d, p, u, c in results])

    def requeue_running(self, worker: str | None = None, max_attempts: int = 3,
                        reason: str = "worker stopped") -> list[int]:
        """Put running jobs back in the queue (after a crash or a dead worker);
        jobs that already used ``max_attempts`` fail with ``reason``."""
        now = time.time()
        where = "state='running'" + (" AND worker=?" if worker else "")
        args: tuple[str, ...] = (worker,) if worker else ()
        with self._tx() as db:
            rows = db.execute(f"SELECT id, attempts FROM jobs WHERE {where}", args).fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET state='failed', reason=?, finished_at=? WHERE id=?",
                               (f"{reason} after {row['attempts']} attempts", now, row["id"]))
                else:
                    db.execute("UPDATE jobs SET state='queued', worker=NULL WHERE id=?",
                               (row["id"],))
        return [r["id"] for r in rows]

    def job(self, job_id: int) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        if state:
            rows = self._conn().execute("SELECT * FROM jobs WHERE state=? ORDER BY id DESC LIMIT ?",
                                        (state, limit)).fetchall()
        else:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?",
                                        (limit,)).fetchall()
        return [_job(r) for r in rows]

    def job_counts(self) -> dict[tuple[str, str], int]:
        rows = self._conn().execute(
            "SELECT pipeline, state, COUNT(*) AS n FROM jobs GROUP BY pipeline, state").fetchall()
        return {(r["pipeline"], r["state"]): r["n"] for r in rows}

    def oldest_queued_at(self) -> float | None:
        row = self._conn().execute(
            "SELECT MIN(created_at) FROM jobs WHERE state='queued'").fetchone()
        return None if row[0] is None else float(row[0])

    def requeue_job(self, job_id: int) -> bool:
        """Queue an ended job again; False when unknown, queued or running.
        A held job is refused with JobStateError: rerunning it would replace
        the implausible result under review, which an operator releases or
        discards instead."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is not None and row["state"] == JobState.HELD:
                raise JobStateError(f"job {job_id} is held (implausible result): release it "
                                    f"with --release {job_id} or discard it with --discard {job_id}")
            cur = db.execute("""UPDATE jobs SET state='queued', attempts=0, reason=NULL, worker=NULL,
                                not_before=NULL, deferrals=0
                                WHERE id=? AND state IN ('failed','done','skipped','discarded')""",
                             (job_id,))
        return cur.rowcount == 1

    def release_job(self, job_id: int, now: float | None = None) -> list[OutboxItem]:
        """An operator accepts a held result: its outbox items become pending
        (sent by the dispatcher as any other) and the job done, its reason
        kept.  Returns the released items; JobStateError if the job is not held."""
        now = time.time() if now is None else now
        with self._tx() as db:
            reason = self._held_reason(db, job_id)
            # created_at restarts: the dead-letter age counts from the release,
            # not from a hold that may have lasted days.
            rows = db.execute(
                """UPDATE outbox SET state='pending', next_at=?, created_at=?, attempts=0
                   WHERE job_id=? AND state='held' RETURNING *""",
                (now, now, job_id)).fetchall()
            db.execute("UPDATE jobs SET state='done', reason=?, finished_at=? WHERE id=?",
                       (f"released by operator after: {reason}", now, job_id))
        return [_outbox(r) for r in rows]

    def discard_job(self, job_id: int, now: float | None = None) -> list[OutboxItem]:
        """An operator rejects a held result: its outbox items and the job
        become discarded.  Returns the items, whose files the caller removes
        (after the commit: a crash between leaves files retention removes,
        never a row pointing at a missing file that could be sent)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            self._held_reason(db, job_id)
            rows = db.execute(
                """UPDATE outbox SET state='discarded'
                   WHERE job_id=? AND state='held' RETURNING *""", (job_id,)).fetchall()
            db.execute("UPDATE jobs SET state='discarded', finished_at=? WHERE id=?",
                       (now, job_id))
        return [_outbox(r) for r in rows]

    @staticmethod
    def _held_reason(db: sqlite3.Connection, job_id: int) -> str:
        """The reason of a held job, inside the caller's transaction; raises
        JobStateError naming the state of a job that is not held."""
        row = db.execute("SELECT state, reason FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobStateError(f"job {job_id} not found")
        if row["state"] != JobState.HELD:
            raise JobStateError(f"job {job_id} is {row['state']}, not held")
        return row["reason"] or ""

    # -- outbox -----------------------------------------------------------------

    def due_outbox(self, now: float | None = None, limit: int = 500) -> list[OutboxItem]:
        now = time.time() if now is None else now
        rows = self._conn().execute(
            """SELECT * FROM outbox WHERE state='pending' AND next_at<=?
               ORDER BY destination, next_at, id LIMIT ?""", (now, limit)).fetchall()
        return [_outbox(r) for r in rows]

    def mark_sent(self, item_ids: list[int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.executemany("""UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1,
                              last_error=NULL WHERE id=?""", [(now, i) for i in item_ids])

    def mark_retry(self, item_id: int, next_at: float, error: str) -> None:
        with self._tx() as db:
            db.execute("""UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=?
                          WHERE id=?""", (next_at, error, item_id))

    def mark_dead(self, item_id: int, error: str) -> None:
        with self._tx() as db:
            db.execute("""UPDATE outbox SET state='dead', attempts=attempts+1, last_error=?
                          WHERE id=?""", (error, item_id))

    def retry_dead(self, destination: str | None = None) -> int:
        now = time.time()
        with self._tx() as db:
            if destination:
                cur = db.execute("""UPDATE outbox SET state='pending', next_at=?, attempts=0,
                                    created_at=? WHERE state='dead' AND destination=?""",
                                 (now, now, destination))
            else:
                cur = db.execute("""UPDATE outbox SET state='pending', next_at=?, attempts=0,
                                    created_at=? WHERE state='dead'""", (now, now))
        return cur.rowcount

    def outbox_items(self, job_id: int | None = None) -> list[OutboxItem]:
        if job_id is None:
            rows = self._conn().execute("SELECT * FROM outbox ORDER BY id").fetchall()
        else:
            rows = self._conn().execute("SELECT * FROM outbox WHERE job_id=? ORDER BY id",
                                        (job_id,)).fetchall()
        return [_outbox(r) for r in rows]

    def outbox_counts(self) -> dict[tuple[str, str], int]:
        rows = self._conn().execute(
            "SELECT destination, state, COUNT(*) AS n FROM outbox GROUP BY destination, state"
        ).fetchall()
        return {(r["destination"], r["state"]): r["n"] for r in rows}

    # -- retention ----------------------------------------------------------------
    # A series is expired when nothing can need its instances any more: it is
    # not receiving, its last instance came before the cutoff, and every job
    # that includes it has ended (done, failed, skipped, discarded) before the
    # cutoff.  A held job has not ended: its input stays for the operator's
    # review.  A series no route matched has no job and expires on age alone.

    _SERIES_EXPIRED = """s.state != 'receiving' AND s.last_at < :cutoff
        AND s.series_uid NOT IN (
            SELECT u.value FROM jobs j, json_each(j.series_uids) u
            WHERE j.state NOT IN ('done', 'failed', 'skipped', 'discarded')
               OR j.finished_at IS NULL OR j.finished_at >= :cutoff)"""

    def expired_series(self, older_than: float, limit: int = 500) -> list[str]:
        """UIDs of expired series (oldest first), for ``purge_series``."""
        rows = self._conn().execute(
            f"""SELECT s.series_uid FROM series s WHERE {self._SERIES_EXPIRED}
                ORDER BY s.last_at LIMIT :limit""",
            {"cutoff": older_than, "limit": limit}).fetchall()
        return [r["series_uid"] for r in rows]

    def purge_series(self, series_uid: str, older_than: float) -> list[tuple[str, float]]:
        """Delete an expired series and its instance rows, checking again in the
        same transaction (an instance or a requeue may have come since it was
        listed).  Returns (spool path, received_at) of each instance deleted,
        for the caller to remove the files; empty when the series was kept."""
        with self._tx() as db:
            still = db.execute(
                f"SELECT 1 FROM series s WHERE s.series_uid = :uid AND {self._SERIES_EXPIRED}",
                {"uid": series_uid, "cutoff": older_than}).fetchone()
            if still is None:
                return []
            rows = db.execute("SELECT path, received_at FROM instances WHERE series_uid=?",
                              (series_uid,)).fetchall()
            db.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
            db.execute("DELETE FROM series WHERE series_uid=?", (series_uid,))
        return [(r["path"], r["received_at"]) for r in rows]

    def expired_result_jobs(self, job_ids: list[int], older_than: float) -> list[int]:
        """Of ``job_ids``, the jobs whose result folder nothing needs: the job
        ended before the cutoff and every outbox item of it is sent, dead or
        discarded, also before the cutoff.  A held job's folder is never
        returned: it is the result under review.  Unknown ids are never returned."""
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        rows = self._conn().execute(
            f"""SELECT j.id FROM jobs j WHERE j.id IN ({marks})
                AND j.state IN ('done', 'failed', 'skipped', 'discarded') AND j.finished_at < ?
                AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id
                    AND (o.state NOT IN ('sent', 'dead', 'discarded')
                         OR COALESCE(o.sent_at, o.created_at) >= ?))
                ORDER BY j.id""", (*job_ids, older_than, older_than)).fetchall()
        return [r["id"] for r in rows]


def _series(row: sqlite3.Row) -> SeriesRecord:
    return SeriesRecord(**{k: row[k] for k in SeriesRecord.__dataclass_fields__})


def _job(row: sqlite3.Row) -> Job:
    data = {k: row[k] for k in Job.__dataclass_fields__ if k != "series_uids"}
    return Job(series_uids=tuple(json.loads(row["series_uids"])), **data)


def _outbox(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(**{k: row[k] for k in OutboxItem.__dataclass_fields__})
