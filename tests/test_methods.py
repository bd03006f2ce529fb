"""The paper's baselines behind the engine API: SET, DeepR, RigL, gradual pruning, frozen masks,
thin dense. Tiny nets and random data, plus short end-to-end runs on digits."""

import math

import pytest
import torch
from torch import nn

from dsrpipe.config import parse_pipeline
from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.pipeline import run_pipeline
from dsrpipe.rundir import save_checkpoint
from dsrpipe.sparse import (
    DSR, SET, DeepR, Frozen, GradualPrune, METHODS, RewireSchedule, RigL, create_sparsifier,
)
from dsrpipe.sparse.base import smallest_active
from dsrpipe.sparse.deepr import distinct_ranks
from dsrpipe.sparse.thin import thin_model_options
from dsrpipe.train import finetune, train_sparse

from . import helpers
from .helpers import masked_weights_are_zero
from .test_pipeline import tiny as tiny_pipeline


def small_net():
    return helpers.small_net(width=8)


def sgd(net, lr=0.05):
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


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


def make(method, net, opt, **kwargs):
    """Every method with settings that make it move often on a few steps."""
    options = {"sparsity": 0.8, "schedule": RewireSchedule({0: 3}), "seed": 0}
    options.update({
        "dsr": {"prune_target": 50, "init_threshold": 0.01},
        "set": {"zeta": 0.3},
        "deepr": {"temperature": 1e-4, "l1": 1e-3},
        "rigl": {"alpha": 0.3, "total_steps": 100},
        "prune": {"end_iteration": 18},
        "frozen": {},
    }[method])
    options.update(kwargs)
    return create_sparsifier(method, net, opt, **options)


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

def test_deepr_prunes_exactly_the_sign_flips_and_keeps_the_total():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    s = DeepR(net, opt, sparsity=0.8, temperature=0.0, l1=0.0)
    total = s.active_count()
    flipped = {}
    with torch.no_grad():
        for name, mask in s.masks.items():
            active = mask.view(-1).nonzero().squeeze(1)
            chosen = active[torch.randperm(active.numel())[:7]]
            s.weights[name].view(-1)[chosen] *= -1  # these cross zero against their stored sign
            flipped[name] = torch.zeros_like(mask).view(-1)
            flipped[name][chosen] = True
            flipped[name] = flipped[name].view_as(mask)
    before = {n: m.clone() for n, m in s.masks.items()}
    stats = s.step()  # DeepR rewires after every step
    assert stats["pruned"] == 7 * len(s.masks) and s.active_count() == total
    for name, mask in s.masks.items():
        assert torch.equal(before[name] & ~mask, flipped[name])  # pruned == flipped, nothing else
        grown = mask & ~before[name]
        assert bool((s.weights[name][grown] == 0).all()) and not bool((grown & flipped[name]).any())
    assert sum(stats["grown"].values()) == stats["pruned"]
    assert masked_weights_are_zero(s)


def test_deepr_update_is_l1_plus_noise_and_the_count_stays_fixed():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net, lr=0.1)
    s = DeepR(net, opt, sparsity=0.8, temperature=0.0, l1=0.01)
    before = {n: s.weights[n].detach().clone() for n in s.masks}
    s.reallocate()
    for name, mask in s.masks.items():
        sign = torch.where(s.signs[name], 1.0, -1.0)
        kept = mask & (before[name].abs() > 0.001)
        assert torch.allclose(s.weights[name][kept], (before[name] - 0.1 * 0.01 * sign)[kept])
    s.temperature = 1e-3
    total = s.active_count()
    moved = 0
    for seed in range(5):
        train_steps(net, opt, s, 4, seed=seed)
        assert s.active_count() == total and masked_weights_are_zero(s)
        for name, mask in s.masks.items():  # every active weight sits on its sign's side (or at 0)
            w = s.weights[name][mask]
            assert bool(((w == 0) | ((w > 0) == s.signs[name][mask])).all())
        moved += s.reallocate()["pruned"]
    assert moved > 0


def test_distinct_ranks_are_distinct_and_uniform():
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(50)
    for _ in range(1000):
        ranks = distinct_ranks(50, 10, gen)
        assert ranks.unique().numel() == 10
        hits[ranks] += 1
    expected = 1000 * 10 / 50
    assert float(((hits - expected) ** 2 / expected).sum()) < 100  # 49 dof: p < 1e-4 above this


# -- RigL ---------------------------------------------------------------------------------------

