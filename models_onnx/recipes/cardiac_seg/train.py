"""Train the reference cardiac short-axis segmentation model on synthetic phantoms.

Reproducible end to end from one seed: generates phantoms
(:mod:`dicom_node_synthetic.cardiac_phantom`, most of them from its widened
``make_cine_randomised`` with a random acquisition per slice), trains a small
2D U-Net at a fixed pixel spacing with per-image z-score normalisation,
exports ONNX (opset 17, dynamic N/H/W), checks onnxruntime against torch,
evaluates the node's own segmentation path on two held-out sets (the training
generator, and the independently designed
:mod:`dicom_node_synthetic.independent.cardiac`, never trained on) and writes
``models_onnx/cardiac_seg.onnx`` and ``models_onnx/cardiac_seg.yaml``.

Run from the repository root:
    python models_onnx/recipes/cardiac_seg/train.py [--threads N] [--out-dir DIR]
    python models_onnx/recipes/cardiac_seg/train.py --evaluate-only MANIFEST
    python models_onnx/recipes/cardiac_seg/train.py --rewrite-quality MANIFEST
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

from dicom_node.infer.engine import OnnxModel, sha256_of
from dicom_node.infer.runner import segment
from dicom_node.pipelines.cardiac_metrics import cardiac_metrics, dice, dice_ed_es, hausdorff95
from dicom_node_synthetic.cardiac_phantom import make_cine, make_cine_randomised
from dicom_node_synthetic.independent.cardiac import make_independent_cine

RECIPE = Path(__file__).resolve().parent
WORK = RECIPE / "work"
OUT_DIR = REPO / "models_onnx"
SIZE_MULTIPLE = 16  # four 2x poolings
STRUCTURES = {1: "lv_cavity", 2: "lv_myocardium", 3: "rv_cavity"}
WIDTHS = (8, 16, 32, 64, 96)
# Result UIDs derive from the version: bump it whenever the weights change.
VERSION = "1.2.0"


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


# ----------------------------------------------------------------------------- data
def build_training_set(seed: int, n_studies: int, n_phases: int, target: float,
                       window: int, plain_fraction: float, thin_rv_fraction: float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Windows (N, window, window) of z-scored resampled slices and their labels.

    A ``plain_fraction`` of the studies come from the default generator and are
    only resampled; the others from its widened subject ranges
    (``make_cine_randomised``, the last ``thin_rv_fraction`` of all studies with
    its thin apical RV option) and each slice gets its own random acquisition
    (:func:`augment`).  Z-scoring happens on the whole resampled slice before
    windowing, so the statistics match what the pipeline computes at inference.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    n_plain = round(n_studies * plain_fraction)
    first_thin = n_studies - round(n_studies * thin_rv_fraction)
    for i in range(n_studies):
        plain = i < n_plain
        if plain:
            st = make_cine(rng, n_slices=10, n_phases=n_phases, size=256)
        else:
            st = make_cine_randomised(rng, n_slices=10, n_phases=n_phases, size=256,
                                      thin_rv=i >= first_thin)
        for p in range(n_phases):
            for k in range(st.images.shape[1]):
                if plain:
                    img = resample(st.images[p, k], st.pixel_spacing_mm, target, cv2.INTER_LINEAR)
                    lab = resample(st.labels[p, k], st.pixel_spacing_mm, target,
                                   cv2.INTER_NEAREST_EXACT)
                    f = st.pixel_spacing_mm[0] / target
                    cy, cx = st.heart_center_px[0] * f, st.heart_center_px[1] * f
                else:
                    img, lab, (cy, cx) = augment(rng, st.images[p, k], st.labels[p, k],
                                                 st.pixel_spacing_mm[0], target, st.heart_center_px)
                img = zscore(img)
                # Off-centre windows so the net also learns the chest periphery.
                cy += rng.uniform(-0.35, 0.35) * window
                cx += rng.uniform(-0.35, 0.35) * window
                xs.append(_window(img, cy, cx, window, float(img.min())).astype(np.float16))
                ys.append(_window(lab, cy, cx, window, 0))
    return np.stack(xs), np.stack(ys)


def augment(rng: np.random.Generator, img: np.ndarray, lab: np.ndarray, spacing: float,
            target: float, centre: tuple[float, float]
            ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """One random acquisition of a native slice, resampled to ``target`` mm.

    Field of view (a random sub-rectangle, which also changes the z-score
    statistics), in-plane rotation over the full circle and mirroring, zoom and
    anisotropic stretch (heart size, oblique sections), blur or k-space
    truncation with ringing, coil shading, gamma (tissue contrast) and added
    magnitude noise.  Returns image, labels and the heart centre on the new grid.
    """
    h, w = img.shape
    cy, cx = centre
    # Field of view: keep the heart, crop 0-40 % of each side's remaining extent.
    top, left = int(rng.uniform(0, 0.4) * max(0, cy - 60)), int(rng.uniform(0, 0.4) * max(0, cx - 60))
    bottom = h - int(rng.uniform(0, 0.4) * max(0, h - cy - 60))
    right = w - int(rng.uniform(0, 0.4) * max(0, w - cx - 60))
    img, lab = img[top:bottom, left:right], lab[top:bottom, left:right]
    cy, cx = cy - top, cx - left
    h, w = img.shape
    zoom = float(np.exp(rng.uniform(np.log(0.72), np.log(1.35))))
    stretch = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    base = spacing / target
    nh, nw = max(32, round(h * base)), max(32, round(w * base))
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    # Linear part: rotate, stretch along x, zoom, resample to target; about the heart centre.
    lin = base * zoom * np.array([[c, -s], [s, c]]) @ np.diag([stretch, 1.0 / stretch]) \
        @ np.array([[c, s], [-s, c]])
    if rng.random() < 0.5:
        lin = lin @ np.diag([-1.0, 1.0])
    src = np.array([cx, cy])
    dst = np.array([cx * base, cy * base])
    m = np.hstack([lin, (dst - lin @ src)[:, None]]).astype(np.float64)
    pre = img
    if rng.random() < 0.5:
        pre = _truncate_kspace(rng, img)
    elif rng.random() < 0.5:
        pre = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 1.3)))
    out = cv2.warpAffine(pre, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0.0)
    lab_out = cv2.warpAffine(lab, m, (nw, nh), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = np.maximum(out, 0.0)
    scale = float(np.percentile(out, 99.5)) or 1.0
    out = out / scale
    # Coil shading: a smooth log-field, stronger than the generator's.
    field = cv2.resize(rng.standard_normal((4, 4)).astype(np.float32), (nw, nh),
                       interpolation=cv2.INTER_CUBIC)
    out = out * np.exp(rng.uniform(0.0, 0.45) * field)
    out = np.power(np.maximum(out, 0.0), float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))))
    sigma = float(rng.uniform(0.0, 0.08))
    if sigma > 0:
        n = rng.standard_normal((2, nh, nw)).astype(np.float32) * sigma
        out = np.sqrt((out + n[0]) ** 2 + n[1] ** 2)
    return out.astype(np.float32), lab_out, (float(dst[1]), float(dst[0]))


def _truncate_kspace(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Keep the central 45-95 % of k-space per axis: lower resolution with Gibbs ringing."""
    h, w = img.shape
    k = np.fft.fftshift(np.fft.fft2(img))
    kh, kw = int(h * rng.uniform(0.45, 0.95)) // 2, int(w * rng.uniform(0.45, 0.95)) // 2
    mask = np.zeros((h, w), bool)
    mask[h // 2 - kh:h // 2 + kh, w // 2 - kw:w // 2 + kw] = True
    return np.abs(np.fft.ifft2(np.fft.ifftshift(k * mask))).astype(np.float32)


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


def rv_tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3,
                    beta: float = 0.7) -> torch.Tensor:
    """Soft Tversky loss of the RV class per image, over the images whose crop holds RV.

    Per image, so a thin apical crescent counts as much as a basal RV; beta > alpha
    costs a missed RV pixel more than a spurious one (the misses are what fail).
    """
    rv = (target == 3).float()
    present = rv.sum((1, 2)) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    prob = logits.softmax(1)[:, 3]
    tp = (prob * rv).sum((1, 2))
    fn = ((1.0 - prob) * rv).sum((1, 2))
    fp = (prob * (1.0 - rv)).sum((1, 2))
    tversky = (tp + 1.0) / (tp + alpha * fp + beta * fn + 1.0)
    return 1.0 - tversky[present].mean()


