"""The pipelines' fast paths give exactly what the plain code gives.

Each speed-up (presentation through a lookup table, memoised highdicom IOD
look-ups, derived images without deep copies, the ROI search over a thread
pool, the capture's blend) is checked against the straightforward
computation it replaces.
"""

from __future__ import annotations

import copy
from io import BytesIO

import cv2
import highdicom._standard_utils as su
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes

from dicom_node.config import load_config
from dicom_node.encode import highdicom_compat
from dicom_node.encode.derived import DerivedSeries, derived_image
from dicom_node.encode.provenance import Provenance
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines import ct_quality, cxr_triage
from dicom_node_synthetic import ct_phantom
from dicom_node_synthetic.dicom_ct import ct_series
from dicom_node_synthetic.dicom_dx import dx_image


def _roundtrip(ds):
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def _radiograph(shape=(96, 80)) -> np.ndarray:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[: shape[0], : shape[1]]
    return np.clip(0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 7.0) + rng.normal(0, 0.02, shape), 0, 1)


@pytest.mark.parametrize("bits,monochrome1", [(12, False), (14, False), (16, False), (12, True), (16, True)])
@pytest.mark.parametrize("variant", ["as sent", "no window", "sigmoid", "rescaled", "signed", "voi lut"])
def test_presentation_by_lookup_table_is_bit_identical(bits, monochrome1, variant):
    ds = _roundtrip(dx_image(_radiograph(), seed="lut", bits=bits, monochrome1=monochrome1))
    if variant == "no window":
        del ds.WindowCenter, ds.WindowWidth
    elif variant == "sigmoid":
        ds.VOILUTFunction = "SIGMOID"
    elif variant == "rescaled":
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100
    elif variant == "signed":
        shifted = ds.pixel_array.astype(np.int32) - (1 << (bits - 1))
        ds.PixelRepresentation = 1
        ds.PixelData = shifted.astype(np.int16).tobytes()
        ds.WindowCenter = 0
    elif variant == "voi lut":
        from pydicom import Dataset
        item = Dataset()
        n = 256
        item.LUTDescriptor = [n, 0, 16]
        # Not monotonic: the extremes are not at the ends of the stored range.
        item.add_new(0x00283006, "US", [int(v) for v in (32767 + 30000 * np.sin(np.arange(n) / 20.0))])
        ds.VOILUTSequence = [item]
    ds = _roundtrip(ds)
    fast = cxr_triage.presentation(ds)
    plain = cxr_triage._present(_roundtrip(ds).pixel_array, ds)
    assert fast.dtype == plain.dtype == np.float32
    assert np.array_equal(fast, plain)


def test_memoised_iod_lookups_answer_as_highdicom_does():
    ct, sr, sc = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
    original = highdicom_compat._ORIGINAL
    for uid in (ct, sr, sc):
        for attribute in ("ContentDate", "PixelData", "NumberOfFrames", "FrameOfReferenceUID"):
            assert su.is_attribute_in_iod(attribute, uid) == original["is_attribute_in_iod"](attribute, uid)
            assert (su.is_attribute_in_iod(attribute, uid, ["IconImageSequence"])
                    == original["is_attribute_in_iod"](attribute, uid, ["IconImageSequence"]))
        assert su.does_iod_have_pixel_data(uid) == original["does_iod_have_pixel_data"](uid)
    with pytest.raises(KeyError):
        su.is_attribute_in_iod("PixelData", "1.2.3.4")
    with pytest.raises(KeyError):
        su.is_attribute_in_iod("PixelData", "1.2.3.4")  # errors are not cached


