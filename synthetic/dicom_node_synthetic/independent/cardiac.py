"""An independently designed cardiac short-axis cine family, for held-out evaluation only.

Written apart from :mod:`dicom_node_synthetic.cardiac_phantom` (it imports
nothing from it) and designed differently throughout:

* **Shapes** are 3D.  The LV is a truncated solid of revolution with a
  super-elliptic long-axis profile, a trabeculated (harmonic) endocardium,
  papillary muscles running along the long axis and an epicardial apex cap
  below the cavity; the RV is an ellipsoid wrapped around the septum.  Slices
  are planes of constant scanner z cutting a heart whose long axis is tilted
  (oblique planes), so sections are off-round and drift across the stack; the
  whole slice is rotated in plane.  The LV shortens along its axis and
  contracts radially in systole while the wall thickens by a drawn fraction.
* **Intensities** follow the bSSFP steady-state signal equation from per-tissue
  T1, T2 and proton density at a drawn flip angle, with blood-flow shading.
* **Acquisition**: the scene is rendered at twice the display resolution,
  Fourier transformed, cropped to a smaller acquired matrix (blur and Gibbs
  ringing) and zero-filled back to the display matrix; each of one to six
  receive coils (Gaussian sensitivity profiles: the coil shading) adds its own
  complex Gaussian noise of the same bandwidth, and the coils are combined by
  root sum of squares (non-central chi noise).
* **Coverage**: matrix (rectangular FOV) and pixel spacing, slice spacing,
  slice count and where the stack starts and ends (apical slices with
  myocardium only, or past the apex) are drawn per study.

Labels (0 background, 1 LV cavity with papillary muscles, 2 LV myocardium,
3 RV cavity) are the tissue at each pixel centre, so they are exact; volumes
are label voxel counts x pixel area x slice spacing, ED the phase with the
largest LV cavity and ES the smallest.  No recipe trains on this family.

numpy only; a 2-study, 6-phase set takes a few seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["IndependentCine", "make_independent_cine"]

MYOCARDIAL_DENSITY_G_PER_ML = 1.05

# Tissue classes of the scene, and the label each one carries.
(_AIR, _FAT, _MUSCLE, _LUNG, _SOFT, _LIVER, _MARROW, _CSF, _AORTA,
 _LV_BLOOD, _MYO, _PAPILLARY, _RV_BLOOD, _RV_WALL, _PERI_FAT) = range(15)
_LABEL = np.zeros(15, np.uint8)
_LABEL[[_LV_BLOOD, _PAPILLARY]] = 1
_LABEL[_MYO] = 2
_LABEL[_RV_BLOOD] = 3
# (T1 ms, T2 ms, proton density) at 1.5 T, literature ballpark values.
_RELAXATION = {
    _AIR: (1000.0, 1.0, 0.0), _FAT: (300.0, 90.0, 0.9), _MUSCLE: (1000.0, 35.0, 0.75),
    _LUNG: (1200.0, 30.0, 0.12), _SOFT: (900.0, 60.0, 0.7), _LIVER: (580.0, 45.0, 0.75),
    _MARROW: (550.0, 100.0, 0.8), _CSF: (4000.0, 2000.0, 1.0), _AORTA: (1550.0, 250.0, 0.95),
    _LV_BLOOD: (1550.0, 250.0, 0.95), _MYO: (1000.0, 45.0, 0.8), _PAPILLARY: (1000.0, 45.0, 0.8),
    _RV_BLOOD: (1550.0, 250.0, 0.95), _RV_WALL: (1000.0, 45.0, 0.8), _PERI_FAT: (300.0, 90.0, 0.9),
}
_BLOOD = (_LV_BLOOD, _RV_BLOOD, _AORTA)


@dataclass(frozen=True)
class IndependentCine:
    """One study: ``images`` float32 and ``labels`` uint8, both (phases, slices,
    rows, cols), slice 0 basal; volumes ml, EF %, mass g from ``labels``."""

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


@dataclass(frozen=True)
class _Heart:
    r0: float            # basal endocardial radius at ED, mm
    length: float        # endocardial long axis at ED, mm
    wall: float          # ED wall thickness, mm
    thickening: float    # systolic wall thickening fraction
    apex_cap: float      # apical wall as a fraction of ``wall``
    profile_p: float     # super-ellipse exponent of the long-axis profile
    ecc: float
    ecc_angle: float
    trab: np.ndarray     # (k, amplitude, phase) rows of endocardial harmonics
    alpha: float         # share of volume change that is radial
    lv_es: float         # ES / ED volume scale
    rv_es: float
    t_es: float
    tau: float           # diastolic filling time constant (cycle fraction)
    rv_dir: float        # LV -> RV direction in the heart frame, rad
    rv_par: float        # RV semi-axis towards the free wall, mm
    rv_perp: float       # RV semi-axis along the septum, mm
    rv_offset: float     # RV centre from LV axis, mm
    pm_angles: tuple[float, float]
    pm_radius: float     # fraction of the cavity radius
    peri_fat: float      # pericardial fat thickness, mm


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Unit-SD low-pass random field: white noise filtered in k-space (Gaussian, ``cutoff`` cycles/px)."""
    white = rng.standard_normal(shape)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    field = np.fft.irfft2(np.fft.rfft2(white) * np.exp(-(kx ** 2 + ky ** 2) / (2 * cutoff ** 2)), shape)
    return (field / max(float(field.std()), 1e-9)).astype(np.float32)


