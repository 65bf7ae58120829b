"""Value shapes from ONNX shape inference, for every scope of the model.

The input size comes from the model, or from ``--input-size`` where the model
leaves it symbolic.  A symbolic size is never replaced by a made-up one: the
layers behind it get unknown shapes and the notes say so.  Shapes the exporter
stored (``value_info``) describe the dummy input it traced with, not the
model, so they are dropped whenever the input is symbolic or resized.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpa.backends.onnx.common import Shape
from hpa.backends.onnx.scopes import scoped_value_infos, shape_of
from hpa.errors import LoadError, OptionError


def infer_shapes(model: Any, input_size: tuple[int, ...] | None, what: str,
                 folded: dict[tuple[int, int], np.ndarray] | None = None):
    """Scoped value name -> shape (batch included, None for unknown dims); the input shape; notes.

    ``folded`` maps (main-graph node index, input index) to a constant that
    replaces that input in the copy the inference runs on.
    """
    import onnx

    initializers = {t.name for t in model.graph.initializer}
    data_inputs = [i for i in model.graph.input if i.name not in initializers]
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    work_inputs = [i for i in work.graph.input if i.name not in initializers]
    for value in work_inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = 1  # a symbolic batch: every per-sample shape is the same
    _replace_folded(work, folded or {}, model.ir_version)
    input_shape = None
    if data_inputs:
        first = work_inputs[0].type.tensor_type
        if input_size is not None:
            _set_input_size(first, input_size, data_inputs[0].name)
        input_shape = shape_of(work_inputs[0])
        input_shape = None if input_shape is None else input_shape[1:]
        if input_size is not None or input_shape is None or None in input_shape:
            _forget_stored_shapes(work.graph)
        if input_shape is None or None in input_shape:
            notes.append(f"the model input {data_inputs[0].name!r} has a symbolic size, so layer shapes behind "
                         "it are unknown (and whether a conv covers its whole input, a fully-connected layer, "
                         "is not decided); pass --input-size C,H,W to give one")
    inferred = _run_inference(work, input_size, what, notes)
    shapes: dict[str, Shape] = {}
    for name, value in scoped_value_infos(inferred.graph):
        shape = shape_of(value)
        if shape is not None:
            shapes[name] = shape
    for tensor in model.graph.initializer:
        shapes.setdefault(tensor.name, tuple(int(d) for d in tensor.dims))
    return shapes, input_shape, notes


def _replace_folded(work: Any, folded: dict[tuple[int, int], np.ndarray], ir_version: int) -> None:
    import onnx
    from onnx import numpy_helper

    for (k, j), value in folded.items():
        name = f"__hpa_folded_{k}_{j}"
        work.graph.node[k].input[j] = name
        work.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if ir_version < 4:  # initializers had to be listed as inputs too
            work.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))


def _set_input_size(tensor_type: Any, input_size: tuple[int, ...], name: str) -> None:
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(input_size) + 1:
        raise OptionError(f"--input-size {','.join(map(str, input_size))} has {len(input_size)} "
                          f"dimensions but the model input {name!r} has "
                          f"{len(tensor_type.shape.dim)} (batch included)")
    tensor_type.shape.ClearField("dim")
    for size in (1, *input_size):
        tensor_type.shape.dim.add().dim_value = int(size)


def _forget_stored_shapes(graph: Any) -> None:
    """Drop the exporter's shapes, in every scope: they would fight (or stand in for) the real input size."""
    graph.ClearField("value_info")
    for out in graph.output:
        out.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _forget_stored_shapes(attribute.g)


def _run_inference(work: Any, input_size: tuple[int, ...] | None, what: str, notes: list[str]) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shapes are optional; the weights are not
        if input_size is not None:
            raise LoadError(f"ONNX shape inference failed for {what} with --input-size "
                            f"{','.join(map(str, input_size))}: {str(exc).splitlines()[0]}") from None
        notes.append(f"ONNX shape inference failed ({type(exc).__name__}); layer shapes are unknown")
        return work
