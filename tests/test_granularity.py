"""Structured granularity (element | kernel | channel) of static, DSR and SET: masks are unions of
whole units, the active budget is exact, element granularity is unchanged bit for bit."""

import itertools
import json
import random
import re
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dsrpipe.checkpoint import torch_load
from dsrpipe.cli import app
from dsrpipe.data import load_data
from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.rundir import settings_fingerprint
from dsrpipe.sparse import (
    DeepR,
    GradualPrune,
    RewireSchedule,
    RigL,
    Units,
    create_sparsifier,
    proportional_split,
    split_in_units,
)
from dsrpipe.sparse.units import unit_size
from dsrpipe.sparsifiers import build_sparsifier

from .element_reference import lockstep
from .helpers import assert_resume_is_exact, masked_weights_are_zero, small_net
from .test_export import stored_weights
from .test_pipeline import tiny, write_pipeline

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["kernel", "channel"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")[0]


def build(method, granularity, model="small-cnn", sparsity=0.9, **options):
    """A model, its optimizer and its sparsifier. `small-cnn`: two sparse 3×3 convs; `mixed`: two
    sparse convs and a sparse Linear, so unit sizes differ (kernel 9, 9, 1; channel 144, 288, 128)."""
    net = (
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8)
        if model == "small-cnn"
        else small_net()
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    if method == "dsr":
        options = {"prune_fraction": 0.1, "init_threshold": 0.01, **options}
    if method == "set":
        options = {"prune_fraction": 0.3, **options}  # moves a unit even where a tensor has only 2 or 3
    return (
        net,
        opt,
        create_sparsifier(
            method,
            net,
            opt,
            sparsity=sparsity,
            granularity=granularity,
            schedule=RewireSchedule({0: 3}),
            **options,
        ),
    )


def whole_units(s, masks=None):
    return all(s.units[n].whole(m) for n, m in (masks or s.masks).items())


def test_unit_sizes_and_views():
    conv, linear = torch.Size([8, 4, 3, 3]), torch.Size([6, 5])
    assert [unit_size(conv, g) for g in ("element", "kernel", "channel")] == [1, 9, 36]
    assert [unit_size(linear, g) for g in ("element", "kernel", "channel")] == [
        1,
        1,
        5,
    ]  # a Linear has no kernels
    units = Units(conv, 9)
    unit_mask = torch.zeros(units.count, dtype=torch.bool)
    unit_mask[[0, 5, 31]] = True
    mask = units.expand(unit_mask)
    assert mask.shape == conv and int(mask.sum()) == 27 and bool(mask[0, 0].all()) and bool(mask[1, 1].all())
    assert torch.equal(units.of(mask), unit_mask) and units.whole(mask)
    mask[7, 3, 2, 2] = ~mask[7, 3, 2, 2]  # one element of kernel 31 off: no longer whole kernels
    assert not units.whole(mask)
    weight = torch.arange(conv.numel(), dtype=torch.float).view(conv) - 100
    assert torch.allclose(units.magnitude(weight), weight.abs().view(32, 9).mean(1))
    channels_last = weight.to(memory_format=torch.channels_last)  # as on CUDA: same logical units
    assert torch.equal(units.magnitude(channels_last), units.magnitude(weight))
    element = Units(conv, 1)
    assert element.of(mask) is mask and element.expand(mask) is mask  # size 1: no work at all


def brute_force(total, capacity, sizes):
    return [
        c
        for c in itertools.product(*(range(k + 1) for k in capacity))
        if sum(n * s for n, s in zip(c, sizes)) == total
    ]


def test_split_in_units_is_exact_or_none_when_no_whole_units_fit():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 3)
        sizes = [rng.choice([1, 2, 3, 4, 6, 9]) for _ in range(n)]
        capacity = [rng.randint(0, 5) for _ in range(n)]
        weights = [rng.randint(0, 10) for _ in range(n)]
        total = rng.randint(0, sum(c * s for c, s in zip(capacity, sizes)) + 3)
        result = split_in_units(total, weights, capacity, sizes)
        solutions = brute_force(total, capacity, sizes)
        if result is None:
            assert not solutions, (total, weights, capacity, sizes)
        else:
            assert sum(u * s for u, s in zip(result, sizes)) == total
            assert all(0 <= u <= c for u, c in zip(result, capacity))
    assert split_in_units(1, [1, 1], [5, 5], [2, 3]) is None  # 2s and 3s cannot make 1
    assert split_in_units(12, [1], [1], [9]) is None  # more than fits


