"""The spool: received instances as files, written atomically.

``spool/<study>/<series>/<sop>.dcm``.  UIDs come from the network and are never
trusted as path components: anything that is not a syntactically valid UID is
refused before it reaches the file system.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Spool", "FolderSyncs", "DurableBatch", "is_valid_uid", "atomic_write", "fsync_dir"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# One page: the smallest write that needs a free block.
_PROBE_BYTES = 4096


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _FolderState:
    requested: int = 0  # requests so far
    done: int = 0  # requests covered by a finished fsync
    running: bool = False
    users: int = 0


class FolderSyncs:
    """Folder fsyncs shared by the threads that need one at the same time.

    Instances of one series arriving on several associations land in one
    folder; each rename must be durable before its C-STORE is answered, but
    one fsync of the folder that *starts* after a rename covers it.  So a
    thread whose request finds an fsync of that folder already running waits
    for it to end and then shares the next one with every thread that came
    in the meantime: one fsync per round instead of one per instance.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._folders: dict[Path, _FolderState] = {}

    def sync(self, folder: Path) -> None:
        with self._cv:
            state = self._folders.setdefault(folder, _FolderState())
            state.requested += 1
            ticket = state.requested
            state.users += 1
            try:
                while state.done < ticket:
                    if state.running:
                        self._cv.wait()
                        continue
                    self._run(folder, state)
            finally:
                state.users -= 1
                if state.users == 0:
                    del self._folders[folder]

    def _run(self, folder: Path, state: _FolderState) -> None:
        """One fsync covering every request made before it starts (called
        and returning with the lock held; the fsync itself runs without)."""
        state.running = True
        covers = state.requested
        self._cv.release()
        try:
            fsync_dir(folder)
        finally:
            self._cv.acquire()
            state.running = False
            self._cv.notify_all()
        state.done = max(state.done, covers)


def _write_part(tmp_dir: Path, data: bytes | memoryview, *, sync: bool, prefix: str = "") -> Path:
    """``data`` under a new temporary name in ``tmp_dir`` (fsynced if
    ``sync``); nothing left behind on an error."""
    tmp = tmp_dir / f"{prefix}{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def atomic_write(target: Path, data: bytes | memoryview, tmp_dir: Path, *, durable: bool = True) -> None:
    """Write to a temporary name, fsync, rename over ``target``, fsync the folder.

    A crash leaves either the old file, the new file, or an orphan in
    ``tmp_dir`` (cleaned at start), never a half-written target.
    """
    tmp = _write_part(tmp_dir, data, sync=durable)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableBatch:
    """atomic_write() for many files at once, with the same guarantees.

    ``write()`` puts each file under a temporary name (nothing held in
    memory); leaving the ``with`` block fsyncs them together from a few
    threads (the file system then commits them in shared journal
    transactions instead of one each), renames each over its target and
    fsyncs each folder once.  An exception removes the temporary files and
    leaves every target as it was.
    """

    _SYNC_THREADS = 4

    def __init__(self, tmp_dir: Path, prefix: str = "") -> None:
        self.tmp_dir = tmp_dir
        self.prefix = prefix  # of the temporary files' names
        self._pending: list[tuple[Path, Path]] = []
        self._synced: set[Path] = set()  # temporary files fsynced when written
        self._lock = threading.Lock()  # write() and drop() may come from several threads

    def __enter__(self) -> DurableBatch:
        return self

    def write(self, target: Path, data: bytes | memoryview, *, sync: bool = False) -> None:
        """``data`` for ``target``; with ``sync``, fsynced now rather than
        with the others on commit (for a writer running ahead of it)."""
        tmp = _write_part(self.tmp_dir, data, sync=sync, prefix=self.prefix)
        with self._lock:
            self._pending.append((tmp, target))
            if sync:
                self._synced.add(tmp)

    def drop(self, target: Path) -> None:
        """Leave ``target`` out of the batch, as if it had not been written."""
        with self._lock:
            kept = [(tmp, t) for tmp, t in self._pending if t != target]
            gone = [tmp for tmp, t in self._pending if t == target]
            self._pending = kept
        for tmp in gone:
            tmp.unlink(missing_ok=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self._commit()
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove what is not committed (after a commit: nothing)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)  # gone once renamed

    def _commit(self) -> None:
        temps = [tmp for tmp, _ in self._pending if tmp not in self._synced]
        if temps:
            with ThreadPoolExecutor(min(self._SYNC_THREADS, len(temps))) as pool:
                list(pool.map(_fsync_path, temps))
        for tmp, target in self._pending:
            os.replace(tmp, target)
        for folder in dict.fromkeys(target.parent for _, target in self._pending):
            fsync_dir(folder)


# Files being written, inside the spool: on its file system, so a rename into
# the spool or outgoing/ is atomic.
TMP_NAME = ".tmp"


class Spool:
    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.tmp = root / TMP_NAME
        self.durable = durable
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._folder_syncs = FolderSyncs()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid {name} UID {uid!r:.80}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, path: Path, data: bytes | memoryview) -> None:
        self._folder_for(path)
        atomic_write(path, data, self.tmp, durable=self.durable)

    def _folder_for(self, path: Path) -> Path:
        """The series folder of ``path``, made (durably) if it is not there.
        Asked every time (one stat) rather than cached: retention may have
        removed the folder of a finished series since the last write."""
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            if self.durable:
                # The new folders' entries must survive a crash too.
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
        return folder

    def adopt(self, src: Path, path: Path) -> None:
        """Move a complete file already in ``self.tmp`` (a dataset the
        receiver wrote there as it arrived) to ``path`` with write()'s
        guarantees but no copy: fsync it, rename it over any earlier copy,
        fsync the folder.  ``src`` must be on the spool's file system."""
        folder = self._folder_for(path)
        if self.durable:
            _fsync_path(src)
        os.replace(src, path)
        if self.durable:
            self._folder_syncs.sync(folder)

    def sync_folder(self, folder: Path) -> None:
        fsync_dir(folder)

    def remove_superseded(self, old_rel: str, new_rel: str) -> bool:
        """Remove the earlier copy of an instance received again under another
        path (another series), once the store points at the new one.  The
        removal is made durable; a crash before it leaves a stale copy that
        reconciliation recognises as older and removes.  True if removed."""
        if old_rel == new_rel:
            return False
        old = self.root / old_rel
        try:
            old.unlink()
        except FileNotFoundError:
            return False
        if self.durable:
            fsync_dir(old.parent)
        return True

    def check_writable(self) -> None:
        """Raise OSError unless a small file can be created, synced and removed
        in the spool (for readiness): a full or read-only file system fails
        here as the receiver's next write would."""
        probe = self.tmp / f"probe-{uuid.uuid4().hex}.part"  # .part: cleaned at start
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)

    def clean_temporary(self) -> int:
        """Remove orphans of writes interrupted by a crash; returns how many."""
        removed = 0
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed

    def files(self) -> list[Path]:
        return [p for p in self.root.glob("*/*/*.dcm")]
