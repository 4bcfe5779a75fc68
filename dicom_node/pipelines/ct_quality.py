"""Objective image-quality measurements for the CT denoising pipeline.

A denoised series is only useful if the report beside it says, in numbers a
radiologist recognises, what the model did: noise (SD in HU of a homogeneous
contrast-filled blood pool), signal-to-noise and contrast-to-noise ratios, and
where exactly they were measured.  The regions are chosen automatically and
once, on the original series, and the same regions are then measured on the
original and on the denoised series so the two sets of numbers are comparable.

Definitions (all in HU, SD with Bessel's correction, ddof = 1):

* ``noise_hu = SD_blood`` - standard deviation inside the blood-pool ROI;
* ``snr = mean_blood / SD_blood``;
* ``cnr = (mean_blood - mean_ref) / SD_blood`` where the reference ROI is
  adipose tissue (-150..-50 HU) or, failing that, air outside the body.

Region selection: on a Gaussian-smoothed copy (sigma 1.5 mm, so the
thresholds see tissue, not noise) each slice is thresholded to the tissue's HU
range and eroded by the ROI radius plus a 1 mm margin, so any centre left lies
at least a full ROI away from an edge.  For the blood pool the largest
connected region over all slices is used (aortic root or ventricle on cardiac
CT; cancellous bone in the same HU range is smaller), and within the eligible
centres the ROI goes where the local SD of the unsmoothed image is lowest.
ROIs are circles in mm, i.e. ellipses in pixels when the spacing is anisotropic.

numpy and OpenCV only: this runs inside the node on every series.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from threading import Lock
from typing import TypeVar

import cv2
import numpy as np

from dicom_node.errors import PipelineError

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "AIR_HU_MAX",
    "BLOOD_HU_RANGE",
    "FAT_HU_RANGE",
    "QualityMeasurement",
    "QualityRegions",
    "Roi",
    "RoiStats",
    "choose_regions",
    "measure",
]

BLOOD_HU_RANGE = (150.0, 700.0)
FAT_HU_RANGE = (-150.0, -50.0)
AIR_HU_MAX = -900.0
_SMOOTH_SIGMA_MM = 1.5
_EDGE_MARGIN_MM = 1.0
# When the preferred radius does not fit anywhere, shrink it by this step down
# to the minimum: a small heart still gets a (smaller, stated) ROI.
_RADIUS_STEP_MM = 1.0


@dataclass(frozen=True)
class Roi:
    """A circular region of interest on one slice of the volume.

    ``centre`` is (row, column) in pixels, ``radius_mm`` the radius actually
    used, ``description`` a sentence for the structured report.
    """

    kind: str  # "blood" or "reference"
    tissue: str
    slice_index: int
    centre: tuple[int, int]
    radius_mm: float
    pixel_spacing_mm: tuple[float, float]
    description: str

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Boolean (rows, cols) mask of the ROI for a slice of ``shape``."""
        m = np.zeros(shape, np.uint8)
        axes = (max(1, round(self.radius_mm / self.pixel_spacing_mm[1])),
                max(1, round(self.radius_mm / self.pixel_spacing_mm[0])))
        cv2.ellipse(m, (self.centre[1], self.centre[0]), axes, 0, 0, 360, 1, -1)
        return m.astype(bool)


@dataclass(frozen=True)
class QualityRegions:
    """The regions chosen once on the original series."""

    blood: Roi
    reference: Roi


@dataclass(frozen=True)
class RoiStats:
    """Mean and SD (ddof = 1) in HU of one ROI on one volume."""

    roi: Roi
    mean_hu: float
    sd_hu: float
    n_pixels: int


@dataclass(frozen=True)
class QualityMeasurement:
    """Per-region statistics plus the derived noise, SNR and CNR (see module docstring)."""

    blood: RoiStats
    reference: RoiStats
    noise_hu: float
    snr: float
    cnr: float


def _check_volume(volume_hu: np.ndarray) -> np.ndarray:
    if volume_hu.ndim == 2:
        volume_hu = volume_hu[None]
    if volume_hu.ndim != 3 or min(volume_hu.shape) < 1:
        raise PipelineError(f"quality: expected a (z, y, x) HU volume, got shape {volume_hu.shape}")
    return volume_hu.astype(np.float32, copy=False)


def _ellipse_kernel(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    rr = max(1, round(radius_mm / spacing[0]))
    rc = max(1, round(radius_mm / spacing[1]))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rc + 1, 2 * rr + 1))


def _smooth(img: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=_SMOOTH_SIGMA_MM / spacing[1],
                            sigmaY=_SMOOTH_SIGMA_MM / spacing[0])


