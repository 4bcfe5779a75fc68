"""Independent chest radiograph phantoms, for held-out evaluation only.

Written separately from ``dicom_node_synthetic.cxr_phantom`` (nothing is
imported from it) and designed differently, so that a triage model's figures
on these images say whether it learned the task or its training generator:

* **Geometry in millimetres** on a detector of random size and matrix, not
  in chest units: habitus (thorax width, chest-wall fat, AP depth, breast
  shadows, arms at the sides or raised), lungs as jittered polygons, a
  tilted heart with harmonic outline, vertebral bodies, hollow-tube ribs
  (cortical shells: bright edges) posterior *and* anterior, clavicles, a
  gastric bubble and a branching vessel tree.
* **Intensity from physics**: path lengths (cm) of soft tissue and bone,
  Beer-Lambert attenuation, a scatter fraction, Poisson photon counts at a
  random dose plus electronic noise, detector blur (so the noise is
  correlated), the log, then the vendor-style processing a radiograph gets
  before it is sent (unsharp-mask edge enhancement, a sigmoid tone curve),
  collimation (unexposed borders), a lead side marker, MONOCHROME1 or 2 and
  10 to 16 stored bits with a VOI window in the header.
* **Findings** at continuous sizes and contrasts: pleural effusion (meniscus),
  mass (lobulated, optionally spiculated), consolidation (segmental, with
  air bronchograms), pneumothorax (pleural gap without vessels, visceral
  line, denser collapsed lung) and cardiomegaly (CTR > 0.52; normals < 0.48).

Ground truth is exact: the label, the abnormality mask on the image grid,
the lung and heart masks and the drawn cardiothoracic ratio.  The only
source of randomness is the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom import Dataset

from dicom_node_synthetic._dicom import seeded_uid, set_pixels

__all__ = ["FINDINGS", "IndependentRadiograph", "make_independent_radiograph", "measure_ctr"]

FINDINGS: tuple[str, ...] = ("effusion", "mass", "consolidation", "pneumothorax",
                             "cardiomegaly")

# Effective linear attenuation (1/cm) at a chest kVp, relative to water.
_MU_TISSUE = 0.20
_MU_BONE = 0.48
# Cardiothoracic ratio: drawn in these ranges, then kept only when the
# ratio measured on the rendered masks is below 0.48 (normal) or above 0.52.
_NORMAL_CTR = (0.36, 0.48)
_ENLARGED_CTR = (0.52, 0.72)


@dataclass(frozen=True, eq=False)
class IndependentRadiograph:
    """One radiograph as a detector would send it, with its ground truth.

    ``stored`` holds the stored pixel values (MONOCHROME1: bright = air);
    ``dataset()`` wraps them into a DX instance the node can present.
    """

    stored: np.ndarray          # uint16 (rows, cols)
    photometric: str            # "MONOCHROME1" or "MONOCHROME2"
    bits_stored: int
    window: tuple[float, float]  # (center, width) on stored values
    pixel_spacing_mm: float
    finding: str | None
    mask: np.ndarray            # bool, where the abnormality is
    lungs: np.ndarray           # bool, the aerated lungs before any finding
    heart: np.ndarray           # bool, cardiac silhouette
    ctr: float
    size_mm: float              # lesion extent (0 when normal)

    @property
    def abnormal(self) -> bool:
        return self.finding is not None

    def dataset(self, seed: str = "0") -> Dataset:
        """A DX For Presentation instance (uncompressed) carrying ``stored``."""
        def uid(part: str) -> str:
            return seeded_uid("independent-cxr", seed, part)

        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = uid("instance")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
        ds.PatientName, ds.PatientID = "INDEPENDENT^PHANTOM", "IND0001"
        ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
        ds.PhotometricInterpretation = self.photometric
        ds.BitsAllocated, ds.BitsStored = 16, self.bits_stored
        ds.HighBit, ds.PixelRepresentation = self.bits_stored - 1, 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.WindowCenter, ds.WindowWidth = round(self.window[0], 1), round(self.window[1], 1)
        ds.ImagerPixelSpacing = [self.pixel_spacing_mm] * 2
        set_pixels(ds, self.stored)
        return ds


def make_independent_radiograph(rng: np.random.Generator, finding: str | None = None,
                                matrix: tuple[int, int] | None = None
                                ) -> IndependentRadiograph:
    """Render one frontal chest radiograph with ``finding`` (None = normal).

    ``matrix`` is (rows, columns); by default it is drawn (long side
    256-480 px, portrait or landscape detector).
    """
    if finding is not None and finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS}")
    if matrix is None:
        long_side = int(rng.integers(256, 481))
        short = int(round(long_side * rng.uniform(0.78, 1.0)))
        matrix = (long_side, short) if rng.random() < 0.6 else (short, long_side)
    rows, cols = matrix
    fov_mm = rng.uniform(360.0, 440.0)          # long side of the detector field
    spacing = fov_mm / max(rows, cols)
    g = _Grid(rng, rows, cols, spacing)
    body = _Body.draw(rng)

    tissue = _torso(g, body)                    # cm of soft tissue along the ray
    bone = np.zeros_like(tissue)
    lungs_soft, lung_sides = _lungs(rng, g, body)
    lungs = lungs_soft > 0.5
    enlarged = finding == "cardiomegaly"
    for _ in range(20):
        heart_t, heart_mask = _heart(rng, g, body, float(rng.uniform(
            *(_ENLARGED_CTR if enlarged else _NORMAL_CTR))))
        # The truth is the ratio as drawn on the image, not the parameter.
        ctr = measure_ctr(lungs, heart_mask)
        if (ctr > _ENLARGED_CTR[0]) if enlarged else (ctr < _NORMAL_CTR[1]):
            break
    lung_depth = body.depth_cm * rng.uniform(0.50, 0.62)
    air = lung_depth * _rounded(lungs_soft, g, 0.22 * body.half_width)
    air = np.maximum(air - 0.9 * heart_t, 0.0)

    mask = np.zeros((rows, cols), dtype=bool)
    keep_vessels = np.ones_like(air)
    extra_tissue = np.zeros_like(air)
    size_mm = 0.0
    if finding == "effusion":
        air, mask, size_mm = _effusion(rng, g, air, lung_sides)
        keep_vessels = (air > 0.05 * lung_depth).astype(np.float32)
    elif finding == "mass":
        extra_tissue, mask, size_mm = _mass(rng, g, lung_sides, heart_mask)
        air = np.maximum(air - extra_tissue, 0.0)
    elif finding == "consolidation":
        air, mask, size_mm, keep_vessels = _consolidation(rng, g, air, lung_sides, heart_mask)
    elif finding == "pneumothorax":
        air, keep_vessels, extra_tissue, mask, size_mm = _pneumothorax(
            rng, g, air, lung_sides, lung_depth)
    elif finding == "cardiomegaly":
        mask = heart_mask
        size_mm = float(ctr)

    vessels = _vessel_tree(rng, g, body) * (air > 0.3) * keep_vessels
    tissue = tissue - air + extra_tissue + vessels + heart_t * 0.05
    tissue += _breasts(rng, g, body)
    tissue -= _gastric_bubble(rng, g, body)
    bone += _spine(rng, g, body)
    bone += _ribs(rng, g, body)
    bone += _clavicles(rng, g, body)
    bone += _humeri(g, body)
    image, field = _detect(rng, g, np.maximum(tissue, 0.0), bone)
    stored, bits, window, photometric = _to_stored(rng, image, field)
    return IndependentRadiograph(
        stored=stored, photometric=photometric, bits_stored=bits, window=window,
        pixel_spacing_mm=float(spacing), finding=finding, mask=mask & field,
        lungs=lungs, heart=heart_mask, ctr=ctr, size_mm=float(size_mm))


def measure_ctr(lungs: np.ndarray, heart: np.ndarray) -> float:
    """Widest heart row span over the widest lung row span (both image rows)."""
    def widest(m: np.ndarray) -> int:
        cols = np.arange(m.shape[1])
        any_set = m.any(axis=1)
        first = np.where(m, cols, m.shape[1]).min(axis=1)
        last = np.where(m, cols, -1).max(axis=1)
        return int(np.where(any_set, last - first + 1, 0).max(initial=0))

    thorax = widest(lungs)
    if thorax == 0:
        raise ValueError("no lung pixels to measure a cardiothoracic ratio on")
    return widest(heart) / thorax


# --------------------------------------------------------------------------- geometry

class _Grid:
    """Patient coordinates (mm) of every pixel: x to the image right, y down,
    origin at the thorax centre, after patient rotation and shift."""

    def __init__(self, rng: np.random.Generator, rows: int, cols: int,
                 spacing: float) -> None:
        self.rows, self.cols, self.spacing = rows, cols, spacing
        angle = math.radians(rng.normal(0.0, 4.0))
        cx = cols / 2 + rng.normal(0.0, 0.04) * cols
        cy = rows / 2 + rng.uniform(-0.02, 0.10) * rows
        self.cos, self.sin, self.cx, self.cy = math.cos(angle), math.sin(angle), cx, cy
        xs = (np.arange(cols, dtype=np.float32) - cx) * spacing
        ys = (np.arange(rows, dtype=np.float32) - cy) * spacing
        xx, yy = np.meshgrid(xs, ys)
        self.x = xx * self.cos + yy * self.sin
        self.y = -xx * self.sin + yy * self.cos

    def to_px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Patient mm -> pixel (col, row) for OpenCV drawing."""
        xi = x * self.cos - y * self.sin
        yi = x * self.sin + y * self.cos
        return np.stack([xi / self.spacing + self.cx, yi / self.spacing + self.cy], -1)


