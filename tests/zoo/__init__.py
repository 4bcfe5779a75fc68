"""A zoo of tiny ONNX models, one per third-party model interface (issue 10).

Each builder returns a :class:`ZooModel`: the serialised graph, the declared
inputs and outputs (``None`` marks a dynamic axis) and ``reference``, a pure
numpy function computing what the graph outputs for the same input tensors.
The graphs have no learned weights: each computes a *known answer* (a
constant, a channel mean, an affine map...) so an end-to-end test can tell
whether the node fed the model correctly (dtype, layout, channels,
normalisation, geometry, batch) and read its outputs correctly (which output,
which element, activation, residual or clean image).

Graphs are built with the ``onnx`` helper API only (no torch), opset 17.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # opset 17 needs IR >= 8; onnxruntime >= 1.15 reads IR 9

_ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "uint8": TensorProto.UINT8,
    "int64": TensorProto.INT64,
}

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the model declares it."""

    name: str
    shape: tuple[int | None, ...]  # None: dynamic axis
    dtype: str  # float32 | float16 | uint8 | int64
    layout: str  # one letter per axis: NCHW, NHWC, NCDHW, NC, NHW

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape with each dynamic axis set from ``sizes`` (by layout letter)."""
        return tuple(sizes[letter] if dim is None else dim
                     for dim, letter in zip(self.shape, self.layout, strict=False))


@dataclass(frozen=True)
class ZooModel:
    onnx_bytes: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    reference: Callable[[Feeds], Feeds]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    def output(self, name: str) -> TensorSpec:
        return next(o for o in self.outputs if o.name == name)


def write(model: ZooModel, folder: Path | str, name: str) -> Path:
    """Write ``model`` to ``folder/NAME.onnx`` and return the path."""
    path = Path(folder) / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.onnx_bytes)
    return path


def sample_inputs(model: ZooModel, seed: int = 0, **sizes: int) -> Feeds:
    """Random inputs of the declared shapes; dynamic axes default to N=2, H=32, W=24.

    Floats are uniform in [0, 1) (an already normalised image), uint8 spans 0..255.
    """
    dims = {"N": 2, "C": 1, "D": 5, "H": 32, "W": 24, **sizes}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        shape = spec.concrete(dims)
        if spec.dtype == "uint8":
            feeds[spec.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
    return feeds


# -- graph construction ------------------------------------------------------

def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    dims = [letter if dim is None else dim for dim, letter in zip(spec.shape, spec.layout, strict=False)]
    return helper.make_tensor_value_info(spec.name, _ONNX_TYPES[spec.dtype], dims)


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[TensorSpec],
           outputs: Sequence[TensorSpec],
           initializers: Sequence[onnx.TensorProto] = ()) -> bytes:
    """Serialise a checked opset-17 model made of ``nodes``."""
    graph = helper.make_graph(list(nodes), "zoo", [_value_info(s) for s in inputs],
                              [_value_info(s) for s in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dicom-node-test-zoo")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


class _Graph:
    """Collects nodes and initialisers; intermediate tensors get unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _name(self, stem: str) -> str:
        return f"{stem}_{len(self.nodes) + len(self.initializers)}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def model(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bytes:
        return _model(self.nodes, inputs, outputs, self.initializers)

    # repeated pieces

    def activation(self, x: str, kind: str | None, out: str | None = None) -> str:
        """activation None, "sigmoid" or "softmax" (over axis 1, the classes)."""
        op_type = {None: "Identity", "sigmoid": "Sigmoid", "softmax": "Softmax"}[kind]
        return self.op(op_type, x, out=out, **({"axis": 1} if kind == "softmax" else {}))

    def per_image(self, x: str, row: np.ndarray, activation: str | None, out: str) -> str:
        """``out`` [N,K] = activation(row), the same constant row for each image of x."""
        n = self.op("Shape", x, end=1)
        shape = self.op("Concat", n, self.const([len(row)], np.int64), axis=0)
        rows = self.op("Expand", self.const(np.reshape(row, (1, -1))), shape)
        return self.activation(rows, activation, out=out)

    def heatmap(self, x: str) -> str:
        """``heatmap`` [N,1,H,W] = sigmoid(mean of x over channels)."""
        return self.op("Sigmoid", self.op("ReduceMean", x, axes=[1], keepdims=1),
                       out="heatmap")