def _local_sd(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """SD of ``img`` over the ROI footprint centred at every pixel."""
    k = kernel.astype(np.float32) / float(kernel.sum())
    # Subtract a constant first: E[x^2] - E[x]^2 in float32 loses precision at
    # large |HU| (air) and can go negative.  Any value near the image's will
    # do: the median of every 16th pixel costs a sixteenth of the full one
    # (2 ms a 512x512 slice, once per slice searched).
    x = img - np.float32(np.median(img[::4, ::4]))
    mean, sq = _footprint_means(x, k)
    return np.sqrt(np.maximum(sq - mean * mean, 0.0))


def _footprint_means(x: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``filter2D(x, k)`` and ``filter2D(x * x, k)`` with reflected borders,
    in one complex DFT: x and x^2 as its real and imaginary parts against
    the kernel's spectrum, made once per size (OpenCV's filter2D makes a DFT
    of image and kernel for each call).  Equal to filter2D's to float32
    rounding (1e-4 HU); 10 -> 5 ms for a 512x512 slice and a 25x25 kernel."""
    kr, kc = k.shape[0] // 2, k.shape[1] // 2
    padded = cv2.copyMakeBorder(x, kr, kr, kc, kc, cv2.BORDER_REFLECT)
    spectrum = _kernel_spectrum(k.tobytes(), k.shape, padded.shape)
    # The two parts' rounding errors mix in the transform: x^2 is scaled
    # (by a power of two, exactly) to the magnitude of x, so that neither
    # drowns the other (unscaled, x^2 of air cost the mean several HU).
    scale = np.float32(2.0 ** np.ceil(np.log2(max(float(np.abs(padded).max()), 1.0))))
    both = np.zeros((*spectrum.shape[:2], 2), np.float32)
    both[:padded.shape[0], :padded.shape[1], 0] = padded
    both[:padded.shape[0], :padded.shape[1], 1] = padded * padded / scale
    out = cv2.idft(cv2.mulSpectrums(cv2.dft(both, flags=cv2.DFT_COMPLEX_OUTPUT), spectrum, 0),
                   flags=cv2.DFT_SCALE)
    # The circular convolution is valid from one kernel width on: pixel i of
    # the image is at i + 2 * half-width there.
    rows, cols = x.shape
    window = out[2 * kr:2 * kr + rows, 2 * kc:2 * kc + cols]
    return window[..., 0], window[..., 1] * scale


@lru_cache(maxsize=16)
def _kernel_spectrum(kernel: bytes, shape: tuple[int, int], padded: tuple[int, int]) -> np.ndarray:
    """The DFT of a float32 kernel, zero-padded to an optimal size covering ``padded``."""
    rows, cols = cv2.getOptimalDFTSize(padded[0]), cv2.getOptimalDFTSize(padded[1])
    placed = np.zeros((rows, cols), np.float32)
    placed[:shape[0], :shape[1]] = np.frombuffer(kernel, np.float32).reshape(shape)
    spectrum: np.ndarray = cv2.dft(placed, flags=cv2.DFT_COMPLEX_OUTPUT)
    return spectrum


def _smoothed(vol: np.ndarray, spacing: tuple[float, float]) -> list[np.ndarray]:
    """Every slice smoothed once: the blood, fat and air masks all threshold it."""
    return _map(lambda img: _smooth(img, spacing), list(vol))


def _tissue_masks(smoothed: list[np.ndarray], spacing: tuple[float, float], lo: float, hi: float,
                  exclude_bone: bool = False) -> list[np.ndarray]:
    """Per slice, pixels whose smoothed value lies in [lo, hi] (uint8 0/1).

    With ``exclude_bone`` marrow is removed: cancellous bone (~200-300 HU) sits in
    the blood HU range, but it is enclosed by cortex above the range, so regions
    enclosed by > ``hi`` HU (plus a 2 mm rim) are cut out.
    """
    rim = _ellipse_kernel(2.0, spacing)

    def one(s: np.ndarray) -> np.ndarray:
        m = ((s >= lo) & (s <= hi)).astype(np.uint8)
        if exclude_bone:
            m &= (1 - cv2.dilate(_fill_holes((s > hi).astype(np.uint8)), rim)).astype(np.uint8)
        return m
    return _map(one, smoothed)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every region it fully encloses."""
    count, lab = cv2.connectedComponents(1 - mask, connectivity=4)
    # A table over the labels rather than np.isin over every pixel (a sort of
    # the whole image): a label is a hole unless it touches the border.
    enclosed = np.ones(count, np.uint8)
    enclosed[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = 0
    filled: np.ndarray = enclosed[lab] | mask
    return filled


def _outside_air(smoothed: list[np.ndarray]) -> list[np.ndarray]:
    """Per slice, air connected to the image border (outside the body, not lung)."""
    def one(s: np.ndarray) -> np.ndarray:
        air = (s < AIR_HU_MAX).astype(np.uint8)
        # Border-connected air is whatever hole-filling the body does not reach.
        outside: np.ndarray = air & (1 - _fill_holes(1 - air))
        return outside
    return _map(one, smoothed)


def _lowest_sd_centre(img: np.ndarray, region: np.ndarray, spacing: tuple[float, float],
                      radius_mm: float) -> tuple[float, tuple[int, int]] | None:
    """(local SD, centre) of the calmest ROI position fully inside ``region``."""
    inner = cv2.erode(region, _ellipse_kernel(radius_mm + _EDGE_MARGIN_MM, spacing))
    box = cv2.boundingRect(inner)  # (x, y, w, h); all zero when nothing is left
    if box[2] == 0:
        return None
    footprint = _ellipse_kernel(radius_mm, spacing)
    # The SD only where a centre can go: the centres' bounding box plus the
    # footprint's half-size, within the image.  Every footprint there lies in
    # the crop, and one cut by the image's edge is reflected at the same edge
    # as in the whole slice, so the values are the whole slice's (to float32
    # rounding), and row-major order, which breaks ties, is kept.
    (x, y, w, h), (kr, kc) = box, (footprint.shape[0] // 2, footprint.shape[1] // 2)
    top, left = max(0, y - kr), max(0, x - kc)
    bottom, right = min(img.shape[0], y + h + kr), min(img.shape[1], x + w + kc)
    crop = inner[top:bottom, left:right].astype(bool)
    sd = np.where(crop, _local_sd(img[top:bottom, left:right], footprint), np.inf)
    idx = int(np.argmin(sd))
    return float(sd.flat[idx]), (top + idx // sd.shape[1], left + idx % sd.shape[1])


def _fit(vol: np.ndarray, regions: list[tuple[int, np.ndarray]], spacing: tuple[float, float],
         radius_mm: float, min_radius_mm: float) -> tuple[int, tuple[int, int], float] | None:
    """Largest radius (preferred, then 1 mm steps down) that fits in any of the
    (slice, mask) ``regions``; among the fits the lowest local SD wins."""
    r = radius_mm
    while r >= min_radius_mm - 1e-9:
        best: tuple[float, int, tuple[int, int]] | None = None
        # Slices are searched in parallel (OpenCV and numpy release the GIL);
        # the results are compared in slice order, as one by one.
        def search(zr: tuple[int, np.ndarray], radius: float = r) -> tuple[float, tuple[int, int]] | None:
            return _lowest_sd_centre(vol[zr[0]], zr[1], spacing, radius)

        candidates = _map(search, regions)
        for (z, _), found in zip(regions, candidates, strict=False):
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], z, found[1])
        if best is not None:
            return best[1], best[2], r
        r -= _RADIUS_STEP_MM
    return None


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = Lock()


def _map(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``[fn(i) for i in items]`` on a small shared thread pool."""
    global _POOL
    workers = min(4, os.cpu_count() or 1)
    if workers < 2 or len(items) < 2:
        return [fn(i) for i in items]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="ct-quality")
    return list(_POOL.map(fn, items))


def _largest_component(masks: list[np.ndarray], spacing: tuple[float, float],
                       min_radius_mm: float) -> list[tuple[int, np.ndarray]]:
    """The largest connected region over all slices that can hold a minimum ROI.

    Largest rather than calmest: on cardiac CT that is the ventricles or aortic
    root, the conventional place to measure blood-pool noise.
    """
    erode_k = _ellipse_kernel(min_radius_mm + _EDGE_MARGIN_MM, spacing)
    best: tuple[int, int, np.ndarray] | None = None
    for z, m in enumerate(masks):
        if not m.any():
            continue
        _, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1:
            area = int(stats[i, cv2.CC_STAT_AREA])
            if best is not None and area <= best[0]:
                break
            comp = (lab == i).astype(np.uint8)
            if cv2.erode(comp, erode_k).any():
                best = (area, z, comp)
                break
    return [] if best is None else [(best[1], best[2])]


def choose_regions(volume_hu: np.ndarray, pixel_spacing_mm: tuple[float, float],
                   blood_radius_mm: float = 8.0, reference_radius_mm: float = 4.0,
                   min_radius_mm: float = 3.0) -> QualityRegions:
    """Pick the blood-pool and reference ROIs on the original (not denoised) volume.

    ``volume_hu`` is (z, rows, cols) or a single (rows, cols) slice in HU and
    ``pixel_spacing_mm`` is (row, column) spacing.  Radii shrink in 1 mm steps
    down to ``min_radius_mm`` if the preferred one fits nowhere.  Raises
    ``PipelineError`` when no blood pool or no reference region can be found
    (a non-contrast study, a phantom of air), rather than reporting numbers
    measured on the wrong tissue.
    """
    vol = _check_volume(volume_hu)
    spacing = (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))
    if min(spacing) <= 0:
        raise PipelineError(f"quality: invalid pixel spacing {pixel_spacing_mm}")

    smoothed = _smoothed(vol, spacing)
    blood_masks = _tissue_masks(smoothed, spacing, *BLOOD_HU_RANGE, exclude_bone=True)
    pool = _largest_component(blood_masks, spacing, min_radius_mm)
    blood = _fit(vol, pool, spacing, blood_radius_mm, min_radius_mm)
    if blood is None:
        raise PipelineError(
            f"quality: no contrast-filled blood pool found: no homogeneous region of "
            f"{BLOOD_HU_RANGE[0]:.0f}..{BLOOD_HU_RANGE[1]:.0f} HU holds a "
            f"{min_radius_mm:g} mm ROI on any of {vol.shape[0]} slices")
    bz, bc, br = blood
    blood_roi = Roi(
        kind="blood", tissue="contrast-enhanced blood pool", slice_index=bz, centre=bc,
        radius_mm=br, pixel_spacing_mm=spacing,
        description=(f"blood pool ROI ({BLOOD_HU_RANGE[0]:.0f}..{BLOOD_HU_RANGE[1]:.0f} HU), "
                     f"{br:g} mm radius, slice {bz}, centre (row {bc[0]}, col {bc[1]})"))

    fat_masks = _tissue_masks(smoothed, spacing, *FAT_HU_RANGE)
    ref = _fit(vol, list(enumerate(fat_masks)), spacing, reference_radius_mm, min_radius_mm)
    if ref is not None:
        tissue = "adipose tissue"
        label = f"fat reference ROI ({FAT_HU_RANGE[0]:.0f}..{FAT_HU_RANGE[1]:.0f} HU)"
    else:
        ref = _fit(vol, list(enumerate(_outside_air(smoothed))), spacing,
                   reference_radius_mm, min_radius_mm)
        tissue = "air outside the body"
        label = f"air reference ROI (< {AIR_HU_MAX:.0f} HU, outside the body)"
    if ref is None:
        raise PipelineError(
            "quality: no reference region found: neither fat "
            f"({FAT_HU_RANGE[0]:.0f}..{FAT_HU_RANGE[1]:.0f} HU) nor air outside the body "
            f"holds a {min_radius_mm:g} mm ROI")
    rz, rc, rr = ref
    ref_roi = Roi(kind="reference", tissue=tissue, slice_index=rz, centre=rc, radius_mm=rr,
                  pixel_spacing_mm=spacing,
                  description=f"{label}, {rr:g} mm radius, slice {rz}, "
                              f"centre (row {rc[0]}, col {rc[1]})")
    return QualityRegions(blood=blood_roi, reference=ref_roi)


def _stats(vol: np.ndarray, roi: Roi) -> RoiStats:
    if not 0 <= roi.slice_index < vol.shape[0]:
        raise PipelineError(
            f"quality: ROI on slice {roi.slice_index} but the volume has {vol.shape[0]} slices")
    values = vol[roi.slice_index][roi.mask(vol.shape[1:])]
    if values.size < 2:
        raise PipelineError(f"quality: ROI '{roi.description}' covers fewer than 2 pixels")
    return RoiStats(roi=roi, mean_hu=float(values.mean()), sd_hu=float(values.std(ddof=1)),
                    n_pixels=int(values.size))


def measure(volume_hu: np.ndarray, regions: QualityRegions) -> QualityMeasurement:
    """Measure the regions on ``volume_hu`` (same geometry as where they were chosen).

    Returns per-region mean and SD plus noise = SD_blood, SNR = mean_blood /
    SD_blood and CNR = (mean_blood - mean_ref) / SD_blood.  Raises
    ``PipelineError`` if the blood-pool SD is zero (a constant image: the
    ratios are undefined, and a report of infinite SNR would mislead).
    """
    vol = _check_volume(volume_hu)
    blood = _stats(vol, regions.blood)
    ref = _stats(vol, regions.reference)
    if blood.sd_hu <= 0:
        raise PipelineError("quality: blood-pool ROI has zero SD; SNR and CNR are undefined")
    return QualityMeasurement(
        blood=blood, reference=ref, noise_hu=blood.sd_hu,
        snr=blood.mean_hu / blood.sd_hu,
        cnr=(blood.mean_hu - ref.mean_hu) / blood.sd_hu)
