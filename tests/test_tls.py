"""DICOM TLS against dcmtk built with OpenSSL: storescu/echoscu +tls into the
node, the node's sender into storescp +tls, and the configuration checks.

Certificates come from the ``openssl`` CLI in a temporary folder: a CA that
signs the node's, storescp's and the good client's certificates, and another
CA whose client certificate the node must refuse.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import (
    NODELAY_ENV,
    ct_route,
    dataset_bytes,
    free_port,
    storescu,
    wait_for,
    write_ct_series,
)
from pydicom import dcmread

from dicom_node.config import Peer, load_config
from dicom_node.errors import ConfigError, SendError
from dicom_node.security.tls import ClientContexts, client_context, server_context
from dicom_node.send.scu import StoreRequest, send_files

N = 4  # CT slices per series: the denoiser returns N derived CT + 1 SR


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path  # signed by rogue_ca, which the node does not trust
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    out = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, f"openssl {' '.join(map(str, args))}: {out.stderr}"


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=dicom-node test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    ext = folder / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
             str(zlib.crc32(name.encode()) % 10**9 + 1), "-days", "2", "-extfile", ext, "-out", f"{name}.pem",
             cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    assert shutil.which("openssl"), "the openssl CLI is missing; `make test-peers` installs it"
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "ca")
    rogue = _make_ca(folder, "rogue_ca")
    server = _make_leaf(folder, "server", ca)
    client = _make_leaf(folder, "client", ca)
    stranger = _make_leaf(folder, "stranger", rogue)
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0],
               client_key=client[1], rogue_ca=rogue[0], rogue_cert=stranger[0],
               rogue_key=stranger[1])


def _dcmtk_tls(key: Path, cert: Path, ca: Path) -> list[str]:
    """dcmtk's TLS options: our key and certificate, the CA to verify the other side."""
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def _echoscu_tls(port: int, tls: list[str], aec: str = "DICOM_NODE") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", aec, *tls, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=NODELAY_ENV, timeout=60, check=False)


def _tls_node(node_factory, pki: Pki, **kwargs):
    """A node whose port speaks TLS only and requires a client certificate.
    The files are given relative to the node's working directory, which is the
    config's base dir, so this also proves relative paths resolve there."""
    node = node_factory(routes=[], node={"tls": {
        "certificate": "tls/server.pem", "private_key": "tls/server.key", "ca_file": "tls/ca.pem",
        "require_client_certificate": True}}, **kwargs)
    (node.workdir / "tls").mkdir()
    for src, name in ((pki.server_cert, "server.pem"), (pki.server_key, "server.key"), (pki.ca, "ca.pem")):
        shutil.copy(src, node.workdir / "tls" / name)
    return node.start()


def _rejected_tls(node) -> float:
    for line in node.metrics().splitlines():
        if line.startswith('dicom_node_associations_total{result="rejected_tls"}'):
            return float(line.split()[-1])
    return 0.0


