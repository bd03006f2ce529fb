"""Channel removal during sparse training (dsrpipe/sparse/channels.py): its invariants through real
training on digits, exact resume, the coupled removal of a residual stream, and the export that
cuts the removed channels with nothing to fold."""

import re

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dsrpipe.cli import app
from dsrpipe.config import DataConfig, parse_pipeline
from dsrpipe.deploy.shrink import shrink_model
from dsrpipe.models import create_model
from dsrpipe.pipeline import run_pipeline
from dsrpipe.sparse import DSR, SET, ChannelRemoval, RewireSchedule, Sparsifier
from dsrpipe.sparsifiers import sparsifier_options
from dsrpipe.train import load_splits

from .helpers import assert_resume_is_exact, masked_weights_are_zero, small_net, train_steps
from .test_pipeline import tiny, write_pipeline


def digits_batches(steps, batch=64, seed=0):
    train, _ = load_splits(DataConfig(dataset="digits"))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(train), (batch,), generator=generator)
        yield train.images[pick].float() / train.max_value, train.labels[pick]


def train_on_digits(net, optimizer, sparsifier, steps):
    """Train `steps` steps on digits batches, yielding the step number after each sparsifier step."""
    for step, (x, y) in enumerate(digits_batches(steps), start=1):
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        yield step


def build(
    method=DSR,
    model="small-cnn",
    shape=(1, 8, 8),
    share=0.5,
    floor=0.25,
    end=60,
    dense_layers=False,
    multiple_of=1,
    shrink=False,
    **options,
):
    torch.manual_seed(0)
    net = create_model(model, num_classes=10, in_channels=shape[0], image_size=shape[1])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    removal = ChannelRemoval(
        share=share,
        begin=0,
        end=end,
        floor=floor,
        dense_layers=dense_layers,
        multiple_of=multiple_of,
        shrink=shrink,
    )
    sparsifier = method(
        net,
        optimizer,
        sparsity=0.9,
        schedule=RewireSchedule({0: 10}),
        remove_channels=removal,
        example_inputs=torch.zeros(1, *shape),
        **options,
    )
    return net, optimizer, sparsifier


def removed_channel_outputs(net, sparsifier, x):
    """What each removed channel carries after its BatchNorms (the largest |value|), in eval mode."""
    seen = []
    hooks = []
    for group in sparsifier.channels.groups:
        dead = torch.nonzero(~sparsifier.channels.alive[group.name]).flatten()
        for member in group.members:
            if member.role == "norm" and len(dead):
                index = member.index[dead].flatten()
                hooks.append(
                    member.module.register_forward_hook(
                        lambda m, args, out, index=index: seen.append(out[:, index].abs().max().item())
                    )
                )
    net.eval()
    with torch.no_grad():
        net(x)
    net.train()
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("dense_layers", [False, True])
def test_channels_go_for_good_while_the_active_total_stays_exactly_constant(dense_layers):
    """Real training on digits: after every step the active total is what it started at, the live
    channels of every group only ever shrink and never below the floor, no weight lives in a
    removed channel, and what a removed channel carries after BatchNorm is exactly zero. With
    `dense_layers` the dense input layer's channels are removable too."""
    net, optimizer, sparsifier = build(prune_fraction=0.1, dense_layers=dense_layers)
    channels = sparsifier.channels
    expected = ["conv1", "conv2", "conv3"] if dense_layers else ["conv2", "conv3"]
    assert [g.name for g in channels.groups] == expected
    total = sparsifier.active_count()
    alive_before = {n: a.clone() for n, a in channels.alive.items()}
    for step in train_on_digits(net, optimizer, sparsifier, 90):
        assert sparsifier.active_count() == total, step
        for name, alive in channels.alive.items():
            assert not (alive & ~alive_before[name]).any(), f"a channel of {name} came back at step {step}"
            assert int(alive.sum()) >= channels.floor[name]
            alive_before[name] = alive.clone()
        for name, closed in channels.closed.items():
            assert not (sparsifier.masks[name] & closed).any()
            assert (sparsifier.weights[name][closed] == 0).all()
        assert masked_weights_are_zero(sparsifier)
    assert channels.removed == round(0.5 * channels.total)  # the target, reached by `end`
    assert all(int(a.sum()) < len(a) for a in channels.alive.values())  # every layer gave some
    x, _ = next(digits_batches(1, seed=1))  # a batch to probe the trained net with
    outputs = removed_channel_outputs(net, sparsifier, x)
    assert outputs and max(outputs) == 0.0
    # With ReLU, a channel zeroed in all its layers at once gets no gradient anyway; a loss that
    # pushes everything still must not revive it: BN γ and β, dense rows and columns are held.
    for param in net.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    assert channels.keep and all((param[~keep] == 0).all() for param, keep in channels.keep.items())
    assert max(removed_channel_outputs(net, sparsifier, x)) == 0.0


