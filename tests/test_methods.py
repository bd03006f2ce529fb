"""The paper's baselines behind the engine API, each as the DSR paper ran it: SET, DeepR, RigL,
gradual pruning from scratch (gmp) and of a trained dense model (prune), frozen masks, thin dense.
Tiny nets and random data, plus short end-to-end runs on digits."""

import math

import pytest
import torch
from torch import nn

from dsrpipe.config import parse_pipeline, switch_method
from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.pipeline import run_pipeline
from dsrpipe.sparse import (
    DSR,
    METHODS,
    SET,
    ChannelPrune,
    DeepR,
    Frozen,
    GradualPrune,
    LayerSelection,
    Prune,
    RewireSchedule,
    RigL,
    create_sparsifier,
)
from dsrpipe.sparse.budgets import smallest_active
from dsrpipe.sparse.frozen import initial_weights
from dsrpipe.sparse.thin import thin_model_options
from dsrpipe.train import finetune, train_sparse

from . import helpers
from .helpers import masked_weights_are_zero
from .test_pipeline import tiny as tiny_pipeline

# small-cnn, width 8, on 1x6x6 inputs: conv1 and fc dense, conv2 (1,152 weights) and conv3 (4,608) sparse.
SPEC = {"name": "small-cnn", "options": {"width": 8}, "num_classes": 10, "in_channels": 1, "image_size": 6}


def small_net():
    return create_model(SPEC["name"], num_classes=10, in_channels=1, image_size=6, **SPEC["options"])


def sgd(net, lr=0.05, weight_decay=5e-4):
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def train_steps(model, optimizer, sparsifier, steps, seed=0):
    helpers.train_steps(model, optimizer, sparsifier, steps, seed, batch=8, side=6)


def counts(s):
    return {n: int(m.sum()) for n, m in s.masks.items()}


def distinct_magnitudes(s, gen_seed=0):
    """Give every weight a distinct magnitude (random signs), keeping masked ones at 0."""
    gen = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for name, w in s.weights.items():
            values = (torch.randperm(w.numel(), generator=gen).float() + 1) / w.numel()
            signs = torch.where(torch.rand(w.numel(), generator=gen) < 0.5, -1.0, 1.0)
            w.copy_((values * signs).view_as(w))
            if name in s.masks:
                w.mul_(s.masks[name])


def finished_run(path, method="dsr", seed=0, steps=6, **options):
    """A finished training run's final.pt as dsrpipe writes it: its model built from `seed`, the
    record of its initial weights, trained a few steps with `method`."""
    torch.manual_seed(seed)
    net = small_net()
    init = initial_weights(net, seed)
    opt = sgd(net, weight_decay=0.0)
    s = create_sparsifier(method, net, opt, **options)
    train_steps(net, opt, s, steps)
    torch.save(
        {
            "complete": True,
            "run_id": f"{method}-{seed}",
            "sparsifier": s.state_dict(),
            "model": net.state_dict(),
            "model_spec": SPEC,
            "init": init,
        },
        path,
    )
    return path, s, net


def dsr_run(path, **options):
    return finished_run(
        path,
        "dsr",
        sparsity=0.8,
        prune_target=50,
        init_threshold=0.02,
        schedule=RewireSchedule({0: 2}),
        **options,
    )


def make(method, net, opt, sources, **kwargs):
    """Every method with settings that make it move often on a few steps."""
    options = {
        "dsr": {
            "sparsity": 0.8,
            "schedule": RewireSchedule({0: 3}),
            "prune_target": 50,
            "init_threshold": 0.01,
        },
        "set": {"sparsity": 0.8, "schedule": RewireSchedule({0: 3}), "zeta": 0.3},
        "deepr": {"sparsity": 0.8, "temperature": 1e-4, "l1": 1e-3},
        "rigl": {"sparsity": 0.8, "schedule": RewireSchedule({0: 3}), "alpha": 0.3, "total_steps": 100},
        "gmp": {"sparsity": 0.8, "schedule": RewireSchedule({0: 3}), "end_iteration": 18},
        "prune": {"sparsity": 0.8, "steps": 6, "end_iteration": 18, "prune_from": sources["dense"]},
        "frozen": {"masks_from": sources["dsr"]},
    }[method]
    return create_sparsifier(method, net, opt, **{**options, "seed": 0, **kwargs})


# -- options: each method owns its own ----------------------------------------------------------


def test_unknown_method_options_are_errors_from_python():
    with pytest.raises(UserError, match="method 'static' takes no option 'prune_target'"):
        create_sparsifier("static", small_net(), sparsity=0.5, prune_target=5)
    with pytest.raises(UserError, match="'zeta'"):
        create_sparsifier("dsr", small_net(), zeta=0.3)
    with pytest.raises(TypeError, match="zeta"):
        DSR(small_net(), sparsity=0.5, zeta=0.3)  # the constructors are strict too
    with pytest.raises(TypeError, match="sparsity"):
        Frozen(small_net(), masks_from="x.pt", sparsity=0.5)  # frozen's sparsity is its masks'


