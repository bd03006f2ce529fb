"""Run reports with pictures (report.md beside report.json) and `dsrpipe compare` over a grid."""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dsrpipe import compare as compare_module
from dsrpipe.cli import app
from dsrpipe.config import METHOD_OPTIONS, parse_pipeline
from dsrpipe.executors import launch
from dsrpipe.pipeline import run_pipeline
from dsrpipe.plots import RUN_PLOTS, run_markdown, write_accuracy_vs_params, write_run_plots
from dsrpipe.report import Report
from dsrpipe.rundir import read_report

from .test_pipeline import tiny

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) >= min_bytes, (path, len(data))


def made_up(**fields) -> Report:
    """A report with the figures every report has (made up), and `fields`."""
    every = {"name": "r", "dataset": "digits", "model": "small-cnn", "method": "dsr", "sparsity": 0.9}
    every |= {"nonzero_params": 10, "total_params": 100, "torch_top1": 0.5, "onnx_top1": 0.5}
    return Report(**every | fields)


def small(name, **sections):
    """tiny(), smaller still: width 8, a short latency measurement."""
    return tiny(
        name, model={"name": "small-cnn", "options": {"width": 8}}, validate={"latency_runs": 5}, **sections
    )


def test_run_writes_pictures_and_report_md(tmp_path):
    cfg = parse_pipeline(small("pics", train={"epochs": 2}, finetune={"epochs": 1}))
    report = run_pipeline(cfg, tmp_path, progress=False)
    folder = tmp_path / "pics"
    for name in RUN_PLOTS:
        assert_png(folder / name)
    md = (folder / "report.md").read_text()
    for name in RUN_PLOTS:
        assert f"]({name})" in md
    assert "`dsr`" in md and "Validation passed" in md
    assert f"{report.nonzero_params:,} / {report.total_params:,}" in md
    assert f"{report.onnx_top1:.2%}" in md and f"{report.onnx_bytes:,} bytes" in md
    assert "2 + 1" in md  # epochs: train + fine-tune
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporaries
    # report.json is the report, key for key and in the order it has always had.
    raw = json.loads((folder / "report.json").read_text())
    assert list(report.to_dict().items()) == list(raw.items()) and Report.from_dict(raw) == report

    # Pictures missing beside a complete report (cut short, or validated before plots existed)
    # are drawn again from metrics.jsonl, without measuring the model again.
    (folder / "report.md").unlink()
    (folder / "curves.png").unlink()
    stamp = (folder / "report.json").stat().st_mtime_ns
    run_pipeline(cfg, tmp_path, progress=False)
    assert (folder / "report.md").exists()
    assert_png(folder / "curves.png")
    assert (folder / "report.json").stat().st_mtime_ns == stamp


def test_pictures_cope_with_empty_and_large_runs(tmp_path):
    bare = made_up(name="bare", method="dense", sparsity=0.0)
    for path in write_run_plots(tmp_path / "bare", [], [], bare):
        assert path.exists()
    assert "n/a" in (tmp_path / "bare" / "report.md").read_text()

    layers = [f"stage{i // 10}.block{i % 10}.conv" for i in range(60)]
    epoch = lambda e, stage: {
        "stage": stage,
        "epoch": e,
        "train_loss": 1 / e,
        "test_loss": 1.2 / e,
        "train_top1": 1 - 1 / (e + 1),
        "test_top1": 1 - 1.2 / (e + 2),
        "lr": 0.1,
        "threshold": None if stage == "finetune" else 1e-3 * e,
        "pruned": 0 if stage == "finetune" else 100 * e,
        "seconds": 1.0,
        "layer_density": {n: (i % 7 + e % 3) / 20 for i, n in enumerate(layers)},
    }
    report = made_up(name="deep", layer_density=epoch(1, "train")["layer_density"])
    paths = write_run_plots(
        tmp_path / "deep",
        [epoch(e, "train") for e in range(1, 41)],
        [epoch(e, "finetune") for e in range(1, 6)],
        report,
    )
    for path in paths[:3]:
        assert_png(path)
    assert_png(write_accuracy_vs_params(tmp_path / "none.png", []), min_bytes=1_000)


