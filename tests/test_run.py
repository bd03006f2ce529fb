"""A Run (dsrpipe.run) owns one run: `dsrpipe run` and a watch job read its data and its trained
checkpoints once, whatever the stages that use them; and a method registered in one file runs
through it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dsrpipe import checkpoint as checkpoint_module
from dsrpipe import compare as compare_module
from dsrpipe import run as run_module
from dsrpipe import stopping
from dsrpipe.cli import app
from dsrpipe.config import parse_pipeline, register_method, unregister_method
from dsrpipe.data import ArchiveCaps
from dsrpipe.jobs.job import job_main
from dsrpipe.pipeline import run_pipeline

from . import helpers
from .test_pipeline import tiny, write_pipeline
from .test_watch import TEMPLATE, take_in
from .toy_method import ToyOptions


def counting(monkeypatch, module, name: str, key) -> Counter:
    """Count the calls of `module.name`, by `key(*args)`."""
    calls, real = Counter(), getattr(module, name)

    def counted(*args, **kwargs):
        calls[key(*args, **kwargs)] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_dsrpipe_run_loads_the_data_and_each_checkpoint_once(tmp_path, monkeypatch):
    """train, finetune, an int8 export (calibrated on training images) and validate (on the test
    split) share one load of the data; the trained and the fine-tuned final.pt are each read once,
    though the stages' states, fingerprints, fine-tuning, export and validation all use them; the
    shipped model's sparsity is counted once."""
    data_loads = counting(monkeypatch, run_module, "load_data", lambda dataset, **_: dataset)
    reads = counting(
        monkeypatch, checkpoint_module, "torch_load", lambda path: Path(path).relative_to(tmp_path)
    )
    summaries = counting(monkeypatch, run_module, "_sparsity_summary", lambda model, cfg, shipped: cfg.name)
    raw = tiny(
        train={"epochs": 2},
        export={"quantize": "int8", "calibration_images": 200},
        validate={"latency_runs": 5, "throughput_runs": 2, "max_top1_drop": None},
    )
    path = write_pipeline(tmp_path, raw)
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert data_loads == {"digits": 1}
    assert reads == {Path("out/tiny/train/final.pt"): 1, Path("out/tiny/finetune/final.pt"): 1}
    assert summaries == {"tiny": 1}  # export's metadata and validate's report share it
    # Run again, everything complete: no data, and the shipped checkpoint read once for its run id.
    data_loads.clear(), reads.clear()
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not data_loads and all(count == 1 for count in reads.values()), reads


def test_a_watch_job_loads_the_dropped_dataset_once(tmp_path, monkeypatch):
    """A dataset dropped into a watch folder: its job (job_main, as the job process runs it) loads
    it once, with the job's archive caps, for every stage; the shipped checkpoint is read once
    too. Again, everything complete: no data at all."""
    drop, out = tmp_path / "drop", tmp_path / "out"
    helpers.write_tree(
        drop / "photos", helpers.image_tree(("ant", "bee"), {"train": 6, "test": 3}, "L", "", (8, 8))
    )
    (drop / "template.yaml").write_text(TEMPLATE)
    folder = take_in(drop, out, "photos")
    data_loads = counting(
        monkeypatch, run_module, "load_data", lambda dataset, archive_caps, **_: (dataset, archive_caps)
    )
    reads = counting(monkeypatch, checkpoint_module, "torch_load", lambda path: Path(path).relative_to(out))
    monkeypatch.chdir(tmp_path)  # the job works in the drop folder
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # else it sets this process's torch threads
    restore = stopping.install()  # the job's signal handling, undone after (its process would keep it)
    try:
        code = job_main(folder.jobs_dir / "photos", {"max_unpacked": 10**8, "max_files": 1_000})
        assert code == 0, (folder.jobs_dir / "photos" / "cause.txt").read_text()
        assert data_loads == {("imagefolder", ArchiveCaps(10**8, 1_000)): 1}
        assert reads == {Path("photos/train/final.pt"): 1}
        data_loads.clear(), reads.clear()
        assert job_main(folder.jobs_dir / "photos") == 0
        assert not data_loads and reads == {Path("photos/train/final.pt"): 1}
    finally:
        if restore is not None:
            restore()


@pytest.fixture
def toy():
    register_method(ToyOptions)
    yield ToyOptions
    unregister_method("toy")


def test_a_method_registered_in_one_file_runs_through_run_and_a_grid_plan(tmp_path, toy):
    """tests/toy_method.py adds 'toy': the schema takes its options, `run` trains, exports and
    validates it through its hook (half the width), and a grid plans its runs like any method's."""
    raw = tiny("toy", train={"epochs": 2}, finetune={"epochs": 0})
    raw["sparsity"] = {"method": "toy", "sparsity": 0.8}
    report = run_pipeline(parse_pipeline(raw), tmp_path, progress=False)
    assert report.method == "toy" and report.passed
    assert report.model_options == {"width": 8}  # the hook's model
    assert 0.79 <= report.sparsity <= 0.81

    grid = {"name": "g", "base": tiny(), "methods": ["toy", "dsr"], "sparsities": [0.5, 0.8]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    runs = compare_module.plan_runs(*compare_module.load_grid(tmp_path / "grid.yaml"), tmp_path / "runs")
    toys = [r for r in runs if r.method == "toy"]
    assert [r.sparsity for r in toys] == [0.5, 0.8]
    assert all(r.cfg.sparsity.method == "toy" and r.cfg.sparsity.sparsity == r.sparsity for r in toys)
    assert "prune_target" not in toys[0].cfg.sparsity.model_fields  # the base's dsr options dropped


def test_a_method_is_refused_once_its_name_is_taken_and_forgotten_when_unregistered(toy):
    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_method(ToyOptions)
    unregister_method("toy")
    with pytest.raises(Exception, match="unknown method 'toy'"):
        parse_pipeline({**tiny(), "sparsity": {"method": "toy"}})
    register_method(ToyOptions)  # for the fixture to remove
