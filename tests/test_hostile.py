"""Hostile input through the real CLI: files that would run code, absurd values, broken YAML,
two processes on one run. Each must end in one line and exit 2, with no side effect."""

import ast
import contextlib
import copy
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dsrpipe import files
from dsrpipe.checkpoint import save_checkpoint, torch_save
from dsrpipe.cli import app
from dsrpipe.config import load_pipeline
from dsrpipe.errors import UserError
from dsrpipe.rundir import RunDir

from . import helpers
from .test_pipeline import ROOT, tiny, write_pipeline


class Payload:
    """Unpickling this creates the marker file: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def dsrpipe(*args, cwd):
    """`dsrpipe ARGS` from `cwd` in this process, as a finished process: its exit code, stdout and
    stderr are the CLI's (test_a_bad_yaml_file_is_one_line_exit_2 runs the console command)."""
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(app, list(map(str, args)))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def dsrpipe_process(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dsrpipe", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_one_line_error(result, expected: str, code: int = 2):
    assert result.returncode == code, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert expected in lines[0], lines[0]


@pytest.fixture
def hostile(tmp_path):
    """A zip-format torch file and a plain pickle that each run `touch <marker>` when unpickled."""
    marker = tmp_path / "payload-ran"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(marker)))
    return marker


def small_run(tmp_path, sparsity=None, **sections):
    raw = tiny(
        model={"options": {"width": 8}},
        train={"epochs": 1},
        finetune={"epochs": 0},
        validate={"latency_runs": 5},
        **sections,
    )
    if sparsity is not None:
        raw["sparsity"] = sparsity  # as given: each method takes its own options only
    return write_pipeline(tmp_path, raw)


# -- checkpoints: never unpickled ------------------------------------------------------------------


