"""Shrinking during training (`remove_channels.shrink`, Sparsifier.shrink): removed channels are cut
out of the model as they go, with the masks and the optimizer's state, through real training on
digits; the pipeline around a shrunk model (resume, fine-tune, export, reports, torch.compile)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from dsrpipe import train as train_module
from dsrpipe.cli import app
from dsrpipe.config import parse_pipeline
from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.pipeline import run_pipeline
from dsrpipe.sparse import ChannelRemoval, DeepR, RewireSchedule, RigL
from dsrpipe.sparse.channels import Channels
from dsrpipe.sparse.cost import model_cost
from dsrpipe.sparse.slicing import cut, cut_to_live, dependency_graph, out_channel_handler
from dsrpipe.train import train_sparse

from .helpers import assert_resume_is_exact, masked_weights_are_zero, small_net, train_steps
from .test_channels import build, conv_stack_removing, digits_batches, train_on_digits
from .test_pipeline import assert_same_training, interrupt_training, tiny, write_pipeline


def parameters(net):
    return sum(p.numel() for p in net.parameters())


def small_cnn_parameters(conv1, conv2, conv3, in_channels=1, classes=10):
    """small-cnn's parameter count at these widths: 3×3 convs without bias, BatchNorm's γ and β, the classifier."""
    return (
        9 * in_channels * conv1
        + 9 * conv1 * conv2
        + 9 * conv2 * conv3
        + 2 * (conv1 + conv2 + conv3)
        + (conv3 + 1) * classes
    )


def eval_logits(net, x):
    net.eval()
    with torch.no_grad():
        logits = net(x)
    net.train()
    return logits


def watch_shrinks(sparsifier, probe):
    """Record, around every shrink: the logits on `probe` and the active total before and after,
    and the parameter count after."""
    events, shrink = [], sparsifier.shrink

    def recorded():
        before, active = eval_logits(sparsifier.model, probe), sparsifier.active_count()
        stats = shrink()
        events.append(
            {
                **stats,
                "logits": (before, eval_logits(sparsifier.model, probe)),
                "active": (active, sparsifier.active_count()),
                "parameters": parameters(sparsifier.model),
            }
        )
        return stats

    sparsifier.shrink = recorded
    return events


@pytest.mark.numerics
@pytest.mark.parametrize("model", ["small-cnn", "wrn-10-2"])
def test_each_shrink_keeps_the_logits_and_the_active_total_and_cuts_what_was_removed(model):
    """Real DSR training on digits, channels removed (the dense input layer's too) and cut out as
    they go: at every shrink the logits on a fixed digits batch agree, the active total is exactly
    the same, and the parameters and MACs fall to those of the narrower model; WRN's residual
    streams shrink in every layer that writes or reads them."""
    net, optimizer, sparsifier = build(model=model, prune_fraction=0.1, dense_layers=True, shrink=True)
    probe, _ = next(digits_batches(1, seed=3))
    events = watch_shrinks(sparsifier, probe)
    start, total = parameters(net), sparsifier.active_count()
    for _ in train_on_digits(net, optimizer, sparsifier, 65):
        assert sparsifier.active_count() == total
        assert masked_weights_are_zero(sparsifier)
    assert len(events) >= 3
    for event in events:
        before, after = event["logits"]
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
        assert event["active"] == (total, total)
        assert event["parameters"] == event["params_after"] < event["params_before"]
        assert event["macs_after"] < event["macs_before"]
    assert parameters(net) == events[-1]["params_after"] < start
    assert model_cost(net, torch.zeros(1, 1, 8, 8))[1] == events[-1]["macs_after"]
    live = sparsifier.channels.alive_counts()
    assert sparsifier.channels.removed == round(0.5 * sparsifier.channels.total)
    if model == "small-cnn":  # the parameters of a small-cnn of exactly the live widths
        assert parameters(net) == small_cnn_parameters(**live)
        assert (net.conv2.in_channels, net.conv2.out_channels, net.fc.in_features) == tuple(live.values())
    else:  # the second stage's stream: its writers and its readers all lost the removed channels
        stream = live["group2.0.conv2"]
        assert stream < 64
        assert net.group2[0].conv2.out_channels == net.group2[0].shortcut.out_channels == stream
        assert net.group3[0].conv1.in_channels == net.group3[0].shortcut.in_channels == stream
        assert net.group3[0].bn1.num_features == len(net.group3[0].bn1.running_mean) == stream


@pytest.mark.numerics
def test_a_step_after_the_shrink_is_the_masked_models_step():
    """The optimizer's momentum and the masks are sliced with the layers: one more SGD step (with
    momentum and weight decay) on the shrunk model gives the masked model's weights at the live
    channels, and its logits."""
    runs = []
    for shrink in (False, True):
        net, optimizer, sparsifier = build(prune_fraction=0.1, dense_layers=True, end=40)
        for _ in train_on_digits(net, optimizer, sparsifier, 20):  # removals at 10 and 20, masked
            pass
        live = {n: torch.nonzero(a).flatten() for n, a in sparsifier.channels.alive.items()}
        if shrink:
            sparsifier.shrink()
        x, y = next(digits_batches(1, seed=5))
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        runs.append((net, live))
    (masked, live), (shrunk, _) = runs
    assert (
        shrunk.conv2.weight.shape
        == (len(live["conv2"]), len(live["conv1"]), 3, 3)
        != masked.conv2.weight.shape
    )
    expected = masked.conv2.weight[live["conv2"]][:, live["conv1"]]
    assert torch.allclose(shrunk.conv2.weight, expected, atol=1e-6)
    assert torch.allclose(shrunk.bn3.bias, masked.bn3.bias[live["conv3"]], atol=1e-6)
    x, _ = next(digits_batches(1, seed=6))
    assert torch.allclose(eval_logits(shrunk, x), eval_logits(masked, x), atol=1e-4)


@pytest.mark.numerics
@pytest.mark.parametrize("first_steps", [3, 13], ids=["before-the-first-shrink", "after-a-shrink"])
def test_resume_from_before_and_after_a_shrink_is_exact(first_steps):
    """Resumed from a checkpoint taken before any shrink or after one, training goes on bit for bit."""
    first, second = assert_resume_is_exact(conv_stack_removing(shrink=True), first_steps, 25)
    assert first["shrunk"] and second["shrunk"]
    for name, alive in first["channels"].items():
        assert torch.equal(alive, second["channels"][name])


def masked_momentum_is_zero(sparsifier):
    """No momentum where a mask is 0 (or no momentum yet): the next step cannot move a masked weight."""
    state = sparsifier.optimizer.state
    return all(
        bool((state[w]["momentum_buffer"][~sparsifier.masks[n]] == 0).all())
        for n, w in sparsifier.weights.items()
        if state.get(w, {}).get("momentum_buffer") is not None
    )


@pytest.mark.parametrize("method", [RigL, DeepR])
def test_after_a_cut_the_gradient_hooks_mask_the_new_parameters(method):
    """RigL and DeepR work on each gradient as it accumulates, in hooks on the weights themselves;
    a cut gives the layers new weights, and the hooks must move to them. In the steps after the cut
    (RigL reallocating at 4, DeepR at every step) masked weights and their momentum stay 0."""
    torch.manual_seed(0)
    net = small_net(width=8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sparsifier = method(
        net,
        optimizer,
        sparsity=0.8,
        schedule=RewireSchedule({0: 4}),
        remove_channels=ChannelRemoval(share=0.4, end=2, multiple_of=1),  # shrink: the default
        example_inputs=torch.zeros(1, 1, 8, 8),
    )
    assert sparsifier._per_weight_hooks  # the hooks this is about, not the optimizer's pre-hook
    total = sparsifier.active_count()
    weights = dict(sparsifier.weights)
    train_steps(net, optimizer, sparsifier, 2)  # the cut comes at step 2
    assert sparsifier.channels.shrunk
    assert all(sparsifier.weights[n] is not w for n, w in weights.items())
    for step in range(3, 7):
        train_steps(net, optimizer, sparsifier, 1, seed=step)
        assert masked_weights_are_zero(sparsifier), step
        assert masked_momentum_is_zero(sparsifier), step
        assert sparsifier.active_count() == total, step


class Concatenating(nn.Module):
    """Two channel groups that a third conv reads side by side, as DenseNet's layers read the
    concatenation of everything before them: c's input channels 0-5 are a's, 6-11 are b's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(12, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        return self.fc(torch.relu(self.c(torch.cat([a, b], 1))).mean((2, 3)))