def _bssfp(t1: float, t2: float, pd: float, flip: float) -> float:
    """Balanced SSFP steady-state magnitude for TR << T2."""
    ratio = t1 / t2
    return pd * math.sin(flip) / ((ratio + 1.0) - math.cos(flip) * (ratio - 1.0))


def _draw_heart(rng: np.random.Generator) -> _Heart:
    n_trab = int(rng.integers(3, 7))
    trab = np.stack([rng.integers(4, 12, n_trab).astype(float),
                     rng.uniform(0.0, 0.035, n_trab), rng.uniform(0, 2 * np.pi, n_trab)], axis=1)
    r0 = float(rng.uniform(22.0, 33.0))
    wall = float(rng.uniform(6.0, 13.0))
    lvef = float(rng.uniform(0.25, 0.75))
    rvef = float(np.clip(lvef + rng.uniform(-0.12, 0.12), 0.25, 0.75))
    # RV to the viewer's left of the LV, as short-axis views are usually shown.
    rv_dir = float(math.pi + rng.uniform(-0.5, 0.5))
    pm_spread = float(rng.uniform(0.55, 1.05))
    return _Heart(
        r0=r0, length=float(rng.uniform(2.5, 3.4) * r0), wall=wall,
        thickening=float(rng.uniform(0.25, 0.9)), apex_cap=float(rng.uniform(0.55, 0.9)),
        profile_p=float(rng.uniform(1.7, 2.8)), ecc=float(rng.uniform(1.0, 1.15)),
        ecc_angle=float(rng.uniform(0, np.pi)), trab=trab,
        alpha=float(rng.uniform(0.35, 0.45)), lv_es=1.0 - lvef, rv_es=1.0 - rvef,
        t_es=float(rng.uniform(0.28, 0.45)), tau=float(rng.uniform(0.07, 0.16)),
        rv_dir=rv_dir, rv_par=float(rng.uniform(0.55, 0.95) * r0),
        rv_perp=float(rng.uniform(1.35, 1.8) * (r0 + wall)),
        rv_offset=float(rng.uniform(0.75, 1.1) * (r0 + wall)),
        pm_angles=(rv_dir + math.pi - pm_spread, rv_dir + math.pi + pm_spread),
        pm_radius=float(rng.uniform(0.10, 0.2)), peri_fat=float(rng.uniform(0.5, 5.0)),
    )


