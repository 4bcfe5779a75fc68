"""A job's result files: written while the pipeline still runs, made durable
and visible together when it has returned.

A pipeline hands over each result as soon as it is final (``early``); one
background thread encodes it, writes it under a temporary name and fsyncs
it, beside the pipeline's own work.  ``complete`` then takes the job's whole
result list in order, waits for the early ones and writes the rest, and
leaving the ``with`` block fsyncs those, renames every file into the job's
folder and fsyncs the folder (DurableBatch).  So the job is recorded done
only with all of its files durable, exactly as when everything was written
at the end; a pipeline that fails, or a result it handed over early and
did not return, leaves nothing in the folder, and what a worker that died
mid-job wrote is removed by the job's next attempt.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from threading import Lock
from types import TracebackType

from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from dicom_node.errors import DicomNodeError
from dicom_node.store.spool import DurableBatch, fsync_dir, is_valid_uid

__all__ = ["ResultFiles"]


class ResultFiles:
    def __init__(self, folder: Path, tmp_dir: Path, job_id: int) -> None:
        self.folder, self.job_id = folder, job_id
        # Named by job: a worker that died mid-job leaves its early files
        # behind, and the job's next attempt (one worker runs a job at a
        # time) removes them rather than leave them until the node restarts.
        prefix = f"job-{job_id}-"
        for orphan in tmp_dir.glob(f"{prefix}*.part"):
            orphan.unlink(missing_ok=True)
        self._batch = DurableBatch(tmp_dir, prefix)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"results-{job_id}")
        # id() of each dataset handed over early -> (the dataset, kept so
        # that its id stays its own; its file's final path when written).
        self._early: dict[int, tuple[Dataset, Future[Path]]] = {}
        self._folder_lock = Lock()
        self._folder_ready = False
        self._made_folder = False
        self._completed = False

    def __enter__(self) -> ResultFiles:
        return self

    def early(self, ds: Dataset) -> None:
        """Write ``ds`` now, on the background thread.  The caller must not
        change it afterwards (it is encoded there)."""
        if id(ds) not in self._early:
            self._early[id(ds)] = (ds, self._pool.submit(self._write, ds, True))

    def complete(self, datasets: list[Dataset]) -> list[Path]:
        """The final path of each of ``datasets``, in order: early ones once
        written, the others written now (fsynced when the block is left)."""
        # Encoded on the same one thread as the early ones: never two
        # dcmwrite()s at once on datasets that may share elements.
        written = []
        for ds in datasets:
            early = self._early.pop(id(ds), None)
            written.append(early[1] if early is not None else self._pool.submit(self._write, ds, False))
        paths = [w.result() for w in written]
        for _, dropped in self._early.values():
            self._batch.drop(dropped.result())
        self._early.clear()
        self._completed = True
        return paths

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Nothing may still be writing when the batch commits or cleans up.
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._completed:
            self._batch.__exit__(kind, exc, tb)
        else:  # no result list: nothing is the job's result
            self._batch.discard()
            self._remove_empty_folder()

    def _write(self, ds: Dataset, sync: bool) -> Path:
        uid = str(ds.SOPInstanceUID)
        if not is_valid_uid(uid):
            raise DicomNodeError(f"job {self.job_id}: pipeline produced invalid SOP Instance UID {uid!r}")
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        self._ensure_folder()
        path = self.folder / f"{uid}.dcm"
        self._batch.write(path, buffer.getbuffer(), sync=sync)
        return path

    def _ensure_folder(self) -> None:
        with self._folder_lock:
            if self._folder_ready:
                return
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.folder.parent)  # the job's folder itself must survive a crash
                self._made_folder = True
            self._folder_ready = True

    def _remove_empty_folder(self) -> None:
        """The folder made for early results of a job that then failed."""
        if not self._made_folder:
            return
        try:
            self.folder.rmdir()  # only if empty: never a file of an earlier attempt
        except OSError:
            return
        fsync_dir(self.folder.parent)
