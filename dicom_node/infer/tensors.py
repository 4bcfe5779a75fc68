"""Images into model tensors and back, exactly as a manifest says.

Inside the node an image batch is float32 (B, C, H, W); a 3D slab of K
slices travels as C = K until the last step.  ``to_model`` turns that into
the model's layout and dtype, ``from_model`` turns an image output back.
Geometry (resampling to the model's spacing, resize, letterbox, padding to a
size multiple, sliding-window patches with blending) is done here once for
every pipeline and every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from dicom_node.errors import PipelineError
from dicom_node.infer.manifest import (ChannelMeanStd, Geometry, LinearNorm, MinMaxNorm,
                                        ModelManifest, PercentileNorm, TensorSpec, WindowNorm,
                                        ZScoreNorm)

__all__ = ["normalize", "invert_normalization", "to_model", "from_model", "resample",
           "Fitted", "fit", "run_fitted", "pad_to", "spacing_size", "softmax", "sigmoid"]

# Canonical batch -> canonical result, both float32 (B, C, h, w).
Run = Callable[[np.ndarray], np.ndarray]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -80, 80)))).astype(np.float32)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


# -- intensities -------------------------------------------------------------------

def normalize(x: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    """The manifest's normalisation steps on a (B, C, H, W) batch, in order.
    Per-image statistics are taken over each image's channels and pixels."""
    x = x.astype(np.float32, copy=True)
    for step in manifest.steps:
        x = _step(x, step)
    return x


def _step(x: np.ndarray, step: object) -> np.ndarray:
    axes = tuple(range(1, x.ndim))
    if isinstance(step, LinearNorm):
        if step.clip is not None:
            x = np.clip(x, step.clip[0], step.clip[1])
        return (x - np.float32(step.offset)) / np.float32(step.scale)
    if isinstance(step, WindowNorm):
        low = step.center - step.width / 2
        return np.clip((x - np.float32(low)) / np.float32(step.width), 0, 1)
    if isinstance(step, ZScoreNorm):
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        return (x - mean) / np.maximum(std, 1e-6)
    if isinstance(step, PercentileNorm):
        flat = x.reshape(x.shape[0], -1)
        low, high = (np.percentile(flat, q, axis=1).reshape(-1, *[1] * (x.ndim - 1)).astype(np.float32)
                     for q in (step.low, step.high))
        return np.clip((x - low) / np.maximum(high - low, 1e-6), 0, 1)
    if isinstance(step, MinMaxNorm):
        low = x.min(axis=axes, keepdims=True)
        high = x.max(axis=axes, keepdims=True)
        return (x - low) / np.maximum(high - low, 1e-6)
    if isinstance(step, ChannelMeanStd):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(step.mean, np.float32).reshape(shape)
        std = np.asarray(step.std, np.float32).reshape(shape)
        return (x * np.float32(step.scale_to) - mean) / std
    raise TypeError(f"unknown normalisation step {type(step).__name__}")


