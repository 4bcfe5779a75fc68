"""Inference on a KServe v2 server (NVIDIA Triton and others), one model at a time.

``KServeModel`` is an ``InferenceModel`` (dicom_node/infer/runner.py): the
pipelines hand it the same tensors they hand ONNX Runtime, so pre- and
post-processing are the node's whatever the backend.  The manifest stays the
model's identity: the local ONNX file must still match its sha256, and at load
the server's metadata for the model (input and output names, shapes with -1
for dynamic axes, datatypes) must agree with the manifest.

Failures are classified as the outbox classifies a C-STORE's:

* transient (unavailable, deadline exceeded, overloaded, connection refused)
  raise ``InferenceUnavailable``: the worker queues the job again after a
  backoff and never fails it for this;
* permanent (unknown model, shape or dtype mismatch, invalid argument) raise
  ``ModelLoadError`` at load and ``ContractError`` during a job, which then
  fails with the reason.

gRPC is the preferred protocol; HTTP sends and receives binary tensors.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.config import KServeTarget
from dicom_node.errors import (
    ContractError,
    DicomNodeError,
    InferenceUnavailable,
    ModelLoadError,
)
from dicom_node.infer.manifest import ModelManifest, TensorSpec, load_manifest

__all__ = ["KSERVE_DTYPES", "KServeModel", "check_metadata", "classify_failure"]

log = logging.getLogger("dicom_node.infer")

# Manifest dtype -> KServe v2 datatype.
KSERVE_DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "uint8": "UINT8",
                 "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64"}
_FROM_KSERVE = {v: k for k, v in KSERVE_DTYPES.items()}

# gRPC status codes and HTTP statuses after which the same request may
# succeed later.  CANCELLED: the node never cancels a call itself, so a
# cancelled one is the server going away mid-request.
_TRANSIENT_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
_TRANSIENT_HTTP = {"408", "429", "502", "503", "504"}
# A /readyz probe must answer fast even when the server is black-holed.
_PROBE_TIMEOUT_S = 2.0
_PROBE_TTL_S = 2.0


def _status_of(exc: BaseException) -> str | None:
    status = getattr(exc, "status", None)
    value = status() if callable(status) else status
    return None if value is None else str(value).removeprefix("StatusCode.")


def _message_of(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = str((message() if callable(message) else None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def classify_failure(exc: BaseException, model: str, what: str,
                     permanent: type[DicomNodeError], where: str | None = None,
                     server: str | None = None) -> DicomNodeError:
    """The node's error for a failed call: ``InferenceUnavailable`` when
    trying again later may succeed, else ``permanent`` with the reason.
    ``where`` (default ``model MODEL``) names the model and server."""
    status = _status_of(exc)
    message = _message_of(exc)
    transient = (status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP
                 or (status is None and isinstance(exc, (OSError, TimeoutError)))
                 or type(exc).__name__ == "Timeout")  # gevent.Timeout (HTTP client)
    if transient:
        at = f"{server}: " if server else ""
        return InferenceUnavailable(model, f"{at}{what}: {status or type(exc).__name__}: {message}")
    return permanent(f"{where or f'model {model}'}: {what} refused by the server"
                     f"{f' ({status})' if status else ''}: {message}")


def _shape(values: Any) -> list[int]:
    return [int(v) for v in values]


def check_metadata(manifest: ModelManifest, metadata: dict[str, Any], where: str) -> None:
    """The server's view of the model against the manifest; ModelLoadError names the mismatch.

    A dynamic axis on the server (-1) takes anything, so it matches a fixed
    axis in the manifest; a fixed axis on the server must equal the
    manifest's, which must not be dynamic there."""
    for kind, declared, served in (("input", manifest.inputs, metadata.get("inputs") or []),
                                   ("output", manifest.outputs, metadata.get("outputs") or [])):
        by_name = {t["name"]: t for t in served}
        for spec in declared:
            tensor = by_name.get(spec.name)
            if tensor is None:
                raise ModelLoadError(f"{where}: the server's model has no {kind} {spec.name!r} "
                                     f"(it has {sorted(by_name)})")
            _check_tensor(spec, tensor, kind, where)
        if kind == "input" and len(served) != len(declared):
            extra = sorted(set(by_name) - {s.name for s in declared})
            raise ModelLoadError(f"{where}: the server's model takes inputs {extra} that the "
                                 "manifest does not declare")


def _check_tensor(spec: TensorSpec, tensor: dict[str, Any], kind: str, where: str) -> None:
    datatype = str(tensor.get("datatype", ""))
    if _FROM_KSERVE.get(datatype) != spec.dtype:
        raise ModelLoadError(f"{where}: {kind} {spec.name!r} is {datatype} on the server, manifest "
                             f"says {spec.dtype} ({KSERVE_DTYPES[spec.dtype]})")
    shape = _shape(tensor.get("shape") or [])
    if len(shape) != len(spec.shape):
        raise ModelLoadError(f"{where}: {kind} {spec.name!r} has shape {shape} on the server "
                             f"(rank {len(shape)}), manifest says {spec.shape} (rank {len(spec.shape)})")
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=False)):
        if got == -1:
            continue
        if want is None or want != got:
            raise ModelLoadError(f"{where}: {kind} {spec.name!r} axis {axis} is {got} on the server, "
                                 f"manifest says {'dynamic' if want is None else want}")


