"""Stages `export` and `validate` of a run: the trained model to a sparse ONNX file, then measured
with onnxruntime against torch and a dense export of the same model, into report.json.

Both take the Run (dsrpipe.run), which reads the shipped checkpoint, builds its model and counts
its sparsity once for the two of them, and loads the data once for the whole run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, files
from ..contract import check_class_names
from ..errors import ValidationFailed
from ..plots import RUN_FILES, write_run_plots
from ..report import Report
from ..run import Run, ShippedModel
from ..rundir import COMPLETE, onnx_metadata, read_report, shipped_stage
from .export import export_onnx
from .shrink import shrink_model
from .validate import validate_onnx


def export_stage(run: Run, *, force: bool = False) -> Path:
    """Write the shipped model to model.onnx (int8 beside its float32 model.fp32.onnx, if so
    configured), dead channels cut out with export.shrink; returns its path."""
    cfg, folder = run.cfg, run.dir
    if not force and folder.state("export", cfg) == COMPLETE:
        run.log(f"export: already complete ({folder.onnx})")
        return folder.onnx
    shipped = run.shipped()
    info = shipped.checkpoint.data_info
    # Before anything is written: predict prints them, one line per image (for imagefolder
    # they are the class folders' names, which whoever made the dataset chose).
    check_class_names(info["class_names"], f"cannot export {cfg.name}", shipped.spec.num_classes)
    metadata = _metadata(run, shipped)
    model = shipped.model
    if cfg.export.shrink:  # the metadata above describes the model as trained; "shrink" what was cut from it
        model, shrunk = shrink_model(model, (info["in_channels"], info["image_size"], info["image_size"]))
        metadata["shrink"] = json.dumps(shrunk)
        _log_shrink(run, shrunk)
    int8 = cfg.export.quantize == "int8"
    result = export_onnx(
        model,
        folder.onnx,
        in_channels=info["in_channels"],
        image_size=info["image_size"],
        mean=info["mean"],
        std=info["std"],
        metadata=metadata,
        opset=cfg.export.opset,
        encoding=cfg.export.encoding,
        quantize=cfg.export.quantize,
        calibration=calibration_batches(run) if int8 else None,
        fp32_path=folder.fp32_onnx if int8 else None,
        int8_range=cfg.export.int8_range,
    )
    if not int8:
        folder.fp32_onnx.unlink(missing_ok=True)  # from an earlier int8 export: not this model's
    run.log(
        f"export: {folder.onnx} ({result['onnx_bytes']:,} bytes, {cfg.export.encoding}"
        f"{f', int8 {cfg.export.int8_range}' if int8 else ''}; dense {result['dense_onnx_bytes']:,}; "
        f"{shipped.sparsity_summary()['sparsity']:.1%} sparse)"
    )
    return folder.onnx


def _metadata(run: Run, shipped: ShippedModel) -> dict[str, str]:
    """What model.onnx says of itself: where it comes from, its sparsity, its classes and inputs."""
    cfg, info, summary = run.cfg, shipped.checkpoint.data_info, shipped.sparsity_summary()
    return {
        "dsrpipe_version": __version__,
        "fingerprint": run.dir.fingerprint("export", cfg),
        "name": cfg.name,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "method": cfg.sparsity.method,
        "sparsity": f"{summary['sparsity']:.6f}",
        "target_sparsity": str(cfg.sparsity.sparsity),
        "nonzero_params": str(summary["nonzero_params"]),
        "total_params": str(summary["total_params"]),
        "layer_density": json.dumps(summary["layer_density"]),
        "class_names": json.dumps(info["class_names"]),
        "input": f"float32 NCHW pixels in [0, 1], {info['in_channels']}x{info['image_size']}x{info['image_size']}",
    }


def _log_shrink(run: Run, shrunk: dict[str, Any]) -> None:
    if shrunk["removed_channels"]:  # most element-sparse models have no dead filter: say nothing then
        run.log(
            f"export: shrink removed {sum(shrunk['removed_channels'].values())} channels "
            f"({len(shrunk['removed_channels'])} layers): params {shrunk['params_before']:,} → "
            f"{shrunk['params_after']:,}, MACs {shrunk['macs_before']:,} → {shrunk['macs_after']:,}"
        )


def calibration_batches(run: Run) -> Iterator[np.ndarray]:
    """A fixed random sample of `export.calibration_images` training images, raw [0, 1] pixels
    as the graph takes them."""
    cfg = run.cfg
    remaining = cfg.export.calibration_images
    for pixels, _ in run.splits[0].batches(
        min(remaining, 128), shuffle=True, augment=False, seed=cfg.seed, epoch=0, normalize=False
    ):
        if remaining <= 0:
            return
        yield pixels[:remaining].cpu().numpy()
        remaining -= len(pixels)


def validate_stage(run: Run, *, force: bool = False) -> Report:
    """Measure the exported model with onnxruntime and write report.json; a missed threshold
    raises ValidationFailed after the report is written."""
    cfg, folder = run.cfg, run.dir
    if not force and folder.state("validate", cfg) == COMPLETE:
        report = read_report(folder.report)
        run.log(f"validate: already complete ({folder.report})")
        if not all((folder.path / f).exists() for f in RUN_FILES):  # cut short, or made before plots
            write_plots(run, report)
        raise_if_failed(report)
        return report
    folder.require("export", cfg)  # the model.onnx of this very trained model and settings
    fingerprint = folder.fingerprint("validate", cfg)
    shipped = run.shipped()
    metrics, failure = _measure(run, shipped)
    report = _report(run, shipped, metrics, failure, fingerprint)
    files.write_json(folder.report, report.to_dict())
    write_plots(run, report, shipped_history=shipped.checkpoint.history)
    run.log(_report_line(report, cfg.export.quantize == "int8", folder.report))
    raise_if_failed(report)
    return report


def _measure(run: Run, shipped: ShippedModel) -> tuple[dict[str, Any], str | None]:
    """validate_onnx's figures, and the threshold the model missed (None if it met them all)."""
    cfg, folder, v = run.cfg, run.dir, run.cfg.validation
    with folder.scratch_dir() as tmp:
        dense = dense_reference(run, shipped, tmp / "dense.onnx", onnx_metadata(folder.onnx))
        try:
            metrics = validate_onnx(
                folder.onnx,
                shipped.model,
                run.splits[1],
                dense_path=dense,
                fp32_path=folder.fp32_onnx if cfg.export.quantize == "int8" else None,
                batch_size=v.batch_size,
                latency_runs=v.latency_runs,
                throughput_runs=v.throughput_runs,
                min_top1=v.min_top1,
                max_abs_diff=v.max_abs_diff,
                min_agreement=v.min_agreement,
                max_top1_drop=v.max_top1_drop,
            )
            return metrics, None
        except ValidationFailed as exc:
            return exc.report, str(exc)


