"""A run's report, typed: what was trained and how the exported model measured, as validate
writes it to `<out>/<name>/report.json` and everything after reads it (compare's results, the
pictures and report.md, the stage states).

On disk it stays the JSON object it always was (`to_dict`, `from_dict`): reports written by
earlier versions, which lack the keys added since, read with those fields at their defaults, and
a key this version does not know is passed over. The nested figures (latency, throughput,
training cost, thresholds, ...) stay the JSON objects they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# The optional fields written as null when unset; every other unset one is left out, as the
# validate stage has always left out what does not apply (int8 figures of a float32 model, the
# dense comparison, a thin-dense narrowing, a shrink).
_WRITTEN_AS_NULL = frozenset({"threads", "final_test_top1_torch_training", "failure"})


@dataclass(frozen=True, kw_only=True)
class Report:
    """report.json, its fields in the order the file holds them."""

    # what was trained
    name: str
    dataset: str
    model: str
    method: str
    target_sparsity: float | None = None
    # the sparsity as deployed (run.ShippedModel.sparsity_summary)
    sparsity: float
    layer_density: dict[str, float] = field(default_factory=dict)
    nonzero_params: int
    total_params: int
    # how the exported model measured (deploy.validate.validate_onnx)
    torch_top1: float
    onnx_top1: float  # the shipped model's
    fp32_onnx_top1: float | None = None
    top1_agreement: float | None = None  # float32 ONNX vs torch
    max_abs_logit_diff: float | None = None  # float32 ONNX vs torch
    nonfinite_samples: dict[str, int] | None = None  # torch's and ONNX's
    int8_agreement: float | None = None  # an int8 model's, against its float32 model
    int8_top1_drop: float | None = None
    encoding: str | None = None
    quantize: str | None = None  # none or int8 (older reports say neither: none)
    int8_range: str | None = None
    onnx_bytes: int | None = None
    num_test: int | None = None
    providers: list[str] = field(default_factory=list)
    cpu: dict[str, Any] | None = None
    onnxruntime: dict[str, Any] | None = None
    threads: int | None = None
    latency_ms: dict[str, float] | None = None  # batch 1: p50, p95, mean
    dense_latency_ms: dict[str, float] | None = None  # the dense export's, timed beside it
    throughput: dict[str, Any] | None = None
    speedup: dict[str, float] | None = None  # against the dense export: latency_p50, throughput
    dense_onnx_bytes: int | None = None
    size_ratio: float | None = None
    # how it was trained
    model_options: dict[str, Any] = field(default_factory=dict)  # as trained (thin-dense narrows them)
    thin_dense: dict[str, int] | None = None
    shrink: dict[str, Any] | None = None  # what export.shrink cut out
    train_epochs: int = 0
    finetune_epochs: int = 0
    final_test_top1_torch_training: float | None = None
    training: dict[str, Any] | None = None  # what training cost (deploy.stages.training_cost)
    # whether it passed validate's thresholds
    thresholds: dict[str, float | None] = field(default_factory=dict)
    passed: bool = True
    failure: str | None = None
    dsrpipe_version: str | None = None
    fingerprint: str | None = None
    created: str | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> Report:
        """A report as report.json holds it; TypeError if it is none (not an object, or one
        without the figures every report has)."""
        if not isinstance(raw, dict):
            raise TypeError("a report is a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        """What report.json holds: the fields in order, the unset optional ones left out."""
        return {
            f.name: value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None or f.name in _WRITTEN_AS_NULL
        }
