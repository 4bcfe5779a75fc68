"""Secondary captures (highdicom SCImage): pictures of results for PACS
viewers that cannot display SEG or SR, with the result burned in."""

from __future__ import annotations

import numpy as np
import highdicom as hd
from pydicom import Dataset

from dicom_node.encode.provenance import MANUFACTURER, Provenance, highdicom_source
from dicom_node.encode import highdicom_compat  # noqa: F401 - memoised IOD look-ups

__all__ = ["secondary_capture", "patient_orientation"]

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
# Body Part Examined defined terms (PS3.16 Annex L) of paired structures,
# for which Laterality must be given (empty when unknown).
_PAIRED = frozenset({
    "ACHILLES", "ADRENAL", "ANKLE", "ARM", "AXILLA", "BREAST", "BUTTOCK", "CALCANEUS", "CLAVICLE",
    "EAR", "ELBOW", "EXTREMITY", "EYE", "FEMUR", "FIBULA", "FINGER", "FOOT", "FOREARM", "HAND",
    "HEEL", "HIP", "HUMERUS", "KIDNEY", "KNEE", "LEG", "LOWEREXM", "LUNG", "ORBIT", "OVARY",
    "PAROTID", "RADIUS", "RIB", "SCAPULA", "SHOULDER", "TESTIS", "THIGH", "TIBIA", "TOE", "ULNA",
    "UPPEREXM", "WRIST",
})


def patient_orientation(orientation: np.ndarray) -> tuple[str, str]:
    """PatientOrientation (row, column directions) from ImageOrientationPatient,
    by each direction's dominant axis."""
    def letter(v: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(v)))
        return _LETTERS[axis][0 if v[axis] > 0 else 1]
    o = np.asarray(orientation, float)
    return letter(o[:3]), letter(o[3:])


def _body_part_and_laterality(reference: Dataset, sc: Dataset) -> None:
    """BodyPartExamined from the source, and Laterality (Type 2C, required
    for a paired body part) only where it means something: the source's
    value if it has one, absent for an unpaired part (chest, heart), empty
    (unknown) only where the part is paired or not known."""
    part = str(reference.get("BodyPartExamined", "") or "").strip().upper()
    if part:
        sc.BodyPartExamined = part
    side = str(reference.get("Laterality", "") or "").strip().upper()
    image_side = str(reference.get("ImageLaterality", "") or "").strip().upper()
    if side in ("R", "L"):
        sc.Laterality = side
    elif image_side in ("R", "L"):
        sc.Laterality = image_side
    elif part and part not in _PAIRED:
        # Unpaired: the standard wants it absent, and dciodvfy can tell from the part.
        if "Laterality" in sc:
            del sc.Laterality
    else:
        # Paired or unknown part: empty means unknown, which is all we know.
        sc.Laterality = ""


def secondary_capture(reference: Dataset, rgb: np.ndarray, prov: Provenance, *, role: str,
                      series_number: int, description: str,
                      orientation: tuple[str, str] | None = None) -> hd.sc.SCImage:
    """An RGB secondary capture in the reference's study, with the burned-in
    annotation flagged and the IHE AIR Contributing Equipment item."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"secondary capture needs an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    if orientation is None:
        orientation = patient_orientation(np.array(reference.get("ImageOrientationPatient",
                                                                  [1, 0, 0, 0, 1, 0]), float))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_source(reference), pixel_array=rgb, photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orientation,
        series_instance_uid=prov.uid(f"{role}-series"), series_number=series_number,
        sop_instance_uid=prov.uid(role), instance_number=1, manufacturer=MANUFACTURER,
        series_description=description[:64],
    )
    sc.BurnedInAnnotation = "YES"
    # General Image module: the image the capture was drawn from, so that a
    # viewer or an auditor can go from the picture to its source.
    source = Dataset()
    source.ReferencedSOPClassUID = reference.SOPClassUID
    source.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    sc.SourceImageSequence = [source]
    _body_part_and_laterality(reference, sc)
    sc.ContributingEquipmentSequence = [prov.contributing_equipment()]
    sc.ContributingEquipmentSequence[0].DeviceUID = prov.device_uid
    sc.DerivationDescription = f"Result image of {prov.description}; AI output, not for diagnosis unless validated"
    return sc