def _report(
    run: Run, shipped: ShippedModel, metrics: dict[str, Any], failure: str | None, fingerprint: str
) -> Report:
    """report.json: what was trained, how the exported model measured, and whether it passed."""
    cfg, v, spec = run.cfg, run.cfg.validation, shipped.spec
    history = shipped.checkpoint.history
    shrunk = onnx_metadata(run.dir.onnx).get("shrink")
    return Report(
        name=cfg.name,
        dataset=cfg.data.dataset,
        model=cfg.model.name,
        method=cfg.sparsity.method,
        target_sparsity=cfg.sparsity.sparsity,
        **shipped.sparsity_summary(),
        **metrics,
        model_options=spec.options,  # as trained (thin-dense narrows them)
        thin_dense=spec.thin_dense or None,
        shrink=json.loads(shrunk) if shrunk else None,
        train_epochs=cfg.train.epochs,
        finetune_epochs=cfg.finetune.epochs,
        final_test_top1_torch_training=history[-1]["test_top1"] if history else None,
        training=training_cost(*([run.dir.history("train")] if cfg.finetune.epochs else []), history),
        thresholds={
            "min_top1": v.min_top1,
            "max_abs_diff": v.max_abs_diff,
            "min_agreement": v.min_agreement,
            **({"max_top1_drop": v.max_top1_drop} if cfg.export.quantize == "int8" else {}),
        },
        passed=failure is None,
        failure=failure,
        dsrpipe_version=__version__,
        fingerprint=fingerprint,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _report_line(report: Report, int8: bool, path: Path) -> str:
    """The report's key figures, for the log."""
    quantized = f" (int8; float32 {report.fp32_onnx_top1:.4f})" if int8 else ""
    return (
        f"validate: onnx top-1 {report.onnx_top1:.4f}{quantized}, torch top-1 "
        f"{report.torch_top1:.4f}, agreement {report.top1_agreement:.4f}, max |Δlogit| "
        f"{report.max_abs_logit_diff:.2e}, p50 {report.latency_ms['p50']:.3f} ms, "
        f"{report.size_ratio:.3f}x the dense bytes, {report.speedup['latency_p50']:.2f}x "
        f"its speed → {path}"
    )


def training_cost(*histories: list[dict[str, Any]]) -> dict[str, Any]:
    """What training cost, over the epochs of every stage: wall time of the training steps,
    forward MACs × images (MACs of the model as it was at each step), peak memory, and the
    shrinks with the MACs per sample before and after each; and the warnings training logged
    (a channel removal short of its share)."""
    epochs = [h for history in histories for h in history]
    cuda = [h["peak_cuda_bytes"] for h in epochs if h.get("peak_cuda_bytes") is not None]
    return {
        "train_seconds": sum(h.get("seconds", 0.0) for h in epochs),
        "mac_images": sum(h.get("mac_images", 0) for h in epochs),
        "peak_rss_bytes": max((h.get("peak_rss_bytes") or 0 for h in epochs), default=0) or None,
        "peak_cuda_bytes": max(cuda) if cuda else None,
        "shrinks": [event for h in epochs for event in h.get("shrinks", [])],
        "warnings": [line for h in epochs for line in h.get("warnings", [])],
    }


def dense_reference(run: Run, shipped: ShippedModel, path: Path, metadata: dict[str, str]) -> Path:
    """What validation measures the shipped model's size and speed against, exported with dense
    float32 weights: the trained model, unshrunk. A thin-dense model stands in for the configured
    width, and a model that shrank while it trained started at it, so their reference is that width
    (untrained: float32 bytes and kernel times depend on the shapes only)."""
    spec, model = shipped.spec, shipped.model
    if spec.thin_dense is not None or spec.live_channels:
        model = shipped.configured_width()
    info = shipped.checkpoint.data_info
    export_onnx(
        model,
        path,
        in_channels=info["in_channels"],
        image_size=info["image_size"],
        mean=info["mean"],
        std=info["std"],
        metadata=metadata,
        opset=run.cfg.export.opset,
        encoding="dense",
    )
    return path


def write_plots(run: Run, report: Report, shipped_history: list[dict] | None = None) -> list[Path]:
    """curves.png, density_over_time.png, layer_density.png and report.md beside report.json.
    `shipped_history`: the history in the shipped checkpoint, else read from metrics.jsonl."""
    tuned = bool(run.cfg.finetune.epochs)
    shipped = shipped_history if shipped_history is not None else run.dir.history(shipped_stage(run.cfg))
    return write_run_plots(
        run.dir.path, run.dir.history("train") if tuned else shipped, shipped if tuned else [], report
    )


def raise_if_failed(report: Report) -> None:
    if not report.passed:
        error = ValidationFailed(report.failure)
        error.report = report
        raise error
