"""The CT denoising pipeline in-process: any transfer syntax in, valid DICOM out."""

from __future__ import annotations

import copy
from io import BytesIO

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node_synthetic import ct_phantom
from dicom_node_synthetic.dicom_ct import ct_series
from helpers import dciodvfy_errors, legacy_enhanced

MODEL_DIR = load_config().models_dir


@pytest.fixture(scope="module")
def model():
    return ModelRegistry(MODEL_DIR).get("ct_denoise")


@pytest.fixture(scope="module")
def source():
    vol = ct_phantom.make_volume(np.random.default_rng(7), 5, size=160, pixel_mm=0.7 * 512 / 160)
    return ct_series(vol.low_dose_hu, seed="pipeline", pixel_mm=vol.pixel_mm, slice_mm=vol.slice_mm)


def _roundtrip(datasets, syntax=None):
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        if syntax is not None:
            if syntax == DeflatedExplicitVRLittleEndian:
                ds.file_meta.TransferSyntaxUID = syntax
            else:
                ds.compress(syntax, generate_instance_uid=False)
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        buf.seek(0)
        out.append(dcmread(buf))
    return out


def _run(model, datasets):
    return get_pipeline("ct_denoise").run(PipelineInput(1, "ct", datasets, {"batch_size": 2}), model)


def test_outputs_are_valid_and_geometry_is_kept(model, source, tmp_path):
    result = _run(model, _roundtrip(source))
    derived = [d for d in result.datasets if d.Modality == "CT"]
    [sr] = [d for d in result.datasets if d.Modality == "SR"]
    assert len(derived) == len(source)
    by_uid = {s.SOPInstanceUID: s for s in source}
    for ds in derived:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
        back = dcmread(path)
        src = by_uid[back.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert list(back.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert back.StudyInstanceUID == src.StudyInstanceUID
        assert back.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert back.SeriesInstanceUID != src.SeriesInstanceUID
        assert list(back.ImagePositionPatient) == list(src.ImagePositionPatient)
        assert (back.RescaleSlope, back.RescaleIntercept) == (src.RescaleSlope, src.RescaleIntercept)
        assert back.PixelRepresentation == src.PixelRepresentation
        assert back.ContributingEquipmentSequence[0].Manufacturer == "dicom-node"
        assert "ct_denoise" in back.DerivationDescription
        # The denoised slice is close to its own source, not to a neighbour.
        diff = np.abs(back.pixel_array.astype(float) - src.pixel_array.astype(float)).mean()
        assert diff < 60, f"derived slice far from its source ({diff:.1f} HU)"
    path = tmp_path / "sr.dcm"
    dcmwrite(path, sr, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path)
    groups = report.content.get_planar_roi_measurement_groups()
    sd = {g.tracking_identifier: g.get_measurements(name=hd.sr.CodedConcept("386136009", "SCT", "Standard Deviation"))[0].value
          for g in groups}
    assert sd["blood ROI, denoised series"] < sd["blood ROI, original series"]
    assert report.ContributingEquipmentSequence[0].Manufacturer == "dicom-node"


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_compressed_input_gives_the_same_result(model, source, syntax):
    plain = _run(model, _roundtrip(source))
    packed = _run(model, _roundtrip(source, syntax))
    a = {d.SOPInstanceUID: d for d in plain.datasets if d.Modality == "CT"}
    b = {d.SOPInstanceUID: d for d in packed.datasets if d.Modality == "CT"}
    assert a.keys() == b.keys(), "result UIDs must not depend on the transfer syntax"
    for uid in a:
        assert np.array_equal(a[uid].pixel_array, b[uid].pixel_array)


def test_slices_sorted_by_position_and_duplicates_dropped(model, source, caplog):
    shuffled = _roundtrip([source[3], source[0], source[4], source[1], source[2]])
    dup = _roundtrip([source[2]])[0]
    dup.SOPInstanceUID = dup.SOPInstanceUID + ".9"
    result = _run(model, shuffled + [dup])
    derived = [d for d in result.datasets if d.Modality == "CT"]
    assert len(derived) == 5
    assert "duplicate position" in caplog.text
    z = [float(d.ImagePositionPatient[2]) for d in derived]
    assert z == sorted(z) or z == sorted(z, reverse=True)


def test_rerun_gives_identical_uids(model, source):
    first = [d.SOPInstanceUID for d in _run(model, _roundtrip(source)).datasets]
    second = [d.SOPInstanceUID for d in _run(model, _roundtrip(source)).datasets]
    assert first == second


def test_no_blood_pool_fails_the_job_with_a_reason(model, source):
    from dicom_node.errors import PipelineError
    air = _roundtrip(source)
    for ds in air:
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
    with pytest.raises(PipelineError, match="series .*blood pool"):
        _run(model, air)


def test_enhanced_ct_in_single_frame_ct_out(model, source, tmp_path):
    """A multi-frame (legacy converted enhanced) CT gives one valid single-frame
    derived image per frame, each with its frame's position."""
    enhanced = legacy_enhanced(hd.legacy.LegacyConvertedEnhancedCTImage, _roundtrip(source))
    result = _run(model, [enhanced])
    derived = [d for d in result.datasets if d.Modality == "CT"]
    assert len(derived) == len(source)
    positions = sorted(tuple(map(float, s.ImagePositionPatient)) for s in source)
    assert sorted(tuple(map(float, d.ImagePositionPatient)) for d in derived) == positions
    for d in derived + [d for d in result.datasets if d.Modality == "SR"]:
        path = tmp_path / f"{d.SOPInstanceUID}.dcm"
        dcmwrite(path, d, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
    frames = sorted(int(d.SourceImageSequence[0].ReferencedFrameNumber) for d in derived)
    assert frames == list(range(1, len(source) + 1))