def test_every_method_is_registered_by_its_name():
    assert {"set", "deepr", "rigl", "prune", "gmp", "frozen", "thin-dense"} <= set(METHODS)
    assert all(METHODS[method].method == method for method in SPARSE_METHODS)
    assert METHODS["thin-dense"].method == "dense"  # a narrower model, trained densely


# -- DSR's N_p and the regrowth diagnostic --------------------------------------------------------


def test_dsr_takes_n_p_as_a_fraction_of_the_active_weights():
    s = DSR(small_net(), sparsity=0.8, prune_fraction=0.14)
    assert s.prune_target == round(0.14 * s.active_count()) == round(0.14 * (230 + 922))
    assert DSR(small_net(), sparsity=0.8).prune_target == 20_000  # the paper's count by default
    with pytest.raises(UserError, match="not both"):
        DSR(small_net(), sparsity=0.8, prune_target=100, prune_fraction=0.1)


def test_reallocation_counts_the_pruned_weights_it_had_just_grown():
    torch.manual_seed(0)
    s = DSR(small_net(), sparsity=0.8, prune_target=50, init_threshold=0.02, schedule=RewireSchedule({0: 1}))
    first = s.step()
    assert first["pruned"] > 0 and first["pruned_grown"] == 0  # nothing was grown before
    assert sum(int(g.sum()) for g in s.last_grown.values()) == first["pruned"]
    # No training in between: the grown weights are still exactly 0, below any H, and go again.
    second = s.step()
    assert second["pruned_grown"] == first["pruned"] and second["switched_off"] == second["pruned"]
    restored = DSR(small_net(), sparsity=0.8, prune_target=50, schedule=RewireSchedule({0: 1}))
    restored.load_state_dict(s.state_dict())
    assert all(torch.equal(restored.last_grown[n], g) for n, g in s.last_grown.items())


# -- SET ----------------------------------------------------------------------------------------


def test_set_replaces_exactly_zeta_of_each_layer_and_keeps_per_layer_counts():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    s = SET(net, opt, sparsity=0.8, zeta=0.3, schedule=RewireSchedule({0: 10**9}))
    per_layer = counts(s)
    for round_ in range(4):
        train_steps(net, opt, s, 2, seed=round_)
        distinct_magnitudes(s, round_)
        magnitude = {n: s.weights[n].detach().abs().clone() for n in s.masks}
        before = {n: m.clone() for n, m in s.masks.items()}
        stats = s.reallocate()
        assert counts(s) == per_layer  # per-layer counts never change
        for name, mask in s.masks.items():
            k = round(0.3 * per_layer[name])
            pruned, grown = before[name] & ~mask, mask & ~before[name]
            assert int(pruned.sum()) == int(grown.sum()) == stats["grown"][name] == k
            # the pruned ones are exactly the k smallest active magnitudes
            assert magnitude[name][pruned].max() < magnitude[name][before[name] & mask].min()
            assert bool((s.weights[name][grown] == 0).all())
            assert bool((opt.state[s.weights[name]]["momentum_buffer"][grown] == 0).all())
        assert masked_weights_are_zero(s)


@pytest.mark.parametrize("n_p", [{"prune_target": 200}, {"prune_fraction": 0.14}])
def test_set_moves_about_n_p_per_step_on_the_rewire_schedule(n_p):
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    s = SET(net, opt, sparsity=0.8, schedule=RewireSchedule({0: 4}), **n_p)
    active = s.active_count()
    target = n_p.get("prune_target") or 0.14 * active
    assert s.zeta == pytest.approx(target / active)  # the replaced fraction follows N_p
    moved = []
    for step in range(1, 17):
        train_steps(net, opt, s, 1, seed=step)
        if step % 4 == 0:
            moved.append(s.iteration)
    stats = [s.reallocate() for _ in range(3)]
    assert moved == [4, 8, 12, 16]
    for st in stats:  # per-layer rounding: within one weight per layer of N_p
        assert abs(st["pruned"] - target) <= len(s.masks) / 2
    assert s.active_count() == active


def test_set_refuses_zeta_with_n_p_and_n_p_above_the_active_weights():
    with pytest.raises(UserError, match="not both"):
        SET(small_net(), sparsity=0.8, zeta=0.3, prune_target=100)
    with pytest.raises(UserError, match="more than"):
        SET(small_net(), sparsity=0.8)  # the paper's N_p = 20,000 > 1,152 active weights


def test_smallest_active_is_exact_with_ties():
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.9, 0.0, 0.1])
    mask = torch.tensor([True, True, True, True, True, True, False, True])
    for k in range(0, 8):
        chosen = smallest_active(w, mask, k, gen)
        assert int(chosen.sum()) == k and not chosen[6]
        if 0 < k <= 5:
            assert bool((w[chosen] == 0.1).all())


# -- DeepR --------------------------------------------------------------------------------------


