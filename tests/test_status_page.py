"""The status page and its JSON API: what it shows, what it never shows, and
its POST actions behind a token or basic auth.

The in-process tests drive a HealthServer with a StatusPage over a store
filled through the store's own steps (receive, complete, claim, finish).
The browser test runs a real node on a processed CT study, a CXR and an
unrouted series, loads the page in headless Chromium (Debian's chromium),
checks its DOM and keeps a screenshot (also copied to
$DICOM_NODE_SCREENSHOT_DIR when set).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import (
    REPO,
    free_port,
    http_get,
    storescu,
    wait_for,
    write_ct_series,
    write_datasets,
)
from prometheus_client import CollectorRegistry

from dicom_node.config import Config, HttpSettings, load_config
from dicom_node.errors import ConfigError
from dicom_node.observability.http import HealthServer
from dicom_node.observability.status import StatusPage
from dicom_node.store.db import InstanceRecord, Store

TOKEN = "s3cret-token-for-tests"
SECRET_NAME = "SECRET^PATIENT"
SECRET_ID = "PID-SECRET-42"
HOSTILE_AE = "<b>X&Y</b>"


# -- a store in a known state --------------------------------------------------------------

def _series(store: Store, uid: str, calling_ae: str, n: int = 3, modality: str = "CT") -> list:
    for i in range(n):
        store.record_instance(
            InstanceRecord(f"{uid}.{i}", "1.2.840.10008.5.1.4.1.1.2", f"{uid}.0", uid,
                           "1.2.840.10008.1.2.1", f"{uid}/{i}.dcm", 100),
            modality=modality, calling_ae=calling_ae, called_ae="DICOM_NODE", expected_count=None)
    return [store.series(uid)]


def _job(store: Store, uid: str, state: str, tmp: Path, reason: str | None = None,
         dest: str = "out") -> int:
    job_id = store.complete_series(_series(store, uid, "MY_CT"), route="ct", pipeline="ct_denoise",
                                   model="ct_denoise", group_key=uid)
    store.set_route(uid, "ct", None)
    claimed = store.claim_job("worker-0")
    assert claimed.id == job_id
    folder = tmp / "outgoing" / f"job-{job_id}"
    folder.mkdir(parents=True)
    results = []
    for i in range(2):
        path = folder / f"{i}.dcm"
        path.write_bytes(b"x")
        results.append((dest, str(path), f"{uid}.r{i}", "1.2.840.10008.5.1.4.1.1.88.22"))
    store.finish_job(job_id, state, reason, results)
    return job_id


@pytest.fixture
def filled(tmp_path):
    data = tmp_path / "data"
    store = Store(data / "node.db")
    ids = {
        "done": _job(store, "1.2.3.1", "done", data),
        "held": _job(store, "1.2.3.2", "held", data, reason="lvef 140 % outside plausible 5-95"),
        "failed": _job(store, "1.2.3.3", "failed", data, reason="PipelineError: no slices"),
    }
    # An unrouted series from a caller whose AE title holds markup.
    series = _series(store, "1.2.3.9", HOSTILE_AE, n=2, modality="MR")
    store.complete_series(series, route=None, pipeline=None, model=None, group_key="1.2.3.9")
    store.set_route("1.2.3.9", None, "no route matched: Modality MR <not CT>")
    # A dead letter whose error holds markup.
    [item, *_] = [i for i in store.outbox_items(ids["done"])]
    store.mark_dead(item.id, "<script>alert(1)</script> association rejected")
    return store, ids, data


def _config(data: Path, http: dict | None = None, pacs_port: int = 1) -> Config:
    raw = {
        "node": {"data_dir": str(data), "http": {"host": "127.0.0.1", "port": 0, **(http or {})}},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "destinations": [{"name": "out", "kind": "folder", "path": str(data / "out")},
                         {"name": "pacs", "kind": "dicom", "peer": "pacs"}],
        "routes": [{"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise",
                    "destinations": ["out"], "match": [{"keyword": "Modality", "equals": "CT"}]}],
        "inference": {"providers": ["CPUExecutionProvider"]},
    }
    path = data.parent / "node.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


class Server:
    def __init__(self, config: Config, store: Store) -> None:
        checks = {"store": lambda: None, "disk": lambda: None, "model ct_denoise": lambda: None}
        self.http = HealthServer("127.0.0.1", 0, CollectorRegistry(), checks)
        self.http.status = StatusPage(config, store, self.http.readiness)
        self.http.start()
        self.base = f"http://127.0.0.1:{self.http.address[1]}"

    def get(self, path: str) -> tuple[int, str]:
        status, body = http_get(self.base + path)
        return status, body.decode()

    def post(self, path: str, headers: dict | None = None, data: bytes = b"",
             redirect: bool = False) -> tuple[int, dict, dict]:
        req = urllib.request.Request(self.base + path, data=data, method="POST", headers=headers or {})
        opener = urllib.request.build_opener(*([] if redirect else [_NoRedirect()]))
        try:
            with opener.open(req, timeout=30) as rsp:
                body, code, hdrs = rsp.read(), rsp.status, dict(rsp.headers)
        except urllib.error.HTTPError as exc:
            body, code, hdrs = exc.read(), exc.code, dict(exc.headers)
        return code, (json.loads(body) if body and hdrs.get("Content-Type", "").startswith(
            "application/json") else {}), hdrs


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture
def serve():
    servers = []

    def make(config: Config, store: Store) -> Server:
        servers.append(Server(config, store))
        return servers[-1]

    yield make
    for s in servers:
        s.http.stop()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


# -- reading ----------------------------------------------------------------------------------

def test_page_shows_jobs_series_outbox_and_escapes_everything(filled, serve):
    store, ids, data = filled
    server = serve(_config(data), store)
    status, page = server.get("/")
    assert status == 200
    for needle in ("Readiness", "Disk", "Models", "Outbox", "Jobs", "Received series", "ct_denoise",
                   "MY_CT", "1.2.3.1", "lvef 140 %", f'id="job-{ids["held"]}"', "unrouted: no route matched"):
        assert needle in page, needle
    # Every value escaped: the hostile AE title and error never become markup.
    assert HOSTILE_AE not in page and "&lt;b&gt;X&amp;Y&lt;/b&gt;" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;not CT&gt;" in page
    # No actions without auth configured: no forms at all.
    assert "<form" not in page and "Read-only" in page


def test_json_api(filled, serve):
    store, ids, data = filled
    server = serve(_config(data), store)
    status, body = server.get("/api/status")
    snap = json.loads(body)
    assert status == 200 and snap["ready"] is True
    assert {j["id"]: j["state"] for j in snap["jobs"]} == {v: k for k, v in ids.items()}
    [out] = [d for d in snap["destinations"] if d["name"] == "out"]
    assert out["counts"]["dead"] == 1 and out["counts"]["held"] == 2 and "rejected" in out["last_error"]
    assert snap["disk"]["watermark_bytes"] == 1024 ** 3
    [model] = snap["models"]
    assert model["model"] == "ct_denoise" and model["routes"] == ["ct"] and model["check"] == "ok"
    held = json.loads(server.get("/api/jobs?state=held")[1])["jobs"]
    assert [j["id"] for j in held] == [ids["held"]] and held[0]["calling_ae"] == "MY_CT"
    assert held[0]["duration_s"] is not None and "held for review" in held[0]["outcome"]
    job = json.loads(server.get(f"/api/jobs/{ids['done']}")[1])
    assert len(job["outbox"]) == 2
    unrouted = json.loads(server.get("/api/series?unrouted=1")[1])["series"]
    assert [s["series_uid"] for s in unrouted] == ["1.2.3.9"] and unrouted[0]["calling_ae"] == HOSTILE_AE
    assert server.get("/api/jobs?state=bogus")[0] == 400
    assert server.get("/api/jobs?limit=x")[0] == 400
    assert server.get("/api/jobs/999")[0] == 404
    assert server.get("/api/nothing")[0] == 404
    # The older endpoints are untouched.
    assert server.get("/healthz") == (200, '{"status": "alive"}')
    assert server.get("/metrics")[0] == 200


def test_path_prefix_for_a_reverse_proxy(filled, serve):
    store, _, data = filled
    server = serve(_config(data, {"path_prefix": "/imaging/dicom-node/"}), store)
    status, page = server.get("/imaging/dicom-node/")
    assert status == 200 and 'href="/imaging/dicom-node/api/status"' in page
    # A proxy that strips the prefix works too; other paths do not.
    assert server.get("/api/status")[0] == 200
    assert server.get("/imaging/dicom-node/api/status")[0] == 200
    assert server.get("/imaging/dicom-node/readyz")[0] == 200
    assert server.get("/imaging/other/")[0] == 404


def test_settings_are_validated():
    with pytest.raises(ValueError, match="path_prefix"):
        HttpSettings(path_prefix="no-slash")
    with pytest.raises(ValueError, match="at least 12"):
        HttpSettings(token="short")
    with pytest.raises(ValueError, match="together"):
        HttpSettings(username="admin")
    with pytest.raises(ValueError, match="extra"):
        HttpSettings(tokn=TOKEN)
    settings = HttpSettings(token=TOKEN)
    assert TOKEN not in repr(settings) and settings.actions_enabled
    assert not HttpSettings().actions_enabled and HttpSettings().host == "127.0.0.1"


def test_settings_errors_name_the_key(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": {"http": {"path_prefix": "x y"}}}))
    with pytest.raises(ConfigError, match=r"node\.http\.path_prefix"):
        load_config(path)


# -- actions ------------------------------------------------------------------------------------

def test_post_is_403_without_auth_configured(filled, serve):
    store, ids, data = filled
    server = serve(_config(data), store)
    code, body, _ = server.post(f"/api/jobs/{ids['held']}/release", BEARER)
    assert code == 403 and "node.http.token" in body["error"]
    assert store.job(ids["held"]).state == "held"


def test_token_actions(filled, serve):
    store, ids, data = filled
    server = serve(_config(data, {"token": TOKEN}), store)
    held = ids["held"]
    assert server.post(f"/api/jobs/{held}/release")[0] == 401
    assert server.post(f"/api/jobs/{held}/release", {"Authorization": "Bearer wrong-token-xyz"})[0] == 401
    # A cross-site form post is refused even with the right credentials.
    assert server.post(f"/api/jobs/{held}/release",
                       {**BEARER, "Origin": "http://evil.example", "Host": "node:9109"})[0] == 403
    assert store.job(held).state == "held"
    # A reverse proxy that rewrites Host passes the browser's in X-Forwarded-Host.
    proxied = {**BEARER, "Origin": "https://gw.example", "Host": "127.0.0.1:9109",
               "X-Forwarded-Host": "gw.example"}
    assert server.post(f"/api/jobs/{ids['failed']}/retry", proxied)[0] == 200
    assert server.post(f"/api/jobs/{ids['failed']}/retry", {**proxied, "X-Forwarded-Host": "x.example"})[0] == 403
    # Retrying a held job is refused: it is released or discarded instead.
    code, body, _ = server.post(f"/api/jobs/{held}/retry", BEARER)
    assert code == 409 and "held" in body["error"]
    code, body, _ = server.post(f"/api/jobs/{held}/release", BEARER)
    assert code == 200 and body["ok"], body
    assert store.job(held).state == "done"
    assert {i.state for i in store.outbox_items(held)} == {"pending"}
    assert server.post(f"/api/jobs/{held}/release", BEARER)[0] == 409
    # The failed job was queued again above; once queued it cannot be again.
    assert store.job(ids["failed"]).state == "queued"
    assert server.post(f"/api/jobs/{ids['failed']}/retry", BEARER)[0] == 409
    # Revive the dead letter, for one destination.
    code, body, _ = server.post("/api/destinations/out/retry", BEARER)
    assert code == 200 and body["revived"] == 1
    assert not [i for i in store.outbox_items() if i.state == "dead"]
    assert server.post("/api/destinations/nope/retry", BEARER)[0] == 404
    assert server.post("/api/jobs/abc/retry", BEARER)[0] == 400
    # Echo the folder destination.
    code, body, _ = server.post("/api/destinations/out/echo", BEARER)
    assert code == 200 and body["ok"] is False and "missing" in body["message"]
    (data / "out").mkdir()
    assert server.post("/api/destinations/out/echo", BEARER)[1]["ok"] is True
    # GET stays open and read-only; a GET to an action path is not an action.
    assert server.get(f"/api/jobs/{ids['failed']}/retry")[0] == 404


def test_discard_deletes_the_held_files(filled, serve):
    store, ids, data = filled
    server = serve(_config(data, {"token": TOKEN}), store)
    held = ids["held"]
    files = [Path(i.path) for i in store.outbox_items(held)]
    assert all(p.is_file() for p in files)
    code, body, _ = server.post(f"/api/jobs/{held}/discard", BEARER)
    assert code == 200 and "2 result files deleted" in body["message"]
    assert store.job(held).state == "discarded" and not any(p.exists() for p in files)


def test_page_forms_with_token_field_redirect_back(filled, serve):
    store, ids, data = filled
    server = serve(_config(data, {"token": TOKEN, "path_prefix": "/dn"}), store)
    page = server.get("/dn/")[1]
    assert f'action="/dn/api/jobs/{ids["held"]}/release"' in page and 'name="token"' in page
    form = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html,*/*"}
    code, _, headers = server.post(f"/dn/api/jobs/{ids['held']}/release", form, f"token={TOKEN}".encode())
    assert code == 303 and headers["Location"].startswith("/dn/?msg=")
    assert store.job(ids["held"]).state == "done"
    # The message shows on the page it goes back to, escaped.
    _, page = server.get(headers["Location"])
    assert f"job {ids['held']} released" in page
    assert "&lt;i&gt;" in server.get("/dn/?msg=%3Ci%3Ehi")[1]
    # A wrong token in the form is a 401, not a redirect.
    assert server.post(f"/dn/api/jobs/{ids['failed']}/retry", form, b"token=nope-nope-nope")[0] == 401


def test_basic_auth(filled, serve):
    store, ids, data = filled
    server = serve(_config(data, {"username": "pacsadmin", "password": "correct horse battery"}), store)
    code, _, headers = server.post(f"/api/jobs/{ids['failed']}/retry")
    assert code == 401 and headers["WWW-Authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"pacsadmin:nope").decode()
    assert server.post(f"/api/jobs/{ids['failed']}/retry", {"Authorization": f"Basic {wrong}"})[0] == 401
    right = base64.b64encode(b"pacsadmin:correct horse battery").decode()
    assert server.post(f"/api/jobs/{ids['failed']}/retry", {"Authorization": f"Basic {right}"})[0] == 200
    # Basic auth: the browser sends the credentials, the forms need no token field.
    page = server.get("/")[1]
    assert "<form" in page and 'name="token"' not in page


def test_echo_a_dicom_destination(filled, serve, tmp_path):
    """C-ECHO through pynetdicom against dcmtk's storescp, and against nothing."""
    store, _, data = filled
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "--output-directory", str(tmp_path), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = serve(_config(data, {"token": TOKEN}, pacs_port=port), store)

        def answered():
            body = server.post("/api/destinations/pacs/echo", BEARER)[1]
            return body if body.get("ok") else None

        body = wait_for(answered, 30, 0.2, "storescp answering C-ECHO")
        assert f"PACS@127.0.0.1:{port}" in body["message"]
    finally:
        proc.terminate()
        proc.wait(10)
    body = server.post("/api/destinations/pacs/echo", BEARER)[1]
    assert body["ok"] is False and "cannot connect" in body["message"]


