"""Cardiac MRI short-axis segmentation: SEG of LV cavity, LV myocardium and
RV cavity at end-diastole and end-systole, an SR with the ventricular volumes
and ejection fractions, and a secondary capture for viewers without SEG.

Every phase is segmented; ED is the phase with the largest LV cavity volume,
ES the smallest.  Volumes are voxel counts times pixel area times the spacing
between slice centres along the normal (from ImagePositionPatient).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode.provenance import MANUFACTURER, Provenance, highdicom_source
from dicom_node.encode.sc import patient_orientation, secondary_capture
from dicom_node.encode.sr import measurement_report_sr
from dicom_node.errors import PipelineError
from dicom_node.infer.engine import OnnxModel
from dicom_node.infer.tensors import run_segmentation
from dicom_node.pipelines.base import PipelineInput, PipelineResult, register
from dicom_node.pipelines.cardiac_metrics import CardiacMetrics, cardiac_metrics
from dicom_node.pipelines.cine import Cine, load_cine

__all__ = ["CardiacSeg"]

log = logging.getLogger("dicom_node.pipelines.cardiac_seg")

_SERIES_OFFSET = {"seg": 2000, "sr": 2001, "sc": 2002}
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
_COLOURS = {1: (255, 64, 64), 2: (64, 220, 64), 3: (64, 128, 255)}  # RGB per label


@register
class CardiacSeg:
    name: ClassVar[str] = "cardiac_seg"

    def run(self, job: PipelineInput, model: OnnxModel) -> PipelineResult:
        manifest = model.manifest
        if manifest.task != "segmentation" or manifest.segmentation is None:
            raise PipelineError(f"job {job.job_id}: model {manifest.name} is not a segmentation model")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cine = load_cine(job.datasets, f"job {job.job_id}")
        timings["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        flat = cine.images.reshape(-1, *cine.images.shape[2:])
        labels = run_segmentation(flat, cine.pixel_spacing, manifest,
                                  lambda x: model.run({model.input_name: x})[manifest.outputs[0].name],
                                  int(job.options.get("batch_size", 8)))
        labels = labels.reshape(cine.images.shape).astype(np.uint8)
        timings["inference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        first = cine.frames[0][0].dataset
        height, weight = _size(first)
        metrics = cardiac_metrics(labels, cine.pixel_spacing, cine.slice_spacing, height, weight)
        source_key = ",".join(sorted({str(d.SeriesInstanceUID) for d in job.datasets}))
        prov = Provenance(manifest, self.name, source_key, model.provider)
        segs = [_segmentation(cine, labels, phase, name, i + 1, prov)
                for i, (phase, name) in enumerate(((metrics.ed_phase, "ED"), (metrics.es_phase, "ES")))]
        report = _report(cine, metrics, segs, prov)
        capture = _capture(cine, labels, metrics, prov)
        timings["encode"] = time.perf_counter() - t0
        summary = {"phases": cine.n_phases, "slices": cine.n_slices, "ed": metrics.ed_phase,
                   "es": metrics.es_phase, "lvef_pct": round(metrics.lvef_pct, 1)}
        return PipelineResult([*segs, report, capture], timings, summary)


def _size(ds: Dataset) -> tuple[float | None, float | None]:
    try:
        height = float(ds.PatientSize) if ds.get("PatientSize") else None
        weight = float(ds.PatientWeight) if ds.get("PatientWeight") else None
    except (TypeError, ValueError):
        return None, None
    return height, weight


def _series_number(ds: Dataset, role: str) -> int:
    return int(ds.get("SeriesNumber") or 0) + _SERIES_OFFSET[role]


def _segment_descriptions(prov: Provenance) -> list[hd.seg.SegmentDescription]:
    algo = prov.algorithm_identification()
    out = []
    for label in prov.manifest.segmentation.labels:
        out.append(hd.seg.SegmentDescription(
            segment_number=label.value, segment_label=label.name,
            segmented_property_category=hd.sr.CodedConcept(label.category.value, label.category.scheme,
                                                           label.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(label.type.value, label.type.scheme,
                                                       label.type.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            tracking_uid=prov.uid("segment", label.value), tracking_id=label.name,
            display_color=hd.color.CIELabColor.from_rgb(*_COLOURS.get(label.value, (255, 255, 0)))
            if hasattr(hd.color.CIELabColor, "from_rgb") else None))
    return out


def _segmentation(cine: Cine, labels: np.ndarray, phase: int, name: str, number: int,
                  prov: Provenance) -> hd.seg.Segmentation:
    """One SEG for one phase, frames matched exactly to their source frames."""
    frames = cine.frames[phase]
    sources = list({str(f.dataset.SOPInstanceUID): f.dataset for f in frames}.values())
    array = labels[phase]
    geometry: dict = {}
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
    sources = [highdicom_source(d) for d in sources]
    if geometry.get("further_source_images"):
        geometry["further_source_images"] = [highdicom_source(d) for d in geometry["further_source_images"]]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=array, **geometry,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(prov),
        series_instance_uid=prov.uid("seg-series"), series_number=_series_number(first, "seg"),
        sop_instance_uid=prov.uid("seg", name), instance_number=number,
        manufacturer=MANUFACTURER, manufacturer_model_name=prov.description,
        software_versions=prov.description, device_serial_number=str(prov.device_uid)[-16:],
        content_label=f"{name}_PHASE", content_description=f"AI cardiac segmentation, {name} phase",
        series_description=f"AI cardiac SEG {prov.description}"[:64],
        contributing_equipment=[prov.contributing_equipment()],
    )
    seg.ContributingEquipmentSequence[0].DeviceUID = prov.device_uid
    if explicit:
        _reference_source_frames(seg, frames)
    return seg


def _reference_source_frames(seg: hd.seg.Segmentation, frames: list) -> None:
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


def _measure(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, prov: Provenance,
             indexed: bool = False) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 2), unit=unit,
                             derivation=_INDEXED if indexed else None, algorithm_id=prov.sr_algorithm())


def _report(cine: Cine, m: CardiacMetrics, segs: list[hd.seg.Segmentation], prov: Provenance) -> Dataset:
    lv = [_measure(_LVEDV, m.lvedv_ml, _ML, prov), _measure(_LVESV, m.lvesv_ml, _ML, prov),
          _measure(_SV, m.lvsv_ml, _ML, prov), _measure(_LVEF, m.lvef_pct, _PCT, prov),
          _measure(_LV_MASS, m.lv_mass_g, _G, prov)]
    rv = [_measure(_RVEDV, m.rvedv_ml, _ML, prov), _measure(_RVESV, m.rvesv_ml, _ML, prov),
          _measure(_SV, m.rvsv_ml, _ML, prov)]
    if m.rvef_pct is not None:
        rv.append(_measure(_RVEF, m.rvef_pct, _PCT, prov))
    if m.bsa_m2 is not None:
        lv += [_measure(_LVEDV, m.lvedv_index_ml_m2, _ML_M2, prov, True),
               _measure(_LVESV, m.lvesv_index_ml_m2, _ML_M2, prov, True),
               _measure(_SV, m.lvsv_index_ml_m2, _ML_M2, prov, True),
               _measure(_LV_MASS, m.lv_mass_index_g_m2, _G_M2, prov, True),
               _measure(_BSA, m.bsa_m2, _M2, prov)]
        rv += [_measure(_RVEDV, m.rvedv_index_ml_m2, _ML_M2, prov, True),
               _measure(_RVESV, m.rvesv_index_ml_m2, _ML_M2, prov, True),
               _measure(_SV, m.rvsv_index_ml_m2, _ML_M2, prov, True)]
    phases = [_measure(codes.SCT.EndDiastole, cine.frames[m.ed_phase][0].time, _MS, prov),
              _measure(codes.SCT.EndSystole, cine.frames[m.es_phase][0].time, _MS, prov)]
    sources = [hd.sr.SourceImageForMeasurementGroup(s.SOPClassUID, s.SOPInstanceUID) for s in segs]
    groups = []
    for ident, site, measurements in (("left ventricle", codes.SCT.LeftVentricle, lv),
                                      ("right ventricle", codes.SCT.RightVentricle, rv),
                                      ("cardiac phases (trigger time)", codes.DCM.Finding, phases)):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=prov.uid("group", ident), identifier=ident),
            finding_type=site, algorithm_id=prov.sr_algorithm(), measurements=measurements,
            source_images=sources))
    evidence = {str(f.dataset.SOPInstanceUID): f.dataset
                for p in (m.ed_phase, m.es_phase) for f in cine.frames[p]}
    return measurement_report_sr(
        prov=prov, evidence=[*evidence.values(), *segs], groups=groups,
        procedure=codes.SCT.MagneticResonanceImagingOfHeart,
        title=f"AI cardiac function {prov.description}",
        series_number=_series_number(cine.frames[0][0].dataset, "sr"))


def _panel(image: np.ndarray, labels: np.ndarray, title: str) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    grey = np.clip((image - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    scale = max(1, 384 // max(grey.shape))
    grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(labels, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST_EXACT)
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    for value, colour in _COLOURS.items():
        contours, _ = cv2.findContours((lab == value).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, colour, 1)
    cv2.putText(rgb, title, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return rgb


def _capture(cine: Cine, labels: np.ndarray, m: CardiacMetrics, prov: Provenance) -> Dataset:
    mid = cine.n_slices // 2
    ed = _panel(cine.images[m.ed_phase, mid], labels[m.ed_phase, mid], f"ED (phase {m.ed_phase})")
    es = _panel(cine.images[m.es_phase, mid], labels[m.es_phase, mid], f"ES (phase {m.es_phase})")
    banner = np.zeros((64, ed.shape[1] + es.shape[1], 3), np.uint8)
    lines = [f"LVEDV {m.lvedv_ml:.0f} ml  LVESV {m.lvesv_ml:.0f} ml  LVEF {m.lvef_pct:.0f} %  "
             f"LV mass {m.lv_mass_g:.0f} g",
             f"RVEDV {m.rvedv_ml:.0f} ml  RVESV {m.rvesv_ml:.0f} ml  RVEF "
             + (f"{m.rvef_pct:.0f} %" if m.rvef_pct is not None else "n/a"),
             f"AI result {prov.description} - not for diagnosis unless validated by the site"]
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (6, 18 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1,
                    cv2.LINE_AA)
    height = max(ed.shape[0], es.shape[0])
    panels = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in (ed, es)], axis=1)
    rgb = np.ascontiguousarray(np.concatenate([banner, panels], axis=0))
    ref = cine.frames[m.ed_phase][mid]
    return secondary_capture(ref.dataset, rgb, prov, role="sc", series_number=_series_number(ref.dataset, "sc"),
                             description=f"AI cardiac summary {prov.description}",
                             orientation=patient_orientation(ref.orientation))
