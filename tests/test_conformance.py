"""docs/conformance.md stays true: its UID tables are compared with what a
live node negotiates and with what the pipelines produce and send."""

from __future__ import annotations

import re

import pytest
from helpers import REPO, free_port, write_ct_series
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import Peer
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline
from dicom_node.receive.scp import storage_sop_classes, supported_transfer_syntaxes
from dicom_node.send.scu import StoreRequest, send_files

DOC = REPO / "docs" / "conformance.md"
# pynetdicom numbers contexts 1, 3, ... 255: at most 128 per association.
_MAX_CONTEXTS = 128
_NOT_A_CLASS = "1.2.826.0.1.3680043.9.9999.1"
_NOT_A_SYNTAX = "1.2.826.0.1.3680043.9.9999.2"


def doc_tables() -> dict[str, list[list[str]]]:
    """Heading -> the rows (cells) of the tables under it."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not re.match(r"^\|\s*-", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables.setdefault(heading, []).append(cells)
    return tables


def doc_uids(heading_start: str, **where: str) -> list[str]:
    """The backquoted UIDs in the tables under the heading starting with
    ``heading_start``, optionally keeping rows whose column matches."""
    [heading] = [h for h in doc_tables() if h.startswith(heading_start)]
    rows = doc_tables()[heading]
    header, body = rows[0], rows[1:]
    uids = []
    for row in body:
        if any(row[header.index(col)] != value for col, value in where.items()):
            continue
        uids += re.findall(r"`(\d+(?:\.\d+)+)`", " ".join(row))
    assert len(uids) == len(set(uids)), f"duplicate UIDs under {heading!r}"
    return uids


def _negotiate(port: int, contexts: list) -> tuple[list, list, object]:
    """Accepted contexts, rejected contexts and the acceptor's A-ASSOCIATE-AC."""
    ae = AE(ae_title="CONFORMANCE")
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title="DICOM_NODE")
    assert assoc.is_established, "the node refused the association"
    try:
        return list(assoc.accepted_contexts), list(assoc.rejected_contexts), assoc.acceptor
    finally:
        assoc.release()


def _chunks(items: list, n: int = _MAX_CONTEXTS) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from helpers import NodeProcess
    node = NodeProcess(tmp_path_factory.mktemp("conformance")).start()
    yield node
    node.kill9()


def test_doc_scp_tables_match_the_code():
    assert doc_uids("3.1") == [str(Verification)]
    assert sorted(doc_uids("3.2")) == sorted(storage_sop_classes())
    assert sorted(doc_uids("3.4")) == sorted(supported_transfer_syntaxes())


def test_live_node_accepts_every_documented_class_with_every_documented_syntax(live):
    classes, syntaxes = doc_uids("3.2"), doc_uids("3.4")
    # One context per (class, syntax): the acceptor answers each on its own.
    pairs = [(c, t) for c in [*doc_uids("3.1"), *classes] for t in syntaxes]
    accepted: set[tuple[str, str]] = set()
    for chunk in _chunks(pairs):
        ok, rejected, _ = _negotiate(live.port, [build_context(c, [t]) for c, t in chunk])
        assert not rejected, [(str(cx.abstract_syntax), cx.transfer_syntax) for cx in rejected][:5]
        accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in ok}
    assert accepted == set(pairs)


def test_live_node_refuses_what_the_doc_does_not_list(live):
    ok, rejected, acceptor = _negotiate(live.port, [
        build_context(_NOT_A_CLASS, ["1.2.840.10008.1.2"]),
        build_context(CTImageStorage, [_NOT_A_SYNTAX]),
        # Of several acceptable syntaxes, the one first in the doc's table wins.
        build_context(CTImageStorage, [_NOT_A_SYNTAX, JPEGBaseline8Bit, ExplicitVRLittleEndian]),
        build_context(CTImageStorage, [JPEGBaseline8Bit]),
    ])
    reasons = {str(cx.abstract_syntax) + "/" + str(cx.transfer_syntax[0]): cx.result for cx in rejected}
    assert reasons == {f"{_NOT_A_CLASS}/1.2.840.10008.1.2": 0x03,  # abstract syntax not supported
                       f"{CTImageStorage}/{_NOT_A_SYNTAX}": 0x04}  # transfer syntaxes not supported
    order = doc_uids("3.4")
    assert order.index(ExplicitVRLittleEndian) < order.index(JPEGBaseline8Bit)
    assert [str(cx.transfer_syntax[0]) for cx in ok] == [ExplicitVRLittleEndian, JPEGBaseline8Bit]
    # 2.1: the documented maximum PDU and implementation identity.
    text = DOC.read_text()
    assert acceptor.maximum_length == 262144 and "| Maximum PDU size received | 262144 bytes" in text
    assert f"`{acceptor.implementation_class_uid}`" in text
    assert f"`{acceptor.implementation_version_name}`" in text


