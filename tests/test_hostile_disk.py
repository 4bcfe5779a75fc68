"""A full disk is transient: fill the data dir's file system for real and check
that nothing dies, readiness tells the truth, a job that cannot write its
results waits instead of failing, and everything resumes once there is room."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ct_route, http_get, storescu, wait_for, write_ct_series

from dicom_node.observability.metrics_dir import create_metrics_dir, remove_metrics_dir
from dicom_node.store.db import Store

MiB = 1024 * 1024


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 48 MiB tmpfs mounted for the test (tests run as root)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (run the tests as root): {done.stderr.strip()}")
    yield mnt
    # Lazy: the node may still hold files open while the fixture ends.
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60, check=False)


def _fill(path: Path, leave: int = 0) -> None:
    """Write real bytes until only ``leave`` bytes are free (0: until ENOSPC)."""
    chunk = b"\xa5" * MiB
    with path.open("ab") as f:
        while True:
            room = _free(path.parent) - leave
            if room <= 0:
                break
            try:
                f.write(chunk[:min(room, MiB)])
                f.flush()
            except OSError:
                break
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


def _readyz(node) -> tuple[int, dict]:
    status, body = http_get(f"http://127.0.0.1:{node.http_port}/readyz")
    return status, (json.loads(body) if body else {})


def test_full_disk_defers_jobs_and_everything_resumes(node_factory, tmpfs, tmp_path):
    data = tmpfs / "data"
    # No watermark: the disk itself must fill up, as when the floor is set too low.
    node = node_factory(routes=[ct_route(quiet_seconds=0.5)],
                        node={"data_dir": str(data), "min_free_bytes": 0, "workers": 1})
    node.data_dir = data
    node.start()
    # 8 slices of 256 x 256: about 1 MiB of results, more than is left below.
    files = write_ct_series(tmp_path / "in", n=8, size=256, seed="full-disk")
    storescu(node.port, files)

    # Room for the database's small writes, not for the results: the job hits
    # ENOSPC while writing them.
    _fill(tmpfs / "filler-1", leave=384 * 1024)
    store = node.store()

    def deferred():
        jobs = store.jobs()
        return jobs and jobs[0].deferrals >= 1 and jobs[0]
    job = wait_for(deferred, 60, 0.1, "the job deferred after ENOSPC")
    assert job.state in ("queued", "running") and "disk full" in (job.reason or ""), job
    assert job.attempts <= 1, "a full disk must not use up the job's attempts"

    # Now nothing at all is left.
    _fill(tmpfs / "filler-2")
    assert _free(tmpfs) < 4096
    status, body = wait_for(lambda: (r := _readyz(node))[0] == 503 and r, 10, 0.2,
                            "readiness failing on the full disk")
    assert "not writable" in body["checks"]["store"], body
    # The node still answers: metrics (memory-backed, no SIGBUS), C-ECHO.
    assert http_get(f"http://127.0.0.1:{node.http_port}/metrics")[0] == 200
    refused = storescu(node.port, write_ct_series(tmp_path / "late", n=1, size=64, seed="late"),
                       check=False, extra=["-v"])
    assert refused.returncode != 0, "an instance acknowledged on a full disk"
    said = (refused.stdout + refused.stderr).lower()
    assert "0xa700" in said or "outofresources" in said.replace(" ", ""), said[-2000:]
    held = time.monotonic()
    while time.monotonic() - held < 3:  # a few backoff rounds while full
        assert node.proc.poll() is None
        assert store.job(job.id).state != "failed"
        time.sleep(0.2)

    for filler in ("filler-1", "filler-2"):
        (tmpfs / filler).unlink()
    wait_for(lambda: _readyz(node)[0] == 200, 20, 0.2, "readiness back once space returned")
    done = wait_for(lambda: (j := store.job(job.id)).state == "done" and j, 60, 0.2,
                    "the deferred job done")
    assert done.deferrals >= 1
    wait_for(lambda: (items := store.outbox_items(job.id)) and all(i.state == "sent" for i in items),
             30, 0.2, "results sent")
    assert len(list((data / "out").glob("*.dcm"))) == len(store.outbox_items(job.id))
    storescu(node.port, write_ct_series(tmp_path / "after", n=1, size=64, seed="after"))
    assert node.proc.poll() is None

    log = node.log()
    assert "died" not in log and "Bus error" not in log and "SIGBUS" not in log
    assert log.count("Traceback") <= 3, log[-4000:]
    assert "disk writable again after" in log
    assert "/dev/shm/dicom-node-metrics-" in log
    assert not list(data.glob(".metrics")), "metrics files on the data disk"


def test_metrics_folder_is_memory_backed_per_run_and_cleaned(tmp_path, node_factory):
    """Created under /dev/shm, removed at a clean stop, and a dead run's
    folder is reaped at the next start."""
    stale = Path("/dev/shm") / "dicom-node-metrics-999999999"
    stale.mkdir(exist_ok=True)
    (stale / "owner").write_text(f"{socket.gethostname()} 999999999")
    other_host = Path("/dev/shm") / "dicom-node-metrics-999999998"
    other_host.mkdir(exist_ok=True)
    (other_host / "owner").write_text("another-host 999999998")
    try:
        node = node_factory(routes=[], node={"workers": 1}).start()
        line = next(line for line in node.log().splitlines() if "metrics of all processes" in line)
        folder = Path(line.split("shared through ")[1].split()[0])
        assert folder.parent == Path("/dev/shm") and folder.is_dir()
        # At least ours; folders of other nodes killed by earlier tests count too.
        assert re.search(r"removed [1-9][0-9]* left by dead runs", line), line
        assert not stale.exists() and other_host.exists()
        wait_for(lambda: list(folder.glob("*.db")), 30, 0.1, "metric files in the folder")
        assert node.stop() == 0
        assert not folder.exists(), "folder left after a clean stop"
    finally:
        for path in (stale, other_host):
            if path.exists():
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()


def test_metrics_folder_falls_back_to_the_data_dir_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    folder, line, in_memory = create_metrics_dir(tmp_path / "data" / ".metrics", bases=(tmp_path / "none",))
    assert folder == tmp_path / "data" / ".metrics" and folder.is_dir() and not in_memory
    assert "SIGBUS" in line and os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
    remove_metrics_dir(folder)
    assert not folder.exists()


def test_store_write_probe_and_migration_of_an_old_database(tmp_path):
    """An old database without the deferral columns is migrated at open, by
    several processes at once without error; defer_job gives back the attempt."""
    path = tmp_path / "node.db"
    old = sqlite3.connect(path)
    old.executescript("""CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL,
        pipeline TEXT NOT NULL, model TEXT NOT NULL, group_key TEXT NOT NULL,
        series_uids TEXT NOT NULL, generation INTEGER NOT NULL, calling_ae TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0, worker TEXT,
        reason TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
        completed_at REAL NOT NULL, UNIQUE(route, group_key, generation));
        CREATE TABLE _probe (x);
        INSERT INTO jobs (route, pipeline, model, group_key, series_uids, generation, calling_ae,
            created_at, completed_at) VALUES ('ct', 'p', 'm', 'g', '["1.2"]', 0, 'A', 1, 1);""")
    old.close()
    stores = [Store(path) for _ in range(3)]
    store = stores[0]
    store.check_writable()
    job = store.claim_job("w")
    assert job.attempts == 1 and job.deferrals == 0
    assert store.defer_job(job.id, time.time() + 3600, "disk full")
    assert store.claim_job("w") is None, "claimed before its not_before"
    deferred = store.job(job.id)
    assert (deferred.state, deferred.attempts, deferred.deferrals) == ("queued", 0, 1)
    assert store.claim_job("w", now=time.time() + 3601).id == job.id
