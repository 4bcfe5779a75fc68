"""Cardiac MRI and CXR triage end to end: storescu -> dicom-node -> Orthanc."""

from __future__ import annotations


import numpy as np

from dicom_node_synthetic import cardiac_phantom, cxr_phantom
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.dicom_mr import cine_series
from helpers import dciodvfy_errors, storescu, wait_for, write_datasets

SEG, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"


def _sop_classes(orthanc, n: int) -> list[str]:
    instances = wait_for(lambda: (lambda i: i if len(i) >= n else None)(orthanc.instances()), 180, 0.25,
                         f"{n} results in Orthanc")
    return sorted(orthanc.get(f"/instances/{i['ID']}/simplified-tags")["SOPClassUID"] for i in instances)


def test_cine_sent_as_one_series_per_slice_gives_seg_sr_sc(node_factory, orthanc, tmp_path):
    route = {"name": "cine", "pipeline": "cardiac_seg", "model": "cardiac_seg", "destinations": ["pacs"],
             "quiet_seconds": 2, "group_by": "study",
             "match": [{"keyword": "Modality", "equals": "MR"}]}
    node = node_factory(peers=[orthanc.peer()], destinations=[{"name": "pacs", "kind": "dicom", "peer": "pacs"}],
                        routes=[route]).start()
    study = cardiac_phantom.make_cine(np.random.default_rng(5), n_slices=6, n_phases=8, size=160)
    files = write_datasets(tmp_path / "cine", cine_series(study.images, seed="e2e-cine", per_slice_series=True,
                                                  pixel_spacing_mm=study.pixel_spacing_mm,
                                                  slice_spacing_mm=study.slice_spacing_mm))
    storescu(node.port, files)
    classes = _sop_classes(orthanc, 4)
    assert classes.count(SEG) == 2 and classes.count(SC) == 1
    store = node.store()
    [job] = store.jobs()
    assert job.state == "done" and len(job.series_uids) == 6, "one job for the whole study"
    for path in (node.data_dir / "outgoing").glob("job-*/*.dcm"):
        assert dciodvfy_errors(path) == [], path


def test_abnormal_cxr_goes_to_the_priority_destination(node_factory, orthanc, tmp_path):
    route = {"name": "cxr", "pipeline": "cxr_triage", "model": "cxr_triage", "destinations": ["pacs"],
             "result_destinations": {"abnormal": ["pacs", "priority"]}, "quiet_seconds": 1,
             "match": [{"keyword": "Modality", "one_of": ["DX", "CR"]}]}
    node = node_factory(peers=[orthanc.peer()],
                        destinations=[{"name": "pacs", "kind": "dicom", "peer": "pacs"},
                                      {"name": "priority", "kind": "folder", "path": "priority"}],
                        routes=[route]).start()
    rad = cxr_phantom.make_radiograph(np.random.default_rng(8), "pneumothorax", size=(768, 640),
                                      severity="obvious")
    files = write_datasets(tmp_path / "cxr", [dx_image(rad.image, seed="e2e-cxr")])
    storescu(node.port, files)
    classes = _sop_classes(orthanc, 2)
    assert SC in classes and any(c.startswith("1.2.840.10008.5.1.4.1.1.88") for c in classes)
    [job] = node.store().jobs()
    wait_for(lambda: len(list((node.data_dir / "priority").glob("*.dcm"))) == 2, 30,
             what="abnormal results in the priority folder")