def test_pipelines_send_what_the_doc_lists_as_scu(tmp_path):
    """Run the ct_denoise pipeline, send its results to a loopback SCP with the
    node's SCU, and compare the classes and proposed syntaxes with 3.3 and 3.5."""
    sources = [dcmread(p) for p in write_ct_series(tmp_path / "in", n=4, size=96, seed="conf")]
    model = ModelRegistry(REPO / "models_onnx", ["CPUExecutionProvider"]).get("ct_denoise")
    result = get_pipeline("ct_denoise").run(PipelineInput(1, "ct", sources, {"batch_size": 4}), model)
    produced = {str(ds.SOPClassUID) for ds in result.datasets} | _other_pipelines_produce()
    assert produced <= set(doc_uids("3.3", Status="current"))
    assert produced == set(doc_uids("3.3", Status="current")), "a current class no pipeline produces"
    # 5: results keep the source's character set.
    assert {ds.SpecificCharacterSet for ds in result.datasets} == {sources[0].SpecificCharacterSet}

    proposed: list[tuple[str, list[str]]] = []
    received: list[str] = []

    def on_requested(event: evt.Event) -> None:
        proposed.extend((str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                        for cx in event.assoc.requestor.requested_contexts)

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    scp = AE(ae_title="PEER")
    for uid in produced:
        scp.add_supported_context(uid, supported_transfer_syntaxes())
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)])
    try:
        requests = []
        for i, ds in enumerate(result.datasets):
            path = tmp_path / f"r{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            requests.append(StoreRequest(i, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        outcomes = send_files(Peer(name="peer", ae_title="PEER", host="127.0.0.1", port=port),
                              requests, calling_ae="DICOM_NODE", timeout_s=30)
    finally:
        server.shutdown()
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok]
    assert sorted(received) == sorted(str(ds.SOPClassUID) for ds in result.datasets)
    assert {c for c, _ in proposed} == {str(ds.SOPClassUID) for ds in result.datasets}
    by_class: dict[str, list[str]] = {}
    for sop_class, syntaxes in proposed:
        assert len(syntaxes) == 1, "one syntax per context, so the exact one can be accepted"
        by_class.setdefault(sop_class, []).extend(syntaxes)
    for syntaxes in by_class.values():
        assert syntaxes == doc_uids("3.5")


def test_doc_names_match_the_uids():
    """A table row's name is the standard's name for its UID."""
    for heading in ("3.1", "3.2", "3.3", "3.4", "3.5"):
        [title] = [h for h in doc_tables() if h.startswith(heading)]
        for row in doc_tables()[title][1:]:
            uid = re.search(r"`([\d.]+)`", row[1]).group(1)
            assert UID(uid).name in (row[0], row[0].removesuffix(" SOP Class")), (title, row)


def test_readme_links_the_conformance_statement():
    assert "docs/conformance.md" in (REPO / "README.md").read_text()