def small_rv_weights(ys: np.ndarray, max_px: int, weight: float) -> np.ndarray | None:
    """Sampling weights: windows whose RV is present but under ``max_px`` pixels get
    ``weight``, the rest 1 (None: uniform)."""
    if weight == 1.0:
        return None
    rv_px = (ys == 3).sum((1, 2))
    w = np.where((rv_px > 0) & (rv_px < max_px), weight, 1.0)
    return w / w.sum()


def train(model: UNet, xs: np.ndarray, ys: np.ndarray, steps: int, batch: int, crop: int,
          lr: float, seed: int, rv_tversky: float = 0.0,
          sample_p: np.ndarray | None = None) -> list[float]:
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    win = xs.shape[1]
    losses = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = rng.integers(0, len(xs), batch) if sample_p is None else \
            rng.choice(len(xs), batch, p=sample_p)
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
        if rv_tversky:
            loss = loss + rv_tversky * rv_tversky_loss(logits, y)
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
FAMILIES = {
    "training_family": "dicom_node_synthetic.cardiac_phantom.make_cine (the training generator's "
                       "default ranges, unseen seed)",
    "independent_family": "dicom_node_synthetic.independent.cardiac.make_independent_cine "
                          "(separately designed shapes, bSSFP intensities, multi-coil k-space "
                          "noise; never trained on)",
}