def test_highdicom_compat_fails_loudly_when_its_assumptions_break(monkeypatch):
    highdicom_compat.check()  # the installed highdicom passes
    monkeypatch.setattr(su, "does_iod_have_pixel_data", lambda sop_class, strict=True: True)
    with pytest.raises(highdicom_compat.CompatError, match="does_iod_have_pixel_data is now"):
        highdicom_compat.check()
    monkeypatch.undo()
    monkeypatch.delattr(su, "get_module_usage")
    with pytest.raises(highdicom_compat.CompatError, match="get_module_usage is gone"):
        highdicom_compat.check()
    monkeypatch.undo()
    import highdicom
    monkeypatch.setattr(highdicom, "__version__", "0.31.0")
    with pytest.raises(highdicom_compat.CompatError, match="supported"):
        highdicom_compat.check()
    monkeypatch.undo()
    import highdicom.sr.sop
    import highdicom.sr.utils
    monkeypatch.setattr(highdicom.sr.sop, "deepcopy", lambda x, memo=None: x)
    with pytest.raises(highdicom_compat.CompatError, match="no longer copies with copy.deepcopy"):
        highdicom_compat.check()
    monkeypatch.undo()
    monkeypatch.setattr(highdicom.sr.utils, "find_content_items", lambda dataset, name=None: [])
    with pytest.raises(highdicom_compat.CompatError, match="find_content_items is now"):
        highdicom_compat.check()


def _deep_copy_derived(source, values, prov):
    """derived_image as it was: every element deep-copied."""
    from pydicom import Dataset

    from dicom_node.encode import derived as d
    ds = Dataset()
    for elem in source:
        if elem.tag.is_private or elem.keyword in d._DROP or elem.tag.group == 0x0002:
            continue
        ds.add(copy.deepcopy(elem))
    ds.SOPInstanceUID = prov.uid("derived-image", "x")
    ds.ImageType = ["DERIVED", "SECONDARY"] + list(source.get("ImageType", ["", ""]))[2:]
    d._mark_derived(ds, prov, d._reference(source), series_uid="1.2.3", series_number=1001,
                    series_description="AI", derivation="AI")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.PhotometricInterpretation = source.PhotometricInterpretation
    return d.set_pixels(ds, d.stored_values(values, source))


def _content(ds) -> bytes:
    ds = copy.deepcopy(ds)
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_derived_image_without_deep_copies_is_the_same_and_leaves_the_source_alone(syntax):
    rng = np.random.default_rng(2)
    hu = ct_phantom.make_slice(rng, size=64).low_dose_hu[None]
    source = ct_series(hu, seed="derived")[0]
    source.file_meta.TransferSyntaxUID = syntax  # implicit VR: raw elements carry no VR
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Jörg"
    source = _roundtrip(source)
    assert source.file_meta.TransferSyntaxUID == syntax
    _ = source.ImagePositionPatient, source.PixelSpacing  # some decoded, the rest raw
    before = _content_of_source(source)
    manifest = ModelRegistry(load_config().models_dir).manifest("ct_denoise")
    prov = Provenance(manifest, "ct_denoise", str(source.SeriesInstanceUID), "CPUExecutionProvider")
    values = hu[0] + 5
    fast = derived_image(source, values, prov, index="x", series_uid="1.2.3", series_number=1001,
                         series_description="AI", derivation="AI")
    assert _content_of_source(source) == before
    plain = _deep_copy_derived(_roundtrip(source), values, prov)
    assert _content(fast) == _content(plain)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_derived_series_template_gives_what_derived_image_gives(syntax, monkeypatch):
    """Each slice from the series template equals derived_image() of it, for
    slices varying in position, rescale, content time and windowing, one with
    an extra element and one with another ImageType (both built in full);
    building later slices changes neither the first result nor the sources."""
    rng = np.random.default_rng(5)
    hu = np.stack([ct_phantom.make_slice(rng, size=48).low_dose_hu for _ in range(6)])
    sources = []
    for i, ds in enumerate(ct_series(hu, seed="template")):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.ContentTime = f"1200{i:02d}"
        ds.WindowCenter = 40 + i
        if i == 2:
            ds.RescaleIntercept = -1000
        if i == 3:
            ds.ImageComments = "extra"
        if i == 4:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        sources.append(_roundtrip(ds))
    _ = sources[1].ImagePositionPatient  # one decoded element beside raw ones
    before = [_content_of_source(s) for s in sources]
    manifest = ModelRegistry(load_config().models_dir).manifest("ct_denoise")
    prov = Provenance(manifest, "ct_denoise", str(sources[0].SeriesInstanceUID), "CPUExecutionProvider")
    names = {"series_uid": "1.2.3", "series_number": 1001, "series_description": "AI", "derivation": "AI"}
    from dicom_node.encode import derived as derived_module
    full: list[str] = []
    monkeypatch.setattr(derived_module, "derived_image",
                        lambda source, *a, **k: full.append(str(source.InstanceNumber))
                        or derived_image(source, *a, **k))
    series = DerivedSeries(prov, **names)
    built = [series.image(s, hu[i] + 5, index=str(s.SOPInstanceUID)) for i, s in enumerate(sources)]
    # The first, the one with an extra element, the one with another ImageType.
    assert full == [str(sources[i].InstanceNumber) for i in (0, 3, 4)]
    first = _content(built[0])
    for i, s in enumerate(sources):
        expected = derived_image(_roundtrip(s), hu[i] + 5, prov, index=str(s.SOPInstanceUID), **names)
        assert _content(built[i]) == _content(expected), i
    assert _content(built[0]) == first
    assert [_content_of_source(s) for s in sources] == before
    assert built[4].ImageType[2] == "LOCALIZER" and built[2].RescaleIntercept == -1000


