"""Derived image series (pydicom): the source image with new pixel values.

The derived instance keeps the source's geometry, pixel representation and
rescale so that it overlays exactly, and says what it is: ImageType
DERIVED\\SECONDARY, a DerivationDescription and code, a SourceImageSequence
pointing at its source and the IHE AIR Contributing Equipment item.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import numpy as np
from pydicom import DataElement, Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from dicom_node.encode.provenance import MANUFACTURER, Provenance

__all__ = ["DerivedSeries", "derived_image", "derived_from_frame", "stored_values", "set_pixels"]

# DCM 110001 "Image Processing" is the closest standard concept for an AI
# denoiser we found; sites may refine it.
_DERIVATION_CODE = ("110001", "DCM", "Image Processing")

# Everything about the encoded pixels is rewritten; private tags are dropped
# because we cannot know whether they still describe the new pixels.
_DROP = ["PixelData", "FloatPixelData", "DoubleFloatPixelData", "LargestImagePixelValue",
         "SmallestImagePixelValue", "LossyImageCompression", "LossyImageCompressionRatio",
         "LossyImageCompressionMethod", "PixelPaddingValue", "PixelPaddingRangeLimit",
         "WindowCenterWidthExplanation", "DerivationCodeSequence", "SourceImageSequence",
         "ReferencedImageSequence", "IconImageSequence", "ContributingEquipmentSequence",
         "SeriesDate", "SeriesTime", "RequestAttributesSequence", "ReferencedPerformedProcedureStepSequence",
         "PerformedProcedureStepID", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
         "PerformedProcedureStepDescription", "IrradiationEventUID", "DigitalSignaturesSequence",
         "MACParametersSequence", "EncryptedAttributesSequence", "OriginalAttributesSequence"]
_DROP_TAGS = frozenset(tag_for_keyword(k) for k in _DROP)


def stored_values(values: np.ndarray, source: Dataset,
                  rescale: tuple[float, float] | None = None) -> np.ndarray:
    """Modality values back to the source's stored pixel type and range."""
    if rescale is None:
        rescale = (float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0))
    slope, intercept = rescale
    bits = int(source.BitsStored)
    signed = int(source.PixelRepresentation) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    stored = np.rint((values - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    return np.clip(stored, low, high).astype(dtype)


def derived_image(source: Dataset, values: np.ndarray, prov: Provenance, *, index: int | str,
                  series_uid: str, series_number: int, series_description: str,
                  derivation: str) -> Dataset:
    """One derived single-frame instance from one single-frame source."""
    ds = Dataset()
    for elem in source.elements():  # not yet decoded elements stay raw
        tag = elem.tag
        if tag.is_private or tag in _DROP_TAGS or tag.group == 0x0002:
            continue
        ds[tag] = _element_copy(elem)
    if int(source.BitsAllocated) != 16:
        raise ValueError(f"instance {source.SOPInstanceUID}: derived images need 16 bits allocated, "
                         f"source has {source.BitsAllocated}")
    ds.SOPInstanceUID = prov.uid("derived-image", index)
    ds.ImageType = ["DERIVED", "SECONDARY"] + list(source.get("ImageType", ["", ""]))[2:]
    _mark_derived(ds, prov, _reference(source), series_uid=series_uid, series_number=series_number,
                  series_description=series_description, derivation=derivation)
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.PhotometricInterpretation = source.PhotometricInterpretation
    return set_pixels(ds, stored_values(values, source))


# Set by derived_image() whatever the source says: a source varying in these
# (ContentTime per slice is common) still fits the series template.
_OVERWRITTEN = frozenset(tag_for_keyword(k) for k in (
    "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "DerivationDescription",
    "ContentDate", "ContentTime", "BurnedInAnnotation", "InstanceCreationDate", "InstanceCreationTime",
    "SamplesPerPixel", "Rows", "Columns"))


class DerivedSeries:
    """The derived images of one source series, built from a template.

    The first image is built by derived_image(); each later one copies its
    elements (shallowly: values are shared, and result datasets are only
    written after encoding, never changed) and takes from its own source
    only the elements in which that source differs from the first one
    (position, instance number, rescale...), its UID, reference and pixels.
    Identical to derived_image() for every image (tests compare the two);
    a source whose element set differs, or that differs in an element the
    derived image computes from it (ImageType, photometric interpretation,
    bits), is built by derived_image() itself.  Copying and validating every
    element of every slice cost about as much as encoding its pixels.
    """

    def __init__(self, prov: Provenance, *, series_uid: str, series_number: int,
                 series_description: str, derivation: str) -> None:
        self._prov = prov
        self._series = {"series_uid": series_uid, "series_number": series_number,
                        "series_description": series_description, "derivation": derivation}
        self._first: Dataset | None = None
        self._template: Dataset | None = None
        self._first_tags: frozenset[Any] = frozenset()

    def image(self, source: Dataset, values: np.ndarray, *, index: int | str) -> Dataset:
        varying = self._varying(source) if self._template is not None else None
        if varying is None:
            ds = derived_image(source, values, self._prov, index=index, **self._series)  # type: ignore[arg-type]
            if self._template is None:
                self._first, self._template = source, ds
                self._first_tags = frozenset(_copied_tags(source))
            return ds
        assert self._template is not None
        ds = Dataset()
        for elem in self._template.elements():
            ds[elem.tag] = elem if isinstance(elem, RawDataElement) else copy.copy(elem)
        for tag in varying:
            ds[tag] = _element_copy(source.get_item(tag))
        ds.SOPInstanceUID = self._prov.uid("derived-image", index)
        ds.SourceImageSequence = Sequence([_reference(source)])
        return set_pixels(ds, stored_values(values, source))

    def _varying(self, source: Dataset) -> list[Any] | None:
        """Tags in which ``source`` differs from the first source, or None when
        the template does not fit it."""
        first = self._first
        assert first is not None
        tags = frozenset(_copied_tags(source))
        if tags != self._first_tags:
            return None
        varying = []
        for tag in tags:
            if tag in _OVERWRITTEN or _same(first, source, tag):
                continue
            if tag in _COMPUTED_FROM_SOURCE:
                return None
            varying.append(tag)
        return varying


_COMPUTED_FROM_SOURCE = frozenset(tag_for_keyword(k) for k in (
    "ImageType", "PhotometricInterpretation", "BitsAllocated"))


def _copied_tags(source: Dataset) -> list[Any]:
    return [tag for tag in source.keys()
            if not (tag.is_private or tag in _DROP_TAGS or tag.group == 0x0002)]


def _same(a: Dataset, b: Dataset, tag: Any) -> bool:
    ea, eb = a.get_item(tag), b.get_item(tag)
    if isinstance(ea, RawDataElement) and isinstance(eb, RawDataElement):
        if ea.VR == eb.VR and ea.value == eb.value:
            return True
    return bool(a[tag].value == b[tag].value)


def _element_copy(elem: DataElement | RawDataElement) -> DataElement | RawDataElement:
    """A copy of ``elem`` that can be changed without changing the source.

    A raw (not yet decoded) element is immutable and shared: the derived
    dataset decodes its own element from it when asked.  A decoded element
    with an immutable value is copied shallowly; sequences and multi-valued
    elements deeply.  (Copying every element deeply cost about as much as
    encoding the slice.)"""
    if isinstance(elem, RawDataElement):
        return elem
    value = elem.value
    if value is None or isinstance(value, (str, bytes, int, float)):
        return copy.copy(elem)
    return copy.deepcopy(elem)


def _mark_derived(ds: Dataset, prov: Provenance, reference: Dataset, *, series_uid: str,
                  series_number: int, series_description: str, derivation: str) -> None:
    """What every derived image says about itself: its series, how and from
    what it was derived, when, and by which equipment (IHE AIR)."""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.DerivationDescription = derivation[:1024]
    ds.DerivationCodeSequence = Sequence([_code(*_DERIVATION_CODE)])
    ds.SourceImageSequence = Sequence([reference])
    now = dt.datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.ContributingEquipmentSequence = [prov.contributing_equipment()]
    _add_device_uid(ds, prov)


def set_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    """Attach a 16-bit greyscale frame and Explicit VR Little Endian file meta."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"16-bit pixels expected, got {pixels.dtype}")
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = _file_meta(ds)
    return ds


# Modules copied from a multi-frame source into each single-frame derived image.
_FROM_ENHANCED = ["PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                  "PatientAge", "PatientSize", "PatientWeight", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                  "StudyDescription", "SpecificCharacterSet", "FrameOfReferenceUID",
                  "PositionReferenceIndicator", "Manufacturer", "InstitutionName",
                  "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "Modality",
                  "PatientPosition", "BodyPartExamined", "SeriesDate", "SeriesTime", "Laterality",
                  "ContrastBolusAgent", "PhotometricInterpretation", "BitsStored", "HighBit",
                  "PixelRepresentation"]


def derived_from_frame(source: Dataset, frame: int, geometry: dict[str, Any], values: np.ndarray,
                       prov: Provenance, *, index: int, series_uid: str, series_number: int,
                       series_description: str, derivation: str) -> Dataset:
    """A single-frame CT Image from one frame of an enhanced (multi-frame)
    source, with that frame's plane geometry and rescale.

    ``geometry`` holds ``position``, ``orientation``, ``spacing`` and
    ``rescale`` of the frame (as the volume loader read them).
    """
    ds = Dataset()
    for keyword in _FROM_ENHANCED:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.SOPInstanceUID = prov.uid("derived-image", f"{source.SOPInstanceUID}/{frame}")
    ds.InstanceNumber = index + 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ref = _reference(source)
    ref.ReferencedFrameNumber = frame
    _mark_derived(ds, prov, ref, series_uid=series_uid, series_number=series_number,
                  series_description=series_description, derivation=derivation)
    ds.ImagePositionPatient = [_ds(v) for v in geometry["position"]]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry["orientation"]]
    ds.PixelSpacing = [_ds(v) for v in geometry["spacing"]]
    ds.SliceThickness = _ds(geometry.get("thickness") or 0) or ""
    slope, intercept = geometry["rescale"]
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "HU"
    ds.KVP = ""
    ds.AcquisitionNumber = ""
    ds.PatientOrientation = ""
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "Laterality",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName", "Manufacturer",
                    "PositionReferenceIndicator"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.BitsAllocated = 16
    return set_pixels(ds, stored_values(values, source, (slope, intercept)))


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    from pydicom.valuerep import format_number_as_ds
    return format_number_as_ds(float(value))


def _add_device_uid(ds: Dataset, prov: Provenance) -> None:
    item = ds.ContributingEquipmentSequence[0]
    item.DeviceUID = prov.device_uid
    item.ManufacturerModelName = f"{prov.manifest.name} {prov.manifest.version}"[:64]
    if "InstitutionName" not in item:
        item.Manufacturer = MANUFACTURER


def _reference(source: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "DCM", "Source image for image processing operation")])
    return ref


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta
