"""`dsrpipe run`: train-sparse → finetune → export → validate, skipping what is already complete.

Output contract, relied upon by users and tools (the whole layout: dsrpipe.rundir):
  <out>/<name>/model.onnx    the deployable model (float32 NCHW pixels in [0, 1] → logits)
  <out>/<name>/report.json   what was trained and how the exported model measured
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed, files
from .config import Pipeline
from .errors import UserError, ValidationFailed
from .export import export_onnx
from .plots import RUN_FILES, read_history, write_run_plots
from .rundir import COMPLETE, RunDir, load_checkpoint, onnx_metadata, read_report, restoring, shipped_stage
from .shrink import shrink_model
from .train import build_model, finetune, log, train_sparse
from .validate import validate_onnx


def _load_trained(run: RunDir, cfg: Pipeline) -> tuple[dict[str, Any], torch.nn.Module]:
    """The model to ship: the fine-tuned one if the pipeline fine-tunes, else the trained one."""
    stage = shipped_stage(cfg)
    run.require(stage, cfg)
    checkpoint = load_checkpoint(run.final(stage))
    with restoring(run.final(stage)):
        model = build_model(checkpoint["model_spec"])
        model.load_state_dict(checkpoint["model"])
    return checkpoint, model.eval()


def sparsity_summary(model: torch.nn.Module, cfg: Pipeline) -> dict[str, Any]:
    """Sparsity as deployed, read off the weights: zeros over the sparse-eligible tensors, and
    the whole-model parameter counts (dense layers included), as the paper reports them."""
    sparse = cfg.sparsity.layers.select(model)
    sparse_total = sum(w.numel() for w in sparse.values())
    sparse_nonzero = sum(int(w.count_nonzero()) for w in sparse.values())
    return {
        "sparsity": 1 - sparse_nonzero / sparse_total if sparse_total else 0.0,
        "layer_density": {n: int(w.count_nonzero()) / w.numel() for n, w in sparse.items()},
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def export_stage(cfg: Pipeline, out: Path, *, force: bool = False) -> Path:
    run = RunDir(out, cfg.name)
    if not force and run.state("export", cfg) == COMPLETE:
        log(cfg, f"export: already complete ({run.onnx})")
        return run.onnx
    checkpoint, model = _load_trained(run, cfg)
    fingerprint = run.fingerprint("export", cfg)
    info = checkpoint["data_info"]
    summary = sparsity_summary(model, cfg)
    metadata = {
        "dsrpipe_version": __version__, "fingerprint": fingerprint, "name": cfg.name,
        "dataset": cfg.data.dataset, "model": cfg.model.name, "method": cfg.sparsity.method,
        "sparsity": f"{summary['sparsity']:.6f}", "target_sparsity": str(cfg.sparsity.sparsity),
        "nonzero_params": str(summary["nonzero_params"]), "total_params": str(summary["total_params"]),
        "layer_density": json.dumps(summary["layer_density"]),
        "class_names": json.dumps(info["class_names"]),
        "input": f"float32 NCHW pixels in [0, 1], {info['in_channels']}x{info['image_size']}x{info['image_size']}",
    }
    if cfg.export.shrink:  # the metadata above describes the model as trained; "shrink" what was cut from it
        model, shrunk = shrink_model(model, (info["in_channels"], info["image_size"], info["image_size"]))
        metadata["shrink"] = json.dumps(shrunk)
        log(cfg, f"export: shrink removed {sum(shrunk['removed_channels'].values())} channels "
                 f"({len(shrunk['removed_channels'])} layers): params {shrunk['params_before']:,} → "
                 f"{shrunk['params_after']:,}, MACs {shrunk['macs_before']:,} → {shrunk['macs_after']:,}")
    result = export_onnx(model, run.onnx, in_channels=info["in_channels"], image_size=info["image_size"],
                         mean=info["mean"], std=info["std"], metadata=metadata, opset=cfg.export.opset,
                         sparse_initializers=cfg.export.sparse_initializers)
    log(cfg, f"export: {run.onnx} ({result['onnx_bytes']:,} bytes, "
                  f"{summary['sparsity']:.1%} sparse)")
    return run.onnx


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
    _, test_set = cfg.data.load()
    try:
        metrics = validate_onnx(run.onnx, model, test_set, batch_size=cfg.validation.batch_size,
                                latency_runs=cfg.validation.latency_runs, min_top1=cfg.validation.min_top1,
                                max_abs_diff=cfg.validation.max_abs_diff)
        failure = None
    except ValidationFailed as exc:
        metrics, failure = exc.report, str(exc)
    history = checkpoint["history"]
    report = {
        "name": cfg.name, "dataset": cfg.data.dataset, "model": cfg.model.name,
        "method": cfg.sparsity.method, "target_sparsity": cfg.sparsity.sparsity,
        **sparsity_summary(model, cfg), **metrics,
        "model_options": checkpoint["model_spec"]["options"],  # as trained (thin-dense narrows them)
        **({"thin_dense": spec} if (spec := checkpoint["model_spec"].get("thin_dense")) else {}),
        **({"shrink": json.loads(shrunk)} if (shrunk := onnx_metadata(run.onnx).get("shrink")) else {}),
        "train_epochs": cfg.train.epochs, "finetune_epochs": cfg.finetune.epochs,
        "final_test_top1_torch_training": history[-1]["test_top1"] if history else None,
        "thresholds": {"min_top1": cfg.validation.min_top1, "max_abs_diff": cfg.validation.max_abs_diff},
        "passed": failure is None, "failure": failure,
        "dsrpipe_version": __version__, "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    files.write_json(run.report, report)
    _write_run_plots(cfg, run, report, shipped_history=history)
    log(cfg, f"validate: onnx top-1 {report['onnx_top1']:.4f}, torch top-1 "
                  f"{report['torch_top1']:.4f}, agreement {report['top1_agreement']:.4f}, max |Δlogit| "
                  f"{report['max_abs_logit_diff']:.2e}, p50 {report['latency_ms']['p50']:.3f} ms → {run.report}")
    _raise_if_failed(report)
    return report


def _write_run_plots(cfg: Pipeline, run: RunDir, report: dict[str, Any],
                     shipped_history: list[dict] | None = None) -> list[Path]:
    """curves.png, density_over_time.png, layer_density.png and report.md beside report.json.
    `shipped_history`: the history in the shipped checkpoint, else read from metrics.jsonl."""
    tuned = bool(cfg.finetune.epochs)
    shipped = shipped_history if shipped_history is not None else read_history(run.metrics(shipped_stage(cfg)))
    return write_run_plots(run.path, read_history(run.metrics("train")) if tuned else shipped,
                           shipped if tuned else [], report)


def _raise_if_failed(report: dict[str, Any]) -> None:
    if not report.get("passed", True):
        error = ValidationFailed(report["failure"])
        error.report = report
        raise error


def run_pipeline(cfg: Pipeline, out: Path = Path("export"), *, force: bool = False,
                 progress: bool = True) -> dict[str, Any] | None:
    """All stages in order; an interrupted stage resumes from its last checkpoint. Under torchrun
    every rank trains; rank 0 alone exports and validates (the others return None)."""
    train_sparse(cfg, out, resume=True, force=force, progress=progress)
    if cfg.finetune.epochs:
        finetune(cfg, out, resume=True, force=force, progress=progress)
    if not distributed.is_main():
        return None
    export_stage(cfg, out, force=force)
    return validate_stage(cfg, out, force=force)
