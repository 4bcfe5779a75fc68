"""The command line, run as an operator would."""

from __future__ import annotations

import re
import subprocess
import sys

from pydicom import dcmread

from helpers import REPO, storescu, wait_for, write_ct_series


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_check_config_accepts_default_and_names_bad_key(tmp_path):
    ok = _cli("check-config")
    assert ok.returncode == 0 and "configuration OK" in ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: -1\n")
    out = _cli("-c", str(bad), "check-config")
    assert out.returncode == 2
    assert "node.port" in out.stderr and str(bad) in out.stderr


def test_route_test_explains(tmp_path):
    [ct] = write_ct_series(tmp_path, n=1, size=32, seed="cli")
    ds = dcmread(ct)
    ds.Modality = "MR"
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr)
    out = _cli("route", "test", str(ct), str(mr))
    assert out.returncode == 0
    assert f"{ct}: route ct_cardiac_denoise" in out.stdout
    assert f"{mr}: route none (unrouted)" in out.stdout
    assert "Modality is 'MR', not 'CT'" in out.stdout


def test_models_verify_runs_every_model():
    out = _cli("models", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ct_denoise" in out.stdout and "OK on CPUExecutionProvider" in out.stdout


def test_models_verify_refuses_a_tampered_model(tmp_path):
    import shutil
    models = tmp_path / "models"
    shutil.copytree(REPO / "models_onnx", models, ignore=shutil.ignore_patterns("recipes"))
    onnx = models / "ct_denoise.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    out = _cli("--set", f"inference.models_dir={models}", "models", "verify")
    assert out.returncode == 1
    assert "ct_denoise: FAILED" in out.stdout and "sha256" in out.stdout


def test_complete_now_and_jobs(node_factory, tmp_path):
    node = node_factory(routes=[{"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise",
                                 "destinations": ["out"], "quiet_seconds": 3600,
                                 "match": [{"keyword": "Modality", "equals": "CT"}]}]).start()
    files = write_ct_series(tmp_path / "in", n=3, size=96, seed="complete")
    for f in files:  # no announced count: only the operator completes it
        ds = dcmread(f)
        del ds.ImagesInAcquisition
        ds.save_as(f)
    storescu(node.port, files)
    series = str(dcmread(files[0]).SeriesInstanceUID)
    out = node.cli("complete", series)
    assert out.returncode == 0, out.stderr
    store = node.store()
    wait_for(lambda: any(j.state == "done" for j in store.jobs()), 60, what="job done")
    jobs = node.cli("jobs", "--state", "done")
    header, row = jobs.stdout.splitlines()
    assert header.split()[:5] == ["ID", "STATE", "ROUTE", "PIPELINE", "MODEL"]
    assert row.split()[1:5] == ["done", "ct", "ct_denoise", "ct_denoise"]
    assert node.cli("complete", "1.2.3.4").returncode == 1
    # Results went to the folder destination under the data dir.
    wait_for(lambda: len(list((node.data_dir / "out").glob("*.dcm"))) == 4, 30, what="4 results in the folder")


def test_default_config_serves_and_demo_shows_results(tmp_path):
    """What a newcomer does: `make run` (the embedded config), then `dicom-node demo`."""
    import os
    import signal

    from helpers import free_port, http_get
    overrides = ["--set", f"node.port={free_port()}", "--set", f"node.http.port={free_port()}",
                 "--set", f"node.data_dir={tmp_path / 'data'}"]
    http_port = overrides[3].split("=")[1]
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "-c", str(REPO / "conf/node.yaml"),
                             *overrides, "serve"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, 60, what="ready")
        demo = subprocess.run([sys.executable, "-m", "dicom_node.cli", *overrides, "demo", "--slices", "4",
                               "--size", "128", "--timeout", "60"], capture_output=True, text=True,
                              timeout=200)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        # One study per default route: CT (4 slices -> 4 derived + SR),
        # cine MR (2 SEG + SR + SC) and a radiograph (SR + SC).
        assert "[ct_denoise]" in demo.stdout and "sent 4/4 instances" in demo.stdout
        assert "[cardiac_seg]" in demo.stdout and "[cxr_triage]" in demo.stdout
        assert demo.stdout.count("done:") == 3
        # It ends with what came back, read from the result objects.
        summary = demo.stdout.split("summary (read from the result objects):\n")[1].splitlines()
        assert len(summary) == 3, demo.stdout
        ct, mr, cxr = (line.split(None, 1) for line in summary)
        assert ct[0] == "CT" and re.fullmatch(r"4 denoised slices \+ SR, noise (\d+)\u2192(\d+) HU", ct[1])
        before, after = map(int, re.fullmatch(r".*noise (\d+)\u2192(\d+) HU", ct[1]).groups())
        assert after < before
        assert mr[0] == "MR" and re.fullmatch(r"LVEF \d+ %, SEG ED/ES", mr[1]), mr
        assert cxr[0] == "CXR" and re.fullmatch(r"(ABNORMAL|NORMAL) p = [01]\.\d\d", cxr[1]), cxr
        assert len(list((tmp_path / "data" / "results").glob("*.dcm"))) == 5 + 4 + 2
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        assert node.wait(60) == 0
