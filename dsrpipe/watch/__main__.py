"""A job by hand: python -m dsrpipe.watch <drop>/.dsrpipe/jobs/<job>"""

import sys
from pathlib import Path

from .job import job_main

sys.exit(job_main(Path(sys.argv[1])))
