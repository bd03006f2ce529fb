"""How an ONNX file stores its mostly-zero weights, in standard ONNX ops only.

  dense    plain initializers.
  coo      `Constant(sparse_value)`: the non-zero values and their int64 flat indices (8 bytes
           of index per non-zero; onnxruntime densifies it at load).
  compact  the non-zero values and their positions as k-bit gap codes, decoded by a small
           subgraph of constant inputs only, which onnxruntime's constant folding evaluates once,
           at session creation; plus short names for the graph's intermediate values.

The gap code. Walking a flattened tensor, each non-zero is `gap` places after the previous one
(the first after position -1). With M = 2**k - 1, a gap is written as (gap - 1) // M "skip" codes
0, each moving M places without a value, then one code r in 1..M that moves r places and lands on
a value. k = 1 is a plain bitmask; at 90 % sparsity 4-bit codes cost ~0.06 bytes per weight,
half a bitmask and within 10 % of the mask's entropy. All the encoded tensors of one dtype are
coded as one stream (their flattened weights end to end), with the k that makes it smallest, so
the file carries one decoder per dtype, not one per layer. The codes are packed into uint8, the
first in the lowest bits; pad codes are 0 (skips). The decoder, every shape in it static (the
size of each node's output must be known for onnxruntime to fold it, which rules out Compress):

    codes    = BitwiseAnd(BitShift(packed[:, None], [0, k, 2k, ...]), M)  (k = 8: the bytes)
    position = CumSum(Where(codes == 0, M, codes)) - 1                  (distinct, increasing)
    landing  = Min(codes, 1);  pick = CumSum(landing) * landing          (i-th value, or 0)
    stream   = ScatterElements(zeros(span), position, Gather([0, values...], pick))
    weight_i = Reshape(Slice(stream, start_i, end_i), shape_i)

Why not `graph.sparse_initializer`: ONNX shape inference types it `sparse_tensor(float)`, which
Conv and Gemm reject, so `onnx.checker.check_model(full_check=True)` fails.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ENCODINGS = ("dense", "coo", "compact")
CODE_BITS = (1, 2, 4, 8)
# Below this many elements an encoding cannot save enough to pay for its decoder's nodes.
MIN_ENCODED_NUMEL = 256
DECODER_OPS = {
    "Constant",
    "Unsqueeze",
    "BitShift",
    "BitwiseAnd",
    "Reshape",
    "Cast",
    "Equal",
    "Where",
    "CumSum",
    "Sub",
    "Min",
    "Mul",
    "Gather",
    "ConstantOfShape",
    "ScatterElements",
    "Slice",
}
COO_INDEX_BYTES = 8  # ONNX requires int64 indices in a SparseTensorProto


def encode_weights(proto: onnx.ModelProto, encoding: str) -> int:
    """Re-store the initializers of `proto` with `encoding`, in place, those it makes smaller.
    Returns how many were re-stored."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    graph = proto.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    chosen = {name: a for name, a in arrays.items() if a.size >= MIN_ENCODED_NUMEL and _pays(a, encoding)}
    if encoding == "dense" or not chosen:
        return 0
    if encoding == "coo":
        nodes, initializers = [_coo(name, array) for name, array in chosen.items()], []
    else:
        nodes, initializers = [], []
        for dtype in sorted({a.dtype.str for a in chosen.values()}):
            group = {name: a for name, a in chosen.items() if a.dtype.str == dtype}
            group_nodes, group_inits = _compact(group, f"{SHARED}{len(initializers)}")
            nodes += group_nodes
            initializers += group_inits
        initializers += _shared_constants()
    kept = [t for t in graph.initializer if t.name not in chosen] + initializers
    del graph.initializer[:]
    graph.initializer.extend(kept)
    ordered = nodes + list(graph.node)  # decoders first: nodes must be topologically sorted
    del graph.node[:]
    graph.node.extend(ordered)
    return len(chosen)


def _pays(array: np.ndarray, encoding: str) -> bool:
    """Whether `encoding` stores `array` in fewer bytes than dense does (decoder nodes aside)."""
    nonzero = int(np.count_nonzero(array))
    if encoding == "coo":
        return nonzero * (array.itemsize + COO_INDEX_BYTES) < array.nbytes
    flat = array.reshape(-1)
    return nonzero * array.itemsize + min(_packed_size(flat, b) for b in CODE_BITS) < array.nbytes


