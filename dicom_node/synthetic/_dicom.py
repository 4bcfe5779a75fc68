"""Pieces shared by the synthetic DICOM writers."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

__all__ = ["finish"]


def finish(ds: Dataset, stored: np.ndarray) -> Dataset:
    """Attach 16-bit pixel data and Explicit VR Little Endian file meta."""
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