def test_split_in_units_is_proportional_and_proportional_split_at_size_one():
    assert split_in_units(7, [10, 21, 29], [10, 10, 10], [1, 1, 1]) == proportional_split(
        7, [10, 21, 29], [10, 10, 10]
    )
    # 9·12 weights at 1:2 over 3×3 kernels: 36 and 72 weights, 4 and 8 kernels
    assert split_in_units(108, [100, 200], [50, 50], [9, 9]) == [4, 8]
    # channels of 288 and 576 weights (the small CNN's conv2 and conv3), shares 1:3 of 2880
    # the small CNN's filters: 288 and 576 weights; shares 720 and 2160 of 2880 weights. The larger
    # units first: 3.75 → 4 filters (2304 weights), then the rest exactly: 2 filters of 288.
    assert split_in_units(2880, [1, 3], [60, 120], [288, 576]) == [2, 4]
    rng = random.Random(1)
    for _ in range(
        200
    ):  # sizes that divide one another: each tensor within a unit (the largest) of its share
        group = rng.choice([[1, 9], [1, 25], [9], [144, 288, 576], [128, 256]])
        sizes = [rng.choice(group) for _ in range(rng.randint(2, 5))]
        total = sum(rng.randint(0, 20) * s for s in sizes)
        weights = [rng.randint(1, 1000) for _ in sizes]
        capacity = [10_000] * len(sizes)
        units = split_in_units(total, weights, capacity, sizes)
        assert sum(u * s for u, s in zip(units, sizes)) == total
        for u, s, w in zip(units, sizes, weights):
            assert abs(u * s - total * w / sum(weights)) <= max(sizes)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["static", "dsr", "set"])
def test_element_granularity_matches_a_plain_reference(digits, method):
    """The engine at element granularity against tests/element_reference.py, trained side by side
    in this process: the same masks after every step, the same weights within float tolerance."""
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    steps, first, last = [], [], []

    def same_state(engine, reference):
        masks = list(engine.masks.values())
        assert len(masks) == len(reference.masks) == 2
        if not steps:
            first.extend(m.clone() for m in masks)
        last[:] = [m.clone() for m in masks]
        for mask, expected in zip(masks, reference.masks):
            assert torch.equal(mask, expected)
        for weight, expected in zip(engine.weights.values(), reference.weights):
            torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)
        if method == "dsr":
            assert engine.threshold == reference.threshold
        steps.append(engine.iteration)

    lockstep(method, digits, model, same_state)
    assert len(steps) == 22
    moved = sum(int((a != b).sum()) for a, b in zip(first, last))
    assert (moved == 0) == (method == "static")  # the comparison covered real reallocations


@pytest.mark.parametrize("model", ["small-cnn", "mixed"])
@pytest.mark.parametrize("granularity", UNITS)
@pytest.mark.parametrize("method", ["dsr", "static", "set"])
def test_masks_stay_whole_units_and_the_budget_exact_through_training(digits, method, granularity, model):
    torch.manual_seed(0)
    net, opt, s = build(method, granularity, model)
    assert whole_units(s) and masked_weights_are_zero(s)
    assert s.active_count() == sum(s.budgets.values())
    for name, budget in s.budgets.items():
        assert budget % s.units[name].size == 0 and budget >= s.units[name].size  # whole units, never none
    per_tensor = s.active_per_tensor()
    initial = {n: m.clone() for n, m in s.masks.items()}
    thresholds, moved, steps = set(), 0, 0
    for epoch in range(2):
        for x, y in digits.batches(64, shuffle=True, augment=True, seed=0, epoch=epoch, drop_last=True):
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            stats = s.step()
            steps += 1
            if stats is None:
                continue
            assert whole_units(s) and masked_weights_are_zero(s)
            assert s.active_count() == sum(per_tensor.values())  # exactly, after every reallocation
            assert sum(stats["grown"].values()) == stats["pruned"]
            if method == "set":  # each tensor keeps its own count
                assert s.active_per_tensor() == per_tensor
            if method != "static":
                assert whole_units(s, s.last_grown)
                for name, grown in s.last_grown.items():  # grown units start at zero, at rest
                    momentum = opt.state[s.weights[name]]["momentum_buffer"]
                    assert bool((s.weights[name][grown] == 0).all()) and bool((momentum[grown] == 0).all())
            moved += stats["pruned"]
            thresholds.add(getattr(s, "threshold", None))
    assert steps == 44
    if method == "static":
        assert all(torch.equal(initial[n], m) for n, m in s.masks.items())
    else:
        assert moved > 0
        assert any(not torch.equal(initial[n], m) for n, m in s.masks.items())
    if method == "dsr":
        assert len(thresholds) > 1  # H adapts


