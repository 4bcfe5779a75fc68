"""Decoded image stacks with their geometry, from single-frame or enhanced
multi-frame datasets.

Slices are ordered by position along the slice normal, never by
InstanceNumber, and exact duplicate positions are dropped with a logged
reason, because scanners and PACS send both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from dicom_node.errors import PipelineError
from dicom_node.pipelines.pixels import stored_pixels

__all__ = ["Slice", "Volume", "load_volume", "group_value", "decode_frame", "frame_geometry",
           "plane_geometry", "plane_vector"]

log = logging.getLogger("dicom_node.pipelines")


@dataclass(frozen=True)
class Slice:
    """One image plane: its source dataset, frame number (1-based, multi-frame
    sources) and geometry."""

    dataset: Dataset
    frame: int | None
    position: np.ndarray  # ImagePositionPatient (mm)
    orientation: np.ndarray  # row and column direction cosines (6,)
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rescale: tuple[float, float]  # (slope, intercept)


@dataclass(frozen=True)
class Volume:
    slices: list[Slice]
    # Modality values (HU for CT), float32, (z, rows, columns).
    values: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        o = self.slices[0].orientation
        return np.cross(o[:3], o[3:])

    @property
    def slice_spacing(self) -> float:
        """Mean spacing between slice centres along the normal (not SliceThickness)."""
        if len(self.slices) < 2:
            return float(self.slices[0].dataset.get("SliceThickness") or 1.0)
        d = np.diff([float(np.dot(s.position, self.normal)) for s in self.slices])
        return float(np.mean(np.abs(d)))

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return self.slices[0].spacing


def load_volume(datasets: list[Dataset], series_uid: str = "") -> Volume:
    """Decode and sort a stack.  Raises PipelineError naming the series on
    mixed orientations or sizes, or undecodable pixel data."""
    planes = [s for ds in datasets for s in _planes(ds)]
    if not planes:
        raise PipelineError(f"series {series_uid}: no image planes")
    ref = planes[0].orientation
    for p in planes:
        if not np.allclose(p.orientation, ref, atol=1e-3):
            raise PipelineError(f"series {series_uid}: instances have different orientations")
    normal = np.cross(ref[:3], ref[3:])
    planes.sort(key=lambda p: float(np.dot(p.position, normal)))
    kept: list[Slice] = []
    for p in planes:
        if kept and np.allclose(p.position, kept[-1].position, atol=1e-4):
            log.warning("series %s: dropped instance %s frame %s, duplicate position of instance %s",
                        series_uid, p.dataset.SOPInstanceUID, p.frame, kept[-1].dataset.SOPInstanceUID)
            continue
        kept.append(p)
    arrays = [_values(p, series_uid) for p in kept]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise PipelineError(f"series {series_uid}: slices have different sizes {sorted(shapes)}")
    # The planes are float32 already (_values): stacking is the one copy.
    return Volume(kept, np.stack(arrays).astype(np.float32, copy=False))


def _planes(ds: Dataset) -> list[Slice]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        out = []
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence[:frames]):
            pos, ori, spc = frame_geometry(ds, item, shared, i + 1)
            slope = group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
            icpt = group_value(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            slope = 1.0 if slope is None else slope
            icpt = 0.0 if icpt is None else icpt
            out.append(Slice(ds, i + 1, pos, ori, (float(spc[0]), float(spc[1])),
                             (float(slope), float(icpt))))
        return out
    pos, ori, spc = plane_geometry(ds)
    rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    return [Slice(ds, None, pos, ori, (float(spc[0]), float(spc[1])), rescale)]


# Where each plane attribute lives (its functional group in enhanced objects) and its multiplicity.
_PLANE = (("PlanePositionSequence", "ImagePositionPatient", 3),
          ("PlaneOrientationSequence", "ImageOrientationPatient", 6),
          ("PixelMeasuresSequence", "PixelSpacing", 2))

Geometry = tuple[np.ndarray, np.ndarray, np.ndarray]


def plane_vector(value: Any, count: int) -> np.ndarray | None:
    """A geometry attribute as ``count`` finite floats; None when it is
    absent, empty (pydicom reads an empty DS as ''), of another multiplicity
    or not numbers."""
    if value is None or value == "":
        return None
    try:
        vector = np.array(value, float).ravel()
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (count,) and bool(np.all(np.isfinite(vector))) else None


def plane_geometry(ds: Dataset) -> Geometry:
    """A single-frame image's position, orientation and pixel spacing, or a
    PipelineError naming the instance and what is missing or unusable."""
    return _geometry(lambda _group, keyword: ds.get(keyword), f"instance {ds.get('SOPInstanceUID', '?')}")


def frame_geometry(ds: Dataset, item: Dataset, shared: Dataset, frame: int) -> Geometry:
    """The same for one frame of an enhanced object, from its per-frame or shared groups."""
    return _geometry(lambda group, keyword: group_value(item, shared, group, keyword),
                     f"instance {ds.get('SOPInstanceUID', '?')} frame {frame}")


def _geometry(read: Callable[[str, str], Any], where: str) -> Geometry:
    vectors: list[np.ndarray] = []
    bad: list[str] = []
    for group, keyword, count in _PLANE:
        try:
            value = read(group, keyword)
        except (ValueError, TypeError, OverflowError):  # e.g. DS bytes that are not a number
            value = None
        vector = plane_vector(value, count)
        if vector is None:
            bad.append(f"{keyword} ({count} numbers)")
        else:
            vectors.append(vector)
    if bad:
        raise PipelineError(f"{where}: no usable image plane geometry: " + ", ".join(bad))
    pos, ori, spc = vectors
    return pos, ori, spc


def group_value(item: Dataset, shared: Dataset, seq: str, key: str) -> Any:
    """A functional-group attribute of one frame: its per-frame item first,
    then the shared groups; None when neither has it."""
    for source in (item, shared):
        if seq in source and len(source[seq].value) and key in source[seq][0]:
            return source[seq][0][key].value
    return None


def decode_frame(ds: Dataset, frame: int | None, context: str) -> np.ndarray:
    """Stored pixel values of one frame (1-based; None for single-frame),
    decoded whatever the transfer syntax.  pydicom caches the decoded
    multi-frame array, so asking frame by frame decodes once."""
    try:
        pixels = stored_pixels(ds) if frame is None else ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types
        raise PipelineError(f"{context}: cannot decode instance {ds.get('SOPInstanceUID', '?')} "
                            f"({ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}") from exc
    if frame is not None and pixels.ndim == 3:
        pixels = pixels[frame - 1]
    return pixels


def _values(plane: Slice, series_uid: str) -> np.ndarray:
    slope, intercept = plane.rescale
    pixels = decode_frame(plane.dataset, plane.frame, f"series {series_uid}")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
