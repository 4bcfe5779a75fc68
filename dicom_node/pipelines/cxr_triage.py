"""Chest X-ray normality triage: for each frontal radiograph, an SR with the
finding (normal, or abnormal - needs review), the abnormality probability and
the operating point, and a secondary capture of the radiograph with the
model's heat map and a result banner.

An AI triage aid, not a diagnosis: the wording says so in both objects.
Lateral and unknown views are skipped with a recorded reason, not guessed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.sr.codedict import codes

from dicom_node.encode.provenance import Provenance
from dicom_node.encode.sc import secondary_capture
from dicom_node.encode.sr import (COMMENT, FINDINGS, NORMALITY, RECOMMENDATION, measurement_report_sr,
                                  private_code, with_texts)
from dicom_node.encode.sr_reuse import ReportTemplates
from dicom_node.errors import PipelineError, SkipSeries
from dicom_node.infer.manifest import ModelManifest
from dicom_node.infer.runner import Classified, ClassifierInput, InferenceModel, classifier_input, classify
from dicom_node.pipelines.base import (PipelineInput, PipelineResult, StageTimer, implausible,
                                       plausible_ranges, register, require_task)
from dicom_node.pipelines.pixels import stored_pixels

__all__ = ["CxrTriage", "is_frontal", "presentation"]

log = logging.getLogger("dicom_node.pipelines.cxr_triage")

_FRONTAL_VIEWS = {"PA", "AP"}
# SNOMED CT view codes (CID 4010) for postero-anterior and antero-posterior.
_FRONTAL_VIEW_CODES = {"399348003", "272479000", "399182009"}
_PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_PROBABILITY = codes.DCM.Probability  # DCM 122157
_THRESHOLD = codes.DCM.ThresholdValue  # DCM 122411
# No standard concept for a model's operating point as a target sensitivity.
_TARGET_SENSITIVITY = private_code("SENS_TARGET", "Target sensitivity for abnormal")
# The wording a radiologist reads in any SR viewer, beside the standard codes.
_REVIEW = {True: "Abnormal - needs review", False: "Normal (AI triage) - no review flag"}
_AID = "AI triage aid, not a diagnosis"
_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
_PCT = hd.sr.CodedConcept("%", "UCUM", "percent")
_SERIES_OFFSET = {"sr": 3001, "sc": 3002}


@dataclass(frozen=True)
class _Read:
    dataset: Dataset
    result: Classified
    image: np.ndarray  # presentation values, [0, 1], MONOCHROME2

    @property
    def abnormal(self) -> bool:
        return self.result.abnormal


@register
class CxrTriage:
    name: ClassVar[str] = "cxr_triage"
    plausible: ClassVar[dict[str, tuple[float, float]]] = {"abnormality_probability": (0.0, 1.0)}

    def check_model(self, manifest: ModelManifest) -> list[str]:
        return require_task(manifest, "classification", self.name)

    def run(self, job: PipelineInput, model: InferenceModel) -> PipelineResult:
        problems = self.check_model(model.manifest)
        if problems:
            raise PipelineError(f"job {job.job_id}: " + "; ".join(problems))
        timer = StageTimer()
        results: list[Dataset] = []
        skipped: list[str] = []
        held: list[str] = []
        abnormal = False
        ranges = plausible_ranges(self, model.manifest)
        templates = ReportTemplates()
        frontal_images = []
        for ds in job.datasets:
            if "PixelData" not in ds:
                continue
            frontal, why = is_frontal(ds)
            if not frontal:
                skipped.append(f"{ds.SOPInstanceUID}: {why}")
                log.info("job %d: skipped instance %s: %s", job.job_id, ds.SOPInstanceUID, why)
                continue
            frontal_images.append(ds)
        # Decoding the next radiograph and drawing the captures (numpy and
        # OpenCV, which release the GIL) run on a small pool beside the
        # model and the SR (Python, in order: SR templates are kept per
        # kind).  Stages are timed as the wait on this thread, the critical
        # path; at most _AHEAD images are decoded or drawn ahead at a time.
        with ThreadPoolExecutor(_AHEAD, thread_name_prefix=f"cxr-job-{job.job_id}") as pool:
            prepare = partial(_prepared, manifest=model.manifest)
            upcoming = deque(pool.submit(prepare, ds) for ds in frontal_images[:_AHEAD])
            captures: list[Future[Dataset]] = []
            for i, ds in enumerate(frontal_images):
                with timer.stage("decode"):
                    image, model_input = upcoming.popleft().result()
                if i + _AHEAD < len(frontal_images):
                    upcoming.append(pool.submit(prepare, frontal_images[i + _AHEAD]))
                with timer.stage("inference"):
                    read = _Read(ds, classify(model_input, model), image)
                abnormal |= read.abnormal
                held += [f"instance {ds.SOPInstanceUID}: {r}" for r in
                         implausible({"abnormality_probability": read.result.score}, ranges)]
                with timer.stage("encode"):
                    prov = Provenance(model.manifest, self.name, str(ds.SOPInstanceUID), model.provider)
                    if i >= _AHEAD:
                        captures[i - _AHEAD].result()  # bounds the images held by pending captures
                    captures.append(pool.submit(_capture, read, prov))
                    captures[-1].add_done_callback(partial(_hand_over, job.early))
                    results.append(_report(read, prov, templates))
                    job.early(results[-1])
            with timer.stage("encode"):
                drawn = [c.result() for c in captures]
        results = [ds for pair in zip(results, drawn, strict=True) for ds in pair]
        if not results:
            raise SkipSeries(f"job {job.job_id}: no frontal chest radiograph: " + "; ".join(skipped)[:500])
        summary = {"images": len(results) // 2, "skipped": len(skipped)}
        return PipelineResult(results, timer.timings, summary, outcome="abnormal" if abnormal else "normal",
                              held=tuple(held))


# Radiographs decoded, and captures drawn, ahead of the one in the model.
_AHEAD = 2


def _prepared(ds: Dataset, manifest: ModelManifest) -> tuple[np.ndarray, ClassifierInput]:
    """The radiograph as displayed and as the model takes it (its letterbox
    and normalisation were the inference stage's largest part on 2 cores,
    now made ahead with the decoding)."""
    image = presentation(ds)
    return image, classifier_input(image, manifest)


def _hand_over(early: Callable[[Dataset], None], drawn: Future[Dataset]) -> None:
    """A finished capture to be written early (a failed one fails the job
    where its result is taken)."""
    if not drawn.cancelled() and drawn.exception() is None:
        early(drawn.result())


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
        pixels = stored_pixels(ds)
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types
        raise PipelineError(f"instance {ds.SOPInstanceUID}: cannot decode pixel data: {exc}") from exc
    if pixels.ndim != 2:
        raise PipelineError(f"instance {ds.SOPInstanceUID}: expected one greyscale frame, got {pixels.shape}")
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        return _presentation_by_lut(pixels, ds)
    return _present(pixels, ds)


def _present(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT, VOI, scaling to [0, 1] and inversion on any array."""
    values = _window(pixels, ds)
    lo, hi = float(values.min()), float(values.max())
    return _scaled(values, ds, lo, hi)


