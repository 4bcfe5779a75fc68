"""Synthetic CT series as DICOM: phantom volumes dressed as CT Image Storage
instances, for the demo, the tests and the benchmarks.

Every UID derives from a seed, so a test can make the same study twice.  The
patient is plainly synthetic.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom import Dataset
from pydicom.uid import CTImageStorage

from dicom_node_synthetic._dicom import seeded_uid, set_pixels

__all__ = ["ct_series", "SYNTHETIC_PATIENT"]

SYNTHETIC_PATIENT = "PHANTOM^SYNTHETIC"


def ct_series(volume_hu: np.ndarray, *, seed: str, pixel_mm: float = 0.7, slice_mm: float = 3.0,
              patient_name: str = SYNTHETIC_PATIENT, patient_id: str = "SYN0001",
              series_description: str = "Cardiac CTA low dose (synthetic)",
              body_part: str = "HEART") -> list[Dataset]:
    """One single-frame CT instance per slice of a (z, rows, cols) HU volume.

    Instances are numbered in reverse of their position on purpose, so that
    code sorting by InstanceNumber instead of geometry gets caught.
    """
    def uid(*parts: str) -> str:
        return seeded_uid("synthetic", seed, *parts)

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame")
    n, rows, cols = volume_hu.shape
    # DS values hold at most 16 characters.
    pixel_mm, slice_mm = round(float(pixel_mm), 6), round(float(slice_mm), 4)
    stored = np.clip(np.rint(volume_hu + 1024), 0, 4095).astype(np.uint16)
    today = dt.date.today().strftime("%Y%m%d")
    datasets = []
    for z in range(n):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = uid("instance", str(z))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "SYN-ACC-1", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, n - z
        ds.SeriesDescription, ds.BodyPartExamined = series_description, body_part
        ds.Manufacturer, ds.ManufacturerModelName = "dicom-node synthetic", "phantom"
        ds.PositionReferenceIndicator, ds.PatientPosition = "", "FFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber, ds.KVP = 1, 100
        ds.ImagesInAcquisition = n
        ds.ImagePositionPatient = [round(-cols * pixel_mm / 2, 4), round(-rows * pixel_mm / 2, 4),
                                   round(-z * slice_mm, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness, ds.SliceLocation = slice_mm, round(-z * slice_mm, 4)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 300, 800
        ds.ContrastBolusAgent = "Iodinated contrast (synthetic)"
        set_pixels(ds, stored[z])
        datasets.append(ds)
    return datasets
