"""Physically motivated synthetic chest radiographs: a second training family.

Why this exists: a triage model trained on one generator learns that
generator's look (its edge profiles, its noise, its way of drawing a heart)
as much as the task.  This module makes frontal (PA) chest radiographs with
the same ground-truth semantics as :mod:`dicom_node_synthetic.cxr_phantom`
(it returns that module's :class:`Radiograph`) but builds them in a different
way, so that a model trained on both families has to learn what a nodule, an
effusion or an enlarged heart *is* rather than how one renderer paints it.

How an image is made (every step has several randomised choices):

1. Geometry is built in a chest-size-normalised frame (``X`` across the image,
   patient right on the image left as on a PA film, ``Y`` down; the lungs span
   roughly ``|X| < 0.44`` and ``-0.45 < Y < 0.28``).  Outlines are closed
   polygons drawn in one of several ways (spline through jittered landmarks,
   a 6-14 vertex polygon with cut corners, a superellipse cap on a
   diaphragm), then mapped to pixels by a rotation, scale and shift, so any
   size or aspect renders the same patient.
2. Each structure becomes a path-length map in centimetres: outlines are
   extruded with a depth profile of the distance to their edge (elliptic,
   power, smoothstep or saturating, chosen per structure); round things are
   projected ellipsoids or hollow shells (ribs, vertebrae, humeral heads give
   bright cortical edges because the beam runs tangentially through them).
3. Path lengths times linear attenuation coefficients (soft tissue, fat,
   fluid, aerated lung, air, cortical bone, marrow; each jittered) give the
   line integrals.  Intensity follows Beer-Lambert, optionally as a mix of
   two or three exponentials with energy-dependent scaling (bone attenuates
   relatively more at low energy: beam hardening), with a heel-effect
   gradient, scatter (a heavily blurred fraction of the primary), an
   optional anti-scatter grid, quantum noise at a random dose, detector blur
   and a log transform back to a density image.
4. Vendor-style processing is sometimes applied: multi-scale unsharp
   enhancement, a sigmoid or gamma tone curve, a mild (CLAHE) equalisation,
   then a percentile window to [0, 1].  Collimation borders, lead side
   markers and burned-in text appear sometimes, always outside the lungs.

Findings change the physics, not the paint: a nodule or consolidation
replaces aerated lung by soft tissue or fluid, an effusion replaces the air
path at the lung base by fluid, a pneumothorax replaces lung parenchyma by
free air and removes its vessels, cardiomegaly widens the heart to a drawn
cardiothoracic ratio.

Randomness comes from independent child generators for anatomy, acquisition,
finding and noise, so the same seed with and without a finding shows the same
patient on the same machine; only the abnormality differs.

Only numpy and OpenCV are used (the module runs where torch, scipy and
scikit-image are not installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from .cxr_phantom import FINDINGS, SEVERITIES, Radiograph, measure_ctr

__all__ = [
    "PHYSICS_CARDIOMEGALY_CTR_RANGE",
    "PHYSICS_NORMAL_CTR_RANGE",
    "make_physics_radiograph",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]
Pts = npt.NDArray[np.float64]

# Truth ranges of the cardiothoracic ratio in this family.
PHYSICS_NORMAL_CTR_RANGE: tuple[float, float] = (0.36, 0.48)
PHYSICS_CARDIOMEGALY_CTR_RANGE: dict[str, tuple[float, float]] = {
    "subtle": (0.53, 0.58),
    "obvious": (0.58, 0.72),
}
# Drawn a little inside the truth ranges so that rasterisation of the masks
# (about one pixel on a heart of ~80) never carries a ratio out of them.
_DRAW_CTR = {
    None: (0.372, 0.468),
    "subtle": (0.537, 0.574),
    "obvious": (0.59, 0.71),
}
_LATERAL = ("nodule", "consolidation", "effusion", "pneumothorax")

# Chest-frame raster used to measure the CTR independently of the output size.
_RASTER_RES = 400.0                 # px per chest unit
_RASTER_ORIGIN = (-0.62, -0.72)     # chest coordinates of the raster's corner
_RASTER_SHAPE = (500, 496)          # rows, cols


# --------------------------------------------------------------------------- API

def make_physics_radiograph(rng: np.random.Generator, finding: str | None = None,
                            size: tuple[int, int] = (256, 256),
                            severity: str | None = None) -> Radiograph:
    """Render one physically motivated synthetic frontal chest radiograph.

    Args:
        rng: the only source of randomness; the same generator state gives the
            same image.  Anatomy, acquisition, finding and noise use child
            generators seeded from it, so the same state with another
            ``finding`` shows the same patient and machine.
        finding: one of ``FINDINGS`` or None for a normal chest.
        size: (rows, columns); any aspect ratio from ~64 px upwards.
        severity: "subtle", "obvious" or None to draw one (ignored when normal).

    Returns:
        The image (float32 in [0, 1], bright = dense) with its ground truth.
    """
    return _make(rng, finding, size, severity, tilt=True)


# --------------------------------------------------------------------------- frame

@dataclass(frozen=True)
class _Frame:
    """Chest-unit to pixel mapping and the per-pixel chest coordinates."""

    rows: int
    cols: int
    s: float        # pixels per chest unit
    cos: float
    sin: float
    cx: float       # pixel position of the chest origin
    cy: float
    X: F32
    Y: F32

    def px(self, pts: Pts) -> Pts:
        """Chest coordinates (N, 2) to pixel (col, row) coordinates."""
        x, y = pts[:, 0], pts[:, 1]
        return np.stack([self.cx + self.s * (self.cos * x - self.sin * y),
                         self.cy + self.s * (self.sin * x + self.cos * y)], axis=1)


def _make_frame(rng: np.random.Generator, rows: int, cols: int, tilt: bool) -> _Frame:
    # The chest box (body width ~1.04, apices to costophrenic angles plus
    # margins ~0.86) fills 65-100 % of the limiting image dimension.
    fill = rng.uniform(0.65, 1.0)
    s = fill * min(cols / 1.04, rows / 0.86)
    angle = math.radians(rng.uniform(-8.0, 8.0)) if tilt else 0.0
    free_x = max(cols - 1.04 * s, 0.0) / 2.0
    free_y = max(rows - 0.86 * s, 0.0) / 2.0
    ccx = cols / 2.0 + rng.uniform(-0.6, 0.6) * free_x + rng.normal(0.0, 0.01) * s
    ccy = rows / 2.0 + rng.uniform(-0.6, 0.6) * free_y + rng.normal(0.0, 0.01) * s
    c, sn = math.cos(angle), math.sin(angle)
    # The chest box centre (0, -0.09) goes to (ccx, ccy).
    cx, cy = ccx - 0.09 * s * sn, ccy + 0.09 * s * c
    col, row = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    dc, dr = (col - cx) / s, (row - cy) / s
    X = (c * dc + sn * dr).astype(np.float32)
    Y = (-sn * dc + c * dr).astype(np.float32)
    return _Frame(rows, cols, s, c, sn, cx, cy, X, Y)


# --------------------------------------------------------------------------- geometry helpers

def _catmull_rom(P: Pts, n: int, closed: bool = True) -> Pts:
    """Uniform Catmull-Rom spline through P with n samples per segment."""
    if closed:
        Q = np.concatenate([P[-1:], P, P[:2]])
    else:
        Q = np.concatenate([P[:1], P, P[-1:]])
    p0, p1, p2, p3 = Q[:-3, None], Q[1:-2, None], Q[2:-1, None], Q[3:, None]
    t = np.linspace(0.0, 1.0, n, endpoint=False)[None, :, None]
    seg = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                 + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3)
    out = seg.reshape(-1, 2)
    return out if closed else np.concatenate([out, P[-1:]])


def _chaikin(P: Pts, iters: int) -> Pts:
    """Corner cutting of a closed polygon (slightly rounds its vertices)."""
    for _ in range(iters):
        Q = np.roll(P, -1, axis=0)
        P = np.stack([0.75 * P + 0.25 * Q, 0.25 * P + 0.75 * Q], axis=1).reshape(-1, 2)
    return P


def _fill(frame: _Frame, polys: list[Pts]) -> U8:
    """Rasterise chest-frame polygons (union) to a 0/1 uint8 pixel mask."""
    canvas = np.zeros((frame.rows, frame.cols), np.uint8)
    pts = [np.round(frame.px(p) * 16.0).astype(np.int32) for p in polys]
    cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=4)
    return canvas


def _raster(polys: list[Pts]) -> Bools:
    """Rasterise chest-frame polygons on the fixed CTR-measurement raster."""
    canvas = np.zeros(_RASTER_SHAPE, np.uint8)
    origin = np.array(_RASTER_ORIGIN)
    pts = [np.round((p - origin) * _RASTER_RES * 16.0).astype(np.int32) for p in polys]
    cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _profile(rng: np.random.Generator, r: F32) -> F32:
    """A depth profile of r in [0, 1] (0 at an edge, 1 deep inside), chosen at random.

    Why several: how fast a projected thickness rises from an edge is what
    makes a border look crisp or soft, and it should not be one fixed law.
    """
    kind = int(rng.integers(4))
    if kind == 0:       # elliptic cross-section
        return np.sqrt(r * (2.0 - r))
    if kind == 1:       # power law, crisp to moderately soft
        return np.power(r, np.float32(rng.uniform(0.35, 0.75)))
    if kind == 2:       # half elliptic, half smoothstep
        return 0.5 * np.sqrt(r * (2.0 - r)) + 0.5 * r * r * (3.0 - 2.0 * r)
    k = np.float32(rng.uniform(2.0, 5.0))  # saturating
    return (1.0 - np.exp(-k * r)) / (1.0 - np.exp(-k))


def _extrude(rng: np.random.Generator, mask: U8, frame: _Frame, depth_cm: float,
             ref_lo: float = 0.5, ref_hi: float = 1.0) -> F32:
    """Path length (cm) through an outline extruded with a random depth profile."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    d = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    ref = float(d.max()) * rng.uniform(ref_lo, ref_hi)
    r = np.minimum(d / max(ref, 1e-3), 1.0).astype(np.float32)
    return (depth_cm * _profile(rng, r)).astype(np.float32)


