"""Third-party model interfaces end to end through a running node: a site's
own models dropped in by manifest alone (the zoo's graphs with known answers),
sent studies by storescu, results checked as a PACS would get them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

import zoo
from dicom_node.pipelines.cardiac_metrics import cardiac_metrics
from dicom_node_synthetic import cardiac_phantom, cxr_phantom
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.dicom_mr import cine_series
from helpers import dciodvfy_errors, storescu, wait_for, write_ct_series, write_datasets
from zoo.manifests import ACDC_LABELS, CHEXNET_CLASSES, IMAGENET, install

SC = "1.2.840.10008.5.1.4.1.1.7"
LEVELS = (0.0, 0.3, 0.6, 0.9)
# cine_series stores images scaled so that the brightest (0.9 * 1000) is 4000.
MR_SCALE = 4000 / 0.9
LINEAR_HU = {"kind": "linear", "scale": 1000.0}
ACDC = {"labels": ACDC_LABELS}
CT_CASES = {
    "residual": (zoo.residual_denoiser, {"kind": "linear", "offset": -1024.0, "scale": 4096.0},
                 {"kind": "residual"}),
    "residual_read_as_clean": (zoo.residual_denoiser, {"kind": "linear", "offset": -1024.0, "scale": 4096.0},
                               {"kind": "clean"}),
    "slab": (lambda: zoo.slab_denoiser(5), LINEAR_HU, {}),
    "nhwc": (zoo.nhwc_denoiser, LINEAR_HU, {"output_scale": 2000.0, "output_offset": -500.0}),
    "fp16": (zoo.fp16_identity, LINEAR_HU, {}),
    "batch1": (zoo.batch1_denoiser, LINEAR_HU, {}),
}
MR_CASES = {
    "acdc_logits": (zoo.intensity_segmenter(LEVELS), {}, ACDC),
    "acdc_labelmap": (zoo.intensity_segmenter(LEVELS, output="labelmap"), {},
                      {**ACDC, "output_kind": "labelmap"}),
    "acdc_patch": (zoo.intensity_segmenter(LEVELS, size=(96, 80), batch=1),
                   {"fit": "sliding_window", "overlap": 0.5}, ACDC),
    # Channel 3 (declared LV cavity) is the background's level: LVEDV is the whole field of view.
    "implausible": (zoo.intensity_segmenter((0.3, 0.6, 0.9, 0.0)), {}, ACDC),
}
_effusion = [-4.0] * 14
_effusion[CHEXNET_CLASSES.index("Effusion")] = math.log(0.97 / 0.03)
_effusion[CHEXNET_CLASSES.index("Atelectasis")] = math.log(0.01 / 0.99)
CXR_CASES = {
    "chexnet": (zoo.multilabel_classifier(biases=_effusion), [{"kind": "minmax"}, IMAGENET], "resize",
                {"output": "probs", "classes": CHEXNET_CLASSES, "rule": "any_finding", "threshold": 0.5,
                 "findings": [{"name": c} for c in CHEXNET_CLASSES]}),
    "softmax": (zoo.softmax_classifier(0.9), {"kind": "percentile"}, "letterbox",
                {"classes": ["normal", "abnormal"], "positive_class": "abnormal", "threshold": 0.5}),
    "logit": (zoo.logit_classifier(-1.0), {"kind": "percentile"}, "letterbox",
              {"output": "logit", "activation": "sigmoid", "classes": ["abnormal"],
               "positive_class": "abnormal", "threshold_logit": -2.0, "heatmap_output": "heatmap"}),
}


def _route(name: str, pipeline: str) -> dict:
    return {"name": name, "pipeline": pipeline, "model": f"zoo_{name}", "destinations": ["out"],
            "quiet_seconds": 1, "match": [{"keyword": "SeriesDescription", "equals": name}]}


def _install_zoo(models: Path) -> list[dict]:
    routes = []
    for name, (build, norm, section) in CT_CASES.items():
        install(build(), models, f"zoo_{name}", "image-to-image", norm, image_to_image=section)
        routes.append(_route(name, "ct_denoise"))
    for name, (model, geometry, section) in MR_CASES.items():
        install(model, models, f"zoo_{name}", "segmentation", {"kind": "linear", "scale": MR_SCALE},
                geometry=geometry, segmentation=section)
        routes.append(_route(name, "cardiac_seg"))
    for name, (model, norm, fit, section) in CXR_CASES.items():
        install(model, models, f"zoo_{name}", "classification", norm, geometry={"fit": fit},
                classification=section)
        routes.append(_route(name, "cxr_triage"))
    return routes


def _cine(rng_seed: int) -> cardiac_phantom.CineStudy:
    study = cardiac_phantom.make_cine(np.random.default_rng(rng_seed), n_slices=5, n_phases=6, size=128)
    # Intensities that code the true labels (phantom order 1 LV, 2 myo, 3 RV),
    # at the level the ACDC-order graph maps to each structure.
    coded = np.asarray([0.0, 0.9, 0.6, 0.3], np.float32)[study.labels] * 1000
    return cardiac_phantom.CineStudy(**{**study.__dict__, "images": coded})


def _with_description(datasets: list[Dataset], name: str) -> list[Dataset]:
    for ds in datasets:
        ds.SeriesDescription = name
    return datasets


def _numbers(ds: Dataset) -> dict[tuple[str, str], float]:
    """(concept code, unit code) -> value for every NUM item of an SR, first wins."""
    out: dict[tuple[str, str], float] = {}

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                measured = item.MeasuredValueSequence[0]
                key = (item.ConceptNameCodeSequence[0].CodeValue,
                       measured.MeasurementUnitsCodeSequence[0].CodeValue)
                out.setdefault(key, float(measured.NumericValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


def _texts(ds: Dataset) -> list[str]:
    found: list[str] = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "CODE":
                found.append(item.ConceptCodeSequence[0].CodeMeaning)
            elif item.get("ValueType") == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def _results(node, job) -> list[Dataset]:
    return [dcmread(p) for p in sorted((node.data_dir / "outgoing" / f"job-{job.id}").glob("*.dcm"))]


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _by_z(datasets: list[Dataset]) -> list[Dataset]:
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def zoo_node(tmp_path_factory):
    from helpers import NodeProcess

    root = tmp_path_factory.mktemp("zoo")
    routes = _install_zoo(root / "models")
    node = NodeProcess(root / "node", routes=routes,
                       extra={"inference": {"providers": ["CPUExecutionProvider"],
                                            "models_dir": str(root / "models"), "batch_size": 4}})
    node.start()
    sources: dict[str, list[Path]] = {}
    for name in CT_CASES:
        sources[name] = write_ct_series(root / "in" / name, n=5, size=64, seed=f"zoo-{name}",
                                        series_description=name)
    for i, name in enumerate(MR_CASES):
        study = _cine(40 + i)
        sources[name] = write_datasets(root / "in" / name, _with_description(
            cine_series(study.images, seed=f"zoo-{name}", pixel_spacing_mm=study.pixel_spacing_mm,
                        slice_spacing_mm=study.slice_spacing_mm), name))
    for name in CXR_CASES:
        rad = cxr_phantom.make_radiograph(np.random.default_rng(9), None, size=(600, 500))
        sources[name] = write_datasets(root / "in" / name,
                                       _with_description([dx_image(rad.image, seed=f"zoo-{name}")], name))
    storescu(node.port, [p for paths in sources.values() for p in paths])
    n_routes = len(routes)
    wait_for(lambda: len([j for j in node.store().jobs() if j.state not in ("queued", "running")])
             == n_routes, 300, 0.5, f"{n_routes} zoo jobs finished")
    store = node.store()
    wait_for(lambda: not any(i.state == "pending" for j in store.jobs() for i in store.outbox_items(j.id)),
             60, 0.2, "every result sent or held")
    yield node, {j.route: j for j in node.store().jobs()}, sources
    node.stop()


def test_every_zoo_job_ended_as_its_contract_says(zoo_node):
    node, jobs, _ = zoo_node
    states = {name: job.state for name, job in jobs.items()}
    held = {"residual_read_as_clean", "implausible"}
    assert states == {name: ("held" if name in held else "done") for name in states}, \
        {name: (job.state, job.reason) for name, job in jobs.items()}
    for job in jobs.values():
        items = node.store().outbox_items(job.id)
        assert items and {i.state for i in items} == ({"held"} if job.state == "held" else {"sent"})
    for path in (node.data_dir / "outgoing").glob("job-*/*.dcm"):
        assert dciodvfy_errors(path) == [], path


def test_held_jobs_say_why_and_reach_no_destination(zoo_node):
    node, jobs, _ = zoo_node
    assert "roi_mean_shift_hu" in jobs["residual_read_as_clean"].reason
    assert "lvedv_ml" in jobs["implausible"].reason and "outside plausible 10-500" in jobs["implausible"].reason
    sent = {p.name for p in (node.data_dir / "out").glob("*.dcm")}
    for name in ("residual_read_as_clean", "implausible"):
        assert not sent & {p.name for p in (node.data_dir / "outgoing" / f"job-{jobs[name].id}").glob("*")}
    assert "dicom_node_jobs_held_total" in node.metrics()
    log = node.log()
    assert f"job {jobs['implausible'].id}" in log and "held" in log


@pytest.mark.parametrize("name", ["residual", "slab", "nhwc", "fp16", "batch1"])
def test_denoiser_contracts_give_the_known_answer(zoo_node, name):
    node, jobs, sources = zoo_node
    source = [_hu(d) for d in _by_z([dcmread(p) for p in sources[name]])]
    derived = [_hu(d) for d in _by_z([d for d in _results(node, jobs[name]) if d.Modality == "CT"])]
    assert len(derived) == len(source) == 5
    if name == "residual":
        expected = [zoo.box_mean_3x3(np.clip(s, -1024, 3072)) for s in source]
    elif name == "slab":
        stack = np.stack(source)
        idx = np.clip(np.arange(5)[:, None] + np.arange(-2, 3)[None], 0, 4)
        expected = list(stack[idx].mean(axis=1))
    else:
        expected = source
    tolerance = 3.0 if name == "fp16" else 1.0  # stored integers; float16 has 11 bits
    for got, want in zip(derived, expected, strict=False):
        assert np.abs(got - want).max() <= tolerance


@pytest.mark.parametrize("name", ["acdc_logits", "acdc_labelmap", "acdc_patch"])
def test_acdc_label_order_reports_the_left_ventricle_as_the_left_ventricle(zoo_node, name):
    node, jobs, _ = zoo_node
    study = _cine(40 + list(MR_CASES).index(name))
    truth = cardiac_metrics(study.labels, study.pixel_spacing_mm, study.slice_spacing_mm)
    [sr] = [d for d in _results(node, jobs[name]) if d.Modality == "SR"]
    values = _numbers(sr)
    assert values[("8821-1", "ml")] == pytest.approx(truth.lvedv_ml, rel=0.01)  # LVEDV
    assert values[("8823-7", "ml")] == pytest.approx(truth.lvesv_ml, rel=0.01)  # LVESV
    assert values[("8822-9", "ml")] == pytest.approx(truth.rvedv_ml, rel=0.01)  # RVEDV
    assert values[("8811-2", "%")] == pytest.approx(truth.lvef_pct, abs=0.5)  # LVEF
    assert values[("18087-7", "g")] == pytest.approx(truth.lv_mass_g, rel=0.01)  # LV mass
    segs = [d for d in _results(node, jobs[name]) if d.Modality == "SEG"]
    assert len(segs) == 2
    labels = {int(s.SegmentNumber): s.SegmentedPropertyTypeCodeSequence[0].CodeValue
              for s in segs[0].SegmentSequence}
    assert labels == {1: "53085002", 2: "49848007", 3: "87878005"}


@pytest.mark.parametrize("name, abnormal, probability, heat", [
    ("chexnet", True, 0.97, False), ("softmax", False, 0.1, False), ("logit", True, 1 / (1 + math.e), True),
])
def test_classifier_contracts_give_the_known_decision(zoo_node, name, abnormal, probability, heat):
    node, jobs, _ = zoo_node
    results = _results(node, jobs[name])
    [sr] = [d for d in results if d.Modality == "SR"]
    assert _numbers(sr)[("122157", "1")] == pytest.approx(probability, abs=1e-4)
    texts = _texts(sr)
    assert ("Abnormal - needs review" in texts) == abnormal
    if name == "chexnet":
        assert any(t.startswith("Effusion: p 0.970") for t in texts)
        assert not any(t.startswith("Atelectasis") for t in texts)
    [sc] = [d for d in results if d.SOPClassUID == SC]
    rgb = sc.pixel_array.astype(int)
    # The banner is red for abnormal, green for normal.
    assert (rgb[5, 5, 0] > rgb[5, 5, 1]) == abnormal
    # Below the banner: the grey radiograph, coloured only where a heat map was drawn.
    image = rgb[60:]
    coloured = np.abs(image[..., 0] - image[..., 2]).max() > 10
    assert coloured == heat
