"""Check an exported ONNX file against the torch model it came from, the way a deployer runs it:
onnxruntime on CPU, fed raw [0,1] pixels, with no dsrpipe code in the loop; and time it side by
side with the dense model of the same architecture."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import UserError, ValidationFailed
from ..machine import cpu_features
from .predict import input_shape, open_session, run_session

# Two classes torch scores closer than this (relative to the logits' scale, and at least 1) are a
# numerical tie: float32 sums in another order (onnxruntime's kernels) may swap them.
TIE_TOLERANCE = 1e-5

WARMUP_RUNS = 10
THROUGHPUT_BATCH = 64


def validate_onnx(
    onnx_path,
    torch_model: torch.nn.Module,
    test_set,
    *,
    fp32_path=None,
    dense_path=None,
    batch_size: int = 256,
    latency_runs: int = 200,
    throughput_runs: int = 20,
    min_top1: float | None = None,
    max_abs_diff: float | None = None,
    min_agreement: float | None = None,
    max_top1_drop: float | None = None,
    threads: int | None = None,
) -> dict:
    """Compare ONNX and torch on the whole test split; time the shipped model (and, given
    `dense_path`, the dense model beside it).

    `onnx_path` is the shipped model. If it is quantized, `fp32_path` is its float32 model: the
    torch parity checks (max_abs_diff, min_agreement) apply to that one, and max_top1_drop bounds
    how far the shipped top-1 falls below it. min_top1 applies to the shipped model. Raises
    ValidationFailed (with the metrics as `.report`) when a set threshold is missed."""
    onnx_path = Path(onnx_path)
    shipped, fp32 = _sessions(onnx_path, fp32_path, dense_path, threads)
    quantized = fp32 is not shipped
    tally = _compare_on_test_split(torch_model, test_set, batch_size, shipped, fp32, onnx_path, fp32_path)
    report = {**tally.figures(quantized), **_describe(shipped, onnx_path, quantized, tally.num_test, threads)}
    report.update(
        _speed(shipped, np.concatenate(tally.samples), dense_path, threads, latency_runs, throughput_runs)
    )
    if dense_path is not None:
        report["dense_onnx_bytes"] = Path(dense_path).stat().st_size
        report["size_ratio"] = report["onnx_bytes"] / report["dense_onnx_bytes"]

    failures = _missed_gates(report, quantized, min_top1, max_abs_diff, min_agreement, max_top1_drop)
    if failures:
        error = ValidationFailed(f"{onnx_path}: " + "; ".join(failures))
        error.report = report
        raise error
    return report


def _sessions(onnx_path: Path, fp32_path, dense_path, threads: int | None):
    """onnxruntime sessions of the shipped model and of its float32 model (the same session where
    it is not quantized), each declaring an input within bounds."""
    # Timed beside another session, a session's threads must not spin: spinning workers of the
    # session that just ran take a core from the one being timed (on 2 cores a dense model timed
    # against itself came out 0.6x or 1.7x at batch 1, by which session was made first).
    spinning = dense_path is None
    shipped = open_session(onnx_path, threads, spinning=spinning)
    fp32 = open_session(Path(fp32_path), threads, spinning=spinning) if fp32_path is not None else shipped
    for session, path in ((shipped, onnx_path), (fp32, fp32_path or onnx_path)):
        input_shape(session, path)  # what the model declares is bounded before it is fed
    return shipped, fp32


def _describe(shipped, onnx_path: Path, quantized: bool, num_test: int, threads: int | None) -> dict:
    """What was validated, and on what: the file's encoding and quantization (from its metadata),
    its size, the test split's, the runtime and the CPU."""
    meta = shipped.get_modelmeta().custom_metadata_map
    return {
        "encoding": meta.get("encoding"),
        "quantize": meta.get("quantize", "none"),
        **({"int8_range": meta.get("int8_range", "full")} if quantized else {}),  # older files: full
        "onnx_bytes": onnx_path.stat().st_size,
        "num_test": num_test,
        "providers": shipped.get_providers(),
        # what the int8 kernels ran on: their arithmetic depends on it (docs/int8.md)
        "cpu": cpu_features(),
        "onnxruntime": {"version": ort.__version__, "providers": shipped.get_providers()},
        "threads": threads,  # None: onnxruntime's default (one per physical core)
    }


