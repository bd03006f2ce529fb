"""`python -m dsrpipe.torchrun NPROC ARGS...`: `python -m dsrpipe ARGS` as NPROC processes on this
machine under torchrun, every listener of the job on loopback. dsrpipe.executors.launch names
this module for a job of several processes (compare's `--nproc-per-job`, a watch job's); a
multi-node run is started by the user's own torchrun, with the addresses the user names.

This process is torchrun's agent (torch.distributed.run, in-process) and hosts the job's
rendezvous store too, bound to loopback before torchrun connects to it: torch's own store would
listen on every interface (see dsrpipe.distributed.LOOPBACK_ENV). The store lives as long as the
job. Each job gets its own store and rendezvous id: jobs running side by side never meet. Like
torchrun, it exits 1 whatever its ranks' codes, and passes SIGTERM and SIGINT on to them.
"""

import os
import sys
import uuid

from torch.distributed.run import main as torchrun

from .distributed import LOOPBACK, LOOPBACK_ENV, loopback_store


def launch(nproc: int, args: list[str]) -> None:
    os.environ.update(LOOPBACK_ENV)  # for the agent and, through it, the ranks
    store = loopback_store()  # serves the rendezvous for as long as this process lives
    torchrun(
        [
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={LOOPBACK}:{store.port}",
            f"--rdzv-id=dsrpipe-{uuid.uuid4().hex}",
            "--rdzv-conf=is_host=false",  # the store above is the host
            f"--local-addr={LOOPBACK}",  # what rank 0 publishes as MASTER_ADDR
            "-m",
            "dsrpipe",
            *args,
        ]
    )


if __name__ == "__main__":
    launch(int(sys.argv[1]), sys.argv[2:])
