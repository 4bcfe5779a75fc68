"""Load, faults and hostile input: many senders at once, SIGKILL at random
moments, destinations that refuse or are missing, and broken files.

Everything runs on loopback against real peers (dcmtk, Orthanc, a pynetdicom
SCP started here) and is bounded by wait_for deadlines.
"""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pynetdicom
from prometheus_client.parser import text_string_to_metric_families
from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE, evt

from helpers import (NODELAY_ENV, NodeProcess, ct_route, dataset_bytes, echoscu, free_port,
                     storescu, wait_for, write_ct_series)

N = 6          # slices per series: small, so the tests are about the node, not the model
SIZE = 64
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR, what ct_denoise reports in


# -- small helpers -------------------------------------------------------------

def _sample(text: str, name: str, labels: dict | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


def _uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spooled_bytes(node: NodeProcess, sop_uid: str) -> bytes:
    rec = node.store().instance(sop_uid)
    assert rec is not None, f"acknowledged instance {sop_uid} is not in the store"
    return dataset_bytes(node.data_dir / "spool" / rec.path)


def _jobs_settled(node: NodeProcess, count: int) -> list | None:
    """All jobs finished (no queued or running) and at least ``count`` of them."""
    jobs = node.store().jobs(limit=10_000)
    if len(jobs) >= count and all(j.state in ("done", "failed", "skipped") for j in jobs):
        return jobs
    return None


def _outbox_settled(node: NodeProcess, count: int) -> list | None:
    items = node.store().outbox_items()
    if len(items) >= count and all(i.state in ("sent", "dead") for i in items):
        return items
    return None


# -- 1. many senders at once ---------------------------------------------------

def test_eight_concurrent_senders_each_instance_stored_once_and_processed_once(node_factory, tmp_path):
    senders = 8
    node = node_factory(node={"max_associations": senders}).start()
    series = [write_ct_series(tmp_path / f"s{i}", n=N, size=SIZE, seed=f"load{i}") for i in range(senders)]
    started = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-aet", f"MOD{i}", "-aec", "DICOM_NODE", "127.0.0.1",
                               str(node.port), *map(str, files)],
                              env=NODELAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i, files in enumerate(series)]
    outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0] * senders, outputs
    ingest_s = time.monotonic() - started

    # Every acknowledged instance is stored once, with the bytes that were sent.
    store = node.store()
    assert store.count_instances() == senders * N
    assert len(list((node.data_dir / "spool").glob("*/*/*.dcm"))) == senders * N
    for files in series:
        for path in files:
            assert _digest(_spooled_bytes(node, _uids(path)[2])) == _digest(dataset_bytes(path)), path

    # Every series gave one job and one result set: N derived images and one SR.
    jobs = wait_for(lambda: _jobs_settled(node, senders), 180, 0.25, "8 jobs finished")
    assert len(jobs) == senders
    assert all(j.state == "done" and j.attempts == 1 for j in jobs), [(j.id, j.state, j.reason) for j in jobs]
    assert sorted(uid for j in jobs for uid in j.series_uids) == sorted(_uids(f[0])[1] for f in series)
    items = wait_for(lambda: _outbox_settled(node, senders * (N + 1)), 60, 0.25, "results copied")
    assert len(items) == senders * (N + 1) and {i.state for i in items} == {"sent"}
    per_study: dict[str, Counter] = defaultdict(Counter)
    for path in (node.data_dir / "out").glob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        per_study[str(ds.StudyInstanceUID)][str(ds.Modality)] += 1
    assert {study: dict(c) for study, c in per_study.items()} == \
        {_uids(f[0])[0]: {"CT": N, "SR": 1} for f in series}

    # Nobody was turned away, and the node counted each association once.
    metrics = node.metrics()
    assert _sample(metrics, "dicom_node_associations_total", {"result": "accepted"}) == senders
    assert _sample(metrics, "dicom_node_store_failures_total") == 0
    assert "rejected_" not in metrics
    print(f"\n8 senders: {senders * N} instances in {ingest_s:.2f} s, {senders} series processed")


