"""Synthetic axial chest/cardiac CT phantoms with physically simulated low-dose noise.

Why this exists: the CT denoising pipeline needs paired data (the same anatomy at
full and at reduced dose) for training its reference model, for tests and for
the demo, and no patient data may ship with the node.  Real low-dose noise is
not white Gaussian noise added to the image: it comes from photon starvation in
the projections, so it is streaky along dense paths, stronger in the centre of
the body than at the edge, and its texture is shaped by the reconstruction
kernel.  We therefore simulate it where it arises:

1. draw the anatomy in Hounsfield units (HU) with OpenCV primitives;
2. convert to linear attenuation ``mu = mu_water * (1 + HU / 1000)``;
3. parallel-beam forward projection (rotate with ``cv2.warpAffine`` and sum);
4. Poisson counts at incident photon count ``i0`` per detector bin and view,
   log transform back to line integrals;
5. filtered back-projection (ramp filter with a Hann window, via numpy FFT);
6. back to HU.

The full-dose target is the FBP of the noiseless sinogram through exactly the
same geometry and kernel, so target and low-dose input share the reconstruction
blur and view-sampling artefacts and differ only by quantum noise.

Only numpy and OpenCV are used: this module runs inside tests and the demo,
where torch, scipy and scikit-image are not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import cv2
import numpy as np

__all__ = [
    "DEFAULT_I0",
    "KERNELS",
    "MU_WATER_PER_MM",
    "CtSlice",
    "CtVolume",
    "Tissue",
    "fbp",
    "forward_project",
    "hu_to_mu",
    "make_slice",
    "make_volume",
    "mu_to_hu",
    "render_anatomy",
]

# Linear attenuation of water at an effective energy of ~70 keV (1/mm).
MU_WATER_PER_MM = 0.0193
# Incident photons per detector bin and view for the default "low dose" series:
# gives a blood-pool noise SD of roughly 40-60 HU at 0.7 mm pixels, the range of a
# quarter-dose chest CT with a standard kernel.
DEFAULT_I0 = 1.5e4
# Views over 180 degrees; must be even (views are processed in 90-degree pairs).
DEFAULT_VIEWS = 360

_HU_AIR = -1000.0


class Tissue(IntEnum):
    """Labels of the tissue map returned with each slice."""

    AIR = 0
    FAT = 1
    MUSCLE = 2  # chest wall muscle and other soft tissue
    LUNG = 3
    BLOOD = 4  # contrast-filled heart chambers and great vessels
    MYOCARDIUM = 5
    CORONARY = 6  # small contrast-filled vessels
    CALCIUM = 7
    BONE = 8


@dataclass(frozen=True)
class CtSlice:
    """One synthetic axial slice.

    ``full_dose_hu`` and ``low_dose_hu`` are float32 (rows, cols) images in HU
    reconstructed with the same geometry; ``labels`` is the uint8 ``Tissue`` map
    of the anatomy before projection (so it is sharper than the images).
    """

    full_dose_hu: np.ndarray
    low_dose_hu: np.ndarray
    labels: np.ndarray
    pixel_mm: float
    i0: float


@dataclass(frozen=True)
class CtVolume:
    """A short stack of contiguous slices, arrays shaped (z, rows, cols)."""

    full_dose_hu: np.ndarray
    low_dose_hu: np.ndarray
    labels: np.ndarray
    pixel_mm: float
    slice_mm: float
    i0: float


# ---------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True)
class _Anatomy:
    """Random draws for one patient; geometry at a given z is derived from it.

    Everything is in mm relative to the image centre, x to the image right and
    y down (posterior), so the same patient renders at any pixel size.
    """

    body_a: float
    body_b: float
    body_harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2..
    fat_mm: float
    muscle_mm: float
    fat_hu: float
    muscle_hu: float
    lung_hu: float
    blood_hu: float
    myo_hu: float
    heart_cx: float
    heart_cy: float
    heart_r: float
    heart_angle: float
    aorta_hu: float
    asc_aorta_r: float
    desc_aorta_r: float
    n_ribs: int
    rib_phase: float
    coronary_angles: tuple[float, ...]
    calcium: tuple[tuple[int, float, float, float], ...]  # (coronary idx, z0, length, hu)
    lung_vessels: tuple[tuple[float, float, float, float], ...]  # (u, v, r, z phase) in lung frame
    z_phase: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Sample one patient's anatomy within plausible adult ranges."""
    n_cor = int(rng.integers(3, 6))
    # The first plaque always crosses z = 0 so every single slice has calcium.
    calcium = tuple(
        (int(rng.integers(0, n_cor)), float(rng.uniform(-8, 8)) if i else float(rng.uniform(-1, 1)),
         float(rng.uniform(3, 10)), float(rng.uniform(600, 1200)))
        for i in range(int(rng.integers(1, 4)))
    )
    vessels = tuple(
        (float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.8, 0.8)), float(rng.uniform(1.0, 2.5)),
         float(rng.uniform(0, 2 * math.pi)))
        for _ in range(int(rng.integers(12, 24)))
    )
    return _Anatomy(
        body_a=float(rng.uniform(135, 165)),
        body_b=float(rng.uniform(100, 125)),
        body_harmonics=tuple((float(rng.uniform(0, 0.03)), float(rng.uniform(0, 2 * math.pi)))
                             for _ in range(4)),
        fat_mm=float(rng.uniform(6, 22)),
        muscle_mm=float(rng.uniform(8, 16)),
        fat_hu=float(rng.uniform(-120, -80)),
        muscle_hu=float(rng.uniform(40, 60)),
        lung_hu=float(rng.uniform(-880, -820)),
        blood_hu=float(rng.uniform(300, 450)),
        myo_hu=float(rng.uniform(40, 70)),
        heart_cx=float(rng.uniform(5, 25)),
        heart_cy=float(rng.uniform(-25, -10)),
        heart_r=float(rng.uniform(45, 60)),
        heart_angle=float(rng.uniform(-40, -20)),
        aorta_hu=float(rng.uniform(300, 450)),
        asc_aorta_r=float(rng.uniform(13, 18)),
        desc_aorta_r=float(rng.uniform(10, 14)),
        n_ribs=int(rng.integers(9, 13)),
        rib_phase=float(rng.uniform(0, 0.3)),
        coronary_angles=tuple(float(a) for a in np.sort(rng.uniform(0, 2 * math.pi, n_cor))),
        calcium=calcium,
        lung_vessels=vessels,
        z_phase=float(rng.uniform(0, 2 * math.pi)),
    )


