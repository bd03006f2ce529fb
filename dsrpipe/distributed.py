"""Training over several processes, as `torchrun` launches them: torch.distributed and
DistributedDataParallel, nothing home-made.

torchrun gives every process RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous (env://). One
process per GPU on CUDA (NCCL), or any number of CPU processes (Gloo). Without those variables
everything here is a no-op and dsrpipe runs as one process, exactly as before.

What this module owns:
  - the process group (`process_group`): set up with a timeout, so a peer that stops answering
    fails the run instead of hanging it, and torn down at the end of the command;
  - who does what: rank 0 owns the run folder (its lock, checkpoints, metrics, reports);
  - the cross-rank checks: after every reallocation each rank's masks are compared through a
    checksum all-reduce (MIN and MAX must agree), so a divergence stops the run naming the tensor;
  - the stores that keep the listening sockets of a job that dsrpipe launches on loopback
    (`loopback_store`, LOOPBACK_ENV; dsrpipe.torchrun launches such a job).

For tests only (documented in docs/distributed.md): DSRPIPE_TEST_FAULT=exit:<rank>:<epoch> makes that
rank die (os._exit) halfway through that epoch (1-based) of the first attempt, as a killed node
would; DSRPIPE_TEST_FAULT=desync:<rank> flips one mask entry on that rank at the first
reallocation. DSRPIPE_MASK_CHECKSUMS=<prefix> makes each rank append its mask checksums to
<prefix>.rank<k>.jsonl after every reallocation.
"""

from __future__ import annotations

import datetime
import gc
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import UserError

DEFAULT_TIMEOUT_S = 1800  # a collective that waits longer than this on a peer fails the run
FAULT_ENV, CHECKSUMS_ENV = "DSRPIPE_TEST_FAULT", "DSRPIPE_MASK_CHECKSUMS"


@dataclass(frozen=True)
class Layout:
    """Where this process stands: its rank among `world_size` processes, and on its node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run's outputs."""
        return self.rank == 0


def layout() -> Layout:
    """This process's place, from torchrun's variables (one process if there are none)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Layout(rank, local, world)


def restarted() -> bool:
    """Whether torchrun restarted this job after a failure (--max-restarts): training then
    resumes from the last epoch checkpoint instead of starting over."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")


def job_id() -> str | None:
    """torchrun's id of this job, the same across its restarts (None outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def is_main() -> bool:
    return layout().main


@contextmanager
def process_group(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Layout]:
    """Join the job's process group for the block (NCCL on CUDA, Gloo on CPU) when torchrun
    started several processes; on CUDA each process takes the GPU LOCAL_RANK names."""
    where = layout()
    if not where.distributed or dist.is_initialized():
        yield where
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"device: '{device}' requested but CUDA is not available here")
        if where.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {where.local_rank} but this node has {torch.cuda.device_count()} "
                "GPUs: start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(where.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = _job_store(where, timeout)
    # torchrun's store outlives a restart: without a prefix of its own, a restarted rank may read
    # the address a dead rank of the previous attempt published, and fail to connect to it.
    store = dist.PrefixStore(f"dsrpipe/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        yield where
    finally:
        # DDP's reducer holds the group in reference cycles: collected now, while the group is
        # torn down in order, not in interpreter finalization, where Gloo's threads destroyed
        # unjoined abort the rank ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def _job_store(where: Layout, timeout: datetime.timedelta):
    """The store the process group starts from: torchrun's (env://), except when the job's
    MASTER_ADDR is a loopback address and no agent store serves it (a job `Launch` started):
    rank 0 then hosts it bound to that address alone, where torch would bind every interface."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        or not is_loopback(addr)
        or not port.isdigit()
    ):
        return next(dist.rendezvous("env://", timeout=timeout))
    if where.rank == 0:
        store = loopback_store(addr, int(port), where.world_size, timeout.total_seconds())
    else:
        store = dist.TCPStore(addr.strip("[]"), int(port), where.world_size, is_master=False, timeout=timeout)
    return store, where.rank, where.world_size


def active() -> bool:
    """Whether this process trains together with others."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def device_for(device: torch.device) -> torch.device:
    """The device this rank trains on: on CUDA, the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def owner(run_dir) -> AbstractContextManager[None]:
    """The run folder's lock, held by rank 0 alone: the other ranks of the same job work on the
    run with it and would otherwise refuse themselves as a second owner."""
    return run_dir.lock() if is_main() else nullcontext()


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def node_leader_first() -> Iterator[None]:
    """Local rank 0 of each node runs the block first (unpacking, decoding and caching a
    dataset), its peers once it is done: they find the cache instead of all decoding at once."""
    leader = layout().local_rank == 0
    if not leader:
        barrier()
    yield
    if leader:
        barrier()