def unpickling_calls(source: str) -> list[str]:
    """The calls in `source` that would unpickle what they read: torch.load without a literal
    weights_only=True, and pickle.load or pickle.loads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, name = ast.unparse(node.func.value), node.func.attr
        data_only = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        torch_unpickling = (owner, name) == ("torch", "load") and not data_only
        if torch_unpickling or (owner == "pickle" and name in ("load", "loads")):
            found.append(ast.unparse(node))
    return found


def test_no_code_in_the_tree_unpickles_what_it_loads():
    """Every torch.load of the package, the benchmarks and the tests reads data only; nothing calls
    pickle.load (CIFAR's batches go through data.sources' arrays-only unpickler)."""
    # The unpickling call the guard must catch, made here rather than written out, so that no file
    # of the tree holds it, not even as this test's example.
    unpickling_load = f"torch.load(p, weights_only={not True})"
    planted = f"{unpickling_load}\ntorch.load(p)\npickle.loads(b)\ntorch.load(p, weights_only=True)"
    assert unpickling_calls(planted) == [unpickling_load, "torch.load(p)", "pickle.loads(b)"]
    files = [f for folder in ("dsrpipe", "bench", "tests") for f in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100
    found = {str(f.relative_to(ROOT)): calls for f in files if (calls := unpickling_calls(f.read_text()))}
    assert found == {}


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("payload", ["evil.pt", "evil.pkl"])
def test_a_hostile_masks_from_is_refused_unrun(tmp_path, hostile, where, payload):
    masks_from = payload if where == "relative" else str(tmp_path / payload)
    path = small_run(tmp_path, sparsity={"method": "frozen", "masks_from": masks_from})
    result = dsrpipe("run", path, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, f"masks_from: {masks_from} is not a dsrpipe checkpoint")
    assert not hostile.exists()


@pytest.mark.parametrize("option", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained"])
def test_a_timm_model_loads_no_weights_a_pipeline_names(tmp_path, hostile, option):
    """timm would torch.load a checkpoint_path itself: every option that loads weights is refused
    at check, before timm sees it (`pretrained` included, which was a traceback)."""
    pytest.importorskip("timm")
    value = {"checkpoint_path": "evil.pkl", "pretrained_cfg_overlay": "evil.pt", "pretrained": True}
    path = write_pipeline(tmp_path, tiny(model={"name": "timm/resnet18", "options": {option: value[option]}}))
    result = dsrpipe("check", path, cwd=tmp_path)
    assert_one_line_error(result, f"model option {option}: timm models are built untrained here")
    assert not hostile.exists()


@pytest.mark.parametrize(
    "planted, command",
    [
        ("last.pt", ["run"]),
        ("last.pt", ["train-sparse", "--resume"]),
        ("final.pt", ["run"]),
        ("final.pt", ["train-sparse", "--resume"]),
    ],
)
def test_a_planted_checkpoint_is_refused_unrun(tmp_path, hostile, planted, command):
    path = small_run(tmp_path)
    checkpoint = tmp_path / "out" / "tiny" / "train" / planted
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes((tmp_path / "evil.pt").read_bytes())
    result = dsrpipe(*command, path, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(
        result, f"{Path('out/tiny/train') / planted} is not a dsrpipe checkpoint (it holds Python objects"
    )
    assert not hostile.exists()
    assert checkpoint.read_bytes() == (tmp_path / "evil.pt").read_bytes()  # refused, not overwritten


@pytest.mark.parametrize(
    "content, why",
    [([1, 2, 3], "it holds a list, not a dict"), ({"fingerprint": "x"}, "missing or malformed: format")],
)
def test_a_checkpoint_that_is_not_dsrpipes_is_refused(tmp_path, content, why):
    path = small_run(tmp_path)
    checkpoint = tmp_path / "out" / "tiny" / "train" / "final.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(content, checkpoint)
    result = dsrpipe("run", path, "--out", "out", cwd=tmp_path)
    assert_one_line_error(result, f"out/tiny/train/final.pt is not a dsrpipe checkpoint ({why}")


def test_a_checkpoint_with_our_keys_and_the_wrong_insides_is_refused(tmp_path):
    """Even one that carries the very fingerprint the settings call for."""
    path = small_run(tmp_path)
    cfg = load_pipeline(path)
    run = RunDir(tmp_path / "out", cfg.name)
    save_checkpoint(
        run.last("train"),
        {
            "stage": "train",
            "complete": False,
            "fingerprint": run.fingerprint("train", cfg),
            "run_id": "x",
            "epoch": 1,
            "model": {"conv1.weight": torch.zeros(1)},
            "optimizer": {},
            "scheduler": {},
            "sparsifier": {},
            "method": "dsr",
            "rng": {},
            "history": [],
            "model_spec": {},
            "data_info": {},
            "config": {},
        },
    )
    result = CliRunner().invoke(
        app, ["train-sparse", str(path), "--out", str(tmp_path / "out"), "--resume", "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    # the sparsifier's state is restored first (it rebuilds a shrunk model): its missing keys say it
    assert f"error: {run.last('train')} is not a dsrpipe checkpoint (KeyError: 'method')" in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- configuration: bounded, one line ---------------------------------------------------------------

ALIAS_BOMB = b"""name: bomb
model:
  name: small-cnn
  options:
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
"""

BAD_FILES = {
    "alias bomb": (ALIAS_BOMB, "line 6 not valid YAML (aliases (*name) are not allowed)"),
    "not UTF-8": (b"name: caf\xe9\ntrain: {epochs: 1}\n", "not UTF-8 text (byte 9)"),
    "deep nesting": (
        b"name: deep\nmodel: {options: {x: " + b"[" * 50_000 + b"]" * 50_000 + b"}}\n",
        "line 2 not valid YAML (nested deeper than 20 levels)",
    ),
}

BAD_VALUES = {
    "huge image size": (
        {"data": {"image_size": 100_000}},
        "data.image_size: Input should be less than or equal to 1024",
    ),
    "seed 2**70": ({"seed": 2**70}, "seed: Input should be less than or equal to 4294967295"),
    "latency runs 1e9": (
        {"validate": {"latency_runs": 10**9}},
        "validate.latency_runs: Input should be less than",
    ),
    "negative milestone": (
        {"train": {"epochs": 4, "milestones": [-1, 2]}},
        "train: milestones must be increasing",
    ),
    "unsorted milestones": (
        {"train": {"epochs": 4, "milestones": [3, 1]}},
        "train: milestones must be increasing",
    ),
    "opset 99": ({"export": {"opset": 99}}, "export.opset: the installed onnx knows opsets up to"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_yaml_file_is_one_line_exit_2(tmp_path, case):
    content, expected = BAD_FILES[case]
    (tmp_path / "bad.yaml").write_bytes(content)
    result = dsrpipe_process("run", "bad.yaml", "--out", "out", cwd=tmp_path, timeout=120)
    assert_one_line_error(result, f"bad.yaml: {expected}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "name: x\ntrain: {epochs: 3}\ntrain: {epochs: 30}\n",
            "line 3 not valid YAML (duplicate key 'train')",
        ),
        (
            "name: x\ntrain: {epochs: 3, lr: 0.1, epochs: 30}\n",
            "line 2 not valid YAML (duplicate key 'epochs')",
        ),
        ("name: x\ntrain: {lr: !!float 1}\n", "line 2 not valid YAML (tags are not allowed (!!float))"),
        ("name: x\nseed: !!int '3'\n", "line 2 not valid YAML (tags are not allowed (!!int))"),
        ("name: !custom x\n", "line 1 not valid YAML (tags are not allowed (!custom))"),
    ],
)
def test_duplicate_keys_and_tags_are_refused_naming_them(tmp_path, text, expected):
    """The last of two keys would win silently, and a tag makes a value other than it reads."""
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(UserError) as error:
        load_pipeline(tmp_path / "p.yaml")
    assert str(error.value) == f"{tmp_path / 'p.yaml'}: {expected}"


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_an_absurd_value_is_one_line_exit_2(tmp_path, case):
    change, expected = BAD_VALUES[case]
    write_pipeline(tmp_path, tiny(**change), "bad.yaml")
    result = dsrpipe("run", "bad.yaml", "--out", "out", cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("finetune.milestones=[2, 1]", "finetune: milestones must be increasing epochs from 0"),
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("model.options={width: {deep: [1]}}", "model.options: 'width': expected a number"),
        (f"model.options={{width: {list(range(65))}}}", "model.options: 'width': expected a number"),
        ('data.cache_dir="a\\0b"', "data.cache_dir: a path cannot contain a NUL"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        # Numbers are strict: no bool or string stands for one (false trained dense, true one epoch).
        ("sparsity.sparsity=false", "sparsity.sparsity: Input should be a valid number"),
        ("train.epochs=true", "train.epochs: Input should be a valid integer"),
        ('train.epochs="3"', "train.epochs: Input should be a valid integer"),
        ("train.batch_size=8.0", "train.batch_size: Input should be a valid integer"),
        # Bounded where a value overflows in training: 1e308 used to pass check and fail mid-run.
        ("train.lr=1e308", "train.lr: Input should be less than or equal to 1000000"),
        ("train.weight_decay=1e300", "train.weight_decay: Input should be less than or equal to 1000000"),
        (
            "model.options={a: &a [1], b: *a}",
            "--set model.options: line 1 not valid YAML (aliases (*name) are not allowed)",
        ),
    ],
)
def test_set_is_bounded_like_the_file(tmp_path, override, expected):
    path = write_pipeline(tmp_path, tiny())
    result = CliRunner().invoke(app, ["check", str(path), "--set", override])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_numbers_written_as_yaml_numbers_are_taken(tmp_path):
    """Strict numbers still take an int for a float, and 1e-3 (a string to YAML 1.1) as a float."""
    path = write_pipeline(tmp_path, tiny())
    sets = ["train.epochs=1", "train.lr=1", "finetune.lr=1e-3", "sparsity.sparsity=0"]
    cfg = load_pipeline(path, sets)
    assert (cfg.train.epochs, cfg.train.lr, cfg.finetune.lr, cfg.sparsity.sparsity) == (1, 1.0, 0.001, 0.0)
    assert isinstance(cfg.train.lr, float)


# -- one run, one owner --------------------------------------------------------------------------------


def test_a_second_run_of_the_same_pipeline_is_refused_while_the_first_completes(tmp_path):
    path = small_run(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "dsrpipe", "run", str(path), "--out", "out", "--no-progress"]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run = RunDir(tmp_path / "out", "tiny")
    try:
        deadline = time.monotonic() + 120
        while files.lock_holder(run.lock_file) != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        # Paused while it owns the run, so the second one surely finds it at work, however fast.
        first.send_signal(signal.SIGSTOP)
        second = dsrpipe("run", path, "--out", "out", "--no-progress", cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, f"out/tiny is in use by another dsrpipe process (pid {first.pid})")
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    # The first run's outputs are one consistent chain: the report measured this model.onnx,
    # exported from this trained checkpoint, made with these settings.
    assert run.is_complete(load_pipeline(path))
    assert files.lock_holder(run.lock_file) is None  # released


# -- the schema, fuzzed ---------------------------------------------------------------------------------

STRANGE = [
    "",
    "x" * 300,
    "../../etc",
    "/",
    "a\nb",
    "\x00",
    "ünï",
    "1e9",
    "-1",
    "null",
    "*",
    "~",
    "[",
    "{a: 1}",
]
NUMBERS = [0, -1, 1, 2**31, 2**70, -(2**70), 10**9, 0.5, -0.5, 1e308, 3.0]


def mutate(raw, rng: random.Random):
    """One random change somewhere in the settings tree: drop, retype, resize, nest or add a key."""
    paths = []

    def walk(node, trail):
        for key, value in node.items():
            paths.append(trail + [key])
            if isinstance(value, dict):
                walk(value, trail + [key])

    walk(raw, [])
    *parents, leaf = rng.choice(paths)
    node = raw
    for key in parents:
        node = node[key]
    kind = rng.randrange(7)
    if kind == 0:
        del node[leaf]
    elif kind == 1:
        node[leaf] = rng.choice(NUMBERS)
    elif kind == 2:
        node[leaf] = rng.choice(STRANGE)
    elif kind == 3:
        node[leaf] = rng.choice([None, True, [], {}, [1, "a", None], {"x": {"y": 1}}])
    elif kind == 4:
        value = rng.choice(NUMBERS + STRANGE)
        for _ in range(rng.randrange(1, 30)):
            value = [value] if rng.random() < 0.5 else {"k": value}
        node[leaf] = value
    elif kind == 5:
        node[leaf] = [rng.choice(NUMBERS) for _ in range(rng.randrange(200))]
    else:
        node[rng.choice(STRANGE + ["extra", 7])] = rng.choice(NUMBERS + STRANGE)


def test_fuzzed_pipelines_never_crash_check(tmp_path):
    base = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    rng = random.Random(9)
    runner = CliRunner()
    codes = []
    for case in range(200):
        raw = copy.deepcopy(base)
        for _ in range(rng.randrange(1, 4)):
            mutate(raw, rng)
        text = yaml.safe_dump(raw, allow_unicode=True).encode()
        if case % 10 == 0:  # and now and then, the bytes themselves
            text = (
                text[: rng.randrange(len(text))]
                + bytes([rng.randrange(256)])
                + text[rng.randrange(len(text)) :]
            )
        path = tmp_path / "fuzz.yaml"
        path.write_bytes(text)
        result = runner.invoke(app, ["check", str(path)])
        assert result.exit_code in (0, 2), (text, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), (text, result.exception)
        assert "Traceback" not in result.output and "internal error" not in result.output, (
            text,
            result.output,
        )
        if result.exit_code == 2:
            assert len(result.output.strip().splitlines()) == 1, (text, result.output)
        codes.append(result.exit_code)
    assert 0 < codes.count(0) < codes.count(2)  # both outcomes happen: the mutations reach the validators


# -- signals ---------------------------------------------------------------------------------------


def _start(args, cwd, tmpdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dsrpipe", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


def _wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_is_a_clean_exit_143_and_validate_leaves_no_temporary_model(tmp_path):
    """SIGTERM of `run` mid-training: exit 143 and one line, like Ctrl-C's 130; SIGTERM of
    `validate` while its temporary dense model exists: the same, and the model is removed.
    kill -9 leaves it, in the run's tmp/ (never in $TMPDIR), for the run's next owner to remove."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    path = small_run(tmp_path)
    done = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert done.exit_code == 0, done.output[-2000:]
    scratch = RunDir(tmp_path / "out", "tiny").scratch
    long_validate = ["validate", path, "--out", "out", "--force", "--set", "validate.latency_runs=10000"]

    validate = _start(long_validate, tmp_path, tmpdir)
    _wait_for(lambda: (scratch / "dense.onnx").exists(), validate)
    validate.send_signal(signal.SIGTERM)
    _, err = validate.communicate(timeout=60)
    assert validate.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("terminated: ") and "Traceback" not in err
    assert not scratch.exists()

    validate = _start(long_validate, tmp_path, tmpdir)
    _wait_for(lambda: (scratch / "dense.onnx").exists(), validate)
    validate.kill()
    validate.communicate(timeout=60)
    assert (scratch / "dense.onnx").exists() and not list(tmpdir.glob("dsrpipe-*"))
    with RunDir(tmp_path / "out", "tiny").lock():  # as the next command on the run takes it
        assert not scratch.exists()

    training = _start(
        ["run", path, "--out", "long", "--no-progress", "--set", "train.epochs=1000"], tmp_path, tmpdir
    )
    _wait_for(lambda: (tmp_path / "long").exists() and any((tmp_path / "long").rglob("*.pt")), training)
    training.send_signal(signal.SIGTERM)
    _, err = training.communicate(timeout=60)
    assert training.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated: completed epochs are checkpointed; rerun to resume"
    assert "Traceback" not in err