# -- 2. SIGKILL at random moments --------------------------------------------------

@dataclass
class _Sent:
    files: list[Path]
    study_uid: str
    series_uid: str


def _send_until_acknowledged(node: NodeProcess, files: list[Path], tries: int = 6) -> int:
    """What a modality does after a failure: send the series again until
    every instance is acknowledged.  Returns how many sends it took."""
    for attempt in range(1, tries + 1):
        if storescu(node.port, files, check=False).returncode == 0:
            return attempt
    raise AssertionError(f"series in {files[0].parent} not acknowledged after {tries} sends")


def _stage(node: NodeProcess, senders: list[subprocess.Popen]) -> str:
    """Which stages had work in flight at the moment of a kill (for the report)."""
    store = node.store()
    stages = []
    if any(p.poll() is None for p in senders):
        stages.append("receiving")
    if store.receiving_series():
        stages.append("completing")
    if any(j.state in ("queued", "running") for j in store.jobs(limit=1000)):
        stages.append("inferring")
    if any(i.state == "pending" for i in store.outbox_items()):
        stages.append("sending")
    return "+".join(stages) or "idle"


def test_kill9_at_random_moments_loses_and_duplicates_nothing(node_factory, orthanc, tmp_path):
    # Series big enough (3 x 16 slices) that a kill often lands mid-association.
    rounds, per_round, slices = 5, 3, 16
    rng = random.Random(20261123)  # seeded: a failure can be replayed
    node = node_factory(peers=[orthanc.peer()],
                        destinations=[{"name": "pacs", "kind": "dicom", "peer": "pacs"}],
                        routes=[ct_route(destinations=["pacs"], quiet_seconds=0.5)],
                        # Up to `rounds` kills may land on one job; it must survive them all.
                        extra={"jobs": {"max_attempts": rounds + 2}}).start()
    started = time.monotonic()
    sent: list[_Sent] = []
    kills: list[str] = []
    resends = 0
    for r in range(rounds):
        batch = []
        for k in range(per_round):
            files = write_ct_series(tmp_path / f"r{r}s{k}", n=slices, size=SIZE, seed=f"kill{r}-{k}")
            study, series_uid, _ = _uids(files[0])
            batch.append(_Sent(files, study, series_uid))
        sent += batch
        procs = [subprocess.Popen(["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port),
                                   *map(str, s.files)], env=NODELAY_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for s in batch]
        # The one deliberate wait: a random moment to pull the plug, landing on
        # receiving, completion, inference or sending of this and earlier rounds.
        time.sleep(rng.uniform(0.05, 1.5))
        kills.append(_stage(node, procs))
        node.kill9()
        codes = [p.wait(60) for p in procs]
        node.start()
        for s, code in zip(batch, codes, strict=False):
            if code != 0:
                resends += _send_until_acknowledged(node, s.files)

    # Every series is whole in the store, and its latest generation was processed.
    store = node.store()
    jobs = wait_for(lambda: _jobs_settled(node, len(sent)), 120, 0.25, "all jobs finished")
    assert all(j.state == "done" for j in jobs), [(j.id, j.state, j.reason) for j in jobs]
    for s in sent:
        record = store.series(s.series_uid)
        assert record is not None and record.instance_count == slices, s.series_uid
        stored = store.instances_of(s.series_uid)
        assert sorted(i.sop_uid for i in stored) == sorted(_uids(f)[2] for f in s.files)
        assert all((node.data_dir / "spool" / i.path).is_file() for i in stored)
        assert any(j.state == "done" and j.generation == record.generation and s.series_uid in j.series_uids
                   for j in jobs), f"no done job for the last generation of {s.series_uid}"

    # Orthanc holds exactly one result set per series: reruns replaced, never added.
    wait_for(lambda: _outbox_settled(node, len(sent) * (slices + 1)), 90, 0.25, "all results sent")
    assert {i.state for i in store.outbox_items()} == {"sent"}

    def result_sets() -> dict[str, set[str]] | None:
        by_study: dict[str, set[str]] = defaultdict(set)
        for inst in orthanc.instances():
            series = orthanc.get(f"/series/{inst['ParentSeries']}")
            study = orthanc.get(f"/studies/{series['ParentStudy']}")
            by_study[study["MainDicomTags"]["StudyInstanceUID"]].add(inst["MainDicomTags"]["SOPInstanceUID"])
        return by_study if sum(map(len, by_study.values())) >= len(sent) * (slices + 1) else None

    by_study = wait_for(result_sets, 60, 0.5, "results in Orthanc")
    assert {k: len(v) for k, v in by_study.items()} == {s.study_uid: slices + 1 for s in sent}
    assert len(orthanc.instances()) == len(sent) * (slices + 1)
    print(f"\nkill -9: {rounds} rounds, {len(sent)} series, {len(sent) * slices} instances, "
          f"{resends} re-sends, {len(jobs)} jobs, stages at kill: {kills}, "
          f"{time.monotonic() - started:.1f} s")


# -- 3. destination errors -----------------------------------------------------------

class _CtOnlyScp:
    """A pynetdicom SCP that stores CT Image Storage and nothing else: by
    refusing any other class at negotiation or, with ``refuse_status``, by
    answering its C-STOREs with that status."""

    def __init__(self, refuse_status: int | None = None) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.refused: list[str] = []
        self.refuse_status = refuse_status
        self.ae = AE(ae_title="CT_ONLY")
        self.ae.add_supported_context(CTImageStorage)
        if refuse_status is not None:
            self.ae.add_supported_context(SR_CLASS)
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if str(event.request.AffectedSOPClassUID) != CTImageStorage:
            self.refused.append(uid)
            return self.refuse_status
        self.received.append(uid)
        return 0x0000

    def __enter__(self) -> _CtOnlyScp:  # noqa: PYI034 - a test helper, not subclassed
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_unsupported_sop_class_is_a_dead_letter_after_one_attempt(node_factory, tmp_path):
    with _CtOnlyScp() as scp:
        node = node_factory(peers=[{"name": "ctonly", "ae_title": "CT_ONLY", "host": "127.0.0.1",
                                    "port": scp.port}],
                            destinations=[{"name": "ctonly", "kind": "dicom", "peer": "ctonly"}],
                            routes=[ct_route(destinations=["ctonly"])]).start()
        storescu(node.port, write_ct_series(tmp_path / "in", n=N, size=SIZE, seed="sopclass"))
        items = wait_for(lambda: _outbox_settled(node, N + 1), 90, 0.25, "outbox settled")
        dead = [i for i in items if i.state == "dead"]
        sent = [i for i in items if i.state == "sent"]
        assert [(i.sop_class, i.attempts) for i in dead] == [(SR_CLASS, 1)]
        assert "does not accept SOP class" in dead[0].last_error
        assert len(sent) == N and {i.sop_class for i in sent} == {CTImageStorage}
        # The images reached the peer; the refused SR was not tried again.
        assert sorted(scp.received) == sorted(i.sop_uid for i in sent)
        metrics = node.metrics()
        assert _sample(metrics, "dicom_node_send_attempts_total", {"result": "dead"}) == 1
        assert _sample(metrics, "dicom_node_send_attempts_total", {"result": "retry"}) == 0
        assert node.log().count("result objects to ctonly became dead letters") == 1


def test_a900_refusal_is_a_dead_letter_after_one_attempt(node_factory, tmp_path):
    """0xA900 (data set does not match SOP class) cannot change on a retry."""
    with _CtOnlyScp(refuse_status=0xA900) as scp:
        node = node_factory(peers=[{"name": "ctonly", "ae_title": "CT_ONLY", "host": "127.0.0.1",
                                    "port": scp.port}],
                            destinations=[{"name": "ctonly", "kind": "dicom", "peer": "ctonly"}],
                            routes=[ct_route(destinations=["ctonly"])]).start()
        storescu(node.port, write_ct_series(tmp_path / "in", n=N, size=SIZE, seed="a900"))
        items = wait_for(lambda: _outbox_settled(node, N + 1), 90, 0.25, "outbox settled")
        dead = [i for i in items if i.state == "dead"]
        assert [(i.sop_class, i.attempts) for i in dead] == [(SR_CLASS, 1)], items
        assert "0xA900" in dead[0].last_error
        assert scp.refused == [dead[0].sop_uid] and len(scp.received) == N


def test_missing_destination_backs_off_and_recovers_when_it_appears(node_factory, tmp_path):
    port = free_port()  # nothing listens here yet
    node = node_factory(peers=[{"name": "late", "ae_title": "LATE", "host": "127.0.0.1", "port": port}],
                        destinations=[{"name": "late", "kind": "dicom", "peer": "late"}],
                        routes=[ct_route(destinations=["late"])]).start()
    storescu(node.port, write_ct_series(tmp_path / "in", n=N, size=SIZE, seed="transient"))
    store = node.store()

    def all_tried(times: int) -> list | None:
        items = store.outbox_items()
        return items if len(items) == N + 1 and all(i.attempts >= times for i in items) else None

    first = wait_for(lambda: all_tried(1), 90, 0.1, "a first failed attempt")
    again = wait_for(lambda: all_tried(3), 30, 0.1, "attempts growing")
    now = time.time()
    assert all(i.state == "pending" for i in first + again)
    assert all("cannot connect" in i.last_error for i in again)
    assert any(i.next_at > now for i in again), "backoff should put the next attempt in the future"
    # The backoff doubles from outbox.retry_initial_s (0.5 s) to retry_max_s (2 s).
    assert max(i.next_at - now for i in again) <= 2.0
    # One line when the destination starts failing, not one per object per retry.
    assert node.log().count("destination late failing: cannot connect") == 1
    assert "TCP Initialisation Error" not in node.log()  # pynetdicom's own, per attempt

    received = tmp_path / "storescp"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-od", str(received), "-aet", "LATE", str(port)],
                           env=NODELAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: all(i.state == "sent" for i in store.outbox_items()), 60, 0.2,
                 "results sent once the destination listens")
        assert len(list(received.iterdir())) == N + 1
        metrics = node.metrics()
        assert _sample(metrics, "dicom_node_send_attempts_total", {"result": "retry"}) >= 3 * (N + 1)
        assert _sample(metrics, "dicom_node_send_attempts_total", {"result": "dead"}) == 0
        wait_for(lambda: "destination late delivering again after" in node.log(), 10, 0.1,
                 "the recovery line")
    finally:
        scp.terminate()
        scp.wait(10)