def all_sum(*values: torch.Tensor | int | float) -> list[torch.Tensor]:
    """Each value summed over the ranks (float64 on the values' device), in one all-reduce."""
    tensors = [torch.as_tensor(v).to(torch.float64) for v in values]
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    packed = torch.stack([t.to(device) for t in tensors])
    if active():
        dist.all_reduce(packed)
    return list(packed)


def agree(what: str, value) -> None:
    """UserError on every rank unless every rank holds the same `value` (small, picklable):
    each rank reads the run folder itself, so they must all see the same files."""
    if not active():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise UserError(
                f"rank {rank} sees {what} {other!r}, rank 0 sees {values[0]!r}: the output "
                "folder must be one folder that every node shares"
            )


def mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """One int64 per mask: the sum of (position mod a prime + 1) over its active positions.
    Any single flipped entry, and almost any set of moves, changes it; computing it costs one
    pass over the masks."""
    sums = []
    for mask in masks.values():
        flat = mask.reshape(-1)
        weights = torch.arange(flat.numel(), device=flat.device) % 1_000_003 + 1
        sums.append((weights * flat).sum())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.long)


def check_masks(masks: dict[str, torch.Tensor], iteration: int) -> None:
    """After a reallocation: the masks must be identical on every rank. An all-reduce of the
    checksums with MIN and one with MAX: where they differ, some rank diverged; every rank then
    stops with the same one-line error naming the first such tensor."""
    if not active():
        return
    _inject_desync(masks)
    local = mask_checksums(masks)
    _record_checksums(masks, local, iteration)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    for name, lo, hi in zip(masks, low.tolist(), high.tolist()):
        if lo != hi:
            raise UserError(
                f"the ranks' masks diverged at iteration {iteration}: '{name}' differs between "
                f"ranks (checksums {lo} to {hi}); the run is stopped rather than train on "
                "inconsistent masks"
            )


def ddp_log_line(world_size: int, batch_size: int) -> str:
    return (
        f"DDP: {world_size} ranks × {batch_size} = global batch {world_size * batch_size}; "
        "scale lr linearly with the global batch"
    )


LOOPBACK = "127.0.0.1"
# torch's TCPStore binds the wildcard address (every interface) whatever host it is given, unless
# handed a socket already bound: torchrun's own stores (--standalone's rendezvous, the agent's
# shared store) are therefore replaced, for the jobs dsrpipe launches, by stores bound here.
LOOPBACK_ENV = {
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # no agent store: rank 0 hosts the job's (process_group)
    "GLOO_SOCKET_IFNAME": "lo",  # Gloo's and NCCL's own listeners: on loopback, not the host's address
    "NCCL_SOCKET_IFNAME": "lo",
}


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_store(
    host: str = LOOPBACK, port: int = 0, world_size: int | None = None, timeout_s: float = 300
):
    """A TCPStore server that listens on `host` alone (a loopback address): its socket is bound
    here and handed over, so the store cannot widen it to every interface."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    try:
        store = dist.TCPStore(
            host.strip("[]"),
            sock.getsockname()[1],
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            multi_tenant=True,
            master_listen_fd=sock.fileno(),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now, and closes it
    return store


# -- fault injection, for the tests of failure handling (see the module docstring) --------------


def fault_exit_step(epoch: int, steps: int) -> int | None:
    """The step (0-based) of `epoch` (1-based) at which this rank must die, if the test asks."""
    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    if kind != "exit" or restarted():
        return None
    rank, _, at_epoch = rest.partition(":")
    return steps // 2 if rank == str(layout().rank) and at_epoch == str(epoch) else None


def die() -> None:
    sys.stderr.flush()
    os._exit(1)


_desynced = False


def _inject_desync(masks: dict[str, torch.Tensor]) -> None:
    global _desynced
    kind, _, rank = os.environ.get(FAULT_ENV, "").partition(":")
    if kind == "desync" and rank == str(layout().rank) and not _desynced and masks:
        mask = next(iter(masks.values())).view(-1)
        mask[0] = ~mask[0]
        _desynced = True


def _record_checksums(masks: dict[str, torch.Tensor], checksums: torch.Tensor, iteration: int) -> None:
    prefix = os.environ.get(CHECKSUMS_ENV)
    if prefix:
        line = {"iteration": iteration, "checksums": dict(zip(masks, checksums.tolist()))}
        with open(Path(f"{prefix}.rank{layout().rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
