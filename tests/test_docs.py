"""The README and docs/ stay true to the tree and the CLI: every relative link and anchor resolves,
every command a README shell block shows is one the CLI still accepts (its `--help` parses, its
options exist) and every repository file such a block names exists, and every pipeline key the
docs name is a key of dsrpipe/config.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from dsrpipe.cli import app
from dsrpipe.config import METHOD_OPTIONS, Pipeline

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
REPO_DIRS = ("pipelines/", "bench/", "docs/", "tests/", "dsrpipe/", ".ci/")  # paths that must exist

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def fenced_blocks(text: str, languages: set[str]) -> list[str]:
    """The bodies of the fenced code blocks whose info string is one of `languages`."""
    blocks, body, language = [], None, None
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and body is None:
            language, body = line.strip()[3:].strip().lower(), []
        elif match:
            if language in languages:
                blocks.append("\n".join(body))
            body = None
        elif body is not None:
            body.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped but for - and _, spaces to -."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose_lines(page.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    targets = []
    for line in prose_lines(page.read_text()):
        targets += LINK.findall(CODE_SPAN.sub("", line))
    return targets


def test_the_docs_exist_and_the_readme_fits_its_job():
    names = {p.name for p in DOCS}
    for page in ("README.md", "pipelines.md", "methods.md", "deploying.md", "watch.md", "distributed.md"):
        assert page in names
    for page in ("gpu.md", "api.md", "benchmarks.md", "reproducing.md", "reproducibility.md"):
        assert page in names
    assert len(README.read_text().splitlines()) <= 260


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {rel(file)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def shell_commands(text: str) -> list[list[str]]:
    """Each simple command of the bash blocks, as argv: continuation lines joined, comments cut,
    chains (&&, ||, ;, |) split."""
    commands = []
    for block in fenced_blocks(text, {"bash", "sh", "shell", "console"}):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                raise AssertionError(f"cannot parse the shell line {line!r}: {exc}") from None
            command = []
            for word in words:
                if word in {"&&", "||", ";", "|"}:
                    commands.append(command)
                    command = []
                else:
                    command.append(word)
            commands.append(command)
    return [c for c in commands if c]


def check_dsrpipe_command(argv: list[str]) -> list[str]:
    """What is wrong with `dsrpipe ARGV...` for the CLI: its subcommand's --help must parse, and
    every option it gives must be one that subcommand takes."""
    command = typer.main.get_command(app)
    words = []
    rest = list(argv)
    while rest and hasattr(command, "commands") and not rest[0].startswith("-"):
        words.append(rest.pop(0))
        command = command.commands.get(words[-1])
        if command is None:
            break
    problems = []
    result = CliRunner().invoke(app, [*words, "--help"])
    if result.exit_code != 0:
        problems.append(
            f"`dsrpipe {' '.join(words)} --help` exits {result.exit_code}: {result.output[-300:]}"
        )
        return problems
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}
    for word in rest:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option not in options:
            problems.append(f"`dsrpipe {' '.join(words)}` has no option {option}")
    return problems


def dsrpipe_argv(argv: list[str]) -> list[str] | None:
    """The arguments given to dsrpipe by a command line (`dsrpipe ...`, `torchrun ... -m dsrpipe
    ...`), or None."""
    if argv[0] == "dsrpipe":
        return argv[1:]
    for i, word in enumerate(argv[:-1]):
        if word == "-m" and argv[i + 1] == "dsrpipe":
            return argv[i + 2 :]
    return None


def command_problems(argv: list[str]) -> list[str]:
    args = dsrpipe_argv(argv)
    problems = check_dsrpipe_command(args) if args is not None else []
    return problems + [f"{path} does not exist" for path in repo_paths(argv) if not (ROOT / path).exists()]


def repo_paths(argv: list[str]) -> list[str]:
    """The arguments that name files of the repository (a pipeline, a grid, a bench script)."""
    named = []
    for word in argv:
        value = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
        if " " in value:  # a script's text (python -c, bash -c), not a path
            continue
        if value.startswith(REPO_DIRS) or (
            value.endswith((".yaml", ".yml")) and not value.startswith(("/", "export/", "~"))
        ):
            named.append(value)
    return named


README_COMMANDS = shell_commands(README.read_text())


def test_the_readme_shows_the_commands_of_the_tour():
    shown = {" ".join(c[:2]) for c in README_COMMANDS if c[0] == "dsrpipe"}
    assert {"dsrpipe run", "dsrpipe predict", "dsrpipe watch", "dsrpipe compare"} <= shown


@pytest.mark.parametrize("argv", README_COMMANDS, ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_command_is_accepted_and_names_existing_files(argv):
    problems = command_problems(argv)
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("page", DOCS, ids=rel)
def test_every_dsrpipe_command_in_the_docs_is_accepted(page):
    problems = [p for argv in shell_commands(page.read_text()) for p in command_problems(argv)]
    assert not problems, f"{rel(page)}: " + "; ".join(problems)


def test_the_documented_pipeline_keys_are_the_config_keys():
    """docs/pipelines.md's pipeline with its defaults names only keys of dsrpipe/config.py."""
    (block,) = [b for b in fenced_blocks((ROOT / "docs" / "pipelines.md").read_text(), {"yaml"})]
    shown = yaml.safe_load(block)
    fields = {
        "data": "data",
        "model": "model",
        "train": "train",
        "finetune": "finetune",
        "export": "export",
        "validate": "validation",
        "log": "log",
        "distributed": "distributed",
    }
    for key, value in shown.items():
        assert key in Pipeline.model_fields or key in fields, key
        if key == "sparsity":
            options = METHOD_OPTIONS[value["method"]].model_fields
            assert set(value) <= set(options), set(value) - set(options)
        elif key in fields:
            section = Pipeline.model_fields[fields[key]].annotation
            unknown = set(value) - set(section.model_fields) - {"..."}
            assert not unknown, f"{key}: {unknown}"
    assert set(fields) - {"log", "distributed"} <= set(shown)


def test_every_method_key_in_the_docs_belongs_to_the_methods_it_names():
    """docs/methods.md's table of keys: each key exists for every method its row names."""
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text[text.index("## Every method's keys") :].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    every = {k for options in METHOD_OPTIONS.values() for k in options.model_fields}
    for row in rows:
        keys_cell, methods_cell = row.split("|")[1:3]
        keys = re.findall(r"`([a-z_]+)`", keys_cell)
        methods = re.findall(
            r"(?<![\w-])(dsr|static|thin-dense|set|deepr|rigl|prune-channels|prune|gmp|frozen|dense)(?![\w-])",
            methods_cell,
        )
        if methods_cell.strip() == "all":
            methods = list(METHOD_OPTIONS)
        elif methods_cell.strip().startswith("all but"):
            methods = [m for m in METHOD_OPTIONS if m not in methods]
        else:
            methods = [m for m in methods if "(" not in methods_cell.split(m)[0]]  # not the (asides)
        assert keys and methods, row
        for key in keys:
            assert key in every, f"{key}: no method's key"
            for method in methods:
                assert key in METHOD_OPTIONS[method].model_fields, f"{method} does not take {key}"


def test_a_hung_test_fails_in_minutes(pytestconfig):
    """pytest-timeout bounds every test (pyproject.toml): a mutant that disables a bound (the
    tracing's, a connection's) fails its test instead of hanging CI until its own limit."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 0 < float(pytestconfig.getini("timeout")) <= 900
