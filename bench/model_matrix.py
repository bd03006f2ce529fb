"""The model matrix: every torchvision classification model and a list of timm models, each taken
through channel removal end to end, or refused at `check` in one line (docs/models.md).

For each model, in a child process of its own under a time and a memory bound: `check` (the
preflight of `dsrpipe check`) at the smallest side of SIDES that the model takes; one training
step (SGD, four random images) under static sparsity 0.5 with half the removable channels
removed and cut out at that step; the export's shrink; the ONNX export (compact encoding, as the
pipeline ships it); and onnxruntime against torch on 32 random images: top-1 agreement and the
largest logit difference, gated as `validate` gates them by default.

    python bench/model_matrix.py                       # all, into bench/results/models/
    python bench/model_matrix.py --only timm/resnet18 resnet18 --jobs 1
    python bench/model_matrix.py --family timm --batch 2/3   # the second third of the timm list

Outcomes: `ok` (every step done, the gates met), `refused` (check's one line), `failed` (an error
after check, or a missed gate: a bug to fix), `timeout` / `memory` (over the bounds: not run to
its end on this machine), `not run` (a batch that did not get to it). Rows are kept per model
across runs (rows.json); the markdown table (README.md here, and docs/models.md between its
markers) is written from all of them. On a busy 2-core machine a model takes 1 to 5 minutes
(the ONNX export is most of it): run it in batches (--batch, --out, then --merge).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "models"
DOCS = ROOT / "docs" / "models.md"
TABLE_START, TABLE_END = "<!-- model matrix: start -->", "<!-- model matrix: end -->"

# The smallest variant of each family people deploy (issue 38), at timm's names.
TIMM_MODELS = (
    "resnet10t", "resnet18", "resnet18d", "resnet26d", "resnext26ts", "seresnext26d_32x4d",
    "regnetx_002", "regnety_002", "efficientnet_b0", "tf_efficientnet_b0", "efficientnetv2_rw_t",
    "tf_efficientnetv2_b0", "mixnet_s", "mobilenetv3_small_050", "mobilenetv3_large_100",
    "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium", "lcnet_050", "ghostnet_050",
    "ghostnetv2_100", "rexnet_100", "convnext_atto", "convnext_atto_ols", "convnextv2_atto",
    "repvit_m0_9", "fastvit_t8", "efficientvit_b0", "efficientvit_m0", "edgenext_xx_small",
    "mobilevit_xxs", "mobilevitv2_050", "levit_128s", "levit_conv_128s", "vit_tiny_patch16_224",
    "vit_small_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224",
    "deit_tiny_distilled_patch16_224", "densenet121", "dla34",
)  # fmt: skip
SIDES = (32, 64, 128, 224)  # each model runs at the first it takes
GATES = {"min_agreement": 0.99, "max_abs_diff": 1e-2}  # validate's defaults (config/sections.py)
IMAGES = 32  # compared in onnxruntime and torch
MEAN, STD = 0.5, 0.25  # the export's normalisation of [0, 1] pixels, every channel
STATIC_HALF = {"method": "static", "sparsity": 0.5, "remove_channels": {"share": 0.5, "end_epoch": 1}}


def all_models(family: str) -> list[str]:
    import torchvision

    names = []
    if family in ("timm", "all"):
        names += [f"timm/{name}" for name in TIMM_MODELS]
    if family in ("torchvision", "all"):
        names += torchvision.models.list_models(module=torchvision.models)
    return names


def pipeline(name: str, side: int) -> dict:
    """A CIFAR-shaped pipeline (3 channels, `side` pixels) that removes half the channels at step 1."""
    return {
        "name": "matrix",
        "data": {"dataset": "cifar10", "root": str(ROOT), "image_size": side},  # never read
        "model": {"name": name},
        "sparsity": STATIC_HALF,
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "milestones": []},
    }


def checked(name: str):
    """(side, config, model) at the smallest side of SIDES the model takes, or check's refusal
    (a UserError) at the largest."""
    import torch

    from dsrpipe.config import parse_pipeline
    from dsrpipe.errors import UserError
    from dsrpipe.preflight import check_model

    for side in SIDES:
        cfg = parse_pipeline(pipeline(name, side))
        torch.manual_seed(0)
        try:
            return side, cfg, check_model(cfg, lambda note: None)
        except UserError as exc:
            if "cannot take" not in str(exc) or side == SIDES[-1]:
                raise
    raise AssertionError("unreachable")


def train_step_and_cut(cfg, model, side: int) -> tuple:
    """One training step with the removal and its cut, as training runs them; the model after."""
    import torch
    import torch.nn.functional as F

    from dsrpipe.registry import build_sparsifier

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sparsifier = build_sparsifier(
        cfg.sparsity, model, optimizer, seed=0, steps_per_epoch=1, epochs=2,
        example_inputs=torch.zeros(1, 3, side, side),
    )  # fmt: skip
    x = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    calibrate_batchnorm(model, side)
    stats = sparsifier.step()
    # Again for what the cut left: the layers after a removed channel see other inputs now.
    calibrate_batchnorm(sparsifier.model, side)
    return sparsifier.model.eval(), stats


def calibrate_batchnorm(model, side: int) -> None:
    """BatchNorm's running statistics as the average over a batch of random images, as a longer
    training would leave them: after one step of momentum they describe nothing, and an untrained
    deep net's eval-mode logits then reach 1e8, where float rounding alone exceeds the gate. The
    variances are held at 1 at least: on random weights, a channel all but constant on the batch
    would have BN divide by up to sqrt(eps), multiplying float rounding 300-fold from layer to
    layer (efficientnet_b4 after its cut: logits of 2673, torch float32 and float64 apart by 1.6;
    held at 1: 0.6 and 4e-7). The matrix checks the export, not the conditioning of a net no
    one trained."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.eval()  # dropout and stochastic depth off: only BatchNorm measures
    for norm in norms:
        norm.train()
    with torch.no_grad():
        pixels = torch.rand(16, 3, side, side, generator=torch.Generator().manual_seed(3))
        model((pixels - MEAN) / STD)  # as onnx_parity normalises them
    for norm in norms:
        norm.momentum = 0.1
        norm.running_var.clamp_(min=1)