def _blur(img: F32, sigma_px: float) -> F32:
    """Gaussian blur; large kernels run on a downsampled copy (scatter, unsharp)."""
    if sigma_px < 0.3:
        return img
    if sigma_px <= 6.0:
        return cv2.GaussianBlur(img, (0, 0), sigma_px)
    f = sigma_px / 3.0
    h, w = img.shape
    small = cv2.resize(img, (max(2, round(w / f)), max(2, round(h / f))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 3.0 * small.shape[1] * f / w)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _noise(rng: np.random.Generator, rows: int, cols: int, cell_px: float) -> F32:
    """Smooth unit-ish Gaussian noise with features of about cell_px pixels."""
    gr = max(2, int(rows / max(cell_px, 1.0)) + 2)
    gc = max(2, int(cols / max(cell_px, 1.0)) + 2)
    small = rng.standard_normal((gr, gc)).astype(np.float32)
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_CUBIC) * np.float32(1.35)


def _crop(frame: _Frame, pts_px: Pts, pad: float) -> tuple[slice, slice] | None:
    """Bounding box of pixel points plus pad, clipped to the image."""
    c0 = max(int(np.floor(pts_px[:, 0].min() - pad)), 0)
    c1 = min(int(np.ceil(pts_px[:, 0].max() + pad)) + 1, frame.cols)
    r0 = max(int(np.floor(pts_px[:, 1].min() - pad)), 0)
    r1 = min(int(np.ceil(pts_px[:, 1].max() + pad)) + 1, frame.rows)
    if c1 - c0 < 2 or r1 - r0 < 2:
        return None
    return slice(r0, r1), slice(c0, c1)


# --------------------------------------------------------------------------- attenuation

@dataclass(frozen=True)
class _Mu:
    """Linear attenuation coefficients (1/cm, ~60 keV effective), jittered per image."""

    soft: float
    fat: float
    fluid: float
    lung: float     # aerated lung parenchyma
    cortex: float   # excess of cortical bone over soft tissue
    marrow: float   # excess of trabecular bone / marrow over soft tissue
    cm: float       # centimetres per chest unit (patient size)


def _draw_mu(rng: np.random.Generator) -> _Mu:
    j = lambda v: float(v * rng.uniform(0.92, 1.08))  # noqa: E731 - tiny local jitter
    # Bone excess is on the high side of a 60 keV beam: real films are taken
    # with a softer spectrum and edge-enhanced, which makes ribs conspicuous.
    return _Mu(soft=j(0.20), fat=j(0.175), fluid=j(0.21), lung=j(0.04),
               cortex=j(0.5), marrow=j(0.14), cm=float(rng.uniform(30.0, 38.0)))


# --------------------------------------------------------------------------- lungs

@dataclass(frozen=True)
class _Hemi:
    """Landmarks of one hemithorax; u is the distance from the midline."""

    apex_y: float
    apex_u: float
    lat_u: float
    wide_y: float
    cp_y: float
    dome_y: float
    dome_u: float
    med_u: float        # medial border low, behind the heart
    med_top_u: float    # medial border of the upper lung (mediastinum)
    hilum_u: float
    hilum_y: float


def _draw_hemis(rng: np.random.Generator) -> tuple[_Hemi, _Hemi]:
    insp = rng.uniform(0.0, 1.0)                    # 0 = poor inspiration
    apex_y = rng.uniform(-0.47, -0.40)
    dome_right = 0.15 - 0.11 * insp + rng.normal(0.0, 0.008)
    width = rng.uniform(0.36, 0.44)
    med_top = rng.uniform(0.055, 0.085)
    hemis = []
    for k in (0, 1):
        # The right dome usually lies a little higher (liver under it).
        dome = dome_right + (rng.uniform(-0.01, 0.045) if k == 1 else 0.0)
        cp = dome + rng.uniform(0.07, 0.13)
        lat = width * rng.uniform(0.96, 1.04)
        hilum_y = rng.uniform(-0.14, -0.05)
        hemis.append(_Hemi(
            apex_y=apex_y + rng.uniform(-0.015, 0.015),
            apex_u=rng.uniform(0.14, 0.2),
            lat_u=lat,
            wide_y=cp - rng.uniform(0.07, 0.2),
            cp_y=cp,
            dome_y=dome,
            dome_u=lat * rng.uniform(0.42, 0.6),
            med_u=rng.uniform(0.035, 0.06),
            med_top_u=med_top * rng.uniform(0.9, 1.1),
            hilum_u=rng.uniform(0.08, 0.12),
            hilum_y=hilum_y,
        ))
    return hemis[0], hemis[1]


def _landmarks(h: _Hemi) -> tuple[Pts, int]:
    """Closed landmark outline (u, y) of a lung and the index of its CP angle."""
    L, a = h.lat_u, h.apex_y
    cp_u = L * 0.965
    pts = [
        (h.apex_u, a),
        (h.apex_u + 0.07, a + 0.03),
        (0.5 * (h.apex_u + 0.07) + 0.47 * L, 0.5 * (a + h.wide_y) - 0.04),
        (L, h.wide_y),
        (L * 0.99, 0.5 * (h.wide_y + h.cp_y)),
        (cp_u, h.cp_y),
        (cp_u, h.cp_y),   # doubled: the spline keeps a sharp costophrenic angle
        (h.dome_u + 0.6 * (cp_u - h.dome_u), h.dome_y + 0.4 * (h.cp_y - h.dome_y)),
        (h.dome_u, h.dome_y),
        (0.5 * (h.dome_u + h.med_u), h.dome_y + 0.014),
        (h.med_u + 0.012, h.dome_y + 0.04),
        (h.med_u, h.hilum_y + 0.09),
        (h.med_top_u * 0.95, h.hilum_y),
        (h.med_top_u, a + 0.12),
        (h.apex_u - 0.055, a + 0.04),
    ]
    return np.array(pts, dtype=np.float64), 5


def _outline_spline(rng: np.random.Generator, h: _Hemi) -> Pts:
    P, cp = _landmarks(h)
    J = rng.normal(0.0, 0.007, P.shape)
    J[cp + 1] = J[cp]
    return _catmull_rom(P + J, 10)


def _outline_polygon(rng: np.random.Generator, h: _Hemi) -> Pts:
    P, cp = _landmarks(h)
    dense = _catmull_rom(P, 12)
    n = int(rng.integers(6, 15))
    seg = np.linalg.norm(np.diff(dense, axis=0, append=dense[:1]), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)[:-1]])
    total = float(seg.sum())
    cp_arc = arc[cp * 12]
    # Vertices spread along the outline, one of them always at the CP angle.
    pos = (cp_arc + (np.arange(n) + rng.uniform(-0.3, 0.3, n) * (np.arange(n) > 0)) * total / n) % total
    idx = np.searchsorted(arc, np.sort(pos)).clip(0, len(dense) - 1)
    V = dense[idx] + rng.normal(0.0, 0.008, (len(idx), 2))
    return _chaikin(V, int(rng.integers(1, 3)))