@dataclass(frozen=True)
class _Body:
    half_width: float      # inner thoracic half-width at the widest, mm
    wall: float            # chest-wall soft tissue beyond the ribs, mm
    lung_height: float     # apex to costophrenic angle, mm
    apex_y: float
    depth_cm: float        # AP thickness of the chest
    female: bool
    arms_down: bool

    @property
    def base_y(self) -> float:
        return self.apex_y + self.lung_height

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Body:
        half = rng.uniform(115.0, 170.0)
        height = half * rng.uniform(1.45, 1.95)
        return cls(half_width=half, wall=rng.uniform(12.0, 50.0), lung_height=height,
                   apex_y=-0.55 * height, depth_cm=rng.uniform(17.0, 30.0),
                   female=bool(rng.random() < 0.5), arms_down=bool(rng.random() < 0.4))


def _torso(g: _Grid, b: _Body) -> np.ndarray:
    """Soft-tissue path length (cm): elliptic chords through neck, shoulders, trunk."""
    y = g.y
    neck = 0.42 * b.half_width
    trunk = b.half_width + b.wall
    shoulder = 1.25 * trunk
    t = np.clip((y - (b.apex_y - 0.12 * b.lung_height)) / (0.10 * b.lung_height), 0.0, 1.0)
    half = neck + (shoulder - neck) * (3 * t * t - 2 * t ** 3)
    s = np.clip((y - b.apex_y) / (0.5 * b.lung_height), 0.0, 1.0)
    half = half + (trunk - shoulder) * s
    r = np.clip(1.0 - (g.x / half) ** 2, 0.0, 1.0)
    depth = b.depth_cm * (0.55 + 0.45 * np.clip((y - b.apex_y + 40.0) / 80.0, 0.0, 1.0))
    out = depth * np.sqrt(r)
    if b.arms_down:
        for sign in (-1.0, 1.0):
            c = sign * (trunk + 0.28 * b.half_width)
            w = 0.22 * b.half_width
            arm = np.clip(1.0 - ((g.x - c) / w) ** 2, 0.0, 1.0)
            arm *= np.clip((y - b.apex_y + 20.0) / 30.0, 0.0, 1.0)
            out = out + 0.9 * w / 10.0 * np.sqrt(arm)
    return out.astype(np.float32)


