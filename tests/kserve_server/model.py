"""Triton Python-backend model serving one ONNX file with onnxruntime (tests only).

The server from the ``nvidia-pytriton`` wheel has the Python backend only, so
this stands in for Triton's ONNX Runtime backend: the same file, run by an
onnxruntime session with the options the node's in-process backend uses.
The ONNX path comes from the model config's ``onnx_path`` parameter.
"""

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = config["parameters"]["onnx_path"]["string_value"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                     for name in self.inputs}
            try:
                values = self.session.run(self.outputs, feeds)
            except Exception as exc:  # noqa: BLE001 - reported to the client
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"onnxruntime: {exc}")))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(v))
                                for n, v in zip(self.outputs, values, strict=False)]))
        return responses