def test_deepr_kills_exactly_the_sign_flips_and_regrows_in_the_same_tensor():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net, weight_decay=0.0)
    s = DeepR(net, opt, sparsity=0.8, temperature=0.0, l1=0.0)
    per_layer = counts(s)
    with torch.no_grad():  # 7 weights of conv3 only cross zero against their sign
        active = s.masks["conv3"].view(-1).nonzero().squeeze(1)
        chosen = active[torch.randperm(active.numel())[:7]]
        s.weights["conv3"].view(-1)[chosen] *= -1
    flipped = torch.zeros_like(s.masks["conv3"]).view(-1)
    flipped[chosen] = True
    flipped = flipped.view_as(s.masks["conv3"])
    before = {n: m.clone() for n, m in s.masks.items()}
    stats = s.step()  # DeepR rewires after every step
    assert stats["pruned"] == 7 and stats["grown"] == {"conv2": 0, "conv3": 7}
    assert counts(s) == per_layer  # regrowth stays in the tensor
    assert torch.equal(s.masks["conv2"], before["conv2"])
    m = s.masks["conv3"]
    assert torch.equal(before["conv3"] & ~m, flipped)  # died == flipped, nothing else
    grown = m & ~before["conv3"]
    assert int(grown.sum()) == 7 and not bool((grown & flipped).any())
    assert bool((s.weights["conv3"][grown] == 0).all()) and bool((s.signs["conv3"][grown] == 0).all())
    assert masked_weights_are_zero(s)


def test_deepr_noise_and_l1_join_the_gradient_before_the_nesterov_step():
    lr, momentum, l1, temperature, eta = 1e-3, 0.9, 1e-3, 0.5, 0.01

    def one_step(deepr_terms):
        torch.manual_seed(0)
        net = small_net()
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, nesterov=True)
        s = DeepR(
            net,
            opt,
            sparsity=0.8,
            eta=eta,
            **(dict(temperature=temperature, l1=l1) if deepr_terms else dict(temperature=0.0, l1=0.0)),
        )
        w0 = {n: s.weights[n].detach().clone() for n in s.masks}
        train_steps(net, opt, s, 1, seed=5)
        buf = {n: opt.state[s.weights[n]]["momentum_buffer"].clone() for n in s.masks}
        return s, w0, buf

    plain, w0, plain_buf = one_step(False)
    noisy, w0_noisy, noisy_buf = one_step(True)
    std = math.sqrt(2 * eta * temperature)
    for name in noisy.masks:
        assert torch.equal(w0[name], w0_noisy[name])
        # where both runs kept the connection (a few may die and regrow differently in one of them)
        mask = plain.masks[name] & noisy.masks[name] & (w0[name] != 0)
        inactive = ~plain.masks[name] & ~noisy.masks[name] & (w0[name] == 0)
        extra = noisy_buf[name] - plain_buf[name]  # what DeepR added to the gradient
        assert bool((extra[inactive] == 0).all())  # masked weights get neither term
        noise = (extra - l1 * torch.sign(w0[name]))[mask]
        assert abs(float(noise.std()) / std - 1) < 0.1 and abs(float(noise.mean())) < 0.1 * std
        # Nesterov's first step moves by lr·(1 + momentum)·buffer: the terms went through the optimizer
        moved = (noisy.weights[name] - plain.weights[name]).detach()
        assert torch.allclose(moved[mask], (-lr * (1 + momentum) * extra)[mask], atol=1e-7)


def test_deepr_new_weight_takes_the_sign_it_first_moves_to():
    torch.manual_seed(0)
    net = small_net()
    s = DeepR(net, sgd(net, weight_decay=0.0), sparsity=0.8, temperature=0.0, l1=0.0)
    with torch.no_grad():
        s.weights["conv2"].view(-1)[s.masks["conv2"].view(-1).nonzero()[0]] *= -1  # one dies
    before = s.masks["conv2"].clone()
    s.reallocate()
    new = (s.masks["conv2"] & ~before).view(-1).nonzero().squeeze(1)
    assert new.numel() == 1 and int(s.signs["conv2"].view(-1)[new]) == 0
    with torch.no_grad():
        s.weights["conv2"].view(-1)[new] = -0.01  # its first move: negative
    assert s.reallocate()["pruned"] == 0 and int(s.signs["conv2"].view(-1)[new]) == -1
    with torch.no_grad():
        s.weights["conv2"].view(-1)[new] = 0.01  # crossing zero now kills it
    assert s.reallocate()["pruned"] == 1 and not bool(s.masks["conv2"].view(-1)[new])


def test_deepr_keeps_the_count_and_every_weight_on_its_signs_side_while_training():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net, lr=0.1, weight_decay=0.0)
    s = DeepR(net, opt, sparsity=0.8, temperature=1e-2, l1=1e-3)
    total, died = s.active_count(), 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(8, 1, 6, 6, generator=gen), torch.randint(10, (8,), generator=gen)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        died += s.step()["pruned"]
        assert s.active_count() == total and masked_weights_are_zero(s)
        for name, mask in s.masks.items():
            w = s.weights[name].detach()
            assert bool((torch.sign(w)[mask] * s.signs[name][mask] >= 0).all())
    assert died > 0  # it did rewire


