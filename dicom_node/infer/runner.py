"""The one inference call every pipeline makes, whatever the model or backend.

``denoise``, ``segment`` and ``classify`` take images in modality or
presentation values and return results in the same terms; everything in
between (channels, normalisation, geometry, layout, dtype, batching,
activation, output meaning) comes from the manifest.  Every raw output is
checked against the contract before it is used (names, dtypes, shapes, finite
values, probabilities within [0, 1], softmax sums), so a model that breaks its
contract fails the job with the reason instead of producing a plausible-looking
wrong result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dicom_node.errors import ContractError
from dicom_node.infer.manifest import Classification, ModelManifest, Segmentation, TensorSpec
from dicom_node.infer.tensors import (Fitted, fit, from_model, invert_normalization, normalize, pad_to,
                                      resample, run_fitted, sigmoid, softmax, spacing_size, to_model)

__all__ = ["InferenceModel", "denoise", "segment", "classify", "classifier_input", "ClassifierInput", "Classified", "HeatMap", "check_output",
           "channel_labels"]


class InferenceModel(Protocol):
    """What a backend offers: the manifest it was loaded with and one call."""

    manifest: ModelManifest
    provider: str

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...


_FLOAT = ("float16", "float32", "float64")


def check_output(name: str, value: np.ndarray, spec: TensorSpec, model: str) -> None:
    """The output's dtype, rank, fixed axes and finiteness, as declared."""
    if value.dtype != np.dtype(spec.dtype):
        raise ContractError(f"model {model}: output {name} is {value.dtype}, manifest says {spec.dtype}")
    if value.ndim != len(spec.shape):
        raise ContractError(f"model {model}: output {name} has shape {list(value.shape)}, "
                            f"manifest says rank {len(spec.shape)} ({spec.shape})")
    for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=False)):
        if want is not None and want != got:
            raise ContractError(f"model {model}: output {name} axis {axis} is {got}, manifest says {want}")
    if spec.dtype in _FLOAT and not np.all(np.isfinite(value)):
        raise ContractError(f"model {model}: output {name} has NaN or infinite values")


