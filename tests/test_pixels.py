"""The direct read of native greyscale pixel data equals pydicom's pixel_array.

``dicom_node.pipelines.pixels.stored_pixels`` skips pydicom's per-call
decode runner for uncompressed little-endian greyscale; these tests hold it
to pydicom's own result, value for value and dtype for dtype, on every file
of pydicom's bundled test corpus it takes, on the unused-bit cases the
standard allows, and check that it leaves everything else to pydicom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.pipelines.pixels import _native_greyscale, stored_pixels

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _corpus_taken_directly() -> list[Path]:
    taken = []
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path)
        except Exception:  # noqa: BLE001 - the corpus holds deliberately broken files
            continue
        if _native_greyscale(ds) is not None:
            taken.append(path)
    return taken


CORPUS = _corpus_taken_directly()


def test_the_corpus_exercises_the_direct_read() -> None:
    # 35 files in pydicom 3.0.2's bundle (CT and MR, signed and unsigned,
    # explicit and implicit VR, a DICOMDIR's images).
    assert len(CORPUS) >= 10, CORPUS
    kinds = {(int(ds.BitsAllocated), int(ds.PixelRepresentation), ds.file_meta.TransferSyntaxUID)
             for ds in map(dcmread, CORPUS)}
    assert {bits for bits, _, _ in kinds} >= {16} and {sign for _, sign, _ in kinds} == {0, 1}
    assert {syntax for _, _, syntax in kinds} == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_direct_read_equals_pixel_array_on_pydicom_files(path: Path) -> None:
    direct = stored_pixels(dcmread(path))
    reference = dcmread(path).pixel_array
    assert direct.dtype == reference.dtype and direct.shape == reference.shape
    assert np.array_equal(direct, reference)


def _image(values: np.ndarray, *, stored: int, signed: bool, syntax: str = ExplicitVRLittleEndian,
           photometric: str = "MONOCHROME2", pad: bool = False) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * values.dtype.itemsize
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = int(signed)
    data = values.astype(values.dtype.newbyteorder(">" if syntax == ExplicitVRBigEndian else "<")).tobytes()
    ds.PixelData = data + (b"\0" if pad else b"")
    ds["PixelData"].VR = "OW" if values.dtype.itemsize == 2 else "OB"
    return ds


@pytest.mark.parametrize(("dtype", "stored"), [("u2", 12), ("i2", 12), ("u2", 16), ("i2", 16),
                                               ("u1", 8), ("i1", 6), ("u2", 1)])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_unused_high_bits_are_corrected_as_pydicom_does(dtype: str, stored: int, syntax: str) -> None:
    """Random bit patterns: the bits above Bits Stored hold garbage, which
    the standard says to ignore (and a signed value's top stored bit is its sign)."""
    rng = np.random.default_rng(5)
    info = np.iinfo(np.dtype(dtype))
    values = rng.integers(info.min, info.max, size=(7, 9), endpoint=True).astype(dtype)
    ds = _image(values, stored=stored, signed=dtype.startswith("i"), syntax=syntax)
    assert _native_greyscale(ds) is not None
    direct, reference = stored_pixels(ds), ds.pixel_array
    assert direct.dtype == reference.dtype and np.array_equal(direct, reference)
    assert direct.flags.writeable and not np.shares_memory(direct, np.frombuffer(ds.PixelData, np.uint8))


def test_an_odd_length_with_its_padding_byte() -> None:
    values = np.arange(15, dtype=np.uint8).reshape(3, 5)
    ds = _image(values, stored=8, signed=False, pad=True)
    assert _native_greyscale(ds) is not None
    assert np.array_equal(stored_pixels(ds), ds.pixel_array)


@pytest.mark.parametrize("change", ["big endian", "colour", "two frames", "short", "no meta"])
def test_everything_else_is_left_to_pydicom(change: str) -> None:
    values = np.arange(24, dtype=np.uint16).reshape(4, 6)
    ds = _image(values, stored=12, signed=False,
                syntax=ExplicitVRBigEndian if change == "big endian" else ExplicitVRLittleEndian,
                photometric="RGB" if change == "colour" else "MONOCHROME2")
    if change == "two frames":
        ds.NumberOfFrames = 2
        ds.Rows = 2
    elif change == "short":
        ds.PixelData = ds.PixelData[:-4]
    elif change == "no meta":
        del ds.file_meta
    assert _native_greyscale(ds) is None
    if change == "big endian":
        assert np.array_equal(stored_pixels(ds), values)
    elif change == "short":
        with pytest.raises(ValueError):  # pydicom's own error for missing pixel data
            stored_pixels(ds)
