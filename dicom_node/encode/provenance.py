"""What every result object carries: where it came from and what made it.

IHE AI Results (AIR): algorithm identification (name, family, version) and a
Contributing Equipment item naming the node and the model.  Result UIDs are
derived from (source, pipeline, model version, role), so rerunning a job after
a crash produces the same UIDs and a PACS replaces rather than duplicates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import highdicom as hd
from pydicom import DataElement, Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from dicom_node import __version__
from dicom_node.infer.manifest import ModelManifest

__all__ = ["Provenance", "result_uid", "MANUFACTURER", "copy_patient_study", "highdicom_source"]

MANUFACTURER = "dicom-node"
DEVICE_NAME = "dicom-node AI inference node"

# Patient and study modules copied verbatim into every result so the PACS files
# it with its source.  Type 2 attributes are copied empty when absent.
_PATIENT_STUDY = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "OtherPatientIDsSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription", "IssuerOfAccessionNumberSequence",
    "SpecificCharacterSet",
]


def result_uid(*parts: str) -> UID:
    """A UID that is a pure function of its parts: 2.25 form (PS3.5 B.2) from
    the first 128 bits of a SHA-256.  (pydicom's generate_uid ignores its
    entropy sources when the prefix is None, so we do not use it here.)"""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def highdicom_source(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy whose PatientName highdicom accepts.

    A backslash in a received PatientName (not allowed in PN, but sent) makes
    pydicom decode it as several values, and highdicom then refuses to build
    any object from that source (TypeError), failing the whole job.  The copy
    carries the values joined by spaces; the source itself is left as received.
    """
    name = ds.get("PatientName")
    if name is None or isinstance(name, (str, PersonName)):
        return ds
    copy = Dataset()
    for elem in ds:  # the elements themselves are shared, not copied
        copy.add(elem)
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    copy["PatientName"] = DataElement(0x00100010, "PN", " ".join(str(v) for v in name))
    return copy


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    for keyword in _PATIENT_STUDY:
        if keyword in source:
            target[keyword] = source[keyword]


@dataclass(frozen=True)
class Provenance:
    """The facts about one run of one model, shared by all its result objects."""

    manifest: ModelManifest
    pipeline: str
    source_series_uid: str
    provider: str

    def uid(self, role: str, index: int | str = 0) -> UID:
        return result_uid(self.source_series_uid, self.pipeline, self.manifest.name,
                          self.manifest.version, role, str(index))

    @property
    def algorithm_name(self) -> str:
        return self.manifest.name

    @property
    def family(self) -> hd.sr.CodedConcept:
        f = self.manifest.family
        return hd.sr.CodedConcept(value=f.value, scheme_designator=f.scheme, meaning=f.meaning)

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.manifest.name, family=self.family, version=self.manifest.version,
            source=MANUFACTURER, parameters={"pipeline": self.pipeline,
                                             "execution_provider": self.provider})

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification, for SR measurement groups."""
        return hd.sr.AlgorithmIdentification(
            name=self.manifest.name, version=self.manifest.version,
            parameters=[f"pipeline={self.pipeline}", f"execution_provider={self.provider}"],
            family=self.family, manufacturer=MANUFACTURER)

    def contributing_equipment(self) -> hd.ContributingEquipment:
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=f"{self.manifest.name} {self.manifest.version}",
            software_versions=[f"dicom-node {__version__}", f"{self.manifest.name} {self.manifest.version}"],
            contribution_datetime=dt.datetime.now(),
            contribution_description=f"{self.pipeline}: {self.manifest.description}"[:64],
        )

    @property
    def device_uid(self) -> UID:
        return result_uid(MANUFACTURER, "device", self.manifest.name, self.manifest.version)

    @property
    def description(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def series_number(self, source: Dataset, offset: int) -> int:
        """The result series' number: the source's plus a per-pipeline, per-role
        offset, so results sort beside their source and reruns keep the number."""
        try:
            base = int(source.get("SeriesNumber") or 0)
        except (TypeError, ValueError):
            base = 0
        return base + offset
