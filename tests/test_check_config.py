"""One validation, at `check-config` and at `serve`: every mistake class gives
one line naming the key and the reason, a non-zero exit and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import free_port

BASE = {
    "destinations": [{"name": "out", "kind": "folder", "path": "out"}],
    "routes": [{"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise", "destinations": ["out"],
                "match": [{"keyword": "Modality", "equals": "CT"}]}],
    "inference": {"providers": ["CPUExecutionProvider"]},
}


def _config(folder: Path, **node) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"port": free_port(), "http": {"port": free_port()}, "data_dir": "data", **node}
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump({"node": settings, **BASE}))
    return path


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env, check=False)


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    return lines[0]


# (--set overrides, what the line must say)
MISTAKES = {
    "pipeline name": (["routes.ct.pipeline=ct_denoize"],
                      "routes.ct.pipeline: unknown pipeline 'ct_denoize' (did you mean ct_denoise?)"),
    "model name": (["routes.0.model=ct_denoize"],
                   "routes.ct.model: no manifest ct_denoize.yaml in"),
    "model of the wrong kind": (["routes.ct.model=cxr_triage"],
                                ("routes.ct.model: cxr_triage does not suit pipeline ct_denoise: model "
                                 "cxr_triage is a classification model; ct_denoise needs image-to-image")),
    "match keyword": (["routes.ct.match=[{keyword: Modalty, equals: CT}]"],
                      "routes.ct.match.0.keyword: 'Modalty' is not a DICOM keyword (did you mean Modality?)"),
    "data dir": (["node.data_dir=/etc/passwd/data"],
                 "node.data_dir: /etc/passwd/data cannot be created: /etc/passwd is not a folder"),
    "peer host": (["peers=[{name: pacs, ae_title: PACS, host: no-such-host.invalid, port: 104}]",
                   "destinations=[{name: out, kind: dicom, peer: pacs}]"],
                  "peers.pacs.host: 'no-such-host.invalid' does not resolve"),
    "list item by name": (["routes.nope.quiet_seconds=5"],
                          "--set routes.nope.quiet_seconds: no entry named 'nope' in routes (entries: ct)"),
    "list index": (["routes.3.quiet_seconds=5"],
                   "--set routes.3.quiet_seconds: routes has 1 entries, no index 3"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_check_config_rejects_each_mistake_in_one_line(tmp_path, case):
    overrides, expected = MISTAKES[case]
    config = _config(tmp_path)
    sets = [arg for pair in overrides for arg in ("--set", pair)]
    out = _cli("check-config", "-c", str(config), *sets)
    assert out.returncode == 2, out.stdout + out.stderr
    line = _one_line(out)
    assert line.startswith("dicom-node: ") and expected in line, line
    assert out.stdout == ""


@pytest.mark.parametrize("case", ["pipeline name", "model of the wrong kind", "match keyword", "data dir"])
def test_serve_refuses_what_check_config_rejects(tmp_path, case):
    overrides, expected = MISTAKES[case]
    config = _config(tmp_path)
    sets = [arg for pair in overrides for arg in ("--set", pair)]
    out = _cli("serve", "-c", str(config), *sets)
    assert out.returncode == 2, out.stderr
    assert expected in _one_line(out)
    assert not (tmp_path / "data").exists()  # refused before anything was made


@pytest.mark.parametrize("key", ["node.port", "node.http.port"])
def test_serve_names_the_port_in_use_and_its_key(tmp_path, key):
    port = free_port()
    config = _config(tmp_path)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        out = _cli("serve", "-c", str(config), "--set", f"{key}={port}")
        assert out.returncode == 2, out.stderr
        assert f"{key}: port {port} on 127.0.0.1 is already in use" in _one_line(out)
        # check-config only warns: the running node itself holds its ports.
        check = _cli("check-config", "-c", str(config), "--set", f"{key}={port}")
        assert check.returncode == 0, check.stderr
        assert f"warning: {key}: port {port}" in check.stderr


def test_set_on_list_items_by_name_and_index(tmp_path):
    config = _config(tmp_path)
    for key in ("routes.ct.quiet_seconds", "routes.0.quiet_seconds"):
        out = _cli("check-config", "-c", str(config), "--set", f"{key}=5")
        assert out.returncode == 0, out.stderr
        assert yaml.safe_load(out.stdout)["routes"][0]["quiet_seconds"] == 5.0


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = _config(tmp_path / "etc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _cli("check-config", "-c", str(config), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert f"data dir {tmp_path / 'etc' / 'data'}" in out.stderr
    # Nothing was created in the working directory (nor the data dir: only checked).
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "etc" / "data").exists()


def test_without_c_the_config_comes_from_the_environment(tmp_path):
    config = _config(tmp_path / "site")
    env = {**os.environ, "DICOM_NODE_CONFIG": str(config)}
    out = _cli("check-config", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert f"dicom-node: using {config} (from $DICOM_NODE_CONFIG)" in out.stderr
    assert f"data dir {tmp_path / 'site' / 'data'}" in out.stderr
    # No database yet: the list commands say so rather than show empty lists.
    jobs = _cli("jobs", cwd=tmp_path, env=env)
    assert jobs.returncode == 2 and "no node database at" in jobs.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "site" / "data").exists()


def test_embedded_default_keeps_its_data_in_the_checkout(tmp_path):
    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if k != "DICOM_NODE_CONFIG"}
    out = _cli("check-config", "-c", str(REPO / "conf" / "node.yaml"), cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert f"data dir {REPO / 'data'}" in out.stderr  # where `make run` keeps it
