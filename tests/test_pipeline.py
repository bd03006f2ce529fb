"""End to end: the stages, `dsrpipe run`, resume, and bad input, on real data."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import numpy_helper
from typer.testing import CliRunner

from dsrpipe import train as train_module
from dsrpipe.cli import app
from dsrpipe.config import load_pipeline, parse_pipeline
from dsrpipe.data import load_data
from dsrpipe.pipeline import run_pipeline
from dsrpipe.train import train_sparse

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
REPORT_KEYS = {
    "name",
    "dataset",
    "model",
    "method",
    "sparsity",
    "layer_density",
    "nonzero_params",
    "total_params",
    "torch_top1",
    "onnx_top1",
    "top1_agreement",
    "max_abs_logit_diff",
    "latency_ms",
    "onnx_bytes",
}


def tiny(name="tiny", **sections):
    """A fast digits pipeline: a few epochs, frequent reallocation."""
    raw = {
        "name": name,
        "data": {"dataset": "digits"},
        "model": {"name": "small-cnn", "options": {"width": 16}},
        "sparsity": {"method": "dsr", "sparsity": 0.9, "prune_target": 150, "rewire_periods": {0: 5}},
        "train": {
            "epochs": 4,
            "batch_size": 64,
            "lr": 0.1,
            "milestones": [1],
        },
        "finetune": {"epochs": 1, "lr": 0.005},
        "validate": {"latency_runs": 20},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    train = raw["train"]
    if "milestones" not in sections.get("train", {}):  # the default one only where it is reached
        train["milestones"] = [m for m in train["milestones"] if m < train["epochs"]]
    return raw


def write_pipeline(tmp_path, raw, filename="pipeline.yaml"):
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(raw))
    return path


def test_quickstart_command_end_to_end(tmp_path):
    """The README's first command, as a real process: train, fine-tune, export, validate."""
    out = tmp_path / "export"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsrpipe",
            "run",
            str(ROOT / "pipelines" / "quickstart.yaml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "quickstart" / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["passed"] and report["onnx_top1"] >= 0.9
    assert report["top1_agreement"] >= 0.99 and report["max_abs_logit_diff"] < 1e-3
    assert 0.89 <= report["sparsity"] <= 0.91
    assert report["nonzero_params"] < report["total_params"]
    assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p95"] >= report["latency_ms"]["p50"]

    # The model runs with onnxruntime and nothing else: raw [0, 1] pixels in, logits out.
    session = ort.InferenceSession(str(out / "quickstart" / "model.onnx"), providers=["CPUExecutionProvider"])
    _, test = load_data("digits")
    x, y = next(test.batches(100, shuffle=False, augment=False, seed=0, epoch=0, normalize=False))
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (logits.argmax(1) == y.numpy()).mean() >= 0.9
    meta = {p.key: p.value for p in onnx.load(str(out / "quickstart" / "model.onnx")).metadata_props}
    assert meta["method"] == "dsr" and meta["dataset"] == "digits"
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert set(json.loads(meta["layer_density"])) == set(report["layer_density"])
    umask = os.umask(0)
    os.umask(umask)
    for shipped in ("model.onnx", "report.json", "report.md"):  # readable like any file the user writes
        assert (out / "quickstart" / shipped).stat().st_mode & 0o777 == 0o666 & ~umask

    # Running again skips every completed stage and leaves the outputs untouched.
    outputs = lambda: {
        p: p.stat().st_mtime_ns
        for p in (out / "quickstart").rglob("*")
        if p.is_file() and p.name != "run.lock"
    }  # the lock holds each run's pid
    before = outputs()
    again = CliRunner().invoke(
        app, ["run", str(ROOT / "pipelines" / "quickstart.yaml"), "--out", str(out), "--no-progress"]
    )
    assert again.exit_code == 0, again.output[-2000:]
    assert again.stderr.count("already complete") == 4
    assert before == outputs()


def test_dsr_reallocates_and_keeps_the_budget_during_training(tmp_path):
    cfg = parse_pipeline(tiny())
    final = torch.load(train_sparse(cfg, tmp_path, progress=False), weights_only=True)
    history = final["history"]
    assert sum(h["reallocations"] for h in history) == 4 * (1437 // 64) // 5
    assert sum(h["pruned"] for h in history) > 0
    assert len({h["active_params"] for h in history}) == 1  # constant non-zero budget
    densities = history[-1]["layer_density"]
    assert max(densities.values()) - min(densities.values()) > 0.01  # budget moved between layers
    lines = (tmp_path / "tiny" / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert {"train_loss", "test_top1", "threshold", "pruned", "layer_density", "lr"} <= json.loads(
        lines[0]
    ).keys()


def assert_same_training(reference, resumed):
    """Two train/final.pt checkpoints hold the same weights, masks, threshold and history (timings
    aside), bit for bit."""
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for name, mask in reference["sparsifier"]["masks"].items():
        assert torch.equal(mask, resumed["sparsifier"]["masks"][name])
    assert reference["sparsifier"]["threshold"] == resumed["sparsifier"]["threshold"]
    timing = ("seconds", "images_per_second", "peak_rss_bytes", "peak_cuda_bytes")
    drop_timing = lambda h: {k: v for k, v in h.items() if k not in timing}
    assert [drop_timing(h) for h in reference["history"]] == [drop_timing(h) for h in resumed["history"]]


def interrupt_training(cfg, out, monkeypatch, epoch):
    """Train until Ctrl-C strikes in `epoch`: trained, not yet checkpointed, so it must be redone."""
    real_evaluate = train_module.evaluate
    calls = {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_sparse(cfg, out, progress=False)
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    # The LR drops at milestones before (2) and after (4) the resume point (3): a resumed run that
    # lost its LR schedule would miss the second drop.
    cfg = parse_pipeline(tiny(train={"epochs": 5, "milestones": [2, 4]}))
    reference = torch.load(train_sparse(cfg, tmp_path / "a", progress=False), weights_only=True)
    interrupt_training(cfg, tmp_path / "b", monkeypatch, epoch=4)
    last = torch.load(tmp_path / "b" / "tiny" / "train" / "last.pt", weights_only=True)
    assert last["epoch"] == 3
    with pytest.raises(Exception, match="--resume"):
        train_sparse(cfg, tmp_path / "b", progress=False)
    resumed = torch.load(train_sparse(cfg, tmp_path / "b", resume=True, progress=False), weights_only=True)
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert_same_training(reference, resumed)


@pytest.mark.slow
def test_run_killed_mid_training_resumes_bit_identically(tmp_path):
    """`dsrpipe run` killed (SIGKILL) once an epoch is checkpointed, then run again, ends exactly
    where an uninterrupted run does; the LR drop (milestone 3) comes after the resume point."""
    raw = tiny(
        "killed",
        model={"name": "small-cnn", "options": {"width": 8}},
        finetune={"epochs": 0},
        train={"epochs": 4, "milestones": [3]},
        validate={"latency_runs": 5},
    )
    reference = torch.load(
        train_sparse(parse_pipeline(raw), tmp_path / "reference", progress=False), weights_only=True
    )

    path, out = write_pipeline(tmp_path, raw), tmp_path / "out"
    command = [sys.executable, "-m", "dsrpipe", "run", str(path), "--out", str(out), "--no-progress"]
    last = out / "killed" / "train" / "last.pt"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    resume_from = torch.load(last, weights_only=True)["epoch"]
    assert resume_from in (1, 2)  # killed within moments of the first checkpoint: before the milestone
    assert not (out / "killed" / "train" / "final.pt").exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"train: resuming after epoch {resume_from}" in result.stderr
    resumed = torch.load(out / "killed" / "train" / "final.pt", weights_only=True)
    assert_same_training(reference, resumed)
    report = json.loads((out / "killed" / "report.json").read_text())
    assert (
        report["passed"] and report["final_test_top1_torch_training"] == reference["history"][-1]["test_top1"]
    )


@pytest.mark.parametrize("method", ["static", "dense"])
def test_other_methods_run_end_to_end(tmp_path, method):
    raw = tiny(name=method, train={"epochs": 2})
    raw["sparsity"] = {
        "method": method,
        **({"sparsity": 0.9} if method == "static" else {}),
    }  # no DSR options
    report = run_pipeline(parse_pipeline(raw), tmp_path, progress=False)
    assert report.method == method
    if method == "dense":
        assert report.sparsity < 0.01
    else:
        assert 0.89 <= report.sparsity <= 0.91
        assert all(abs(d - 0.1) < 0.01 for d in report.layer_density.values())  # static: uniform


def test_validation_threshold_fails_with_exit_code_and_report(tmp_path):
    path = write_pipeline(
        tmp_path,
        tiny(validate={"min_top1": 0.999, "latency_runs": 5}, train={"epochs": 1}, finetune={"epochs": 0}),
    )
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 3
    assert "min_top1" in result.output
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert report["passed"] is False and "min_top1" in report["failure"]


def test_int8_export_ships_int8_and_the_gate_refuses_a_tampered_model(tmp_path):
    """export.quantize: int8 ships model.onnx (int8) beside model.fp32.onnx; validate compares
    int8 with float32 and float32 with torch; a perturbed float32 file fails the gate: exit 3."""
    path = write_pipeline(
        tmp_path,
        tiny(
            export={"quantize": "int8", "calibration_images": 200},
            validate={"latency_runs": 5, "throughput_runs": 2, "max_top1_drop": None},
        ),
    )
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = out / "tiny"
    report = json.loads((run / "report.json").read_text())
    assert report["quantize"] == "int8" and report["encoding"] == "compact" and report["passed"]
    assert {
        "fp32_onnx_top1",
        "int8_agreement",
        "int8_top1_drop",
        "speedup",
        "size_ratio",
        "dense_latency_ms",
        "throughput",
    } <= report.keys()
    assert (
        report["onnx_bytes"] == (run / "model.onnx").stat().st_size < (run / "model.fp32.onnx").stat().st_size
    )
    assert report["size_ratio"] == report["onnx_bytes"] / report["dense_onnx_bytes"] < 0.2
    meta = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert meta["quantize"] == "int8" and meta["fingerprint"]
    # 7-bit weights by default; the CPU and onnxruntime it ran with, in report.json and report.md
    assert meta["int8_range"] == report["int8_range"] == "portable"
    assert report["cpu"]["machine"] and report["onnxruntime"]["version"] == ort.__version__
    md = (run / "report.md").read_text()
    assert "int8 (portable range)" in md and f"onnxruntime {ort.__version__}" in md

    # Tamper with the float32 model (its dense classifier 5 % off), keeping its fingerprint.
    proto = onnx.load(str(run / "model.fp32.onnx"))
    fc = next(t for t in proto.graph.initializer if t.name == "model.fc.weight")
    fc.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(fc) * np.float32(1.05), fc.name))
    onnx.save(proto, str(run / "model.fp32.onnx"))
    result = runner.invoke(app, ["validate", str(path), "--out", str(out), "--force"])
    assert result.exit_code == 3 and "max_abs_diff" in result.output
    assert json.loads((run / "report.json").read_text())["passed"] is False

    # Back to float32: model.fp32.onnx, now stale, goes.
    path = write_pipeline(tmp_path, tiny(validate={"latency_runs": 5, "throughput_runs": 2}))
    assert runner.invoke(app, ["export", str(path), "--out", str(out)]).exit_code == 0
    assert not (run / "model.fp32.onnx").exists()


def test_divergence_stops_training_with_a_one_line_error(tmp_path):
    path = write_pipeline(
        tmp_path, tiny(train={"lr": 1e6, "epochs": 3, "milestones": []})
    )  # the largest allowed
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    assert "error: train diverged: the training loss is nan in epoch 1; lower train.lr" in result.output
    assert not (tmp_path / "out" / "tiny" / "train" / "last.pt").exists()  # no checkpoint of a broken epoch


def test_nan_test_outputs_stop_training_with_a_one_line_error(tmp_path, monkeypatch):
    """The training loss stays finite while eval mode's BatchNorm statistics blow up (planted in
    epoch 2 here): training stops there, and last.pt keeps epoch 1, the last sound one."""
    real_train_one_epoch = train_module.train_one_epoch
    epochs = {"n": 0}

    def blowing_up_norms(model, *args, **kwargs):
        totals = real_train_one_epoch(model, *args, **kwargs)
        epochs["n"] += 1
        if epochs["n"] == 2:
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, torch.nn.BatchNorm2d):
                        module.running_var.fill_(float("nan"))
        return totals

    monkeypatch.setattr(train_module, "train_one_epoch", blowing_up_norms)
    path = write_pipeline(tmp_path, tiny(train={"epochs": 3, "milestones": []}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "train diverged:" in line and "test outputs are NaN or infinite" in line
    assert "epoch 2" in line and "BatchNorm" in line and "train.lr" in line
    last = torch.load(tmp_path / "out" / "tiny" / "train" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert not (tmp_path / "out" / "tiny" / "model.onnx").exists()


def test_stages_run_one_by_one_from_the_cli(tmp_path):
    path = write_pipeline(tmp_path, tiny(train={"epochs": 1}))
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(path), "--out", str(out)]).exit_code == 2  # nothing trained yet
    for stage in ("train-sparse", "finetune", "export", "validate"):
        result = runner.invoke(
            app,
            [stage, str(path), "--out", str(out), "--no-progress"]
            if stage in ("train-sparse", "finetune")
            else [stage, str(path), "--out", str(out)],
        )
        assert result.exit_code == 0, (stage, result.output)
    assert (out / "tiny" / "model.onnx").exists() and (out / "tiny" / "report.json").exists()
    # Changing a training setting makes the trained model stale: refuse rather than mix them.
    changed = write_pipeline(tmp_path, tiny(train={"epochs": 1, "lr": 0.05}))
    result = runner.invoke(app, ["train-sparse", str(changed), "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output


BAD_INPUTS = {
    "unknown key": ({"trian": {"epochs": 1}}, "trian: unknown setting"),
    "wrong type": ({"train": {"epochs": "many"}}, "train.epochs"),
    "sparsity of 1": ({"sparsity": {"sparsity": 1.0}}, "sparsity.sparsity"),
    "negative sparsity": ({"sparsity": {"sparsity": -0.1}}, "sparsity.sparsity"),
    "unknown model": ({"model": {"name": "resnet-9000"}}, "model.name: unknown model"),
    "unknown dataset": ({"data": {"dataset": "svhn"}}, "unknown dataset 'svhn'"),
    "missing root": ({"data": {"dataset": "mnist", "root": "/nonexistent/mnist"}}, "root does not exist"),
    "no root": ({"data": {"dataset": "imagefolder"}}, "needs root"),
    "unknown method": ({"sparsity": {"method": "magic"}}, "unknown method 'magic'"),
    "unsafe name": ({"name": "../evil"}, "name"),
    "replaced export key": (
        {"export": {"sparse_initializers": True}},
        "export: sparse_initializers is replaced by encoding: dense | coo | compact",
    ),
    "unknown encoding": ({"export": {"encoding": "zip"}}, "export.encoding"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_pipeline_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    override, expected = BAD_INPUTS[case]
    raw = tiny()
    for key, value in override.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    path = write_pipeline(tmp_path, raw)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_unreadable_yaml_and_missing_file_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntrain: [epochs: 1\n")
    for path, expected in ((broken, "not valid YAML"), (tmp_path / "missing.yaml", "cannot read pipeline")):
        result = subprocess.run(
            [sys.executable, "-m", "dsrpipe", "run", str(path)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert result.returncode == 2
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_set_overrides_settings_from_the_command_line(tmp_path):
    path = write_pipeline(tmp_path, tiny())
    cfg = load_pipeline(path, ["train.epochs=7", "sparsity.exclude=['2']", "name=other"])
    assert cfg.train.epochs == 7 and cfg.sparsity.exclude == ["2"] and cfg.name == "other"
    result = CliRunner().invoke(app, ["check", str(path), "--set", "train.epochs"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_shipped_pipelines_are_valid():
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        cfg = load_pipeline(path, ["data.root=."] if "imagenet" in path.name else [])
        assert cfg.name == path.stem


@pytest.mark.skipif(
    not (SHARED / "mnist10k").exists(), reason="needs ../shared/datasets/mnist10k (CI has it)"
)
@pytest.mark.slow
def test_lenet5_on_real_mnist10k(tmp_path):
    cfg = load_pipeline(
        ROOT / "pipelines" / "mnist-lenet5-dsr.yaml",
        [
            f"data.root={SHARED / 'mnist10k'}",
            "data.download=false",
            "train.epochs=2",
            "train.milestones=[1]",
            "finetune.epochs=0",
            "validate.latency_runs=20",
            "validate.min_top1=0.9",
        ],
    )
    report = run_pipeline(cfg, tmp_path, progress=False)
    assert report.onnx_top1 >= 0.9 and report.top1_agreement >= 0.99
    assert 0.94 <= report.sparsity <= 0.96
    assert report.total_params == 431_080
