"""Cutting channels out of a model: the one slicing mechanism of training and export.

Torch-Pruning traces which layers share a channel (a conv, the BatchNorm after it, the layers
that read it, the other writers of a residual stream) and slices them all. What it does not slice
is what rides on a layer's parameters outside the model: an optimizer's momentum, a sparsifier's
masks. `cut` therefore also says, per parameter, which indices of which dimensions it dropped,
so that the caller slices those tensors the same way (`Cut.apply`).

Used by the export's shrink (deploy/shrink.py) and by shrinking during training
(`Sparsifier.shrink`), and to rebuild a shrunk architecture from the live channels a checkpoint
records (`cut_to_live`).
"""

from __future__ import annotations

import ctypes
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

from ..errors import UserError

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


# How long tracing a model may take at `check` (preflight.check_model), in seconds of the tracing
# thread's CPU time: Torch-Pruning traces in pure Python, and on some models never finishes
# (torchvision's swin_t: its index mappings through the shifted windows grow without end). A model
# over it is refused there, in one line. CPU time, not the clock on the wall, so that the load of
# a shared machine does not change the verdict (under a load of 10 on 2 cores, a niced tracing
# gets a tenth of a core: densenet161 passed check once and went over 60 s in training).
TRACE_SECONDS = 60.0
# Training, shrinking and the export trace again what check let through, as check traced it, but
# maybe on a slower CPU: under TRACE_SLACK times the bound, which there only ends a tracing that
# never would. A model check accepts is not refused at its first step.
TRACE_SLACK = 4.0
# Where a thread's CPU clock cannot be read (pthread_getcpuclockid is not on every Unix, nor on
# Windows), the bound is the clock on the wall.
CPU_CLOCK = hasattr(time, "pthread_getcpuclockid")


class _TooLong(Exception):
    """Raised into the tracing thread once its time is up."""


def _raise_in(thread_id: int, exception: type[BaseException]) -> None:
    """Raise `exception` in the thread `thread_id` where it next starts a call or loops back."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exception))


class _TimeBound:
    """Raise _TooLong in the thread that runs the block once it has run longer than `seconds` (of
    its CPU time, where CPU_CLOCK), and again every RAISE_AGAIN seconds until the block ends
    (RAISES times at most).

    A watchdog thread raises it into the traced thread, rather than SIGALRM: that works in any
    thread (a signal handler runs in the main thread only) and leaves the caller's signal
    handlers and timers alone. Again: one raised into a bare `except:` (Torch-Pruning's first
    forward pass runs under one) or into a finalizer is lost. Never after the block: the
    watchdog raises under a lock that the block's end takes, and that end catches one raised
    just before it took the lock (one that lands earlier in the end makes it try again).
    `expired` says whether it was raised (the tracing may catch it and fail otherwise)."""

    RAISE_AGAIN, RAISES = 0.5, 20
    LEAST_WAIT = 0.05  # the watchdog's shortest sleep while the time left runs out

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._target, self._done, self._lock = threading.get_ident(), threading.Event(), threading.Lock()
        self._now: Callable[[], float] = (
            partial(time.clock_gettime, time.pthread_getcpuclockid(self._target))
            if CPU_CLOCK
            else time.monotonic
        )
        self._start = self._now()
        self._watchdog = threading.Thread(target=self._watch, name="dsrpipe tracing bound", daemon=True)

    def _watch(self) -> None:
        # The traced thread's CPU time grows no faster than the wall clock: a sleep as long as
        # the time left never sleeps past the bound.
        while (left := self.seconds - (self._now() - self._start)) > 0:
            if self._done.wait(max(left, self.LEAST_WAIT)):
                return
        for _ in range(self.RAISES):
            with self._lock:  # never once the block is left: `_done` is set under the same lock
                if self._done.is_set():
                    return
                self.expired = True
                _raise_in(self._target, _TooLong)
            if self._done.wait(self.RAISE_AGAIN):
                return

    def __enter__(self) -> _TimeBound:
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        while True:
            try:
                with self._lock:
                    self._done.set()
                _raised_before_the_lock_lands_here()
                break
            except _TooLong:  # raised just as the block ended: it did end
                continue
        self._watchdog.join()


def _raised_before_the_lock_lands_here() -> None:
    """A Python call: an exception raised into this thread is delivered where a call starts, so
    one the watchdog raised before `__exit__` took the lock lands here, inside its `try`. (Taking
    it back with PyThreadState_SetAsyncExc(NULL) instead leaves CPython's pending flag set, which
    hangs the thread under a profiler or tracer: cProfile, coverage, a debugger.)"""


_bounded = threading.local()


def trace_bound(at_check: bool) -> float:
    """The seconds a tracing may take: TRACE_SECONDS at check, TRACE_SLACK times that elsewhere."""
    return TRACE_SECONDS if at_check else TRACE_SECONDS * TRACE_SLACK


@contextmanager
def tracing(
    model: nn.Module, what: str, advice: str = "", name: str | None = None, at_check: bool = False
) -> Iterator[None]:
    """Trace `model` in the block: within `trace_bound(at_check)`, and any failure (Torch-Pruning's
    errors, an exception of ours on a graph we did not foresee, the time running out) a
    UserError that says `what` needed it, of which model (`name`, else its class), and
    `advice`, what to do instead. Nested blocks run under the outermost one's bound and message."""
    if getattr(_bounded, "active", False):
        yield
        return
    _bounded.active = True
    seconds = trace_bound(at_check)
    bound = _TimeBound(seconds)
    try:
        # Torch-Pruning's warnings (its shape inference giving up, say) are not the user's to act on.
        with bound, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except UserError:
        raise
    except Exception as exc:  # a model we cannot trace: say so, not a page of its internals
        if isinstance(exc, _TooLong) or bound.expired:
            reason = f"it took longer than {seconds:g} s{' of CPU time' if CPU_CLOCK else ''}"
        else:
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{what}: the channel dependencies of {name or type(model).__name__} could not be traced ({reason})"
            + (f"; {advice}" if advice else "")
        ) from None
    finally:
        _bounded.active = False


