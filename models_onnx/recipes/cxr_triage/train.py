"""Train, export and document the reference chest X-ray normality triage model.

Reproduces ``models_onnx/cxr_triage.onnx`` and ``models_onnx/cxr_triage.yaml``
from synthetic radiographs (``dicom_node_synthetic.cxr_phantom``):

1. generate seeded train / validation / held-out test sets of the training
   family (80 % domain-randomised ``make_varied_radiograph``, half of those
   with rounded lungs, 20 % the narrow default ``make_radiograph``, all
   written as DX and read back by the
   pipeline's ``presentation``), half normal and half spread evenly over the
   five findings and two severities, at random sizes and aspect ratios,
   letterboxed and normalised exactly as the pipeline does (see
   ``letterbox`` and ``normalize``); plus two evaluation-only sets: the
   default phantom alone and the independent family
   (``dicom_node_synthetic.independent.cxr``);
2. train a small fully convolutional CNN whose last layer is a 1x1 "class
   activation" convolution: it gives an abnormality logit per location, the
   image logit is a smooth maximum (log-mean-exp) of that map, so the heat
   map is by construction what the decision was made from;
3. export to ONNX (opset 17) with outputs ``probability`` [N, 1] and
   ``heatmap`` [N, 1, 256, 256], check onnxruntime against torch;
4. choose the operating threshold on the validation set for >= 99 %
   sensitivity to abnormal, measure the three held-out sets (and, with
   ``--compare``, an earlier model on the same images), write the manifest.

Usage (from the repository root)::

    .venv/bin/python models_onnx/recipes/cxr_triage/train.py [--threads N]
        [--compare models_onnx/recipes/cxr_triage/work/previous/cxr_triage.yaml]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from dicom_node.pipelines.cxr_triage import presentation
from dicom_node_synthetic.cxr_phantom import (
    FINDINGS,
    SEVERITIES,
    make_radiograph,
    make_varied_radiograph,
)
from dicom_node_synthetic.cxr_physics import make_physics_radiograph
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.independent import cxr as independent

__all__ = ["ExportWrapper", "TriageNet", "letterbox", "main", "normalize"]

INPUT_SIZE = 256
WIDTHS = (16, 32, 48, 64)
# Sharpness of the log-mean-exp pooling: between mean (-> 0) and max (-> inf);
# a small nodule must be able to carry the image, a large effusion should not
# be needed to cover the whole map.
POOL_R = 4.0
# Split seeds: one generator per image, seeded (split_seed, index).  "test"
# is the held-out set of the training family, "default" the same images'
# seeds drawn from the narrow default phantom (the previous model's test set),
# "independent" the independently designed family (evaluation only).
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3, "default": 3, "independent": 4}
# Share of training-family images drawn from the narrow default phantom, so
# that the family contains it; the rest are domain-randomised.
DEFAULT_SHARE = 0.2
# Share of the domain-randomised images with rounded lungs and softer heart
# borders (make_varied_radiograph(rounded=True)); model 1.1.0, trained on
# slab-like lungs only, scored rounded normal lungs as abnormal.
ROUNDED_SHARE = 0.5
# Share of the domain-randomised images with a tilted, lower, irregular heart
# and cardiophrenic fat pads (make_varied_radiograph(shaped=True)), set by
# --shaped-share (the default here); 0 (the shipped model's family) draws nothing for it, so
# every image stays as it was.  Model 1.2.0 put its strongest false alarms
# on independently drawn normals in the cardiophrenic angles; 0.5 was tried
# and ranked the independent family worse (README).
SHAPED_SHARE = 0.0
# Share of the training family's images drawn from the second, physically
# modelled generator (dicom_node_synthetic.cxr_physics), set by
# --physics-share; 0 (the shipped model's family) draws nothing for it.
PHYSICS_SHARE = 0.0
# Cache prefix of the training-family splits: bumped whenever their images change.
FAMILY_DATA = "v2"
CHUNK = 2000
WEIGHT_DECAY = 5e-4
TARGET_SENSITIVITY = 0.99
# Abnormal cells are a few percent of the map; up-weight them in the map loss.
MAP_POS_WEIGHT = 5.0
RECIPE = "models_onnx/recipes/cxr_triage/train.py"


# --------------------------------------------------------------------------- data

def letterbox(image: np.ndarray, size: int = INPUT_SIZE,
              mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize keeping aspect ratio so the longer side is ``size``, pad centred.

    The pad is filled with the image minimum (air for MONOCHROME2), so it
    does not add a new intensity the normalisation has to account for.
    """
    rows, cols = image.shape
    f = size / max(rows, cols)
    new_r, new_c = max(1, round(rows * f)), max(1, round(cols * f))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image.astype(np.float32), (new_c, new_r), interpolation=interp)
    out = np.full((size, size), float(image.min()), dtype=np.float32)
    top, left = (size - new_r) // 2, (size - new_c) // 2
    out[top:top + new_r, left:left + new_c] = small
    boxed_mask = None
    if mask is not None:
        m = cv2.resize(mask.astype(np.uint8), (new_c, new_r),
                       interpolation=cv2.INTER_NEAREST)
        boxed_mask = np.zeros((size, size), dtype=bool)
        boxed_mask[top:top + new_r, left:left + new_c] = m > 0
    return out, boxed_mask


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Per-image percentile normalisation to [0, 1] (clipped), after letterboxing."""
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


@dataclass
class Split:
    """One generated data split at model resolution."""

    x: np.ndarray            # uint8 (n, 256, 256), normalised image * 255
    y: np.ndarray            # float32 (n,), 1 = abnormal
    finding: np.ndarray      # str (n,), "normal" or the finding
    severity: np.ndarray     # str (n,), "" for normal
    masks: np.ndarray        # bool (n, 256, 256), abnormality masks


def split_label(i: int) -> tuple[str | None, str]:
    """Balanced labels: even indices normal, odd ones cycle findings and severities."""
    if i % 2 == 0:
        return None, ""
    j = i // 2
    return FINDINGS[j % len(FINDINGS)], SEVERITIES[(j // len(FINDINGS)) % 2]


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """Image size: mostly near model size, some larger, portrait and landscape."""
    long_side = INPUT_SIZE if rng.random() < 0.6 else int(rng.integers(300, 513))
    aspect = rng.uniform(0.80, 1.25)          # rows / columns
    if aspect >= 1.0:
        return long_side, max(64, round(long_side / aspect))
    return max(64, round(long_side * aspect)), long_side


def as_presented(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The image as the node presents it after a trip through DICOM: stored
    at 10-16 bits, MONOCHROME1 half the time, with a VOI window that clips a
    little or not at all, then the pipeline's own ``presentation``."""
    bits = int(rng.choice([10, 12, 14, 16]))
    ds = dx_image(image, seed="recipe", monochrome1=bool(rng.random() < 0.5), bits=bits)
    if rng.random() < 0.6:
        stored = ds.pixel_array
        lo, hi = np.percentile(stored, [rng.uniform(0.0, 2.0), rng.uniform(98.0, 100.0)])
        width = max(float(hi - lo) * rng.uniform(1.0, 1.3), 2.0)
        ds.WindowCenter, ds.WindowWidth = round(float(lo + hi) / 2, 1), round(width, 1)
    return presentation(ds)