def test_a_runs_tmp_is_swept_only_while_nobody_owns_the_run(tmp_path):
    """What the watch daemon does after each job: a killed owner's tmp/ goes, a live one's stays."""
    run = RunDir(tmp_path, "r")
    (run.scratch / "dense.onnx").parent.mkdir(parents=True)
    (run.scratch / "dense.onnx").write_bytes(b"x")
    with run.lock():  # the lock's own sweep: what a killed owner left
        assert not run.scratch.exists()
        (run.scratch / "dense.onnx").parent.mkdir(parents=True)
        (run.scratch / "dense.onnx").write_bytes(b"x")
        run.sweep()  # owned (by us, through another open file: flock tells them apart)
        assert (run.scratch / "dense.onnx").exists()
    run.sweep()
    assert not run.scratch.exists() and not files.lock_holder(run.lock_file)


# A sitecustomize.py for a test process: it sends the process a signal the moment a given module
# is first imported, that is while the import is under way; at exit it writes down whether that
# import completed after all.
SIGNAL_AT_IMPORT = """
import atexit, os, signal, sys

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("DSRPIPE_TEST_SIGNAL_AT"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, os.environ["DSRPIPE_TEST_SIGNAL"]))
        return None

def imported(module=os.environ.get("DSRPIPE_TEST_SIGNAL_AT"), path=os.environ.get("DSRPIPE_TEST_IMPORTED")):
    if module and path:
        with open(path, "w") as f:
            f.write(str(module in sys.modules))

sys.meta_path.insert(0, SignalAtImport())
atexit.register(imported)
"""