def _outline_superellipse(rng: np.random.Generator, h: _Hemi) -> Pts:
    n = rng.uniform(2.0, 4.0)
    uc, a = 0.5 * (h.med_top_u + h.lat_u), 0.5 * (h.lat_u - h.med_top_u)
    yc, b = h.wide_y, h.wide_y - h.apex_y
    phi = np.linspace(0.0, math.pi, 24)
    cap = np.stack([uc + a * np.sign(np.cos(phi)) * np.abs(np.cos(phi)) ** (2 / n),
                    yc - b * np.abs(np.sin(phi)) ** (2 / n)], axis=1)
    med_y = h.dome_y + 0.035
    tm = np.linspace(0.0, 1.0, 5)[1:]
    medial = np.stack([h.med_top_u + (h.med_u - h.med_top_u) * tm, yc + (med_y - yc) * tm], axis=1)
    cp_u = h.lat_u * 0.97
    q = rng.uniform(1.6, 2.6)
    ud = np.linspace(h.med_u, cp_u, 20)[1:]
    left_part = h.dome_y + 0.035 * ((h.dome_u - ud) / max(h.dome_u - h.med_u, 1e-3)) ** 2
    right_part = h.dome_y + (h.cp_y - h.dome_y) * (np.clip(ud - h.dome_u, 0, None)
                                                   / max(cp_u - h.dome_u, 1e-3)) ** q
    dome = np.stack([ud, np.where(ud < h.dome_u, left_part, right_part)], axis=1)
    tw = np.linspace(0.0, 1.0, 6)[1:-1]
    wall = np.stack([cp_u + (h.lat_u - cp_u) * tw + 0.008 * np.sin(math.pi * tw),
                     h.cp_y + (yc - h.cp_y) * tw], axis=1)
    return np.concatenate([cap, medial, dome, wall])


def _lung_outlines(rng: np.random.Generator, hemis: tuple[_Hemi, _Hemi]) -> list[Pts]:
    """Chest-frame outlines [right, left] of the lungs, drawn one of three ways."""
    method = int(rng.integers(3))
    out = []
    for k, h in enumerate(hemis):
        uv = (_outline_spline, _outline_polygon, _outline_superellipse)[method](rng, h)
        sign = -1.0 if k == 0 else 1.0      # patient right is on the image left
        out.append(np.stack([sign * uv[:, 0], uv[:, 1]], axis=1))
    return out


# --------------------------------------------------------------------------- heart

def _heart_unit(rng: np.random.Generator) -> list[Pts]:
    """Cardiac silhouette in a unit box (x towards patient left, y down), 1-2 polygons."""
    model = int(rng.integers(3))
    tilt = math.radians(rng.uniform(0.0, 40.0))
    c, s = math.cos(tilt), math.sin(tilt)
    rot = np.array([[c, -s], [s, c]])   # long axis turned down towards patient left
    t = np.linspace(0.0, 2 * math.pi, 64, endpoint=False)
    if model == 0:
        e = np.stack([np.cos(t), rng.uniform(0.7, 0.95) * np.sin(t)], axis=1)
        return [e @ rot.T]
    if model == 1:
        P = np.array([(-0.55, -1.0), (-0.85, -0.45), (-1.0, 0.15), (-0.85, 0.75), (-0.5, 1.0),
                      (0.3, 1.0), (0.85, 0.8), (1.0, 0.25), (0.75, -0.35), (0.45, -0.6),
                      (0.25, -0.85), (-0.1, -0.95)])
        P = P + rng.normal(0.0, 0.05, P.shape)
        small = np.array([[math.cos(tilt / 2), -math.sin(tilt / 2)],
                          [math.sin(tilt / 2), math.cos(tilt / 2)]])
        return [_catmull_rom(P, 6) @ small.T]
    # Two lobes: right atrium and a tilted left ventricle.
    ra = np.stack([-0.5 + 0.5 * rng.uniform(0.8, 1.1) * np.cos(t),
                   0.25 + 0.65 * rng.uniform(0.8, 1.1) * np.sin(t)], axis=1)
    lv = np.stack([0.8 * np.cos(t), 0.9 * rng.uniform(0.8, 1.0) * np.sin(t)], axis=1) @ rot.T
    return [ra, lv + np.array([0.25, 0.1])]


def _heart(rng: np.random.Generator, hemis: tuple[_Hemi, _Hemi], lungs: list[Pts],
           target_ctr: float) -> tuple[list[Pts], float]:
    """Heart polygons placed on the diaphragm with the target CTR, and the drawn CTR."""
    polys = _heart_unit(rng)
    allp = np.concatenate(polys)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    lung_r = _raster(lungs)
    thorax_w = 2.0 * max(h.lat_u for h in hemis)
    width = target_ctr * thorax_w
    height = float(np.clip(width * rng.uniform(0.6, 0.85), 0.18, 0.36))
    bottom = hemis[1].dome_y + rng.uniform(0.01, 0.045)
    right_frac = rng.uniform(0.28, 0.42)
    # Keep the left border inside the left chest wall even for huge hearts.
    right_frac = max(right_frac, 1.0 - 0.93 * hemis[1].lat_u / width)

    def place(w: float) -> list[Pts]:
        out = []
        for p in polys:
            q = (p - lo) / (hi - lo)
            out.append(np.stack([-right_frac * w + q[:, 0] * w,
                                 bottom - height + q[:, 1] * height], axis=1))
        return out

    placed = place(width)
    ctr = measure_ctr(lung_r, _raster(placed))
    for _ in range(2):  # bounding box width -> widest row width
        width *= target_ctr / max(ctr, 1e-3)
        placed = place(width)
        ctr = measure_ctr(lung_r, _raster(placed))
    return placed, float(ctr)


# --------------------------------------------------------------------------- soft tissue

def _body(rng: np.random.Generator, frame: _Frame, hemis: tuple[_Hemi, _Hemi],
          mu: _Mu) -> tuple[F32, F32, float, tuple[float, float]]:
    """Line integral of the trunk (soft tissue and fat), its thickness, AP depth and shoulder (u, y)."""
    lat = max(h.lat_u for h in hemis)
    habitus = rng.uniform(0.0, 1.0)                 # 0 thin, 1 obese
    wall = 0.045 + 0.08 * habitus + rng.uniform(-0.01, 0.01)
    depth = 18.0 + 15.0 * habitus + rng.uniform(-1.5, 1.5)
    fat_w = 0.005 + 0.05 * habitus * rng.uniform(0.5, 1.0)
    nw = rng.uniform(0.09, 0.15)
    apex = min(h.apex_y for h in hemis)
    sh_y = apex - rng.uniform(0.03, 0.1)
    sw = lat + wall + rng.uniform(0.03, 0.1)
    cw = lat + wall
    cp = max(h.cp_y for h in hemis)
    bw = cw * rng.uniform(0.95, 1.1)
    half = [(nw, -1.3), (nw * 1.1, sh_y - 0.09), (0.5 * (nw + sw), sh_y - 0.025), (sw, sh_y + 0.03),
            (cw + 0.012, sh_y + 0.16), (cw, 0.5 * (sh_y + cp)), (cw * 1.01, cp), (bw, 1.3)]
    right = [(-u, y) for u, y in half]
    left = [(u * rng.uniform(0.98, 1.02), y) for u, y in reversed(half)]
    outline = _catmull_rom(np.array(right + left), 6)
    mask = _fill(frame, [outline])
    d = cv2.distanceTransform(mask, cv2.DIST_L2, 5) / np.float32(frame.s)
    ref = rng.uniform(0.1, 0.2)
    r_out = np.minimum(d / ref, 1.0).astype(np.float32)
    r_in = np.clip((d - fat_w) / ref, 0.0, 1.0).astype(np.float32)
    kind_rng = np.random.default_rng(int(rng.integers(2 ** 31)))
    t_out = depth * _profile(kind_rng, r_out)
    t_in = np.minimum(depth * np.sqrt(r_in * (2.0 - r_in)), t_out)
    L = mu.soft * t_in + mu.fat * (t_out - t_in)
    return L.astype(np.float32), t_out.astype(np.float32), depth, (sw, sh_y)


