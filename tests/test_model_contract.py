"""The model contract, in process: zoo models with known answers, loaded by
their manifests alone, and manifests the node must refuse at load."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import zoo
from dicom_node.errors import ContractError, ManifestError, ModelLoadError
from dicom_node.infer.engine import ModelRegistry
from dicom_node.infer.manifest import load_manifest
from dicom_node.infer.runner import classifier_input, classify, denoise, segment
from dicom_node.pipelines.base import check_pair
from helpers import REPO
from zoo.manifests import ACDC_LABELS, CHEXNET_CLASSES, IMAGENET, install

LEVELS = (0.0, 0.3, 0.6, 0.9)


class Recording:
    """A loaded model that keeps what was fed to it, to check the feeding."""

    def __init__(self, model) -> None:
        self.model, self.manifest, self.provider = model, model.manifest, model.provider
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, inputs, outputs=None):
        out = self.model.run(inputs, outputs)
        self.calls.append({**inputs, **out})
        return out


def _load(folder: Path, name: str):
    return ModelRegistry(folder, batch_size=4).get(name)


def _labels_image(rows: int = 150, cols: int = 130) -> tuple[np.ndarray, np.ndarray]:
    """Raw intensities coding a known label map (x1000: the manifest's linear scale)."""
    truth = np.zeros((rows, cols), np.uint8)
    truth[20:70, 20:60], truth[80:120, 30:110], truth[40:60, 80:125] = 1, 2, 3
    return (np.asarray(LEVELS, np.float32)[truth] * 1000), truth


@pytest.mark.parametrize("output, geometry, size, batch", [
    ("logits", {"fit": "dynamic", "size_multiple": 16}, None, None),
    ("probabilities", {"fit": "dynamic"}, None, None),
    ("labelmap", {"fit": "dynamic"}, None, None),
    ("logits", {"fit": "sliding_window", "overlap": 0.5}, (64, 48), 1),
    ("labelmap", {"fit": "sliding_window", "overlap": 0.25, "blend": "constant"}, (64, 48), None),
])
def test_segmenter_labels_exact_for_every_output_kind_and_geometry(tmp_path, output, geometry, size, batch):
    install(zoo.intensity_segmenter(LEVELS, output=output, size=size, batch=batch), tmp_path, "seg",
            "segmentation", {"kind": "linear", "scale": 1000.0}, geometry=geometry,
            segmentation={"output_kind": output, "labels": ACDC_LABELS})
    model = Recording(_load(tmp_path, "seg"))
    image, truth = _labels_image()
    labels = segment(np.stack([image, image[::-1]]), (1.0, 1.0), model, batch=4)
    assert np.array_equal(labels[0], truth) and np.array_equal(labels[1], truth[::-1])
    if batch == 1:
        assert {call["input"].shape[0] for call in model.calls} == {1}
    if size:
        assert {call["input"].shape[2:] for call in model.calls} == {size}


def test_segmenter_resampled_to_model_spacing_and_back(tmp_path):
    install(zoo.intensity_segmenter(LEVELS), tmp_path, "seg", "segmentation",
            {"kind": "linear", "scale": 1000.0}, geometry={"pixel_spacing_mm": [2.0, 2.0]},
            segmentation={"labels": ACDC_LABELS})
    model = Recording(_load(tmp_path, "seg"))
    image, truth = _labels_image()
    labels = segment(image[None], (1.0, 1.0), model, batch=4)
    assert model.calls[0]["input"].shape[2:] == (75, 65), "fed at 2 mm, half the 1 mm grid"
    assert labels.shape == (1, *truth.shape)
    assert (labels[0] == truth).mean() > 0.97


def test_resample_coarser_leaves_fine_images_alone_and_brings_coarse_ones_up(tmp_path):
    install(zoo.intensity_segmenter(LEVELS), tmp_path, "seg", "segmentation",
            {"kind": "linear", "scale": 1000.0},
            geometry={"pixel_spacing_mm": [2.0, 2.0], "resample": "coarser"},
            segmentation={"labels": ACDC_LABELS})
    model = Recording(_load(tmp_path, "seg"))
    image, truth = _labels_image()
    fine = segment(image[None], (1.0, 1.0), model, batch=4)
    assert model.calls[-1]["input"].shape[2:] == truth.shape, "1 mm is finer than 2 mm: its own grid"
    coarse = segment(image[None], (4.0, 4.0), model, batch=4)
    assert model.calls[-1]["input"].shape[2:] == (300, 260), "4 mm brought up to 2 mm, twice the grid"
    assert fine.shape == coarse.shape == (1, *truth.shape)
    assert (fine[0] == truth).mean() > 0.97 and (coarse[0] == truth).mean() > 0.97


def test_label_map_with_an_undeclared_value_fails_the_call(tmp_path):
    labels = ACDC_LABELS[:2]  # the graph also emits 3
    install(zoo.intensity_segmenter(LEVELS, output="labelmap"), tmp_path, "seg", "segmentation",
            {"kind": "linear", "scale": 1000.0}, segmentation={"output_kind": "labelmap", "labels": labels})
    model = ModelRegistry(tmp_path).manifest("seg")
    assert model.segmentation is not None
    with pytest.raises(ModelLoadError, match=r"label map holds values \[3\]"):
        _load(tmp_path, "seg")


def test_chexnet_style_rgb_imagenet_multilabel(tmp_path):
    biases = [-4.0] * 14
    biases[CHEXNET_CLASSES.index("Effusion")] = math.log(0.97 / 0.03)
    biases[CHEXNET_CLASSES.index("Atelectasis")] = math.log(0.01 / 0.99)
    install(zoo.multilabel_classifier(biases=biases), tmp_path, "chexnet", "classification",
            [{"kind": "minmax"}, IMAGENET], geometry={"fit": "resize"},
            classification={"output": "probs", "classes": CHEXNET_CLASSES, "rule": "any_finding",
                            "threshold": 0.5, "findings": [{"name": c} for c in CHEXNET_CLASSES]})
    model = Recording(_load(tmp_path, "chexnet"))
    image = np.tile(np.linspace(0, 1, 224, dtype=np.float32), (224, 1))
    result = classify(image, model)
    assert result.abnormal and [f[0] for f in result.findings] == ["Effusion"]
    assert result.score == pytest.approx(0.97, abs=1e-4)
    assert result.probabilities["Atelectasis"] == pytest.approx(0.01, abs=1e-4)
    assert result.heatmap is None
    fed = model.calls[-1]
    assert fed["input"].shape == (1, 3, 224, 224), "grey replicated to three channels"
    expected = (image.mean() - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    probe = model.model.run({"input": fed["input"]}, ["channel_mean"])["channel_mean"]
    assert np.allclose(probe[0], expected, atol=1e-4), "ImageNet mean/std per channel"


def test_two_class_softmax_scores_the_named_class(tmp_path):
    install(zoo.softmax_classifier(p_first=0.9), tmp_path, "sm", "classification",
            {"kind": "percentile", "low": 1, "high": 99}, geometry={"fit": "letterbox"},
            classification={"classes": ["normal", "abnormal"], "positive_class": "abnormal",
                            "threshold": 0.5})
    result = classify(np.random.default_rng(1).random((300, 200), dtype=np.float32), _load(tmp_path, "sm"))
    assert not result.abnormal and result.score == pytest.approx(0.1, abs=1e-5)


def _install_logit_classifier(tmp_path, name):
    """A sigmoid-logit classifier (logit -1) with a heat map and its threshold given as a logit (-2)."""
    install(zoo.logit_classifier(logit=-1.0), tmp_path, name, "classification",
            {"kind": "percentile"}, geometry={"fit": "letterbox"},
            classification={"output": "logit", "activation": "sigmoid", "classes": ["abnormal"],
                            "positive_class": "abnormal", "threshold_logit": -2.0,
                            "heatmap_output": "heatmap"})


def test_raw_logit_with_threshold_given_as_logit(tmp_path):
    _install_logit_classifier(tmp_path, "logit")
    result = classify(np.random.default_rng(2).random((200, 260), dtype=np.float32), _load(tmp_path, "logit"))
    assert result.score == pytest.approx(1 / (1 + math.e), abs=1e-5)
    assert result.threshold == pytest.approx(1 / (1 + math.e ** 2), abs=1e-6)
    assert result.abnormal and result.heatmap is not None and result.heatmap.shape == (200, 260)


def test_a_classifier_input_made_ahead_classifies_as_the_image_itself(tmp_path):
    _install_logit_classifier(tmp_path, "ahead")
    model = Recording(_load(tmp_path, "ahead"))
    image = np.random.default_rng(3).random((200, 260), dtype=np.float32)
    direct = classify(image, model)
    made = classifier_input(image, model.manifest)
    ahead = classify(made, model)
    assert np.array_equal(model.calls[0]["input"], model.calls[1]["input"])
    assert ahead.probabilities == direct.probabilities and ahead.abnormal == direct.abnormal
    assert np.array_equal(ahead.heatmap, direct.heatmap) and made.fitted.source_size == (200, 260)


def test_uint8_input_is_rounded_into_0_255(tmp_path):
    install(zoo.uint8_classifier(), tmp_path, "u8", "classification",
            [{"kind": "minmax"}, {"kind": "mean_std", "mean": [0.0], "std": [1.0], "scale_to": 255.0}],
            geometry={"fit": "resize"},
            classification={"output": "prob", "classes": ["abnormal"], "positive_class": "abnormal",
                            "threshold": 0.5})
    model = Recording(_load(tmp_path, "u8"))
    image = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))
    result = classify(image, model)
    fed = model.calls[-1]["input"]
    assert fed.dtype == np.uint8 and fed.min() == 0 and fed.max() == 255
    assert result.score == pytest.approx(fed.mean() / 255, abs=1e-6)