def _lungs(rng: np.random.Generator, g: _Grid, b: _Body) -> tuple[np.ndarray, list[np.ndarray]]:
    """Soft lung masks (0..1) from jittered outline polygons, per side too."""
    # (lateral fraction of half-width, vertical fraction of lung height)
    outline = np.array([(0.20, 0.00), (0.42, 0.03), (0.66, 0.14), (0.84, 0.32),
                        (0.95, 0.55), (1.00, 0.80), (0.98, 1.00), (0.80, 0.92),
                        (0.55, 0.82), (0.30, 0.84), (0.14, 0.90), (0.10, 0.60),
                        (0.12, 0.30), (0.15, 0.10)], dtype=np.float32)
    sides = []
    total = np.zeros((g.rows, g.cols), dtype=np.float32)
    dome_lift = rng.uniform(0.0, 0.06)
    for sign in (-1.0, 1.0):
        pts = outline + rng.normal(0.0, 0.018, outline.shape).astype(np.float32)
        if sign < 0:       # patient right (image left): the liver lifts the dome
            pts[7:11, 1] -= dome_lift
        x = sign * pts[:, 0] * b.half_width * rng.uniform(0.96, 1.02)
        y = b.apex_y + pts[:, 1] * b.lung_height
        poly = _smooth_polygon(x, y)
        m = _fill(g, poly)
        sides.append(m)
        total = np.maximum(total, m)
    return total, sides