def _window(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
    return values


def _scaled(values: np.ndarray, ds: Dataset, lo: float, hi: float) -> np.ndarray:
    values = (values - lo) / max(hi - lo, 1e-6)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        values = 1.0 - values
    return values


def _presentation_by_lut(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """The same values as ``_present``, bit for bit, through a lookup table.

    Every step is a function of the stored value alone, so it is computed
    once for each of the (at most 65,536) stored values, with the same
    functions and dtypes, and the image is one table look-up: pydicom's
    windowing works in float64 and costs about 50 ms on a 5 megapixel
    radiograph, the look-up a few."""
    unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
    # Index i of the table holds the stored value whose bits read as i unsigned.
    domain = np.arange(1 << (8 * pixels.dtype.itemsize), dtype=unsigned).view(pixels.dtype)
    index = pixels.view(unsigned)
    table = _window(domain, ds)
    pmin, pmax = pixels.min(), pixels.max()
    ends = table[np.array([pmin, pmax], dtype=pixels.dtype).view(unsigned)]
    order = np.argsort(domain, kind="stable")
    present = table[order[int(pmin) - int(domain.min()):int(pmax) - int(domain.min()) + 1]]
    steps = np.diff(present)
    if np.all(steps >= 0) or np.all(steps <= 0):
        # Monotonic over the stored range: the extremes are at its ends,
        # and both ends occur in the image.
        lo, hi = float(ends.min()), float(ends.max())
    else:
        values = table[index]
        lo, hi = float(values.min()), float(values.max())
    table = _scaled(table, ds, lo, hi)
    # The look-up in bands of rows: numpy turns an index array into intp
    # first, and for the whole image that is a 40 MB temporary per radiograph.
    # Every index is in the table (it has one entry per bit pattern), so
    # mode="clip" changes no value; it skips the bounds check that "raise"
    # makes per element (12 -> 4.5 ms on 5 megapixels).
    out = np.empty(pixels.shape, table.dtype)
    step = max(1, (1 << 18) // max(1, pixels.shape[1]))
    for r in range(0, pixels.shape[0], step):
        np.take(table, index[r:r + step], out=out[r:r + step], mode="clip")
    return out




def _report(read: _Read, prov: Provenance, templates: ReportTemplates | None = None) -> Dataset:
    """The triage SR; with ``templates``, derived from the job's first SR of
    the same kind (same verdict, image size and patient/study) when there is
    one, which is what highdicom would build (encode/sr_reuse.py)."""
    result = read.result
    if templates is None or result.findings:
        # Multi-label findings are words that differ per image: built each time.
        return _build_report(read, prov)
    ds = read.dataset
    score = round(result.score, 4)
    uids = {"source": str(ds.SOPInstanceUID), "sr": prov.uid("sr"), "sr-series": prov.uid("sr-series"),
            "group": prov.uid("triage-group")}
    probability = hd.sr.NumContentItem(name=_PROBABILITY, value=score, unit=_ONE)
    return templates.report((read.abnormal, round(result.threshold, 6)), ds, uids,
                            {_PROBABILITY: probability}, lambda: _build_report(read, prov))


def _build_report(read: _Read, prov: Provenance) -> Dataset:
    spec = prov.manifest.classification
    assert spec is not None
    algo = prov.sr_algorithm()
    result = read.result
    finding = codes.SCT.Abnormal if read.abnormal else codes.SCT.Normal  # CID 222
    measurements = [
        hd.sr.Measurement(name=_PROBABILITY, value=round(result.score, 4), unit=_ONE, algorithm_id=algo,
                          referenced_coordinates=[_whole_image(read.dataset)]),
        hd.sr.Measurement(name=_THRESHOLD, value=round(result.threshold, 6), unit=_ONE, algorithm_id=algo),
    ]
    if spec.target_sensitivity is not None:
        measurements.append(hd.sr.Measurement(name=_TARGET_SENSITIVITY, unit=_PCT, algorithm_id=algo,
                                              value=round(100 * spec.target_sensitivity, 1)))
    texts = [(RECOMMENDATION, _REVIEW[read.abnormal])]
    if result.findings:
        # Multi-label: which findings crossed their thresholds, by the model's class names.
        texts.append((FINDINGS, "; ".join(f"{name}: p {p:.3f} >= threshold {t:.3f}"
                                          for name, p, t in result.findings)))
    texts.append((COMMENT, f"{_AID} ({prov.description})"))
    group = with_texts(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=prov.uid("triage-group"),
                                                     identifier="chest X-ray normality triage"),
        finding_type=finding, algorithm_id=algo, measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(NORMALITY, finding)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(read.dataset.SOPClassUID,
                                                            read.dataset.SOPInstanceUID)],
    ), texts)
    return measurement_report_sr(prov=prov, evidence=[read.dataset], groups=[group],
                                 procedure=_PLAIN_CHEST_XRAY,
                                 title=f"AI CXR triage {prov.description}",
                                 series_number=prov.series_number(read.dataset, _SERIES_OFFSET["sr"]))


