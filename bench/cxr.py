"""Chest X-ray triage: radiographs per second for inference alone and end to
end (series complete -> SR and SC acknowledged by dcmtk's storescp), and the
ratio between them.  Radiographs are 2500x2048, 14 bits, as detectors send.

    .venv/bin/python bench/cxr.py [--images 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pydicom import dcmread

from common import StoreSCP, cleanup, end_to_end_seconds, scp_node, storescu_time, workdir, write_datasets

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node.synthetic import cxr_phantom
from dicom_node.synthetic.dicom_dx import dx_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    root = workdir()
    try:
        rng = np.random.default_rng(6)
        base = cxr_phantom.make_radiograph(rng, None, size=(2500, 2048)).image
        datasets = []
        for i in range(args.images):
            ds = dx_image(np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1), seed=f"bench-cxr-{i}")
            ds.SeriesInstanceUID = dx_image(base[:8, :8], seed="bench-cxr-series").SeriesInstanceUID
            ds.InstanceNumber = i + 1
            datasets.append(ds)
        files = write_datasets(root / "cxr", datasets)
        model = ModelRegistry(load_config().models_dir).get("cxr_triage")
        pipeline = get_pipeline("cxr_triage")
        loaded = [dcmread(f) for f in files]
        start = time.perf_counter()
        result = pipeline.run(PipelineInput(0, "bench", loaded, {}), model)
        alone = time.perf_counter() - start
        infer = result.timings["inference"]
        scp = StoreSCP(root / "received")
        node = scp_node(root, scp, {"name": "cxr", "pipeline": "cxr_triage", "model": "cxr_triage",
                                    "quiet_seconds": 1, "match": [{"keyword": "Modality", "equals": "DX"}]})
        storescu_time(node.port, "DICOM_NODE", files)
        e2e = end_to_end_seconds(node, len(result.datasets))
        node.stop()
        scp.stop()
        n = args.images
        print(f"{n} radiographs of 2500x2048, provider {model.provider}")
        print(f"inference only   {n / infer:7.1f} images/s")
        print(f"pipeline alone   {n / alone:7.1f} images/s  (decode, presentation, letterbox, inference, SR+SC)")
        print(f"end to end       {n / e2e:7.1f} images/s  (complete -> acknowledged)")
        print(f"end-to-end / inference time: {e2e / infer:.2f}")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