def _smooth_polygon(x: np.ndarray, y: np.ndarray, per_edge: int = 8) -> np.ndarray:
    """Closed Catmull-Rom spline through the points, as a dense polygon (mm)."""
    p = np.stack([x, y], -1).astype(np.float64)
    n = len(p)
    t = np.linspace(0.0, 1.0, per_edge, endpoint=False)[:, None]
    out = []
    for i in range(n):
        p0, p1, p2, p3 = p[i - 1], p[i], p[(i + 1) % n], p[(i + 2) % n]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    return np.concatenate(out)


def _fill(g: _Grid, poly_mm: np.ndarray) -> np.ndarray:
    """Anti-aliased fill of a polygon given in patient mm, values 0..1."""
    px = g.to_px(poly_mm[:, 0].astype(np.float32), poly_mm[:, 1].astype(np.float32))
    canvas = np.zeros((g.rows, g.cols), dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(px * 8).astype(np.int32)], 255, cv2.LINE_AA, 3)
    return canvas.astype(np.float32) / 255.0


def _rounded(mask: np.ndarray, g: _Grid, scale_mm: float) -> np.ndarray:
    """0..1 thickness profile: rises from a mask's edge over ``scale_mm``."""
    d = cv2.distanceTransform((mask > 0.5).astype(np.uint8), cv2.DIST_L2, 5) * g.spacing
    edge = np.clip(mask, 0.0, 1.0)
    return (edge * np.sqrt(np.clip(d / scale_mm, 0.0, 1.0)) ** 0.8).astype(np.float32)


def _heart(rng: np.random.Generator, g: _Grid, b: _Body, ctr: float) -> tuple[np.ndarray, np.ndarray]:
    """Tilted heart with a harmonic outline; returns (thickness cm, silhouette)."""
    width = ctr * 2.0 * b.half_width
    right = width * rng.uniform(0.28, 0.38)
    cx = (width - right) - width / 2.0
    cy = b.base_y - b.lung_height * rng.uniform(0.20, 0.26)
    ry = width * rng.uniform(0.36, 0.44)
    tilt = math.radians(rng.uniform(20.0, 40.0))
    dx, dy = g.x - cx, g.y - cy
    u = dx * math.cos(tilt) + dy * math.sin(tilt)
    v = -dx * math.sin(tilt) + dy * math.cos(tilt)
    theta = np.arctan2(v, u)
    wobble = 1.0 + 0.06 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi)) + 0.03 * np.cos(
        3 * theta + rng.uniform(0, 2 * np.pi))
    # Semi-axes such that the horizontal extent is ``width``.
    a = width / 2.0 / math.sqrt(math.cos(tilt) ** 2 + (ry / (width / 2.0)) ** 2
                                * math.sin(tilt) ** 2 + 1e-9)
    a = min(max(a, 0.55 * width), 0.8 * width)
    rho = np.sqrt((u / a) ** 2 + (v / ry) ** 2) / wobble
    # The drawn silhouette is then rescaled to the exact horizontal width.
    sil = rho < 1.0
    cols = np.where(sil.any(axis=0))[0]
    if len(cols) > 1:
        got = (cols[-1] - cols[0] + 1) * g.spacing
        rho = rho * (got / width)
        sil = rho < 1.0
    below = g.y < b.base_y + 0.04 * b.lung_height
    sil &= below
    thick = 0.45 * b.depth_cm * np.sqrt(np.clip(1.0 - rho ** 2, 0.0, 1.0)) * below
    return thick.astype(np.float32), sil


def _tube(g: _Grid, lines: list[np.ndarray], radius_mm: float,
          hollow: float = 0.0) -> np.ndarray:
    """Path length (cm) through cylinders along polylines; ``hollow`` is the
    inner/outer radius ratio of a cortical shell (0 = solid)."""
    canvas = np.full((g.rows, g.cols), 255, dtype=np.uint8)
    for line in lines:
        px = g.to_px(line[:, 0].astype(np.float32), line[:, 1].astype(np.float32))
        cv2.polylines(canvas, [np.round(px * 4).astype(np.int32)], False, 0, 1, cv2.LINE_8, 2)
    # Capped: with no line pixel on the image the transform is FLT_MAX.
    d = np.minimum(cv2.distanceTransform(canvas, cv2.DIST_L2, 5), 1e4) * g.spacing
    outer = 2.0 * np.sqrt(np.clip(radius_mm ** 2 - d ** 2, 0.0, None))
    inner = 2.0 * np.sqrt(np.clip((hollow * radius_mm) ** 2 - d ** 2, 0.0, None))
    return ((outer - 0.75 * inner) / 10.0).astype(np.float32)