@dataclass(frozen=True)
class Family:
    """What the training family is drawn from, beyond the fixed shares."""

    shaped_share: float = SHAPED_SHARE
    physics_share: float = PHYSICS_SHARE

    def suffix(self) -> str:
        """Cache-name suffix; empty for the shipped model's family."""
        return ((f"-shaped{self.shaped_share:g}" if self.shaped_share > 0 else "")
                + (f"-physics{self.physics_share:g}" if self.physics_share > 0 else ""))


def make_split(seed: int, split: str, n: int, start: int = 0,
               family: Family = Family()) -> Split:
    """Generate a split; image i uses the generator seeded (seed, split id, i).

    "train", "val" and "test" draw from the training family (domain-randomised
    phantom, ``DEFAULT_SHARE`` of the narrow default one, all through DICOM);
    "default" is the narrow default phantom alone, as the first model was
    trained and tested on."""
    x = np.empty((n, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    masks = np.zeros((n, INPUT_SIZE, INPUT_SIZE), dtype=bool)
    y = np.zeros(n, dtype=np.float32)
    findings, severities = [], []
    for j in range(n):
        i = start + j
        finding, severity = split_label(i)
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], i])
        if split == "default":
            rad = make_radiograph(rng, finding, random_size(rng), severity or None)
            image = rad.image
        elif family.physics_share > 0 and rng.random() < family.physics_share:
            # Drawn first, from its own generator seeded apart, so that with
            # share 0 every other image stays exactly as it was.
            rad = make_physics_radiograph(np.random.default_rng([seed, SPLIT_SEEDS[split], i, 7]),
                                          finding, random_size(rng), severity or None)
            image = as_presented(rng, rad.image)
        else:
            if rng.random() >= DEFAULT_SHARE:
                rounded = bool(rng.random() < ROUNDED_SHARE)
                shaped = family.shaped_share > 0 and bool(rng.random() < family.shaped_share)
                rad = make_varied_radiograph(rng, finding, random_size(rng), severity or None,
                                             rounded=rounded, shaped=shaped)
            else:
                rad = make_radiograph(rng, finding, random_size(rng), severity or None)
            image = as_presented(rng, rad.image)
        img, m = letterbox(image, mask=rad.mask)
        x[j] = np.round(normalize(img) * 255.0).astype(np.uint8)
        masks[j] = m
        y[j] = float(finding is not None)
        findings.append(finding or "normal")
        severities.append(severity)
    return Split(x, y, np.array(findings), np.array(severities), masks)