def _other_pipelines_produce() -> set[str]:
    """SOP classes of the cardiac and CXR pipelines' results on tiny inputs."""
    import numpy as np
    from io import BytesIO

    from dicom_node_synthetic import cardiac_phantom, cxr_phantom
    from dicom_node_synthetic.dicom_dx import dx_image
    from dicom_node_synthetic.dicom_mr import cine_series

    def roundtrip(ds):
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        return dcmread(buf)

    registry = ModelRegistry(REPO / "models_onnx", ["CPUExecutionProvider"])
    study = cardiac_phantom.make_cine(np.random.default_rng(1), n_slices=3, n_phases=4, size=128)
    cine = [roundtrip(d) for d in cine_series(study.images, seed="conf", pixel_spacing_mm=study.pixel_spacing_mm,
                                               slice_spacing_mm=study.slice_spacing_mm)]
    rad = cxr_phantom.make_radiograph(np.random.default_rng(1), None, size=(256, 256))
    produced = set()
    for name, datasets in (("cardiac_seg", cine), ("cxr_triage", [roundtrip(dx_image(rad.image, seed="conf"))])):
        result = get_pipeline(name).run(PipelineInput(1, name, datasets, {}), registry.get(name))
        produced |= {str(ds.SOPClassUID) for ds in result.datasets}
    return produced


# --- result objects: dciodvfy warnings, codes, colours, series --------------------

# What dciodvfy still says of every result object, and why it stays:
_ACCEPTED_WARNINGS = {
    # IHE AIR asks for the Device UID in Contributing Equipment; the IOD does not list it.
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
    "Standard Extended SOP Class",
}
_PRIVATE_WARNING = "Warning - Unrecognized defined term <99DCMNODE> for value 1 of attribute <Coding Scheme Designator>"
# The only concepts left in the private scheme: no standard code exists for them.
_PRIVATE_CODES = {"cxr_triage": {"SENS_TARGET"}, "ct_denoise": {"NOISE", "CNR"}, "cardiac_seg": set()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list]:
    """Each pipeline's results on tiny inputs, written and read back."""
    import numpy as np

    from dicom_node_synthetic import cardiac_phantom, cxr_phantom
    from dicom_node_synthetic.dicom_dx import dx_image
    from dicom_node_synthetic.dicom_mr import cine_series

    folder = tmp_path_factory.mktemp("results")
    registry = ModelRegistry(REPO / "models_onnx", ["CPUExecutionProvider"])
    study = cardiac_phantom.make_cine(np.random.default_rng(1), n_slices=3, n_phases=4, size=128)
    inputs = {
        "ct_denoise": [dcmread(p) for p in write_ct_series(folder / "ct", n=4, size=96, seed="conf")],
        "cardiac_seg": [_roundtrip(d) for d in cine_series(
            study.images, seed="conf", pixel_spacing_mm=study.pixel_spacing_mm,
            slice_spacing_mm=study.slice_spacing_mm)],
        "cxr_triage": [_roundtrip(dx_image(cxr_phantom.make_radiograph(
            np.random.default_rng(1), None, size=(256, 256)).image, seed="conf"))],
    }
    out = {}
    for name, datasets in inputs.items():
        result = get_pipeline(name).run(PipelineInput(1, name, datasets, {"batch_size": 4}), registry.get(name))
        out[name] = [_roundtrip(ds) for ds in result.datasets if ds.Modality != "CT"]
    out["inputs"] = inputs  # type: ignore[assignment]
    out["folder"] = folder  # type: ignore[assignment]
    return out


def _roundtrip(ds):
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def _codes(ds, scheme: str) -> set[str]:
    """Code values of ``scheme`` anywhere in an SR's content tree."""
    found, stack = set(), list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            found |= {str(c.CodeValue) for c in item.get(key, []) if c.CodingSchemeDesignator == scheme}
        for mv in item.get("MeasuredValueSequence", []):
            found |= {str(c.CodeValue) for c in mv.MeasurementUnitsCodeSequence if c.CodingSchemeDesignator == scheme}
        stack.extend(item.get("ContentSequence", []))
    return found


def _dciodvfy(path) -> list[str]:
    import subprocess

    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.mark.parametrize("pipeline", ["ct_denoise", "cardiac_seg", "cxr_triage"])
