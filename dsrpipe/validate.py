"""Check an exported ONNX file against the torch model it came from, the way a deployer runs it:
onnxruntime on CPU, fed raw [0,1] pixels, with no dsrpipe code in the loop."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .errors import UserError, ValidationFailed

WARMUP_RUNS = 10


def validate_onnx(
    onnx_path,
    torch_model: torch.nn.Module,
    test_set,
    *,
    batch_size: int = 256,
    latency_runs: int = 200,
    min_top1: float | None = None,
    max_abs_diff: float | None = None,
    threads: int | None = None,
) -> dict:
    """Compare ONNX and torch on the whole test split and time ONNX at batch 1.

    Raises ValidationFailed (with the metrics as `.report`) when a set threshold is missed."""
    onnx_path = Path(onnx_path)
    session = _open_session(onnx_path, threads)
    input_name = session.get_inputs()[0].name

    modes = {m: m.training for m in torch_model.modules()}
    device = next(torch_model.parameters(), torch.empty(0)).device
    torch_model.eval()
    num_test = torch_correct = onnx_correct = agree = 0
    max_diff = 0.0
    try:
        # Same order twice (no shuffle): raw pixels for ONNX, the training normalisation for torch,
        # so a mismatch between the in-graph and the dataset normalisation shows up as a diff.
        raw_batches = test_set.batches(batch_size, shuffle=False, augment=False, seed=0, epoch=0, normalize=False)
        normalized_batches = test_set.batches(batch_size, shuffle=False, augment=False, seed=0, epoch=0, normalize=True)
        for (raw, labels), (normalized, _) in zip(raw_batches, normalized_batches):
            onnx_logits = session.run(None, {input_name: raw.cpu().numpy().astype(np.float32)})[0]
            with torch.no_grad():
                torch_logits = torch_model(normalized.to(device)).float().cpu().numpy()
            labels = labels.cpu().numpy()
            onnx_pred, torch_pred = onnx_logits.argmax(1), torch_logits.argmax(1)
            num_test += len(labels)
            onnx_correct += int((onnx_pred == labels).sum())
            torch_correct += int((torch_pred == labels).sum())
            agree += int((onnx_pred == torch_pred).sum())
            max_diff = max(max_diff, float(np.abs(onnx_logits - torch_logits).max()))
        one_image = raw[:1].cpu().numpy().astype(np.float32) if num_test else None
    finally:
        for module, training in modes.items():
            module.training = training
    if num_test == 0:
        raise UserError("validation needs a non-empty test split")

    report = {
        "torch_top1": torch_correct / num_test,
        "onnx_top1": onnx_correct / num_test,
        "top1_agreement": agree / num_test,
        "max_abs_logit_diff": max_diff,
        "latency_ms": _latency_ms(session, {input_name: one_image}, latency_runs),
        "onnx_bytes": onnx_path.stat().st_size,
        "num_test": num_test,
        "providers": session.get_providers(),
        "threads": threads,  # None: onnxruntime's default (one per physical core)
    }

    failures = []
    if min_top1 is not None and report["onnx_top1"] < min_top1:
        failures.append(f"ONNX top-1 {report['onnx_top1']:.4f} is below min_top1 {min_top1}")
    if max_abs_diff is not None and max_diff > max_abs_diff:
        failures.append(f"max abs logit diff {max_diff:.3g} exceeds max_abs_diff {max_abs_diff}")
    if failures:
        error = ValidationFailed(f"{onnx_path}: " + "; ".join(failures))
        error.report = report
        raise error
    return report


def _open_session(onnx_path: Path, threads: int | None) -> ort.InferenceSession:
    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; we raise those ourselves
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load ONNX model {onnx_path}: {reason}") from err


def _latency_ms(session: ort.InferenceSession, feed: dict, runs: int) -> dict | None:
    """Single-image latency, the figure that matters for on-device inference."""
    if runs <= 0:
        return None
    for _ in range(WARMUP_RUNS):  # first runs allocate buffers and pick kernels
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - start) * 1000
    return {
        "p50": float(np.percentile(times, 50)),
        "p95": float(np.percentile(times, 95)),
        "mean": float(times.mean()),
    }