def make_independent_split(seed: int, n: int) -> Split:
    """The independent family (evaluation only): even images normal, odd ones
    cycling its findings; each written as DICOM and presented by the node."""
    x = np.empty((n, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    masks = np.zeros((n, INPUT_SIZE, INPUT_SIZE), dtype=bool)
    y = np.zeros(n, dtype=np.float32)
    findings = []
    for i in range(n):
        finding = None if i % 2 == 0 else independent.FINDINGS[(i // 2) % len(independent.FINDINGS)]
        rng = np.random.default_rng([seed, SPLIT_SEEDS["independent"], i])
        rad = independent.make_independent_radiograph(rng, finding)
        img, m = letterbox(presentation(rad.dataset(str(i))), mask=rad.mask)
        x[i] = np.round(normalize(img) * 255.0).astype(np.uint8)
        masks[i] = m
        y[i] = float(rad.abnormal)
        findings.append(finding or "normal")
    return Split(x, y, np.array(findings), np.array([""] * n), masks)


def load_or_make(work: Path, seed: int, split: str, n: int,
                 family: Family = Family()) -> Split:
    """Cache generated splits in the work folder (keyed by seed, split and size);
    large splits are made and cached in chunks of ``CHUNK`` images, so a
    shorter run can reuse the first chunks of a longer one."""
    stem = _stem(split, seed, family)
    if n >= CHUNK and split != "independent":
        parts = [_cached(work / f"{stem}_{a}-{min(a + CHUNK, n)}.npz",
                         lambda a=a: make_split(seed, split, min(CHUNK, n - a), a, family))
                 for a in range(0, n, CHUNK)]
        return Split(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("x", "y", "finding", "severity", "masks")))
    make = ((lambda: make_independent_split(seed, n)) if split == "independent"
            else (lambda: make_split(seed, split, n, family=family)))
    return _cached(work / f"{stem}_n{n}.npz", make)


def is_cached(work: Path, seed: int, split: str, n: int, family: Family = Family()) -> bool:
    """Whether ``load_or_make`` will find the whole split in the cache."""
    stem = _stem(split, seed, family)
    if n >= CHUNK and split != "independent":
        return all((work / f"{stem}_{a}-{min(a + CHUNK, n)}.npz").exists()
                   for a in range(0, n, CHUNK))
    return (work / f"{stem}_n{n}.npz").exists()


def _stem(split: str, seed: int, family: Family = Family()) -> str:
    """Cache file stem; training-family splits carry ``FAMILY_DATA``."""
    if split in ("train", "val", "test"):
        return f"{split}_{FAMILY_DATA}{family.suffix()}_seed{seed}"
    return f"{split}_seed{seed}"


def _cached(path: Path, make: Callable[[], Split]) -> Split:
    if path.exists():
        d = np.load(path)
        return Split(d["x"], d["y"], d["finding"], d["severity"], d["masks"])
    s = make()
    np.savez_compressed(path, x=s.x, y=s.y, finding=s.finding, severity=s.severity,
                        masks=s.masks)
    return s


# --------------------------------------------------------------------------- model

def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TriageNet(nn.Module):
    """Small CNN: 2x input pooling, stride-16 features, dilated context, CAM head.

    The 256 px input is average-pooled to 128 px first: it quarters the cost
    (the recipe must train on two CPU cores) and the subtle findings of the
    phantom are still 2-3 px wide there.  Dilations 2-4-2 on the stride-16 map
    give a receptive field covering the whole image, which cardiomegaly (a
    ratio of two widths) needs.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (12, 24, 32, 48),
                 stem: int = 0) -> None:
        super().__init__()
        a, b, c, d = widths
        # stem > 0 (opt-in): a learned stride-2 3x3 conv with ``stem`` channels
        # on the full 256 px input instead of the fixed 2x average pooling,
        # so that what a subtle finding looks like at full resolution can
        # survive the first halving (a quarter to a third more training time
        # at the default widths on one CPU thread, see README).
        first = nn.AvgPool2d(2) if stem <= 0 else _cbr(1, stem, 2)
        self.features = nn.Sequential(
            first,
            _cbr(max(stem, 1), a, 2), _cbr(a, b, 2), _cbr(b, b), _cbr(b, c, 2),
            _cbr(c, c, 1, 2), _cbr(c, d, 1, 4), _cbr(d, d, 1, 2))
        self.cam = nn.Conv2d(d, 1, 1)

    def activation_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location abnormality logits, (N, 1, H/16, W/16)."""
        return self.cam(self.features(x))

    @staticmethod
    def pool(cam: torch.Tensor) -> torch.Tensor:
        """Image logit (N, 1): log-mean-exp of the activation map."""
        flat = cam.flatten(1) * POOL_R
        return (torch.logsumexp(flat, dim=1, keepdim=True)
                - math.log(flat.shape[1])) / POOL_R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.activation_map(x))


class ExportWrapper(nn.Module):
    """Graph as deployed: probability of abnormal and a [0, 1] heat map.

    heatmap = relu(upsampled activation map) / max(its maximum, 1): zero where
    the model sees no abnormality, 1 at the strongest evidence once that
    evidence is confident (local logit >= 1), so a normal image gives a
    near-empty map instead of amplified noise.

    With ``tta_flip`` the graph also runs the left-right mirror of each image
    and averages the two activation maps (the mirror's flipped back) before
    pooling, so the heat map is still exactly what the decision is pooled
    from; inputs and outputs are unchanged.
    """

    def __init__(self, net: TriageNet, tta_flip: bool = False) -> None:
        super().__init__()
        self.net = net
        self.tta_flip = tta_flip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = activation_map(self.net, x, self.tta_flip)
        probability = torch.sigmoid(self.net.pool(cam))
        up = F.interpolate(cam, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                           align_corners=False)
        up = torch.relu(up)
        peak = up.amax(dim=(2, 3), keepdim=True).clamp_min(1.0)
        return probability, up / peak


def activation_map(net: TriageNet, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """The activation map, or with ``tta_flip`` the mean of the image's and its
    left-right mirror's (flipped back), both in one batch."""
    if not tta_flip:
        return net.activation_map(x)
    n = x.shape[0]
    both = net.activation_map(torch.cat([x, x.flip(-1)], dim=0))
    return 0.5 * (both[:n] + both[n:].flip(-1))


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W) -> float32 (n, 1, H, W) in [0, 1]."""
    return torch.from_numpy(x).float().div_(255.0).unsqueeze(1)


def train(net: TriageNet, tr: Split, va: Split, epochs: int, batch: int, lr: float,
          seed: int, map_weight: float, style: bool = False) -> None:
    """AdamW with a one-cycle schedule; prints validation AUC per epoch.

    Loss = image-level BCE + ``map_weight`` * location-level BCE of the
    activation map against the abnormality mask (area fraction per stride-8
    cell; all zero for normal images).  The dense target is what makes a
    model this small learn in minutes, and it teaches the heat map to point
    at the finding rather than at whatever correlates with it.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(tr.y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    y_all = torch.from_numpy(tr.y)
    for epoch in range(epochs):
        net.train()
        t0, total = time.perf_counter(), 0.0
        order = torch.randperm(len(tr.y), generator=gen)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch].numpy()
            x = to_tensor(tr.x[idx])
            m = torch.from_numpy(tr.masks[idx]).float().unsqueeze(1)
            x, m = augment(x, m, gen)
            if style:
                x = restyle(x, gen)
            cam = net.activation_map(x)
            target = F.avg_pool2d(m, INPUT_SIZE // cam.shape[-1])
            loss = (F.binary_cross_entropy_with_logits(net.pool(cam).squeeze(1),
                                                       y_all[idx])
                    + map_weight * F.binary_cross_entropy_with_logits(
                        cam, target, pos_weight=torch.tensor(MAP_POS_WEIGHT)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        p = predict_torch(net, va.x)
        print(f"epoch {epoch + 1}/{epochs} loss {total / len(tr.y):.4f} "
              f"val AUC {auc(p, va.y):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)


def augment(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheap on-the-fly variation on top of the generated data, which costs
    ~50 ms an image to make: mirror images (a left-right flip keeps every
    label), a small random similarity transform (the pad stays the image's
    darkest value), and a random tone curve, because real exposure
    differences survive the percentile normalisation as a non-linear curve."""
    n = len(x)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    m = torch.where(flip[:, None, None, None], m.flip(-1), m)
    angle = (torch.rand(n, generator=gen) - 0.5) * math.radians(12.0)
    scale = 1.0 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    x = F.grid_sample(x - low, grid, align_corners=False) + low
    m = F.grid_sample(m, grid, align_corners=False)
    gamma = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.4, generator=gen)
    return x.clamp(1e-4, 1.0) ** gamma, m


def restyle(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rendering variation the generators cannot exhaust, drawn anew every
    epoch: edge enhancement or blur (unsharp mask of random amount and
    radius), white or correlated noise, a smooth gain field and a contrast
    stretch that clips differently.  Zero pixels (the letterbox pad and what
    the percentile normalisation clipped) stay zero, as at inference."""
    n = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=gen)

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, generator=gen) < p).float()

    zero = x <= 0.0
    radius = int(torch.randint(1, 4, (1,), generator=gen))
    base = F.avg_pool2d(x, 2 * radius + 1, 1, radius, count_include_pad=False)
    x = x + chance(0.6) * uniform(-0.7, 1.5) * (x - base)
    noise = torch.randn(x.shape, generator=gen)
    if bool(torch.rand(1, generator=gen) < 0.5):
        noise = 2.0 * F.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)
    x = x + chance(0.5) * uniform(0.0, 0.04) * noise
    field = F.interpolate(torch.randn(n, 1, 4, 4, generator=gen), size=x.shape[-2:],
                          mode="bilinear", align_corners=False)
    x = x * (1.0 + chance(0.5) * uniform(0.0, 0.12) * field)
    lo, hi = uniform(0.0, 0.06), uniform(0.94, 1.0)
    x = (x - lo) / (hi - lo)
    return x.clamp(0.0, 1.0).masked_fill(zero, 0.0)


@torch.no_grad()
def predict_torch(net: TriageNet, x: np.ndarray, batch: int = 64,
                  tta_flip: bool = False) -> np.ndarray:
    """Probabilities of abnormal with the torch model (eval mode)."""
    net.eval()
    out = [torch.sigmoid(net.pool(activation_map(net, to_tensor(x[i:i + batch]), tta_flip)))
           .squeeze(1).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out)


# --------------------------------------------------------------------------- export

def export_onnx(net: TriageNet, path: Path, tta_flip: bool = False) -> None:
    """Export ExportWrapper to ONNX opset 17 with a dynamic batch axis."""
    wrapper = ExportWrapper(net, tta_flip).eval()
    example = torch.zeros(2, 1, INPUT_SIZE, INPUT_SIZE)
    torch.onnx.export(
        wrapper, (example,), str(path), input_names=["input"],
        output_names=["probability", "heatmap"], opset_version=17,
        # The TorchScript exporter emits opset 17 natively; the dynamo one
        # builds opset 18 and its down-conversion breaks ReduceLogSumExp.
        dynamo=False, dynamic_axes={"input": {0: "N"}, "probability": {0: "N"},
                                    "heatmap": {0: "N"}})


def run_onnx(path: Path, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n,), heat maps (n, 256, 256)) with onnxruntime on CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    probs, maps = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].astype(np.float32)[:, None] / 255.0
        p, h = sess.run(["probability", "heatmap"], {"input": xb})
        probs.append(p[:, 0])
        maps.append(h[:, 0])
    return np.concatenate(probs), np.concatenate(maps)




# --------------------------------------------------------------------------- metrics

def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic (ties count one half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    allv = np.concatenate([pos, neg])[order]
    # Average ranks over ties.
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    r_pos = ranks[:len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def choose_threshold(p_abnormal: np.ndarray, target: float) -> float:
    """Largest threshold with sensitivity >= target (abnormal iff p >= threshold).

    Rounded *down* to 6 significant digits so that writing it to YAML can
    only raise, never lower, the validation sensitivity.
    """
    s = np.sort(p_abnormal)
    misses = math.floor((1.0 - target) * len(s) + 1e-9)
    t = float(s[misses])
    if t <= 0.0:
        return 0.0
    digits = 5 - math.floor(math.log10(t))
    return math.floor(t * 10 ** digits) / 10 ** digits


def heatmap_hits(maps: np.ndarray, masks: np.ndarray, tolerance_px: int = 0) -> np.ndarray:
    """Per image: does the heat-map maximum fall inside the (dilated) mask?"""
    hits = np.zeros(len(maps), dtype=bool)
    kernel = None
    if tolerance_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                           (2 * tolerance_px + 1, 2 * tolerance_px + 1))
    for i, (h, m) in enumerate(zip(maps, masks, strict=False)):
        if kernel is not None:
            m = cv2.dilate(m.astype(np.uint8), kernel) > 0
        r, c = np.unravel_index(int(np.argmax(h)), h.shape)
        hits[i] = bool(m[r, c])
    return hits


def evaluate(p: np.ndarray, maps: np.ndarray, s: Split, threshold: float,
             findings: tuple[str, ...] = FINDINGS) -> dict:
    """Held-out metrics for the manifest's quality section."""
    pred = p >= threshold
    abn, nor = s.y == 1, s.y == 0
    per_finding, per_severity, hit_by_finding = {}, {}, {}
    hits = heatmap_hits(maps[abn], s.masks[abn])
    hits_tol = heatmap_hits(maps[abn], s.masks[abn], tolerance_px=8)
    abn_findings = s.finding[abn]
    for f in findings:
        sel = s.finding == f
        per_finding[f] = round(float(pred[sel].mean()), 4)
        if (s.severity[sel] != "").any():
            per_severity[f] = {sev: round(float(pred[sel & (s.severity == sev)].mean()), 4)
                               for sev in SEVERITIES}
        hit_by_finding[f] = round(float(hits[abn_findings == f].mean()), 4)
    sens = float(pred[abn].mean())
    spec = float((~pred[nor]).mean())
    out = {
        "auc": round(auc(p, s.y), 4),
        "sensitivity": round(sens, 4),
        "specificity": round(spec, 4),
        "normals_auto_triaged": round(spec, 4),
        "abnormal_missed": int((~pred[abn]).sum()),
        "per_finding_sensitivity": per_finding,
        "per_finding_severity_sensitivity": per_severity,
        "heatmap_hit_rate": round(float(hits.mean()), 4),
        "heatmap_hit_rate_by_finding": hit_by_finding,
        "heatmap_hit_rate_within_8px": round(float(hits_tol.mean()), 4),
    }
    if not per_severity:
        del out["per_finding_severity_sensitivity"]
    return out


# --------------------------------------------------------------------------- manifest

def write_manifest(path: Path, onnx_name: str, digest: str, threshold: float,
                   val_sens: float, val_spec: float, quality: dict, training: dict,
                   version: str = "1.2.0") -> None:
    """Write the YAML manifest (validated against dicom_node.infer.manifest)."""
    manifest = {
        "name": "cxr_triage",
        "version": version,
        # DICOM CID 7162 (Surface Processing Algorithm Family), DCM 123110.
        "family": {"scheme": "DCM", "value": "123110", "meaning": "Artificial Intelligence"},
        "description": (
            "Chest X-ray normality triage: probability that a frontal chest "
            "radiograph is abnormal (nodule/mass, consolidation, pleural "
            "effusion, pneumothorax, cardiomegaly) and a class-activation heat "
            "map of where the evidence is. Small CNN (7 conv layers and a 1x1 "
            "class-activation head), trained on synthetic radiographs."),
        "intended_use": (
            "Reference model trained only on synthetic images, shipped to validate "
            "the dicom-node pipeline end to end (decoding, letterboxing, "
            "normalisation, inference, heat-map and result encoding). It is NOT "
            "for clinical use and has never seen a real radiograph. Even a "
            "clinically validated model of this kind is an AI triage aid that "
            "prioritises the reading worklist, not a diagnosis: every image "
            "still needs a radiologist's report."),
        "onnx": onnx_name,
        "sha256": digest,
        "task": "classification",
        "inputs": [{"name": "input", "shape": [None, 1, INPUT_SIZE, INPUT_SIZE],
                    "dtype": "float32", "layout": "NCHW"}],
        "outputs": [
            {"name": "probability", "shape": [None, 1], "dtype": "float32",
             "layout": "NC"},
            {"name": "heatmap", "shape": [None, 1, INPUT_SIZE, INPUT_SIZE],
             "dtype": "float32", "layout": "NCHW"},
        ],
        "normalization": {"kind": "percentile", "low": 1.0, "high": 99.0},
        "geometry": {"fit": "letterbox"},
        "classification": {
            "output": "probability",
            "activation": "none",
            "classes": ["abnormal"],
            "rule": "positive_class",
            "positive_class": "abnormal",
            "threshold": threshold,
            "target_sensitivity": TARGET_SENSITIVITY,
            "heatmap_output": "heatmap",
        },
        "quality": {
            **quality,
            "threshold_rule": "abnormal if probability >= threshold",
            "threshold_chosen_on": "validation set",
            "validation_sensitivity": round(val_sens, 4),
            "validation_specificity": round(val_spec, 4),
            "heatmap_hit_rule": (
                "share of abnormal held-out images whose heat-map maximum lies "
                "inside the abnormality mask (letterboxed to 256 x 256)"),
            "caveat": "measured on synthetic phantoms only; says nothing about real images",
        },
        "training": training,
    }
    path.write_text("# Generated by " + RECIPE + "; do not edit by hand.\n"
                    + yaml.safe_dump(manifest, sort_keys=False, width=88),
                    encoding="utf-8")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20260517)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-default", type=int, default=1000,
                    help="held-out images of the narrow default phantom")
    ap.add_argument("--n-independent", type=int, default=600,
                    help="held-out images of the independent family (evaluation only)")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--widths", type=int, nargs=4, default=list(WIDTHS),
                    help="channels of the four TriageNet stages")
    ap.add_argument("--stem", type=int, default=0,
                    help="channels of a learned stride-2 conv on the full-resolution input "
                         "replacing the 2x average pooling (0: the pooling)")
    ap.add_argument("--tta-flip", action="store_true",
                    help="export a graph that averages the activation maps of each image "
                         "and its left-right mirror (threshold chosen with it)")
    ap.add_argument("--version", default="1.2.0", help="model version for the manifest")
    ap.add_argument("--map-weight", type=float, default=1.0,
                    help="weight of the mask-supervised activation-map loss")
    ap.add_argument("--shaped-share", type=float, default=SHAPED_SHARE,
                    help="share of the domain-randomised images drawn with shaped=True "
                         "(0: none, and the images are exactly the shipped model's)")
    ap.add_argument("--physics-share", type=float, default=PHYSICS_SHARE,
                    help="share of the training family drawn from the physically modelled "
                         "second generator (dicom_node_synthetic.cxr_physics; 0: none, and "
                         "the images are exactly the shipped model's)")
    ap.add_argument("--style", action="store_true",
                    help="also restyle every training batch (edge enhancement or blur, "
                         "noise, gain field, contrast stretch; see restyle)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/onnxruntime threads (default: all cores)")
    ap.add_argument("--reuse-checkpoint", action="store_true",
                    help="skip training, export and evaluate work/cxr_triage.pt")
    ap.add_argument("--compare", type=Path, default=None,
                    help="manifest of an earlier model (its ONNX beside it) to measure "
                         "on the same held-out sets, recorded as quality.previous_model")
    ap.add_argument("--out", type=Path, default=REPO / "models_onnx")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work")
    return ap.parse_args(argv)