def _draw_study(family: str, rng: np.random.Generator, n_phases: int):
    if family == "training_family":
        return make_cine(rng, n_slices=10, n_phases=n_phases, size=256)
    return make_independent_cine(rng, n_phases=n_phases)


def evaluate(manifest_path: Path, family: str, seed: int, n_studies: int, n_phases: int,
             threads: int) -> dict:
    """Held-out evaluation through the node's own segmentation path against phantom truth.

    ``dicom_node.infer.runner.segment`` does what the pipeline does with the
    manifest (resample, normalise, pad, softmax, argmax, resample back), so the
    figures are the pipeline's, not an emulation's.
    """
    model = OnnxModel.load(manifest_path, intra_op_threads=threads)
    rng = np.random.default_rng(seed)
    per = {name: {"dice": [], "hd95": [], "ed": [], "es": []} for name in STRUCTURES.values()}
    missed = {name: 0 for name in STRUCTURES.values()}
    keys = ("lvedv", "lvesv", "lvef", "rvedv", "rvesv", "rvef", "lv_mass")
    errs: dict[str, list[float]] = {k: [] for k in keys}
    rel: dict[str, list[float]] = {k: [] for k in ("lvedv", "lvesv", "lv_mass")}
    for _ in range(n_studies):
        st = _draw_study(family, rng, n_phases)
        P, S, H, W = st.images.shape
        pred = segment(st.images.reshape(P * S, H, W), st.pixel_spacing_mm, model,
                       8).reshape(P, S, H, W)
        for value, name in STRUCTURES.items():
            d_ed, d_es = dice_ed_es(pred, st.labels, value, st.ed_phase, st.es_phase)
            per[name]["ed"].append(d_ed)
            per[name]["es"].append(d_es)
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
        got = {"lvedv": m.lvedv_ml, "lvesv": m.lvesv_ml, "lvef": m.lvef_pct, "rvedv": m.rvedv_ml,
               "rvesv": m.rvesv_ml, "rvef": m.rvef_pct or 0.0, "lv_mass": m.lv_mass_g}
        true = {"lvedv": st.lvedv_ml, "lvesv": st.lvesv_ml, "lvef": st.lvef_pct,
                "rvedv": st.rvedv_ml, "rvesv": st.rvesv_ml, "rvef": st.rvef_pct,
                "lv_mass": st.lv_mass_g}
        for k in keys:
            errs[k].append(float(got[k] - true[k]))
        for k in rel:
            rel[k].append(float(got[k] / true[k] - 1.0))
        print(f"  {family}: LVEDV {true['lvedv']:6.1f}/{got['lvedv']:6.1f} "
              f"LVESV {true['lvesv']:6.1f}/{got['lvesv']:6.1f} "
              f"LVEF {true['lvef']:5.1f}/{got['lvef']:5.1f} "
              f"mass {true['lv_mass']:5.0f}/{got['lv_mass']:5.0f}", flush=True)
    r3 = lambda v: round(float(v), 3)
    edv_ok = np.abs(rel["lvedv"]) <= 0.10
    esv_ok = np.abs(rel["lvesv"]) <= 0.10
    ef_ok = np.abs(errs["lvef"]) <= 5.0
    return {
        "kind": FAMILIES[family], "seed": seed, "studies": n_studies, "phases": n_phases,
        # ACDC 2017 / M&Ms convention: per study, per phase (reference ED and ES), over the
        # 3D volume, then the mean over studies; issue 17's Dice target is read on this.
        "dice_3d_ed_es": {n: r3(np.mean(v["ed"] + v["es"])) for n, v in per.items()},
        "dice_3d_ed": {n: r3(np.mean(v["ed"])) for n, v in per.items()},
        "dice_3d_es": {n: r3(np.mean(v["es"])) for n, v in per.items()},
        # Between-study spread of the per-study ED/ES mean: the tests size their tolerance on it.
        "dice_3d_ed_es_study_sd": {n: r3(np.std((np.array(v["ed"]) + np.array(v["es"])) / 2,
                                                ddof=1)) for n, v in per.items()},
        "dice_2d_slice_mean": {n: r3(np.mean(v["dice"])) for n, v in per.items()},
        "hd95_mm": {n: r3(np.mean(v["hd95"])) for n, v in per.items()},
        "slices_with_structure": {n: len(v["dice"]) for n, v in per.items()},
        "slices_structure_missed": missed,
        "mae": {f"{k}_{'pct' if k.endswith('ef') else 'g' if k == 'lv_mass' else 'ml'}":
                r3(np.mean(np.abs(v))) for k, v in errs.items()},
        "mean_error_pct": {f"{k}": r3(100 * np.mean(v)) for k, v in rel.items()},
        "mean_abs_error_pct": {f"{k}": r3(100 * np.mean(np.abs(v))) for k, v in rel.items()},
        "fraction_of_studies": {
            "lvedv_within_10pct": r3(edv_ok.mean()), "lvesv_within_10pct": r3(esv_ok.mean()),
            "lvef_within_5_points": r3(ef_ok.mean()),
            "all_three": r3((edv_ok & esv_ok & ef_ok).mean()),
        },
    }