def test_a_cut_records_the_indices_as_the_model_was_built():
    """Cutting a's channels 1 and 4 moves b's channels down in c's input; b's channels 0 and 3 are
    then c's inputs 4 and 7, but were built as 6 and 9, which is what the cut must record: the
    masks and the momentum of c are sliced by it. Every parameter as built, sliced as recorded,
    is the parameter the cut left."""
    torch.manual_seed(0)
    net = Concatenating()
    built = {(m, n): p.detach().clone() for m in net.modules() for n, p in m.named_parameters(recurse=False)}
    graph = dependency_graph(net, torch.zeros(1, 1, 8, 8), "shrinking")
    done = cut(
        net, graph, [(net.a, out_channel_handler(net.a), [1, 4]), (net.b, out_channel_handler(net.b), [0, 3])]
    )
    assert net.c.weight.shape[1] == 8
    assert done.dropped[net.c, "weight"] == {1: {1, 4, 6, 9}}
    assert done.dropped[net.b, "weight"] == {0: {0, 3}, 1: {1, 4}}
    for (module, name), before in built.items():
        assert torch.equal(done.apply(module, name, before), getattr(module, name)), (module, name)


def test_an_inexact_shrink_is_refused_in_one_line(monkeypatch):
    """The safety net: a cut that would change the logits (here: a live channel cut with the
    removed ones) stops training with a UserError naming the setting that turns shrinking off."""
    real = Channels.cut_list

    def one_live_channel_too_many(self):
        return [
            (layer, idxs + [max(set(range(layer.weight.shape[0])) - set(idxs))]) for layer, idxs in real(self)
        ]

    monkeypatch.setattr(Channels, "cut_list", one_live_channel_too_many)
    net, optimizer, sparsifier = build(prune_fraction=0.1, shrink=True)
    with pytest.raises(UserError, match=r"shrinking during training changed the logits .*shrink: false\)$"):
        for _ in train_on_digits(net, optimizer, sparsifier, 10):
            pass


