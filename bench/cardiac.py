"""Cardiac MRI: time per study (default 10 slices x 25 phases at 256x256) for
inference alone and end to end (study complete -> SEG, SR and SC acknowledged
by dcmtk's storescp), and their ratio.

    .venv/bin/python bench/cardiac.py [--slices 10] [--phases 25] [--size 256]
"""

from __future__ import annotations

import argparse

import numpy as np
from pydicom import dcmread

from common import StoreSCP, cleanup, end_to_end_seconds, scp_node, storescu_time, workdir, write_datasets

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node.synthetic import cardiac_phantom
from dicom_node.synthetic.dicom_mr import cine_series


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--phases", type=int, default=25)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    root = workdir()
    try:
        study = cardiac_phantom.make_cine(np.random.default_rng(2), args.slices, args.phases, args.size)
        files = write_datasets(root / "cine", cine_series(study.images, seed="bench-cine",
                                                          pixel_spacing_mm=study.pixel_spacing_mm,
                                                          slice_spacing_mm=study.slice_spacing_mm))
        model = ModelRegistry(load_config().models_dir).get("cardiac_seg")
        result = get_pipeline("cardiac_seg").run(PipelineInput(0, "bench", [dcmread(f) for f in files],
                                                               {"batch_size": 8}), model)
        infer = result.timings["inference"]
        alone = sum(result.timings.values())
        scp = StoreSCP(root / "received")
        node = scp_node(root, scp, {"name": "cine", "pipeline": "cardiac_seg", "model": "cardiac_seg",
                                    "quiet_seconds": 1, "group_by": "study",
                                    "match": [{"keyword": "Modality", "equals": "MR"}]})
        storescu_time(node.port, "DICOM_NODE", files)
        e2e = end_to_end_seconds(node, len(result.datasets))
        node.stop()
        scp.stop()
        frames = args.slices * args.phases
        print(f"study: {args.slices} slices x {args.phases} phases at {args.size}x{args.size} "
              f"({frames} frames), provider {model.provider}")
        print(f"inference only   {infer:7.2f} s/study  ({frames / infer:.0f} frames/s)")
        print(f"pipeline alone   {alone:7.2f} s/study  (decode, inference, metrics, SEG/SR/SC encode)")
        print(f"end to end       {e2e:7.2f} s/study  (complete -> acknowledged)")
        print(f"end-to-end / inference time: {e2e / infer:.2f}")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