def test_the_floor_holds_when_the_share_asks_for_more():
    net, optimizer, sparsifier = build(share=0.9, floor=0.5, prune_fraction=0.1)
    for _ in train_on_digits(net, optimizer, sparsifier, 70):
        pass
    channels = sparsifier.channels
    assert {n: int(a.sum()) for n, a in channels.alive.items()} == channels.floor
    assert channels.floor == {"conv2": 32, "conv3": 64}  # half of 64 and of 128


def test_the_last_removal_leaves_each_layer_a_multiple_of_channels():
    """With multiple_of 16 the channels still go a few at a time, but after the last removal
    every group holds a multiple of 16 live channels (or all of them), and the total removed is
    as near the share's count as the multiples allow."""
    net, optimizer, sparsifier = build(
        share=0.3, end=60, dense_layers=True, multiple_of=16, prune_fraction=0.1
    )
    channels, total = sparsifier.channels, sparsifier.active_count()
    planned = {}  # what the last removal's plan took from each group, before rounding
    lowest = channels._lowest
    channels._lowest = lambda *args: planned.update(chosen=lowest(*args)) or planned["chosen"]
    seen = set()
    for step in train_on_digits(net, optimizer, sparsifier, 70):
        assert sparsifier.active_count() == total
        seen.add(tuple(channels.alive_counts().values()))
        if step == 59:
            before = channels.alive_counts()
    assert len(seen) > 3  # gradual: more than a jump per multiple
    assert any(count % 16 for counts in seen for count in counts)
    alive = channels.alive_counts()
    assert all(count % 16 == 0 or count == g.channels for count, g in zip(alive.values(), channels.groups)), (
        alive
    )
    # Exactly the nearest allowed count to what the plan left (ties: the larger), so a group
    # already at a multiple, and planned at most half a multiple, loses nothing more.
    for g in channels.groups:
        now, wanted = before[g.name], before[g.name] - len(planned["chosen"].get(g.name, []))
        allowed = [k for k in range(16, now + 1, 16) if k >= channels.floor[g.name]]
        allowed += [now] if now == g.channels else []
        assert alive[g.name] == min(allowed, key=lambda k: (abs(k - wanted), -k)), (g.name, before, alive)
    assert abs(channels.removed - round(0.3 * channels.total)) <= 8 * len(channels.groups)
    assert channels.removed > 0


def test_set_and_static_regrow_the_budget_of_removed_channels():
    for method, options in ((SET, {"prune_fraction": 0.1}), (Sparsifier, {})):
        net, optimizer, sparsifier = build(method=method, share=0.3, end=30, **options)
        total = sparsifier.active_count()
        for _ in train_on_digits(net, optimizer, sparsifier, 40):
            assert sparsifier.active_count() == total
        assert sparsifier.channels.removed == round(0.3 * sparsifier.channels.total)