REMOVAL = {"remove_channels": {"share": 0.5, "end_epoch": 2, "multiple_of": 1}}


@pytest.fixture(scope="module")
def shrunk_run(tmp_path_factory):
    """The digits pipeline with channel removal, shrinking (the default) and masked, side by side:
    train, fine-tune, export, validate."""
    out = tmp_path_factory.mktemp("shrinking")
    reports = {}
    for shrink in (True, False):
        sparsity = {"remove_channels": {**REMOVAL["remove_channels"], "shrink": shrink}}
        cfg = parse_pipeline(tiny(f"shrink-{shrink}", sparsity=sparsity, train={"epochs": 3}))
        reports[shrink] = run_pipeline(cfg, out, progress=False)
    return out, reports


def test_a_shrunk_run_fine_tunes_exports_and_validates_like_a_masked_one(shrunk_run):
    """The checkpoint records the live channels; fine-tuning and the export rebuild the shrunk
    architecture from them; the export has nothing left to cut or fold, matches torch, and has the
    masked run's channel counts; sizes and speed are measured against the configured width."""
    out, reports = shrunk_run
    shrunk, masked = reports[True], reports[False]
    final = torch.load(out / "shrink-True" / "finetune" / "final.pt", weights_only=True)
    spec = final["model_spec"]
    trained = torch.load(out / "shrink-True" / "train" / "final.pt", weights_only=True)
    assert trained["sparsifier"]["shrunk"] and spec["live_channels"] == trained["model_spec"]["live_channels"]
    live = {name: len(channels) for name, channels in spec["live_channels"].items()}
    assert final["model"]["conv2.weight"].shape[:2] == (live["conv2"], live["conv1"])
    assert shrunk.shrink["removed_channels"] == {} and shrunk.shrink["folds"] == 0
    assert sum(masked.shrink["removed_channels"].values()) == 16 + 32 + 64 - sum(live.values())
    # both ship a small-cnn of exactly their live widths (the masked run's cut at export)
    widths = {"conv1": 16, "conv2": 32, "conv3": 64}
    masked_live = {n: w - masked.shrink["removed_channels"].get(n, 0) for n, w in widths.items()}
    for report, channels in ((shrunk, live), (masked, masked_live)):
        assert report.shrink["params_after"] == small_cnn_parameters(**channels)
    assert shrunk.top1_agreement == 1.0 and shrunk.max_abs_logit_diff < 1e-3
    # the configured width's, both (the metadata they carry differs by some bytes)
    assert shrunk.dense_onnx_bytes == pytest.approx(masked.dense_onnx_bytes, rel=0.02)
    assert shrunk.sparsity == pytest.approx(masked.sparsity, abs=0.002)  # over the configured width


