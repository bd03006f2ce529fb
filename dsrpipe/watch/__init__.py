"""`dsrpipe watch`: a daemon that runs every pipeline or dataset dropped into a folder, exactly
once; `dsrpipe status`: what it did.

    <drop>/exp1.yaml            a pipeline: run as it is                      → <out>/exp1/
    <drop>/flowers/             a dataset (train/ + test/ or val/ class folders), or
    <drop>/flowers.tar.gz       an archive of one (.tar.gz .tgz .tar .zip): run the template
                                pipeline on it as `imagefolder`              → <out>/flowers/
    <drop>/template.yaml        the template for dataset drops (else --template, else built in)
    <drop>/<job>.error.txt      written when a job fails: the cause, then the log's tail
    <drop>/.dsrpipe/            state: journal.sqlite, lock, jobs/<job>/ (job.json, job.log, ...)

One module per role, each a small class with its own part of the loop:
    readiness   watchdog events and the quiet period: which entries are ready to be taken
    intake      a ready entry → a queued job, a skipped repeat or a failed drop (drops: hashing, names)
    runner      jobs handed to the executor (dsrpipe.executors: forked here, or on Ray or Slurm),
                how each ended, restarts
    daemon      the folder's lock and the loop; status: `dsrpipe status`
    folder      what they share: paths, the journal, the event log, error files, locks
The job process itself is dsrpipe.jobs, which the daemon names and never imports: the daemon
never loads torch (an import-linter contract, pyproject.toml).
Drops are untrusted: nothing in one is executed, every path a pipeline names stays inside the
drop and output folders, names are bytes, and no drop can stop the daemon.
"""

from .daemon import watch
from .options import WatchOptions
from .status import status_report

__all__ = ["WatchOptions", "status_report", "watch"]
