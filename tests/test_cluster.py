"""--executor ray and --executor slurm with real engines on this machine: one local Ray (2 CPUs,
loopback) shared by the Ray tests, submitit's local executor for Slurm (`cluster: local`)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from dsrpipe.cli import app
from dsrpipe.executors import JobSpec, Resources
from dsrpipe.executors.base import PROBE_ENV
from dsrpipe.executors.ray import LOCAL_ENV

from . import helpers
from .test_reports import small
from .test_watch import jobs, pipeline

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DETERMINISTIC = [
    "method",
    "sparsity",
    "seed",
    "nonzero_params",
    "total_params",
    "torch_top1",
    "onnx_top1",
    "status",
]


def fast(name="u", epochs=1):
    """small(), on a subset of digits: a run is its fixed costs (imports, export) and little more."""
    return small(
        name, train={"epochs": epochs}, finetune={"epochs": 0}, data={"max_train": 256, "max_test": 128}
    )


def write_grid(tmp_path, **changes):
    grid = {"name": "g", "base": fast(), "methods": ["dsr"], "sparsities": [0.9], "seeds": [0, 1], **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def compare(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "dsrpipe", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},  # what Ray's start added (its auth mode)
        timeout=timeout,
    )


def rows(path):
    return [{k: r[k] for k in DETERMINISTIC} for r in csv.DictReader(open(path))]


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray as dsrpipe starts one (2 CPUs, every listener on 127.0.0.1), in this process."""
    from dsrpipe.executors.ray import start_local

    started = time.perf_counter()
    for key, value in LOCAL_ENV.items():
        os.environ[key] = value
    ray = pytest.importorskip("ray")
    address = start_local(cpus=2)
    print(f"ray start: {time.perf_counter() - started:.1f} s")
    yield address
    ray.shutdown()


def ray_processes():
    return [p for p in helpers._tree(os.getpid()) if p != os.getpid()]


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def listening(pids):
    found = {}
    table = helpers._listening_inodes()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target.removeprefix("socket:[").removesuffix("]")
            if target.startswith("socket:[") and inode in table:
                ip = helpers.address(table[inode])
                found[getattr(ip, "ipv4_mapped", None) or ip] = pid
    return found


# --- Ray -----------------------------------------------------------------------------------------
def test_a_grid_on_ray_has_the_rows_of_a_local_run_and_ray_listens_on_loopback(tmp_path, ray_address):
    grid = write_grid(tmp_path, sparsities=[0.8, 0.9])  # 4 runs
    on_ray = compare(
        grid, "--out", tmp_path / "ray", "--jobs", "2", "--executor", "ray", "--address", ray_address
    )
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert "submitted to ray as dsrpipe-compare-" in on_ray.stderr
    seen = listening(ray_processes())
    assert seen and all(ip.is_loopback for ip in seen), seen
    local = compare(grid, "--out", tmp_path / "local", "--jobs", "2")
    assert local.returncode == 0, local.stderr[-3000:]
    ray_rows, local_rows = rows(tmp_path / "ray/g/results.csv"), rows(tmp_path / "local/g/results.csv")
    assert len(ray_rows) == 4 and ray_rows == local_rows


def test_a_killed_ray_worker_is_retried_and_the_run_resumes(tmp_path, ray_address):
    from dsrpipe.executors.ray import RayExecutor

    raw = fast("k", epochs=40)
    (tmp_path / "k.yaml").write_text(yaml.safe_dump(raw))
    executor = RayExecutor(Resources(cpus=1), "dsrpipe-test-kill", ray_address)
    log = tmp_path / "k.log"
    spec = JobSpec(
        "k",
        "dsrpipe",
        ["run", str(tmp_path / "k.yaml"), "--out", str(tmp_path / "out"), "--no-progress"],
        log,
        dict(ENV),
    )
    job = executor.submit(spec)
    deadline = time.monotonic() + 120
    while "train epoch 3/" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and executor.poll(job) is None, log.read_text()
        time.sleep(0.1)
    [worker] = {parent(p) for p in ray_processes() if str(tmp_path / "k.yaml").encode() in cmdline(p)}
    os.kill(worker, signal.SIGKILL)
    assert executor.wait(job, timeout=180) == 0, log.read_text()
    text = log.read_text()
    assert text.count("$ python -m dsrpipe run") == 2 and "train: resuming after epoch" in text, text
    run = tmp_path / "out/k"
    assert (run / "model.onnx").exists() and (run / "report.json").exists()
    # SIGKILL may leave a checkpoint's temporary beside it, never a half-written model
    assert not list(run.rglob(".model*")) and onnx.load(run / "model.onnx").graph.node
    executor.shutdown()


