"""Export a trained classifier as one self-contained ONNX file that takes [0,1] pixels.

The graph normalises its input itself, so a deployer needs nothing but the file and
onnxruntime. Pruned weights are stored by `encoding` (dsrpipe.encoding: dense, coo or compact;
compact, the smallest, by default), which onnxruntime turns back into the exact dense weights
at session creation: outputs are bit-identical to the dense export's.

With `quantize="int8"` the shipped file holds int8 QDQ weights and activations
(dsrpipe.deploy.quantize), encoded the same way, and the float32 model is written beside it
(`fp32_path`) as the reference that validation checks it against. `int8_range` chooses the
weights' range: "portable" (7 bits, safe on every x86-64 CPU, the default) or "full"
(docs/int8.md).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from .. import __version__
from ..errors import UserError
from ..files import atomic_path
from .encoding import ENCODINGS, drop_default_attributes, encode_weights, shorten_names
from .quantize import INT8_RANGES, QUANTIZED_SUFFIX, quantize_int8

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
QUANTIZE = ("none", "int8")
# The newest ONNX IR version a shipped file may declare: onnxruntime 1.17 loads IR 9 at most, and
# the exporter declares the newest its onnx knows (10), though opset 18 needs only IR 8. Each file
# declares the lowest its opsets need, which must not pass this (docs/deploying.md, "Runtimes").
IR_VERSION_FLOOR = 8
WEIGHT_PREFIX = "model."  # the exporter names the wrapped model's weights model.<parameter>


class PixelClassifier(nn.Module):
    """`model` behind the dataset normalisation, so the exported graph takes raw [0,1] pixels."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    metadata: dict[str, str],
    opset: int = 18,
    encoding: str = "compact",
    quantize: str = "none",
    calibration: Iterable[np.ndarray] | None = None,
    fp32_path: str | Path | None = None,
    int8_range: str = "portable",
) -> dict:
    """Write `model` (which takes normalised NCHW input) to `path` as an ONNX classifier with
    input `pixels` (float32 [batch, C, H, W] in [0,1]) and output `logits` (dynamic batch).

    `quantize="int8"` needs `calibration` (batches of raw training pixels) and `fp32_path`,
    where the float32 model goes. The writes are atomic: if anything fails, previous files are
    left untouched."""
    _check_options(encoding, quantize, calibration, fp32_path, int8_range)
    path = Path(path)
    proto = _float32_model(model, in_channels, image_size, mean, std, opset, metadata, encoding)
    dense_bytes = proto.ByteSize()
    zero_weights = sum(int(np.count_nonzero(numpy_helper.to_array(t) == 0)) for t in _weights(proto))
    shipped = _quantized(proto, calibration, int8_range) if quantize == "int8" else proto
    # The weights keep their names, float32 and int8 alike: the name says which layer it is.
    weight_names = {t.name for t in _weights(proto)}
    weight_names |= {name + QUANTIZED_SUFFIX for name in weight_names}
    result = {
        "path": str(path),
        "encoding": encoding,
        "quantize": quantize,
        **({"int8_range": int8_range} if quantize == "int8" else {}),
        "dense_onnx_bytes": dense_bytes,
        "zero_weights": zero_weights,
    }
    if quantize == "int8":
        result["fp32"] = _encode_and_save(proto, Path(fp32_path), encoding, weight_names)
    return {**result, **_encode_and_save(shipped, path, encoding, weight_names)}


def _check_options(encoding: str, quantize: str, calibration, fp32_path, int8_range: str) -> None:
    if encoding not in ENCODINGS or quantize not in QUANTIZE:
        raise ValueError(f"encoding {encoding!r} / quantize {quantize!r}: expected {ENCODINGS} / {QUANTIZE}")
    if int8_range not in INT8_RANGES:
        raise ValueError(f"int8_range {int8_range!r}: expected one of {INT8_RANGES}")
    if quantize == "int8" and (calibration is None or fp32_path is None):
        raise ValueError("int8 export needs calibration batches and an fp32_path")