@dataclass
class _Tally:
    """What the test split showed, summed over its batches."""

    num_test: int = 0
    torch_correct: int = 0
    fp32_correct: int = 0
    shipped_correct: int = 0
    agree: int = 0  # float32 ONNX and torch, same class
    shipped_agree: int = 0  # the shipped (int8) model and float32 ONNX, same class
    max_diff: float = 0.0
    # Samples with a NaN or infinite logit, per model: such a model never passes, and the gates
    # cannot see it (every comparison with NaN is false).
    nonfinite: dict[str, int] = field(default_factory=lambda: {"torch": 0, "onnx": 0})
    samples: list[np.ndarray] = field(default_factory=list)  # raw images for the timing

    def figures(self, quantized: bool) -> dict:
        n = self.num_test
        return {
            "torch_top1": self.torch_correct / n,
            "onnx_top1": self.shipped_correct / n,  # the shipped model's
            "fp32_onnx_top1": self.fp32_correct / n,
            "top1_agreement": self.agree / n,  # float32 ONNX vs torch
            "max_abs_logit_diff": self.max_diff,  # float32 ONNX vs torch; inf where a logit is not finite
            "nonfinite_samples": self.nonfinite,  # samples with a NaN or infinite logit, torch's and ONNX's
            **(
                {
                    "int8_agreement": self.shipped_agree / n,
                    "int8_top1_drop": (self.fp32_correct - self.shipped_correct) / n,
                }
                if quantized
                else {}
            ),
        }


def _compare_on_test_split(torch_model, test_set, batch_size, shipped, fp32, onnx_path, fp32_path) -> _Tally:
    """torch and onnxruntime (the float32 model, and the shipped one if it is another) on every
    test image, torch in eval mode (each module's mode restored after)."""
    quantized = fp32 is not shipped
    modes = {m: m.training for m in torch_model.modules()}
    device = next(torch_model.parameters(), torch.empty(0)).device
    torch_model.eval()
    t = _Tally()
    try:
        # Same order twice (no shuffle): raw pixels for ONNX, the training normalisation for torch,
        # so a mismatch between the in-graph and the dataset normalisation shows up as a diff.
        raw_batches = test_set.batches(
            batch_size, shuffle=False, augment=False, seed=0, epoch=0, normalize=False
        )
        normalized_batches = test_set.batches(
            batch_size, shuffle=False, augment=False, seed=0, epoch=0, normalize=True
        )
        for (raw, labels), (normalized, _) in zip(raw_batches, normalized_batches):
            pixels = raw.cpu().numpy().astype(np.float32)
            if sum(len(s) for s in t.samples) < THROUGHPUT_BATCH:
                t.samples.append(pixels[:THROUGHPUT_BATCH])
            fp32_logits = run_session(fp32, pixels, fp32_path or onnx_path)
            with torch.no_grad():
                torch_logits = torch_model(normalized.to(device)).float().cpu().numpy()
            if fp32_logits.shape != torch_logits.shape:
                raise UserError(
                    f"{fp32_path or onnx_path}: logits of shape {fp32_logits.shape} where the torch "
                    f"model gives {torch_logits.shape}"
                )
            labels = labels.cpu().numpy()
            fp32_pred, torch_pred = fp32_logits.argmax(1), torch_logits.argmax(1)
            shipped_logits = run_session(shipped, pixels, onnx_path) if quantized else fp32_logits
            shipped_pred = shipped_logits.argmax(1)
            t.nonfinite["torch"] += _nonfinite_rows(torch_logits)
            t.nonfinite["onnx"] += _nonfinite_rows(fp32_logits) + (
                _nonfinite_rows(shipped_logits) if quantized else 0
            )
            t.num_test += len(labels)
            t.fp32_correct += int((fp32_pred == labels).sum())
            t.shipped_correct += int((shipped_pred == labels).sum())
            t.torch_correct += int((torch_pred == labels).sum())
            t.agree += int(agreeing(fp32_logits, torch_logits).sum())
            t.shipped_agree += int((shipped_pred == fp32_pred).sum())
            # NaN or inf on either side is an unbounded difference (NaN would be lost by max()).
            diff = np.abs(fp32_logits - torch_logits)
            t.max_diff = max(t.max_diff, float(np.nan_to_num(diff, nan=np.inf).max()))
    finally:
        for module, training in modes.items():
            module.training = training
    if t.num_test == 0:
        raise UserError("validation needs a non-empty test split")
    return t


def _missed_gates(report, quantized, min_top1, max_abs_diff, min_agreement, max_top1_drop) -> list[str]:
    """The validation gates the report misses, each as a phrase; a non-finite logit always."""
    nonfinite, num_test, max_diff = (
        report["nonfinite_samples"],
        report["num_test"],
        report["max_abs_logit_diff"],
    )
    failures = [
        f"{count} of {num_test} test samples get a NaN or infinite logit from {who}"
        for who, count in (("torch", nonfinite["torch"]), ("onnxruntime", nonfinite["onnx"]))
        if count
    ]
    if min_top1 is not None and report["onnx_top1"] < min_top1:
        failures.append(f"ONNX top-1 {report['onnx_top1']:.4f} is below min_top1 {min_top1}")
    if max_abs_diff is not None and np.isfinite(max_diff) and max_diff > max_abs_diff:  # inf: said above
        failures.append(
            f"max abs logit diff {max_diff:.3g} (float32 ONNX vs torch) exceeds max_abs_diff {max_abs_diff}"
        )
    if min_agreement is not None and report["top1_agreement"] < min_agreement:
        failures.append(
            f"top-1 agreement {report['top1_agreement']:.4f} (float32 ONNX vs torch) is below "
            f"min_agreement {min_agreement}"
        )
    if quantized and max_top1_drop is not None and report["int8_top1_drop"] > max_top1_drop:
        failures.append(
            f"int8 top-1 is {report['int8_top1_drop']:.4f} below float32's, more than "
            f"max_top1_drop {max_top1_drop}"
        )
    return failures