def test_a_signal_at_any_point_of_start_up_is_one_line_and_143_or_130(tmp_path):
    """A signal while typer (the CLI itself) or torch (numpy.exceptions, inside it: the signal's
    exception used to turn into numpy's "cannot load module more than once per process", exit
    1) are imported, or while the run loads its data (sklearn.datasets, after torch, onnx and
    the pipeline are imported): exit 143 for SIGTERM, 130 for SIGINT, and the one line, nothing
    else. The signal is held until the import has finished: a module left half initialised is
    what turned it into another error. The processes run side by side; each stops before it
    trains."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGNAL_AT_IMPORT)
    path = small_run(tmp_path)
    cases = {
        "typer": "SIGINT",
        "numpy.exceptions": "SIGTERM",
        "sklearn.datasets": "SIGTERM",
    }
    started = {}
    for module, name in cases.items():
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{hook}",
            "DSRPIPE_TEST_SIGNAL_AT": module,
            "DSRPIPE_TEST_SIGNAL": name,
            "DSRPIPE_TEST_IMPORTED": str(tmp_path / f"imported-{module}"),
            "OMP_NUM_THREADS": "1",
        }
        started[module] = subprocess.Popen(
            [sys.executable, "-m", "dsrpipe", "run", path, "--out", f"out-{module}", "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
            preexec_fn=helpers.sigint_as_a_terminal_sends_it,
        )
    for module, proc in started.items():
        _, err = proc.communicate(timeout=300)
        word, code = ("terminated", 143) if cases[module] == "SIGTERM" else ("interrupted", 130)
        assert (proc.returncode, err) == (
            code,
            f"{word}: completed epochs are checkpointed; rerun to resume\n",
        ), f"{module}: exit {proc.returncode}, {err[-2000:]}"
        assert not list((tmp_path / f"out-{module}").rglob("*.pt")), module
        assert (tmp_path / f"imported-{module}").read_text() == "True", module


def test_a_signal_whose_exception_is_lost_still_ends_the_command_143(capsys):
    """Code that swallows the signal's exception, and code that raises something else after
    it (as a library that was initialising does): still exit 143, with the one line; the
    handlers are the caller's again afterwards."""
    import typer

    from dsrpipe.cli.common import user_errors

    def signalled():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            pass

    @user_errors
    def swallowing():
        signalled()

    @user_errors
    def raising_another():
        signalled()
        raise ImportError("cannot load module more than once per process")

    before = signal.getsignal(signal.SIGTERM)
    for command in (swallowing, raising_another):
        with pytest.raises(typer.Exit) as stopped:
            command()
        assert stopped.value.exit_code == 143, command
        assert capsys.readouterr().err == "terminated: completed epochs are checkpointed; rerun to resume\n"
        assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_python_cannot_raise_is_raised_once_that_code_has_returned(capsys):
    """A signal that lands in a callback Python cannot raise from (a `__del__` here; a C or
    Rust callback in the wild, which printed "Exception ignored in: 'Path'" and let the run
    train on): raised again right after it, silently, and the command stops, 143."""
    import typer

    from dsrpipe.cli.common import user_errors

    went_on = []

    class SignalledWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside __del__

    @user_errors
    def command():
        SignalledWhenCollected()  # collected at once
        time.sleep(5)  # the stop arrives during this, from the watcher
        went_on.append(True)

    hook, started = sys.unraisablehook, time.monotonic()
    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 143 and not went_on
    assert time.monotonic() - started < 4
    assert capsys.readouterr().err == "terminated: completed epochs are checkpointed; rerun to resume\n"
    assert sys.unraisablehook is hook