def _packed_size(flat: np.ndarray, bits: int) -> int:
    return -(-gap_codes(flat, bits).size * bits // 8)


def decoded_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every weight of `proto` as the graph computes it (initializers, sparse constants, compact
    decoders), by running only the constant decoder nodes: for tests and checks, not for serving."""
    from onnx.reference import ReferenceEvaluator

    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    constant = set(tensors)
    decoder = []
    for node in proto.graph.node:
        if node.op_type in DECODER_OPS and all(i in constant for i in node.input if i):
            decoder.append(node)
            constant.update(node.output)
    if not decoder:
        return tensors
    outputs = [o for n in decoder for o in n.output]
    graph = helper.make_graph(
        decoder,
        "decoders",
        [],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
        list(proto.graph.initializer),
    )
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    values = ReferenceEvaluator(model).run(None, {})
    return {**tensors, **dict(zip(outputs, values))}


def _coo(name: str, array: np.ndarray) -> onnx.NodeProto:
    flat = array.reshape(-1)
    nonzero = np.flatnonzero(flat)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(flat[nonzero], name),
        numpy_helper.from_array(nonzero.astype(np.int64)),
        array.shape,
    )
    return helper.make_node("Constant", [], [name], name=f"{name}/coo", sparse_value=sparse)


def gap_codes(flat: np.ndarray, bits: int) -> np.ndarray:
    """The k-bit gap codes (uint8, one per code, unpacked) of the non-zeros of `flat`."""
    most = (1 << bits) - 1
    gaps = np.diff(np.flatnonzero(flat), prepend=-1)
    skips = (gaps - 1) // most
    codes = np.zeros(int(skips.sum()) + gaps.size, dtype=np.uint8)
    codes[np.cumsum(skips + 1) - 1] = gaps - skips * most
    return codes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """`codes` packed into uint8, the first code in the lowest bits; the tail padded with 0s."""
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def _compact(arrays: dict[str, np.ndarray], tag: str):
    """The decoder nodes and initializers that rebuild `arrays` (all of one dtype) from the
    smallest gap coding of their flattened weights end to end."""
    dtype = next(iter(arrays.values())).dtype
    stream = np.concatenate([a.reshape(-1) for a in arrays.values()])
    bits = min(CODE_BITS, key=lambda b: _packed_size(stream, b))
    codes = gap_codes(stream, bits)
    most = (1 << bits) - 1
    # Skips and pad codes step past the last weight: scatter into a buffer that holds them all.
    pad = (-codes.size) % (8 // bits)
    span = max(stream.size, int(np.where(codes == 0, most, codes).sum()) + pad * most)
    inits = [
        numpy_helper.from_array(pack_codes(codes, bits), f"{tag}.codes"),
        numpy_helper.from_array(np.concatenate([np.zeros(1, dtype), stream[stream != 0]]), f"{tag}.values"),
        numpy_helper.from_array(np.array([most], dtype=np.int64), f"{tag}.most"),
        numpy_helper.from_array(np.array([span], dtype=np.int64), f"{tag}.span"),
    ]
    unpack_nodes, unpack_inits, unpacked = _unpack(tag, bits)
    slice_nodes, slice_inits = _slices(tag, arrays)
    nodes = unpack_nodes + _decode(tag, unpacked, dtype) + slice_nodes
    return nodes, inits + unpack_inits + slice_inits


def _unpack(tag: str, bits: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The nodes (and their constants) that split each packed byte into its 8 // `bits` codes, and
    the name of the codes, one per element; bytes are codes already at 8 bits."""
    if bits == 8:
        return [], [], f"{tag}.codes"
    most = (1 << bits) - 1
    inits = [
        numpy_helper.from_array(np.arange(8 // bits, dtype=np.uint8) * bits, f"{tag}.shifts"),
        numpy_helper.from_array(np.array(most, dtype=np.uint8), f"{tag}.mask"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", [f"{tag}.codes", f"{SHARED}.one"], [f"{tag}.column"]),
        helper.make_node(
            "BitShift", [f"{tag}.column", f"{tag}.shifts"], [f"{tag}.shifted"], direction="RIGHT"
        ),
        helper.make_node("BitwiseAnd", [f"{tag}.shifted", f"{tag}.mask"], [f"{tag}.table"]),
        helper.make_node("Reshape", [f"{tag}.table", f"{SHARED}.flat"], [f"{tag}.unpacked"]),
    ]
    return nodes, inits, f"{tag}.unpacked"


def _decode(tag: str, unpacked: str, dtype: np.dtype) -> list[onnx.NodeProto]:
    """The nodes that turn the codes into the stream of every weight end to end (the module
    docstring's position, landing, pick and stream)."""
    t = tag  # short: every value's name starts with it
    zero = numpy_helper.from_array(np.zeros(1, dtype=dtype))
    return [
        helper.make_node("Cast", [unpacked], [f"{t}.code"], to=TensorProto.INT64),
        helper.make_node("Equal", [f"{t}.code", f"{SHARED}.zero"], [f"{t}.skip"]),
        helper.make_node("Where", [f"{t}.skip", f"{t}.most", f"{t}.code"], [f"{t}.step"]),
        helper.make_node("CumSum", [f"{t}.step", f"{SHARED}.zero"], [f"{t}.end"]),
        helper.make_node("Sub", [f"{t}.end", f"{SHARED}.one"], [f"{t}.position"]),
        helper.make_node("Min", [f"{t}.code", f"{SHARED}.one"], [f"{t}.landing"]),
        helper.make_node("CumSum", [f"{t}.landing", f"{SHARED}.zero"], [f"{t}.rank"]),
        helper.make_node("Mul", [f"{t}.rank", f"{t}.landing"], [f"{t}.pick"]),
        helper.make_node("Gather", [f"{t}.values", f"{t}.pick"], [f"{t}.placed"], axis=0),
        helper.make_node("ConstantOfShape", [f"{t}.span"], [f"{t}.zeros"], value=zero),
        helper.make_node(
            "ScatterElements", [f"{t}.zeros", f"{t}.position", f"{t}.placed"], [f"{t}.stream"], axis=0
        ),
    ]


def _slices(tag: str, arrays: dict[str, np.ndarray]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (and their constants) that cut each array, under its own name, out of the stream."""
    nodes, inits = [], []
    start = 0
    for i, (name, array) in enumerate(arrays.items()):
        inits += [
            numpy_helper.from_array(np.array([start], dtype=np.int64), f"{tag}.{i}.start"),
            numpy_helper.from_array(np.array([start + array.size], dtype=np.int64), f"{tag}.{i}.end"),
            numpy_helper.from_array(np.array(array.shape, dtype=np.int64), f"{tag}.{i}.shape"),
        ]
        nodes += [
            helper.make_node(
                "Slice", [f"{tag}.stream", f"{tag}.{i}.start", f"{tag}.{i}.end"], [f"{tag}.{i}.flat"]
            ),
            helper.make_node("Reshape", [f"{tag}.{i}.flat", f"{tag}.{i}.shape"], [name]),
        ]
        start += array.size
    return nodes, inits


SHARED = "dsr"  # the decoders' common constants


def _shared_constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(0, dtype=np.int64), f"{SHARED}.zero"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), f"{SHARED}.one"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{SHARED}.flat"),
    ]


def shorten_names(proto: onnx.ModelProto, keep: set[str]) -> None:
    """Rename, in place, the graph's intermediate values and initializers, but for those named in
    `keep`, to short ids, drop node names and the inferred shapes of
    intermediates (onnxruntime infers them again): the exporter's and quantizer's names
    ("/model/conv1/Conv_output_0_QuantizeLinear_Output") weigh more than a small model's index
    codes. The input and the output keep their names too."""
    graph = proto.graph
    fixed = {v.name for v in [*graph.input, *graph.output]} | keep
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in fixed:
            return name
        return names.setdefault(name, f"v{len(names)}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]


# Per-axis attributes whose default the schemas state in words: 1 (or 0) along each axis.
PER_AXIS_DEFAULTS = {"strides": 1, "dilations": 1, "pads": 0}


def drop_default_attributes(proto: onnx.ModelProto) -> None:
    """Remove, in place, node attributes set to their default value (the exporter spells out
    dilations=[1, 1], group=1, ...): bytes in a small model's file, no meaning."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or opset is None:
            continue
        schema = onnx.defs.get_schema(node.op_type, opset)
        kept = [
            a
            for a in node.attribute
            if not _default_per_axis(a, schema)
            and (
                a.name not in schema.attributes
                or not schema.attributes[a.name].default_value.name  # no default: required or unset
                or _attribute_value(a) != _attribute_value(schema.attributes[a.name].default_value)
            )
        ]
        del node.attribute[:]
        node.attribute.extend(kept)


def _default_per_axis(attribute: onnx.AttributeProto, schema) -> bool:
    default = PER_AXIS_DEFAULTS.get(attribute.name)
    return (
        default is not None
        and attribute.name in schema.attributes
        and attribute.type == onnx.AttributeProto.INTS
        and set(attribute.ints) <= {default}
    )


def _attribute_value(attribute: onnx.AttributeProto):
    value = helper.get_attribute_value(attribute)
    return value.SerializeToString() if hasattr(value, "SerializeToString") else value