# ------------------------------------------------------------------------ manifest
def previous_figures(manifest_path: Path, args: argparse.Namespace) -> dict:
    """An earlier model measured on the same held-out sets (same seeds), for ``--compare``."""
    raw = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    figures = evaluate_both(manifest_path, args)
    keep = ("dice_3d_ed_es", "dice_3d_ed", "dice_3d_es", "dice_2d_slice_mean",
            "slices_structure_missed", "mae", "fraction_of_studies")
    return {"version": raw["version"], "sha256": raw["sha256"],
            "how": "measured by --compare in the same run, on the same held-out studies, "
                   "through the same segmentation path",
            **{family: {k: fig[k] for k in keep} for family, fig in figures.items()}}


def quality_section(quality: dict, onnx_diff: float, previous: dict | None = None) -> dict:
    """The manifest's ``quality``: both families' figures from :func:`evaluate_both`."""
    extra = {"previous_model": previous} if previous else {}
    return {
        "evaluated_path": ("dicom_node.infer.runner.segment, as the pipeline runs it: resample "
                           "to pixel_spacing_mm, zscore, pad to size_multiple, softmax, argmax, "
                           "resample back (nearest), native grid"),
        "note": ("synthetic phantoms only; these figures say nothing about patient images. "
                 "dice_3d_ed_es: Dice per study and structure over the whole stack at the "
                 "reference ED and at ES, averaged over both phases and all studies (the "
                 "ACDC 2017 / M&Ms convention; dice_3d_ed and dice_3d_es per phase, "
                 "dice_3d_ed_es_study_sd the SD over studies of each study's ED/ES mean). "
                 "dice_2d_slice_mean and hd95_mm: mean over held-out slices (all phases) "
                 "where the structure is present in truth; HD95 excludes slices where the "
                 "model found none (counted in slices_structure_missed). "
                 "fraction_of_studies: share of studies whose LVEDV and LVESV are within "
                 "10 % and LVEF within 5 points of truth"),
        # The training family's figures stay at the top level: tests and docs read them.
        "dice_3d_ed_es": quality["training_family"]["dice_3d_ed_es"],
        "dice_2d_slice_mean": quality["training_family"]["dice_2d_slice_mean"],
        "mae": quality["training_family"]["mae"],
        "training_family": quality["training_family"],
        "independent_family": quality["independent_family"],
        "onnx_vs_torch_max_abs_diff": float(f"{onnx_diff:.3g}"),
        **extra,
    }


