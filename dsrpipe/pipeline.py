"""`dsrpipe run`: train-sparse → finetune → export → validate, skipping what is already complete.

Output contract, relied upon by users and tools (the whole layout: dsrpipe.rundir):
  <out>/<name>/model.onnx    the deployable model (float32 NCHW pixels in [0, 1] → logits)
  <out>/<name>/model.fp32.onnx  beside an int8 model.onnx: the float32 model it quantizes
  <out>/<name>/report.json   what was trained and how the exported model measured
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed, files
from .checkpoint import load_checkpoint, restoring
from .config import Pipeline
from .contract import check_class_names
from .deploy.export import export_onnx
from .deploy.shrink import shrink_model
from .deploy.validate import validate_onnx
from .errors import ValidationFailed
from .plots import RUN_FILES, write_run_plots
from .registry import layer_selection
from .rundir import COMPLETE, RunDir, onnx_metadata, read_report, shipped_stage
from .train import build_model, finetune, load_splits, log, train_sparse


def _load_trained(run: RunDir, cfg: Pipeline) -> tuple[dict[str, Any], torch.nn.Module]:
    """The model to ship: the fine-tuned one if the pipeline fine-tunes, else the trained one."""
    stage = shipped_stage(cfg)
    run.require(stage, cfg)
    checkpoint = load_checkpoint(run.final(stage))
    with restoring(run.final(stage)):
        model = build_model(checkpoint["model_spec"])
        model.load_state_dict(checkpoint["model"])
    return checkpoint, model.eval()


def configured_width(spec: dict[str, Any], cfg: Pipeline) -> torch.nn.Module:
    """An untrained model of the configured width, for what a thin-dense model stands in for or a
    shrunk one started as."""
    full = {key: value for key, value in spec.items() if key != "live_channels"}
    return build_model({**full, "options": cfg.model.options}).eval()


def sparsity_summary(model: torch.nn.Module, cfg: Pipeline, spec: dict[str, Any]) -> dict[str, Any]:
    """Sparsity as deployed, read off the weights: zeros over the sparse-eligible tensors, and
    the whole-model parameter counts (dense layers included), as the paper reports them. A model
    that shrank while it trained counts its sparse tensors at the width it started at, as the
    target does."""
    layers = layer_selection(cfg.sparsity)
    sparse = layers.select(model)
    started = layers.select(configured_width(spec, cfg)) if spec.get("live_channels") else sparse
    sparse_total = sum(w.numel() for w in started.values())
    sparse_nonzero = sum(int(w.count_nonzero()) for w in sparse.values())
    return {
        "sparsity": 1 - sparse_nonzero / sparse_total if sparse_total else 0.0,
        "layer_density": {n: int(w.count_nonzero()) / started[n].numel() for n, w in sparse.items()},
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


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


def export_stage(cfg: Pipeline, out: Path, *, force: bool = False) -> Path:
    run = RunDir(out, cfg.name)
    if not force and run.state("export", cfg) == COMPLETE:
        log(cfg, f"export: already complete ({run.onnx})")
        return run.onnx
    checkpoint, model = _load_trained(run, cfg)
    fingerprint = run.fingerprint("export", cfg)
    info = checkpoint["data_info"]
    # Before anything is written: predict prints them, one line per image (for imagefolder
    # they are the class folders' names, which whoever made the dataset chose).
    check_class_names(
        info["class_names"], f"cannot export {cfg.name}", checkpoint["model_spec"].get("num_classes")
    )
    summary = sparsity_summary(model, cfg, checkpoint["model_spec"])
    metadata = {
        "dsrpipe_version": __version__,
        "fingerprint": fingerprint,
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
    if cfg.export.shrink:  # the metadata above describes the model as trained; "shrink" what was cut from it
        model, shrunk = shrink_model(model, (info["in_channels"], info["image_size"], info["image_size"]))
        metadata["shrink"] = json.dumps(shrunk)
        if shrunk["removed_channels"]:  # most element-sparse models have no dead filter: say nothing then
            log(
                cfg,
                f"export: shrink removed {sum(shrunk['removed_channels'].values())} channels "
                f"({len(shrunk['removed_channels'])} layers): params {shrunk['params_before']:,} → "
                f"{shrunk['params_after']:,}, MACs {shrunk['macs_before']:,} → {shrunk['macs_after']:,}",
            )
    int8 = cfg.export.quantize == "int8"
    result = export_onnx(
        model,
        run.onnx,
        in_channels=info["in_channels"],
        image_size=info["image_size"],
        mean=info["mean"],
        std=info["std"],
        metadata=metadata,
        opset=cfg.export.opset,
        encoding=cfg.export.encoding,
        quantize=cfg.export.quantize,
        calibration=_calibration_batches(cfg) if int8 else None,
        fp32_path=run.fp32_onnx if int8 else None,
        int8_range=cfg.export.int8_range,
    )
    if not int8:
        run.fp32_onnx.unlink(missing_ok=True)  # from an earlier int8 export: not this model's
    log(
        cfg,
        f"export: {run.onnx} ({result['onnx_bytes']:,} bytes, {cfg.export.encoding}"
        f"{f', int8 {cfg.export.int8_range}' if int8 else ''}; dense {result['dense_onnx_bytes']:,}; {summary['sparsity']:.1%} sparse)",
    )
    return run.onnx


def _calibration_batches(cfg: Pipeline):
    """A fixed random sample of `export.calibration_images` training images, raw [0, 1] pixels
    as the graph takes them."""
    train_set, _ = load_splits(cfg.data)
    remaining = cfg.export.calibration_images
    for pixels, _ in train_set.batches(
        min(remaining, 128), shuffle=True, augment=False, seed=cfg.seed, epoch=0, normalize=False
    ):
        if remaining <= 0:
            return
        yield pixels[:remaining].cpu().numpy()
        remaining -= len(pixels)


def validate_stage(cfg: Pipeline, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Measure the exported model with onnxruntime and write report.json; a missed threshold
    raises ValidationFailed after the report is written."""
    run = RunDir(out, cfg.name)
    if not force and run.state("validate", cfg) == COMPLETE:
        report = read_report(run.report)
        log(cfg, f"validate: already complete ({run.report})")
        if not all((run.path / f).exists() for f in RUN_FILES):  # cut short, or made before plots
            _write_run_plots(cfg, run, report)
        _raise_if_failed(report)
        return report
    run.require("export", cfg)  # the model.onnx of this very trained model and settings
    fingerprint = run.fingerprint("validate", cfg)
    checkpoint, model = _load_trained(run, cfg)
    _, test_set = load_splits(cfg.data)
    v = cfg.validation
    with run.scratch_dir() as tmp:
        dense = dense_reference(checkpoint, model, cfg, tmp / "dense.onnx", onnx_metadata(run.onnx))
        try:
            metrics = validate_onnx(
                run.onnx,
                model,
                test_set,
                dense_path=dense,
                fp32_path=run.fp32_onnx if cfg.export.quantize == "int8" else None,
                batch_size=v.batch_size,
                latency_runs=v.latency_runs,
                throughput_runs=v.throughput_runs,
                min_top1=v.min_top1,
                max_abs_diff=v.max_abs_diff,
                min_agreement=v.min_agreement,
                max_top1_drop=v.max_top1_drop,
            )
            failure = None
        except ValidationFailed as exc:
            metrics, failure = exc.report, str(exc)
    history = checkpoint["history"]
    report = {
        "name": cfg.name,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "method": cfg.sparsity.method,
        "target_sparsity": cfg.sparsity.sparsity,
        **sparsity_summary(model, cfg, checkpoint["model_spec"]),
        **metrics,
        "model_options": checkpoint["model_spec"]["options"],  # as trained (thin-dense narrows them)
        **({"thin_dense": spec} if (spec := checkpoint["model_spec"].get("thin_dense")) else {}),
        **({"shrink": json.loads(shrunk)} if (shrunk := onnx_metadata(run.onnx).get("shrink")) else {}),
        "train_epochs": cfg.train.epochs,
        "finetune_epochs": cfg.finetune.epochs,
        "final_test_top1_torch_training": history[-1]["test_top1"] if history else None,
        "training": training_cost(*([run.history("train")] if cfg.finetune.epochs else []), history),
        "thresholds": {
            "min_top1": v.min_top1,
            "max_abs_diff": v.max_abs_diff,
            "min_agreement": v.min_agreement,
            **({"max_top1_drop": v.max_top1_drop} if cfg.export.quantize == "int8" else {}),
        },
        "passed": failure is None,
        "failure": failure,
        "dsrpipe_version": __version__,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    files.write_json(run.report, report)
    _write_run_plots(cfg, run, report, shipped_history=history)
    int8 = f" (int8; float32 {report['fp32_onnx_top1']:.4f})" if cfg.export.quantize == "int8" else ""
    log(
        cfg,
        f"validate: onnx top-1 {report['onnx_top1']:.4f}{int8}, torch top-1 "
        f"{report['torch_top1']:.4f}, agreement {report['top1_agreement']:.4f}, max |Δlogit| "
        f"{report['max_abs_logit_diff']:.2e}, p50 {report['latency_ms']['p50']:.3f} ms, "
        f"{report['size_ratio']:.3f}x the dense bytes, {report['speedup']['latency_p50']:.2f}x "
        f"its speed → {run.report}",
    )
    _raise_if_failed(report)
    return report


def dense_reference(
    checkpoint: dict[str, Any], model: torch.nn.Module, cfg: Pipeline, path: Path, metadata: dict[str, str]
) -> Path:
    """What validation measures the shipped model's size and speed against, exported with dense
    float32 weights: the trained `model`, unshrunk. A thin-dense model stands in for the configured
    width, and a model that shrank while it trained started at it, so their reference is that width
    (untrained: float32 bytes and kernel times depend on the shapes only)."""
    spec = checkpoint["model_spec"]
    if "thin_dense" in spec or spec.get("live_channels"):
        model = configured_width(spec, cfg)
    info = checkpoint["data_info"]
    export_onnx(
        model,
        path,
        in_channels=info["in_channels"],
        image_size=info["image_size"],
        mean=info["mean"],
        std=info["std"],
        metadata=metadata,
        opset=cfg.export.opset,
        encoding="dense",
    )
    return path


def _write_run_plots(
    cfg: Pipeline, run: RunDir, report: dict[str, Any], shipped_history: list[dict] | None = None
) -> list[Path]:
    """curves.png, density_over_time.png, layer_density.png and report.md beside report.json.
    `shipped_history`: the history in the shipped checkpoint, else read from metrics.jsonl."""
    tuned = bool(cfg.finetune.epochs)
    shipped = shipped_history if shipped_history is not None else run.history(shipped_stage(cfg))
    return write_run_plots(
        run.path, run.history("train") if tuned else shipped, shipped if tuned else [], report
    )


def _raise_if_failed(report: dict[str, Any]) -> None:
    if not report.get("passed", True):
        error = ValidationFailed(report["failure"])
        error.report = report
        raise error


def run_pipeline(
    cfg: Pipeline, out: Path = Path("export"), *, force: bool = False, progress: bool = True
) -> dict[str, Any] | None:
    """All stages in order; an interrupted stage resumes from its last checkpoint. Under torchrun
    every rank trains; rank 0 alone exports and validates (the others return None)."""
    train_sparse(cfg, out, resume=True, force=force, progress=progress)
    if cfg.finetune.epochs:
        finetune(cfg, out, resume=True, force=force, progress=progress)
    if not distributed.is_main():
        return None
    export_stage(cfg, out, force=force)
    return validate_stage(cfg, out, force=force)
