"""What a model's channels cost, so that channel removal can aim at a cost rather than a count.

A channel of an early layer at full resolution costs several times what one of a late layer
costs: removing the same share from every layer (what a count target and a magnitude ranking
end at) leaves the cost where a uniformly thinner model has it. With a `CostBudget`, removal
instead weighs what each channel is worth (its score) against what removing it saves, over all
layers at once, and stops as soon as the model meets the budget (`plan_to_budget`).

Two measures, both functions of the live width of every channel group:
- "macs": the multiply-accumulates of the convolutions and linear layers for one sample, which
  is what the exported model runs once BatchNorm has folded into them (`count_macs`);
- "latency": per layer, onnxruntime's time for that layer alone, measured once per machine at a
  few widths between the floor and the full width (each rounded up to `multiple_of`, as
  onnxruntime pads) and cached; widths between them are interpolated (`LatencyTable`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.distributed as dist
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import UserError
from ..files import read_regular, write_json
from ..machine import cores, cpu_features
from .groups import ChannelGroup, most_removable
from .slicing import LAYERS

MEASURES = ("macs", "latency")
# Widths measured per dimension of a layer's latency table (the full one, and evenly spaced
# multiples down to the narrowest reachable): the layer time is close to bilinear in its input and
# output widths, and each point costs a session.
TABLE_POINTS = 4
TIMED_RUNS = 30  # median of these, after WARMUP_RUNS
WARMUP_RUNS = 5
CACHE_BYTES = 16 << 20  # the most of a layer latency cache read back


@dataclass(frozen=True)
class CostBudget:
    """Keep at most `share` of the dense model's `measure` ("macs" or "latency")."""

    measure: str
    share: float

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise UserError(f"cost measure must be one of {', '.join(MEASURES)}, got {self.measure!r}")
        if not 0.0 < self.share < 1.0:
            raise UserError(f"a {self.measure} budget must be a share in (0, 1), got {self.share}")


@dataclass
class Layer:
    """One Conv2d or Linear as a forward pass of one sample sees it, and the channel groups whose
    width sets its input and output widths: (group, indices per channel of the group)."""

    name: str
    in_width: int
    out_width: int
    groups: int
    kernel: tuple[int, ...]  # () for a Linear
    positions: int  # outputs per channel and sample: H*W for a conv, tokens for a Linear
    input_shape: tuple[int, ...]  # one sample's input, as the layer was built
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    runs: int = 1  # forward passes through the layer per sample (more where its weights are shared)
    reads: list[tuple[str, int]] = field(default_factory=list)
    writes: list[tuple[str, int]] = field(default_factory=list)

    def widths(self, removed: dict[str, int]) -> tuple[int, int]:
        """(input, output) widths once `removed` channels of each group are gone."""
        in_width = self.in_width - sum(removed.get(g, 0) * k for g, k in self.reads)
        out_width = self.out_width - sum(removed.get(g, 0) * k for g, k in self.writes)
        return in_width, out_width

    @property
    def depthwise(self) -> bool:  # one filter per input channel: its groups go with its width
        return self.groups > 1 and self.groups == self.in_width

    def macs(self, in_width: int, out_width: int) -> int:
        per_filter = 1 if self.depthwise else in_width // self.groups
        return out_width * per_filter * int(np.prod(self.kernel or (1,))) * self.positions * self.runs