def _float32_model(model, in_channels, image_size, mean, std, opset, metadata, encoding) -> onnx.ModelProto:
    """The traced float32 graph, its zeros checked, labelled for a deployer: dsrpipe as its
    producer, its input and output described, the caller's metadata and the encoding."""
    proto = _trace_to_onnx(model, in_channels, image_size, mean, std, opset)
    _check_zeros_kept(model, proto)
    _strip_exporter_metadata(proto)
    proto.producer_name, proto.producer_version = "dsrpipe", __version__
    proto.doc_string = (
        f"dsrpipe classifier: {INPUT_NAME} float32 [N,{in_channels},{image_size},{image_size}] "
        f"in [0,1] -> {OUTPUT_NAME} [N,classes]"
    )
    existing = {p.key: p.value for p in proto.metadata_props}
    helper.set_model_props(proto, {**existing, **metadata, "encoding": encoding, "quantize": "none"})
    return proto


def _quantized(proto: onnx.ModelProto, calibration, int8_range: str) -> onnx.ModelProto:
    """The int8 model of the float32 `proto`, with its metadata, saying so."""
    shipped = quantize_int8(proto, calibration, INPUT_NAME, int8_range)
    helper.set_model_props(
        shipped,
        {
            **{p.key: p.value for p in proto.metadata_props},
            "quantize": "int8",
            "int8_range": int8_range,
        },
    )
    return shipped


def _encode_and_save(proto: onnx.ModelProto, path: Path, encoding: str, weight_names: set[str]) -> dict:
    encoded = encode_weights(proto, encoding)
    if encoding == "compact":
        shorten_names(proto, keep=weight_names)
        drop_default_attributes(proto)
    proto.ir_version = _lowest_ir_version(proto)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)  # one file: the proto holds all tensor data
    return {"path": str(path), "onnx_bytes": path.stat().st_size, "encoded_tensors": encoded}


def _trace_to_onnx(model, in_channels, image_size, mean, std, opset) -> onnx.ModelProto:
    """Export with the torch.export-based exporter (torch's default; the TorchScript one is
    deprecated). Its optimiser folds eval-mode BatchNorm into the preceding conv, which scales
    weights per output channel, so zeros stay exactly zero."""
    device = next(model.parameters(), torch.empty(0)).device
    wrapped = PixelClassifier(model, mean, std).to(device)
    # Per-module modes, so a caller's deliberate mix (say, frozen BN in training) comes back as it was.
    modes = {m: m.training for m in model.modules()}
    # Batch 1 would be specialised
    example = torch.rand(2, in_channels, image_size, image_size, device=device)
    try:
        wrapped.eval()
        # Exporter internals the user cannot act on: warnings, and on failure torch.export prints
        # the partial FX graph to stderr; the error we raise carries the cause instead.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
            )
        return program.model_proto
    except Exception as err:
        raise UserError(f"cannot export {type(model).__name__} to ONNX: {_root_cause(err)}") from err
    finally:
        for module, training in modes.items():
            module.training = training


def _lowest_ir_version(proto: onnx.ModelProto) -> int:
    """The lowest IR version that the model's opsets need: older runtimes refuse a file that
    declares a newer one than they know, whatever it uses."""
    needed = helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if needed > IR_VERSION_FLOOR:
        raise UserError(
            f"the model's opsets need ONNX IR version {needed}, newer than the {IR_VERSION_FLOOR} that "
            "every supported runtime loads"
        )
    return needed


def _root_cause(err: BaseException) -> str:
    """First line of the innermost cause: the exporter wraps the real reason in pages of advice."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # the exporter colours its messages
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _check_zeros_kept(model: nn.Module, proto: onnx.ModelProto) -> None:
    """Every pruned weight must still be zero in the file. Compared by count per tensor, which
    survives BN folding (per-channel scaling) and any transpose the exporter applies."""
    initializers = {t.name: t for t in proto.graph.initializer}
    for name, param in model.named_parameters():
        tensor = initializers.get(f"{WEIGHT_PREFIX}{name}")
        if tensor is None or param.dim() < 2:
            continue
        kept = np.count_nonzero(numpy_helper.to_array(tensor) == 0)
        expected = int((param == 0).sum())
        if kept < expected:
            raise RuntimeError(f"ONNX export lost zeros in {name}: {kept} zeros, torch has {expected}")


def _strip_exporter_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node/value provenance (stack traces with local paths, fx nodes): bulk for the file,
    noise for a deployer."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        del value.metadata_props[:]


def _weights(proto: onnx.ModelProto):
    """The model's conv/linear weights (not the normalisation buffers or shape constants)."""
    return [t for t in proto.graph.initializer if t.name.startswith(WEIGHT_PREFIX) and len(t.dims) >= 2]