# -- a full disk -----------------------------------------------------------------------------------


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """torch.save's "unexpected pos", a bare ENOSPC and a full quota (EDQUOT): one line naming
    the file being written and saying the disk is full (exit 2 at the CLI); the file that was
    there is untouched."""
    import errno

    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")

    def full(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=f"^cannot write {target}: the disk is full"):
        torch_save(target, {"x": 1})
    for full in (errno.ENOSPC, errno.EDQUOT):
        with pytest.raises(UserError, match=f"^cannot write {target}: the disk is full"):
            with files.atomic_path(target):
                raise OSError(full, os.strerror(full))
    assert target.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["last.pt"]

    for full in (errno.ENOSPC, errno.EDQUOT):

        def check(*args, full=full, **kwargs):  # a write elsewhere (a log, metrics): the CLI's own line
            raise OSError(full, os.strerror(full), str(tmp_path / "metrics.jsonl"))

        monkeypatch.setattr("dsrpipe.cli.stages.load_pipeline", check)
        result = CliRunner().invoke(app, ["check", str(tmp_path / "p.yaml")])
        assert result.exit_code == 2, result.output
        assert (
            result.output
            == f"error: the disk is full writing {tmp_path / 'metrics.jsonl'}: free some space and run again\n"
        )


# -- class names: the dataset's folder names end up in every prediction's line ------------------------