def layer_geometry(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Layer]:
    """Every Conv2d and Linear that one eval-mode forward pass of one sample runs, by name."""
    seen: dict[str, Layer] = {}
    calls: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            per_sample = output[0]
            if isinstance(module, nn.Conv2d):
                seen[name] = Layer(
                    name,
                    module.in_channels,
                    module.out_channels,
                    module.groups,
                    tuple(module.kernel_size),
                    per_sample[0].numel(),
                    tuple(inputs[0].shape[1:]),
                    tuple(module.stride),
                    tuple(module.padding) if not isinstance(module.padding, str) else (),
                    tuple(module.dilation),
                )
            else:
                seen[name] = Layer(
                    name, module.in_features, module.out_features, 1, (),
                    per_sample.numel() // module.out_features, tuple(inputs[0].shape[1:]),
                )  # fmt: skip

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, LAYERS)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name, count in calls.items():  # a layer run more than once (shared weights) costs each run
        seen[name].runs = count
    return seen


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one sample's forward pass through the convolutions and linear
    layers (BatchNorm folds into them on export; activations and pooling are not counted)."""
    return sum(
        layer.macs(layer.in_width, layer.out_width)
        for layer in layer_geometry(model, example_inputs).values()
    )


def model_cost(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(parameters, MACs of one sample's forward pass, as `count_macs` counts them)."""
    return sum(p.numel() for p in model.parameters()), count_macs(model, example_inputs)


class ChannelCost:
    """The cost of the model as a function of how many channels of each group are gone.

    `layers`: the model's geometry as built (`layer_geometry`), `members`: per group, its
    (layer name, role "in"/"out", indices per channel) entries; `time_layer`: for "latency", the
    time of a layer at given widths (a `LatencyTable`)."""

    def __init__(
        self,
        layers: dict[str, Layer],
        members: dict[str, list[tuple[str, str, int]]],
        measure: str = "macs",
        time_layer: Callable[[Layer, int, int], float] | None = None,
    ):
        self.layers, self.measure = layers, measure
        self.touching: dict[str, list[Layer]] = {g: [] for g in members}
        for group, entries in members.items():
            for layer_name, role, k in entries:
                layer = layers.get(layer_name)
                if layer is None:
                    continue  # not run by the forward pass: it costs nothing
                (layer.reads if role == "in" else layer.writes).append((group, k))
                if layer not in self.touching[group]:
                    self.touching[group].append(layer)
        if measure == "latency" and time_layer is None:
            raise ValueError("a latency cost needs a table of layer times")
        if measure == "latency" and (shared := [n for n, layer in layers.items() if layer.runs > 1]):
            raise UserError(
                f"a latency target cannot time {shared[0]}: its weights run {layers[shared[0]].runs} times "
                "in one forward pass, where the layer times are for one (give a macs target)"
            )
        self.time_layer = time_layer

    @functools.cached_property
    def dense(self) -> float:
        return self.total({})

    def layer_cost(self, layer: Layer, removed: dict[str, int]) -> float:
        in_width, out_width = layer.widths(removed)
        if self.measure == "macs":
            return float(layer.macs(in_width, out_width))
        return self.time_layer(layer, in_width, out_width)

    def total(self, removed: dict[str, int]) -> float:
        return sum(self.layer_cost(layer, removed) for layer in self.layers.values())

    def share(self, removed: dict[str, int]) -> float:
        """The model's cost over the dense model's."""
        return self.total(removed) / self.dense

    def saving(self, removed: dict[str, int], group: str, count: int) -> float:
        """What removing `count` more channels of `group` saves."""
        more = {**removed, group: removed.get(group, 0) + count}
        return sum(
            self.layer_cost(layer, removed) - self.layer_cost(layer, more) for layer in self.touching[group]
        )


def next_block(width: int, floor: int, step: int, kind: str) -> int:
    """How many channels a group of `width` live channels gives up next: down to the next multiple
    of `step` not below its floor (`kind` "rounded"), one at a time where no multiple fits
    ("unrounded"), none for a group `multiple_of` keeps whole; 0 once nothing more may go."""
    if kind == "whole" or width <= floor:
        return 0
    if step == 1 or kind == "unrounded":
        return 1
    lower = (width - 1) // step * step
    return width - lower if lower >= max(floor, step) else 0