def _content_of_source(ds) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_parallel_roi_search_chooses_what_the_serial_one_does(monkeypatch):
    vol = ct_phantom.make_volume(np.random.default_rng(3), 6, size=128)
    spacing = (vol.pixel_mm, vol.pixel_mm) if np.isscalar(vol.pixel_mm) else vol.pixel_mm
    parallel = ct_quality.choose_regions(vol.low_dose_hu, spacing)
    monkeypatch.setattr(ct_quality, "_map", lambda fn, items: [fn(i) for i in items])
    serial = ct_quality.choose_regions(vol.low_dose_hu, spacing)
    assert parallel == serial


def test_capture_blend_is_the_per_channel_formula():
    import cv2
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    heat = rng.random((40, 30), dtype=np.float32)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    alpha = (0.45 * heat)[..., None]
    plain = rgb.astype(np.float64) * (1 - alpha) + colour.astype(np.float64) * alpha
    ours = cxr_triage._overlay(grey, heat)
    assert ours.dtype == np.uint8 and ours.shape == (40, 30, 3)
    # OpenCV divides by the weights' sum plus 1e-5 and rounds: within one level.
    assert np.abs(ours - np.rint(plain)).max() <= 1
    assert np.mean(ours == np.rint(plain)) > 0.95


class _AsIfAccelerated:
    """The CPU model reported as an accelerator's, so that the pipeline
    takes its overlapped path (ROI search beside the inference)."""

    def __init__(self, model) -> None:
        self._model = model
        self.provider = "CUDAExecutionProvider"

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_ct_denoise_with_the_roi_search_beside_inference_gives_the_same_report():
    """On an accelerator the ROI search and the derived images' encoding run
    beside the inference (batch by batch); the results are the CPU path's."""
    from dicom_node.pipelines.base import PipelineInput, get_pipeline
    vol = ct_phantom.make_volume(np.random.default_rng(1), 7, size=96)
    sources = [_roundtrip(ds) for ds in ct_series(vol.low_dose_hu, seed="overlap", pixel_mm=vol.pixel_mm,
                                                   slice_mm=vol.slice_mm)]
    model = ModelRegistry(load_config().models_dir).get("ct_denoise")
    pipeline = get_pipeline("ct_denoise")
    options = {"batch_size": 2}  # four batches, the last one short
    handed: dict[str, list] = {"inline": [], "beside": []}
    inline = pipeline.run(PipelineInput(1, "t", [_roundtrip(s) for s in sources], options,
                                        handed["inline"].append), model)
    beside = pipeline.run(PipelineInput(1, "t", [_roundtrip(s) for s in sources], options,
                                        handed["beside"].append), _AsIfAccelerated(model))
    # The derived images (not the SR, which is built last) were handed over to be written early.
    for name, result in (("inline", inline), ("beside", beside)):
        assert sorted(map(id, handed[name])) == sorted(map(id, result.datasets[:-1])), name
    assert inline.summary == beside.summary and inline.held == beside.held
    assert [_content(ds) for ds in inline.datasets[:-1]] == [_content(ds) for ds in beside.datasets[:-1]]
    assert len(beside.datasets) == 8

    def measured(result):
        sr = result.datasets[-1]
        return [(str(i.ConceptNameCodeSequence[0].CodeMeaning), str(i.get("MeasuredValueSequence", [{}])[0]))
                for i in _walk(sr)]
    assert measured(inline) == measured(beside)
    assert any("Mean" in name for name, _ in measured(inline))


