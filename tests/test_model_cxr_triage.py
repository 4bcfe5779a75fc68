"""Reference chest X-ray triage model and the synthetic radiograph phantoms.

The model checks run onnxruntime on CPU (no torch) on FRESH phantom sets,
drawn with seeds the recipe never used for training, validation or its
held-out tests, and compare with what the manifest claims: on the narrow
default phantom, on the domain-randomised training family, and on the
independently designed family (``dicom_node_synthetic.independent.cxr``),
where they also check the targets of issue 17 (sensitivity >= 99 % and
specificity >= 60 % at the operating point).  The tolerances are derived
from the size of those small sets (binomial / Hanley-McNeil), not guessed,
so a model that is really worse than its manifest or the target fails while
sampling noise does not.
"""

from __future__ import annotations

import ast
import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from dicom_node.config import load_config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.infer.manifest import ModelManifest, load_manifest
from dicom_node.infer.runner import classify
from dicom_node.pipelines.cxr_triage import presentation
from dicom_node_synthetic import independent
from dicom_node_synthetic.cxr_phantom import (
    FINDINGS,
    NORMAL_CTR_RANGE,
    SEVERITIES,
    VARIED_CARDIOMEGALY_CTR_RANGE,
    VARIED_NORMAL_CTR_RANGE,
    Radiograph,
    make_radiograph,
    make_varied_radiograph,
    measure_ctr,
)
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.independent import cxr as independent_cxr

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parents[1] / "models_onnx"
MANIFEST = MODELS / "cxr_triage.yaml"
# The recipe draws image i of a split from default_rng([20260517, split, i])
# with split 1..4; these seeds share no stream with any of them (nor did the
# recipe's development runs look at them).
FRESH_SEED = 4242
N_FRESH = 160
VARIED_SEED = 4343
N_VARIED = 120
INDEPENDENT_SEED = 4444
N_INDEPENDENT = 160
# Issue 17's targets on the independent family, at the operating point.
TARGET_SENSITIVITY = 0.99
TARGET_SPECIFICITY = 0.60
# Chance that a model as good as its manifest fails one of the statistical
# checks below on this set size.
ALPHA = 0.01


# --------------------------------------------------------------------------- helpers

def _letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Longer side to ``size`` keeping aspect, centred, pad = image minimum (README)."""
    rows, cols = image.shape
    f = size / max(rows, cols)
    new_r, new_c = max(1, round(rows * f)), max(1, round(cols * f))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, (new_c, new_r), interpolation=interp)
    out = np.full((size, size), float(image.min()), dtype=np.float32)
    top, left = (size - new_r) // 2, (size - new_c) // 2
    out[top:top + new_r, left:left + new_c] = small
    return out


def _percentile_norm(image: np.ndarray, low: float, high: float) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC, ties counted one half (O(n_pos * n_neg), fine for 160)."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def _auc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC."""
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a))
    return math.sqrt(max(var, 0.0) / (n_pos * n_neg))


def _max_failures(n: int, rate: float, alpha: float = ALPHA) -> int:
    """Smallest k with P(Binomial(n, 1 - rate) > k) < alpha: failures we tolerate."""
    p = min(max(1.0 - rate, 1e-6), 1.0)
    tail = 1.0
    for k in range(n + 1):
        tail -= math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if tail < alpha:
            return k
    return n


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return load_manifest(MANIFEST)


