"""Cardiac function indices from short-axis cine label maps.

Which label value is which structure comes from the model's manifest, by
SNOMED CT code (``Roles``); the default is the phantoms' convention
1 = LV cavity (blood pool), 2 = LV myocardium, 3 = RV cavity, 0 = everything else.
A structure the model does not segment yields no measurement, never a zero.

Volumes are summed slice by slice (Simpson's disc method as used clinically):
voxel count x pixel area x slice-centre spacing.  The slice-centre spacing, not
the slice thickness, is what makes the discs tile the ventricle without gaps
or overlap.  ED is the phase with the largest LV cavity, ES the smallest; RV
volumes are read at the same two phases (the usual convention on one stack).

numpy and OpenCV only, so the node runs it without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from dicom_node.errors import PipelineError

__all__ = [
    "LV_CAVITY",
    "LV_MYOCARDIUM",
    "MYOCARDIAL_DENSITY_G_PER_ML",
    "RV_CAVITY",
    "CardiacMetrics",
    "PhaseVolumes",
    "Roles",
    "cardiac_metrics",
    "dice",
    "dice_ed_es",
    "hausdorff95",
    "mosteller_bsa",
    "phase_volumes",
]

LV_CAVITY = 1
LV_MYOCARDIUM = 2
RV_CAVITY = 3
# Specific gravity of myocardium used throughout the CMR literature.
MYOCARDIAL_DENSITY_G_PER_ML = 1.05


@dataclass(frozen=True)
class Roles:
    """The label value of each structure measured; None: not segmented."""

    lv_cavity: int = LV_CAVITY
    lv_myocardium: int | None = LV_MYOCARDIUM
    rv_cavity: int | None = RV_CAVITY

    def missing(self) -> list[str]:
        return [name for name, value in (("LV myocardium", self.lv_myocardium),
                                          ("RV cavity", self.rv_cavity)) if value is None]


@dataclass(frozen=True)
class PhaseVolumes:
    """Per-phase volumes in ml, each an array of shape (phases,), or None for
    a structure the model does not segment."""

    lv_cavity_ml: np.ndarray
    lv_myocardium_ml: np.ndarray | None
    rv_cavity_ml: np.ndarray | None


@dataclass(frozen=True)
class CardiacMetrics:
    """LV/RV function indices (ml, %, g); ``*_index`` values are per m^2 BSA or None."""

    ed_phase: int
    es_phase: int
    lvedv_ml: float
    lvesv_ml: float
    lvsv_ml: float
    lvef_pct: float
    lv_mass_g: float | None
    rvedv_ml: float | None
    rvesv_ml: float | None
    rvsv_ml: float | None
    rvef_pct: float | None
    bsa_m2: float | None = None
    lvedv_index_ml_m2: float | None = None
    lvesv_index_ml_m2: float | None = None
    lvsv_index_ml_m2: float | None = None
    lv_mass_index_g_m2: float | None = None
    rvedv_index_ml_m2: float | None = None
    rvesv_index_ml_m2: float | None = None
    rvsv_index_ml_m2: float | None = None


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 4:
        raise PipelineError(
            f"label maps must be (phases, slices, rows, cols), got shape {labels.shape}")
    if labels.shape[0] < 2:
        raise PipelineError("need at least two cardiac phases to find ED and ES")
    return labels


def _check_spacing(pixel_spacing_mm: tuple[float, float], slice_spacing_mm: float) -> float:
    """Voxel volume in ml (mm^3 / 1000)."""
    row, col = (float(v) for v in pixel_spacing_mm)
    if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
        raise PipelineError(f"pixel spacing must be positive, got {pixel_spacing_mm}")
    if not (np.isfinite(slice_spacing_mm) and slice_spacing_mm > 0):
        raise PipelineError(f"slice spacing must be positive, got {slice_spacing_mm}")
    return row * col * float(slice_spacing_mm) / 1000.0


def phase_volumes(labels: np.ndarray, pixel_spacing_mm: tuple[float, float],
                  slice_spacing_mm: float, roles: Roles = Roles()) -> PhaseVolumes:
    """Volumes per phase: voxel count x pixel area x slice-centre spacing."""
    labels = _check_labels(labels)
    voxel_ml = _check_spacing(pixel_spacing_mm, slice_spacing_mm)
    flat = labels.reshape(labels.shape[0], -1)
    top = 1 + max(v for v in (roles.lv_cavity, roles.lv_myocardium, roles.rv_cavity) if v is not None)
    # One bincount per phase is far cheaper than a boolean pass per structure.
    # Per phase, from the label map's own small integers: casting the whole
    # 4D map to int64 first allocated 8 times its size.
    counts = np.stack([np.bincount(p, minlength=top) for p in flat])

    def volume(value: int | None) -> np.ndarray | None:
        return None if value is None else counts[:, value] * voxel_ml

    return PhaseVolumes(
        lv_cavity_ml=counts[:, roles.lv_cavity] * voxel_ml,
        lv_myocardium_ml=volume(roles.lv_myocardium),
        rv_cavity_ml=volume(roles.rv_cavity),
    )


def mosteller_bsa(height_m: float, weight_kg: float) -> float:
    """Body surface area (m^2) by Mosteller: sqrt(height_cm x weight_kg / 3600)."""
    if not (height_m > 0 and weight_kg > 0):
        raise PipelineError(
            f"height and weight must be positive, got {height_m} m and {weight_kg} kg")
    if height_m > 3.0:
        # A height in cm passed as metres would give a BSA ten times too large.
        raise PipelineError(f"height {height_m} m is implausible; expected metres")
    return float(np.sqrt(height_m * 100.0 * weight_kg / 3600.0))


def cardiac_metrics(labels: np.ndarray, pixel_spacing_mm: tuple[float, float],
                    slice_spacing_mm: float, height_m: float | None = None,
                    weight_kg: float | None = None, roles: Roles = Roles()) -> CardiacMetrics:
    """LV/RV volumes, stroke volumes, ejection fractions and LV mass.

    ``labels`` is (phases, slices, rows, cols).  LV mass is the myocardial
    volume at ED x 1.05 g/ml.  RVEF is None when no RV is segmented at ED
    (a model that finds the LV but no RV should not report RVEF 0 %).
    """
    vols = phase_volumes(labels, pixel_spacing_mm, slice_spacing_mm, roles)
    lv = vols.lv_cavity_ml
    if not np.any(lv > 0):
        raise PipelineError("no LV cavity found in any phase")
    ed = int(np.argmax(lv))
    es = int(np.argmin(lv))
    if lv[es] >= lv[ed]:
        raise PipelineError("LV cavity volume does not change over the cycle; cannot pick ED/ES")
    lvedv, lvesv = float(lv[ed]), float(lv[es])
    rv = vols.rv_cavity_ml
    rvedv, rvesv = (float(rv[ed]), float(rv[es])) if rv is not None else (None, None)
    myo = vols.lv_myocardium_ml
    mass = float(myo[ed]) * MYOCARDIAL_DENSITY_G_PER_ML if myo is not None else None
    rvef = 100.0 * (rvedv - rvesv) / rvedv if rvedv and rvesv is not None else None
    base: dict[str, Any] = {
        "ed_phase": ed, "es_phase": es,
        "lvedv_ml": lvedv, "lvesv_ml": lvesv, "lvsv_ml": lvedv - lvesv,
        "lvef_pct": 100.0 * (lvedv - lvesv) / lvedv, "lv_mass_g": mass,
        "rvedv_ml": rvedv, "rvesv_ml": rvesv,
        "rvsv_ml": rvedv - rvesv if rvedv is not None and rvesv is not None else None, "rvef_pct": rvef,
    }
    if height_m is None and weight_kg is None:
        return CardiacMetrics(**base)
    if height_m is None or weight_kg is None:
        raise PipelineError("BSA indexing needs both height and weight")
    bsa = mosteller_bsa(height_m, weight_kg)

    def per_m2(value: float | None) -> float | None:
        return None if value is None else value / bsa

    return CardiacMetrics(
        **base, bsa_m2=bsa,
        lvedv_index_ml_m2=lvedv / bsa, lvesv_index_ml_m2=lvesv / bsa,
        lvsv_index_ml_m2=(lvedv - lvesv) / bsa, lv_mass_index_g_m2=per_m2(mass),
        rvedv_index_ml_m2=per_m2(rvedv), rvesv_index_ml_m2=per_m2(rvesv),
        rvsv_index_ml_m2=per_m2(base["rvsv_ml"]),
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise PipelineError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_ed_es(pred: np.ndarray, truth: np.ndarray, value: int, ed_phase: int,
               es_phase: int) -> tuple[float, float]:
    """Volumetric Dice of one label at ED and at ES, each over the whole stack.

    ``pred`` and ``truth`` are (phases, slices, rows, cols) label maps; the
    phases are the reference's ED and ES.  This is how the ACDC 2017 and M&Ms
    challenges score cardiac segmentation (per structure, per phase, over the
    3D volume); a mean over 2D slices weighs a thin apical section as much as
    a mid-ventricular one and so reads lower for the same labels.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 4:
        raise PipelineError("dice_ed_es needs two (phases, slices, rows, cols) label maps of one "
                            f"shape, got {pred.shape} and {truth.shape}")
    for name, phase in (("ED", ed_phase), ("ES", es_phase)):
        if not 0 <= phase < truth.shape[0]:
            raise PipelineError(f"{name} phase {phase} outside 0..{truth.shape[0] - 1}")
    return (dice(pred[ed_phase] == value, truth[ed_phase] == value),
            dice(pred[es_phase] == value, truth[es_phase] == value))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: in the mask with at least one 4-neighbour outside it."""
    m = mask.astype(np.uint8)
    eroded = cv2.erode(m, np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m - eroded).astype(bool)


def _distances_to(surface: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Euclidean distance (mm) of every pixel to the nearest surface pixel."""
    row, col = spacing
    src = np.where(surface, 0, 255).astype(np.uint8)
    if np.isclose(row, col):
        return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * row
    # distanceTransform assumes square pixels: stretch to the finer spacing first.
    fine = min(row, col)
    h, w = surface.shape
    hh, ww = max(1, round(h * row / fine)), max(1, round(w * col / fine))
    big = cv2.resize(src, (ww, hh), interpolation=cv2.INTER_NEAREST)
    dist = cv2.distanceTransform(big, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * fine
    return cv2.resize(dist, (w, h), interpolation=cv2.INTER_NEAREST)


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> float:
    """95th-percentile symmetric surface distance (mm) between two 2D masks.

    Returns 0.0 when both masks are empty and inf when exactly one is.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 2:
        raise PipelineError(f"hausdorff95 needs two 2D masks of one shape, got {a.shape}, {b.shape}")
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    spacing_f = (float(spacing[0]), float(spacing[1]))
    d_ab = _distances_to(sb, spacing_f)[sa]
    d_ba = _distances_to(sa, spacing_f)[sb]
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
