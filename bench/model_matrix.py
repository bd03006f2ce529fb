"""The model matrix: every torchvision classification model and a list of timm models, each taken
through channel removal end to end, or refused at `check` in one line (docs/models.md).

For each model, in a process of its own under bounds of CPU time, memory and (for a process that
hangs) time on the wall: `check` (the preflight of `dsrpipe check`) at the smallest side of SIDES
that the model takes; one training step (SGD, two random images) under static sparsity 0.5 with
half the removable channels removed and cut out at that step; the export's shrink; the ONNX
export (compact encoding, as the pipeline ships it); and onnxruntime against torch on 32 random
images: top-1 agreement and the largest logit difference, gated as `validate` gates them by
default (without its timing runs).

    python bench/model_matrix.py                       # all, into bench/results/models/
    python bench/model_matrix.py --only timm/resnet18 resnet18 --jobs 1
    python bench/model_matrix.py --family timm --batch 2/3   # the second third of the timm list
    python bench/model_matrix.py --family torchvision --resume --again timeout   # what is left
    python bench/model_matrix.py --child resnet18      # one row in this process, with its phases

Outcomes: `ok` (every step done, the gates met), `refused` (check's one line), `failed` (an error
after check, or a missed gate: a bug to fix), `timeout` / `memory` (over the bounds: not run to
its end; the bound is CPU time, so that the machine's load does not decide it), `not run` (a
batch that did not get to it). Rows are kept per model across runs (rows.json): `seconds` is the
row's time on the wall, `cpu_seconds` the CPU time its process took (which a shared machine's
load does not inflate), `phases` the seconds of each step. The markdown table (README.md here,
and docs/models.md between its markers) is written from all of them.

Each model runs in a process forked from a server that imported torch, torchvision,
Torch-Pruning, onnxruntime, the exporter and dsrpipe once (multiprocessing's forkserver): a row
pays for none of that (about 10 s of a 2-core machine's CPU), and still starts from a clean
process, which the bounds can kill.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import get_model_weights

from dsrpipe.config import parse_pipeline
from dsrpipe.deploy.export import export_onnx
from dsrpipe.deploy.shrink import shrink_model
from dsrpipe.deploy.validate import agreeing
from dsrpipe.errors import UserError
from dsrpipe.preflight import check_model
from dsrpipe.sparse.cost import model_cost
from dsrpipe.sparsifiers import build_sparsifier

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
BATCH = 2  # the training step's images: the fewest that BatchNorm trains on
CALIBRATION = 16  # the images BatchNorm's statistics are measured on (calibrate_batchnorm)
# Imported by the fork server besides this script's imports: the ONNX exporter's, which it
# imports at its first export (dynamo, torch.export, onnxscript).
PRELOAD = ("torch.onnx._internal.exporter._core", "onnxscript", "torch._dynamo", "torch.export")
MEAN, STD = 0.5, 0.25  # the export's normalisation of [0, 1] pixels, every channel
STATIC_HALF = {"method": "static", "sparsity": 0.5, "remove_channels": {"share": 0.5, "end_epoch": 1}}


def all_models(family: str) -> list[str]:
    names = []
    if family in ("timm", "all"):
        names += [f"timm/{name}" for name in TIMM_MODELS]
    if family in ("torchvision", "all"):
        names += torchvision.models.list_models(module=torchvision.models)
    return names


def smallest_first(names: list[str]) -> list[str]:
    """`names`, torchvision's by their parameters (their weights' metadata: nothing is built or
    downloaded) and after them the others as they are: a run cut short has done the most models."""
    torchvision_models = set(torchvision.models.list_models(module=torchvision.models))

    def size(name: str) -> float:
        if name not in torchvision_models:
            return math.inf
        return get_model_weights(name).DEFAULT.meta["num_params"]

    return sorted(names, key=size)  # stable: the timm list keeps its order


def pipeline(name: str, side: int) -> dict:
    """A CIFAR-shaped pipeline (3 channels, `side` pixels) that removes half the channels at step 1."""
    return {
        "name": "matrix",
        "data": {"dataset": "cifar10", "root": str(ROOT), "image_size": side},  # never read
        "model": {"name": name},
        "sparsity": STATIC_HALF,
        "train": {"epochs": 2, "batch_size": BATCH, "lr": 1e-3, "milestones": []},
    }


def checked(name: str):
    """(side, config, model) at the smallest side of SIDES the model takes, or check's refusal
    (a UserError) at the largest."""
    for side in SIDES:
        cfg = parse_pipeline(pipeline(name, side))
        torch.manual_seed(0)
        try:
            return side, cfg, check_model(cfg, lambda note: None)
        except UserError as exc:
            # only a side the model cannot take tries the next (a refused tracing is refused at all)
            if not str(exc).endswith("set data.image_size to a size it takes") or side == SIDES[-1]:
                raise
    raise AssertionError("unreachable")


def train_step_and_cut(cfg, model, side: int) -> tuple:
    """One training step with the removal and its cut, as training runs them; the model after."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sparsifier = build_sparsifier(
        cfg.sparsity, model, optimizer, seed=0, steps_per_epoch=1, epochs=2,
        example_inputs=torch.zeros(1, 3, side, side),
    )  # fmt: skip
    x = torch.rand(BATCH, 3, side, side, generator=torch.Generator().manual_seed(1))
    model.train()
    F.cross_entropy(model(x), torch.arange(BATCH)).backward()
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
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.eval()  # dropout and stochastic depth off: only BatchNorm measures
    for norm in norms:
        norm.train()
    with torch.no_grad():
        pixels = torch.rand(CALIBRATION, 3, side, side, generator=torch.Generator().manual_seed(3))
        model((pixels - MEAN) / STD)  # as onnx_parity normalises them
    for norm in norms:
        norm.momentum = 0.1
        norm.running_var.clamp_(min=1)