def _small_ct_job(name: str):
    from dicom_node.pipelines.base import PipelineInput
    vol = ct_phantom.make_volume(np.random.default_rng(1), 7, size=96)
    sources = [_roundtrip(ds) for ds in ct_series(vol.low_dose_hu, seed=name, pixel_mm=vol.pixel_mm,
                                                   slice_mm=vol.slice_mm)]
    return PipelineInput(1, "t", sources, {"batch_size": 4}, lambda ds: None)


def _without_sr_shortcuts(monkeypatch) -> None:
    import highdicom.sr.sop
    for module in (highdicom.sr.utils, highdicom.sr.content, highdicom.sr.templates, highdicom.sr):
        if getattr(module, "find_content_items", None) is highdicom_compat.find_content_items:
            monkeypatch.setattr(module, "find_content_items", highdicom_compat._ORIGINAL_FIND)
    monkeypatch.setattr(highdicom.sr.sop, "deepcopy", copy.deepcopy)


def test_sr_built_from_its_own_tree_is_what_highdicom_builds_from_a_copy(monkeypatch):
    """The CT report (128 evidence instances' worth of references, ROIs on two
    series) with highdicom's content copy and its own tree search, and without."""
    import highdicom.sr.utils
    from dicom_node.pipelines.base import get_pipeline
    assert highdicom.sr.utils.find_content_items is highdicom_compat.find_content_items  # installed
    model = ModelRegistry(load_config().models_dir).get("ct_denoise")
    pipeline = get_pipeline("ct_denoise")
    shortcut = pipeline.run(_small_ct_job("sr-shortcuts"), model).datasets[-1]
    _without_sr_shortcuts(monkeypatch)
    plain = pipeline.run(_small_ct_job("sr-shortcuts"), model).datasets[-1]
    assert _sr_json(shortcut) == _sr_json(plain)
    assert len(shortcut.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 2
    # The shared tree is the SR's own: what the SR says is what its content says.
    assert shortcut.ContentSequence[0] is shortcut._content[0].ContentSequence[0]


def test_deep_copies_outside_a_handed_over_build_are_still_made():
    import highdicom.sr.sop
    from pydicom import Dataset
    from pydicom.sequence import Sequence
    tree = Sequence([Dataset()])
    tree[0].ValueType = "CONTAINER"
    other = copy.deepcopy(tree)
    with highdicom_compat.content_handed_over(tree):
        assert highdicom.sr.sop.deepcopy(tree[0]) is tree[0]
        assert highdicom.sr.sop.deepcopy(other[0]) is not other[0]
        assert highdicom.sr.sop.deepcopy(tree[0], {}) is not tree[0]  # a copy inside another's copy
    assert highdicom.sr.sop.deepcopy(tree[0]) is not tree[0]


def test_tree_search_without_a_name_finds_what_highdicom_finds():
    from dicom_node.pipelines.base import get_pipeline
    from highdicom.sr import RelationshipTypeValues, ValueTypeValues
    model = ModelRegistry(load_config().models_dir).get("ct_denoise")
    sr = get_pipeline("ct_denoise").run(_small_ct_job("tree-search"), model).datasets[-1]
    found = 0
    for root in (sr, next(i for i in sr.ContentSequence if "ContentSequence" in i)):
        for value in [None, *ValueTypeValues, "IMAGE"]:
            for relationship in [None, *RelationshipTypeValues, "CONTAINS"]:
                for recursive in (False, True):
                    ours = highdicom_compat.find_content_items(root, None, value, relationship, recursive)
                    theirs = highdicom_compat._ORIGINAL_FIND(root, None, value, relationship, recursive)
                    assert list(map(id, ours)) == list(map(id, theirs)), (value, relationship, recursive)
                    found += len(ours)
    assert found > 100
    name = codes.DCM.ImagingMeasurements
    assert highdicom_compat.find_content_items(sr, name, recursive=True) == \
        highdicom_compat._ORIGINAL_FIND(sr, name, recursive=True) != []
    with pytest.raises(ValueError):
        highdicom_compat.find_content_items(sr, value_type="PICTURE")
    with pytest.raises(AttributeError, match="Content Sequence"):
        highdicom_compat.find_content_items(sr.ContentSequence[0])


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


_SR_TIMES = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"}


def _sr_json(ds) -> dict:
    """The SR as DICOM JSON without the times of its creation, which differ
    between any two builds."""
    def scrub(node):
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items() if _keyword(k) not in _SR_TIMES}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node
    return scrub(ds.to_json_dict())


