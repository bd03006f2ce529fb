"""int8 weights and activations for an exported classifier: onnxruntime's static QDQ quantization.

Weights are quantized per output channel, symmetrically (zero point 0), so a pruned weight is
exactly 0 in int8 too and the compact encoding still finds it; activations are calibrated
(min/max) on raw [0,1] training pixels, as the graph takes them. onnxruntime fuses each
DequantizeLinear → Conv → QuantizeLinear group into an integer kernel at session creation.

Weight range (`int8_range`, docs/int8.md). Activations are uint8 (a in [0, 255]) and weights
int8. x86-64 CPUs without VNNI multiply them with VPMADDUBSW, which adds each pair of products
a1*w1 + a2*w2 in *saturating* int16, so a pair beyond 32767 is silently clipped. "portable"
(the default) quantizes the weights to 7 bits (onnxruntime's reduce_range: symmetric, |w| <= 64),
so that |a1*w1 + a2*w2| <= 2 * 255 * 64 = 32640 < 32767 and no CPU saturates; 64 is the largest
bound that holds (2 * 255 * 65 = 33150). "full" uses all of [-127, 127]: one bit more precise,
exact on CPUs with VNNI (VPDPBUSD adds in int32) or AMX, but it may saturate on the others.
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
from .encoding import decoded_weights

QUANTIZED_SUFFIX = "_quantized"  # what onnxruntime names a quantized initializer
INT8_RANGES = ("portable", "full")
# |w| <= PORTABLE_MAX with activations in [0, 255]: a pair of products fits int16 (2*255*64 = 32640).
PORTABLE_MAX = 64


def quantize_int8(
    proto: onnx.ModelProto,
    calibration: Iterable[np.ndarray],
    input_name: str,
    int8_range: str = "portable",
) -> onnx.ModelProto:
    """`proto` (float32) with int8 QDQ weights and activations, calibrated on the batches of
    `calibration` (float32 NCHW pixels in [0,1]). `int8_range`: "portable" (7-bit weights, no
    int16 saturation on any x86-64 CPU) or "full" (8-bit; may saturate without VNNI)."""
    if int8_range not in INT8_RANGES:
        raise ValueError(f"int8_range {int8_range!r}: expected one of {INT8_RANGES}")
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
                reduce_range=int8_range == "portable",  # weights only: activations keep [0, 255]
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
    if int8_range == "portable":
        check_portable_range(quantized)
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


def int8_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The int8 weights of a quantized model, by name: the constant int8 inputs of its
    DequantizeLinear nodes, the integers the fused Conv and Gemm kernels multiply. Encoded
    weights (dsrpipe.deploy.encoding) are decoded first."""
    constants = decoded_weights(proto)
    dequantized = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return {
        name: value
        for name, value in constants.items()
        if name in dequantized and value.dtype == np.int8 and value.ndim >= 2
    }


def check_portable_range(proto: onnx.ModelProto) -> None:
    """Every int8 weight of `proto` lies in [-PORTABLE_MAX, PORTABLE_MAX], where no pair of
    products of u8 activations can saturate int16; else RuntimeError."""
    weights = int8_weights(proto)
    if not weights:
        raise RuntimeError("no int8 weights found: not a quantized model")
    for name, weight in weights.items():
        outside = int(np.count_nonzero(np.abs(weight.astype(np.int16)) > PORTABLE_MAX))
        if outside:
            raise RuntimeError(
                f"{outside} int8 weights of {name} lie outside [-{PORTABLE_MAX}, {PORTABLE_MAX}]: "
                "pairs of products may saturate int16 on CPUs without VNNI"
            )
