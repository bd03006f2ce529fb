"""Whether an address answers as a Ray cluster that this machine can join, asked in a process of
its own that dsrpipe kills once its time is up (dsrpipe.executors.ray_cluster.probe).

Why a process: Ray's client waits for an address that does not answer as Ray, or answers
wrongly, in C++ and at length (ray.init retries a 40 s wait 20 times); it crashes the process
when token authentication is on and no token is found; and it prints what it retries on stderr.
Here none of that can reach dsrpipe: it reads one line of JSON, or nothing before its deadline.

    python -m dsrpipe.executors.ray_probe HOST:PORT SECONDS

prints {"nodes": N, "local": true|false|null} (null: not known), or {"error": "token"|"ray",
"message": ...}.
"""

from __future__ import annotations

import json
import os
import sys


def main(address: str, seconds: int) -> dict:
    # Before ray is imported: Ray reads its settings from the environment then.
    for name in ("RAY_gcs_rpc_server_connect_timeout_s", "RAY_py_gcs_connect_timeout_s"):
        os.environ[name] = str(seconds)
    import ray.exceptions
    from ray._raylet import GcsClient

    try:
        client = GcsClient(address=address)
        nodes = client.get_all_node_info(timeout=seconds)
    except ray.exceptions.AuthenticationError as exc:
        return {"error": "token", "message": str(exc)}
    except Exception as exc:
        return {"error": "ray", "message": f"{type(exc).__name__}: {exc}"}
    return {"nodes": len(nodes), "local": _runs_here({node.hex() for node in nodes})}


def _runs_here(nodes: set[str]) -> bool | None:
    """Whether a raylet of the cluster runs on this machine: Ray joins a driver to the node it
    runs on, and waits a minute for one before it says there is none."""
    try:
        from ray._private.services import find_node_ids
    except ImportError:  # another Ray: ray.init will say it, after its wait
        return None
    return bool(nodes & set(find_node_ids()))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))), flush=True)