def test_deepr_anneals_its_temperature_by_epoch_and_refuses_weight_decay():
    net = small_net()
    s = DeepR(
        net,
        sgd(net, weight_decay=0.0),
        sparsity=0.8,
        temperature={0: 1e-5, 2: 1e-8},
        schedule=RewireSchedule({0: 1}, stop_epoch=3, steps_per_epoch=10),
    )
    assert [s.temperature_at(i) for i in (1, 20, 21, 30)] == [1e-5, 1e-5, 1e-8, 1e-8]
    assert s.schedule.due(30) and not s.schedule.due(31)  # no noise and no rewiring from the stop epoch
    paper = DeepR(net, sgd(net, weight_decay=0.0), sparsity=0.8, schedule=RewireSchedule(steps_per_epoch=10))
    assert paper.temperature == {
        0: 1e-5,
        25: 1e-8,
        80: 1e-12,
        140: 1e-15,
    }  # the DSR paper's schedule by default
    with pytest.raises(UserError, match="weight decay must be 0"):
        DeepR(net, sgd(net), sparsity=0.8)
    with pytest.raises(UserError, match="weight_decay: 0"):
        parse_pipeline({"name": "x", "sparsity": {"method": "deepr"}})  # train.weight_decay defaults to 5e-4


# -- RigL ---------------------------------------------------------------------------------------


