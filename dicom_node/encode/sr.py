"""Structured reports: TID 1500 measurement reports built with highdicom.

Shared pieces (observer device, algorithm identification, the document
itself) live here; each pipeline only says which groups of measurements it
reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode.provenance import DEVICE_NAME, MANUFACTURER, Provenance, highdicom_source
from dicom_node.encode import hd_cache  # noqa: F401 - memoised IOD look-ups

__all__ = ["observation_context", "measurement_report_sr", "PRIVATE_SCHEME", "private_code"]

# Concepts with no standard code (CNR, say) use this private scheme; it is
# declared in the SR's Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99DCMNODE"


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


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
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations
                     | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
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
    sr = hd.sr.Comprehensive3DSR(
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
    sr.ContributingEquipmentSequence = [prov.contributing_equipment()]
    sr.ContributingEquipmentSequence[0].DeviceUID = prov.device_uid
    _declare_private_scheme(sr)
    return sr


def _declare_private_scheme(ds: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dicom-node local codes"
    item.CodingSchemeResponsibleOrganization = "dicom-node project"
    ds.CodingSchemeIdentificationSequence = [item]