def _ejection(t: np.ndarray, h: _Heart) -> np.ndarray:
    """0 at ED, 1 at ES: raised-cosine ejection, exponential filling."""
    e = np.empty_like(t)
    sys = t <= h.t_es
    e[sys] = 0.5 * (1.0 - np.cos(np.pi * t[sys] / h.t_es))
    e[~sys] = np.exp(-(t[~sys] - h.t_es) / h.tau)
    return e


def _heart_classes(h: _Heart, a: np.ndarray, b: np.ndarray, w: np.ndarray, e: float,
                   rv_len: float) -> np.ndarray:
    """Tissue classes of the heart at heart-frame points (a, b across, w down the axis, mm); 0 outside."""
    s_lv = 1.0 - (1.0 - h.lv_es) * e
    s_rv = 1.0 - (1.0 - h.rv_es) * e
    radius = h.r0 * s_lv ** h.alpha
    length = h.length * s_lv ** (1.0 - 2.0 * h.alpha)
    wall = h.wall * (1.0 + h.thickening * e)
    theta = np.arctan2(b, a)
    ca, sa = math.cos(h.ecc_angle), math.sin(h.ecc_angle)
    r = np.hypot((a * ca + b * sa) / h.ecc, (-a * sa + b * ca) * h.ecc)
    below = np.clip(w / length, 0.0, None)
    prof = np.where((w >= 0) & (below < 1.0), np.clip(1.0 - below ** h.profile_p, 0.0, 1.0) ** (1.0 / h.profile_p), 0.0)
    ripple = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in h.trab)
    endo = radius * prof * ripple
    epi_len = length + h.apex_cap * wall
    below_epi = np.clip(w / epi_len, 0.0, None)
    prof_epi = np.where((w >= 0) & (below_epi < 1.0), np.sqrt(np.clip(1.0 - below_epi ** 2, 0.0, 1.0)), 0.0)
    epi = np.maximum((radius + wall) * prof_epi, np.where(endo > 0, endo + 0.5 * wall, 0.0))
    cls = np.zeros(a.shape, np.uint8)
    inside_epi = r < epi
    # RV ellipsoid in its own frame: u towards the free wall, v along the septum.
    cu, su = math.cos(h.rv_dir), math.sin(h.rv_dir)
    u = a * cu + b * su - h.rv_offset * (0.85 + 0.15 * s_lv ** 0.5)
    v = -a * su + b * cu
    par = h.rv_par * s_rv ** 0.8
    perp = h.rv_perp * s_rv ** 0.15
    rv_w = np.where(w >= 0, w / rv_len, 10.0)

    def rv_inside(grow: float) -> np.ndarray:
        return (u / (par + grow)) ** 2 + (v / (perp + grow)) ** 2 + rv_w ** 2 < 1.0

    rv_outer = rv_inside(3.0) & ~inside_epi
    peri = (r < epi + h.peri_fat) | (rv_inside(3.0 + h.peri_fat))
    cls[peri & (w > -h.peri_fat)] = _PERI_FAT
    cls[rv_outer] = _RV_WALL
    cls[rv_inside(0.0) & ~inside_epi] = _RV_BLOOD
    cls[inside_epi] = _MYO
    cls[r < endo] = _LV_BLOOD
    for ang in h.pm_angles:
        centre = 0.62 * radius * prof
        pa, pb = a - centre * math.cos(ang), b - centre * math.sin(ang)
        pm = (np.hypot(pa, pb) < h.pm_radius * radius) & (w > 0.18 * length) & (w < 0.68 * length)
        cls[pm & (r < endo)] = _PAPILLARY
    return cls


@dataclass(frozen=True)
class _Chest:
    half_x: float
    half_y: float
    exponent: float
    fat: float
    muscle: float
    lungs: tuple[tuple[float, float, float, float, np.ndarray], ...]
    spine_y: float
    aorta: tuple[float, float, float]
    liver_z: float