def previous_model(manifest_path: Path, sets: dict[str, tuple[Split, tuple[str, ...]]]
                   ) -> dict:
    """An earlier model's figures at its own threshold on the same held-out sets."""
    old = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    onnx = manifest_path.parent / old["onnx"]
    threshold = float(old["classification"]["threshold"])
    out: dict = {"version": old["version"], "sha256": sha256_of(onnx), "threshold": threshold}
    for name, (split, findings) in sets.items():
        p, maps = run_onnx(onnx, split.x)
        q = evaluate(p, maps, split, threshold, findings)
        out[name] = {k: q[k] for k in ("auc", "sensitivity", "specificity",
                                       "per_finding_sensitivity", "heatmap_hit_rate")}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # generation is per image and tiny; avoid oversubscription
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    sizes = {"train": args.n_train, "val": args.n_val, "test": args.n_test,
             "default": args.n_default, "independent": args.n_independent}
    family = Family(args.shaped_share, args.physics_share)
    cached = all(is_cached(args.work, args.seed, sp, n, family) for sp, n in sizes.items())
    tr, va, te, de, ind = (load_or_make(args.work, args.seed, sp, n, family)
                           for sp, n in sizes.items())
    data_s = time.perf_counter() - t0
    print(f"data ready in {data_s:.0f} s (cached: {cached})", flush=True)
    held_out = {"training_family": (te, FINDINGS), "default_phantom": (de, FINDINGS),
                "independent": (ind, independent.FINDINGS)}
    # Measured before the new ONNX is written, which may replace it.
    before = previous_model(args.compare, held_out) if args.compare else None

    net = TriageNet(tuple(args.widths), args.stem)
    checkpoint = args.work / "cxr_triage.pt"
    t0 = time.perf_counter()
    # The training run's wall time travels with the checkpoint, so that a
    # --reuse-checkpoint export still records how long training took.
    timing = checkpoint.with_suffix(".train_s")
    reused = bool(args.reuse_checkpoint and checkpoint.exists())
    if reused:
        net.load_state_dict(torch.load(checkpoint))
        train_s = float(timing.read_text()) if timing.exists() else float("nan")
    else:
        train(net, tr, va, args.epochs, args.batch, args.lr, args.seed, args.map_weight,
              args.style)
        torch.save(net.state_dict(), checkpoint)
        train_s = time.perf_counter() - t0
        timing.write_text(f"{train_s:.1f}\n")
    net.eval()

    onnx_path = args.out / "cxr_triage.onnx"
    export_onnx(net, onnx_path, args.tta_flip)
    p_val, _ = run_onnx(onnx_path, va.x)
    p_torch = predict_torch(net, va.x, tta_flip=args.tta_flip)
    diff = float(np.abs(p_val - p_torch).max())
    print(f"onnxruntime vs torch max |dp| = {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise SystemExit(f"ONNX export mismatch: {diff}")

    threshold = choose_threshold(p_val[va.y == 1], TARGET_SENSITIVITY)
    val_sens = float((p_val[va.y == 1] >= threshold).mean())
    val_spec = float((p_val[va.y == 0] < threshold).mean())
    print(f"threshold {threshold} (val sens {val_sens:.4f}, spec {val_spec:.4f})")

    quality: dict = {}
    split_of = {"training_family": "test", "default_phantom": "default",
                "independent": "independent"}
    for name, (split, findings) in held_out.items():
        p, maps = run_onnx(onnx_path, split.x)
        q = evaluate(p, maps, split, threshold, findings)
        q.update({"set_size": len(split.y), "abnormal": int(split.y.sum()),
                  "seed": [args.seed, SPLIT_SEEDS[split_of[name]]]})
        if name == "training_family":
            quality.update(q)
        else:
            quality[name] = q
        print(f"{name}: AUC {q['auc']:.4f} sens {q['sensitivity']:.4f} "
              f"spec {q['specificity']:.4f}", flush=True)
    quality["independent"]["targets"] = {"sensitivity": 0.99, "specificity": 0.60}
    quality.update({
        "validation_set_size": len(va.y),
        "onnxruntime_vs_torch_max_abs_diff": float(f"{diff:.3g}"),
    })
    if before is not None:
        quality["previous_model"] = before
    wall = time.perf_counter() - t_start
    a, b, c, d = args.widths
    training = {
        "recipe": RECIPE,
        "command": " ".join([".venv/bin/python", RECIPE,
                             *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        "data": (
            f"training family: {args.n_train} train / {args.n_val} validation / "
            f"{args.n_test} held-out test images, each half normal and half split "
            "evenly over nodule, consolidation, effusion, pneumothorax and "
            "cardiomegaly at subtle and obvious severity. "
            + (f"{round(100 * args.physics_share)} % are drawn from the physically "
               "modelled second generator (dicom_node_synthetic.cxr_physics."
               "make_physics_radiograph: outlines as splines, cut polygons or "
               "superellipses; path lengths times jittered attenuation coefficients "
               "through Beer-Lambert with beam hardening, heel effect, scatter, grid, "
               "quantum noise at a random dose and detector blur; vendor-style "
               "enhancement and tone curves; collimation, markers, burned-in text; "
               "findings change the attenuation), of the rest "
               if args.physics_share > 0 else "")
            + f"{round(100 * (1 - DEFAULT_SHARE))} % are domain-randomised "
            "(dicom_node_synthetic.cxr_phantom.make_varied_radiograph, "
            f"{round(100 * ROUNDED_SHARE)} % of them with rounded=True - the air "
            "path through each lung thinning towards its borders over 0.02-0.14 "
            "chest units (profile exponent 0.3-0.9) instead of a constant-thickness "
            "slab, and a softer heart border; "
            + (f"independently of that {round(100 * args.shaped_share)} % with shaped=True - "
               "the heart's long axis tilted 0-34 deg down to the left, an irregular "
               "outline (2nd-4th harmonics up to 4 % each), lower (centre 0.07 above to "
               "0.02 below the left dome), cardiophrenic fat pads; "
               if args.shaped_share > 0 else "")
            + "habitus - "
            "trunk width, shape and fat, neck, arms, breast shadows, gastric bubble; "
            "lung and heart shape and size, CTR 0.34-0.47 normal and 0.53-0.72 "
            "enlarged; rib count, curve, width, contrast, cortical or solid, anterior "
            "ribs; clavicle and spine contrast; positioning - scale 0.70-1.08, "
            "rotation sd 4 deg, shift; smooth elastic warp; finding sizes and "
            "contrasts over wider ranges than the default; exposure - transmission "
            "with Poisson-like quantum noise or not, detector blur, unsharp-mask "
            "edge enhancement, gamma / sigmoid / linear tone curves, smooth gain "
            "field, white or correlated noise; collimation with bright or dark "
            "borders; lead side markers), "
            f"{round(100 * DEFAULT_SHARE)} % from the narrow default make_radiograph; "
            "all are written as DX (dicom_dx.dx_image: 10-16 bits, MONOCHROME1 or 2, "
            "full or clipping VOI window) and read back by the pipeline's "
            "presentation(). Sizes 256-512 px long side, aspect 0.8-1.25, letterboxed "
            "to 256 x 256 (pad = image minimum) and percentile-normalised (1, 99, "
            "clipped); image i of a split is drawn from numpy default_rng([seed, "
            "split id, i]), split ids train 1, val 2, test 3. Never trained on: "
            "the default-phantom held-out set (split id 3, make_radiograph only) and "
            "the independent family (dicom_node_synthetic.independent.cxr, split id "
            "4), which are evaluation only"),
        "model": ("TriageNet ("
                  + ("2x average pool" if args.stem <= 0 else
                     f"learned stride-2 3x3 stem conv with {args.stem} channels on the "
                     "full-resolution input")
                  + f", {a}-{b}-{b}-{c}-{c}-{d}-{d} conv, "
                  f"stride 16, dilations 2/4/2, 1x1 CAM head, log-mean-exp pooling "
                  f"r={POOL_R}, {sum(p.numel() for p in net.parameters())} parameters)"
                  + ("; the exported graph averages the activation maps of the image "
                     "and of its left-right mirror (flipped back) before pooling"
                     if args.tta_flip else "")),
        "epochs": args.epochs,
        "batch_size": args.batch,
        "optimizer": f"AdamW one-cycle max lr {args.lr}, weight decay {WEIGHT_DECAY}",
        "augmentation": ("on the fly: left-right flip (p 0.5), rotation +-6 deg, scale "
                         "0.9-1.1, shift +-6 %, gamma 0.7-1.4 on the normalised input"
                         + ("; restyle: unsharp mask amount -0.7-1.5 radius 1-3 px "
                            "(p 0.6), white or correlated noise sd 0-0.04 (p 0.5), "
                            "smooth gain field up to 12 % (p 0.5), contrast stretch "
                            "clipping 0-6 % at each end; zero pixels kept zero"
                            if args.style else "")),
        "loss": (f"BCE(image logit) + {args.map_weight} x BCE(activation map, "
                 f"abnormality mask area per 16x16 cell, pos_weight {MAP_POS_WEIGHT})"),
        "threads": args.threads,
        "data_wall_time_s": round(data_s, 1),
        "data_from_cache": cached,
        "train_wall_time_s": round(train_s, 1),
        "checkpoint_reused": reused,
        "total_wall_time_s": round(wall, 1),
        "torch_version": str(torch.__version__),
    }
    write_manifest(args.out / "cxr_triage.yaml", onnx_path.name, sha256_of(onnx_path),
                   threshold, val_sens, val_spec, quality, training, args.version)
    print(yaml.safe_dump(quality, sort_keys=False))
    print(f"wrote {args.out / 'cxr_triage.yaml'} in {wall:.0f} s total")


if __name__ == "__main__":
    main()
