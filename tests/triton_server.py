"""A real Triton Inference Server for the tests (not a mock).

The ``tritonserver`` binary (2.51) comes from the ``nvidia-pytriton`` wheel,
installed by ``make test`` into its own virtualenv (``.venv-triton``: it pins
numpy<2), with the same onnxruntime version as the node's.  That build has
only Triton's Python backend, so each model is served by tests/kserve_server/model.py,
which runs the model's ONNX file in an onnxruntime session: the server speaks
KServe v2 over HTTP and gRPC like any Triton.

Known traps, handled here: the backend stub must load the interpreter's own
libpython (LIBDIR on LD_LIBRARY_PATH); explicit model control, so a
``__pycache__`` never triggers a reload and one bad model does not make the
server unready; loopback only; the server runs in its own process group,
which ``stop`` kills.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

from helpers import REPO, free_port, wait_for

from dicom_node.infer.manifest import ModelManifest, load_manifest
from dicom_node.infer.triton_repo import config_pbtxt

TRITON_VENV = Path(os.environ.get("DICOM_NODE_TRITON_VENV", REPO / ".venv-triton"))
MODEL_PY = Path(__file__).resolve().parent / "kserve_server" / "model.py"


def _venv_facts() -> tuple[Path, Path, Path, str]:
    """(pytriton package dir, its shared libraries, site-packages, libpython dir)."""
    python = TRITON_VENV / "bin" / "python"
    if not python.exists():
        raise AssertionError(f"no Triton virtualenv at {TRITON_VENV}: run `make test` (or "
                             "`make triton-server`) to install nvidia-pytriton there")
    out = subprocess.run([str(python), "-c", (
        "import sysconfig, site, pathlib, pytriton;"
        "print(pathlib.Path(pytriton.__file__).parent);"
        "print(site.getsitepackages()[0]);"
        "print(sysconfig.get_config_var('LIBDIR'))")], capture_output=True, text=True, check=True)
    package, site_packages, libdir = out.stdout.split("\n")[:3]
    return Path(package), Path(package).parent / "nvidia_pytriton.libs", Path(site_packages), libdir


class TritonServer:
    """``tritonserver`` on free loopback ports over a model repository of
    Python-backend models, each running one of our ONNX files."""

    def __init__(self, workdir: Path, args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.extra_args = list(args or [])  # e.g. gRPC TLS options
        self.repo = workdir / "models"
        self.repo.mkdir(parents=True, exist_ok=True)
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.models: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "triton.log"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def add(self, manifest_path: Path, name: str | None = None, batch_size: int = 4,
            tweak: Callable[[ModelManifest], ModelManifest] | None = None) -> str:
        """Serve the manifest's ONNX file as model ``name`` (default: the
        manifest's name); ``tweak`` changes what the server declares (for
        tests of a server whose model does not match the manifest)."""
        manifest = load_manifest(manifest_path)
        name = name or manifest.name
        folder = self.repo / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODEL_PY, folder / "1" / "model.py")
        onnx = (manifest_path.parent / manifest.onnx).resolve()
        text = config_pbtxt(tweak(manifest) if tweak else manifest, batch_size, name=name, platform=None, backend="python",
                            instance_kind="KIND_CPU", parameters={"onnx_path": str(onnx)})
        (folder / "config.pbtxt").write_text(text)
        self.models.append(name)
        return name

    def start(self, timeout: float = 60.0) -> TritonServer:
        package, libs, site_packages, libdir = _venv_facts()
        server = package / "tritonserver"
        # The stub for this Python beside the backend, as pytriton lays it out.
        backends = self.workdir / "backends"
        python_backend = backends / "python"
        if not python_backend.exists():
            shutil.copytree(server / "backends" / "python", python_backend,
                            ignore=shutil.ignore_patterns("__pycache__"))
            version = subprocess.run([str(TRITON_VENV / "bin" / "python"), "-c",
                                      "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            shutil.copy(server / "python_backend_stubs" / version / "triton_python_backend_stub",
                        python_backend / "triton_python_backend_stub")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update({
            "LD_LIBRARY_PATH": ":".join([libdir, str(libs)]),
            "PYTHONPATH": str(site_packages),
            # The stub's embedded Python finds its prefix (the venv) from the
            # python on PATH, as pytriton arranges it.
            "PATH": f"{TRITON_VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        })
        args = [str(server / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={backends}", "--model-control-mode=explicit",
                *[f"--load-model={m}" for m in self.models],
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-metrics=false", "--allow-gpu-metrics=false", "--log-verbose=0",
                "--exit-on-error=true", "--strict-readiness=true",
                f"--cache-directory={self.workdir / 'cache'}", *self.extra_args]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.workdir, start_new_session=True)
        wait_for(self.ready, timeout, 0.1, "Triton ready")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"tritonserver exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server and everything it started (the backend stubs)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stubs left behind, if any
            except ProcessLookupError:
                pass
            self.proc = None