def _ribs(rng: np.random.Generator, g: _Grid, b: _Body) -> np.ndarray:
    """Posterior ribs (arched, hollow) and fainter anterior ribs (sloping down medially)."""
    t = np.linspace(0.0, 1.0, 20)
    post, ant = [], []
    step = b.lung_height * rng.uniform(0.085, 0.10)
    for sign in (-1.0, 1.0):
        for i in range(11):
            y0 = b.apex_y - 0.06 * b.lung_height + i * step
            reach = b.half_width * (0.55 + 0.45 * min(1.0, 0.35 + 0.2 * i)) + 8.0
            x = sign * (18.0 + t * reach)
            y = y0 - 0.22 * reach * np.sin(np.pi * t * 0.6) + 0.55 * reach * t ** 2.2
            post.append(np.stack([x, y], -1))
        for i in range(7):
            y0 = b.apex_y + 0.08 * b.lung_height + i * step * 1.25
            x = sign * (b.half_width * (1.0 - 0.7 * t))
            y = y0 + 0.25 * b.half_width * t ** 1.3
            ant.append(np.stack([x, y], -1))
    r = rng.uniform(4.0, 6.5)
    return (rng.uniform(0.7, 1.2) * _tube(g, post, r, hollow=0.75)
            + rng.uniform(0.25, 0.5) * _tube(g, ant, r * 0.9, hollow=0.6))


def _clavicles(rng: np.random.Generator, g: _Grid, b: _Body) -> np.ndarray:
    t = np.linspace(0.0, 1.0, 16)
    y0 = b.apex_y + rng.uniform(-0.02, 0.06) * b.lung_height
    lines = []
    for sign in (-1.0, 1.0):
        x = sign * (15.0 + t * 1.05 * b.half_width)
        y = y0 - 0.12 * b.half_width * t + 0.04 * b.half_width * np.sin(2.2 * np.pi * t)
        lines.append(np.stack([x, y], -1))
    return _tube(g, lines, rng.uniform(5.0, 8.0), hollow=0.6)


def _spine(rng: np.random.Generator, g: _Grid, b: _Body) -> np.ndarray:
    """Vertebral bodies (rounded blocks with end plates) stacked from neck to abdomen."""
    w = b.half_width * rng.uniform(0.20, 0.26)
    h = b.lung_height * rng.uniform(0.075, 0.09)
    period = h * 1.22
    phase = np.mod(g.y - b.apex_y, period) - h / 2
    r = np.clip(1.0 - (np.abs(g.x) / (w / 2)) ** 4 - (np.abs(phase) / (h / 2)) ** 4, 0.0, 1.0)
    return (2.2 * np.sqrt(r)).astype(np.float32)


def _humeri(g: _Grid, b: _Body) -> np.ndarray:
    if not b.arms_down:
        return np.zeros((g.rows, g.cols), dtype=np.float32)
    trunk = b.half_width + b.wall
    lines = []
    for sign in (-1.0, 1.0):
        x = np.full(8, sign * (trunk + 0.28 * b.half_width))
        y = np.linspace(b.apex_y - 10.0, b.base_y + 60.0, 8)
        lines.append(np.stack([x, y], -1))
    return _tube(g, lines, 0.07 * b.half_width + 4.0, hollow=0.55)


def _breasts(rng: np.random.Generator, g: _Grid, b: _Body) -> np.ndarray:
    if not b.female:
        return np.zeros((g.rows, g.cols), dtype=np.float32)
    out = np.zeros((g.rows, g.cols), dtype=np.float32)
    r = b.half_width * rng.uniform(0.35, 0.55)
    depth = rng.uniform(2.0, 6.0)
    for sign in (-1.0, 1.0):
        cx, cy = sign * 0.55 * b.half_width, b.base_y - 0.05 * b.lung_height
        q = np.clip(1.0 - ((g.x - cx) / r) ** 2 - ((g.y - cy) / (0.8 * r)) ** 2, 0.0, 1.0)
        out += depth * np.sqrt(q) * (g.y > cy - 0.5 * r)
    return out