def test_result_objects_have_no_dciodvfy_errors_and_only_the_accepted_warnings(results, pipeline):
    for i, ds in enumerate(results[pipeline]):
        path = results["folder"] / f"{pipeline}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        lines = _dciodvfy(path)
        assert not [x for x in lines if x.startswith("Error")], (pipeline, ds.Modality, lines)
        # No empty Laterality: absent for the unpaired chest and heart.
        assert not [x for x in lines if "Laterality" in x], (pipeline, ds.Modality, lines)
        private = _codes(ds, "99DCMNODE")
        assert private <= _PRIVATE_CODES[pipeline], (pipeline, ds.Modality, private)
        # One warning per private code item plus the scheme's declaration; none where none is used.
        declared = [i for i in ds.get("CodingSchemeIdentificationSequence", [])
                    if i.CodingSchemeDesignator == "99DCMNODE"]
        assert bool(declared) == bool(private), (pipeline, ds.Modality)
        assert set(lines) - {_PRIVATE_WARNING} <= _ACCEPTED_WARNINGS, (pipeline, ds.Modality, lines)


def test_triage_result_is_in_standard_codes_with_its_wording_in_text(results):
    [sr] = [ds for ds in results["cxr_triage"] if ds.Modality == "SR"]
    assert _codes(sr, "99DCMNODE") == {"SENS_TARGET"}
    [group] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
               ][0].ContentSequence
    coded = {(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodingSchemeDesignator):
             (i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator)
             for i in group.ContentSequence if i.ValueType == "CODE"}
    finding = coded[("121071", "DCM")]  # Finding: SCT Abnormal or Normal (CID 222)
    assert finding in {("263654008", "SCT"), ("17621005", "SCT")}
    assert coded[("121402", "DCM")] == finding  # Normality
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: str(i.TextValue)
             for i in group.ContentSequence if i.ValueType == "TEXT"}
    assert texts["Comment"].startswith("AI triage aid, not a diagnosis")
    assert texts["Recommendation"] == ("Abnormal - needs review" if finding[0] == "263654008"
                                       else "Normal (AI triage) - no review flag")
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in group.ContentSequence
             if i.ValueType in ("CODE", "TEXT") and i.ConceptNameCodeSequence[0].CodeMeaning != "Algorithm Parameters"]
    assert len(names) == len(set(names)), names


def test_secondary_captures_carry_the_body_part_and_no_empty_laterality(results):
    for pipeline, part in (("cxr_triage", "CHEST"), ("cardiac_seg", "HEART")):
        [sc] = [ds for ds in results[pipeline] if ds.Modality == "OT"]
        assert sc.BodyPartExamined == part and "Laterality" not in sc, pipeline


def test_secondary_captures_reference_the_image_they_were_drawn_from(results):
    for pipeline in ("cxr_triage", "cardiac_seg"):
        [sc] = [ds for ds in results[pipeline] if ds.Modality == "OT"]
        [source] = sc.SourceImageSequence
        inputs = {str(ds.SOPInstanceUID): ds for ds in results["inputs"][pipeline]}
        image = inputs[str(source.ReferencedSOPInstanceUID)]
        assert source.ReferencedSOPClassUID == image.SOPClassUID, pipeline


def test_phase_segs_are_each_in_their_own_series_and_stable(results):
    segs = [ds for ds in results["cardiac_seg"] if ds.Modality == "SEG"]
    assert [s.ContentLabel for s in segs] == ["ED_PHASE", "ES_PHASE"]
    assert len({s.SeriesInstanceUID for s in segs}) == 2
    assert len({s.SeriesNumber for s in segs}) == 2
    assert [s.SeriesDescription.split()[3] for s in segs] == ["ED", "ES"]
    # A rerun gives the same UIDs: results replace, never duplicate.
    registry = ModelRegistry(REPO / "models_onnx", ["CPUExecutionProvider"])
    again = get_pipeline("cardiac_seg").run(PipelineInput(2, "r", results["inputs"]["cardiac_seg"], {}),
                                            registry.get("cardiac_seg"))
    assert [(s.SeriesInstanceUID, s.SOPInstanceUID) for s in again.datasets if s.Modality == "SEG"] == \
        [(s.SeriesInstanceUID, s.SOPInstanceUID) for s in segs]


def _capture_colours(sc) -> set[tuple[int, int, int]]:
    import numpy as np

    rgb = sc.pixel_array.reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(rgb, axis=0)}