# -- 4. hostile input ------------------------------------------------------------------

def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with pydicom.config.disable_value_validation():  # we write invalid values on purpose
        dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _patch_length(raw: bytes, tag: bytes, length: int) -> bytes:
    """Overwrite the 2-byte length of the first Explicit VR LE short element ``tag``."""
    at = raw.index(tag, 132 + 12)  # past the preamble and into the dataset
    return raw[:at + 6] + length.to_bytes(2, "little") + raw[at + 8:]


def _garbage_name(raw: bytes) -> bytes:
    """Replace PatientName's value with bytes that are no character set's text:
    NUL, invalid UTF-8, a stray ISO 2022 escape, backslashes and '../'."""
    name = b"PHANTOM^SYNTHETIC "
    junk = b"\x00\xff\xfe\x1b$B\x80\\..\\/../\x9c\xc3("
    assert len(junk) == len(name)
    return raw.replace(name, junk, 1)


# What a case does to a valid instance: Dataset edits, then byte edits.
Edit = Callable[[Dataset], None]
Damage = Callable[[bytes], bytes]


@dataclass(frozen=True)
class _Case:
    name: str
    edit: Edit | None = None
    damage: Damage | None = None
    # Refused: the DIMSE statuses allowed and a word of the logged reason.
    statuses: tuple[int, ...] = ()
    # Accepted: how its job ends and a word of the job's recorded reason.
    job_state: str = ""
    reason: str = ""