# Modules Torch-Pruning takes as a whole rather than tracing into them: by qualified class name,
# those of each class that the test says. A group holding one is never cut (`opaque`): the
# stream it reads and writes keeps its channels. Traced through, their window partitions and
# per-head reshapes make index mappings that grow without end: torchvision's swin_t and timm's
# levit_conv_128s never finished in 60 s; taken whole, each traces in about a second. (LeViT's
# linear variant traces as it is, and slower taken whole.)
WHOLE_MODULES: dict[str, Callable[[nn.Module], bool]] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention": lambda module: True,
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": lambda module: True,
    "timm.models.levit.Attention": lambda module: module.use_conv,
    "timm.models.levit.AttentionDownsample": lambda module: module.use_conv,
}


def taken_whole(module: nn.Module) -> bool:
    test = WHOLE_MODULES.get(_qualified(module))
    return bool(test and test(module))


def _qualified(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


class _Whole(tp.pruner.BasePruningFunc):
    """Torch-Pruning's view of the WHOLE_MODULES modules of one model: their input and output
    widths, as Torch-Pruning's own forward pass met them (`watch`), and no cut."""

    def __init__(self):
        super().__init__()
        self.widths: dict[nn.Module, tuple[int, int]] = {}

    def watch(self, model: nn.Module) -> list:
        """Hooks that record each whole module's widths: the channel dimension is 1 for one that
        works on NCHW maps (its first layer a Conv2d), else the last (tokens, or Swin's NHWC)."""

        def record(module, args, output):
            first = next(m for m in module.modules() if isinstance(m, LAYERS))
            dim = 1 if isinstance(first, nn.Conv2d) else -1
            self.widths[module] = (args[0].shape[dim], output.shape[dim])

        return [m.register_forward_hook(record) for m in model.modules() if taken_whole(m)]

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.widths[layer][0]

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.widths[layer][1]

    def prune_out_channels(self, layer: nn.Module, idxs):
        raise UserError(f"cannot cut the channels of a {type(layer).__name__}")

    def prune_in_channels(self, layer: nn.Module, idxs):
        raise UserError(f"cannot cut the channels of a {type(layer).__name__}")


def dependency_graph(
    model: nn.Module, example_inputs: torch.Tensor, what: str, advice: str = ""
) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model`, traced in eval mode (a traced forward must not
    move BatchNorm's running statistics), under `tracing`'s bound and errors."""
    was_training = model.training
    model.eval()
    whole = _Whole()
    hooks = whole.watch(model)
    try:
        with tracing(model, what, advice), torch.enable_grad():  # Torch-Pruning traces through autograd
            # A tuple: Torch-Pruning calls model(*example_inputs) first (a tensor would be split
            # into its samples) and, should that fail, model(example_inputs).
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=(example_inputs,),
                # by type (Torch-Pruning matches instances by isinstance): one model's instances
                # of a class are all taken whole or none (LeViT's use_conv is the model's)
                customized_pruners={type(m): whole for m in model.modules() if taken_whole(m)},
                verbose=False,
            )
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


# Torch-Pruning brings every index mapping of the graph up to date (each concatenation's offsets,
# each reshape's stride) before it builds each group: on a DenseNet, whose layers read
# concatenations of all the layers before them, that is nine tenths of listing its groups
# (densenet161: 3.5 s, or 0.7 s brought up to date once). While the groups are listed, nothing
# changes the graph: `all_groups` brings them up to date once, and the graphs it lists are skipped
# by Torch-Pruning's own call, which otherwise runs as it did (a cut needs it: each group's
# pruning moves the offsets of the concatenations that hold it).
_update_index_mapping = tp_index_mapping.update_index_mapping
_mapped: set[int] = set()  # id() of the graphs `all_groups` is listing


def _update_unless_mapped(graph: tp.DependencyGraph) -> None:
    if id(graph) not in _mapped:
        _update_index_mapping(graph)


tp_index_mapping.update_index_mapping = _update_unless_mapped


def all_groups(graph: tp.DependencyGraph) -> Iterator[tp.Group]:
    """Torch-Pruning's groups of `graph` rooted at a Conv2d or Linear (its get_all_groups), with
    the index mappings brought up to date once rather than before each group."""
    _update_index_mapping(graph)
    _mapped.add(id(graph))
    try:
        yield from graph.get_all_groups(root_module_types=LAYERS)
    finally:
        _mapped.discard(id(graph))


def opaque(target: object) -> bool:
    """Whether a node of a Torch-Pruning group holds something per channel that this code does
    not slice or zero: a model output, a module taken whole (WHOLE_MODULES), a bare nn.Parameter
    (Torch-Pruning's unwrapped parameters: a ViT's class token and position embedding, ConvNeXt's
    layer scale), or a module with parameters of its own that is not a Conv2d, Linear or
    BatchNorm (LayerNorm)."""
    if isinstance(target, tp.ops._OutputOp) or not isinstance(target, nn.Module):
        return True
    if taken_whole(target):
        return True
    return not isinstance(target, LAYERS + NORMS) and any(True for _ in target.parameters(recurse=False))


def grouped(layer: nn.Module) -> bool:
    """Whether a layer ties channels together in groups that a cut would have to keep whole: a
    grouped conv. A depthwise conv (one input channel per output channel) does not: Torch-Pruning
    couples its input and output channel one to one, so the channel's filter goes with it."""
    if not isinstance(layer, nn.Conv2d) or layer.groups == 1:
        return False
    return not layer.groups == layer.in_channels == layer.out_channels


def out_channel_handler(layer: nn.Module):
    """Torch-Pruning's function that removes output channels of a Conv2d or Linear."""
    return tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels


def sliced_dims(module: nn.Module, is_out: bool) -> list[tuple[str, int]]:
    """The (parameter, dimension) pairs that a channel of `module` occupies: a Conv2d/Linear's
    output rows and bias, its input columns, a BatchNorm's γ and β. Torch-Pruning slices exactly
    these; so do the tensors riding on them."""
    if isinstance(module, NORMS):
        return [("weight", 0), ("bias", 0)]
    if isinstance(module, LAYERS):
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    raise UserError(f"cannot slice the channels of a {type(module).__name__}")


@dataclass
class Cut:
    """What `cut` removed: per (module, parameter name), the dropped indices per dimension, and
    per Conv2d/Linear (by name) how many output channels it lost."""

    dropped: dict[tuple[nn.Module, str], dict[int, set[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    removed_channels: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def kept(self, module: nn.Module, name: str, shape: torch.Size, device) -> dict[int, torch.Tensor]:
        """Per sliced dimension, the indices that stay."""
        return {
            dim: torch.tensor(sorted(set(range(shape[dim])) - gone), dtype=torch.long, device=device)
            for dim, gone in self.dropped.get((module, name), {}).items()
        }

    def apply(self, module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, shaped like the parameter `name` of `module` was before the cut, sliced as it was."""
        for dim, keep in self.kept(module, name, tensor.shape, tensor.device).items():
            tensor = tensor.index_select(dim, keep)
        return tensor.contiguous()


def cut(
    model: nn.Module, graph: tp.DependencyGraph, removals: Iterable[tuple[nn.Module, object, list[int]]]
) -> Cut:
    """Remove, in place, the output channels `idxs` of each (layer, Torch-Pruning handler, idxs)
    of `removals`, with everything Torch-Pruning couples to them; every plan refers to the
    unchanged model's indices (so: at most one removal per channel group).

    One group after another, each traced on the model as the cuts before it left it: a layer that
    reads a concatenation (DenseNet's) holds the channels of several groups, and where one group's
    channels sit in it moves once another's are gone. `Cut` records the indices as built."""
    names = {m: n for n, m in model.named_modules()}
    done = Cut()
    left: dict[tuple[nn.Module, str, int], list[int]] = {}  # the indices as built still there
    for layer, handler, idxs in removals:
        if not idxs:
            continue
        group = graph.get_pruning_group(layer, handler, idxs)
        gone: dict[tuple[nn.Module, str, int], set[int]] = defaultdict(set)  # indices as they are now
        for item in group:
            module = item.dep.target.module
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(module, nn.Module) and not any(True for _ in module.parameters(recurse=False)):
                continue  # adds, reshapes, pooling: nothing of their own to slice
            for param, dim in sliced_dims(module, is_out):
                if getattr(module, param, None) is not None:
                    gone[module, param, dim].update(int(i) for i in item.idxs)
            if isinstance(module, LAYERS) and is_out:
                done.removed_channels[names[module]] += len(item.idxs)
        for (module, param, dim), now in gone.items():
            here = left.setdefault((module, param, dim), list(range(getattr(module, param).shape[dim])))
            built = {here[i] for i in now}
            done.dropped[module, param][dim] |= built
            left[module, param, dim] = [i for i in here if i not in built]
        with torch.no_grad():
            group.prune()
    done.removed_channels = dict(sorted(done.removed_channels.items()))
    return done


def live_out_channels(model: nn.Module, layers: Iterable[str]) -> dict[str, int]:
    """The output channels each named layer has now."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.shape[0] for name in layers}


def cut_to_live(model: nn.Module, example_inputs: torch.Tensor, live: dict[str, list[int]]) -> Cut:
    """Rebuild a shrunk architecture: keep only the output channels `live[layer]` (the original
    indices) of each named Conv2d/Linear, and what is coupled to them; `model` as built, full width."""
    modules = dict(model.named_modules())
    removals = []
    for name, keep in live.items():
        layer = modules.get(name)
        if not isinstance(layer, LAYERS) or not set(keep) <= set(range(layer.weight.shape[0])) or not keep:
            raise UserError(f"the recorded live channels of '{name}' do not fit this model")
        gone = sorted(set(range(layer.weight.shape[0])) - set(keep))
        removals.append((layer, out_channel_handler(layer), gone))
    if not any(gone for _, _, gone in removals):
        return Cut()
    return cut(model, dependency_graph(model, example_inputs, "shrinking"), removals)