@pytest.mark.parametrize("case", ["residual", "slab", "nhwc", "fp16", "batch1"])
def test_image_to_image_contracts(tmp_path, case):
    hu = np.random.default_rng(3).normal(40, 30, (7, 40, 36)).astype(np.float32)
    linear = {"kind": "linear", "scale": 1000.0}
    if case == "residual":
        install(zoo.residual_denoiser(), tmp_path, case, "image-to-image",
                {"kind": "linear", "offset": -1024.0, "scale": 4096.0},
                image_to_image={"kind": "residual"})
        expected = np.stack([zoo.box_mean_3x3(s) for s in hu])
    elif case == "slab":
        install(zoo.slab_denoiser(5), tmp_path, case, "image-to-image", linear, image_to_image={})
        idx = np.clip(np.arange(7)[:, None] + np.arange(-2, 3)[None], 0, 6)
        expected = hu[idx].mean(axis=1)
    elif case == "nhwc":
        # y = 0.5 x + 0.25 in model units; the manifest maps it back to HU.
        install(zoo.nhwc_denoiser(), tmp_path, case, "image-to-image", linear,
                image_to_image={"output_scale": 2000.0, "output_offset": -500.0})
        expected = hu
    elif case == "fp16":
        install(zoo.fp16_identity(), tmp_path, case, "image-to-image", linear, image_to_image={})
        expected = hu
    else:
        install(zoo.batch1_denoiser(), tmp_path, case, "image-to-image", linear, image_to_image={})
        expected = hu
    model = Recording(_load(tmp_path, case))
    out = denoise(hu, (0.7, 0.7), model, batch=4)
    assert np.allclose(out, expected, atol=0.1 if case == "fp16" else 1e-3)
    if case == "batch1":
        assert {call["input"].shape[0] for call in model.calls} == {1}