class _Canvas:
    """HU image plus tissue labels, drawn in mm coordinates with sub-pixel precision."""

    _SHIFT = 4  # cv2 fixed-point bits: coordinates are exact to 1/16 pixel

    def __init__(self, size: int, pixel_mm: float, scale: float) -> None:
        self.size = size
        self.px = pixel_mm / scale  # mm per pixel after fitting the body into the FOV
        self.hu = np.full((size, size), _HU_AIR, np.float32)
        self.labels = np.zeros((size, size), np.uint8)

    def _pt(self, x_mm: float, y_mm: float) -> tuple[int, int]:
        c = (self.size - 1) / 2
        f = 1 << self._SHIFT
        return (round((c + x_mm / self.px) * f), round((c + y_mm / self.px) * f))

    def _mask_ellipse(self, x: float, y: float, a: float, b: float, angle: float) -> np.ndarray:
        m = np.zeros((self.size, self.size), np.uint8)
        f = 1 << self._SHIFT
        axes = (max(1, round(a / self.px * f)), max(1, round(b / self.px * f)))
        cv2.ellipse(m, self._pt(x, y), axes, angle, 0, 360, 1, -1, cv2.LINE_8, self._SHIFT)
        return m.astype(bool)

    def ellipse(self, x: float, y: float, a: float, b: float, angle: float,
                hu: float, tissue: Tissue, within: np.ndarray | None = None) -> np.ndarray:
        m = self._mask_ellipse(x, y, a, b, angle)
        if within is not None:
            m &= within
        self.hu[m] = hu
        self.labels[m] = tissue
        return m

    def polygon_mask(self, pts_mm: np.ndarray) -> np.ndarray:
        m = np.zeros((self.size, self.size), np.uint8)
        pts = np.array([self._pt(float(x), float(y)) for x, y in pts_mm], np.int32)
        cv2.fillPoly(m, [pts], 1, cv2.LINE_8, self._SHIFT)
        return m.astype(bool)

    def fill(self, mask: np.ndarray, hu: float, tissue: Tissue) -> None:
        self.hu[mask] = hu
        self.labels[mask] = tissue