def test_rigl_grows_where_the_dense_gradient_is_largest_and_drops_the_smallest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    s = RigL(net, opt, sparsity=0.8, alpha=0.3, dense_first=False, dense_last=False,
             schedule=RewireSchedule({0: 2}))
    distinct_magnitudes(s)
    gen = torch.Generator().manual_seed(1)
    targets = {n: torch.randn(w.shape, generator=gen) for n, w in s.weights.items()}
    # step 1 is no reallocation: no dense gradient is kept
    sum((w * targets[n]).sum() for n, w in s.weights.items()).backward()
    opt.step(); opt.zero_grad()
    assert s.step() is None and s._dense_grad == {}
    before = {n: m.clone() for n, m in s.masks.items()}
    magnitude = {n: s.weights[n].detach().abs().clone() for n in s.masks}
    # step 2 reallocates; d(loss)/dw = target: the dense gradient is known everywhere
    sum((w * targets[n]).sum() for n, w in s.weights.items()).backward()
    for n, w in s.weights.items():
        assert bool((w.grad[~s.masks[n]] == 0).all())  # the optimizer still sees a masked gradient
    opt.step(); opt.zero_grad()
    stats = s.step()
    assert stats is not None and stats["drop_fraction"] == 0.3
    for name, mask in s.masks.items():
        k = round(0.3 * 20)
        dropped, grown = before[name] & ~mask, mask & ~before[name]
        assert int(dropped.sum()) == int(grown.sum()) == k == stats["grown"][name]
        assert magnitude[name][dropped].max() < magnitude[name][before[name] & mask].min()
        expected = targets[name].abs().masked_fill(before[name], -1).view(-1).topk(k).indices
        assert set(grown.view(-1).nonzero().squeeze(1).tolist()) == set(expected.tolist())
        assert bool((s.weights[name][grown] == 0).all())
    assert s._dense_grad == {}  # released after use


def test_rigl_drop_fraction_decays_by_cosine_to_zero():
    s = RigL(small_net(), sparsity=0.5, alpha=0.3, total_steps=1000)
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(500) == pytest.approx(0.15)
    assert s.drop_fraction(250) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert s.drop_fraction(1000) == s.drop_fraction(2000) == 0.0
    stopped = RigL(small_net(), sparsity=0.5, total_steps=1000,
                   schedule=RewireSchedule({0: 10}, stop_epoch=4, steps_per_epoch=100))
    assert stopped.end_iteration == 400  # the schedule's stop comes first


# -- gradual magnitude pruning ------------------------------------------------------------------

def test_prune_follows_the_cubic_schedule_and_ends_exactly_at_the_target():
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    s = GradualPrune(net, opt, sparsity=0.9, total_steps=40, schedule=RewireSchedule({0: 5}))
    assert s.end_iteration == 30  # 75% of training, then fine-tuning
    assert all(bool(m.all()) for m in s.masks.values()) and all(bool((w != 0).all()) for w in s.weights.values())
    numel = {n: m.numel() for n, m in s.masks.items()}
    for t in range(1, 41):
        before = {n: m.clone() for n, m in s.masks.items()}
        train_steps(net, opt, s, 1, seed=t)
        pruning_step = 1 <= t <= 30 and t % 5 == 0
        s_t = 0.9 + (0.0 - 0.9) * (1 - min(t, 30) / 30) ** 3  # Zhu & Gupta, s_i = 0, t0 = 0, nΔt = 30
        if pruning_step:
            assert s.target_sparsity(t) == pytest.approx(s_t)
            for name, mask in s.masks.items():
                assert int(mask.sum()) == max(1, round((1 - s_t) * numel[name]))
                dropped = before[name] & ~mask
                if dropped.any():  # the smallest went (magnitudes as of this step's update)
                    w = s.weights[name].detach()
                    assert bool((w[dropped] == 0).all())
        else:
            assert all(torch.equal(before[n], m) for n, m in s.masks.items())
        assert masked_weights_are_zero(s)
    for name, mask in s.masks.items():  # exactly the final sparsity, as every sparse method starts
        assert int(mask.sum()) == round(0.1 * numel[name])


def test_prune_must_end_within_training():
    with pytest.raises(UserError, match="never reach"):
        GradualPrune(small_net(), sparsity=0.5, end_iteration=50, total_steps=40)
    with pytest.raises(UserError, match="begin_iteration < end_iteration"):
        GradualPrune(small_net(), sparsity=0.5, begin_iteration=30, end_iteration=20)


