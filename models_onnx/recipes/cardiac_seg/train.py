"""Train the reference cardiac short-axis segmentation model on synthetic phantoms.

Reproducible end to end from one seed: generates phantoms
(:mod:`dicom_node_synthetic.cardiac_phantom`), trains a small 2D U-Net at a
fixed pixel spacing with per-image z-score normalisation, exports ONNX
(opset 17, dynamic N/H/W), checks onnxruntime against torch, evaluates the
full resample -> infer -> resample-back path on a held-out phantom set and
writes ``models_onnx/cardiac_seg.onnx`` and ``models_onnx/cardiac_seg.yaml``.

Run from the repository root:
    python models_onnx/recipes/cardiac_seg/train.py [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from dicom_node.infer.engine import sha256_of
from dicom_node.pipelines.cardiac_metrics import cardiac_metrics, dice, hausdorff95
from dicom_node_synthetic.cardiac_phantom import make_cine

RECIPE = Path(__file__).resolve().parent
WORK = RECIPE / "work"
OUT_ONNX = REPO / "models_onnx" / "cardiac_seg.onnx"
OUT_YAML = REPO / "models_onnx" / "cardiac_seg.yaml"
SIZE_MULTIPLE = 16  # four 2x poolings
STRUCTURES = {1: "lv_cavity", 2: "lv_myocardium", 3: "rv_cavity"}
WIDTHS = (8, 16, 32, 64, 96)


# ----------------------------------------------------------------------------- model
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Plain 2D U-Net, four poolings; input size must be a multiple of 16."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, n_classes: int = 4) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w_skip, 2, stride=2))
            self.dec.append(_block(2 * w_skip, w_skip))
            cin = w_skip
        self.head = nn.Conv2d(cin, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=False):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# ------------------------------------------------------------------ preprocessing
def resample(img: np.ndarray, spacing: tuple[float, float], target: float,
             interp: int) -> np.ndarray:
    """Resample a 2D slice from ``spacing`` (row, col) to square ``target`` mm pixels.

    Labels must use ``cv2.INTER_NEAREST_EXACT``: plain ``INTER_NEAREST`` samples
    corner-aligned while ``INTER_LINEAR`` is centre-aligned, which shifts labels
    against the image by up to half a pixel each way (a label round trip
    alone then costs ~0.15 myocardial Dice).
    """
    h, w = img.shape
    nh, nw = max(1, round(h * spacing[0] / target)), max(1, round(w * spacing[1] / target))
    return cv2.resize(img, (nw, nh), interpolation=interp)


def zscore(img: np.ndarray) -> np.ndarray:
    """Per-image z-score, as the manifest's ``normalization: zscore`` tells the pipeline."""
    img = img.astype(np.float32)
    return (img - img.mean()) / max(float(img.std()), 1e-6)