# Unit sizes that divide one another (kernel: 9, 9, 1; the small CNN's filters: 72, 144), where every
# tensor's growth is within a unit of its share; see split_in_units for sizes that do not.
@pytest.mark.parametrize("granularity, model", [("kernel", "mixed"), ("channel", "small-cnn")])
def test_dsr_grows_whole_units_in_proportion_to_survivors(granularity, model):
    torch.manual_seed(0)
    net, opt, s = build("dsr", granularity, model, sparsity=0.5, init_threshold=0.03)
    names = list(s.masks)
    sizes = [s.units[n].size for n in names]
    with torch.no_grad():  # unit magnitudes spread from 0 to 2× the init's, so that some fall below H
        for n in names:
            s.weights[n].view(s.units[n].count, -1).mul_(2 * torch.rand(s.units[n].count, 1))
    unit_magnitude = [s.units[n].magnitude(s.weights[n]) for n in names]
    active = [s.units[n].of(s.masks[n]) for n in names]
    pruned = [int((a & (g < 0.03)).sum()) * size for a, g, size in zip(active, unit_magnitude, sizes)]
    kept = [int(a.sum()) * size - p for a, size, p in zip(active, sizes, pruned)]
    stats = s.reallocate()
    grown = [stats["grown"][n] for n in names]
    assert stats["pruned"] == sum(pruned) == sum(grown) > 0 and 0 not in kept
    free = [s.units[n].count - int(a.sum()) for n, a in zip(names, active)]
    assert [g // size for g, size in zip(grown, sizes)] == split_in_units(sum(pruned), kept, free, sizes)
    for g, k, size in zip(grown, kept, sizes):
        assert g % size == 0
        assert abs(g - sum(pruned) * k / sum(kept)) <= max(sizes)  # proportional, within a unit


@pytest.mark.parametrize("granularity", UNITS)
def test_dsr_never_empties_a_tensor_of_tiny_units(granularity):
    torch.manual_seed(0)
    net, opt, s = build("dsr", granularity, "mixed", init_threshold=10.0)  # every unit far below H
    budget, active = s.active_count(), {n: s.units[n].of(m).clone() for n, m in s.masks.items()}
    largest = {n: int((s.units[n].magnitude(s.weights[n]) * a).argmax()) for n, a in active.items()}
    before = {n: w.detach().clone() for n, w in s.weights.items()}
    stats = s.reallocate()
    assert s.active_count() == budget
    # all pruned but each tensor's largest unit, which keeps its weights
    assert stats["pruned"] == sum((int(a.sum()) - 1) * s.units[n].size for n, a in active.items())
    for name, unit in largest.items():
        size = s.units[name].size
        assert bool(s.masks[name].view(-1, size)[unit].all())
        kept = s.weights[name].detach().reshape(-1, size)[unit]
        assert torch.equal(kept, before[name].reshape(-1, size)[unit]) and bool((kept != 0).any())


@pytest.mark.numerics
@pytest.mark.parametrize("granularity", UNITS)
@pytest.mark.parametrize("method", ["dsr", "set"])
def test_state_dict_round_trip_continues_identically(method, granularity):
    def rebuild(fresh):
        torch.manual_seed(0)
        net = small_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        options = {"prune_fraction": 0.1, "seed": 9 if fresh else 0}
        if method == "dsr":
            options["init_threshold"] = 0.5 if fresh else 0.01  # the loaded H must replace the fresh one
        return (
            net,
            opt,
            create_sparsifier(
                method,
                net,
                opt,
                sparsity=0.9,
                granularity=granularity,
                schedule=RewireSchedule({0: 3}),
                **options,
            ),
        )

    s1, s2 = assert_resume_is_exact(rebuild, 12, 12)
    assert s1["granularity"] == s2["granularity"] == granularity


def test_a_checkpoint_of_another_granularity_is_refused():
    torch.manual_seed(0)
    kernel = build("dsr", "kernel")[2].state_dict()
    for other in ("channel", "element"):
        with pytest.raises(UserError, match=f"granularity 'kernel', not '{other}'"):
            build("dsr", other)[2].load_state_dict(kernel)
    older = build("dsr", "element")[2].state_dict()
    del older["granularity"]  # a checkpoint from before the option: elementwise
    build("dsr", "element")[2].load_state_dict(older)
    with pytest.raises(UserError, match="granularity 'element', not 'channel'"):
        build("dsr", "channel")[2].load_state_dict(older)
    channel = build("static", "channel")[2]
    with pytest.raises(UserError, match="does not fit its weight at granularity 'channel'"):
        channel.load_masks(build("static", "element")[2].masks)  # scattered weights, not whole filters


@pytest.mark.parametrize("cls, options", [(RigL, {}), (DeepR, {}), (GradualPrune, {"total_steps": 10})])
def test_methods_that_move_single_weights_refuse_units(cls, options):
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    with pytest.raises(UserError, match=f"method '{cls.method}' prunes and grows single weights only"):
        cls(net, opt, sparsity=0.5, granularity="kernel", **options)


@pytest.mark.parametrize("method", ["rigl", "deepr", "gmp", "dense", "thin-dense", "prune", "frozen"])
def test_granularity_is_a_config_error_for_other_methods(tmp_path, method):
    raw = tiny()
    raw["sparsity"] = {"method": method, "granularity": "channel"}
    path = write_pipeline(tmp_path, raw)
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 2, result.output
    named = re.search(
        rf"method '{method}' takes no option 'granularity' \(an option of ([a-z, ]+);", result.output
    )
    assert named and set(named.group(1).split(", ")) == {"dsr", "static", "set"}, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_granularity_reaches_the_library_and_element_keeps_fingerprints():
    from dsrpipe.config import parse_pipeline

    cfg = parse_pipeline(tiny(sparsity={"method": "set", "granularity": "kernel"}))
    net = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    assert (
        build_sparsifier(cfg.sparsity, net, None, seed=0, steps_per_epoch=10, epochs=2).granularity
        == "kernel"
    )
    stated = parse_pipeline(tiny(sparsity={"method": "dsr", "granularity": "element"}))
    assert settings_fingerprint(stated, "train") == settings_fingerprint(
        parse_pipeline(tiny(sparsity={"method": "dsr"})), "train"
    )
    assert "granularity" not in stated.sparsity.model_dump()  # runs from before the option stay current
    assert settings_fingerprint(
        parse_pipeline(tiny(sparsity={"method": "dsr", "granularity": "channel"})), "train"
    ) != settings_fingerprint(stated, "train")


def test_quickstart_at_channel_granularity_exports_whole_zero_filters(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(ROOT / "pipelines" / "quickstart.yaml"),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "sparsity.granularity=channel",
            "--set",
            "train.epochs=2",
            "--set",
            "train.milestones=[]",
            "--set",
            "finetune.epochs=1",
            "--set",
            "validate.min_top1=0.5",
            "--set",
            "validate.latency_runs=5",
        ],
    )
    assert result.exit_code == 0, result.output[-2000:]
    run = out / "quickstart"
    report = json.loads((run / "report.json").read_text())
    assert report["passed"] and 0.89 <= report["sparsity"] <= 0.91
    trained = torch_load(run / "finetune" / "final.pt")
    zero_filters = {}
    for name, mask in trained["sparsifier"]["masks"].items():
        weight = trained["model"][f"{name}.weight"]
        filters = mask.flatten(1)
        assert bool((filters.all(1) | ~filters.any(1)).all())  # every filter all in or all out
        assert bool((weight[~mask] == 0).all())
        zero_filters[name] = int((weight.flatten(1) == 0).all(1).sum())
        assert zero_filters[name] >= int((~filters.any(1)).sum()) > 0
    stored = stored_weights(onnx.load(str(run / "model.onnx")))  # conv weights with BatchNorm folded in
    for name, count in zero_filters.items():
        weight = next(w for key, w in stored.items() if key.endswith(f"{name}.weight"))
        filters = weight.reshape(weight.shape[0], -1)
        removed = trained["model"][f"{name}.weight"].shape[0] - filters.shape[0]  # filters an export may cut
        assert int((filters == 0).all(1).sum()) + removed == count
        assert bool(((filters == 0).all(1) | (filters != 0).any(1)).all())