def test_prune_drops_the_smallest_magnitudes():
    torch.manual_seed(0)
    s = GradualPrune(small_net(), sparsity=0.5, end_iteration=1, schedule=RewireSchedule({0: 1}))
    distinct_magnitudes(s)
    magnitude = {n: s.weights[n].detach().abs().clone() for n in s.masks}
    s.step()
    for name, mask in s.masks.items():
        assert magnitude[name][~mask].max() < magnitude[name][mask].min()


# -- frozen ---------------------------------------------------------------------------------------

def dsr_checkpoint(tmp_path, **kwargs):
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    dsr = DSR(net, opt, sparsity=0.8, prune_target=50, init_threshold=0.02, schedule=RewireSchedule({0: 2}), **kwargs)
    train_steps(net, opt, dsr, 6)
    path = tmp_path / "final.pt"
    save_checkpoint(path, {"stage": "train", "complete": True, "fingerprint": "f", "run_id": "abc", "epoch": 1,
                           "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
                           "sparsifier": dsr.state_dict(), "method": "dsr", "rng": {}, "history": [],
                           "model_spec": {}, "data_info": {}, "config": {}})
    return path, dsr.masks


def test_frozen_retrains_the_given_mask_from_scratch_and_never_moves_it(tmp_path):
    path, source = dsr_checkpoint(tmp_path)
    torch.manual_seed(1)
    net = small_net()
    opt = sgd(net)
    s = Frozen(net, opt, masks_from=path, sparsity=0.5, schedule=RewireSchedule({0: 1}))
    assert all(torch.equal(s.masks[n], source[n]) for n in source)
    assert abs(s.sparsity - 0.8) < 0.01  # as found, whatever `sparsity` says
    for name, mask in s.masks.items():  # a fresh random init on every active position
        assert bool((s.weights[name][mask] != 0).all())
    train_steps(net, opt, s, 6)
    assert all(torch.equal(s.masks[n], source[n]) for n in source)
    assert masked_weights_are_zero(s)


def test_frozen_rejects_missing_unfinished_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Frozen(small_net(), masks_from=tmp_path / "nope.pt")
    with pytest.raises(UserError, match="needs masks_from"):
        Frozen(small_net())
    path, _ = dsr_checkpoint(tmp_path, dense_last=False)  # one more sparse layer than the default
    with pytest.raises(UserError, match="sparse layers"):
        Frozen(small_net(), masks_from=path)
    other = small_net()
    other[2] = nn.Conv2d(8, 16, 5, padding=2)  # same layer names, another shape
    with pytest.raises(UserError, match=r"mask of shape \(16, 8, 3, 3\)"):
        Frozen(other, masks_from=path, dense_last=False)
    state = torch.load(path, weights_only=False)
    torch.save({**state, "complete": False}, path)
    with pytest.raises(UserError, match="unfinished"):
        Frozen(small_net(), masks_from=path, dense_last=False)
    with pytest.raises(UserError, match="masks_from"):
        parse_pipeline({"name": "x", "sparsity": {"method": "frozen"}})


# -- thin dense -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,sparsity,in_channels,size", [
    ("wrn-10-2", {}, 0.9, 3, 32), ("wrn-10-2", {}, 0.5, 3, 32), ("lenet5", {}, 0.5, 1, 28),
    ("small-cnn", {"width": 32}, 0.9, 3, 32), ("small-cnn", {"width": 32}, 0.9, 1, 8),
])
def test_thin_dense_matches_the_sparse_budget(name, options, sparsity, in_channels, size):
    thin, achieved, budget = thin_model_options(name, options, num_classes=10, in_channels=in_channels,
                                                image_size=size, sparsity=sparsity)
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

SPARSE_METHODS = ["set", "deepr", "rigl", "prune", "frozen"]


@pytest.fixture
def frozen_source(tmp_path):
    return dsr_checkpoint(tmp_path)[0]