def _set(**values: object) -> Edit:
    def edit(ds: Dataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)
    return edit


def _delete(*keys: str) -> Edit:
    def edit(ds: Dataset) -> None:
        for key in keys:
            delattr(ds, key)
    return edit


def _meta_class(raw: bytes) -> bytes:
    """File meta says MR Image Storage (bytes edited: pydicom would refill the
    meta from the dataset); the dataset stays a CT image."""
    ct, mr = CTImageStorage.encode() + b"\x00", MRImageStorage.encode() + b"\x00"
    assert len(ct) == len(mr) and raw.index(ct) < raw.index(b"\x08\x00\x16\x00UI", 132 + 12)
    return raw.replace(ct, mr, 1)


ESCAPE = "1.2/../../../../../../escaped"  # from spool/<study>/<series>/ to above the data dir

CASES = [
    # Cut inside the Study Instance UID: the UIDs after it never arrive.
    _Case("truncated_file", damage=lambda b: b[:b.index(b"\x20\x00\x0d\x00UI") + 14],
          statuses=(0xC210, 0xC211), reason="missing or invalid"),
    _Case("truncated_pixel_data", damage=lambda b: b[:-1000], job_state="failed", reason="decode"),
    # A decompression bomb: 65535 x 65535 x 16 bits declared, 8 KiB sent.
    _Case("huge_declared_dimensions", edit=_set(Rows=65535, Columns=65535), statuses=(0xC220,),
          reason="max_pixel_bytes"),
    # Large but under the limit: stored, and the worker finds the data too short.
    _Case("large_dimensions_tiny_data", edit=_set(Rows=4096, Columns=4096), job_state="failed",
          reason="decode"),
    # PatientID's length runs past the end of the file.
    _Case("wrong_vr_length", damage=lambda b: _patch_length(b, b"\x10\x00\x20\x00LO", 0xFFF0),
          statuses=(0xC210, 0xC211), reason="missing or invalid"),
    _Case("missing_sop_instance_uid", edit=_delete("SOPInstanceUID"), statuses=(0xC211,),
          reason="SOPInstanceUID"),
    _Case("missing_pixel_data", edit=_delete("PixelData"), job_state="failed", reason="no pixel data"),
    _Case("garbage_patient_name", damage=_garbage_name, job_state="done"),
    _Case("traversal_sop_instance_uid", edit=_set(SOPInstanceUID=ESCAPE), statuses=(0xC211,),
          reason="SOPInstanceUID"),
    _Case("traversal_series_uid", edit=_set(SeriesInstanceUID=ESCAPE), statuses=(0xC211,),
          reason="SeriesInstanceUID"),
    _Case("traversal_study_uid", edit=_set(StudyInstanceUID=ESCAPE), statuses=(0xC211,),
          reason="StudyInstanceUID"),
    # The file meta (and so the request) says MR; the dataset is a CT image.
    _Case("file_meta_sop_class_contradicts_dataset", damage=_meta_class,
          statuses=(0xA900,), reason="SOP Class"),
]


