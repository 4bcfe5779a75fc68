"""ONNX Runtime sessions: one per model, reused, on the best provider present.

Loading checks the file's sha256 and the graph's inputs and outputs against
the manifest, so a swapped or corrupted model fails loudly at start rather
than producing plausible nonsense.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from dicom_node.errors import ContractError, DicomNodeError, InferenceUnavailable, ModelLoadError
from dicom_node.infer.manifest import ModelManifest, TensorSpec, load_manifest
from dicom_node.infer.verify import Verified, verify_model

if TYPE_CHECKING:
    from dicom_node.config import InferenceSettings
    from dicom_node.infer.runner import InferenceModel

__all__ = ["OnnxModel", "ModelRegistry", "sha256_of", "choose_providers", "verified_onnx",
           "provider_problem", "GPU_PROVIDERS"]

log = logging.getLogger("dicom_node.infer")

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "float64": "tensor(double)",
              "int64": "tensor(int64)", "int32": "tensor(int32)", "int16": "tensor(int16)",
              "int8": "tensor(int8)", "uint8": "tensor(uint8)"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# onnxruntime prints its own multi-line errors when a GPU provider cannot
# load; we say it once, in our log, instead.
ort.set_default_logger_severity(4)

GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})

# The shared library onnxruntime-gpu loads for each GPU provider.  When it
# cannot, onnxruntime falls back to the CPU without saying why (we silence
# its log); loading it ourselves makes the dynamic linker name the missing
# dependency (a CUDA library, cuDNN, TensorRT's libnvinfer, the driver's libcuda).
_PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
                       "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}


def _gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _build_cuda() -> str:
    """The CUDA version this onnxruntime build was made for ("" for a CPU build)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return ""
    return str(getattr(info, "cuda_version", "") or "")


def _unloadable(library: str) -> str | None:
    """The dynamic linker's reason ``library`` (in onnxruntime's package) cannot
    be loaded, when a file it needs is missing; None when it loads."""
    capi = Path(ort.__file__).resolve().parent / "capi"
    path = capi / library
    if not path.is_file():
        return f"{library} is not in the onnxruntime package at {capi}"
    try:
        # Provider libraries take their host symbols from the shared bridge,
        # which onnxruntime itself loads globally before them.
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(path))
    except OSError as exc:
        text = str(exc)
        if "cannot open shared object file" not in text:
            return None  # loads as far as files go; onnxruntime's own failure, said elsewhere
        missing = text.rsplit(": cannot open", 1)[0].rsplit(": ", 1)[-1]
        return f"{library} cannot be loaded: {missing}: cannot open shared object file"
    return None


@functools.cache
def provider_problem(name: str) -> str | None:
    """Why this host cannot give execution provider ``name``, naming the
    missing piece; None when nothing is known against it."""
    if name == "CPUExecutionProvider":
        return None
    if name not in ort.get_available_providers():
        return f"not in this onnxruntime build ({ort.__version__}; it has {', '.join(ort.get_available_providers())})"
    library = _PROVIDER_LIBRARIES.get(name)
    problem = _unloadable(library) if library else None
    if problem is not None:
        cuda = _build_cuda()
        built = f" (onnxruntime {ort.__version__} is built for CUDA {cuda}; see README, The GPU path)" if cuda else ""
        return problem + built
    if name in GPU_PROVIDERS and not _gpu_present():
        return "no NVIDIA GPU device on this host (/dev/nvidiactl absent; in Docker: --gpus)"
    return None


def choose_providers(wanted: Sequence[str], device_id: int) -> list[str | tuple[str, dict[str, int]]]:
    """Keep the configured providers this onnxruntime build has and this host
    can use, in order; the CPU provider is always last so inference never has
    nowhere to run."""
    available = set(ort.get_available_providers())
    gpu = _gpu_present()
    chosen: list[str | tuple[str, dict[str, int]]] = []
    for name in wanted:
        if name not in available or name == "CPUExecutionProvider":
            continue
        if name in GPU_PROVIDERS and not gpu:
            continue
        chosen.append((name, {"device_id": device_id}))
    chosen.append("CPUExecutionProvider")
    return chosen


