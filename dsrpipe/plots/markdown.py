"""report.md: a run's key numbers from report.json, as one table, and its three pictures."""

from __future__ import annotations

from ..report import Report

# The run's three pictures (run_figures.py), each under its heading.
PICTURES = [
    "## Training curves",
    "",
    "![Loss and top-1 per epoch](curves.png)",
    "",
    "## Density over time",
    "",
    "![Density of each sparse layer per epoch, threshold H, weights pruned, and the share of pruned weights "
    "grown at the reallocation before](density_over_time.png)",
    "",
    "## Final density per layer",
    "",
    "![Final density per sparse layer](layer_density.png)",
    "",
]


def run_markdown(report: Report, train_epochs: int, finetune_epochs: int) -> str:
    """The page: title, whether validation passed, training's warnings, the table, the pictures."""
    warnings = (report.training or {}).get("warnings") or []
    lines = [
        f"# {report.name}: {report.method} on {report.dataset} ({report.model})",
        "",
        _status(report),
        "",
        *[f"**Warning:** {line}\n" for line in warnings],
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in _rows(report, train_epochs, finetune_epochs)],
        "",
        *PICTURES,
        f"Numbers from `report.json`, written by dsrpipe {report.dsrpipe_version or ''} "
        f"at {report.created or ''}.",
        "",
    ]
    return "\n".join(lines)


def _status(report: Report) -> str:
    if report.passed:
        return "**Validation passed.**"
    return f"**Validation FAILED:** {report.failure}"


def _rows(report: Report, train_epochs: int, finetune_epochs: int) -> list[tuple[str, str]]:
    """The table: the model as shipped, how it compares, how it was trained; a row whose numbers
    the report lacks (a dense baseline, int8, older reports) is left out, not shown empty."""
    return [
        *_model_rows(report),
        *_comparison_rows(report),
        ("epochs (train + fine-tune)", f"{train_epochs} + {finetune_epochs}"),
        *_training_rows(report.training or {}),
    ]


def _model_rows(report: Report) -> list[tuple[str, str]]:
    """Sparsity, parameters, accuracy, latency and size of the shipped model."""
    latency = report.latency_ms or {}
    size = report.onnx_bytes
    max_diff = report.max_abs_logit_diff
    return [
        ("method", f"`{report.method}`"),
        (
            "sparsity (measured / target)",
            f"{_pct(report.sparsity)} / {_pct(report.target_sparsity, 1)}",
        ),
        (
            "parameters (non-zero / total)",
            f"{report.nonzero_params:,} / {report.total_params:,}",
        ),
        ("top-1, torch", _pct(report.torch_top1)),
        ("top-1, ONNX", _pct(report.onnx_top1)),
        ("top-1 agreement, ONNX vs torch", _pct(report.top1_agreement)),
        ("max \\|Δlogit\\|", "n/a" if max_diff is None else f"{max_diff:.2e}"),
        (
            "latency p50 / p95 (batch 1, onnxruntime CPU)",
            f"{latency['p50']:.3f} / {latency['p95']:.3f} ms" if latency else "n/a",
        ),
        ("ONNX file size", "n/a" if size is None else f"{size:,} bytes ({size / 1024:.1f} KiB)"),
    ]


def _comparison_rows(report: Report) -> list[tuple[str, str]]:
    """Against the dense model, against the float32 model (int8), and the CPU it was timed on."""
    rows = []
    if report.speedup is not None:
        speedup = report.speedup
        rows.append(
            (
                "vs the dense model (bytes; p50 speed; batch-64 throughput)",
                f"{report.size_ratio:.3f}×; {speedup['latency_p50']:.2f}×; {speedup['throughput']:.2f}×",
            )
        )
    if report.int8_agreement is not None:
        rows.append(
            (
                f"int8 ({report.int8_range or 'full'} range): top-1 float32 ONNX / agreement with it",
                f"{_pct(report.fp32_onnx_top1)} / {_pct(report.int8_agreement)}",
            )
        )
    if report.cpu is not None:
        rows.append(("CPU (onnxruntime)", _cpu_line(report)))
    return rows


def _training_rows(training: dict) -> list[tuple[str, str]]:
    """What training cost, and how the model shrank while it trained."""
    rows = []
    if training:
        rows.append(("training cost", _training_line(training)))
    if training.get("shrinks"):
        rows.append(("shrunk while training (MACs per sample)", _shrinks_line(training["shrinks"])))
    return rows


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def _cpu_line(report: Report) -> str:
    """One line, e.g. AMD EPYC, x86_64; avx2 avx512_vnni, no amx_int8; onnxruntime 1.32.0 (CPU...)."""
    cpu, runtime = report.cpu, report.onnxruntime or {}
    flags = cpu.get("flags")
    if flags is None:
        features = "flags unknown"
    else:
        have = [f for f, present in flags.items() if present]
        lack = [f for f, present in flags.items() if not present]
        features = " ".join(have) or "none of " + " ".join(flags)
        features += f", no {' '.join(lack)}" if have and lack else ""
    providers = ", ".join(runtime.get("providers") or [])
    return (
        f"{cpu.get('model_name') or 'unknown'}, {cpu.get('machine') or '?'}; {features}; "
        f"onnxruntime {runtime.get('version', '?')} ({providers})"
    )


def _training_line(training: dict) -> str:
    """Wall time, MAC-weighted cost and peak memory of training, in one cell."""
    parts = [f"{training['train_seconds']:.1f} s of training steps"]
    if training.get("mac_images"):
        parts.append(f"{training['mac_images']:.3g} forward MACs × images")
    if training.get("peak_rss_bytes"):
        parts.append(f"peak RSS {training['peak_rss_bytes'] / 2**20:,.0f} MiB")
    if training.get("peak_cuda_bytes"):
        parts.append(f"peak CUDA {training['peak_cuda_bytes'] / 2**20:,.0f} MiB")
    return "; ".join(parts)


def _shrinks_line(shrinks: list[dict]) -> str:
    first, last = shrinks[0], shrinks[-1]
    return (
        f"{len(shrinks)} time(s), iterations {first['iteration']}–{last['iteration']}: "
        f"{first['macs_before']:,} → {last['macs_after']:,} ({last['macs_after'] / first['macs_before']:.2f}×)"
    )