def test_storescu_with_client_certificate_stores_over_tls(node_factory, pki, tmp_path):
    node = _tls_node(node_factory, pki)
    assert "accepts TLS only" in node.log()
    good = _dcmtk_tls(pki.client_key, pki.client_cert, pki.ca)
    files = write_ct_series(tmp_path / "in", n=N, size=64, seed="tls-in")
    sent = storescu(node.port, files, check=False, extra=good)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    store = node.store()
    assert store.count_instances() == N
    for path in files:
        rec = store.instance(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert rec is not None
        assert dataset_bytes(node.data_dir / "spool" / rec.path) == dataset_bytes(path)
    assert _echoscu_tls(node.port, good).returncode == 0
    assert 'dicom_node_associations_total{result="accepted"} 2.0' in node.metrics()
    assert _rejected_tls(node) == 0


def test_client_certificate_from_another_ca_is_refused(node_factory, pki, tmp_path):
    node = _tls_node(node_factory, pki)
    files = write_ct_series(tmp_path / "in", n=1, size=64, seed="tls-rogue")
    stranger = storescu(node.port, files, check=False,
                        extra=_dcmtk_tls(pki.rogue_key, pki.rogue_cert, pki.ca))
    assert stranger.returncode != 0
    # A client with no certificate at all (dcmtk's anonymous TLS) is refused as well.
    anonymous = _echoscu_tls(node.port, ["+tla", "+cf", str(pki.ca)])
    assert anonymous.returncode != 0
    wait_for(lambda: _rejected_tls(node) == 2, 10, what="two TLS refusals counted")
    assert node.store().count_instances() == 0
    log = node.log()
    assert "TLS handshake from 127.0.0.1:" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log  # the stranger: unknown issuer
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log  # the anonymous client
    # The node keeps serving good clients.
    good = _echoscu_tls(node.port, _dcmtk_tls(pki.client_key, pki.client_cert, pki.ca))
    assert good.returncode == 0, good.stdout + good.stderr


def test_plain_dicom_to_the_tls_port_fails(node_factory, pki):
    node = _tls_node(node_factory, pki)
    plain = subprocess.run(["echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, env=NODELAY_ENV, timeout=60, check=False)
    assert plain.returncode != 0
    wait_for(lambda: _rejected_tls(node) == 1, 10, what="the plain client counted as rejected_tls")
    # The plain client got no association, not even a rejected one.
    assert 'dicom_node_associations_total{result="accepted"}' not in node.metrics()
    assert "WRONG_VERSION_NUMBER" in node.log()
    # A client that connects and says nothing holds only its own thread: the
    # handshake is not done in the accepting thread, so a good client gets in.
    with socket.create_connection(("127.0.0.1", node.port), timeout=10):
        good = _echoscu_tls(node.port, _dcmtk_tls(pki.client_key, pki.client_cert, pki.ca))
        assert good.returncode == 0, good.stdout + good.stderr


@pytest.fixture
def storescp_tls(pki, tmp_path):
    """dcmtk's storescp speaking TLS only and requiring a client certificate
    from our CA (storescp's default, -rc)."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "TLS_PACS", *_dcmtk_tls(pki.server_key, pki.server_cert, pki.ca),
                             "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=NODELAY_ENV,
                            start_new_session=True)
    try:
        good = _dcmtk_tls(pki.client_key, pki.client_cert, pki.ca)
        wait_for(lambda: _echoscu_tls(port, good, aec="TLS_PACS").returncode == 0, 30, 0.1,
                 "storescp +tls answering")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _peer(port: int, tls: dict) -> dict:
    return {"name": "tls_pacs", "ae_title": "TLS_PACS", "host": "127.0.0.1", "port": port, "tls": tls}


def test_sender_sends_results_over_tls_to_storescp(node_factory, pki, storescp_tls, tmp_path):
    port, out = storescp_tls
    node = node_factory(
        peers=[_peer(port, {"ca_file": str(pki.ca), "certificate": str(pki.client_cert),
                            "private_key": str(pki.client_key)})],
        destinations=[{"name": "pacs", "kind": "dicom", "peer": "tls_pacs"}],
        routes=[ct_route(destinations=["pacs"])]).start()
    files = write_ct_series(tmp_path / "in", n=N, size=128, seed="tls-out")
    storescu(node.port, files)
    store = node.store()
    # storescp answers Success after writing the file, so "sent" means the file is complete.
    wait_for(lambda: [i.state for i in store.outbox_items()] == ["sent"] * (N + 1), 120, 0.25,
             f"{N + 1} results sent")
    received = sorted(out.iterdir())
    assert len(received) == N + 1
    modalities = sorted(dcmread(p, stop_before_pixels=True).Modality for p in received)
    assert modalities == ["CT"] * N + ["SR"]
    source_study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert {dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in received} == {source_study}
    assert ({str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received}
            == {i.sop_uid for i in store.outbox_items()})


def test_sender_refuses_a_server_certificate_from_an_unknown_ca(pki, storescp_tls, tmp_path):
    port, out = storescp_tls
    [path] = write_ct_series(tmp_path / "in", n=1, size=64, seed="tls-mitm")
    ds = dcmread(path, stop_before_pixels=True)
    request = StoreRequest(1, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    # storescp's certificate does not chain to the rogue CA: no association.
    distrustful = Peer.model_validate(_peer(port, {
        "ca_file": str(pki.rogue_ca), "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key)}))
    with pytest.raises(SendError) as refused:
        send_files(distrustful, [request], calling_ae="DICOM_NODE", timeout_s=10)
    assert refused.value.retryable and "TLS handshake failed" in refused.value.reason
    assert list(out.iterdir()) == []
    # The same peer with the right CA works, so the CA was the only difference.
    trusting = Peer.model_validate(_peer(port, {
        "ca_file": str(pki.ca), "certificate": str(pki.client_cert), "private_key": str(pki.client_key)}))
    [outcome] = send_files(trusting, [request], calling_ae="DICOM_NODE", timeout_s=10)
    assert outcome.ok, outcome.reason
    assert len(list(out.iterdir())) == 1


def _load(tmp_path: Path, node: dict | None = None, peers: list | None = None):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"node": node or {}, "peers": peers or []}))
    return load_config(path, {"base_dir": str(tmp_path)})


def test_config_errors_name_the_tls_key_and_file(pki, tmp_path):
    shutil.copy(pki.server_cert, tmp_path / "server.pem")
    shutil.copy(pki.server_key, tmp_path / "server.key")
    ok = {"certificate": "server.pem", "private_key": "server.key"}
    # Relative paths resolve against the base dir and are stored absolute.
    config = _load(tmp_path, node={"tls": ok})
    assert config.node.tls.certificate == tmp_path / "server.pem"

    with pytest.raises(ConfigError) as missing:
        _load(tmp_path, node={"tls": {**ok, "certificate": "gone.pem"}})
    assert "node.tls.certificate" in str(missing.value)
    assert str(tmp_path / "gone.pem") in str(missing.value) and "no such file" in str(missing.value)

    with pytest.raises(ConfigError) as peer_ca:
        _load(tmp_path, peers=[_peer(104, {"ca_file": "nowhere/ca.pem"})])
    assert "peers.0.tls.ca_file" in str(peer_ca.value) and "no such file" in str(peer_ca.value)

    with pytest.raises(ConfigError) as no_ca:
        _load(tmp_path, node={"tls": {**ok, "require_client_certificate": True}})
    assert "node.tls" in str(no_ca.value) and "needs ca_file" in str(no_ca.value)

    with pytest.raises(ConfigError) as mismatch:  # another certificate's key
        _load(tmp_path, node={"tls": {**ok, "private_key": str(pki.client_key)}})
    assert "node.tls" in str(mismatch.value) and "KEY_VALUES_MISMATCH" in str(mismatch.value)

    with pytest.raises(ConfigError) as half:
        _load(tmp_path, peers=[_peer(104, {"certificate": str(pki.client_cert)})])
    assert "peers.0.tls" in str(half.value) and "give both or neither" in str(half.value)


def test_contexts_refuse_tls_older_than_1_2(pki, tmp_path):
    config = _load(tmp_path, node={"tls": {"certificate": str(pki.server_cert),
                                           "private_key": str(pki.server_key),
                                           "ca_file": str(pki.ca), "require_client_certificate": True}},
                   peers=[_peer(104, {"ca_file": str(pki.ca)})])
    server = server_context(config.node.tls)
    client = client_context(config.peers[0].tls)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    # The peer's certificate is always verified; only the host name check is optional.
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname is False


def test_client_contexts_are_built_once_and_rebuilt_when_a_file_changes(pki, tmp_path):
    shutil.copy(pki.ca, tmp_path / "ca.pem")
    config = _load(tmp_path, peers=[_peer(104, {"ca_file": "ca.pem"})])
    contexts = ClientContexts()
    first = contexts.get(config.peers[0].tls)
    assert contexts.get(config.peers[0].tls) is first
    # A renewed CA bundle (new inode, size or mtime) is taken up without a restart.
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.pem").write_bytes(pki.ca.read_bytes() + b"\n")
    renewed = contexts.get(config.peers[0].tls)
    assert renewed is not first and contexts.get(config.peers[0].tls) is renewed
