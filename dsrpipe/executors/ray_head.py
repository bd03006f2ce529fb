"""The local Ray that dsrpipe starts (`--executor ray` without `--address`): a Ray head in a
process of its own, leader of a process group of its own, that lives exactly as long as the
dsrpipe process that started it. dsrpipe joins it as it joins any cluster on loopback.

Why a process and a group of its own:
- Every process of that Ray, whoever started it (the head's GCS and raylet, the raylet's agents
  and workers, the jobs the workers run), is in the group; stopping them all is one loop over
  it. Ray's own fate-sharing does not reach the agents: after a `kill -9` of the process that
  ran `ray.init`, they outlived their raylet by a minute or two.
- The head reads its stdin, a pipe from dsrpipe, until it closes: when dsrpipe is done with it,
  or dies however it dies (`kill -9` included), the head stops the group and removes the folder.
- Ray's start-up, which takes seconds, runs here: dsrpipe's own signal handling is untouched
  meanwhile (ray.init installs handlers of its own), and a terminal's Ctrl-C, sent to the
  terminal's process group, reaches dsrpipe only, which stops its jobs in order.

    python -m dsrpipe.executors.ray_head CPUS GPUS FOLDER

CPUS and GPUS: a number, or `-` for Ray's default. FOLDER: a folder of this user's that no one
else may enter (made by dsrpipe, 0700), which the head owns: Ray's session folder goes into
FOLDER/ray (Ray makes its folders 0777: the private parent keeps them to this user) and is
removed with FOLDER at the end. The GCS address is printed on stdout, one line, once Ray is up.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import traceback

from .processes import group_members

# Before ray is imported (it reads them then): without the first, Ray takes 127.0.0.1 for "this
# host" and resolves it to the host's own address, where it then listens.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Seconds the group gets to stop on SIGTERM (a job cleans up) before SIGKILL; Ray's own daemons
# take longer than that to stop gracefully, and nothing of theirs is kept.
STOP_GRACE = 2.0


def main(cpus: int | None, gpus: int | None, folder: str) -> int:
    # Before ray is imported: it reads these then; every process of this Ray inherits them.
    os.environ.update(LOCAL_ENV)
    os.environ.pop("RAY_ADDRESS", None)  # else ray.init joins that cluster instead of starting one
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the dsrpipe process answers Ctrl-C
    # From the start, Ray's start-up included: dsrpipe gone, this process stops.
    threading.Thread(target=_until_closed, args=(threading.main_thread().ident,), daemon=True).start()
    try:
        import ray

        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=False,
            _temp_dir=os.path.join(folder, "ray"),
            log_to_driver=False,
            configure_logging=False,
        )
        signal.signal(signal.SIGTERM, _exit)  # ray.init put its own handlers (a C++ one aborts)
        print(ray.get_runtime_context().gcs_address, flush=True)
        os.dup2(2, 1)  # nothing more for dsrpipe to read: what Ray prints goes to the log
        while True:
            signal.pause()
    finally:
        stop_group()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _exit(signum, frame) -> None:
    sys.exit(128 + signum)


def _until_closed(main_thread: int) -> None:
    """Read stdin, a pipe from dsrpipe, until it closes (dsrpipe is done with this Ray, or died
    however it died); then stop: SIGTERM to the main thread, which may be inside ray.init."""
    while os.read(0, 4096):
        pass
    signal.pthread_kill(main_thread, signal.SIGTERM)


def stop_group() -> None:
    """Every other process of this process group: SIGTERM, then SIGKILL after STOP_GRACE."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second request must not cut the stop short
    me, group = os.getpid(), os.getpgrp()
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        for pid in group_members(group):
            if pid != me:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap()
            if group_members(group) == [me]:
                return
            time.sleep(0.05)


def _reap() -> None:
    """Collect this process's children that have exited (else they stay, as zombies)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


if __name__ == "__main__":
    cpus, gpus, folder = sys.argv[1:4]
    try:
        code = main(None if cpus == "-" else int(cpus), None if gpus == "-" else int(gpus), folder)
    except SystemExit as stop:  # SIGTERM (ours, or Ray's handler)
        code = stop.code
    except BaseException:  # Ray did not start: why, for dsrpipe to say
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    # Not sys.exit: Ray's exit hook would try to say goodbye to the GCS stopped above, at length.
    os._exit(code)