def plan_to_budget(
    cost: ChannelCost,
    removed: dict[str, int],
    lowest_first: dict[str, list[int]],
    scores: dict[str, torch.Tensor],
    blocks: Callable[[str, int], int],
    allow: Callable[[str, list[int]], bool],
    target: float,
) -> list[tuple[str, list[int]]]:
    """The blocks of channels to remove, in order, until the cost is at most `target`: each time
    the block of any group whose score is lowest for what it saves (a prefix of the blocks is
    the best part of the plan, and leaves every group at a multiple as well). `removed`: the channels of each
    group already gone; `lowest_first`: each group's live channels, lowest score first;
    `blocks(group, width)`: the size of its next block (`next_block`), `allow(group, channels)`:
    whether the budget of active weights still fits without them (it takes note when it says
    yes). Stops short of the target where floors and the budget leave nothing more to take."""
    removed = dict(removed)
    taken = {g: 0 for g in lowest_first}
    plan: list[tuple[str, list[int]]] = []
    stuck: set[str] = set()
    current = cost.total(removed)
    while current > target:
        candidates = []
        for group, live in lowest_first.items():
            size = 0 if group in stuck else blocks(group, len(live) - taken[group])
            if size == 0:
                continue
            block = live[taken[group] : taken[group] + size]
            saving = cost.saving(removed, group, size)
            candidates.append((float(scores[group][block].sum()), saving, group, block))
        if not candidates:
            break
        # The lowest score for what it saves; but where a block alone meets the budget, the
        # lowest-scoring of those (a cheap block may finish where the best ratio overshoots far).
        finishing = [c for c in candidates if current - c[1] <= target]
        if finishing:
            _, saving, group, block = min(finishing, key=lambda c: c[0])
        else:
            _, saving, group, block = min(candidates, key=lambda c: c[0] / max(c[1], 1e-12))
        if not allow(group, block):
            stuck.add(group)
            continue
        taken[group] += len(block)
        removed[group] = removed.get(group, 0) + len(block)
        current -= saving
        plan.append((group, block))
    return plan


def _round_up(width: int, step: int, full: int) -> int:
    return min(full, -(-width // step) * step)


def _candidates(low: int, full: int, step: int) -> list[int]:
    """TABLE_POINTS widths from `low` to `full`, on multiples of `step` where they can be."""
    points = np.linspace(max(low, 1), full, TABLE_POINTS)
    return sorted({_round_up(int(round(p)), step, full) for p in points})


class LatencyTable:
    """onnxruntime's median batch-1 time (ms) of each layer alone, at the widths it can take,
    measured on this machine once and kept in `cache` (JSON, keyed by the machine, onnxruntime's
    version and the layer's geometry). Widths between the measured ones are interpolated
    bilinearly; a width is first rounded up to `step` (onnxruntime pads the rest)."""

    def __init__(self, cache: Path, step: int):
        self.cache, self.step = cache, step
        cpu = cpu_features()  # what the times hold for: this CPU, its cores, this onnxruntime
        self.machine = [cpu["machine"], cpu["model_name"], cores(), ort.__version__]
        self.times = _read_cache(cache)
        self.grids: dict[str, tuple[list[int], list[int], np.ndarray]] = {}

    def key(self, layer: Layer) -> str:
        fields = [
            *self.machine,
            layer.in_width, layer.out_width, layer.groups, layer.kernel, layer.input_shape,
            layer.stride, layer.padding, layer.dilation,
        ]  # fmt: skip
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:24]

    def prepare(self, layers: dict[str, Layer], lowest: dict[str, tuple[int, int]]) -> None:
        """Measure (or read from the cache) every layer's grid; `lowest`: per layer the narrowest
        (input, output) widths removal can leave it."""
        fresh = False
        for name, layer in layers.items():
            low_in, low_out = lowest.get(name, (layer.in_width, layer.out_width))
            ins = (
                _candidates(low_in, layer.in_width, self.step)
                if low_in < layer.in_width
                else [layer.in_width]
            )
            outs = (
                _candidates(low_out, layer.out_width, self.step)
                if low_out < layer.out_width
                else [layer.out_width]
            )
            entry = self.times.setdefault(self.key(layer), {})
            for i in ins:
                for o in outs:
                    if f"{i}x{o}" not in entry:
                        entry[f"{i}x{o}"] = _time_layer(layer, i, o)
                        fresh = True
            self.grids[name] = (ins, outs, np.array([[entry[f"{i}x{o}"] for o in outs] for i in ins]))
        if fresh:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.cache, self.times)

    def __call__(self, layer: Layer, in_width: int, out_width: int) -> float:
        ins, outs, grid = self.grids[layer.name]
        i = _round_up(in_width, self.step, layer.in_width)
        o = _round_up(out_width, self.step, layer.out_width)
        along_out = np.array([np.interp(o, outs, row) for row in grid])
        return float(np.interp(i, ins, along_out))


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    """The cached layer times, or nothing where the file is missing, unreadable or not ours."""
    try:
        times = json.loads(read_regular(path, "layer latency cache", CACHE_BYTES))
    except (OSError, ValueError, UserError):
        return {}
    valid = isinstance(times, dict) and all(
        isinstance(entry, dict) and all(isinstance(t, float) and t >= 0 for t in entry.values())
        for entry in times.values()
    )
    return times if valid else {}