@pytest.mark.parametrize("folder", ["bee\nfake (0.99)", "bee\x1b[2Jfake"], ids=["line break", "escape"])
def test_hostile_class_names_stop_the_run_before_it_trains(tmp_path, folder):
    """An image folder whose class folders are named to forge predict's one-line-per-image output
    (a line break, a terminal escape): the dataset is refused as it loads, in one line, exit 2,
    that quotes none of the name; nothing is trained or written. (The same check guards the
    export of a checkpoint, and predict: too long a name, or a count that is not the model's,
    below and in test_predict.py.)"""
    from .helpers import image_tree, write_tree

    write_tree(
        tmp_path / "data",
        image_tree(("ant", folder, "cat"), {"train": 4, "test": 2}, "L", "", (8, 8)),
    )
    raw = tiny(
        data={"dataset": "imagefolder", "root": "data"},
        model={"options": {"width": 4}},
        train={"epochs": 1, "batch_size": 6},
        finetune={"epochs": 0},
        validate={"latency_runs": 1},
    )
    path = write_pipeline(tmp_path, raw)
    result = dsrpipe("run", path, "--out", "out", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()  # the epoch's progress line, then the error
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], result.stderr
    assert lines == [
        "error: dataset 'imagefolder': class_names must be a list of names (printable text without line "
        "breaks, 1 to 256 characters each); name 1 (counting from 0) is not"
    ]
    assert "fake" not in result.stderr + result.stdout and "\x1b" not in result.stderr + result.stdout
    assert not (tmp_path / "out" / "tiny" / "train").exists()  # refused before training


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """small_run's pipeline, trained (not exported): a folder holding pipeline.yaml and out/.
    Read it, never change it (copy first)."""
    folder = tmp_path_factory.mktemp("trained")
    path = small_run(folder)
    trained = CliRunner().invoke(
        app, ["train-sparse", str(path), "--out", str(folder / "out"), "--no-progress"]
    )
    assert trained.exit_code == 0, trained.output
    return folder


