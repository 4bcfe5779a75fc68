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
