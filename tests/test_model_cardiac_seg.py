"""Cardiac short-axis segmentation: the shipped ONNX model, the metrics and the phantom.

The model test runs onnxruntime (CPU) on fresh phantoms, drawn with a seed
used neither for training nor for the held-out set in the manifest, through
the same resample -> z-score -> pad -> argmax -> resample-back path the
pipeline uses, and checks the result against the numbers the manifest claims.
No torch needed.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from dicom_node.errors import PipelineError
from dicom_node.infer.manifest import ModelManifest, load_manifest
from dicom_node.pipelines.cardiac_metrics import (
    cardiac_metrics,
    dice,
    hausdorff95,
    mosteller_bsa,
    phase_volumes,
)
from dicom_node_synthetic.cardiac_phantom import make_cine, volume_curve

MODELS = Path(__file__).resolve().parents[1] / "models_onnx"
MANIFEST = MODELS / "cardiac_seg.yaml"
FRESH_SEED = 31337  # not the training (20261123) nor the held-out (777001) seed
# Two small studies are a noisy sample: allow this much below the manifest's Dice ...
DICE_TOLERANCE = 0.05
# ... and this much above its LVEF mean absolute error (percentage points).
LVEF_TOLERANCE_PCT = 4.0


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return load_manifest(MANIFEST)


@pytest.fixture(scope="module")
def fresh_predictions(manifest: ModelManifest):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(MODELS / manifest.onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(FRESH_SEED)
    out = []
    for _ in range(2):
        st = make_cine(rng, n_slices=10, n_phases=6, size=256)
        out.append((st, _segment(sess, st.images, st.pixel_spacing_mm, manifest)))
    return out


def _segment(sess, images: np.ndarray, spacing: tuple[float, float],
             manifest: ModelManifest) -> np.ndarray:
    """What the pipeline does with each slice, per the manifest."""
    target = manifest.geometry.pixel_spacing_mm
    assert target is not None
    mult = manifest.geometry.size_multiple
    P, S, H, W = images.shape
    pred = np.empty(images.shape, np.uint8)
    for p in range(P):
        batch, sizes = [], []
        for k in range(S):
            nh, nw = round(H * spacing[0] / target[0]), round(W * spacing[1] / target[1])
            r = cv2.resize(images[p, k], (nw, nh), interpolation=cv2.INTER_LINEAR)
            r = (r - r.mean()) / r.std()
            batch.append(np.pad(r, ((0, -nh % mult), (0, -nw % mult)), mode="edge"))
            sizes.append((nh, nw))
        logits = sess.run([manifest.outputs[0].name],
                          {manifest.inputs[0].name: np.stack(batch)[:, None].astype(np.float32)})[0]
        assert logits.shape[1] == 4
        for k, (nh, nw) in enumerate(sizes):
            lab = logits[k].argmax(0)[:nh, :nw].astype(np.uint8)
            # NEAREST_EXACT is centre-aligned like INTER_LINEAR; INTER_NEAREST is not.
            pred[p, k] = cv2.resize(lab, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
    return pred


# ----------------------------------------------------------------------- model
def test_manifest_describes_cardiac_labels(manifest: ModelManifest) -> None:
    assert manifest.task == "segmentation"
    assert manifest.fixed_size is None
    assert manifest.normalization.kind == "zscore"
    assert manifest.segmentation is not None
    values = {lab.value: lab.type.value for lab in manifest.segmentation.labels}
    assert values == {1: "87878005", 2: "49848007", 3: "53085002"}
    assert all(lab.category.scheme == "SCT" for lab in manifest.segmentation.labels)
    for name in ("lv_cavity", "lv_myocardium", "rv_cavity"):
        assert manifest.quality["dice"][name] > 0.85


def test_onnx_checksum_matches_manifest(manifest: ModelManifest) -> None:
    digest = hashlib.sha256((MODELS / manifest.onnx).read_bytes()).hexdigest()
    assert digest == manifest.sha256


def test_dice_on_fresh_phantoms_matches_manifest(manifest: ModelManifest,
                                                 fresh_predictions) -> None:
    for value, name in ((1, "lv_cavity"), (2, "lv_myocardium"), (3, "rv_cavity")):
        scores = [dice(pred[p, k] == value, st.labels[p, k] == value)
                  for st, pred in fresh_predictions
                  for p in range(pred.shape[0]) for k in range(pred.shape[1])
                  if (st.labels[p, k] == value).any()]
        assert len(scores) > 20
        claimed = manifest.quality["dice"][name]
        assert np.mean(scores) >= claimed - DICE_TOLERANCE, (name, np.mean(scores), claimed)


def test_lvef_on_fresh_phantoms_matches_manifest(manifest: ModelManifest,
                                                 fresh_predictions) -> None:
    errors = []
    for st, pred in fresh_predictions:
        m = cardiac_metrics(pred, st.pixel_spacing_mm, st.slice_spacing_mm)
        errors.append(abs(m.lvef_pct - st.lvef_pct))
        # The predicted ED/ES must land on the true ones, or one phase away.
        assert abs(m.ed_phase - st.ed_phase) <= 1 or {m.ed_phase, st.ed_phase} == {0, 5}
        assert abs(m.es_phase - st.es_phase) <= 1
    claimed = manifest.quality["mae"]["lvef_pct"]
    assert np.mean(errors) <= claimed + LVEF_TOLERANCE_PCT, (errors, claimed)


# ---------------------------------------------------------------------- metrics
def _known_labels() -> np.ndarray:
    """3 phases x 2 slices x 10 x 10; ED is phase 1, ES phase 2 (by hand)."""
    lab = np.zeros((3, 2, 10, 10), np.uint8)
    lv_px = [(20, 10), (30, 12), (8, 4)]   # LV cavity pixels in (slice 0, slice 1) per phase
    myo_px = [(10, 5), (10, 6), (10, 6)]
    rv_px = [(15, 0), (20, 5), (10, 0)]
    for p in range(3):
        for k in range(2):
            flat = lab[p, k].reshape(-1)
            n_lv, n_myo, n_rv = lv_px[p][k], myo_px[p][k], rv_px[p][k]
            flat[:n_lv] = 1
            flat[n_lv:n_lv + n_myo] = 2
            flat[n_lv + n_myo:n_lv + n_myo + n_rv] = 3
    return lab


def test_volumes_from_known_label_map() -> None:
    voxel_ml = 1.5 * 2.0 * 8.0 / 1000.0   # 0.024 ml
    vols = phase_volumes(_known_labels(), (1.5, 2.0), 8.0)
    np.testing.assert_allclose(vols.lv_cavity_ml, np.array([30, 42, 12]) * voxel_ml)
    np.testing.assert_allclose(vols.lv_myocardium_ml, np.array([15, 16, 16]) * voxel_ml)
    np.testing.assert_allclose(vols.rv_cavity_ml, np.array([15, 25, 10]) * voxel_ml)


def test_ed_es_and_indices_from_known_label_map() -> None:
    m = cardiac_metrics(_known_labels(), (1.5, 2.0), 8.0, height_m=1.80, weight_kg=80.0)
    assert (m.ed_phase, m.es_phase) == (1, 2)
    assert m.lvedv_ml == pytest.approx(42 * 0.024)
    assert m.lvesv_ml == pytest.approx(12 * 0.024)
    assert m.lvsv_ml == pytest.approx(30 * 0.024)
    assert m.lvef_pct == pytest.approx(100 * 30 / 42)
    assert m.lv_mass_g == pytest.approx(16 * 0.024 * 1.05)
    assert m.rvedv_ml == pytest.approx(25 * 0.024)
    assert m.rvesv_ml == pytest.approx(10 * 0.024)
    assert m.rvef_pct == pytest.approx(60.0)
    # Mosteller: sqrt(180 cm x 80 kg / 3600) = 2.0 m^2 exactly.
    assert m.bsa_m2 == pytest.approx(2.0)
    assert m.lvedv_index_ml_m2 == pytest.approx(m.lvedv_ml / 2.0)
    assert m.lv_mass_index_g_m2 == pytest.approx(m.lv_mass_g / 2.0)
    assert m.rvsv_index_ml_m2 == pytest.approx(15 * 0.024 / 2.0)
    plain = cardiac_metrics(_known_labels(), (1.5, 2.0), 8.0)
    assert plain.bsa_m2 is None and plain.lvedv_index_ml_m2 is None


def test_mosteller_bsa() -> None:
    assert mosteller_bsa(1.70, 65.0) == pytest.approx(math.sqrt(170 * 65 / 3600))
    with pytest.raises(PipelineError, match="metres"):
        mosteller_bsa(175.0, 70.0)
    with pytest.raises(PipelineError):
        mosteller_bsa(1.7, 0.0)


@pytest.mark.parametrize("labels, message", [
    (np.zeros((4, 3, 8, 8), np.uint8), "no LV"),
    (np.ones((4, 3, 8, 8), np.uint8), "does not change"),
    (np.ones((1, 3, 8, 8), np.uint8), "two cardiac phases"),
    (np.ones((3, 8, 8), np.uint8), "phases, slices"),
])
def test_impossible_input_raises(labels: np.ndarray, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        cardiac_metrics(labels, (1.0, 1.0), 8.0)


def test_bad_spacing_and_half_bsa_raise() -> None:
    with pytest.raises(PipelineError, match="slice spacing"):
        cardiac_metrics(_known_labels(), (1.0, 1.0), 0.0)
    with pytest.raises(PipelineError, match="pixel spacing"):
        cardiac_metrics(_known_labels(), (0.0, 1.0), 8.0)
    with pytest.raises(PipelineError, match="both height and weight"):
        cardiac_metrics(_known_labels(), (1.0, 1.0), 8.0, height_m=1.8)


def test_dice_and_hausdorff95() -> None:
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[10:20, 13:23] = True          # same square, 3 columns to the right
    assert dice(a, b) == pytest.approx(2 * 70 / 200)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert hausdorff95(a, a, (1.0, 1.0)) == 0.0
    assert hausdorff95(a, b, (1.0, 1.0)) == pytest.approx(3.0, abs=0.05)
    # The shift is along columns, so only the column spacing matters.
    assert hausdorff95(a, b, (1.0, 2.0)) == pytest.approx(6.0, abs=0.1)
    assert hausdorff95(a, np.zeros_like(a), (1.0, 1.0)) == math.inf


# ---------------------------------------------------------------------- phantom
def test_phantom_is_deterministic_and_seed_dependent() -> None:
    a = make_cine(np.random.default_rng(5), n_slices=4, n_phases=5, size=96)
    b = make_cine(np.random.default_rng(5), n_slices=4, n_phases=5, size=96)
    c = make_cine(np.random.default_rng(6), n_slices=4, n_phases=5, size=96)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.lvef_pct == b.lvef_pct
    assert not np.array_equal(a.labels, c.labels)


def test_phantom_truth_is_consistent_with_labels() -> None:
    st = make_cine(np.random.default_rng(11), n_slices=8, n_phases=20, size=160)
    assert st.images.dtype == np.float32 and st.labels.dtype == np.uint8
    assert st.images.shape == st.labels.shape == (20, 8, 160, 160)
    assert set(np.unique(st.labels)) <= {0, 1, 2, 3}
    assert 1.2 <= st.pixel_spacing_mm[0] <= 1.8 and 8.0 <= st.slice_spacing_mm <= 10.0
    m = cardiac_metrics(st.labels, st.pixel_spacing_mm, st.slice_spacing_mm)
    assert (m.ed_phase, m.es_phase) == (st.ed_phase, st.es_phase) and st.ed_phase == 0
    assert 0.3 <= st.es_phase / 20 <= 0.42
    assert m.lvedv_ml == pytest.approx(st.lvedv_ml) and m.lvef_pct == pytest.approx(st.lvef_pct)
    assert m.lv_mass_g == pytest.approx(st.lv_mass_g)
    assert 25.0 < st.lvef_pct < 75.0 and st.rvedv_ml > 0
    # RV is gone at the apex; blood is brighter than myocardium.
    assert not (st.labels[:, -1] == 3).any()
    ed = st.ed_phase
    assert st.images[ed][st.labels[ed] == 1].mean() > 1.5 * st.images[ed][st.labels[ed] == 2].mean()
    # Systolic wall thickening: myocardium is thicker (area / perimeter) at ES.
    mid = 3
    def thickness(lab: np.ndarray) -> float:
        ring = (lab == 2).astype(np.uint8)
        contours, _ = cv2.findContours(ring, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        return ring.sum() / (sum(cv2.arcLength(c, True) for c in contours) / 2)
    assert thickness(st.labels[st.es_phase, mid]) > 1.15 * thickness(st.labels[ed, mid])


def test_volume_curve_shape() -> None:
    f = volume_curve(25, 0.4, 0.36)
    assert f[0] == pytest.approx(1.0)
    assert int(np.argmin(f)) == 9 and f.min() == pytest.approx(0.4, abs=0.01)
    assert np.all(f <= 1.0 + 1e-9) and np.all(f >= 0.4 - 1e-9)
