"""Structured reports: TID 1500 measurement reports built with highdicom.

Shared pieces (observer device, algorithm identification, the document
itself) live here; each pipeline only says which groups of measurements it
reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from dicom_node.encode.provenance import DEVICE_NAME, MANUFACTURER, Provenance, highdicom_source
from dicom_node.encode import highdicom_compat

__all__ = ["observation_context", "measurement_report_sr", "PRIVATE_SCHEME", "private_code",
           "with_texts", "COMMENT", "NORMALITY", "RECOMMENDATION", "FINDINGS", "REGION_DESCRIPTION"]

_Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
G = TypeVar("G", hd.sr.MeasurementsAndQualitativeEvaluations, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)

# Concepts with no standard code (CNR, say) use this private scheme; it is
# declared in the Coding Scheme Identification Sequence of an SR that uses it.
PRIVATE_SCHEME = "99DCMNODE"

# Standard concept names for the qualitative evaluations of a measurement
# group.  Each is used at most once per group: dcmqi's tid1500reader (and so
# 3D Slicer) keeps only the first item of a concept it knows, and Finding
# (DCM 121071) is already the group's finding type.
NORMALITY = codes.DCM.Normality  # DCM 121402, its value from CID 222 (SCT Normal / Abnormal)
RECOMMENDATION = codes.DCM.Recommendation  # DCM 121075
FINDINGS = codes.DCM.Findings  # DCM 121070
COMMENT = codes.DCM.Comment  # DCM 121106
REGION_DESCRIPTION = codes.DCM.SelectedRegionDescription  # DCM 111058


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def with_texts(group: G, texts: Sequence[tuple[Code, str]]) -> G:
    """The group with TEXT qualitative evaluations appended (TID 1501 row 12,
    TID 1410/1411 likewise): words every SR reader shows, where a code alone
    would be private or would not say it all.  highdicom takes CODE
    evaluations only, so they go into the group's container afterwards."""
    names = [str(name.value) for name, _ in texts]
    if len(set(names)) != len(names):
        raise ValueError(f"TEXT evaluations repeat a concept name: {names}")
    container = group[0]
    items = list(container.get("ContentSequence", []))
    for name, text in texts:
        items.append(hd.sr.TextContentItem(name=name, value=text,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return group


def observation_context(prov: Provenance) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=prov.device_uid, name=DEVICE_NAME, manufacturer_name=MANUFACTURER,
        model_name=prov.description)
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def measurement_report_sr(
    *,
    prov: Provenance,
    evidence: Sequence[Dataset],
    groups: Sequence[_Group],
    procedure: hd.sr.CodedConcept,
    title: str,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report in a Comprehensive 3D SR, in the source's study."""
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(prov),
        procedure_reported=procedure,
        imaging_measurements=list(groups),
        title=codes.DCM.ImagingMeasurementReport,
    )
    # The report tree was made for this SR alone, so highdicom need not copy it.
    with highdicom_compat.content_handed_over(report):
        sr = _comprehensive_3d_sr(prov, evidence, report, series_number, title)
    sr.ContributingEquipmentSequence = [prov.contributing_equipment()]
    sr.ContributingEquipmentSequence[0].DeviceUID = prov.device_uid
    if _uses_private_scheme(sr):
        _declare_private_scheme(sr)
    return sr


def _comprehensive_3d_sr(prov: Provenance, evidence: Sequence[Dataset], report: hd.sr.MeasurementReport,
                         series_number: int, title: str) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        # highdicom takes the patient from the first evidence item.
        evidence=[highdicom_source(evidence[0]), *evidence[1:]],
        content=report,
        series_number=series_number,
        series_instance_uid=prov.uid("sr-series"),
        sop_instance_uid=prov.uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=prov.description,
        software_versions=prov.description,
        device_serial_number=str(prov.device_uid)[-16:],
        series_description=title[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def _uses_private_scheme(ds: Dataset) -> bool:
    """Whether any coded item in the content tree is in the private scheme:
    a declaration with no code in it would only be one more dciodvfy warning."""
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            if any(c.get("CodingSchemeDesignator") == PRIVATE_SCHEME for c in item.get(key, [])):
                return True
        for mv in item.get("MeasuredValueSequence", []):
            if any(c.get("CodingSchemeDesignator") == PRIVATE_SCHEME
                   for c in mv.get("MeasurementUnitsCodeSequence", [])):
                return True
        stack.extend(item.get("ContentSequence", []))
    return False


def _declare_private_scheme(ds: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dicom-node local codes"
    item.CodingSchemeResponsibleOrganization = "dicom-node project"
    ds.CodingSchemeIdentificationSequence = [item]
