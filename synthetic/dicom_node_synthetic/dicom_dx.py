"""Synthetic chest radiographs as DX (for presentation) instances: frontal or
lateral, MONOCHROME1 or 2, 12 to 16 bits, with a VOI window, as detectors
send them.  UIDs derive from a seed; the patient is plainly synthetic."""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom import Dataset

from dicom_node_synthetic._dicom import seeded_uid, set_pixels

__all__ = ["dx_image", "DX_FOR_PRESENTATION"]

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def dx_image(image: np.ndarray, *, seed: str, view: str = "PA", monochrome1: bool = False,
             bits: int = 14, pixel_spacing_mm: float = 0.15, patient_name: str = "PHANTOM^CXR",
             patient_id: str = "SYN0003") -> Dataset:
    """One DX instance from a [0, 1] radiograph (bright = dense)."""
    def uid(*parts: str) -> str:
        return seeded_uid("synthetic-dx", seed, *parts)

    top = (1 << bits) - 1
    stored = np.clip(np.rint(image * top), 0, top).astype(np.uint16)
    if monochrome1:
        stored = (top - stored).astype(np.uint16)
    today = dt.date.today().strftime("%Y%m%d")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = uid("instance")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "SYN-ACC-3", "3", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.SeriesDescription = f"Chest {view} (synthetic)"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.Manufacturer, ds.ManufacturerModelName = "dicom-node synthetic", "phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"] if view in ("PA", "AP") else ["P", "F"]
    ds.ImageLaterality = "U"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.WindowCenter, ds.WindowWidth = top // 2, top
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.BurnedInAnnotation = "NO"
    set_pixels(ds, stored)
    return ds
