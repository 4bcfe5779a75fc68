"""Inference on a real Triton Inference Server (KServe v2), per model (issue 13).

The server is a real ``tritonserver`` (tests/triton_server.py), not a mock:
the same ONNX files, served over gRPC and HTTP, must give the node exactly
what ONNX Runtime in process gives it, through the very pre- and
post-processing the pipelines use.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zoo
from google.protobuf import text_format
from helpers import (
    REPO,
    ct_route,
    free_port,
    http_get,
    storescu,
    wait_for,
    write_ct_series,
    model_label,
)
from pydicom import dcmread
from triton_server import TritonServer
from tritonclient.grpc import model_config_pb2
from zoo.manifests import ACDC_LABELS, install

from dicom_node.cli import main as cli_main
from dicom_node.config import InferenceSettings, load_config
from dicom_node.errors import ConfigError, InferenceUnavailable, ModelLoadError
from dicom_node.infer.engine import ModelRegistry, sha256_of
from dicom_node.infer.manifest import load_manifest
from dicom_node.infer.runner import classify, denoise, segment
from dicom_node.pipelines.base import PipelineInput, get_pipeline

CT_MODEL = model_label("ct_denoise")

pytestmark = pytest.mark.timeout(240)

SHIPPED = REPO / "models_onnx"
LEVELS = (0.0, 0.3, 0.6, 0.9)
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The shipped models and three zoo models (NHWC, float16, int64 label map) in one folder."""
    folder = tmp_path_factory.mktemp("models")
    for path in SHIPPED.glob("*.yaml"):
        shutil.copy(path, folder)
        shutil.copy(SHIPPED / load_manifest(path).onnx, folder)
    linear = {"kind": "linear", "scale": 1000.0}
    install(zoo.nhwc_denoiser(), folder, "zoo_nhwc", "image-to-image", linear,
            image_to_image={"output_scale": 2000.0, "output_offset": -500.0})
    install(zoo.fp16_identity(), folder, "zoo_fp16", "image-to-image", linear, image_to_image={})
    install(zoo.intensity_segmenter(LEVELS, output="labelmap"), folder, "zoo_labelmap", "segmentation",
            {"kind": "linear", "scale": 1.0},
            segmentation={"labels": ACDC_LABELS, "output_kind": "labelmap"})
    return folder


def _tensor_change(manifest, **change):
    spec = manifest.inputs[0].model_copy(update=change)
    return manifest.model_copy(update={"inputs": [spec]})


@pytest.fixture(scope="module")
def triton(tmp_path_factory, models):
    server = TritonServer(tmp_path_factory.mktemp("triton"))
    for path in sorted(models.glob("*.yaml")):
        server.add(path)
    cxr = models / "cxr_triage.yaml"
    # Servers whose model is not the manifest's.
    server.add(cxr, "cxr_fp16", tweak=lambda m: _tensor_change(m, dtype="float16"))
    server.add(cxr, "cxr_128", tweak=lambda m: _tensor_change(m, shape=[None, 1, 128, 128]))
    server.add(cxr, "cxr_renamed", tweak=lambda m: m.model_copy(update={
        "outputs": [m.outputs[0].model_copy(update={"name": "prob"}), *m.outputs[1:]]}))
    server.start()
    yield server
    server.stop()


def _remote(models: Path, url: str, protocol: str = "grpc", **model) -> ModelRegistry:
    """A registry whose every model named in ``model`` (or all, by default) runs on the server."""
    settings = InferenceSettings.model_validate({
        "providers": CPU, "backend": "kserve", "batch_size": 4,
        "kserve": {"url": url, "protocol": protocol, "timeout_s": 20}, "models": model})
    return ModelRegistry.from_settings(models, settings)


def _local(models: Path) -> ModelRegistry:
    return ModelRegistry(models, CPU, batch_size=4)


