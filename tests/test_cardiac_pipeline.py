"""The cardiac MRI pipeline in-process: cine in every shape scanners send it,
SEG + SR + SC out, exact geometry, volumes close to the phantom's truth."""

from __future__ import annotations


import highdicom as hd
import numpy as np
import pytest
from pydicom.filewriter import dcmwrite

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node_synthetic import cardiac_phantom
from dicom_node_synthetic.dicom_mr import cine_series
from helpers import dciodvfy_errors, legacy_enhanced, roundtrip

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def model():
    return ModelRegistry(load_config().models_dir).get("cardiac_seg")


@pytest.fixture(scope="module")
def study():
    return cardiac_phantom.make_cine(np.random.default_rng(11), n_slices=8, n_phases=10, size=192)


def _run(model, datasets):
    return get_pipeline("cardiac_seg").run(PipelineInput(1, "cine", datasets, {"batch_size": 8}), model)


def _series(study, **kw):
    return roundtrip(cine_series(study.images, seed="cine", pixel_spacing_mm=study.pixel_spacing_mm,
                                  slice_spacing_mm=study.slice_spacing_mm, **kw))


def test_seg_sr_sc_valid_and_volumes_close_to_truth(model, study, tmp_path):
    source = _series(study)
    result = _run(model, source)
    segs = [d for d in result.datasets if d.SOPClassUID == SEG]
    [sr] = [d for d in result.datasets if d.Modality == "SR"]
    [sc] = [d for d in result.datasets if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert len(segs) == 2
    for ds in [*segs, sr, sc]:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
    # SEG geometry: every frame sits exactly on its source frame.
    by_uid = {s.SOPInstanceUID: s for s in source}
    for ds in segs:
        seg = hd.seg.segread(tmp_path / f"{ds.SOPInstanceUID}.dcm")
        assert {d.segment_label for d in seg.SegmentSequence} == {"LV cavity", "LV myocardium", "RV cavity"} \
            or len(seg.SegmentSequence) == 3
        for frame in seg.PerFrameFunctionalGroupsSequence:
            ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            pos = frame.PlanePositionSequence[0].ImagePositionPatient
            assert np.allclose([float(v) for v in pos], [float(v) for v in by_uid[ref].ImagePositionPatient])
    report = hd.sr.srread(tmp_path / f"{sr.SOPInstanceUID}.dcm")
    values = {}
    for group in report.content.get_image_measurement_groups():
        for m in group.get_measurements():
            values.setdefault((group.tracking_identifier, m.name.meaning, m.unit.value), m.value)
    lvef = values[("left ventricle", "Left ventricular ejection fraction by MR", "%")]
    lvedv = values[("left ventricle", "Left Ventricular ED Volume", "ml")]
    assert abs(lvef - study.lvef_pct) < 10, (lvef, study.lvef_pct)
    assert abs(lvedv - study.lvedv_ml) / study.lvedv_ml < 0.2, (lvedv, study.lvedv_ml)
    # Height and weight present: BSA-indexed values too.
    assert ("left ventricle", "Left Ventricular ED Volume", "ml/m2") in values
    assert result.summary["ed"] != result.summary["es"]


def test_one_series_per_slice_location_gives_the_same_result(model, study):
    single = _run(model, _series(study)).summary
    split = _run(model, _series(study, per_slice_series=True)).summary
    assert single == split


def test_duplicate_and_missing_frames_are_handled(model, study, caplog):
    source = _series(study)
    duplicate = roundtrip([source[3]])[0]
    duplicate.SOPInstanceUID = duplicate.SOPInstanceUID + ".7"
    # Drop one frame of the last slice location: that location is left out.
    result = _run(model, source[:-1] + [duplicate])
    assert "dropped duplicate frame" in caplog.text
    assert "left out 1 slice locations" in caplog.text
    assert result.summary["slices"] == study.images.shape[1] - 1


def test_enhanced_multiframe_cine_gives_the_same_result_and_valid_segs(model, study, tmp_path):
    singles = _series(study)
    multi = legacy_enhanced(hd.legacy.LegacyConvertedEnhancedMRImage, singles)
    result = _run(model, [multi])
    assert result.summary == _run(model, singles).summary
    positions = {int(i + 1): [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                 for i, f in enumerate(multi.PerFrameFunctionalGroupsSequence)}
    for ds in [d for d in result.datasets if d.SOPClassUID == SEG]:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
        for frame in ds.PerFrameFunctionalGroupsSequence:
            src = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert src.ReferencedSOPInstanceUID == multi.SOPInstanceUID
            assert np.allclose(positions[int(src.ReferencedFrameNumber)],
                               [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])


def test_backslash_in_patient_name_does_not_fail_the_seg(model, study):
    """A PN with a stray backslash decodes as two values; highdicom must still
    get one, and the job must not fail."""
    source = _series(study)
    for ds in source:
        ds.PatientName = ["PHANTOM^CINE", "EXTRA"]
    result = _run(model, source)
    segs = [d for d in result.datasets if d.SOPClassUID == SEG]
    assert len(segs) == 2 and str(segs[0].PatientName) == "PHANTOM^CINE EXTRA"
