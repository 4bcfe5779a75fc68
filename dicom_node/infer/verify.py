"""Contract verification: does a loaded model behave as its manifest says?

The same check runs in ``dicom-node models verify``, when a worker loads a
model and for ``/readyz``: a synthetic input of the declared shape, dtype and
layout goes through the very pre-processing the pipelines use, and every
output is checked (names, dtypes, shapes, finite values, probabilities within
[0, 1], softmax sums, label values).  A model that fails is never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.errors import DicomNodeError, InferenceUnavailable
from dicom_node.infer.manifest import LinearNorm, ModelManifest, WindowNorm
from dicom_node.infer.runner import InferenceModel, classify, denoise, segment

__all__ = ["Verified", "verify_model"]

# Synthetic inputs are the same for every run, so a verdict is repeatable.
_SEED = 20261201


@dataclass(frozen=True)
class Verified:
    ok: bool
    detail: str
    # The check could not run now (a remote server away): ask again later.
    transient: bool = False


def _side(manifest: ModelManifest) -> tuple[int, int]:
    """An image size the model must take: its fixed size (a bit larger for
    sliding windows, so blending is exercised), else 64 rounded up to the
    size multiple."""
    size = manifest.fixed_size
    if size is not None:
        extra = 16 if manifest.geometry.fit == "sliding_window" else 0
        return size[0] + extra, size[1] + extra + 8
    m = manifest.geometry.size_multiple
    side = -(-64 // m) * m
    return side, side + m * max(1, 8 // m)


def _values(manifest: ModelManifest, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random images in the range the first normalisation step expects."""
    rng = np.random.default_rng(_SEED)
    base = rng.random(shape).astype(np.float32)
    first = manifest.steps[0]
    if isinstance(first, LinearNorm) and first.clip is not None:
        low, high = first.clip
    elif isinstance(first, LinearNorm):
        low, high = first.offset, first.offset + first.scale
    elif isinstance(first, WindowNorm):
        low, high = first.center - first.width, first.center + first.width
    else:
        low, high = 0.0, 1000.0
    return (low + (high - low) * base).astype(np.float32)


def _exercise(model: InferenceModel, batch: int) -> str:
    manifest = model.manifest
    rows, cols = _side(manifest)
    spacing = manifest.geometry.pixel_spacing_mm or (1.0, 1.0)
    if manifest.task == "image-to-image":
        volume = _values(manifest, (3, rows, cols))
        out = denoise(volume, spacing, model, batch)
        if out.shape != volume.shape or not np.all(np.isfinite(out)):
            raise DicomNodeError(f"denoised stack is {out.shape}, expected {volume.shape} finite values")
        return f"image-to-image {rows}x{cols} -> {list(out.shape)}"
    if manifest.task == "segmentation":
        images = _values(manifest, (2, rows, cols))
        labels = segment(images, spacing, model, batch)
        if labels.shape != images.shape:
            raise DicomNodeError(f"label maps are {labels.shape}, expected {images.shape}")
        return f"segmentation {rows}x{cols} -> labels {sorted(int(v) for v in np.unique(labels))}"
    image = np.random.default_rng(_SEED).random((rows, cols)).astype(np.float32)
    result = classify(image, model)
    heat = "no heat map" if result.heatmap is None else f"heat map {list(result.heatmap.shape)}"
    return f"classification score {result.score:.3f} (threshold {result.threshold:.3f}), {heat}"


def verify_model(model: InferenceModel, batch: int = 2) -> Verified:
    """Run the contract check; never raises for a model that breaks it (a
    remote server that cannot answer raises InferenceUnavailable)."""
    try:
        return Verified(True, _exercise(model, batch))
    except InferenceUnavailable:
        raise  # not a verdict on the model: the caller retries later
    except DicomNodeError as exc:
        return Verified(False, str(exc))
    except (ValueError, RuntimeError) as exc:  # a runtime refusing the tensor we were told to send
        return Verified(False, f"model {model.manifest.name}: {type(exc).__name__}: {exc}")
