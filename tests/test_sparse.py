"""Invariants of the sparse-training engine (Algorithm 1 of the DSR paper and its companions)."""

import pytest
import torch
from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.sparse import DSR, RewireSchedule, Sparsifier, create_sparsifier, proportional_split
from dsrpipe.sparse.budgets import sample_free_positions
from dsrpipe.sparse.layers import select_sparse_weights

from .helpers import assert_resume_is_exact, masked_weights_are_zero, small_net, train_steps


def test_selects_conv_and_linear_weights_except_first_conv_and_last_linear():
    net = small_net()
    assert list(select_sparse_weights(net)) == ["2", "4", "8"]
    assert list(select_sparse_weights(net, dense_first=False, dense_last=False)) == ["0", "2", "4", "8", "10"]
    assert list(select_sparse_weights(net, exclude=["8"])) == ["2", "4"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    assert list(select_sparse_weights(mlp)) == ["0", "1"]  # no conv: the first Linear is sparse


def test_initial_masks_have_the_requested_sparsity_per_tensor():
    torch.manual_seed(0)
    s = Sparsifier(small_net(), sparsity=0.9)
    for mask in s.masks.values():
        assert int(mask.sum()) == round(0.1 * mask.numel())
    assert masked_weights_are_zero(s)


def test_scale_init_keeps_the_dense_signal_variance():
    torch.manual_seed(0)
    dense = nn.Linear(2000, 500)
    sparse = nn.Linear(2000, 500)
    sparse.load_state_dict(dense.state_dict())
    initial = sparse.weight.detach().clone()
    s = Sparsifier(
        nn.Sequential(nn.Linear(4, 2000), sparse, nn.Linear(500, 10)), sparsity=0.98, scale_init=True
    )
    mask = s.masks["1"]
    assert torch.allclose(sparse.weight, initial * mask / mask.float().mean().sqrt())
    x = torch.randn(256, 2000)
    with torch.no_grad():
        ratio = (sparse(x) - sparse.bias).var() / (dense(x) - dense.bias).var()
    assert 0.9 < ratio < 1.1  # unscaled, it would be the density: 0.02
    # Dense: nothing to scale
    assert (
        Sparsifier(
            nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)), sparsity=0.0, scale_init=True
        ).masks
        == {}
    )


def test_sparsity_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="sparsity"):
        Sparsifier(small_net(), sparsity=1.0)


@pytest.mark.parametrize("optimizer_name", ["sgd", "nesterov", "adamw"])
def test_masked_weights_stay_zero_through_optimizer_steps(optimizer_name):
    torch.manual_seed(0)
    net = small_net()
    opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    }[optimizer_name](net.parameters())
    s = DSR(net, opt, sparsity=0.8, prune_target=200, schedule=RewireSchedule({0: 7}))
    for _ in range(6):
        train_steps(net, opt, s, 5)
        assert masked_weights_are_zero(s)
    assert s.iteration == 30


def test_nonzero_budget_is_constant_across_many_reallocations():
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    s = DSR(net, opt, sparsity=0.9, prune_target=100, init_threshold=0.01, schedule=RewireSchedule({0: 3}))
    budget = s.active_count()
    moved = 0
    for _ in range(40):
        train_steps(net, opt, s, 2)
        stats = s.reallocate()
        moved += stats["pruned"]
        assert s.active_count() == budget
        assert masked_weights_are_zero(s)
    assert moved > 0  # the budget really was moved around, not just left alone