def _draw_chest(rng: np.random.Generator, heart_xy: tuple[float, float]) -> _Chest:
    half_x, half_y = float(rng.uniform(140, 195)), float(rng.uniform(95, 140))
    lungs = []
    for side in (-1.0, 1.0):
        harmonics = np.stack([np.arange(2, 6, dtype=float), rng.uniform(0, 0.12, 4),
                              rng.uniform(0, 2 * np.pi, 4)], axis=1)
        lungs.append((side * rng.uniform(0.45, 0.6) * half_x, rng.uniform(-0.1, 0.15) * half_y,
                      rng.uniform(0.28, 0.38) * half_x, rng.uniform(0.5, 0.7) * half_y, harmonics))
    spine_y = float(half_y * rng.uniform(0.55, 0.7))
    aorta = (heart_xy[0] + rng.uniform(15, 45), spine_y - rng.uniform(25, 40), float(rng.uniform(9, 14)))
    return _Chest(half_x, half_y, float(rng.uniform(2.1, 3.4)), float(rng.uniform(5, 25)),
                  float(rng.uniform(6, 14)), tuple(lungs), spine_y, aorta, float(rng.uniform(0.35, 0.7)))


def _chest_classes(c: _Chest, x: np.ndarray, y: np.ndarray, depth: float) -> np.ndarray:
    """Static chest tissue classes at canonical points (mm); ``depth`` 0 base .. 1 apex of the stack."""
    cls = np.full(x.shape, _AIR, np.uint8)

    def body(shrink: float) -> np.ndarray:
        return (np.abs(x) / (c.half_x - shrink)) ** c.exponent + (np.abs(y) / (c.half_y - shrink)) ** c.exponent < 1.0

    cls[body(0.0)] = _FAT
    cls[body(c.fat)] = _MUSCLE
    cls[body(c.fat + c.muscle)] = _SOFT
    for lx, ly, ax, ay, harm in c.lungs:
        dx, dy = x - lx, y - ly
        ang = np.arctan2(dy, dx)
        edge = 1.0 + sum(amp * np.cos(k * ang + ph) for k, amp, ph in harm)
        cls[np.hypot(dx / ax, dy / ay) < edge] = _LUNG
    if depth > c.liver_z:
        grow = (depth - c.liver_z) / (1.0 - c.liver_z)
        liver = np.hypot((x + 0.35 * c.half_x) / (0.55 * c.half_x * (0.4 + 0.6 * grow)),
                         (y - 0.1 * c.half_y) / (0.6 * c.half_y * (0.3 + 0.7 * grow))) < 1.0
        cls[liver] = _LIVER
    vert = np.hypot(x, y - c.spine_y) < 17.0
    cls[vert] = _MARROW
    cls[np.hypot(x, y - c.spine_y - 22.0) < 7.0] = _CSF
    ax_, ay_, ar = c.aorta
    cls[np.hypot(x - ax_, y - ay_) < ar] = _AORTA
    return cls


