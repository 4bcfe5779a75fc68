"""Every storage SOP instance among pydicom's bundled test files is received
and accounted for: stored byte for byte, or refused with a logged reason."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pynetdicom
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts

from helpers import echoscu

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
STORAGE = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}


def _corpus() -> list[tuple[Path, str, str, str, str]]:
    out = []
    for path in sorted(TEST_FILES.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
            # The request carries the dataset's SOP Instance UID, which may
            # differ from the file meta's in a broken file.
            sop_uid = str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)
            meta_uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - not a DICOM file with file meta: not part of the corpus
            continue
        if sop_class in STORAGE:
            out.append((path, sop_class, sop_uid, syntax, meta_uid))
    return out


def test_pydicom_corpus_is_accounted_for(node_factory, monkeypatch):
    # Send every file as written, broken ones included, as a modality would;
    # pynetdicom would otherwise decode and re-encode (and repair) them.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    corpus = _corpus()
    assert len(corpus) > 40, "pydicom's bundled test files went missing"
    node = node_factory(routes=[]).start()
    stored, refused = {}, {}
    for path, sop_class, sop_uid, syntax, meta_uid in corpus:
        ae = AE(ae_title="CORPUS")
        ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert assoc.is_established, f"{path.name}: association refused"
        try:
            rsp = assoc.send_c_store(path)
        except Exception as exc:  # noqa: BLE001 - pynetdicom refusing to send a broken file
            refused[_key(path)] = f"not sendable: {exc}"
            assoc.abort()
            continue
        assoc.release()
        status = int(rsp.Status) if "Status" in rsp else -1
        # A file sent as written (pynetdicom's chunked mode) carries the file
        # meta's UID in the request; a decoded one the dataset's.
        (stored if status == 0 else refused)[_key(path)] = (sop_uid, status, meta_uid)
    store = node.store()
    for name, (sop_uid, _, _) in stored.items():
        rec = store.instance(sop_uid)
        assert rec is not None, f"{name} acknowledged but not in the store"
        assert _same_content(node.data_dir / "spool" / rec.path, TEST_FILES / name) \
            or _same_uid_twice(corpus, sop_uid), name
    log = node.log()
    for name, outcome in refused.items():
        if isinstance(outcome, tuple):
            sop_uid, status, meta_uid = outcome
            assert f"refused instance {sop_uid}" in log or f"refused instance {meta_uid}" in log, \
                f"{name}: status 0x{status:04X} without a log line"
    assert len(stored) >= 0.8 * len(corpus), f"only {len(stored)}/{len(corpus)} stored; refused: {refused}"
    assert echoscu(node.port).returncode == 0


def _same_content(stored: Path, original: Path) -> bool:
    """pynetdicom drops group-length elements when it sends a file, so compare
    element by element (raw values, no pixel decoding) rather than bytes."""
    def elements(path: Path) -> dict:
        ds = dcmread(path)
        return {e.tag: e.value for e in ds if e.tag.element != 0}
    return elements(stored) == elements(original)


def _same_uid_twice(corpus, sop_uid: str) -> bool:
    """Some pydicom files share a SOP Instance UID (same image, another syntax);
    the later one replaces the earlier, as it should."""
    return sum(1 for c in corpus if c[2] == sop_uid) > 1


def _key(path: Path) -> str:
    return str(path.relative_to(TEST_FILES))
