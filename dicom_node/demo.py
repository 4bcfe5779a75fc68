"""``dicom-node demo``: send a synthetic study to the running node and show
what came back, so a newcomer sees the node work within a minute."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.filewriter import dcmwrite

from dicom_node.config import Config, Peer
from dicom_node.send.scu import StoreRequest, send_files
from dicom_node.store.db import Store
from dicom_node.synthetic import ct_phantom
from dicom_node.synthetic.dicom_ct import ct_series

__all__ = ["run_demo"]


def run_demo(config: Config, *, slices: int, size: int, timeout_s: float) -> int:
    node = config.node
    target = Peer(name="node", ae_title=node.ae_title, host=_connect_host(node.host), port=node.port)
    seed = f"demo-{time.time_ns()}"
    print(f"making a synthetic low-dose cardiac CT: {slices} slices of {size}x{size} ...")
    volume = ct_phantom.make_volume(np.random.default_rng(abs(hash(seed)) % 2**32), slices,
                                    size=size, pixel_mm=0.7 * 512 / size)
    datasets = ct_series(volume.low_dose_hu, seed=seed, pixel_mm=volume.pixel_mm, slice_mm=volume.slice_mm)
    series_uid = str(datasets[0].SeriesInstanceUID)
    with tempfile.TemporaryDirectory() as tmp:
        requests = []
        for i, ds in enumerate(datasets):
            path = Path(tmp) / f"{i}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            requests.append(StoreRequest(i, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        outcomes = send_files(target, requests, calling_ae="DEMO_SCU")
    failed = [o for o in outcomes if not o.ok]
    print(f"sent {len(outcomes) - len(failed)}/{len(outcomes)} instances of series {series_uid} "
          f"to {node.ae_title}@{target.host}:{target.port}")
    if failed:
        print(f"send failed: {failed[0].reason}", file=sys.stderr)
        return 1
    return _wait(config, series_uid, timeout_s)


def _wait(config: Config, series_uid: str, timeout_s: float) -> int:
    store = Store(config.data_dir / "node.db")
    print(f"waiting for the quiet period, inference and sending (up to {timeout_s:.0f} s) ...")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        jobs = [j for j in store.jobs(limit=50) if series_uid in j.series_uids]
        if jobs and jobs[0].state in ("failed", "skipped"):
            print(f"job {jobs[0].id} {jobs[0].state}: {jobs[0].reason}", file=sys.stderr)
            return 1
        if jobs and jobs[0].state == "done":
            items = store.outbox_items(jobs[0].id)
            if items and all(i.state != "pending" for i in items):
                for item in items:
                    print(f"  {item.state:5s} {item.destination}: {Path(item.path).name}")
                print(f"job {jobs[0].id} done: {len(items)} result objects; "
                      f"files under {config.data_dir / 'results'}")
                return 0 if all(i.state == "sent" for i in items) else 1
        time.sleep(0.5)
    print("timed out; see `dicom-node jobs` and the node's log", file=sys.stderr)
    return 1


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
