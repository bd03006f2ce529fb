"""--executor ray and --executor slurm with real engines on this machine: one local Ray (2 CPUs,
loopback) shared by the Ray tests, submitit's local executor for Slurm (`cluster: local`)."""

import csv
import os
import re
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
from dsrpipe.errors import UserError
from dsrpipe.executors import Resources
from dsrpipe.executors.base import PROBE_ENV
from dsrpipe.executors.ray import LOCAL_ENV

from . import helpers
from .test_hostile import assert_one_line_error, dsrpipe
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


def with_ray_env():
    """The environment, with what the test's Ray start added (its auth mode, which clients need)."""
    return {**os.environ, **ENV}


def compare(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "dsrpipe", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        env=with_ray_env(),
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
    """{IP: pid} of the sockets that `pids` listen on (an IPv4-mapped IPv6 address as IPv4)."""
    table = helpers._listening_inodes()
    return {
        getattr(ip, "ipv4_mapped", None) or ip: pid
        for pid in pids
        for ip in helpers.listening_addresses(pid, table)
    }


# --- Ray -----------------------------------------------------------------------------------------
def test_a_grid_on_ray_cancels_on_ctrl_c_resumes_and_has_the_rows_of_a_local_run(
    tmp_path, ray_address, local_grid
):
    """test_reports' 4-run grid on Ray: stopped with Ctrl-C once its jobs are submitted (they are
    cancelled, and it says so), run again to its end; its table has the local run's rows, and
    Ray listens on loopback only."""
    grid, local_out, local = local_grid
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "ray"
    args = [grid, "--out", out, "--jobs", "2", "--executor", "ray", "--address", ray_address]
    log = tmp_path / "interrupted.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen(
            [sys.executable, "-m", "dsrpipe", "compare", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=with_ray_env(),
            preexec_fn=helpers.sigint_as_a_terminal_sends_it,
        )
    deadline = time.monotonic() + 120
    while log.read_text().count("submitted to ray as dsrpipe-compare-") < 2:
        assert time.monotonic() < deadline and first.poll() is None, log.read_text()
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130, log.read_text()
    assert "cancelled 2 ray job(s)" in log.read_text(), log.read_text()
    jobs_of_the_grid = lambda: [p for p in ray_processes() if str(out).encode() in cmdline(p)]  # noqa: E731
    deadline = time.monotonic() + 30
    while jobs_of_the_grid():
        assert time.monotonic() < deadline, "a cancelled job still runs"
        time.sleep(0.2)

    on_ray = compare(*args)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    seen = listening(ray_processes())
    assert seen and all(ip.is_loopback for ip in seen), seen
    ray_rows, local_rows = rows(out / "g/results.csv"), rows(local_out / "g/results.csv")
    assert len(ray_rows) == 4 and ray_rows == local_rows


def test_watch_on_ray_reattaches_retries_requeues_and_leaves_its_jobs_running_on_sigterm(
    tmp_path, ray_address
):
    """watch --executor ray with two drops, through three daemons:
    - the first is killed with SIGKILL while both jobs run on Ray; then a's task is cancelled
      outside dsrpipe, and b's Ray worker is killed with SIGKILL mid-training;
    - Ray retries b, which resumes from its checkpoint; the second daemon re-attaches it (never
      submits it twice) and requeues a, which Ray lost; SIGTERM stops it with a running again,
      and leaves its jobs running on Ray;
    - a daemon without --executor ray refuses to take them over; the third re-attaches them.
    Each job ends once, done, with one model and no half-written one."""
    import ray

    from .test_watch import Watcher

    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    (drop / "a.yaml").write_text(pipeline(epochs=3))
    subset = {"dataset": "digits", "max_train": 256, "max_test": 128}
    (drop / "b.yaml").write_text(pipeline(epochs=40, seed=1, data=subset))

    def daemon():
        return Watcher(
            tmp_path,
            drop,
            out,
            "--executor",
            "ray",
            "--address",
            ray_address,
            "--workers",
            "2",
            env=with_ray_env(),
        )

    def job(name):
        return next((j for j in jobs(drop) if j["name"] == name), {})

    def processes_of(name):
        return [p for p in ray_processes() if str(drop / ".dsrpipe" / "jobs" / name).encode() in cmdline(p)]

    w = daemon()
    w.wait_for(lambda: job("a").get("engine_job") and job("b").get("engine_job"), "both jobs on ray")
    w.proc.kill()
    w.proc.wait()
    owner, _, key = job("a")["engine_job"].partition("/")
    ray.get(ray.get_actor(owner, namespace="dsrpipe").cancel.remote(key))  # outside dsrpipe
    deadline = time.monotonic() + 120
    b_log = drop / ".dsrpipe/jobs/b/engine.log"  # what the job's command printed, on the worker
    while "train epoch 3/" not in (b_log.read_text() if b_log.exists() else ""):
        assert time.monotonic() < deadline, "b never trained"
        time.sleep(0.1)
    [worker] = {parent(p) for p in processes_of("b")}
    os.kill(worker, signal.SIGKILL)

    w = daemon()
    w.wait_for(lambda: job("a")["state"] == "running" and job("a")["attempts"] == 2, "a submitted again")
    assert "job=b state=reattached" in w.log() and "job=a state=queued" in w.log(), w.log()
    assert w.stop() == 0
    assert re.search(r"leaving [12] job\(s\) running on ray", w.log()), w.log()
    deadline = time.monotonic() + 60  # a still runs on Ray, its daemon gone
    while not processes_of("a"):
        assert time.monotonic() < deadline and job("a")["state"] == "running", "a stopped with its daemon"
        time.sleep(0.1)

    # a daemon that runs its jobs here cannot re-attach them: it says so, and leaves them alone
    local = dsrpipe("watch", drop, "--out", out, "--once", cwd=tmp_path)
    last = local.stderr.strip().splitlines()[-1]
    assert local.returncode == 2 and re.match(r"error: job [ab] runs on ray \(job dsrpipe-watch-", last), last
    assert job("a")["state"] == "running"
    deadline = time.monotonic() + 120  # a ends on Ray while no daemon watches: re-attached, it is done
    while processes_of("a") or not (out / "a" / "report.json").exists():
        assert time.monotonic() < deadline, "a never ended"
        time.sleep(0.2)

    w = daemon()
    try:
        w.wait_for(lambda: job("a")["state"] == job("b")["state"] == "done", "both done", 180)
        assert "state=reattached" in w.log(), w.log()
    finally:
        assert w.stop() == 0
    assert [(j["name"], j["state"], j["attempts"], j["engine"]) for j in jobs(drop)] == [
        ("a", "done", 2, "ray"),
        ("b", "done", 1, "ray"),
    ]
    b = b_log.read_text()
    assert b.count("$ python -m dsrpipe.watch") == 2 and "train: resuming after epoch" in b, b
    for name in ("a", "b"):  # SIGKILL may leave a checkpoint's temporary, never a half-written model
        assert not list((out / name).rglob(".model*")) and onnx.load(out / name / "model.onnx").graph.node
    status = CliRunner().invoke(app, ["status", str(drop), "--json"])
    assert '"engine_job": "dsrpipe-watch-' in status.output


# --- Slurm (submitit's local executor) -------------------------------------------------------------
def test_a_grid_through_submitit_locally_where_a_preempted_job_is_requeued_and_resumes(tmp_path):
    grid = write_grid(tmp_path, base=fast(epochs=60), cluster={"local": True, "cpus": 1})
    with open(tmp_path / "compare.log", "w") as stderr:
        compare = subprocess.Popen(
            [sys.executable, "-m", "dsrpipe", "compare", str(grid), "--out", str(tmp_path / "out")]
            + ["--jobs", "2", "--executor", "slurm"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=ENV,
        )
    log = tmp_path / "out/g/logs/g-dsr-s0.9-seed0.log"
    deadline = time.monotonic() + 120
    while "train epoch 3/" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and compare.poll() is None, (tmp_path / "compare.log").read_text()
        time.sleep(0.1)
    # Slurm's preemption signal, as Slurm sends it: to every process of the job's step, the
    # submitit task that runs the job and the dsrpipe run it started
    [run] = [p for p in helpers._tree(compare.pid) if b"g-dsr-s0.9-seed0.yaml" in cmdline(p)]
    for pid in [parent(run), *helpers._tree(run)]:
        os.kill(pid, signal.SIGUSR2)
    assert compare.wait(timeout=240) == 0, (tmp_path / "compare.log").read_text()
    assert "submitted to slurm as" in (tmp_path / "compare.log").read_text()
    assert [r["status"] for r in rows(tmp_path / "out/g/results.csv")] == ["ok", "ok"]
    text = log.read_text()
    assert text.count("$ python -m dsrpipe run") == 2 and "train: resuming after epoch" in text, text
    # the run was stopped gently (submitit's handler turned the signal into a SIGTERM), not killed
    assert "terminated: completed epochs are checkpointed" in text, text


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


@pytest.mark.parametrize("control", ["\n", "\r"], ids=["line break", "carriage return"])
def test_the_sbatch_script_runs_no_command_planted_in_a_path(tmp_path, control):
    """`--out` holding $(...) and backticks, quotes and spaces: the printed sbatch script, run by
    bash under a fake srun, hands the path to srun as it is and runs nothing of it. The same path
    with a line break (which would end an #SBATCH line, whose value bash then runs) or another
    control character is refused in one line, and no script is printed."""
    marker = tmp_path / "pwned"
    planted = f"$(touch {marker})`touch {marker}`"
    bin_dir, srun_args = tmp_path / "bin", tmp_path / "srun-args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    grid = write_grid(tmp_path)

    def run_script(script):
        (tmp_path / "job.sh").write_text(script)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(srun_args)}
        return subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True)

    def dry_run(out):
        return dsrpipe("compare", grid, "--out", out, "--executor", "slurm", "--dry-run", cwd=tmp_path)

    quoted = tmp_path / f"o '\" {planted}"
    result = dry_run(quoted)
    assert result.returncode == 0, result.stderr
    ran = run_script(result.stdout)
    assert ran.returncode == 0, ran.stderr
    assert not marker.exists()
    assert srun_args.read_text().split("\0")[-2] == str(quoted / "g" / "slurm")  # the folder, verbatim

    hostile = f"{tmp_path}/o{control}{planted}"
    result = dry_run(hostile)
    if result.returncode == 0:  # printed after all: whatever it holds must still run nothing
        run_script(result.stdout)
    assert not marker.exists(), "a command planted in --out ran"
    assert_one_line_error(
        result, "error: the Slurm jobs' folder (in --out) " + f"{tmp_path}/o{control!r}"[:-1].replace("'", "")
    )
    assert "line break or another control character" in result.stderr and not result.stdout


