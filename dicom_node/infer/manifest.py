"""Model manifests: the YAML file beside each ONNX model, validated once at load.

A manifest is the model's whole contract: what its input tensor is (name,
dtype, layout, channels, fixed or dynamic axes), how intensities are
normalised, how images are fitted to it (dynamic size with a multiple, resize,
letterbox or sliding-window patches, the pixel spacing it was trained at, 2D,
2.5D neighbours or a 3D slab), the largest batch it takes, and what each
output means (clean image or residual, logits/probabilities/label map with a
SNOMED CT code per label, which class is scored and by which rule).  A site
runs its own validated model by writing this file, never by editing the code
or the graph.  Every field is honoured; whatever cannot be honoured for a
combination of fields is rejected here, naming the file and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_node.errors import ManifestError

__all__ = [
    "Code",
    "TensorSpec",
    "Normalization",
    "NormStep",
    "Geometry",
    "SegmentLabel",
    "ImageToImage",
    "Segmentation",
    "Classification",
    "Finding",
    "ModelManifest",
    "load_manifest",
    "parse_manifest",
    "DTYPES",
]

# Tensor element types the node can produce or read (Triton data_type names
# in brackets in the README table).
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64")
Dtype = Literal["float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64"]
_IMAGE_LAYOUTS = {"NCHW": 4, "NHWC": 4, "NCDHW": 5, "NDHWC": 5}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Frozen):
    """A coded concept (scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str


class TensorSpec(_Frozen):
    """One graph input or output as the graph declares it (checked at load)."""

    name: str
    # None marks a dynamic axis (batch, or free spatial size of a fully convolutional net).
    shape: list[int | None] = Field(min_length=1)
    dtype: Dtype = "float32"
    # Image tensors: NCHW, NHWC, NCDHW or NDHWC.  Others (class scores): NC or N.
    layout: str = "NCHW"

    @model_validator(mode="after")
    def _layout_matches_rank(self) -> TensorSpec:
        if len(self.layout) != len(self.shape) or len(set(self.layout)) != len(self.layout):
            raise ValueError(f"tensor {self.name!r}: layout {self.layout!r} does not name the "
                             f"{len(self.shape)} axes of shape {self.shape}")
        if self.layout[0] != "N":
            raise ValueError(f"tensor {self.name!r}: the first axis must be the batch (N)")
        return self

    def axis(self, letter: str) -> int | None:
        """Index of an axis by its layout letter, None if the tensor has none."""
        return self.layout.index(letter) if letter in self.layout else None

    def dim(self, letter: str) -> int | None:
        i = self.axis(letter)
        return None if i is None else self.shape[i]


# -- intensity normalisation: one step or a chain, applied in order ---------------

class LinearNorm(_Frozen):
    """x' = (clip(x) - offset) / scale."""

    kind: Literal["linear"]
    offset: float = 0.0
    scale: float = Field(default=1.0, gt=0)
    clip: tuple[float, float] | None = None


class WindowNorm(_Frozen):
    """CT-style window mapped to [0, 1] (values outside clipped)."""

    kind: Literal["window"]
    center: float
    width: float = Field(gt=0)


class ZScoreNorm(_Frozen):
    """Per-image (x - mean) / std."""

    kind: Literal["zscore"]


class PercentileNorm(_Frozen):
    """Per-image min-max between two percentiles, mapped to [0, 1] and clipped."""

    kind: Literal["percentile"]
    low: float = Field(default=0.5, ge=0, le=100)
    high: float = Field(default=99.5, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> PercentileNorm:
        if self.low >= self.high:
            raise ValueError(f"percentile low {self.low} must be below high {self.high}")
        return self


class MinMaxNorm(_Frozen):
    """Per-image min-max to [0, 1]."""

    kind: Literal["minmax"]


class ChannelMeanStd(_Frozen):
    """Per-channel (x * scale_to - mean[c]) / std[c], ImageNet style: ``scale_to``
    is 1 for images in [0, 1] or 255 for [0, 255]."""

    kind: Literal["mean_std"]
    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    scale_to: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _same_length(self) -> ChannelMeanStd:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean_std: {len(self.mean)} means but {len(self.std)} stds")
        return self


NormStep = Annotated[
    LinearNorm | WindowNorm | ZScoreNorm | PercentileNorm | MinMaxNorm | ChannelMeanStd,
    Field(discriminator="kind"),
]
Normalization = NormStep | list[NormStep]


# -- geometry: how an image is fitted to the model --------------------------------

class Geometry(_Frozen):
    """``fit``: ``dynamic`` (any size; padded to ``size_multiple``), ``resize``
    (stretched to the input's fixed size), ``letterbox`` (aspect kept, padded)
    or ``sliding_window`` (patches of the fixed size with ``overlap`` and
    Gaussian or constant blending, as nnU-Net and MONAI do)."""

    fit: Literal["dynamic", "resize", "letterbox", "sliding_window"] = "dynamic"
    size_multiple: int = Field(default=1, ge=1)
    # Fraction of a patch shared with its neighbour (sliding_window).
    overlap: float = Field(default=0.5, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    # (row, column) spacing in mm the model was trained at; images are
    # resampled to it and results back.  None: the image's own spacing.
    pixel_spacing_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = None
    # ``always``: every image is resampled to pixel_spacing_mm.  ``coarser``:
    # only images coarser than it are (up to it); finer ones run at their own
    # spacing, for a model trained over a range of fine spacings that must not
    # see the coarse pixels it was never trained on.
    resample: Literal["always", "coarser"] = "always"


# -- what the outputs mean ---------------------------------------------------------

_Channel = Annotated[int, Field(ge=0, le=255)]


class SegmentLabel(_Frozen):
    # Channel index (logits, probabilities) or label value (label map).
    value: int = Field(ge=1)
    name: str
    category: Code
    type: Code
    # Recommended display colour, sRGB 0-255: the SEG's
    # RecommendedDisplayCIELabValue (converted by highdicom) and the capture's
    # contours, so a structure looks the same in every viewer.  None: a fixed
    # colour by the structure's type code.
    color_rgb: tuple[_Channel, _Channel, _Channel] | None = None


class ImageToImage(_Frozen):
    output: str | None = None  # default: the only output
    # clean: the output is the image; residual: the output is what to subtract.
    kind: Literal["clean", "residual"] = "clean"
    # 2.5D: neighbouring slices on each side fed as channels (C = 2k + 1).
    context_slices: int = Field(default=0, ge=0)
    # Maps the output back to modality values: value = y * scale + offset
    # (a residual uses scale only).  None: the inverse of the input's
    # normalisation, which must then be linear or window steps only.
    output_scale: float | None = Field(default=None, gt=0)
    output_offset: float = 0.0


class Segmentation(_Frozen):
    output: str | None = None
    labels: list[SegmentLabel] = Field(min_length=1)
    # Per-class logits (softmax), probabilities, or a label map (argmax done in the graph).
    output_kind: Literal["logits", "probabilities", "labelmap"] = "logits"

    @model_validator(mode="after")
    def _unique(self) -> Segmentation:
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError(f"segmentation.labels: duplicate label value in {values}")
        return self


def _probability(value: float | None, logit: float | None, where: str) -> float | None:
    if value is not None and logit is not None:
        raise ValueError(f"{where}: give threshold or threshold_logit, not both")
    if logit is not None:
        return 1.0 / (1.0 + math.exp(-logit))
    return value


class Finding(_Frozen):
    """One class of a multi-label classifier that makes a study abnormal."""

    name: str
    threshold: float | None = Field(default=None, ge=0, le=1)
    threshold_logit: float | None = None

    def probability_threshold(self, default: float) -> float:
        value = _probability(self.threshold, self.threshold_logit, f"finding {self.name}")
        return default if value is None else value


class Classification(_Frozen):
    output: str | None = None
    # Applied by the node to the scored output: none (already probabilities),
    # sigmoid (independent logits) or softmax (over the class axis).
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    # One name per element of the class axis, in order.
    classes: list[str] = Field(min_length=1)
    # What makes an image abnormal:
    #  positive_class: P(positive_class) >= threshold;
    #  any_finding:    any of ``findings`` over its own threshold (multi-label);
    #  not_normal:     1 - P(normal_class) >= threshold.
    rule: Literal["positive_class", "any_finding", "not_normal"] = "positive_class"
    positive_class: str | None = None
    normal_class: str | None = None
    findings: list[Finding] = Field(default_factory=list)
    # Thresholds are probabilities; a logit threshold is converted at load.
    threshold: float | None = Field(default=None, ge=0, le=1)
    threshold_logit: float | None = None
    target_sensitivity: float | None = Field(default=None, gt=0, le=1)
    heatmap_output: str | None = None

    @model_validator(mode="after")
    def _rule_fields(self) -> Classification:
        names = set(self.classes)
        if len(names) != len(self.classes):
            raise ValueError(f"classification.classes: duplicate class names in {self.classes}")
        threshold = _probability(self.threshold, self.threshold_logit, "classification")
        if self.rule == "positive_class":
            if self.positive_class not in names:
                raise ValueError(f"classification.positive_class: {self.positive_class!r} is not one of "
                                 f"the classes {self.classes}")
            if threshold is None:
                raise ValueError("classification: rule positive_class needs threshold or threshold_logit")
        if self.rule == "not_normal":
            if self.normal_class not in names:
                raise ValueError(f"classification.normal_class: {self.normal_class!r} is not one of "
                                 f"the classes {self.classes}")
            if threshold is None:
                raise ValueError("classification: rule not_normal needs threshold or threshold_logit")
        if self.rule == "any_finding":
            if not self.findings:
                raise ValueError("classification: rule any_finding needs findings")
            for finding in self.findings:
                if finding.name not in names:
                    raise ValueError(f"classification.findings: {finding.name!r} is not one of the "
                                     f"classes {self.classes}")
                if finding.probability_threshold(-1.0) < 0 and threshold is None:
                    raise ValueError(f"classification.findings.{finding.name}: no threshold, and no "
                                     "default classification.threshold")
        unused = {"positive_class": self.positive_class if self.rule != "positive_class" else None,
                  "normal_class": self.normal_class if self.rule != "not_normal" else None,
                  "findings": self.findings if self.rule != "any_finding" else None}
        for key, value in unused.items():
            if value:
                raise ValueError(f"classification.{key} has no meaning with rule {self.rule!r}")
        if self.activation == "softmax" and len(self.classes) < 2:
            raise ValueError("classification: softmax needs at least two classes")
        return self

    @property
    def probability_threshold(self) -> float:
        """The decision threshold as a probability (for any_finding: the default)."""
        value = _probability(self.threshold, self.threshold_logit, "classification")
        return 0.5 if value is None else value


class ModelManifest(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    version: str
    family: Code
    description: str
    intended_use: str
    onnx: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    task: Literal["image-to-image", "segmentation", "classification"]
    # One image input (the node feeds one image tensor).
    inputs: list[TensorSpec] = Field(min_length=1, max_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    normalization: Normalization
    geometry: Geometry = Geometry()
    # Largest batch to send; None: the batch axis's fixed size, or the
    # configured batch size for a dynamic batch axis.
    max_batch: int | None = Field(default=None, ge=1)
    image_to_image: ImageToImage | None = None
    segmentation: Segmentation | None = None
    classification: Classification | None = None
    # Plausible range of each reported measure, overriding the pipeline's
    # defaults (keys are checked against the pipeline when a route uses it).
    plausible: dict[str, tuple[float, float]] = Field(default_factory=dict)
    quality: dict[str, Any]
    training: dict[str, Any]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def steps(self) -> list[Any]:
        norm = self.normalization
        return list(norm) if isinstance(norm, list) else [norm]

    def output(self, name: str | None) -> TensorSpec:
        """An output by name (None: the only output, which must then be unique)."""
        if name is None:
            if len(self.outputs) != 1:
                raise ManifestError(f"model {self.name}: several outputs; name the one to use")
            return self.outputs[0]
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise ManifestError(f"model {self.name}: no output {name!r} among "
                            f"{[o.name for o in self.outputs]}")

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        h, w = self.input.dim("H"), self.input.dim("W")
        return (h, w) if h is not None and w is not None else None

    @property
    def channels(self) -> int:
        return int(self.input.dim("C") or 1)

    @property
    def depth(self) -> int | None:
        return self.input.dim("D")

    def batch_limit(self, configured: int) -> int:
        fixed = self.input.dim("N")
        limit = min(configured, self.max_batch or configured)
        return min(limit, fixed) if fixed else limit


def parse_manifest(raw: Any, where: str) -> ModelManifest:
    """Validate a manifest mapping; errors start with ``where`` (the file)."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: manifest must be a mapping")
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{where}: invalid manifest: {_first_errors(exc)}") from exc
    problems = _combination_problems(manifest)
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems))
    return manifest


def load_manifest(path: Path) -> ModelManifest:
    """Read and validate one manifest; errors name the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    return parse_manifest(raw, str(path))


def _combination_problems(m: ModelManifest) -> list[str]:
    """What the schema alone cannot see: fields that make sense one by one
    but that the node could not honour together."""
    out: list[str] = []
    section = {"image-to-image": m.image_to_image, "segmentation": m.segmentation,
               "classification": m.classification}[m.task]
    if section is None:
        return [f"task {m.task!r} needs its section {m.task.replace('-', '_')!r}"]
    for other, value in (("image_to_image", m.image_to_image), ("segmentation", m.segmentation),
                         ("classification", m.classification)):
        if value is not None and value is not section:
            out.append(f"{other}: section has no meaning for task {m.task!r}")
    spec = m.input
    if spec.layout not in _IMAGE_LAYOUTS:
        out.append(f"inputs.{spec.name}.layout: {spec.layout!r} is not an image layout "
                   f"({', '.join(_IMAGE_LAYOUTS)})")
        return out
    if spec.dim("C") is None:
        out.append(f"inputs.{spec.name}.shape: the channel axis must have a fixed size")
    out += _geometry_problems(m)
    out += _depth_problems(m, section)
    out += _norm_problems(m)
    out += _output_problems(m, section)
    return out


def _geometry_problems(m: ModelManifest) -> list[str]:
    g, size = m.geometry, m.fixed_size
    h, w = m.input.dim("H"), m.input.dim("W")
    if (h is None) != (w is None):
        return [f"inputs.{m.input.name}.shape: rows and columns must both be fixed or both dynamic"]
    if g.fit == "dynamic" and size is not None:
        return [f"geometry.fit: the input has a fixed size {list(size)}; use resize, letterbox or "
                "sliding_window"]
    if g.fit != "dynamic" and size is None:
        return [f"geometry.fit: {g.fit} needs a fixed input size in inputs.{m.input.name}.shape"]
    if g.resample != "always" and g.pixel_spacing_mm is None:
        return [f"geometry.resample: {g.resample} needs geometry.pixel_spacing_mm"]
    if g.fit in ("resize", "letterbox") and g.pixel_spacing_mm is not None:
        return [f"geometry.pixel_spacing_mm: cannot be honoured with fit {g.fit} (the fixed size "
                "sets the scale); use sliding_window or dynamic"]
    if m.task == "image-to-image" and g.fit in ("resize", "letterbox"):
        return [f"geometry.fit: {g.fit} would change an image-to-image result's resolution; use "
                "dynamic or sliding_window"]
    if m.task == "classification" and g.fit == "sliding_window":
        return ["geometry.fit: sliding_window has no meaning for a classifier; use resize or letterbox"]
    return []


def _depth_problems(m: ModelManifest, section: Any) -> list[str]:
    depth = m.depth
    if len(m.input.layout) == 5 and m.task != "image-to-image":
        return [f"inputs.{m.input.name}.layout: 3D input is supported for image-to-image slabs; "
                f"{m.task} takes 2D images"]
    if len(m.input.layout) == 5:
        if depth is None or depth % 2 == 0:
            return [f"inputs.{m.input.name}.shape: a 3D slab needs a fixed odd depth (the output is "
                    f"its centre slice), got {depth}"]
        if m.channels != 1:
            return [f"inputs.{m.input.name}.shape: a 3D slab takes one channel, got {m.channels}"]
        if section.context_slices:
            return ["image_to_image.context_slices: a 3D slab takes its neighbours along D, not as channels"]
    elif m.task == "image-to-image":
        want = 2 * section.context_slices + 1
        if m.channels != want:
            return [f"inputs.{m.input.name}.shape: {m.channels} channels, but context_slices "
                    f"{section.context_slices} feeds {want}"]
    return []


def _norm_problems(m: ModelManifest) -> list[str]:
    out = []
    for step in m.steps:
        if isinstance(step, ChannelMeanStd) and len(step.mean) not in (1, m.channels):
            out.append(f"normalization.mean_std: {len(step.mean)} means for {m.channels} channels")
    if m.task == "image-to-image" and m.image_to_image and m.image_to_image.output_scale is None:
        if any(not isinstance(s, (LinearNorm, WindowNorm)) for s in m.steps):
            out.append("image_to_image.output_scale: needed, since normalisation "
                       f"{[s.kind for s in m.steps]} cannot be inverted (only linear and window can)")
    return out


def _output_problems(m: ModelManifest, section: Any) -> list[str]:
    names = [o.name for o in m.outputs]
    if len(set(names)) != len(names):
        return [f"outputs: duplicate names {names}"]
    used = getattr(section, "output", None)
    if used is None and len(m.outputs) != 1:
        key = m.task.replace("-", "_")
        return [f"{key}.output: the model has outputs {names}; name the one to use"]
    if used is not None and used not in names:
        return [f"{m.task.replace('-', '_')}.output: {used!r} is not among outputs {names}"]
    spec = m.output(used)
    if isinstance(section, Classification):
        return _classification_output_problems(m, section, spec, names)
    if isinstance(section, Segmentation):
        return _segmentation_output_problems(section, spec)
    return []


def _classification_output_problems(m: ModelManifest, c: Classification, spec: TensorSpec,
                                    names: list[str]) -> list[str]:
    out = []
    if c.heatmap_output is not None and c.heatmap_output not in names:
        out.append(f"classification.heatmap_output: {c.heatmap_output!r} is not among outputs {names}")
    classes = spec.dim("C") if "C" in spec.layout else (1 if len(spec.shape) == 1 else None)
    if classes is None and len(spec.shape) == 2:
        classes = spec.shape[1]
    if classes is not None and classes != len(c.classes):
        out.append(f"classification.classes: {len(c.classes)} names for an output of {classes} "
                   f"elements ({spec.name} {spec.shape})")
    if spec.dtype not in ("float32", "float16", "float64"):
        out.append(f"outputs.{spec.name}.dtype: class scores must be floating point, got {spec.dtype}")
    return out


def _segmentation_output_problems(s: Segmentation, spec: TensorSpec) -> list[str]:
    if s.output_kind == "labelmap":
        if "C" in spec.layout and spec.dim("C") not in (1, None):
            return [f"outputs.{spec.name}: a label map has no class axis, got layout {spec.layout}"]
        return []
    classes = spec.dim("C")
    top = max(lab.value for lab in s.labels)
    if classes is None:
        return [f"outputs.{spec.name}.shape: the class axis must have a fixed size"]
    if top >= classes:
        return [f"segmentation.labels: label value {top} needs {top + 1} output channels, "
                f"{spec.name} has {classes}"]
    missing = sorted(set(range(1, classes)) - {lab.value for lab in s.labels})
    if missing:
        # An unlabelled channel would be reported as nothing at all.
        return [f"segmentation.labels: output channels {missing} of {spec.name} have no label"]
    return []


def _first_errors(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
