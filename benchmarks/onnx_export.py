"""The benchmark's MLP as an ONNX graph, for the peers that run ONNX (ONNX Runtime, DeepSparse).

The graph is the forward ``pj.mlp_apply`` computes with ReLU between layers: per layer
``MatMul(h, W)`` with ``W`` stored ``(in, out)``, ``Add(., b)``, then ``Relu`` except after the
last layer; float32; one input ``x`` of shape ``(batch, in)`` and one output ``y``.  Pruned weights
stay in the initializers as zeros (a dense ONNX tensor): a sparse engine finds the zeros itself,
as DeepSparse does when it compiles a pruned model.  Built with ``onnx.helper`` (the ``onnx``
package, optional: ``pip install prunejax[bench]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# Opset 13 and IR version 8 are read by every runtime used here: ONNX Runtime >= 1.8 and the
# onnx 1.14 that DeepSparse 1.8 pins.
OPSET = 13
IR_VERSION = 8
INPUT, OUTPUT = "x", "y"


def _checked_layers(kernels: Sequence[Any], biases: Sequence[Any]) -> list[tuple]:
    """``(W, b)`` per layer as C-contiguous float32 NumPy, shapes chained; else ValueError."""
    if len(kernels) != len(biases) or not kernels:
        n_k, n_b = len(kernels), len(biases)
        raise ValueError(
            f"need one bias per kernel and at least one layer: {n_k} kernels, {n_b} biases"
        )
    layers, width = [], None
    for i, (k, b) in enumerate(zip(kernels, biases, strict=True)):
        k = np.ascontiguousarray(np.asarray(k, dtype=np.float32))
        b = np.ascontiguousarray(np.asarray(b, dtype=np.float32))
        if k.ndim != 2 or b.shape != (k.shape[1],):
            raise ValueError(f"layer {i}: kernel {k.shape} (in, out) and bias {b.shape} (out,)")
        if width is not None and k.shape[0] != width:
            raise ValueError(f"layer {i}: kernel has {k.shape[0]} inputs, previous layer {width}")
        width = k.shape[1]
        layers.append((k, b))
    return layers


def mlp_to_onnx(kernels: Sequence[Any], biases: Sequence[Any], batch: int | None = None) -> Any:
    """The MLP ``relu(... relu(x @ W0 + b0) ...) @ Wn + bn`` as an ONNX model.

    Args:
      kernels: the weight matrices, ``(in, out)``, in layer order.
      biases: the biases, ``(out,)``, in layer order.
      batch: a fixed batch size for the input, or None for a symbolic ``"batch"`` dimension.

    Returns:
      An ``onnx.ModelProto`` (checked with ``onnx.checker``), input ``"x"`` and output ``"y"``.

    Raises:
      ModuleNotFoundError: ``onnx`` is not installed.
      ValueError: kernels and biases do not form an MLP (the offending layer is named).
    """
    layers = _checked_layers(kernels, biases)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim0: int | str = "batch" if batch is None else int(batch)
    nodes, inits, h = [], [], INPUT
    for i, (k, b) in enumerate(layers):
        last = i == len(layers) - 1
        inits += [numpy_helper.from_array(k, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"]))
        out = OUTPUT if last else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            h = f"relu{i}"
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [dim0, layers[0][0].shape[0]])
    y = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [dim0, layers[-1][0].shape[1]])
    graph = helper.make_graph(nodes, "prunejax_mlp", [x], [y], initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="prunejax-benchmarks",
    )
    onnx.checker.check_model(model)
    return model


def save(model: Any, path: str | os.PathLike) -> str:
    """Write ``model`` to ``path`` (written to a temporary name, then renamed); the path."""
    import onnx

    path = os.fspath(path)
    tmp = path + ".part"
    onnx.save_model(model, tmp)
    os.replace(tmp, path)
    return path
