"""Production install: scripts/install.sh under a DESTDIR, the hardened
systemd unit (verify, security exposure), the GPU drop-in; and the Docker
side (.dockerignore, compose) and the Prometheus config as shipped.

There is no systemd PID 1 here: the script runs with DESTDIR set, so users
go to $DESTDIR/etc/passwd (systemd-sysusers --root) and nothing is enabled.
The venv gets the node from a wheel built here from the source tree (no
network, no build backend needed), with --no-deps: the test checks what the
script lays out, not pip's dependency resolution.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from dicom_node import __version__
from dicom_node.config import load_config

SCRIPT = REPO / "scripts" / "install.sh"
UNIT = REPO / "systemd" / "dicom-node.service"
GPU = REPO / "systemd" / "gpu.conf"
MAX_EXPOSURE = 2.5


def _wheel(folder: Path) -> Path:
    """A pure-Python wheel of dicom_node (what `pip wheel .` would make)."""
    name = f"dicom_node-{__version__}"
    path = folder / f"{name}-py3-none-any.whl"
    info = f"{name}.dist-info"
    files: dict[str, bytes] = {}
    for src in sorted((REPO / "dicom_node").rglob("*.py")):
        files[str(src.relative_to(REPO))] = src.read_bytes()
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: dicom-node\nVersion: {__version__}\n"
                                 "Requires-Python: >=3.11\n").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\ndicom-node = dicom_node.cli:main\n"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for arc, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([arc, f"sha256={digest}", len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue().encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
    return path


def _install(root: Path, wheel: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DESTDIR": str(root), "PYTHON": shutil.which("python3"),
           "PACKAGE": str(wheel), "PIP_ARGS": "--no-deps --no-index"}
    out = subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=240, check=False)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("install")
    root = work / "root"
    wheel = _wheel(work)
    out = _install(root, wheel, "--gpu")
    return root, wheel, out


def test_script_is_posix_sh_and_documents_itself():
    assert subprocess.run(["sh", "-n", str(SCRIPT)], capture_output=True, check=False).returncode == 0
    help_text = subprocess.run(["sh", str(SCRIPT), "--help"], capture_output=True, text=True, check=False).stdout
    for word in ("DESTDIR", "--gpu", "--no-enable", "--dry-run", "python3-venv"):
        assert word in help_text, word
    bad = subprocess.run(["sh", str(SCRIPT), "--bogus"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_dry_run_changes_nothing(tmp_path):
    root = tmp_path / "root"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DESTDIR": str(root)}
    out = subprocess.run(["sh", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "systemd-sysusers" in out.stdout and "-m venv" in out.stdout and "dicom-node.service" in out.stdout
    assert not root.exists()


def test_user_folders_venv_config_and_unit(installed):
    root, _, out = installed
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^dicom-node:x:\d+:\d+:[^:]*:/var/lib/dicom-node:/usr/sbin/nologin$", passwd, re.MULTILINE), passwd
    assert re.search(r"^dicom-node:x:\d+:", (root / "etc" / "group").read_text(), re.MULTILINE)
    assert (root / "usr/lib/sysusers.d/dicom-node.conf").is_file()
    # The venv, with the node's entry point running on the venv's Python.
    exe = root / "opt/dicom-node/.venv/bin/dicom-node"
    assert exe.is_file() and exe.stat().st_mode & 0o111
    assert exe.read_text().splitlines()[0] == f"#!{root}/opt/dicom-node/.venv/bin/python"
    site = list((root / "opt/dicom-node/.venv/lib").glob("python3*/site-packages/dicom_node/cli.py"))
    assert site, "dicom_node not installed in the venv"
    # Models, and a config pointing at the production paths.
    for name in ("ct_denoise", "cardiac_seg", "cxr_triage"):
        assert (root / f"opt/dicom-node/models/{name}.onnx").is_file()
        assert (root / f"opt/dicom-node/models/{name}.yaml").is_file()
    conf = root / "etc/dicom-node/node.yaml"
    raw = yaml.safe_load(conf.read_text())
    assert raw["node"]["data_dir"] == "/var/lib/dicom-node"
    assert raw["inference"]["models_dir"] == "/opt/dicom-node/models"
    assert {r["name"] for r in raw["routes"]} == {"ct_cardiac_denoise", "cardiac_mr_function", "cxr_normality_triage"}
    assert raw["node"]["http"]["host"] == "127.0.0.1", "the status page stays on loopback"
    # It validates, with the models where this DESTDIR put them.
    config = load_config(conf, {"inference.models_dir": str(root / "opt/dicom-node/models")})
    assert str(config.data_dir) == "/var/lib/dicom-node"
    assert (conf.stat().st_mode & 0o777) == 0o640 and (conf.parent.stat().st_mode & 0o777) == 0o755
    assert ((root / "var/lib/dicom-node").stat().st_mode & 0o777) == 0o750
    # The unit and the GPU drop-in, as shipped.
    assert (root / "etc/systemd/system/dicom-node.service").read_bytes() == UNIT.read_bytes()
    assert (root / "etc/systemd/system/dicom-node.service.d/gpu.conf").read_bytes() == GPU.read_bytes()
    assert "not enabling" in out.stdout


def test_installed_unit_verifies(installed, tmp_path):
    """systemd-analyze verify on the installed unit, inside the DESTDIR root
    (with the host's systemd units copied in, for the targets it names)."""
    root, _, _ = installed
    units = root / "usr/lib/systemd/system"
    if not units.exists():
        shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
    unit = root / "etc/systemd/system/dicom-node.service"
    out = subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "dicom-node" not in out.stderr, out.stdout + out.stderr
    # And it does check the ExecStart binary: moved away, verify fails.
    exe = root / "opt/dicom-node/.venv/bin/dicom-node"
    exe.rename(exe.with_name("moved"))
    try:
        out = subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(unit)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode != 0 and "not executable" in out.stderr
    finally:
        exe.with_name("moved").rename(exe)


def test_reinstall_keeps_the_operators_config(installed, tmp_path):
    root, wheel, _ = installed
    conf = root / "etc/dicom-node/node.yaml"
    edited = conf.read_text() + "\n# edited by the site\n"
    conf.write_text(edited)
    out = _install(root, wheel, "--no-gpu")
    assert conf.read_text() == edited
    assert (root / "etc/dicom-node/node.yaml.new").is_file() and "keeping the existing" in out.stdout
    assert not (root / "etc/systemd/system/dicom-node.service.d/gpu.conf").exists()
    assert [line.split(":")[0] for line in (root / "etc/passwd").read_text().splitlines()] == ["dicom-node"]
    _install(root, wheel, "--gpu")


def _exposure(unit_text: str, tmp_path: Path) -> float:
    path = tmp_path / "dicom-node.service"
    path.write_text(unit_text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for dicom-node\.service: ([\d.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    return float(match.group(1))


def test_unit_security_exposure(tmp_path):
    unit = UNIT.read_text()
    assert _exposure(unit, tmp_path) <= MAX_EXPOSURE
    # With the GPU drop-in applied (a drop-in adds to the unit's [Service]).
    assert _exposure(unit + "\n" + GPU.read_text(), tmp_path) <= MAX_EXPOSURE


def test_unit_settings_the_node_relies_on():
    unit = UNIT.read_text()

    def values(key: str) -> list[str]:
        return re.findall(rf"^{key}=(.*)$", unit, re.MULTILINE)

    assert values("StateDirectory") == ["dicom-node"] and values("ConfigurationDirectory") == ["dicom-node"]
    assert values("WorkingDirectory") == ["/var/lib/dicom-node"]
    assert values("User") == ["dicom-node"] and values("CapabilityBoundingSet") == [""]
    # AF_UNIX: multiprocessing's worker pipes; AF_INET(6): DICOM and HTTP.
    assert set(values("RestrictAddressFamilies")[0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert values("UMask") == ["0027"]
    gpu = GPU.read_text()
    assert re.search(r"^PrivateDevices=no$", gpu, re.MULTILINE) and re.search(r"^MemoryDenyWriteExecute=no$", gpu, re.MULTILINE)
    assert re.findall(r"^DeviceAllow=char-nvidia-frontend rw$", gpu, re.MULTILINE)
    assert re.findall(r"^DeviceAllow=char-nvidia-uvm rw$", gpu, re.MULTILINE)


_MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute=yes enforces.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X mapping was allowed: the probe does not enforce W^X")
except OSError:
    pass
import numpy as np, onnxruntime as ort
for name in ("ct_denoise", "cardiac_seg", "cxr_triage"):
    s = ort.InferenceSession(f"models_onnx/{name}.onnx", providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else (1 if k == 0 else 64) for k, d in enumerate(i.shape)]
    s.run(None, {i.name: np.random.rand(*shape).astype(np.float32)})
print("ok")
"""


def test_cpu_inference_runs_with_write_xor_execute():
    """The unit sets MemoryDenyWriteExecute=yes: onnxruntime's CPU provider
    must run every shipped model with W^X enforced (kernel 6.3+ prctl)."""
    out = subprocess.run([sys.executable, "-c", _MDWE_PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    if out.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


# -- Docker and the Prometheus config ------------------------------------------------------------

def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_patient_data_and_venvs_out():
    patterns = _dockerignore()
    for needed in (".venv/", "data/", "**/*.dcm", ".git/", "tests/", ".pytest_cache/", "**/*.env",
                   "**/__pycache__/"):
        assert needed in patterns, needed
    # Nothing the Dockerfile copies is excluded.
    copied = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert copied, "no COPY in the Dockerfile"
    for source in copied:
        top = source.split("/")[0]
        assert not any(p.rstrip("/") in (source, top) for p in patterns), f"{source} is in .dockerignore"


def test_compose_runs_all_three_routes_and_keeps_services_on_loopback():
    base = load_config(REPO / "conf" / "node.yaml")
    compose_config = load_config(REPO / "conf" / "compose" / "node.yaml")
    assert [r.name for r in compose_config.routes] == [r.name for r in base.routes]
    for mine, ref in zip(compose_config.routes, base.routes, strict=False):
        assert mine.model_dump(exclude={"destinations"}) == ref.model_dump(exclude={"destinations"}), mine.name
        assert mine.destinations == ["pacs"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    orthanc = services["orthanc"]
    assert orthanc["environment"]["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert "./conf/compose/orthanc.env" in orthanc["env_file"]
    example = (REPO / "conf/compose/orthanc.env.example").read_text()
    assert re.search(r"^ORTHANC__REGISTERED_USERS=\{.+\}$", example, re.MULTILINE)
    assert "/conf/compose/orthanc.env" in (REPO / ".gitignore").read_text().splitlines()
    for name, service in services.items():
        for port in service.get("ports", []):
            if port == "11112:11112":  # modalities send to the node's DICOM port
                assert name == "dicom-node"
                continue
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_prometheus_config_checks_as_shipped(tmp_path):
    """promtool check config from anywhere, rule files included (not only
    --syntax-only inside compose)."""
    out = subprocess.run(["promtool", "check", "config", str(REPO / "conf/prometheus/prometheus.yml")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr


# -- the PACS integration recipe, run as written -----------------------------------------------------

def test_orthanc_autoroute_recipe_round_trip(node_factory, tmp_path):
    """docs/pacs-integration.md with Orthanc: the node registered as a
    modality, conf/orthanc/autoroute.lua installed; a CT series stored to
    Orthanc reaches the node once, and the results come back into the same
    study in Orthanc without being routed to the node again."""
    import json
    import time

    from helpers import Orthanc, ct_route, storescu, wait_for, write_ct_series

    pacs = Orthanc(tmp_path / "orthanc")
    node = node_factory(peers=[pacs.peer()], destinations=[{"name": "pacs", "kind": "dicom", "peer": "pacs"}],
                        routes=[ct_route(destinations=["pacs"])])
    config = json.loads(pacs.config.read_text())
    config.update({"LuaScripts": [str(REPO / "conf" / "orthanc" / "autoroute.lua")], "StableAge": 1,
                   "DicomModalities": {"dicom-node": ["DICOM_NODE", "127.0.0.1", node.port]}})
    pacs.config.write_text(json.dumps(config))
    node.start()
    pacs.start()
    try:
        files = write_ct_series(tmp_path / "ct", n=4, size=64, seed="recipe")
        storescu(pacs.dicom_port, files, aet="MODALITY", aec=pacs.aet)
        # 4 originals, 4 derived slices and the SR back in Orthanc.
        wait_for(lambda: len(pacs.instances()) >= 9, 120, 0.5, "results back in Orthanc")
        studies = pacs.get("/studies")
        assert len(studies) == 1, "results are in the source's study"
        senders = sorted(pacs.get(f"/instances/{pacs.get(f'/series/{s}')['Instances'][0]}/metadata?expand")
                         ["RemoteAET"] for s in pacs.get("/series"))
        assert senders == ["DICOM_NODE", "DICOM_NODE", "MODALITY"], "derived CT and SR came from the node"
        # Give Orthanc time to call the script on the result series too: the
        # node must receive nothing more than the source series.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            time.sleep(0.5)
        store = node.store()
        assert len(store.jobs()) == 1 and store.jobs()[0].state == "done"
        assert store.count_instances() == 4
        assert "queued" in (pacs.workdir / "orthanc.log").read_text()
    finally:
        pacs.stop()
