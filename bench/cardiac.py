"""Cardiac MRI: time per study (default 10 slices x 25 phases at 256x256) for
inference alone and end to end (study complete -> SEG, SR and SC acknowledged
by dcmtk's storescp), and their ratio.

The node gets two studies of the same size.  The first job after start also
loads the model and highdicom's tables (reported as "first job"); the second
is the steady state the ratio is taken from.

    .venv/bin/python bench/cardiac.py [--slices 10] [--phases 25] [--size 256]
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
from dicom_node_synthetic import cardiac_phantom
from dicom_node_synthetic.dicom_mr import cine_series


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--phases", type=int, default=25)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    root = workdir()
    configure_threads()  # as the node's worker process does
    try:
        study = cardiac_phantom.make_cine(np.random.default_rng(2), args.slices, args.phases, args.size)
        files = {name: write_datasets(root / name, cine_series(study.images, seed=f"bench-cine-{name}",
                                                               pixel_spacing_mm=study.pixel_spacing_mm,
                                                               slice_spacing_mm=study.slice_spacing_mm))
                 for name in ("first", "second")}
        model = TimedModel(ModelRegistry(load_config().models_dir).get("cardiac_seg"))
        pipeline = get_pipeline("cardiac_seg")
        pipeline.run(PipelineInput(0, "bench", [dcmread(f) for f in files["first"]], {"batch_size": 8}), model)
        model.seconds = 0.0
        loaded = [dcmread(f) for f in files["second"]]
        start = time.perf_counter()
        result = pipeline.run(PipelineInput(0, "bench", loaded, {"batch_size": 8}), model)
        alone = time.perf_counter() - start
        infer = result.timings["inference"]
        scp = StoreSCP(root / "received")
        node = scp_json_node(root, scp, {"name": "cine", "pipeline": "cardiac_seg", "model": "cardiac_seg",
                                    "quiet_seconds": 1, "group_by": "study",
                                    "match": [{"keyword": "Modality", "equals": "MR"}]})
        storescu_time(node.port, "DICOM_NODE", files["first"])
        first = end_to_end_seconds(node, len(result.datasets), job_index=0)
        storescu_time(node.port, "DICOM_NODE", files["second"])
        e2e = end_to_end_seconds(node, len(result.datasets), job_index=1)
        stages = node.job_stages(1)
        node.stop()
        scp.stop()
        frames = args.slices * args.phases
        print(f"study: {args.slices} slices x {args.phases} phases at {args.size}x{args.size} "
              f"({frames} frames), provider {model.provider}")
        print(f"inference only   {infer:7.2f} s/study  ({frames / infer:.0f} frames/s; "
              f"the model's own run calls {model.seconds:.2f} s)")
        print(f"pipeline alone   {alone:7.2f} s/study  ({stage_line(result.timings)})")
        print(f"end to end       {e2e:7.2f} s/study  (complete -> acknowledged; first job after start {first:.2f} s)")
        if stages:
            print(f"in the node      {stage_line(stages)}")
        print(f"end-to-end / inference time: {e2e / infer:.2f}"
              + (f"  (/ the job's own inference stage, same run: {e2e / stages['inference']:.2f})"
                 if stages.get("inference") else ""))
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