def test_threshold_doubles_when_too_few_pruned_and_halves_when_too_many():
    torch.manual_seed(0)
    net = small_net()
    s = DSR(net, sparsity=0.5, prune_target=100, init_threshold=1e-6, tolerance=0.1)
    with torch.no_grad():
        for w in s.weights.values():
            w.copy_(torch.where(w != 0, 1.0, 0.0))  # every active weight has |w| = 1
    stats = s.reallocate()  # prunes nothing (K = 0 < 0.9 N_p)
    assert stats["pruned"] == 0 and s.threshold == 2e-6

    name = next(iter(s.masks))
    with torch.no_grad():  # make exactly 500 active weights tiny: K = 500 > 1.1 N_p
        active = s.masks[name].view(-1).nonzero().squeeze(1)[:500]
        s.weights[name].view(-1)[active] = 1e-7
    stats = s.reallocate()
    assert stats["pruned"] == 500 and s.threshold == 1e-6

    with torch.no_grad():  # exactly N_p below the threshold: within tolerance, unchanged
        active = s.masks[name].view(-1) & (s.weights[name].view(-1) == 1.0)
        s.weights[name].view(-1)[active.nonzero().squeeze(1)[:100]] = 1e-7
    # the 500 weights grown last step are 0 and get pruned too: 600 in all, so set N_p to match
    s.prune_target = 600
    stats = s.reallocate()
    assert stats["pruned"] == 600 and s.threshold == 1e-6


def test_growth_is_proportional_to_survivors_and_exact():
    torch.manual_seed(0)
    net = small_net()
    s = DSR(net, sparsity=0.9, prune_target=100, init_threshold=0.05)
    active_before = {n: int(m.sum()) for n, m in s.masks.items()}
    pruned_now = {n: int((m & (s.weights[n].abs() < 0.05)).sum()) for n, m in s.masks.items()}
    stats = s.reallocate()
    kept = [active_before[n] - pruned_now[n] for n in s.masks]
    free = [m.numel() - active_before[n] for n, m in s.masks.items()]
    assert sum(stats["grown"].values()) == stats["pruned"] == sum(pruned_now.values())
    assert list(stats["grown"].values()) == proportional_split(stats["pruned"], kept, free)
    for grown, survivors in zip(stats["grown"].values(), kept):
        assert abs(grown - stats["pruned"] * survivors / sum(kept)) < 1


@pytest.mark.parametrize(
    "total, weights, capacity, expected",
    [
        (4, [1, 2], [10, 10], [1, 3]),  # exact 1.33, 2.67: the one leftover goes to the larger remainder
        (7, [10, 21, 29], [10, 10, 10], [1, 3, 3]),  # 1.17, 2.45, 3.38: to the middle one, not the first
        # 0.71, 1.43, 2.86: two leftovers, to the third and the first
        (5, [1, 2, 4], [10, 10, 10], [1, 1, 3]),
        (10, [1, 1, 2], [1, 100, 100], [1, 3, 6]),  # [3, 2, 5] overflows the first: its 2 go 0.67 : 1.33
    ],
)
def test_proportional_split_rounds_by_largest_remainder(total, weights, capacity, expected):
    assert proportional_split(total, weights, capacity) == expected


def test_proportional_split_respects_capacity_and_total():
    assert proportional_split(10, [1, 1, 2], [100, 100, 100]) == [3, 2, 5]  # 2.5, 2.5, 5 rounded
    share = proportional_split(1000, [5, 3, 2], [10, 10_000, 10_000])
    assert share[0] == 10 and sum(share) == 1000
    assert abs(share[1] / share[2] - 1.5) < 0.01
    assert proportional_split(7, [0, 0], [3, 4]) == [3, 4]
    with pytest.raises(ValueError):
        proportional_split(8, [1, 1], [3, 4])


def test_grown_weights_and_their_momentum_start_at_zero():
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    s = DSR(
        net, opt, sparsity=0.9, prune_target=100, init_threshold=0.02, schedule=RewireSchedule({0: 10**9})
    )
    train_steps(net, opt, s, 5)
    before = {n: m.clone() for n, m in s.masks.items()}
    stats = s.reallocate()
    assert stats["pruned"] > 0
    for name, mask in s.masks.items():
        grown = mask & ~before[name]
        assert grown.any() or stats["grown"][name] == 0
        # every grown connection is new: none re-activates a position pruned in this step
        assert int(grown.sum()) == stats["grown"][name]
        assert bool((s.weights[name][grown] == 0).all())
        assert bool((opt.state[s.weights[name]]["momentum_buffer"][grown] == 0).all())