@pytest.fixture(scope="module")
def session(manifest: ModelManifest) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(MODELS / manifest.onnx), opts,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fresh(manifest: ModelManifest) -> dict[str, np.ndarray | list[Radiograph]]:
    """Fresh balanced set: half normal, half cycling findings x severities."""
    size = manifest.fixed_size[0]
    norm = manifest.normalization
    x = np.empty((N_FRESH, 1, size, size), dtype=np.float32)
    masks = np.zeros((N_FRESH, size, size), dtype=bool)
    labels = np.zeros(N_FRESH, dtype=bool)
    findings: list[str] = []
    for i in range(N_FRESH):
        rng = np.random.default_rng([FRESH_SEED, i])
        finding = None if i % 2 == 0 else FINDINGS[(i // 2) % len(FINDINGS)]
        severity = SEVERITIES[(i // 10) % 2] if finding else None
        # Long side at model size, random aspect: the letterbox only pads.
        short = int(rng.integers(int(0.8 * size), size + 1))
        shape = (size, short) if i % 4 < 2 else (short, size)
        rad = make_radiograph(rng, finding, shape, severity)
        x[i, 0] = _percentile_norm(_letterbox(rad.image, size), norm.low, norm.high)
        masks[i] = _letterbox(rad.mask.astype(np.float32), size) > 0.5
        labels[i] = rad.abnormal
        findings.append(rad.finding or "normal")
    return {"x": x, "masks": masks, "labels": labels, "findings": np.array(findings)}


@pytest.fixture(scope="module")
def outputs(session: ort.InferenceSession,
            fresh: dict) -> tuple[np.ndarray, np.ndarray]:
    prob, heat = session.run(["probability", "heatmap"], {"input": fresh["x"]})
    return prob, heat


# --------------------------------------------------------------------------- model

def test_manifest_is_a_classification_triage_model(manifest: ModelManifest) -> None:
    cls = manifest.classification
    assert manifest.task == "classification"
    assert cls is not None and cls.classes == ["abnormal"] and cls.rule == "positive_class"
    assert cls.positive_class == "abnormal" and cls.heatmap_output == "heatmap"
    assert cls.target_sensitivity == 0.99
    # The threshold was chosen on validation to meet the target there.
    assert manifest.quality["validation_sensitivity"] >= 0.99
    assert {o.name for o in manifest.outputs} == {"probability", "heatmap"}


def test_onnx_checksum_matches_manifest(manifest: ModelManifest) -> None:
    digest = hashlib.sha256((MODELS / manifest.onnx).read_bytes()).hexdigest()
    assert digest == manifest.sha256


def test_graph_signature_matches_manifest(manifest: ModelManifest,
                                          session: ort.InferenceSession) -> None:
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs) == [t.name for t in manifest.inputs]
    assert list(inputs["input"][1:]) == [1, *manifest.fixed_size]
    assert set(outputs) == {t.name for t in manifest.outputs}
    assert isinstance(inputs["input"][0], str)  # dynamic batch


def test_outputs_shape_range_and_batch_independence(
        manifest: ModelManifest, session: ort.InferenceSession, fresh: dict,
        outputs: tuple[np.ndarray, np.ndarray]) -> None:
    prob, heat = outputs
    n, size = N_FRESH, manifest.fixed_size
    assert prob.shape == (n, 1) and prob.dtype == np.float32
    assert heat.shape == (n, 1, *size) and heat.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    # A confidently abnormal image has its strongest evidence scaled to 1.
    confident = prob[:, 0] > 0.9
    assert confident.any()
    assert np.allclose(heat[confident].max(axis=(1, 2, 3)), 1.0, atol=1e-5)
    one_p, one_h = session.run(["probability", "heatmap"], {"input": fresh["x"][3:4]})
    assert np.allclose(one_p, prob[3:4], atol=1e-5)
    assert np.allclose(one_h, heat[3:4], atol=1e-4)


def test_auc_on_fresh_set_matches_manifest(manifest: ModelManifest, fresh: dict,
                                           outputs: tuple[np.ndarray, np.ndarray]) -> None:
    labels = fresh["labels"]
    claimed = float(manifest.quality["default_phantom"]["auc"])
    got = _auc(outputs[0][:, 0], labels)
    # 3.3 standard errors (one-sided ~0.0005) of an AUC on this set size.
    tol = 3.3 * _auc_se(claimed, int(labels.sum()), int((~labels).sum()))
    assert got >= claimed - tol, f"AUC {got:.3f} < {claimed:.3f} - {tol:.3f}"


def test_sensitivity_at_threshold_on_fresh_set(manifest: ModelManifest, fresh: dict,
                                               outputs: tuple[np.ndarray, np.ndarray]
                                               ) -> None:
    """Default phantom; sensitivity tolerance sized for 80 abnormal images.

    The expected sensitivity is the lower of the held-out value and the 0.99
    target (a held-out 1.0 on 500 images does not promise 1.0).  At 0.99 a
    model misses on average 0.8 of 80 images, and Binomial(80, 0.01) exceeds
    3 misses with probability < 0.01 (0.009): so up to 3 misses (sensitivity
    >= 96.25 %) pass, 4 or more fail.
    """
    labels = fresh["labels"]
    pred = outputs[0][:, 0] >= manifest.classification.probability_threshold
    n_abn = int(labels.sum())
    misses = int((~pred[labels]).sum())
    claims = manifest.quality["default_phantom"]
    expected = min(float(claims["sensitivity"]),
                   float(manifest.classification.target_sensitivity or 1.0))
    allowed = _max_failures(n_abn, expected)
    assert misses <= allowed, f"{misses}/{n_abn} abnormal missed, allowed {allowed}"
    # Specificity: the share of normals auto-triaged must not collapse either.
    n_nor = int((~labels).sum())
    false_pos = int(pred[~labels].sum())
    allowed_fp = _max_failures(n_nor, float(claims["specificity"]))
    assert false_pos <= allowed_fp, f"{false_pos}/{n_nor} normals flagged"


def test_heatmap_points_at_the_abnormality(manifest: ModelManifest, fresh: dict,
                                           outputs: tuple[np.ndarray, np.ndarray]) -> None:
    labels = fresh["labels"]
    heat = outputs[1][labels, 0]
    masks = fresh["masks"][labels]
    flat = heat.reshape(len(heat), -1).argmax(axis=1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(masks)), flat]
    claimed = float(manifest.quality["default_phantom"]["heatmap_hit_rate"])
    misses_allowed = _max_failures(len(hits), claimed)
    assert int((~hits).sum()) <= misses_allowed


# --------------------------------------------------------------------------- other families
#
# These two go through the node's own path: a DX instance (bit depth,
# MONOCHROME1/2, VOI window), the pipeline's ``presentation`` and the
# runner's ``classify`` (letterbox, normalisation, inference, threshold).

@pytest.fixture(scope="module")
def node_model():
    return ModelRegistry(load_config().models_dir).get("cxr_triage")


def _scores(datasets: list, model) -> np.ndarray:
    return np.array([classify(presentation(ds), model).score for ds in datasets])


@pytest.fixture(scope="module")
def varied(node_model) -> dict[str, np.ndarray]:
    """Fresh training-family set: (mostly) domain-randomised phantom written as DX."""
    datasets, labels = [], []
    for i in range(N_VARIED):
        rng = np.random.default_rng([VARIED_SEED, i])
        finding = None if i % 2 == 0 else FINDINGS[(i // 2) % len(FINDINGS)]
        severity = SEVERITIES[(i // 10) % 2] if finding else None
        rows = int(rng.integers(256, 481))
        # As in the recipe: a fifth of the family is the narrow default phantom.
        make = make_radiograph if rng.random() < 0.2 else make_varied_radiograph
        rad = make(rng, finding, (rows, int(rows * rng.uniform(0.8, 1.0))), severity)
        datasets.append(dx_image(rad.image, seed=f"varied-{i}", bits=int(rng.choice([12, 16])),
                                 monochrome1=bool(i % 3 == 0)))
        labels.append(rad.abnormal)
    return {"scores": _scores(datasets, node_model), "labels": np.array(labels)}


@pytest.fixture(scope="module")
def independent_set(node_model) -> dict[str, np.ndarray]:
    """Fresh independent-family set: half normal, half cycling its findings."""
    datasets, labels, findings = [], [], []
    for i in range(N_INDEPENDENT):
        finding = (None if i % 2 == 0
                   else independent_cxr.FINDINGS[(i // 2) % len(independent_cxr.FINDINGS)])
        rad = independent_cxr.make_independent_radiograph(
            np.random.default_rng([INDEPENDENT_SEED, i]), finding)
        datasets.append(rad.dataset(f"independent-{i}"))
        labels.append(rad.abnormal)
        findings.append(finding or "normal")
    return {"scores": _scores(datasets, node_model), "labels": np.array(labels),
            "findings": np.array(findings)}


def _operating_point(scores: np.ndarray, labels: np.ndarray,
                     threshold: float) -> tuple[int, int, int, int]:
    """(abnormal missed, abnormal, normals flagged, normal) at the threshold."""
    pred = scores >= threshold
    return (int((~pred[labels]).sum()), int(labels.sum()),
            int(pred[~labels].sum()), int((~labels).sum()))


def test_manifest_reports_both_families(manifest: ModelManifest) -> None:
    q = manifest.quality
    for key in ("auc", "sensitivity", "specificity"):
        assert 0.0 <= float(q[key]) <= 1.0
        assert 0.0 <= float(q["independent"][key]) <= 1.0
        assert 0.0 <= float(q["default_phantom"][key]) <= 1.0
    assert set(q["independent"]["per_finding_sensitivity"]) == set(independent_cxr.FINDINGS)
    assert q["independent"]["targets"] == {"sensitivity": TARGET_SENSITIVITY,
                                           "specificity": TARGET_SPECIFICITY}
    assert "make_varied_radiograph" in manifest.training["data"]


def test_training_family_fresh_set_matches_manifest(manifest: ModelManifest,
                                                    varied: dict) -> None:
    scores, labels = varied["scores"], varied["labels"]
    claimed = float(manifest.quality["auc"])
    got = _auc(scores, labels)
    tol = 3.3 * _auc_se(claimed, int(labels.sum()), int((~labels).sum()))
    assert got >= claimed - tol, f"AUC {got:.3f} < {claimed:.3f} - {tol:.3f}"
    missed, n_abn, flagged, n_nor = _operating_point(
        scores, labels, manifest.classification.probability_threshold)
    expected = min(float(manifest.quality["sensitivity"]), TARGET_SENSITIVITY)
    assert missed <= _max_failures(n_abn, expected), f"{missed}/{n_abn} abnormal missed"
    allowed = _max_failures(n_nor, float(manifest.quality["specificity"]))
    assert flagged <= allowed, f"{flagged}/{n_nor} normals flagged, allowed {allowed}"


def test_independent_family_matches_manifest(manifest: ModelManifest,
                                             independent_set: dict) -> None:
    """The manifest's own independent-family figures hold on a fresh set.

    Same binomial rule as above: with n images a model exactly as good as
    claimed exceeds the allowed misses (or false alarms) with probability
    < 0.01; AUC within 3.3 Hanley-McNeil standard errors.
    """
    scores, labels = independent_set["scores"], independent_set["labels"]
    missed, n_abn, flagged, n_nor = _operating_point(
        scores, labels, manifest.classification.probability_threshold)
    claims = manifest.quality["independent"]
    allowed = _max_failures(n_abn, min(TARGET_SENSITIVITY, float(claims["sensitivity"])))
    assert missed <= allowed, (
        f"independent family: {missed}/{n_abn} abnormal missed, allowed {allowed}; "
        "by finding: " + str({f: int((scores[independent_set["findings"] == f]
                                      < manifest.classification.probability_threshold).sum())
                              for f in independent_cxr.FINDINGS}))
    allowed = _max_failures(n_nor, float(claims["specificity"]))
    assert flagged <= allowed, f"independent family: {flagged}/{n_nor} normals flagged"
    claimed_auc = float(claims["auc"])
    tol = 3.3 * _auc_se(claimed_auc, n_abn, n_nor)
    assert _auc(scores, labels) >= claimed_auc - tol


@pytest.mark.xfail(strict=True, reason=(
    "issue 17 target NOT met by the shipped model 1.2.0 (sha256 7270886e...): on the "
    "independent family it triages 20 % of normals as normal at its threshold (specificity "
    "0.20, sensitivity 0.987 on the recipe's 600, AUC 0.94; 1.1.0: 0.0 / 1.0 / 0.75). Strict: "
    "a model that meets the target makes this XPASS and fail, so the marker must then be removed."))
def test_independent_family_meets_issue_targets(manifest: ModelManifest,
                                                independent_set: dict) -> None:
    """Issue 17: sensitivity >= 99 % and specificity >= 60 % at the threshold.

    On 80 abnormal images a model at exactly 99 % misses more than 3 with
    probability < 0.01, so 4 misses fail; on 80 normals one at exactly 60 %
    flags more than 42 with probability < 0.01.
    """
    scores, labels = independent_set["scores"], independent_set["labels"]
    missed, n_abn, flagged, n_nor = _operating_point(
        scores, labels, manifest.classification.probability_threshold)
    assert missed <= _max_failures(n_abn, TARGET_SENSITIVITY), (
        f"independent family: {missed}/{n_abn} abnormal missed")
    allowed = _max_failures(n_nor, TARGET_SPECIFICITY)
    assert flagged <= allowed, (f"independent family: {flagged}/{n_nor} normals flagged, "
                                f"allowed {allowed} at specificity {TARGET_SPECIFICITY}")


# --------------------------------------------------------------------------- phantom

def test_phantom_is_deterministic() -> None:
    a = make_radiograph(np.random.default_rng(7), "nodule", (200, 180))
    b = make_radiograph(np.random.default_rng(7), "nodule", (200, 180))
    c = make_radiograph(np.random.default_rng(8), "nodule", (200, 180))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("finding", [None, *FINDINGS])
def test_phantom_image_and_masks(finding: str | None) -> None:
    rad = make_radiograph(np.random.default_rng(11), finding, (300, 240), "subtle")
    assert rad.image.shape == (300, 240) and rad.image.dtype == np.float32
    assert 0.0 <= rad.image.min() and rad.image.max() <= 1.0
    assert rad.image.std() > 0.1  # a radiograph, not a flat field
    assert rad.mask.shape == rad.image.shape and rad.mask.dtype == bool
    if finding is None:
        assert not rad.mask.any() and rad.severity is None
        return
    assert rad.mask.any()
    if finding != "cardiomegaly":
        # Lung findings lie in the lungs (the pleural air of a pneumothorax too).
        assert (rad.mask & rad.lungs).sum() >= 0.9 * rad.mask.sum()
        assert rad.side in ("right", "left")


def test_phantom_large_non_square() -> None:
    rad = make_radiograph(np.random.default_rng(3), "effusion", (2000, 1800))
    assert rad.image.shape == (2000, 1800) and rad.mask.shape == (2000, 1800)


def test_cardiomegaly_ctr_above_half_normal_below() -> None:
    """The cardiothoracic ratio, drawn and measured on the rendered masks."""
    for i in range(12):
        normal = make_radiograph(np.random.default_rng([5, i]), None, (256, 256))
        enlarged = make_radiograph(np.random.default_rng([6, i]), "cardiomegaly",
                                   (256, 256), SEVERITIES[i % 2])
        assert NORMAL_CTR_RANGE[0] <= normal.ctr <= NORMAL_CTR_RANGE[1] < 0.5
        assert enlarged.ctr > 0.5
        assert measure_ctr(normal.lungs, normal.heart) < 0.5
        assert measure_ctr(enlarged.lungs, enlarged.heart) > 0.5
        assert abs(measure_ctr(enlarged.lungs, enlarged.heart) - enlarged.ctr) < 0.03


def test_varied_phantom_is_deterministic_and_labelled() -> None:
    for i, finding in enumerate([None, *FINDINGS]):
        a = make_varied_radiograph(np.random.default_rng([21, i]), finding, (280, 240))
        b = make_varied_radiograph(np.random.default_rng([21, i]), finding, (280, 240))
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert a.image.shape == (280, 240) and 0.0 <= a.image.min() <= a.image.max() <= 1.0
        assert a.mask.any() == (finding is not None)
        if finding == "cardiomegaly":
            assert VARIED_CARDIOMEGALY_CTR_RANGE["subtle"][0] <= a.ctr
        elif finding is None:
            assert VARIED_NORMAL_CTR_RANGE[0] <= a.ctr <= VARIED_NORMAL_CTR_RANGE[1] < 0.5


def test_varied_phantom_rounded_is_opt_in_and_labelled() -> None:
    """``rounded`` defaults off (earlier seeds keep their images) and keeps the truth."""
    for i, finding in enumerate([None, *FINDINGS]):
        plain = make_varied_radiograph(np.random.default_rng([22, i]), finding, (260, 230))
        off = make_varied_radiograph(np.random.default_rng([22, i]), finding, (260, 230),
                                     rounded=False)
        assert np.array_equal(plain.image, off.image) and np.array_equal(plain.mask, off.mask)
        a = make_varied_radiograph(np.random.default_rng([22, i]), finding, (260, 230),
                                   rounded=True)
        b = make_varied_radiograph(np.random.default_rng([22, i]), finding, (260, 230),
                                   rounded=True)
        assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, plain.image)
        assert 0.0 <= a.image.min() <= a.image.max() <= 1.0
        assert a.mask.any() == (finding is not None)
        if finding is None:
            assert VARIED_NORMAL_CTR_RANGE[0] <= a.ctr <= VARIED_NORMAL_CTR_RANGE[1]
        elif finding == "cardiomegaly":
            assert VARIED_CARDIOMEGALY_CTR_RANGE["subtle"][0] <= a.ctr


def test_varied_phantom_shaped_is_opt_in_and_keeps_the_drawn_ratio() -> None:
    """``shaped`` defaults off, changes the heart, and keeps the drawn CTR and
    the labels: the tilted, irregular heart spans as wide as drawn, measured
    as the clinical CTR is (largest extents right and left of the heart's
    axis, whatever the row) on the rendered heart mask."""
    for i, finding in enumerate([None, None, "cardiomegaly", "cardiomegaly", *FINDINGS]):
        severity = "subtle" if finding == "cardiomegaly" else None
        plain = make_varied_radiograph(np.random.default_rng([23, i]), finding, (260, 230),
                                       severity)
        off = make_varied_radiograph(np.random.default_rng([23, i]), finding, (260, 230),
                                     severity, shaped=False)
        assert np.array_equal(plain.image, off.image)
        a = make_varied_radiograph(np.random.default_rng([23, i]), finding, (260, 230),
                                   severity, shaped=True)
        b = make_varied_radiograph(np.random.default_rng([23, i]), finding, (260, 230),
                                   severity, shaped=True)
        assert np.array_equal(a.image, b.image) and not np.array_equal(a.heart, plain.heart)
        assert a.mask.any() == (finding is not None)
        cols = np.where(a.heart.any(axis=0))[0]
        thorax = int(_row_spans_max(a.lungs))
        if finding is None:
            assert VARIED_NORMAL_CTR_RANGE[0] <= a.ctr <= VARIED_NORMAL_CTR_RANGE[1]
            assert (cols[-1] - cols[0] + 1) / thorax < 0.5
        elif finding == "cardiomegaly":
            assert VARIED_CARDIOMEGALY_CTR_RANGE["subtle"][0] <= a.ctr
            assert (cols[-1] - cols[0] + 1) / thorax > 0.5


def _row_spans_max(mask: np.ndarray) -> int:
    rows = [np.where(r)[0] for r in mask if r.any()]
    return max(int(r[-1] - r[0] + 1) for r in rows)


def _lung_rim_minus_core(rad: Radiograph) -> float:
    """Brightness of a lung's 4 px rim minus its core (eroded 14 px), in image sd."""
    def disc(r: int) -> np.ndarray:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))

    lungs = rad.lungs.astype(np.uint8)
    rim = rad.lungs & ~(cv2.erode(lungs, disc(4)) > 0)
    core = cv2.erode(lungs, disc(14)) > 0
    return float((rad.image[rim].mean() - rad.image[core].mean()) / rad.image.std())


def test_rounded_lungs_fade_towards_their_borders() -> None:
    """With ``rounded`` the air path thins towards the lung border, so every
    rounded lung's rim is denser relative to its core than any slab lung's of
    the same seeds (measured: rounded 0.57-1.50 sd, slabs -0.18-0.44 sd)."""
    def rims(rounded: bool) -> list[float]:
        return [_lung_rim_minus_core(make_varied_radiograph(
            np.random.default_rng([31, i]), None, (256, 256), rounded=rounded))
            for i in range(8)]

    assert min(rims(True)) > max(rims(False))


# --------------------------------------------------------------------------- independent phantom

def test_independent_phantom_imports_nothing_from_the_training_generator() -> None:
    tree = ast.parse(Path(independent_cxr.__file__).read_text(encoding="utf-8"))
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert not any("cxr_phantom" in m for m in imported), imported
    assert independent.__doc__ and "held-out evaluation" in independent.__doc__


def test_independent_phantom_is_deterministic() -> None:
    a = independent_cxr.make_independent_radiograph(np.random.default_rng(7), "mass")
    b = independent_cxr.make_independent_radiograph(np.random.default_rng(7), "mass")
    c = independent_cxr.make_independent_radiograph(np.random.default_rng(8), "mass")
    assert np.array_equal(a.stored, b.stored) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


@pytest.mark.parametrize("finding", [None, *independent_cxr.FINDINGS])
def test_independent_phantom_truth(finding: str | None) -> None:
    rad = independent_cxr.make_independent_radiograph(np.random.default_rng([31, 1]), finding)
    assert rad.stored.dtype == np.uint16 and rad.stored.max() < (1 << rad.bits_stored)
    assert rad.mask.shape == rad.stored.shape == rad.lungs.shape == rad.heart.shape
    assert rad.mask.any() == (finding is not None) and rad.abnormal == (finding is not None)
    ctr = independent_cxr.measure_ctr(rad.lungs, rad.heart)
    assert ctr == pytest.approx(rad.ctr)
    if finding == "cardiomegaly":
        assert ctr > 0.52 and np.array_equal(rad.mask, rad.heart & rad.mask)
    else:
        assert ctr < 0.48
    if finding in ("effusion", "mass", "consolidation", "pneumothorax"):
        # Lung findings lie in the lungs as drawn before the finding.
        assert (rad.mask & rad.lungs).sum() >= 0.9 * rad.mask.sum()
        assert rad.size_mm > 0


def test_independent_phantom_presents_dense_as_bright_in_both_photometrics() -> None:
    seen = set()
    for i in range(8):
        rad = independent_cxr.make_independent_radiograph(np.random.default_rng([41, i]), None)
        image = presentation(rad.dataset(str(i)))
        seen.add(rad.photometric)
        # After the node's presentation the heart is brighter than the lungs.
        lungs_only = rad.lungs & ~rad.heart
        assert image[rad.heart].mean() > image[lungs_only].mean() + 0.1, rad.photometric
    assert seen == {"MONOCHROME1", "MONOCHROME2"}