def export(model, side: int, directory: Path) -> tuple:
    """`model` shrunk as the pipeline ships it, exported to ONNX: (shrunk, the shrink's summary, path)."""
    shrunk, summary = shrink_model(model, (3, side, side))
    path = directory / "model.onnx"
    export_onnx(shrunk, path, in_channels=3, image_size=side, mean=[MEAN] * 3, std=[STD] * 3, metadata={})
    return shrunk, summary, path


def onnx_parity(shrunk, summary: dict, path: Path, side: int) -> dict:
    """onnxruntime against torch on IMAGES random images."""
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
        "agreement": float(agreeing(got, expected).mean()),  # as validate counts it: ties agree
        "max_dlogit": float(np.abs(got - expected).max()),
        "logit_scale": float(np.abs(expected).max()),
    }


class Phases(dict):
    """The seconds of each step of a row, as they end."""

    def __init__(self):
        super().__init__()
        self._last = time.monotonic()

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self[phase] = round(now - self._last, 1)
        self._last = now


def try_model(name: str, directory: Path) -> dict:
    """The model's row (without `seconds`): check, a step with the cut, the export, the parity."""
    phases = Phases()
    try:
        side, cfg, model = checked(name)
    except UserError as exc:
        phases.done("check")
        return {"outcome": "refused", "reason": str(exc), "phases": phases}
    phases.done("check")
    params_before, macs_before = model_cost(model, torch.zeros(1, 3, side, side))
    row = {"side": side, "params_before": params_before, "macs_before": macs_before, "phases": phases}
    try:
        model, stats = train_step_and_cut(cfg, model, side)
        row["channels_removed"] = (stats or {}).get("channels_removed", 0)
        phases.done("step")
        shrunk, summary, path = export(model, side, directory)
        phases.done("export")
        row.update(onnx_parity(shrunk, summary, path, side))
        phases.done("parity")
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
    """--child: one model's row in this process, printed as JSON."""
    torch.set_num_threads(1)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        row = try_model(name, Path(directory))
    print(json.dumps({"model": name, **row, "seconds": round(time.monotonic() - start, 1)}))


