"""Chest X-ray triage: radiographs per second for inference alone and end to
end (series complete -> SR and SC acknowledged by dcmtk's storescp), the
ratio between them, and the work per radiograph besides inference.
Radiographs are 2500x2048, 14 bits, as detectors send.

The node gets two series of ``--images`` radiographs.  The first job after
start also loads the model and highdicom's tables (reported as "first job");
the second is the steady state the figures are taken from.

    .venv/bin/python bench/cxr.py [--images 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import (
    StoreSCP,
    TimedModel,
    cleanup,
    end_to_end_seconds,
    scp_json_node,
    stage_line,
    storescu_time,
    workdir,
    write_datasets,
)
from pydicom import dcmread

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, configure_threads, get_pipeline
from dicom_node_synthetic import cxr_phantom
from dicom_node_synthetic.dicom_dx import dx_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    root = workdir()
    configure_threads()  # as the node's worker process does
    try:
        rng = np.random.default_rng(6)
        base = cxr_phantom.make_radiograph(rng, None, size=(2500, 2048)).image
        files = {}
        for name in ("first", "second"):
            datasets = []
            head = dx_image(base[:8, :8], seed=f"bench-cxr-series-{name}")
            series_uid, study_uid = head.SeriesInstanceUID, head.StudyInstanceUID
            for i in range(args.images):
                ds = dx_image(np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1), seed=f"bench-cxr-{name}-{i}")
                ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
                ds.InstanceNumber = i + 1
                datasets.append(ds)
            files[name] = write_datasets(root / name, datasets)
        model = TimedModel(ModelRegistry(load_config().models_dir).get("cxr_triage"))
        pipeline = get_pipeline("cxr_triage")
        pipeline.run(PipelineInput(0, "bench", [dcmread(files["first"][0])], {}), model)  # warm
        model.seconds = 0.0
        loaded = [dcmread(f) for f in files["second"]]
        start = time.perf_counter()
        result = pipeline.run(PipelineInput(0, "bench", loaded, {}), model)
        alone = time.perf_counter() - start
        # The pipeline's inference stage: the model and its heat map back (the letterbox and
        # normalisation are made ahead, with the decoding, and count as work besides inference).
        infer = result.timings["inference"]
        scp = StoreSCP(root / "received")
        node = scp_json_node(root, scp, {"name": "cxr", "pipeline": "cxr_triage", "model": "cxr_triage",
                                    "quiet_seconds": 1, "match": [{"keyword": "Modality", "equals": "DX"}]})
        storescu_time(node.port, "DICOM_NODE", files["first"])
        first = end_to_end_seconds(node, len(result.datasets), job_index=0)
        storescu_time(node.port, "DICOM_NODE", files["second"])
        e2e = end_to_end_seconds(node, len(result.datasets), job_index=1)
        stages = node.job_stages(1)
        node.stop()
        scp.stop()
        n = args.images
        print(f"{n} radiographs of 2500x2048, provider {model.provider}")
        print(f"inference only   {n / infer:7.1f} images/s  ({1000 * infer / n:.1f} ms each; "
              f"the model's own run calls {1000 * model.seconds / n:.1f} ms)")
        print(f"pipeline alone   {n / alone:7.1f} images/s  ({1000 * alone / n:.1f} ms each: "
              f"{stage_line(result.timings)})")
        print(f"end to end       {n / e2e:7.1f} images/s  ({1000 * e2e / n:.1f} ms each, complete -> acknowledged; "
              f"first job after start {first:.2f} s)")
        print(f"work per radiograph besides inference: end to end {1000 * (e2e - infer) / n:.1f} ms, "
              f"pipeline alone {1000 * (alone - infer) / n:.1f} ms (besides the model's own run calls: "
              f"{1000 * (e2e - model.seconds) / n:.1f} ms and {1000 * (alone - model.seconds) / n:.1f} ms)")
        if stages:
            print(f"in the node      {stage_line(stages)}")
        print(f"end-to-end / inference time: {e2e / infer:.2f}"
              + (f"  (/ the job's own inference stage, same run: {e2e / stages['inference']:.2f})"
                 if stages.get("inference") else ""))
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
