"""Image plane geometry that is absent, empty or of the wrong multiplicity
fails the job with a PipelineError naming the instance and the attribute,
not with whatever numpy raises on it (an empty DS reads as '' in pydicom)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_node.errors import PipelineError
from dicom_node.pipelines.cine import load_cine
from dicom_node.pipelines.volume import load_volume, plane_vector
from dicom_node_synthetic.dicom_ct import ct_series
from dicom_node_synthetic.dicom_mr import cine_series
from helpers import legacy_enhanced, roundtrip

BROKEN = {"empty": "", "two values": [1.0, 2.0], "not numbers": b"a\\b\\c"}


def _ct() -> list:
    return ct_series(np.zeros((3, 16, 16), np.float32), seed="geometry-ct")


def _cine() -> list:
    return cine_series(np.zeros((2, 2, 16, 16), np.float32), seed="geometry-cine",
                       pixel_spacing_mm=(1.5, 1.5), slice_spacing_mm=8.0)


@pytest.mark.parametrize("load", [load_volume, load_cine], ids=["volume", "cine"])
@pytest.mark.parametrize("value", list(BROKEN), ids=list(BROKEN))
def test_unusable_position_names_the_instance_and_attribute(load, value: str) -> None:
    datasets = _ct() if load is load_volume else _cine()
    broken = BROKEN[value]
    if isinstance(broken, bytes):  # as read from a file: pydicom converts it on access
        datasets[1][0x00200032] = RawDataElement(Tag(0x00200032), "DS", len(broken), broken, 0, False, True)
    else:
        datasets[1].ImagePositionPatient = broken
    with pytest.raises(PipelineError, match=rf"instance {datasets[1].SOPInstanceUID}: .*ImagePositionPatient"):
        load(datasets)


@pytest.mark.parametrize("load", [load_volume, load_cine], ids=["volume", "cine"])
def test_missing_pixel_spacing_names_it(load) -> None:
    datasets = _ct() if load is load_volume else _cine()
    del datasets[0].PixelSpacing
    with pytest.raises(PipelineError, match="PixelSpacing"):
        load(datasets)


def test_plane_vector() -> None:
    assert np.array_equal(plane_vector(["1", "2.5", "-3"], 3), [1.0, 2.5, -3.0])
    for value in (None, "", [1.0, 2.0], ["x", "1", "2"], [1.0, float("nan"), 0.0]):
        assert plane_vector(value, 3) is None


def test_a_frame_of_an_enhanced_cine_without_usable_spacing_names_the_frame() -> None:
    multi = legacy_enhanced(hd.legacy.LegacyConvertedEnhancedMRImage, roundtrip(_cine()))
    for item in (multi.PerFrameFunctionalGroupsSequence[1], multi.SharedFunctionalGroupsSequence[0]):
        if "PixelMeasuresSequence" in item:
            item.PixelMeasuresSequence[0].PixelSpacing = [1.5]
    with pytest.raises(PipelineError, match=rf"instance {multi.SOPInstanceUID} frame \d+: .*PixelSpacing"):
        load_cine([multi])
