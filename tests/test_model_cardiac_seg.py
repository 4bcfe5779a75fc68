"""Cardiac short-axis segmentation: the shipped ONNX model, the metrics and the phantoms.

The model tests run the node's own segmentation path
(``dicom_node.infer.runner.segment``: resample -> z-score -> pad -> argmax ->
resample back) with onnxruntime on fresh phantoms, drawn with seeds used
neither for training nor for the held-out sets in the manifest, from two
families: the training generator (``cardiac_phantom``) and the separately
designed ``independent.cardiac``, on which nothing was trained.  They check
the manifest's figures and issue 17's targets on the independent family.
Dice is read two ways: volumetric per study at ED and ES (the ACDC 2017 /
M&Ms convention, which the target is checked on) and as a mean over 2D
slices (reported beside it, and checked against the manifest too).
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
from dicom_node.infer.engine import OnnxModel
from dicom_node.infer.manifest import ModelManifest, load_manifest
from dicom_node.infer.runner import segment
from dicom_node.pipelines.cardiac_metrics import (
    cardiac_metrics,
    dice,
    dice_ed_es,
    hausdorff95,
    mosteller_bsa,
    phase_volumes,
)
from dicom_node_synthetic.cardiac_phantom import make_cine, make_cine_randomised, volume_curve
from dicom_node_synthetic.independent import cardiac as independent
from dicom_node_synthetic.independent.cardiac import make_independent_cine

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


INDEPENDENT_SEED = 31338  # nor the independent family's held-out seed (880017)
INDEPENDENT_STUDIES = 4


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel.load(MANIFEST)


def _segment(model: OnnxModel, images: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """What the pipeline does with a (phases, slices, rows, cols) cine, per the manifest."""
    P, S, H, W = images.shape
    return segment(images.reshape(P * S, H, W), spacing, model, 8).reshape(P, S, H, W)


@pytest.fixture(scope="module")
def fresh_predictions(model: OnnxModel):
    rng = np.random.default_rng(FRESH_SEED)
    out = []
    for _ in range(2):
        st = make_cine(rng, n_slices=10, n_phases=6, size=256)
        out.append((st, _segment(model, st.images, st.pixel_spacing_mm)))
    return out


@pytest.fixture(scope="module")
def independent_predictions(model: OnnxModel):
    rng = np.random.default_rng(INDEPENDENT_SEED)
    out = []
    for _ in range(INDEPENDENT_STUDIES):
        st = make_independent_cine(rng, n_phases=6)
        out.append((st, _segment(model, st.images, st.pixel_spacing_mm)))
    return out


def _slice_mean_dice(predictions, value: int) -> tuple[float, int]:
    """Mean 2D Dice over the slices (all phases) whose truth holds the structure."""
    scores = [dice(pred[p, k] == value, st.labels[p, k] == value)
              for st, pred in predictions
              for p in range(pred.shape[0]) for k in range(pred.shape[1])
              if (st.labels[p, k] == value).any()]
    return float(np.mean(scores)), len(scores)


def _study_volume_dice(predictions, value: int) -> np.ndarray:
    """Per study, the mean of its volumetric Dice at the true ED and ES (ACDC convention)."""
    return np.array([np.mean(dice_ed_es(pred, st.labels, value, st.ed_phase, st.es_phase))
                     for st, pred in predictions])


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
        assert manifest.quality["dice_3d_ed_es"][name] > 0.85
        assert manifest.quality["dice_2d_slice_mean"][name] > 0.85


def test_onnx_checksum_matches_manifest(manifest: ModelManifest) -> None:
    digest = hashlib.sha256((MODELS / manifest.onnx).read_bytes()).hexdigest()
    assert digest == manifest.sha256


def test_dice_on_fresh_phantoms_matches_manifest(manifest: ModelManifest,
                                                 fresh_predictions) -> None:
    for value, name in ((1, "lv_cavity"), (2, "lv_myocardium"), (3, "rv_cavity")):
        score, n = _slice_mean_dice(fresh_predictions, value)
        assert n > 20
        claimed = manifest.quality["dice_2d_slice_mean"][name]
        assert score >= claimed - DICE_TOLERANCE, (name, score, claimed)
        volumetric = float(_study_volume_dice(fresh_predictions, value).mean())
        claimed = manifest.quality["dice_3d_ed_es"][name]
        assert volumetric >= claimed - DICE_TOLERANCE, (name, volumetric, claimed)


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


# Issue 17's targets on the independent family.
TARGET_DICE = 0.85
TARGET_VOLUME_REL = 0.10
TARGET_LVEF_POINTS = 5.0
TARGET_STUDY_FRACTION = 0.90


def test_manifest_reports_both_families(manifest: ModelManifest) -> None:
    q = manifest.quality
    structures = {"lv_cavity", "lv_myocardium", "rv_cavity"}
    for family in ("training_family", "independent_family"):
        fig = q[family]
        for key in ("dice_3d_ed_es", "dice_3d_ed", "dice_3d_es", "dice_3d_ed_es_study_sd",
                    "dice_2d_slice_mean", "hd95_mm"):
            assert set(fig[key]) == structures, (family, key)
        for name in structures:
            assert fig["dice_3d_ed_es"][name] == pytest.approx(
                (fig["dice_3d_ed"][name] + fig["dice_3d_es"][name]) / 2, abs=0.001)
        assert fig["studies"] >= 6 and 0.0 <= fig["fraction_of_studies"]["all_three"] <= 1.0
    for key in ("dice_3d_ed_es", "dice_2d_slice_mean"):
        assert q[key] == q["training_family"][key]
    ind = q["independent_family"]
    assert ind["studies"] >= 20 and "independent" in ind["kind"]
    assert ind["fraction_of_studies"]["all_three"] >= TARGET_STUDY_FRACTION, ind


def test_manifest_dice_meets_target_on_independent_family(manifest: ModelManifest) -> None:
    # Issue 17 says "Dice >= 0.85 for every structure"; read, as ACDC 2017 and M&Ms report
    # it, per structure over the 3D volume at ED and ES, averaged over the studies.
    dice_3d = manifest.quality["independent_family"]["dice_3d_ed_es"]
    assert all(dice_3d[name] >= TARGET_DICE for name in dice_3d), dice_3d


# A one-sided bound: a model whose mean volumetric Dice over all studies is exactly at the
# target fails on INDEPENDENT_STUDIES fresh studies about one time in a hundred (z = 2.33),
# with the between-study SD that the manifest measured on 30 studies.
Z_ONE_SIDED_1PCT = 2.33


def test_independent_family_dice_meets_target(manifest: ModelManifest,
                                              independent_predictions) -> None:
    ind = manifest.quality["independent_family"]
    for value, name in ((1, "lv_cavity"), (2, "lv_myocardium"), (3, "rv_cavity")):
        per_study = _study_volume_dice(independent_predictions, value)
        margin = Z_ONE_SIDED_1PCT * ind["dice_3d_ed_es_study_sd"][name] / math.sqrt(len(per_study))
        assert per_study.mean() >= TARGET_DICE - margin, (name, per_study, margin)
        assert per_study.mean() >= ind["dice_3d_ed_es"][name] - margin, (name, per_study, margin)
        # The mean over 2D slices is reported beside it; the fresh set must hold the
        # manifest's figure within the training family's tolerance.
        score, n = _slice_mean_dice(independent_predictions, value)
        assert n > 40
        assert score >= ind["dice_2d_slice_mean"][name] - DICE_TOLERANCE, (name, score)


def test_independent_family_volumes_meet_target(independent_predictions) -> None:
    within, report = 0, []
    for st, pred in independent_predictions:
        m = cardiac_metrics(pred, st.pixel_spacing_mm, st.slice_spacing_mm)
        errors = (m.lvedv_ml / st.lvedv_ml - 1.0, m.lvesv_ml / st.lvesv_ml - 1.0,
                  m.lvef_pct - st.lvef_pct)
        report.append(tuple(round(e, 3) for e in errors))
        within += (abs(errors[0]) <= TARGET_VOLUME_REL and abs(errors[1]) <= TARGET_VOLUME_REL
                   and abs(errors[2]) <= TARGET_LVEF_POINTS)
    # With a true rate of 90 % or more, 4 studies hold 3 or more within target with
    # probability >= 0.95 (binomial); all 4 would fail a 90 % model one time in three.
    assert within >= INDEPENDENT_STUDIES - 1, report


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


def test_dice_ed_es_is_volumetric_per_phase() -> None:
    truth = _known_labels()                 # ED phase 1, ES phase 2
    pred = truth.copy()
    # Slice 1 at ED loses its 5 RV pixels: ED RV Dice over both slices is 2*20/(20+25),
    # where a mean over the two slices would give (1 + 0) / 2.
    pred[1, 1][pred[1, 1] == 3] = 0
    ed, es = dice_ed_es(pred, truth, 3, 1, 2)
    assert ed == pytest.approx(2 * 20 / 45) and es == 1.0
    assert dice_ed_es(pred, truth, 1, 1, 2) == (1.0, 1.0)
    with pytest.raises(PipelineError, match="ES phase 3"):
        dice_ed_es(pred, truth, 3, 1, 3)
    with pytest.raises(PipelineError, match="label maps of one shape"):
        dice_ed_es(pred[:, :1], truth, 3, 1, 2)


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


def test_randomised_training_phantom_is_consistent_and_wider() -> None:
    st = make_cine_randomised(np.random.default_rng(3), n_slices=8, n_phases=6, size=128)
    again = make_cine_randomised(np.random.default_rng(3), n_slices=8, n_phases=6, size=128)
    np.testing.assert_array_equal(st.images, again.images)
    m = cardiac_metrics(st.labels, st.pixel_spacing_mm, st.slice_spacing_mm)
    assert m.lvedv_ml == pytest.approx(st.lvedv_ml) and m.lv_mass_g == pytest.approx(st.lv_mass_g)
    efs = [make_cine_randomised(np.random.default_rng(s), n_slices=4, n_phases=4, size=96).lvef_pct
           for s in range(12)]
    # The default generator keeps LVEF in 30-70 %; the randomised one goes beyond.
    assert min(efs) < 30.0 or max(efs) > 70.0, efs


def test_training_generators_default_draws_are_unchanged() -> None:
    # Pins the label maps (integer rasterisation of the drawn subject, so free of
    # floating-point differences between CPUs): an opt-in option that consumed random
    # numbers on the default path, or a changed range, would change them.
    expected = {
        make_cine: "307d3858246a45a89877b021a5e38c72ce39ce72f538dd6b2631b4ad7b23693b",
        make_cine_randomised: "487ab89cfc5fa6fcebc6ec22bdc7aa3229b79378671bcf7204f39116814c0341",
    }
    for generate, digest in expected.items():
        st = generate(np.random.default_rng(5), n_slices=6, n_phases=4, size=96)
        assert hashlib.sha256(st.labels.tobytes()).hexdigest() == digest, generate.__name__
    plain = make_cine_randomised(np.random.default_rng(5), n_slices=6, n_phases=4, size=96)
    again = make_cine_randomised(np.random.default_rng(5), n_slices=6, n_phases=4, size=96,
                                 thin_rv=False)
    np.testing.assert_array_equal(plain.images, again.images)


def test_thin_rv_option_draws_small_apical_rv_sections() -> None:
    def small_rv_slices(thin: bool) -> tuple[int, int]:
        small = total = 0
        for seed in range(8):
            st = make_cine_randomised(np.random.default_rng(seed), n_slices=10, n_phases=2,
                                      size=256, thin_rv=thin)
            area = (st.labels[st.ed_phase] == 3).sum((1, 2)) * st.pixel_spacing_mm[0] ** 2
            small += int(((area > 0) & (area < 300)).sum())
            total += int((area > 0).sum())
            m = cardiac_metrics(st.labels, st.pixel_spacing_mm, st.slice_spacing_mm)
            assert m.rvedv_ml == pytest.approx(st.rvedv_ml)
        return small, total
    default_small, default_total = small_rv_slices(False)
    thin_small, thin_total = small_rv_slices(True)
    # Sections under 300 mm^2 are where the RV Dice fails; the option must make them common.
    assert thin_small >= 3 * max(default_small, 1) and thin_total > 0.8 * default_total


def test_independent_phantom_imports_nothing_from_the_training_generator() -> None:
    source = Path(independent.__file__).read_text(encoding="utf-8")
    assert "cardiac_phantom" not in source.replace("dicom_node_synthetic.cardiac_phantom`", "")


def test_independent_phantom_is_deterministic_and_truthful() -> None:
    a = make_independent_cine(np.random.default_rng(8), n_phases=3)
    b = make_independent_cine(np.random.default_rng(8), n_phases=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.dtype == np.float32 and a.labels.dtype == np.uint8
    assert set(np.unique(a.labels)) <= {0, 1, 2, 3}
    m = cardiac_metrics(a.labels, a.pixel_spacing_mm, a.slice_spacing_mm)
    assert (m.ed_phase, m.es_phase) == (a.ed_phase, a.es_phase)
    assert m.lvedv_ml == pytest.approx(a.lvedv_ml) and m.lvesv_ml == pytest.approx(a.lvesv_ml)
    assert m.lv_mass_g == pytest.approx(a.lv_mass_g) and m.rvedv_ml == pytest.approx(a.rvedv_ml)
    ed = a.ed_phase
    blood = a.images[ed][a.labels[ed] == 1].mean()
    assert blood > 1.5 * a.images[ed][a.labels[ed] == 2].mean()


def test_independent_phantom_varies_what_the_issue_lists() -> None:
    studies = [make_independent_cine(np.random.default_rng(s), n_phases=2) for s in range(6)]
    shapes = [st.images.shape[1:] for st in studies]
    assert len({s[0] for s in shapes}) >= 3 and len({s[1] for s in shapes}) >= 5
    assert any(s[1] != s[2] for s in shapes)
    assert np.ptp([st.pixel_spacing_mm[0] for st in studies]) > 0.4
    assert np.ptp([st.slice_spacing_mm for st in studies]) > 1.0
    # Apical coverage varies: some stacks end in myocardium-only or empty slices.
    apical = [not (st.labels[st.ed_phase, -1] == 1).any() for st in studies]
    assert any(apical) and not all(apical)
    # Oblique planes: the LV centre drifts across the stack.
    drift = []
    for st in studies:
        lv = st.labels[st.ed_phase] == 1
        rows = [np.argwhere(lv[k]).mean(0) for k in range(lv.shape[0]) if lv[k].sum() > 50]
        drift.append(float(np.linalg.norm(rows[-1] - rows[0])) * st.pixel_spacing_mm[0])
    assert max(drift) > 10.0 and min(drift) < max(drift) / 2
    # Magnitude noise: the air outside the body is never zero (non-central chi).
    assert all(float(st.images[0, 0, :4, :4].min()) > 0.0 for st in studies)


def test_volume_curve_shape() -> None:
    f = volume_curve(25, 0.4, 0.36)
    assert f[0] == pytest.approx(1.0)
    assert int(np.argmin(f)) == 9 and f.min() == pytest.approx(0.4, abs=0.01)
    assert np.all(f <= 1.0 + 1e-9) and np.all(f >= 0.4 - 1e-9)
