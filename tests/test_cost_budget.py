"""Channel removal toward a cost budget (dsrpipe/sparse/cost.py): a MAC or latency target met by
the shipped model and never overshot by rounding, a ranking that weighs what a channel costs,
speed-first training that ends dense inside the learned widths, and bad targets refused at
`check`."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from dsrpipe.cli import app
from dsrpipe.config import parse_pipeline
from dsrpipe.models import create_model
from dsrpipe.pipeline import run_pipeline
from dsrpipe.sparse import DSR, ChannelRemoval, LayerSelection, RewireSchedule
from dsrpipe.sparse import cost as cost_module
from dsrpipe.sparse.cost import CostBudget, count_macs

from .helpers import assert_resume_is_exact, train_steps
from .test_pipeline import tiny, write_pipeline


@pytest.fixture(scope="module")
def layer_cache(tmp_path_factory):
    """This module's own cache of layer times, so that a test never reads the user's."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory, layer_cache):
    """Two digits pipelines at width 32 (32/64/128 channels): a MAC target in the smallest-file
    mode, and a latency target in speed-first mode."""
    out = tmp_path_factory.mktemp("budget")
    runs = {
        "macs": {"macs": 0.5, "multiple_of": 8, "end_epoch": 2},
        "fast": {"latency": 0.6, "multiple_of": 8, "end_epoch": 2, "dense_inside": True},
    }
    reports = {}
    for name, removal in runs.items():
        raw = tiny(
            name,
            model={"name": "small-cnn", "options": {"width": 32}},
            sparsity={"remove_channels": removal},
            train={"epochs": 3},
            finetune={"epochs": 1 if name == "fast" else 0},
        )
        reports[name] = run_pipeline(parse_pipeline(raw), out, progress=False)
    return out, reports


def history(out, name):
    lines = (out / name / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_mac_target_is_met_by_the_shipped_model_and_removal_stops_there(budget_runs):
    """Every removal event starts above the target (removal goes on only while it is unmet), the
    last leaves the model at or under it, the shipped model costs what training left, and every
    width is a multiple of 8 or whole."""
    out, reports = budget_runs
    shrinks = reports["macs"].training["shrinks"]
    dense = shrinks[0]["macs_before"]
    assert dense == count_macs(
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8), torch.zeros(1, 1, 8, 8)
    )
    assert all(event["macs_before"] > 0.5 * dense for event in shrinks), shrinks
    assert shrinks[-1]["macs_after"] <= 0.5 * dense
    assert reports["macs"].shrink["macs_after"] == shrinks[-1]["macs_after"]
    widths = [h["channels_alive"] for h in history(out, "macs")]
    assert widths[-1] == widths[-2]  # nothing goes once the target is met
    full = {"conv1": 32, "conv2": 64, "conv3": 128}
    assert all(n % 8 == 0 or n == full[g] for g, n in widths[-1].items()), widths[-1]


def test_speed_first_ships_dense_live_channels_that_agree_with_torch(budget_runs):
    """dense_inside: the exported convolutions and the classifier have no zeros left inside the
    live channels (but for weights that trained to exact zero), the model is smaller than dense,
    and onnxruntime agrees with torch."""
    out, reports = budget_runs
    model = onnx.load(str(out / "fast" / "model.onnx"))
    weights = [
        numpy_helper.to_array(t) for t in model.graph.initializer if numpy_helper.to_array(t).ndim in (2, 4)
    ]
    assert weights
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros < 0.01, zeros
    assert history(out, "fast")[-1]["layer_density"] and all(
        d == 1.0 for d in history(out, "fast")[-1]["layer_density"].values()
    )
    report = reports["fast"]
    assert report.passed and report.top1_agreement >= 0.99 and report.max_abs_logit_diff <= 1e-3
    assert reports["fast"].shrink["macs_after"] < reports["fast"].training["shrinks"][0]["macs_before"]


def test_a_latency_target_is_met_by_the_layer_table_which_is_cached(tmp_path, monkeypatch):
    """Training on a latency target ends at or under it by the layer times, which are measured once
    and kept: a second sparsifier reads them without timing anything. The times here are a fixed
    function of the widths (a constant per layer and a part in proportion to its MACs), so that the
    plan does not depend on how busy the machine is; timing itself is tested below."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timed = []

    def fixed_time(layer, in_width, out_width):
        timed.append(layer.name)
        return 0.005 + 1e-8 * layer.macs(in_width, out_width)

    monkeypatch.setattr(cost_module, "_time_layer", fixed_time)

    def built():
        torch.manual_seed(0)
        net = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=32)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        removal = ChannelRemoval(0.0, 0, 20, floor=0.1, multiple_of=8, budget=CostBudget("latency", 0.6))
        sparsifier = DSR(
            net, optimizer, sparsity=0.8, schedule=RewireSchedule({0: 5}), remove_channels=removal,
            example_inputs=torch.zeros(1, 1, 8, 8),
        )  # fmt: skip
        return net, optimizer, sparsifier

    net, optimizer, sparsifier = built()
    train_steps(net, optimizer, sparsifier, 20)
    assert sparsifier.channels.cost_share() <= 0.6
    assert sparsifier.channels.removed > 0
    assert timed and (tmp_path / "dsrpipe" / "layer-latency.json").is_file()
    timed.clear()
    built()
    assert not timed  # every time came from the cache


class EarlyWide(nn.Module):
    """An early layer at 16x16 whose channels cost about 5x what a late one's (at 4x4) costs."""

    def __init__(self):
        super().__init__()
        self.early = nn.Conv2d(8, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.late = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.early(x))), 4)
        x = torch.relu(self.bn2(self.late(x)))
        return self.fc(x.mean((2, 3)))