def _body_outline(an: _Anatomy, inset_mm: float, z_s: float) -> np.ndarray:
    """Irregular ellipse (polygon in mm), shrunk by ``inset_mm`` along the normal."""
    t = np.linspace(0, 2 * math.pi, 180, endpoint=False)
    wobble = 1.0 + sum(amp * np.cos((k + 2) * t + ph + 0.3 * z_s)
                       for k, (amp, ph) in enumerate(an.body_harmonics))
    a = an.body_a * (1 + 0.02 * z_s) - inset_mm
    b = an.body_b * (1 + 0.02 * z_s) - inset_mm
    # Flatter back than front: patients lie supine on the table.
    y = b * np.sin(t) * wobble
    y = np.where(y > 0, y * 0.85, y)
    return np.stack([a * np.cos(t) * wobble, y], axis=1)


def _render(an: _Anatomy, z_mm: float, size: int, pixel_mm: float) -> _Canvas:
    """Draw the anatomy at axial position ``z_mm`` (0 = reference slice).

    Sizes vary smoothly with z (sinusoids over a few cm) so a short stack of
    slices looks like a continuous scan rather than independent patients.
    """
    fov_half = (size - 1) / 2 * pixel_mm
    # Keep the body inside the inscribed circle: corners are lost in rotation.
    scale = min(1.0, 0.92 * fov_half / (an.body_a * 1.03))
    cv = _Canvas(size, pixel_mm, scale)
    z_s = math.sin(z_mm / 40.0 + an.z_phase)  # slow anatomical change, in [-1, 1]
    z_f = math.sin(z_mm / 9.0 + an.z_phase)  # faster change for small structures

    body = cv.polygon_mask(_body_outline(an, 0.0, z_s))
    cv.fill(body, an.fat_hu, Tissue.FAT)
    muscle = cv.polygon_mask(_body_outline(an, an.fat_mm, z_s))
    cv.fill(muscle, an.muscle_hu, Tissue.MUSCLE)
    cavity = cv.polygon_mask(_body_outline(an, an.fat_mm + an.muscle_mm, z_s))
    cv.fill(cavity, an.fat_hu + 20, Tissue.FAT)  # mediastinal fat fills what is left

    # Lungs: two large ellipses either side, clipped to the cavity.
    ca = an.body_a - an.fat_mm - an.muscle_mm
    cb = an.body_b - an.fat_mm - an.muscle_mm
    lung_masks = []
    for side in (-1.0, 1.0):
        lx = side * ca * 0.52
        la = ca * (0.42 + 0.02 * z_s)
        lb = cb * 0.85
        lung_masks.append(cv.ellipse(lx, cb * 0.05, la, lb, side * 8, an.lung_hu, Tissue.LUNG,
                                     within=cavity))
        for u, v, r, ph in an.lung_vessels:
            if (u > 0) == (side > 0):
                cv.ellipse(lx + u * la * 0.8, cb * 0.05 + v * lb * 0.8 + 3 * math.sin(z_mm / 6 + ph),
                           r, r, 0, an.muscle_hu, Tissue.MUSCLE, within=lung_masks[-1])

    # Ribs along the inner chest wall; sternum anteriorly.
    rib_outline = _body_outline(an, an.fat_mm + an.muscle_mm * 0.5, z_s)
    n = len(rib_outline)
    for i in range(an.n_ribs):
        frac = (an.rib_phase + (i + 0.5) / an.n_ribs) % 1.0
        if abs(frac - 0.75) < 0.06:  # skip the midline anteriorly (sternum goes there)
            continue
        x, y = rib_outline[int(frac * n) % n]
        cv.ellipse(float(x), float(y), 6, 3.5, math.degrees(math.atan2(y, x)) + 90, 800, Tissue.BONE)
        cv.ellipse(float(x), float(y), 4, 1.8, math.degrees(math.atan2(y, x)) + 90, 250, Tissue.BONE)
    sy = -(an.body_b - an.fat_mm - an.muscle_mm * 0.5) * (1 + 0.02 * z_s)
    cv.ellipse(0, sy, 14, 5, 0, 700, Tissue.BONE)
    cv.ellipse(0, sy, 11, 3, 0, 200, Tissue.BONE)

    # Heart: epicardial fat, myocardium, chambers; anterior and to the patient's left.
    hr = an.heart_r * (1 + 0.08 * z_s)
    hx, hy, ang = an.heart_cx, an.heart_cy, an.heart_angle
    cv.ellipse(hx, hy, hr * 1.12, hr * 0.92, ang, an.fat_hu + 20, Tissue.FAT, within=cavity)
    heart = cv.ellipse(hx, hy, hr, hr * 0.8, ang, an.myo_hu, Tissue.MYOCARDIUM, within=cavity)
    rad = math.radians(ang)
    ux, uy = math.cos(rad), math.sin(rad)
    # Left ventricle: thick wall; right ventricle: thin wall, slightly less contrast.
    cv.ellipse(hx + 0.25 * hr * ux, hy + 0.25 * hr * uy, hr * 0.45, hr * 0.38, ang,
               an.blood_hu, Tissue.BLOOD, within=heart)
    cv.ellipse(hx - 0.42 * hr * ux + 0.1 * hr * uy, hy - 0.42 * hr * uy - 0.1 * hr * ux,
               hr * 0.42, hr * 0.45, ang, an.blood_hu * 0.9, Tissue.BLOOD, within=heart)
    # Left atrium posteriorly, appears as z changes.
    la_r = hr * (0.25 + 0.1 * z_s)
    cv.ellipse(hx - 0.1 * hr, hy + 0.6 * hr, la_r * 1.3, la_r, 0, an.blood_hu, Tissue.BLOOD,
               within=cavity)

    # Ascending aorta anterior-right of the heart.
    aax, aay = hx - 0.55 * hr, hy - 0.55 * hr
    cv.ellipse(aax, aay, an.asc_aorta_r + 1.5, an.asc_aorta_r + 1.5, 0, an.muscle_hu,
               Tissue.MUSCLE, within=cavity)
    cv.ellipse(aax, aay, an.asc_aorta_r, an.asc_aorta_r, 0, an.aorta_hu, Tissue.BLOOD,
               within=cavity)

    # Coronary arteries in the epicardial fat, with calcified plaques over a z range.
    for k, theta in enumerate(an.coronary_angles):
        t = theta + 0.08 * z_f
        ex, ey = hr * 1.05 * math.cos(t), hr * 0.86 * math.sin(t)
        cx = hx + ex * ux - ey * uy
        cy = hy + ex * uy + ey * ux
        r = 1.6 + 0.3 * math.cos(k + z_f)
        cv.ellipse(cx, cy, r, r, 0, an.blood_hu, Tissue.CORONARY)
        for ci, z0, length, chu in an.calcium:
            if ci == k and abs(z_mm - z0) <= length / 2:
                cv.ellipse(cx + 0.8 * r, cy, 1.2, 1.0, 0, chu, Tissue.CALCIUM)

    # Spine and descending aorta, posterior midline; drawn last so the heart
    # never overlaps them.
    vy = cb * 0.78
    cv.ellipse(0, vy + 8, 14, 22, 0, an.muscle_hu, Tissue.MUSCLE)  # paraspinal muscle
    cv.ellipse(0, vy, 17, 15, 0, 750, Tissue.BONE)  # cortex
    cv.ellipse(0, vy, 14, 12, 0, 220, Tissue.BONE)  # cancellous bone
    cv.ellipse(0, vy + 22, 8, 7, 0, 750, Tissue.BONE)  # posterior arch
    cv.ellipse(0, vy + 22, 5.5, 4.5, 0, 20, Tissue.MUSCLE)  # spinal canal
    cv.ellipse(0, vy + 36, 4, 8, 0, 700, Tissue.BONE)  # spinous process
    cv.ellipse(-22, vy - 12, an.desc_aorta_r + 1.5, an.desc_aorta_r + 1.5, 0,
               an.muscle_hu, Tissue.MUSCLE)
    cv.ellipse(-22, vy - 12, an.desc_aorta_r, an.desc_aorta_r, 0, an.aorta_hu, Tissue.BLOOD)

    return cv


