"""What the suite shares across modules: the model matrix sample (tests/test_tracing.py), started
in the background as soon as it is collected, so that its exports run while the rest of the
suite does; and one local `dsrpipe compare` of a small grid (test_reports, test_cluster)."""

import subprocess
import sys

import pytest

from . import test_reports, test_tracing


def pytest_collection_finish(session):
    names = {
        item.callspec.params["name"]
        for item in session.items
        if getattr(item, "originalname", None)
        == "test_models_take_removal_and_export_or_are_refused_at_check"
    }
    if names:  # only the models this session runs (the quick tier leaves the larger to the slow one)
        test_tracing.start_matrix(names)


@pytest.fixture(scope="session")
def local_grid(tmp_path_factory):
    """test_reports' grid (dsr and static, two seeds) run once by a local `dsrpipe compare --jobs 2`,
    as a user runs it: (grid, --out, the finished process). Read it, never change it (copy first):
    the same grid on Ray must give its rows."""
    tmp = tmp_path_factory.mktemp("local-grid")
    grid, out = test_reports.write_grid(tmp), tmp / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dsrpipe", "compare", str(grid), "--out", str(out), "--jobs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return grid, out, result