@pytest.mark.parametrize("partition", ["gpu\n", "gpu\nx", "gpu\r", "gpu x"])
def test_a_partition_is_one_slurm_name_whole(tmp_path, partition):
    """The partition is written into the sbatch script: a final line break (which `$` lets
    through where `fullmatch` does not) is refused like any other, from the command line and
    from the grid's `cluster:`, in one line that quotes it escaped."""
    with pytest.raises(UserError, match=r"is no Slurm partition name \(1 to 64 letters") as refused:
        Resources(partition=partition)
    assert "\n" not in str(refused.value) and "\r" not in str(refused.value)
    grid = write_grid(tmp_path)
    assert_one_line_error(
        dsrpipe("compare", grid, "--executor", "slurm", "--dry-run", "--partition", partition, cwd=tmp_path),
        "is no Slurm partition name",
    )
    grid = write_grid(tmp_path, cluster={"partition": partition})
    assert_one_line_error(
        dsrpipe("compare", grid, "--executor", "slurm", "--dry-run", cwd=tmp_path),
        "cluster.partition: no Slurm partition name (1 to 64 letters, digits and _.,-)",
    )
    assert Resources(partition="gpu,debug_2.a-b").partition == "gpu,debug_2.a-b"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720, 0o702])
def test_a_jobs_folder_that_others_can_write_is_refused(tmp_path, mode):
    """Not only 0777: a folder that the group, or anyone else, may write could get a pickle of
    theirs loaded. Readable by others is fine (0755), as is this user's own (0700)."""
    from dsrpipe.executors.slurm import private_folder

    folder = tmp_path / "slurm"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(UserError, match="must be a folder of this user's that no one else can write"):
        private_folder(folder)
    for fine in (0o700, 0o755):
        folder.chmod(fine)
        private_folder(folder)


