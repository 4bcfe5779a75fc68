"""``dicom-node demo``: send a small synthetic study for each routed pipeline
to the running node and show what came back, so a newcomer sees the node
work within a minute."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from dicom_node.config import Config, Peer
from dicom_node.send.scu import StoreRequest, send_files
from dicom_node.store.db import Store
from dicom_node.synthetic import cardiac_phantom, ct_phantom, cxr_phantom
from dicom_node.synthetic.dicom_ct import ct_series
from dicom_node.synthetic.dicom_dx import dx_image
from dicom_node.synthetic.dicom_mr import cine_series

__all__ = ["run_demo"]


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
    for pipeline in dict.fromkeys(pipelines):
        what, make = _STUDIES[pipeline]
        seed = f"demo-{pipeline}-{time.time_ns()}"
        print(f"[{pipeline}] making a synthetic {what} ...")
        datasets = make(seed, slices, size)
        series = {str(ds.SeriesInstanceUID) for ds in datasets}
        if not _send(target, datasets):
            return 1
        failures += _wait(config, series, timeout_s)
    return 1 if failures else 0


def _send(target: Peer, datasets: list[Dataset]) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        requests = []
        for i, ds in enumerate(datasets):
            path = Path(tmp) / f"{i}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            requests.append(StoreRequest(i, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        outcomes = send_files(target, requests, calling_ae="DEMO_SCU")
    failed = [o for o in outcomes if not o.ok]
    print(f"  sent {len(outcomes) - len(failed)}/{len(outcomes)} instances to "
          f"{target.ae_title}@{target.host}:{target.port}")
    if failed:
        print(f"  send failed: {failed[0].reason}", file=sys.stderr)
    return not failed


def _wait(config: Config, series: set[str], timeout_s: float) -> int:
    store = Store(config.data_dir / "node.db")
    print(f"  waiting for the quiet period, inference and sending (up to {timeout_s:.0f} s) ...")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        jobs = [j for j in store.jobs(limit=50) if series & set(j.series_uids)]
        if jobs and jobs[0].state in ("failed", "skipped"):
            print(f"  job {jobs[0].id} {jobs[0].state}: {jobs[0].reason}", file=sys.stderr)
            return 1
        if jobs and jobs[0].state == "done":
            items = store.outbox_items(jobs[0].id)
            if items and all(i.state != "pending" for i in items):
                for item in items:
                    print(f"    {item.state:5s} {item.destination}: {Path(item.path).name}")
                print(f"  job {jobs[0].id} done: {len(items)} result objects; "
                      f"files under {config.data_dir / 'results'}")
                return 0 if all(i.state == "sent" for i in items) else 1
        time.sleep(0.5)
    print("  timed out; see `dicom-node jobs` and the node's log", file=sys.stderr)
    return 1


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