def test_growth_follows_a_hand_computed_split():
    """Three sparse Linears keeping 100, 1000 and 497 weights regrow the 3 pruned ones as
    3 * (100, 1000, 497) / 1597 = (0.19, 1.88, 0.93), rounded by largest remainder: (0, 2, 1)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 100), nn.Linear(100, 100), nn.Linear(100, 50), nn.Linear(50, 10))
    s = DSR(mlp, sparsity=0.9, prune_target=3, init_threshold=1e-3)
    with torch.no_grad():
        for name, w in s.weights.items():
            w.copy_(s.masks[name].float())  # every active weight is 1: nothing below H...
        s.weights["2"].view(-1)[s.masks["2"].view(-1).nonzero().squeeze(1)[:3]] = 1e-4  # ...but three
    assert [int(m.sum()) for m in s.masks.values()] == [100, 1000, 500]
    stats = s.reallocate()
    assert stats["pruned"] == 3
    assert stats["grown"] == {"0": 0, "1": 2, "2": 1}
    assert [int(m.sum()) for m in s.masks.values()] == [100, 1002, 498]


def _set_active_weights(sparsifier, value, small_per_tensor):
    """Every active weight to `value`, then the first `small_per_tensor[name]` active ones of each
    tensor to 1e-4: with H = 1e-3 exactly those are pruned."""
    with torch.no_grad():
        for name, w in sparsifier.weights.items():
            mask = sparsifier.masks[name]
            w.copy_(mask.float() * value)
            w.view(-1)[mask.view(-1).nonzero().squeeze(1)[: small_per_tensor.get(name, 0)]] = 1e-4


# N_p = 500 and δ = 0.1 make (1 ± δ)·N_p exactly 450 and 550 in floating point (with N_p = 100,
# 1.1·100 is 110.00000000000001, and K = 110 could not tell `>` from `>=`).
@pytest.mark.parametrize("pruned, factor", [(449, 2.0), (450, 1.0), (500, 1.0), (550, 1.0), (551, 0.5)])
def test_threshold_rule_at_its_boundaries(pruned, factor):
    """Spec: K < (1-δ)·N_p doubles H, K > (1+δ)·N_p halves it; the boundaries themselves keep it."""
    torch.manual_seed(0)
    s = DSR(small_net(), sparsity=0.5, prune_target=500, init_threshold=1e-3, tolerance=0.1)
    _set_active_weights(s, 1.0, {"2": pruned // 3, "4": pruned - pruned // 3})
    stats = s.reallocate()
    assert stats["pruned"] == pruned
    assert stats["threshold"] == 1e-3
    assert s.threshold == 1e-3 * factor


SCARCE_PRUNED = {"2": 100, "4": 600, "8": 300}


def _scarce_reallocation():
    """A DSR at 2% sparsity (440 free slots) that has trained with momentum, then prunes 1000:
    returns the sparsifier, its optimizer, the masks before, the stats and the budget."""
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    s = DSR(
        net, opt, sparsity=0.02, prune_target=1000, init_threshold=1e-3, schedule=RewireSchedule({0: 10**9})
    )
    train_steps(net, opt, s, 2)  # every active weight now has momentum
    assert sum(int((~m).sum()) for m in s.masks.values()) == 440
    budget = s.active_count()
    _set_active_weights(s, 1.0, SCARCE_PRUNED)
    before = {n: m.clone() for n, m in s.masks.items()}
    return s, opt, before, s.reallocate(), budget


def test_growth_reuses_just_pruned_positions_when_free_slots_are_scarce():
    """Pruning 1000 with only 440 free slots regrows exactly 1000, some at positions pruned in
    this very step; the budget stays and the grown weights start at 0."""
    s, _, before, stats, budget = _scarce_reallocation()
    assert stats["pruned"] == 1000 and sum(stats["grown"].values()) == 1000
    assert s.active_count() == budget
    assert masked_weights_are_zero(s)
    assert sum(int(w.count_nonzero()) for w in s.weights.values()) == budget - 1000  # the kept ones (1)
    reused = 0
    for name, mask in s.masks.items():
        grown = mask & (s.weights[name] == 0)  # every kept weight is 1
        free = int((~before[name]).sum())
        assert int(grown.sum()) == stats["grown"][name] <= free + SCARCE_PRUNED[name]
        reused += int((grown & before[name]).sum())
    assert reused >= 1000 - 440


def test_positions_pruned_and_regrown_in_one_step_restart_without_momentum():
    """Spec, step 3: new weights start at 0 and so do their momentum buffers, also when a
    position pruned in this step is regrown (free slots scarce)."""
    s, opt, before, _, _ = _scarce_reallocation()
    for name, mask in s.masks.items():
        reused = mask & before[name] & (s.weights[name] == 0)
        assert reused.any()
        momentum = opt.state[s.weights[name]]["momentum_buffer"]
        assert int(momentum[reused].count_nonzero()) == 0, f"{name}: regrown weights keep their old momentum"


def test_set_positions_dropped_and_regrown_in_one_step_restart_without_momentum():
    """SET, as DSR above: at 5% sparsity replacing 30% of each tensor must reuse positions it has
    just dropped, and those restart from rest."""
    from dsrpipe.sparse.set import SET

    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    s = SET(net, opt, sparsity=0.05, zeta=0.3, schedule=RewireSchedule({0: 10**9}))
    train_steps(net, opt, s, 2)  # every active weight now has momentum
    before = {n: m.clone() for n, m in s.masks.items()}
    s.reallocate()
    for name, mask in s.masks.items():
        reused = mask & before[name] & (s.weights[name] == 0)
        assert reused.any()
        momentum = opt.state[s.weights[name]]["momentum_buffer"]
        assert int(momentum[reused].count_nonzero()) == 0, f"{name}: regrown weights keep their old momentum"


def test_grown_weights_and_their_momentum_are_zero_after_every_reallocation():
    """Over several reallocations with momentum steps between, positions that once held a trained
    weight (and so had momentum) are regrown: each must restart at 0 with a zero momentum buffer."""
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    s = DSR(
        net, opt, sparsity=0.5, prune_target=500, init_threshold=0.02, schedule=RewireSchedule({0: 10**9})
    )
    held_a_weight = {n: m.clone() for n, m in s.masks.items()}
    regrown_after_training = 0
    for round_ in range(5):
        train_steps(net, opt, s, 3, seed=round_)
        before = {n: m.clone() for n, m in s.masks.items()}
        stats = s.reallocate()
        assert stats["pruned"] > 0
        for name, mask in s.masks.items():
            grown = mask & ~before[name]
            assert int(grown.sum()) == stats["grown"][name]
            assert bool((s.weights[name][grown] == 0).all())
            assert bool((opt.state[s.weights[name]]["momentum_buffer"][grown] == 0).all())
            regrown_after_training += int((grown & held_a_weight[name]).sum())
            held_a_weight[name] |= mask
        assert masked_weights_are_zero(s)
    assert regrown_after_training > 0  # the case this test is about did happen


def test_a_layer_of_tiny_weights_is_never_emptied():
    """One layer whose every weight is below H, among normal layers: it keeps its largest weight
    (and regrows from there) rather than dropping to 0 active weights for good."""
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    s = DSR(
        net, opt, sparsity=0.9, prune_target=100, init_threshold=1e-3, schedule=RewireSchedule({0: 10**9})
    )
    tiny = s.weights["4"]
    with torch.no_grad():
        tiny.mul_(1e-6)  # all ~1e-7, far below H; the other layers' weights are ~0.05
    largest = int((tiny.abs() * s.masks["4"]).argmax())
    largest_value = float(tiny.detach().view(-1)[largest])
    budget = s.active_count()
    stats = s.reallocate()
    assert bool(s.masks["4"].view(-1)[largest]) and float(tiny.detach().view(-1)[largest]) == largest_value
    assert int(s.masks["4"].sum()) == 1 + stats["grown"]["4"]
    for round_ in range(3):  # and it stays alive through training
        train_steps(net, opt, s, 2, seed=round_)
        s.reallocate()
        assert s.active_count() == budget
        assert int(s.masks["4"].sum()) >= 1


def test_never_prunes_a_tensor_to_zero():
    net = small_net()
    s = DSR(net, sparsity=0.9, prune_target=10, init_threshold=10.0)  # every weight is below H
    total = s.active_count()
    s.reallocate()
    assert s.active_count() == total
    assert all(int(m.sum()) >= 1 for m in s.masks.values())


def test_sample_free_positions_is_exact_distinct_and_inside_free_slots():
    gen = torch.Generator().manual_seed(0)
    free = torch.rand(50_000, generator=gen) < 0.7
    for count in (0, 1, 1000, 9000, 30_000):  # both the rejection path and the permutation path
        picked = sample_free_positions(free, count, int(free.sum()), gen)
        assert picked.numel() == count
        assert picked.unique().numel() == count
        assert bool(free[picked].all())


def test_sample_free_positions_is_uniform():
    gen = torch.Generator().manual_seed(1)
    free = torch.ones(100, dtype=torch.bool)
    free[::4] = False  # 75 free slots
    hits = torch.zeros(100)
    for _ in range(2000):
        hits[sample_free_positions(free, 5, 75, gen)] += 1
    expected = 2000 * 5 / 75
    assert bool((hits[~free] == 0).all())
    chi2 = float(((hits[free] - expected) ** 2 / expected).sum())
    assert chi2 < 130  # 74 degrees of freedom: p < 1e-4 above this


def test_schedule_follows_epoch_milestones_and_stop_epoch():
    sched = RewireSchedule({0: 2, 2: 4}, stop_epoch=3, steps_per_epoch=8)
    due = [i for i in range(1, 41) if sched.due(i)]
    assert due == [2, 4, 6, 8, 10, 12, 14, 16, 20, 24]
    with pytest.raises(ValueError):
        RewireSchedule({0: 2, 5: 4})  # milestones without steps_per_epoch


@pytest.mark.numerics
def test_state_dict_round_trip_continues_identically():
    def build(fresh):
        net = small_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        threshold = 0.5 if fresh else 0.01  # the loaded H must replace the fresh one
        return (
            net,
            opt,
            DSR(
                net,
                opt,
                sparsity=0.9,
                prune_target=50,
                init_threshold=threshold,
                schedule=RewireSchedule({0: 3}),
            ),
        )

    s1, s2 = assert_resume_is_exact(build, 12, 12)
    assert s1["threshold"] == s2["threshold"]


def test_create_sparsifier_by_name():
    net = small_net()
    assert create_sparsifier("dense", net).masks == {}
    assert create_sparsifier("static", small_net(), sparsity=0.5).method == "static"
    assert isinstance(create_sparsifier("dsr", small_net(), sparsity=0.5, prune_target=5), DSR)
    with pytest.raises(UserError, match="unknown method"):
        create_sparsifier("magic", net)


def test_static_never_moves_its_mask():
    torch.manual_seed(0)
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    s = create_sparsifier("static", net, opt, sparsity=0.9, schedule=RewireSchedule({0: 1}))
    before = {n: m.clone() for n, m in s.masks.items()}
    train_steps(net, opt, s, 10)
    assert all(torch.equal(before[n], m) for n, m in s.masks.items())
    assert masked_weights_are_zero(s)
