"""Synthetic short-axis cine MR as DICOM, in the shapes scanners send: one
series holding every slice location and phase, or one series per slice
location.  UIDs derive from a seed; the patient is plainly synthetic."""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom import Dataset
from pydicom.uid import MRImageStorage

from dicom_node_synthetic._dicom import seeded_uid, set_pixels

__all__ = ["cine_series", "short_axis_orientation"]


def short_axis_orientation() -> tuple[np.ndarray, np.ndarray]:
    """An oblique (double-angulated) orientation, as real short-axis planes are,
    so that a flip or a transposition shows up in geometry checks."""
    row = np.array([0.8, 0.5, -0.33])
    row /= np.linalg.norm(row)
    col = np.cross(np.array([0.2, -0.3, 0.93]), row)
    col /= np.linalg.norm(col)
    return row, col


def cine_series(images: np.ndarray, *, seed: str, pixel_spacing_mm: tuple[float, float],
                slice_spacing_mm: float, rr_ms: float = 1000.0, per_slice_series: bool = False,
                patient_name: str = "PHANTOM^CINE", patient_id: str = "SYN0002",
                height_m: float | None = 1.75, weight_kg: float | None = 70.0) -> list[Dataset]:
    """Datasets for a (phases, slices, rows, cols) cine stack (MR Image Storage).

    InstanceNumber runs against position on purpose so that ordering by it
    would be caught.
    """
    def uid(*parts: str) -> str:
        return seeded_uid("synthetic-mr", seed, *parts)

    phases, slices, rows, cols = images.shape
    row, col = short_axis_orientation()
    normal = np.cross(row, col)
    origin = np.array([-80.0, -60.0, 40.0])
    scale = 4000.0 / max(float(images.max()), 1e-6)
    stored = np.clip(np.rint(images * scale), 0, 4095).astype(np.uint16)
    today = dt.date.today().strftime("%Y%m%d")
    out = []
    for s in range(slices):
        position = origin + s * slice_spacing_mm * normal
        series_key = f"series-{s}" if per_slice_series else "series"
        for p in range(phases):
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = uid("instance", str(s), str(p))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid(series_key)
            ds.FrameOfReferenceUID = uid("frame")
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
            if height_m:
                ds.PatientSize = f"{height_m:.2f}"
            if weight_kg:
                ds.PatientWeight = f"{weight_kg:.1f}"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
            ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "SYN-ACC-2", "2", ""
            ds.Modality = "MR"
            ds.SeriesNumber = 10 + (s if per_slice_series else 0)
            ds.InstanceNumber = (slices - s) * phases - p
            ds.SeriesDescription = "SA cine (synthetic)" + (f" slice {s + 1}" if per_slice_series else "")
            ds.BodyPartExamined = "HEART"
            ds.Manufacturer, ds.ManufacturerModelName = "dicom-node synthetic", "phantom"
            ds.PositionReferenceIndicator, ds.PatientPosition = "", "HFS"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SS", ""
            ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2D", 3.2, 1.4, 1
            ds.MagneticFieldStrength = 1.5
            ds.TriggerTime = round(p * rr_ms / phases, 2)
            ds.CardiacNumberOfImages = phases
            ds.ImagePositionPatient = [round(float(v), 4) for v in position]
            ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
            ds.PixelSpacing = [round(float(v), 6) for v in pixel_spacing_mm]
            ds.SliceThickness = round(float(slice_spacing_mm) * 0.8, 3)
            ds.SliceLocation = round(float(np.dot(position, normal)), 4)
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = rows, cols
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            set_pixels(ds, stored[p, s])
            out.append(ds)
    return out