def rigl_pair(targets_of):
    """A RigL on two 10x10 Linear layers with distinct magnitudes, whose loss Σ w·target makes
    the dense gradient `targets_of(s)` (known everywhere); reallocates at its second step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    s = RigL(
        net,
        opt,
        sparsity=0.8,
        alpha=0.3,
        schedule=RewireSchedule({0: 2}),
        layers=LayerSelection(dense_first=False, dense_last=False),
    )
    distinct_magnitudes(s)
    targets = targets_of(s)
    loss = lambda: sum((w * targets[n]).sum() for n, w in s.weights.items())
    loss().backward()  # step 1 is no reallocation: no dense gradient is kept
    opt.step()
    opt.zero_grad()
    assert s.step() is None and s._dense_grad == {}
    before = {n: m.clone() for n, m in s.masks.items()}
    values = {n: s.weights[n].detach().clone() for n in s.masks}
    momentum = {n: opt.state[s.weights[n]]["momentum_buffer"].clone() for n in s.masks}
    loss().backward()
    for n, w in s.weights.items():
        assert bool((w.grad[~s.masks[n]] == 0).all())  # the optimizer still sees a masked gradient
    opt.step()
    opt.zero_grad()
    return s, opt, targets, before, values, momentum, s.step()


def test_rigl_grows_where_the_dense_gradient_is_largest_and_drops_the_smallest():
    gen = torch.Generator().manual_seed(1)
    s, opt, targets, before, values, _, stats = rigl_pair(
        lambda s: {n: torch.randn(w.shape, generator=gen) for n, w in s.weights.items()}
    )
    assert stats is not None and stats["drop_fraction"] == 0.3
    k = round(0.3 * 20)
    for name, mask in s.masks.items():
        magnitude = values[name].abs()
        dropped = smallest_active(values[name], before[name], k, torch.Generator())  # distinct: no ties
        assert magnitude[dropped].max() < magnitude[before[name] & ~dropped].min()
        kept = before[name] & ~dropped
        expected = targets[name].abs().masked_fill(kept, -1).view(-1).topk(k).indices
        grown = mask & ~kept
        assert set(grown.view(-1).nonzero().squeeze(1).tolist()) == set(expected.tolist())
        assert int(mask.sum()) == 20 and stats["grown"][name] == k
        new = mask & ~before[name]
        assert bool((s.weights[name][new] == 0).all())  # new connections start at 0
    assert s._dense_grad == {}  # released after use


def test_rigl_can_regrow_a_just_dropped_position_which_keeps_its_value_and_momentum():
    def gradient_peaks_where_weights_are_smallest(s):
        targets = {}
        for name, w in s.weights.items():
            t = torch.full(w.shape, 0.01)
            smallest = smallest_active(w.detach(), s.masks[name], round(0.3 * 20), torch.Generator())
            targets[name] = t.masked_fill(smallest, 10.0)
        return targets

    s, opt, targets, before, values, momentum, stats = rigl_pair(gradient_peaks_where_weights_are_smallest)
    for name, mask in s.masks.items():
        regrown = before[name] & (targets[name] == 10.0)  # dropped by magnitude, top of the gradient
        assert int(regrown.sum()) == 6 and bool(mask[regrown].all())
        assert torch.equal(mask, before[name])  # every dropped one came back: nothing new
        assert torch.equal(s.weights[name].detach()[regrown], values[name][regrown])  # its old value, not 0
        buffer = opt.state[s.weights[name]]["momentum_buffer"]
        assert bool((buffer[regrown] != 0).all())  # and its momentum
        assert torch.equal(buffer[regrown], 0.9 * momentum[name][regrown] + targets[name][regrown])
    assert stats["pruned"] == 12


def test_rigl_drop_fraction_decays_by_cosine_to_zero():
    s = RigL(small_net(), sparsity=0.5, alpha=0.3, total_steps=1000)
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(500) == pytest.approx(0.15)
    assert s.drop_fraction(250) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert s.drop_fraction(1000) == s.drop_fraction(2000) == 0.0
    stopped = RigL(
        small_net(),
        sparsity=0.5,
        total_steps=1000,
        schedule=RewireSchedule({0: 10}, stop_epoch=4, steps_per_epoch=100),
    )
    assert stopped.end_iteration == 400  # the schedule's stop comes first


# -- gradual magnitude pruning: from scratch (gmp) and of a trained dense model (prune) -----------


def test_gmp_follows_the_cubic_schedule_and_ends_exactly_at_the_target():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    s = GradualPrune(net, opt, sparsity=0.9, total_steps=40, schedule=RewireSchedule({0: 5}))
    assert s.end_iteration == 30  # 75% of training, then fine-tuning
    assert all(bool(m.all()) for m in s.masks.values()) and all(
        bool((w != 0).all()) for w in s.weights.values()
    )
    numel = {n: m.numel() for n, m in s.masks.items()}
    for t in range(1, 41):
        before = {n: m.clone() for n, m in s.masks.items()}
        train_steps(net, opt, s, 1, seed=t)
        pruning_step = 1 <= t <= 30 and t % 5 == 0
        cubic = 1 - (1 - min(t, 30) / 30) ** 3  # Zhu & Gupta, s_i = 0, t0 = 0, nΔt = 30
        if pruning_step:
            assert s.target_sparsity(t) == pytest.approx(0.9 * cubic)
            for name, mask in s.masks.items():
                final = round(0.1 * numel[name])
                assert int(mask.sum()) == numel[name] - round((numel[name] - final) * cubic)
                assert bool((s.weights[name][before[name] & ~mask] == 0).all())
        else:
            assert all(torch.equal(before[n], m) for n, m in s.masks.items())
        assert masked_weights_are_zero(s)
    for name, mask in s.masks.items():  # exactly the final sparsity, as every sparse method starts
        assert int(mask.sum()) == round(0.1 * numel[name])


def test_gmp_must_end_within_training():
    with pytest.raises(UserError, match="never reach"):
        GradualPrune(small_net(), sparsity=0.5, end_iteration=50, total_steps=40)
    with pytest.raises(UserError, match="begin_iteration < end_iteration"):
        GradualPrune(small_net(), sparsity=0.5, begin_iteration=30, end_iteration=20)


def test_gmp_drops_the_smallest_magnitudes():
    torch.manual_seed(0)
    s = GradualPrune(small_net(), sparsity=0.5, end_iteration=1, schedule=RewireSchedule({0: 1}))
    distinct_magnitudes(s)
    magnitude = {n: s.weights[n].detach().abs().clone() for n in s.masks}
    s.step()
    for name, mask in s.masks.items():
        assert magnitude[name][~mask].max() < magnitude[name][mask].min()


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_prune_starts_from_the_dense_weights_and_reaches_the_exact_target(tmp_path, distribution):
    path, _, dense = finished_run(tmp_path / "dense.pt", "dense")
    torch.manual_seed(7)  # another init: it must be replaced
    net = small_net()
    opt = sgd(net)
    s = Prune(net, opt, prune_from=path, sparsity=0.9, steps=4, total_steps=20, distribution=distribution)
    for key, value in dense.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key  # the trained dense model, BN statistics too
    assert s.end_iteration == 16 and s.prune_at == {4, 8, 12, 16}  # 80% of training, then fine-tuning
    assert all(bool(m.all()) for m in s.masks.values())
    changed_at = []
    for t in range(1, 21):
        before = {n: m.clone() for n, m in s.masks.items()}
        train_steps(net, opt, s, 1, seed=t)
        if any(not torch.equal(before[n], m) for n, m in s.masks.items()):
            changed_at.append(t)
    assert changed_at == [4, 8, 12, 16]
    assert counts(s) == s.budgets and sum(s.budgets.values()) == sum(
        round(0.1 * m.numel()) for m in s.masks.values()
    )
    assert masked_weights_are_zero(s)


def channel_prune(path, **options):
    """prune-channels on the dense run at `path`, with an optimizer that leaves the weights as set."""
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    options = {"share": 0.5, "steps": 1, "end_iteration": 1, "total_steps": 2, "multiple_of": 1, **options}
    s = ChannelPrune(net, opt, prune_from=path, example_inputs=torch.zeros(1, 1, 6, 6), **options)
    return net, opt, s


def test_prune_channels_ranks_by_the_group_not_the_filter(tmp_path):
    """Torch-Pruning's group importance weighs every layer a channel occupies: conv2's channel 3,
    whose own filter is the smallest of its layer but whose column in conv3 is the heaviest,
    stays; its filter's magnitude alone would have removed it first."""
    path, _, _ = finished_run(tmp_path / "dense.pt", "dense")
    net, opt, s = channel_prune(path, dense_layers=False, shrink=False)
    with torch.no_grad():
        net.conv2.weight[3] *= 1e-3
        net.conv3.weight[:, 3] *= 1e3
    train_steps(net, opt, s, 1)
    alive = s.channels.alive["conv2"]
    assert int((~alive).sum()) > 0 and alive[3]