def test_denoiser_at_a_declared_spacing_keeps_what_it_did_not_change(tmp_path):
    install(zoo.batch1_denoiser(), tmp_path, "ident", "image-to-image", {"kind": "linear", "scale": 1000.0},
            geometry={"pixel_spacing_mm": [1.4, 1.4]}, image_to_image={})
    model = Recording(_load(tmp_path, "ident"))
    hu = np.random.default_rng(4).normal(0, 100, (2, 64, 64)).astype(np.float32)
    out = denoise(hu, (0.7, 0.7), model, batch=4)
    assert model.calls[0]["input"].shape[2:] == (32, 32)
    assert np.abs(out - hu).max() < 1e-3, "an identity model returns the original, not a blurred copy"


@pytest.mark.parametrize("builder, section, reason", [
    (zoo.broken_classifier, {"classes": ["abnormal"], "positive_class": "abnormal", "threshold": 0.5},
     r"ranges 1\.5\.\.1\.5, outside \[0, 1\]"),
    (zoo.bad_softmax, {"classes": ["normal", "abnormal"], "positive_class": "abnormal", "threshold": 0.5},
     r"sum to 1\.4"),
])
def test_contract_check_refuses_models_whose_outputs_break_the_manifest(tmp_path, builder, section, reason):
    install(builder(), tmp_path, "bad", "classification", {"kind": "percentile"},
            geometry={"fit": "letterbox"}, classification=section)
    verdict = ModelRegistry(tmp_path).check("bad")
    assert not verdict.ok and verdict.detail
    with pytest.raises(ModelLoadError, match=reason):
        ModelRegistry(tmp_path).get("bad")