def agreeing(onnx_logits: np.ndarray, torch_logits: np.ndarray) -> np.ndarray:
    """Per image, whether ONNX's top class is torch's. A numerical tie counts as agreeing: torch
    scores ONNX's class within float32's noise of its own top class (TIE_TOLERANCE of the logits'
    scale; an untrained model often scores two classes 1e-8 apart). Never where a logit is NaN or
    infinite."""
    finite = np.isfinite(onnx_logits).all(1) & np.isfinite(torch_logits).all(1)
    rows = np.arange(len(torch_logits))
    top = torch_logits[rows, torch_logits.argmax(1)]
    gap = top - torch_logits[rows, onnx_logits.argmax(1)]
    tie = gap <= TIE_TOLERANCE * np.maximum(1.0, np.abs(top))
    return finite & ((onnx_logits.argmax(1) == torch_logits.argmax(1)) | tie)


def _nonfinite_rows(logits: np.ndarray) -> int:
    return int((~np.isfinite(logits)).any(axis=1).sum())


def _speed(shipped, images: np.ndarray, dense_path, threads, latency_runs: int, throughput_runs: int) -> dict:
    """The shipped model's batch-1 latency on the test images; given `dense_path`, side by side
    with the dense model, and the batch-64 throughput of both."""
    if dense_path is None:
        return {"latency_ms": _latency_ms([shipped], images[:1], latency_runs)[0]}
    batch = np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:]))  # repeats a small test split
    dense = open_session(Path(dense_path), threads, spinning=False)
    return _side_by_side(shipped, dense, images[:1], batch, latency_runs, throughput_runs)


def time_side_by_side(
    paths: list[Path], one_image: np.ndarray, *, latency_runs: int, throughput_runs: int, threads: int | None
) -> list[dict]:
    """Batch-1 latency and batch-64 throughput of several exported models, timed in alternation in
    one process, so that the ratios between them hold on a machine that is busy now and then
    (bench/pareto.py times a whole grid's models so)."""
    sessions = [open_session(path, threads, spinning=False) for path in paths]
    batch = np.resize(one_image, (THROUGHPUT_BATCH, *one_image.shape[1:]))
    latencies = _latency_ms(sessions, one_image, latency_runs)
    seconds = _timings(sessions, batch, throughput_runs)
    return [
        {"latency_ms": latency, "images_per_s": float(len(batch) / np.median(s))}
        for latency, s in zip(latencies, seconds)
    ]


def _side_by_side(
    shipped, dense, one_image: np.ndarray, batch: np.ndarray, latency_runs: int, throughput_runs: int
) -> dict:
    """Batch-1 latency and batch-64 throughput of the shipped and the dense model, measured in
    alternation so that a noisy machine slows both alike."""
    latency, dense_latency = _latency_ms([shipped, dense], one_image, latency_runs)
    seconds = _timings([shipped, dense], batch, throughput_runs)
    throughput, dense_throughput = (float(len(batch) / np.median(s)) for s in seconds)
    return {
        "latency_ms": latency,
        "dense_latency_ms": dense_latency,
        "throughput": {
            "batch": len(batch),
            "images_per_s": throughput,
            "dense_images_per_s": dense_throughput,
        },
        "speedup": {
            "latency_p50": dense_latency["p50"] / latency["p50"],
            "throughput": throughput / dense_throughput,
        },
    }


def _latency_ms(sessions: list, one_image: np.ndarray, runs: int) -> list[dict]:
    """Single-image latency, the figure that matters for on-device inference."""
    return [
        {
            "p50": float(np.percentile(t * 1000, 50)),
            "p95": float(np.percentile(t * 1000, 95)),
            "mean": float(t.mean() * 1000),
        }
        for t in _timings(sessions, one_image, runs)
    ]


def _timings(sessions: list, pixels: np.ndarray, runs: int) -> list[np.ndarray]:
    """Seconds per run of each session on `pixels`, the sessions taking turns (and turns about
    who goes first)."""
    feeds = [{s.get_inputs()[0].name: pixels} for s in sessions]
    for _ in range(WARMUP_RUNS):  # first runs allocate buffers and pick kernels
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times = np.empty((len(sessions), runs))
    order = list(range(len(sessions)))
    for i in range(runs):
        for k in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k, i] = time.perf_counter() - start
    return list(times)