def write_manifest(args: argparse.Namespace, digest: str, quality: dict, wall_s: float,
                   n_images: int, onnx_diff: float, n_params: int,
                   previous: dict | None = None) -> None:
    sct_anat = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}
    manifest = {
        "name": "cardiac_seg",
        "version": VERSION,
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
                # color_rgb: the recommended display colour (SEG and capture).
                {"value": 1, "name": "LV cavity", "category": sct_anat,
                 "type": {"scheme": "SCT", "value": "87878005", "meaning": "Left ventricle"},
                 "color_rgb": [255, 64, 64]},
                {"value": 2, "name": "LV myocardium", "category": sct_anat,
                 "type": {"scheme": "SCT", "value": "49848007",
                          "meaning": "Left Ventricle Myocardium"},
                 "color_rgb": [64, 220, 64]},
                {"value": 3, "name": "RV cavity", "category": sct_anat,
                 "type": {"scheme": "SCT", "value": "53085002", "meaning": "Right ventricle"},
                 "color_rgb": [64, 128, 255]},
            ],
        },
        "quality": quality_section(quality, onnx_diff, previous) if quality else {},
        "training": {
            "recipe": "models_onnx/recipes/cardiac_seg/train.py",
            "command": f"python models_onnx/recipes/cardiac_seg/train.py --threads {args.threads}",
            "seed": args.seed,
            "data": (f"{args.train_studies} synthetic short-axis cine studies, 10 slices x "
                     f"{args.train_phases} phases, 256x256 at 1.2-1.8 mm (seed {args.seed}): "
                     f"{round(100 * args.plain_fraction)} % from "
                     "dicom_node_synthetic.cardiac_phantom.make_cine as is, the rest from "
                     "make_cine_randomised (wall thickness 4-16 mm, LV radius 15-35 mm, "
                     "eccentricity, RV size and extent, LVEF 20-80 %, apical coverage to a "
                     "myocardium-only cap, every tissue intensity with blood/myocardium 1.3-10x, "
                     "noise 1-12 %"
                     + (f"; the last {round(100 * args.thin_rv_fraction)} % of all studies with "
                        "thin_rv: the RV drawn down to 2-20 % of its basal profile and 0.55-1.0 "
                        "as deep, for thin apical and systolic crescents"
                        if args.thin_rv_fraction else "")
                     + ") with a random acquisition per slice: field of view, "
                     "full-circle rotation and mirroring, zoom 0.72-1.35, stretch 0.8-1.25 "
                     "(oblique sections), blur or k-space truncation with ringing, coil shading, "
                     "gamma 0.6-1.6, added Rician noise; "
                     f"{n_images} slices resampled to {args.spacing} mm, {args.window}px windows, "
                     f"{args.crop}px random crops. The independent family is never trained on"),
            "model": f"2D U-Net widths {list(WIDTHS)}, "
                     f"{n_params} parameters, BatchNorm, 4 poolings",
            "loss": "cross-entropy + soft Dice (classes 1-3)"
                    + (f" + {args.rv_tversky} x per-image RV Tversky (alpha 0.3, beta 0.7)"
                       if args.rv_tversky else ""),
            "sampling": "uniform over windows" if args.small_rv_weight == 1.0 else
                        (f"windows with an RV under {args.small_rv_px} px drawn "
                         f"{args.small_rv_weight}x as often"),
            "optimizer": f"AdamW one-cycle lr {args.lr}, {args.steps} steps x batch {args.batch}",
            "wall_time_s": round(wall_s, 1),
            "threads": args.threads,
            "torch": str(torch.__version__),
        },
    }
    _write_yaml(args.out_dir / "cardiac_seg.yaml", manifest)


def _write_yaml(path: Path, manifest: dict) -> None:
    path.write_text("# Written by models_onnx/recipes/cardiac_seg/train.py - do not edit by hand.\n"
                    + yaml.safe_dump(manifest, sort_keys=False, width=100), encoding="utf-8")


def rewrite_quality(manifest_path: Path, args: argparse.Namespace) -> None:
    """Evaluate a shipped model again and replace only its manifest's ``quality``.

    The weights, version and training record stay as they are; the ONNX file's
    sha256 is checked against the manifest before and after.
    """
    raw = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    onnx = manifest_path.parent / raw["onnx"]
    if sha256_of(onnx) != raw["sha256"]:
        raise SystemExit(f"{onnx}: sha256 differs from {manifest_path}'s; not rewriting")
    quality = evaluate_both(manifest_path, args)
    raw["quality"] = quality_section(quality, raw["quality"]["onnx_vs_torch_max_abs_diff"])
    _write_yaml(manifest_path, raw)
    if sha256_of(onnx) != raw["sha256"]:
        raise SystemExit(f"{onnx}: sha256 changed during the evaluation")
    print(f"rewrote the quality of {manifest_path}; {onnx.name} sha256 {raw['sha256']} unchanged",
          flush=True)


