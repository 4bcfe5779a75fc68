"""What the synthetic DICOM writers share, in plain pydicom: seeded UIDs and
16-bit pixel data with Explicit VR Little Endian file meta.

Deliberately independent of ``dicom_node.encode``: the tests grade the node's
encoders, so the inputs they are graded on must not come out of them.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

__all__ = ["seeded_uid", "set_pixels"]


def seeded_uid(*parts: str) -> UID:
    """A 2.25 UID (PS3.5 B.2) that is a pure function of ``parts``, so a test
    can make the same study twice in different processes."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def set_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    """Attach one 16-bit greyscale frame and the file meta for writing ``ds``."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"16-bit pixels expected, got {pixels.dtype}")
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