def forked_row(name: str, directory: str, memory_gib: float, cpu_seconds: float) -> None:
    """In a process forked from the server: bound its address space and its CPU time (SIGXCPU
    ends it), send its output to files in `directory` (their tail says why, should it die), and
    write the row there as row.json."""
    limit = int(memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_seconds), int(cpu_seconds) + 10))
    for fd, file in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(Path(directory) / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    torch.set_num_threads(1)
    row = try_model(name, Path(directory))
    used = resource.getrusage(resource.RUSAGE_SELF)
    row["cpu_seconds"] = round(used.ru_utime + used.ru_stime, 1)
    (Path(directory) / "row.json").write_text(json.dumps(row))


def fork_server() -> multiprocessing.context.BaseContext:
    """The forkserver context whose server imports this script (and so torch, dsrpipe, ...) and
    the exporter once; the models' processes fork from it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *PRELOAD])
    return context


def run_one(name: str, bounds: argparse.Namespace, context) -> dict:
    """`forked_row(name)` in a process of its own, its address space, its CPU time and its time on
    the wall bounded (`bounds`: memory_gib, cpu_seconds, timeout). The CPU time is the bound that
    says `timeout`, whatever else runs on the machine; the wall's only ends a process that hangs."""
    directory = Path(tempfile.mkdtemp(prefix="model-matrix-"))
    start = time.monotonic()
    try:
        process = context.Process(
            target=forked_row, args=(name, str(directory), bounds.memory_gib, bounds.cpu_seconds)
        )
        process.start()
        process.join(bounds.timeout)
        if process.is_alive():
            process.kill()
            process.join()
            reason = f"over {bounds.timeout:g} s on the wall"
            return {"model": name, "outcome": "timeout", "reason": reason, "seconds": bounds.timeout}
        seconds = round(time.monotonic() - start, 1)
        if process.exitcode == -signal.SIGXCPU:
            reason = f"over {bounds.cpu_seconds:g} s of CPU time"
            return {"model": name, "outcome": "timeout", "reason": reason, "seconds": seconds}
        row = directory / "row.json"
        if process.exitcode == 0 and row.exists():
            return {"model": name, **json.loads(row.read_text()), "seconds": seconds}
        said = (directory / "stderr").read_text(errors="replace") if (directory / "stderr").exists() else ""
        tail = said.strip().splitlines()[-1:] or [f"exit {process.exitcode}"]
        memory = over_memory(said) or process.exitcode == -9
        outcome = "memory" if memory else "failed"
        return {"model": name, "outcome": outcome, "reason": tail[0][:300], "seconds": seconds}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load_rows(folder: Path = RESULTS) -> dict[str, dict]:
    path = folder / "rows.json"
    return {row["model"]: row for row in json.loads(path.read_text())} if path.exists() else {}


def _millions(value) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, (int, float)) else ""


def markdown(rows: dict[str, dict]) -> str:
    """The table: one line per model, torchvision's first, then timm's; and the counts."""
    lines = [
        "| model | outcome | side | params M before → after | MMACs before → after | agreement | max abs dlogit | s | cpu s | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            f"| {dlogit} | {r['seconds']:g} | {r.get('cpu_seconds', '')} | {reason} |"
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
    parser.add_argument("--cpu-seconds", type=float, default=600, help="CPU time per model")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds on the wall per model")
    parser.add_argument("--memory-gib", type=float, default=10, help="address space per model")
    parser.add_argument("--resume", action="store_true", help="skip the models rows.json has (but --again)")
    parser.add_argument(
        "--again",
        nargs="+",
        default=["not run"],
        help="with --resume, run the models of these outcomes again",
    )
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
        names = [name for name in names if name not in rows or rows[name]["outcome"] in args.again]
    names = smallest_first(names)
    context = fork_server()
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda n: run_one(n, args, context), names):
            rows[row["model"]] = row
            print(
                f"{row['model']}: {row['outcome']} {row.get('reason', '')} ({row['seconds']:g} s)", flush=True
            )
            write(rows, args.out)


if __name__ == "__main__":
    main()