def test_prune_channels_ends_at_half_of_training_by_default(tmp_path):
    path, _, _ = finished_run(tmp_path / "dense.pt", "dense")
    _, _, s = channel_prune(path, end_iteration=None, total_steps=40)
    assert (s.channels.removal.begin, s.channels.removal.end) == (0, 20)


def test_prune_refuses_sparse_and_foreign_checkpoints(tmp_path):
    sparse, _, _ = dsr_run(tmp_path / "dsr.pt")
    with pytest.raises(UserError, match="starts from a dense one"):
        Prune(small_net(), prune_from=sparse, total_steps=40)
    dense, _, _ = finished_run(tmp_path / "dense.pt", "dense")
    wider = create_model("small-cnn", num_classes=10, in_channels=1, image_size=6, width=16)
    with pytest.raises(UserError, match="another model"):
        Prune(wider, prune_from=dense, total_steps=40)
    with pytest.raises(UserError, match="needs prune_from"):
        Prune(small_net(), total_steps=40)
    with pytest.raises(UserError, match="prune_from"):
        parse_pipeline({"name": "x", "sparsity": {"method": "prune"}})


# -- frozen ---------------------------------------------------------------------------------------


def test_frozen_retrains_the_given_mask_and_never_moves_it(tmp_path):
    path, source, _ = dsr_run(tmp_path / "final.pt")
    torch.manual_seed(1)
    net = small_net()
    opt = sgd(net)
    s = Frozen(net, opt, masks_from=path)
    assert all(torch.equal(s.masks[n], source.masks[n]) for n in source.masks)
    assert abs(s.sparsity - 0.8) < 0.01  # as found
    for name, mask in s.masks.items():  # a random init on every active position
        assert bool((s.weights[name][mask] != 0).all())
    train_steps(net, opt, s, 6)
    assert all(torch.equal(s.masks[n], source.masks[n]) for n in source.masks)
    assert masked_weights_are_zero(s)


def test_frozen_starts_fresh_or_from_the_source_runs_own_initial_weights(tmp_path):
    path, source, _ = dsr_run(tmp_path / "final.pt")  # its model was built from seed 0
    torch.manual_seed(0)
    original = small_net().state_dict()  # the source run's initial weights

    def frozen(init, seed=0):
        torch.manual_seed(seed)  # the model passed in: the same init as the source's when seed == 0
        net = small_net()
        Frozen(net, masks_from=path, init=init, seed=seed)
        return net.state_dict()

    same = frozen("same", seed=5)
    fresh = frozen("fresh")
    for key, value in original.items():
        name = key.removesuffix(".weight")
        expected = value * source.masks[name] if name in source.masks else value
        assert torch.equal(same[key], expected), key  # every tensor, masked where sparse
    for name, mask in source.masks.items():
        start, new = original[f"{name}.weight"][mask], fresh[f"{name}.weight"][mask]
        assert float((start == new).float().mean()) < 0.01  # fresh: not the source's values
        assert abs(float(new.std() / start.std()) - 1) < 0.2  # but drawn from the same distribution
    assert all(torch.equal(fresh[k], v) for k, v in frozen("fresh").items())  # deterministic
    assert any(not torch.equal(fresh[k], v) for k, v in frozen("fresh", seed=1).items())

    state = torch.load(path, weights_only=True)
    torch.save({**state, "init": {**state["init"], "digest": "0" * 64}}, path)
    with pytest.raises(UserError, match="init: fresh"):
        frozen("same")
    torch.save({k: v for k, v in state.items() if k != "init"}, path)
    with pytest.raises(UserError, match="initial weights"):
        frozen("same")
    frozen("fresh")  # needs no record of the initial weights


def test_frozen_rejects_missing_unfinished_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Frozen(small_net(), masks_from=tmp_path / "nope.pt")
    with pytest.raises(UserError, match="needs masks_from"):
        Frozen(small_net())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt is not a dsrpipe checkpoint"):
        Frozen(small_net(), masks_from=tmp_path / "junk.pt")
    path, _, _ = dsr_run(tmp_path / "final.pt", layers=LayerSelection(dense_last=False))  # fc sparse too
    with pytest.raises(UserError, match="sparse layers"):
        Frozen(small_net(), masks_from=path)
    other = small_net()
    other.conv2 = nn.Conv2d(8, 16, 5, padding=2, bias=False)  # same layer names, another shape
    with pytest.raises(UserError, match="another model"):
        Frozen(other, masks_from=path, layers=LayerSelection(dense_last=False))
    state = torch.load(path, weights_only=True)
    torch.save({**state, "complete": False}, path)
    with pytest.raises(UserError, match="unfinished"):
        Frozen(small_net(), masks_from=path, layers=LayerSelection(dense_last=False))
    torch.save({**state, "evil": nn.Linear(1, 1)}, path)  # a pickled module: never unpickled
    with pytest.raises(UserError, match="it holds Python objects"):
        Frozen(small_net(), masks_from=path, layers=LayerSelection(dense_last=False))
    with pytest.raises(UserError, match="masks_from"):
        parse_pipeline({"name": "x", "sparsity": {"method": "frozen"}})


