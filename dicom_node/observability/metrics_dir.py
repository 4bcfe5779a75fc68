"""Where prometheus-client's multiprocess files live: memory-backed storage.

Every process of the node memory-maps its metric files and grows them as
label sets appear.  Growing a mapped file on a full file system raises SIGBUS,
which kills the process: with the files in the data dir, a full data disk sent
every restarted worker into a crash loop.  So the files go to a per-run folder
on tmpfs (/dev/shm, else /run), away from the data disk, created at start and
removed at a clean stop; folders of runs that died without cleaning up are
removed at the next start.

This module must not import prometheus_client: the variable is read when
prometheus_client is first imported, so it is set before that.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

__all__ = ["MULTIPROC_ENV", "create_metrics_dir", "remove_metrics_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BASES = (Path("/dev/shm"), Path("/run"))
_PREFIX = "dicom-node-metrics-"
# Names the host and process that made a folder, for reaping dead runs' folders.
_OWNER = "owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_stale(base: Path, host: str) -> int:
    """Remove folders of dead runs on this host; another host's or another
    container's (a shared /dev/shm) are left alone.  Returns how many."""
    removed = 0
    for folder in base.glob(f"{_PREFIX}*"):
        try:
            owner_host, _, pid_text = (folder / _OWNER).read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if owner_host == host and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def create_metrics_dir(fallback: Path,
                       bases: tuple[Path, ...] = _BASES) -> tuple[Path, str, bool]:
    """Make this run's metrics folder and point prometheus-client at it.

    Returns (folder, a line for the log, whether it is memory-backed).  Falls back to ``fallback``
    (``DataDir.metrics_fallback``) when no memory-backed base is writable, and says so: then a full data disk
    can still kill processes with SIGBUS."""
    host = socket.gethostname()
    for base in bases:
        if not (base.is_dir() and os.access(base, os.W_OK | os.X_OK)):
            continue
        try:
            reaped = _reap_stale(base, host)
            folder = base / f"{_PREFIX}{os.getpid()}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(mode=0o700)
            (folder / _OWNER).write_text(f"{host} {os.getpid()}")
        except OSError:
            continue
        os.environ[MULTIPROC_ENV] = str(folder)
        note = f"; removed {reaped} left by dead runs" if reaped else ""
        return folder, f"metrics of all processes shared through {folder} (memory-backed){note}", True
    folder = fallback
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder, (f"no writable /dev/shm or /run: metrics shared through {folder} on the data "
                    "disk, where a full disk can stop processes with SIGBUS"), False


def remove_metrics_dir(folder: Path) -> None:
    """At a clean stop: the files are this run's only."""
    shutil.rmtree(folder, ignore_errors=True)
