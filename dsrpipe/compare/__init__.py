"""`dsrpipe compare GRID.yaml`: one pipeline per method × sparsity × seed, and a table of the results.

The grid file:

    name: digits-grid              # optional; defaults to the grid file's name
    base: pipelines/quickstart.yaml   # a pipeline file (relative to this file), or the settings inline
    methods: [dsr, static, prune, dense]   # dense runs once per seed, whatever the sparsities
    sparsities: [0.9, 0.95]
    seeds: [0, 1, 2]
    overrides:                     # optional, per method: dotted settings, as with `--set`
      static: {train.lr: 0.05}     # a section given as a mapping is merged into the base's
    variants:                      # optional: rows of a method under a name of their own, listed
      dsr-fast:                    #   in methods: like a method; settings as overrides; sparsities
        method: dsr                #   (optional) replace the grid's for that row
        sparsities: [0.8]
        settings: {sparsity.remove_channels: {latency: 0.5, dense_inside: true}}

Outputs, under `<out>/<grid>/`:
  runs/<grid>-<method>-s<sparsity>-seed<k>/   each run, as `dsrpipe run` lays it out (report.json, ...)
  pipelines/<run>.yaml                        the pipeline each run was given
  logs/<run>.log                              what each run printed
  results.csv, results.md, accuracy_vs_params.png

Each run is its own `dsrpipe run` process, so a crash stays in its row. A complete run (every
stage current with its settings) is not started again; an interrupted one resumes. `prune`
runs start from the dense run of their seed (trained first, added when the grid lacks it) and
`frozen` runs from the DSR run of their sparsity and seed.

One module per concern: grid.py (the grid file and the runs it names), schedule.py (planning
the runs and running them on an executor), results.py (the CSV, the markdown table, the plot).
"""

from .grid import Grid, Run, load_grid, run_name
from .results import CSV_COLUMNS, group_results, total_epochs, write_results
from .schedule import plan_runs, run_grid

__all__ = [
    "CSV_COLUMNS",
    "Grid",
    "Run",
    "group_results",
    "load_grid",
    "plan_runs",
    "run_grid",
    "run_name",
    "total_epochs",
    "write_results",
]