def conv_stack_removing(shrink):
    """A plain conv stack with biases, pooled and flattened into a Linear (a channel is several
    columns there), DSR removing channels: `build(fresh)` for assert_resume_is_exact."""

    def build(fresh):
        model = small_net(width=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sparsifier = DSR(
            model,
            optimizer,
            sparsity=0.8,
            prune_target=40,
            schedule=RewireSchedule({0: 4}),
            seed=7 if fresh else 0,
            remove_channels=ChannelRemoval(share=0.4, begin=0, end=30, shrink=shrink),
            example_inputs=torch.zeros(1, 1, 8, 8),
        )
        return model, optimizer, sparsifier

    return build


@pytest.mark.numerics
def test_resume_in_the_middle_of_removal_is_exact():
    """Held at zero in the full model (shrink: false): a removed channel's bias too, through the
    steps after its removal (momentum would move it)."""
    built = []

    def build(fresh):
        built.append(conv_stack_removing(shrink=False)(fresh))
        return built[-1]

    first, second = assert_resume_is_exact(build, 13, 25)
    assert first["channels"].keys() == second["channels"].keys()
    for name, alive in first["channels"].items():
        assert torch.equal(alive, second["channels"][name])
    assert sum(int((~a).sum()) for a in first["channels"].values()) > 0
    uninterrupted = built[0][0]
    for name, alive in first["channels"].items():  # a group is named after its first writer
        bias = uninterrupted.get_submodule(name).bias
        assert (bias[~alive] == 0).all() and (bias[alive] != 0).any(), name


def test_a_residual_stream_channel_goes_everywhere_it_appears():
    """WRN-10-2 (stages of 32, 64, 128 channels): the second stage's stream is written by its block's conv2 and by the 1x1
    shortcut (dense), and read by the next stage's BN, conv1 and shortcut. A removed stream
    channel is zero in all of them, and shrinking cuts it from the writers and the readers."""
    net, optimizer, sparsifier = build(
        model="wrn-10-2", shape=(1, 8, 8), share=0.5, end=30, prune_fraction=0.1
    )
    for _ in train_on_digits(net, optimizer, sparsifier, 35):
        pass
    stream = next(g for g in sparsifier.channels.groups if g.name == "group2.0.conv2")
    roles = {(m.name, m.role) for m in stream.members}
    assert {("group2.0.conv2", "out"), ("group2.0.shortcut", "out"), ("group3.0.bn1", "norm")} <= roles
    assert {("group3.0.conv1", "in"), ("group3.0.shortcut", "in")} <= roles
    dead = torch.nonzero(~sparsifier.channels.alive[stream.name]).flatten()
    assert len(dead) > 0
    for layer in (net.group2[0].conv2, net.group2[0].shortcut):
        assert (layer.weight[dead] == 0).all()
    for layer in (net.group3[0].conv1, net.group3[0].shortcut):
        assert (layer.weight[:, dead] == 0).all()
    assert (net.group3[0].bn1.weight[dead] == 0).all() and (net.group3[0].bn1.bias[dead] == 0).all()

    net.eval()
    shrunk, summary = shrink_model(net, (1, 8, 8))
    assert summary["folds"] == 0  # exact zeros: nothing to put back
    live = stream.channels - len(dead)
    assert shrunk.group2[0].conv2.out_channels == shrunk.group2[0].shortcut.out_channels == live
    assert shrunk.group3[0].conv1.in_channels == shrunk.group3[0].shortcut.in_channels == live
    x, _ = next(digits_batches(1, seed=1))
    with torch.no_grad():
        assert torch.allclose(shrunk(x), net(x), atol=1e-4)


def test_the_export_cuts_removed_channels_and_keeps_the_logits(tmp_path):
    """Train, fine-tune, export and validate on digits: the export has as many fewer channels per
    layer as training removed, nothing was folded, onnxruntime matches torch, and fine-tuning
    kept the removed channels at zero."""
    raw = tiny(
        "removal",  # held at zero in the full model, for the export to cut (tests/test_shrinking.py: cut as it trains)
        sparsity={"remove_channels": {"share": 0.5, "end_epoch": 2, "shrink": False}},
        train={"epochs": 3},
        validate={"latency_runs": 3},
    )
    report = run_pipeline(parse_pipeline(raw), tmp_path, progress=False)
    final = torch.load(tmp_path / "removal" / "finetune" / "final.pt", weights_only=True)
    dead = {n: int((~a).sum()) for n, a in final["sparsifier"]["channels"].items()}
    # small-cnn at width 16: conv1 (16 channels, which a multiple of 16 leaves whole), conv2, conv3
    assert dead["conv1"] == 0 and abs(dead["conv2"] + dead["conv3"] - round(0.5 * (16 + 32 + 64))) <= 8 * 3
    assert report.shrink["removed_channels"] == {n: k for n, k in dead.items() if k}
    assert report.shrink["folds"] == 0
    assert report.max_abs_logit_diff < 1e-4 and report.passed
    trained = torch.load(tmp_path / "removal" / "train" / "final.pt", weights_only=True)
    history = [h["channels_alive"] for h in trained["history"] + final["history"]]
    assert history[-1] == {"conv1": 16, "conv2": 32 - dead["conv2"], "conv3": 64 - dead["conv3"]}
    assert all(count % 16 == 0 for count in history[-1].values())  # the default multiple_of


def test_remove_channels_settings_are_checked_at_the_edge(tmp_path):
    runner = CliRunner()
    cases = {
        "granularity element or kernel": {"granularity": "channel", "remove_channels": {"share": 0.5}},
        "within train.epochs (4): begin_epoch 0, end_epoch 9": {
            "remove_channels": {"share": 0.5, "end_epoch": 9}
        },
        "sparsity.remove_channels.share": {"remove_channels": {"share": 1.5}},
        "sparsity.remove_channels.multiple_of": {"remove_channels": {"share": 0.5, "multiple_of": 0}},
        "sparsity.remove_channels.dense_layers": {"remove_channels": {"share": 0.5, "dense_layers": "yes"}},
        "sparsity.remove_channels.shrink": {"remove_channels": {"share": 0.5, "shrink": "sometimes"}},
        "method 'rigl' takes no option 'remove_channels'": {
            "method": "rigl",
            "remove_channels": {"share": 0.5},
        },
    }
    for expected, sparsity in cases.items():
        raw = tiny()
        raw["sparsity"] = {**({} if "method" in sparsity else raw["sparsity"]), **sparsity}
        result = runner.invoke(app, ["check", str(write_pipeline(tmp_path, raw))])
        assert result.exit_code == 2, result.output
        assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    cfg = parse_pipeline(tiny(sparsity={"remove_channels": {"share": 0.5}}))
    assert cfg.sparsity.remove_channels.end(cfg.train.epochs) == 2  # default: half of training
    removal = sparsifier_options(cfg.sparsity, steps_per_epoch=10, epochs=cfg.train.epochs)["remove_channels"]
    library = ChannelRemoval(share=0.5)
    assert (
        (removal.dense_layers, removal.multiple_of, removal.shrink)
        == (library.dense_layers, library.multiple_of, library.shrink)
        == (True, 16, True)
    )
    assert "remove_channels" not in parse_pipeline(tiny()).sparsity.model_dump()  # old fingerprints stay


def test_without_removal_nothing_changes():
    model = small_net(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = DSR(model, optimizer, sparsity=0.8, prune_target=40, schedule=RewireSchedule({0: 4}))
    train_steps(model, optimizer, sparsifier, 8)
    assert sparsifier.channels is None and "channels" not in sparsifier.state_dict()


def removing(sparsity=0.8, schedule=None, **removal):
    """small_net (convs with biases; groups 0: 8 channels, 2: 16, 4: 16, 8: 32, the first one
    dense) with DSR removing channels: cheap, for one or a few steps on random 8x8 inputs."""
    torch.manual_seed(0)
    model = small_net(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = DSR(
        model,
        optimizer,
        sparsity=sparsity,
        prune_fraction=0.1,
        schedule=schedule or RewireSchedule({0: 2}),
        remove_channels=ChannelRemoval(**{"share": 0.5, "end": 1, "multiple_of": 1, **removal}),
        example_inputs=torch.zeros(1, 1, 8, 8),
    )
    return model, optimizer, sparsifier


def test_the_share_removed_follows_the_cubic_curve():
    """Fast first, gentle at the end: share · (1 - (1 - t/end)³) of 1000 channels."""
    removal = ChannelRemoval(share=0.5, begin=0, end=100)
    assert [removal.target(t, 1000) for t in (0, 25, 50, 100, 120)] == [0, 289, 438, 500, 500]


@pytest.mark.parametrize(
    "schedule,end,multiple_of",
    [
        (RewireSchedule({0: 5}), 14, 1),
        (RewireSchedule({0: 5}, stop_epoch=1, steps_per_epoch=6), 12, 8),
    ],
    ids=["a period that does not divide end", "rewiring stops before end"],
)
def test_the_last_removal_happens_at_end_off_the_schedule(schedule, end, multiple_of):
    """The method's schedule is due at 5 and 10 but not at end 14 (or at 5 only, end 12): the
    last removal still comes at end, reaching the share (and the multiples)."""
    model, optimizer, sparsifier = removing(schedule=schedule, end=end, multiple_of=multiple_of)
    channels = sparsifier.channels
    train_steps(model, optimizer, sparsifier, end - 1)
    before = channels.removed
    train_steps(model, optimizer, sparsifier, 1, seed=1)
    target = channels.removal.target(end, channels.total)
    assert 0 < before < channels.removed
    if multiple_of == 1:
        assert before < target == channels.removed
    else:
        alive = channels.alive_counts()
        assert all(n % multiple_of == 0 or n == g.channels for n, g in zip(alive.values(), channels.groups))
        assert abs(channels.removed - target) <= multiple_of // 2 * len(channels.groups)


def test_removal_stops_short_when_the_budget_has_no_room():
    """Sparsity 0.5 and share 0.9, no floor: removing 90% of the channels would leave the sparse
    tensors less room than their half of the weights. Removal stops where the budget still
    fits; the active total stays exactly constant."""
    model, optimizer, sparsifier = removing(sparsity=0.5, share=0.9, floor=0.0, end=6)
    channels, total = sparsifier.channels, sparsifier.active_count()
    for step in range(6):
        train_steps(model, optimizer, sparsifier, 1, seed=step)
        assert sparsifier.active_count() == total
    assert 0 < channels.removed < round(0.9 * channels.total)
    for name, mask in sparsifier.masks.items():  # every active weight in a live row and column
        assert not (mask & channels.closed[name]).any()


def short_of_share(sparsifier, steps):
    """Train `steps` steps on random inputs; the `short_of_share` lines the sparsifier's steps returned."""
    lines = []
    real = sparsifier.step
    sparsifier.step = lambda: (stats := real()) and lines.append(stats.get("short_of_share")) or stats
    model = sparsifier.model
    train_steps(model, sparsifier.optimizer, sparsifier, steps)
    return [line for line in lines if line]


def test_a_removal_the_budget_stops_short_of_its_share_says_so_in_one_line():
    """Share 0.99, no floor: the sparse layers must keep room for their budget, so removal ends
    well short of 0.99. The last removal says, in one line, which share it reached and what held
    each group: the room the budget needs, or the one channel a group keeps."""
    model, optimizer, sparsifier = removing(share=0.99, floor=0.0, end=3)
    channels = sparsifier.channels
    # Ranked by group, then channel (all scores equal): the same removals on any CPU.
    channels.score = lambda group: torch.zeros(group.channels)
    assert short_of_share(sparsifier, 4) == [
        "channel removal reached share 0.42 of the 72 removable channels, not the 0.99 asked (30 removed, "
        "not 71): 4, 8 cannot lose another channel and leave the sparse layers room for the budget's "
        "1,101 active weights; 0 (1 of 8), 2 (1 of 16) are at their floor (remove_channels.floor; one at "
        "least)"
    ]
    assert sparsifier.active_count() == 1101


def test_a_removal_the_floors_stop_short_of_its_share_names_them():
    """Share 0.9 with a floor of half of each group: removal ends at about half, at the floors."""
    model, optimizer, sparsifier = removing(share=0.9, floor=0.5, end=1)
    assert short_of_share(sparsifier, 2) == [
        "channel removal reached share 0.50 of the 72 removable channels, not the 0.9 asked (36 removed, "
        "not 65): 0 (4 of 8), 2 (8 of 16), 4 (8 of 16), 8 (16 of 32) are at their floor "
        "(remove_channels.floor; one at least)"
    ]


@pytest.mark.parametrize("multiple_of", [1, 16])
def test_a_removal_that_reached_its_share_says_nothing(multiple_of):
    """The share's count went (multiple_of 1), or the floors and the budget allowed it and only
    the rounding to multiples moved it, within half a multiple per group (16): no line."""
    model, optimizer, sparsifier = removing(share=0.5, end=2, multiple_of=multiple_of)
    assert short_of_share(sparsifier, 3) == []
    target = round(0.5 * sparsifier.channels.total)
    if multiple_of == 1:
        assert sparsifier.channels.removed == target
    else:  # the groups of 16 are kept whole, as the note at the start says
        assert sparsifier.channels.removed < target


def test_a_run_short_of_its_share_warns_in_its_log_and_its_report(tmp_path, capsys):
    """The issue's setting on digits: share 0.99, floor 0, multiple_of 1. The budget stops removal
    well short; the run's log says so once, in one `warning:` line, and report.json
    (`training.warnings`) and report.md carry the same line."""
    removal = {"share": 0.99, "floor": 0, "multiple_of": 1, "end_epoch": 1}
    raw = tiny("short", sparsity={"remove_channels": removal}, train={"epochs": 1}, finetune={"epochs": 0})
    report = run_pipeline(parse_pipeline(raw), tmp_path, progress=False)
    logged = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(logged) == 1 and logged[0].startswith("short | warning: "), logged
    line = logged[0].removeprefix("short | warning: ")
    assert re.fullmatch(
        r"channel removal reached share 0\.\d\d of the 112 removable channels, not the 0\.99 asked "
        r"\(\d+ removed, not 111\): .* cannot lose another channel and leave the sparse layers room "
        r"for the budget's 2,304 active weights.*",
        line,
    ), line
    assert report.training["warnings"] == [line]
    assert f"**Warning:** {line}" in (tmp_path / "short" / "report.md").read_text()


def test_the_floor_rounds_up():
    """floor 0.2 of 8, 16, 16 and 32 channels: 1.6, 3.2, 3.2 and 6.4, kept as 2, 4, 4 and 7."""
    model, optimizer, sparsifier = removing(sparsity=0.99, share=0.99, floor=0.2)
    train_steps(model, optimizer, sparsifier, 1)
    assert sparsifier.channels.alive_counts() == {"0": 2, "2": 4, "4": 4, "8": 7}


def test_a_group_the_multiple_cannot_round_still_loses_channels_and_is_named():
    """multiple_of 16 on groups of 8, 16, 16 and 32: the 8 channels of the first have no
    multiple to end at and go as the ranking says; the 16s stay whole; a note names them."""
    model, optimizer, sparsifier = removing(multiple_of=16)
    train_steps(model, optimizer, sparsifier, 1)
    alive = sparsifier.channels.alive_counts()
    assert alive["0"] < 8 and alive["2"] == alive["4"] == 16 and alive["8"] == 16, alive
    assert sparsifier.channels.unrounded_note() == (
        "channel removal: multiple_of 16 keeps 2 (16 channels), 4 (16 channels) whole (no smaller "
        "multiple above the floor); it rounds nothing in 0 (8 channels) (no multiple between the "
        "floor and the width): their channels go as the ranking says"
    )
    model, optimizer, sparsifier = removing(multiple_of=1024)  # larger than every group
    train_steps(model, optimizer, sparsifier, 1)
    assert sparsifier.channels.removed == round(0.5 * sparsifier.channels.total)
    assert "rounds nothing in 0 (8 channels), 2 (16 channels), 4 (16 channels), 8 (32 channels)" in (
        sparsifier.channels.unrounded_note()
    )


def test_a_group_at_its_multiple_keeps_it_when_the_plan_takes_half_a_multiple():
    """The last removal with 4 channels still to go, all of them (the lowest ranked) in a group
    already at 16 of its 32 channels, multiple_of 8: 12 is as near 8 as 16, and the group keeps
    its 16 rather than losing 8."""
    model, optimizer, sparsifier = removing(share=20 / 72, multiple_of=8)
    channels = sparsifier.channels
    channels.remove({"8": list(range(16))}, optimizer)
    channels.score = lambda group: torch.full((group.channels,), 0.0 if group.name == "8" else 1.0)
    assert channels.removal.target(1, channels.total) - channels.removed == 4
    assert channels.choose(4, sparsifier.active_count(), last=True) == {}
    channels.removal = ChannelRemoval(share=22 / 72, multiple_of=8)  # 6 to go: 10 is nearer 8
    assert {n: len(c) for n, c in channels.choose(6, sparsifier.active_count(), last=True).items()} == {
        "8": 8
    }
