"""A job by hand: python -m dsrpipe.watch <drop>/.dsrpipe/jobs/<job> [settings as JSON]
(how the Ray and Slurm executors run a watch job on their workers)."""

import json
import sys
from pathlib import Path

from .job import job_main

sys.exit(job_main(Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else None))