@pytest.mark.parametrize(
    "names, expected",
    [
        ([str(i) for i in range(9)], "cannot export tiny: 9 class_names for a model of 10 classes"),
        (["0", "x" * 257, *map(str, range(2, 10))], "name 1 (counting from 0) is not"),
        (["0", "1", "", *map(str, range(3, 10))], "name 2 (counting from 0) is not"),
        ("0123456789", "class_names must be a list of names (printable text without line breaks, 1 to 256"),
    ],
    ids=["nine for ten", "too long", "empty", "not a list"],
)
def test_class_names_that_do_not_fit_the_model_stop_the_export(tmp_path, trained_tiny, names, expected):
    """A trained checkpoint whose class names are one short of the model's logits, one too long
    or empty, or no list: export is one line, exit 2, and no model.onnx is written."""
    from dsrpipe.checkpoint import load_checkpoint, save_checkpoint

    shutil.copytree(trained_tiny, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "pipeline.yaml"
    final = tmp_path / "out" / "tiny" / "train" / "final.pt"
    checkpoint = load_checkpoint(final)
    checkpoint["data_info"]["class_names"] = names
    save_checkpoint(final, checkpoint)
    result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: ") and expected in line and "x" * 20 not in line, line
    assert not (tmp_path / "out" / "tiny" / "model.onnx").exists()
