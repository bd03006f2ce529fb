"""--executor ray and --executor slurm with real engines on this machine: one local Ray (2 CPUs,
loopback) shared by the Ray tests, submitit's local executor for Slurm (`cluster: local`)."""

import csv
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from dsrpipe import compare as compare_module
from dsrpipe import files
from dsrpipe.cli import app
from dsrpipe.errors import EXIT_TERMINATED, UserError
from dsrpipe.executors import LOST, Executor, JobSpec, Resources
from dsrpipe.executors import slurm as slurm_module
from dsrpipe.executors.base import PROBE_ENV
from dsrpipe.executors.ray import MAX_RETRIES
from dsrpipe.executors.ray_cluster import ANSWER_ENV, resolve
from dsrpipe.executors.ray_head import LOCAL_ENV
from dsrpipe.stopping import stop_line
from dsrpipe.watch.folder import DropFolder
from dsrpipe.watch.options import WatchOptions
from dsrpipe.watch.runner import Runner

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


def compare(*args, timeout=300, env=None):
    """`dsrpipe compare ARGS` run to its end; `env`: changes to with_ray_env() (None: unset)."""
    changed = {**with_ray_env(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dsrpipe", "compare", *map(str, args)],
        capture_output=True,
        text=True,
        env={k: v for k, v in changed.items() if v is not None},
        timeout=timeout,
    )


def started_compare(tmp_path, *args, env=None):
    """`dsrpipe compare ARGS` started, its stderr in a file: (process, the file)."""
    log = tmp_path / f"compare-{time.monotonic_ns()}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsrpipe", "compare", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**with_ray_env(), **(env or {})},
            preexec_fn=helpers.sigint_as_a_terminal_sends_it,
        )
    return proc, log


def wait_until(predicate, what, timeout=120, proc=None):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"exited ({proc.returncode}) waiting for {what}"
        time.sleep(0.05)
    return value


def ray_session(pids):
    """The session folder of the Ray whose GCS is among `pids` (its command line names it)."""
    for pid in pids:
        for arg in cmdline(pid).split(b"\0"):
            if arg.startswith(b"--session-dir="):
                return Path(arg.partition(b"=")[2].decode())
    return None


def alive(pids):
    """Those of `pids` that still run (a zombie does not)."""

    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    return [p for p in pids if running(p)]


