"""Reference chest X-ray triage model and the synthetic radiograph phantom.

The model checks run onnxruntime on CPU (no torch) on a FRESH phantom set,
drawn with a seed the recipe never used for training, validation or its
held-out test, and compare with what the manifest claims.  The tolerances are
derived from the size of that small set (binomial / Hanley-McNeil), not
guessed, so a model that is really worse than its manifest fails while
sampling noise does not.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from dicom_node.infer.manifest import ModelManifest, load_manifest
from dicom_node_synthetic.cxr_phantom import (
    FINDINGS,
    NORMAL_CTR_RANGE,
    SEVERITIES,
    Radiograph,
    make_radiograph,
    measure_ctr,
)

ort = pytest.importorskip("onnxruntime")

MODELS = Path(__file__).resolve().parents[1] / "models_onnx"
MANIFEST = MODELS / "cxr_triage.yaml"
# The recipe draws image i of a split from default_rng([20260517, split, i])
# with split 1..3; this seed shares no stream with any of them.
FRESH_SEED = 4242
N_FRESH = 160
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
    claimed = float(manifest.quality["auc"])
    got = _auc(outputs[0][:, 0], labels)
    # 3.3 standard errors (one-sided ~0.0005) of an AUC on this set size.
    tol = 3.3 * _auc_se(claimed, int(labels.sum()), int((~labels).sum()))
    assert got >= claimed - tol, f"AUC {got:.3f} < {claimed:.3f} - {tol:.3f}"


def test_sensitivity_at_threshold_on_fresh_set(manifest: ModelManifest, fresh: dict,
                                               outputs: tuple[np.ndarray, np.ndarray]
                                               ) -> None:
    """Sensitivity tolerance sized for 80 abnormal images.

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
    expected = min(float(manifest.quality["sensitivity"]),
                   float(manifest.classification.target_sensitivity or 1.0))
    allowed = _max_failures(n_abn, expected)
    assert misses <= allowed, f"{misses}/{n_abn} abnormal missed, allowed {allowed}"
    # Specificity: the share of normals auto-triaged must not collapse either.
    n_nor = int((~labels).sum())
    false_pos = int(pred[~labels].sum())
    allowed_fp = _max_failures(n_nor, float(manifest.quality["specificity"]))
    assert false_pos <= allowed_fp, f"{false_pos}/{n_nor} normals flagged"


def test_heatmap_points_at_the_abnormality(manifest: ModelManifest, fresh: dict,
                                           outputs: tuple[np.ndarray, np.ndarray]) -> None:
    labels = fresh["labels"]
    heat = outputs[1][labels, 0]
    masks = fresh["masks"][labels]
    flat = heat.reshape(len(heat), -1).argmax(axis=1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(masks)), flat]
    claimed = float(manifest.quality["heatmap_hit_rate"])
    misses_allowed = _max_failures(len(hits), claimed)
    assert int((~hits).sum()) <= misses_allowed


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
