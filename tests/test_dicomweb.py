"""STOW-RS destinations (kind: dicomweb): the sender against a scripted HTTP
server for every status mapping, and the node against Orthanc's DICOMweb
plugin for real (basic auth, a wrong password, Orthanc down then up)."""

from __future__ import annotations

import base64
import io
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import Orthanc, ct_route, free_port, storescu, wait_for, write_ct_series
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from test_tls import Pki, pki  # noqa: F401 - the module's CA, server and client certificates

from dicom_node.config import Config, DicomwebDestination
from dicom_node.errors import ConfigError
from dicom_node.send.dicomweb import send_dicomweb
from dicom_node.send.statuses import is_permanent as failure_is_permanent
from dicom_node.send.scu import StoreRequest

SECRET = "correct-horse-battery"


# -- a scripted STOW-RS server ---------------------------------------------------------


class FakeStow:
    """Answers POSTs from a script of (status, body, headers); records each request."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.script: list[tuple[int, object, dict]] = []
        self.requests: list[dict] = []
        self.stall = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if fake.stall.is_set():  # answer late: the client times out first
                    threading.Event().wait(2)
                status, payload, headers = fake.script.pop(0) if fake.script else (200, None, {})
                data = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stow():
    fake = FakeStow()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct"), n=5, size=32, seed="stow")


def _requests(files: list[Path]) -> list[StoreRequest]:
    out = []
    for i, path in enumerate(files):
        ds = dcmread(path, stop_before_pixels=True)
        out.append(StoreRequest(i, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def _dest(url: str, **fields) -> DicomwebDestination:
    return DicomwebDestination(kind="dicomweb", name="web", url=url, **fields)


def _parts(request: dict) -> list[bytes]:
    """The application/dicom parts of a recorded multipart/related body."""
    content_type = request["headers"]["Content-Type"]
    assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
    boundary = content_type.split("boundary=")[1].encode()
    body = request["body"]
    assert body.endswith(b"--" + boundary + b"--\r\n")
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        parts.append(data[:-2])  # the CRLF before the next boundary
    return parts


def _failed(uid: str, reason: int) -> dict:
    return {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def test_files_go_as_written_in_bounded_batches_with_auth_and_headers(stow, ct_files, tmp_path):
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    dest = _dest(stow.url, auth={"kind": "bearer", "token_file": str(token)},
                 max_instances_per_request=2, headers={"X-Tenant": "radiology"})
    outcomes = send_dicomweb(dest, _requests(ct_files))
    assert [o.ok for o in outcomes] == [True] * 5
    assert [len(_parts(r)) for r in stow.requests] == [2, 2, 1]
    sent = [part for r in stow.requests for part in _parts(r)]
    assert sent == [p.read_bytes() for p in ct_files]  # byte for byte, preamble and meta included
    for r in stow.requests:
        assert r["path"] == "/dicom-web/studies"
        assert r["headers"]["Authorization"] == f"Bearer {SECRET}"
        assert r["headers"]["X-Tenant"] == "radiology"
        assert r["headers"]["Accept"] == "application/dicom+json"
    # The byte bound: each file is about 3 KB, a 4 KB bound sends them one by one.
    stow.requests.clear()
    send_dicomweb(_dest(stow.url, max_request_bytes=4096), _requests(ct_files))
    assert [len(_parts(r)) for r in stow.requests] == [1] * 5


def test_failed_sop_sequence_is_handled_per_instance(stow, ct_files):
    reqs = _requests(ct_files)
    stow.script.append((202, {"00081198": {"vr": "SQ", "Value": [
        _failed(reqs[0].sop_uid, 0xA700),   # out of resources: transient
        _failed(reqs[1].sop_uid, 0xC000),   # cannot understand: permanent
        _failed(reqs[2].sop_uid, 0x0111),   # duplicate: the service has it
        _failed(reqs[3].sop_uid, 0x0110)]}}, {}))  # processing failure: transient
    got = send_dicomweb(_dest(stow.url), reqs)
    assert [(o.ok, o.retryable) for o in got] == [(False, True), (False, False), (True, False),
                                                  (False, True), (True, False)]
    assert "0xA700" in got[0].reason and "0xC000" in got[1].reason
    assert failure_is_permanent(0xA900) and failure_is_permanent(0x0122)
    assert not failure_is_permanent(0xA702) and not failure_is_permanent(0x0110)


@pytest.mark.parametrize("status,retryable", [(400, False), (401, False), (403, False), (404, False),
                                              (408, True), (429, True), (500, True), (503, True),
                                              (301, False)])
def test_http_status_of_the_whole_request(stow, ct_files, status, retryable):
    stow.script.append((status, None, {"Location": "http://elsewhere/"} if status == 301 else {}))
    got = send_dicomweb(_dest(stow.url), _requests(ct_files[:2]))
    assert [(o.ok, o.retryable) for o in got] == [(False, retryable)] * 2
    assert f"HTTP {status}" in got[0].reason


def test_conflict_and_too_large(stow, ct_files):
    reqs = _requests(ct_files[:4])
    stow.script.append((409, {"00081198": {"vr": "SQ", "Value": [_failed(reqs[0].sop_uid, 0xA700)]}}, {}))
    got = send_dicomweb(_dest(stow.url), reqs[:2])
    assert [(o.ok, o.retryable) for o in got] == [(False, True), (False, False)]
    # 413: the batch is split until it fits (a single instance that does not is permanent).
    stow.requests.clear()
    stow.script += [(413, None, {}), (200, None, {}), (413, None, {}), (413, None, {}), (200, None, {})]
    got = send_dicomweb(_dest(stow.url), reqs)
    assert [len(_parts(r)) for r in stow.requests] == [4, 2, 2, 1, 1]
    assert [(o.ok, o.retryable) for o in got] == [(True, False), (True, False), (False, False),
                                                  (True, False)]


def test_unreachable_and_timeouts_are_transient(stow, ct_files):
    port = free_port()  # nothing listens there
    got = send_dicomweb(_dest(f"http://127.0.0.1:{port}/dicom-web", max_instances_per_request=2),
                        _requests(ct_files))
    assert all(not o.ok and o.retryable and "refused" in o.reason for o in got) and len(got) == 5
    stow.stall.set()
    got = send_dicomweb(_dest(stow.url, timeout_s=0.5), _requests(ct_files[:1]))
    assert got[0].retryable and "timed out" in got[0].reason
    assert len(stow.requests) == 1


def test_basic_auth_reads_the_password_file_at_each_send(stow, ct_files, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("first-password\n")
    dest = _dest(stow.url, auth={"kind": "basic", "username": "node", "password_file": str(secret)})
    send_dicomweb(dest, _requests(ct_files[:1]))
    secret.write_text("rotated-password\n")
    send_dicomweb(dest, _requests(ct_files[:1]))
    got = [base64.b64decode(r["headers"]["Authorization"].split()[1]).decode() for r in stow.requests]
    assert got == ["node:first-password", "node:rotated-password"]
    # Secrets are not in the configuration's dump (check-config prints it).
    assert "password" not in json.dumps(dest.model_dump(mode="json")).replace("password_file", "")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verifies_the_server_and_presents_a_client_certificate(pki: Pki, ct_files):  # noqa: F811
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no request
    server = FakeStow(tls=context)
    try:
        client = {"certificate": str(pki.client_cert), "private_key": str(pki.client_key)}
        reqs = _requests(ct_files[:2])
        ok = send_dicomweb(_dest(server.url, tls={"ca_file": str(pki.ca), **client}), reqs)
        assert [o.ok for o in ok] == [True, True] and len(server.requests) == 1
        # The system's CAs do not know our test CA: a TLS failure, retried.
        got = send_dicomweb(_dest(server.url, tls=client), reqs)
        assert [(o.ok, o.retryable, o.reason.endswith("TLS failure")) for o in got] == [(False, True, True)] * 2
        # A certificate from another CA does not pass either.
        got = send_dicomweb(_dest(server.url, tls={"ca_file": str(pki.rogue_ca), **client}), reqs)
        assert not got[0].ok and got[0].retryable
        # verify: false (a test bench) sends without checking the server.
        ok = send_dicomweb(_dest(server.url, tls={"verify": False, **client}), reqs)
        assert [o.ok for o in ok] == [True, True] and len(server.requests) == 2
    finally:
        server.close()


def _config(dest: dict, tmp_path: Path) -> Config:
    import yaml

    from dicom_node.config import load_config

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"destinations": [{"name": "web", "kind": "dicomweb", **dest}]}))
    return load_config(path)


@pytest.mark.parametrize("dest,message", [
    ({"url": "pacs:8042"}, "destinations.0.dicomweb.url: url 'pacs:8042': expected http(s)://"),
    ({"url": "http://u:pw@pacs/dicom-web"}, "credentials do not go in the url"),
    ({"url": "http://pacs/dicom-web", "headers": {"Authorization": "Basic x"}},
     "destinations.0.dicomweb.headers: header Authorization: set by the sender"),
    ({"url": "http://pacs/dicom-web", "tls": {"verify": True}}, "tls: has no meaning with an http://"),
    ({"url": "http://pacs/dicom-web", "auth": {"kind": "basic", "username": "n", "password_file": "nope"}},
     "destinations.0.dicomweb.auth.basic.password_file:"),
    ({"url": "http://pacs/dicom-web", "auth": {"kind": "bearer", "token": "inline"}},
     "destinations.0.dicomweb.auth.bearer.token: Extra inputs are not permitted"),
    ({"url": "http://pacs/dicom-web", "max_instances_per_request": 0},
     "destinations.0.dicomweb.max_instances_per_request:"),
    ({"url": "http://pacs/dicom-web", "timeout": 3}, "destinations.0.dicomweb.timeout: Extra inputs"),
])
def test_config_errors_name_the_key(tmp_path, dest, message):
    with pytest.raises(ConfigError) as err:
        _config(dest, tmp_path)
    assert message in str(err.value)
    assert "inline" not in str(err.value) and ":pw@" not in str(err.value)


def test_config_accepts_a_full_destination(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    config = _config({"url": "https://pacs.example:8443/dicom-web/", "timeout_s": 5,
                      "auth": {"kind": "basic", "username": "node", "password_file": "pw"},
                      "max_instances_per_request": 10, "max_request_bytes": 1 << 20,
                      "headers": {"X-Tenant": "a"}, "tls": {"verify": False}}, tmp_path)
    dest = config.destination("web")
    assert dest.url == "https://pacs.example:8443/dicom-web"  # no trailing slash
    assert dest.auth.password_file == tmp_path / "pw"  # relative to the config file


# -- the node against Orthanc's DICOMweb plugin ------------------------------------------

N = 4


def _sample(text: str, name: str, labels: dict) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _web(name: str, pacs: Orthanc, password_file: Path | None = None) -> dict:
    dest = {"name": name, "kind": "dicomweb", "url": pacs.dicomweb_url, "timeout_s": 10,
            "max_instances_per_request": 3}
    if password_file is not None:
        dest["auth"] = {"kind": "basic", "username": "node", "password_file": str(password_file)}
    return dest


def test_stow_to_orthanc_with_basic_auth(node_factory, tmp_path):
    pacs = Orthanc(tmp_path / "pacs", dicomweb=True, users={"node": SECRET}).start()
    try:
        (tmp_path / "right").write_text(SECRET + "\n")
        (tmp_path / "wrong").write_text("not-the-password\n")
        node = node_factory(destinations=[_web("pacs", pacs, tmp_path / "right"),
                                          _web("wrongpw", pacs, tmp_path / "wrong")],
                            routes=[ct_route(destinations=["pacs", "wrongpw"])]).start()
        files = write_ct_series(tmp_path / "in", n=N, size=96, seed="stow-auth")
        storescu(node.port, files)
        store = node.store()
        def settled() -> bool:
            items = store.outbox_items()
            return len(items) == 2 * (N + 1) and all(i.state != "pending" for i in items)

        wait_for(settled, 90, 0.2, "every result sent or dead")
        items = store.outbox_items()
        assert {i.state for i in items if i.destination == "pacs"} == {"sent"}
        dead = [i for i in items if i.destination == "wrongpw"]
        assert {i.state for i in dead} == {"dead"} and {i.attempts for i in dead} == {1}
        assert all("HTTP 401" in i.last_error for i in dead)

        # In Orthanc: every result, byte for byte as the node wrote it.
        outputs = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                   for p in (node.data_dir / "outgoing").glob("job-*/*.dcm")}
        assert len(outputs) == N + 1
        stored = pacs.instances()
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == set(outputs)
        for inst in stored:
            path = outputs[inst["MainDicomTags"]["SOPInstanceUID"]]
            status, data = pacs.http(f"/instances/{inst['ID']}/file")
            assert status == 200
            mine, theirs = dcmread(path), dcmread(io.BytesIO(data))
            if "PixelData" in mine:
                assert theirs.PixelData == mine.PixelData
            assert data == path.read_bytes()  # the whole file, as the node wrote it
        status, body = pacs.http("/dicom-web/studies", accept="application/dicom+json")
        assert status == 200
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert [s["0020000D"]["Value"][0] for s in json.loads(body)] == [study_uid]
        status, body = pacs.http(f"/dicom-web/studies/{study_uid}/instances",
                                 accept="application/dicom+json")
        assert status == 200 and len(json.loads(body)) == N + 1

        metrics = node.metrics()
        attempts = "dicom_node_send_attempts_total"
        assert _sample(metrics, attempts, {"destination": "pacs", "result": "sent"}) == N + 1
        assert _sample(metrics, attempts, {"destination": "wrongpw", "result": "dead"}) == N + 1
        assert _sample(metrics, attempts, {"destination": "wrongpw", "result": "retry"}) == 0
        assert SECRET not in node.log() and "not-the-password" not in node.log()
        assert node.cli("echo", "pacs").returncode == 0
        failed = node.cli("echo", "wrongpw")
        assert failed.returncode == 1 and "HTTP 401" in failed.stderr
    finally:
        pacs.stop()


def test_orthanc_down_then_up_delivers_everything(node_factory, tmp_path):
    pacs = Orthanc(tmp_path / "pacs", dicomweb=True).start()
    try:
        node = node_factory(destinations=[_web("pacs", pacs)],
                            routes=[ct_route(destinations=["pacs"])]).start()
        pacs.stop()
        storescu(node.port, write_ct_series(tmp_path / "in", n=N, size=96, seed="stow-down"))
        store = node.store()
        wait_for(lambda: any(i.attempts >= 1 for i in store.outbox_items()), 60, 0.05, "an attempt")
        first = time.monotonic()
        def failed_thrice() -> bool:
            items = store.outbox_items()
            return len(items) == N + 1 and all(i.state == "pending" and i.attempts >= 3 for i in items)

        wait_for(failed_thrice, 60, 0.05, "three failed attempts each")
        # Backoff (retry_initial_s 0.5, retry_max_s 2): 0.5 s, then 1 s, then 2 s apart.
        assert time.monotonic() - first >= 1.3
        items = store.outbox_items()
        assert all("connection refused" in i.last_error for i in items)
        assert _sample(node.metrics(), "dicom_node_send_attempts_total",
                       {"destination": "pacs", "result": "retry"}) >= 3 * (N + 1)
        assert "destination pacs failing" in node.log()
        pacs.start()
        wait_for(lambda: all(i.state == "sent" for i in store.outbox_items()), 30, 0.2, "all sent")
        assert len(pacs.instances()) == N + 1
        assert not [i for i in store.outbox_items() if i.state == "dead"]
        assert "destination pacs delivering again" in node.log()
    finally:
        pacs.stop()
