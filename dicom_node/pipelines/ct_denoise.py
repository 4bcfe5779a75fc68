"""Low-dose CT denoising: a derived CT series plus a noise/SNR/CNR report.

Series in: CT Image Storage instances of one series, any transfer syntax.
Results out: one derived CT instance per source slice (same geometry and
rescale) and one TID 1500 SR with noise, SNR and CNR measured before and after
in the same automatically chosen regions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode.derived import DerivedSeries, derived_from_frame
from dicom_node.encode.provenance import Provenance
from dicom_node.encode.sr import REGION_DESCRIPTION, measurement_report_sr, private_code, with_texts
from dicom_node.errors import PipelineError, SkipSeries
from dicom_node.infer.manifest import ModelManifest
from dicom_node.infer.runner import InferenceModel, denoise
from dicom_node.pipelines import ct_quality
from dicom_node.pipelines.base import (PipelineInput, PipelineResult, StageTimer, implausible,
                                       plausible_ranges, register, require_task)
from dicom_node.pipelines.volume import Volume, load_volume

__all__ = ["CtDenoise"]

log = logging.getLogger("dicom_node.pipelines.ct_denoise")

_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

_HU = codes.UCUM.HounsfieldUnit
_RATIO = hd.sr.CodedConcept(value="{ratio}", scheme_designator="UCUM", meaning="ratio")
_SNR = codes.DCM.SignalToNoise  # DCM 113060
_CNR = private_code("CNR", "Contrast to noise ratio")
_SERIES_OFFSET = {"derived": 1000, "sr": 1001}
_MIN_SD_PIXELS = 50


@register
class CtDenoise:
    name: ClassVar[str] = "ct_denoise"
    # A denoiser removes noise: the CT numbers of homogeneous regions stay put
    # and their noise does not grow much.  An "AI denoised" series at -1024 HU
    # (a residual model read as a clean one) fails both.  The noise ratio is
    # lenient because the ROIs are picked where the source's SD is lowest, and
    # on small matrices even a plain 3x3 mean measured 1.7 there.
    plausible: ClassVar[dict[str, tuple[float, float]]] = {
        "roi_mean_shift_hu": (0.0, 30.0),
        "noise_ratio": (0.0, 3.0),
    }

    def check_model(self, manifest: ModelManifest) -> list[str]:
        return require_task(manifest, "image-to-image", self.name)

    def run(self, job: PipelineInput, model: InferenceModel) -> PipelineResult:
        problems = self.check_model(model.manifest)
        if problems:
            raise PipelineError(f"job {job.job_id}: " + "; ".join(problems))
        source = _ct_images(job)
        series_uid = str(source[0].SeriesInstanceUID)
        timer = StageTimer()
        with timer.stage("decode"):
            volume = load_volume(source, series_uid)
        # The ROI search needs only the source volume.  With an accelerator
        # doing the inference the CPU is free meanwhile, so it runs beside
        # the model; on the CPU provider the model already uses every core.
        accelerated = model.provider != "CPUExecutionProvider"
        regions = _search_regions(volume, background=accelerated)
        prov = Provenance(model.manifest, self.name, series_uid, model.provider)
        slices = _DerivedSlices(volume, prov)
        # Likewise the derived images of each finished batch are encoded
        # while the accelerator infers the next.
        beside = _EncodeBeside(slices, job.early) if accelerated else None
        try:
            with timer.stage("inference"):
                denoised = denoise(volume.values, volume.pixel_spacing, model,
                                   int(job.options.get("batch_size", 4)), on_batch=beside)
        except BaseException:
            if beside is not None:
                beside.finish_quietly()
            raise
        with timer.stage("encode"):
            if beside is not None:
                derived = beside.finish()
            else:
                derived = slices.encode(np.arange(len(volume.slices)), denoised)
                for ds in derived:  # written while the report is measured
                    job.early(ds)
            report, measured = _quality_report(volume, denoised, derived, prov, regions)
        values = _plausibility_values(measured)
        held = implausible(values, plausible_ranges(self, model.manifest),
                           {"roi_mean_shift_hu": " HU"})
        summary = {"slices": len(derived), "series": series_uid,
                   **{k: round(v, 3) for k, v in values.items() if v is not None}}
        return PipelineResult(derived + [report], timer.timings, summary, held=held)


def _plausibility_values(measured: tuple[ct_quality.QualityMeasurement, ct_quality.QualityMeasurement]
                         ) -> dict[str, float | None]:
    before, after = measured
    shift = max(abs(after.blood.mean_hu - before.blood.mean_hu),
                abs(after.reference.mean_hu - before.reference.mean_hu))
    # An SD over a handful of pixels (a small matrix at coarse spacing) says
    # nothing about noise; the ratio is then not judged.
    enough = before.blood.n_pixels >= _MIN_SD_PIXELS and before.blood.sd_hu > 0
    ratio = after.blood.sd_hu / before.blood.sd_hu if enough else None
    return {"roi_mean_shift_hu": float(shift), "noise_ratio": ratio}


def _ct_images(job: PipelineInput) -> list[Dataset]:
    # A CT image without pixel data is a broken CT (the job fails, saying so),
    # not something other than CT (which would be skipped).
    images = [ds for ds in job.datasets if ds.SOPClassUID == _CT_IMAGE or "PixelData" in ds]
    if not images:
        raise SkipSeries(f"job {job.job_id}: no CT images in the series")
    series = {str(ds.SeriesInstanceUID) for ds in images}
    if len(series) != 1:
        raise PipelineError(f"job {job.job_id}: ct_denoise takes one series, got {len(series)}")
    return images




class _DerivedSlices:
    """The derived series, encoded slice by slice in source order."""

    def __init__(self, volume: Volume, prov: Provenance) -> None:
        self.volume, self.prov = volume, prov
        first = volume.slices[0].dataset
        self.series_uid = prov.uid("derived-series")
        self.description = f"AI denoised {prov.description}"
        self.derivation = (f"AI noise reduction by {prov.manifest.name} version {prov.manifest.version} "
                           f"({prov.manifest.family.meaning}) in dicom-node; not for primary diagnosis "
                           f"unless the site validated this model")
        self.number = prov.series_number(first, _SERIES_OFFSET["derived"])
        self.series = DerivedSeries(prov, series_uid=self.series_uid, series_number=self.number,
                                    series_description=self.description, derivation=self.derivation)

    def encode(self, indices: np.ndarray, values: np.ndarray) -> list[Dataset]:
        out = []
        for i, slice_values in zip(indices.tolist(), values, strict=True):
            s = self.volume.slices[i]
            if s.frame is None:
                out.append(self.series.image(s.dataset, slice_values, index=str(s.dataset.SOPInstanceUID)))
                continue
            # Enhanced CT in: one single-frame CT image per frame out, which every
            # viewer shows, with the frame's own geometry.
            geometry = {"position": s.position, "orientation": s.orientation, "spacing": s.spacing,
                        "rescale": s.rescale, "thickness": self.volume.slice_spacing}
            out.append(derived_from_frame(s.dataset, s.frame, geometry, slice_values, self.prov, index=i,
                                          series_uid=self.series_uid, series_number=self.number,
                                          series_description=self.description, derivation=self.derivation))
        return out


class _EncodeBeside:
    """Encodes each batch of finished slices on one background thread while
    the accelerator infers the next (one thread: the series template is
    built in order).  ``finish()`` returns the series in source order."""

    def __init__(self, slices: _DerivedSlices, early: Callable[[Dataset], None]) -> None:
        self._slices, self._early = slices, early
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ct-encode")
        self._parts: list[Future[list[Dataset]]] = []

    def __call__(self, indices: np.ndarray, values: np.ndarray) -> None:
        self._parts.append(self._pool.submit(self._encode, indices.copy(), values.copy()))

    def _encode(self, indices: np.ndarray, values: np.ndarray) -> list[Dataset]:
        encoded = self._slices.encode(indices, values)
        for ds in encoded:
            self._early(ds)
        return encoded

    def finish(self) -> list[Dataset]:
        try:
            return [ds for part in self._parts for ds in part.result()]
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def finish_quietly(self) -> None:
        """After a failed inference: stop, dropping what was encoded."""
        self._pool.shutdown(wait=True, cancel_futures=True)


_BACKGROUND: ThreadPoolExecutor | None = None


def _search_regions(volume: Volume, background: bool) -> Future[ct_quality.QualityRegions] | None:
    """The ROI search started on its own thread, or None to run it in line."""
    global _BACKGROUND
    if not background:
        return None
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="ct-regions")
    return _BACKGROUND.submit(ct_quality.choose_regions, volume.values, volume.pixel_spacing)


def _quality_report(volume: Volume, denoised: np.ndarray, derived: list[Dataset], prov: Provenance,
                    searched: Future[ct_quality.QualityRegions] | None = None
                    ) -> tuple[Dataset, tuple[ct_quality.QualityMeasurement, ct_quality.QualityMeasurement]]:
    try:
        regions = (searched.result() if searched is not None
                   else ct_quality.choose_regions(volume.values, volume.pixel_spacing))
    except PipelineError as exc:
        raise PipelineError(f"series {prov.source_series_uid}: {exc}") from exc
    before = ct_quality.measure(volume.values, regions)
    after = ct_quality.measure(denoised, regions)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    originals = [(s.dataset, s.frame) for s in volume.slices]
    for label, measured, images in (("original", before, originals),
                                    ("denoised", after, [(d, None) for d in derived])):
        circles = [_circle(stats.roi, *images[stats.roi.slice_index])
                   for stats in (measured.blood, measured.reference)]
        for stats, circle in zip((measured.blood, measured.reference), circles, strict=True):
            groups.append(_roi_group(stats, circle, label, prov))
        groups.append(_ratio_group(measured, circles, label, prov))
    evidence = {str(d.SOPInstanceUID): d for d in [s.dataset for s in volume.slices] + derived}
    report = measurement_report_sr(
        prov=prov, evidence=list(evidence.values()), groups=groups,
        procedure=codes.SCT.ComputedTomography,
        title=f"AI denoising image quality {prov.description}",
        series_number=prov.series_number(volume.slices[0].dataset, _SERIES_OFFSET["sr"]))
    return report, (before, after)


S = TypeVar("S", hd.sr.ImageRegion, hd.sr.CoordinatesForMeasurement)


@dataclass(frozen=True)
class _Circle:
    """An ROI as a SCOORD CIRCLE on its image (and frame)."""

    centre_and_edge: np.ndarray  # centre, then a point on the circumference, as (column, row)
    image: Dataset
    frame: int | None

    def scoord(self, kind: type[S]) -> S:
        # A new source item each time: one content item is never in two places of the tree.
        return kind(graphic_type=hd.sr.GraphicTypeValues.CIRCLE, graphic_data=self.centre_and_edge,
                    source_image=hd.sr.SourceImageForRegion(
                        self.image.SOPClassUID, self.image.SOPInstanceUID,
                        referenced_frame_numbers=[self.frame] if self.frame else None))


def _circle(roi: ct_quality.Roi, image: Dataset, frame: int | None) -> _Circle:
    row, col = roi.centre
    radius_px = roi.radius_mm / roi.pixel_spacing_mm[1]
    return _Circle(np.array([[col + 0.5, row + 0.5], [col + 0.5 + radius_px, row + 0.5]]), image, frame)


def _roi_group(stats: ct_quality.RoiStats, circle: _Circle, label: str,
               prov: Provenance) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    roi = stats.roi
    region = circle.scoord(hd.sr.ImageRegion)
    tissue = codes.SCT.Blood if roi.kind == "blood" else (
        codes.SCT.Fat if roi.tissue == "adipose tissue" else codes.SCT.Air)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=prov.uid("roi", f"{roi.kind}-{label}"), identifier=f"{roi.kind} ROI, {label} series"),
        referenced_region=region,
        finding_type=tissue,
        algorithm_id=prov.sr_algorithm(),
        measurements=[
            hd.sr.Measurement(name=codes.SCT.Mean, value=round(stats.mean_hu, 2), unit=_HU,
                              algorithm_id=prov.sr_algorithm()),
            hd.sr.Measurement(name=codes.SCT.StandardDeviation, value=round(stats.sd_hu, 2), unit=_HU,
                              algorithm_id=prov.sr_algorithm()),
        ],
    )
    # TEXT, not a code: the description is free wording, and a second
    # Finding (DCM 121071) beside the finding type is lost by dcmqi.
    return with_texts(group, [(REGION_DESCRIPTION, f"{label} series: {roi.description}")])


def _ratio_group(measured: ct_quality.QualityMeasurement, circles: list[_Circle], label: str,
                 prov: Provenance) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Noise, SNR and CNR, each "inferred from" the ROIs it is computed in
    (TID 300): noise and SNR from the blood pool, CNR from both.  Viewers
    such as OHIF 3.13 fail on a measurement group without any geometry."""
    algo = prov.sr_algorithm()
    blood, both = circles[:1], circles

    def where(regions: list[_Circle]) -> list[hd.sr.CoordinatesForMeasurement]:
        return [c.scoord(hd.sr.CoordinatesForMeasurement) for c in regions]

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=prov.uid("ratios", label), identifier=f"noise, SNR and CNR, {label} series"),
        measurements=[
            hd.sr.Measurement(name=private_code("NOISE", "Image noise (SD in blood pool)"),
                              value=round(measured.noise_hu, 2), unit=_HU, algorithm_id=algo,
                              referenced_coordinates=where(blood)),
            hd.sr.Measurement(name=_SNR, value=round(measured.snr, 3), unit=_RATIO, algorithm_id=algo,
                              referenced_coordinates=where(blood)),
            hd.sr.Measurement(name=_CNR, value=round(measured.cnr, 3), unit=_RATIO, algorithm_id=algo,
                              referenced_coordinates=where(both)),
        ],
    )
