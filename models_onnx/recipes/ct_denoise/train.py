"""Recipe for the reference low-dose CT denoising model (``models_onnx/ct_denoise.*``).

Generates paired synthetic chest phantoms (``dicom_node_synthetic.ct_phantom``:
projection-domain Poisson noise, FBP), trains a small DnCNN-style residual CNN
on patches, exports ONNX, evaluates on a held-out synthetic set against an
OpenCV non-local-means baseline tuned on a validation set, and writes the
manifest.  Everything is seeded; with the same seed, thread count and library
versions the run is reproducible.

Run from the repository root::

    .venv/bin/python models_onnx/recipes/ct_denoise/train.py --threads 1

Normalisation (recorded in the manifest as ``linear``): ``x' = clip(HU, -1024,
3071) / 1000``, i.e. offset 0, scale 1000: water is 0, air -1, contrast blood
about 0.4, so activations stay O(1) without per-image statistics that would
make the output depend on what else is in the field of view.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from dicom_node.infer.engine import sha256_of
from dicom_node.pipelines.ct_quality import choose_regions, measure
from dicom_node_synthetic.ct_phantom import DEFAULT_I0, make_slice

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
OUT_ONNX = REPO / "models_onnx" / "ct_denoise.onnx"
OUT_YAML = REPO / "models_onnx" / "ct_denoise.yaml"

NORM_OFFSET = 0.0
NORM_SCALE = 1000.0
NORM_CLIP = (-1024.0, 3071.0)
# PSNR / SSIM are computed on images clipped to this HU range (dynamic range 2000 HU).
METRIC_RANGE = (-1000.0, 1000.0)
PIXEL_MM = 0.7
SIZE = 512
# Training doses span ~0.4x to 3x the evaluation dose so the model does not
# learn one noise level only.
TRAIN_I0 = (6e3, 5e4)
# Network shape: pixel-unshuffle factor, channels, conv layers.  Sized so one
# 512x512 slice runs faster than OpenCV NLM on one CPU thread.
FACTOR, CHANNELS, DEPTH = 2, 32, 8


# ---------------------------------------------------------------------------
# Model


class DenoiseNet(nn.Module):
    """DnCNN-style residual CNN run at half resolution after pixel-unshuffle.

    Pixel-unshuffle by 2 turns 1x512x512 into 4x256x256, so the same
    convolutions cost 4x less than at full resolution and see a 4x larger
    field; that is what makes the net faster than NLM on a CPU.  (A factor of 4
    was faster still but barely learned within the CPU budget.)  The body
    predicts the noise; the graph returns ``input - noise`` so consumers get
    the clean image.
    """

    def __init__(self, factor: int = FACTOR, channels: int = CHANNELS, depth: int = DEPTH) -> None:
        super().__init__()
        c_io = factor * factor
        layers: list[nn.Module] = [nn.Conv2d(c_io, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        # Default init for the last layer too: zero-init (start as identity)
        # starves the earlier layers of gradient and learned far slower here.
        layers.append(nn.Conv2d(channels, c_io, 3, padding=1))
        self.down = nn.PixelUnshuffle(factor)
        self.body = nn.Sequential(*layers)
        self.up = nn.PixelShuffle(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.up(self.body(self.down(x)))


def normalise(hu: np.ndarray) -> np.ndarray:
    return ((np.clip(hu, *NORM_CLIP) - NORM_OFFSET) / NORM_SCALE).astype(np.float32)


def denormalise(x: np.ndarray) -> np.ndarray:
    return (x * NORM_SCALE + NORM_OFFSET).astype(np.float32)


# ---------------------------------------------------------------------------
# Metrics


def psnr(ref_hu: np.ndarray, img_hu: np.ndarray) -> float:
    """PSNR in dB over the whole slice, both clipped to METRIC_RANGE (peak 2000 HU)."""
    a = np.clip(ref_hu, *METRIC_RANGE).astype(np.float64)
    b = np.clip(img_hu, *METRIC_RANGE).astype(np.float64)
    peak = METRIC_RANGE[1] - METRIC_RANGE[0]
    return float(10 * np.log10(peak ** 2 / np.mean((a - b) ** 2)))


def ssim(ref_hu: np.ndarray, img_hu: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03),
    both images clipped to METRIC_RANGE, L = 2000 HU."""
    a = np.clip(ref_hu, *METRIC_RANGE).astype(np.float64)
    b = np.clip(img_hu, *METRIC_RANGE).astype(np.float64)
    peak = METRIC_RANGE[1] - METRIC_RANGE[0]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())


