"""Synthetic cardiac MRI short-axis cine phantoms with exact ground truth.

Each study is a stack of short-axis slices (base to apex) over one cardiac
cycle: a bright LV blood pool inside a dark myocardial ring that thickens in
systole (myocardial area is conserved, as tissue is incompressible), a bright
RV crescent wrapped around the septum that disappears towards the apex, and a
surrounding chest (subcutaneous fat, muscle, lungs, liver, descending aorta)
with texture, a smooth bias field and Rician noise.  The scene is randomly
rotated, translated and scaled, and pixel and slice spacing vary per study.

Labels: 0 background, 1 LV cavity (papillary muscles included, as in the
usual clinical contouring convention), 2 LV myocardium, 3 RV cavity.  True
volumes come from the label maps by the voxel-count rule (count x pixel area x
slice spacing) that the pipeline also uses, computed here independently, so a
perfect segmentation reproduces them exactly.

numpy + OpenCV only: tests, demos and benches use it at runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np


__all__ = ["CineStudy", "make_cine", "make_cine_randomised", "volume_curve"]

# Internal tissue classes of the heart drawing; mapped to labels via _LABEL_OF.
# Myocardial density (g/ml) for the LV mass, as in the SCMR reporting guideline.
MYOCARDIAL_DENSITY_G_PER_ML = 1.05

_LV_BLOOD, _MYO, _RV_BLOOD, _RV_WALL, _EPI_FAT, _PAPILLARY = 1, 2, 3, 4, 5, 6
_LABEL_OF = np.array([0, 1, 2, 3, 0, 0, 1], dtype=np.uint8)
# cv2 drawing with fractional coordinates: values are scaled by 2**_SHIFT.
_SHIFT = 4
_SCALE = 1 << _SHIFT


@dataclass(frozen=True)
class CineStudy:
    """One synthetic short-axis cine study with its ground truth.

    ``images`` is float32 (phases, slices, rows, cols) in MR-like arbitrary
    units (roughly 0..1000); ``labels`` is uint8 of the same shape.  Slice 0 is
    the base.  Volumes in ml, EF in %, mass in g, computed from ``labels``.
    """

    images: np.ndarray
    labels: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    ed_phase: int
    es_phase: int
    lvedv_ml: float
    lvesv_ml: float
    lvef_pct: float
    rvedv_ml: float
    rvesv_ml: float
    rvef_pct: float
    lv_mass_g: float
    # Heart centre (row, col) in pixels, handy for crops in training and demos.
    heart_center_px: tuple[float, float]


def volume_curve(n_phases: int, es_fraction: float, t_es: float) -> np.ndarray:
    """Relative LV cavity area per phase: 1 at ED (phase 0), ``es_fraction`` at ES.

    Systolic ejection is a half cosine up to ``t_es`` (fraction of the cycle);
    diastole is rapid filling, diastasis and an atrial kick, as in a real
    volume-time curve.
    """
    t = np.arange(n_phases, dtype=np.float64) / n_phases
    g = np.empty_like(t)
    sys = t <= t_es
    g[sys] = (1.0 - np.cos(np.pi * t[sys] / t_es)) / 2.0
    tt = (t[~sys] - t_es) / (1.0 - t_es)
    rapid = (1.0 - np.cos(np.pi * np.minimum(1.0, tt / 0.45))) / 2.0
    kick = (1.0 - np.cos(np.pi * np.clip((tt - 0.75) / 0.25, 0.0, 1.0))) / 2.0
    g[~sys] = 1.0 - (0.8 * rapid + 0.2 * kick)
    return 1.0 - (1.0 - es_fraction) * g


class _Scene:
    """Canonical-frame drawing with one global rotation about the image centre."""

    def __init__(self, size: int, angle_rad: float) -> None:
        self.c = (size - 1) / 2.0
        self.cos, self.sin = math.cos(angle_rad), math.sin(angle_rad)
        self.angle_deg = math.degrees(angle_rad)

    def xy(self, x: float, y: float) -> tuple[float, float]:
        dx, dy = x - self.c, y - self.c
        return (self.c + self.cos * dx - self.sin * dy, self.c + self.sin * dx + self.cos * dy)

    def ellipse(self, img: np.ndarray, centre: tuple[float, float], axes: tuple[float, float],
                angle_deg: float, value: float) -> None:
        """Filled ellipse; centre (x, y) and axes in canonical pixels."""
        if min(axes) <= 0.3:
            return
        x, y = self.xy(*centre)
        cv2.ellipse(img, (round(x * _SCALE), round(y * _SCALE)),
                    (round(axes[0] * _SCALE), round(axes[1] * _SCALE)),
                    angle_deg + self.angle_deg, 0, 360, value, -1, cv2.LINE_8, _SHIFT)


def _smooth_field(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field by upsampling a coarse grid."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


@dataclass(frozen=True)
class _Subject:
    px: float                    # pixel spacing, mm
    ss: float                    # slice spacing, mm
    angle: float                 # scene rotation, rad
    body_c: tuple[float, float]  # canonical px
    body_ax: tuple[float, float]
    fat_mm: float
    heart_c: tuple[float, float]
    rv_dir: float                # direction LV->RV, rad (canonical)
    r_endo: float                # basal ED endocardial radius, px
    wall: float                  # ED wall thickness, px
    ecc: float
    taper: float                 # how far the cavity narrows at the apex
    rv_extent: float             # slice fraction where the RV ends
    rv_size: float
    lv_es_frac: float            # ES/ED cavity area ratio (1 - EF)
    rv_es_frac: float
    t_es: float
    intens: dict[str, float]
    noise: float
    gain: float
    # The RV is drawn down to this fraction of its basal profile, then ends.
    rv_min_prof: float = 0.2
    # Scales the RV's depth from the septum to its free wall (thin crescents below 1).
    rv_depth: float = 1.0


def _draw_subject(rng: np.random.Generator, size: int) -> _Subject:
    px = float(rng.uniform(1.2, 1.8))
    mm = 1.0 / px
    c = (size - 1) / 2.0
    body_c = (c + rng.uniform(-10, 10) * mm, c + rng.uniform(-5, 15) * mm)
    body_ax = (rng.uniform(125, 165) * mm, rng.uniform(90, 120) * mm)
    scale = rng.uniform(0.85, 1.2)
    heart_c = (body_c[0] + (rng.uniform(-25, 25) + 15) * mm,
               body_c[1] + (rng.uniform(-20, 20) - 15) * mm)
    lvef = rng.uniform(0.30, 0.70)
    rvef = float(np.clip(lvef + rng.uniform(-0.1, 0.1), 0.3, 0.7))
    blood = rng.uniform(650, 900)
    intens = {
        "lv": blood, "rv": blood * rng.uniform(0.9, 1.0),
        "myo": rng.uniform(160, 300), "muscle": rng.uniform(180, 300),
        "fat": rng.uniform(550, 850), "lung": rng.uniform(15, 60),
        "liver": rng.uniform(280, 420), "aorta": blood * rng.uniform(0.8, 1.05),
        "soft": rng.uniform(250, 380),
    }
    return _Subject(
        px=px, ss=float(rng.uniform(8.0, 10.0)), angle=float(rng.uniform(-0.8, 0.8)),
        body_c=body_c, body_ax=body_ax, fat_mm=float(rng.uniform(6, 20)),
        heart_c=heart_c, rv_dir=float(math.pi + 0.5 + rng.uniform(-0.35, 0.35)),
        r_endo=float(rng.uniform(22, 29) * scale * mm), wall=float(rng.uniform(7, 11) * scale * mm),
        ecc=float(rng.uniform(0.0, 0.08)), taper=float(rng.uniform(0.86, 0.95)),
        rv_extent=float(rng.uniform(0.7, 0.9)), rv_size=float(rng.uniform(0.9, 1.2)),
        lv_es_frac=float(1.0 - lvef), rv_es_frac=float(1.0 - rvef),
        t_es=float(rng.uniform(0.33, 0.40)), intens=intens,
        noise=float(rng.uniform(0.015, 0.05)), gain=float(rng.uniform(0.6, 1.6)),
    )


def _background(rng: np.random.Generator, sub: _Subject, scene: _Scene, size: int,
                s: float) -> np.ndarray:
    """Static chest anatomy of one slice (no heart), float32."""
    mm = 1.0 / sub.px
    it = sub.intens
    img = np.zeros((size, size), np.float32)
    bx, by = sub.body_c
    scene.ellipse(img, sub.body_c, sub.body_ax, 0, it["fat"])
    inner = (sub.body_ax[0] - sub.fat_mm * mm, sub.body_ax[1] - sub.fat_mm * mm)
    scene.ellipse(img, sub.body_c, inner, 0, it["muscle"])
    # Mediastinal soft tissue, lungs either side, heart sits between them.
    scene.ellipse(img, (bx, by + 5 * mm), (inner[0] - 15 * mm, inner[1] - 12 * mm), 0, it["soft"])
    hx, hy = sub.heart_c
    for side in (-1, 1):
        lc = (hx + side * 70 * mm + rng.uniform(-5, 5) * mm, by + rng.uniform(-5, 15) * mm)
        scene.ellipse(img, lc, (rng.uniform(40, 55) * mm, rng.uniform(55, 75) * mm),
                      rng.uniform(-20, 20), it["lung"])
    # Liver rises into the lower slices (towards the apex) under the right lung.
    if s > 0.45:
        grow = (s - 0.45) / 0.55
        scene.ellipse(img, (bx - 55 * mm, by + 30 * mm),
                      (70 * mm * (0.5 + 0.5 * grow), 55 * mm * (0.4 + 0.6 * grow)), 15, it["liver"])
    # Spine and descending aorta posteriorly: a bright round distractor next to the LV.
    scene.ellipse(img, (bx + 5 * mm, by + inner[1] - 25 * mm), (18 * mm, 16 * mm), 0, it["muscle"] * 0.7)
    scene.ellipse(img, (hx + 28 * mm, hy + 55 * mm), (11 * mm, 11 * mm), 0, it["aorta"])
    texture = 1.0 + 0.06 * _smooth_field(rng, size, 24) + 0.04 * _smooth_field(rng, size, 64)
    return img * texture


def _heart_classes(sub: _Subject, scene: _Scene, size: int, s: float, f_lv: float,
                   f_rv: float, papillary: bool) -> np.ndarray:
    """Heart tissue classes of one slice at one phase, uint8 (size, size)."""
    cls = np.zeros((size, size), np.uint8)
    prof = math.sqrt(max(0.0, 1.0 - (s * sub.taper) ** 2))
    endo_ed = sub.r_endo * prof
    # Apical wall slightly thinner, as in real hearts.
    wall = sub.wall * (1.0 - 0.25 * s)
    epi_ed = endo_ed + wall
    endo = endo_ed * math.sqrt(f_lv)
    # Myocardial area is conserved through the cycle: the wall thickens in systole.
    epi = math.sqrt(endo * endo + epi_ed * epi_ed - endo_ed * endo_ed)
    hx, hy = sub.heart_c
    ux, uy = math.cos(sub.rv_dir), math.sin(sub.rv_dir)
    axis_deg = math.degrees(sub.rv_dir)

    rv_prof = math.sqrt(max(0.0, 1.0 - (s / sub.rv_extent) ** 2)) if s < sub.rv_extent else 0.0
    if rv_prof > sub.rv_min_prof:
        epi_base = (sub.r_endo + sub.wall) * sub.rv_size
        # RV free wall moves towards the septum in systole: the across-axis radius shrinks most.
        a_par = epi_base * 0.6 * (0.5 + 0.5 * rv_prof) * (0.35 + 0.65 * f_rv) * sub.rv_depth
        a_perp = epi_base * (0.75 + 0.6 * rv_prof) * (0.85 + 0.15 * f_rv)
        # Centre just outside the septum so the LV bites a concave notch: a crescent.
        d = epi * 0.45 + a_par * 0.75
        rc = (hx + ux * d, hy + uy * d)
        rv_wall_px = 3.0 / sub.px
        scene.ellipse(cls, (hx, hy), (epi + 4.0 / sub.px, epi + 4.0 / sub.px), 0, _EPI_FAT)
        scene.ellipse(cls, rc, (a_par + rv_wall_px + 3.0 / sub.px, a_perp + rv_wall_px + 3.0 / sub.px),
                      axis_deg, _EPI_FAT)
        scene.ellipse(cls, rc, (a_par + rv_wall_px, a_perp + rv_wall_px), axis_deg, _RV_WALL)
        scene.ellipse(cls, rc, (a_par, a_perp), axis_deg, _RV_BLOOD)
    else:
        scene.ellipse(cls, (hx, hy), (epi + 4.0 / sub.px, epi + 4.0 / sub.px), 0, _EPI_FAT)
    e = 1.0 + sub.ecc
    scene.ellipse(cls, (hx, hy), (epi * e, epi / e), axis_deg + 90, _MYO)
    scene.ellipse(cls, (hx, hy), (endo * e, endo / e), axis_deg + 90, _LV_BLOOD)
    if papillary and endo > 6:
        # Two papillary muscles on the free-wall side, opposite the septum.
        for off in (-0.9, 0.9):
            ang = sub.rv_dir + math.pi + off
            pr = 0.62 * endo
            pc = (hx + math.cos(ang) * pr, hy + math.sin(ang) * pr)
            rr = 0.17 * endo
            scene.ellipse(cls, pc, (rr, rr * 0.8), math.degrees(ang), _PAPILLARY)
    return cls


def make_cine(rng: np.random.Generator, n_slices: int = 10, n_phases: int = 25,
              size: int = 256) -> CineStudy:
    """Draw one random subject and render its short-axis cine stack.

    ``rng`` fully determines the result (same seed, same study).  Pixel
    spacing is drawn in 1.2-1.8 mm (square pixels), slice spacing in
    8-10 mm, LVEF in about 30-70 %, ES at 33-40 % of the cycle.
    """
    if n_slices < 2 or n_phases < 2 or size < 64:
        raise ValueError("need n_slices >= 2, n_phases >= 2 and size >= 64")
    return _render(rng, _draw_subject(rng, size), n_slices, n_phases, size)


def make_cine_randomised(rng: np.random.Generator, n_slices: int = 10, n_phases: int = 25,
                         size: int = 256, thin_rv: bool = False) -> CineStudy:
    """Like :func:`make_cine` with the subject drawn from much wider ranges, for training
    with domain randomisation: wall thickness 4-16 mm, LV radius, eccentricity, RV size and
    extent, LVEF 20-80 %, apical coverage up to a myocardium-only apical cap, every tissue
    intensity (blood/myocardium contrast from about 1.3 to 10), noise and coil shading.

    ``thin_rv`` (opt-in) also draws how far towards its apex the RV reaches before it ends
    (down to 2 % of its basal profile, instead of 20 %) and a shallower RV (depth 0.55-1.0
    of the default), so the stack holds the thin, small RV crescents of apical slices.
    Without it the output is the same as before the option existed (same seed, same study);
    :func:`make_cine` itself is unchanged."""
    if n_slices < 2 or n_phases < 2 or size < 64:
        raise ValueError("need n_slices >= 2, n_phases >= 2 and size >= 64")
    sub = _widen(rng, _draw_subject(rng, size))
    if thin_rv:
        # Drawn after everything else, so the default stream stays as it was.
        sub = replace(sub, rv_min_prof=float(rng.uniform(0.02, 0.2)),
                      rv_depth=float(rng.uniform(0.55, 1.0)))
    return _render(rng, sub, n_slices, n_phases, size)


def _widen(rng: np.random.Generator, sub: _Subject) -> _Subject:
    mm = 1.0 / sub.px
    blood = float(rng.uniform(300, 1000))
    myo = blood / float(rng.uniform(1.3, 10.0))
    intens = {
        "lv": blood, "rv": blood * rng.uniform(0.8, 1.1), "myo": myo,
        "muscle": myo * rng.uniform(0.6, 1.6), "fat": rng.uniform(0.3, 1.8) * blood,
        "lung": rng.uniform(0.0, 0.15) * blood, "liver": myo * rng.uniform(0.8, 2.0),
        "aorta": blood * rng.uniform(0.6, 1.1), "soft": myo * rng.uniform(0.7, 2.0),
    }
    lvef = rng.uniform(0.20, 0.80)
    rvef = float(np.clip(lvef + rng.uniform(-0.15, 0.15), 0.2, 0.8))
    return replace(
        sub, r_endo=float(rng.uniform(15, 35) * mm), wall=float(rng.uniform(4, 16) * mm),
        ecc=float(rng.uniform(0.0, 0.22)), taper=float(rng.uniform(0.8, 1.12)),
        rv_extent=float(rng.uniform(0.45, 0.95)), rv_size=float(rng.uniform(0.65, 1.45)),
        rv_dir=float(sub.rv_dir + rng.uniform(-0.4, 0.4)),
        lv_es_frac=float(1.0 - lvef), rv_es_frac=float(1.0 - rvef),
        t_es=float(rng.uniform(0.25, 0.45)), intens=intens,
        noise=float(rng.uniform(0.01, 0.12)), gain=float(rng.uniform(0.3, 3.0)),
    )


def _render(rng: np.random.Generator, sub: _Subject, n_slices: int, n_phases: int,
            size: int) -> CineStudy:
    scene = _Scene(size, sub.angle)
    f_lv = volume_curve(n_phases, sub.lv_es_frac, sub.t_es)
    f_rv = volume_curve(n_phases, sub.rv_es_frac, sub.t_es)
    it = sub.intens
    lut = np.array([0, it["lv"], it["myo"], it["rv"], it["myo"], it["fat"], it["myo"] * 1.1],
                   dtype=np.float32)
    bias = np.exp(0.25 * _smooth_field(rng, size, 4)).astype(np.float32)
    images = np.empty((n_phases, n_slices, size, size), np.float32)
    labels = np.empty((n_phases, n_slices, size, size), np.uint8)
    sigma = sub.noise * it["lv"]
    for k in range(n_slices):
        s = k / (n_slices - 1)
        bg = _background(rng, sub, scene, size, s)
        heart_tex = 1.0 + 0.04 * _smooth_field(rng, size, 48)
        papillary = 0.15 < s < 0.8
        for p in range(n_phases):
            cls = _heart_classes(sub, scene, size, s, float(f_lv[p]), float(f_rv[p]), papillary)
            img = np.where(cls > 0, lut[cls] * heart_tex, bg)
            # Partial-volume blur at edges, then coil bias and magnitude (Rician) noise.
            img = cv2.GaussianBlur(img, (0, 0), 0.7) * bias * sub.gain
            n = rng.standard_normal((2, size, size), dtype=np.float32) * (sigma * sub.gain)
            images[p, k] = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)
            labels[p, k] = _LABEL_OF[cls]
    spacing = (sub.px, sub.px)
    lv_ml, myo_ml, rv_ml = (_label_ml(labels, value, spacing, sub.ss) for value in (1, 2, 3))
    ed = int(np.argmax(lv_ml))
    es = int(np.argmin(lv_ml))
    lvedv, lvesv = float(lv_ml[ed]), float(lv_ml[es])
    rvedv, rvesv = float(rv_ml[ed]), float(rv_ml[es])
    hr = scene.xy(*sub.heart_c)
    return CineStudy(
        images=images, labels=labels, pixel_spacing_mm=spacing, slice_spacing_mm=sub.ss,
        ed_phase=ed, es_phase=es, lvedv_ml=lvedv, lvesv_ml=lvesv,
        lvef_pct=100.0 * (lvedv - lvesv) / lvedv,
        rvedv_ml=rvedv, rvesv_ml=rvesv,
        rvef_pct=100.0 * (rvedv - rvesv) / rvedv if rvedv > 0 else float("nan"),
        lv_mass_g=float(myo_ml[ed]) * MYOCARDIAL_DENSITY_G_PER_ML,
        heart_center_px=(hr[1], hr[0]),
    )


def _label_ml(labels: np.ndarray, value: int, pixel_spacing_mm: tuple[float, float],
              slice_spacing_mm: float) -> np.ndarray:
    """Per-phase volume (ml) of one label: voxel count x voxel volume.  Written
    here rather than taken from the node, so the truth does not share the code
    it grades."""
    voxel_ml = pixel_spacing_mm[0] * pixel_spacing_mm[1] * slice_spacing_mm / 1000.0
    return (labels == value).reshape(labels.shape[0], -1).sum(axis=1) * voxel_ml
