"""GPU check: does the CUDA path really run, and agree with the CPU?

1. Providers: what this onnxruntime build lists, and what a session asked
   for CUDA really gets for each model, with the reason when it is not CUDA
   (the missing library, no GPU device...).
2. Agreement: every model in the models folder runs on the same inputs on
   the CUDA session and on a CPU session; the largest difference must stay
   within ``--tolerance`` times the CPU output's peak magnitude.
3. Throughput: items per second per model at several batch sizes, on both.
4. Pipelines: one series per pipeline, decoded, inferred on the CUDA session
   and encoded in process, and the ratio of that time to inference alone
   (the pipeline's inference stage, and the model's own run calls).

Exit status: 0 when every model ran on CUDA and agreed; 1 when CUDA was not
obtained (on a CPU-only host; with ``--allow-cpu`` the rest still runs, the
"CUDA" session being whatever onnxruntime fell back to, and the status is 0
if it agreed); 2 when outputs disagree beyond the tolerance.

    .venv/bin/python bench/gpu.py [--batches 1,4,16] [--repeats 5] [--allow-cpu] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info
from pydicom import dcmread
from pydicom.filewriter import dcmwrite

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import TimedModel  # noqa: E402

from dicom_node.infer.engine import GPU_PROVIDERS, OnnxModel  # noqa: E402
from dicom_node.infer.manifest import ModelManifest, load_manifest  # noqa: E402
from dicom_node.pipelines.base import PipelineInput, get_pipeline  # noqa: E402

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


@dataclass
class ModelReport:
    model: str
    provider: str
    not_obtained: dict[str, str]
    max_abs_diff: float = 0.0
    peak: float = 0.0
    agrees: bool = True
    # batch size -> items per second
    accelerated: dict[int, float] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)


@dataclass
class PipelineReport:
    pipeline: str
    provider: str
    items: int
    seconds: float
    inference_stage_s: float
    model_run_s: float


def _input(manifest: ModelManifest, batch: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random input of the manifest's shape: ``batch`` on the batch axis,
    ``size`` on other free axes (a multiple of the model's size_multiple)."""
    spec = manifest.input
    multiple = getattr(manifest.geometry, "size_multiple", None) or 1
    free = max(multiple, size // multiple * multiple)
    shape = [batch if i == 0 and d is None else free if d is None else d for i, d in enumerate(spec.shape)]
    if spec.shape[0] is not None:  # fixed batch axis: the model's own
        shape[0] = spec.shape[0]
    return rng.random(shape, dtype=np.float32).astype(spec.dtype)


def _items_per_s(model: OnnxModel, x: np.ndarray, repeats: int) -> float:
    feed = {model.input_name: x}
    model.run(feed)  # the first call allocates and, on CUDA, picks kernels
    start = time.perf_counter()
    for _ in range(repeats):
        model.run(feed)
    return x.shape[0] * repeats / (time.perf_counter() - start)


def check_model(path: Path, batches: list[int], size: int, repeats: int, tolerance: float,
                threads: int) -> ModelReport:
    fast = OnnxModel.load(path, CUDA, intra_op_threads=threads)
    cpu = OnnxModel.load(path, CPU, intra_op_threads=threads)
    report = ModelReport(fast.manifest.name, fast.provider, dict(fast.not_obtained))
    rng = np.random.default_rng(13)
    x = _input(fast.manifest, min(batches), size, rng)
    a, b = fast.run({fast.input_name: x}), cpu.run({cpu.input_name: x})
    worst = -1.0
    for name, expected in b.items():  # each output against its own scale
        diff = float(np.abs(a[name].astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
        peak = float(np.abs(expected.astype(np.float64)).max(initial=0.0))
        ratio = diff / max(peak, 1e-12)
        report.agrees = report.agrees and ratio <= tolerance
        if ratio > worst:  # the output closest to failing is the one reported
            worst, report.max_abs_diff, report.peak = ratio, diff, peak
    for batch in batches:
        xb = _input(fast.manifest, batch, size, rng)
        report.accelerated[batch] = _items_per_s(fast, xb, repeats)
        report.cpu[batch] = _items_per_s(cpu, xb, repeats)
    return report


def _series(pipeline: str, folder: Path, tiny: bool) -> list[Path]:
    """One synthetic series of the kind ``pipeline`` takes, as files."""
    from dicom_node_synthetic import cardiac_phantom, ct_phantom, cxr_phantom
    from dicom_node_synthetic.dicom_ct import ct_series
    from dicom_node_synthetic.dicom_dx import dx_image
    from dicom_node_synthetic.dicom_mr import cine_series

    rng = np.random.default_rng(5)
    if pipeline == "ct_denoise":
        n, size = (3, 64) if tiny else (32, 512)
        vol = ct_phantom.make_volume(rng, n, size=size, pixel_mm=0.7 * 512 / size)
        datasets = ct_series(vol.low_dose_hu, seed="gpu-check", pixel_mm=vol.pixel_mm, slice_mm=vol.slice_mm)
    elif pipeline == "cardiac_seg":
        slices, phases, size = (2, 2, 64) if tiny else (10, 25, 256)
        study = cardiac_phantom.make_cine(rng, slices, phases, size)
        datasets = cine_series(study.images, seed="gpu-check", pixel_spacing_mm=study.pixel_spacing_mm,
                               slice_spacing_mm=study.slice_spacing_mm)
    elif pipeline == "cxr_triage":
        count, shape = (1, (320, 256)) if tiny else (8, (2500, 2048))
        base = cxr_phantom.make_radiograph(rng, None, size=shape).image
        datasets = []
        for i in range(count):
            ds = dx_image(base, seed=f"gpu-check-{i}")
            ds.InstanceNumber = i + 1
            if datasets:
                ds.SeriesInstanceUID = datasets[0].SeriesInstanceUID
            datasets.append(ds)
    else:
        raise ValueError(f"no synthetic series for pipeline {pipeline!r}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def run_pipeline(pipeline: str, manifest_path: Path, folder: Path, tiny: bool, threads: int) -> PipelineReport:
    files = _series(pipeline, folder, tiny)
    model = TimedModel(OnnxModel.load(manifest_path, CUDA, intra_op_threads=threads))
    runner = get_pipeline(pipeline)
    options = {"batch_size": 8}
    runner.run(PipelineInput(0, "gpu-check", [dcmread(f) for f in files], options), model)  # warm
    model.seconds, model.calls = 0.0, 0
    datasets = [dcmread(f) for f in files]
    start = time.perf_counter()
    result = runner.run(PipelineInput(1, "gpu-check", datasets, options), model)
    seconds = time.perf_counter() - start
    return PipelineReport(pipeline, model.provider, len(files), seconds,
                          float(result.timings.get("inference", 0.0)), model.seconds)


def _print_providers(reports: list[ModelReport]) -> None:
    cuda = getattr(build_and_package_info, "cuda_version", "")
    print(f"onnxruntime {ort.__version__} (built for CUDA {cuda or 'none'}); "
          f"available providers: {', '.join(ort.get_available_providers())}")
    for r in reports:
        why = "; ".join(f"{p} not obtained: {w}" for p, w in r.not_obtained.items())
        print(f"  {r.model:<14} asked CUDA, got {r.provider}" + (f" -- {why}" if why else ""))


def _print_agreement(reports: list[ModelReport], tolerance: float) -> None:
    print(f"\nagreement, CUDA session vs CPU session (tolerance: max |diff| <= {tolerance:g} x peak |cpu|)")
    print(f"  {'model':<14} {'provider':<22} {'max |diff|':>11} {'peak |cpu|':>11}  verdict")
    for r in reports:
        print(f"  {r.model:<14} {r.provider:<22} {r.max_abs_diff:11.3g} {r.peak:11.4g}  "
              f"{'ok' if r.agrees else 'DIFFERS'}")


def _print_throughput(reports: list[ModelReport], size: int) -> None:
    print(f"\nthroughput, items/s (free spatial axes {size}; fixed ones as the model has them)")
    for r in reports:
        cells = "  ".join(f"b{b}: {r.accelerated[b]:8.1f} / {r.cpu[b]:8.1f}" for b in sorted(r.cpu))
        print(f"  {r.model:<14} {r.provider} / CPU   {cells}")


def _print_pipelines(reports: list[PipelineReport]) -> None:
    print("\npipelines, one series each in process (decode, inference, encode)")
    for p in reports:
        stage = p.seconds / p.inference_stage_s if p.inference_stage_s else float("nan")
        own = p.seconds / p.model_run_s if p.model_run_s else float("nan")
        print(f"  {p.pipeline:<12} {p.items:3d} instances on {p.provider}: {p.seconds:.3f} s; "
              f"/ inference stage {p.inference_stage_s:.3f} s = {stage:.2f}; "
              f"/ model run calls {p.model_run_s:.3f} s = {own:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models_onnx")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes, comma-separated")
    ap.add_argument("--size", type=int, default=256, help="length of the models' free spatial axes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=5e-3,
                    help="largest |CUDA - CPU| allowed, as a fraction of the CPU output's peak |value|")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="go on (exit 0) where CUDA is not obtained, measuring the fallback")
    ap.add_argument("--tiny", action="store_true", help="small series for the pipelines (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)
    # The provider lines below say what the engine's warnings would, once.
    logging.getLogger("dicom_node.infer").setLevel(logging.ERROR)
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    manifests = sorted(args.models_dir.glob("*.yaml"))
    if not manifests or not batches or min(batches) < 1:
        ap.error(f"need manifests in {args.models_dir} and batch sizes >= 1")

    # The providers first and alone: on a host without CUDA that is the answer.
    probes = [OnnxModel.load(p, CUDA, intra_op_threads=args.threads) for p in manifests]
    fallen = [m for m in probes if m.provider not in GPU_PROVIDERS]
    _print_providers([ModelReport(m.manifest.name, m.provider, dict(m.not_obtained)) for m in probes])
    if fallen and not args.allow_cpu:
        print(f"\nCUDA unavailable for {', '.join(m.manifest.name for m in fallen)}; nothing measured "
              "(--allow-cpu measures the fallback)")
        return 1
    del probes

    reports = [check_model(p, batches, args.size, args.repeats, args.tolerance, args.threads)
               for p in manifests]
    _print_agreement(reports, args.tolerance)
    _print_throughput(reports, args.size)
    by_name = {load_manifest(p).name: p for p in manifests}
    pipelines = []
    with tempfile.TemporaryDirectory(prefix="dicom-node-gpu-") as tmp:
        for pipeline in ("ct_denoise", "cardiac_seg", "cxr_triage"):
            if pipeline in by_name:  # the shipped pipeline's own model
                pipelines.append(run_pipeline(pipeline, by_name[pipeline], Path(tmp) / pipeline,
                                              args.tiny, args.threads))
    _print_pipelines(pipelines)
    if args.json:
        args.json.write_text(json.dumps({
            "onnxruntime": ort.__version__, "tolerance": args.tolerance, "size": args.size,
            "models": [asdict(r) for r in reports], "pipelines": [asdict(p) for p in pipelines]}, indent=1))
    if not all(r.agrees for r in reports):
        return 2
    return 1 if fallen and not args.allow_cpu else 0


if __name__ == "__main__":
    sys.exit(main())