def rows(path):
    return [{k: r[k] for k in DETERMINISTIC} for r in csv.DictReader(open(path))]


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray as dsrpipe starts one (2 CPUs, every listener on 127.0.0.1; its head is a child
    of this process), joined by this process, which imported ray first."""
    pytest.importorskip("ray")
    from dsrpipe.executors.ray_cluster import start_local, stop_local

    started = time.perf_counter()
    address = start_local(cpus=2)
    print(f"ray start: {time.perf_counter() - started:.1f} s")
    yield address
    stop_local()


def ray_processes():
    return [p for p in helpers._tree(os.getpid()) if p != os.getpid()]


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def dsrpipe_actors(timeout=30):
    """The actors that dsrpipe's submitters have in the test's Ray once their removal has gone
    through (the name registry lets go of a killed actor a little later)."""
    import ray

    deadline = time.monotonic() + timeout
    while (names := ray.util.list_named_actors()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return names


def listening(pids):
    """{IP: pid} of the sockets that `pids` listen on (an IPv4-mapped IPv6 address as IPv4)."""
    table = helpers._listening_inodes()
    return {
        getattr(ip, "ipv4_mapped", None) or ip: pid
        for pid in pids
        for ip in helpers.listening_addresses(pid, table)
    }


# --- Ray -----------------------------------------------------------------------------------------
@pytest.mark.slow
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
    assert dsrpipe_actors() == []  # both compares' actors went with their last job


@pytest.mark.slow
def test_watch_on_ray_reattaches_retries_requeues_and_leaves_its_jobs_running_on_sigterm(
    tmp_path, ray_address
):
    """watch --executor ray with two drops, through three daemons:
    - the first is killed with SIGKILL while both jobs run on Ray; then a's task is cancelled
      outside dsrpipe, and b's Ray worker is killed with SIGKILL mid-training;
    - Ray retries b, which resumes from its checkpoint; the second daemon re-attaches it (never
      submits it twice) and requeues a, which Ray lost; SIGTERM stops it with a running again,
      and leaves its jobs running on Ray;
    - a daemon without --executor ray refuses to take them over; the third, given no --address,
      joins the cluster that the journal names and re-attaches them (it used to start a Ray of
      its own, declare both lost and fail b, whose lock its first attempt still held).
    Each job ends once, done, with one model and no half-written one; what a job printed is in
    its job.log; the daemon's actor goes with the last job."""
    import ray

    from .test_watch import Watcher

    drop, out = tmp_path / "drop", tmp_path / "out"
    drop.mkdir()
    (drop / "a.yaml").write_text(pipeline(epochs=3))
    subset = {"dataset": "digits", "max_train": 256, "max_test": 128}
    (drop / "b.yaml").write_text(pipeline(epochs=40, seed=1, data=subset))

    def daemon(*address):
        return Watcher(
            tmp_path, drop, out, "--executor", "ray", *address, "--workers", "2", env=with_ray_env()
        )

    def job(name):
        return next((j for j in jobs(drop) if j["name"] == name), {})

    def processes_of(name):
        return [p for p in ray_processes() if str(drop / ".dsrpipe" / "jobs" / name).encode() in cmdline(p)]

    w = daemon("--address", ray_address)
    w.wait_for(lambda: job("a").get("engine_job") and job("b").get("engine_job"), "both jobs on ray")
    w.proc.kill()
    w.proc.wait()
    owner, _, key = job("a")["engine_job"].partition("/")
    ray.get(ray.get_actor(owner, namespace="dsrpipe").cancel.remote(key))  # outside dsrpipe
    deadline = time.monotonic() + 120
    b_log = drop / ".dsrpipe/jobs/b/job.log"  # what the job's command printed, on the worker
    while "train epoch 3/" not in (b_log.read_text() if b_log.exists() else ""):
        assert time.monotonic() < deadline, "b never trained"
        time.sleep(0.1)
    [worker] = {parent(p) for p in processes_of("b")}
    os.kill(worker, signal.SIGKILL)

    w = daemon("--address", ray_address)
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
    assert local.returncode == 2 and re.match(
        rf"error: job [ab] runs on ray at {ray_address} \(job dsrpipe-watch-", last
    )
    assert last.endswith(f"restart the daemon with --executor ray --address {ray_address} to re-attach it"), (
        last
    )
    assert job("a")["state"] == "running"
    deadline = time.monotonic() + 120  # a ends on Ray while no daemon watches: re-attached, it is done
    while processes_of("a") or not (out / "a" / "report.json").exists():
        assert time.monotonic() < deadline, "a never ended"
        time.sleep(0.2)

    status = CliRunner().invoke(app, ["status", str(drop)])
    assert "ray job dsrpipe-watch-" in status.output and f" at {ray_address}" in status.output
    w = daemon()  # no --address: the journal's
    try:
        w.wait_for(lambda: job("a")["state"] == job("b")["state"] == "done", "both done", 180)
        assert f"joining the Ray cluster at {ray_address}" in w.log() and "state=reattached" in w.log(), (
            w.log()
        )
        assert dsrpipe_actors() == []  # no job left: the daemon let its actor go
    finally:
        assert w.stop() == 0
    assert [(j["name"], j["state"], j["attempts"], j["engine"]) for j in jobs(drop)] == [
        ("a", "done", 2, "ray"),
        ("b", "done", 1, "ray"),
    ]
    b = b_log.read_text()
    assert b.count("$ python -m dsrpipe.jobs") == 2 and "train: resuming after epoch" in b, b
    for name in ("a", "b"):  # SIGKILL may leave a checkpoint's temporary, never a half-written model
        assert not list((out / name).rglob(".model*")) and onnx.load(out / name / "model.onnx").graph.node
    status = CliRunner().invoke(app, ["status", str(drop), "--json"])
    assert '"engine_job": "dsrpipe-watch-' in status.output