def test_every_method_is_registered_by_its_name():
    assert {"set", "deepr", "rigl", "prune", "frozen", "thin-dense"} <= set(METHODS)
    assert all(METHODS[method].method == method for method in SPARSE_METHODS)
    assert METHODS["thin-dense"].method == "dense"  # a narrower model, trained densely


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_masked_weights_stay_zero_through_momentum_and_weight_decay(method, frozen_source):
    torch.manual_seed(0)
    net = small_net()
    opt = sgd(net)
    s = make(method, net, opt, masks_from=frozen_source)
    moved = False
    for chunk in range(7):
        before = {n: m.clone() for n, m in s.masks.items()}
        train_steps(net, opt, s, 3, seed=chunk)
        moved |= any(not torch.equal(before[n], m) for n, m in s.masks.items())
        assert masked_weights_are_zero(s)
    assert moved == (method != "frozen")


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_state_dict_round_trip_continues_identically(method, frozen_source):
    def build(fresh):
        net = small_net()
        opt = sgd(net)
        return net, opt, make(method, net, opt, masks_from=frozen_source, **({"seed": 9} if fresh else {}))

    helpers.assert_resume_is_exact(build, 7, 8)


# -- end to end -----------------------------------------------------------------------------------

def tiny(name, method, **sparsity):
    """test_pipeline's tiny pipeline with `method` at 0.8: width 8, one epoch, no fine-tuning."""
    return parse_pipeline(tiny_pipeline(
        name, model={"options": {"width": 8}}, sparsity={"method": method, "sparsity": 0.8, **sparsity},
        train={"epochs": 1}, finetune={"epochs": 0}, validate={"latency_runs": 3}))


def test_methods_run_end_to_end_on_digits(tmp_path):
    # rigl through the whole pipeline, then a frozen retrain of its final mask (training only) and
    # thin dense: each one epoch, width 8.
    rigl = run_pipeline(tiny("rigl", "rigl"), tmp_path, progress=False)
    assert rigl["method"] == "rigl" and 0.79 <= rigl["sparsity"] <= 0.81
    rigl_path = tmp_path / "rigl" / "train" / "final.pt"
    rigl_ckpt = torch.load(rigl_path, weights_only=False)
    assert sum(h["reallocations"] for h in rigl_ckpt["history"]) == (1437 // 64) // 5

    frozen_cfg = parse_pipeline({**tiny("frozen", "frozen", masks_from=str(rigl_path)).model_dump(mode="json", by_alias=True),
                                 "finetune": {"epochs": 1}})
    frozen_ckpt = torch.load(train_sparse(frozen_cfg, tmp_path, progress=False), weights_only=False)
    for name, mask in rigl_ckpt["sparsifier"]["masks"].items():
        assert torch.equal(frozen_ckpt["sparsifier"]["masks"][name], mask)
    assert frozen_ckpt["fingerprint"].endswith(rigl_ckpt["run_id"])  # a retrained source makes it stale
    tuned = torch.load(finetune(frozen_cfg, tmp_path, progress=False), weights_only=False)  # accepts that fingerprint
    for name, mask in rigl_ckpt["sparsifier"]["masks"].items():
        assert torch.equal(tuned["sparsifier"]["masks"][name], mask)

    thin_cfg = tiny("thin", "thin-dense")
    thin = run_pipeline(thin_cfg, tmp_path, progress=False)
    thin_ckpt = torch.load(tmp_path / "thin" / "train" / "final.pt", weights_only=False)
    record = thin_ckpt["model_spec"]["thin_dense"]
    assert thin["thin_dense"] == record and thin["model_options"] == thin_ckpt["model_spec"]["options"]
    assert thin["sparsity"] < 0.01 and thin["total_params"] == thin["nonzero_params"] == record["params"]
    assert thin["model_options"]["width"] < 8
    # the budget: the sparse model's active parameters, dense layers included
    masks = rigl_ckpt["sparsifier"]["masks"].values()
    assert record["budget"] == rigl["total_params"] - sum(m.numel() for m in masks) + sum(int(m.sum()) for m in masks)
    assert abs(record["params"] - record["budget"]) <= 0.03 * record["budget"]  # ~2k parameters: coarse


def test_finetune_starts_from_the_trained_weights(tmp_path):
    # With a vanishing learning rate, fine-tuning must leave the trained sparse model as it was.
    cfg = parse_pipeline({**tiny("set", "set").model_dump(mode="json", by_alias=True),
                          "finetune": {"epochs": 1, "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0}})
    trained = torch.load(train_sparse(cfg, tmp_path, progress=False), weights_only=False)["model"]
    tuned = torch.load(finetune(cfg, tmp_path, progress=False), weights_only=False)["model"]
    for key, value in trained.items():
        if value.is_floating_point() and "running" not in key:
            assert torch.allclose(tuned[key], value, atol=1e-6), key
