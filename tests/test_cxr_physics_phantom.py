"""The physically modelled chest radiograph generator (a second training family).

``dicom_node_synthetic.cxr_physics`` renders radiographs from path lengths
and attenuation (Beer-Lambert, scatter, quantum noise, vendor processing)
instead of painting intensities, with the ground truth of
``cxr_phantom.Radiograph``.  These tests check what the recipe relies on:
the same generator state gives the same image, the labels and masks are
true to what is drawn, a finding changes the image where its mask is and
(almost) nowhere else, and the held-out independent family stays apart
from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest

from dicom_node_synthetic import cxr_physics
from dicom_node_synthetic.cxr_phantom import FINDINGS, SEVERITIES, measure_ctr
from dicom_node_synthetic.cxr_physics import (
    PHYSICS_CARDIOMEGALY_CTR_RANGE,
    PHYSICS_NORMAL_CTR_RANGE,
    make_physics_radiograph,
)
from dicom_node_synthetic.independent import cxr as independent_cxr

DENSE = ("nodule", "consolidation", "effusion")


def test_same_generator_state_same_image() -> None:
    a = make_physics_radiograph(np.random.default_rng(7), "nodule", (220, 200))
    b = make_physics_radiograph(np.random.default_rng(7), "nodule", (220, 200))
    c = make_physics_radiograph(np.random.default_rng(8), "nodule", (220, 200))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("finding", [None, *FINDINGS])
def test_image_and_labels(finding: str | None) -> None:
    rad = make_physics_radiograph(np.random.default_rng([11, 2]), finding, (300, 240), "subtle")
    assert rad.image.shape == (300, 240) and rad.image.dtype == np.float32
    assert 0.0 <= rad.image.min() and rad.image.max() <= 1.0
    assert rad.image.std() > 0.1  # a radiograph, not a flat field
    assert rad.mask.shape == rad.lungs.shape == rad.heart.shape == rad.image.shape
    assert rad.finding == finding and rad.mask.any() == (finding is not None)
    if finding is None:
        assert rad.severity is None and rad.side is None
        return
    assert rad.severity == "subtle"
    if finding != "cardiomegaly":
        # Lung findings lie in the lungs (a pneumothorax's pleural air too).
        assert (rad.mask & rad.lungs).sum() >= 0.9 * rad.mask.sum()
        assert rad.side in ("right", "left")


def test_cardiothoracic_ratio_is_drawn_and_measured_in_its_range() -> None:
    for i in range(10):
        normal = make_physics_radiograph(np.random.default_rng([5, i]), None, (256, 256))
        severity = SEVERITIES[i % 2]
        enlarged = make_physics_radiograph(np.random.default_rng([6, i]), "cardiomegaly",
                                           (256, 256), severity)
        assert PHYSICS_NORMAL_CTR_RANGE[0] <= normal.ctr <= PHYSICS_NORMAL_CTR_RANGE[1] < 0.5
        low, high = PHYSICS_CARDIOMEGALY_CTR_RANGE[severity]
        assert 0.5 < low <= enlarged.ctr <= high
        # The truth is what the rendered masks show (measured: within 0.023).
        for rad in (normal, enlarged):
            assert measure_ctr(rad.lungs, rad.heart) == pytest.approx(rad.ctr, abs=0.03)


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f != "pneumothorax"])
def test_a_finding_changes_the_same_patient_only_around_its_mask(finding: str) -> None:
    """The same state with and without a finding is the same patient on the
    same machine: the lungs are identical and, far from the finding, the
    images barely differ (measured: at most 0.009 of the range on average)
    while the mask changes by 0.05-0.47; dense findings make it brighter."""
    for i in range(3):
        sick = make_physics_radiograph(np.random.default_rng([9, i]), finding, (256, 232),
                                       "obvious")
        well = make_physics_radiograph(np.random.default_rng([9, i]), None, (256, 232))
        assert np.array_equal(sick.lungs, well.lungs)
        diff = sick.image - well.image
        far = cv2.dilate(sick.mask.astype(np.uint8), np.ones((31, 31), np.uint8)) == 0
        assert np.abs(diff[far]).mean() < 0.02
        assert np.abs(diff[sick.mask]).mean() > 3 * np.abs(diff[far]).mean()
        if finding in DENSE:
            assert diff[sick.mask].mean() > 0.05 * well.image.std()


def test_a_pneumothorax_is_free_air_where_its_mask_is() -> None:
    """A pneumothorax collapses its lung (denser) and leaves free air in the
    pleural space, which shifts the whole percentile window, so the image
    changes everywhere; where the mask is, it is darker than the same
    patient's normal image (measured: 15 of 16 seeds and severities)."""
    darker = 0
    for i in range(8):
        sick = make_physics_radiograph(np.random.default_rng([9, i]), "pneumothorax",
                                       (256, 232), "obvious")
        well = make_physics_radiograph(np.random.default_rng([9, i]), None, (256, 232))
        assert np.array_equal(sick.lungs, well.lungs) and sick.mask.sum() > 100
        darker += int(sick.image[sick.mask].mean() < well.image[sick.mask].mean())
    assert darker >= 7


def test_large_non_square() -> None:
    rad = make_physics_radiograph(np.random.default_rng(3), "effusion", (1200, 1000))
    assert rad.image.shape == (1200, 1000) and rad.mask.any()


def test_rejects_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="finding"):
        make_physics_radiograph(np.random.default_rng(0), "fracture")
    with pytest.raises(ValueError, match="severity"):
        make_physics_radiograph(np.random.default_rng(0), "nodule", severity="huge")
    with pytest.raises(ValueError, match="too small"):
        make_physics_radiograph(np.random.default_rng(0), None, (16, 16))


def _imports(path: str) -> set[str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    names = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return names | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for a in node.names}


def test_the_held_out_family_stays_apart() -> None:
    """Training on this generator must not see the independent family's code."""
    assert not any("independent" in m for m in _imports(cxr_physics.__file__))
    assert not any("cxr_physics" in m for m in _imports(independent_cxr.__file__))