@pytest.mark.slow
def test_a_local_ray_joined_after_ray_was_imported_listens_on_loopback_only_and_keeps_its_files_private(
    tmp_path,
):
    """A local Ray started by a process that had imported ray already (Ray reads its cluster
    mode once, when it is imported; without it off, it resolves 127.0.0.1 to the host's address,
    and connects and listens there): its every process and the process that joins it listen on
    loopback only. Ray's session folder is inside a 0700 folder that is gone once it stops."""
    script = """if True:
        import json, os, time
        import ray
        from dsrpipe.executors import ray_cluster
        ray_cluster.start_local(cpus=1)
        assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()  # a worker ran it
        folder = ray_cluster._head.folder
        mode = oct(os.stat(folder).st_mode & 0o777)
        session = ray._private.worker._global_node.get_session_dir_path()
        time.sleep(1)  # the listeners sampled
        ray_cluster.stop_local()
        print(json.dumps([str(folder), mode, session]))
    """
    env = {k: v for k, v in with_ray_env().items() if k not in LOCAL_ENV and k != "RAY_ADDRESS"}
    result, seen = helpers.run_listening([sys.executable, "-c", script], timeout=150, env=env)
    helpers.assert_loopback_only(seen)
    assert result.returncode == 0, result.stderr[-3000:]
    folder, mode, session = json.loads(result.stdout.strip().splitlines()[-1])
    assert mode == "0o700" and session.startswith(folder + "/") and not Path(folder).exists()