# -- thin dense -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,sparsity,in_channels,size",
    [
        ("wrn-10-2", {}, 0.9, 3, 32),
        ("wrn-10-2", {}, 0.5, 3, 32),
        ("lenet5", {}, 0.5, 1, 28),
        ("plain-cnn", {}, 0.7, 3, 32),
        ("small-cnn", {"width": 32}, 0.9, 3, 32),
        ("small-cnn", {"width": 32}, 0.9, 1, 8),
    ],
)
def test_thin_dense_matches_the_sparse_budget(name, options, sparsity, in_channels, size):
    thin, achieved, budget = thin_model_options(
        name, options, num_classes=10, in_channels=in_channels, image_size=size, sparsity=sparsity
    )
    model = create_model(name, num_classes=10, in_channels=in_channels, image_size=size, **thin)
    assert sum(p.numel() for p in model.parameters()) == achieved
    assert abs(achieved - budget) <= 0.02 * budget
    full = create_model(name, num_classes=10, in_channels=in_channels, image_size=size, **options)
    assert achieved < sum(p.numel() for p in full.parameters())


def test_thin_dense_of_a_tiny_model_and_models_without_a_knob_are_refused():
    shape = {"num_classes": 10, "in_channels": 1, "image_size": 8}
    thin, achieved, budget = thin_model_options("small-cnn", {"width": 16}, sparsity=0.9, **shape)
    count = lambda w: sum(p.numel() for p in create_model("small-cnn", width=w, **shape).parameters())
    assert achieved == count(thin["width"])
    # ~3k parameters, where one channel is 2%: no width comes closer than the chosen one.
    assert all(abs(achieved - budget) <= abs(count(w / 100) - budget) for w in range(100, 1601, 5))
    assert thin_model_options("small-cnn", {"width": 16}, sparsity=0.0, **shape)[0] == {"width": 16}
    with pytest.raises(UserError, match="no width option"):
        thin_model_options("lenet-300-100", {}, sparsity=0.9, **shape)


# -- shared invariants ----------------------------------------------------------------------------

SPARSE_METHODS = ["set", "deepr", "rigl", "gmp", "prune", "frozen"]


@pytest.fixture
def sources(tmp_path):
    return {"dsr": dsr_run(tmp_path / "dsr.pt")[0], "dense": finished_run(tmp_path / "dense.pt", "dense")[0]}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])  # as on CUDA
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_masked_weights_stay_zero_through_momentum_and_weight_decay(method, sources, channels_last):
    torch.manual_seed(0)
    net = small_net()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        assert not net.conv2.weight.is_contiguous()
    opt = sgd(net, weight_decay=0.0 if method == "deepr" else 5e-4)
    s = make(method, net, opt, sources)
    moved = False
    for chunk in range(7):
        before = {n: m.clone() for n, m in s.masks.items()}
        train_steps(net, opt, s, 3, seed=chunk)
        moved |= any(not torch.equal(before[n], m) for n, m in s.masks.items())
        assert masked_weights_are_zero(s)
    assert moved == (method != "frozen")


@pytest.mark.numerics
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_state_dict_round_trip_continues_identically(method, sources):
    def build(fresh):
        net = small_net()
        opt = sgd(net, weight_decay=0.0 if method == "deepr" else 5e-4)
        return net, opt, make(method, net, opt, sources, **({"seed": 9} if fresh else {}))

    helpers.assert_resume_is_exact(build, 7, 8)


# -- end to end -----------------------------------------------------------------------------------


def tiny(name, method, **sparsity):
    """test_pipeline's tiny pipeline switched to `method` at 0.8: width 8, one epoch, no fine-tuning."""
    raw = tiny_pipeline(
        name,
        model={"options": {"width": 8}},
        train={"epochs": 1},
        finetune={"epochs": 0},
        validate={"latency_runs": 3},
    )
    raw["sparsity"] = {**switch_method(raw["sparsity"], method), "sparsity": 0.8, **sparsity}
    return parse_pipeline(raw)