# ---------------------------------------------------------------------------
# Data


@dataclass
class PairSet:
    low: np.ndarray  # (n, H, W) HU
    full: np.ndarray
    labels: np.ndarray
    i0: np.ndarray


def make_set(seed: int, n: int, i0_range: tuple[float, float] | None) -> PairSet:
    """``n`` independent phantoms; i0 log-uniform in ``i0_range`` or DEFAULT_I0."""
    rng = np.random.default_rng(seed)
    lows, fulls, labels, i0s = [], [], [], []
    for _ in range(n):
        i0 = DEFAULT_I0 if i0_range is None else float(np.exp(rng.uniform(*np.log(i0_range))))
        s = make_slice(rng, size=SIZE, pixel_mm=PIXEL_MM, i0=i0)
        lows.append(s.low_dose_hu)
        fulls.append(s.full_dose_hu)
        labels.append(s.labels)
        i0s.append(i0)
    return PairSet(np.stack(lows), np.stack(fulls), np.stack(labels), np.array(i0s))


def sample_patches(rng: np.random.Generator, data: PairSet, batch: int, patch: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches, centred inside the body 90% of the time (air is easy and
    would otherwise dominate), with random flips."""
    n, h, w = data.low.shape
    xs, ys = [], []
    for _ in range(batch):
        k = int(rng.integers(n))
        if rng.random() < 0.9:
            rows, cols = np.nonzero(data.labels[k][::8, ::8])
            j = int(rng.integers(len(rows)))
            r = int(np.clip(rows[j] * 8 - patch // 2, 0, h - patch))
            c = int(np.clip(cols[j] * 8 - patch // 2, 0, w - patch))
        else:
            r, c = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
        x = data.low[k, r:r + patch, c:c + patch]
        y = data.full[k, r:r + patch, c:c + patch]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[::-1], y[::-1]
        xs.append(normalise(x))
        ys.append(normalise(y))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


# ---------------------------------------------------------------------------
# Baseline


def nlm(hu: np.ndarray, h: float, depth: str) -> np.ndarray:
    """OpenCV NLM on the image scaled into an integer range, then back to HU.

    ``u8``: METRIC_RANGE mapped to 0..255 (7.8 HU per step; NORM_L2).
    ``u16``: HU + 1024 clipped to 0..4095, 1 HU per step (16-bit needs NORM_L1).
    Windows are OpenCV's recommended 7 (template) and 21 (search).
    """
    if depth == "u8":
        lo, hi = METRIC_RANGE
        img = np.round((np.clip(hu, lo, hi) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
        out = cv2.fastNlMeansDenoising(img, None, h, 7, 21)
        return (out.astype(np.float32) * (hi - lo) / 255.0 + lo).astype(np.float32)
    img = np.round(np.clip(hu + 1024.0, 0, 4095)).astype(np.uint16)
    out = cv2.fastNlMeansDenoising(img, [float(h)], None, 7, 21, cv2.NORM_L1)
    return out.astype(np.float32) - 1024.0


NLM_GRID = {"u8": [4, 6, 8, 9, 10, 11, 12, 14, 18], "u16": [15, 25, 40, 60, 80, 100, 130]}


def tune_nlm(val: PairSet) -> tuple[str, float, float]:
    """Grid-search (depth, h) for the best mean PSNR on the validation set."""
    best = ("u8", 0.0, -1.0)
    for depth, grid in NLM_GRID.items():
        for h in grid:
            score = float(np.mean([psnr(f, nlm(l, h, depth)) for l, f in zip(val.low, val.full, strict=False)]))
            print(f"  nlm {depth} h={h}: val PSNR {score:.2f}", flush=True)
            if score > best[2]:
                best = (depth, float(h), score)
    return best


# ---------------------------------------------------------------------------
# Export and evaluation


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    x = torch.zeros(1, 1, 64, 64)
    dyn = {0: "batch", 2: "rows", 3: "cols"}
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                      opset_version=17, dynamic_axes={"input": dyn, "output": dyn}, dynamo=False)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_model(sess, hu: np.ndarray) -> np.ndarray:
    out = sess.run(["output"], {"input": normalise(hu)[None, None]})[0]
    return denormalise(out[0, 0])


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first ORT run allocates, first NLM call initialises
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))




def evaluate(test: PairSet, denoisers: dict) -> dict:
    """PSNR/SSIM vs full dose and blood-pool noise on the held-out set.

    The ROIs are chosen on the low-dose slice (what the pipeline sees) and the
    same ROIs are measured on every output, as in the pipeline.
    """
    res: dict[str, dict[str, list[float]]] = {k: {"psnr": [], "ssim": [], "sd": [], "cnr": []}
                                             for k in denoisers}
    for low, full in zip(test.low, test.full, strict=False):
        regions = choose_regions(low[None], (PIXEL_MM, PIXEL_MM))
        for name, fn in denoisers.items():
            img = fn(low)
            res[name]["psnr"].append(psnr(full, img))
            res[name]["ssim"].append(ssim(full, img))
            m = measure(img[None], regions)
            res[name]["sd"].append(m.noise_hu)
            res[name]["cnr"].append(m.cnr)
    sd_in = np.array(res["low_dose"]["sd"])
    out = {}
    for name, r in res.items():
        out[name] = {
            "psnr_db": round(float(np.mean(r["psnr"])), 3),
            "psnr_db_min": round(float(np.min(r["psnr"])), 3),
            "ssim": round(float(np.mean(r["ssim"])), 4),
            "blood_pool_sd_hu": round(float(np.mean(r["sd"])), 2),
            "blood_pool_noise_reduction_pct": round(
                float(np.mean(100 * (1 - np.array(r["sd"]) / sd_in))), 1),
            "cnr_blood_vs_fat": round(float(np.mean(r["cnr"])), 2),
        }
    return out


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/OpenCV threads for data and training (timings always use 1)")
    ap.add_argument("--n-train", type=int, default=96)
    ap.add_argument("--n-val", type=int, default=6)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)

    # Disjoint seeds: train, validation (NLM tuning), held-out test.
    seeds = {"train": args.seed, "val": args.seed + 1, "test": args.seed + 2}
    print(f"generating {args.n_train}+{args.n_val}+{args.n_test} phantoms", flush=True)
    train = make_set(seeds["train"], args.n_train, TRAIN_I0)
    val = make_set(seeds["val"], args.n_val, None)
    test = make_set(seeds["test"], args.n_test, None)
    t_data = time.perf_counter() - t_start
    print(f"  data {t_data:.0f} s", flush=True)

    model = DenoiseNet()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.05)
    rng = np.random.default_rng(args.seed + 10)
    model.train()
    t_train = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        x, y = sample_patches(rng, train, args.batch, args.patch)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % 100 == 0:
            rmse_hu = (running / 100) ** 0.5 * NORM_SCALE
            print(f"  step {step}/{args.steps} rmse {rmse_hu:.1f} HU "
                  f"({time.perf_counter() - t_train:.0f} s)", flush=True)
            running = 0.0
    t_train = time.perf_counter() - t_train
    torch.save(model.state_dict(), WORK / "model.pt")

    export_onnx(model, OUT_ONNX)
    sess = ort_session(OUT_ONNX, threads=1)
    with torch.no_grad():
        ref = denormalise(model(torch.from_numpy(normalise(test.low[0])[None, None])).numpy()[0, 0])
    onnx_out = run_model(sess, test.low[0])
    max_diff = float(np.abs(ref - onnx_out).max())
    print(f"onnx vs torch at {SIZE}x{SIZE}: max |diff| {max_diff:.4f} HU", flush=True)
    if onnx_out.shape != (SIZE, SIZE) or max_diff > 0.5:
        raise SystemExit("ONNX export does not match torch")

    print("tuning NLM on validation set", flush=True)
    cv2.setNumThreads(1)  # all timings single-threaded
    nlm_depth, nlm_h, nlm_val = tune_nlm(val)
    print(f"  best NLM: {nlm_depth} h={nlm_h} (val PSNR {nlm_val:.2f})", flush=True)

    print("evaluating on held-out set", flush=True)
    quality = evaluate(test, {
        "low_dose": lambda hu: hu,
        "model": lambda hu: run_model(sess, hu),
        "nlm": lambda hu: nlm(hu, nlm_h, nlm_depth),
    })
    ms_model = median_ms(lambda: run_model(sess, test.low[0]), 10)
    ms_nlm = median_ms(lambda: nlm(test.low[0], nlm_h, nlm_depth), 10)
    print(f"  model {ms_model:.0f} ms/slice, NLM {ms_nlm:.0f} ms/slice", flush=True)
    for k, v in quality.items():
        print(f"  {k}: {v}", flush=True)
    if quality["model"]["psnr_db"] <= quality["nlm"]["psnr_db"] or ms_model >= ms_nlm:
        print("WARNING: model does not beat NLM on PSNR and speed", flush=True)

    wall = time.perf_counter() - t_start
    manifest = build_manifest(args, seeds, quality, ms_model, ms_nlm, nlm_depth, nlm_h, nlm_val,
                              n_params, max_diff, t_data, t_train, wall)
    write_manifest(manifest, OUT_YAML)
    print(f"wrote {OUT_ONNX} and {OUT_YAML} in {wall:.0f} s", flush=True)
    return 0


class _NoAliasDumper(yaml.SafeDumper):
    """Plain YAML: no &anchors for repeated lists, so the manifest reads like hand-written."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def write_manifest(manifest: dict, path: Path) -> None:
    path.write_text(
        "# Written by models_onnx/recipes/ct_denoise/train.py; do not edit by hand.\n"
        + yaml.dump(manifest, Dumper=_NoAliasDumper, sort_keys=False, width=100),
        encoding="utf-8")


def build_manifest(args: argparse.Namespace, seeds: dict[str, int], quality: dict,
                   ms_model: float, ms_nlm: float, nlm_depth: str, nlm_h: float, nlm_val: float,
                   n_params: int, max_diff: float, t_data: float, t_train: float,
                   wall: float) -> dict:
    tensor = {"shape": [None, 1, None, None], "dtype": "float32", "layout": "NCHW"}
    nlm_desc = ("cv2.fastNlMeansDenoising, templateWindowSize 7, searchWindowSize 21, "
                + ("image mapped [-1000, 1000] HU -> uint8 0..255, NORM_L2"
                   if nlm_depth == "u8" else "image as uint16 HU+1024 (0..4095), NORM_L1")
                + f", h = {nlm_h:g} (best mean PSNR on the validation set over "
                f"u8 h in {NLM_GRID['u8']} and u16 h in {NLM_GRID['u16']})")
    return {
        "name": "ct_denoise",
        "version": "1.0.0",
        # DICOM CID 7162 (Surface Processing Algorithm Family), as used in the
        # Algorithm Family Code Sequence of SEG/SR algorithm identification.
        "family": {"scheme": "DCM", "value": "123110", "meaning": "Artificial Intelligence"},
        "description": ("Low-dose CT denoiser: DnCNN-style residual CNN (pixel-unshuffle "
                        f"x{FACTOR}, {DEPTH} conv layers, {CHANNELS} channels, {n_params} "
                        "parameters) mapping a "
                        "low-dose axial CT slice to a full-dose-like slice in HU."),
        "intended_use": ("Reference model trained only on synthetic chest phantoms, shipped to "
                         "validate the denoising pipeline end to end (ONNX loading, "
                         "normalisation, DICOM output, quality report). Not for clinical use; "
                         "not validated on patient data."),
        "onnx": OUT_ONNX.name,
        "sha256": sha256_of(OUT_ONNX),
        "task": "image-to-image",
        "inputs": [{"name": "input", **tensor}],
        "outputs": [{"name": "output", **tensor}],
        "normalization": {"kind": "linear", "offset": NORM_OFFSET, "scale": NORM_SCALE,
                          "clip": list(NORM_CLIP)},
        "geometry": {"fit": "dynamic", "size_multiple": FACTOR,
                     "pixel_spacing_mm": [PIXEL_MM, PIXEL_MM]},
        "image_to_image": {"kind": "clean", "context_slices": 0},
        "plausible": {"roi_mean_shift_hu": [0, 30]},
        "quality": {
            "test_set": {
                "kind": "synthetic chest phantoms (dicom_node_synthetic.ct_phantom.make_slice)",
                "n_slices": args.n_test, "seed": seeds["test"], "size": [SIZE, SIZE],
                "pixel_mm": PIXEL_MM, "i0": DEFAULT_I0,
                "reference": "FBP of the noiseless sinogram (same geometry and kernel)",
            },
            "metric_definitions": {
                "psnr_db": ("mean over slices of 10*log10(2000^2 / MSE), whole 512x512 slice, "
                            "both images clipped to [-1000, 1000] HU"),
                "ssim": ("mean SSIM, Gaussian window sigma 1.5, K1 0.01, K2 0.03, L 2000 HU, "
                         "images clipped to [-1000, 1000] HU"),
                "blood_pool_sd_hu": ("SD in the blood-pool ROI chosen automatically on the "
                                     "low-dose slice by dicom_node.pipelines.ct_quality"),
                "blood_pool_noise_reduction_pct": "mean of 100 * (1 - SD_output / SD_low_dose)",
                "cnr_blood_vs_fat": "(mean_blood - mean_fat) / SD_blood, same ROIs",
            },
            **quality,
            "nlm_baseline": nlm_desc,
            "nlm_validation_psnr_db": round(nlm_val, 3),
            "cpu_ms_per_slice_512": {
                "model": round(ms_model, 1), "nlm": round(ms_nlm, 1),
                "how": ("median of 10 runs after warm-up, one 512x512 slice, 1 thread "
                        "(onnxruntime CPUExecutionProvider intra_op 1; cv2.setNumThreads(1)), "
                        "normalisation and scaling included"),
            },
            "onnx_vs_torch_max_abs_diff_hu": round(max_diff, 5),
        },
        "training": {
            "recipe": "models_onnx/recipes/ct_denoise/train.py",
            "command": ("python models_onnx/recipes/ct_denoise/train.py "
                        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())),
            "seed": args.seed,
            "threads": args.threads,
            "data": (f"{args.n_train} synthetic 512x512 chest phantom slices at {PIXEL_MM} mm "
                     f"(seed {seeds['train']}), low dose by Poisson noise on a 360-view "
                     f"parallel-beam sinogram at i0 log-uniform in {list(TRAIN_I0)}, FBP with "
                     "Hann-windowed ramp; target is the noiseless FBP. Validation "
                     f"{args.n_val} slices (seed {seeds['val']}, i0 {DEFAULT_I0:g}) used only "
                     "to tune the NLM baseline."),
            "optimiser": (f"Adam, one-cycle lr max {args.lr:g}, {args.steps} steps, batch "
                          f"{args.batch} patches of {args.patch}x{args.patch}, MSE on "
                          "normalised HU, random flips, gradient norm clipped at 1"),
            "parameters": n_params,
            "wall_time_s": {"data": round(t_data, 1), "training": round(t_train, 1),
                            "total": round(wall, 1)},
            "torch": str(torch.__version__),
        },
    }


if __name__ == "__main__":
    raise SystemExit(main())
