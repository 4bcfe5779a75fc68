"""Chest X-ray normality triage: for each frontal radiograph, an SR with the
finding (normal, or abnormal - needs review), the abnormality probability and
the operating point, and a secondary capture of the radiograph with the
model's heat map and a result banner.

An AI triage aid, not a diagnosis: the wording says so in both objects.
Lateral and unknown views are skipped with a recorded reason, not guessed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sr.codedict import codes

from dicom_node.encode.provenance import Provenance
from dicom_node.encode.sc import secondary_capture
from dicom_node.encode.sr import measurement_report_sr, private_code
from dicom_node.errors import PipelineError, SkipSeries
from dicom_node.infer.engine import OnnxModel
from dicom_node.infer.tensors import normalize
from dicom_node.pipelines.base import PipelineInput, PipelineResult, register

__all__ = ["CxrTriage", "is_frontal", "presentation", "letterbox"]

log = logging.getLogger("dicom_node.pipelines.cxr_triage")

_FRONTAL_VIEWS = {"PA", "AP"}
# SNOMED CT view codes (CID 4010) for postero-anterior and antero-posterior.
_FRONTAL_VIEW_CODES = {"399348003", "272479000", "399182009", "399348003"}
_PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_PROBABILITY = codes.DCM.Probability  # DCM 122157
_THRESHOLD = codes.DCM.ThresholdValue  # DCM 122411
_TARGET_SENSITIVITY = private_code("SENS_TARGET", "Target sensitivity for abnormal")
_TRIAGE = private_code("TRIAGE", "AI triage result")
_NEEDS_REVIEW = private_code("ABN_REVIEW", "Abnormal - needs review")
_AID = private_code("AID_NOT_DX", "AI triage aid, not a diagnosis")
_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
_PCT = hd.sr.CodedConcept("%", "UCUM", "percent")
_SERIES_OFFSET = {"sr": 3001, "sc": 3002}


@dataclass(frozen=True)
class _Read:
    dataset: Dataset
    probability: float
    abnormal: bool
    heatmap: np.ndarray  # on the source grid, [0, 1]
    image: np.ndarray  # presentation values, [0, 1], MONOCHROME2


@register
class CxrTriage:
    name: ClassVar[str] = "cxr_triage"

    def run(self, job: PipelineInput, model: OnnxModel) -> PipelineResult:
        spec = model.manifest.classification
        if model.manifest.task != "classification" or spec is None or spec.heatmap_output is None:
            raise PipelineError(f"job {job.job_id}: model {model.manifest.name} is not a classifier "
                                "with a heat map")
        timings = {"decode": 0.0, "inference": 0.0, "encode": 0.0}
        results: list[Dataset] = []
        skipped: list[str] = []
        abnormal = False
        for ds in job.datasets:
            if "PixelData" not in ds:
                continue
            frontal, why = is_frontal(ds)
            if not frontal:
                skipped.append(f"{ds.SOPInstanceUID}: {why}")
                log.info("job %d: skipped instance %s: %s", job.job_id, ds.SOPInstanceUID, why)
                continue
            read = self._read(ds, model, timings)
            abnormal |= read.abnormal
            t0 = time.perf_counter()
            prov = Provenance(model.manifest, self.name, str(ds.SOPInstanceUID), model.provider)
            results += [_report(read, prov), _capture(read, prov)]
            timings["encode"] += time.perf_counter() - t0
        if not results:
            raise SkipSeries(f"job {job.job_id}: no frontal chest radiograph: " + "; ".join(skipped)[:500])
        summary = {"images": len(results) // 2, "skipped": len(skipped)}
        return PipelineResult(results, timings, summary, outcome="abnormal" if abnormal else "normal")

    @staticmethod
    def _read(ds: Dataset, model: OnnxModel, timings: dict[str, float]) -> _Read:
        spec = model.manifest.classification
        t0 = time.perf_counter()
        image = presentation(ds)
        boxed, box = letterbox(image, model.manifest.input_size or (256, 256))
        timings["decode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        x = normalize(boxed[None], model.manifest)[:, None].astype(np.float32)
        out = model.run({model.input_name: x})
        timings["inference"] += time.perf_counter() - t0
        probability = float(np.ravel(out[model.manifest.outputs[0].name])[0])
        heat = unletterbox(out[spec.heatmap_output][0, 0], box, image.shape)
        return _Read(ds, probability, probability >= spec.threshold, heat, image)


def is_frontal(ds: Dataset) -> tuple[bool, str]:
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in _FRONTAL_VIEWS:
        return True, f"view position {view}"
    for item in ds.get("ViewCodeSequence", []):
        if str(item.get("CodeValue", "")) in _FRONTAL_VIEW_CODES:
            return True, f"view code {item.CodeValue}"
    if view:
        return False, f"view position {view} is not frontal (PA or AP)"
    return False, "view unknown (no ViewPosition or frontal view code); not guessed"


def presentation(ds: Dataset) -> np.ndarray:
    """The radiograph as displayed, MONOCHROME2, scaled to [0, 1]: modality
    LUT, then the VOI LUT or window, then inversion for MONOCHROME1."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types
        raise PipelineError(f"instance {ds.SOPInstanceUID}: cannot decode pixel data: {exc}") from exc
    if pixels.ndim != 2:
        raise PipelineError(f"instance {ds.SOPInstanceUID}: expected one greyscale frame, got {pixels.shape}")
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    values = (values - lo) / max(hi - lo, 1e-6)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        values = 1.0 - values
    return values


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize keeping the aspect ratio, centre, pad with the image's minimum.
    Returns the boxed image and (top, left, height, width) of the content."""
    rows, cols = size
    h, w = image.shape
    scale = min(rows / h, cols / w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((rows, cols), float(image.min()), np.float32)
    top, left = (rows - nh) // 2, (cols - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out, (top, left, nh, nw)


def unletterbox(heat: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    top, left, nh, nw = box
    crop = heat[top:top + nh, left:left + nw].astype(np.float32)
    return np.clip(cv2.resize(crop, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)


def _series_number(ds: Dataset, role: str) -> int:
    return int(ds.get("SeriesNumber") or 0) + _SERIES_OFFSET[role]


def _report(read: _Read, prov: Provenance) -> Dataset:
    spec = prov.manifest.classification
    algo = prov.sr_algorithm()
    finding = _NEEDS_REVIEW if read.abnormal else codes.SCT.Normal
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=prov.uid("triage-group"),
                                                     identifier="chest X-ray normality triage"),
        finding_type=codes.SCT.Abnormal if read.abnormal else codes.SCT.Normal,
        algorithm_id=algo,
        measurements=[
            hd.sr.Measurement(name=_PROBABILITY, value=round(read.probability, 4), unit=_ONE, algorithm_id=algo),
            hd.sr.Measurement(name=_THRESHOLD, value=round(spec.threshold, 6), unit=_ONE, algorithm_id=algo),
            hd.sr.Measurement(name=_TARGET_SENSITIVITY, value=round(100 * (spec.target_sensitivity or 0), 1),
                              unit=_PCT, algorithm_id=algo),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(_TRIAGE, finding),
                                 hd.sr.QualitativeEvaluation(codes.DCM.Finding, _AID)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(read.dataset.SOPClassUID,
                                                            read.dataset.SOPInstanceUID)],
    )
    return measurement_report_sr(prov=prov, evidence=[read.dataset], groups=[group],
                                 procedure=_PLAIN_CHEST_XRAY,
                                 title=f"AI CXR triage {prov.description}",
                                 series_number=_series_number(read.dataset, "sr"))


def _capture(read: _Read, prov: Provenance) -> Dataset:
    image = read.image
    longest = max(image.shape)
    scale = min(1.0, 1024 / longest)  # a viewer-friendly size; the heat map is coarse anyway
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    grey = (cv2.resize(image, size, interpolation=cv2.INTER_AREA) * 255).astype(np.uint8)
    heat = cv2.resize(read.heatmap, size, interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB).astype(np.float32)
    alpha = (0.45 * heat)[..., None]
    rgb = (rgb * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    spec = prov.manifest.classification
    verdict = "ABNORMAL - NEEDS REVIEW" if read.abnormal else "NORMAL (AI triage)"
    banner = np.zeros((56, rgb.shape[1], 3), np.uint8)
    banner[:] = (150, 20, 20) if read.abnormal else (20, 110, 40)
    lines = [f"{verdict}  p(abnormal)={read.probability:.3f}  threshold={spec.threshold:.3f}",
             f"{prov.description}: AI triage aid, not a diagnosis"]
    font = max(0.35, min(0.8, rgb.shape[1] / 1400))
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (8, 22 + 24 * i), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1,
                    cv2.LINE_AA)
    out = np.ascontiguousarray(np.concatenate([banner, rgb], axis=0))
    ds = read.dataset
    orientation = tuple(ds.PatientOrientation) if len(ds.get("PatientOrientation", [])) == 2 else ("L", "F")
    return secondary_capture(ds, out, prov, role="sc", series_number=_series_number(ds, "sc"),
                             description=f"AI CXR triage heat map {prov.description}",
                             orientation=orientation)
