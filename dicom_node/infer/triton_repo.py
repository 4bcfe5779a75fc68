"""A Triton model repository from the manifests (``dicom-node models export-triton DIR``).

For each model: ``DIR/NAME/config.pbtxt`` (platform ``onnxruntime_onnx``, the
inputs and outputs with their data types and dims, ``max_batch_size``,
dynamic batching, an instance group) and ``DIR/NAME/1/model.onnx``, the very
file the manifest's sha256 names.  A site serves exactly the validated files
on its Triton and points the node at it with ``backend: kserve``.

Batching follows Triton's rule: with ``max_batch_size`` > 0 the dims leave
out the batch axis, which must then be dynamic on every tensor; a model with
a fixed batch axis gets ``max_batch_size: 0`` and its full shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dicom_node.infer.manifest import ModelManifest, TensorSpec

__all__ = ["TRITON_TYPES", "batching", "config_pbtxt", "export_model"]

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
                "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
                "int32": "TYPE_INT32", "int64": "TYPE_INT64"}
# Triton's tensor formats for image inputs (others: FORMAT_NONE).
_FORMATS = {"NCHW": "FORMAT_NCHW", "NHWC": "FORMAT_NHWC"}


def batching(manifest: ModelManifest, batch_size: int) -> int:
    """Triton's max_batch_size for the model: 0 when any tensor's batch axis
    is fixed, else the manifest's max_batch (or the node's batch size)."""
    tensors = [*manifest.inputs, *manifest.outputs]
    if any(t.shape[0] is not None for t in tensors):
        return 0
    return manifest.max_batch or batch_size


def _dims(spec: TensorSpec, batched: bool) -> str:
    shape = spec.shape[1:] if batched else spec.shape
    return "[ " + ", ".join("-1" if d is None else str(d) for d in shape) + " ]"


def _tensor(spec: TensorSpec, batched: bool, with_format: bool) -> str:
    lines = [f"    name: {json.dumps(spec.name)}",
             f"    data_type: {TRITON_TYPES[spec.dtype]}"]
    # Triton allows a format only on a batched image input of three dims (C, H, W).
    if with_format and batched and spec.layout in _FORMATS:
        lines.append(f"    format: {_FORMATS[spec.layout]}")
    lines.append(f"    dims: {_dims(spec, batched)}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(manifest: ModelManifest, batch_size: int, *, name: str | None = None,
                 instance_kind: str = "KIND_GPU", instance_count: int = 1,
                 platform: str | None = "onnxruntime_onnx", backend: str | None = None,
                 parameters: dict[str, str] | None = None) -> str:
    """The model's config.pbtxt, in protobuf text format (Triton's ModelConfig)."""
    max_batch = batching(manifest, batch_size)
    batched = max_batch > 0
    lines = [f"name: {json.dumps(name or manifest.name)}"]
    if platform:
        lines.append(f"platform: {json.dumps(platform)}")
    if backend:
        lines.append(f"backend: {json.dumps(backend)}")
    lines.append(f"max_batch_size: {max_batch}")
    lines.append("input [\n" + ",\n".join(_tensor(s, batched, True) for s in manifest.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(s, batched, False) for s in manifest.outputs) + "\n]")
    if batched:
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {instance_kind}\n  }}\n]")
    lines.append("version_policy: { latest: { num_versions: 1 } }")
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{\n  key: {json.dumps(key)}\n  value: {{ string_value: "
                     f"{json.dumps(value)} }}\n}}")
    # Which manifest the files came from, for whoever reads the repository.
    lines.insert(0, f"# dicom-node model {manifest.name} {manifest.version}, sha256 {manifest.sha256}")
    return "\n".join(lines) + "\n"


def export_model(manifest: ModelManifest, onnx_path: Path, out_dir: Path, batch_size: int,
                 instance_kind: str = "KIND_GPU", version: int = 1) -> Path:
    """Write DIR/NAME/config.pbtxt and DIR/NAME/VERSION/model.onnx; returns the model folder."""
    folder = out_dir / manifest.name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / str(version) / "model.onnx")
    (folder / "config.pbtxt").write_text(config_pbtxt(manifest, batch_size, instance_kind=instance_kind),
                                         encoding="utf-8")
    return folder
