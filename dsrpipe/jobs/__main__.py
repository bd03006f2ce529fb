"""A watch job: python -m dsrpipe.jobs <drop>/.dsrpipe/jobs/<job> [settings as JSON], however its
executor starts it (forked from the daemon's warm server, or on a Ray or Slurm worker)."""

import sys

from .job import main

main(sys.argv[1:])