def _manifest(tmp_path: Path, **changes) -> Path:
    path = install(zoo.intensity_segmenter(LEVELS), tmp_path, "seg", "segmentation",
                   {"kind": "zscore"}, segmentation={"labels": ACDC_LABELS})
    raw = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"input_size": [256, 256]}, r"input_size: Extra inputs are not permitted"),
    ({"size_multiple": 16}, r"size_multiple: Extra inputs are not permitted"),
    ({"geometry": {"fit": "resize"}}, r"geometry.fit: resize needs a fixed input size"),
    ({"inputs": [{"name": "input", "shape": [None, 1, 8, None, None], "layout": "NCDHW"}]},
     r"3D input is supported for image-to-image slabs"),
    ({"segmentation.labels": ACDC_LABELS[1:]}, r"output channels \[1\] of logits have no label"),
    ({"segmentation.labels": ACDC_LABELS + [dict(ACDC_LABELS[0], value=4)]},
     r"label value 4 needs 5 output channels"),
    ({"segmentation.output_kind": "heatmap"}, r"segmentation.output_kind"),
    ({"geometry": {"resample": "coarser"}}, r"geometry.resample: coarser needs geometry.pixel_spacing_mm"),
    ({"inputs": [{"name": "input", "shape": [None, 1, None, None], "layout": "NHWC"}]},
     r"the channel axis must have a fixed size"),
    ({"task": "classification"}, r"task 'classification' needs its section 'classification'"),
])
def test_manifests_the_node_cannot_honour_are_refused_naming_the_key(tmp_path, changes, message):
    path = _manifest(tmp_path, **changes)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("section, message", [
    ({"classes": ["normal", "abnormal"], "positive_class": "abnormal"}, r"needs threshold"),
    ({"classes": ["normal", "abnormal"], "positive_class": "Abnormal", "threshold": 0.5},
     r"'Abnormal' is not one of the classes"),
    ({"classes": ["a"], "positive_class": "a", "threshold": 0.5, "threshold_logit": 0.0},
     r"not both"),
    ({"classes": ["a", "b"], "rule": "any_finding", "threshold": 0.5, "findings": [{"name": "c"}]},
     r"'c' is not one of the classes"),
    ({"classes": ["a"], "positive_class": "a", "threshold": 0.5, "normal_class": "a"},
     r"normal_class has no meaning with rule 'positive_class'"),
    ({"classes": ["a", "b", "c"], "positive_class": "a", "threshold": 0.5},
     r"3 names for an output of 2 elements"),
])
def test_classification_rules_are_checked_at_load(tmp_path, section, message):
    path = install(zoo.softmax_classifier(), tmp_path, "sm", "classification", {"kind": "percentile"},
                   geometry={"fit": "letterbox"}, classification=section)
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_pipeline_and_model_pairing(tmp_path):
    install(zoo.intensity_segmenter(LEVELS), tmp_path, "seg", "segmentation", {"kind": "zscore"},
            segmentation={"labels": ACDC_LABELS}, plausible={"lvedv_ml": [5, 600], "psnr": [0, 1]})
    manifest = load_manifest(tmp_path / "seg.yaml")
    problems = check_pair("cardiac_seg", manifest)
    assert problems == ["seg.yaml plausible: psnr not reported by pipeline cardiac_seg (it reports "
                        "lv_mass_g, lvedv_ml, lvef_pct, lvesv_ml, rvedv_ml, rvef_pct, rvesv_ml)"]
    assert check_pair("ct_denoise", manifest)[0].startswith("model seg is a segmentation model")
    no_lv = install(zoo.intensity_segmenter(LEVELS[:3]), tmp_path, "nolv", "segmentation", {"kind": "zscore"},
                    segmentation={"labels": ACDC_LABELS[:2]})
    assert "no LV cavity" in check_pair("cardiac_seg", load_manifest(no_lv))[0]


