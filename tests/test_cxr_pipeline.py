"""The CXR triage pipeline in-process: what real radiographs carry in, valid
DICOM out, laterals skipped with a reason."""

from __future__ import annotations

from io import BytesIO

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite

from dicom_node.config import load_config
from dicom_node.errors import SkipSeries
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node.infer.manifest import Geometry
from dicom_node.infer.tensors import fit
from dicom_node.pipelines.cxr_triage import presentation
from dicom_node_synthetic import cxr_phantom
from dicom_node_synthetic.dicom_dx import dx_image
from helpers import dciodvfy_errors


@pytest.fixture(scope="module")
def model():
    return ModelRegistry(load_config().models_dir).get("cxr_triage")


def _roundtrip(ds):
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def _run(model, datasets):
    return get_pipeline("cxr_triage").run(PipelineInput(1, "cxr", datasets, {}), model)


def test_monochrome1_and_bit_depth_give_the_same_presentation():
    image = cxr_phantom.make_radiograph(np.random.default_rng(1), None, size=(300, 240)).image
    m2 = presentation(_roundtrip(dx_image(image, seed="a", bits=12)))
    m1 = presentation(_roundtrip(dx_image(image, seed="a", bits=16, monochrome1=True)))
    assert np.abs(m1 - m2).mean() < 0.01
    assert np.corrcoef(m2.ravel(), image.ravel())[0, 1] > 0.99


def test_letterbox_keeps_aspect_and_maps_back():
    image = np.zeros((300, 150), np.float32)
    image[100:200, 50:100] = 1
    fitted = fit(image[None, None], Geometry(fit="letterbox"), (256, 256))
    top, left, h, w = fitted.box
    assert (h, w) == (256, 128) and left == 64
    back = fitted.back(fitted.batch)[0, 0]
    assert back.shape == image.shape
    assert np.abs(back - image).mean() < 0.02


@pytest.mark.parametrize("finding, large", [(None, False), ("effusion", True)])
def test_frontal_radiograph_gives_valid_sr_and_sc(model, tmp_path, finding, large):
    size = (2000, 1700) if large else (512, 430)
    rad = cxr_phantom.make_radiograph(np.random.default_rng(3), finding, size=size, severity="obvious")
    source = _roundtrip(dx_image(rad.image, seed=f"cxr-{finding}", monochrome1=large))
    result = _run(model, [source])
    assert result.outcome == ("abnormal" if finding else result.outcome)
    [sr] = [d for d in result.datasets if d.Modality == "SR"]
    [sc] = [d for d in result.datasets if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    for ds in (sr, sc):
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
        assert ds.StudyInstanceUID == source.StudyInstanceUID
    report = hd.sr.srread(tmp_path / f"{sr.SOPInstanceUID}.dcm")
    [group] = report.content.get_observation_groups() if hasattr(report.content, "get_observation_groups") \
        else report.content.get_image_measurement_groups()
    names = {m.name.meaning for m in group.get_measurements()}
    assert {"Probability", "Threshold Value"} <= names
    assert sc.BurnedInAnnotation == "YES"
    assert sc.Columns <= 1024


def test_lateral_is_skipped_with_a_reason(model):
    rad = cxr_phantom.make_radiograph(np.random.default_rng(4), None, size=(256, 256))
    lateral = _roundtrip(dx_image(rad.image, seed="lat", view="LL"))
    with pytest.raises(SkipSeries, match="view position LL is not frontal"):
        _run(model, [lateral])
    unknown = _roundtrip(dx_image(rad.image, seed="unk", view=""))
    with pytest.raises(SkipSeries, match="view unknown"):
        _run(model, [unknown])
