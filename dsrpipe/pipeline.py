"""`dsrpipe run`: train-sparse → finetune → export → validate, skipping what is already complete.

Output contract, relied upon by users and tools:
  <out>/<name>/model.onnx    the deployable model (float32 NCHW pixels in [0, 1] → logits)
  <out>/<name>/report.json   what was trained and how the exported model measured
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from . import __version__, files
from .config import EXPORT_SETTINGS, VALIDATE_SETTINGS, Pipeline
from .errors import UserError, ValidationFailed
from .export import export_onnx
from .plots import RUN_FILES, read_history, write_run_plots
from .train import build_model, finetune, log, load_checkpoint, stage_paths, train_sparse
from .validate import validate_onnx


def outputs(out: Path, cfg: Pipeline) -> dict[str, Path]:
    folder = Path(out) / cfg.name
    return {"dir": folder, "onnx": folder / "model.onnx", "report": folder / "report.json"}


def trained_checkpoint(out: Path, cfg: Pipeline) -> Path:
    """The model to ship: the fine-tuned one if the pipeline fine-tunes, else the trained one."""
    path = stage_paths(out, cfg, "finetune" if cfg.finetune.epochs else "train")["final"]
    if not path.exists():
        stage = "finetune" if cfg.finetune.epochs else "train-sparse"
        raise UserError(f"no trained model at {path}: run {stage} first")
    return path


def _load_trained(out: Path, cfg: Pipeline) -> tuple[dict[str, Any], torch.nn.Module]:
    checkpoint = load_checkpoint(trained_checkpoint(out, cfg))
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
    paths = outputs(out, cfg)
    checkpoint, model = _load_trained(out, cfg)
    fingerprint = f"{cfg.fingerprint(*EXPORT_SETTINGS)}-{checkpoint['run_id']}"
    if paths["onnx"].exists() and not force and _onnx_fingerprint(paths["onnx"]) == fingerprint:
        log(cfg, f"export: already complete ({paths['onnx']})")
        return paths["onnx"]
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
    result = export_onnx(model, paths["onnx"], in_channels=info["in_channels"], image_size=info["image_size"],
                         mean=info["mean"], std=info["std"], metadata=metadata, opset=cfg.export.opset,
                         sparse_initializers=cfg.export.sparse_initializers)
    log(cfg, f"export: {paths['onnx']} ({result['onnx_bytes']:,} bytes, "
                  f"{summary['sparsity']:.1%} sparse)")
    return paths["onnx"]


def _onnx_fingerprint(path: Path) -> str | None:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return {p.key: p.value for p in model.metadata_props}.get("fingerprint")


def validate_stage(cfg: Pipeline, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Measure the exported model with onnxruntime and write report.json; a missed threshold
    raises ValidationFailed after the report is written."""
    paths = outputs(out, cfg)
    if not paths["onnx"].exists():
        raise UserError(f"no exported model at {paths['onnx']}: run export first")
    onnx_fingerprint = _onnx_fingerprint(paths["onnx"])
    fingerprint = f"{cfg.fingerprint(*VALIDATE_SETTINGS)}-{onnx_fingerprint}"
    if paths["report"].exists() and not force:
        report = json.loads(paths["report"].read_text())
        if report.get("fingerprint") == fingerprint:
            log(cfg, f"validate: already complete ({paths['report']})")
            if not all((paths["dir"] / f).exists() for f in RUN_FILES):  # cut short, or made before plots
                _write_run_plots(cfg, out, report)
            _raise_if_failed(report)
            return report
    checkpoint, model = _load_trained(out, cfg)
    _, test_set = cfg.data.load()
    try:
        metrics = validate_onnx(paths["onnx"], model, test_set, batch_size=cfg.validation.batch_size,
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
        "train_epochs": cfg.train.epochs, "finetune_epochs": cfg.finetune.epochs,
        "final_test_top1_torch_training": history[-1]["test_top1"] if history else None,
        "thresholds": {"min_top1": cfg.validation.min_top1, "max_abs_diff": cfg.validation.max_abs_diff},
        "passed": failure is None, "failure": failure,
        "dsrpipe_version": __version__, "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    files.write_json(paths["report"], report)
    _write_run_plots(cfg, out, report, shipped_history=history)
    log(cfg, f"validate: onnx top-1 {report['onnx_top1']:.4f}, torch top-1 "
                  f"{report['torch_top1']:.4f}, agreement {report['top1_agreement']:.4f}, max |Δlogit| "
                  f"{report['max_abs_logit_diff']:.2e}, p50 {report['latency_ms']['p50']:.3f} ms → {paths['report']}")
    _raise_if_failed(report)
    return report


def _write_run_plots(cfg: Pipeline, out: Path, report: dict[str, Any],
                     shipped_history: list[dict] | None = None) -> list[Path]:
    """curves.png, density_over_time.png, layer_density.png and report.md beside report.json.
    `shipped_history`: the history in the shipped checkpoint, else read from metrics.jsonl."""
    def stage(name: str) -> list[dict]:
        return read_history(stage_paths(out, cfg, name)["metrics"])

    tuned = bool(cfg.finetune.epochs)
    shipped = shipped_history if shipped_history is not None else stage("finetune" if tuned else "train")
    return write_run_plots(outputs(out, cfg)["dir"], stage("train") if tuned else shipped,
                           shipped if tuned else [], report)


def _raise_if_failed(report: dict[str, Any]) -> None:
    if not report.get("passed", True):
        error = ValidationFailed(report["failure"])
        error.report = report
        raise error


def run_pipeline(cfg: Pipeline, out: Path = Path("export"), *, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """All stages in order; an interrupted stage resumes from its last checkpoint."""
    train_sparse(cfg, out, resume=True, force=force, progress=progress)
    if cfg.finetune.epochs:
        finetune(cfg, out, resume=True, force=force, progress=progress)
    export_stage(cfg, out, force=force)
    return validate_stage(cfg, out, force=force)
