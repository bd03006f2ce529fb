"""The import contracts (pyproject.toml's [tool.importlinter]) catch what they are written for: a
violation planted in a copy of the package fails `lint-imports`, naming the contract it breaks,
where the same copy without it passes."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib
import typer

from dsrpipe.cli import COMMANDS, app
from dsrpipe.cli.common import SUMMARIES

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
PREDICT_MAY_USE = {"onnxruntime", "numpy", "pillow"}  # distributions: what predict runs with


def lint(tmp_path: Path, contract: str, plant: dict[str, str]) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package with each `plant` line appended to its module (a
    module that does not exist is made)."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "dsrpipe", copy / "dsrpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    for module, line in plant.items():
        path = copy / "dsrpipe" / module
        path.write_text((path.read_text() if path.exists() else "") + f"\n{line}\n")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "--contract", contract],
        cwd=copy,
        env={**os.environ, "PYTHONPATH": str(copy)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "contract, plant",
    [
        ("tiers", {"names.py": "from . import rundir"}),  # the foundation reaching up
        ("tiers", {"pipeline.py": "from .executors import base"}),  # the pipeline reaching a service
        ("services", {"watch/status.py": "from .. import compare"}),
        ("acyclic", {"executors/base.py": "from . import forkserver"}),  # forkserver imports base
        ("watch-without-torch", {"watch/status.py": "import torch"}),
        # indirectly: through a module the daemon may import, which imports torch
        ("watch-without-torch", {"runfolder.py": "from . import checkpoint"}),
        ("watch-without-torch", {"executors/ray_probe.py": "import torch"}),  # run by name, never imported
        # the CLI's root importing a command's module at its top: every command would load torch
        ("commands-without-torch", {"cli/__init__.py": "from . import stages"}),
        ("commands-without-torch", {"cli/watch.py": "from .. import checkpoint"}),
        # a module added tomorrow is covered without editing the contract
        ("predict-alone", {"tomorrow.py": "X = 1", "deploy/predict.py": "from .. import tomorrow"}),
        ("predict-alone", {"contract.py": "from . import files"}),  # through a module predict may use
        ("predict-alone", {"deploy/predict.py": "import sklearn"}),
    ],
)
def test_a_planted_violation_fails_its_contract(tmp_path, contract, plant):
    clean = lint(tmp_path / "clean", contract, {})
    assert clean.returncode == 0, clean.stdout + clean.stderr
    broken = lint(tmp_path / "planted", contract, plant)
    assert broken.returncode != 0 and re.search(r"BROKEN", broken.stdout), broken.stdout + broken.stderr


def test_predict_is_forbidden_every_dependency_but_the_three_it_runs_with():
    """Every third-party package that dsrpipe imports, but onnxruntime, numpy and Pillow, is in
    predict's forbidden list: a new dependency is not silently allowed there."""
    [contract] = [c for c in CONTRACTS if c["id"] == "predict-alone"]
    graph = grimp.build_graph("dsrpipe", include_external_packages=True, cache_dir=None)
    distributions = importlib.metadata.packages_distributions()
    third_party = {
        module
        for module in graph.modules
        if "." not in module and module != "dsrpipe" and module in distributions  # not the standard library
    }
    allowed = {m for m in third_party if {d.lower() for d in distributions[m]} & PREDICT_MAY_USE}
    assert {"onnxruntime", "numpy", "PIL", "torch"} <= third_party
    assert third_party - allowed <= set(contract["forbidden_modules"])


def test_the_command_listing_imports_no_command_and_says_what_each_says():
    """`dsrpipe --help` lists the commands without importing their modules (torch, seconds), from
    common.SUMMARIES, where every command takes its own help from: neither drifts."""
    code = (
        "import sys\nfrom dsrpipe.cli import COMMANDS, app\ntry:\n    app(['--help'], prog_name='dsrpipe')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(({f'dsrpipe.cli.{m}' for m in COMMANDS.values()} | {'torch'}) & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    commands = typer.main.get_group(app).commands
    assert set(SUMMARIES) == set(COMMANDS)
    for name, line in SUMMARIES.items():
        assert commands[name].help.splitlines()[0] == line, name