def _time_layer(layer: Layer, in_width: int, out_width: int) -> float:
    """The median time (ms) of `layer` alone at these widths, in an onnxruntime session."""
    session = ort.InferenceSession(
        _layer_model(layer, in_width, out_width).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    shape = (1, in_width, *layer.input_shape[1:]) if layer.kernel else (1, *layer.input_shape[:-1], in_width)
    feed = {"x": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _layer_model(layer: Layer, in_width: int, out_width: int):
    """A one-layer ONNX model: the conv (with its ReLU, which onnxruntime fuses) or the matmul."""
    rng = np.random.default_rng(0)
    groups = in_width if layer.depthwise else layer.groups
    if layer.kernel:
        weight = rng.standard_normal((out_width, in_width // groups, *layer.kernel), dtype=np.float32)
        pads = list(layer.padding) * 2 if layer.padding else [0, 0, 0, 0]
        nodes = [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["y0"], group=groups, strides=list(layer.stride),
                pads=pads, dilations=list(layer.dilation), kernel_shape=list(layer.kernel),
            ),
            helper.make_node("Relu", ["y0"], ["y"]),
        ]  # fmt: skip
        x_shape = [1, in_width, *layer.input_shape[1:]]
    else:
        weight = rng.standard_normal((in_width, out_width), dtype=np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])]
        x_shape = [1, *layer.input_shape[:-1], in_width]
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.zeros(out_width, dtype=np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def channel_cost(
    model: nn.Module,
    example_inputs: torch.Tensor,
    groups: list[ChannelGroup],
    floors: dict[str, int],
    budget: CostBudget,
    multiple_of: int,
) -> ChannelCost:
    """The model's cost as a function of the channels removed from each group; for a latency
    budget, with the layer times measured (or read from this machine's cache) at the widths
    removal can reach."""
    layers = layer_geometry(model, example_inputs)
    members = {
        g.name: [(m.name, m.role, m.index.shape[1]) for m in g.members if m.role != "norm"] for g in groups
    }
    table = LatencyTable(latency_cache(), multiple_of) if budget.measure == "latency" else None
    cost = ChannelCost(layers, members, budget.measure, table)
    if table is not None:
        most = most_removable(groups, floors, multiple_of)
        table.prepare(layers, {name: layer.widths(most) for name, layer in layers.items()})
        if dist.is_available() and dist.is_initialized():  # every rank plans with rank 0's times
            grids = [table.grids]
            dist.broadcast_object_list(grids, src=0)
            table.grids = grids[0]
    return cost


def latency_cache() -> Path:
    """Where the layer times of this machine are kept between runs."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dsrpipe" / "layer-latency.json"