def removed_shares(budget=None, share=0.0):
    """The share of each layer's channels that one removal at the end takes."""
    torch.manual_seed(0)
    net = EarlyWide()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    removal = ChannelRemoval(share, 0, 1, floor=0.1, multiple_of=1, shrink=False, budget=budget)
    sparsifier = DSR(
        net, optimizer, sparsity=0.9, layers=LayerSelection(dense_first=False), schedule=RewireSchedule({0: 100}),
        remove_channels=removal, example_inputs=torch.zeros(1, 8, 16, 16),
    )  # fmt: skip
    chosen = sparsifier.channels.choose_due(1, sparsifier.active_count())
    return {name: len(chosen.get(name, [])) / 32 for name in ("early", "late")}, sparsifier


def test_a_cost_aware_ranking_takes_more_from_the_expensive_early_layer():
    """A uniform ranking (mean |w| over the layer's, the count target of `share`) takes about the
    same share of both layers; for a MAC budget the early layer, whose channels cost 5x, loses
    more channels than the uniform share would take, and the budget is met."""
    costly, sparsifier = removed_shares(budget=CostBudget("macs", 0.5))
    taken = round((costly["early"] + costly["late"]) * 32) / 64
    uniform, _ = removed_shares(share=taken)
    assert abs(uniform["early"] - uniform["late"]) <= 0.25, uniform
    assert costly["early"] > taken + 0.2 and costly["early"] > costly["late"] + 0.4, costly
    channels = sparsifier.channels
    chosen = channels.choose_due(1, sparsifier.active_count())
    channels.remove(chosen, None)
    assert channels.cost_share() <= 0.5


def test_resume_across_the_fill_is_exact():
    """Speed first: a run stopped before the fill and resumed matches an uninterrupted one bit for
    bit, after the fill every live weight is active, and reallocation has stopped."""

    def build(fresh):
        net = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        removal = ChannelRemoval(0.0, 0, 12, multiple_of=8, budget=CostBudget("macs", 0.5), dense_inside=True)
        sparsifier = DSR(
            net, optimizer, sparsity=0.9, seed=7 if fresh else 0, schedule=RewireSchedule({0: 4}),
            remove_channels=removal, example_inputs=torch.zeros(1, 1, 8, 8),
        )  # fmt: skip
        return net, optimizer, sparsifier

    state, _ = assert_resume_is_exact(build, 8, 12)
    assert state["filled"] and all(bool(mask.all()) for mask in state["masks"].values())


@pytest.mark.parametrize(
    "removal, expected",
    [
        ({"macs": 0}, "sparsity.remove_channels.macs"),
        ({"macs": 1.0}, "sparsity.remove_channels.macs"),
        ({"latency": -0.5}, "sparsity.remove_channels.latency"),
        ({"share": 0.5, "macs": 0.5}, "give one target of share, macs and latency, not share and macs"),
        ({"end_epoch": 2}, "give a target: share (of the channels), macs or latency"),
        (
            {"macs": 0.05, "floor": 0.5, "multiple_of": 8},
            "sparsity.remove_channels.macs 0.05 cannot be met: with every layer at its floor (floor 0.5, "
            "multiple_of 8) the model keeps 0.",
        ),
    ],
)
def test_bad_targets_are_one_line_at_check(tmp_path, layer_cache, removal, expected):
    raw = tiny(sparsity={"remove_channels": removal})
    result = CliRunner().invoke(app, ["check", str(write_pipeline(tmp_path, raw))])
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_latency_target_needs_an_input_size_to_time(tmp_path, layer_cache):
    """Image folders without data.image_size cannot be timed at check: one line."""
    root = tmp_path / "images"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    raw = tiny(
        data={"dataset": "imagefolder", "root": str(root)}, sparsity={"remove_channels": {"latency": 0.5}}
    )
    result = CliRunner().invoke(app, ["check", str(write_pipeline(tmp_path, raw))])
    assert result.exit_code == 2, result.output
    assert "remove_channels.latency needs data.image_size" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_layer_times_are_interpolated_between_measured_widths(tmp_path):
    """The table measures few widths and interpolates: a width between two measured ones costs
    between their times, and a width is rounded up to the multiple first."""
    layer = cost_module.Layer("conv", 64, 64, 1, (3, 3), 64, (64, 8, 8), (1, 1), (1, 1), (1, 1))
    table = cost_module.LatencyTable(tmp_path / "times.json", step=8)
    table.prepare({"conv": layer}, {"conv": (16, 16)})
    ins, outs, grid = table.grids["conv"]
    assert ins == outs == [16, 32, 48, 64] and np.all(grid > 0)
    assert table(layer, 17, 64) == table(layer, 24, 64)  # 17 channels cost what 24 do
    low, high = sorted((table(layer, 32, 16), table(layer, 32, 32)))
    assert low <= table(layer, 32, 24) <= high