@pytest.mark.parametrize("beyond", [0, 100], ids=["the width itself", "far beyond"])
def test_live_channels_beyond_a_layers_width_do_not_fit(beyond):
    """cut_to_live keeps exactly the listed output channels: an index at or past a layer's width
    names no channel of this model, and is refused rather than ignored."""
    net = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=16)
    live = {"conv1": list(range(8)), "conv2": list(range(0, 32, 2)) + [32 + beyond]}
    with pytest.raises(UserError, match=r"^the recorded live channels of 'conv2' do not fit this model$"):
        cut_to_live(net, torch.zeros(1, 1, 8, 8), live)


def test_a_checkpoint_whose_live_channels_go_beyond_a_layer_is_refused_in_one_line(shrunk_run, tmp_path):
    """`dsrpipe export` of a run whose checkpoint lists, among conv3's live channels, the index 64
    (small-cnn at width 16 has 64): exit 2 and one line naming the layer, not a model built to
    some other width."""
    out, _ = shrunk_run
    shutil.copytree(out / "shrink-True", tmp_path / "shrink-True")
    path = tmp_path / "shrink-True" / "finetune" / "final.pt"
    checkpoint = torch.load(path, weights_only=True)
    live = checkpoint["model_spec"]["live_channels"]["conv3"]
    assert 64 not in live
    live.append(64)
    torch.save(checkpoint, path)
    sparsity = {"remove_channels": {**REMOVAL["remove_channels"], "shrink": True}}
    pipeline = write_pipeline(tmp_path, tiny("shrink-True", sparsity=sparsity, train={"epochs": 3}))
    result = CliRunner().invoke(app, ["export", str(pipeline), "--out", str(tmp_path), "--force"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: the recorded live channels of 'conv3' do not fit this model"


def test_frozen_retrains_a_shrunk_runs_structure_from_its_initial_weights(shrunk_run, tmp_path):
    """The paper's control on a run that shrank: `frozen` (init: same) trains the narrower model it
    ended as, on its final masks, from its initial weights at the channels that were left."""
    out, _ = shrunk_run
    source = out / "shrink-True" / "train" / "final.pt"
    sparsity = {"method": "frozen", "masks_from": str(source), "init": "same"}
    raw = tiny("frozen-shrunk", train={"epochs": 1}, finetune={"epochs": 0})
    raw["sparsity"] = sparsity
    cfg = parse_pipeline(raw)
    final = torch.load(train_sparse(cfg, tmp_path, progress=False), weights_only=True)
    trained = torch.load(source, weights_only=True)
    assert final["model_spec"]["live_channels"] == trained["model_spec"]["live_channels"]
    for name, mask in trained["sparsifier"]["masks"].items():
        assert torch.equal(final["sparsifier"]["masks"][name], mask)
    assert final["model"]["conv3.weight"].shape == trained["model"]["conv3.weight"].shape


def test_reports_carry_the_training_cost_and_the_shrinks(shrunk_run):
    """report.json, report.md and metrics.jsonl: wall time, forward MACs × images (smaller for the
    run that shrank, and equal to MACs × images where nothing shrank), peak RSS, and each shrink."""
    out, reports = shrunk_run
    shrunk, masked = reports[True].training, reports[False].training
    assert masked["shrinks"] == [] and len(shrunk["shrinks"]) >= 2
    assert 0 < shrunk["mac_images"] < 0.8 * masked["mac_images"]
    assert masked["peak_rss_bytes"] > 2**20 and masked["train_seconds"] > 0
    history = [
        json.loads(line)
        for line in (out / "shrink-False" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    images = 22 * 64  # 1,437 training digits in batches of 64, the last one dropped
    assert all(h["mac_images"] == h["macs"] * images for h in history)
    history = [
        json.loads(line)
        for line in (out / "shrink-True" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    events = [e for h in history for e in h["shrinks"]]
    assert [e["macs_before"] for e in events[1:]] == [e["macs_after"] for e in events[:-1]]
    assert history[-1]["macs"] == events[-1]["macs_after"] < history[0]["macs_at_start"]
    markdown = (out / "shrink-True" / "report.md").read_text()
    assert "forward MACs × images" in markdown and "shrunk while training" in markdown


def test_mac_images_are_each_steps_macs_as_the_cuts_left_them(shrunk_run):
    """Each epoch's forward MACs × images, recomputed step by step from what the history records:
    a step costs the MACs of the model it ran on, the epoch's at its start until a cut, then what
    the latest cut before it left (a cut comes after its step's update). The report's total is
    the sum over training and fine-tuning."""
    out, reports = shrunk_run
    steps, batch = 22, 64  # 1,437 training digits in batches of 64, the last one dropped
    histories = [
        [
            json.loads(line)
            for line in (out / "shrink-True" / stage / "metrics.jsonl").read_text().splitlines()
        ]
        for stage in ("train", "finetune")
    ]
    assert max(len(h["shrinks"]) for h in histories[0]) >= 2  # epochs with several cuts are covered
    for h in histories[0] + histories[1]:
        last = h["epoch"] * steps
        assert all(last - steps < event["iteration"] <= last for event in h["shrinks"])
        expected = 0
        for step in range(last - steps + 1, last + 1):
            earlier = [event for event in h["shrinks"] if event["iteration"] < step]
            expected += (earlier[-1]["macs_after"] if earlier else h["macs_at_start"]) * batch
        assert h["mac_images"] == expected, h["epoch"]
    total = sum(h["mac_images"] for history in histories for h in history)
    assert reports[True].training["mac_images"] == total


def test_resume_after_a_shrink_is_bit_identical_through_the_pipeline(tmp_path, monkeypatch):
    """Interrupted in epoch 3, after the shrinks of epochs 1 and 2: the resumed run rebuilds the
    shrunk model from its checkpoint and ends bit for bit as the uninterrupted one."""
    cfg = parse_pipeline(tiny("resume-shrunk", sparsity=REMOVAL, train={"epochs": 3}))
    reference = torch.load(train_sparse(cfg, tmp_path / "a", progress=False), weights_only=True)
    interrupt_training(cfg, tmp_path / "b", monkeypatch, epoch=3)
    last = torch.load(tmp_path / "b" / "resume-shrunk" / "train" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["sparsifier"]["shrunk"] and last["model_spec"]["live_channels"]
    resumed = torch.load(train_sparse(cfg, tmp_path / "b", resume=True, progress=False), weights_only=True)
    assert_same_training(reference, resumed)


def test_compile_recompiles_once_per_shrink_not_every_step(tmp_path, monkeypatch):
    """train.compile: the training steps run a compiled module, built again after each shrink; the
    graphs compiled are one per shape the model took, however many steps each shape ran."""
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(
        train_module, "compile_for_training", lambda model: torch.compile(model, backend=counting_backend)
    )
    cfg = parse_pipeline(
        tiny("compiled", sparsity=REMOVAL, train={"epochs": 3, "compile": True}, finetune={"epochs": 0})
    )
    final = torch.load(train_sparse(cfg, tmp_path, progress=False), weights_only=True)
    shrinks = sum(len(h["shrinks"]) for h in final["history"])
    assert shrinks >= 2
    assert len(compiled) == 1 + shrinks
