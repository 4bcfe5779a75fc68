"""Synthetic frontal (PA) chest radiographs with labelled abnormalities.

Why this exists: the chest X-ray triage pipeline needs images with a known
ground truth (normal or not, and *where* the abnormality is) for training its
reference model, for tests, for the demo and for benchmarks, and no patient
data may ship with the node.

The images are "attenuation-like": the value is a projected density, bright
where the beam was attenuated (bone, heart, fluid) and dark where it passed
through air (lungs, outside the body), i.e. what a MONOCHROME2 radiograph
shows.  Anatomy is built analytically in a patient-fixed frame whose unit is
the chest size ``s`` (so the same phantom renders at any resolution and aspect
ratio):

* ``X`` runs across the image (patient right is on the image left, as on a PA
  film), ``Y`` runs down; the lung apices are near ``Y = -0.40`` and the
  diaphragm domes near ``Y = +0.18``;
* per hemithorax, ``u = |X|`` is the distance from the midline, so both lungs
  share one shape function.

The whole frame is rotated, scaled and shifted slightly per image, exposure
(gain, offset, gamma) varies, and quantum plus structured noise is added.

Abnormalities (``FINDINGS``), each "subtle" or "obvious":

* ``nodule``        - round opacity (a mass when obvious) inside a lung;
* ``consolidation`` - patchy air-space opacity confined to a lung;
* ``effusion``      - fluid at a lung base: a blunted costophrenic angle when
  subtle, a meniscus rising along the chest wall when obvious;
* ``pneumothorax``  - the lung collapsed towards the hilum, a thin visceral
  pleural line, no lung markings and extra lucency outside it;
* ``cardiomegaly``  - cardiothoracic ratio (CTR) > 0.5; normal hearts are
  drawn with CTR < 0.5.

``make_varied_radiograph`` is the domain-randomised variant the triage
model trains on (see its section at the end); ``make_radiograph`` is the
narrow default the pipeline tests use.

Only numpy and OpenCV are used: this module runs inside tests and the demo,
where torch, scipy and scikit-image are not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

__all__ = [
    "CARDIOMEGALY_CTR_RANGE",
    "FINDINGS",
    "NORMAL_CTR_RANGE",
    "SEVERITIES",
    "VARIED_CARDIOMEGALY_CTR_RANGE",
    "VARIED_NORMAL_CTR_RANGE",
    "Radiograph",
    "draw_finding",
    "make_radiograph",
    "make_varied_radiograph",
    "measure_ctr",
]

FINDINGS: tuple[str, ...] = (
    "nodule", "consolidation", "effusion", "pneumothorax", "cardiomegaly")
SEVERITIES: tuple[str, ...] = ("subtle", "obvious")

# Cardiothoracic ratio ranges: normal hearts stay clearly below the 0.5 rule of
# thumb, enlarged ones clearly above, with the subtle ones close to it.
NORMAL_CTR_RANGE: tuple[float, float] = (0.38, 0.47)
CARDIOMEGALY_CTR_RANGE: dict[str, tuple[float, float]] = {
    "subtle": (0.53, 0.58),
    "obvious": (0.60, 0.68),
}

# Densities (arbitrary units, roughly "fraction of the brightest soft tissue").
_BODY = 0.52          # soft tissue of the trunk
_LUNG_AIR = 0.36      # how much an aerated lung lowers the projected density
_BONE_RIB = 0.075
_BONE_CLAVICLE = 0.11
_BONE_SPINE = 0.13
_VESSEL = 0.07
_EDGE = 0.006         # soft-edge width (chest units), ~1.5 px at 256 px


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One synthetic chest radiograph and its ground truth.

    Attributes:
        image: float32 (rows, columns) in [0, 1], bright = dense (MONOCHROME2).
        finding: one of ``FINDINGS``, or None for a normal image.
        severity: "subtle" or "obvious" (None when normal).
        side: "right" or "left" (patient side) for lateralised findings, else None.
        mask: bool (rows, columns), where the abnormality is (all False if normal).
        lungs: bool (rows, columns), both aerated lung fields as drawn (before
            any collapse or fluid), for checks such as the CTR.
        heart: bool (rows, columns), the cardiac silhouette.
        ctr: the drawn cardiothoracic ratio (widest cardiac over widest inner
            thoracic diameter).
    """

    image: np.ndarray
    finding: str | None
    severity: str | None
    side: str | None
    mask: np.ndarray
    lungs: np.ndarray
    heart: np.ndarray
    ctr: float

    @property
    def abnormal(self) -> bool:
        """True when the image carries one of ``FINDINGS``."""
        return self.finding is not None


@dataclass(frozen=True)
class _Anatomy:
    """Per-image anatomical parameters in chest units (see module docstring)."""

    apex: float                 # Y of the lung apices
    apex_u: float               # half-width of the apex cap
    u_max: tuple[float, float]  # widest lateral lung extent (right, left)
    cp_y: tuple[float, float]   # Y at which the lateral border reaches u_max
    dome: tuple[float, float]   # Y of the diaphragm dome tops (right, left)
    dome_u: float               # u of the dome tops
    dome_curv: float
    medial: float               # mediastinal half-width at the lungs
    heart_x: float
    heart_y: float
    heart_r: float              # radius towards the patient's right
    heart_l: float              # radius towards the patient's left
    heart_h: float              # vertical radius
    hilum: tuple[float, float]  # (u, Y) of the hila
    heart_tilt: float = 0.0     # radians, long axis turned down towards the left
    # (amplitude, phase) of the outline's 2nd, 3rd, ... harmonics; () = ellipse
    heart_harmonics: tuple[tuple[float, float], ...] = ()