def test_poll_tells_a_preempted_job_from_a_lost_one(tmp_path):
    """A job Slurm ended without its result: preempted is interrupted (its run resumes when it is
    started again), a node failure or a cancellation outside dsrpipe is lost; a job that ran to
    its end gives its exit code, one whose task raised gives 1."""
    import submitit

    from dsrpipe.errors import EXIT_INTERRUPTED
    from dsrpipe.executors import LOST
    from dsrpipe.executors.slurm import SlurmExecutor

    class Ended:
        def __init__(self, state, result=None):
            self.state, self._result = state, result

        def done(self):
            return True

        def result(self):
            if isinstance(self._result, BaseException):
                raise self._result
            if self._result is None:
                raise submitit.core.utils.UncompletedJobError(f"job ended {self.state}")
            return self._result

    executor = SlurmExecutor(Resources(), tmp_path / "slurm", dry_run=True)
    executor.jobs = {
        "1": Ended("PREEMPTED"),
        "2": Ended("NODE_FAIL"),
        "3": Ended("CANCELLED by 1000"),
        "4": Ended("COMPLETED", 3),
        "5": Ended("FAILED", RuntimeError("the task raised")),
    }
    assert [executor.poll(i) for i in "12345"] == [EXIT_INTERRUPTED, LOST, LOST, 3, 1]