def test_segment_colours_come_from_the_manifest(results):
    from types import SimpleNamespace

    from highdicom.color import CIELabColor

    registry = ModelRegistry(REPO / "models_onnx", ["CPUExecutionProvider"])
    model = registry.get("cardiac_seg")
    labels = model.manifest.segmentation.labels
    assert all(lab.color_rgb is not None for lab in labels), "the shipped manifest gives every colour"
    [seg, _] = [ds for ds in results["cardiac_seg"] if ds.Modality == "SEG"]
    shipped = {s.SegmentNumber: list(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence}
    assert shipped == {lab.value: list(CIELabColor.from_rgb(*lab.color_rgb).value) for lab in labels}
    # Other colours in the manifest: the SEG and the capture's contours follow them.
    mine = {1: (200, 0, 200), 2: (0, 200, 200), 3: (250, 150, 0)}
    segmentation = model.manifest.segmentation.model_copy(update={"labels": [
        lab.model_copy(update={"color_rgb": mine[lab.value]}) for lab in labels]})
    manifest = model.manifest.model_copy(update={"segmentation": segmentation})
    recoloured = SimpleNamespace(manifest=manifest, provider=model.provider, run=model.run)
    result = get_pipeline("cardiac_seg").run(PipelineInput(3, "r", results["inputs"]["cardiac_seg"], {}),
                                             recoloured)
    [seg] = [ds for ds in result.datasets if ds.Modality == "SEG"][:1]
    for segment in seg.SegmentSequence:
        shown = CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
        assert max(abs(a - b) for a, b in zip(shown, mine[segment.SegmentNumber], strict=True)) <= 2, segment
    [sc] = [ds for ds in result.datasets if ds.Modality == "OT"]
    assert set(mine.values()) <= _capture_colours(_roundtrip(sc))
    # No colour in the manifest: a fixed one by the type code, whatever the label number.
    # (listed 3, 2, 1: the order of a manifest's labels does not matter either)
    renumbered = model.manifest.segmentation.model_copy(update={"labels": [
        lab.model_copy(update={"color_rgb": None, "value": 4 - lab.value}) for lab in labels]})
    plain = SimpleNamespace(manifest=model.manifest.model_copy(update={"segmentation": renumbered}),
                            provider=model.provider, run=model.run)
    result = get_pipeline("cardiac_seg").run(PipelineInput(4, "r", results["inputs"]["cardiac_seg"], {}), plain)
    seg = next(ds for ds in result.datasets if ds.Modality == "SEG")
    by_name = {s.SegmentLabel: CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb()
               for s in seg.SegmentSequence}
    for name, rgb in (("LV cavity", (255, 64, 64)), ("LV myocardium", (64, 220, 64)), ("RV cavity", (64, 128, 255))):
        assert max(abs(a - b) for a, b in zip(by_name[name], rgb, strict=True)) <= 2, (name, by_name[name])


def test_manifest_colour_out_of_range_is_one_line_naming_the_key():
    import yaml

    from dicom_node.errors import ManifestError
    from dicom_node.infer.manifest import parse_manifest

    raw = yaml.safe_load((REPO / "models_onnx" / "cardiac_seg.yaml").read_text())
    raw["segmentation"]["labels"][1]["color_rgb"] = [64, 300, 64]
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "cardiac_seg.yaml")
    message = str(caught.value)
    assert "\n" not in message and "cardiac_seg.yaml" in message
    assert "segmentation.labels.1.color_rgb.1" in message, message


def test_every_ct_sr_measurement_has_geometry(results):
    """Each NUM of the CT report is tied to image coordinates: in its ROI group
    (TID 1410 Image Region) or inferred from the ROIs' circles (TID 300), as
    viewers like OHIF need to place a measurement at all."""
    [sr] = [ds for ds in results["ct_denoise"] if ds.Modality == "SR"]
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in measurements.ContentSequence:
        items = list(group.ContentSequence)
        if any(i.ValueType == "SCOORD" for i in items):
            continue
        for num in (i for i in items if i.ValueType == "NUM"):
            scoords = [c for c in num.ContentSequence if c.ValueType == "SCOORD"]
            assert scoords and all(c.RelationshipType == "INFERRED FROM" and c.GraphicType == "CIRCLE"
                                   for c in scoords), num.ConceptNameCodeSequence[0].CodeMeaning
            assert len(scoords) == (2 if num.ConceptNameCodeSequence[0].CodeValue == "CNR" else 1)