def _keyword(tag: str) -> str:
    from pydicom.datadict import keyword_for_tag
    try:
        return keyword_for_tag(int(tag, 16))
    except ValueError:
        return ""


def _triage_read(i: int, score: float, **changes):
    from dicom_node.infer.runner import Classified
    ds = _roundtrip(dx_image(_radiograph(), seed=f"sr-reuse-{i}"))
    # One series of one study, as a modality sends it.
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1.76", "1.2.826.0.1.3680043.10.1.77"
    ds.InstanceNumber = i + 1
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return cxr_triage._Read(ds, Classified({"abnormal": score}, score, 0.0129226, score >= 0.0129226),
                            np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("changes", [
    {}, {"InstanceNumber": 9}, {"ContentTime": "101010"}, {"AcquisitionDateTime": "20260101101010"},
    {"AcquisitionNumber": 4}, {"ExposureIndex": 312},
    # Not per image: these make a new template, so the result is right either way.
    {"PatientName": "OTHER^PATIENT"}, {"Rows": 97}, {"SeriesNumber": 7},
])
def test_triage_srs_derived_from_the_first_are_what_highdicom_builds(changes):
    from dicom_node.encode.sr_reuse import PER_IMAGE, ReportTemplates
    manifest = ModelRegistry(load_config().models_dir).get("cxr_triage").manifest
    templates = ReportTemplates()
    # Two derived from each template: a derived SR must not change its template.
    scores = [(0.8, {}), (0.001, {}), (0.43, changes), (0.0005, changes), (0.97, changes), (0.002, changes)]
    for i, (score, extra) in enumerate(scores):
        read = _triage_read(i, score, **extra)
        prov = Provenance(manifest, "cxr_triage", str(read.dataset.SOPInstanceUID), "CPUExecutionProvider")
        derived = cxr_triage._report(read, prov, templates)
        direct = cxr_triage._build_report(read, prov)
        assert _sr_json(derived) == _sr_json(direct), (i, changes)
        assert derived.file_meta.to_json_dict() == direct.file_meta.to_json_dict()
        assert derived.SOPInstanceUID == prov.uid("sr")
    # Two kinds (abnormal, normal), or four when the change is not per image:
    # so the SRs of images 2 and 3 were really derived in the first case.
    assert set(changes) <= PER_IMAGE | {"PatientName", "Rows", "SeriesNumber"}
    assert len(templates._built) == (2 if set(changes) <= PER_IMAGE else 4)


def _cxr_series(n: int) -> list:
    from dicom_node_synthetic.cxr_phantom import make_radiograph

    rng = np.random.default_rng(6)
    return [_roundtrip(dx_image(make_radiograph(rng, size=(200, 160)).image, seed=f"pipe-{i}"))
            for i in range(n)]


def _comparable(ds) -> bytes:
    """The object's bytes without its creation times."""
    ds = copy.deepcopy(ds)
    for keyword in ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if keyword in ds:
            delattr(ds, keyword)
    return _content(ds)


def test_cxr_pipeline_decodes_and_draws_ahead_with_the_same_results(monkeypatch):
    """Decoding ahead and drawing captures on the pool gives, in order, what
    one radiograph at a time gives; a radiograph that cannot be decoded
    fails the job naming it, as before."""
    from dicom_node.errors import PipelineError
    from dicom_node.pipelines.base import PipelineInput

    model = ModelRegistry(load_config().models_dir).get("cxr_triage")
    series = _cxr_series(5)
    pipeline = cxr_triage.CxrTriage()
    handed: list = []
    ahead = pipeline.run(PipelineInput(1, "cxr", series, {}, handed.append), model)
    # Every SR and capture was handed over to be written early, each once.
    assert sorted(map(id, handed)) == sorted(map(id, ahead.datasets))
    monkeypatch.setattr(cxr_triage, "_AHEAD", 1)
    one_by_one = pipeline.run(PipelineInput(1, "cxr", series, {}), model)
    sc = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    kinds = [str(ds.SOPClassUID) for ds in ahead.datasets]
    assert kinds[1::2] == [sc] * 5 and len(set(kinds[::2])) == 1 and sc not in kinds[::2]
    assert [_comparable(ds) for ds in ahead.datasets] == [_comparable(ds) for ds in one_by_one.datasets]
    monkeypatch.setattr(cxr_triage, "_AHEAD", 2)
    broken = _roundtrip(series[3])
    broken.PixelData = broken.PixelData[:100]
    with pytest.raises(PipelineError, match=str(broken.SOPInstanceUID)):
        pipeline.run(PipelineInput(1, "cxr", [*series[:3], broken, series[4]], {}), model)


def test_onnxruntime_threads_do_not_spin_between_runs():
    """Sessions are made without spin-waiting: spinning threads take the
    cores that decoding, encoding, receiving and sending share with the model."""
    model = ModelRegistry(load_config().models_dir).get("cxr_triage")
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_local_sd_in_one_transform_matches_a_float64_filter_on_ct_values():
    # Air at -1000 HU beside blood: the squared values are a million times
    # the mean's precision, which a careless packing of the two lets leak.
    vol = ct_phantom.make_volume(np.random.default_rng(1), 1, size=256)
    spacing = (vol.pixel_mm, vol.pixel_mm)
    img = vol.low_dose_hu[0].astype(np.float32)
    footprint = ct_quality._ellipse_kernel(8.0, spacing)
    k = footprint.astype(np.float64) / footprint.sum()
    x = img.astype(np.float64) - np.median(img)
    mean = cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT)
    sq = cv2.filter2D(x * x, -1, k, borderType=cv2.BORDER_REFLECT)
    exact = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    assert np.abs(ct_quality._local_sd(img, footprint) - exact).max() < 0.05
    anisotropic = ct_quality._ellipse_kernel(6.0, (0.7, 1.1))
    k = anisotropic.astype(np.float64) / anisotropic.sum()
    mean = cv2.filter2D(x[:200, :230], -1, k, borderType=cv2.BORDER_REFLECT)
    got, _ = ct_quality._footprint_means(np.ascontiguousarray(x[:200, :230], np.float32),
                                         (anisotropic / anisotropic.sum()).astype(np.float32))
    assert np.abs(got - mean).max() < 0.01


