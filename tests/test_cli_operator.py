"""The CLI and the log as an operator uses them: options after the
subcommand, tables and --json, errors for filters that do not exist, safe
pipes, `echo`, and a log that tells one study's story once."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from helpers import NODELAY_ENV, NodeProcess, ct_route, free_port, storescu, wait_for, write_ct_series


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False)


class _JsonLogNode(NodeProcess):
    """``serve --json-logs``, options after the subcommand."""

    def start(self, wait: bool = True) -> _JsonLogNode:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config_path),
             "--json-logs"], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            start_new_session=True)
        if wait:
            wait_for(self.ready, 60, 0.1, "node ready")
        return self

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """One CT study from MY_CT through a node (routed, one job, one delivery)
    and one MR series from MY_MR that no route takes."""
    work = tmp_path_factory.mktemp("story")
    node = _JsonLogNode(work / "node", routes=[ct_route(quiet_seconds=1.0)])
    node.start()
    try:
        ct = write_ct_series(work / "ct", n=3, size=96, seed="story")
        storescu(node.port, ct, aet="MY_CT")
        mr = write_ct_series(work / "mr", n=2, size=32, seed="story-mr")
        for path in mr:
            ds = dcmread(path)
            ds.Modality = "MR"
            ds.save_as(path)
        storescu(node.port, mr, aet="MY_MR")
        store = node.store()
        wait_for(lambda: [i for i in store.outbox_items() if i.state == "sent"] and
                 all(i.state == "sent" for i in store.outbox_items()), 90, 0.2, "results sent")
        mr_series = str(dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID)
        # Unrouted series wait out their quiet period (10 s) before they are logged.
        wait_for(lambda: (s := store.series(mr_series)) is not None and s.state == "complete",
                 30, 0.2, "the unrouted series completed")
        wait_for(lambda: any("delivered" in r["msg"] for r in node.records()), 10, 0.1,
                 "the delivery line")
        yield node, str(dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID), mr_series
    finally:
        node.kill9()


def test_log_tells_one_studys_story_once(story):
    node, ct_series, _ = story
    records = node.records()
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assoc = [r for r in records if r["msg"].startswith("association from MY_CT@")]
    assert len(assoc) == 1, assoc
    assert assoc[0]["calling_ae"] == "MY_CT" and assoc[0]["instances"] == 3
    assert assoc[0]["bytes"] > 0 and assoc[0]["refused"] == 0 and assoc[0]["end"] == "released"
    assert assoc[0]["peer"].startswith("127.0.0.1:") and assoc[0]["duration_s"] >= 0
    series = [r for r in records if r.get("series_uid") == ct_series and "complete" in r["msg"]]
    assert len(series) == 1 and series[0]["route"] == "ct" and "from MY_CT" in series[0]["msg"]
    job_id = series[0]["job_id"]
    jobs = [r for r in records if r.get("job_id") == job_id and r["logger"] == "dicom_node.worker"]
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert (job["state"], job["pipeline"], job["model"]) == ("done", "ct_denoise", "ct_denoise")
    assert job["provider"] == "CPUExecutionProvider" and job["duration_s"] > 0
    assert "{" not in job["msg"], "the summary is fields of the record, not a dict in msg"
    deliveries = [r for r in records if r["msg"].startswith("delivered")]
    assert len(deliveries) == 1, deliveries
    assert (deliveries[0]["destination"], deliveries[0]["job_id"], deliveries[0]["count"]) == ("out", job_id, 4)
    assert not [r for r in records if r["logger"].startswith(("highdicom", "pynetdicom"))
                and r["level"] == "info"]


def test_unrouted_series_is_logged_once_and_listed_with_its_reason(story):
    node, _, mr_series = story
    lines = [r for r in node.records() if r.get("series_uid") == mr_series]
    assert len(lines) == 1 and lines[0]["route"] is None
    assert "Modality is 'MR', not 'CT'" in lines[0]["unrouted_reason"]
    table = node.cli("series", "--unrouted")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:5] == ["SERIES", "MODALITY", "FROM", "TO", "INSTANCES"]
    [row] = rows
    assert row.startswith(mr_series) and "MY_MR" in row and "unrouted: ct: Modality is 'MR'" in row


def test_tables_have_headers_and_json_parses(story):
    node, ct_series, mr_series = story
    jobs = node.cli("jobs")
    assert jobs.returncode == 0, jobs.stderr
    header, row = jobs.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "ROUTE", "PIPELINE", "MODEL", "FROM", "SERIES",
                              "CREATED", "DURATION", "TRIES", "REASON"]
    # Aligned: every column starts where its header does.
    for name, value in (("STATE", "done"), ("FROM", "MY_CT"), ("DURATION", "")):
        if value:
            assert row[header.index(name):].startswith(value), (header, row)
    assert " s " in row[header.index("DURATION"):]  # a duration, in seconds
    [job] = json.loads(node.cli("jobs", "--json").stdout)
    assert job["state"] == "done" and job["series_uids"] == [ct_series] and job["calling_ae"] == "MY_CT"
    assert job["duration_s"] > 0 and job["finished_at"] >= job["started_at"]
    items = json.loads(node.cli("outbox", "list", "--json", "--state", "sent").stdout)
    assert len(items) == 4 and {i["destination"] for i in items} == {"out"}
    out = node.cli("outbox", "list")
    assert out.stdout.splitlines()[0].split()[:4] == ["ID", "JOB", "DESTINATION", "STATE"]
    assert len(out.stdout.splitlines()) == 5
    series = json.loads(node.cli("series", "--json").stdout)
    assert {s["series_uid"] for s in series} == {ct_series, mr_series}
    # Filters that name nothing are errors: exit 2, one line.
    for args in (["jobs", "--state", "bogus"], ["jobs", "--route", "nope"],
                 ["outbox", "list", "--destination", "nope"], ["series", "--state", "bogus"]):
        bad = node.cli(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_options_after_the_subcommand(story):
    node, _, _ = story
    before = _cli("-c", str(node.config_path), "jobs", "--json")
    after = _cli("jobs", "--json", "-c", str(node.config_path))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    # --set before and after add up; after the subcommand it is still an override.
    wrong = _cli("--set", "node.data_dir=/nonexistent", "jobs", "-c", str(node.config_path),
                 "--set", f"node.data_dir={node.data_dir}")
    assert wrong.returncode == 0, wrong.stderr
    # The node itself was started with `serve --config ... --json-logs` (see _JsonLogNode).


def test_a_closed_pipe_is_not_an_error(tmp_path):
    from dicom_node.store.db import Store

    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{data_dir: {tmp_path / 'data'}}}\n"
                      "destinations: [{name: out, kind: folder, path: out}]\n")
    Store(tmp_path / "data" / "node.db").close()
    db = sqlite3.connect(tmp_path / "data" / "node.db")
    now = time.time()
    db.execute("INSERT INTO jobs (id, route, pipeline, model, group_key, series_uids, generation, "
               "calling_ae, created_at, completed_at) VALUES (1, 'ct', 'ct_denoise', 'ct_denoise', "
               "'g', '[]', 0, 'MY_CT', ?, ?)", (now, now))
    db.executemany("INSERT INTO outbox (job_id, destination, path, sop_uid, sop_class, next_at, "
                   "created_at) VALUES (1, 'out', ?, ?, '1.2', ?, ?)",
                   [(f"/x/{i}.dcm", f"1.2.{i}", now, now) for i in range(5000)])
    db.commit()
    db.close()
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "-c", str(config), "outbox",
                             "list", "--limit", "5000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ID")
    proc.stdout.close()  # what `| head -1` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def _echo_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "node.yaml"
    config.write_text(
        f"node: {{data_dir: {tmp_path / 'data'}}}\n"
        f"peers: [{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {port}}}]\n"
        "destinations: [{name: pacs, kind: dicom, peer: pacs}, {name: out, kind: folder, path: out},\n"
        "               {name: back, kind: sender}]\n")
    return config


def test_echo_a_destination(tmp_path):
    port = free_port()
    config = _echo_config(tmp_path, port)
    scp = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(tmp_path), str(port)],
                           env=NODELAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answered():
            out = _cli("echo", "pacs", "-c", str(config))
            return out if out.returncode == 0 else None
        out = wait_for(answered, 30, 0.2, "storescp answering C-ECHO")
        assert f"echo pacs: PACS@127.0.0.1:{port} answered C-ECHO in" in out.stdout
        assert "calling AE DICOM_NODE" in out.stdout
    finally:
        scp.terminate()
        scp.wait(10)
    closed = _cli("echo", "pacs", "-c", str(config), "--timeout", "5")
    assert closed.returncode == 1
    line = closed.stderr.strip().splitlines()[-1]
    assert f"echo pacs: PACS@127.0.0.1:{port} FAILED: cannot connect: Connection refused" in line
    assert "Traceback" not in closed.stderr and "TCP Initialisation Error" not in closed.stderr
    folder = _cli("echo", "out", "-c", str(config))
    assert folder.returncode == 0 and "is writable" in folder.stdout, folder.stderr
    for name in ("nope", "back"):
        bad = _cli("echo", name, "-c", str(config))
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_json_formatter_carries_extras():
    from dicom_node.observability.logs import _JsonFormatter

    record = logging.LogRecord("dicom_node.worker", logging.INFO, __file__, 1, "job %d done", (7,), None)
    record.__dict__.update(job_id=7, duration_s=1.5, series_uid=["1.2.3"], path=Path("/x"))
    body = json.loads(_JsonFormatter().format(record))
    assert body["msg"] == "job 7 done" and body["job_id"] == 7 and body["duration_s"] == 1.5
    assert body["series_uid"] == ["1.2.3"] and body["path"] == "/x"