def _make_case(case: _Case, folder: Path) -> list[Path]:
    """Two slices of a fresh series (its own seed), both damaged the same way."""
    out = []
    for path in write_ct_series(folder / "valid", n=2, size=SIZE, seed=f"hostile-{case.name}"):
        ds = dcmread(path)
        if case.edit:
            case.edit(ds)
        raw = _encode(ds)
        if case.damage:
            raw = case.damage(raw)
        out.append(folder / path.name)
        out[-1].write_bytes(raw)
    return out


def _send_as_written(port: int, path: Path) -> tuple[int, str]:
    """C-STORE the file's bytes untouched; returns (status, request SOP Instance UID)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established, f"{path}: association refused"
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    return (int(rsp.Status) if rsp is not None and "Status" in rsp else -1,
            str(meta.MediaStorageSOPInstanceUID))


def _files_outside(root: Path, inside: Path) -> set[Path]:
    return {p for p in root.rglob("*") if inside not in p.parents and p != inside}


def test_hostile_inputs_are_refused_or_recorded_and_the_node_stays_up(node_factory, tmp_path, monkeypatch):
    # Send the bytes as written: pynetdicom would otherwise decode, re-encode
    # and so repair (or refuse to send) the damage.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    corpus = {case.name: _make_case(case, tmp_path / "corpus" / case.name) for case in CASES}
    node = node_factory(routes=[ct_route(quiet_seconds=1.0)]).start()
    before = _files_outside(tmp_path, node.data_dir)

    accepted: dict[str, str] = {}  # case -> series UID
    for case in CASES:
        statuses = []
        for path in corpus[case.name]:
            status, request_uid = _send_as_written(node.port, path)
            statuses.append(status)
            if case.statuses:
                assert status in case.statuses, f"{case.name}: status 0x{status:04X}"
                lines = [line for line in node.log().splitlines()
                         if f"refused instance {request_uid}" in line]
                assert lines and case.reason in lines[-1], f"{case.name}: no log line with {case.reason!r}"
            else:
                assert status == 0x0000, f"{case.name}: expected to be accepted, got 0x{status:04X}"
        if not case.statuses:
            accepted[case.name] = str(dcmread(corpus[case.name][0], stop_before_pixels=True).SeriesInstanceUID)
        echo = echoscu(node.port)
        assert echo.returncode == 0, f"after {case.name}: {echo.stdout}{echo.stderr}"

    # Accepted ones were processed, each to a recorded end and reason.
    store = node.store()

    def job_of(series_uid: str):
        jobs = [j for j in store.jobs(limit=1000) if series_uid in j.series_uids]
        return jobs[0] if jobs and jobs[0].state in ("done", "failed", "skipped") else None

    listing = None
    for case in CASES:
        if case.statuses:
            continue
        series_uid = accepted[case.name]
        job = wait_for(lambda uid=series_uid: job_of(uid), 60, 0.2, f"job of {case.name}")
        assert job.state == case.job_state, f"{case.name}: {job.state} ({job.reason})"
        if case.job_state != "done":
            assert case.reason in (job.reason or ""), f"{case.name}: reason {job.reason!r}"
            listing = listing or node.cli("jobs").stdout
            assert str(job.id) in listing and job.state in listing
    # Refused instances left nothing behind; nothing was written outside the data dir.
    assert store.count_instances() == 2 * len(accepted)
    assert _files_outside(tmp_path, node.data_dir) == before
    assert not [p for p in node.data_dir.rglob("*") if "escaped" in p.name]
    assert _sample(node.metrics(), "dicom_node_store_failures_total") == \
        2 * sum(1 for c in CASES if c.statuses)
    assert node.proc is not None and node.proc.poll() is None


def test_same_sop_instance_uid_twice_replaces_and_counts(node_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    node = node_factory(routes=[]).start()
    [first] = write_ct_series(tmp_path / "a", n=1, size=SIZE, seed="twice")
    ds = dcmread(first)
    ds.WindowCenter = 40  # another version of the same instance
    ds.PixelData = bytes(len(ds.PixelData))
    second = tmp_path / "second.dcm"
    second.write_bytes(_encode(ds))
    assert _send_as_written(node.port, first)[0] == 0x0000
    assert _send_as_written(node.port, second)[0] == 0x0000
    sop = str(ds.SOPInstanceUID)
    assert node.store().count_instances() == 1
    assert node.store().series(str(ds.SeriesInstanceUID)).instance_count == 1
    assert _spooled_bytes(node, sop) == dataset_bytes(second) != dataset_bytes(first)
    wait_for(lambda: _sample(node.metrics(), "dicom_node_duplicate_instances_total") == 1, 10,
             what="duplicate counted")
    assert f"replaced instance {sop}" in node.log()
    assert echoscu(node.port).returncode == 0