def onnx_parity(model, side: int, directory: Path) -> dict:
    """Export `model` (shrunk as the pipeline ships it) and compare onnxruntime with torch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from dsrpipe.deploy.export import export_onnx
    from dsrpipe.deploy.shrink import shrink_model

    shrunk, summary = shrink_model(model, (3, side, side))
    path = directory / "model.onnx"
    export_onnx(shrunk, path, in_channels=3, image_size=side, mean=[MEAN] * 3, std=[STD] * 3, metadata={})
    x = torch.rand(IMAGES, 3, side, side, generator=torch.Generator().manual_seed(2))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"pixels": x.numpy()}
    )[0]
    with torch.no_grad():
        expected = shrunk((x - MEAN) / STD)
    expected = expected.numpy()
    return {
        "params_after": summary["params_after"],
        "macs_after": summary["macs_after"],
        "agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
        "max_dlogit": float(np.abs(got - expected).max()),
        "logit_scale": float(np.abs(expected).max()),
    }


def try_model(name: str, directory: Path) -> dict:
    """The model's row (without `seconds`): check, a step with the cut, the export, the parity."""
    from dsrpipe.errors import UserError
    from dsrpipe.sparse.slicing import model_cost

    try:
        side, cfg, model = checked(name)
    except UserError as exc:
        return {"outcome": "refused", "reason": str(exc)}
    import torch

    params_before, macs_before = model_cost(model, torch.zeros(1, 3, side, side))
    row = {"side": side, "params_before": params_before, "macs_before": macs_before}
    try:
        model, stats = train_step_and_cut(cfg, model, side)
        row["channels_removed"] = (stats or {}).get("channels_removed", 0)
        row.update(onnx_parity(model, side, directory))
    except Exception as exc:  # a bug that the matrix exists to find: recorded, in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        memory = isinstance(exc, MemoryError | torch.OutOfMemoryError) or over_memory(str(exc))
        outcome = "memory" if memory else "failed"
        return {**row, "outcome": outcome, "reason": f"{type(exc).__name__}: {reason}"[:300]}
    missed = [
        f"agreement {row['agreement']:.3f}" if row["agreement"] < GATES["min_agreement"] else "",
        f"max |dlogit| {row['max_dlogit']:.3g}" if not row["max_dlogit"] <= GATES["max_abs_diff"] else "",
        "no channel removed" if not row["channels_removed"] else "",
    ]
    missed = [m for m in missed if m]
    return {**row, "outcome": "failed" if missed else "ok", "reason": "; ".join(missed)}


def over_memory(message: str) -> bool:
    """Whether an error says the memory bound was hit: numpy, torch's allocator and onnxruntime's
    arena each say it their own way."""
    return any(
        said in message
        for said in ("MemoryError", "DefaultCPUAllocator", "Failed to allocate memory", "bad_alloc")
    )