def _images(shape, seed=1):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_same_results_in_process_and_on_triton(models, triton, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    local, remote = _local(models), _remote(models, url, protocol)
    worst = {}
    for name in ("cxr_triage", "cardiac_seg", "ct_denoise", "zoo_nhwc", "zoo_fp16", "zoo_labelmap"):
        a, b = local.get(name), remote.get(name)
        assert b.provider == f"kserve:{protocol}://{url}" and b.backend == "kserve"
        assert remote.check(name, live=True).ok
        manifest = a.manifest
        # Raw outputs for one and the same batch of input tensors...
        shape = [4 if d is None and i == 0 else 64 if d is None else d
                 for i, d in enumerate(manifest.input.shape)]
        x = _images(shape).astype(manifest.input.dtype)
        raw_a = a.run({manifest.input.name: x})
        raw_b = b.run({manifest.input.name: x})
        for out in raw_a:
            assert raw_b[out].dtype == raw_a[out].dtype and raw_b[out].shape == raw_a[out].shape
            worst[f"{name}.{out}"] = float(np.max(np.abs(raw_a[out].astype(np.float64)
                                                         - raw_b[out].astype(np.float64))))
            assert np.array_equal(raw_a[out], raw_b[out]), (name, out)
        # ... and what the pipelines make of them, through the runner.
        if manifest.task == "classification":
            image = _images((300, 280))
            ca, cb = classify(image, a), classify(image, b)
            assert ca.probabilities == cb.probabilities and ca.abnormal == cb.abnormal
            assert np.array_equal(ca.heatmap, cb.heatmap)
        elif manifest.task == "segmentation":
            stack = _images((3, 80, 72)) * (1.0 if name == "zoo_labelmap" else 4000.0)
            assert np.array_equal(segment(stack, (1.4, 1.4), a, 4), segment(stack, (1.4, 1.4), b, 4))
        else:
            volume = _images((5, 64, 72)) * 2000.0 - 1000.0
            assert np.array_equal(denoise(volume, (0.7, 0.7), a, 4), denoise(volume, (0.7, 0.7), b, 4))
    print(f"\n{protocol}: max |onnxruntime - triton| per output: {worst}")


def test_metadata_that_does_not_match_the_manifest_is_refused(models, triton):
    cases = {
        "cxr_fp16": "input 'input' is FP16 on the server, manifest says float32 (FP32)",
        "cxr_128": "input 'input' axis 2 is 128 on the server, manifest says 256",
        "cxr_renamed": "the server's model has no output 'probability'",
    }
    for served, message in cases.items():
        registry = _remote(models, triton.grpc_url, cxr_triage={"model_name": served})
        with pytest.raises(ModelLoadError) as info:
            registry.get("cxr_triage")
        assert message in str(info.value) and f"as {served!r}" in str(info.value)
        verdict = registry.check("cxr_triage")
        assert not verdict.ok and not verdict.transient and message in verdict.detail
    # A model the server does not have: permanent, named.
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        registry = _remote(models, url, protocol, cxr_triage={"model_name": "no_such_model"})
        with pytest.raises(ModelLoadError, match="no_such_model"):
            registry.get("cxr_triage")
    # The local file is still the model's identity.
    tampered = models.parent / "tampered"
    tampered.mkdir(exist_ok=True)
    shutil.copy(models / "cxr_triage.yaml", tampered)
    (tampered / "cxr_triage.onnx").write_bytes((models / "cxr_triage.onnx").read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        _remote(tampered, triton.grpc_url).get("cxr_triage")


def test_a_server_that_is_away_is_transient(models):
    port = free_port()  # nothing listens there
    for protocol in ("grpc", "http"):
        registry = _remote(models, f"127.0.0.1:{port}", protocol)
        with pytest.raises(InferenceUnavailable) as info:
            registry.get("cxr_triage")
        assert info.value.retryable
        verdict = registry.check("cxr_triage")
        assert not verdict.ok and verdict.transient and "unavailable" in verdict.detail


def test_a_deadline_exceeded_is_transient(models, triton):
    # gRPC deadlines are exact; the HTTP client's socket timeout has no such
    # guarantee at a microsecond, so only gRPC is asserted here.
    registry = _remote(models, triton.grpc_url, "grpc", cxr_triage={"timeout_s": 1e-6})
    with pytest.raises(InferenceUnavailable, match="DEADLINE_EXCEEDED"):
        registry.get("cxr_triage")


def test_inference_settings_are_validated(models, tmp_path):
    def load(inference: dict):
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump({"inference": {"models_dir": str(models), **inference}}))
        return load_config(path)

    bad = {
        "inference.models.cxr_triage.url: has no meaning with backend onnxruntime":
            {"models": {"cxr_triage": {"url": "h:8001"}}},
        "inference.kserve.url: backend kserve needs": {"backend": "kserve"},
        "inference.kserve.url: url 'grpc://h:1': give host:port": {"kserve": {"url": "grpc://h:1"}},
        "models.cxr_triage.bogus: Extra inputs": {"models": {"cxr_triage": {"bogus": 1}}},
        "models.cxr_triage.protocol": {"kserve": {"url": "h:1"},
                                       "models": {"cxr_triage": {"backend": "kserve", "protocol": "rest"}}},
        "inference.models.nope: no manifest nope.yaml": {"models": {"nope": {"backend": "onnxruntime"}}},
        "kserve.tls.certificate": {"kserve": {"url": "h:1", "tls": {"certificate": str(tmp_path / "x.pem")}}},
        "header name 'a b'": {"kserve": {"url": "h:1", "headers": {"a b": "x"}}},
    }
    for message, inference in bad.items():
        with pytest.raises(ConfigError, match=None) as info:
            load(inference)
        assert message in str(info.value), (message, str(info.value))
    config = load({"kserve": {"url": "triton:8001", "headers": {"X-Tenant": "a"}, "timeout_s": 5},
                   "models": {"ct_denoise": {"backend": "kserve", "model_name": "ct", "model_version": "3",
                                             "protocol": "http", "headers": {"X-Key": "k"}}}})
    target = config.inference.target("ct_denoise")
    assert (target.url, target.protocol, target.model_name, target.model_version, target.timeout_s) == (
        "triton:8001", "http", "ct", "3", 5)
    assert target.headers == {"X-Tenant": "a", "X-Key": "k"}
    assert config.inference.target("cxr_triage") is None


def test_export_triton_writes_a_model_repository(tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli_main(["models", "export-triton", str(out)]) == 0
    for path in sorted(SHIPPED.glob("*.yaml")):
        manifest = load_manifest(path)
        folder = out / manifest.name
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == manifest.name and config.platform == "onnxruntime_onnx"
        assert sha256_of(folder / "1" / "model.onnx") == manifest.sha256
        dynamic = all(t.shape[0] is None for t in [*manifest.inputs, *manifest.outputs])
        assert config.max_batch_size == ((manifest.max_batch or 4) if dynamic else 0)
        assert config.HasField("dynamic_batching") == dynamic
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        for specs, tensors in ((manifest.inputs, config.input), (manifest.outputs, config.output)):
            assert [t.name for t in tensors] == [s.name for s in specs]
            for spec, tensor in zip(specs, tensors, strict=False):
                shape = spec.shape[1:] if dynamic else spec.shape
                assert list(tensor.dims) == [-1 if d is None else d for d in shape]
                assert model_config_pb2.DataType.Name(tensor.data_type) == "TYPE_" + {
                    "float32": "FP32", "int64": "INT64", "uint8": "UINT8", "float16": "FP16"}[spec.dtype]
        if dynamic and manifest.input.layout == "NCHW":
            assert config.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW


def _ct_node(node_factory, models, url, name="node", **model):
    inference = {"providers": CPU, "models_dir": str(models), "batch_size": 4,
                 "models": {"ct_denoise": {"backend": "kserve", "url": url, "timeout_s": 10, **model}}}
    return node_factory(name, routes=[ct_route()], extra={"inference": inference})


def _job(store, predicate, what, timeout=60):
    return wait_for(lambda: next((j for j in store.jobs() if predicate(j)), None), timeout, 0.1, what)


def test_node_on_triton_sends_results_equal_to_in_process_and_waits_for_a_server_away(
        node_factory, models, tmp_path):
    server = TritonServer(tmp_path / "triton")
    server.add(models / "ct_denoise.yaml")
    server.start()
    try:
        node = _ct_node(node_factory, models, server.grpc_url).start()
        files = write_ct_series(tmp_path / "in1", n=4, size=96, seed="triton")
        storescu(node.port, files)
        store = node.store()
        job = _job(store, lambda j: j.state == "done", "job done on Triton")
        outputs = wait_for(lambda: (lambda f: f if len(f) == 5 else None)(
            sorted((node.data_dir / "out").glob("**/*.dcm"))), 30, 0.1, "4 CT images and an SR sent")
        sent = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in outputs}
        # The same pipeline in process on the same instances: the same pixels.
        local = get_pipeline("ct_denoise").run(
            PipelineInput(job.id, "ct", [dcmread(f) for f in files], {"batch_size": 4}),
            _local(models).get("ct_denoise"))
        images = [ds for ds in local.datasets if ds.Modality == "CT"]
        assert images and len(sent) == len(local.datasets)
        for ds in images:
            assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData
        assert 'backend="kserve"' in node.metrics()
        verify = node.cli("models", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"model {CT_MODEL}: OK on kserve:grpc://{server.grpc_url}" in verify.stdout

        # The server goes away: the next job waits, retried with backoff, never failed.
        server.stop()
        storescu(node.port, write_ct_series(tmp_path / "in2", n=4, size=96, seed="away"))
        deferred = _job(store, lambda j: j.id != job.id and j.deferrals >= 2, "job deferred twice", 60)
        assert deferred.state in ("queued", "running") and deferred.attempts <= 1
        assert "inference server unavailable" in (deferred.reason or "")
        status, body = http_get(f"http://127.0.0.1:{node.http_port}/readyz")
        assert status == 503 and b"ct_denoise" in body and b"unavailable" in body
        assert not any(j.state == "failed" for j in store.jobs())
        server.start()
        _job(store, lambda j: j.id == deferred.id and j.state == "done", "deferred job done", 60)
        wait_for(node.ready, 20, 0.2, "ready again")
        assert "deferred" in node.log() and "inference server unavailable" in node.log()

        # A model name the server does not have: not ready, and the job fails with the reason.
        wrong = _ct_node(node_factory, models, server.grpc_url, "wrong", model_name="no_such_model")
        wrong.start(wait=False)
        wait_for(lambda: http_get(f"http://127.0.0.1:{wrong.http_port}/readyz")[0] == 503, 60, 0.2,
                 "wrong node answering")
        storescu(wrong.port, write_ct_series(tmp_path / "in3", n=4, size=96, seed="wrong"))
        failed = _job(wrong.store(), lambda j: j.state == "failed", "job failed for good")
        assert "no_such_model" in failed.reason
        verify = wrong.cli("models", "verify")
        assert verify.returncode == 1 and "model ct_denoise: FAILED" in verify.stdout
        assert "Request for unknown model: 'no_such_model'" in verify.stdout
    finally:
        server.stop()


def test_grpc_with_mutual_tls(models, tmp_path):
    from test_tls import _make_ca, _make_leaf

    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _make_ca(pki, "ca")
    server_cert, server_key = _make_leaf(pki, "server", ca)
    client_cert, client_key = _make_leaf(pki, "client", ca)
    server = TritonServer(tmp_path / "triton", args=[
        "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={server_cert}",
        f"--grpc-server-key={server_key}", f"--grpc-root-cert={ca[0]}"])
    server.add(models / "cxr_triage.yaml")
    server.start()
    try:
        tls = {"ca_file": str(ca[0]), "certificate": str(client_cert), "private_key": str(client_key)}
        registry = _remote(models, server.grpc_url, cxr_triage={"tls": tls, "headers": {"X-Tenant": "t"}})
        image = _images((256, 256))
        assert classify(image, registry.get("cxr_triage")).probabilities == classify(
            image, _local(models).get("cxr_triage")).probabilities
        # Without our certificate the server refuses the handshake.
        refused = _remote(models, server.grpc_url, cxr_triage={"tls": {"ca_file": str(ca[0])}})
        assert not refused.check("cxr_triage").ok
    finally:
        server.stop()
