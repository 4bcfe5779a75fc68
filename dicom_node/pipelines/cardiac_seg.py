"""Cardiac MRI short-axis segmentation: SEG of LV cavity, LV myocardium and
RV cavity at end-diastole and end-systole, an SR with the ventricular volumes
and ejection fractions, and a secondary capture for viewers without SEG.

Every phase is segmented; ED is the phase with the largest LV cavity volume,
ES the smallest.  Volumes are voxel counts times pixel area times the spacing
between slice centres along the normal (from ImagePositionPatient).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from dicom_node.encode.provenance import MANUFACTURER, Provenance, highdicom_source
from dicom_node.encode.sc import patient_orientation, secondary_capture
from dicom_node.encode.sr import COMMENT, measurement_report_sr, with_texts
from dicom_node.errors import PipelineError
from dicom_node.infer.manifest import ModelManifest, SegmentLabel
from dicom_node.infer.runner import InferenceModel, segment
from dicom_node.pipelines.base import (PipelineInput, PipelineResult, StageTimer, implausible,
                                       plausible_ranges, register, require_task)
from dicom_node.pipelines.cardiac_metrics import CardiacMetrics, Roles, cardiac_metrics
from dicom_node.pipelines.cine import Cine, load_cine

__all__ = ["CardiacSeg"]

log = logging.getLogger("dicom_node.pipelines.cardiac_seg")

_SERIES_OFFSET = {"sr": 2001, "sc": 2002}
# A SEG series per phase, as OHIF opens one SEG per series.  ED keeps the
# series (UID and number) that both phases shared before, so reruns replace it.
_SEG_SERIES: dict[str, tuple[str, int | str, int]] = {"ED": ("seg-series", 0, 2000), "ES": ("seg-series", "ES", 2003)}
_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_ML_M2 = hd.sr.CodedConcept("ml/m2", "UCUM", "milliliter per square meter")
_G = hd.sr.CodedConcept("g", "UCUM", "gram")
_G_M2 = hd.sr.CodedConcept("g/m2", "UCUM", "gram per square meter")
_PCT = hd.sr.CodedConcept("%", "UCUM", "percent")
_M2 = hd.sr.CodedConcept("m2", "UCUM", "square meter")
_MS = hd.sr.CodedConcept("ms", "UCUM", "millisecond")
_INDEXED = hd.sr.CodedConcept("125313", "DCM", "Indexed")
# LOINC concepts of CID 3835 (cardiac volumes) and CID 3833 (ejection fraction).
_LVEDV = hd.sr.CodedConcept("8821-1", "LN", "Left Ventricular ED Volume")
_LVESV = hd.sr.CodedConcept("8823-7", "LN", "Left Ventricular ES Volume")
_RVEDV = hd.sr.CodedConcept("8822-9", "LN", "Right Ventricular ED Volume")
_RVESV = hd.sr.CodedConcept("8824-5", "LN", "Right Ventricular ES Volume")
_LVEF = hd.sr.CodedConcept("8811-2", "LN", "Left ventricular ejection fraction by MR")
_RVEF = hd.sr.CodedConcept("8818-7", "LN", "Right ventricular ejection fraction by MR")
_SV = hd.sr.CodedConcept("90096001", "SCT", "Stroke Volume")
_LV_MASS = hd.sr.CodedConcept("18087-7", "LN", "Left Ventricle Mass")
_BSA = hd.sr.CodedConcept("301898006", "SCT", "Body surface area")


# Structures the pipeline measures, found by their SNOMED CT type codes
# (CID 7152 Cardiac Structure Segmentation Types, and the LV myocardium),
# never by label number.
_ROLE_CODES = {
    "lv_cavity": {("SCT", "87878005"), ("SRT", "T-32600")},
    "lv_myocardium": {("SCT", "49848007")},
    "rv_cavity": {("SCT", "53085002"), ("SRT", "T-32500")},
}
# Display colours when the manifest gives none: by anatomy, never by label
# number; structures beyond the three are yellow.
_ROLE_COLOURS = {"lv_cavity": (255, 64, 64), "lv_myocardium": (64, 220, 64), "rv_cavity": (64, 128, 255)}
_OTHER_COLOUR = (255, 255, 0)


def resolve_roles(manifest: ModelManifest) -> tuple[Roles | None, list[str]]:
    """The label value of each measured structure, by code; problems if the
    codes are ambiguous or the LV cavity (which picks ED and ES) is missing."""
    assert manifest.segmentation is not None
    found: dict[str, list[int]] = {role: [] for role in _ROLE_CODES}
    for label in manifest.segmentation.labels:
        for role, codes_ in _ROLE_CODES.items():
            if (label.type.scheme, label.type.value) in codes_:
                found[role].append(label.value)
    problems = [f"segmentation.labels: {role.replace('_', ' ')} coded by labels {values}; one expected"
                for role, values in found.items() if len(values) > 1]
    if not found["lv_cavity"]:
        problems.append("segmentation.labels: no LV cavity (SCT 87878005 Left ventricle), which "
                        "cardiac_seg needs to find ED and ES")
    if problems:
        return None, problems
    first = {role: (values[0] if values else None) for role, values in found.items()}
    return Roles(lv_cavity=found["lv_cavity"][0], lv_myocardium=first["lv_myocardium"],
                 rv_cavity=first["rv_cavity"]), []


@register
class CardiacSeg:
    name: ClassVar[str] = "cardiac_seg"
    plausible: ClassVar[dict[str, tuple[float, float]]] = {
        "lvedv_ml": (10.0, 500.0), "lvesv_ml": (2.0, 400.0),
        "rvedv_ml": (10.0, 500.0), "rvesv_ml": (2.0, 400.0),
        "lvef_pct": (0.0, 100.0), "rvef_pct": (0.0, 100.0),
        "lv_mass_g": (20.0, 400.0),
    }

    def check_model(self, manifest: ModelManifest) -> list[str]:
        problems = require_task(manifest, "segmentation", self.name)
        return problems or resolve_roles(manifest)[1]

    def run(self, job: PipelineInput, model: InferenceModel) -> PipelineResult:
        manifest = model.manifest
        problems = self.check_model(manifest)
        if problems:
            raise PipelineError(f"job {job.job_id}: model {manifest.name}: " + "; ".join(problems))
        roles, _ = resolve_roles(manifest)
        assert roles is not None
        timer = StageTimer()
        with timer.stage("decode"):
            cine = load_cine(job.datasets, f"job {job.job_id}")
        with timer.stage("inference"):
            flat = cine.images.reshape(-1, *cine.images.shape[2:])
            labels = segment(flat, cine.pixel_spacing, model, int(job.options.get("batch_size", 8)))
            labels = labels.reshape(cine.images.shape).astype(np.uint8)
        with timer.stage("encode"):
            first = cine.frames[0][0].dataset
            height, weight = _size(first)
            metrics = cardiac_metrics(labels, cine.pixel_spacing, cine.slice_spacing, height, weight,
                                      roles)
            source_key = ",".join(sorted({str(d.SeriesInstanceUID) for d in job.datasets}))
            prov = Provenance(manifest, self.name, source_key, model.provider)
            segs = [_segmentation(cine, labels, phase, name, prov)
                    for phase, name in ((metrics.ed_phase, "ED"), (metrics.es_phase, "ES"))]
            report = _report(cine, metrics, segs, prov, roles)
            capture = _capture(cine, labels, metrics, prov)
        values = {key: getattr(metrics, key) for key in self.plausible}
        held = implausible(values, plausible_ranges(self, manifest),
                           {k: (" %" if k.endswith("pct") else " g" if k.endswith("_g") else " ml")
                            for k in values})
        summary: dict[str, Any] = {"phases": cine.n_phases, "slices": cine.n_slices, "ed": metrics.ed_phase,
                   "es": metrics.es_phase, "lvef_pct": round(metrics.lvef_pct, 1)}
        if roles.missing():
            summary["not_measured"] = ", ".join(roles.missing())
        return PipelineResult([*segs, report, capture], timer.timings, summary, held=held)


def _size(ds: Dataset) -> tuple[float | None, float | None]:
    try:
        height = float(ds.PatientSize) if ds.get("PatientSize") else None
        weight = float(ds.PatientWeight) if ds.get("PatientWeight") else None
    except (TypeError, ValueError):
        return None, None
    return height, weight




def _colour(label: SegmentLabel) -> tuple[int, int, int]:
    """The label's display colour (sRGB): the manifest's, else by its type code."""
    if label.color_rgb is not None:
        return label.color_rgb
    for role, codes_ in _ROLE_CODES.items():
        if (label.type.scheme, label.type.value) in codes_:
            return _ROLE_COLOURS[role]
    return _OTHER_COLOUR


def _segment_descriptions(prov: Provenance) -> list[hd.seg.SegmentDescription]:
    algo = prov.algorithm_identification()
    out = []
    assert prov.manifest.segmentation is not None
    # highdicom wants segments in number order; a manifest may list them in any.
    for label in sorted(prov.manifest.segmentation.labels, key=lambda lab: lab.value):
        out.append(hd.seg.SegmentDescription(
            segment_number=label.value, segment_label=label.name,
            segmented_property_category=hd.sr.CodedConcept(label.category.value, label.category.scheme,
                                                           label.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(label.type.value, label.type.scheme,
                                                       label.type.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            tracking_uid=prov.uid("segment", label.value), tracking_id=label.name,
            display_color=hd.color.CIELabColor.from_rgb(*_colour(label))))
    return out


def _segmentation(cine: Cine, labels: np.ndarray, phase: int, name: str,
                  prov: Provenance) -> hd.seg.Segmentation:
    """One SEG for one phase, in its own series, frames matched exactly to
    their source frames."""
    frames = cine.frames[phase]
    sources = list({str(f.dataset.SOPInstanceUID): f.dataset for f in frames}.values())
    array = labels[phase]
    geometry: dict[str, Any] = {}
    explicit = len({str(d.SeriesInstanceUID) for d in sources}) > 1 or any(f.frame for f in frames)
    if explicit:
        # One series per slice location, or a multi-frame cine whose frames
        # repeat each position once per phase: highdicom can infer frame
        # positions from neither, so each frame gets its plane explicitly and
        # its source frame is referenced afterwards (_reference_source_frames).
        geometry = {
            "further_source_images": sources[1:] or None,
            "plane_positions": [hd.PlanePositionSequence("PATIENT", [float(v) for v in f.position])
                                for f in frames],
            "plane_orientation": hd.PlaneOrientationSequence("PATIENT",
                                                             [float(v) for v in frames[0].orientation]),
            "pixel_measures": hd.PixelMeasuresSequence(list(cine.pixel_spacing),
                                                       float(sources[0].get("SliceThickness") or
                                                             cine.slice_spacing),
                                                       cine.slice_spacing),
        }
        sources = sources[:1]
    first = cine.frames[0][0].dataset
    role, index, offset = _SEG_SERIES[name]
    sources = [highdicom_source(d) for d in sources]
    if geometry.get("further_source_images"):
        geometry["further_source_images"] = [highdicom_source(d) for d in geometry["further_source_images"]]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=array, **geometry,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(prov),
        series_instance_uid=prov.uid(role, index), series_number=prov.series_number(first, offset),
        sop_instance_uid=prov.uid("seg", name), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=prov.description,
        software_versions=prov.description, device_serial_number=str(prov.device_uid)[-16:],
        content_label=f"{name}_PHASE", content_description=f"AI cardiac segmentation, {name} phase",
        series_description=f"AI cardiac SEG {name} {prov.description}"[:64],
        contributing_equipment=[prov.contributing_equipment()],
    )
    seg.ContributingEquipmentSequence[0].DeviceUID = prov.device_uid
    if explicit:
        _reference_source_frames(seg, frames)
    return seg


def _reference_source_frames(seg: hd.seg.Segmentation, frames: list[Any]) -> None:
    """Give each SEG frame a Derivation Image item naming its source image
    (and frame), matched by plane position."""
    by_position = {tuple(np.round(f.position, 3)): f for f in frames}
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(np.round([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], 3))
        frame = by_position.get(position)
        if frame is None:
            raise PipelineError("SEG frame at a position no source frame has")
        source = Dataset()
        source.ReferencedSOPClassUID = frame.dataset.SOPClassUID
        source.ReferencedSOPInstanceUID = frame.dataset.SOPInstanceUID
        if frame.frame is not None:
            source.ReferencedFrameNumber = frame.frame
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
        purpose.CodeMeaning = "Source image for image processing operation"
        source.PurposeOfReferenceCodeSequence = [purpose]
        derivation = Dataset()
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113076", "DCM", "Segmentation"
        derivation.DerivationCodeSequence = [code]
        derivation.SourceImageSequence = [source]
        item.DerivationImageSequence = [derivation]


def _measures(pairs: list[tuple[hd.sr.CodedConcept, float | None, hd.sr.CodedConcept]], prov: Provenance,
              indexed: bool = False) -> list[hd.sr.Measurement]:
    """SR measurements for the values there are: a structure the model does
    not segment is reported as not measured, never as zero."""
    return [hd.sr.Measurement(name=name, value=round(float(value), 2), unit=unit,
                              derivation=_INDEXED if indexed else None, algorithm_id=prov.sr_algorithm())
            for name, value, unit in pairs if value is not None]


def _not_measured(roles: Roles) -> list[tuple[Code, str]]:
    """One TEXT comment naming what is not measured; never a zero."""
    missing = roles.missing()
    return [(COMMENT, "Not measured: model does not segment " + ", ".join(missing))] if missing else []


def _report(cine: Cine, m: CardiacMetrics, segs: list[hd.seg.Segmentation], prov: Provenance,
            roles: Roles) -> Dataset:
    lv = _measures([(_LVEDV, m.lvedv_ml, _ML), (_LVESV, m.lvesv_ml, _ML), (_SV, m.lvsv_ml, _ML),
                    (_LVEF, m.lvef_pct, _PCT), (_LV_MASS, m.lv_mass_g, _G)], prov)
    rv = _measures([(_RVEDV, m.rvedv_ml, _ML), (_RVESV, m.rvesv_ml, _ML), (_SV, m.rvsv_ml, _ML),
                    (_RVEF, m.rvef_pct, _PCT)], prov)
    if m.bsa_m2 is not None:
        lv += _measures([(_LVEDV, m.lvedv_index_ml_m2, _ML_M2), (_LVESV, m.lvesv_index_ml_m2, _ML_M2),
                         (_SV, m.lvsv_index_ml_m2, _ML_M2), (_LV_MASS, m.lv_mass_index_g_m2, _G_M2)],
                        prov, indexed=True)
        lv += _measures([(_BSA, m.bsa_m2, _M2)], prov)
        rv += _measures([(_RVEDV, m.rvedv_index_ml_m2, _ML_M2), (_RVESV, m.rvesv_index_ml_m2, _ML_M2),
                         (_SV, m.rvsv_index_ml_m2, _ML_M2)], prov, indexed=True)
    phases = _measures([(codes.SCT.EndDiastole, cine.frames[m.ed_phase][0].time, _MS),
                        (codes.SCT.EndSystole, cine.frames[m.es_phase][0].time, _MS)], prov)
    sources = [hd.sr.SourceImageForMeasurementGroup(s.SOPClassUID, s.SOPInstanceUID) for s in segs]
    groups = []
    for ident, site, measurements, notes in (
            ("left ventricle", codes.SCT.LeftVentricle, lv, _not_measured(roles)),
            ("right ventricle", codes.SCT.RightVentricle, rv, []),
            ("cardiac phases (trigger time)", codes.DCM.Finding, phases, [])):
        if not measurements and not notes:
            continue
        groups.append(with_texts(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=prov.uid("group", ident), identifier=ident),
            finding_type=site, algorithm_id=prov.sr_algorithm(), measurements=measurements or None,
            source_images=sources), notes))
    evidence = {str(f.dataset.SOPInstanceUID): f.dataset
                for p in (m.ed_phase, m.es_phase) for f in cine.frames[p]}
    return measurement_report_sr(
        prov=prov, evidence=[*evidence.values(), *segs], groups=groups,
        procedure=codes.SCT.MagneticResonanceImagingOfHeart,
        title=f"AI cardiac function {prov.description}",
        series_number=prov.series_number(cine.frames[0][0].dataset, _SERIES_OFFSET["sr"]))


def _label_colours(prov: Provenance) -> dict[int, tuple[int, int, int]]:
    assert prov.manifest.segmentation is not None
    return {lab.value: _colour(lab) for lab in prov.manifest.segmentation.labels}


def _panel(image: np.ndarray, labels: np.ndarray, title: str,
           colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    grey = np.clip((image - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    scale = max(1, 384 // max(grey.shape))
    grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(labels, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST_EXACT)
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    for value, colour in colours.items():
        contours, _ = cv2.findContours((lab == value).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, colour, 1)
    cv2.putText(rgb, title, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return rgb


def _fmt(value: float | None, unit: str) -> str:
    return "not measured" if value is None else f"{value:.0f} {unit}"


def _capture(cine: Cine, labels: np.ndarray, m: CardiacMetrics, prov: Provenance) -> Dataset:
    mid = cine.n_slices // 2
    colours = _label_colours(prov)
    ed = _panel(cine.images[m.ed_phase, mid], labels[m.ed_phase, mid], f"ED (phase {m.ed_phase})", colours)
    es = _panel(cine.images[m.es_phase, mid], labels[m.es_phase, mid], f"ES (phase {m.es_phase})", colours)
    banner = np.zeros((64, ed.shape[1] + es.shape[1], 3), np.uint8)
    lines = [f"LVEDV {_fmt(m.lvedv_ml, 'ml')}  LVESV {_fmt(m.lvesv_ml, 'ml')}  LVEF {_fmt(m.lvef_pct, '%')}  "
             f"LV mass {_fmt(m.lv_mass_g, 'g')}",
             f"RVEDV {_fmt(m.rvedv_ml, 'ml')}  RVESV {_fmt(m.rvesv_ml, 'ml')}  RVEF {_fmt(m.rvef_pct, '%')}",
             f"AI result {prov.description} - not for diagnosis unless validated by the site"]
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (6, 18 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1,
                    cv2.LINE_AA)
    height = max(ed.shape[0], es.shape[0])
    panels = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in (ed, es)], axis=1)
    rgb = np.ascontiguousarray(np.concatenate([banner, panels], axis=0))
    ref = cine.frames[m.ed_phase][mid]
    return secondary_capture(ref.dataset, rgb, prov, role="sc", series_number=prov.series_number(ref.dataset, _SERIES_OFFSET["sc"]),
                             description=f"AI cardiac summary {prov.description}",
                             orientation=patient_orientation(ref.orientation))
