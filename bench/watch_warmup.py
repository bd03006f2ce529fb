"""Benchmark: a watch job's duration with the fork server's warm-up (dsrpipe/jobs/warmup.py)
against the same daemon without it, side by side: the two daemons alternate, each on its own
copy of the same digits drops, so machine noise hits both alike. Reports the jobs' median
durations (from the journal) and the wall time of each daemon, server start included.

    python bench/watch_warmup.py [--drops 4] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dsrpipe.watch.journal import Journal

DAEMON = """
import sys
from dsrpipe.watch import runner
if sys.argv.pop(1) == "cold":
    runner.PRELOAD.remove("dsrpipe.jobs.warmup")
from dsrpipe.__main__ import main
sys.exit(main())
"""


def drop_folder(root: Path, drops: int) -> Path:
    drop = root / "drop"
    drop.mkdir(parents=True)
    for seed in range(drops):
        raw = {
            "seed": seed,
            "data": {"dataset": "digits"},
            "model": {"name": "small-cnn", "options": {"width": 4}},
            "train": {"epochs": 1, "batch_size": 64},
            "finetune": {"epochs": 0},
            "validate": {"latency_runs": 1},
        }
        (drop / f"j{seed}.yaml").write_text(yaml.safe_dump(raw))
    return drop


def run_daemon(kind: str, root: Path, drops: int) -> dict:
    drop = drop_folder(root, drops)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", DAEMON, kind, "watch", str(drop), "--out", str(root / "out"), "--once"],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.perf_counter() - started
    journal = Journal(drop / ".dsrpipe" / "journal.sqlite", readonly=True)
    try:
        jobs = journal.jobs()
    finally:
        journal.close()
    assert all(j["state"] == "done" for j in jobs), jobs
    return {"wall_s": wall, "job_s": [j["finished"] - j["started"] for j in jobs]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drops", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {k: {"wall_s": [], "job_s": []} for k in ("cold", "warm")}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for kind in ("cold", "warm") if round_ % 2 == 0 else ("warm", "cold"):
                got = run_daemon(kind, Path(tmp) / f"{kind}{round_}", args.drops)
                results[kind]["wall_s"].append(got["wall_s"])
                results[kind]["job_s"] += got["job_s"]
    summary = {
        kind: {"median_job_s": statistics.median(r["job_s"]), "median_wall_s": statistics.median(r["wall_s"])}
        for kind, r in results.items()
    }
    summary["job_ratio_warm_over_cold"] = summary["warm"]["median_job_s"] / summary["cold"]["median_job_s"]
    summary["wall_ratio_warm_over_cold"] = summary["warm"]["median_wall_s"] / summary["cold"]["median_wall_s"]
    summary["drops_per_daemon"] = args.drops
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
