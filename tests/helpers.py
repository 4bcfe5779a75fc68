"""Test helpers: real peers on loopback, polled with deadlines (no sleeps)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import zlib
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import yaml
from pydicom.filewriter import dcmwrite

from dicom_node_synthetic import ct_phantom
from dicom_node_synthetic.dicom_ct import ct_series

REPO = Path(__file__).resolve().parent.parent
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.read()


def roundtrip(datasets: list) -> list:
    """Encode and decode datasets, as a receiver would see them."""
    from io import BytesIO

    from pydicom import dcmread

    out = []
    for ds in datasets:
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        buf.seek(0)
        out.append(dcmread(buf))
    return out


def legacy_enhanced(converter, singles: list):
    """A multi-frame image made by a highdicom legacy converter from
    single-frame instances, round-tripped through bytes."""
    enhanced = converter(singles, series_instance_uid=singles[0].SeriesInstanceUID + ".1", series_number=9,
                         sop_instance_uid=singles[0].SOPInstanceUID + ".1", instance_number=1)
    return roundtrip([enhanced])[0]


def write_datasets(folder: Path, datasets: list) -> list[Path]:
    """Write datasets as numbered files; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(folder / f"{i:05d}.dcm")
        dcmwrite(paths[-1], ds, enforce_file_format=True)
    return paths


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (TimeoutError, urllib.error.URLError, ConnectionError):
        return 0, b""


def write_ct_series(folder: Path, n: int = 6, size: int = 128, seed: str = "t",
                    **kwargs: Any) -> list[Path]:
    """A synthetic low-dose CT series as files; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    # zlib.crc32, not hash(): str hashes differ per process, phantoms must not.
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    vol = ct_phantom.make_volume(rng, n, size=size, pixel_mm=0.7 * 512 / size)
    paths = []
    for i, ds in enumerate(ct_series(vol.low_dose_hu, seed=seed, pixel_mm=vol.pixel_mm,
                                     slice_mm=vol.slice_mm, **kwargs)):
        path = folder / f"ct{i:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "DICOM_NODE",
             check: bool = True, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = ["storescu", "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=NODELAY_ENV, check=check,
                          timeout=300)


def echoscu(port: int, *, aet: str = "ECHOSCU", aec: str = "DICOM_NODE") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=NODELAY_ENV, timeout=60)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


class NodeProcess:
    """``dicom-node serve`` as a real process on free ports, with a config
    written for the test."""

    def __init__(self, workdir: Path, *, routes: list[dict] | None = None,
                 destinations: list[dict] | None = None, peers: list[dict] | None = None,
                 node: dict | None = None, extra: dict | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.data_dir = workdir / "data"
        self.log_path = workdir / "node.log"
        settings = {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": self.port,
                    "data_dir": str(self.data_dir), "workers": 1,
                    "http": {"host": "127.0.0.1", "port": self.http_port}, **(node or {})}
        config = {
            "node": settings,
            "peers": peers or [],
            "destinations": destinations or [{"name": "out", "kind": "folder", "path": "out"}],
            "routes": routes if routes is not None else [ct_route()],
            "inference": {"providers": ["CPUExecutionProvider"]},
            "outbox": {"retry_initial_s": 0.5, "retry_max_s": 2},
            **(extra or {}),
        }
        self.config_path = workdir / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> NodeProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "-c", str(self.config_path), "serve"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        if wait:
            wait_for(self.ready, 60, 0.1, "node ready")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return http_get(f"http://127.0.0.1:{self.http_port}/readyz")[0] == 200

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.http_port}/metrics")[1].decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "-c", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=120, cwd=self.workdir)

    def kill9(self) -> None:
        """Kill the node and its workers at once, as a power cut would."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(10)
        self.proc = None
        return code

    def store(self):
        from dicom_node.store.db import Store
        return Store(self.data_dir / "node.db")


def ct_route(**overrides: Any) -> dict:
    route = {"name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise", "destinations": ["out"],
             "quiet_seconds": 1.5, "match": [{"keyword": "Modality", "equals": "CT"},
                                             {"keyword": "ImageType", "contains": "ORIGINAL"}]}
    route.update(overrides)
    return route


class Orthanc:
    """An Orthanc PACS on loopback, storing synchronously, with REST access."""

    DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian orthanc-dicomweb

    def __init__(self, workdir: Path, aet: str = "ORTHANC", *, dicomweb: bool = False,
                 users: dict[str, str] | None = None) -> None:
        """``dicomweb``: load the DICOMweb plugin, at ``self.dicomweb_url``.
        ``users``: {name: password} turns HTTP authentication on (``get`` uses the first)."""
        self.workdir = workdir
        self.users = dict(users or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "DicomAet": aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "StorageCompression": False, "Plugins": [],
            "OverwriteInstances": True, "SaveJobs": False, "HttpServerEnabled": True,
            **({"AuthenticationEnabled": True, "RegisteredUsers": self.users} if users else {}),
            **({"Plugins": [self.DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
               if dicomweb else {}),
        }))
        self.dicomweb_url = f"http://127.0.0.1:{self.http_port}/dicom-web"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                     env=NODELAY_ENV, start_new_session=True)
        wait_for(lambda: self.get("/system") is not None, 60, 0.1, "Orthanc REST")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def get(self, path: str) -> Any:
        status, body = self.http(path) if self.users else http_get(f"http://127.0.0.1:{self.http_port}{path}")
        return json.loads(body) if status == 200 else None

    def http(self, path: str, accept: str | None = None) -> tuple[int, bytes]:
        """GET on the REST API, as the first of ``users`` when there are any."""
        import base64

        headers = {"Accept": accept} if accept else {}
        for name, password in list(self.users.items())[:1]:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as rsp:
                return rsp.status, rsp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            return 0, b""

    def instances(self) -> list[dict]:
        return self.get("/instances?expand") or []

    def peer(self, name: str = "pacs") -> dict:
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.dicom_port}


def require_tools() -> None:
    missing = [t for t in ("storescu", "echoscu", "storescp", "dciodvfy", "Orthanc")
               if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"test peers missing: {missing}; `make test` installs them "
                           "(apt-get install dcmtk orthanc dicom3tools)")


def model_label(name: str) -> str:
    """"NAME VERSION" of a shipped model, as results and log lines name it."""
    import yaml
    manifest = yaml.safe_load((REPO / "models_onnx" / f"{name}.yaml").read_text())
    return f"{name} {manifest['version']}"
