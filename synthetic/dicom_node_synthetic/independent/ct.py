"""Independent axial CT phantoms with exact ground truth, for held-out denoiser evaluation.

Written separately from ``dicom_node_synthetic.ct_phantom`` (which trains the
reference denoiser) and importing nothing from it; each design choice differs
on purpose, so a model that only learned that generator shows it here:

* **Anatomy**: thorax *or* upper abdomen; body a superellipse with a Fourier
  wobble and a patient table below it; organs as random star-shaped blobs
  (Fourier radius), tubes and shells, not OpenCV ellipses.  Rendered from
  implicit functions at 3x supersampling and area-averaged, so edges carry
  partial volume.
* **Intensity**: organs are not piecewise constant: each soft tissue has a
  smooth random field (a few to ~15 HU), cancellous bone a trabecular texture,
  lung a fine texture of small vessels; then an isotropic Gaussian system PSF.
  Blood pools stay near homogeneous (as contrast-mixed blood is).
* **Noise**, one of two kinds per slice:
  ``"white"``: independent Gaussian noise of a given SD per pixel;
  ``"projection"``: Gaussian (not Poisson) quantum plus electronic noise on
  ray-sampled parallel-beam line integrals, a bowtie filter
  (more photons in the centre), detector crosstalk, a random number of views,
  and filtered back-projection of the noise through one of several kernels
  (smooth to sharp), which gives streaks along dense paths and a
  kernel-shaped noise texture.  Because FBP is linear, the noisy image is
  ``truth + FBP(sinogram noise)``; its level is set by a dose factor chosen so
  that the noise SD near the body centre hits a drawn target.

``truth_hu`` is the exact noiseless image (what a perfect denoiser returns)
and ``labels`` the organ map; both are exact by construction.  numpy and
OpenCV only; seeded by ``numpy.random.default_rng``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import cv2
import numpy as np

__all__ = ["KERNELS", "NOISE_KINDS", "IndependentCtSlice", "Organ", "make_independent_slice",
           "make_independent_set"]

NOISE_KINDS = ("white", "projection")
# Reconstruction kernels: apodisation of the ramp as a function of frequency
# in cycles/pixel (Nyquist = 0.5).
KERNELS = ("smooth", "standard", "shepp-logan", "sharp")
_SUPERSAMPLE = 3
_MU_WATER = 0.0195  # 1/mm, ~65 keV


class Organ(IntEnum):
    """Labels of the organ map (independent of the training generator's)."""

    OUTSIDE = 0
    TABLE = 1
    SUBCUT_FAT = 2
    MUSCLE = 3
    LUNG = 4
    BLOOD = 5  # contrast-enhanced cardiac chambers, aorta
    MYOCARDIUM = 6
    BONE_CORTEX = 7
    BONE_MARROW = 8
    VISCERAL_FAT = 9
    LIVER = 10
    SPLEEN = 11
    KIDNEY = 12
    BOWEL_GAS = 13
    BOWEL_FLUID = 14
    VEIN = 15


@dataclass(frozen=True)
class IndependentCtSlice:
    truth_hu: np.ndarray  # float32 (rows, cols), noiseless
    noisy_hu: np.ndarray  # float32, as a scanner would store it (integer HU)
    labels: np.ndarray  # uint8 Organ map
    pixel_mm: float
    noise: str  # "white" or "projection"
    noise_sd_target_hu: float
    kernel: str | None
    n_views: int | None
    region: str  # "thorax" or "abdomen"


# ---------------------------------------------------------------------------
# Shapes on a supersampled grid (mm coordinates, y posterior)


class _Grid:
    def __init__(self, size: int, pixel_mm: float) -> None:
        n = size * _SUPERSAMPLE
        self.step = pixel_mm / _SUPERSAMPLE
        c = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * self.step
        self.xs, self.ys = c, c
        self.x, self.y = np.meshgrid(c, c)
        self.size = size
        self.hu = np.full((n, n), -1000.0, np.float32)
        self.labels = np.zeros((n, n), np.uint8)

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice]:
        """Rows and columns of the supersampled grid within ``r`` mm of (cx, cy)."""
        n = len(self.xs)
        half = (n - 1) / 2

        def span(c: float) -> slice:
            return slice(int(np.clip(math.floor((c - r) / self.step + half), 0, n)),
                         int(np.clip(math.ceil((c + r) / self.step + half) + 1, 0, n)))
        return span(cy), span(cx)

    def paint(self, mask: np.ndarray, hu: float | np.ndarray, organ: Organ) -> None:
        self.hu[mask] = hu if np.isscalar(hu) else hu[mask]
        self.labels[mask] = organ


