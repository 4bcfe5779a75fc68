"""The node's SRs read by dcmqi's tid1500reader, the TID 1500 reader behind
3D Slicer's SR import: nothing the node says in a measurement group (the
triage finding, the disclaimer, the ROI descriptions) may be lost on the way.

tid1500reader keeps the first item of each concept it knows (Finding, Finding
Site, Tracking Identifier...) and lists every other CODE or TEXT item as a
qualitative evaluation, so a second Finding beside the finding type vanished.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, write_ct_series
from pydicom import Dataset, dcmread

from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node_synthetic import cardiac_phantom, cxr_phantom
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.dicom_mr import cine_series

# Group-level concepts tid1500reader reads into fields of its own (TID1500Reader.cpp).
_READER_FIELDS = {("121071", "DCM"): "Finding", ("112039", "DCM"): "TrackingIdentifier",
                  ("112040", "DCM"): "TrackingUniqueIdentifier"}
_DISCLAIMER = "AI triage aid, not a diagnosis"


def _tid1500reader() -> str:
    found = shutil.which("tid1500reader") or str(Path(sys.executable).with_name("tid1500reader"))
    if not Path(found).exists():
        raise RuntimeError("tid1500reader missing: `pip install dcmqi` (the test extra installs it)")
    return found


def _roundtrip(ds: Dataset) -> Dataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(REPO / "models_onnx", ["CPUExecutionProvider"])


def _run(registry: ModelRegistry, pipeline: str, datasets: list[Dataset], options: dict | None = None):
    return get_pipeline(pipeline).run(PipelineInput(1, pipeline, datasets, options or {}),
                                      registry.get(pipeline))


def _read(sr: Dataset, tmp_path: Path, name: str) -> list[dict]:
    """tid1500reader's measurement groups for ``sr``."""
    path, out = tmp_path / f"{name}.dcm", tmp_path / f"{name}.json"
    sr.save_as(path, enforce_file_format=True)
    proc = subprocess.run([_tid1500reader(), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())["Measurements"]


def _meaning(value: str | dict) -> str:
    return value if isinstance(value, str) else value["CodeMeaning"]


def _written(sr: Dataset) -> list[tuple[str, dict[str, list[str]]]]:
    """What the node wrote in each measurement group: (tracking identifier,
    concept meaning -> values of the group's direct CODE and TEXT items)."""
    [measurements] = [i for i in sr.ContentSequence
                      if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"]
    groups = []
    for group in measurements.ContentSequence:
        items: dict[str, list[str]] = {}
        for item in group.ContentSequence:
            concept = item.ConceptNameCodeSequence[0]
            if item.ValueType == "CODE":
                items.setdefault(concept.CodeMeaning, []).append(item.ConceptCodeSequence[0].CodeMeaning)
            elif item.ValueType == "TEXT":
                items.setdefault(concept.CodeMeaning, []).append(str(item.TextValue))
        groups.append((items["Tracking Identifier"][0], items))
    return groups


def _kept(group: dict) -> dict[str, list[str]]:
    """The reader's view of one group, in the same shape as ``_written``."""
    kept: dict[str, list[str]] = {}
    for field in _READER_FIELDS.values():
        if field in group:
            kept.setdefault({"Finding": "Finding", "TrackingIdentifier": "Tracking Identifier",
                             "TrackingUniqueIdentifier": "Tracking Unique Identifier"}[field],
                            []).append(_meaning(group[field]))
    for item in group.get("qualitativeEvaluations", []):
        kept.setdefault(item["conceptCode"]["CodeMeaning"], []).append(_meaning(item["conceptValue"]))
    return kept


def _assert_nothing_lost(sr: Dataset, read: list[dict]) -> None:
    written = _written(sr)
    assert [g.get("TrackingIdentifier") for g in read] == [ident for ident, _ in written]
    for (ident, items), group in zip(written, read, strict=True):
        # The algorithm (TID 4019): name and version; of the parameters, which
        # TID 4019 repeats by design, the reader keeps the first at group level
        # and every one on each measurement.
        if "Algorithm Name" in items:
            algorithm = group["measurementAlgorithmIdentification"]
            assert [algorithm["AlgorithmName"]] == items.pop("Algorithm Name"), ident
            assert [algorithm["AlgorithmVersion"]] == items.pop("Algorithm Version"), ident
            parameters = items.pop("Algorithm Parameters")
            assert algorithm["AlgorithmParameters"] == parameters[:1], ident
            for measurement in group["measurementItems"]:
                assert measurement["measurementAlgorithmIdentification"]["AlgorithmParameters"] == parameters
        # No other concept twice in a group: a reader keeping the first would lose the rest.
        assert all(len(v) == 1 for v in items.values()), (ident, items)
        kept = _kept(group)
        for concept, values in items.items():
            assert kept.get(concept) == values, (ident, concept, values, kept.get(concept))


@pytest.fixture(scope="module")
def cxr_reports(registry) -> dict[str, Dataset]:
    """The CXR SR of an obviously abnormal radiograph and of one the model
    calls normal (at its 99 % sensitivity operating point it flags some
    normal phantoms, so the first of a few that it passes)."""
    def report(finding: str | None, seed: int) -> tuple[str, Dataset]:
        rad = cxr_phantom.make_radiograph(np.random.default_rng(seed), finding, size=(256, 256),
                                          **({"severity": "obvious"} if finding else {}))
        result = _run(registry, "cxr_triage", [_roundtrip(dx_image(rad.image, seed=f"dcmqi-{seed}"))])
        [sr] = [d for d in result.datasets if d.Modality == "SR"]
        return str(result.outcome), sr

    outcome, abnormal = report("pneumothorax", 8)
    assert outcome == "abnormal"
    for seed in range(12):
        outcome, normal = report(None, seed)
        if outcome == "normal":
            return {"abnormal": abnormal, "normal": normal}
    raise AssertionError("the CXR model called none of 12 normal phantoms normal")


@pytest.mark.parametrize("outcome", ["abnormal", "normal"])
def test_cxr_triage_finding_and_disclaimer_survive_tid1500reader(cxr_reports, tmp_path, outcome):
    sr = cxr_reports[outcome]
    [group] = _read(sr, tmp_path, f"cxr-{outcome}")
    expected = {"abnormal": ("263654008", "Abnormal"), "normal": ("17621005", "Normal")}[outcome]
    assert (group["Finding"]["CodeValue"], group["Finding"]["CodingSchemeDesignator"]) == (expected[0], "SCT")
    kept = _kept(group)
    assert kept["Normality"] == [expected[1]]
    assert kept["Recommendation"] == [
        "Abnormal - needs review" if outcome == "abnormal" else "Normal (AI triage) - no review flag"]
    [comment] = kept["Comment"]
    assert comment.startswith(_DISCLAIMER)
    # Probability and threshold reach the reader as standard DCM concepts.
    quantities = {(m["quantity"]["CodeValue"], m["quantity"]["CodingSchemeDesignator"])
                  for m in group["measurementItems"]}
    assert {("122157", "DCM"), ("122411", "DCM")} <= quantities
    _assert_nothing_lost(sr, [group])


def test_ct_roi_descriptions_survive_tid1500reader(registry, tmp_path):
    sources = [dcmread(p) for p in write_ct_series(tmp_path / "in", n=4, size=96, seed="dcmqi")]
    result = _run(registry, "ct_denoise", sources, {"batch_size": 4})
    [sr] = [d for d in result.datasets if d.Modality == "SR"]
    read = _read(sr, tmp_path, "ct")
    _assert_nothing_lost(sr, read)
    descriptions = {g["TrackingIdentifier"]: _kept(g)["Selected Region Description"][0]
                    for g in read if "ROI" in g["TrackingIdentifier"]}
    assert sorted(descriptions) == sorted(f"{roi} ROI, {series} series" for roi in ("blood", "reference")
                                          for series in ("original", "denoised"))
    for ident, text in descriptions.items():
        series = ident.split(", ")[1].removesuffix(" series")
        assert text.startswith(f"{series} series: "), (ident, text)
        assert ("blood pool ROI" if ident.startswith("blood") else "reference ROI") in text, (ident, text)
    # The same region is described on the original and on the denoised series.
    for roi in ("blood", "reference"):
        original, denoised = (descriptions[f"{roi} ROI, {s} series"].split(": ", 1)[1]
                              for s in ("original", "denoised"))
        assert original == denoised


def test_cardiac_sr_groups_survive_tid1500reader(registry, tmp_path):
    study = cardiac_phantom.make_cine(np.random.default_rng(3), n_slices=3, n_phases=4, size=128)
    cine = [_roundtrip(d) for d in cine_series(study.images, seed="dcmqi", pixel_spacing_mm=study.pixel_spacing_mm,
                                                slice_spacing_mm=study.slice_spacing_mm)]
    [sr] = [d for d in _run(registry, "cardiac_seg", cine).datasets if d.Modality == "SR"]
    read = _read(sr, tmp_path, "cardiac")
    _assert_nothing_lost(sr, read)
    lv = next(g for g in read if g["TrackingIdentifier"] == "left ventricle")
    assert lv["Finding"]["CodeMeaning"] == "Left ventricle"
    assert any(m["quantity"]["CodeValue"] == "8811-2" for m in lv["measurementItems"])  # LVEF by MR