# -- numpy references ----------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))).astype(np.float32)


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(np.asarray(x, np.float64) - np.max(x, axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


_ACTIVATIONS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    None: lambda x: np.asarray(x, np.float32), "sigmoid": _sigmoid, "softmax": _softmax,
}


def _rows(x: np.ndarray, row: np.ndarray, activation: str | None) -> np.ndarray:
    return _ACTIVATIONS[activation](np.repeat(np.reshape(row, (1, -1)), len(x), axis=0))


def _heatmap_ref(x: np.ndarray) -> np.ndarray:
    return _sigmoid(x.astype(np.float64).mean(axis=1, keepdims=True))


def _image(size: tuple[int, int] | None = None, channels: int = 1,
           batch: int | None = None, dtype: str = "float32", name: str = "input",
           layout: str = "NCHW") -> TensorSpec:
    h, w = size or (None, None)
    shape = {"NCHW": (batch, channels, h, w), "NHWC": (batch, h, w, channels)}[layout]
    return TensorSpec(name, shape, dtype, layout)


def _like(spec: TensorSpec, name: str, **changes) -> TensorSpec:
    """An output shaped like ``spec`` (e.g. the input image), some axes changed."""
    shape = list(spec.shape)
    for letter, dim in changes.items():
        shape[spec.layout.index(letter)] = dim
    return TensorSpec(name, tuple(shape), spec.dtype, spec.layout)


def _scores(name: str, batch: int | None, classes: int) -> TensorSpec:
    return TensorSpec(name, (batch, classes), "float32", "NC")


def _constant_classifier(row: Sequence[float], out: str, activation: str | None,
                         size: tuple[int, int] | None, heatmap: bool = False,
                         channels: int = 1, batch: int | None = None,
                         channel_mean: bool = False) -> ZooModel:
    """A classifier whose scores are activation(row) for every image, whatever it shows."""
    row = np.asarray(row, np.float32)
    x = _image(size, channels, batch)
    g = _Graph()
    g.per_image(x.name, row, activation, out)
    outputs = [_scores(out, batch, len(row))]
    if channel_mean:
        g.op("ReduceMean", x.name, out="channel_mean", axes=[2, 3], keepdims=0)
        outputs.append(_scores("channel_mean", batch, channels))
    if heatmap:
        g.heatmap(x.name)
        outputs.append(_like(x, "heatmap", C=1))

    def reference(feeds: Feeds) -> Feeds:
        image = feeds[x.name]
        result = {out: _rows(image, row, activation)}
        if channel_mean:
            result["channel_mean"] = image.astype(np.float64).mean(axis=(2, 3)).astype(np.float32)
        if heatmap:
            result["heatmap"] = _heatmap_ref(image)
        return result

    return ZooModel(g.model([x], outputs), (x,), tuple(outputs), reference)


# -- classifiers -------------------------------------------------------------

def multilabel_classifier(classes: int = 14, biases: Sequence[float] | None = None,
                          channels: int = 3, size: tuple[int, int] = (224, 224),
                          heatmap: bool = False, batch: int | None = None) -> ZooModel:
    """CheXNet-style multi-label classifier: ``input`` [N,C,H,W] float32 NCHW.

    ``probs`` [N,classes] = sigmoid(biases[k]) for every image (default bias -4.0,
    p = 0.018 for every finding), so a test sets the findings' probabilities by
    hand (e.g. the logit of 0.97 for Effusion) and a correct node reports exactly
    those, by class name and not by position. ``channel_mean`` [N,C] is the
    per-channel spatial mean of what the node fed: a grey image replicated to C
    channels and ImageNet-normalised gives (m - mean_c) / std_c in channel c,
    where m is the mean of the image after scaling to [0, 1]. With ``heatmap`` a ``heatmap`` [N,1,H,W] =
    sigmoid(channel mean of the input) is added; without it a correct node says
    there is no heat map instead of refusing the model.
    """
    biases = [-4.0] * classes if biases is None else list(biases)
    if len(biases) != classes:
        raise ValueError(f"{len(biases)} biases for {classes} classes")
    return _constant_classifier(biases, "probs", "sigmoid", size, heatmap, channels, batch,
                                channel_mean=True)


def softmax_classifier(p_first: float = 0.9,
                       size: tuple[int, int] = (256, 256)) -> ZooModel:
    """Two-class softmax [normal, abnormal]: ``input`` [N,1,H,W] float32.

    ``scores`` [N,2] = softmax(log p_first, log(1 - p_first)), so element 0 is
    P(normal) = p_first. With p_first = 0.9 a correct node scores the positive
    class (element 1) and reports *normal*, P(abnormal) = 0.1.
    """
    logits = np.log([p_first, 1.0 - p_first])
    return _constant_classifier(logits, "scores", "softmax", size)


def logit_classifier(logit: float = -1.0, size: tuple[int, int] = (256, 256),
                     heatmap: bool = True) -> ZooModel:
    """Single raw logit: ``input`` [N,1,H,W] float32; ``logit`` [N,1] = ``logit``.

    No sigmoid in the graph: a correct node applies it and reports
    p = sigmoid(-1.0) = 0.269 (never "probability -1.0"), and converts a
    threshold stated as a logit to a probability. ``heatmap`` [N,1,H,W] as in
    :func:`multilabel_classifier`.
    """
    return _constant_classifier([logit], "logit", None, size, heatmap)


def uint8_classifier() -> ZooModel:
    """``input`` uint8 [N,1,256,256]; ``prob`` float32 [N,1] = mean(input) / 255.

    A correct node casts its normalised image to uint8 in 0..255 (not 0..1,
    which would give p < 0.004, nor wrapped values), so the reported p equals
    the mean of the fed image / 255.
    """
    x = _image((256, 256), dtype="uint8")
    g = _Graph()
    mean = g.op("ReduceMean", g.op("Cast", x.name, to=TensorProto.FLOAT), axes=[2, 3],
                keepdims=0)
    g.op("Div", mean, g.const(255.0), out="prob")
    out = _scores("prob", None, 1)

    def reference(feeds: Feeds) -> Feeds:
        return {"prob": (feeds[x.name].mean(axis=(2, 3)) / 255.0).astype(np.float32)}

    return ZooModel(g.model([x], [out]), (x,), (out,), reference)


def broken_classifier(size: tuple[int, int] = (256, 256)) -> ZooModel:
    """``probs`` [N,1] = 1.5 for every image: a "probability" outside [0, 1].

    A correct node's contract verification (``models verify``, load, /readyz)
    rejects this model; it never reports p = 1.5.
    """
    return _constant_classifier([1.5], "probs", None, size)


def bad_softmax(size: tuple[int, int] = (256, 256)) -> ZooModel:
    """``scores`` [N,2] = [0.7, 0.7] for every image: declared softmax, sums to 1.4.

    A correct node's contract verification rejects it (softmax must sum to 1).
    """
    return _constant_classifier([0.7, 0.7], "scores", None, size)


# -- segmentation --------------------------------------------------------------

_SEGMENTER_OUTPUTS = {"logits": "logits", "probabilities": "probs", "labelmap": "labels"}


def intensity_segmenter(levels: Sequence[float] = (0.0, 0.3, 0.6, 0.9),
                        output: str = "logits", size: tuple[int, int] | None = None,
                        batch: int | None = None) -> ZooModel:
    """Per-pixel classifier: ``input`` [N,1,H,W] float32, the normalised image x.

    Class k's logit is -100 * (x - levels[k])**2, so each pixel's label is the
    index of the nearest level (label 0 = background with the default levels).
    ``output``: "logits" -> ``logits`` float32 [N,K,H,W]; "probabilities" ->
    ``probs`` = softmax over K; "labelmap" -> ``labels`` int64 [N,H,W] (ArgMax in
    the graph). ``size`` fixes H,W (a patch model: the node must tile the image
    in patches), ``batch`` fixes N. Being per-pixel, any correct sliding window
    with any overlap and blending yields exactly the whole-image answer, and a
    correct node finds a structure by its code in the manifest, whatever label
    value it has.
    """
    name = _SEGMENTER_OUTPUTS[output]
    lv = np.asarray(levels, np.float32).reshape(1, -1, 1, 1)
    x = _image(size, 1, batch)
    g = _Graph()
    diff = g.op("Sub", x.name, g.const(lv))
    logits = g.op("Mul", g.op("Mul", diff, diff), g.const(-100.0),
                  out=name if output == "logits" else None)
    if output == "probabilities":
        g.activation(logits, "softmax", out=name)
    if output == "labelmap":
        g.op("ArgMax", logits, out=name, axis=1, keepdims=0)
        out = TensorSpec(name, (batch, *x.shape[2:]), "int64", "NHW")
    else:
        out = _like(x, name, C=len(levels))

    def reference(feeds: Feeds) -> Feeds:
        d = feeds[x.name] - lv  # float32, same operations as the graph
        z = (d * d) * np.float32(-100.0)
        value = {"logits": z, "probabilities": _softmax(z),
                 "labelmap": np.argmax(z, axis=1).astype(np.int64)}[output]
        return {name: value}

    return ZooModel(g.model([x], [out]), (x,), (out,), reference)


# -- image to image ------------------------------------------------------------

def _elementwise(x: TensorSpec, out_name: str, ops: Sequence[tuple[str, float]],
                 fn: Callable[[np.ndarray], np.ndarray]) -> ZooModel:
    """out = x passed through binary ops with scalar constants; ``fn`` is its numpy twin."""
    g = _Graph()
    t = x.name
    for op_type, value in ops:
        t = g.op(op_type, t, g.const(value, x.dtype))
    g.op("Identity", t, out=out_name)
    out = _like(x, out_name)

    def reference(feeds: Feeds) -> Feeds:
        return {out_name: fn(feeds[x.name]).astype(x.dtype)}

    return ZooModel(g.model([x], [out]), (x,), (out,), reference)


def nhwc_denoiser() -> ZooModel:
    """``input`` float32 [N,H,W,1] NHWC; ``output`` [N,H,W,1] = 0.5 * x + 0.25.

    A correct node feeds NHWC (not NCHW) and undoes its output normalisation,
    so in HU the denoised image is the inverse normalisation of 0.5 * x + 0.25
    where x is the normalised source.
    """
    return _elementwise(_image(layout="NHWC"), "output", [("Mul", 0.5), ("Add", 0.25)],
                        lambda x: 0.5 * x + 0.25)


def fp16_identity() -> ZooModel:
    """``input`` float16 [N,1,H,W]; ``output`` float16 = input (Identity).

    A clean-image model: a correct node casts to float16 and back, and its
    output series equals the source within float16 precision (relative 1e-3).
    """
    return _elementwise(_image(dtype="float16"), "output", [], lambda x: x)


def batch1_denoiser() -> ZooModel:
    """``input`` float32 [1,1,H,W], batch fixed at 1; ``output`` = input * 1.0.

    A correct node reads the batch limit from the shape/manifest and runs one
    slice at a time; the output series equals the source.
    """
    return _elementwise(_image(batch=1), "output", [("Mul", 1.0)], lambda x: x)


def residual_denoiser() -> ZooModel:
    """Residual model: ``input`` float32 [N,1,H,W] = (HU + 1024) / 4096.

    ``noise`` [N,1,H,W] = x - AvgPool3x3(x) (pads 1, count_include_pad=0), so a
    correct node *subtracts* the output and gets the edge-aware 3x3 box mean of
    x (mean over the in-image neighbours only), then maps back with
    HU = 4096 * clean - 1024. Treating ``noise`` as the clean image gives about
    -1024 HU.
    """
    x = _image()
    g = _Graph()
    pooled = g.op("AveragePool", x.name, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                  strides=[1, 1], count_include_pad=0)
    g.op("Sub", x.name, pooled, out="noise")
    out = _like(x, "noise")

    def reference(feeds: Feeds) -> Feeds:
        image = feeds[x.name]
        return {"noise": (image - box_mean_3x3(image)).astype(np.float32)}

    return ZooModel(g.model([x], [out]), (x,), (out,), reference)


def box_mean_3x3(image: np.ndarray) -> np.ndarray:
    """Mean over each pixel's in-image 3x3 neighbourhood, over the last two axes."""
    pad = [(0, 0)] * (image.ndim - 2) + [(1, 1), (1, 1)]
    values = np.pad(image.astype(np.float64), pad)
    counts = np.pad(np.ones(image.shape[-2:]), 1)
    h, w = image.shape[-2:]
    total = sum(values[..., i:i + h, j:j + w] for i in range(3) for j in range(3))
    count = sum(counts[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return total / count


def slab_denoiser(k: int = 5) -> ZooModel:
    """2.5D/3D slab model: ``input`` float32 [N,1,k,H,W] NCDHW, k neighbouring slices.

    ``output`` [N,1,H,W] = mean over the k slices. For slice z of a volume a
    correct node feeds slices z-k//2 .. z+k//2, repeating the end slice beyond
    either edge, so its answer is the z-average of those neighbours.
    """
    x = TensorSpec("input", (None, 1, k, None, None), "float32", "NCDHW")
    g = _Graph()
    g.op("ReduceMean", x.name, out="output", axes=[2], keepdims=0)
    out = TensorSpec("output", (None, 1, None, None), "float32", "NCHW")

    def reference(feeds: Feeds) -> Feeds:
        return {"output": feeds[x.name].astype(np.float64).mean(axis=2).astype(np.float32)}

    return ZooModel(g.model([x], [out]), (x,), (out,), reference)


BUILDERS: dict[str, Callable[..., ZooModel]] = {
    f.__name__: f for f in (
        multilabel_classifier, softmax_classifier, logit_classifier, uint8_classifier,
        broken_classifier, bad_softmax, intensity_segmenter, residual_denoiser,
        slab_denoiser, nhwc_denoiser, fp16_identity, batch1_denoiser,
    )
}
