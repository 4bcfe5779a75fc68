"""CT denoising: slices per second for the pipeline alone (decode, inference,
encode, in-process) and end to end (series complete -> results acknowledged
by dcmtk's storescp through the node's outbox), and their ratio.

    .venv/bin/python bench/denoise.py [--slices 64] [--size 512]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pydicom import dcmread

from common import NodeProcess, StoreSCP, cleanup, storescu_time, wait_for, workdir

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node.synthetic import ct_phantom
from dicom_node.synthetic.dicom_ct import ct_series
from pydicom.filewriter import dcmwrite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    root = workdir()
    try:
        vol = ct_phantom.make_volume(np.random.default_rng(3), min(args.slices, 16), size=args.size)
        # Repeat the simulated stack to the wanted length (simulation is slow).
        reps = int(np.ceil(args.slices / vol.low_dose_hu.shape[0]))
        hu = np.concatenate([vol.low_dose_hu] * reps)[: args.slices]
        datasets = ct_series(hu, seed="bench-denoise", pixel_mm=vol.pixel_mm, slice_mm=vol.slice_mm)
        files = []
        (root / "series").mkdir()
        for i, ds in enumerate(datasets):
            files.append(root / "series" / f"{i:04d}.dcm")
            dcmwrite(files[-1], ds, enforce_file_format=True)

        model = ModelRegistry(load_config().models_dir).get("ct_denoise")
        loaded = [dcmread(f) for f in files]
        pipeline = get_pipeline("ct_denoise")
        start = time.perf_counter()
        result = pipeline.run(PipelineInput(0, "bench", loaded, {"batch_size": 4}), model)
        alone = time.perf_counter() - start
        infer = result.timings["inference"]

        scp = StoreSCP(root / "received")
        node = NodeProcess(root / "node", peers=[{"name": "scp", "ae_title": "STORESCP",
                                                   "host": "127.0.0.1", "port": scp.port}],
                           destinations=[{"name": "scp", "kind": "dicom", "peer": "scp"}],
                           routes=[{"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise",
                                    "destinations": ["scp"], "quiet_seconds": 1,
                                    "match": [{"keyword": "Modality", "equals": "CT"}]}]).start()
        storescu_time(node.port, "DICOM_NODE", files)
        store = node.store()
        wait_for(lambda: (lambda items: items and all(i.state == "sent" for i in items)
                          and len(items) == args.slices + 1)(store.outbox_items()), 600, 0.2,
                 "all results acknowledged")
        job = store.jobs()[0]
        last_ack = max(i.sent_at for i in store.outbox_items() if i.sent_at)
        end_to_end = last_ack - job.completed_at
        node.stop()
        scp.stop()
        n = args.slices
        print(f"series: {n} slices of {args.size}x{args.size}, provider {model.provider}")
        print(f"inference only     {n / infer:8.1f} slices/s  ({infer:.2f} s)")
        print(f"pipeline alone     {n / alone:8.1f} slices/s  ({alone:.2f} s: decode, inference, encode)")
        print(f"end to end         {n / end_to_end:8.1f} slices/s  ({end_to_end:.2f} s: complete -> acknowledged)")
        print(f"end-to-end / inference time: {end_to_end / infer:.2f}")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
