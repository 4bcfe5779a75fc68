"""The spool: received instances as files, written atomically.

``spool/<study>/<series>/<sop>.dcm``.  UIDs come from the network and are never
trusted as path components: anything that is not a syntactically valid UID is
refused before it reaches the file system.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

__all__ = ["Spool", "is_valid_uid", "atomic_write", "fsync_dir"]

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


def atomic_write(target: Path, data: bytes | memoryview, tmp_dir: Path, *, durable: bool = True) -> None:
    """Write to a temporary name, fsync, rename over ``target``, fsync the folder.

    A crash leaves either the old file, the new file, or an orphan in
    ``tmp_dir`` (cleaned at start), never a half-written target.
    """
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


# Files being written, inside the spool: on its file system, so a rename into
# the spool or outgoing/ is atomic.
TMP_NAME = ".tmp"


class Spool:
    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.tmp = root / TMP_NAME
        self.durable = durable
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid {name} UID {uid!r:.80}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, path: Path, data: bytes | memoryview) -> None:
        folder = path.parent
        # Asked every time (one stat) rather than cached: retention may have
        # removed the folder of a finished series since the last write.
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            if self.durable:
                # The new folders' entries must survive a crash too.
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
        atomic_write(path, data, self.tmp, durable=self.durable)

    def adopt(self, src: Path, path: Path) -> None:
        """Move a complete file already in ``self.tmp`` (a dataset the
        receiver wrote there as it arrived) to ``path`` with write()'s
        guarantees but no copy: fsync it, rename it over any earlier copy,
        fsync the folder.  ``src`` must be on the spool's file system."""
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            if self.durable:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
        if self.durable:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(src, path)
        if self.durable:
            fsync_dir(folder)

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
