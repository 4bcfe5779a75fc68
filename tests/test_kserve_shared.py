"""Two nodes, each with its own data directory, ports and configuration,
sharing one Triton Inference Server (issue 13): both get results equal to
ONNX Runtime in process, and the server's own statistics show requests
from each.

The server is the real ``tritonserver`` of tests/triton_server.py.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from helpers import REPO, ct_route, storescu, wait_for, write_ct_series
from pydicom import dcmread
from triton_server import TritonServer

from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import PipelineInput, get_pipeline

pytestmark = pytest.mark.timeout(300)

MODELS = REPO / "models_onnx"
CPU = ["CPUExecutionProvider"]


def _server_counts(server: TritonServer) -> tuple[int, int]:
    """(inference_count, execution_count) of ct_denoise, from Triton's
    statistics extension (GET /v2/models/NAME/stats)."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/ct_denoise/stats", timeout=5) as rsp:
        stats = json.load(rsp)["model_stats"]
    return (sum(int(s.get("inference_count", 0)) for s in stats),
            sum(int(s.get("execution_count", 0)) for s in stats))


def _kserve_calls(node) -> float:
    """The node's own count of timed inference stages on the kserve backend."""
    found = re.findall(r'^dicom_node_inference_seconds_count\{[^}]*backend="kserve"[^}]*\} (\S+)$',
                       node.metrics(), re.M)
    return sum(float(v) for v in found)


def _sent(node, count: int) -> dict[str, object]:
    paths = wait_for(lambda: (lambda f: f if len(f) == count else None)(
        sorted((node.data_dir / "out").glob("**/*.dcm"))), 60, 0.1, f"{count} results in {node.workdir.name}")
    return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, paths)}


def test_two_nodes_with_their_own_data_share_one_triton(node_factory, tmp_path):
    server = TritonServer(tmp_path / "triton")
    server.add(MODELS / "ct_denoise.yaml")
    server.start()
    try:
        inference = {"providers": CPU, "models_dir": str(MODELS), "batch_size": 4,
                     "models": {"ct_denoise": {"backend": "kserve", "url": server.grpc_url, "timeout_s": 20}}}
        nodes = [node_factory(name, routes=[ct_route()], extra={"inference": inference})
                 for name in ("east", "west")]
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            wait_for(node.ready, 90, 0.2, f"{node.workdir.name} ready")
        assert nodes[0].data_dir != nodes[1].data_dir and nodes[0].port != nodes[1].port
        local = ModelRegistry(MODELS, CPU, batch_size=4).get("ct_denoise")

        # One series each, one node after the other, so that each rise of the
        # server's count is that node's; both nodes run all along.
        before = _server_counts(server)
        for i, node in enumerate(nodes):
            files = write_ct_series(tmp_path / f"in{i}", n=4, size=96, seed=f"shared-{i}")
            storescu(node.port, files)
            job = wait_for(lambda n=node: next((j for j in n.store().jobs() if j.state in ("done", "failed")),
                                               None), 90, 0.1, f"job on {node.workdir.name}")
            assert job.state == "done", job.reason
            sent = _sent(node, 5)  # 4 denoised CT images and the SR
            after = _server_counts(server)
            assert after[0] > before[0] and after[1] > before[1], (node.workdir.name, before, after)
            print(f"\n{node.workdir.name}: Triton ct_denoise (inferences, executions) {before} -> {after}")
            before = after
            assert _kserve_calls(node) >= 1
            # The same pipeline in process on the same instances: the same pixels.
            expected = get_pipeline("ct_denoise").run(
                PipelineInput(job.id, "ct", [dcmread(f) for f in files], {"batch_size": 4}), local)
            images = [ds for ds in expected.datasets if ds.Modality == "CT"]
            assert len(images) == 4 and len(sent) == len(expected.datasets)
            for ds in images:
                assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData
        # Each node kept its own records: one job each, none of the other's.
        for node in nodes:
            assert len(node.store().jobs()) == 1
    finally:
        server.stop()