# ---------------------------------------------------------------------------
# Projection physics


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """HU to linear attenuation (1/mm); air (-1000 HU) maps to 0."""
    return np.maximum(MU_WATER_PER_MM * (1.0 + hu.astype(np.float32) / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) back to HU."""
    return (1000.0 * (mu / MU_WATER_PER_MM - 1.0)).astype(np.float32)


def _rotation(size: int, deg: float) -> np.ndarray:
    c = (size - 1) / 2
    return cv2.getRotationMatrix2D((c, c), deg, 1.0)


def _view_angles(n_views: int) -> np.ndarray:
    """First half of the views; each is paired with the view 90 degrees later."""
    if n_views % 2:
        raise ValueError("n_views must be even")
    return np.arange(n_views // 2) * (180.0 / n_views)


def forward_project(mu: np.ndarray, pixel_mm: float, n_views: int = DEFAULT_VIEWS) -> np.ndarray:
    """Parallel-beam line integrals, (n_views, size), dimensionless (mu * mm).

    One rotation serves two views: summing the rotated image over rows gives the
    view at theta, summing over columns the view at theta + 90 degrees.  This
    halves the cost, which dominates phantom generation.
    """
    size = mu.shape[0]
    angles = _view_angles(n_views)
    half = len(angles)
    sino = np.empty((n_views, size), np.float32)
    for k, deg in enumerate(angles):
        r = cv2.warpAffine(mu, _rotation(size, deg), (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        sino[k] = r.sum(axis=0)
        sino[k + half] = r.sum(axis=1)
    return sino * pixel_mm


# Reconstruction kernels (opt-in; ``hann`` is the default everywhere): the
# window on the ramp as a function of frequency in cycles per sample
# (Nyquist 0.5).  ``ramlak`` is the sharpest, ``smooth`` a Gaussian roll-off.
KERNELS = ("hann", "hamming", "shepp-logan", "ramlak", "smooth")


def _window(kernel: str, freq: np.ndarray) -> np.ndarray:
    if kernel == "hann":
        return 0.5 * (1 + np.cos(2 * math.pi * freq))
    if kernel == "hamming":
        return 0.54 + 0.46 * np.cos(2 * math.pi * freq)
    if kernel == "shepp-logan":
        return np.sinc(freq)
    if kernel == "ramlak":
        return np.ones_like(freq)
    if kernel == "smooth":
        return np.exp(-0.5 * (freq / 0.2) ** 2)
    raise ValueError(f"unknown reconstruction kernel {kernel!r}; expected one of {KERNELS}")


def _ramp_filter(n_det: int, kernel: str = "hann") -> np.ndarray:
    """Frequency response of the Ram-Lak ramp with a window, padded length.

    The ramp is built from its exact spatial-domain samples (Kak & Slaney) so the
    DC term is right and flat regions reconstruct to the correct HU; the Hann
    window is the "standard" soft-tissue kernel and gives CT-like noise texture.
    """
    n_pad = max(64, int(2 ** math.ceil(math.log2(2 * n_det))))
    n = np.concatenate([np.arange(1, n_pad // 2 + 1, 2), np.arange(n_pad // 2 - 1, 0, -2)])
    h = np.zeros(n_pad)
    h[0] = 0.25
    h[1::2] = -1.0 / (math.pi * n) ** 2
    ramp = 2 * np.real(np.fft.fft(h))
    freq = np.fft.fftfreq(n_pad)
    return (ramp * _window(kernel, freq)).astype(np.float32)


def fbp(sinogram: np.ndarray, pixel_mm: float, kernel: str = "hann") -> np.ndarray:
    """Filtered back-projection of ``forward_project`` output; returns mu (1/mm).

    Back-projection is the adjoint of the paired rotate-and-sum projector, so a
    pair of views is smeared into one image (rows + columns) and rotated back once.
    ``kernel`` is one of ``KERNELS``.
    """
    n_views, size = sinogram.shape
    filt = _ramp_filter(size, kernel)
    padded = np.zeros((n_views, len(filt)), np.float32)
    padded[:, :size] = sinogram
    q = np.real(np.fft.ifft(np.fft.fft(padded, axis=1) * filt, axis=1))[:, :size].astype(np.float32)
    angles = _view_angles(n_views)
    half = len(angles)
    out = np.zeros((size, size), np.float32)
    for k, deg in enumerate(angles):
        smear = q[k][None, :] + q[k + half][:, None]
        out += cv2.warpAffine(smear, _rotation(size, -deg), (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out * (math.pi / (2 * n_views)) / pixel_mm


def _simulate(hu: np.ndarray, pixel_mm: float, i0: float, n_views: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(full-dose HU, low-dose HU) reconstructions of one HU image."""
    sino = forward_project(hu_to_mu(hu), pixel_mm, n_views)
    counts = rng.poisson(i0 * np.exp(-sino.astype(np.float64)))
    # Zero counts (photon starvation) would give log(0); clamp like a scanner's
    # pre-log correction does, to half a photon.
    noisy = -np.log(np.maximum(counts, 0.5) / i0).astype(np.float32)
    full = mu_to_hu(fbp(sino, pixel_mm))
    low = mu_to_hu(fbp(noisy, pixel_mm))
    return full, low


# ---------------------------------------------------------------------------
# Public API


def make_slice(rng: np.random.Generator, size: int = 512, pixel_mm: float = 0.7,
               i0: float = DEFAULT_I0, n_views: int = DEFAULT_VIEWS) -> CtSlice:
    """One random chest slice at the level of the heart, full and low dose.

    ``i0`` is the incident photon count per detector bin and view of the
    low-dose scan (lower = noisier); ``n_views`` projections cover 180 degrees.
    If ``size * pixel_mm`` is smaller than a chest the anatomy is scaled to fit.
    """
    an = _draw_anatomy(rng)
    cv = _render(an, 0.0, size, pixel_mm)
    full, low = _simulate(cv.hu, pixel_mm, i0, n_views, rng)
    return CtSlice(full, low, cv.labels, pixel_mm, float(i0))


def render_anatomy(rng: np.random.Generator, size: int = 512,
                   pixel_mm: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """The noiseless HU image and ``Tissue`` labels of one random patient at
    z = 0, before any projection: for recipes that simulate their own scans
    (other kernels, doses or noise models) from this anatomy."""
    cv = _render(_draw_anatomy(rng), 0.0, size, pixel_mm)
    return cv.hu, cv.labels


def make_volume(rng: np.random.Generator, n_slices: int, size: int = 512,
                pixel_mm: float = 0.7, slice_mm: float = 3.0, i0: float = DEFAULT_I0,
                n_views: int = DEFAULT_VIEWS) -> CtVolume:
    """A stack of ``n_slices`` contiguous slices of one patient, arrays (z, y, x).

    Anatomy changes smoothly with z (heart and lungs grow and shrink, vessels and
    calcified plaques come and go), noise is independent per slice as in a real
    scan.
    """
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    an = _draw_anatomy(rng)
    fulls, lows, labels = [], [], []
    for i in range(n_slices):
        z = (i - (n_slices - 1) / 2) * slice_mm
        cv = _render(an, z, size, pixel_mm)
        full, low = _simulate(cv.hu, pixel_mm, i0, n_views, rng)
        fulls.append(full)
        lows.append(low)
        labels.append(cv.labels)
    return CtVolume(np.stack(fulls), np.stack(lows), np.stack(labels), pixel_mm, slice_mm, float(i0))
