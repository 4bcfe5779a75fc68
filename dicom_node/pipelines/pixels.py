"""Stored pixel values of a single-frame image, as pydicom's ``pixel_array``
gives them, with a direct path for the common uncompressed greyscale case.

pydicom builds a decode runner for every call (about 20 attributes read
and validated, twice), which costs about 0.9 ms per frame whatever its
size: for a 250-frame cardiac cine that is a quarter of a second before
the model can start, where copying the pixels themselves takes a few
milliseconds.  Native little-endian greyscale with 8 or 16 bits
allocated is read here with the same rules pydicom applies (dtype from
Bits Allocated and Pixel Representation, the unused high bits corrected
by the same shift pair, a writeable copy); everything else, and anything
whose length or attributes do not add up, goes to pydicom, which also
gives the errors.  tests/test_pixels.py checks the two against each
other on pydicom's own test files and on edge cases.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["stored_pixels"]

_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


def stored_pixels(ds: Dataset) -> np.ndarray:
    """The image's stored values, equal to ``ds.pixel_array`` (which raises
    pydicom's own errors for what cannot be decoded)."""
    direct = _native_greyscale(ds)
    return ds.pixel_array if direct is None else direct


def _native_greyscale(ds: Dataset) -> np.ndarray | None:
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    data = ds.get("PixelData")
    if not isinstance(data, bytes):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    except (AttributeError, TypeError, ValueError):
        return None
    count = rows * cols
    size = count * allocated // 8
    if (allocated not in (8, 16) or not 0 < stored <= allocated or signed not in (0, 1)
            or samples != 1 or frames != 1 or photometric not in _GREYSCALE
            or count == 0 or len(data) not in (size, size + 1)):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    source = np.frombuffer(data, dtype, count).reshape(rows, cols)
    shift = allocated - stored
    if not shift:
        return source.copy()
    # The standard says to ignore the unused bits (PS3.5 8.1.1); pydicom shifts
    # them out at the top and back, which sign-extends a signed value.  For an
    # unsigned one that is a mask, applied in the same pass as the copy (a
    # 5-megapixel radiograph is read once instead of three times).
    pixels = np.empty_like(source)
    if signed:
        np.left_shift(source, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    else:
        np.bitwise_and(source, np.array((1 << stored) - 1, dtype), out=pixels)
    return pixels