def _whole_image(ds: Dataset) -> hd.sr.CoordinatesForMeasurement:
    """The radiograph's outline, which the probability is inferred from (TID
    300): the result is of the whole image, and viewers such as OHIF 3.13 fail
    on a measurement group without any image coordinates."""
    cols, rows = float(ds.Columns), float(ds.Rows)
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[0.0, 0.0], [cols, 0.0], [cols, rows], [0.0, rows], [0.0, 0.0]]),
        source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID))


def _overlay(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map in the JET colour map over the grey image, 45 % at full heat:
    colour * alpha + grey * (1 - alpha) per channel, rounded.  OpenCV's
    blendLinear does it in one pass (about 3 times faster than in numpy
    float32 on a 1024-pixel capture)."""
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET),
                          cv2.COLOR_BGR2RGB)
    alpha = (0.45 * heat).astype(np.float32)
    return cv2.blendLinear(colour, cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), alpha, 1 - alpha)


def _shrunk(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` area-averaged to ``size`` (columns, rows).  OpenCV's
    INTER_AREA at a non-integer factor costs 6.6 ms on a 5-megapixel
    radiograph; halving first (its 2 x 2 mean, a fast path) and then the
    rest costs 3.9 ms, within 0.35 grey levels on average of one step (a
    display picture, not a model input)."""
    rows, cols = image.shape[:2]
    if size[0] <= cols // 2 and size[1] <= rows // 2:
        image = cv2.resize(image, (cols // 2, rows // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _capture(read: _Read, prov: Provenance) -> Dataset:
    image = read.image
    longest = max(image.shape)
    scale = min(1.0, 1024 / longest)  # a viewer-friendly size; the heat map is coarse anyway
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    grey = (_shrunk(image, size) * 255).astype(np.uint8)
    result = read.result
    if result.heat is not None:
        rgb = _overlay(grey, result.heat.at((size[1], size[0])))
    else:
        rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    verdict = "ABNORMAL - NEEDS REVIEW" if read.abnormal else "NORMAL (AI triage)"
    banner = np.zeros((56, rgb.shape[1], 3), np.uint8)
    banner[:] = (150, 20, 20) if read.abnormal else (20, 110, 40)
    heat_note = "" if result.heat is not None else "  (model gives no heat map)"
    lines = [f"{verdict}  p(abnormal)={result.score:.3f}  threshold={result.threshold:.3f}{heat_note}",
             f"{prov.description}: {_AID}"]
    font = max(0.35, min(0.8, rgb.shape[1] / 1400))
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (8, 22 + 24 * i), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1,
                    cv2.LINE_AA)
    out = np.ascontiguousarray(np.concatenate([banner, rgb], axis=0))
    ds = read.dataset
    orientation = tuple(ds.PatientOrientation) if len(ds.get("PatientOrientation", [])) == 2 else ("L", "F")
    return secondary_capture(ds, out, prov, role="sc", series_number=prov.series_number(ds, _SERIES_OFFSET["sc"]),
                             description=f"AI CXR triage heat map {prov.description}",
                             orientation=orientation)