def verified_onnx(manifest_path: Path, manifest: ModelManifest) -> Path:
    """The model file beside the manifest, after checking it is the one declared."""
    onnx_path = manifest_path.parent / manifest.onnx
    if not onnx_path.is_file():
        raise ModelLoadError(f"{manifest_path}: model file {onnx_path.name} not found")
    digest = sha256_of(onnx_path)
    if digest != manifest.sha256:
        raise ModelLoadError(f"{onnx_path}: sha256 {digest} does not match the manifest's "
                             f"{manifest.sha256}; refusing to load a model that is not the one declared")
    return onnx_path


@dataclass
class OnnxModel:
    manifest: ModelManifest
    path: Path
    session: ort.InferenceSession
    provider: str
    # Providers asked for before the one obtained, each with why it was not.
    not_obtained: dict[str, str] = field(default_factory=dict)
    backend = "onnxruntime"

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in self.manifest.outputs]
        try:
            values = self.session.run(names, inputs)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            shapes = {k: (list(v.shape), str(v.dtype)) for k, v in inputs.items()}
            raise ContractError(f"model {self.manifest.name}: onnxruntime refused the input "
                                f"{shapes}: {str(exc).splitlines()[0][:300]}") from exc
        return dict(zip(names, values, strict=False))

    @property
    def input_name(self) -> str:
        return self.manifest.inputs[0].name

    @classmethod
    def load(cls, manifest_path: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
             device_id: int = 0, intra_op_threads: int = 0) -> OnnxModel:
        manifest = load_manifest(manifest_path)
        onnx_path = verified_onnx(manifest_path, manifest)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        # onnxruntime's CPU threads otherwise spin for work after each run,
        # taking the cores that decode, encode, receive and send share with
        # the model: measured on 2 cores, a CXR job used about a quarter
        # less CPU per radiograph without it, and inference alone ran as
        # fast (CT denoising within 1 %).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = choose_providers(providers, device_id)
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"{onnx_path}: onnxruntime cannot load it: {exc}") from exc
        _check_signature(onnx_path, manifest.inputs, session.get_inputs(), "input")
        _check_signature(onnx_path, manifest.outputs, session.get_outputs(), "output")
        # What the session really got, not what was asked: onnxruntime-gpu
        # lists CUDA as available even where it cannot create it.
        provider = session.get_providers()[0]
        not_obtained = _not_obtained(providers, provider)
        if not_obtained:
            log.warning("model %s %s runs on %s; %s", manifest.name, manifest.version, provider,
                        "; ".join(f"{name} not obtained: {why}" for name, why in not_obtained.items()))
        else:
            log.info("model %s %s loaded on %s", manifest.name, manifest.version, provider)
        return cls(manifest=manifest, path=onnx_path, session=session, provider=provider,
                   not_obtained=not_obtained)


def _not_obtained(wanted: Sequence[str], obtained: str) -> dict[str, str]:
    """Each provider configured before ``obtained``, with the reason it is not in use."""
    reasons: dict[str, str] = {}
    for name in wanted:
        if name == obtained:
            break
        reasons[name] = provider_problem(name) or (
            "onnxruntime could not create it although its libraries load and a GPU device exists "
            "(check the driver with nvidia-smi, and inference.device_id)")
    return reasons


