"""`dsrpipe watch`: real daemons (real watchdog observers) on temporary drop folders, real job
processes, tiny digits pipelines. Each job costs ~3-4 s (train, ONNX export, validation)."""

import errno
import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import onnx
import pytest
import yaml

from dsrpipe.config import parse_pipeline
from dsrpipe.errors import UserError
from dsrpipe.executors.limits import group_memory
from dsrpipe.jobs.job import confine_paths
from dsrpipe.quantities import format_size, parse_duration, parse_size
from dsrpipe.watch.drops import DEFAULT_TEMPLATE, IntakeError, content_hash, drop_stem, slug, stamp
from dsrpipe.watch.folder import DropFolder
from dsrpipe.watch.intake import Intake
from dsrpipe.watch.journal import Journal

from . import helpers
from .helpers import write_tree

# One thread per job: on a small shared machine OpenMP threads fighting for cores make tiny
# models many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("DSRPIPE_DEBUG", None)


def pipeline(name=None, *, epochs=1, width=4, seed=0, **sections):
    """A tiny digits pipeline as YAML text."""
    raw = {
        "seed": seed,
        "data": {"dataset": "digits"},
        "model": {"name": "small-cnn", "options": {"width": width}},
        "sparsity": {"method": "dsr", "sparsity": 0.9, "prune_target": 20, "rewire_periods": {0: 5}},
        "train": {"epochs": epochs, "batch_size": 64},
        "finetune": {"epochs": 0},
        "validate": {"latency_runs": 1},
    }
    if name is not None:
        raw["name"] = name
    for section, values in sections.items():
        merged = isinstance(values, dict) and not (section == "sparsity" and "method" in values)
        raw[section] = {**raw.get(section, {}), **values} if merged else values  # a method: its own options
    return yaml.safe_dump(raw)


TEMPLATE = yaml.safe_dump(
    {  # for dataset drops: 3 classes x 6 images of 8x8 train in a blink
        "model": {"name": "small-cnn", "options": {"width": 4}},
        "sparsity": {"method": "dsr", "sparsity": 0.9, "prune_target": 20, "rewire_periods": {0: 2}},
        "train": {"epochs": 1, "batch_size": 6},
        "finetune": {"epochs": 0},
        "validate": {"latency_runs": 1},
    }
)


def png(seed):
    return helpers.png((8, 8), "L", seed)


def image_tree(prefix=""):
    """train/ (6 per class) and test/ (3 per class) folders of 3 classes of 8x8 grey PNGs."""
    return helpers.image_tree(("ant", "bee", "cat"), {"train": 6, "test": 3}, "L", prefix, (8, 8))


def targz_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def jobs(drop):
    path = drop / ".dsrpipe" / "journal.sqlite"
    if not path.exists():
        return []
    journal = Journal(path, readonly=True)
    try:
        return journal.jobs()
    finally:
        journal.close()


def take_in(drop, out, name):
    """The drop `name` taken in as the daemon takes it (queued, its job folder made, ready to run
    as its worker runs it); returns its DropFolder."""
    folder = DropFolder(drop, out)
    (drop / ".dsrpipe").mkdir()
    folder.open_journal()
    try:
        assert Intake(folder, None, False, lambda: False).take(name) == "queued"
    finally:
        folder.journal.close()
    return folder


def torch_loaded(pid):
    """Whether the process has imported torch, which maps torch's own libraries (torch/lib/libtorch*)."""
    return "/torch/lib/libtorch" in Path(f"/proc/{pid}/maps").read_text()


def job_log(drop, name):
    return (drop / ".dsrpipe" / "jobs" / name / "job.log").read_text()


def cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "dsrpipe", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


