"""Training under torchrun (DistributedDataParallel over Gloo, on CPU): 2 ranks against 1 process,
two "nodes" on localhost, a killed rank, a desynchronised mask, TensorBoard event files.

Every launch is `python -m torch.distributed.run` in a subprocess with a timeout, one thread per
process. The faults come from dsrpipe.distributed's test hook (DSRPIPE_TEST_FAULT)."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsrpipe.config import load_pipeline
from dsrpipe.data import load_data
from dsrpipe.errors import UserError
from dsrpipe.sparse import RewireSchedule, RigL
from dsrpipe.train import train_sparse
from tests.helpers import assert_loopback_only, masked_weights_are_zero, run_listening, small_net, train_steps

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
# A few short epochs (10 steps of 64 images), reallocation every 3 steps; finetune off (the stage is the same code).
SHORT = [
    "train.epochs=2",
    "train.milestones=[]",
    "finetune.epochs=0",
    "sparsity.rewire_periods={0: 3}",
    "data.max_train=640",
    "data.max_test=200",
    "model.options={width: 8}",
    "sparsity.prune_target=60",
    "validate.latency_runs=5",
    "validate.min_top1=null",
]
# No BatchNorm: per-rank batch statistics differ from the global batch's, and SyncBatchNorm runs on
# CUDA only, so a model without BatchNorm is what a CPU run can compare with one process exactly.
NO_BN = ["model.name=lenet-300-100", "model.options={}", "sparsity.prune_target=600"]


def sets(*overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def env(**extra):
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        **extra,
    }


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def dsrpipe(*args):
    return ["-m", "dsrpipe", *args, "--no-progress"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unpinned_env(**extra):
    """The tests' environment without GLOO_SOCKET_IFNAME: what dsrpipe's own launches must set."""
    return {k: v for k, v in env(**extra).items() if k != "GLOO_SOCKET_IFNAME"}


def run(command, timeout=120, **extra_env):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


RUN_2 = "g-dsr-s0.9-seed0"  # the grid's one run


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """The quickstart (without BatchNorm) on 2 ranks × 32, as `dsrpipe compare --nproc-per-job 2`
    launches a run (`python -m dsrpipe.torchrun 2 run ...`: torchrun's agent and the job's
    loopback store in one process), and as `train-sparse` in one process × 64 (the same global
    batch), side by side. The
    run misses a deliberately high min_top1: torchrun exits 1 whatever its ranks' codes, and
    compare must still read the run's report rather than take it for a crash."""
    tmp = tmp_path_factory.mktemp("ddp")
    # With channel removal: every rank must remove the same hidden units.
    overrides = [*SHORT, *NO_BN, "sparsity.remove_channels={share: 0.3, end_epoch: 1}"]
    one = subprocess.Popen(
        [
            sys.executable,
            *dsrpipe(
                "train-sparse",
                str(QUICKSTART),
                "--out",
                str(tmp / "one"),
                *sets(*overrides, "train.batch_size=64"),
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    grid = {
        "name": "g",
        "base": str(QUICKSTART),
        "methods": ["dsr"],
        "sparsities": [0.9],
        "seeds": [0],
        "overrides": {
            "dsr": {
                key: yaml.safe_load(value)
                for key, value in (
                    item.split("=", 1)
                    for item in [*overrides, "train.batch_size=32", "validate.min_top1=0.999"]
                )
            }
        },
    }
    (tmp / "grid.yaml").write_text(yaml.safe_dump(grid))
    two, listeners = run_listening(
        [
            sys.executable,
            "-m",
            "dsrpipe",
            "compare",
            str(tmp / "grid.yaml"),
            "--out",
            str(tmp / "two"),
            "--nproc-per-job",
            "2",
        ],
        timeout=180,
        env=unpinned_env(DSRPIPE_MASK_CHECKSUMS=str(tmp / "checksums")),
    )
    _, one_err = one.communicate(timeout=120)
    assert one.returncode == 0, one_err
    assert two.returncode == 0, two.stderr
    return tmp, tmp / "two" / "g" / "runs" / RUN_2, listeners


def test_two_ranks_complete_with_one_set_of_outputs(two_and_one):
    tmp, run_dir, _ = two_and_one
    log = (tmp / "two" / "g" / "logs" / f"{RUN_2}.log").read_text()
    assert "DDP: 2 ranks × 32 = global batch 64" in log
    assert log.count(str(run_dir / "model.onnx")) == 2  # rank 0 alone reports: its export line and its stdout
    assert sorted(p.name for p in (tmp / "two" / "g" / "runs").iterdir()) == [RUN_2]
    assert sorted(p.name for p in (run_dir / "train").iterdir()) == ["final.pt", "metrics.jsonl"]
    assert [h["epoch"] for h in metrics(run_dir / "train" / "metrics.jsonl")] == [1, 2]
    (row,) = list(csv.DictReader((tmp / "two" / "g" / "results.csv").open()))
    assert row["status"] == "validation-failed" and float(row["onnx_top1"]) < 0.999
    assert "--nproc-per-job 2" in (tmp / "two" / "g" / "results.md").read_text()


def test_a_compare_job_on_two_ranks_listens_on_loopback_only(two_and_one):
    """Every TCP socket the compare process and its torchrun job listened on while it ran (the
    rendezvous store, rank 0's store, Gloo's pairs) was on 127.0.0.0/8 or ::1."""
    assert_loopback_only(two_and_one[2])


def test_masks_are_identical_across_ranks_at_every_reallocation(two_and_one):
    tmp, _, _ = two_and_one
    ranks = [metrics(tmp / f"checksums.rank{r}.jsonl") for r in (0, 1)]
    history = metrics(two_and_one[1] / "train" / "metrics.jsonl")
    assert len(ranks[0]) == sum(h["reallocations"] for h in history) > 5
    assert ranks[0] == ranks[1]
    assert len({json.dumps(r["checksums"]) for r in ranks[0]}) > 1  # the masks did move
    channels = [{k: v for k, v in r["checksums"].items() if k.startswith("channels:")} for r in ranks[0]]
    assert channels[0] and len({json.dumps(c) for c in channels}) > 1  # the live channels did change


def test_two_ranks_match_one_process_with_the_same_global_batch(two_and_one):
    tmp, _, _ = two_and_one
    one, two = (
        torch.load(run_dir / "train" / "final.pt", weights_only=True)
        for run_dir in (tmp / "one" / "quickstart", two_and_one[1])
    )
    for name, mask in one["sparsifier"]["masks"].items():
        assert torch.equal(mask, two["sparsifier"]["masks"][name]), name
    for name, weight in one["model"].items():  # only the reduction order differs
        torch.testing.assert_close(two["model"][name], weight, rtol=0, atol=1e-5)
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["history"], two["history"], strict=True):
        assert (a["pruned"], a["reallocations"], a["threshold"]) == (
            b["pruned"],
            b["reallocations"],
            b["threshold"],
        )
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert (a["train_top1"], a["test_top1"], a["test_loss"]) == pytest.approx(
            (b["train_top1"], b["test_top1"], b["test_loss"]), abs=1e-5
        )


def test_both_ranks_cut_the_removed_channels_out_alike(two_and_one):
    """Channel removal shrinks the model as it trains (the default), under DDP too: the checkpoint
    holds the narrower model and its live channels, the same as the one-process run's, and the
    job logged each cut (the ranks' checksums of masks and live channels, compared above at every
    reallocation, include the cuts)."""
    tmp, run_dir, _ = two_and_one
    one, two = (
        torch.load(folder / "train" / "final.pt", weights_only=True)
        for folder in (tmp / "one" / "quickstart", run_dir)
    )
    assert two["sparsifier"]["shrunk"] and two["model_spec"]["live_channels"]
    assert two["model_spec"]["live_channels"] == one["model_spec"]["live_channels"]
    hidden = len(two["model_spec"]["live_channels"]["fc1"])
    assert hidden < 300 and two["model"]["fc1.weight"].shape[0] == hidden
    assert two["model"]["fc2.weight"].shape[1] == hidden
    shrinks = [event for h in two["history"] for event in h["shrinks"]]
    log = (tmp / "two" / "g" / "logs" / f"{RUN_2}.log").read_text()
    assert shrinks and log.count("train: shrunk at iteration") == len(shrinks)


def test_tensorboard_event_files_hold_the_figures_of_metrics_jsonl(two_and_one):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = two_and_one
    events = EventAccumulator(str(run_dir / "tensorboard" / "train"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "loss/train",
        "loss/test",
        "top1/train",
        "top1/test",
        "lr",
        "sparsity/threshold_H",
        "sparsity/pruned",
        "sparsity/pruned_per_reallocation",
        "sparsity/active_params",
        "layer_density/fc1",
        "layer_density/fc2",
    } <= tags
    history = metrics(run_dir / "train" / "metrics.jsonl")
    for tag, key in (("top1/test", "test_top1"), ("sparsity/pruned", "pruned"), ("lr", "lr")):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [1, 2]
        assert [p.value for p in points] == pytest.approx([h[key] for h in history])
    assert len(list((run_dir / "tensorboard" / "train").iterdir())) == 1  # one writer: rank 0


def test_resuming_with_another_number_of_processes_is_refused(two_and_one, tmp_path):
    _, run_dir, _ = two_and_one
    shutil.copytree(run_dir, tmp_path / "out" / RUN_2)
    train = tmp_path / "out" / RUN_2 / "train"
    (train / "final.pt").rename(train / "last.pt")  # as if interrupted after its last epoch
    cfg = load_pipeline(run_dir.parents[1] / "pipelines" / f"{RUN_2}.yaml")
    with pytest.raises(UserError, match=r"trained by 2 process\(es\), this job has 1"):
        train_sparse(cfg, tmp_path / "out", resume=True, progress=False)


@pytest.mark.slow
def test_two_nodes_on_localhost_with_a_c10d_rendezvous(tmp_path):
    """Two torchrun launches, one process each, meeting at a c10d rendezvous on 127.0.0.1; with
    the quickstart's BatchNorm model (DDP keeps the ranks' buffers in step)."""
    port = free_port()
    command = lambda node: torchrun(  # noqa: E731
        "--nnodes=2",
        f"--node_rank={node}",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=dsrpipe-test",
        f"--rdzv-conf=is_host={int(node == 0)}",
        *dsrpipe(
            "train-sparse",
            str(QUICKSTART),
            "--out",
            str(tmp_path),
            *sets(*SHORT, "train.epochs=1", "train.batch_size=32"),
        ),
    )
    nodes = [
        subprocess.Popen(command(node), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    final = tmp_path / "quickstart" / "train" / "final.pt"
    assert outputs[0][0].strip() == str(final) and outputs[1][0].strip() == ""
    assert torch.load(final, weights_only=True)["world_size"] == 2


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_resumes_from_its_checkpoint(tmp_path):
    result = run(
        torchrun(
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            "--monitor-interval=0.2",
            *dsrpipe(
                "train-sparse",
                str(QUICKSTART),
                "--out",
                str(tmp_path),
                *sets(*SHORT, "train.epochs=3", "train.batch_size=32"),
            ),
        ),
        DSRPIPE_TEST_FAULT="exit:1:2",
    )  # rank 1 dies halfway through epoch 2 of the first attempt
    assert result.returncode == 0, result.stderr
    assert "train: resuming after epoch 1" in result.stderr
    history = metrics(tmp_path / "quickstart" / "train" / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3]  # each epoch once


@pytest.mark.slow
def test_a_desynchronised_mask_stops_the_run_with_a_one_line_error(tmp_path):
    result = run(
        torchrun(
            "--standalone",
            "--nproc_per_node=2",
            *dsrpipe(
                "train-sparse",
                str(QUICKSTART),
                "--out",
                str(tmp_path),
                *sets(*SHORT, "train.epochs=1", "train.batch_size=32"),
            ),
        ),
        timeout=90,
        DSRPIPE_TEST_FAULT="desync:1",
    )  # rank 1 flips a mask entry at the first reallocation
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(line == errors[0] for line in errors), result.stderr
    assert "masks diverged at iteration 3: 'conv2' differs between ranks" in errors[0]
    assert not (tmp_path / "quickstart" / "train" / "last.pt").exists()  # stopped in epoch 1


def test_loopback_addresses_and_names():
    """What binds a job's store to one address (MASTER_ADDR) rather than torch's every interface:
    loopback IPs, bracketed or not, and the name localhost, read without asking a resolver."""
    from dsrpipe.distributed import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "0.0.0.0", "::", "[::]", "example.com", "localhost.example.com", "", None):
        assert not is_loopback(host), host


def test_sharded_batches_are_the_one_process_batches_split_between_ranks():
    train, _ = load_data("digits", max_train=300)
    options = dict(shuffle=True, augment=True, seed=3, epoch=5, drop_last=True)
    whole = list(train.batches(60, **options))
    parts = [list(train.batches(60, shard=(rank, 3), **options)) for rank in range(3)]
    assert len(whole) == 5 and all(len(p) == 5 for p in parts)
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)  # augmentation included
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    with pytest.raises(ValueError, match="drop the last partial batch"):
        next(train.batches(60, shuffle=False, augment=False, seed=0, epoch=0, shard=(0, 2)))


def test_deferred_gradient_hooks_see_the_same_gradient_in_one_process():
    """Under DDP, RigL reads the dense gradient at step time (after the all-reduce): in one
    process that is the gradient its accumulate hook saw, so training is the same bit for bit."""

    def train(defer):
        torch.manual_seed(0)
        net = small_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        rigl = RigL(net, opt, sparsity=0.8, alpha=0.3, schedule=RewireSchedule({0: 3}), seed=1)
        if defer:
            rigl.defer_gradient_hooks()
            assert not any(w._post_accumulate_grad_hooks for w in rigl.weights.values())
        train_steps(net, opt, rigl, 7)
        assert masked_weights_are_zero(rigl)
        return net.state_dict(), rigl.state_dict()["masks"]

    (w1, m1), (w2, m2) = train(False), train(True)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(m1[k], m2[k]) for k in m1)


@pytest.mark.slow
def test_watch_runs_each_job_through_torchrun_with_its_cause_on_failure(tmp_path):
    """`watch --nproc-per-job 2`: a job trains on 2 ranks inside its own process group (where the
    runner's limits apply); one that fails is failed with its ranks' cause, not torchrun's exit 1."""
    from tests.test_watch import jobs, pipeline

    drop = tmp_path / "drop"
    drop.mkdir()
    tiny = {"data": {"dataset": "digits", "max_train": 256, "max_test": 100}, "train": {"batch_size": 32}}
    (drop / "good.yaml").write_text(pipeline(**tiny))
    (drop / "strict.yaml").write_text(pipeline(**tiny, validate={"latency_runs": 1, "min_top1": 0.999}))
    result, listeners = run_listening(
        [
            sys.executable,
            "-m",
            "dsrpipe",
            "watch",
            str(drop),
            "--out",
            str(tmp_path / "out"),
            "--once",
            "--quiet-period",
            "0.5",
            "--workers",
            "2",
            "--nproc-per-job",
            "2",
            "--job-timeout",
            "10m",
        ],
        timeout=240,
        env=unpinned_env(),
    )
    assert result.returncode == 0, result.stderr
    assert_loopback_only(listeners)  # the daemon, its jobs and their ranks: nothing beyond loopback
    states = {job["name"]: job for job in jobs(drop)}
    assert states["good"]["state"] == "done", states
    assert (tmp_path / "out" / "good" / "model.onnx").exists()
    assert states["strict"]["state"] == "failed"
    assert "is below min_top1 0.999" in states["strict"]["cause"], states
    logs = [p.read_text() for p in (drop / ".dsrpipe" / "jobs").glob("*/job.log")]
    assert all("DDP: 2 ranks × 32 = global batch 64" in log for log in logs) and len(logs) == 2
