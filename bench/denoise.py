"""CT denoising: slices per second for the pipeline alone (decode, inference,
encode, in-process) and end to end (series complete -> results acknowledged
by dcmtk's storescp through the node's outbox), and their ratio.

The node gets two series of the same size.  The first job after start also
loads the model and highdicom's tables (reported as "first job"); the second
is the steady state the ratio is taken from.

    .venv/bin/python bench/denoise.py [--slices 64] [--size 512]
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
)
from pydicom import dcmread
from pydicom.filewriter import dcmwrite

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.infer.runner import denoise
from dicom_node.pipelines.base import PipelineInput, configure_threads, get_pipeline
from dicom_node.pipelines.volume import load_volume
from dicom_node_synthetic import ct_phantom
from dicom_node_synthetic.dicom_ct import ct_series


def _ratios(end_to_end: float, infer: float, stages: dict) -> None:
    if stages:
        print(f"in the node      {stage_line(stages)}")
    print(f"end-to-end / inference time: {end_to_end / infer:.2f}"
          + (f"  (/ the job's own inference stage, same run: {end_to_end / stages['inference']:.2f})"
             if stages.get("inference") else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    root = workdir()
    configure_threads()  # as the node's worker process does
    try:
        vol = ct_phantom.make_volume(np.random.default_rng(3), min(args.slices, 16), size=args.size)
        # Repeat the simulated stack to the wanted length (simulation is slow).
        reps = int(np.ceil(args.slices / vol.low_dose_hu.shape[0]))
        hu = np.concatenate([vol.low_dose_hu] * reps)[: args.slices]
        series = {}
        for name, seed in (("first", "bench-denoise"), ("second", "bench-denoise-2")):
            datasets = ct_series(hu, seed=seed, pixel_mm=vol.pixel_mm, slice_mm=vol.slice_mm)
            (root / name).mkdir()
            series[name] = []
            for i, ds in enumerate(datasets):
                series[name].append(root / name / f"{i:04d}.dcm")
                dcmwrite(series[name][-1], ds, enforce_file_format=True)
        files = series["second"]

        model = TimedModel(ModelRegistry(load_config().models_dir).get("ct_denoise"))
        loaded = [dcmread(f) for f in files]
        # Inference alone: the model call with its tensor preparation, on the
        # decoded volume, with nothing else running.
        volume = load_volume(loaded)
        denoise(volume.values[:4], volume.pixel_spacing, model, 4)  # warm the session
        model.seconds = 0.0
        start = time.perf_counter()
        denoise(volume.values, volume.pixel_spacing, model, 4)
        infer = time.perf_counter() - start
        model_only = model.seconds
        pipeline = get_pipeline("ct_denoise")
        loaded = [dcmread(f) for f in files]
        start = time.perf_counter()
        result = pipeline.run(PipelineInput(0, "bench", loaded, {"batch_size": 4}), model)
        alone = time.perf_counter() - start

        scp = StoreSCP(root / "received")
        node = scp_json_node(root, scp, {"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise",
                                         "quiet_seconds": 1, "match": [{"keyword": "Modality", "equals": "CT"}]})
        storescu_time(node.port, "DICOM_NODE", series["first"])
        first = end_to_end_seconds(node, args.slices + 1, job_index=0)
        storescu_time(node.port, "DICOM_NODE", files)
        end_to_end = end_to_end_seconds(node, args.slices + 1, job_index=1)
        stages = node.job_stages(1)
        node.stop()
        scp.stop()
        n = args.slices
        print(f"series: {n} slices of {args.size}x{args.size}, provider {model.provider}")
        print(f"inference only     {n / infer:8.1f} slices/s  ({infer:.2f} s; the model's own run calls {model_only:.2f} s)")
        print(f"pipeline alone     {n / alone:8.1f} slices/s  ({alone:.2f} s: {stage_line(result.timings)})")
        print(f"end to end         {n / end_to_end:8.1f} slices/s  ({end_to_end:.2f} s: complete -> acknowledged; "
              f"first job after start {first:.2f} s)")
        _ratios(end_to_end, infer, stages)
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
