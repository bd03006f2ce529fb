"""int8 weights and activations for an exported classifier: onnxruntime's static QDQ quantization.

Weights are quantized per output channel, symmetrically (zero point 0), so a pruned weight is
exactly 0 in int8 too and the compact encoding still finds it; activations are calibrated
(min/max) on raw [0,1] training pixels, as the graph takes them. onnxruntime fuses each
DequantizeLinear → Conv → QuantizeLinear group into an integer kernel at session creation.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UserError

QUANTIZED_SUFFIX = "_quantized"  # what onnxruntime names a quantized initializer


def quantize_int8(
    proto: onnx.ModelProto, calibration: Iterable[np.ndarray], input_name: str
) -> onnx.ModelProto:
    """`proto` (float32) with int8 QDQ weights and activations, calibrated on the batches of
    `calibration` (float32 NCHW pixels in [0,1])."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="dsrpipe-quantize-") as tmp:
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto, source)  # a path, not the proto: quantize_static rewrites a proto it is given
        root = logging.getLogger()
        level, root.level = (
            root.level,
            logging.ERROR,
        )  # its advice to pre-process the graph is not the user's to act on
        try:
            quantize_static(
                source,
                out,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "QuantizeBias": False},
            )
        except Exception as err:  # onnxruntime raises assorted types for graphs it cannot handle
            raise UserError(f"int8 quantization failed: {type(err).__name__}: {err}") from err
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(out))
    check_zeros_quantized(proto, quantized)
    _drop_zero_zero_points(quantized)
    _half_weight_scales(quantized)
    return quantized


def _half_weight_scales(proto: onnx.ModelProto) -> None:
    """Store the weights' per-channel scales as float16, cast back to float32 in the graph (a
    node onnxruntime folds at load): a relative change of at most 2**-11 in each dequantized
    weight, 20x below int8's own rounding, for half the bytes of the scales."""
    initializers = {t.name: t for t in proto.graph.initializer}
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
    casts = []
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in weights:
            continue
        scale = initializers.get(node.input[1])
        if scale is None or scale.data_type != onnx.TensorProto.FLOAT or len(scale.dims) != 1:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float16), f"{scale.name}_fp16")
        scale.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [node.input[1]], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _drop_zero_zero_points(proto: onnx.ModelProto) -> None:
    """Remove the all-zero zero points of the conv weights' DequantizeLinear: 0 is the default,
    and per channel they weigh as much as a sparse layer's index codes. Others stay: onnxruntime
    fuses Gemm into QGemm only with them, and a QuantizeLinear's sets its output type."""
    initializers = {t.name: t for t in proto.graph.initializer}
    conv_inputs = {i for n in proto.graph.node if n.op_type == "Conv" for i in n.input[1:]}
    dropped = set()
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in conv_inputs:
            continue
        if len(node.input) < 3 or node.input[2] not in initializers:
            continue
        if not np.any(numpy_helper.to_array(initializers[node.input[2]])):
            dropped.add(node.input[2])
            del node.input[2]
    still_used = {i for n in proto.graph.node for i in n.input}
    kept = [t for t in proto.graph.initializer if t.name not in dropped or t.name in still_used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def check_zeros_quantized(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> None:
    """Every zero weight of `fp32` is a zero in `int8`, dequantized with zero point 0; else
    RuntimeError. Weights too small for their channel's scale may round to 0: more zeros are
    fine, a lost one is not."""
    weights = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer if len(t.dims) >= 2}
    stored = {t.name: t for t in int8.graph.initializer}
    consumers = {n.input[0]: n for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    for name, weight in weights.items():
        tensor = stored.get(name + QUANTIZED_SUFFIX)
        if tensor is None:
            continue  # left in float32 (an op onnxruntime does not quantize)
        node = consumers.get(tensor.name)
        zero_point = stored.get(node.input[2]) if node is not None and len(node.input) > 2 else None
        if zero_point is not None and np.any(numpy_helper.to_array(zero_point) != 0):
            raise RuntimeError(
                f"int8 quantization of {name} has a non-zero zero point: its zeros are not zeros"
            )
        quantized = numpy_helper.to_array(tensor)
        lost = int(np.count_nonzero(quantized[weight == 0]))
        if lost:
            raise RuntimeError(f"int8 quantization lost {lost} zeros in {name}")
