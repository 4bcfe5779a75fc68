"""Routing: which route (pipeline, model, destinations) a series goes to.

Deciding does no I/O: it takes the first instance's header and the
association's facts, and returns the decision with the reason each rule
matched or did not, so ``dicom-node route test`` can explain itself.
The first route whose conditions all hold wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue

from dicom_node.config import Match, Route
from dicom_node.observability.logs import escape

__all__ = ["RouteFacts", "RuleOutcome", "Decision", "decide", "CONTEXT_KEYS", "WITHHELD_KEYWORDS"]

# Attributes whose values a reason never shows: those of the PS3.15 Annex E
# Basic Application Level Confidentiality Profile (Table E.1-1), which are
# patient, study, staff and site data.  Its UIDs are left out: the node logs
# UIDs everywhere for tracing, and they carry no patient data of their own.
# A reason names the keyword and the configured operand, never the value.
WITHHELD_KEYWORDS: frozenset[str] = frozenset({
    "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
    "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription", "AcquisitionTime", "ActualHumanPerformersSequence",
    "AdditionalPatientHistory", "AdmissionID", "AdmittingDate",
    "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "AdmittingTime",
    "Allergies", "AuthorObserverSequence", "BranchOfService", "CassetteID",
    "CommentsOnThePerformedProcedureStep", "ConfidentialityConstraintOnPatientDataDescription",
    "ContentCreatorIdentificationCodeSequence", "ContentCreatorName", "ContentDate",
    "ContentSequence", "ContentTime", "ContrastBolusAgent", "ContributionDescription",
    "CountryOfResidence", "CurrentPatientLocation", "CurveDate", "CurveTime",
    "CustodialOrganizationSequence", "DataSetTrailingPadding", "DerivationDescription",
    "DestinationAE", "DetectorID", "DeviceSerialNumber", "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName", "EthnicGroup",
    "FillerOrderNumberImagingServiceRequest", "FrameComments", "GantryID", "GeneratorID",
    "GraphicAnnotationSequence", "HumanPerformerName", "HumanPerformerOrganization",
    "IconImageSequence", "IdentifyingComments", "ImageComments", "ImagePresentationComments",
    "ImagingServiceRequestComments", "Impressions", "InstitutionAddress",
    "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
    "InterpretationAuthor", "InterpretationDiagnosisDescription", "InterpretationIDIssuer",
    "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber",
    "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "LabelText", "MAC",
    "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence",
    "ModifiedImageDescription", "ModifyingDeviceID", "ModifyingDeviceManufacturer",
    "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults", "Occupation",
    "OperatorIdentificationSequence", "OperatorsName", "OrderCallbackPhoneNumber",
    "OrderEnteredBy", "OrderEntererLocation", "OriginalAttributesSequence", "OtherPatientIDs",
    "OtherPatientIDsSequence", "OtherPatientNames", "OverlayDate", "OverlayTime",
    "ParticipantSequence", "PatientAddress", "PatientAge", "PatientBirthDate",
    "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientID",
    "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientName",
    "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence",
    "PatientReligiousPreference", "PatientSex", "PatientSexNeutered", "PatientSize",
    "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers",
    "PatientTransportArrangements", "PatientTreatmentPreparationSequence", "PatientWeight",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName", "PersonAddress",
    "PersonIdentificationCodeSequence", "PersonName", "PersonTelecomInformation",
    "PersonTelephoneNumbers", "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "PlateID", "PreMedication", "PregnancyStatus",
    "ProtocolName", "ReasonForStudy", "ReasonForTheImagingServiceRequest", "ReceivingAE",
    "ReferencedDigitalSignatureSequence", "ReferencedImageSequence",
    "ReferencedPatientAliasSequence", "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence", "ReferencedSOPInstanceMACSequence",
    "ReferencedStudySequence", "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence", "ReferringPhysicianName",
    "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RequestAttributesSequence",
    "RequestedContrastAgent", "RequestedProcedureComments", "RequestedProcedureDescription",
    "RequestedProcedureID", "RequestedProcedureLocation", "RequestingAE", "RequestingPhysician",
    "RequestingService", "ResponsibleOrganization", "ResponsiblePerson", "ResultsComments",
    "ResultsDistributionListSequence", "ResultsIDIssuer", "ReviewerName",
    "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepEndDate",
    "ScheduledProcedureStepEndTime", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName", "ScheduledStationNameCodeSequence", "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle", "SeriesDate", "SeriesDescription", "SeriesTime",
    "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus", "SourceImageSequence",
    "SpecialNeeds", "StationName", "StudyComments", "StudyDate", "StudyDescription", "StudyID",
    "StudyIDIssuer", "StudyTime", "TextComments", "TextString", "TimezoneOffsetFromUTC",
    "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle",
    "VerifyingObserverIdentificationCodeSequence", "VerifyingObserverName",
    "VerifyingObserverSequence", "VerifyingOrganization", "VisitComments",
})

# Facts about the association and the series rather than the dataset.
CONTEXT_KEYS = ("CallingAE", "CalledAE", "InstanceCount")


@dataclass(frozen=True)
class RouteFacts:
    header: Dataset
    calling_ae: str = ""
    called_ae: str = ""
    instance_count: int = 1

    def value(self, keyword: str) -> Any:
        if keyword == "CallingAE":
            return self.calling_ae
        if keyword == "CalledAE":
            return self.called_ae
        if keyword == "InstanceCount":
            return self.instance_count
        return self.header.get(keyword)


@dataclass(frozen=True)
class RuleOutcome:
    route: str
    matched: bool
    # For a miss: the first condition that failed and why.
    reason: str


@dataclass(frozen=True)
class Decision:
    route: Route | None
    outcomes: tuple[RuleOutcome, ...]

    @property
    def reason(self) -> str:
        if self.route is not None:
            return f"matched route {self.route.name}"
        if not self.outcomes:
            return "no routes configured"
        return "; ".join(f"{o.route}: {o.reason}" for o in self.outcomes)


def decide(routes: list[Route], facts: RouteFacts) -> Decision:
    outcomes: list[RuleOutcome] = []
    chosen: Route | None = None
    for route in routes:
        miss = _first_miss(route.match, facts)
        outcomes.append(RuleOutcome(route.name, miss is None, miss or "all conditions hold"))
        if miss is None and chosen is None:
            chosen = route
    return Decision(chosen, tuple(outcomes))


def _first_miss(conditions: list[Match], facts: RouteFacts) -> str | None:
    for cond in conditions:
        value = facts.value(cond.keyword)
        ok, why = _check(cond, value)
        if not ok:
            return f"{cond.keyword} {why}"
    return None


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _shown(keyword: str, text: str) -> str:
    """The value as a reason may print it: escaped (it came off the network),
    or withheld for patient and study attributes."""
    if keyword in WITHHELD_KEYWORDS:
        return "<value withheld>"
    return repr(escape(text))


def _check(cond: Match, value: Any) -> tuple[bool, str]:
    present = value is not None and _values(value) != [""]
    if cond.present is not None:
        return present == cond.present, f"is {'present' if present else 'absent'}"
    if not present:
        return False, "is absent"
    raw = "\\".join(_values(value))
    text = _shown(cond.keyword, raw)
    if cond.equals is not None:
        return _equal(value, cond.equals), f"is {text}, not {cond.equals!r}"
    if cond.one_of is not None:
        return any(_equal(value, v) for v in cond.one_of), f"is {text}, not one of {cond.one_of!r}"
    if cond.regex is not None:
        return bool(re.search(cond.regex, raw)), f"{text} does not match /{cond.regex}/"
    if cond.contains is not None:
        wanted = cond.contains.upper()
        found = wanted in (v.upper() for v in _values(value))
        return found, f"{text} does not contain {cond.contains!r}"
    if cond.range is None:
        raise TypeError(f"match on {cond.keyword!r} has no operator; Match's validator should have refused it")
    number = _number(value)
    if number is None:
        return False, f"{text} is not a number"
    low_ok = cond.range.min is None or number >= cond.range.min
    high_ok = cond.range.max is None or number <= cond.range.max
    shown = text if cond.keyword in WITHHELD_KEYWORDS else f"{number:g}"
    return low_ok and high_ok, f"{shown} is outside [{cond.range.min}, {cond.range.max}]"


def _equal(value: Any, wanted: str | float) -> bool:
    values = _values(value)
    if len(values) != 1:
        return False
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        number = _number(value)
        return number is not None and number == float(wanted)
    return values[0] == str(wanted)


def _number(value: Any) -> float | None:
    try:
        return float(_values(value)[0])
    except (ValueError, IndexError):
        return None

