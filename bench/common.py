"""Shared set-up for the benchmarks: a generated CT series on disk and the
reference peers (dcmtk's storescp, Orthanc) with TCP_NODELAY=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.filewriter import dcmwrite

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import NodeProcess, Orthanc, free_port, wait_for, write_datasets  # noqa: E402

from dicom_node_synthetic import ct_phantom  # noqa: E402
from dicom_node_synthetic.dicom_ct import ct_series  # noqa: E402

NODELAY = {**os.environ, "TCP_NODELAY": "1"}

__all__ = ["NODELAY", "NodeProcess", "Orthanc", "free_port", "wait_for", "make_series", "write_datasets",
           "StoreSCP", "storescu_time", "workdir", "end_to_end_seconds", "TimedModel", "stage_line",
           "JsonLogNode", "scp_json_node"]


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))


def make_series(folder: Path, n: int = 300, size: int = 512, seed: str = "bench") -> list[Path]:
    """``n`` slices of ``size``² CT: one phantom slice, fresh noise per slice
    (the projection simulation for 300 slices would dominate the bench)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = ct_phantom.make_slice(rng, size=size).low_dose_hu
    vol = base[None] + rng.normal(0, 10, (n, size, size)).astype(np.float32)
    paths = []
    for i, ds in enumerate(ct_series(vol, seed=seed)):
        path = folder / f"{i:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


class StoreSCP:
    """dcmtk's storescp writing every instance to disk."""

    def __init__(self, out: Path, fork: bool = False) -> None:
        self.port = free_port()
        out.mkdir(parents=True, exist_ok=True)
        args = ["storescp", "-od", str(out), "-aet", "STORESCP", "--max-pdu", "131072"]
        if fork:
            args.append("--fork")
        self.proc = subprocess.Popen([*args, str(self.port)], env=NODELAY,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(self.port)],
                                        env=NODELAY, capture_output=True).returncode == 0, 20)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def storescu_time(port: int, aec: str, files: list[Path], parallel: int = 1) -> float:
    """Seconds for ``parallel`` storescu processes to send ``files`` between them."""
    chunks = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", aec, "--max-pdu", "131072", "127.0.0.1", str(port),
                               *map(str, chunk)], env=NODELAY, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for chunk in chunks]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"storescu failed: {p.stderr.read().decode()[-500:]}")
    return time.perf_counter() - start


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def end_to_end_seconds(node: NodeProcess, expected_results: int, timeout: float = 600,
                       job_index: int = 0) -> float:
    """Seconds from the node's completion of a job's series (the first job,
    or the ``job_index``-th in order of creation) to the destination's
    acknowledgement of its last result object."""
    store = node.store()

    def job_and_items():
        jobs = sorted(store.jobs(), key=lambda j: j.id)
        if len(jobs) <= job_index:
            return None, []
        job = jobs[job_index]
        return job, [i for i in store.outbox_items() if i.job_id == job.id]

    wait_for(lambda: (lambda items: len(items) >= expected_results and all(i.state == "sent" for i in items))(
        job_and_items()[1]), timeout, 0.1, f"{expected_results} results acknowledged")
    job, items = job_and_items()
    last_ack = max(i.sent_at for i in items if i.sent_at)
    return last_ack - job.completed_at


class JsonLogNode(NodeProcess):
    """A node that logs one JSON object per line, so that a bench can read
    each job's stage times as the worker measured them."""

    def start(self, wait: bool = True) -> JsonLogNode:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "-c", str(self.config_path), "serve", "--json-logs"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        if wait:
            wait_for(self.ready, 60, 0.1, "node ready")
        return self

    def job_stages(self, job_index: int) -> dict[str, float]:
        """Seconds of each stage of the ``job_index``-th job, in order: the
        wait for a worker to claim it ("claim"), the worker's own stages
        (decode, inference, encode, write) from its line for the job, the
        rest of its run ("read and record": reading the series, recording the
        results), and the queued results' sending up to the last
        acknowledgement ("send").  {} if the job's line is absent."""
        import json
        store = self.store()
        jobs = sorted(store.jobs(), key=lambda j: j.id)
        if len(jobs) <= job_index:
            return {}
        job = jobs[job_index]
        for line in self.log().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("job_id") == job.id and rec.get("state") == "done":
                break
        else:
            return {}
        stages = {k[:-2]: float(v) for k, v in rec.items()
                  if k.endswith("_s") and k != "duration_s" and isinstance(v, (int, float))}
        items = [i for i in store.outbox_items() if i.job_id == job.id]
        queued = min(i.created_at for i in items)
        acked = max(i.sent_at or queued for i in items)
        return {"claim": max(0.0, queued - job.completed_at - rec["duration_s"]), **stages,
                "read and record": max(0.0, rec["duration_s"] - sum(stages.values())),
                "send": acked - queued}


def scp_json_node(root: Path, scp: StoreSCP, route: dict) -> JsonLogNode:
    """A JSON-logging node whose route sends to ``scp``."""
    return JsonLogNode(root / "node", peers=[{"name": "scp", "ae_title": "STORESCP", "host": "127.0.0.1",
                                              "port": scp.port}],
                       destinations=[{"name": "scp", "kind": "dicom", "peer": "scp"}],
                       routes=[{**route, "destinations": ["scp"]}]).start()


class TimedModel:
    """A loaded model whose ``run`` calls are timed: the model's own time,
    without the pipeline's pre- and post-processing around it."""

    def __init__(self, model) -> None:
        self._model = model
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def run(self, inputs, outputs=None):
        start = time.perf_counter()
        try:
            return self._model.run(inputs, outputs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def stage_line(timings: dict) -> str:
    return ", ".join(f"{k} {v:.3f} s" for k, v in timings.items())


def scp_node(root: Path, scp: StoreSCP, route: dict) -> NodeProcess:
    """A node whose route sends to ``scp``."""
    return NodeProcess(root / "node", peers=[{"name": "scp", "ae_title": "STORESCP", "host": "127.0.0.1",
                                              "port": scp.port}],
                       destinations=[{"name": "scp", "kind": "dicom", "peer": "scp"}],
                       routes=[{**route, "destinations": ["scp"]}]).start()