def test_models_verify_reports_every_model_and_fails_if_any_did(tmp_path):
    models = tmp_path / "models"
    install(zoo.broken_classifier(), models, "a_broken", "classification", {"kind": "percentile"},
            geometry={"fit": "letterbox"},
            classification={"classes": ["abnormal"], "positive_class": "abnormal", "threshold": 0.5})
    install(zoo.fp16_identity(), models, "b_fp16", "image-to-image", {"kind": "linear", "scale": 1000.0},
            image_to_image={})
    (models / "c_bad.yaml").write_text("name: c_bad\nversion: 1\n")
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "data")},
                                      "inference": {"models_dir": str(models),
                                                    "providers": ["CPUExecutionProvider"]}}))
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "-c", str(config), "models", "verify"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = done.stdout.splitlines()
    assert done.returncode == 1
    assert lines[0].startswith("model a_broken: FAILED:") and "outside [0, 1]" in lines[0]
    assert lines[1].startswith("model b_fp16 0.0.1: OK on CPUExecutionProvider")
    assert lines[2].startswith("model c_bad: FAILED:") and "c_bad.yaml" in lines[2]
    assert "Traceback" not in done.stderr


def test_contract_errors_name_the_model(tmp_path):
    install(zoo.fp16_identity(), tmp_path, "fp", "image-to-image", {"kind": "linear", "scale": 1000.0},
            image_to_image={})
    model = _load(tmp_path, "fp")
    with pytest.raises(ContractError, match="model fp: onnxruntime refused the input"):
        model.run({"input": np.zeros((1, 1, 8, 8), np.float32)})


def test_cardiac_model_without_rv_reports_what_it_can_and_says_what_it_did_not(tmp_path):
    from pydicom.filewriter import dcmwrite

    from dicom_node.pipelines.base import PipelineInput, get_pipeline
    from dicom_node_synthetic import cardiac_phantom
    from dicom_node_synthetic.dicom_mr import cine_series
    from helpers import dciodvfy_errors, roundtrip
    from zoo.manifests import CATEGORY, LV, MYO

    # Phantom order 1 LV, 2 myo, 3 RV; this model knows LV (1) and myocardium (2), and sees
    # the RV as background.
    labels = [{"value": 1, "name": "LV cavity", "category": CATEGORY, "type": LV},
              {"value": 2, "name": "LV myocardium", "category": CATEGORY, "type": MYO}]
    install(zoo.intensity_segmenter((0.0, 0.9, 0.6)), tmp_path, "lvonly", "segmentation",
            {"kind": "linear", "scale": 4000 / 0.9}, segmentation={"labels": labels})
    model = _load(tmp_path, "lvonly")
    study = cardiac_phantom.make_cine(np.random.default_rng(21), n_slices=4, n_phases=5, size=96)
    coded = np.asarray([0.0, 0.9, 0.6, 0.0], np.float32)[study.labels] * 1000
    source = roundtrip(cine_series(coded, seed="lvonly", pixel_spacing_mm=study.pixel_spacing_mm,
                                   slice_spacing_mm=study.slice_spacing_mm))
    result = get_pipeline("cardiac_seg").run(PipelineInput(1, "r", source, {"batch_size": 8}), model)
    assert result.summary["not_measured"] == "RV cavity" and not result.held
    [sr] = [d for d in result.datasets if d.Modality == "SR"]
    text = str(sr)
    # TEXT items are UT, which pydicom's str() abbreviates: read their values.
    texts, stack = [], list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        texts += [str(item.TextValue)] if "TextValue" in item else []
        stack += list(item.get("ContentSequence", []))
    assert "Not measured: model does not segment RV cavity" in texts
    assert "Right Ventricular ED Volume" not in text and "Left Ventricular ED Volume" in text
    for ds in result.datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