def test_methods_run_end_to_end_on_digits(tmp_path):
    # rigl through the whole pipeline, then a frozen retrain of its final mask (training only) and
    # thin dense: each one epoch, width 8.
    rigl = run_pipeline(tiny("rigl", "rigl"), tmp_path, progress=False)
    assert rigl.method == "rigl" and 0.79 <= rigl.sparsity <= 0.81
    rigl_path = tmp_path / "rigl" / "train" / "final.pt"
    rigl_ckpt = torch.load(rigl_path, weights_only=True)
    assert sum(h["reallocations"] for h in rigl_ckpt["history"]) == (1437 // 64) // 5
    assert 0 <= rigl_ckpt["history"][0]["pruned_grown_share"] <= 1  # the regrowth diagnostic

    frozen_cfg = parse_pipeline(
        {
            **tiny("frozen", "frozen", masks_from=str(rigl_path), init="same").model_dump(
                mode="json", by_alias=True
            ),
            "finetune": {"epochs": 1},
        }
    )
    frozen_ckpt = torch.load(train_sparse(frozen_cfg, tmp_path, progress=False), weights_only=True)
    for name, mask in rigl_ckpt["sparsifier"]["masks"].items():
        assert torch.equal(frozen_ckpt["sparsifier"]["masks"][name], mask)
    assert frozen_ckpt["fingerprint"].endswith(rigl_ckpt["run_id"])  # a retrained source makes it stale
    assert frozen_ckpt["init"] == rigl_ckpt["init"]  # same seed, same model: the source's initial weights
    assert frozen_ckpt["history"][0]["pruned_grown"] is None  # nothing grows
    # Accepts that fingerprint
    tuned = torch.load(finetune(frozen_cfg, tmp_path, progress=False), weights_only=True)
    for name, mask in rigl_ckpt["sparsifier"]["masks"].items():
        assert torch.equal(tuned["sparsifier"]["masks"][name], mask)

    thin_cfg = tiny("thin", "thin-dense")
    thin = run_pipeline(thin_cfg, tmp_path, progress=False)
    thin_ckpt = torch.load(tmp_path / "thin" / "train" / "final.pt", weights_only=True)
    record = thin_ckpt["model_spec"]["thin_dense"]
    assert thin.thin_dense == record and thin.model_options == thin_ckpt["model_spec"]["options"]
    assert thin.sparsity < 0.01 and thin.total_params == thin.nonzero_params == record["params"]
    assert thin.model_options["width"] < 8
    # timed and sized against the configured width it stands in for, as the sparse runs are
    assert thin.dense_onnx_bytes == pytest.approx(rigl.dense_onnx_bytes, rel=0.02)
    assert thin.size_ratio < 0.5
    # the budget: the sparse model's active parameters, dense layers included
    masks = rigl_ckpt["sparsifier"]["masks"].values()
    assert record["budget"] == rigl.total_params - sum(m.numel() for m in masks) + sum(
        int(m.sum()) for m in masks
    )
    assert abs(record["params"] - record["budget"]) <= 0.03 * record["budget"]  # ~2k parameters: coarse


def test_prune_pipeline_starts_from_a_dense_run_and_ships_the_exact_target(tmp_path):
    dense_path = train_sparse(tiny("dense", "dense", sparsity=0.0), tmp_path, progress=False)
    dense = torch.load(dense_path, weights_only=True)
    cfg = tiny("prune", "prune", prune_from=str(dense_path), steps=3)
    report = run_pipeline(cfg, tmp_path, progress=False)
    trained = torch.load(tmp_path / "prune" / "train" / "final.pt", weights_only=True)
    assert trained["fingerprint"].endswith(dense["run_id"])  # retraining the dense run makes it stale
    masks = trained["sparsifier"]["masks"]
    assert {n: int(m.sum()) for n, m in masks.items()} == {
        n: round(0.2 * m.numel()) for n, m in masks.items()
    }
    assert sum(h["pruned"] for h in trained["history"]) == sum(
        m.numel() - round(0.2 * m.numel()) for m in masks.values()
    )
    assert 0.79 <= report.sparsity <= 0.81


def test_finetune_starts_from_the_trained_weights(tmp_path):
    # With a vanishing learning rate, fine-tuning must leave the trained sparse model as it was.
    cfg = parse_pipeline(
        {
            **tiny("set", "set").model_dump(mode="json", by_alias=True),
            "finetune": {"epochs": 1, "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0},
        }
    )
    trained = torch.load(train_sparse(cfg, tmp_path, progress=False), weights_only=True)["model"]
    tuned = torch.load(finetune(cfg, tmp_path, progress=False), weights_only=True)["model"]
    for key, value in trained.items():
        if value.is_floating_point() and "running" not in key:
            assert torch.allclose(tuned[key], value, atol=1e-6), key


def test_deepr_with_scarce_free_slots_lets_the_just_died_regrow():
    """Sparsity 0.02 and a high LR: more weights die in a step than there are other free slots,
    so the just-died positions must be offered again (without that, sampling fails with
    `cannot place N weights in M free slots`). Every step keeps the active count."""
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=5.0, momentum=0.9)
    s = DeepR(net, opt, sparsity=0.02, temperature=1e-3, eta=1.0, l1=0.0)
    per_layer = counts(s)
    scarce = 0
    for step in range(6):
        with torch.no_grad():  # many cross zero against their sign, in every layer
            for name, mask in s.masks.items():
                w = s.weights[name].view(-1)
                active = mask.view(-1).nonzero().squeeze(1)
                flip = active[torch.randperm(active.numel(), generator=torch.Generator().manual_seed(step))]
                w[flip[: active.numel() // 20]] *= -1
        dead = {n: int((s.masks[n] & (torch.sign(s.weights[n]) * s.signs[n] < 0)).sum()) for n in s.masks}
        free = {n: s.masks[n].numel() - int(s.masks[n].sum()) for n in s.masks}
        scarce += sum(free[n] < dead[n] for n in s.masks)
        train_steps(net, opt, s, 1, seed=step)
        assert counts(s) == per_layer and masked_weights_are_zero(s)
    assert scarce, "no step had fewer other free slots than dead weights: the branch went unrun"