class _Frame:
    """Maps chest units to pixels for one image: rotation, scale and shift."""

    def __init__(self, rows: int, cols: int, scale: float, angle_deg: float,
                 shift: tuple[float, float]) -> None:
        self.rows, self.cols = rows, cols
        self.s = scale
        # Lungs span Y in [-0.42, 0.25]; centre that span vertically.
        self.cx = cols / 2.0 + shift[0] * scale
        self.cy = rows / 2.0 + (0.08 + shift[1]) * scale
        a = math.radians(angle_deg)
        self.c, self.sn = math.cos(a), math.sin(a)
        x = (np.arange(cols, dtype=np.float32) + 0.5 - self.cx)[None, :] / scale
        y = (np.arange(rows, dtype=np.float32) + 0.5 - self.cy)[:, None] / scale
        self.X = (x * self.c + y * self.sn).astype(np.float32)
        self.Y = (-x * self.sn + y * self.c).astype(np.float32)

    def to_px(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Chest-unit points -> (n, 2) pixel coordinates for OpenCV drawing."""
        px = self.cx + self.s * (X * self.c - Y * self.sn) - 0.5
        py = self.cy + self.s * (X * self.sn + Y * self.c) - 0.5
        return np.stack([px, py], axis=-1)

    def px(self, length: float) -> float:
        """A length in chest units, in pixels."""
        return length * self.s


def draw_finding(rng: np.random.Generator, abnormal_fraction: float = 0.5) -> str | None:
    """Draw a label: None (normal) with 1 - abnormal_fraction, else a uniform finding."""
    if rng.random() >= abnormal_fraction:
        return None
    return FINDINGS[int(rng.integers(len(FINDINGS)))]


def make_radiograph(rng: np.random.Generator, finding: str | None = None,
                    size: tuple[int, int] = (256, 256),
                    severity: str | None = None) -> Radiograph:
    """Render one synthetic frontal chest radiograph.

    Args:
        rng: the only source of randomness; the same generator state gives the
            same image.
        finding: one of ``FINDINGS`` or None for a normal chest.
        size: (rows, columns); any aspect ratio, from ~64 px up to detector size.
        severity: "subtle", "obvious" or None to draw one at random (50/50).

    Returns:
        The image with its ground-truth masks and CTR.
    """
    rows, cols, severity = _checked(rng, finding, size, severity)

    scale = min(rows / 1.02, cols / 0.98) * rng.uniform(0.90, 1.02)
    frame = _Frame(rows, cols, scale, rng.uniform(-5.0, 5.0),
                   (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)))
    anat = _draw_anatomy(rng, finding, severity)
    side_idx = int(rng.integers(2))
    side = ("right", "left")[side_idx] if finding not in (None, "cardiomegaly") else None

    X, Y = frame.X, frame.Y
    lung_soft = [_lung_soft(_side_u(X, k), Y, anat, k) for k in (0, 1)]
    heart_t = _heart_profile(X, Y, anat)
    # Aortic knob: a flat bulge of the left mediastinal border (kept broad and
    # attached so that it never looks like a nodule).
    knob = np.clip(2.0 * _disc_profile(X, Y, anat.medial - 0.012, -0.16, 0.04), 0.0, 1.0)

    density = _body(X, Y)
    density += _spine(X, Y)
    density += _BODY * 0.06 * heart_t  # heart slightly denser than mediastinum

    # Effects of the finding on the lung fields, applied per hemithorax.
    air_scale = [np.ones_like(X), np.ones_like(X)]   # 1 = fully aerated
    marking_keep = [np.ones_like(X), np.ones_like(X)]
    extra = np.zeros_like(X)
    mask = np.zeros((rows, cols), dtype=bool)
    if finding == "nodule":
        extra, mask = _nodule(rng, frame, anat, side_idx, severity, lung_soft, heart_t)
    elif finding == "consolidation":
        extra, mask = _consolidation(rng, frame, anat, side_idx, severity,
                                     lung_soft, heart_t)
    elif finding == "effusion":
        air_scale[side_idx], mask = _effusion(rng, frame, anat, side_idx, severity,
                                              lung_soft[side_idx])
        marking_keep[side_idx] = air_scale[side_idx]
    elif finding == "pneumothorax":
        extra, marking_keep[side_idx], mask = _pneumothorax(
            rng, frame, anat, side_idx, severity, lung_soft[side_idx])
    elif finding == "cardiomegaly":
        mask = heart_t > 0.0

    # Air in the lungs, displaced where the heart and aortic knob overlap them.
    displaced = 1.0 - 0.92 * np.maximum(heart_t, knob)
    lungs_air = sum(lung_soft[k] * air_scale[k] for k in (0, 1)) * displaced
    density -= _LUNG_AIR * lungs_air
    density += _trachea(X, Y)
    density += extra

    lung_texture = _smooth_noise(rng, rows, cols, cells=24) * 0.018
    markings = _vessels(rng, frame, anat)
    for k in (0, 1):
        vis = lung_soft[k] * marking_keep[k] * displaced
        density += vis * (markings + lung_texture)
        density += vis * 0.04 * _disc_profile(_side_u(X, k), Y, anat.hilum[0] - 0.02,
                                               anat.hilum[1], 0.06)
    density += _ribs(rng, frame, anat)
    density += _clavicles(rng, frame)
    density += _smooth_noise(rng, rows, cols, cells=5) * 0.025

    image = _expose(rng, density)
    lungs = (lung_soft[0] > 0.5) | (lung_soft[1] > 0.5)
    ctr = (anat.heart_r + anat.heart_l) / (anat.u_max[0] + anat.u_max[1])
    return Radiograph(image=image, finding=finding, severity=severity, side=side,
                      mask=mask, lungs=lungs, heart=heart_t > 0.0, ctr=float(ctr))


def measure_ctr(lungs: np.ndarray, heart: np.ndarray) -> float:
    """CTR measured on masks: widest heart row over the widest span of the lungs.

    Used to check the rendered image (not the parameters) has the intended
    ratio; it is insensitive to the few-degree rotation of the phantom.
    """
    heart_width = int(_row_spans(heart).max(initial=0))
    thorax_width = int(_row_spans(lungs).max(initial=0))
    if thorax_width == 0:
        raise ValueError("no lung pixels")
    return heart_width / thorax_width


def _row_spans(mask: np.ndarray) -> np.ndarray:
    """Per row: last minus first set column + 1 (0 for empty rows)."""
    any_set = mask.any(axis=1)
    first = mask.argmax(axis=1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    return np.where(any_set, last - first + 1, 0)


# --------------------------------------------------------------------------- anatomy

def _draw_anatomy(rng: np.random.Generator, finding: str | None,
                  severity: str | None) -> _Anatomy:
    u_r = rng.uniform(0.35, 0.40)
    u_l = u_r + rng.uniform(-0.015, 0.015)
    dome_l = rng.uniform(0.14, 0.19)
    dome_r = dome_l - rng.uniform(0.0, 0.04)   # right dome usually higher (liver)
    thorax = u_r + u_l
    if finding == "cardiomegaly":
        ctr = rng.uniform(*CARDIOMEGALY_CTR_RANGE[severity or "obvious"])
    else:
        ctr = rng.uniform(*NORMAL_CTR_RANGE)
    width = ctr * thorax
    # About a third of the heart lies right of the midline, two thirds left.
    right_share = rng.uniform(0.30, 0.38)
    heart_x = rng.uniform(0.015, 0.035)
    heart_r = right_share * width + heart_x
    heart_l = width - heart_r
    return _Anatomy(
        apex=rng.uniform(-0.43, -0.39), apex_u=rng.uniform(0.11, 0.14),
        u_max=(u_r, u_l), cp_y=(dome_r + 0.02, dome_l + 0.02),
        dome=(dome_r, dome_l), dome_u=rng.uniform(0.18, 0.22),
        dome_curv=rng.uniform(1.8, 2.6), medial=rng.uniform(0.055, 0.07),
        heart_x=heart_x, heart_y=dome_l - rng.uniform(0.05, 0.08),
        heart_r=heart_r, heart_l=heart_l,
        heart_h=rng.uniform(0.15, 0.18) * (1.0 + 1.2 * max(0.0, ctr - 0.5)),
        hilum=(rng.uniform(0.09, 0.12), rng.uniform(-0.09, -0.04)))


def _side_u(X: np.ndarray, k: int) -> np.ndarray:
    """Distance from the midline into hemithorax k (0 = patient right = image left)."""
    return -X if k == 0 else X


def _lung_soft(u: np.ndarray, Y: np.ndarray, a: _Anatomy, k: int) -> np.ndarray:
    """Soft (0..1) lung field of hemithorax k, from approximate signed distances."""
    return np.clip(_lung_distance(u, Y, a, k) / _EDGE + 0.5, 0.0, 1.0)


def _lung_distance(u: np.ndarray, Y: np.ndarray, a: _Anatomy, k: int) -> np.ndarray:
    """Approximate signed distance (chest units) into the lung of hemithorax k."""
    span = a.cp_y[k] - a.apex
    q = np.clip((Y - a.apex) / (0.75 * span), 0.0, 1.0)
    lateral = a.apex_u + (a.u_max[k] - a.apex_u) * np.sqrt(1.0 - (1.0 - q) ** 2)
    medial = a.medial + 0.06 * (1.0 - q) ** 6        # apices narrow towards the top
    dia = a.dome[k] + a.dome_curv * (u - a.dome_u) ** 2
    return np.minimum(np.minimum(u - medial, lateral - u), np.minimum(Y - a.apex, dia - Y))


def _heart_profile(X: np.ndarray, Y: np.ndarray, a: _Anatomy,
                   steepness: float = 3.0) -> np.ndarray:
    """Projected thickness of the heart (0 outside), asymmetric ellipse; a
    lower ``steepness`` gives a softer, more gradual border.  A tilted heart
    turns the ellipse, and harmonics make its outline irregular."""
    if a.heart_tilt == 0.0 and not a.heart_harmonics:
        rx = np.where(X < a.heart_x, a.heart_r, a.heart_l)
        r2 = ((X - a.heart_x) / rx) ** 2 + ((Y - a.heart_y) / a.heart_h) ** 2
        return np.clip(steepness * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)), 0.0, 1.0)
    c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    dx = (X - a.heart_x) * c + (Y - a.heart_y) * s
    dy = (Y - a.heart_y) * c - (X - a.heart_x) * s
    ex, ey = dx / np.where(dx < 0.0, a.heart_r, a.heart_l), dy / a.heart_h
    r2 = ex ** 2 + ey ** 2
    if a.heart_harmonics:
        r2 = r2 / _outline(np.arctan2(ey, ex), a) ** 2
    return np.clip(steepness * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)), 0.0, 1.0
                   ).astype(np.float32)


def _outline(theta: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Radius of the heart's outline at angle ``theta``, relative to the ellipse."""
    return 1.0 + sum((amp * np.cos(k * theta + phase)
                      for k, (amp, phase) in enumerate(a.heart_harmonics, start=2)),
                     np.zeros_like(theta))


def _disc_profile(X: np.ndarray, Y: np.ndarray, x0: float, y0: float,
                  r: float) -> np.ndarray:
    """Projected thickness of a sphere of radius r (0 outside, 1 at the centre)."""
    r2 = ((X - x0) ** 2 + (Y - y0) ** 2) / (r * r)
    return np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))