# -- a real node in a real browser -----------------------------------------------------------------

class _Rows(HTMLParser):
    """Text of each <tr>, and the id of each, from Chromium's dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict, str]] = []
        self._attrs: dict | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._attrs, self._text = dict(attrs), []

    def handle_endtag(self, tag):
        if tag == "tr" and self._attrs is not None:
            self.rows.append((self._attrs, " ".join(t.strip() for t in self._text if t.strip())))
            self._attrs = None

    def handle_data(self, data):
        if self._attrs is not None:
            self._text.append(data)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "chromium missing: `make test-peers` installs Debian's chromium"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=120, check=False)


def test_status_page_in_chromium_during_a_real_run(node_factory, tmp_path):
    """A real node: a CT study held as implausible (the manifest's plausible
    range is set where no real result falls), a chest radiograph processed
    and sent, an unrouted radiograph; the page read by Chromium, the held
    job released through the API, the page read again."""
    from helpers import ct_route

    from dicom_node_synthetic import cxr_phantom
    from dicom_node_synthetic.dicom_dx import dx_image

    models = tmp_path / "models"
    shutil.copytree(REPO / "models_onnx", models, ignore=shutil.ignore_patterns("recipes"))
    manifest = models / "ct_denoise.yaml"
    doc = yaml.safe_load(manifest.read_text())
    assert doc["plausible"]["roi_mean_shift_hu"] == [0, 30]
    doc["plausible"]["roi_mean_shift_hu"] = [500, 600]
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    cxr = {"name": "cxr", "pipeline": "cxr_triage", "model": "cxr_triage", "destinations": ["out"],
           "quiet_seconds": 1, "match": [{"keyword": "Modality", "one_of": ["DX", "CR"]},
                                         {"keyword": "BodyPartExamined", "one_of": ["CHEST"]}]}
    http_port = free_port()
    node = node_factory(routes=[ct_route(), cxr],
                        node={"http": {"host": "127.0.0.1", "port": http_port, "path_prefix": "/dicom-node",
                                       "token": TOKEN}},
                        extra={"inference": {"providers": ["CPUExecutionProvider"], "models_dir": str(models)}})
    node.http_port = http_port
    node.start()
    ct = write_ct_series(tmp_path / "ct", n=6, size=96, seed="status",
                         patient_name=SECRET_NAME, patient_id=SECRET_ID)
    storescu(node.port, ct, aet="MY_CT")
    rng = np.random.default_rng(3)
    chest = dx_image(cxr_phantom.make_radiograph(rng, None, size=(512, 448)).image, seed="status-cxr",
                     patient_name=SECRET_NAME, patient_id=SECRET_ID)
    hand = dx_image(cxr_phantom.make_radiograph(rng, None, size=(256, 256)).image, seed="status-hand",
                    patient_name=SECRET_NAME, patient_id=SECRET_ID)
    hand.BodyPartExamined = "HAND"
    storescu(node.port, write_datasets(tmp_path / "dx", [chest, hand]), aet="MY_DX")
    store = node.store()
    wait_for(lambda: sorted(j.state for j in store.jobs()) == ["done", "held"], 180, 0.3,
             "the CXR job done, the CT job held")
    wait_for(lambda: all(i.state in ("sent", "held") for i in store.outbox_items()), 60, 0.2, "CXR results sent")
    # A series no route matches completes after the longest quiet period.
    wait_for(lambda: getattr(store.series(hand.SeriesInstanceUID), "state", None) == "complete", 60, 0.3,
             "unrouted series complete")
    base = f"http://127.0.0.1:{http_port}/dicom-node"
    ct_job = next(j for j in store.jobs() if j.pipeline == "ct_denoise")

    def page() -> tuple[str, dict[str, str], list[str]]:
        dom = _chromium("--dump-dom", base + "/")
        assert dom.returncode == 0 and "<table" in dom.stdout, dom.stderr[-2000:]
        parser = _Rows()
        parser.feed(dom.stdout)
        jobs = {a["id"]: text for a, text in parser.rows if a.get("id", "").startswith("job-")}
        series = [text for a, text in parser.rows if a.get("class") == "series"]
        for secret in (SECRET_NAME, "SECRET", SECRET_ID):
            assert secret not in dom.stdout, f"{secret} on the status page"
        return dom.stdout, jobs, series

    html_text, jobs, series = page()
    row = jobs[f"job-{ct_job.id}"]
    assert "held" in row and "ct_denoise" in row and "MY_CT" in row, row
    assert "1 job held for review" in html_text
    assert "7 result objects held for review" in row and "outside plausible 500-600" in row, row
    assert any("cxr_triage" in text and "MY_DX" in text and "2 result objects, 2 sent" in text
               for text in jobs.values()), jobs
    assert any("MY_DX" in t and "unrouted" in t and "BodyPartExamined" in t for t in series), series
    assert any("MY_CT" in t and "6 / 6" in t for t in series), series
    assert "READY" in html_text
    # The held job's forms post to the prefixed action paths.
    for action in ("release", "discard"):
        assert f'action="/dicom-node/api/jobs/{ct_job.id}/{action}"' in html_text

    shot = tmp_path / "status-page.png"
    out = _chromium(f"--screenshot={shot}", "--window-size=1500,1150", base + "/")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    keep = os.environ.get("DICOM_NODE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)

    # Actions on the running node: POST without the token is refused, with it
    # the held result is released and sent; echo the folder destination.
    url = f"{base}/api/jobs/{ct_job.id}/release"
    denied = urllib.request.Request(url, data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(denied, timeout=30)
    assert err.value.code == 401
    allowed = urllib.request.Request(url, data=b"", method="POST", headers=BEARER)
    with urllib.request.urlopen(allowed, timeout=30) as rsp:
        assert json.loads(rsp.read())["ok"] is True
    wait_for(lambda: all(i.state == "sent" for i in store.outbox_items()), 60, 0.2, "released results sent")
    echo = urllib.request.Request(f"{base}/api/destinations/out/echo", data=b"", method="POST", headers=BEARER)
    with urllib.request.urlopen(echo, timeout=30) as rsp:
        assert json.loads(rsp.read())["ok"] is True
    _, jobs, _ = page()
    row = jobs[f"job-{ct_job.id}"]
    assert "done" in row and "7 result objects, 7 sent" in row and "released by operator" in row, row
    assert "released by operator" in node.log() and "status page" in node.log()
