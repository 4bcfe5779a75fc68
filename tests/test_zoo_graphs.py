"""The test model zoo itself: every graph computes what its numpy reference says."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import zoo

CASES = {  # id: (builder, keyword arguments)
    "multilabel": ("multilabel_classifier", {}),
    "multilabel_grey_heatmap": ("multilabel_classifier", {
        "classes": 3, "biases": [3.476, -4.595, 0.0], "channels": 1, "size": (64, 48),
        "heatmap": True}),
    "multilabel_batch1": ("multilabel_classifier", {"batch": 1, "size": (32, 32)}),
    "softmax": ("softmax_classifier", {}),
    "logit": ("logit_classifier", {}),
    "logit_no_heatmap": ("logit_classifier", {"logit": 2.0, "heatmap": False}),
    "uint8": ("uint8_classifier", {}),
    "broken": ("broken_classifier", {}),
    "bad_softmax": ("bad_softmax", {}),
    "seg_logits": ("intensity_segmenter", {}),
    "seg_probs": ("intensity_segmenter", {"output": "probabilities"}),
    "seg_labelmap": ("intensity_segmenter", {"output": "labelmap"}),
    "seg_patch": ("intensity_segmenter", {"output": "labelmap", "size": (256, 224), "batch": 1}),
    "residual": ("residual_denoiser", {}),
    "slab": ("slab_denoiser", {}),
    "slab3": ("slab_denoiser", {"k": 3}),
    "nhwc": ("nhwc_denoiser", {}),
    "fp16": ("fp16_identity", {}),
    "batch1": ("batch1_denoiser", {}),
}

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64"}


def _session(model: zoo.ZooModel) -> ort.InferenceSession:
    return ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])


def _declared(args) -> list[tuple]:
    return [(a.name, tuple(d if isinstance(d, int) else None for d in a.shape),
             _ORT_TYPES[a.type]) for a in args]


def test_every_builder_has_a_case():
    assert {builder for builder, _ in CASES.values()} == set(zoo.BUILDERS)


@pytest.mark.parametrize("case", CASES)
def test_graph_matches_reference(case):
    builder, kwargs = CASES[case]
    model = zoo.BUILDERS[builder](**kwargs)
    assert len(model.onnx_bytes) < 4096
    session = _session(model)
    assert _declared(session.get_inputs()) == [(s.name, s.shape, s.dtype) for s in model.inputs]
    assert _declared(session.get_outputs()) == [(s.name, s.shape, s.dtype)
                                                for s in model.outputs]
    for seed in (0, 1):
        feeds = zoo.sample_inputs(model, seed=seed)
        got = dict(zip([o.name for o in model.outputs], session.run(None, feeds), strict=False))
        want = model.reference(feeds)
        assert got.keys() == want.keys()
        for spec in model.outputs:
            actual, expected = got[spec.name], want[spec.name]
            assert actual.dtype == np.dtype(spec.dtype) == expected.dtype, spec.name
            assert actual.shape == expected.shape == spec.concrete(
                {"N": len(next(iter(feeds.values()))), "H": 32, "W": 24}), spec.name
            loose = spec.dtype == "float16"
            np.testing.assert_allclose(actual, expected, rtol=1e-3 if loose else 1e-5,
                                       atol=1e-3 if loose else 1e-6, err_msg=spec.name)


def _run(model: zoo.ZooModel, **feeds) -> dict[str, np.ndarray]:
    outputs = _session(model).run(None, feeds)
    return dict(zip([o.name for o in model.outputs], outputs, strict=False))


def test_known_answers():
    grey = np.full((2, 1, 256, 256), 0.5, np.float32)
    assert _run(zoo.softmax_classifier(), input=grey)["scores"][:, 0] == pytest.approx(0.9)
    assert _run(zoo.logit_classifier(), input=grey)["logit"].tolist() == [[-1.0], [-1.0]]
    probs = _run(zoo.multilabel_classifier(size=(16, 16)),
                 input=np.zeros((1, 3, 16, 16), np.float32))["probs"]
    assert probs.shape == (1, 14) and probs == pytest.approx(1 / (1 + np.exp(4.0)), rel=1e-5)
    pixels = np.full((1, 1, 256, 256), 51, np.uint8)
    assert _run(zoo.uint8_classifier(), input=pixels)["prob"] == pytest.approx(0.2)


def test_segmenter_picks_nearest_level_and_patches_agree():
    x = np.array([[[[0.0, 0.14, 0.16, 0.44, 0.46, 0.8, 1.0]]]], np.float32)
    labels = _run(zoo.intensity_segmenter(output="labelmap"), input=x)["labels"]
    assert labels.tolist() == [[[0, 0, 1, 1, 2, 3, 3]]]
    # per-pixel: any crop of the image gives the matching crop of the answer
    image = zoo.sample_inputs(zoo.intensity_segmenter(), H=40, W=30)["input"]
    whole = _run(zoo.intensity_segmenter(), input=image)["logits"]
    patch = _run(zoo.intensity_segmenter(), input=image[:, :, 5:21, 7:23])["logits"]
    np.testing.assert_array_equal(patch, whole[:, :, 5:21, 7:23])


def test_residual_edges_use_in_image_neighbours_only():
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    clean = x - _run(zoo.residual_denoiser(), input=x)["noise"]
    assert clean[0, 0, 0, 0] == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert clean[0, 0, 1, 1] == pytest.approx(4.0)


def test_write(tmp_path):
    model = zoo.nhwc_denoiser()
    path = zoo.write(model, tmp_path / "models", "nhwc")
    assert path.name == "nhwc.onnx" and path.read_bytes() == model.onnx_bytes
