"""SRs of one job that differ only in UIDs and measured values, built by
highdicom once and derived from that first one for the rest.

A chest X-ray series gives one SR per radiograph, and highdicom spends most
of an SR's cost on checks and evidence collection whose outcome is the same
for every image of the series: deep-copying and re-reading the content tree,
collecting the evidence, validating the template.  Those SRs differ in the
UIDs (the source image's, the SR's own, its series', the tracking UID), in
the measured values, and in the creation times.  So the first SR of each
*kind* is built by highdicom, and each further one is a copy with those
replaced: every UI value equal to one of the template's UIDs becomes this
image's, every NUM whose concept is given gets highdicom's own measured-value
item for the new value, and the times are set as highdicom sets them.

What makes two SRs the same kind is the caller's ``key`` plus every header
attribute of the source except those in ``PER_IMAGE`` (which tests check
highdicom does not copy).  Anything else that differs gives a new template,
so a value the template does not know cannot be carried from one image to
the next.  tests/test_pipeline_speedups.py compares derived SRs with
highdicom's own, element for element.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

__all__ = ["PER_IMAGE", "ReportTemplates"]

# Source attributes that vary between the images of a series and that the
# SR does not carry (beyond the SOP Instance UID, which is replaced).
PER_IMAGE = frozenset({
    "SOPInstanceUID", "InstanceNumber", "ContentDate", "ContentTime", "AcquisitionDate",
    "AcquisitionTime", "AcquisitionDateTime", "InstanceCreationDate", "InstanceCreationTime",
    "AcquisitionNumber", "PixelData", "ExposureIndex", "TargetExposureIndex", "DeviationIndex",
})
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class _Template:
    sr: Dataset
    uids: Mapping[str, str]
    # id() of every dataset of ``sr`` holding (or above one holding) what a
    # derived SR changes; the rest is shared by the SRs derived from it.
    changing: frozenset[int]


class ReportTemplates:
    """Per job: the first SR of each kind, to derive the others from."""

    def __init__(self) -> None:
        self._built: dict[Hashable, _Template] = {}

    def report(self, key: Hashable, source: Dataset, uids: Mapping[str, str],
               values: Mapping[Code, hd.sr.NumContentItem], build: Callable[[], Dataset]) -> Dataset:
        """The SR for ``source``: built by ``build`` for the first of its kind,
        else derived.  ``uids``: role -> this image's UID for every UID that
        differs between images (the source's own included); ``values``:
        concept -> a NUM item with this image's value, for every measured
        value that differs."""
        kind = (key, _header_key(source), tuple(sorted(uids)))
        template = self._built.get(kind)
        if template is None:
            sr = build()
            own = _copy(sr)
            self._built[kind] = _Template(own, dict(uids), _changing(own, set(uids.values())))
            return sr
        renamed = {template.uids[role]: uid for role, uid in uids.items()}
        sr = _copy(template.sr, template.changing)
        _replace_uids(sr, renamed)
        if hasattr(sr, "file_meta"):  # MediaStorageSOPInstanceUID
            _replace_uids(sr.file_meta, renamed)
        _replace_values(sr, {_code_key(name): item for name, item in values.items()})
        _stamp_times(sr)
        return sr


def _copy(ds: Dataset, only: frozenset[int] | None = None) -> Dataset:
    """A copy: new elements and sequences, values shared where they are
    immutable (strings, numbers) and copied where not (multi-values).
    copy.deepcopy does the same at ten times the cost, through pydicom's and
    highdicom's __deepcopy__ and a memo of every object.  With ``only``,
    items whose id() is not in it are shared, not copied: nothing changes
    them (see _changing), and the SRs are written, never edited, after."""
    out = Dataset()
    for elem in ds:
        twin = copy.copy(elem)  # the element object only, no value conversion
        if elem.VR == "SQ":
            twin.value = [_copy(item, only) if only is None or id(item) in only else item
                          for item in elem.value]
        elif isinstance(elem.value, list):  # MultiValue
            twin.value = copy.copy(elem.value)
        out.add(twin)
    if hasattr(ds, "file_meta"):
        out.file_meta = FileMetaDataset(_copy(ds.file_meta))
    return out


def _changing(sr: Dataset, uids: set[str]) -> frozenset[int]:
    """id() of the datasets of ``sr`` that a derived SR changes, or that
    contain one: those with a UI value among ``uids`` (_replace_uids), NUM
    items (_replace_values), a ContributionDateTime (_stamp_times), and the
    root."""
    found: set[int] = {id(sr)}

    def walk(ds: Dataset) -> bool:
        changes = ds.get("ValueType") == "NUM" or "ContributionDateTime" in ds
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    changes = walk(item) or changes
            elif elem.VR == "UI" and isinstance(elem.value, str) and elem.value in uids:
                changes = True
        if changes:
            found.add(id(ds))
        return changes

    walk(sr)
    return frozenset(found)


def _header_key(ds: Dataset) -> tuple[tuple[int, str], ...]:
    return tuple((int(elem.tag), repr(elem.value)) for elem in ds
                 if elem.tag != _PIXEL_DATA and elem.keyword not in PER_IMAGE)


def _code_key(code: Code | hd.sr.CodedConcept) -> tuple[str, str]:
    return str(code.value), str(code.scheme_designator)


def _replace_uids(ds: Dataset, renamed: Mapping[str, str]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _replace_uids(item, renamed)
        elif elem.VR == "UI" and isinstance(elem.value, str) and elem.value in renamed:
            elem.value = renamed[elem.value]


def _replace_values(ds: Dataset, values: Mapping[tuple[str, str], Dataset]) -> None:
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "NUM" and item.get("ConceptNameCodeSequence"):
            concept = item.ConceptNameCodeSequence[0]
            new = values.get((str(concept.CodeValue), str(concept.CodingSchemeDesignator)))
            if new is not None:
                item.MeasuredValueSequence = copy.deepcopy(new.MeasuredValueSequence)
        _replace_values(item, values)


def _stamp_times(sr: Dataset) -> None:
    """Creation and content times of now, as highdicom sets them."""
    now = dt.datetime.now()
    sr.InstanceCreationDate, sr.InstanceCreationTime = DA(now.date()), TM(now.time())
    sr.ContentDate, sr.ContentTime = DA(now.date()), TM(now.time())
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(now)