def _exact_lowest_sd(img: np.ndarray, region: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """Float64 local SD over the whole slice, inf outside the eligible centres."""
    inner = cv2.erode(region, ct_quality._ellipse_kernel(radius_mm + ct_quality._EDGE_MARGIN_MM, spacing))
    footprint = ct_quality._ellipse_kernel(radius_mm, spacing)
    k = footprint.astype(np.float64) / footprint.sum()
    x = img.astype(np.float64)
    mean = cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT)
    sq = cv2.filter2D(x * x, -1, k, borderType=cv2.BORDER_REFLECT)
    return np.where(inner.astype(bool), np.sqrt(np.maximum(sq - mean * mean, 0.0)), np.inf)


@pytest.mark.parametrize("spacing", [(0.7, 0.7), (0.7, 1.1)])
def test_roi_search_on_the_centres_crop_finds_the_whole_slices_calmest_centre(spacing):
    vol = ct_phantom.make_volume(np.random.default_rng(5), 1, size=256)
    img = vol.low_dose_hu[0].astype(np.float32)
    smoothed = ct_quality._smoothed(img[None], spacing)
    cases = {
        "fat, inside the body": ct_quality._tissue_masks(smoothed, spacing, *ct_quality.FAT_HU_RANGE)[0],
        "air outside the body, at the image's edges": ct_quality._outside_air(smoothed)[0],
    }
    for what, region in cases.items():
        exact = _exact_lowest_sd(img, region, spacing, 4.0)
        found = ct_quality._lowest_sd_centre(img, region, spacing, 4.0)
        assert found is not None, what
        sd, (row, col) = found
        # The crop's SD is the whole slice's to float32 rounding, and its centre
        # is the calmest (two centres closer than that rounding may swap).
        assert np.isfinite(exact[row, col]), f"{what}: centre outside the eligible region"
        assert abs(sd - exact[row, col]) < 0.05, what
        assert exact[row, col] - exact.min() < 0.01, what
    assert ct_quality._lowest_sd_centre(img, np.zeros_like(region), spacing, 4.0) is None