def _check_probabilities(name: str, p: np.ndarray, model: str, sums_to_one_axis: int | None) -> None:
    low, high = float(p.min()), float(p.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise ContractError(f"model {model}: output {name} is declared as probabilities but ranges "
                            f"{low:.4g}..{high:.4g}, outside [0, 1]")
    if sums_to_one_axis is not None:
        sums = p.sum(axis=sums_to_one_axis)
        worst = float(np.abs(sums - 1).max())
        if worst > 1e-3:
            raise ContractError(f"model {model}: output {name} is declared as single-label "
                                f"probabilities but its classes sum to {float(sums.flat[0]):.4g} "
                                f"(off by up to {worst:.3g})")


def _run_batches(model: InferenceModel, x: np.ndarray, outputs: list[str], batch: int) -> dict[str, np.ndarray]:
    """Feed a canonical batch in chunks the model takes; a fixed batch axis
    gets its last chunk padded by repeating the last image."""
    manifest = model.manifest
    spec = manifest.input
    limit = manifest.batch_limit(batch)
    fixed = spec.dim("N")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for start in range(0, x.shape[0], limit):
        chunk = x[start:start + limit]
        n = chunk.shape[0]
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        values = model.run({spec.name: to_model(chunk, spec)}, outputs)
        for name in outputs:
            value = values[name]
            check_output(name, value, manifest.output(name), manifest.name)
            parts[name].append(value[:n])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _channels(x: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    """Replicate a grey (B, 1, H, W) batch to the model's channels."""
    c = manifest.channels
    return x if x.shape[1] == c else np.repeat(x, c, axis=1)


# -- image to image ----------------------------------------------------------------------

def _neighbours(volume: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """(b, 2k+1, H, W): each slice with k neighbours on each side, the end
    slices repeated beyond the volume's edges."""
    n = volume.shape[0]
    return np.stack([volume[np.clip(idx + d, 0, n - 1)] for d in range(-k, k + 1)], axis=1)


def denoise(volume: np.ndarray, spacing: tuple[float, float], model: InferenceModel,
            batch: int, on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """An image-to-image model over a (N, H, W) stack in modality values.

    The stack is resampled to the model's spacing when it declares one; the
    change the model makes is then resampled back and added to the original,
    so detail the model left alone is not blurred by the round trip.
    ``on_batch(indices, slices)``, when given, gets each batch's finished
    slices (modality values on the source grid) as soon as they are done,
    so that encoding can start while later batches are inferred."""
    manifest = model.manifest
    spec = manifest.image_to_image
    assert spec is not None
    out_spec = manifest.output(spec.output)
    n, h, w = volume.shape
    size = spacing_size((h, w), spacing, manifest.geometry)
    source = resample(volume[:, None].astype(np.float32), size)[:, 0]
    k = (manifest.depth or 1) // 2 if manifest.depth else spec.context_slices
    result = np.empty((n, h, w), np.float32)
    centre = k
    for start in range(0, n, max(1, manifest.batch_limit(batch))):
        idx = np.arange(start, min(n, start + manifest.batch_limit(batch)))
        stack = _neighbours(source, idx, k)
        x = normalize(stack, manifest)

        def run(patch: np.ndarray) -> np.ndarray:
            raw = _run_batches(model, patch, [out_spec.name], batch)[out_spec.name]
            return from_model(raw, out_spec)[:, :1]

        y = run_fitted(x, manifest.geometry, manifest.fixed_size, run)[:, 0]
        denoised = _to_modality(y, x[:, centre], stack[:, centre], manifest)
        if size == (h, w):
            result[idx] = denoised
        else:  # resampling is per slice: a batch maps back on its own
            change = resample((denoised - source[idx])[:, None], (h, w))[:, 0]
            result[idx] = volume[idx].astype(np.float32) + change
        if on_batch is not None:
            on_batch(idx, result[idx])
    return result


def _to_modality(y: np.ndarray, x_centre: np.ndarray, source: np.ndarray,
                 manifest: ModelManifest) -> np.ndarray:
    spec = manifest.image_to_image
    assert spec is not None
    if spec.output_scale is not None:
        value = y * np.float32(spec.output_scale) + np.float32(spec.output_offset)
        return source - value if spec.kind == "residual" else value
    if spec.kind == "residual":
        return invert_normalization(x_centre - y, manifest)
    return invert_normalization(y, manifest)


# -- segmentation ----------------------------------------------------------------------------

def channel_labels(s: Segmentation) -> int:
    """Number of classes the scores have (background included)."""
    return max(lab.value for lab in s.labels) + 1


def _class_scores(raw: np.ndarray, out_spec: TensorSpec, s: Segmentation, model: str) -> np.ndarray:
    """Canonical (B, K, h, w) class probabilities from any output kind."""
    if s.output_kind == "labelmap":
        if raw.dtype.kind not in "iu":
            raise ContractError(f"model {model}: label map {out_spec.name} is {raw.dtype}, not integer")
        labels = from_model(raw, out_spec)[:, 0]
        allowed = np.array([0] + [lab.value for lab in s.labels])
        found = np.unique(labels)
        extra = np.setdiff1d(found, allowed)
        if extra.size:
            raise ContractError(f"model {model}: label map holds values {extra.astype(int).tolist()[:8]} that the "
                                f"manifest does not declare (declared: {allowed.tolist()})")
        k = channel_labels(s)
        return (labels[:, None] == np.arange(k)[None, :, None, None]).astype(np.float32)
    scores = from_model(raw, out_spec)
    if s.output_kind == "logits":
        return softmax(scores, axis=1)
    _check_probabilities(out_spec.name, scores, model, sums_to_one_axis=1)
    return scores


def segment(images: np.ndarray, spacing: tuple[float, float], model: InferenceModel,
            batch: int) -> np.ndarray:
    """Label maps (N, H, W) uint8 holding the manifest's label values, for a
    (N, H, W) stack of 2D images on their own grid."""
    manifest = model.manifest
    s = manifest.segmentation
    assert s is not None
    out_spec = manifest.output(s.output)
    n, h, w = images.shape
    size = spacing_size((h, w), spacing, manifest.geometry)
    labels = np.empty((n, *size), np.uint8)
    step = max(1, manifest.batch_limit(batch))
    for start in range(0, n, step):
        x = resample(images[start:start + step, None].astype(np.float32), size)
        fitted = fit(_channels(x, manifest), manifest.geometry, manifest.fixed_size)
        xn = normalize(fitted.batch, manifest)

        def run(patch: np.ndarray) -> np.ndarray:
            raw = _run_batches(model, patch, [out_spec.name], batch)[out_spec.name]
            return _class_scores(raw, out_spec, s, manifest.name)

        scores = fitted.back(run_fitted(xn, manifest.geometry, manifest.fixed_size, run))
        labels[start:start + step] = np.argmax(scores, axis=1).astype(np.uint8)
    if size == (h, w):
        return labels
    return resample(labels[:, None], (h, w), nearest=True)[:, 0]


# -- classification ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HeatMap:
    """A classifier's heat map, kept on the model's grid (cropped to where the
    image was) and resampled only to the size it is shown at: mapping a
    256-pixel map up to a 5-megapixel radiograph, only to shrink it again for
    a capture, cost more than the model."""

    model_grid: np.ndarray  # (rows, cols) float32, the image's part of the model's grid
    source_size: tuple[int, int]

    def at(self, size: tuple[int, int]) -> np.ndarray:
        """On a (rows, cols) grid covering the whole image, clipped to [0, 1]."""
        out = resample(self.model_grid[None, None], size)[0, 0]
        return np.clip(out, 0, 1, out=None if np.shares_memory(out, self.model_grid) else out)


@dataclass(frozen=True)
class Classified:
    """One image's reading, in probabilities, by the manifest's rule."""

    probabilities: dict[str, float]
    # The abnormality score the decision compares with ``threshold``.
    score: float
    threshold: float
    abnormal: bool
    # Findings over their thresholds (any_finding), strongest first.
    findings: list[tuple[str, float, float]] = field(default_factory=list)
    # None when the model has no heat map.
    heat: HeatMap | None = None

    @property
    def heatmap(self) -> np.ndarray | None:
        """The heat map on the source grid in [0, 1] (resampled on each call:
        use ``heat.at`` for the size it is shown at)."""
        return None if self.heat is None else self.heat.at(self.heat.source_size)


def _class_probabilities(raw: np.ndarray, c: Classification, spec: TensorSpec, model: str) -> np.ndarray:
    """(B, classes) probabilities from the scored output."""
    values = raw.reshape(raw.shape[0], -1).astype(np.float32)
    if values.shape[1] != len(c.classes):
        raise ContractError(f"model {model}: output {spec.name} has {values.shape[1]} elements per "
                            f"image, manifest names {len(c.classes)} classes")
    if c.activation == "sigmoid":
        return sigmoid(values)
    if c.activation == "softmax":
        return softmax(values, axis=1)
    single = len(c.classes) > 1 and c.rule != "any_finding"
    _check_probabilities(spec.name, values, model, sums_to_one_axis=1 if single else None)
    return values


def decide(p: Sequence[float], c: Classification) -> Classified:
    """Apply the manifest's rule to one image's class probabilities."""
    probs = {name: float(v) for name, v in zip(c.classes, p, strict=False)}
    default = c.probability_threshold
    if c.rule == "positive_class":
        assert c.positive_class is not None
        score = probs[c.positive_class]
        return Classified(probs, score, default, score >= default)
    if c.rule == "not_normal":
        assert c.normal_class is not None
        score = 1.0 - probs[c.normal_class]
        return Classified(probs, score, default, score >= default)
    over = sorted(((f.name, probs[f.name], f.probability_threshold(default)) for f in c.findings
                   if probs[f.name] >= f.probability_threshold(default)), key=lambda t: t[2] - t[1])
    # The score shown is the finding closest to (or furthest over) its threshold.
    name, p_max, t_max = max(((f.name, probs[f.name], f.probability_threshold(default))
                              for f in c.findings), key=lambda t: t[1] - t[2])
    return Classified(probs, p_max, t_max, bool(over), over)


@dataclass(frozen=True)
class ClassifierInput:
    """One image as the classifier's model takes it (fitted, normalised,
    padded), and how it was fitted, to map a heat map back."""

    batch: np.ndarray
    fitted: Fitted


def classifier_input(image: np.ndarray, manifest: ModelManifest) -> ClassifierInput:
    """The model input for one 2D image in presentation values ([0, 1],
    MONOCHROME2): numpy and OpenCV only, so a pipeline can make the next
    one on another thread while the model runs."""
    x = image.astype(np.float32, copy=False)[None, None]  # a view: fit and normalize copy
    fitted = fit(_channels(x, manifest), manifest.geometry, manifest.fixed_size)
    xn = normalize(fitted.batch, manifest)
    if manifest.geometry.fit == "dynamic":
        xn, _ = pad_to(xn, manifest.geometry.size_multiple)
    return ClassifierInput(xn, fitted)


def classify(image: np.ndarray | ClassifierInput, model: InferenceModel) -> Classified:
    """Classify one 2D image in presentation values ([0, 1], MONOCHROME2),
    or its ``classifier_input`` made for this model's manifest."""
    manifest = model.manifest
    c = manifest.classification
    assert c is not None
    scored = manifest.output(c.output)
    names = [scored.name] + ([c.heatmap_output] if c.heatmap_output else [])
    prepared = image if isinstance(image, ClassifierInput) else classifier_input(image, manifest)
    xn, fitted = prepared.batch, prepared.fitted
    raw = _run_batches(model, xn, names, 1)
    p = _class_probabilities(raw[scored.name], c, scored, manifest.name)[0]
    result = decide(p, c)
    if c.heatmap_output is None:
        return result
    heat_spec = manifest.output(c.heatmap_output)
    heat = from_model(raw[c.heatmap_output], heat_spec)[:, :1]
    top, left, rows, cols = fitted.box
    grid = np.ascontiguousarray(heat[0, 0, top:top + rows, left:left + cols], dtype=np.float32)
    return Classified(result.probabilities, result.score, result.threshold, result.abnormal,
                      result.findings, HeatMap(grid, fitted.source_size))