def _gastric_bubble(rng: np.random.Generator, g: _Grid, b: _Body) -> np.ndarray:
    r = b.half_width * rng.uniform(0.08, 0.20)
    cx, cy = 0.45 * b.half_width, b.base_y + rng.uniform(0.0, 0.12) * b.lung_height
    q = np.clip(1.0 - ((g.x - cx) / (1.3 * r)) ** 2 - ((g.y - cy) / r) ** 2, 0.0, 1.0)
    return rng.uniform(2.0, 6.0) * np.sqrt(q) * (rng.random() < 0.8)


def _vessel_tree(rng: np.random.Generator, g: _Grid, b: _Body) -> np.ndarray:
    """Branching pulmonary vessels from each hilum (dichotomous tree), cm of tissue."""
    layer = np.zeros((g.rows, g.cols), dtype=np.float32)
    for sign in (-1.0, 1.0):
        hx, hy = sign * 0.26 * b.half_width, b.apex_y + 0.45 * b.lung_height
        stack = [(hx, hy, math.radians(a), 0.28 * b.half_width, 4.5, 0)
                 for a in rng.uniform(-150, 150, size=4)]
        while stack:
            x, y, ang, length, rad, depth = stack.pop()
            dx = math.cos(ang) * sign
            x2, y2 = x + dx * length, y + math.sin(ang) * length
            p = g.to_px(np.array([x, x2], np.float32), np.array([y, y2], np.float32))
            thick = max(1, int(round(2 * rad / g.spacing)))
            cv2.line(layer, tuple(np.round(p[0] * 4).astype(int)),
                     tuple(np.round(p[1] * 4).astype(int)), float(rad) / 10.0 * 1.4,
                     thick, cv2.LINE_AA, 2)
            if depth < 4:
                for turn in (-1.0, 1.0):
                    stack.append((x2, y2, ang + turn * math.radians(rng.uniform(18, 40)),
                                  length * rng.uniform(0.55, 0.8), rad * 0.7, depth + 1))
    return cv2.GaussianBlur(layer, (0, 0), max(0.5, 1.0 / g.spacing))


# --------------------------------------------------------------------------- findings

def _lung_point(rng: np.random.Generator, g: _Grid, sides: list[np.ndarray],
                radius_mm: float, avoid: np.ndarray | None = None) -> tuple[int, int, int]:
    """A (side, row, col) whose disc of ``radius_mm`` lies inside one lung."""
    k = int(rng.integers(2))
    inside = cv2.distanceTransform((sides[k] > 0.5).astype(np.uint8), cv2.DIST_L2, 5)
    ok = inside * g.spacing > radius_mm
    if avoid is not None:
        ok &= ~avoid
    if not ok.any():
        ok = inside >= inside.max() * 0.8
    rr, cc = np.nonzero(ok)
    j = int(rng.integers(len(rr)))
    return k, int(rr[j]), int(cc[j])