def _check_signature(path: Path, declared: list[TensorSpec], actual: list[Any], kind: str) -> None:
    by_name = {a.name: a for a in actual}
    for spec in declared:
        node = by_name.get(spec.name)
        if node is None:
            raise ModelLoadError(f"{path}: graph has no {kind} {spec.name!r} "
                                 f"(it has {sorted(by_name)})")
        if node.type != _ORT_TYPES[spec.dtype]:
            raise ModelLoadError(f"{path}: {kind} {spec.name!r} is {node.type}, manifest says {spec.dtype}")
        shape = list(node.shape)
        if len(shape) != len(spec.shape):
            raise ModelLoadError(f"{path}: {kind} {spec.name!r} has rank {len(shape)}, "
                                 f"manifest says {len(spec.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=False)):
            if want is not None and isinstance(got, int) and got != want:
                raise ModelLoadError(f"{path}: {kind} {spec.name!r} axis {axis} is {got}, "
                                     f"manifest says {want}")


class ModelRegistry:
    """Manifests found in the models folder; sessions created on first use.

    Each model runs where ``inference`` says (``inference.backend`` and
    ``inference.models``): in this process on ONNX Runtime, or on a KServe v2
    server (dicom_node/infer/kserve.py).  A model is handed out only after
    its contract check passed (see dicom_node/infer/verify.py), whatever the
    backend; the verdict is kept for ``/readyz``.  A remote server that
    cannot answer is no verdict: the next call tries again."""

    def __init__(self, models_dir: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 device_id: int = 0, intra_op_threads: int = 0, batch_size: int = 2,
                 inference: InferenceSettings | None = None) -> None:
        self.models_dir = models_dir
        self.providers = list(providers)
        self.device_id = device_id
        self.intra_op_threads = intra_op_threads
        self.batch_size = batch_size
        self.inference = inference
        self._loaded: dict[str, InferenceModel] = {}
        self.verdicts: dict[str, Verified] = {}

    @classmethod
    def from_settings(cls, models_dir: Path, inf: InferenceSettings) -> ModelRegistry:
        return cls(models_dir, inf.providers, inf.device_id, inf.intra_op_threads, inf.batch_size,
                   inference=inf)

    def backend_of(self, name: str) -> str:
        return self.inference.backend_of(name) if self.inference else "onnxruntime"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.models_dir.glob("*.yaml"))

    def manifest(self, name: str) -> ModelManifest:
        return load_manifest(self._manifest_path(name))

    def verify(self, name: str) -> Path:
        """Check a model's manifest and file without creating a session."""
        path = self._manifest_path(name)
        return verified_onnx(path, load_manifest(path))

    def check(self, name: str, live: bool = False) -> Verified:
        """Load the model and run its contract check; never raises.  With
        ``live``, a loaded remote model is asked again whether it is ready
        (for ``/readyz``)."""
        try:
            model = self.get(name)
        except InferenceUnavailable as exc:
            self.verdicts[name] = Verified(False, str(exc), transient=True)
            return self.verdicts[name]
        except DicomNodeError as exc:
            known = self.verdicts.get(name)
            if known is None or known.transient:
                self.verdicts[name] = Verified(False, str(exc))
            return self.verdicts[name]
        if live and hasattr(model, "probe"):
            problem = model.probe()
            if problem is not None:
                return Verified(False, problem, transient=True)
        return self.verdicts.get(name) or Verified(True, f"loaded on {model.provider}")

    def get(self, name: str) -> InferenceModel:
        model = self._loaded.get(name)
        if model is not None:
            return model
        target = self.inference.target(name) if self.inference else None
        if target is not None:
            from dicom_node.infer.kserve import KServeModel

            model = KServeModel.load(self._manifest_path(name), target)
        else:
            model = OnnxModel.load(self._manifest_path(name), self.providers, self.device_id,
                                   self.intra_op_threads)
        verdict = verify_model(model, min(2, self.batch_size))
        self.verdicts[name] = verdict
        if not verdict.ok:
            raise ModelLoadError(f"{model.path}: contract check failed: {verdict.detail}")
        self._loaded[name] = model
        return model

    def cpu_fallback(self, name: str) -> str | None:
        """Why loaded in-process model ``name`` runs on no GPU provider (for
        ``inference.require_gpu``); None when it runs on one, is not loaded, or
        runs on a remote server (whose GPU is the server's business)."""
        model = self._loaded.get(name)
        if not isinstance(model, OnnxModel) or model.provider in GPU_PROVIDERS:
            return None
        why = "; ".join(f"{p} not obtained: {r}" for p, r in model.not_obtained.items())
        return f"runs on {model.provider}" + (f" ({why})" if why else " (no GPU provider configured)")

    def forget(self, name: str) -> None:
        """Drop a loaded model, so the next ``get`` loads and checks it again
        (after a remote server went away: it may come back with another model)."""
        model = self._loaded.pop(name, None)
        close = getattr(model, "close", None)
        if close is not None:
            close()

    def _manifest_path(self, name: str) -> Path:
        path = self.models_dir / f"{name}.yaml"
        if not path.is_file():
            raise ModelLoadError(f"no manifest {path.name} in {self.models_dir} "
                                 f"(models there: {', '.join(self.names()) or 'none'})")
        return path
