"""Model manifests: the YAML file beside each ONNX model, validated once at load.

A manifest says what the graph expects (tensor names, layout, dtype, size),
how to normalise intensities, what the outputs mean and how good the model
measured on its held-out set.  Everything a pipeline needs to run a model it
has never seen comes from here, so a site swaps in its own validated model by
editing this file, not the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dicom_node.errors import ManifestError

__all__ = [
    "Code",
    "TensorSpec",
    "Normalization",
    "SegmentLabel",
    "ModelManifest",
    "load_manifest",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Frozen):
    """A coded concept (scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str


class TensorSpec(_Frozen):
    name: str
    # None marks a dynamic axis (batch, or free spatial size of a fully convolutional net).
    shape: list[int | None]
    dtype: Literal["float32", "float16", "int64", "uint8"] = "float32"
    layout: str = "NCHW"


class LinearNorm(_Frozen):
    """x' = (clip(x) - offset) / scale; image-to-image outputs are mapped back."""

    kind: Literal["linear"]
    offset: float
    scale: float = Field(gt=0)
    clip: tuple[float, float] | None = None


class WindowNorm(_Frozen):
    """CT-style window mapped to [0, 1]."""

    kind: Literal["window"]
    center: float
    width: float = Field(gt=0)


class ZScoreNorm(_Frozen):
    """Per-image (x - mean) / std."""

    kind: Literal["zscore"]


class PercentileNorm(_Frozen):
    """Per-image min-max between two percentiles, mapped to [0, 1]."""

    kind: Literal["percentile"]
    low: float = Field(default=0.5, ge=0, le=100)
    high: float = Field(default=99.5, ge=0, le=100)


Normalization = Annotated[
    LinearNorm | WindowNorm | ZScoreNorm | PercentileNorm, Field(discriminator="kind")
]


class SegmentLabel(_Frozen):
    value: int = Field(ge=1)
    name: str
    category: Code
    type: Code


class ImageToImage(_Frozen):
    # Neighbouring slices fed as extra channels on each side (0 = plain 2D).
    context_slices: int = Field(default=0, ge=0)
    # Residual models predict the noise; the pipeline does not care, the graph
    # must output the clean image.
    tile: int | None = Field(default=None, gt=0)
    tile_overlap: int = Field(default=0, ge=0)


class Segmentation(_Frozen):
    labels: list[SegmentLabel]
    # Output is per-class logits/probabilities (argmax over channel axis 1).
    output_kind: Literal["logits", "probabilities", "labelmap"] = "logits"


class Classification(_Frozen):
    classes: list[str]
    positive_class: str
    threshold: float = Field(ge=0, le=1)
    target_sensitivity: float | None = Field(default=None, gt=0, le=1)
    heatmap_output: str | None = None


class ModelManifest(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    version: str
    family: Code
    description: str
    intended_use: str
    onnx: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    task: Literal["image-to-image", "segmentation", "classification"]
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    normalization: Normalization
    # Fixed model input size (rows, columns); None for fully convolutional nets.
    input_size: tuple[int, int] | None = None
    # Fully convolutional nets with pooling need rows and columns padded to a multiple.
    size_multiple: int = Field(default=1, ge=1)
    # Pixel spacing (row, column) in mm the model was trained at; None = any.
    pixel_spacing_mm: tuple[float, float] | None = None
    image_to_image: ImageToImage | None = None
    segmentation: Segmentation | None = None
    classification: Classification | None = None
    quality: dict[str, Any]
    training: dict[str, Any]


def load_manifest(path: Path) -> ModelManifest:
    """Read and validate one manifest; errors name the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: manifest must be a mapping")
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: invalid manifest: {_first_errors(exc)}") from exc
    section = {"image-to-image": manifest.image_to_image,
               "segmentation": manifest.segmentation,
               "classification": manifest.classification}[manifest.task]
    if section is None:
        raise ManifestError(
            f"{path}: task {manifest.task!r} needs its section "
            f"{manifest.task.replace('-', '_')!r}")
    return manifest


def _first_errors(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