def _ellipsoid(frame: _Frame, x0: float, y0: float, rx: float, ry: float,
               depth_cm: float, angle: float = 0.0) -> F32:
    """Path length through an ellipsoid (projected: depth * sqrt(1 - r^2))."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = frame.X - x0, frame.Y - y0
    r2 = ((c * dx + s * dy) / rx) ** 2 + ((-s * dx + c * dy) / ry) ** 2
    return (depth_cm * np.sqrt(np.clip(1.0 - r2, 0.0, None))).astype(np.float32)


def _breasts(rng: np.random.Generator, frame: _Frame, hemis: tuple[_Hemi, _Hemi]) -> F32:
    out = np.zeros((frame.rows, frame.cols), np.float32)
    depth = rng.uniform(1.5, 4.0)
    for k, h in enumerate(hemis):
        sign = -1.0 if k == 0 else 1.0
        y0, ry = h.cp_y - rng.uniform(0.04, 0.12), rng.uniform(0.1, 0.15)
        t = _ellipsoid(frame, sign * rng.uniform(0.2, 0.3), y0, rng.uniform(0.14, 0.22), ry, depth,
                       sign * rng.uniform(0.0, 0.3))
        # The breast hangs from the chest wall: only its lower edge is a border.
        out += t * np.clip((frame.Y - (y0 - ry)) / (1.2 * ry), 0.0, 1.0)
    return out


# --------------------------------------------------------------------------- mediastinum

def _tube_v(frame: _Frame, x0: float, y0: float, x1: float, y1: float, r: float,
            depth_cm: float) -> F32:
    """Path length through a near-vertical tube from (x0, y0) to (x1, y1), ends tapered."""
    f = np.clip((frame.Y - y0) / max(y1 - y0, 1e-3), 0.0, 1.0)
    dx = frame.X - (x0 + (x1 - x0) * f)
    taper = np.clip((frame.Y - y0) / (2 * r), 0.0, 1.0) * np.clip((y1 - frame.Y) / (2 * r), 0.0, 1.0)
    return (depth_cm * np.sqrt(np.clip(1.0 - (dx / r) ** 2, 0.0, None)) * taper).astype(np.float32)


@dataclass
class _Mediastinum:
    displace: F32   # cm of lung air displaced (aorta, hila, vessels of the mediastinum)
    air: F32        # cm of air column (trachea, main bronchi) inside soft tissue


def _mediastinum(rng: np.random.Generator, frame: _Frame, hemis: tuple[_Hemi, _Hemi]) -> _Mediastinum:
    rh, lh = hemis
    carina = min(rh.hilum_y, lh.hilum_y) - rng.uniform(0.06, 0.1)
    tx = rng.uniform(-0.012, 0.012)
    tr_r = rng.uniform(0.022, 0.03)
    air = _tube_v(frame, tx, -1.0, tx - rng.uniform(0.0, 0.015), carina, tr_r, rng.uniform(1.4, 2.2))
    # Main bronchi: the right one steeper and shorter, as in patients.
    canvas = np.zeros((frame.rows, frame.cols), np.float32)
    for k, h in enumerate(hemis):
        sign = -1.0 if k == 0 else 1.0
        end = np.array([[tx, carina], [sign * h.hilum_u * 0.9, h.hilum_y + 0.02]])
        p = np.round(frame.px(end) * 16).astype(np.int32)
        cv2.line(canvas, tuple(p[0].tolist()), tuple(p[1].tolist()), 1.2,
                 max(1, round(1.4 * tr_r * frame.s)), cv2.LINE_8, 4)
    air += _blur(canvas, 0.01 * frame.s)

    disp = np.zeros((frame.rows, frame.cols), np.float32)
    knob_y = rng.uniform(-0.27, -0.18)
    knob_x = lh.med_top_u + rng.uniform(-0.005, 0.025)
    knob_r = rng.uniform(0.03, 0.05)
    disp += _ellipsoid(frame, knob_x, knob_y, knob_r, knob_r * rng.uniform(0.8, 1.1), rng.uniform(3.0, 5.0))
    # Descending aorta beside the spine, down to the diaphragm.
    ax = knob_x - rng.uniform(0.005, 0.02)
    disp += _tube_v(frame, ax, knob_y, ax - rng.uniform(-0.01, 0.02), lh.dome_y + 0.06,
                    rng.uniform(0.02, 0.03), rng.uniform(2.5, 4.0))
    if rng.random() < 0.6:  # superior vena cava / ascending aorta: right upper border
        sx = -(rh.med_top_u + rng.uniform(-0.01, 0.015))
        disp += _tube_v(frame, sx, -0.6, sx - rng.uniform(0.0, 0.02), rh.hilum_y + 0.05,
                        rng.uniform(0.02, 0.035), rng.uniform(2.0, 3.5))
    if rng.random() < 0.7:  # hila: pulmonary arteries at the mediastinal border
        for k, h in enumerate(hemis):
            sign = -1.0 if k == 0 else 1.0
            disp += _ellipsoid(frame, sign * h.hilum_u * rng.uniform(0.85, 1.05), h.hilum_y,
                               rng.uniform(0.025, 0.045), rng.uniform(0.04, 0.07), rng.uniform(1.0, 2.5),
                               sign * rng.uniform(-0.4, 0.4))
    return _Mediastinum(disp, air)


# --------------------------------------------------------------------------- bones

def _lateral_at(outline_u: Pts, y: float) -> float:
    """Lateral extent (u) of a hemithorax outline at height y."""
    near = np.abs(outline_u[:, 1] - y) < 0.03
    return float(outline_u[near, 0].max()) if near.any() else 0.12


def _bezier(p0: Pts, p1: Pts, p2: Pts, n: int) -> Pts:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _rib_lines(rng: np.random.Generator, lungs: list[Pts], hemis: tuple[_Hemi, _Hemi],
               anterior: bool) -> list[Pts]:
    """Rib centre lines (chest frame), both sides."""
    out: list[Pts] = []
    apex = min(h.apex_y for h in hemis)
    cp = max(h.cp_y for h in hemis)
    dome = min(h.dome_y for h in hemis)
    spacing = (cp - apex) / rng.uniform(8.5, 10.0)
    n = int(rng.integers(5, 8)) if anterior else int(rng.integers(9, 12))
    y0 = apex + (0.08 if anterior else 0.005) + rng.uniform(-0.01, 0.01)
    wall = rng.uniform(0.012, 0.03)
    for k in (0, 1):
        sign = -1.0 if k == 0 else 1.0
        uv = np.stack([np.abs(lungs[k][:, 0]), lungs[k][:, 1]], axis=1)
        for i in range(n):
            y = y0 + i * spacing * (1.05 if anterior else 1.0)
            if anterior and y + 0.16 > dome:   # uncalcified cartilage below: not drawn
                break
            lat = max(_lateral_at(uv, y + 0.03), 0.1) + wall
            if anterior:
                # From the chest wall down and in towards the costal cartilage.
                pts = _bezier(np.array([lat, y]), np.array([0.6 * lat, y + 0.03]),
                              np.array([rng.uniform(0.1, 0.17), y + rng.uniform(0.1, 0.16)]), 10)
            else:
                arch = rng.uniform(0.025, 0.05)
                a = _bezier(np.array([0.04, y]), np.array([0.5 * lat, y - arch]),
                            np.array([lat, y + 0.04]), 9)
                b = _bezier(np.array([lat, y + 0.04]), np.array([lat + 0.02, y + 0.08]),
                            np.array([lat - 0.005, y + rng.uniform(0.12, 0.16)]), 5)[1:]
                pts = np.concatenate([a, b])
            pts = pts + rng.normal(0.0, 0.003, pts.shape)
            out.append(np.stack([sign * pts[:, 0], pts[:, 1]], axis=1))
    return out


def _tube_bones(frame: _Frame, lines: list[Pts], radius: float, cortex: float, flat: float,
                mu: _Mu, gain: float, bone: F32) -> None:
    """Hollow tubes around centre lines (nearest-line distance), added to bone in place.

    Why hollow: the cortex is seen tangentially at the tube's edges, which gives
    the bright double contour of real ribs and clavicles.
    """
    px = [frame.px(p) for p in lines]
    rp = radius * frame.s
    box = _crop(frame, np.concatenate(px), rp + 3)
    if box is None:
        return
    rs, cs = box
    canvas = np.full((rs.stop - rs.start, cs.stop - cs.start), 255, np.uint8)
    off = np.array([cs.start, rs.start], dtype=np.float64)
    polys = np.stack([np.round((p - off) * 16) for p in px]).astype(np.int32) if len({len(p) for p in px}) == 1 \
        else [np.round((p - off) * 16).astype(np.int32) for p in px]
    cv2.polylines(canvas, polys, False, 0, 1, cv2.LINE_8, 4)
    d = cv2.distanceTransform(canvas, cv2.DIST_L2, 5) / np.float32(frame.s)
    outer = 2.0 * np.sqrt(np.clip(radius ** 2 - d * d, 0.0, None))
    ri = max(radius - cortex, 0.0)
    inner = 2.0 * np.sqrt(np.clip(ri ** 2 - d * d, 0.0, None))
    scale = np.float32(mu.cm * flat * gain)
    bone[rs, cs] += scale * (mu.cortex * (outer - inner) + mu.marrow * inner)


def _band_bones(rng: np.random.Generator, frame: _Frame, lines: list[Pts], radius: float,
                mu: _Mu, gain: float, edged: bool, bone: F32) -> None:
    """Filled bands of random density per bone, optionally with cortical edge lines."""
    canvas = np.zeros((frame.rows, frame.cols), np.float32)
    width = max(1, round(2 * radius * frame.s))
    base = mu.cm * 2 * radius * 0.55 * gain
    for p in lines:
        px = np.round(frame.px(p) * 16).astype(np.int32)
        v = base * (mu.marrow * 1.5 if edged else mu.marrow * 2.5 + mu.cortex * 0.25) * rng.uniform(0.7, 1.3)
        cv2.polylines(canvas, [px], False, float(v), width, cv2.LINE_8, 4)
        if edged:
            # Edges: the centre line offset along its normals by +-radius.
            t = np.gradient(p, axis=0)
            nrm = np.stack([-t[:, 1], t[:, 0]], axis=1) / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
            for sgn in (-1.0, 1.0):
                e = np.round(frame.px(p + sgn * 0.85 * radius * nrm) * 16).astype(np.int32)
                cv2.polylines(canvas, [e], False, float(base * mu.cortex * rng.uniform(0.6, 1.0)),
                              max(1, round(0.2 * radius * frame.s)), cv2.LINE_8, 4)
    bone += _blur(canvas, max(0.5, 0.25 * radius * frame.s))


def _ribs(rng: np.random.Generator, frame: _Frame, lungs: list[Pts], hemis: tuple[_Hemi, _Hemi],
          mu: _Mu, bone: F32) -> None:
    density = rng.uniform(0.7, 1.4)           # osteopenic ... dense bones
    for anterior in (False, True):
        lines = _rib_lines(rng, lungs, hemis, anterior)
        radius = rng.uniform(0.016, 0.022) * (1.1 if anterior else 1.0)
        # Anterior ribs are thinner and further from the detector: fainter.
        gain = density * (rng.uniform(0.3, 0.7) if anterior else rng.uniform(0.7, 1.2))
        method = int(rng.integers(3))
        if method == 0:
            _tube_bones(frame, lines, radius, rng.uniform(0.003, 0.006), rng.uniform(0.45, 0.7),
                        mu, gain, bone)
        else:
            _band_bones(rng, frame, lines, radius, mu, gain, method == 2, bone)


def _clavicles_shoulders(rng: np.random.Generator, frame: _Frame, hemis: tuple[_Hemi, _Hemi],
                         shoulder: tuple[float, float], mu: _Mu, bone: F32) -> None:
    apex = min(h.apex_y for h in hemis)
    dy = apex + 0.03 + rng.uniform(-0.04, 0.03)
    lines = []
    for sign in (-1.0, 1.0):
        P = np.array([(0.035, dy), (0.12, dy - 0.025), (0.24, dy - 0.035),
                      (0.36, dy - 0.06), (0.44, dy - 0.09)])
        P[:, 1] += rng.normal(0.0, 0.008, 5)
        c = _catmull_rom(P, 4, closed=False)
        lines.append(np.stack([sign * c[:, 0], c[:, 1]], axis=1))
    _tube_bones(frame, lines, rng.uniform(0.015, 0.02), rng.uniform(0.003, 0.006), 0.8, mu,
                rng.uniform(0.8, 1.2), bone)
    # Humeral heads: hollow spheres at the shoulders (often outside the field).
    for k in range(len(hemis)):
        sign = -1.0 if k == 0 else 1.0
        R = rng.uniform(0.05, 0.07)
        x0, y0 = sign * (shoulder[0] - R * rng.uniform(0.7, 1.1)), shoulder[1] + rng.uniform(0.04, 0.08)
        d2 = (frame.X - x0) ** 2 + (frame.Y - y0) ** 2
        outer = 2 * np.sqrt(np.clip(R * R - d2, 0, None))
        inner = 2 * np.sqrt(np.clip((R * 0.88) ** 2 - d2, 0, None))
        bone += (mu.cm * (mu.cortex * (outer - inner) + mu.marrow * inner)).astype(np.float32)
    if rng.random() < 0.6:  # scapulae, sometimes projected over the lateral lungs
        shift = rng.uniform(-0.09, 0.02)
        for k, h in enumerate(hemis):
            sign = -1.0 if k == 0 else 1.0
            P = np.array([(0.3 + shift, apex - 0.02), (h.lat_u + 0.06, apex), (h.lat_u + 0.02, apex + 0.14),
                          (0.38 + shift, apex + rng.uniform(0.3, 0.38)), (0.3 + shift, apex + 0.2)])
            poly = np.stack([sign * P[:, 0], P[:, 1]], axis=1)
            mask = _fill(frame, [_chaikin(poly, 2)])
            if not mask.any():
                continue
            d = cv2.distanceTransform(mask, cv2.DIST_L2, 5) / np.float32(frame.s)
            plate = rng.uniform(0.2, 0.45) + 0.8 * np.exp(-d / 0.006)
            bone += (mask * plate * (mu.cortex * 0.6)).astype(np.float32)


def _spine(rng: np.random.Generator, frame: _Frame, mu: _Mu) -> F32:
    """Vertebrae as stacked superelliptic blocks with a cortical shell (and pedicles)."""
    period = rng.uniform(0.055, 0.07)
    disc = rng.uniform(0.15, 0.25)
    a0 = rng.uniform(0.035, 0.05)
    p = rng.uniform(2.5, 6.0)
    curve = rng.uniform(-0.012, 0.012)
    X, Y = frame.X, frame.Y
    a = a0 + 0.02 * (Y + 0.5)
    xv = (X - curve * np.sin(2.0 * Y + rng.uniform(0, 3))) / a
    phase = (Y - rng.uniform(0.0, period)) / period
    yv = ((phase - np.floor(phase)) - 0.5) * (2.0 / (1.0 - disc))
    r = np.power(np.abs(xv) ** p + np.abs(yv) ** p, 1.0 / p)
    c_rel = rng.uniform(0.08, 0.15)
    outer = np.sqrt(np.clip(1.0 - r * r, 0.0, None))
    inner = (1.0 - c_rel) * np.sqrt(np.clip(1.0 - (r / (1.0 - c_rel)) ** 2, 0.0, None))
    depth = rng.uniform(1.5, 3.0)
    out = depth * (mu.cortex * (outer - inner) + mu.marrow * inner)
    # Posterior elements overlap the discs, so the column never drops to soft tissue.
    column = np.sqrt(np.clip(1.0 - (xv / 1.15) ** 2, 0.0, None))
    out += depth * mu.marrow * rng.uniform(0.3, 0.7) * column
    if rng.random() < 0.7:  # pedicles: small cortical rings on the upper block
        for sx in (-0.62, 0.62):
            rp = np.sqrt(((xv - sx) / 0.22) ** 2 + ((yv + 0.35) / 0.4) ** 2)
            out += 0.35 * mu.cortex * np.clip(1.0 - np.abs(rp - 1.0) / 0.3, 0.0, None)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- lung markings

def _vessel_tree(rng: np.random.Generator, frame: _Frame, hemis: tuple[_Hemi, _Hemi],
                 mu: _Mu, canvas: F32) -> None:
    """Recursively branching, tapering vessel trees from the hila (drawn level by level)."""
    w0 = rng.uniform(0.6, 1.1)          # cm at the hilum
    len0 = rng.uniform(0.07, 0.1)
    depth = int(rng.integers(5, 7))
    for k, h in enumerate(hemis):
        sign = -1.0 if k == 0 else 1.0
        n_roots = int(rng.integers(3, 6))
        ang = np.linspace(-1.25, 1.2, n_roots) + rng.normal(0, 0.12, n_roots)   # 0 = lateral, <0 up
        start = np.tile([sign * h.hilum_u, h.hilum_y], (n_roots, 1)) + rng.normal(0, 0.01, (n_roots, 2))
        length = len0 * (1.0 + 0.3 * (ang < -0.5)) * rng.uniform(0.8, 1.2, n_roots)
        width = np.full(n_roots, w0)
        for _ in range(depth):
            d = np.stack([sign * np.cos(ang), np.sin(ang)], axis=1)
            end = start + length[:, None] * d
            w_px = width / mu.cm * frame.s
            thick = max(1, int(round(float(w_px.mean()))))
            value = float((width * np.minimum(w_px, 1.0) if thick == 1 else width).mean())
            seg = np.stack([frame.px(start), frame.px(end)], axis=1)
            cv2.polylines(canvas, np.round(seg * 16).astype(np.int32), False, value, thick, cv2.LINE_8, 4)
            m = len(ang)
            spread = rng.uniform(0.2, 0.55, m)
            ang = np.concatenate([ang - spread, ang + spread * rng.uniform(0.6, 1.2, m)]) \
                + rng.normal(0, 0.08, 2 * m)
            start = np.concatenate([end, end])
            length = np.concatenate([length, length]) * rng.uniform(0.68, 0.85, 2 * m)
            width = np.concatenate([width, width]) * rng.uniform(0.62, 0.8, 2 * m)


def _line_field(rng: np.random.Generator, frame: _Frame, lungs: list[Pts], hemis: tuple[_Hemi, _Hemi],
                mu: _Mu, canvas: F32) -> None:
    """Random short segments oriented away from the hila, thinner towards the periphery."""
    for k, h in enumerate(hemis):
        sign = -1.0 if k == 0 else 1.0
        lo, hi = lungs[k].min(axis=0), lungs[k].max(axis=0)
        n = int(rng.integers(120, 260))
        p = lo + rng.random((n, 2)) * (hi - lo)
        hil = np.array([sign * h.hilum_u, h.hilum_y])
        v = p - hil
        dist = np.linalg.norm(v, axis=1)
        ang = np.arctan2(v[:, 1], v[:, 0]) + rng.normal(0, 0.25, n)
        length = rng.uniform(0.02, 0.06, n)
        end = p + length[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        width = rng.uniform(0.15, 0.5) * np.clip(1.2 - 2.2 * dist, 0.15, 1.0)
        for lo_w, hi_w in ((0.0, 0.12), (0.12, 0.3), (0.3, 9.0)):
            sel = (width >= lo_w) & (width < hi_w)
            if not sel.any():
                continue
            w = float(width[sel].mean())
            w_px = w / mu.cm * frame.s
            thick = max(1, int(round(w_px)))
            seg = np.stack([frame.px(p[sel]), frame.px(end[sel])], axis=1)
            cv2.polylines(canvas, np.round(seg * 16).astype(np.int32), False,
                          w * min(w_px, 1.0) if thick == 1 else w, thick, cv2.LINE_8, 4)


# --------------------------------------------------------------------------- findings

@dataclass
class _Finding:
    """How a finding changes the lung: all maps on the pixel grid."""

    mask: Bools
    solid_cm: F32 | None = None      # aerated lung replaced by soft tissue (nodule)
    air_keep: F32 | None = None      # factor on the lung air path (consolidation, effusion)
    free_air: Bools | None = None    # pleural space of a pneumothorax
    dense: F32 | None = None         # extra parenchymal density factor (collapsed lung)
    line: F32 | None = None          # extra line integral (visceral pleural line)


def _pick(rng: np.random.Generator, cand: Bools) -> tuple[int, int] | None:
    idx = np.flatnonzero(cand)
    if idx.size == 0:
        return None
    i = int(idx[int(rng.integers(idx.size))])
    return divmod(i, cand.shape[1])


def _nodule(rng: np.random.Generator, frame: _Frame, lung_side: U8, heart: U8,
            severity: str, mu: _Mu) -> _Finding:
    r = rng.uniform(0.024, 0.034) if severity == "subtle" else rng.uniform(0.038, 0.075)
    solid = rng.uniform(0.85, 1.05) if severity == "subtle" else rng.uniform(0.95, 1.2)
    d = cv2.distanceTransform(lung_side, cv2.DIST_L2, 5)
    margin = (r * 1.3 + 0.01) * frame.s
    # Obvious masses may sit behind the heart; subtle ones stay in clear lung.
    allow_heart = severity == "obvious" and rng.random() < 0.2
    cand = (d > margin) & (allow_heart | (heart == 0))
    where = _pick(rng, cand) or _pick(rng, d > 0.5 * margin) or _pick(rng, lung_side > 0)
    assert where is not None
    row, col = where
    x0, y0 = float(frame.X[row, col]), float(frame.Y[row, col])
    t = np.zeros((frame.rows, frame.cols), np.float32)
    lobes = 1 if rng.random() < 0.5 else int(rng.integers(2, 5))
    for i in range(lobes):
        rr = r * (1.0 if i == 0 else rng.uniform(0.45, 0.75))
        off = (0.0, 0.0) if i == 0 else tuple(rng.normal(0.0, 0.55 * r, 2))
        radius_cm = rr * mu.cm
        t = np.maximum(t, _ellipsoid(frame, x0 + off[0], y0 + off[1], rr, rr * rng.uniform(0.85, 1.15),
                                     2.0 * radius_cm))
    mask = (t > 0) & (lung_side > 0)
    if not mask.any():
        mask = t > 0
    return _Finding(mask=mask, solid_cm=(t * solid).astype(np.float32))


def _consolidation(rng: np.random.Generator, frame: _Frame, lung_side: U8, heart: U8,
                   severity: str) -> _Finding:
    rc = rng.uniform(0.045, 0.08) if severity == "subtle" else rng.uniform(0.09, 0.16)
    peak = rng.uniform(0.3, 0.5) if severity == "subtle" else rng.uniform(0.65, 0.95)
    d = cv2.distanceTransform(lung_side, cv2.DIST_L2, 5)
    # Subtle ones in clear lung: behind the heart little air is left to lose.
    clear = (heart == 0) if severity == "subtle" else np.ones(heart.shape, bool)
    where = (_pick(rng, (d > 0.6 * rc * frame.s) & clear) or _pick(rng, d > 0.03 * frame.s)
             or _pick(rng, lung_side > 0))
    assert where is not None
    row, col = where
    x0, y0 = float(frame.X[row, col]), float(frame.Y[row, col])
    acc = np.zeros((frame.rows, frame.cols), np.float32)
    for _ in range(int(rng.integers(3, 9))):
        bx, by = x0 + rng.normal(0, 0.45 * rc), y0 + rng.normal(0, 0.45 * rc)
        sx, sy = rc * rng.uniform(0.3, 0.6), rc * rng.uniform(0.3, 0.6)
        acc += np.exp(-0.5 * (((frame.X - bx) / sx) ** 2 + ((frame.Y - by) / sy) ** 2))
    patch = np.clip(0.65 + 0.3 * _noise(rng, frame.rows, frame.cols, 0.02 * frame.s), 0.3, 1.0)
    alpha = np.clip(acc * patch * 1.3, 0.0, 1.0) * peak
    alpha *= _blur(lung_side.astype(np.float32), 0.006 * frame.s)   # confined to the lung
    if severity == "obvious" and rng.random() < 0.5:
        # Air bronchograms: branching air tubes spared inside the opacity.
        br = np.zeros_like(alpha)
        for _ in range(int(rng.integers(2, 5))):
            a = rng.uniform(0, 2 * math.pi)
            p0 = np.array([x0, y0]) + rng.normal(0, 0.3 * rc, 2)
            for _ in range(3):
                p1 = p0 + rng.uniform(0.3, 0.6) * rc * np.array([math.cos(a), math.sin(a)])
                q = np.round(frame.px(np.stack([p0, p1])) * 16).astype(np.int32)
                cv2.line(br, tuple(q[0].tolist()), tuple(q[1].tolist()), 1.0,
                         max(1, round(0.008 * frame.s)), cv2.LINE_8, 4)
                p0, a = p1, a + rng.normal(0, 0.4)
        alpha *= 1.0 - 0.8 * _blur(br, 0.5)
    mask = (alpha > 0.3 * peak) & (lung_side > 0)
    return _Finding(mask=mask, air_keep=(1.0 - alpha).astype(np.float32))


def _effusion(rng: np.random.Generator, frame: _Frame, lung_side: U8, outline: Pts, h: _Hemi,
              k: int, severity: str) -> _Finding:
    u = np.abs(frame.X)
    lat = np.abs(outline[:, 0])
    cp_y = float(outline[lat > 0.6 * lat.max(), 1].max())
    span = max(h.lat_u - h.med_u, 0.1)
    lateral = np.clip((u - h.med_u) / span, 0.0, 1.0)
    if severity == "subtle":
        # Fluid just fills (blunts) the costophrenic angle.
        level = cp_y - rng.uniform(0.05, 0.09) - rng.uniform(0.01, 0.03) * lateral ** 2
        edge = rng.uniform(0.006, 0.012)
    else:
        # A meniscus: the fluid level rises towards the chest wall.
        level = h.dome_y - rng.uniform(0.03, 0.22) - rng.uniform(0.06, 0.16) * lateral ** rng.uniform(1.5, 3.0)
        edge = rng.uniform(0.03, 0.07)   # fluid thins upwards as it layers behind the lung
    frac = np.clip((frame.Y - level) / edge + 0.5, 0.0, 1.0)
    frac = frac * frac * (3.0 - 2.0 * frac)
    frac *= _blur(lung_side.astype(np.float32), 0.004 * frame.s)
    keep = 1.0 - frac * rng.uniform(0.88, 1.0)
    mask = (frac > 0.5) & (lung_side > 0)
    if not mask.any():   # a very flat lung base: take its lowest lateral part
        mask = (lung_side > 0) & (frame.Y > cp_y - 0.04)
    return _Finding(mask=mask, air_keep=keep.astype(np.float32))


def _pneumothorax(rng: np.random.Generator, frame: _Frame, lung_side: U8, outline: Pts, h: _Hemi,
                  severity: str) -> _Finding:
    hil = np.array([np.sign(outline[:, 0].mean()) * h.hilum_u, h.hilum_y])
    u, y = np.abs(outline[:, 0]), outline[:, 1]
    apical = np.clip((h.hilum_y - y) / max(h.hilum_y - h.apex_y, 0.05), 0.0, 1.0)
    lateral = np.clip((u - h.med_top_u - 0.06) / max(h.lat_u - h.med_top_u - 0.06, 0.05), 0.0, 1.0)
    if severity == "subtle":
        c = rng.uniform(0.15, 0.25)
        w = np.clip(apical * (0.4 + 0.6 * lateral), 0, 1) ** 1.2
    else:
        c = rng.uniform(0.2, 0.45)
        w = np.maximum(apical, lateral * np.clip((h.cp_y - y) / 0.08, 0.2, 1.0)) ** 0.7
    collapsed = hil + (outline - hil) * (1.0 - c * w)[:, None]
    inner = _fill(frame, [collapsed])
    space = (lung_side > 0) & (inner == 0)
    # The visceral pleural line where the lung has come away from the wall.
    line = np.zeros((frame.rows, frame.cols), np.float32)
    sel = w > 0.05
    pts = np.round(frame.px(collapsed[sel]) * 16).astype(np.int32)
    cv2.polylines(line, [pts], False, float(rng.uniform(0.2, 0.4)), 1, cv2.LINE_8, 4)
    line = _blur(line, 0.5) * (lung_side > 0)
    # The collapsed lung holds its blood and tissue in less air: denser.
    dense = np.where(inner > 0, np.float32(1.0 + c * rng.uniform(1.5, 3.0)), np.float32(1.0))
    return _Finding(mask=space, free_air=space, dense=dense.astype(np.float32), line=line.astype(np.float32))


# --------------------------------------------------------------------------- acquisition

def _expose(rng: np.random.Generator, noise_rng: np.random.Generator, frame: _Frame,
            L_soft: F32, L_bone: F32, shutter: F32 | None) -> F32:
    """Beer-Lambert with optional beam hardening, heel effect, grid, scatter, noise; log density."""
    rows, cols = frame.rows, frame.cols
    if rng.random() < 0.35:
        primary = np.exp(-(L_soft + L_bone))
    else:
        # Crude polyenergetic beam: the low-energy part sees bone relatively denser.
        n = int(rng.integers(2, 4))
        w = rng.dirichlet(np.full(n, 2.0))
        soft_k = np.sort(rng.uniform(0.7, 1.4, n))[::-1]
        primary = np.zeros((rows, cols), np.float32)
        for i in range(n):
            bone_k = soft_k[i] ** rng.uniform(1.5, 2.5)
            primary += np.float32(w[i]) * np.exp(-(np.float32(soft_k[i]) * L_soft + np.float32(bone_k) * L_bone))
    # Heel effect: beam intensity falls off along the anode-cathode axis.
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(ang) * (np.arange(cols, dtype=np.float32)[None, :] / cols - 0.5)
            + math.sin(ang) * (np.arange(rows, dtype=np.float32)[:, None] / rows - 0.5))
    primary *= 1.0 + rng.uniform(0.0, 0.3) * ramp
    grid = rng.random() < 0.6
    if grid and rng.random() < 0.35:
        # Visible grid lines (stationary grid): fine periodic absorption.
        period = rng.uniform(2.2, 5.0)
        vertical = rng.random() < 0.5
        axis = np.arange(cols if vertical else rows, dtype=np.float32)
        stripes = 1.0 - rng.uniform(0.01, 0.04) * (0.5 + 0.5 * np.cos(2 * math.pi * axis / period))
        primary *= stripes[None, :] if vertical else stripes[:, None]
    if shutter is not None:
        primary *= shutter
    sf = rng.uniform(0.05, 0.2) if grid else rng.uniform(0.15, 0.4)
    scatter = _blur(primary, rng.uniform(0.08, 0.2) * frame.s)
    total = primary + np.float32(sf / (1.0 - sf)) * scatter
    # Photons per pixel at a random dose, fewer per pixel on finer grids.
    n0 = math.exp(rng.uniform(math.log(4e4), math.log(6e5))) * (200.0 / frame.s) ** 2
    counts = total * np.float32(n0)
    if rng.random() < 0.3:
        counts = noise_rng.poisson(np.maximum(counts, 0.0)).astype(np.float32)
    else:
        counts = counts + np.sqrt(np.maximum(counts, 1.0)) * noise_rng.standard_normal((rows, cols), np.float32)
    counts = _blur(counts, rng.uniform(0.0015, 0.005) * frame.s)    # scintillator spread
    counts += np.float32(rng.uniform(0.5, 3.0)) * noise_rng.standard_normal((rows, cols), np.float32)
    return -np.log(np.maximum(counts, 1.0) / np.float32(n0))


def _window(img: F32, field: Bools, lo_q: float, hi_q: float) -> F32:
    sample = img[::3, ::3][field[::3, ::3]]
    if sample.size < 16:
        sample = img.ravel()
    lo, hi = np.percentile(sample, [lo_q, hi_q])
    return ((img - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)


def _postprocess(rng: np.random.Generator, frame: _Frame, dens: F32, field: Bools, lungs: Bools) -> F32:
    """Vendor-style processing: multi-scale enhancement, tone curve, mild equalisation."""
    # Like a vendor's anatomy-aware window: the black point sits between the
    # direct-exposure air and the darkest lung, the white point at dense bone.
    inside = field & lungs
    lung_lo = float(np.percentile(dens[inside], 0.5)) if inside.any() else float(dens.mean())
    air = float(np.percentile(dens[::3, ::3][field[::3, ::3]], 0.5))
    lo = air + rng.uniform(0.75, 1.0) * (lung_lo - air)
    hi = float(np.percentile(dens[::3, ::3][field[::3, ::3]], rng.uniform(99.0, 99.9)))
    img = ((dens - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    if rng.random() < 0.55:
        for sigma in (0.008, 0.03, 0.1):
            if rng.random() < 0.6:
                img = img + np.float32(rng.uniform(0.15, 0.9)) * (img - _blur(img, sigma * frame.s))
        img = _window(img, field, 0.2, 99.7)
    tone = int(rng.integers(3))
    x = np.clip(img, 0.0, 1.0)
    if tone == 1:
        g, c = rng.uniform(3.0, 8.0), rng.uniform(0.4, 0.6)
        lo, hi = 1 / (1 + math.exp(g * c)), 1 / (1 + math.exp(-g * (1 - c)))
        x = (1.0 / (1.0 + np.exp(-g * (x - c))) - lo) / (hi - lo)
    elif tone == 2:
        x = np.power(x, np.float32(rng.uniform(0.7, 1.4)))
    if rng.random() < 0.3:
        clahe = cv2.createCLAHE(clipLimit=rng.uniform(1.0, 2.5), tileGridSize=(int(rng.integers(4, 9)),) * 2)
        eq = clahe.apply(np.round(x * 255).astype(np.uint8)).astype(np.float32) / 255.0
        lam = np.float32(rng.uniform(0.2, 0.5))
        x = (1 - lam) * x + lam * eq
    return x.astype(np.float32)


def _collimator(rng: np.random.Generator, frame: _Frame, lungs: Bools) -> tuple[Bools, str]:
    """Field (inside collimation) and how its outside shows: none/unexposed/black/dim."""
    kind = ("none", "unexposed", "black", "dim")[int(rng.choice(4, p=[0.5, 0.2, 0.2, 0.1]))]
    field = np.ones((frame.rows, frame.cols), bool)
    if kind == "none":
        return field, kind
    rr, cc = np.nonzero(lungs)
    if rr.size == 0:
        return field, "none"
    m = 0.03 * frame.s
    r0 = int(rng.uniform(0, max(rr.min() - m, 0) + 1))
    r1 = frame.rows - int(rng.uniform(0, max(frame.rows - 1 - rr.max() - m, 0) + 1))
    c0 = int(rng.uniform(0, max(cc.min() - m, 0) + 1))
    c1 = frame.cols - int(rng.uniform(0, max(frame.cols - 1 - cc.max() - m, 0) + 1))
    field[:] = False
    field[r0:r1, c0:c1] = True
    return field, kind


def _text_layer(rng: np.random.Generator, frame: _Frame, avoid: Bools, texts: list[str], height: float) -> U8:
    """Text blobs in free corners (never over the lungs)."""
    canvas = np.zeros((frame.rows, frame.cols), np.uint8)
    scale = max(0.25, height * frame.s / 22.0)
    for text in texts:
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, round(scale * 2)))
        for _ in range(4):
            x = int(rng.uniform(0.02, 0.98) * max(frame.cols - tw, 1))
            y = int(rng.uniform(0.02, 0.98) * max(frame.rows - th, 1)) + th
            if rng.random() < 0.7:   # markers mostly live in the upper or lower band
                y = th + 2 if rng.random() < 0.5 else frame.rows - 3
            r0, r1 = max(y - th - 2, 0), min(y + 4, frame.rows)
            c0, c1 = max(x - 2, 0), min(x + tw + 2, frame.cols)
            if r1 <= r0 or c1 <= c0 or avoid[r0:r1, c0:c1].any():
                continue
            cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 1, max(1, round(scale * 2)))
            break
    return canvas


# --------------------------------------------------------------------------- assembly

def _checked(finding: str | None, size: tuple[int, int], severity: str | None) -> tuple[int, int]:
    rows, cols = int(size[0]), int(size[1])
    if rows < 32 or cols < 32:
        raise ValueError(f"size {size} too small")
    if finding is not None and finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS}")
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; expected one of {SEVERITIES}")
    return rows, cols


def _make(rng: np.random.Generator, finding: str | None, size: tuple[int, int],
          severity: str | None, tilt: bool = True) -> Radiograph:
    rows, cols = _checked(finding, size, severity)
    seeds = rng.integers(0, 2 ** 62, size=4)
    anat, acq, fnd, noise = (np.random.default_rng(int(s)) for s in seeds)
    if finding is None:
        severity = None
    elif severity is None:
        severity = SEVERITIES[int(fnd.integers(len(SEVERITIES)))]
    side_idx = int(fnd.integers(2))
    side = ("right", "left")[side_idx] if finding in _LATERAL else None

    frame = _make_frame(acq, rows, cols, tilt)
    mu = _draw_mu(anat)
    hemis = _draw_hemis(anat)
    outlines = _lung_outlines(anat, hemis)
    lo, hi = _DRAW_CTR["obvious" if finding == "cardiomegaly" and severity == "obvious"
                       else "subtle" if finding == "cardiomegaly" else None]
    ctr_u = anat.uniform(0.0, 1.0)   # drawn for every image: same patient with and without a finding
    heart_polys, ctr = _heart(anat, hemis, outlines, lo + ctr_u * (hi - lo))

    lung_masks = [_fill(frame, [o]) for o in outlines]
    lungs_u8 = lung_masks[0] | lung_masks[1]
    heart_u8 = _fill(frame, heart_polys)

    # Soft tissue: trunk, breasts, lungs (air path), heart and mediastinum.
    L_soft, body_t, body_depth, shoulder = _body(anat, frame, hemis, mu)
    if anat.random() < 0.3:
        L_soft += mu.soft * 0.9 * _breasts(anat, frame, hemis)
    lung_depth = body_depth * anat.uniform(0.62, 0.8)
    # Lungs keep most of their depth until close to the ribs (rounded chest wall).
    t_lung = _extrude(anat, lungs_u8, frame, lung_depth, 0.2, 0.5)
    # Lungs are deeper (AP) at the bases than at the apices.
    apex = min(h.apex_y for h in hemis)
    base = max(h.cp_y for h in hemis)
    t_lung *= np.clip(0.65 + 0.35 * (frame.Y - apex) / (base - apex), 0.6, 1.05)
    # The heart fills most of the AP depth of the lungs it overlaps.
    heart_depth = lung_depth * anat.uniform(0.75, 0.95) * math.sqrt(ctr / 0.42)
    t_heart = _extrude(anat, heart_u8, frame, heart_depth, 0.3, 0.7)
    med = _mediastinum(anat, frame, hemis)
    floor = anat.uniform(0.1, 0.3)   # retrocardiac lung that is left behind the heart
    t_air = np.maximum(t_lung - t_heart - med.displace, floor * t_lung)
    t_air = np.minimum(t_air, np.maximum(body_t - 2.5, 0.0)).astype(np.float32)
    L_soft -= mu.soft * med.air * (t_lung < 1.0)
    if anat.random() < 0.4:   # gastric bubble under the left dome
        lh = hemis[1]
        bub = _ellipsoid(frame, anat.uniform(0.12, 0.24), lh.dome_y + anat.uniform(0.07, 0.11),
                         anat.uniform(0.04, 0.07), anat.uniform(0.025, 0.04), anat.uniform(2.0, 5.0))
        L_soft -= mu.soft * bub * (lungs_u8 == 0)

    # Markings and texture (drawn before the finding so a finding cannot move them).
    vessels = np.zeros((rows, cols), np.float32)
    if anat.random() < 0.7:
        _vessel_tree(anat, frame, hemis, mu, vessels)
    else:
        _line_field(anat, frame, outlines, hemis, mu, vessels)
    # Vessel gain above the pure cylinder law: real markings include the
    # bronchovascular sheaths and are edge-enhanced by the reader's display.
    vessels = _blur(vessels, 0.6) * np.float32(anat.uniform(1.0, 2.2))
    texture = (0.5 * _noise(anat, rows, cols, 0.015 * frame.s)
               + 0.5 * _noise(anat, rows, cols, 0.05 * frame.s)) * np.float32(anat.uniform(0.02, 0.07))

    L_bone = _spine(anat, frame, mu)
    _ribs(anat, frame, outlines, hemis, mu, L_bone)
    _clavicles_shoulders(anat, frame, hemis, shoulder, mu, L_bone)

    # The finding.
    mask = np.zeros((rows, cols), bool)
    f: _Finding | None = None
    if finding == "nodule":
        f = _nodule(fnd, frame, lung_masks[side_idx], heart_u8, str(severity), mu)
    elif finding == "consolidation":
        f = _consolidation(fnd, frame, lung_masks[side_idx], heart_u8, str(severity))
    elif finding == "effusion":
        f = _effusion(fnd, frame, lung_masks[side_idx], outlines[side_idx], hemis[side_idx], side_idx,
                      str(severity))
    elif finding == "pneumothorax":
        f = _pneumothorax(fnd, frame, lung_masks[side_idx], outlines[side_idx], hemis[side_idx],
                          str(severity))
    elif finding == "cardiomegaly":
        mask = heart_u8 > 0
    if f is not None:
        mask = f.mask
        if f.air_keep is not None:
            t_air = t_air * f.air_keep
    presence = np.clip(t_air / 3.0, 0.0, 1.0)     # is there aerated parenchyma to see vessels in
    lung_mu = np.full((rows, cols), mu.lung, np.float32)
    if f is not None and f.dense is not None:
        lung_mu *= f.dense
    if f is not None and f.free_air is not None:
        lung_mu[f.free_air] = 0.0                 # free pleural air, no parenchyma
        presence[f.free_air] = 0.0
    L_soft -= (mu.soft - lung_mu) * t_air
    L_soft += (mu.soft - mu.lung) * presence * vessels
    L_soft += mu.lung * t_air * texture * (lung_mu > 0)
    if f is not None and f.solid_cm is not None:
        L_soft += (mu.soft - mu.lung) * f.solid_cm
    if f is not None and f.line is not None:
        L_soft += f.line

    # Acquisition.
    field, coll = _collimator(acq, frame, lungs_u8 > 0)
    avoid = (_blur(lungs_u8.astype(np.float32), 0.02 * frame.s) > 0.01) | ~field
    if acq.random() < 0.5:   # lead side marker
        lead = _text_layer(acq, frame, avoid, [str(acq.choice(["R", "L", "PA", "AP"]))], 0.04)
        L_bone += lead.astype(np.float32) * np.float32(acq.uniform(1.5, 3.0))
    shutter = np.where(field, 1.0, 0.03).astype(np.float32) if coll == "unexposed" else None
    dens = _expose(acq, noise, frame, L_soft, L_bone, shutter)
    image = _postprocess(acq, frame, dens, field, lungs_u8 > 0)
    image = np.clip(image, 0.0, 1.0)
    if coll in ("black", "dim"):
        image[~field] = 0.0 if coll == "black" else np.float32(acq.uniform(0.1, 0.35))
    elif coll == "unexposed":
        image[~field] = 1.0
    if acq.random() < 0.3:   # burned-in annotation
        words = [str(acq.choice(["ERECT", "PORTABLE", "STANDING", "INSP"])), str(int(acq.integers(10, 99)))]
        txt = _text_layer(acq, frame, avoid, words, 0.025)
        image[txt > 0] = np.float32(acq.uniform(0.8, 1.0))

    return Radiograph(image=image.astype(np.float32), finding=finding, severity=severity, side=side,
                      mask=mask.astype(bool), lungs=lungs_u8 > 0, heart=heart_u8 > 0, ctr=float(ctr))