class Watcher:
    """A `dsrpipe watch` process with its log in a file."""

    def __init__(self, tmp_path, drop, out, *args, quiet=0.5, env=None):
        self.drop = drop
        self.log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dsrpipe",
                    "watch",
                    str(drop),
                    "--out",
                    str(out),
                    "--quiet-period",
                    str(quiet),
                    *map(str, args),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**ENV, **(env or {})},
                cwd=tmp_path,
            )

    def log(self):
        return self.log_path.read_text(errors="strict")  # the log is text: names in it are escaped

    def wait_for(self, predicate, what, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.log()}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def wait_log(self, pattern, timeout=90):
        return self.wait_for(lambda: re.search(pattern, self.log()), f"/{pattern}/ in the log", timeout)

    def wait_state(self, name, state, timeout=90):
        return self.wait_for(
            lambda: any(j["name"] == name and j["state"] == state for j in jobs(self.drop)),
            f"job {name} {state}",
            timeout,
        )

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def watchers(tmp_path):
    """Start daemons with watchers(drop, out, *args); whatever is left is killed at the end."""
    started = []

    def start(drop, out, *args, **kwargs):
        started.append(Watcher(tmp_path, drop, out, *args, **kwargs))
        return started[-1]

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
        for job in jobs(w.drop):
            if job["state"] == "running" and job["pid"]:
                try:
                    os.killpg(job["pid"], signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def drop(tmp_path):
    (tmp_path / "drop").mkdir()
    return tmp_path / "drop"


# --- pieces ------------------------------------------------------------------------------------


def test_names_sizes_and_content_hashes(tmp_path):
    assert (
        slug("My Photos (2024)") == "My-Photos-2024" and slug("../../evil") == "evil" and slug("???") == "job"
    )
    assert slug("a" * 200) == "a" * 80
    assert [drop_stem(n) for n in ("a.yaml", "b.YML", "c.tar.gz", "d.tgz", "e.zip", "f")] == list("abcdef")
    assert parse_size("1M") == 2**20 and parse_size("1.5G") == 3 * 2**29 and parse_size("512") == 512
    assert [format_size(parse_size(t)) for t in ("800M", "1.5G", "2G")] == ["800M", "1.5G", "2G"]
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400
    built_in = yaml.safe_load(DEFAULT_TEMPLATE)  # as a dataset drop gets it
    built_in.setdefault("data", {}).update(dataset="imagefolder", root=str(tmp_path))  # as its overrides do
    assert parse_pipeline({**built_in, "name": "drop"}).data.image_size is None  # sized from the data

    folder = write_tree(tmp_path / "ds", image_tree())
    first = content_hash(folder)
    (folder / ".ready").touch()
    assert content_hash(folder) == first  # the marker is not content
    before = stamp(folder)
    os.utime(folder / "train/ant/0.png", (1, 1))
    assert content_hash(folder) == first and stamp(folder) != before  # touched: re-hash, same content
    (folder / "train/ant/0.png").write_bytes(png(99))
    assert content_hash(folder) != first
    (folder / "train/ant/inside.png").symlink_to("0.png")  # a link within the folder is fine
    content_hash(folder)
    (folder / "train/ant/escape.png").symlink_to("/etc/passwd")
    with pytest.raises(IntakeError, match="'train/ant/escape.png' is a link to /etc/passwd, outside"):
        content_hash(folder)
    (folder / "train/ant/escape.png").unlink()
    (folder / "train/ant/loop.png").symlink_to("loop.png")
    with pytest.raises(IntakeError, match="'train/ant/loop.png' is a link to loop.png, outside"):
        content_hash(folder)
    (folder / "train/ant/loop.png").unlink()
    os.mkfifo(folder / "train/ant/pipe.png")
    with pytest.raises(IntakeError, match="device, socket or pipe"):
        content_hash(folder)
    (folder / "train/ant/pipe.png").unlink()

    # Names are bytes: a name that is not UTF-8 is stamped, and refused by name before any hashing.
    (folder / os.fsdecode(b"train/ant/bad\xff\xfe.png")).write_bytes(png(3))
    assert stamp(folder) != before
    with pytest.raises(IntakeError, match=re.escape(r"'train/ant/bad\xff\xfe.png' is not a UTF-8 name")):
        content_hash(folder)


def test_paths_a_pipeline_names_must_stay_inside_the_roots(tmp_path, monkeypatch):
    drop, out = tmp_path / "drop", tmp_path / "out"
    write_tree(drop / "data", image_tree())
    (tmp_path / "outside").mkdir()
    (drop / "link").symlink_to(tmp_path / "outside")
    monkeypatch.chdir(drop)  # relative paths are taken from the drop folder, as in a job

    def check(**sections):
        confine_paths(parse_pipeline({"name": "x", **sections}), [drop, out])

    check(data={"dataset": "imagefolder", "root": "data", "cache_dir": str(out / "cache")})
    check(sparsity={"method": "frozen", "masks_from": str(out / "run/train/final.pt")})
    for sections, where in (
        ({"sparsity": {"method": "frozen", "masks_from": "../evil.pt"}}, "sparsity.masks_from"),
        ({"sparsity": {"method": "frozen", "masks_from": "/etc/evil.pt"}}, "sparsity.masks_from"),
        ({"data": {"dataset": "imagefolder", "root": str(tmp_path)}}, "data.root"),
        ({"data": {"dataset": "imagefolder", "root": "link"}}, "data.root"),
        ({"data": {"cache_dir": "~/cache"}}, "data.cache_dir"),
    ):
        with pytest.raises(UserError, match=f"^{where}: .* is outside {drop} and {out}"):
            check(**sections)


def test_a_process_groups_memory_is_measured(tmp_path):
    """The supervisor's measure: a process group's memory, its children's included, the pages they
    share counted once."""
    code = (
        "import os, time; shared = b'x' * (150 * 2**20)\n"
        "if os.fork() == 0: own = b'y' * (100 * 2**20)\n"
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while (used := group_memory([proc.pid])[proc.pid]) < 250 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 250 * 2**20 <= used < 400 * 2**20, used  # 400 MiB: the shared 150 counted twice
        assert group_memory([proc.pid + 10**7]) == {proc.pid + 10**7: 0}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_bad_command_lines_are_one_line_errors_and_a_second_daemon_is_refused(tmp_path, drop, watchers):
    for args, expected in (
        (["watch", tmp_path / "nowhere"], "does not exist"),
        (["watch", drop, "--out", drop], "must not be the drop folder"),
        (["watch", drop, "--template", tmp_path / "none.yaml"], "template"),
        (["watch", drop, "--max-unpacked", "lots"], "cannot read size"),
        (["watch", drop, "--job-memory", "lots"], "cannot read size"),
        (["watch", drop, "--job-timeout", "soon"], "cannot read duration"),
        (["watch", drop, "--job-timeout", "0"], "must be more than 0"),
        (["status", tmp_path / "nowhere"], "does not exist"),
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr

    first = watchers(drop, tmp_path / "out")
    first.wait_log("watching")
    second = cli("watch", drop, "--out", tmp_path / "out")
    assert (
        second.returncode == 2 and "already watched" in second.stderr and str(first.proc.pid) in second.stderr
    )
    assert len(second.stderr.strip().splitlines()) == 1
    status = cli("status", drop)
    assert status.returncode == 0 and f"watched (dsrpipe watch pid {first.proc.pid})" in status.stdout
    assert first.stop() == 0 and "stopped" in first.log()
    assert "not watched now" in cli("status", drop).stdout


# --- drops -------------------------------------------------------------------------------------


def test_a_dropped_pipeline_runs_once_and_changed_content_is_a_new_job(tmp_path, drop, watchers):
    out = tmp_path / "out"
    # Two threads per job: a job forked from the warmed-up server (jobs/warmup.py) still trains
    # with a thread pool of its own.
    w = watchers(drop, out, env={"OMP_NUM_THREADS": "2"})
    w.wait_log("watching")
    (drop / "README.md").write_text("drop pipelines here\n")
    (drop / "exp.yaml").write_text(pipeline())
    w.wait_state("exp", "done")
    report = json.loads((out / "exp" / "report.json").read_text())
    assert report["name"] == "exp" and report["passed"] and (out / "exp" / "model.onnx").exists()
    first_model = (out / "exp" / "model.onnx").stat().st_mtime_ns

    # The same bytes again (rewritten in place, or under another name): not run again.
    (drop / "exp.yaml").write_text(pipeline())
    (drop / "copy.yaml").write_text(pipeline())
    w.wait_log(r"state=skipped drop=copy.yaml reason=\"same content as job exp")
    w.wait_log(r"state=skipped drop=exp.yaml reason=\"same content as job exp")
    # New content under the old file name: a new job that cannot clobber the first one's results.
    changed = pipeline(width=6)
    (drop / "exp.yaml").write_text(changed)
    second = f"exp-{hashlib.sha256(changed.encode()).hexdigest()[:8]}"
    w.wait_state(second, "done")
    # Two jobs ran, and the daemon never loaded torch: they imported it in processes of their own
    # (the daemon names their module; pyproject's watch-without-torch contract keeps its imports clean).
    assert torch_loaded(os.getpid()) and not torch_loaded(w.proc.pid)
    (drop / "README.md").write_text("still not a pipeline\n")
    time.sleep(0.6)
    assert (out / "exp" / "model.onnx").stat().st_mtime_ns == first_model
    assert json.loads((out / second / "report.json").read_text())["name"] == second
    assert w.log().count("ignored README.md") == 1
    assert [(j["name"], j["drop_path"], j["state"]) for j in jobs(drop)] == [
        ("exp", "exp.yaml", "done"),
        ("exp", "copy.yaml", "skipped"),
        (second, "exp.yaml", "done"),
    ]

    status = cli("status", drop)
    assert status.returncode == 0
    assert (
        re.search(rf"{second}\s+done\s+exp.yaml", status.stdout)
        and "3 drops: 2 done, 1 skipped" in status.stdout
    )
    assert [j["state"] for j in json.loads(cli("status", drop, "--json").stdout)["jobs"]] == [
        "done",
        "skipped",
        "done",
    ]
    assert w.stop() == 0

    # --rerun: content dropped again runs again (fresh) under its old name; unchanged drops do not.
    (drop / "copy.yaml").write_text(pipeline())
    rerun = cli("watch", drop, "--out", out, "--once", "--rerun", "--quiet-period", "0.5", timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(r"job=exp state=queued id=4 drop=copy.yaml rerun=yes", rerun.stderr)
    assert [(j["name"], j["state"]) for j in jobs(drop)][3:] == [("exp", "done")]
    assert (out / "exp" / "model.onnx").stat().st_mtime_ns != first_model


@pytest.mark.slow
def test_datasets_are_taken_only_once_fully_copied(tmp_path, drop, watchers):
    out = tmp_path / "out"
    (drop / "template.yaml").write_text(TEMPLATE)
    w = watchers(drop, out, "--workers", "2", quiet=1.5)
    w.wait_log("watching")

    # A folder copied in file by file, with pauses shorter than the quiet period.
    tree = list(image_tree().items())
    for i in range(0, len(tree), 9):
        write_tree(drop / "Flower Photos", dict(tree[i : i + 9]))
        time.sleep(0.4)
    folder_copied = time.time()
    # An archive written in chunks, with pauses.
    archive = targz_bytes(image_tree("leaves/"))
    with open(drop / "leaves.tar.gz", "wb") as f:
        for i in range(0, len(archive), len(archive) // 4 + 1):
            f.write(archive[i : i + len(archive) // 4 + 1])
            f.flush()
            time.sleep(0.4)
    archive_copied = time.time()

    w.wait_state("Flower-Photos", "done")
    w.wait_state("leaves", "done")
    by_name = {j["name"]: j for j in jobs(drop)}
    assert by_name["Flower-Photos"]["created"] >= folder_copied  # queued only after the copy ended
    assert by_name["leaves"]["created"] >= archive_copied
    assert len(by_name) == 2 and all(j["attempts"] == 1 for j in by_name.values())
    for name in ("Flower-Photos", "leaves"):
        report = json.loads((out / name / "report.json").read_text())
        assert report["dataset"] == "imagefolder" and report["passed"]
        meta = {p.key: p.value for p in onnx.load(str(out / name / "model.onnx")).metadata_props}
        assert json.loads(meta["class_names"]) == ["ant", "bee", "cat"]
        assert not (drop / ".dsrpipe" / "jobs" / name / "cache").exists()  # unpacked data is cleaned up
        log = (drop / ".dsrpipe" / "jobs" / name / "job.log").read_text()
        assert "data: images fitted to 8x8, their median side" in log  # no data.image_size: the data's

    # The same dataset again is skipped; after the template is fixed, it is a new job.
    write_tree(drop / "Flower Copy", dict(tree))
    w.wait_log(r"state=skipped drop=\"Flower Copy\" reason=\"same content as job Flower-Photos")
    (drop / "template.yaml").write_text(TEMPLATE.replace("latency_runs: 1", "latency_runs: 2"))
    write_tree(drop / "Flower Again", dict(tree))
    w.wait_state("Flower-Again", "done")
    assert w.stop() == 0


def zip_with_corrupt_first_member(members):
    """A zip whose first member's data is garbage: unpacking anything would fail on it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in members.items():
            zf.writestr(rel, data)
    raw = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        first = zf.infolist()[0]
    start = first.header_offset + 30 + len(first.filename.encode()) + len(first.extra)
    raw[start : start + first.compress_size] = os.urandom(first.compress_size)
    return bytes(raw)


@pytest.mark.slow
def test_hostile_drops_fail_cleanly_and_the_daemon_keeps_serving(tmp_path, drop, watchers):
    out = tmp_path / "out"
    (drop / "template.yaml").write_text(TEMPLATE)
    w = watchers(
        drop,
        out,
        "--workers",
        "2",
        "--max-unpacked",
        "1M",
        "--job-memory",
        "800M",
        env={"DSRPIPE_WATCH_FAULT": "fault.yaml"},
    )
    w.wait_log("watching")
    pwned = tmp_path / "pwned"
    outside = write_tree(tmp_path / "outside", image_tree())
    (tmp_path / "evil.pt").write_bytes(b"not even a checkpoint")
    (drop / "bad.yaml").write_text("name: x\ntrain: [epochs: 1\n")
    (drop / "code.yaml").write_text(f"!!python/object/apply:os.system ['touch {pwned}']\n")
    (drop / "corrupt.zip").write_bytes(os.urandom(3000))
    (drop / "traversal.tar.gz").write_bytes(targz_bytes({**image_tree(), "../evil.png": png(1)}))
    escape = write_tree(drop / "escape", image_tree())
    (escape / "train/ant/secret.png").symlink_to("/etc/passwd")
    # Refused by the sizes they declare, before a byte is unpacked: unpacking the zip's first
    # member would fail on its garbage data; the tar declares 2 GiB and holds none of it.
    (drop / "bomb.zip").write_bytes(
        zip_with_corrupt_first_member({**image_tree(), "train/ant/zeros.png": bytes(5 * 2**20)})
    )  # 5 MiB unpacked from ~5 KiB
    huge = tarfile.TarInfo("train/ant/huge.png")
    huge.size = 2**31
    (drop / "liar.tar.gz").write_bytes(gzip.compress(huge.tobuf(tarfile.GNU_FORMAT)))
    (drop / "junk.bin").write_bytes(os.urandom(100))
    (drop / os.fsdecode(b"junk\xff.bin")).write_bytes(b"")
    # Names are bytes: a drop whose name is not UTF-8, and a dataset holding such a name.
    (drop / os.fsdecode(b"caf\xe9.yaml")).write_text(pipeline())
    write_tree(drop / "latin", {**image_tree(), os.fsdecode(b"train/ant/bad\xff\xfe.png"): png(1)})
    # A bug while taking a drop (planted through DSRPIPE_WATCH_FAULT) fails that drop only.
    (drop / "fault.yaml").write_text(pipeline(seed=5))
    # Paths a pipeline names lead outside the drop and output folders: relative, absolute, a link.
    (drop / "masks.yaml").write_text(pipeline(sparsity={"method": "frozen", "masks_from": "../evil.pt"}))
    (drop / "absolute.yaml").write_text(pipeline(data={"dataset": "imagefolder", "root": str(outside)}))
    (drop / "link").symlink_to(outside)
    (drop / "linked.yaml").write_text(pipeline(data={"dataset": "imagefolder", "root": "link"}))
    # A job over --job-memory: ~1.9 GB at its peak (a tiny one, like `next` below, ~0.4).
    (drop / "hog.yaml").write_text(pipeline(data={"image_size": 200}))

    expected = {
        "bad": "bad.yaml: line 3 not valid YAML",
        "code": "code.yaml: line 1 not valid YAML",
        "corrupt": "cannot unpack archive",
        "traversal": "member '../evil.png': a path outside the archive",
        "escape": "'train/ant/secret.png' is a link to /etc/passwd, outside the folder",
        "bomb": "member 'train/ant/zeros.png': more than 1048576 bytes unpacked",
        "liar": "member 'train/ant/huge.png': more than 1048576 bytes unpacked",
        "caf": r"the drop's name 'caf\xe9.yaml' is not UTF-8; rename it",
        "latin": r"dataset folder latin: 'train/ant/bad\xff\xfe.png' is not a UTF-8 name; rename it",
        "fault": "internal error while taking this drop: RuntimeError: DSRPIPE_WATCH_FAULT names this drop",
        "masks": f"sparsity.masks_from: ../evil.pt is outside {drop} and {out}",
        "absolute": f"data.root: {outside} is outside {drop} and {out}",
        "linked": f"data.root: link is outside {drop} and {out}",
        "hog": "exceeded --job-memory 800M (used ",
    }
    refused_at_intake = {"escape", "caf", "latin", "fault"}  # never ran: no job log
    for name in expected:
        w.wait_state(name, "failed")
    for name, cause in expected.items():
        error = (drop / f"{name}.error.txt").read_text().splitlines()
        assert cause in error[0], (name, error[0])
        assert "Traceback" not in error[0]
        assert any(line.startswith("=== ") for line in error) == (
            name not in refused_at_intake
        )  # the log tail
    assert any(line.startswith("Traceback") for line in (drop / "fault.error.txt").read_text().splitlines())
    assert not pwned.exists() and not (tmp_path / "evil.png").exists()
    assert "ignored junk.bin" in w.log() and r"ignored junk\xff.bin" in w.log()
    assert r"job=caf state=failed id=" in w.log() and r"drop=caf\xe9.yaml" in w.log()
    status = cli("status", drop)
    assert status.returncode == 0 and re.search(
        r"latin\s+failed\s+latin .* is not a UTF-8 name", status.stdout
    )
    assert re.search(r"caf\s+failed\s+caf\\xe9.yaml", status.stdout)
    assert re.search(r"hog\s+failed .* exceeded --job-memory 800M", status.stdout)

    # The daemon is still serving: a good drop after all that runs, and its name stays inside out/.
    (drop / "next.yaml").write_text(pipeline(name="../../evil"))
    w.wait_state("next", "done")
    assert (out / "next" / "model.onnx").exists() and not (tmp_path / "evil").exists()
    assert {j["state"] for j in jobs(drop)} == {"failed", "done"} and len(jobs(drop)) == len(expected) + 1
    assert w.stop() == 0


@pytest.mark.slow
def test_a_job_over_its_time_limit_is_killed_and_failed(tmp_path, drop):
    """Killed and failed; and what validate keeps in the run's tmp/ while it runs (its dense
    model), here put there while the job trains, is removed by the daemon once the job is gone."""
    # (A job over --job-memory is among the hostile drops above, whose daemon serves on.)
    (drop / "slow.yaml").write_text(pipeline(epochs=10_000))
    run = tmp_path / "out" / "slow"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dsrpipe", "watch", drop, "--out", tmp_path / "out", "--once"]
        + ["--quiet-period", "0.5", "--job-timeout", "5s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    planted = False
    deadline = time.monotonic() + 120
    while daemon.poll() is None and time.monotonic() < deadline:
        if not planted and (run / "train").exists():  # the job owns the run and trains
            (run / "tmp").mkdir()
            (run / "tmp" / "dense.onnx").write_bytes(b"as validate leaves it when killed")
            planted = True
        time.sleep(0.05)
    _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr
    assert planted, "the job was killed before it trained"
    assert not (run / "tmp").exists()
    assert re.search(r"job=slow state=killing id=1 pid=\d+ reason=\"exceeded --job-timeout 5s\"", stderr)
    assert (drop / "slow.error.txt").read_text().startswith("exceeded --job-timeout 5s\n")
    [job] = jobs(drop)
    assert (job["state"], job["cause"], job["attempts"]) == ("failed", "exceeded --job-timeout 5s", 1)
    assert re.search(r"slow\s+failed .* exceeded --job-timeout 5s", cli("status", drop).stdout)


def test_a_corrupt_journal_is_one_line_that_says_how_to_recover(tmp_path, drop):
    journal_path = drop / ".dsrpipe" / "journal.sqlite"
    journal_path.parent.mkdir()
    journal = Journal(journal_path)  # a real journal, then cut short: SQLite finds it malformed
    for i in range(200):
        journal.add(
            name=f"job{i}",
            drop_path=f"job{i}.yaml",
            kind="pipeline",
            sha256=f"{i}" * 64,
            stamp="1:1",
            state="done",
            out="out",
            cause="x" * 200,
        )
    journal.close()
    truncated = journal_path.read_bytes()[: len(journal_path.read_bytes()) // 2]
    for garbage in (b"not a database\n" * 300, truncated):
        journal_path.write_bytes(garbage)
        for args in (["watch", drop, "--out", tmp_path / "out", "--once"], ["status", drop]):
            result = cli(*args)
            assert result.returncode == 2, (args, result.stderr)
            [line] = result.stderr.strip().splitlines()
            assert line.startswith(f"error: cannot read the watch journal {journal_path} (")
            assert f"mv {journal_path} {journal_path}.corrupt" in line and "takes every drop" in line
    assert journal_path.read_bytes() == truncated  # left as it was, for the user to look at


@pytest.mark.parametrize("unreadable", ["journal.sqlite", ".dsrpipe"])
def test_an_unreadable_journal_or_state_folder_is_said_as_permissions_never_as_corruption(
    tmp_path, drop, unreadable
):
    """chmod 000 on the journal or on `.dsrpipe`, and `watch` and `status` run as a process that
    file permissions hold (root without the capabilities that bypass them, see
    helpers.unprivileged): one line, exit 2, that says permission denied, never that the journal
    is corrupt or should be moved aside (that would lose its history), and the files untouched."""
    prefix = helpers.unprivileged()
    if prefix is None:
        pytest.skip(
            "cannot run a process that file permissions hold here (no setpriv, or it cannot drop them)"
        )
    state = drop / ".dsrpipe"
    state.mkdir()
    journal = Journal(state / "journal.sqlite")
    journal.add(
        name="exp",
        drop_path="exp.yaml",
        kind="pipeline",
        sha256="0" * 64,
        stamp="1:1",
        state="done",
        out="out",
    )
    journal.close()
    before = (state / "journal.sqlite").read_bytes()
    target = drop / unreadable if unreadable == ".dsrpipe" else state / unreadable
    target.chmod(0)
    try:
        for args in (["watch", drop, "--out", tmp_path / "out", "--once"], ["status", drop]):
            result = subprocess.run(
                [*prefix, sys.executable, "-m", "dsrpipe", *map(str, args)],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=60,
            )
            assert result.returncode == 2, (args, result.stderr)
            [line] = result.stderr.strip().splitlines()
            assert line.startswith("error: cannot ") and ": permission denied" in line, line
            assert "corrupt" not in line and "mv " not in line and "not a database" not in line, line
            assert not result.stdout
        assert target.stat().st_mode & 0o7777 == 0
    finally:
        target.chmod(0o755 if unreadable == ".dsrpipe" else 0o644)
    assert (state / "journal.sqlite").read_bytes() == before
    assert not [p.name for p in state.iterdir() if p.name.startswith("journal.sqlite-")]  # no -journal, -wal
    [job] = jobs(drop)
    assert job["name"] == "exp" and job["state"] == "done"


# --- crashes and restarts ------------------------------------------------------------------------


def epochs_done(out, name):
    metrics = out / name / "train" / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.mark.slow
def test_kill_9_mid_training_resumes_from_the_checkpoint_and_finishes_once(tmp_path, drop, watchers):
    out = tmp_path / "out"
    (drop / "slow.yaml").write_text(
        pipeline(
            epochs=24,
            width=24,
            data={"max_train": 512},
            train={"batch_size": 32},
            sparsity={"prune_target": 150},
        )
    )

    # 1. kill -9 the daemon and the job's process group mid-training.
    w = watchers(drop, out)
    w.wait_for(lambda: epochs_done(out, "slow") >= 2, "two epochs")
    [job] = jobs(drop)
    w.proc.kill()
    os.killpg(job["pid"], signal.SIGKILL)
    w.proc.wait()
    assert (out / "slow" / "train" / "last.pt").exists() and jobs(drop)[0]["state"] == "running"

    # 2. Restart: it resumes from the checkpoint. Then kill -9 the daemon alone: the job lives on.
    w = watchers(drop, out)
    w.wait_for(lambda: "resuming after epoch" in job_log(drop, "slow"), "the job to resume")
    resumed_at = epochs_done(out, "slow")
    w.wait_for(lambda: epochs_done(out, "slow") > resumed_at, "one more epoch")
    w.proc.kill()
    w.proc.wait()

    # 3. Restart: the orphan is stopped, the job resumes once more and completes.
    w = watchers(drop, out)
    w.wait_state("slow", "done", timeout=120)
    assert re.search(
        r"job=slow state=stopping id=1 pid=\d+ reason=\"a job process from an earlier daemon", w.log()
    )
    log = job_log(drop, "slow")
    resumes = [int(n) for n in re.findall(r"train: resuming after epoch (\d+)", log)]
    assert len(resumes) == 2 and 2 <= resumes[0] < resumes[1], log
    metrics = (out / "slow" / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == list(range(1, 25))  # each epoch once
    assert (
        len(re.findall(r"\| export: (?!already|shrink)", log)) == 1 and (out / "slow" / "model.onnx").exists()
    )
    [job] = jobs(drop)
    assert (job["state"], job["attempts"]) == ("done", 3)
    assert w.stop() == 0


@pytest.mark.slow
def test_burst_of_12_drops_sigterm_and_restart_with_pending_drops(tmp_path, drop, watchers):
    out = tmp_path / "out"
    w = watchers(drop, out, "--workers", "2")
    w.wait_log("watching")
    for i in range(12):
        (drop / f"b{i:02d}.yaml").write_text(pipeline(seed=i))
    w.wait_for(lambda: sum(j["state"] == "done" for j in jobs(drop)) >= 3, "3 jobs done", timeout=120)

    # SIGTERM: running jobs are stopped and requeued, the daemon exits 0.
    assert w.stop() == 0
    assert "stopped" in w.log()
    assert not [j for j in jobs(drop) if j["state"] == "running"]

    # Drops made while the daemon is down, and the unfinished ones, are all processed once.
    (drop / "late.yaml").write_text(pipeline(seed=99))
    again = cli("watch", drop, "--out", out, "--once", "--workers", "2", "--quiet-period", "0.5", timeout=240)
    assert again.returncode == 0, again.stderr
    rows = jobs(drop)
    names = [f"b{i:02d}" for i in range(12)] + ["late"]
    assert sorted(j["name"] for j in rows) == names  # one row per drop: none twice, none lost
    assert {j["state"] for j in rows} == {"done"}
    for name in names:
        assert json.loads((out / name / "report.json").read_text())["name"] == name
        assert len(re.findall(r"\| export: (?!already|shrink)", job_log(drop, name))) <= 1


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) at tmp_path/disk, unmounted at the end. Skips where it
    cannot be mounted (not root, no mount, a container without CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError as exc:
        pytest.skip(f"cannot mount a small filesystem here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def fill(disk):
    """Write disk/filler until the filesystem has not one byte left."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for chunk in (2**16, 2**12, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_full_drop_folder_disk_never_kills_the_daemon(tmp_path, small_disk, watchers):
    """The drop folder on a real small filesystem, filled up while a job trains and a drop is
    made: the daemon says once that the disk is full and that it waits, stays alive, and once
    there is space again it records what happened meanwhile (the job, which could not write
    its log, failed with that cause; the drop taken) and serves the next drop. Its --log-file
    on the same disk loses lines quietly, without a traceback per line."""
    drop, out = small_disk / "drop", tmp_path / "out"  # the outputs elsewhere: only the drop fills up
    drop.mkdir()
    w = watchers(drop, out, "--log-file", small_disk / "watch.log")
    w.wait_log("watching")
    (drop / "slow.yaml").write_text(pipeline(epochs=1000))
    log = drop / ".dsrpipe" / "jobs" / "slow" / "job.log"
    w.wait_for(lambda: log.exists() and "train epoch 2/" in log.read_text(), "the slow job to train")
    (drop / ".notes.txt.tmp").write_text("not a drop\n")  # made now, dropped by a rename when full
    fill(small_disk)
    os.rename(drop / ".notes.txt.tmp", drop / "notes.txt")
    w.wait_log(r"the disk is full writing \S+: waiting for space")
    [pid] = [j["pid"] for j in jobs(drop) if j["name"] == "slow"]
    w.wait_for(lambda: not _alive(pid), "the job to stop: its log outgrew its last page", timeout=120)
    time.sleep(2)  # a few more retries of the daemon's
    assert w.proc.poll() is None
    full = re.findall(r"the disk is full writing (?!the log file).*", w.log())
    assert len(full) == 1 and "no drop is taken and no job started meanwhile" in full[0], w.log()

    (small_disk / "filler").unlink()
    w.wait_log("there is space again")
    w.wait_state("slow", "failed")
    w.wait_log("ignored notes.txt")
    [cause] = [j["cause"] for j in jobs(drop) if j["name"] == "slow"]
    assert cause.startswith("the disk is full"), cause
    assert (drop / "slow.error.txt").read_text().splitlines()[0] == cause
    assert re.search(r"slow\s+failed .* the disk is full", cli("status", drop).stdout)
    (drop / "next.yaml").write_text(pipeline(seed=1))
    w.wait_state("next", "done")
    assert (out / "next" / "model.onnx").exists()
    assert "Traceback" not in w.log() and "Logging error" not in w.log(), w.log()
    assert "there is space again" in (small_disk / "watch.log").read_text()
    assert w.stop() == 0

    # Started on a full disk (no room for its pid in the lock file), a daemon waits as well.
    fill(small_disk)
    w = watchers(drop, out)
    w.wait_log(r"the disk is full writing \S+/\.dsrpipe/lock: waiting for space")
    time.sleep(1.5)
    assert w.proc.poll() is None and "watching" not in w.log()
    (small_disk / "filler").unlink()
    w.wait_log("watching")
    assert w.stop() == 0


# --- files put in place by whoever writes drops ----------------------------------------------------

SECRET = "root:$6$s3cr3tSALT$HASHED-PASSWORD:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


@pytest.mark.slow
def test_a_template_that_is_a_link_or_a_fifo_fails_its_job_and_quotes_nothing(tmp_path, drop):
    """DROP/template.yaml as a symbolic link to a secret file, then as a FIFO: the dataset drop
    fails with one line naming what the template is, and nothing of the secret reaches the
    error file, the log or `dsrpipe status`; the daemon never blocks, and serves the next drop."""
    out = tmp_path / "out"
    (tmp_path / "shadow").write_text(SECRET)
    (drop / "template.yaml").symlink_to(tmp_path / "shadow")
    write_tree(drop / "linked", image_tree())
    first = cli("watch", drop, "--out", out, "--once", "--quiet-period", "0.2", timeout=120)
    (drop / "template.yaml").unlink()
    os.mkfifo(drop / "template.yaml")
    write_tree(drop / "fifo", image_tree())
    (drop / "good.yaml").write_text(pipeline())
    second = cli("watch", drop, "--out", out, "--once", "--quiet-period", "0.2", timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    status = cli("status", drop)
    states = {job["name"]: job for job in jobs(drop)}
    assert states["good"]["state"] == "done" and (out / "good" / "model.onnx").exists()
    for name, what in (
        ("linked", "a symbolic link, which is not followed"),
        ("fifo", "a FIFO, not a regular file"),
    ):
        assert states[name]["state"] == "failed"
        assert states[name]["cause"].startswith(f"the template {drop / 'template.yaml'} is {what}"), states[
            name
        ]
        error = (drop / f"{name}.error.txt").read_text()
        assert error.splitlines()[0] == states[name]["cause"]
    everything = first.stderr + second.stderr + status.stdout
    everything += "".join(p.read_text() for p in drop.glob("*.error.txt"))
    assert "s3cr3t" not in everything and "root:" not in everything and "daemon:*" not in everything


@pytest.mark.slow
def test_a_template_that_quotes_a_readable_file_is_never_quoted(tmp_path, drop):
    """A regular template.yaml holding another file's lines: its job fails on them without
    repeating any (it is no pipeline anyone named); a dropped pipeline's own errors still say
    which setting is wrong."""
    (drop / "template.yaml").write_text(SECRET)
    write_tree(drop / "data", image_tree())
    (drop / "mine.yaml").write_text(pipeline(train={"bogus_setting": 1}))
    result = cli("watch", drop, "--out", tmp_path / "out", "--once", "--quiet-period", "0.2", timeout=120)
    assert result.returncode == 0, result.stderr
    states = {job["name"]: job for job in jobs(drop)}
    assert states["data"]["state"] == "failed" and "unknown setting" in states["data"]["cause"]
    assert "s3cr3t" not in states["data"]["cause"] and "root" not in states["data"]["cause"]
    everything = result.stderr + cli("status", drop).stdout + (drop / "data.error.txt").read_text()
    assert "s3cr3t" not in everything and "daemon:*" not in everything
    assert "train.bogus_setting: unknown setting" in states["mine"]["cause"]


def test_a_dataset_dropped_without_a_template_is_fitted_to_its_median_side(tmp_path, drop):
    """No template.yaml: the built-in template fixes no image size, so the job fits the images to
    their median side (12 here) and its log says so. Taken in here, run as its worker runs it
    (the daemon adds nothing to this). The built-in template trains batches of 64: with 18
    training images the job stops right after sizing the data, which is all this needs."""
    write_tree(
        drop / "photos", helpers.image_tree(("ant", "bee", "cat"), {"train": 6, "test": 3}, "L", "", (12, 12))
    )
    folder = take_in(drop, tmp_path / "out", "photos")
    job = subprocess.run(
        [sys.executable, "-m", "dsrpipe.jobs", str(folder.jobs_dir / "photos")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    log = job.stdout + job.stderr
    assert "data: images fitted to 12x12, their median side (data.image_size sets it)" in log, log
    assert job.returncode == 2 and "train.batch_size 64 exceeds the 18 training images" in log, log


@pytest.mark.parametrize("name", ["journal.sqlite", "lock"])
def test_a_state_file_that_is_a_link_is_refused_and_left_alone(tmp_path, drop, name):
    (tmp_path / "victim").write_text("precious\n")
    (drop / ".dsrpipe").mkdir()
    (drop / ".dsrpipe" / name).symlink_to(tmp_path / "victim")
    for args in (["watch", drop, "--out", tmp_path / "out", "--once"], ["status", drop]):
        result = cli(*args)
        if name == "lock" and args[0] == "status":
            assert result.returncode == 0 and "not watched now" in result.stdout  # the link is not read
            continue
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and "is a symbolic link, which is not followed" in line, line
    assert (tmp_path / "victim").read_text() == "precious\n"


def test_a_dropped_pipeline_naming_code_is_refused_and_never_imported(tmp_path, drop):
    """model.name: module:function in a drop would run whatever the dropper chose: the job fails
    in one line, and the module (importable here) is never imported. Taken in and run as its
    worker runs it."""
    (tmp_path / "planted.py").write_text(
        "from pathlib import Path\nPath(__file__).with_suffix('.ran').touch()\n"
    )
    (drop / "mine.yaml").write_text(pipeline(model={"name": "planted:build"}))
    folder = take_in(drop, tmp_path / "out", "mine.yaml")
    job = subprocess.run(
        [sys.executable, "-m", "dsrpipe.jobs", str(folder.jobs_dir / "mine")],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])},
        timeout=120,
    )
    errors = [line for line in (job.stdout + job.stderr).splitlines() if line.startswith("error:")]
    assert job.returncode == 2 and errors == [
        "error: model.name: a watch job may not name code (module:function); only a pipeline you "
        "run yourself may (docs/security.md)"
    ], job.stdout + job.stderr
    assert not (tmp_path / "planted.ran").exists()