class _Client:
    """One protocol's calls, as plain dicts and numpy arrays."""

    def __init__(self, target: KServeTarget) -> None:
        self.target = target
        self.headers = dict(target.headers)
        if target.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self._mod = grpcclient
            tls = target.tls
            self.headers = {k.lower(): v for k, v in self.headers.items()}  # gRPC metadata keys
            self._grpc = grpcclient.InferenceServerClient(
                target.url, ssl=tls is not None,
                root_certificates=str(tls.ca_file) if tls and tls.ca_file else None,
                private_key=str(tls.private_key) if tls and tls.private_key else None,
                certificate_chain=str(tls.certificate) if tls and tls.certificate else None)
        else:
            import tritonclient.http as httpclient

            self._mod = httpclient
            # The HTTP client runs on gevent, whose hub is per thread: one client per thread.
            self._local = threading.local()

    def _client(self) -> Any:
        if self.target.protocol == "grpc":
            return self._grpc
        client = getattr(self._local, "client", None)
        if client is None:
            tls = self.target.tls
            factory = None
            if tls is not None:
                def factory(**_: Any) -> ssl.SSLContext:
                    import gevent.ssl

                    context = gevent.ssl.create_default_context(
                        cafile=str(tls.ca_file) if tls.ca_file else None)
                    if tls.certificate is not None:
                        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
                    return context
            timeout = self.target.timeout_s
            client = self._mod.InferenceServerClient(
                self.target.url, connection_timeout=timeout, network_timeout=timeout,
                ssl=tls is not None, ssl_context_factory=factory)
            self._local.client = client
        return client

    def metadata(self, timeout: float) -> dict[str, Any]:
        t = self.target
        if t.protocol == "grpc":
            return self._grpc.get_model_metadata(t.model_name, t.model_version, headers=self.headers,
                                                 as_json=True, client_timeout=timeout)
        return self._client().get_model_metadata(t.model_name, t.model_version, headers=self.headers)

    def ready(self, timeout: float) -> bool:
        t = self.target
        if t.protocol == "grpc":
            return bool(self._grpc.is_model_ready(t.model_name, t.model_version, headers=self.headers,
                                                  client_timeout=timeout))
        return bool(self._client().is_model_ready(t.model_name, t.model_version, headers=self.headers))

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        t, mod = self.target, self._mod
        grpc = t.protocol == "grpc"
        requests = []
        for name, value in inputs.items():
            value = np.ascontiguousarray(value)
            tensor = mod.InferInput(name, list(value.shape), KSERVE_DTYPES[str(value.dtype)])
            if grpc:
                tensor.set_data_from_numpy(value)
            else:
                tensor.set_data_from_numpy(value, binary_data=True)
            requests.append(tensor)
        wanted = [mod.InferRequestedOutput(n) if grpc else mod.InferRequestedOutput(n, binary_data=True)
                  for n in outputs]
        if grpc:
            result = self._grpc.infer(t.model_name, requests, model_version=t.model_version,
                                      outputs=wanted, headers=self.headers, client_timeout=t.timeout_s)
        else:
            result = self._client().infer(t.model_name, requests, model_version=t.model_version,
                                          outputs=wanted, headers=self.headers)
        values = {}
        for name in outputs:
            value = result.as_numpy(name)
            if value is None:
                raise ContractError(f"model {t.model_name}: the server's response has no output {name!r}")
            values[name] = value
        return values

    def close(self) -> None:
        if self.target.protocol == "grpc":
            self._grpc.close()
        else:
            client = getattr(self._local, "client", None)
            if client is not None:
                client.close()


class KServeModel:
    """A model served by a KServe v2 server, checked against its manifest."""

    def __init__(self, manifest: ModelManifest, path: Path, target: KServeTarget,
                 client: _Client | None = None) -> None:
        self.manifest = manifest
        self.path = path
        self.target = target
        self.provider = f"kserve:{target.protocol}://{target.url}"
        self._client = client or _Client(target)
        self._probe: tuple[float, str | None] = (0.0, None)

    @property
    def backend(self) -> str:
        return "kserve"

    @property
    def where(self) -> str:
        version = f" version {self.target.model_version}" if self.target.model_version else ""
        return f"model {self.manifest.name} on {self.provider} (as {self.target.model_name!r}{version})"

    def _call(self, what: str, call: Callable[[], Any], permanent: type[DicomNodeError]) -> Any:
        try:
            return call()
        except DicomNodeError:
            raise
        except Exception as exc:
            raise classify_failure(exc, self.manifest.name, what, permanent, self.where,
                                   self.provider) from exc

    @classmethod
    def load(cls, manifest_path: Path, target: KServeTarget) -> KServeModel:
        from dicom_node.infer.engine import verified_onnx

        manifest = load_manifest(manifest_path)
        # The manifest, and the file it names, stay the model's identity.
        onnx_path = verified_onnx(manifest_path, manifest)
        model = cls(manifest, onnx_path, target)
        metadata = model._call("model metadata", lambda: model._client.metadata(target.timeout_s),
                               ModelLoadError)
        check_metadata(manifest, metadata, model.where)
        log.info("model %s %s served by %s as %r%s; metadata matches the manifest", manifest.name,
                 manifest.version, model.provider, target.model_name,
                 f" version {target.model_version}" if target.model_version else "")
        return model

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in self.manifest.outputs]
        return self._call("inference", lambda: self._client.infer(inputs, names), ContractError)

    def probe(self) -> str | None:
        """None when the server says the model is ready, else why not (cached briefly)."""
        at, problem = self._probe
        if time.monotonic() - at < _PROBE_TTL_S:
            return problem
        try:
            ready = self._call("readiness", lambda: self._client.ready(min(self.target.timeout_s,
                                                                            _PROBE_TIMEOUT_S)),
                               ModelLoadError)
            problem = None if ready else f"{self.where}: the server says the model is not ready"
        except DicomNodeError as exc:
            problem = str(exc)
        self._probe = (time.monotonic(), problem)
        return problem

    def close(self) -> None:
        self._client.close()