def invert_normalization(y: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    """Model units back to modality values through linear and window steps."""
    for step in reversed(manifest.steps):
        if isinstance(step, LinearNorm):
            y = y * np.float32(step.scale) + np.float32(step.offset)
        elif isinstance(step, WindowNorm):
            y = y * np.float32(step.width) + np.float32(step.center - step.width / 2)
        else:
            raise PipelineError(f"model {manifest.name}: normalisation step {step.kind!r} "
                                "cannot be inverted")
    return y


# -- layout and dtype ----------------------------------------------------------------

_INT_RANGES = {name: (np.iinfo(name).min, np.iinfo(name).max)
               for name in ("uint8", "int8", "int16", "int32", "int64")}


def to_model(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Canonical (B, C, H, W) float32 into the input's layout and dtype.
    Integer inputs are rounded and clipped to the type's range."""
    layout = spec.layout
    if layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    elif layout == "NCDHW":
        x = x[:, None]
    elif layout == "NDHWC":
        x = x[..., None]
    if spec.dtype in _INT_RANGES:
        low, high = _INT_RANGES[spec.dtype]
        x = np.clip(np.rint(x), low, high)
    return np.ascontiguousarray(x.astype(spec.dtype, copy=False))


def from_model(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """An image output into canonical (B, C, H, W) float32.  A 3D output gives
    its centre slice; a label map without a channel axis gets one."""
    layout = spec.layout
    if "D" in layout:
        d = layout.index("D")
        y = np.take(y, y.shape[d] // 2, axis=d)
        layout = layout.replace("D", "")
    if layout == "NHW":
        y = y[:, None]
    elif layout == "NHWC":
        y = y.transpose(0, 3, 1, 2)
    elif layout != "NCHW":
        raise PipelineError(f"output {spec.name}: layout {spec.layout} is not an image layout")
    return y.astype(np.float32, copy=False)


# -- geometry ----------------------------------------------------------------------------

def resample(x: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize the last two axes of (B, C, H, W) to (rows, cols)."""
    b, c, h, w = x.shape
    rows, cols = size
    if (h, w) == (rows, cols):
        return x
    if nearest:
        # INTER_NEAREST samples from pixel corners, the _EXACT variant from
        # centres, so labels stay on the pixels they were computed for.
        interp = cv2.INTER_NEAREST_EXACT
    else:
        interp = cv2.INTER_AREA if rows < h and cols < w else cv2.INTER_LINEAR
    if b == 1 and c == 1:
        # One image, one channel (a radiograph, a heat map): resized straight
        # into the result, without a second full-size buffer and copy.
        return cv2.resize(np.ascontiguousarray(x[0, 0]), (cols, rows), interpolation=interp)[None, None]
    out = np.empty((b, c, rows, cols), x.dtype)
    for i in range(b):
        # cv2 resizes all channels at once in (H, W, C) order, up to 512 channels.
        for start in range(0, c, 512):
            chunk = x[i, start:start + 512].transpose(1, 2, 0)
            res = cv2.resize(chunk, (cols, rows), interpolation=interp)
            out[i, start:start + 512] = res.reshape(rows, cols, -1).transpose(2, 0, 1)
    return out


def spacing_size(shape: tuple[int, int], spacing: tuple[float, float], geometry: Geometry) -> tuple[int, int]:
    """Rows and columns of an image at ``spacing`` on the model's grid: resampled
    to ``geometry.pixel_spacing_mm`` (with ``resample: coarser`` only when the
    image is coarser than it), else as it is."""
    target = geometry.pixel_spacing_mm
    if target is None:
        return shape
    if geometry.resample == "coarser" and spacing[0] <= target[0] and spacing[1] <= target[1]:
        return shape
    rows = max(8, int(round(shape[0] * spacing[0] / target[0])))
    cols = max(8, int(round(shape[1] * spacing[1] / target[1])))
    # Within 1 % of the model's spacing resampling only blurs.
    if abs(rows - shape[0]) <= 0.01 * shape[0] and abs(cols - shape[1]) <= 0.01 * shape[1]:
        return shape
    return rows, cols


@dataclass(frozen=True)
class Fitted:
    """An image batch fitted to a fixed-size model (resize or letterbox), with
    what is needed to map spatial outputs back to the unfitted grid."""

    batch: np.ndarray
    source_size: tuple[int, int]
    # (top, left, rows, cols) of the image inside the fitted batch.
    box: tuple[int, int, int, int]

    def back(self, maps: np.ndarray, nearest: bool = False) -> np.ndarray:
        top, left, rows, cols = self.box
        crop = maps[:, :, top:top + rows, left:left + cols]
        return resample(np.ascontiguousarray(crop), self.source_size, nearest)


def fit(x: np.ndarray, geometry: Geometry, size: tuple[int, int] | None) -> Fitted:
    """Resize or letterbox to the model's fixed size; other fits pass through."""
    h, w = x.shape[-2:]
    if geometry.fit == "resize" and size is not None:
        return Fitted(resample(x, size), (h, w), (0, 0, size[0], size[1]))
    if geometry.fit == "letterbox" and size is not None:
        rows, cols = size
        scale = min(rows / h, cols / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        top, left = (rows - nh) // 2, (cols - nw) // 2
        # Padded with each image's minimum: the background of the image itself.
        low = x.min(axis=(1, 2, 3), keepdims=True)
        out = np.broadcast_to(low, (x.shape[0], x.shape[1], rows, cols)).astype(np.float32)
        out[:, :, top:top + nh, left:left + nw] = resample(x, (nh, nw))
        return Fitted(out, (h, w), (top, left, nh, nw))
    return Fitted(x, (h, w), (0, 0, h, w))


def run_fitted(x: np.ndarray, geometry: Geometry, size: tuple[int, int] | None, run: Run) -> np.ndarray:
    """Run a normalised canonical batch: padded to the size multiple
    (dynamic), as it is (already fitted), or in sliding-window patches."""
    if geometry.fit == "sliding_window":
        assert size is not None  # the manifest check guarantees it
        return _sliding_window(x, size, geometry, run)
    if geometry.fit == "dynamic":
        padded, (h, w) = pad_to(x, geometry.size_multiple)
        return run(padded)[:, :, :h, :w]
    return run(x)


def pad_to(x: np.ndarray, multiple: int, minimum: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the last two axes up to a multiple (and a minimum size)."""
    h, w = x.shape[-2:]
    ph = max(minimum[0] - h, (-h) % multiple)
    pw = max(minimum[1] - w, (-w) % multiple)
    if ph or pw:
        # Reflection needs a border narrower than the image; repeat the edge beyond that.
        widths = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
        x = np.pad(x, widths, mode="reflect") if ph < h and pw < w else np.pad(x, widths, mode="edge")
    return x, (h, w)


def _starts(length: int, patch: int, step: int) -> list[int]:
    starts = list(range(0, max(1, length - patch + 1), step))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def _weights(size: tuple[int, int], blend: str) -> np.ndarray:
    if blend == "constant":
        return np.ones(size, np.float32)
    # nnU-Net's Gaussian importance map: sigma 1/8 of the patch, never zero.
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in size]
    w = np.outer(axes[0], axes[1]).astype(np.float32)
    return np.maximum(w / w.max(), 1e-3)


def _sliding_window(x: np.ndarray, size: tuple[int, int], geometry: Geometry, run: Run) -> np.ndarray:
    padded, (h, w) = pad_to(x, 1, minimum=size)
    ph, pw = size
    ys = _starts(padded.shape[-2], ph, max(1, int(ph * (1 - geometry.overlap))))
    xs = _starts(padded.shape[-1], pw, max(1, int(pw * (1 - geometry.overlap))))
    weight = _weights(size, geometry.blend)
    total: np.ndarray | None = None
    norm = np.zeros(padded.shape[-2:], np.float32)
    for y0 in ys:
        for x0 in xs:
            out = run(np.ascontiguousarray(padded[:, :, y0:y0 + ph, x0:x0 + pw]))
            if total is None:
                total = np.zeros((x.shape[0], out.shape[1], *padded.shape[-2:]), np.float32)
            total[:, :, y0:y0 + ph, x0:x0 + pw] += out * weight
            norm[y0:y0 + ph, x0:x0 + pw] += weight
    assert total is not None
    return (total / norm)[:, :, :h, :w]