def test_fill_holes_by_label_table_is_what_isin_gives():
    rng = np.random.default_rng(2)
    mask = (cv2.GaussianBlur(rng.random((90, 70)).astype(np.float32), (0, 0), 3) > 0.5).astype(np.uint8)
    _, lab = cv2.connectedComponents(1 - mask, connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    expected = (~np.isin(lab, border)).astype(np.uint8) | mask
    assert np.array_equal(ct_quality._fill_holes(mask), expected)
    assert ct_quality._fill_holes(mask).sum() > mask.sum()  # the case has holes to fill


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (16, None)])
def test_opencv_threads_give_way_to_the_pipelines_pools_on_small_machines(monkeypatch, cores, expected):
    from dicom_node.pipelines import base

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(-1)  # OpenCV's default
        default = cv2.getNumThreads()
        monkeypatch.setattr(base.os, "cpu_count", lambda: cores)
        base.configure_threads()
        assert cv2.getNumThreads() == (default if expected is None else expected)
    finally:
        cv2.setNumThreads(before)


def test_capture_shrinks_in_two_steps_within_a_grey_level_of_one():
    from dicom_node_synthetic.cxr_phantom import make_radiograph

    image = make_radiograph(np.random.default_rng(4), size=(1250, 1024)).image.astype(np.float32)
    size = (419, 512)  # (columns, rows): as a 2500-row radiograph's capture, at half the scale
    one = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    two = cxr_triage._shrunk(image, size)
    assert two.shape == one.shape == (512, 419)
    assert np.abs(two - one).mean() * 255 < 0.5
    assert np.percentile(np.abs(two - one), 99.9) * 255 < 8
    # Less than halving: one step, as before.
    near = (900, 1100)
    assert np.array_equal(cxr_triage._shrunk(image, near), cv2.resize(image, near, interpolation=cv2.INTER_AREA))