def make_independent_cine(rng: np.random.Generator, n_phases: int = 20) -> IndependentCine:
    """Draw one subject and acquisition and render its short-axis cine stack.

    ``rng`` fully determines the result.  Pixel spacing 1.0-2.0 mm (square),
    matrix from a 300-420 x 230-340 mm FOV, slice spacing 6-10 mm, 7-16
    slices, tilt of the long axis 0-25 degrees, in-plane rotation +-50 degrees,
    LVEF about 25-75 %.
    """
    if n_phases < 2:
        raise ValueError("need n_phases >= 2")
    px = float(rng.uniform(1.0, 2.0))
    cols = 2 * round(rng.uniform(300, 420) / px / 2)
    rows = 2 * round(rng.uniform(230, 340) / px / 2)
    heart = _draw_heart(rng)
    rv_len = float(rng.uniform(0.6, 0.85)) * heart.length
    heart_xy = (float(rng.uniform(10, 45)), float(rng.uniform(-40, -5)))
    chest = _draw_chest(rng, heart_xy)
    rot = float(rng.uniform(-0.87, 0.87))
    tilt = float(rng.uniform(0.0, 0.44))
    tilt_axis = float(rng.uniform(0, 2 * np.pi))
    ss = float(rng.uniform(6.0, 10.0))
    # Stack from just below the base to somewhere between the cavity apex and past the epicardial apex.
    z_first = float(rng.uniform(0.0, 0.45)) * ss
    reach = heart.length + heart.wall * heart.apex_cap
    z_last = reach * math.cos(tilt) + float(rng.uniform(-0.9, 0.6)) * ss
    n_slices = int(np.clip(math.floor((z_last - z_first) / ss) + 1, 7, 16))
    flip = math.radians(float(rng.uniform(35, 75)))
    signal = np.zeros(15, np.float32)
    for tissue, (t1, t2, pd) in _RELAXATION.items():
        signal[tissue] = _bssfp(t1 * rng.uniform(0.85, 1.15), t2 * rng.uniform(0.85, 1.15), pd, flip)
    blood_t2 = float(rng.uniform(150, 260))
    for tissue in _BLOOD:
        signal[tissue] = _bssfp(1550 * rng.uniform(0.9, 1.1), blood_t2, 0.95, flip)
    acq = (int(rows * rng.uniform(0.55, 1.0)) // 2 * 2, int(cols * rng.uniform(0.55, 1.0)) // 2 * 2)
    n_coils = int(rng.integers(1, 7))
    snr = float(rng.uniform(12, 45))  # blood signal / noise SD in the combined image
    scale = float(rng.uniform(200, 3000))

    # Supersampled grid (2x): sample 2i sits on display pixel i, so k-space cropping keeps alignment.
    yy, xx = np.meshgrid((np.arange(2 * rows) / 2.0 - (rows - 1) / 2.0) * px,
                         (np.arange(2 * cols) / 2.0 - (cols - 1) / 2.0) * px, indexing="ij")
    cr, sr = math.cos(rot), math.sin(rot)
    x2, y2 = cr * xx + sr * yy, -sr * xx + cr * yy
    coils = _coil_maps(rng, n_coils, x2[::2, ::2], y2[::2, ::2], chest)
    # Heart frame: rotation by ``tilt`` about the in-plane axis (ka, kb), base centre at (heart_xy, z=0).
    ka, kb = math.cos(tilt_axis), math.sin(tilt_axis)
    ct, st_ = math.cos(tilt), math.sin(tilt)
    dx, dy = x2 - heart_xy[0], y2 - heart_xy[1]
    along, across = dx * ka + dy * kb, -dx * kb + dy * ka
    extent = heart.r0 + heart.wall * 2.0 + heart.rv_offset + heart.rv_par + heart.peri_fat + 10.0
    ejection = _ejection(np.arange(n_phases) / n_phases, heart)
    images = np.empty((n_phases, n_slices, rows, cols), np.float32)
    labels = np.empty((n_phases, n_slices, rows, cols), np.uint8)
    rss = np.sqrt((coils ** 2).sum(0))
    sigma = float(signal[_LV_BLOOD]) * float(rss.mean()) / snr
    for k in range(n_slices):
        z = z_first + k * ss
        bg = _chest_classes(chest, x2, y2, k / max(n_slices - 1, 1))
        b_ = across * ct - z * st_
        w_ = across * st_ + z * ct
        a = along * ka - b_ * kb
        b = along * kb + b_ * ka
        near = (np.hypot(a, b) < extent) & (w_ > -extent) & (w_ < heart.length * 1.3 + extent)
        a, b, w_ = a[near], b[near], w_[near]
        flow = 1.0 + 0.06 * _smooth_noise(rng, x2.shape, 0.01)
        texture = 1.0 + 0.05 * _smooth_noise(rng, x2.shape, 0.04)
        for p in range(n_phases):
            cls = bg.copy()
            hc = _heart_classes(heart, a, b, w_, float(ejection[p]), rv_len)
            cls[near] = np.where(hc > 0, hc, bg[near])
            img = signal[cls] * texture
            img = np.where(np.isin(cls, _BLOOD), img * flow, img)
            images[p, k] = _acquire(rng, img, coils, acq, sigma) * scale
            labels[p, k] = _LABEL[cls[::2, ::2]]
    return _study(images, labels, (px, px), ss)


def _coil_maps(rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray, chest: _Chest) -> np.ndarray:
    """Gaussian receive profiles centred on the chest surface, anterior and posterior."""
    maps = np.empty((n, *x.shape), np.float32)
    for i in range(n):
        ang = rng.uniform(0, 2 * np.pi)
        cx, cy = 1.1 * chest.half_x * math.cos(ang), 1.1 * chest.half_y * math.sin(ang)
        width = rng.uniform(120, 280)
        maps[i] = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width ** 2))
    return maps