def _effusion(rng: np.random.Generator, g: _Grid, air: np.ndarray,
              sides: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Fluid layering at the base of one lung, a meniscus climbing laterally."""
    k = int(rng.integers(2))
    lung = sides[k] > 0.5
    ys = g.y[lung]
    top, bottom = float(ys.min()), float(ys.max())
    frac = rng.uniform(0.08, 0.45)
    level0 = bottom - frac * (bottom - top)
    xs = np.abs(g.x[lung])
    lateral = np.clip((np.abs(g.x) - xs.min()) / max(xs.max() - xs.min(), 1.0), 0.0, 1.0)
    level = level0 - rng.uniform(0.05, 0.2) * (bottom - top) * lateral ** 2
    fluid = np.clip((g.y - level) / 12.0, 0.0, 1.0) * (sides[k] > 0.0)
    out = air * (1.0 - 0.95 * fluid)
    return out.astype(np.float32), lung & (fluid > 0.3), frac * (bottom - top)


def _mass(rng: np.random.Generator, g: _Grid, sides: list[np.ndarray],
          heart: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Lobulated (sometimes spiculated) soft-tissue mass inside a lung."""
    r = float(np.exp(rng.uniform(math.log(7.0), math.log(40.0))))
    _, row, col = _lung_point(rng, g, sides, r, avoid=heart)
    cy = float(g.y[row, col])
    cx = float(g.x[row, col])
    dx, dy = g.x - cx, g.y - cy
    theta = np.arctan2(dy, dx)
    edge = 1.0 + sum(rng.uniform(0.0, 0.12) * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
                     for m in (2, 3, 5))
    if rng.random() < 0.4:
        edge = edge + 0.12 * np.maximum(np.cos(11 * theta + rng.uniform(0, 6.3)), 0.0) ** 6
    rho = np.sqrt(dx ** 2 + dy ** 2) / (r * edge)
    density = rng.uniform(0.5, 1.0)
    t = density * 2.0 * r / 10.0 * np.sqrt(np.clip(1.0 - rho ** 2, 0.0, 1.0))
    return t.astype(np.float32), rho < 1.0, 2.0 * r


def _consolidation(rng: np.random.Generator, g: _Grid, air: np.ndarray,
                   sides: list[np.ndarray], heart: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Segmental air-space filling with air bronchograms, confined to one lung."""
    r = float(np.exp(rng.uniform(math.log(15.0), math.log(70.0))))
    k, row, col = _lung_point(rng, g, sides, 0.5 * r, avoid=heart)
    cx, cy = float(g.x[row, col]), float(g.y[row, col])
    grid = rng.standard_normal((9, 9)).astype(np.float32)
    noise = cv2.resize(grid, (g.cols, g.rows), interpolation=cv2.INTER_CUBIC)
    dist = np.sqrt((g.x - cx) ** 2 + ((g.y - cy) * 1.2) ** 2) / r
    field = 1.0 - dist + 0.25 * noise
    region = np.clip(field / 0.15, 0.0, 1.0) * np.clip(sides[k], 0.0, 1.0)
    filling = rng.uniform(0.45, 0.9)
    # Air bronchograms: thin branching air lines stay aerated inside the opacity.
    bronchi = np.zeros((g.rows, g.cols), dtype=np.float32)
    for _ in range(5):
        a = rng.uniform(0, 2 * np.pi)
        p = g.to_px(np.array([cx, cx + math.cos(a) * r], np.float32),
                    np.array([cy, cy + math.sin(a) * r], np.float32))
        cv2.line(bronchi, tuple(np.round(p[0]).astype(int)), tuple(np.round(p[1]).astype(int)),
                 1.0, max(1, int(round(2.0 / g.spacing))), cv2.LINE_AA)
    filled = region * filling * (1.0 - 0.6 * bronchi)
    out = air * (1.0 - filled)
    mask = (region > 0.5) & (sides[k] > 0.5)
    return out.astype(np.float32), mask, 2.0 * r, (1.0 - 0.7 * region).astype(np.float32)


def _pneumothorax(rng: np.random.Generator, g: _Grid, air: np.ndarray,
                  sides: list[np.ndarray], lung_depth: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """A pleural air gap along the apex and lateral wall of one lung."""
    k = int(rng.integers(2))
    lung = sides[k] > 0.5
    gap_mm = float(np.exp(rng.uniform(math.log(4.0), math.log(45.0))))
    ys = g.y[lung]
    top, bottom = float(ys.min()), float(ys.max())
    # The gap is widest at the apex and tapers towards the base.
    taper = np.clip(1.0 - (g.y - top) / ((bottom - top) * rng.uniform(0.6, 1.1)), 0.0, 1.0)
    inside = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 5) * g.spacing
    midline = np.abs(g.x) < 0.45 * float(np.abs(g.x[lung]).max())
    gap = lung & (inside < gap_mm * taper) & ~midline
    collapsed = lung & ~gap
    line = cv2.dilate(gap.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & collapsed
    out = air.copy()
    out[gap] = lung_depth * 0.9
    compress = 1.0 - min(0.5, gap_mm / 120.0)
    out[collapsed] *= compress
    extra = np.zeros_like(air)
    extra[line] = rng.uniform(0.3, 0.8)
    return out, collapsed.astype(np.float32), extra, gap, gap_mm


# --------------------------------------------------------------------------- detector

def _detect(rng: np.random.Generator, g: _Grid, tissue_cm: np.ndarray,
            bone_cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Photon counts -> log signal -> vendor processing; returns (image, field)."""
    primary = np.exp(-(_MU_TISSUE * tissue_cm + _MU_BONE * bone_cm)).astype(np.float32)
    # Scatter is smooth: blurred on an eighth-resolution copy (much faster).
    sigma = rng.uniform(35.0, 80.0) / g.spacing / 8.0
    small = cv2.resize(primary, (max(4, g.cols // 8), max(4, g.rows // 8)),
                       interpolation=cv2.INTER_AREA)
    scatter = rng.uniform(0.15, 0.9) * cv2.resize(cv2.GaussianBlur(small, (0, 0), sigma),
                                                  (g.cols, g.rows),
                                                  interpolation=cv2.INTER_LINEAR)
    field = _collimation(rng, g)
    n0 = float(np.exp(rng.uniform(math.log(1500.0), math.log(40000.0))))
    expected = n0 * (primary + scatter) * np.where(field, 1.0, 0.01)
    counts = rng.poisson(expected).astype(np.float32)
    counts += rng.normal(0.0, rng.uniform(1.0, 8.0), counts.shape).astype(np.float32)
    counts = cv2.GaussianBlur(counts, (0, 0), rng.uniform(0.4, 1.1))
    _lead_marker(rng, g, counts)
    log_signal = -np.log(np.maximum(counts, 0.5) / n0)
    enhance = rng.uniform(0.0, 1.5)
    base = cv2.GaussianBlur(log_signal, (0, 0), rng.uniform(8.0, 25.0) / g.spacing)
    processed = log_signal + enhance * (log_signal - base)
    lo, hi = np.percentile(processed[field], [rng.uniform(0.2, 2.0), rng.uniform(98.0, 99.8)])
    z = (processed - lo) / max(hi - lo, 1e-6)
    slope = rng.uniform(3.0, 8.0)
    mid = rng.uniform(0.4, 0.6)
    tone = 1.0 / (1.0 + np.exp(-slope * (z - mid)))
    t0, t1 = 1.0 / (1.0 + math.exp(slope * mid)), 1.0 / (1.0 + math.exp(-slope * (1 - mid)))
    image = np.clip((tone - t0) / (t1 - t0), 0.0, 1.0)
    return image.astype(np.float32), field


def _collimation(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    """Exposed field: a slightly rotated rectangle, open to the edge half the time."""
    field = np.ones((g.rows, g.cols), dtype=bool)
    if rng.random() < 0.5:
        return field
    margins = rng.uniform(0.0, 0.10, size=4)
    angle = math.radians(rng.uniform(-2.5, 2.5))
    r = np.arange(g.rows, dtype=np.float32)[:, None] - g.rows / 2
    c = np.arange(g.cols, dtype=np.float32)[None, :] - g.cols / 2
    u = c * math.cos(angle) + r * math.sin(angle)
    v = -c * math.sin(angle) + r * math.cos(angle)
    return ((u > -g.cols / 2 * (1 - margins[0])) & (u < g.cols / 2 * (1 - margins[1]))
            & (v > -g.rows / 2 * (1 - margins[2])) & (v < g.rows / 2 * (1 - margins[3])))


def _lead_marker(rng: np.random.Generator, g: _Grid, counts: np.ndarray) -> None:
    """A lead 'R' or 'L' near an upper corner: blocks the beam, letter in relief."""
    side = int(rng.integers(2))
    size = max(8, int(round(14.0 / g.spacing)))
    r0 = int(rng.integers(int(0.04 * g.rows), int(0.15 * g.rows)))
    c0 = int(0.06 * g.cols) if side == 0 else int(0.94 * g.cols) - size
    letter = np.zeros((size, size), dtype=np.uint8)
    cv2.putText(letter, "R" if side == 0 else "L", (1, size - 2), cv2.FONT_HERSHEY_SIMPLEX,
                size / 30.0, 255, max(1, size // 8))
    patch = counts[r0:r0 + size, c0:c0 + size]
    open_ = letter[:patch.shape[0], :patch.shape[1]] > 0
    patch[~open_] *= 0.02


def _to_stored(rng: np.random.Generator, image: np.ndarray, field: np.ndarray
               ) -> tuple[np.ndarray, int, tuple[float, float], str]:
    """Quantise to 10-16 bits, MONOCHROME1 half the time, with a VOI window."""
    bits = int(rng.choice([10, 12, 14, 16]))
    top = (1 << bits) - 1
    lo = rng.uniform(0.0, 0.05)
    hi = rng.uniform(0.92, 1.0)
    values = np.clip(np.rint((lo + (hi - lo) * image) * top), 0, top).astype(np.uint16)
    photometric = "MONOCHROME2"
    if rng.random() < 0.5:
        values = (top - values).astype(np.uint16)
        photometric = "MONOCHROME1"
    p_lo, p_hi = np.percentile(values[field], [0.5, 99.5])
    width = max(float(p_hi - p_lo) * rng.uniform(1.0, 1.3), 2.0)
    return values, bits, (float(p_lo + p_hi) / 2.0, width), photometric