def test_the_density_heat_map_prints_numbers_only_where_they_fit():
    """A cell's number where it fits: every cell of a short run; at 45 epochs (where they used
    to run into each other) those of some epochs, none touching another, all inside the map;
    at 200 epochs none. Long layer names make the map narrower."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from dsrpipe.plots.run_figures import density_over_time

    layers = ["features.stage1.block0.conv1.weight", "features.stage1.block0.conv2.weight"]

    def heat_map(epochs):
        history = [
            {"stage": "train", "epoch": e, "threshold": 1e-3, "pruned": 1}
            | {"layer_density": {n: 0.05 + 0.9 * ((e + i) % 2) for i, n in enumerate(layers)}}
            for e in range(1, epochs + 1)
        ]
        figure = density_over_time(history, epochs, made_up(name="n"))
        return figure, figure.axes[0]

    assert len(heat_map(5)[1].texts) == 5 * len(layers)
    assert not heat_map(200)[1].texts
    figure, heat = heat_map(45)
    FigureCanvasAgg(figure)
    figure.draw_without_rendering()  # the layout, as savefig makes it
    renderer = figure.canvas.get_renderer()
    inside = heat.get_window_extent(renderer)
    boxes = [text.get_window_extent(renderer) for text in heat.texts]
    assert 0 < len(boxes) < 45 * len(layers)
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]


def write_grid(tmp_path, **changes):
    base = small("unused", train={"epochs": 1}, finetune={"epochs": 0})
    (tmp_path / "pipelines").mkdir(exist_ok=True)
    (tmp_path / "pipelines" / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {
        "name": "g",
        "base": "pipelines/base.yaml",
        "methods": ["dsr", "static"],
        "sparsities": [0.9],
        "seeds": [0, 1],
        "overrides": {"static": {"validate.min_top1": 0.999}},
    }
    grid.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_reports_of_every_version_read_and_write_back_as_they_were(tmp_path):
    """The reports committed under bench/results, written before the int8, speed, CPU and
    training-cost figures existed, read with those at their defaults, make their report.md, and
    write back key for key; what is not a report reads as none."""
    listed = subprocess.run(
        ["git", "ls-files", "bench/results/**/report.json"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()  # committed, not the runs a benchmark is making beside them (git ignores those)
    committed = [ROOT / name for name in listed]
    assert committed
    for path in committed:
        raw = json.loads(path.read_text())
        report = read_report(path)
        assert report.to_dict() == raw
        assert (report.name, report.onnx_top1, report.nonzero_params) == (
            raw["name"],
            raw["onnx_top1"],
            raw["nonzero_params"],
        )
        assert report.training is report.speedup is report.cpu is report.int8_agreement is None
        assert "**Validation passed.**" in run_markdown(report, report.train_epochs, report.finetune_epochs)
    for text in ("[]", '{"name": "x"}', "{", ""):
        (tmp_path / "report.json").write_text(text)
        assert read_report(tmp_path / "report.json") is None
    assert read_report(tmp_path / "missing.json") is None


def test_the_table_shows_the_mean_and_sample_std_over_seeds(tmp_path):
    """Runs whose figures differ by construction, so that a mean can be told from one run's value
    and a sample std from a population one; a crashed run counts in the runs column only."""

    def run(seed, top1=None, params=None):
        r = compare_module.Run(f"g-dsr-s0.9-seed{seed}", "dsr", 0.9, seed, raw={}, train_seconds=2.0 + seed)
        if top1 is None:
            r.status, r.message = "crashed", "exit 1"
        else:
            r.status, r.report = "ok", made_up(onnx_top1=top1, nonzero_params=params, total_params=5000)
        return r

    runs = [run(0, 0.90, 1000), run(1, 0.80, 1100), run(2, 0.70, 1300), run(3)]
    [group] = compare_module.group_results(runs)
    assert (group["runs"], group["n"], group["crashed"]) == (4, 3, 1)
    assert group["params"] == pytest.approx(1133.333, abs=1e-3)
    assert group["top1_mean"] == pytest.approx(0.80) and group["top1_std"] == pytest.approx(0.10)
    compare_module.write_results(tmp_path, runs, command="dsrpipe compare g.yaml")
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("| dsr |"))
    assert line.startswith("| dsr | 0.9 | 1,133 | 80.00 ± 10.00 | 3.0 | ")


def test_training_time_is_given_against_the_method_the_registry_names(tmp_path, monkeypatch):
    """results.md's time ratio is against the row of the method whose options say `reference`
    (dense), not a variant of it; with another method marked, against that one."""

    def run(method, seconds, sparsity=0.9, row=""):
        name = f"g-{row or method}-s{sparsity:g}-seed0"
        r = compare_module.Run(name, method, sparsity, 0, raw={}, row=row, train_seconds=seconds)
        r.status, r.report = "ok", made_up(method=method)
        return r

    runs = [
        run("dsr", 5.0),
        run("static", 2.0),
        run("dense", 20.0, 0.0, "dense-long"),
        run("dense", 10.0, 0.0),
    ]

    def ratios():
        compare_module.write_results(tmp_path, runs, command="dsrpipe compare g.yaml")
        table = [line.strip("|").split("|") for line in (tmp_path / "results.md").read_text().splitlines()]
        table = [[cell.strip() for cell in cells] for cells in table if len(cells) == 10]
        return {cells[0]: cells[5] for cells in table}

    assert ratios() == {
        "method": "vs dense",
        "---": "---:",
        "dsr": "0.50×",
        "static": "0.20×",
        "dense-long": "2.00×",
        "dense": "1.00×",
    }
    monkeypatch.setattr(METHOD_OPTIONS["dense"], "reference", False)
    monkeypatch.setattr(METHOD_OPTIONS["static"], "reference", True)
    assert ratios() == {
        "method": "vs static",
        "---": "---:",
        "dsr": "2.50×",
        "static": "1.00×",
        "dense-long": "10.00×",
        "dense": "5.00×",
    }


def test_compare_runs_the_grid_in_parallel_and_resumes(tmp_path, local_grid):
    grid, out, result = local_grid
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "g"
    assert result.stdout.strip() == str(folder / "results.md")

    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 4
    assert {(r["method"], r["seed"]) for r in rows} == {
        ("dsr", "0"),
        ("dsr", "1"),
        ("static", "0"),
        ("static", "1"),
    }
    # static misses its (overridden) min_top1: exit 3, still counted with its report
    assert {r["method"]: r["status"] for r in rows} == {"dsr": "ok", "static": "validation-failed"}
    for row in rows:
        assert float(row["sparsity"]) == 0.9 and 0 < int(row["nonzero_params"]) < int(row["total_params"])
        assert 0 <= float(row["onnx_top1"]) <= 1 and float(row["train_seconds"]) > 0
        run_dir = folder / "runs" / row["run"]
        assert row["run"] == f"g-{row['method']}-s0.9-seed{row['seed']}"
        assert (run_dir / "report.json").exists() and (run_dir / "report.md").exists()

    md = (folder / "results.md").read_text()
    for method in ("dsr", "static"):
        line = next(line for line in md.splitlines() if line.startswith(f"| {method} | 0.9 |"))
        assert " ± " in line and line.count("|") == 11
        # The table's numbers come from the rows: mean non-zero params, mean ± sample std of top-1.
        group = [r for r in rows if r["method"] == method]
        params = statistics.mean(int(r["nonzero_params"]) for r in group)
        top1 = [100 * float(r["onnx_top1"]) for r in group]
        assert line.startswith(
            f"| {method} | 0.9 | {round(params):,} | "
            f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f} | "
        )
    assert "2 (2 below threshold)" in md and "## Runs that failed" in md
    assert f"dsrpipe compare {grid} --out {out} --jobs 2" in md
    assert_png(folder / "accuracy_vs_params.png")

    out = tmp_path / "out"  # what follows changes the grid's outputs: a copy of them
    shutil.copytree(local_grid[1], out, symlinks=True)
    folder = out / "g"

    # Again: every run is complete, so nothing is run and no run's files change.
    before = {p: p.stat().st_mtime_ns for p in (folder / "runs").rglob("*") if p.is_file()}
    table = (folder / "results.csv").read_text()
    started = time.process_time()
    again = CliRunner().invoke(app, ["compare", str(grid), "--out", str(out), "--jobs", "2"])
    assert again.exit_code == 0, again.output
    assert time.process_time() - started < 10
    assert "4 already complete, 0 to run" in again.output
    assert before == {p: p.stat().st_mtime_ns for p in (folder / "runs").rglob("*") if p.is_file()}
    assert (folder / "results.csv").read_text() == table

    # A run whose outputs were made with other settings (an older grid or dsrpipe) is redone,
    # where `dsrpipe run` alone would refuse to mix them.
    stale = folder / "runs" / "g-dsr-s0.9-seed0"
    checkpoint = torch.load(stale / "train" / "final.pt", weights_only=True)
    torch.save({**checkpoint, "fingerprint": "0" * 16}, stale / "train" / "final.pt")
    (stale / "report.json").unlink()
    again = CliRunner().invoke(app, ["compare", str(grid), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert (
        "3 already complete, 1 to run" in again.output
        and "g-dsr-s0.9-seed0: its outputs were made" in again.output
    )
    assert json.loads((stale / "report.json").read_text())["passed"]


def test_a_crashing_run_is_a_row_not_a_crash(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    def crash(args, **kwargs):  # stands in for a `dsrpipe run` that dies
        return real_popen(
            [sys.executable, "-c", "import sys; print('boom: out of memory'); sys.exit(1)"], **kwargs
        )

    monkeypatch.setattr(launch.subprocess, "Popen", crash)  # where the local executor starts runs
    grid, out = write_grid(tmp_path, methods=["dsr"], seeds=[0], overrides={}), tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", str(grid), "--out", str(out)])
    assert result.exit_code == 2, result.output  # the table is written, and the exit says it is incomplete
    assert "1 of 1 runs crashed" in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: 1 of 1 runs crashed (g-dsr-s0.9-seed0): see {out / 'g' / 'results.md'}"
    )
    (row,) = csv.DictReader((out / "g" / "results.csv").open())
    assert row["status"] == "crashed" and "boom: out of memory" in row["message"] and row["onnx_top1"] == ""
    md = (out / "g" / "results.md").read_text()
    assert "| dsr | 0.9 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 0 of 1 (1 crashed) |" in md
    assert "boom: out of memory" in (out / "g" / "logs" / "g-dsr-s0.9-seed0.log").read_text()
    assert_png(out / "g" / "accuracy_vs_params.png", min_bytes=1_000)


BAD_GRIDS = {
    "unknown key": ({"sparsity": [0.9]}, "sparsity: unknown setting"),
    "unknown method": ({"methods": ["dsr", "magic"]}, "unknown method 'magic'"),
    "sparsity of 1": ({"sparsities": [0.9, 1.0]}, "sparsity 1.0 is not in [0, 1)"),
    "repeated seed": ({"seeds": [0, 0]}, "listed twice"),
    "override for another method": ({"overrides": {"dense": {"train.lr": 0.1}}}, "'dense' is not one of"),
    "override of a grid axis": ({"overrides": {"dsr": {"sparsity.sparsity": 0.5}}}, "set by the grid"),
    "bad override value": (
        {"overrides": {"dsr": {"train.epochs": "many"}}},
        "g-dsr-s0.9-seed0: train.epochs",
    ),
    "missing base": ({"base": "nowhere.yaml"}, "cannot read base pipeline"),
    "no methods": ({"methods": []}, "methods"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grid_is_one_line_exit_2_and_runs_nothing(tmp_path, case):
    changes, expected = BAD_GRIDS[case]
    grid, out = write_grid(tmp_path, **changes), tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", str(grid), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_frozen_runs_wait_for_the_dsr_masks_and_dense_runs_once_per_seed(tmp_path):
    """Planning only: frozen runs come after the DSR runs and read the DSR run's trained masks;
    dense runs once per seed, not once per sparsity."""
    grid_path = write_grid(
        tmp_path, methods=["frozen", "static", "dsr", "dense"], sparsities=[0.9, 0.95], overrides={}
    )
    grid, name, base = compare_module.load_grid(grid_path)
    runs = compare_module.plan_runs(grid, name, base, tmp_path / "runs")
    assert [r.method for r in runs] == ["static"] * 4 + ["dsr"] * 4 + ["dense"] * 2 + ["frozen"] * 4
    assert {r.sparsity for r in runs if r.method == "dense"} == {0.0}
    for run in runs:
        if run.method == "frozen":
            dsr = f"g-dsr-s{run.sparsity:g}-seed{run.seed}"
            assert run.depends_on == dsr
            assert run.raw["sparsity"]["masks_from"] == str(tmp_path / "runs" / dsr / "train" / "final.pt")
        else:
            assert run.depends_on is None and "masks_from" not in run.raw["sparsity"]


SECRET = "root:$6$s3cr3tSALT$HASHED-PASSWORD:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


def _hostile_base(tmp_path, kind):
    """The grid's base: a link to a secret file, the secret file itself, a FIFO; or the grid a link."""
    (tmp_path / "shadow").write_text(SECRET)
    if kind == "base-link":
        (tmp_path / "linked.yaml").symlink_to(tmp_path / "shadow")
        return write_grid(tmp_path, base="linked.yaml"), "is a symbolic link, which is not followed"
    if kind == "base-secret":
        return write_grid(tmp_path, base=str(tmp_path / "shadow")), "unknown setting"
    if kind == "base-fifo":
        os.mkfifo(tmp_path / "fifo.yaml")
        return write_grid(tmp_path, base="fifo.yaml"), "is a FIFO, not a regular file"
    grid = write_grid(tmp_path)
    (tmp_path / "grid-link.yaml").symlink_to(grid)
    return tmp_path / "grid-link.yaml", "is a symbolic link, which is not followed"