def test_sigterm_while_the_local_ray_starts_is_143_one_line_and_leaves_no_process(tmp_path):
    """SIGTERM to `compare --executor ray` while its local Ray starts: exit 143, the one line,
    and nothing of that Ray left, its folder included (it used to exit 15, and leave two of
    Ray's processes behind)."""
    proc, log = started_compare(
        tmp_path, write_grid(tmp_path), "--out", tmp_path / "out", "--executor", "ray"
    )
    try:
        session = wait_until(lambda: ray_session(helpers._tree(proc.pid)), "Ray starting", proc=proc)
        tree = helpers._tree(proc.pid)[1:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == EXIT_TERMINATED, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert log.read_text().splitlines() == [stop_line(signal.SIGTERM)], log.read_text()
    wait_until(lambda: not alive(tree), "the local Ray's processes gone", timeout=30)
    wait_until(lambda: not session.exists(), "the local Ray's folder gone", timeout=10)


@pytest.mark.slow
def test_sigterm_to_a_compare_on_ray_is_143_and_one_line(tmp_path, ray_address):
    """Once Ray is joined, its handlers are not: SIGTERM is dsrpipe's (it used to end in Ray's
    stack dump, twice, and exit 15). The job is cancelled, and the compare's actor goes."""
    out = tmp_path / "out"
    grid = write_grid(tmp_path, base=fast(epochs=30), seeds=[0])
    proc, log = started_compare(tmp_path, grid, "--out", out, "--executor", "ray", "--address", ray_address)
    try:
        wait_until(lambda: "submitted to ray as" in log.read_text(), "the job submitted", proc=proc)
        run_log = out / "g/logs/g-dsr-s0.9-seed0.log"
        wait_until(lambda: run_log.exists() and "train" in run_log.read_text(), "the run started", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == EXIT_TERMINATED, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.splitlines()[-1] == stop_line(signal.SIGTERM) and text.count("terminated") == 1, text
    assert "cancelled 1 ray job(s)" in text and "SIGTERM received" not in text and "Traceback" not in text
    wait_until(
        lambda: not [p for p in ray_processes() if str(out).encode() in cmdline(p)], "the job gone", 30
    )
    assert dsrpipe_actors() == []


@pytest.mark.slow
def test_kill_9_of_a_compare_on_its_local_ray_leaves_no_process_and_no_folder(tmp_path):
    """After `kill -9` of a compare whose local Ray runs its job, every process of that Ray
    (Ray's agents included, which used to stay 1 to 2 minutes) and the job are gone within
    seconds, and so is Ray's folder."""
    grid = write_grid(tmp_path, base=fast(epochs=30), seeds=[0])
    proc, log = started_compare(tmp_path, grid, "--out", tmp_path / "out", "--executor", "ray")
    try:
        wait_until(lambda: "submitted to ray as" in log.read_text(), "the job submitted", proc=proc)
        tree = helpers._tree(proc.pid)[1:]
        session = ray_session(tree)
        assert session.exists()
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: not alive(tree), "the local Ray's processes gone", timeout=30)
    wait_until(lambda: not session.exists(), "the local Ray's folder gone", timeout=10)


def test_auto_is_this_machines_cluster_or_refused(monkeypatch):
    """`auto` resolves, as Ray reads it, to a cluster on loopback (joined at its IP, however
    spelled), or is one line: a cluster elsewhere must be named, never guessed."""
    monkeypatch.setenv("RAY_ADDRESS", "localhost:6390")
    assert resolve("auto") == ("127.0.0.1:6390", True)
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.7:6390")
    with pytest.raises(UserError, match=r"auto: the Ray cluster it finds, at 192\.0\.2\.7:6390, is not on"):
        resolve("auto")
    assert resolve("192.0.2.7:6390") == ("192.0.2.7:6390", False)  # named, it is taken as it is


@pytest.mark.slow
def test_every_ray_address_is_checked_before_use_and_a_bad_one_is_one_line(
    tmp_path, ray_address, monkeypatch
):
    """No address is waited on for ever: one that answers but not as Ray is refused after
    DSRPIPE_RAY_ANSWER_TIMEOUT; `auto` and 127.1 are the loopback cluster, joined on loopback
    (auto used to go to the host's address and retry there for ever, 127.1 to retry for ever);
    a cluster that wants a token says so; a job that no node can hold is refused at once, naming
    what the nodes have. Nothing is submitted, and no actor is left."""
    grid, out = write_grid(tmp_path), tmp_path / "out"
    port = ray_address.rpartition(":")[2]
    nodes = "127.0.0.1 has 2 CPUs, 0 GPUs"

    on_ray = (grid, "--out", out, "--executor", "ray", "--address")  # then the address
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        http_address = f"127.0.0.1:{server.server_address[1]}"
        refused = compare(*on_ray, http_address, timeout=60, env={ANSWER_ENV: "3"})
        assert_one_line_error(refused, f"nothing at {http_address} answered as a Ray cluster within 3 s")
    finally:
        server.shutdown()
        server.server_close()

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(ray_address)  # as `ray start` records it
    auto = compare(
        *on_ray,
        "auto",
        "--cpus-per-job",
        "8",
        timeout=120,
        env={"RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": None},
    )
    assert_one_line_error(
        auto, f"8 CPUs, 0 GPUs, which no node of the Ray cluster at {ray_address} has: {nodes}"
    )

    no_token = compare(*on_ray, ray_address, timeout=120, env={"RAY_AUTH_MODE": None})
    assert_one_line_error(
        no_token, f"cannot join the Ray cluster at {ray_address}: it asks for its authentication token"
    )
    assert "RAY_AUTH_TOKEN" in no_token.stderr

    def refused(*args, expected):
        assert_one_line_error(
            dsrpipe("compare", grid, "--out", out, "--executor", "ray", *args, cwd=tmp_path), expected
        )

    refused(
        "--address",
        f"127.1:{port}",
        "--gpus-per-job",
        "1",
        expected=f"1 GPUs, which no node of the Ray cluster at {ray_address} has: {nodes}",
    )
    refused("--address", f"localhost:{port}", "--memory-per-job", "1T", expected="1T memory, which no node")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "nothing-recorded"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    refused("--address", "auto", expected="--address auto: no Ray cluster to join here")
    refused("--address", "ray://127.0.0.1:10001", expected="expected host:port of the Ray cluster's head")
    assert not (out / "g" / "logs").exists() and dsrpipe_actors() == []


@pytest.mark.slow
def test_a_job_stopped_by_a_signal_at_every_attempt_ends_interrupted_not_lost(tmp_path, ray_address):
    """Ray retries a job that a signal stopped (it resumes from its checkpoint); once its retries
    are spent, it ends with its own exit code, not as a job the engine lost."""
    from dsrpipe.executors.ray import RayExecutor

    (tmp_path / "stopped.py").write_text("raise SystemExit(143)  # as a run that SIGTERM stopped\n")
    executor = RayExecutor(Resources(), f"dsrpipe-test-{uuid.uuid4().hex[:8]}", ray_address)
    try:
        job = executor.submit(JobSpec("stopped", "stopped", [], tmp_path / "job.log", cwd=str(tmp_path)))
        assert executor.wait(job, timeout=120) == EXIT_TERMINATED
    finally:
        executor.shutdown()
    assert (tmp_path / "job.log").read_text().count("$ python -m stopped") == MAX_RETRIES + 1
    assert dsrpipe_actors() == []


def test_a_second_compare_of_a_grid_is_refused_before_it_starts_or_joins_an_engine(tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started for a compare that is refused")

    monkeypatch.setattr(compare_module.schedule, "make_executor", no_engine)
    grid, folder = write_grid(tmp_path), tmp_path / "out" / "g"
    folder.mkdir(parents=True)
    with files.holding_lock(folder / "compare.lock", str):
        refused = dsrpipe("compare", grid, "--out", tmp_path / "out", "--executor", "ray", cwd=tmp_path)
    assert_one_line_error(refused, f"{folder} is in use by another dsrpipe compare (pid {os.getpid()})")


class KnowsNoJob(Executor):
    """An engine that knows no job: a new local Ray after its daemon was killed, or a cluster
    whose actor was removed."""

    name, remote = "ray", True

    def submit(self, spec):
        raise AssertionError(f"{spec.name} was submitted")

    def poll(self, job_id):
        return LOST

    def cancel(self, job_id):
        pass


def test_a_job_its_engine_lost_is_neither_queued_nor_started_while_a_process_holds_it(tmp_path):
    """The engine says it lost the job, but the job's first attempt still runs (it holds the job's
    lock): the job stays running, and is queued only once the lock is free; and a queued job is
    not started while another process holds its lock (each start used to spend an attempt on
    "another process is running this job", until the job failed)."""
    drop, out = tmp_path / "drop", tmp_path / "out"
    folder = DropFolder(drop, out)
    (folder.jobs_dir / "a").mkdir(parents=True)
    (folder.jobs_dir / "a" / "job.json").write_text("{}")
    journal = folder.open_journal()
    job = {
        "name": "a",
        "drop_path": "a.yaml",
        "kind": "pipeline",
        "sha256": "0",
        "stamp": "",
        "out": str(out),
    }
    job_id = journal.add(**job, state="running", attempts=1, engine="ray", engine_job="dsrpipe-watch-0/a-1")
    runner = Runner(folder, WatchOptions(drop, out=out), lambda: False, KnowsNoJob(Resources()))

    def state():
        row = journal.get(job_id)
        return row["state"], row["attempts"]

    lock = files.exclusive_lock(folder.job_dir(job) / "job.lock")  # the first attempt, still at it
    try:
        runner.recover()
        runner.poll()
        runner.start_jobs()
        assert state() == ("running", 1)
    finally:
        files.release_lock(lock)
    runner.poll()
    assert state() == ("queued", 1)
    lock = files.exclusive_lock(folder.job_dir(job) / "job.lock")  # someone runs it by hand
    try:
        runner.start_jobs()
        assert state() == ("queued", 1)
    finally:
        files.release_lock(lock)
    journal.close()


def test_a_daemon_on_another_ray_refuses_the_jobs_of_a_cluster_that_is_up_and_requeues_those_of_one_gone(
    tmp_path,
):
    """A job recorded on the Ray cluster at an address that still accepts connections is not
    another cluster's to judge: the daemon refuses in one line naming the address to restart it
    with. One whose cluster no longer answers was lost with it: queued again."""
    drop, out = tmp_path / "drop", tmp_path / "out"
    folder = DropFolder(drop, out)
    folder.jobs_dir.mkdir(parents=True)
    journal = folder.open_journal()
    with socket.socket() as up, socket.socket() as gone:
        up.bind(("127.0.0.1", 0))
        up.listen()
        gone.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        addresses = {name: f"127.0.0.1:{s.getsockname()[1]}" for name, s in (("gone", gone), ("up", up))}
        for name, address in addresses.items():
            journal.add(
                **{
                    "name": name,
                    "drop_path": f"{name}.yaml",
                    "kind": "pipeline",
                    "sha256": name,
                    "stamp": "",
                },
                out=str(out),
                state="running",
                attempts=1,
                engine="ray",
                engine_job=f"dsrpipe-watch-0/{name}-1",
                engine_address=address,
            )
        runner = Runner(folder, WatchOptions(drop, out=out), lambda: False, KnowsNoJob(Resources()))
        with pytest.raises(
            UserError, match=f"restart the daemon with --executor ray --address {addresses['up']} "
        ):
            runner.recover()
    assert [(j["name"], j["state"]) for j in journal.jobs()] == [("gone", "queued"), ("up", "running")]
    journal.close()


# --- Slurm (submitit's local executor) -------------------------------------------------------------
def compare_on_local_slurm(tmp_path):
    """A `compare --executor slurm` of two long runs on submitit's local executor, started: the
    process, and the first run's log."""
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
    return compare, log


@pytest.mark.slow
def test_a_grid_through_submitit_locally_where_a_preempted_job_is_requeued_and_resumes(tmp_path):
    compare, log = compare_on_local_slurm(tmp_path)
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


@pytest.mark.slow
def test_sigterm_to_a_compare_on_slurm_is_143_one_line_and_cancels_its_jobs(tmp_path):
    """As on the local executor and on Ray: 143, one `terminated:` line, and no job left running."""
    compare, log = compare_on_local_slurm(tmp_path)
    wait_until(lambda: "train epoch 2/" in (log.read_text() if log.exists() else ""), "training", timeout=120)
    jobs = [p for p in helpers._tree(compare.pid) if b"g-dsr-s0.9-seed" in cmdline(p)]
    compare.send_signal(signal.SIGTERM)
    assert compare.wait(timeout=120) == 143
    text = (tmp_path / "compare.log").read_text()
    assert text.count("terminated:") == 1 and "Traceback" not in text
    assert "cancelled 2 slurm job(s)" in text
    wait_until(lambda: not alive(jobs), "the jobs stopped", timeout=30)


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
    # without the extra installed: ray is imported when a Ray executor is made, submitit with
    # dsrpipe.executors.slurm (None there where it is not installed)
    for engine in ("ray", "slurm"):
        with monkeypatch.context() as missing:
            if engine == "ray":
                missing.setitem(sys.modules, "ray", None)
            else:
                missing.setattr(slurm_module, "submitit", None)
            refused(
                "--executor",
                engine,
                expected=f"error: --executor {engine} needs the {engine} extra: pip install 'dsrpipe[{engine}]'",
            )
    assert (out / "keep.txt").read_text() == "mine" and not (out / "g" / "logs").exists()


@pytest.mark.parametrize("names", ["current", "aliases"])
@pytest.mark.parametrize("command", ["watch", "compare"])
def test_watch_and_compare_ask_the_engine_for_the_jobs_limits_by_the_same_options(
    tmp_path, monkeypatch, command, names
):
    """compare and watch share one executor option group: the same options (or their aliases,
    compare's old names) become the same resources the engine is asked for, and the sbatch
    parameters they make."""
    from dsrpipe.compare import schedule
    from dsrpipe.executors.slurm import SlurmExecutor
    from dsrpipe.watch import daemon

    asked = {}

    def executor_made(engine, resources, **where):
        asked.update(engine=engine, resources=resources)
        raise UserError("enough: the jobs would start now")

    monkeypatch.setattr(daemon if command == "watch" else schedule, "make_executor", executor_made)
    memory, timeout = (
        ("--job-memory", "--job-timeout") if names == "current" else ("--memory-per-job", "--time")
    )
    limits = [
        memory,
        "8G",
        timeout,
        "90m",
        "--cpus-per-job",
        "4",
        "--gpus-per-job",
        "2",
        "--partition",
        "gpu",
    ]
    (tmp_path / "drop").mkdir()
    where = ["drop"] if command == "watch" else [write_grid(tmp_path)]
    result = dsrpipe(command, *where, "--out", "models", "--executor", "slurm", *limits, cwd=tmp_path)
    assert_one_line_error(result, "enough: the jobs would start now")
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