def test_watch_on_ray_reattaches_after_a_kill_9_and_runs_each_job_once(tmp_path, ray_address):
    from .test_watch import Watcher

    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    (drop / "a.yaml").write_text(pipeline(epochs=3))
    (drop / "b.yaml").write_text(pipeline(epochs=1, seed=1))
    args = ("--executor", "ray", "--address", ray_address, "--workers", "2")
    w = Watcher(tmp_path, drop, out, *args)
    w.wait_for(lambda: any(j["engine_job"] for j in jobs(drop)), "a job on ray")
    w.proc.kill()
    w.proc.wait()
    w = Watcher(tmp_path, drop, out, *args)
    try:
        w.wait_for(
            lambda: len(jobs(drop)) == 2 and all(j["state"] == "done" for j in jobs(drop)), "both done", 180
        )
        assert "state=reattached" in w.log()
    finally:
        assert w.stop() == 0
    assert [(j["state"], j["attempts"], j["engine"]) for j in jobs(drop)] == [("done", 1, "ray")] * 2
    assert (out / "a" / "model.onnx").exists() and (out / "b" / "model.onnx").exists()
    status = CliRunner().invoke(app, ["status", str(drop), "--json"])
    assert '"engine_job": "dsrpipe-watch-' in status.output


# --- Slurm (submitit's local executor) -------------------------------------------------------------
def test_a_grid_through_submitit_locally(tmp_path):
    grid = write_grid(tmp_path, cluster={"local": True, "cpus": 1})
    result = compare(grid, "--out", tmp_path / "out", "--jobs", "2", "--executor", "slurm")
    assert result.returncode == 0, result.stderr[-3000:]
    table = rows(tmp_path / "out/g/results.csv")
    assert [r["status"] for r in table] == ["ok", "ok"]
    assert "submitted to slurm as" in result.stderr


def test_a_preempted_slurm_job_is_requeued_and_resumes(tmp_path):
    pytest.importorskip("submitit")
    from dsrpipe.executors.slurm import SlurmExecutor

    (tmp_path / "p.yaml").write_text(yaml.safe_dump(fast("p", epochs=40)))
    executor = SlurmExecutor(Resources(cpus=1), tmp_path / "slurm", local=True)
    log = tmp_path / "p.log"
    spec = JobSpec(
        "p",
        "dsrpipe",
        ["run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "out"), "--no-progress"],
        log,
        dict(ENV),
    )
    job = executor.submit(spec)
    deadline = time.monotonic() + 120
    while "train epoch 3/" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and executor.poll(job) is None, log.read_text()
        time.sleep(0.1)
    executor.interrupt(job)  # SIGUSR2, as Slurm sends it before preemption
    assert executor.wait(job, timeout=180) == 0, log.read_text()
    text = log.read_text()
    assert text.count("$ python -m dsrpipe run") == 2 and "train: resuming after epoch" in text, text
    assert (tmp_path / "out/p/model.onnx").exists()


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    grid = write_grid(tmp_path, cluster={"partition": "gpu", "gpus": 2, "time": 90})
    result = CliRunner().invoke(
        app, ["compare", str(grid), "--out", str(tmp_path / "out"), "--executor", "slurm", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90"):
        assert line in script, script
    assert not (tmp_path / "out").exists()


# --- bad input -------------------------------------------------------------------------------------
def one_line_exit_2(args, tmp_path, **env):
    result = subprocess.run(
        [sys.executable, "-m", "dsrpipe", *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **env},
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_cluster_input_is_one_line_and_submits_nothing(tmp_path, monkeypatch):
    grid = write_grid(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    compare_args = ["compare", grid, "--out", out]
    # an address where nothing listens
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in one_line_exit_2(
        [*compare_args, "--executor", "ray", "--address", "127.0.0.1:9"], tmp_path
    )
    # zero or negative resources
    assert "cpus per job" in one_line_exit_2(
        [*compare_args, "--executor", "slurm", "--cpus-per-job", "0"], tmp_path
    )
    assert "gpus per job" in one_line_exit_2(
        [*compare_args, "--executor", "ray", "--gpus-per-job", "-1"], tmp_path
    )
    # slurm with no sbatch and no `cluster: local`
    assert "no sbatch" in one_line_exit_2(
        [*compare_args, "--executor", "slurm"], tmp_path, PATH="/nonexistent"
    )
    # the output folder the workers write is not the one read here
    elsewhere = tmp_path / "worker-disk"
    local_grid = write_grid(tmp_path, cluster={"local": True})
    line = one_line_exit_2(
        ["compare", local_grid, "--out", out, "--executor", "slurm"], tmp_path, **{PROBE_ENV: str(elsewhere)}
    )
    assert f"the output folder {out / 'g' / 'runs'} is not shared" in line
    assert not (out / "g" / "runs").exists() or not any((out / "g" / "runs").iterdir())
    # without the extra installed
    for module, engine in (("ray", "ray"), ("submitit", "slurm")):
        monkeypatch.setitem(sys.modules, module, None)
        result = CliRunner().invoke(app, [*map(str, compare_args), "--executor", engine])
        assert result.exit_code == 2 and result.output.strip() == (
            f"error: --executor {engine} needs the {engine} extra: pip install 'dsrpipe[{engine}]'"
        ), result.output
    assert (out / "keep.txt").read_text() == "mine" and not (out / "g" / "logs").exists()