# --- bad input -------------------------------------------------------------------------------------
def test_bad_cluster_input_is_one_line_and_submits_nothing(tmp_path, monkeypatch):
    grid = write_grid(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def refused(*args, expected):
        assert_one_line_error(dsrpipe("compare", grid, "--out", out, *args, cwd=tmp_path), expected)

    # an address where nothing listens
    refused(
        "--executor",
        "ray",
        "--address",
        "127.0.0.1:9",
        expected="cannot reach the Ray cluster at 127.0.0.1:9",
    )
    # zero or negative resources
    refused("--executor", "slurm", "--cpus-per-job", "0", expected="cpus per job")
    refused("--executor", "ray", "--gpus-per-job", "-1", expected="gpus per job")
    # slurm with no sbatch and no `cluster: local`
    with monkeypatch.context() as env:
        env.setenv("PATH", "/nonexistent")
        refused("--executor", "slurm", expected="no sbatch")
    # the output folder the workers write is not the one read here
    write_grid(tmp_path, cluster={"local": True})
    with monkeypatch.context() as env:
        env.setenv(PROBE_ENV, str(tmp_path / "worker-disk"))
        refused("--executor", "slurm", expected=f"the output folder {out / 'g' / 'runs'} is not shared")
    assert not (out / "g" / "runs").exists() or not any((out / "g" / "runs").iterdir())
    # submitit's pickles (loaded to run a job, and to read its result) only in a folder no one else
    # can write; for watch, never where drops are written
    (out / "g" / "slurm").mkdir(parents=True, exist_ok=True)
    (out / "g" / "slurm").chmod(0o777)
    refused("--executor", "slurm", expected="must be a folder of this user's that no one else can write")
    (tmp_path / "drop").mkdir()
    assert_one_line_error(
        dsrpipe("watch", "drop", "--out", "drop/models", "--executor", "slurm", cwd=tmp_path),
        "--out must be outside the drop folder",
    )
    # without the extra installed
    for module, engine in (("ray", "ray"), ("submitit", "slurm")):
        with monkeypatch.context() as missing:
            missing.setitem(sys.modules, module, None)
            refused(
                "--executor",
                engine,
                expected=f"error: --executor {engine} needs the {engine} extra: pip install 'dsrpipe[{engine}]'",
            )
    assert (out / "keep.txt").read_text() == "mine" and not (out / "g" / "logs").exists()


def test_watch_asks_the_engine_for_the_jobs_limits(tmp_path, monkeypatch):
    """watch's job options become what each engine job asks for: the resources the daemon builds,
    and the sbatch parameters they make."""
    from dsrpipe.executors.slurm import SlurmExecutor
    from dsrpipe.watch import daemon

    asked = {}

    def executor_made(engine, resources, **where):
        asked.update(engine=engine, resources=resources)
        raise UserError("enough: the daemon would start now")

    monkeypatch.setattr(daemon, "make_executor", executor_made)
    (tmp_path / "drop").mkdir()
    limits = ["--job-memory", "8G", "--job-timeout", "90m", "--cpus-per-job", "4", "--gpus-per-job", "2"]
    result = dsrpipe(
        "watch", "drop", "--out", "models", "--executor", "slurm", "--partition", "gpu", *limits, cwd=tmp_path
    )
    assert_one_line_error(result, "enough: the daemon would start now")
    wanted = Resources(cpus=4, gpus=2, nproc=1, memory=8 * 2**30, time=5400.0, partition="gpu")
    assert asked == {"engine": "slurm", "resources": wanted}
    sbatch = SlurmExecutor(wanted, tmp_path / "slurm", dry_run=True).parameters()
    assert {k: sbatch[k] for k in ("partition", "mem", "time", "gpus_per_node", "cpus_per_task")} == {
        "partition": "gpu",
        "mem": "8192M",
        "time": 90,
        "gpus_per_node": 2,
        "cpus_per_task": 4,
    }