def pad_to_multiple(img: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad bottom/right with edge values to a multiple; returns the original size."""
    h, w = img.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(img, ((0, ph), (0, pw)), mode="edge"), (h, w)


def segment_slices(run, images: np.ndarray, spacing: tuple[float, float], target: float,
                   batch: int = 8) -> np.ndarray:
    """Pipeline emulation: resample, z-score, pad, infer, argmax, crop, resample back (nearest).

    ``run`` maps a float32 (N, 1, H, W) array to logits (N, 4, H, W).
    """
    out = np.empty(images.shape, np.uint8)
    prepped = []
    for img in images:
        r = zscore(resample(img, spacing, target, cv2.INTER_LINEAR))
        prepped.append(pad_to_multiple(r, SIZE_MULTIPLE))
    for start in range(0, len(prepped), batch):
        chunk = prepped[start:start + batch]
        x = np.stack([c[0] for c in chunk])[:, None]
        logits = run(x)
        for i, (_, (h, w)) in enumerate(chunk):
            lab = logits[i].argmax(0)[:h, :w].astype(np.uint8)
            out[start + i] = cv2.resize(lab, (images.shape[2], images.shape[1]),
                                        interpolation=cv2.INTER_NEAREST_EXACT)
    return out


# ----------------------------------------------------------------------------- data
def build_training_set(seed: int, n_studies: int, n_phases: int, target: float,
                       window: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows (N, window, window) of z-scored resampled slices and their labels.

    Z-scoring happens on the whole resampled slice before windowing, so the
    statistics match what the pipeline computes at inference.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n_studies):
        st = make_cine(rng, n_slices=10, n_phases=n_phases, size=256)
        for p in range(n_phases):
            for k in range(st.images.shape[1]):
                img = zscore(resample(st.images[p, k], st.pixel_spacing_mm, target, cv2.INTER_LINEAR))
                lab = resample(st.labels[p, k], st.pixel_spacing_mm, target, cv2.INTER_NEAREST_EXACT)
                f = st.pixel_spacing_mm[0] / target
                cy, cx = st.heart_center_px[0] * f, st.heart_center_px[1] * f
                # Off-centre windows so the net also learns the chest periphery.
                cy += rng.uniform(-0.35, 0.35) * window
                cx += rng.uniform(-0.35, 0.35) * window
                xs.append(_window(img, cy, cx, window, float(img.min())).astype(np.float16))
                ys.append(_window(lab, cy, cx, window, 0))
    return np.stack(xs), np.stack(ys)


def _window(img: np.ndarray, cy: float, cx: float, size: int, fill: float) -> np.ndarray:
    out = np.full((size, size), fill, img.dtype)
    h, w = img.shape
    y0, x0 = round(cy) - size // 2, round(cx) - size // 2
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(h, y0 + size), min(w, x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


# ---------------------------------------------------------------------------- train
def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def train(model: UNet, xs: np.ndarray, ys: np.ndarray, steps: int, batch: int, crop: int,
          lr: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    win = xs.shape[1]
    losses = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = rng.integers(0, len(xs), batch)
        oy = rng.integers(0, win - crop + 1, batch)
        ox = rng.integers(0, win - crop + 1, batch)
        xb = np.stack([xs[i, y:y + crop, x:x + crop] for i, y, x in zip(idx, oy, ox, strict=False)])
        yb = np.stack([ys[i, y:y + crop, x:x + crop] for i, y, x in zip(idx, oy, ox, strict=False)])
        # Mild intensity jitter on the normalised input: gamma-free scale and offset.
        xb = xb.astype(np.float32) * rng.uniform(0.9, 1.1, (batch, 1, 1)).astype(np.float32) \
            + rng.uniform(-0.1, 0.1, (batch, 1, 1)).astype(np.float32)
        x = torch.from_numpy(xb[:, None])
        y = torch.from_numpy(yb.astype(np.int64))
        logits = model(x)
        loss = F.cross_entropy(logits, y) + dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps} loss {np.mean(losses[-50:]):.4f} "
                  f"{time.time() - t0:6.0f}s", flush=True)
    model.eval()
    return losses


# --------------------------------------------------------------------------- export
def export_onnx(model: UNet, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, 128, 128)
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["input"], output_names=["output"],
        opset_version=17, dynamo=False,
        dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "output": {0: "N", 2: "H", 3: "W"}},
    )


def verify_onnx(model: UNet, path: Path, seed: int) -> float:
    """Max |ORT - torch| over a 256x256 and a non-square input."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in ((2, 1, 256, 256), (1, 1, 192, 272)):
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["output"], {"input": x})[0]
        if got.shape != (shape[0], 4, shape[2], shape[3]):
            raise RuntimeError(f"ONNX output shape {got.shape} for input {shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > 1e-3:
        raise RuntimeError(f"ONNX and torch disagree: max abs diff {worst}")
    return worst




# ------------------------------------------------------------------------- evaluate
def evaluate(onnx_path: Path, seed: int, n_studies: int, n_phases: int, target: float) -> dict:
    """Held-out evaluation of the whole pipeline path against phantom truth."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    run = lambda x: sess.run(["output"], {"input": x})[0]
    rng = np.random.default_rng(seed)
    per = {name: {"dice": [], "hd95": []} for name in STRUCTURES.values()}
    errs = {"lvedv": [], "lvesv": [], "lvef": [], "rvedv": [], "rvesv": [], "rvef": [], "lv_mass": []}
    missed = {name: 0 for name in STRUCTURES.values()}
    for _ in range(n_studies):
        st = make_cine(rng, n_slices=10, n_phases=n_phases, size=256)
        P, S, H, W = st.images.shape
        pred = segment_slices(run, st.images.reshape(P * S, H, W), st.pixel_spacing_mm,
                              target).reshape(P, S, H, W)
        for p in range(P):
            for k in range(S):
                for value, name in STRUCTURES.items():
                    t = st.labels[p, k] == value
                    if not t.any():
                        continue
                    q = pred[p, k] == value
                    per[name]["dice"].append(dice(q, t))
                    if q.any():
                        per[name]["hd95"].append(hausdorff95(q, t, st.pixel_spacing_mm))
                    else:
                        missed[name] += 1
        m = cardiac_metrics(pred, st.pixel_spacing_mm, st.slice_spacing_mm)
        errs["lvedv"].append(abs(m.lvedv_ml - st.lvedv_ml))
        errs["lvesv"].append(abs(m.lvesv_ml - st.lvesv_ml))
        errs["lvef"].append(abs(m.lvef_pct - st.lvef_pct))
        errs["rvedv"].append(abs(m.rvedv_ml - st.rvedv_ml))
        errs["rvesv"].append(abs(m.rvesv_ml - st.rvesv_ml))
        errs["rvef"].append(abs((m.rvef_pct or 0.0) - st.rvef_pct))
        errs["lv_mass"].append(abs(m.lv_mass_g - st.lv_mass_g))
        print(f"  held-out study: LVEF true {st.lvef_pct:5.1f} pred {m.lvef_pct:5.1f}  "
              f"LVEDV {st.lvedv_ml:6.1f}/{m.lvedv_ml:6.1f}", flush=True)
    r3 = lambda v: round(float(v), 3)
    return {
        "dice": {n: r3(np.mean(v["dice"])) for n, v in per.items()},
        "hd95_mm": {n: r3(np.mean(v["hd95"])) for n, v in per.items()},
        "slices_with_structure": {n: len(v["dice"]) for n, v in per.items()},
        "slices_structure_missed": missed,
        "mae": {
            "lvedv_ml": r3(np.mean(errs["lvedv"])), "lvesv_ml": r3(np.mean(errs["lvesv"])),
            "lvef_pct": r3(np.mean(errs["lvef"])), "rvedv_ml": r3(np.mean(errs["rvedv"])),
            "rvesv_ml": r3(np.mean(errs["rvesv"])), "rvef_pct": r3(np.mean(errs["rvef"])),
            "lv_mass_g": r3(np.mean(errs["lv_mass"])),
        },
    }


# ------------------------------------------------------------------------ manifest
def write_manifest(args: argparse.Namespace, digest: str, quality: dict, wall_s: float,
                   n_images: int, onnx_diff: float, n_params: int) -> None:
    sct_anat = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}
    manifest = {
        "name": "cardiac_seg",
        "version": "1.0.0",
        "family": {"scheme": "DCM", "value": "123110", "meaning": "Artificial Intelligence"},
        "description": (
            "2D U-Net segmenting LV cavity, LV myocardium and RV cavity on cardiac MRI "
            "short-axis cine slices; trained on synthetic phantoms."),
        "intended_use": (
            "Reference model trained only on synthetic phantoms, for validating the "
            "dicom-node cardiac pipeline end to end. Not for clinical use; its numbers "
            "on real patient images are unknown."),
        "onnx": "cardiac_seg.onnx",
        "sha256": digest,
        "task": "segmentation",
        "inputs": [{"name": "input", "shape": [None, 1, None, None], "dtype": "float32",
                    "layout": "NCHW"}],
        "outputs": [{"name": "output", "shape": [None, 4, None, None], "dtype": "float32",
                     "layout": "NCHW"}],
        "normalization": {"kind": "zscore"},
        "geometry": {"fit": "dynamic", "size_multiple": SIZE_MULTIPLE,
                     "pixel_spacing_mm": [args.spacing, args.spacing]},
        "segmentation": {
            "output_kind": "logits",
            "labels": [
                {"value": 1, "name": "LV cavity", "category": sct_anat,
                 "type": {"scheme": "SCT", "value": "87878005", "meaning": "Left ventricle"}},
                {"value": 2, "name": "LV myocardium", "category": sct_anat,
                 "type": {"scheme": "SCT", "value": "49848007",
                          "meaning": "Left Ventricle Myocardium"}},
                {"value": 3, "name": "RV cavity", "category": sct_anat,
                 "type": {"scheme": "SCT", "value": "53085002", "meaning": "Right ventricle"}},
            ],
        },
        "quality": {
            "heldout": {"kind": "synthetic cardiac_phantom.make_cine", "seed": args.heldout_seed,
                        "studies": args.heldout_studies, "phases": args.heldout_phases,
                        "slices_per_study": 10, "size": 256},
            "evaluated_path": ("resample to pixel_spacing_mm (linear), zscore, pad to "
                               "size_multiple, argmax, resample back (nearest), native grid"),
            "dice": quality["dice"],
            "hd95_mm": quality["hd95_mm"],
            "dice_hd95_note": ("mean over held-out slices where the structure is present in "
                               "truth; HD95 excludes slices where the model found none "
                               "(counted in slices_structure_missed)"),
            "slices_with_structure": quality["slices_with_structure"],
            "slices_structure_missed": quality["slices_structure_missed"],
            "mae": quality["mae"],
            "onnx_vs_torch_max_abs_diff": float(f"{onnx_diff:.3g}"),
        },
        "training": {
            "recipe": "models_onnx/recipes/cardiac_seg/train.py",
            "command": f"python models_onnx/recipes/cardiac_seg/train.py --threads {args.threads}",
            "seed": args.seed,
            "data": (f"{args.train_studies} synthetic short-axis cine studies "
                     f"(dicom_node_synthetic.cardiac_phantom, seed {args.seed}), 10 slices x "
                     f"{args.train_phases} phases, 256x256 at 1.2-1.8 mm; {n_images} slices "
                     f"resampled to {args.spacing} mm, {args.window}px windows, "
                     f"{args.crop}px random crops"),
            "model": f"2D U-Net widths {list(WIDTHS)}, "
                     f"{n_params} parameters, BatchNorm, 4 poolings",
            "loss": "cross-entropy + soft Dice (classes 1-3)",
            "optimizer": f"AdamW one-cycle lr {args.lr}, {args.steps} steps x batch {args.batch}",
            "wall_time_s": round(wall_s, 1),
            "threads": args.threads,
            "torch": str(torch.__version__),
        },
    }
    OUT_YAML.write_text(
        "# Written by models_onnx/recipes/cardiac_seg/train.py - do not edit by hand.\n"
        + yaml.safe_dump(manifest, sort_keys=False, width=100), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--train-studies", type=int, default=40)
    ap.add_argument("--train-phases", type=int, default=8)
    ap.add_argument("--spacing", type=float, default=1.5)
    ap.add_argument("--window", type=int, default=192)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--heldout-seed", type=int, default=777001)
    ap.add_argument("--heldout-studies", type=int, default=6)
    ap.add_argument("--heldout-phases", type=int, default=12)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    torch.manual_seed(args.seed)
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    xs, ys = build_training_set(args.seed, args.train_studies, args.train_phases, args.spacing,
                                args.window)
    print(f"training set {xs.shape} built in {time.time() - t_start:.0f}s", flush=True)
    model = UNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"U-Net parameters: {n_params}", flush=True)
    losses = train(model, xs, ys, args.steps, args.batch, args.crop, args.lr, args.seed)
    torch.save(model.state_dict(), WORK / "cardiac_seg.pt")
    export_onnx(model, OUT_ONNX)
    diff = verify_onnx(model, OUT_ONNX, args.seed)
    wall = time.time() - t_start
    print(f"exported {OUT_ONNX} ({OUT_ONNX.stat().st_size / 1e6:.2f} MB), ort-torch diff {diff:.2e}; "
          f"train wall {wall:.0f}s", flush=True)
    quality = evaluate(OUT_ONNX, args.heldout_seed, args.heldout_studies, args.heldout_phases,
                       args.spacing)
    print(json.dumps(quality, indent=1), flush=True)
    write_manifest(args, sha256_of(OUT_ONNX), quality, wall, len(xs), diff, n_params)
    (WORK / "losses.json").write_text(json.dumps(losses))
    print(f"wrote {OUT_YAML}; total {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
