"""``dicom-node demo``: send a small synthetic study for each routed pipeline
to the running node and show what came back, so a newcomer sees the node
work within a minute."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite

from dicom_node.config import Config, Peer
from dicom_node.net.pynetdicom_compat import configure_process
from dicom_node.send.scu import StoreRequest, send_files
from dicom_node.store.db import Store
from dicom_node.store.layout import DataDir
from dicom_node_synthetic import cardiac_phantom, ct_phantom, cxr_phantom
from dicom_node_synthetic.dicom_ct import ct_series
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.dicom_mr import cine_series

__all__ = ["run_demo", "summarize"]


def _ct(seed: str, slices: int, size: int) -> list[Dataset]:
    vol = ct_phantom.make_volume(_rng(seed), slices, size=size, pixel_mm=0.7 * 512 / size)
    return ct_series(vol.low_dose_hu, seed=seed, pixel_mm=vol.pixel_mm, slice_mm=vol.slice_mm)


def _cine(seed: str, slices: int, size: int) -> list[Dataset]:
    study = cardiac_phantom.make_cine(_rng(seed), n_slices=max(3, slices), n_phases=8, size=max(128, size))
    return cine_series(study.images, seed=seed, pixel_spacing_mm=study.pixel_spacing_mm,
                       slice_spacing_mm=study.slice_spacing_mm)


def _cxr(seed: str, slices: int, size: int) -> list[Dataset]:
    rad = cxr_phantom.make_radiograph(_rng(seed), "effusion", size=(1024, 880), severity="obvious")
    return [dx_image(rad.image, seed=seed)]


def _rng(seed: str) -> np.random.Generator:
    return np.random.default_rng(sum(seed.encode()) * 7919 + len(seed))


_STUDIES: dict[str, tuple[str, Callable[[str, int, int], list[Dataset]]]] = {
    "ct_denoise": ("low-dose cardiac CT", _ct),
    "cardiac_seg": ("short-axis cine MR", _cine),
    "cxr_triage": ("frontal chest radiograph", _cxr),
}


def run_demo(config: Config, *, slices: int, size: int, timeout_s: float) -> int:
    node = config.node
    target = Peer(name="node", ae_title=node.ae_title, host=_connect_host(node.host), port=node.port)
    pipelines = [r.pipeline for r in config.routes if r.pipeline in _STUDIES]
    if not pipelines:
        print("no route uses a pipeline the demo knows (ct_denoise, cardiac_seg, cxr_triage)", file=sys.stderr)
        return 1
    failures = 0
    summaries: list[str] = []
    for pipeline in dict.fromkeys(pipelines):
        what, make = _STUDIES[pipeline]
        seed = f"demo-{pipeline}-{time.time_ns()}"
        print(f"[{pipeline}] making a synthetic {what} ...")
        datasets = make(seed, slices, size)
        series = {str(ds.SeriesInstanceUID) for ds in datasets}
        if not _send(target, datasets):
            return 1
        failed, results = _wait(config, series, timeout_s)
        failures += failed
        summaries.append(f"  {_LABELS[pipeline]:4s} {summarize(pipeline, results) if results else 'no results'}")
    print("summary (read from the result objects):")
    for line in summaries:
        print(line)
    return 1 if failures else 0


def _send(target: Peer, datasets: list[Dataset]) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        requests = []
        for i, ds in enumerate(datasets):
            path = Path(tmp) / f"{i}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            requests.append(StoreRequest(i, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        configure_process(send_chunked=True)  # files go out as written, as the node sends
        outcomes = send_files(target, requests, calling_ae="DEMO_SCU")
    failed = [o for o in outcomes if not o.ok]
    print(f"  sent {len(outcomes) - len(failed)}/{len(outcomes)} instances to "
          f"{target.ae_title}@{target.host}:{target.port}")
    if failed:
        print(f"  send failed: {failed[0].reason}", file=sys.stderr)
    return not failed


def _wait(config: Config, series: set[str], timeout_s: float) -> tuple[int, list[Dataset]]:
    store = Store(DataDir.of(config).db)
    print(f"  waiting for the quiet period, inference and sending (up to {timeout_s:.0f} s) ...")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        jobs = [j for j in store.jobs(limit=50) if series & set(j.series_uids)]
        if jobs and jobs[0].state in ("failed", "skipped", "held"):
            print(f"  job {jobs[0].id} {jobs[0].state}: {jobs[0].reason}", file=sys.stderr)
            return 1, []
        if jobs and jobs[0].state == "done":
            items = store.outbox_items(jobs[0].id)
            if items and all(i.state != "pending" for i in items):
                for item in items:
                    print(f"    {item.state:5s} {item.destination}: {Path(item.path).name}")
                print(f"  job {jobs[0].id} done: {len(items)} result objects; "
                      f"files under {config.data_dir / 'results'}")
                results = _read({Path(i.path) for i in items})
                return (0 if all(i.state == "sent" for i in items) else 1), results
        time.sleep(0.5)
    print("  timed out; see `dicom-node jobs` and the node's log", file=sys.stderr)
    return 1, []


_LABELS = {"ct_denoise": "CT", "cardiac_seg": "MR", "cxr_triage": "CXR"}


def _read(paths: set[Path]) -> list[Dataset]:
    out: list[Dataset] = []
    for path in sorted(paths):
        try:
            out.append(dcmread(path))
        except (OSError, InvalidDicomError):
            continue  # sent and cleaned up already: the summary says what it can
    return out


def summarize(pipeline: str, results: list[Dataset]) -> str:
    """One line of what came back, from the result objects themselves
    (their SR measurements and SEG labels), never from the node's log."""
    srs = [ds for ds in results if ds.Modality == "SR"]
    numbers = [item for ds in srs for item in _content(ds) if item.ValueType == "NUM"]
    codes = [item for ds in srs for item in _content(ds) if item.ValueType == "CODE"]
    if pipeline == "ct_denoise":
        images = [ds for ds in results if ds.Modality == "CT"]
        noise = _values(numbers, "Image noise")
        text = f"{len(images)} denoised slices" + (" + SR" if srs else "")
        if len(noise) >= 2:
            text += f", noise {noise[0]:.0f}\u2192{noise[-1]:.0f} HU"
        return text
    if pipeline == "cardiac_seg":
        lvef = _values(numbers, "Left ventricular ejection fraction")
        phases = sorted({str(ds.get("ContentLabel", "")).removesuffix("_PHASE")
                         for ds in results if ds.Modality == "SEG"}, key=lambda p: (p != "ED", p))
        parts = [f"LVEF {lvef[0]:.0f} %" if lvef else "LVEF not measured"]
        if phases:
            parts.append("SEG " + "/".join(phases))
        return ", ".join(parts)
    if pipeline == "cxr_triage":
        verdict = next((_meaning(c) for c in codes if _name(c) == "Finding"
                        and _meaning(c) in ("Abnormal", "Normal")), None)
        probability = _values(numbers, "Probability")
        text = (verdict or "no verdict").upper()
        return text + (f" p = {probability[0]:.2f}" if probability else "")
    return f"{len(results)} result objects"


def _content(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    stack = list(reversed(ds.get("ContentSequence", [])))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(reversed(item.get("ContentSequence", [])))


def _name(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _meaning(item: Dataset) -> str:
    seq = item.get("ConceptCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _values(numbers: list[Dataset], name_starts: str) -> list[float]:
    out = []
    for item in numbers:
        if _name(item).startswith(name_starts) and item.get("MeasuredValueSequence"):
            out.append(float(item.MeasuredValueSequence[0].NumericValue))
    return out


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