def _blob(g: _Grid, cx: float, cy: float, r: float, rng: np.random.Generator,
          rough: float = 0.12, aspect: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """Star-shaped region: radius r * (1 + low-order Fourier series) around (cx, cy)."""
    terms = [(rough / k * rng.uniform(-1, 1), k, rng.uniform(0, 2 * math.pi)) for k in range(2, 6)]
    reach = r * (1 + sum(abs(a) for a, _, _ in terms)) * max(1.0, 1.0 / aspect)
    rs, cs = g.window(cx, cy, reach)
    dx, dy = g.xs[cs][None, :] - cx, g.ys[rs][:, None] - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = dx * ca + dy * sa
    v = (-dx * sa + dy * ca) * aspect
    theta = np.arctan2(v, u)
    rad = np.ones_like(theta)
    for amp, k, ph in terms:
        rad += amp * np.cos(k * theta + ph)
    mask = np.zeros(g.hu.shape, bool)
    mask[rs, cs] = np.hypot(u, v) <= r * rad
    return mask


def _disc(g: _Grid, cx: float, cy: float, r: float) -> np.ndarray:
    rs, cs = g.window(cx, cy, r)
    mask = np.zeros(g.hu.shape, bool)
    mask[rs, cs] = np.hypot(g.xs[cs][None, :] - cx, g.ys[rs][:, None] - cy) < r
    return mask


def _superellipse(g: _Grid, cx: float, cy: float, a: float, b: float, n: float) -> np.ndarray:
    return (np.abs((g.x - cx) / a) ** n + np.abs((g.y - cy) / b) ** n) <= 1.0


def _field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float, sd: float) -> np.ndarray:
    """Smooth zero-mean random field with the given SD (Gaussian-filtered white
    noise); ``scale_px`` in supersampled pixels.  Drawn at a third of the
    resolution and interpolated up, which a field this smooth does not notice."""
    small = (shape[0] // _SUPERSAMPLE, shape[1] // _SUPERSAMPLE)
    f = cv2.GaussianBlur(rng.standard_normal(small).astype(np.float32), (0, 0), scale_px / _SUPERSAMPLE)
    f = cv2.resize(f, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return (f * (sd / max(float(f.std()), 1e-6))).astype(np.float32)


# ---------------------------------------------------------------------------
# Anatomy


def _body(g: _Grid, rng: np.random.Generator, fov_mm: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    a = min(rng.uniform(125, 180), 0.44 * fov_mm)
    b = min(a * rng.uniform(0.62, 0.82), 0.40 * fov_mm)
    cy = rng.uniform(-12, 4)
    n = rng.uniform(2.0, 2.7)
    outer = _superellipse(g, 0.0, cy, a, b, n)
    # Table: a curved carbon-fibre plate under the patient.
    ty = cy + b + rng.uniform(6, 14)
    table = (np.abs(g.y - ty - 0.0006 * g.x ** 2) < 3.0) & (np.abs(g.x) < 0.46 * fov_mm)
    g.paint(table, rng.uniform(150, 400), Organ.TABLE)
    fat_mm = rng.uniform(6, 35)
    g.paint(outer, rng.uniform(-115, -75) + _field(rng, g.hu.shape, 18, 4), Organ.SUBCUT_FAT)
    muscle = _superellipse(g, 0.0, cy, a - fat_mm, b - fat_mm, n)
    g.paint(muscle, rng.uniform(35, 65) + _field(rng, g.hu.shape, 12, 5), Organ.MUSCLE)
    wall = rng.uniform(7, 15)
    cavity = _superellipse(g, 0.0, cy, a - fat_mm - wall, b - fat_mm - wall, n)
    return outer, cavity, a - fat_mm - wall, b - fat_mm - wall


def _vertebra(g: _Grid, rng: np.random.Generator, x: float, y: float) -> None:
    r = rng.uniform(14, 20)
    body = _blob(g, x, y, r, rng, rough=0.06, aspect=1.15)
    g.paint(body, rng.uniform(700, 1100), Organ.BONE_CORTEX)
    marrow = _blob(g, x, y, r - rng.uniform(1.5, 3), rng, rough=0.04, aspect=1.15)
    trabecular = rng.uniform(170, 280) + _field(rng, g.hu.shape, 3.0, rng.uniform(20, 45))
    g.paint(marrow, trabecular, Organ.BONE_MARROW)
    arch = (np.abs(np.hypot(g.x - x, g.y - y - r - 10) - 9) < 2.5) & (g.y > y + r)
    g.paint(arch, rng.uniform(700, 1100), Organ.BONE_CORTEX)


def _ribs(g: _Grid, rng: np.random.Generator, ca: float, cb: float) -> None:
    for t in np.linspace(0, 2 * math.pi, int(rng.integers(8, 14)), endpoint=False) + rng.uniform(0, 0.5):
        if abs(math.sin(t) + 1) < 0.15:  # anterior midline: sternum instead
            continue
        x, y = (ca + 5) * math.cos(t), (cb + 5) * math.sin(t)
        rib = _blob(g, x, y, rng.uniform(3.5, 6), rng, rough=0.05, aspect=rng.uniform(1.3, 2.0),
                    angle=t + math.pi / 2)
        g.paint(rib, rng.uniform(500, 1000), Organ.BONE_CORTEX)
    sternum = _blob(g, 0.0, -(cb + 4), rng.uniform(6, 10), rng, rough=0.05, aspect=2.0)
    g.paint(sternum, rng.uniform(400, 800), Organ.BONE_CORTEX)


def _thorax(g: _Grid, rng: np.random.Generator, cavity: np.ndarray, ca: float, cb: float) -> None:
    g.paint(cavity, rng.uniform(-100, -60), Organ.VISCERAL_FAT)
    lung_hu = rng.uniform(-880, -780)
    for side in (-1, 1):
        lung = _blob(g, side * ca * rng.uniform(0.45, 0.55), rng.uniform(-5, 10),
                     min(ca * 0.48, cb * 0.92), rng, rough=0.15, aspect=min(ca * 0.48, cb * 0.92) / (cb * 0.85),
                     angle=side * rng.uniform(0, 0.3)) & cavity
        texture = lung_hu + _field(rng, g.hu.shape, 6, 15)
        g.paint(lung, texture, Organ.LUNG)
        # Small vessels and septa: sub-millimetre to 2 mm dots at soft-tissue density.
        rows, cols = np.nonzero(lung[::9, ::9])
        for j in rng.choice(len(rows), size=min(len(rows), int(rng.integers(30, 70))), replace=False):
            vx, vy = g.x[rows[j] * 9, cols[j] * 9], g.y[rows[j] * 9, cols[j] * 9]
            dot = _disc(g, float(vx), float(vy), rng.uniform(0.5, 2.2))
            g.paint(dot & lung, rng.uniform(-100, 60), Organ.LUNG)
    # Heart: myocardial shell around two chambers, left-anterior, rotated.
    hx, hy = rng.uniform(-5, 30), rng.uniform(-35, -5)
    hr = rng.uniform(42, 62)
    ang = rng.uniform(-0.9, -0.2)
    heart = _blob(g, hx, hy, hr, rng, rough=0.08, aspect=rng.uniform(1.1, 1.35), angle=ang) & cavity
    g.paint(heart, rng.uniform(80, 130) + _field(rng, g.hu.shape, 10, 4), Organ.MYOCARDIUM)
    blood = rng.uniform(230, 520)
    mix = _field(rng, g.hu.shape, 20, 1.5)
    lv = _blob(g, hx + 0.3 * hr * math.cos(ang), hy + 0.3 * hr * math.sin(ang), hr * rng.uniform(0.38, 0.5),
               rng, rough=0.1, aspect=1.1, angle=ang) & heart
    g.paint(lv, blood + mix, Organ.BLOOD)
    rv = _blob(g, hx - 0.4 * hr * math.cos(ang), hy - 0.4 * hr * math.sin(ang), hr * rng.uniform(0.3, 0.42),
               rng, rough=0.12, aspect=1.4, angle=ang + 0.4) & heart & ~lv
    g.paint(rv, blood * rng.uniform(0.55, 0.9) + mix, Organ.BLOOD)
    # Descending aorta beside the spine.
    vy = cb * rng.uniform(0.72, 0.85)
    ar = rng.uniform(9, 15)
    g.paint(_disc(g, -rng.uniform(18, 30), vy - 18, ar), blood + mix, Organ.BLOOD)
    _vertebra(g, rng, rng.uniform(-4, 4), vy)
    _ribs(g, rng, ca, cb)


def _abdomen(g: _Grid, rng: np.random.Generator, cavity: np.ndarray, ca: float, cb: float) -> None:
    g.paint(cavity, rng.uniform(-110, -70) + _field(rng, g.hu.shape, 15, 5), Organ.VISCERAL_FAT)
    phase = rng.uniform(0, 1)  # 0 arterial .. 1 portal venous
    aorta_hu = rng.uniform(280, 480) * (1 - 0.45 * phase)
    liver = _blob(g, -ca * rng.uniform(0.35, 0.5), rng.uniform(-15, 10), min(ca, cb) * rng.uniform(0.7, 0.85),
                  rng, rough=0.18, aspect=rng.uniform(0.9, 1.2)) & cavity
    g.paint(liver, rng.uniform(55, 75) + 50 * phase + _field(rng, g.hu.shape, 8, 6), Organ.LIVER)
    for _ in range(int(rng.integers(3, 8))):  # hepatic / portal vessels
        vx = -ca * rng.uniform(0.2, 0.65)
        vy = rng.uniform(-0.5, 0.5) * cb
        vessel = _disc(g, vx, vy, rng.uniform(2, 6)) & liver
        g.paint(vessel, rng.uniform(120, 200) + 60 * phase, Organ.VEIN)
    spleen = _blob(g, ca * rng.uniform(0.55, 0.7), cb * rng.uniform(0.1, 0.4), rng.uniform(25, 45), rng,
                   rough=0.15, aspect=1.6, angle=rng.uniform(-1, 1)) & cavity & ~liver
    g.paint(spleen, rng.uniform(90, 130) + 20 * phase + _field(rng, g.hu.shape, 6, 5), Organ.SPLEEN)
    vy = cb * rng.uniform(0.55, 0.7)
    for side in (-1, 1):
        kx = side * rng.uniform(50, 75)
        kr = rng.uniform(22, 32)
        kidney = _blob(g, kx, vy - 5, kr, rng, rough=0.08, aspect=1.5, angle=side * rng.uniform(0.3, 0.8)) & cavity
        g.paint(kidney, rng.uniform(140, 220), Organ.KIDNEY)
        medulla = _blob(g, kx, vy - 5, kr * 0.55, rng, rough=0.2, aspect=1.5) & kidney
        g.paint(medulla, rng.uniform(60, 110) + 60 * phase, Organ.KIDNEY)
    # Bowel loops: gas or fluid with an enhancing wall, scattered in the anterior abdomen.
    for _ in range(int(rng.integers(4, 10))):
        bx, by = rng.uniform(-0.5, 0.8) * ca, rng.uniform(-0.9, 0.1) * cb
        br = rng.uniform(8, 20)
        outer = _blob(g, bx, by, br, rng, rough=0.1) & cavity & ~liver
        g.paint(outer, rng.uniform(40, 120), Organ.MUSCLE)
        gas = rng.random() < 0.5
        lumen = _blob(g, bx, by, br - rng.uniform(1.5, 3), rng, rough=0.1) & outer
        g.paint(lumen, rng.uniform(-1000, -950) if gas else rng.uniform(0, 25),
                Organ.BOWEL_GAS if gas else Organ.BOWEL_FLUID)
    # Aorta and IVC anterior to the spine; psoas either side.
    ax, ar = rng.uniform(-25, -8), rng.uniform(10, 15)
    mix = _field(rng, g.hu.shape, 20, 1.5)
    g.paint(_disc(g, ax, vy - 30, ar), aorta_hu + mix, Organ.BLOOD)
    g.paint(_blob(g, ax + rng.uniform(30, 40), vy - 30, rng.uniform(9, 14), rng, rough=0.1, aspect=1.5),
            rng.uniform(90, 160) + 40 * phase, Organ.VEIN)
    for side in (-1, 1):
        psoas = _blob(g, side * rng.uniform(28, 38), vy, rng.uniform(12, 18), rng, rough=0.1, aspect=0.8)
        g.paint(psoas & cavity, rng.uniform(40, 60), Organ.MUSCLE)
    _vertebra(g, rng, rng.uniform(-4, 4), vy)


def _render(rng: np.random.Generator, size: int, pixel_mm: float, region: str,
            psf_mm: float) -> tuple[np.ndarray, np.ndarray]:
    g = _Grid(size, pixel_mm)
    _, cavity, ca, cb = _body(g, rng, size * pixel_mm)
    (_thorax if region == "thorax" else _abdomen)(g, rng, cavity, ca, cb)
    hu = cv2.resize(g.hu, (size, size), interpolation=cv2.INTER_AREA)
    # Labels: the organ at each pixel's centre sample.
    labels = g.labels[_SUPERSAMPLE // 2::_SUPERSAMPLE, _SUPERSAMPLE // 2::_SUPERSAMPLE].copy()
    hu = cv2.GaussianBlur(hu, (0, 0), psf_mm / pixel_mm)
    return hu.astype(np.float32), labels


# ---------------------------------------------------------------------------
# Noise


def _apodisation(kernel: str, f: np.ndarray) -> np.ndarray:
    """Window on the ramp; ``f`` in cycles/pixel, |f| <= 0.5."""
    a = np.abs(f)
    if kernel == "smooth":
        return np.exp(-0.5 * (a / 0.17) ** 2)
    if kernel == "standard":
        return 0.54 + 0.46 * np.cos(2 * math.pi * a)  # Hamming
    if kernel == "shepp-logan":
        return np.sinc(a)
    if kernel == "sharp":
        return np.clip(1.15 - 0.4 * (a / 0.5) ** 2, 0, None)  # edge-enhancing, some gain at mid f
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def _line_integrals(mu: np.ndarray, pixel_mm: float, angles: np.ndarray, n_det: int) -> np.ndarray:
    """Ray-sampled parallel-beam line integrals (views, n_det) of a coarse mu map.

    Each view samples the image along its rays with bilinear ``cv2.remap``
    (ray-driven, in contrast to rotating the image) and sums along the ray.
    """
    n = mu.shape[0]
    c = (n - 1) / 2
    s = (np.arange(n_det, dtype=np.float32) - (n_det - 1) / 2) * (n / n_det)
    t = np.arange(n, dtype=np.float32) - c
    out = np.empty((len(angles), n_det), np.float32)
    for k, th in enumerate(angles):
        cs, sn = math.cos(th), math.sin(th)
        mx = (c + s[None, :] * cs - t[:, None] * sn).astype(np.float32)
        my = (c + s[None, :] * sn + t[:, None] * cs).astype(np.float32)
        samples = cv2.remap(mu, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[k] = samples.sum(axis=0)
    return out * pixel_mm


def _backproject(q: np.ndarray, angles: np.ndarray, size: int) -> np.ndarray:
    """Pixel-driven back-projection of filtered projections q (views, size)."""
    c = (size - 1) / 2
    xs = np.arange(size, dtype=np.float32) - c
    out = np.zeros((size, size), np.float32)
    zeros = np.zeros((size, size), np.float32)
    for k, th in enumerate(angles):
        det = (c + xs[None, :] * math.cos(th) + xs[:, None] * math.sin(th)).astype(np.float32)
        out += cv2.remap(q[k][None, :].astype(np.float32), det, zeros, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out * (math.pi / len(angles))


def _projection_noise(rng: np.random.Generator, truth_hu: np.ndarray, pixel_mm: float, kernel: str,
                      n_views: int) -> np.ndarray:
    """FBP (HU) of quantum + electronic noise on the sinogram of ``truth_hu``, unit dose."""
    size = truth_hu.shape[0]
    angles = np.arange(n_views) * (math.pi / n_views) + rng.uniform(0, math.pi / n_views)
    coarse = 4
    mu = np.maximum(_MU_WATER * (1 + cv2.resize(truth_hu, (size // coarse, size // coarse),
                                                interpolation=cv2.INTER_AREA) / 1000.0), 0).astype(np.float32)
    p_coarse = _line_integrals(mu, pixel_mm * coarse, angles, size // coarse)
    p = cv2.resize(p_coarse, (size, n_views), interpolation=cv2.INTER_LINEAR)
    s = (np.arange(size) - (size - 1) / 2) / (size / 2)
    bowtie = np.exp(-rng.uniform(1.0, 2.5) * s ** 2)[None, :]  # relative incident photons
    i0 = 1e5 * bowtie
    counts = i0 * np.exp(-p)
    electronic = rng.uniform(5, 20) ** 2
    sd = np.sqrt(counts + electronic) / counts  # SD of the log-transformed measurement
    noise = (rng.standard_normal(p.shape) * sd).astype(np.float32)
    xtalk = rng.uniform(0.05, 0.2)
    noise = cv2.filter2D(noise, -1, np.array([[xtalk, 1 - 2 * xtalk, xtalk]], np.float32),
                         borderType=cv2.BORDER_REFLECT)
    n_pad = 2 * size
    f = np.fft.rfftfreq(n_pad)
    # Absolute scale is irrelevant: the caller scales the noise to a target SD.
    filt = (f * _apodisation(kernel, f)).astype(np.float32)
    q = np.fft.irfft(np.fft.rfft(noise, n_pad, axis=1) * filt, n_pad, axis=1)[:, :size]
    mu_img = _backproject(q.astype(np.float32), angles, size) / pixel_mm
    return (1000.0 * mu_img / _MU_WATER).astype(np.float32)


def _centre_sd(img: np.ndarray, labels: np.ndarray, pixel_mm: float) -> float:
    """Noise SD in soft tissue within 40 mm of the body centre."""
    rows, cols = np.nonzero(labels > 0)
    cy, cx = rows.mean(), cols.mean()
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    near = np.hypot(yy - cy, xx - cx) * pixel_mm < 40
    return float(img[near].std())


# ---------------------------------------------------------------------------
# Public API


def make_independent_slice(rng: np.random.Generator, noise: str, size: int = 512,
                           pixel_mm: float | None = None, noise_sd_hu: float | None = None,
                           kernel: str | None = None, region: str | None = None) -> IndependentCtSlice:
    """One slice; unspecified parameters are drawn from ``rng``.

    ``noise`` is ``"white"`` or ``"projection"``.  ``noise_sd_hu`` is the
    pixel SD for white noise, and for projection noise the SD near the body
    centre that sets the dose (streaks and the bowtie make it vary elsewhere).
    ``pixel_mm`` defaults to a draw in [0.6, 0.9] mm (FOV 307-460 mm at 512).
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise {noise!r}: expected one of {NOISE_KINDS}")
    pixel_mm = float(rng.uniform(0.6, 0.9)) if pixel_mm is None else float(pixel_mm)
    region = str(rng.choice(["thorax", "abdomen"])) if region is None else region
    if region not in ("thorax", "abdomen"):
        raise ValueError(f"region {region!r}: expected 'thorax' or 'abdomen'")
    truth, labels = _render(rng, size, pixel_mm, region, psf_mm=float(rng.uniform(0.35, 0.7)))
    n_views = None
    if noise == "white":
        target = float(rng.uniform(20, 40)) if noise_sd_hu is None else float(noise_sd_hu)
        noise_img = rng.standard_normal(truth.shape).astype(np.float32) * target
        kernel = None
    else:
        target = float(rng.uniform(20, 60)) if noise_sd_hu is None else float(noise_sd_hu)
        kernel = str(rng.choice(KERNELS)) if kernel is None else kernel
        n_views = int(rng.integers(300, 601))
        noise_img = _projection_noise(rng, truth, pixel_mm, kernel, n_views)
        # Gaussian noise model: scaling the noise is exactly a change of dose.
        noise_img *= target / _centre_sd(noise_img, labels, pixel_mm)
    noisy = np.round(truth + noise_img).astype(np.float32)
    return IndependentCtSlice(truth, noisy, labels, pixel_mm, noise, target, kernel, n_views, region)


def make_independent_set(seed: int, n_per_kind: int, size: int = 512) -> list[IndependentCtSlice]:
    """``n_per_kind`` slices of each noise kind, alternating, from one seed."""
    rng = np.random.default_rng(seed)
    return [make_independent_slice(rng, kind, size=size)
            for _ in range(n_per_kind) for kind in NOISE_KINDS]