def _body(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Soft tissue of the trunk and shoulders: a superellipse with a soft edge."""
    half_w = 0.47 + 0.04 * np.clip(-(Y + 0.30) / 0.15, 0.0, 1.0)  # shoulders
    r = (np.abs(X) / half_w) ** 4 + (np.abs(Y - 0.08) / 0.72) ** 4
    return _BODY * np.clip((1.0 - r) / 0.08, 0.0, 1.0)


def _spine(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Vertebral column: a vertical band with faint disc spaces."""
    band = np.clip((0.045 - np.abs(X)) / 0.01, 0.0, 1.0)
    discs = 0.75 + 0.25 * np.cos(2.0 * np.pi * Y / 0.055)
    return _BONE_SPINE * band * discs


def _trachea(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Air column of the trachea down to the carina (negative density)."""
    band = np.clip((0.016 - np.abs(X - 0.005)) / 0.006, 0.0, 1.0)
    return -0.12 * band * np.clip((-0.12 - Y) / 0.03, 0.0, 1.0)


def _ribs(rng: np.random.Generator, frame: _Frame, a: _Anatomy) -> np.ndarray:
    """Posterior ribs as curved bands from the spine to the lateral chest wall."""
    layer = np.zeros((frame.rows, frame.cols), dtype=np.float32)
    t = np.linspace(0.0, 1.0, 24, dtype=np.float32)
    thick = max(1, round(frame.px(rng.uniform(0.016, 0.022))))
    spacing = rng.uniform(0.060, 0.068)
    for k in (0, 1):
        sign = -1.0 if k == 0 else 1.0
        for i in range(10):
            y0 = a.apex - 0.01 + i * spacing
            reach = a.u_max[k] + 0.04
            u = 0.04 + t * reach
            yy = y0 - 0.05 * np.sin(np.pi * t * 0.8) + 0.16 * t ** 2
            pts = frame.to_px(sign * u, yy)
            cv2.polylines(layer, [np.round(pts * 16).astype(np.int32)], False, 1.0,
                          thick, cv2.LINE_AA, 4)
    return _BONE_RIB * _blur(layer, frame.px(0.004))


def _clavicles(rng: np.random.Generator, frame: _Frame) -> np.ndarray:
    """Two clavicles: S-shaped bands from the sternal notch towards the shoulders."""
    layer = np.zeros((frame.rows, frame.cols), dtype=np.float32)
    t = np.linspace(0.0, 1.0, 16, dtype=np.float32)
    thick = max(1, round(frame.px(rng.uniform(0.022, 0.028))))
    y0 = rng.uniform(-0.40, -0.36)
    for sign in (-1.0, 1.0):
        u = 0.04 + 0.32 * t
        yy = y0 - 0.07 * t + 0.012 * np.sin(2.0 * np.pi * t)
        pts = frame.to_px(sign * u, yy)
        cv2.polylines(layer, [np.round(pts * 16).astype(np.int32)], False, 1.0,
                      thick, cv2.LINE_AA, 4)
    return _BONE_CLAVICLE * _blur(layer, frame.px(0.003))


def _vessels(rng: np.random.Generator, frame: _Frame, a: _Anatomy) -> np.ndarray:
    """Lung markings: tapering branches radiating from each hilum."""
    layer = np.zeros((frame.rows, frame.cols), dtype=np.float32)
    branches, segments = 16, 4
    for k in (0, 1):
        sign = -1.0 if k == 0 else 1.0
        # Random walk of each branch, all segments at once (0 rad = lateral).
        ang = rng.uniform(-0.55 * np.pi, 0.55 * np.pi, size=(branches, 1))
        ang = ang + np.cumsum(rng.uniform(-0.3, 0.3, size=(branches, segments)), axis=1)
        step = rng.uniform(0.12, 0.32, size=(branches, 1)) / segments
        u = a.hilum[0] + np.concatenate(
            [np.zeros((branches, 1)), np.cumsum(step * np.cos(ang), axis=1)], axis=1)
        y = a.hilum[1] + np.concatenate(
            [np.zeros((branches, 1)), np.cumsum(step * np.sin(ang), axis=1)], axis=1)
        pts = np.round(frame.to_px(sign * u, y) * 16).astype(np.int32)
        for j in range(segments):
            width = max(1, round(frame.px(0.010 * (1.0 - j / segments))))
            for b in range(branches):
                cv2.line(layer, (int(pts[b, j, 0]), int(pts[b, j, 1])),
                         (int(pts[b, j + 1, 0]), int(pts[b, j + 1, 1])),
                         1.0 - 0.6 * j / segments, width, cv2.LINE_AA, 4)
    return _VESSEL * _blur(layer, frame.px(0.003))


# --------------------------------------------------------------------------- findings

def _pick_point(rng: np.random.Generator, a: _Anatomy, k: int, r: float,
                heart_free: bool = True, y_range: tuple[float, float] = (-0.35, 0.15)
                ) -> tuple[float, float]:
    """(u, Y) of a disc of radius r lying inside lung k (rejection sampling)."""
    for _ in range(200):
        u = rng.uniform(a.medial + r, a.u_max[k] - r)
        y = rng.uniform(*y_range)
        cu = np.array([u, u + r, u - r, u, u], dtype=np.float32)
        cy = np.array([y, y, y, y + r, y - r], dtype=np.float32)
        if np.all(_lung_soft(cu, cy, a, k) >= 1.0):
            if heart_free:
                X = np.array([(-u if k == 0 else u)], dtype=np.float32)
                if _heart_profile(X, np.array([y], dtype=np.float32), a)[0] > 0.0:
                    continue
            return u, y
    return 0.5 * (a.medial + a.u_max[k]), -0.1


def _nodule(rng: np.random.Generator, frame: _Frame, a: _Anatomy, k: int,
            severity: str | None, lung_soft: list[np.ndarray],
            heart_t: np.ndarray, wide: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A round opacity; obvious ones are larger, denser and lobulated (masses)."""
    if wide:
        r, contrast = _wide_draw(rng, "nodule", severity)
    elif severity == "subtle":
        r, contrast = rng.uniform(0.018, 0.028), rng.uniform(0.10, 0.15)
    else:
        r, contrast = rng.uniform(0.04, 0.075), rng.uniform(0.18, 0.28)
    u0, y0 = _pick_point(rng, a, k, r)
    u = _side_u(frame.X, k)
    du, dy = u - u0, frame.Y - y0
    theta = np.arctan2(dy, du)
    lobes = 1.0 + (0.12 if severity == "obvious" else 0.04) * np.cos(
        3.0 * theta + rng.uniform(0, 2 * np.pi))
    r2 = (du * du + dy * dy) / (r * lobes) ** 2
    profile = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    return (contrast * profile).astype(np.float32), r2 < 1.0


def _consolidation(rng: np.random.Generator, frame: _Frame, a: _Anatomy, k: int,
                   severity: str | None, lung_soft: list[np.ndarray],
                   heart_t: np.ndarray, wide: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Patchy air-space opacity: a cluster of soft blobs clipped to one lung."""
    if wide:
        extent, contrast = _wide_draw(rng, "consolidation", severity)
        blobs = 4 if severity == "subtle" else 8
    elif severity == "subtle":
        extent, contrast, blobs = rng.uniform(0.04, 0.06), rng.uniform(0.09, 0.13), 4
    else:
        extent, contrast, blobs = rng.uniform(0.08, 0.13), rng.uniform(0.17, 0.26), 8
    u0, y0 = _pick_point(rng, a, k, extent * 0.6, heart_free=True, y_range=(-0.3, 0.12))
    u = _side_u(frame.X, k)
    field = np.zeros_like(frame.X)
    for _ in range(blobs):
        bu = u0 + rng.normal(0.0, 0.5 * extent)
        by = y0 + rng.normal(0.0, 0.5 * extent)
        sig = extent * rng.uniform(0.3, 0.55)
        field = np.maximum(field, np.exp(-((u - bu) ** 2 + (frame.Y - by) ** 2)
                                         / (2.0 * sig * sig)))
    mottle = 0.75 + 0.25 * _smooth_noise(rng, frame.rows, frame.cols, cells=40)
    opacity = np.clip((field - 0.25) / 0.5, 0.0, 1.0) * lung_soft[k]
    return (contrast * opacity * mottle).astype(np.float32), opacity > 0.3


def _effusion(rng: np.random.Generator, frame: _Frame, a: _Anatomy, k: int,
              severity: str | None, lung: np.ndarray,
              wide: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fluid at the base of lung k; returns (remaining aeration, fluid mask).

    The fluid surface is a meniscus: lowest medially, climbing along the
    lateral chest wall, and the fluid replaces the air below it.
    """
    if wide:
        height = _wide_draw(rng, "effusion", severity)[0]
    else:
        height = rng.uniform(0.05, 0.08) if severity == "subtle" else rng.uniform(0.16, 0.30)
    u = _side_u(frame.X, k)
    rel = np.clip((u - a.medial) / (a.u_max[k] - a.medial), 0.0, 1.0)
    level = a.cp_y[k] + 0.02 - height * (0.35 + 0.65 * rel ** 2)
    depth = (frame.Y - level) / 0.04        # fluid thickens away from the surface
    fluid = np.clip(depth, 0.0, 1.0) * (lung > 0.0)
    fill = rng.uniform(0.80, 0.95)
    return (1.0 - fill * fluid).astype(np.float32), (fluid > 0.25) & (lung > 0.5)


def _pneumothorax(rng: np.random.Generator, frame: _Frame, a: _Anatomy, k: int,
                  severity: str | None, lung: np.ndarray, wide: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lung k collapsed towards its hilum; returns (extra density, markings, mask).

    Outside the collapsed lung there is only pleural air: no markings and a
    little more lucency; the collapsed lung is denser and is outlined by the
    thin visceral pleural line.
    """
    if wide:
        f = _wide_draw(rng, "pneumothorax", severity)[0]
    else:
        f = rng.uniform(0.80, 0.87) if severity == "subtle" else rng.uniform(0.50, 0.70)
    hu, hy = a.hilum[0] + 0.02, a.hilum[1]
    u = _side_u(frame.X, k)
    collapsed = _lung_soft(hu + (u - hu) / f, hy + (frame.Y - hy) / f, a, k)
    air = np.clip(lung - collapsed, 0.0, 1.0)
    # Pleural line: the rim of the collapsed lung, a few tenths of a mm thick.
    line_w = max(_EDGE, 1.2 / frame.s)
    inner = _lung_soft(hu + (u - hu) / (f * (1.0 - line_w / 0.3)),
                       hy + (frame.Y - hy) / (f * (1.0 - line_w / 0.3)), a, k)
    pleural = np.clip(collapsed - inner, 0.0, 1.0) * (lung > 0.5)
    extra = -0.05 * air + 0.06 * collapsed * (1.0 - 0.5 * f) + 0.10 * pleural
    return extra.astype(np.float32), (1.0 - air).astype(np.float32), air > 0.5


# --------------------------------------------------------------------------- rendering

def _blur(layer: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with sigma in pixels (no-op below a third of a pixel)."""
    if sigma_px < 0.33:
        return layer
    return cv2.GaussianBlur(layer, (0, 0), sigma_px)


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int,
                  cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field with ~cells features across."""
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(grid, (cols, rows), interpolation=cv2.INTER_CUBIC)


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Exposure and detector: gain, offset, gamma, quantum noise, clip to [0, 1]."""
    gain = rng.uniform(0.85, 1.15)
    offset = rng.uniform(0.02, 0.10)
    gamma = rng.uniform(0.80, 1.25)
    img = np.clip(density * gain + offset, 0.0, None) ** gamma
    rows, cols = density.shape
    noise_sd = rng.uniform(0.006, 0.018)
    img = img + noise_sd * rng.standard_normal((rows, cols), dtype=np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- domain randomisation
#
# ``make_varied_radiograph`` draws from a much wider family than
# ``make_radiograph`` (whose output stays exactly as it was, for the tests
# that rely on it): habitus, lung shape, heart, bone rendering, exposure and
# tone curve, detector noise, collimation, side markers, positioning and the
# size and contrast of each finding are all randomised, so that a model
# trained on it has to learn the findings rather than one rendering.

# (low, high) of each value the finding functions draw in "wide" mode, per
# severity; they contain the default ranges and reach smaller, larger and a
# little fainter (not so faint that the 99 % sensitivity operating point,
# chosen on this family, is set by findings nobody could see).
_WIDE_RANGES: dict[str, dict[str, tuple[tuple[float, float], ...]]] = {
    "nodule": {"subtle": ((0.016, 0.032), (0.09, 0.16)),
               "obvious": ((0.032, 0.10), (0.14, 0.32))},
    "consolidation": {"subtle": ((0.035, 0.07), (0.08, 0.14)),
                      "obvious": ((0.07, 0.18), (0.14, 0.30))},
    "effusion": {"subtle": ((0.04, 0.10),), "obvious": ((0.10, 0.38),)},
    "pneumothorax": {"subtle": ((0.78, 0.88),), "obvious": ((0.40, 0.78),)},
}
VARIED_NORMAL_CTR_RANGE: tuple[float, float] = (0.34, 0.47)
VARIED_CARDIOMEGALY_CTR_RANGE: dict[str, tuple[float, float]] = {
    "subtle": (0.53, 0.58), "obvious": (0.58, 0.72)}


def _wide_draw(rng: np.random.Generator, finding: str,
               severity: str | None) -> tuple[float, ...]:
    return tuple(float(rng.uniform(*r)) for r in _WIDE_RANGES[finding][severity or "obvious"])


def _checked(rng: np.random.Generator, finding: str | None, size: tuple[int, int],
             severity: str | None) -> tuple[int, int, str | None]:
    """(rows, cols, severity) after checking the request; a finding without a
    severity draws one."""
    if finding is not None and finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS}")
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; expected one of {SEVERITIES}")
    rows, cols = int(size[0]), int(size[1])
    if rows < 32 or cols < 32:
        raise ValueError(f"size {size} too small")
    if finding is None:
        return rows, cols, None
    return rows, cols, severity if severity is not None else SEVERITIES[int(rng.integers(2))]


def make_varied_radiograph(rng: np.random.Generator, finding: str | None = None,
                           size: tuple[int, int] = (256, 256),
                           severity: str | None = None,
                           rounded: bool = False, shaped: bool = False) -> Radiograph:
    """A domain-randomised radiograph (same arguments and truth as ``make_radiograph``).

    The image is presentation-ready ([0, 1], bright = dense); stored bit
    depth, MONOCHROME1/2 and the VOI window are left to the DICOM writer.

    ``rounded`` also randomises the depth profile of the chest: the air
    path through each lung thins towards its edges (a lung is a rounded
    volume, not a slab of constant thickness: its borders fade over a random
    width instead of being cut out) and the heart's border is softer.
    Without it every seed renders the image it rendered before the option.

    ``shaped`` varies the heart beyond an upright ellipse resting on the
    domes: the heart's long axis tilts down to the left, its
    outline is irregular, it sits lower, reaching over the left dome, and a
    cardiophrenic fat pad fills the angle between heart and diaphragm.  Off
    by default for the same reason as ``rounded``.
    """
    rows, cols, severity = _checked(rng, finding, size, severity)

    scale = min(rows / 1.02, cols / 0.98) * rng.uniform(0.70, 1.08)
    frame = _Frame(rows, cols, scale, rng.normal(0.0, 4.0),
                   (rng.uniform(-0.08, 0.08), rng.uniform(-0.12, 0.08)))
    anat = _draw_anatomy_varied(rng, finding, severity)
    # The drawn ratio: a shaped heart keeps its horizontal extent.
    ctr = (anat.heart_r + anat.heart_l) / (anat.u_max[0] + anat.u_max[1])
    if shaped:
        anat = _shaped_heart(rng, anat)
    side_idx = int(rng.integers(2))
    side = ("right", "left")[side_idx] if finding not in (None, "cardiomegaly") else None

    X, Y = frame.X, frame.Y
    lung_soft = [_lung_soft(_side_u(X, k), Y, anat, k) for k in (0, 1)]
    # Air path length through each lung, relative to its thickest part.
    lung_depth = lung_soft
    heart_steepness = 3.0
    if rounded:
        taper, power = rng.uniform(0.02, 0.14), rng.uniform(0.3, 0.9)
        lung_depth = [lung_soft[k] * np.clip(_lung_distance(_side_u(X, k), Y, anat, k)
                                             / taper, 0.0, 1.0) ** power for k in (0, 1)]
        heart_steepness = rng.uniform(1.0, 3.0)
    heart_t = _heart_profile(X, Y, anat, heart_steepness)
    knob = np.clip(2.0 * _disc_profile(X, Y, anat.medial - 0.012, -0.16,
                                       rng.uniform(0.03, 0.05)), 0.0, 1.0)
    density = _body_varied(rng, X, Y, anat)
    density += rng.uniform(0.6, 1.6) * _spine(X, Y)
    density += _BODY * rng.uniform(0.0, 0.12) * heart_t
    if shaped:
        density += _fat_pads(rng, X, Y, anat)

    air_scale = [np.ones_like(X), np.ones_like(X)]
    marking_keep = [np.ones_like(X), np.ones_like(X)]
    extra = np.zeros_like(X)
    mask = np.zeros((rows, cols), dtype=bool)
    if finding == "nodule":
        extra, mask = _nodule(rng, frame, anat, side_idx, severity, lung_soft, heart_t,
                              wide=True)
    elif finding == "consolidation":
        extra, mask = _consolidation(rng, frame, anat, side_idx, severity, lung_soft,
                                     heart_t, wide=True)
    elif finding == "effusion":
        air_scale[side_idx], mask = _effusion(rng, frame, anat, side_idx, severity,
                                              lung_soft[side_idx], wide=True)
        marking_keep[side_idx] = air_scale[side_idx]
    elif finding == "pneumothorax":
        extra, marking_keep[side_idx], mask = _pneumothorax(
            rng, frame, anat, side_idx, severity, lung_soft[side_idx], wide=True)
    elif finding == "cardiomegaly":
        mask = heart_t > 0.0

    displaced = 1.0 - rng.uniform(0.80, 0.97) * np.maximum(heart_t, knob)
    lungs_air = sum(lung_depth[k] * air_scale[k] for k in (0, 1)) * displaced
    density -= _LUNG_AIR * rng.uniform(0.65, 1.3) * lungs_air
    density += _trachea(X, Y) * rng.uniform(0.3, 1.3)
    density += extra

    lung_texture = _smooth_noise(rng, rows, cols, cells=int(rng.integers(16, 40)))
    lung_texture *= rng.uniform(0.005, 0.03)
    markings = rng.uniform(0.4, 1.8) * _vessels(rng, frame, anat)
    for k in (0, 1):
        vis = lung_soft[k] * marking_keep[k] * displaced
        density += vis * (markings + lung_texture)
        density += vis * rng.uniform(0.0, 0.07) * _disc_profile(
            _side_u(X, k), Y, anat.hilum[0] - 0.02, anat.hilum[1], 0.06)
    density += _ribs_varied(rng, frame, anat)
    density += rng.uniform(0.4, 1.8) * _clavicles(rng, frame)
    density += _smooth_noise(rng, rows, cols, cells=int(rng.integers(3, 8))) \
        * rng.uniform(0.0, 0.05)

    image = _expose_varied(rng, density)
    lungs = (lung_soft[0] > 0.5) | (lung_soft[1] > 0.5)
    heart = heart_t > 0.0
    image, mask, lungs, heart = _warp(rng, image, mask, lungs, heart)
    image, field = _collimate(rng, image)
    _side_markers(rng, image)
    return Radiograph(image=image, finding=finding, severity=severity, side=side,
                      mask=mask & field, lungs=lungs, heart=heart, ctr=float(ctr))


def _draw_anatomy_varied(rng: np.random.Generator, finding: str | None,
                         severity: str | None) -> _Anatomy:
    u_r = rng.uniform(0.31, 0.43)
    u_l = u_r * rng.uniform(0.94, 1.06)
    dome_l = rng.uniform(0.10, 0.22)
    dome_r = dome_l - rng.uniform(-0.01, 0.06)
    thorax = u_r + u_l
    if finding == "cardiomegaly":
        ctr = rng.uniform(*VARIED_CARDIOMEGALY_CTR_RANGE[severity or "obvious"])
    else:
        ctr = rng.uniform(*VARIED_NORMAL_CTR_RANGE)
    width = ctr * thorax
    heart_x = rng.uniform(0.0, 0.045)
    heart_r = rng.uniform(0.25, 0.40) * width + heart_x
    return _Anatomy(
        apex=rng.uniform(-0.46, -0.36), apex_u=rng.uniform(0.09, 0.16),
        u_max=(u_r, u_l),
        cp_y=(dome_r + rng.uniform(0.0, 0.05), dome_l + rng.uniform(0.0, 0.05)),
        dome=(dome_r, dome_l), dome_u=rng.uniform(0.15, 0.25),
        dome_curv=rng.uniform(1.2, 3.2), medial=rng.uniform(0.05, 0.08),
        heart_x=heart_x, heart_y=dome_l - rng.uniform(0.04, 0.09),
        heart_r=heart_r, heart_l=width - heart_r,
        heart_h=rng.uniform(0.13, 0.20) * (1.0 + 1.2 * max(0.0, ctr - 0.5)),
        hilum=(rng.uniform(0.08, 0.13), rng.uniform(-0.10, -0.03)))


def _shaped_heart(rng: np.random.Generator, a: _Anatomy) -> _Anatomy:
    """The heart tilted, lower and with an irregular outline, its horizontal
    extent on each side of ``heart_x`` (so the drawn cardiothoracic ratio)
    kept as drawn."""
    harmonics = tuple((float(rng.uniform(0.0, 0.04)), float(rng.uniform(0.0, 2 * math.pi)))
                      for _ in range(3))
    shaped = replace(a, heart_tilt=float(rng.uniform(0.0, 0.6)), heart_harmonics=harmonics,
                     heart_y=a.dome[1] - float(rng.uniform(-0.02, 0.07)))
    for _ in range(3):  # the two half-widths interact through the turn
        right, left = _heart_extent(shaped)
        shaped = replace(shaped, heart_r=shaped.heart_r * a.heart_r / right,
                         heart_l=shaped.heart_l * a.heart_l / left)
    return shaped


def _heart_extent(a: _Anatomy) -> tuple[float, float]:
    """How far the heart's outline reaches right and left of ``heart_x``."""
    theta = np.linspace(0.0, 2 * math.pi, 721)
    g = _outline(theta, a)
    ex = np.where(np.cos(theta) < 0.0, a.heart_r, a.heart_l) * g * np.cos(theta)
    ey = a.heart_h * g * np.sin(theta)
    x = ex * math.cos(a.heart_tilt) - ey * math.sin(a.heart_tilt)
    return float(-x.min()), float(x.max())


def _fat_pads(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray,
              a: _Anatomy) -> np.ndarray:
    """Soft-tissue density in the cardiophrenic angles (one side or both)."""
    out = np.zeros_like(X)
    for sign, extent, dome in ((-1.0, a.heart_r, a.dome[0]), (1.0, a.heart_l, a.dome[1])):
        if rng.random() < 0.5:
            continue
        x0 = a.heart_x + sign * extent * float(rng.uniform(0.7, 1.0))
        r = float(rng.uniform(0.03, 0.08))
        out += _BODY * float(rng.uniform(0.03, 0.12)) * _disc_profile(X, Y, x0, dome, r)
    return out


def _body_varied(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray,
                 a: _Anatomy) -> np.ndarray:
    """Habitus: trunk width, shape and fat, a neck, arms, breasts, gastric air."""
    width = max(a.u_max) + rng.uniform(0.05, 0.24)
    shoulders = rng.uniform(0.0, 0.10)
    half_w = width + shoulders * np.clip(-(Y + 0.30) / 0.15, 0.0, 1.0)
    if rng.random() < 0.5:
        neck_y = a.apex - rng.uniform(0.02, 0.10)
        neck = rng.uniform(0.12, 0.22)
        half_w = np.where(Y < neck_y, neck + (half_w - neck)
                          * np.clip(1.0 - (neck_y - Y) / 0.06, 0.0, 1.0), half_w)
    power = rng.uniform(2.5, 5.0)
    r = (np.abs(X) / half_w) ** power + (np.abs(Y - 0.08) / rng.uniform(0.62, 0.9)) ** power
    inside = np.clip((1.0 - r) / 0.08, 0.0, 1.0)
    chord = np.sqrt(np.clip(1.0 - (X / half_w) ** 2, 0.0, 1.0))
    mix = rng.uniform(0.0, 1.0)
    out = _BODY * rng.uniform(0.8, 1.25) * inside * ((1.0 - mix) + mix * chord)
    if rng.random() < 0.4:            # arms hanging beside the trunk
        gap, arm = rng.uniform(0.0, 0.05), rng.uniform(0.07, 0.13)
        for sign in (-1.0, 1.0):
            c = sign * (width + gap + arm)
            q = np.clip(1.0 - ((X - c) / arm) ** 2, 0.0, 1.0)
            top = np.clip((Y - a.apex) / 0.05, 0.0, 1.0)
            out += _BODY * 0.55 * np.sqrt(q) * top
            bone = np.clip(1.0 - ((X - c) / (0.35 * arm)) ** 2, 0.0, 1.0)
            out += _BONE_SPINE * 0.6 * np.sqrt(bone) * top
    if rng.random() < 0.4:            # breast shadows over the lower zones
        r_b = rng.uniform(0.10, 0.20)
        amp = rng.uniform(0.02, 0.09)
        for sign in (-1.0, 1.0):
            cx, cy = sign * rng.uniform(0.15, 0.25), max(a.dome) - rng.uniform(0.0, 0.08)
            q = np.clip(1.0 - ((X - cx) / r_b) ** 2 - ((Y - cy) / (0.8 * r_b)) ** 2, 0.0, 1.0)
            out += amp * np.sqrt(q)
    if rng.random() < 0.6:            # gastric air bubble under the left dome
        r_g = rng.uniform(0.03, 0.07)
        q = np.clip(1.0 - ((X - rng.uniform(0.12, 0.25)) / (1.3 * r_g)) ** 2
                    - ((Y - a.dome[1] - rng.uniform(0.03, 0.08)) / r_g) ** 2, 0.0, 1.0)
        out -= rng.uniform(0.04, 0.14) * np.sqrt(q)
    return out.astype(np.float32)


def _ribs_varied(rng: np.random.Generator, frame: _Frame, a: _Anatomy) -> np.ndarray:
    """Posterior ribs of random count, curve, width and contrast, solid or
    cortical (a denser shell), and sometimes the fainter anterior ribs."""
    outer = np.zeros((frame.rows, frame.cols), dtype=np.float32)
    inner = np.zeros_like(outer)
    front = np.zeros_like(outer)
    t = np.linspace(0.0, 1.0, 24, dtype=np.float32)
    thick = max(1, round(frame.px(rng.uniform(0.012, 0.030))))
    spacing = rng.uniform(0.055, 0.075)
    arch, droop = rng.uniform(0.02, 0.08), rng.uniform(0.10, 0.22)
    n = int(rng.integers(9, 12))
    cortical = rng.random() < 0.5
    anterior = rng.random() < 0.6
    for k in (0, 1):
        sign = -1.0 if k == 0 else 1.0
        for i in range(n):
            y0 = a.apex - 0.01 + i * spacing
            reach = a.u_max[k] + 0.04
            u = 0.04 + t * reach
            yy = y0 - arch * np.sin(np.pi * t * 0.8) + droop * t ** 2
            pts = np.round(frame.to_px(sign * u, yy) * 16).astype(np.int32)
            cv2.polylines(outer, [pts], False, 1.0, thick, cv2.LINE_AA, 4)
            if cortical and thick >= 3:
                cv2.polylines(inner, [pts], False, 1.0, max(1, thick // 2), cv2.LINE_AA, 4)
        if anterior:
            for i in range(6):
                y0 = a.apex + 0.06 + i * spacing * 1.3
                u = a.u_max[k] * (1.0 - 0.7 * t)
                yy = y0 + 0.12 * t ** 1.3
                pts = np.round(frame.to_px(sign * u, yy) * 16).astype(np.int32)
                cv2.polylines(front, [pts], False, 1.0, thick, cv2.LINE_AA, 4)
    sigma = frame.px(rng.uniform(0.002, 0.006))
    layer = _blur(outer, sigma) - rng.uniform(0.3, 0.7) * _blur(inner, sigma)
    layer += rng.uniform(0.2, 0.5) * _blur(front, sigma)
    return rng.uniform(0.4, 1.8) * _BONE_RIB * layer


def _expose_varied(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Detector and processing: quantum noise in transmission (sometimes),
    edge enhancement, one of several tone curves, white and correlated noise,
    detector blur and a smooth gain field; clipped to [0, 1]."""
    rows, cols = density.shape
    v = density.astype(np.float32)
    if rng.random() < 0.5:
        mu = rng.uniform(3.0, 7.0)
        n0 = float(np.exp(rng.uniform(np.log(500.0), np.log(30000.0))))
        counts = n0 * np.exp(-mu * np.clip(v, 0.0, None))
        counts = counts + np.sqrt(counts) * rng.standard_normal((rows, cols), dtype=np.float32)
        v = -np.log(np.maximum(counts, 0.5) / n0) / mu
    blur_px = rng.uniform(0.0, 1.2)
    if blur_px > 0.33:
        v = cv2.GaussianBlur(v, (0, 0), blur_px)
    if rng.random() < 0.6:
        base = cv2.GaussianBlur(v, (0, 0), rng.uniform(0.02, 0.08) * max(rows, cols))
        v = v + rng.uniform(0.2, 1.5) * (v - base)
    lo, hi = np.percentile(v, [rng.uniform(0.0, 3.0), rng.uniform(97.0, 100.0)])
    z = np.clip((v - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    curve = int(rng.integers(3))
    if curve == 0:
        z = z ** rng.uniform(0.6, 1.6)
    elif curve == 1:
        slope, mid = rng.uniform(2.0, 8.0), rng.uniform(0.35, 0.65)
        s0, s1 = 1 / (1 + np.exp(slope * mid)), 1 / (1 + np.exp(-slope * (1 - mid)))
        z = (1 / (1 + np.exp(-slope * (z - mid))) - s0) / (s1 - s0)
    z = z * rng.uniform(0.75, 1.0) + rng.uniform(0.0, 0.15)
    gain = 1.0 + rng.uniform(0.0, 0.12) * _smooth_noise(rng, rows, cols, cells=3)
    z = z * gain
    white = rng.uniform(0.002, 0.03) * rng.standard_normal((rows, cols), dtype=np.float32)
    if rng.random() < 0.5:
        white = cv2.GaussianBlur(white, (0, 0), rng.uniform(0.6, 1.5)) * 2.0
    return np.clip(z + white, 0.0, 1.0).astype(np.float32)


def _warp(rng: np.random.Generator, image: np.ndarray, *masks: np.ndarray
          ) -> tuple[np.ndarray, ...]:
    """A smooth elastic deformation (lung and body shape) of image and masks."""
    if rng.random() < 0.3:
        return (image, *masks)
    rows, cols = image.shape
    amp = rng.uniform(0.005, 0.025) * max(rows, cols)
    dx = amp * _smooth_noise(rng, rows, cols, cells=3)
    dy = amp * _smooth_noise(rng, rows, cols, cells=3)
    gx, gy = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    mx, my = gx + dx, gy + dy
    out = [cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)]
    out += [cv2.remap(m.astype(np.uint8), mx, my, cv2.INTER_NEAREST,
                      borderMode=cv2.BORDER_CONSTANT) > 0 for m in masks]
    return tuple(out)


def _collimate(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collimator shadow half the time: a slightly rotated exposed rectangle,
    outside it unexposed (bright, usually) or blanked by processing (dark)."""
    rows, cols = image.shape
    field = np.ones((rows, cols), dtype=bool)
    if rng.random() < 0.5:
        return image, field
    m = rng.uniform(0.0, 0.12, size=4)
    ang = np.radians(rng.uniform(-3.0, 3.0))
    r = np.arange(rows, dtype=np.float32)[:, None] - rows / 2
    c = np.arange(cols, dtype=np.float32)[None, :] - cols / 2
    u = c * np.cos(ang) + r * np.sin(ang)
    v = -c * np.sin(ang) + r * np.cos(ang)
    field = ((u > -cols / 2 * (1 - m[0])) & (u < cols / 2 * (1 - m[1]))
             & (v > -rows / 2 * (1 - m[2])) & (v < rows / 2 * (1 - m[3])))
    fill = rng.uniform(0.85, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.1)
    noise = rng.uniform(0.0, 0.02) * rng.standard_normal((rows, cols), dtype=np.float32)
    out = np.where(field, image, np.clip(fill + noise, 0.0, 1.0)).astype(np.float32)
    return out, field


def _side_markers(rng: np.random.Generator, image: np.ndarray) -> None:
    """Lead side markers and burnt-in labels: bright blocks, dark letters."""
    rows, cols = image.shape
    for _ in range(int(rng.integers(0, 3))):
        h = max(6, int(rows * rng.uniform(0.03, 0.06)))
        w = max(6, int(h * rng.uniform(0.8, 2.5)))
        r0 = int(rng.integers(0, max(1, rows // 4)))
        c0 = int(rng.integers(0, max(1, cols - w)))
        block = np.zeros((h, w), dtype=np.uint8)
        cv2.putText(block, "RL"[int(rng.integers(2))], (1, h - 2), cv2.FONT_HERSHEY_SIMPLEX,
                    h / 30.0, 255, max(1, h // 8))
        patch = image[r0:r0 + h, c0:c0 + w]
        letter = block[:patch.shape[0], :patch.shape[1]] > 0
        patch[...] = np.where(letter, rng.uniform(0.0, 0.3), rng.uniform(0.85, 1.0))
