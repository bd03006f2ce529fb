"""The watch daemon's jobs, the process side of dsrpipe.watch: `python -m dsrpipe.jobs JOB_DIR`
runs one dropped pipeline or dataset (job.py), wherever its executor runs it; warmup.py is what
the daemon's fork server runs once, so that each local job starts warm.

The daemon names this package (dsrpipe.watch.runner.JOB_MODULE) and never imports it: these
modules import torch, which the daemon never loads (an import-linter contract, pyproject.toml).
"""