@pytest.mark.parametrize("kind", ["base-link", "base-secret", "base-fifo", "grid-link"])
def test_a_hostile_base_or_grid_is_one_line_quoting_nothing_and_never_hangs(tmp_path, kind):
    grid, expected = _hostile_base(tmp_path, kind)
    result = subprocess.run(
        [sys.executable, "-m", "dsrpipe", "compare", str(grid), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,  # a FIFO opened for reading blocks until a writer comes: it must not be opened so
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert "s3cr3t" not in line and "root:" not in line and "daemon:*" not in line
    assert not (tmp_path / "out").exists()


def test_a_second_compare_of_the_grid_is_refused_naming_the_first(tmp_path):
    """While one compare holds <out>/<grid>/, another of the same grid exits 2 naming its pid,
    and writes nothing there."""
    grid, out = write_grid(tmp_path, methods=["dsr"], seeds=[0], overrides={}), tmp_path / "out"
    (out / "g").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dsrpipe import files; "
            f"lock = files.exclusive_lock({str(out / 'g' / 'compare.lock')!r}); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["compare", str(grid), "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert (
        line
        == f"error: {out / 'g'} is in use by another dsrpipe compare (pid {holder.pid}): wait for it to finish or stop it"
    )
    assert sorted(p.name for p in (out / "g").iterdir()) == ["compare.lock"]


def test_a_grid_is_capped_before_it_is_planned(tmp_path, monkeypatch):
    """100,000 seeds: refused at once (no planning, no quadratic duplicate check). The runs are
    counted row by row: dsr at the grid's sparsity, dense at 0 alone, a variant at its own three.
    "At once" is in this process's CPU seconds, which other work on the machine does not stretch."""

    def planned(*args, **kwargs):
        raise AssertionError("the grid was planned before its size was checked")

    monkeypatch.setattr(compare_module.schedule, "plan_runs", planned)
    few = {"dsr-few": {"method": "dsr", "sparsities": [0.5, 0.6, 0.7]}}
    for changes, expected in (
        ({"seeds": list(range(100_000))}, "seeds: List should have at most 10000 items"),
        (
            {"seeds": list(range(6_000))},
            "2 rows × their sparsities (2 row-sparsity pairs) × 6000 seeds make 12,000 runs, more than the "
            "10,000 a grid may have",
        ),
        (
            {
                "methods": ["dsr", "dense", "dsr-few"],
                "variants": few,
                "overrides": {},
                "seeds": list(range(2_500)),
            },
            "3 rows × their sparsities (5 row-sparsity pairs) × 2500 seeds make 12,500 runs",
        ),
    ):
        grid = write_grid(tmp_path, **changes)
        started = time.process_time()
        result = CliRunner().invoke(app, ["compare", str(grid), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert time.process_time() - started < 10
    # Under the cap, the duplicate check stays linear: 9,999 seeds and one repeated at the end.
    grid = write_grid(tmp_path, methods=["dsr"], seeds=[*range(9_999), 0])
    started = time.process_time()
    result = CliRunner().invoke(app, ["compare", str(grid), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "'0' is listed twice" in result.output, result.output
    assert time.process_time() - started < 10