def child(name: str) -> None:
    """The child process: one model's row, as JSON on the last line of stdout."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        row = try_model(name, Path(directory))
    print("\n" + json.dumps({"model": name, **row, "seconds": round(time.monotonic() - start, 1)}))


def run_one(name: str, timeout: float, memory_gib: float) -> dict:
    """`child(name)` in a process of its own, its address space and its time bounded."""

    def bound():
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, preexec_fn=bound, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "outcome": "timeout", "reason": f"over {timeout:g} s", "seconds": timeout}
    seconds = round(time.monotonic() - start, 1)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "seconds": seconds}
    tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    memory = over_memory(done.stderr) or done.returncode == -9
    outcome = "memory" if memory else "failed"
    return {"model": name, "outcome": outcome, "reason": tail[0][:300], "seconds": seconds}


def load_rows(folder: Path = RESULTS) -> dict[str, dict]:
    path = folder / "rows.json"
    return {row["model"]: row for row in json.loads(path.read_text())} if path.exists() else {}


def _millions(value) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, (int, float)) else ""


def markdown(rows: dict[str, dict]) -> str:
    """The table: one line per model, torchvision's first, then timm's; and the counts."""
    lines = [
        "| model | outcome | side | params M before → after | MMACs before → after | agreement | max abs dlogit | s | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows.values(), key=lambda r: (r["model"].startswith("timm/"), r["model"]))
    for r in order:
        cost = [
            f"{_millions(r.get(f'{k}_before'))} → {_millions(r.get(f'{k}_after'))}"
            if r.get(f"{k}_after")
            else ""
            for k in ("params", "macs")
        ]
        agreement = f"{r['agreement']:.3f}" if "agreement" in r else ""
        dlogit = f"{r['max_dlogit']:.1e}" if "max_dlogit" in r else ""
        reason = r.get("reason", "").replace("|", "\\|")
        lines.append(
            f"| {r['model']} | {r['outcome']} | {r.get('side', '')} | {cost[0]} | {cost[1]} | {agreement} "
            f"| {dlogit} | {r['seconds']:g} | {reason} |"
        )
    return "\n".join([*summary(rows), "", *lines]) + "\n"


def summary(rows: dict[str, dict]) -> list[str]:
    said = []
    for family, timm in (("torchvision", False), ("timm", True)):
        mine = [r for r in rows.values() if r["model"].startswith("timm/") == timm]
        counts = {
            o: sum(r["outcome"] == o for r in mine)
            for o in ("ok", "refused", "failed", "timeout", "memory", "not run")
        }
        said.append(
            f"- {family}: {counts['ok']} of {len(mine)} end to end; "
            + ", ".join(f"{n} {o}" for o, n in counts.items() if o != "ok" and n)
        )
    return said


def write(rows: dict[str, dict], folder: Path = RESULTS) -> None:
    """rows.json and README.md in `folder`; docs/models.md's table too where it is RESULTS."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows.values(), key=lambda r: r["model"])
    (folder / "rows.json").write_text(json.dumps(ordered, indent=1) + "\n")
    table = markdown(rows)
    (folder / "README.md").write_text(
        "# The model matrix\n\nWritten by `python bench/model_matrix.py` (see its docstring).\n\n" + table
    )
    if folder == RESULTS and DOCS.exists():
        text = DOCS.read_text()
        head, _, rest = text.partition(TABLE_START)
        _, _, tail = rest.partition(TABLE_END)
        DOCS.write_text(f"{head}{TABLE_START}\n{table}{TABLE_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("torchvision", "timm", "all"), default="all")
    parser.add_argument("--only", nargs="+", help="these models only")
    parser.add_argument("--batch", default="1/1", help="i/n: the i-th of n equal parts of the list")
    parser.add_argument("--jobs", type=int, default=2, help="models at once (one thread each)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model")
    parser.add_argument("--memory-gib", type=float, default=10, help="address space per model")
    parser.add_argument("--resume", action="store_true", help="skip the models rows.json has")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where rows.json goes (a batch of its own)")
    parser.add_argument("--merge", type=Path, nargs="+", help="add these folders' rows to RESULTS, and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.merge:
        return write({k: v for folder in [RESULTS, *args.merge] for k, v in load_rows(folder).items()})
    names = args.only or all_models(args.family)
    part, parts = map(int, args.batch.split("/"))
    names = names[(part - 1) * len(names) // parts : part * len(names) // parts]
    rows = load_rows(args.out)
    if args.resume:
        names = [name for name in names if name not in rows]
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda n: run_one(n, args.timeout, args.memory_gib), names):
            rows[row["model"]] = row
            print(
                f"{row['model']}: {row['outcome']} {row.get('reason', '')} ({row['seconds']:g} s)", flush=True
            )
            write(rows, args.out)


if __name__ == "__main__":
    main()