def evaluate_both(manifest_path: Path, args: argparse.Namespace) -> dict:
    return {
        "training_family": evaluate(manifest_path, "training_family", args.heldout_seed,
                                    args.heldout_studies, args.heldout_phases, args.threads),
        "independent_family": evaluate(manifest_path, "independent_family",
                                       args.independent_seed, args.independent_studies,
                                       args.heldout_phases, args.threads),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--train-studies", type=int, default=64)
    ap.add_argument("--train-phases", type=int, default=6)
    ap.add_argument("--plain-fraction", type=float, default=0.25)
    ap.add_argument("--spacing", type=float, default=1.5)
    ap.add_argument("--window", type=int, default=192)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--thin-rv-fraction", type=float, default=0.2,
                    help="share of the studies drawn with make_cine_randomised(thin_rv=True)")
    ap.add_argument("--rv-tversky", type=float, default=0.0,
                    help="weight of a per-image RV Tversky loss term (0: none)")
    ap.add_argument("--small-rv-weight", type=float, default=1.0,
                    help="sampling weight of windows with a small RV (1: uniform)")
    ap.add_argument("--small-rv-px", type=int, default=150,
                    help="'small RV': present and under this many pixels at --spacing")
    ap.add_argument("--heldout-seed", type=int, default=777001)
    ap.add_argument("--heldout-studies", type=int, default=6)
    ap.add_argument("--heldout-phases", type=int, default=12)
    ap.add_argument("--independent-seed", type=int, default=880017)
    ap.add_argument("--independent-studies", type=int, default=30)
    ap.add_argument("--work-dir", type=Path, default=WORK,
                    help="checkpoint and losses (git ignores the default)")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR,
                    help="where cardiac_seg.onnx and .yaml go (trial runs: not models_onnx/)")
    ap.add_argument("--evaluate-only", type=Path, metavar="MANIFEST",
                    help="evaluate an existing model on both held-out sets and exit")
    ap.add_argument("--compare", type=Path, metavar="MANIFEST",
                    help="an earlier model (its ONNX beside it) to measure on the same held-out "
                         "sets in the same run, recorded as quality.previous_model")
    ap.add_argument("--rewrite-quality", type=Path, metavar="MANIFEST",
                    help="evaluate an existing model and rewrite only its manifest's quality")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.evaluate_only:
        print(json.dumps(evaluate_both(args.evaluate_only, args), indent=1), flush=True)
        return
    if args.rewrite_quality:
        rewrite_quality(args.rewrite_quality, args)
        return
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_onnx, out_yaml = args.out_dir / "cardiac_seg.onnx", args.out_dir / "cardiac_seg.yaml"
    t_start = time.time()

    xs, ys = build_training_set(args.seed, args.train_studies, args.train_phases, args.spacing,
                                args.window, args.plain_fraction, args.thin_rv_fraction)
    print(f"training set {xs.shape} built in {time.time() - t_start:.0f}s", flush=True)
    model = UNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"U-Net parameters: {n_params}", flush=True)
    losses = train(model, xs, ys, args.steps, args.batch, args.crop, args.lr, args.seed,
                   args.rv_tversky, small_rv_weights(ys, args.small_rv_px, args.small_rv_weight))
    torch.save(model.state_dict(), args.work_dir / "cardiac_seg.pt")
    export_onnx(model, out_onnx)
    diff = verify_onnx(model, out_onnx, args.seed)
    wall = time.time() - t_start
    print(f"exported {out_onnx} ({out_onnx.stat().st_size / 1e6:.2f} MB), ort-torch diff {diff:.2e}; "
          f"train wall {wall:.0f}s", flush=True)
    # Written once without figures so the node's loader (which checks the sha256) can run it.
    digest = sha256_of(out_onnx)
    write_manifest(args, digest, {}, wall, len(xs), diff, n_params)
    quality = evaluate_both(out_yaml, args)
    print(json.dumps(quality, indent=1), flush=True)
    previous = previous_figures(args.compare, args) if args.compare else None
    if previous:
        print(json.dumps(previous, indent=1), flush=True)
    write_manifest(args, digest, quality, wall, len(xs), diff, n_params, previous)
    (args.work_dir / "losses.json").write_text(json.dumps(losses))
    print(f"wrote {out_yaml}; total {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