def _acquire(rng: np.random.Generator, img2x: np.ndarray, coils: np.ndarray, acq: tuple[int, int], sigma: float) -> np.ndarray:
    """k-space cropped to the acquired matrix and zero-filled to the display one, then per-coil
    complex noise of the same bandwidth and a root-sum-of-squares combination.

    The coil profiles are smooth, so weighting after the crop instead of before changes only
    the ringing, and one transform serves all coils.
    """
    rows, cols = img2x.shape[0] // 2, img2x.shape[1] // 2
    ar, ac = acq
    k = np.fft.fftshift(np.fft.fft2(img2x)) / 4.0
    full = np.zeros((rows, cols), np.complex128)
    q0, p0 = (rows - ar) // 2, (cols - ac) // 2
    r0, c0 = (2 * rows - ar) // 2, (2 * cols - ac) // 2
    full[q0:q0 + ar, p0:p0 + ac] = k[r0:r0 + ar, c0:c0 + ac]
    clean = np.fft.ifft2(np.fft.ifftshift(full)).real
    # Per-sample SD giving ``sigma`` per real/imaginary part in the zero-filled image.
    ksd = sigma * math.sqrt(rows * cols / (ar * ac))
    noise_k = np.zeros((len(coils), rows, cols), np.complex128)
    shape = (len(coils), ar, ac)
    noise_k[:, q0:q0 + ar, p0:p0 + ac] = ksd * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    noise = np.fft.ifft2(np.fft.ifftshift(noise_k, axes=(1, 2)), axes=(1, 2)) * math.sqrt(rows * cols)
    total = (np.abs(coils * clean + noise) ** 2).sum(axis=0)
    return np.sqrt(total).astype(np.float32)


def _study(images: np.ndarray, labels: np.ndarray, spacing: tuple[float, float], ss: float) -> IndependentCine:
    voxel_ml = spacing[0] * spacing[1] * ss / 1000.0
    per_phase = labels.reshape(labels.shape[0], -1)
    lv, myo, rv = ((per_phase == v).sum(axis=1) * voxel_ml for v in (1, 2, 3))
    ed, es = int(np.argmax(lv)), int(np.argmin(lv))
    return IndependentCine(
        images=images, labels=labels, pixel_spacing_mm=spacing, slice_spacing_mm=ss,
        ed_phase=ed, es_phase=es, lvedv_ml=float(lv[ed]), lvesv_ml=float(lv[es]),
        lvef_pct=float(100.0 * (lv[ed] - lv[es]) / lv[ed]),
        rvedv_ml=float(rv[ed]), rvesv_ml=float(rv[es]),
        rvef_pct=float(100.0 * (rv[ed] - rv[es]) / rv[ed]) if rv[ed] > 0 else float("nan"),
        lv_mass_g=float(myo[ed]) * MYOCARDIAL_DENSITY_G_PER_ML,
    )
