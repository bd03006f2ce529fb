"""Each method owns its options: validated per method from YAML and --set, handed to the library
as its own keywords; `dsrpipe compare` gives every run the options its method takes and wires
the runs that start from another (prune ← dense, frozen ← dsr)."""

import csv
import pkgutil
import re
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dsrpipe import compare as compare_module
from dsrpipe.cli import app
from dsrpipe.config import METHOD_OPTIONS, load_pipeline, parse_pipeline, register_method, switch_method
from dsrpipe.config import methods as config_methods
from dsrpipe.config.methods import FromScratchOptions
from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.rundir import settings_fingerprint
from dsrpipe.sparse import DSR, RewireSchedule, Sparsifier, method_options
from dsrpipe.sparsifiers import build_sparsifier, sparsifier_options

from .helpers import image_tree, write_tree
from .test_pipeline import tiny, write_pipeline


@pytest.mark.parametrize(
    "sparsity,override,expected",
    [
        (
            {"method": "static", "prune_target": 5},
            [],
            "method 'static' takes no option 'prune_target' (an option of dsr, set",
        ),
        ({"method": "dsr"}, ["sparsity.zeta=0.2"], "takes no option 'zeta' (an option of set"),
        ({"method": "dsr", "prune_targte": 5}, [], "'prune_targte' (no method's option"),
        ({"method": "set", "zeta": 0.2, "prune_fraction": 0.1}, [], "zeta or N_p"),
        ({"method": "dsr", "prune_target": 100, "prune_fraction": 0.1}, [], "not both"),
        ({"method": "frozen", "masks_from": "x.pt", "init": "random"}, [], "sparsity.init"),
    ],
)
def test_unknown_or_conflicting_method_options_are_one_line_errors(tmp_path, sparsity, override, expected):
    raw = tiny()
    raw["sparsity"] = sparsity
    path = write_pipeline(tmp_path, raw)
    result = CliRunner().invoke(app, ["check", str(path), *[a for o in override for a in ("--set", o)]])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_yaml_keys_and_library_keywords_agree_for_every_method():
    """Every method's options class builds that method through the library's strict factory."""
    model = lambda: create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    for method, options in METHOD_OPTIONS.items():
        if method in ("frozen", "prune", "prune-channels"):  # need a finished run: covered elsewhere
            continue
        raw = {"name": "x", "sparsity": {"method": method, "sparsity": 0.0 if method == "dense" else 0.8}}
        if method == "set":  # the default N_p, 20,000, is more than this model's active weights
            raw["sparsity"]["prune_fraction"] = 0.14
        if method == "deepr":
            raw["train"] = {"weight_decay": 0.0}
        cfg = parse_pipeline(raw)
        assert type(cfg.sparsity) is options
        net = model()
        sparsifier = build_sparsifier(
            cfg.sparsity,
            net,
            torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
            seed=0,
            steps_per_epoch=10,
            epochs=3,
        )
        assert sparsifier.method == ("dense" if method == "thin-dense" else method)
        assert set(sparsifier_options(cfg.sparsity, steps_per_epoch=10, epochs=3)) <= set(
            method_options(options.sparsifier)
        )


def test_pipeline_options_reach_the_library_typed():
    cfg = parse_pipeline(
        tiny(
            sparsity={
                "method": "dsr",
                "prune_fraction": 0.14,
                "prune_target": None,
                "rewire_periods": {0: 5, 2: 10},
                "stop_rewire_epoch": 3,
                "distribution": "erk",
                "exclude": ["conv3"],
            }
        )
    )
    net = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=16)
    dsr = build_sparsifier(cfg.sparsity, net, None, seed=0, steps_per_epoch=22, epochs=4)
    assert isinstance(dsr, DSR) and list(dsr.masks) == ["conv2"]
    assert dsr.prune_target == round(0.14 * dsr.active_count())  # N_p as a fraction of the active weights
    assert dsr.schedule == RewireSchedule({0: 5, 2: 10}, 3, 22) and dsr.distribution == "erk"
    assert parse_pipeline(cfg.model_dump(mode="json", by_alias=True)) == cfg  # round trip
    with pytest.raises(UserError, match="either sparse_tensors"):
        parse_pipeline(tiny(sparsity={"sparse_tensors": ["conv2.weight"], "dense_first": False}))


def test_switching_a_section_to_another_method_keeps_only_its_options():
    section = {
        "method": "dsr",
        "sparsity": 0.9,
        "prune_target": 150,
        "init_threshold": 0.01,
        "rewire_periods": {0: 5},
        "exclude": ["x"],
        "typo": 1,
    }
    assert switch_method(section, "set") == {
        "method": "set",
        "sparsity": 0.9,
        "prune_target": 150,
        "rewire_periods": {0: 5},
        "exclude": ["x"],
        "typo": 1,
    }
    assert switch_method(section, "static") == {
        "method": "static",
        "sparsity": 0.9,
        "exclude": ["x"],
        "typo": 1,
    }


def grid(tmp_path, methods, sparsities=(0.9,), seeds=(0, 1), overrides=None):
    base = tiny(train={"epochs": 1}, finetune={"epochs": 0})
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "g",
                "base": base,
                "methods": methods,
                "sparsities": list(sparsities),
                "seeds": list(seeds),
                "overrides": overrides or {},
            }
        )
    )
    loaded, name, raw_base = compare_module.load_grid(path)
    return compare_module.plan_runs(loaded, name, raw_base, tmp_path / "runs")


def test_compare_prunes_the_dense_run_of_each_seed_and_adds_it_when_missing(tmp_path):
    runs = grid(tmp_path, ["prune", "dsr", "static"], sparsities=(0.9, 0.8))
    assert [r.method for r in runs] == ["dsr"] * 4 + ["static"] * 4 + ["dense"] * 2 + ["prune"] * 4
    for run in runs:
        section = run.raw["sparsity"]
        if run.method == "prune":
            dense = f"g-dense-s0-seed{run.seed}"
            assert run.depends_on == dense  # the same dense run for every sparsity
            assert section["prune_from"] == str(tmp_path / "runs" / dense / "train" / "final.pt")
            assert run.cfg.sparsity.prune_from == Path(section["prune_from"])
        else:
            assert run.depends_on is None
        if run.method in ("static", "dense", "prune"):
            assert "prune_target" not in section and "rewire_periods" not in section  # dsr's options
    assert [r.method for r in grid(tmp_path, ["dense", "prune"])] == ["dense"] * 2 + ["prune"] * 2


def test_variants_are_rows_of_a_method_with_their_own_settings_and_sparsities(tmp_path):
    """Two rows of thin-dense at widths of their own and a prune-channels row at a MAC target: run
    names and results go by the row, the settings and sparsities by the variant, and the
    prune-channels row starts from the dense run it added."""
    variants = {
        "thin-narrow": {"method": "thin-dense", "sparsities": [0.75, 0.5]},
        "prune-half": {"method": "prune-channels", "settings": {"sparsity.macs": 0.5}},
    }
    base = tiny(train={"epochs": 1}, finetune={"epochs": 0})
    path = tmp_path / "grid.yaml"
    raw = {"name": "g", "base": base, "methods": ["thin-narrow", "prune-half"], "sparsities": [0.9]}
    path.write_text(yaml.safe_dump({**raw, "variants": variants, "seeds": [0]}))
    runs = compare_module.plan_runs(*compare_module.load_grid(path), tmp_path / "runs")
    assert [(r.name, r.method, r.row) for r in runs] == [
        ("g-thin-narrow-s0.75-seed0", "thin-dense", "thin-narrow"),
        ("g-thin-narrow-s0.5-seed0", "thin-dense", "thin-narrow"),
        ("g-dense-s0-seed0", "dense", "dense"),
        ("g-prune-half-s0-seed0", "prune-channels", "prune-half"),
    ]
    assert runs[-1].depends_on == "g-dense-s0-seed0" and runs[-1].raw["sparsity"]["macs"] == 0.5
    assert [g["method"] for g in compare_module.group_results(runs)] == ["thin-narrow"] * 2 + [
        "dense",
        "prune-half",
    ]
    for bad, message in [
        ({"dsr": {"method": "dsr"}}, "variants: 'dsr' must be a safe folder name and no method's name"),
        ({"x": {"method": "magic"}}, "unknown method 'magic'"),
        ({"x": {"method": "dsr", "settings": {"seed": 3}}}, "variants.x.settings: 'seed' is set by the grid"),
    ]:
        path.write_text(yaml.safe_dump({**raw, "methods": ["dense"], "variants": bad}))
        with pytest.raises(UserError, match=re.escape(message)):
            compare_module.load_grid(path)


def test_compare_gives_deepr_its_own_overrides(tmp_path):
    with pytest.raises(UserError, match="weight_decay: 0"):
        grid(tmp_path, ["deepr"])
    runs = grid(
        tmp_path,
        ["deepr"],
        overrides={"deepr": {"train.weight_decay": 0.0, "sparsity.temperature": {0: 1e-5, 1: 1e-8}}},
    )
    assert runs[0].cfg.sparsity.temperature == {0: 1e-5, 1: 1e-8}


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "bench" / "grids").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_grids_give_every_method_valid_options(tmp_path, path):
    raw = yaml.safe_load(path.read_text())
    paper_grid = isinstance(raw["base"], dict)  # the tour's grid names the quickstart file instead
    if paper_grid:
        raw["base"]["data"]["root"] = str(tmp_path)  # the datasets need not be here to check the grid
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    loaded, name, base = compare_module.load_grid(tmp_path / "grid.yaml" if paper_grid else path)
    runs = compare_module.plan_runs(loaded, name, base, tmp_path / "runs")
    methods = {loaded.method_of(row) for row in loaded.methods}
    assert {r.method for r in runs} == methods | (
        {"dense"} if {"prune", "prune-channels"} & methods else set()
    )
    for run in runs:
        assert run.cfg.sparsity.method == run.method
        if run.method == "deepr":
            assert run.cfg.train.weight_decay == 0
        paper = paper_grid and not name.startswith("pareto")  # the pareto grids: the quickstart's share
        if paper and run.method in ("dsr", "set"):  # N_p as the paper's share, or its count
            assert run.cfg.sparsity.prune_fraction == 0.14 or run.cfg.sparsity.prune_target == 20000


@pytest.mark.slow
def test_compare_trains_the_dense_run_first_and_prunes_it(tmp_path):
    """prune and prune-channels both start from the grid's dense run, trained first. prune-channels
    removes channels with Torch-Pruning's group importance in equal steps to its share (the
    weights stay dense), and the table counts the dense run's epochs in its epochs."""
    base = tiny(
        model={"name": "small-cnn", "options": {"width": 8}},
        train={"epochs": 1},
        finetune={"epochs": 0},
        validate={"latency_runs": 3},
    )
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "g",
                "base": base,
                "methods": ["prune", "prune-channels"],
                "sparsities": [0.8],
                "seeds": [0],
                "overrides": {
                    "prune": {"sparsity.steps": 3},
                    "prune-channels": {"sparsity.share": 0.5, "sparsity.steps": 2, "sparsity.multiple_of": 1},
                },
            }
        )
    )
    table_as_it_went = []

    def echo(line: str) -> None:  # a grid's table grows as its runs end, not only at its end
        if line.startswith("[2/3]"):
            rows = csv.DictReader((tmp_path / "out" / "g" / "results.csv").open())
            table_as_it_went.extend((r["method"], r["status"]) for r in rows)

    result = compare_module.run_grid(path, tmp_path / "out", jobs=2, echo=echo)
    assert ("dense", "ok") in table_as_it_went and ("prune", "ok") not in table_as_it_went, table_as_it_went
    runs = {r.method: r for r in result["runs"]}
    assert {m: r.status for m, r in runs.items()} == {"dense": "ok", "prune": "ok", "prune-channels": "ok"}, [
        r.message for r in runs.values()
    ]
    dense = torch.load(
        tmp_path / "out" / "g" / "runs" / "g-dense-s0-seed0" / "train" / "final.pt", weights_only=True
    )
    pruned = torch.load(
        tmp_path / "out" / "g" / "runs" / "g-prune-s0.8-seed0" / "train" / "final.pt", weights_only=True
    )
    assert pruned["fingerprint"].endswith(dense["run_id"])
    assert 0.79 <= runs["prune"].report.sparsity <= 0.81

    channels = torch.load(
        tmp_path / "out" / "g" / "runs" / "g-prune-channels-s0-seed0" / "train" / "final.pt",
        weights_only=True,
    )
    removed = {n: int((~a).sum()) for n, a in channels["sparsifier"]["channels"].items()}
    assert sum(removed.values()) == round(0.5 * (8 + 16 + 32))  # small-cnn at width 8: conv1-3
    assert channels["sparsifier"]["masks"] == {}  # the weights stay dense
    # cut out while it trained (shrink: true, the default): the export has nothing left to cut
    live = channels["model_spec"]["live_channels"]
    assert {n: 2 ** (k + 3) - len(live[n]) for k, n in enumerate(("conv1", "conv2", "conv3"))} == removed
    assert channels["model"]["conv2.weight"].shape[:2] == (len(live["conv2"]), len(live["conv1"]))
    shrink = runs["prune-channels"].report.shrink
    assert shrink["removed_channels"] == {} and shrink["folds"] == 0
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "out" / "g" / "results.csv").open())}
    assert (rows["dense"]["epochs"], rows["prune"]["epochs"], rows["prune-channels"]["epochs"]) == (
        "1",
        "2",
        "2",
    )


QUICKSTART = Path(__file__).resolve().parent.parent / "pipelines" / "quickstart.yaml"


def check_quickstart(*overrides: str):
    return CliRunner().invoke(app, ["check", str(QUICKSTART), *[a for o in overrides for a in ("--set", o)]])


@pytest.mark.parametrize(
    "method,dropped",
    [
        ("static", "prune_target, init_threshold, tolerance, rewire_periods, stop_rewire_epoch"),
        ("set", "init_threshold, tolerance"),
        ("dense", "prune_target, init_threshold, tolerance, rewire_periods, stop_rewire_epoch"),
    ],
)
def test_switching_the_method_drops_the_files_options_it_does_not_take(method, dropped):
    result = check_quickstart(f"sparsity.method={method}")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert (
        notes[0]
        == f"note: sparsity.method={method}: dropped the file's {dropped} ({method} takes no such option)"
    )
    sparsity = "0.0" if method == "dense" else "0.9"
    assert result.output.splitlines()[-1].endswith(f"{method} at sparsity {sparsity})")
    assert (len(notes) == 2) == (method == "dense")  # dense also says that sparsity went to 0


def test_a_switched_method_still_refuses_options_given_with_it_and_options_no_method_takes(tmp_path):
    result = check_quickstart("sparsity.method=static", "sparsity.prune_target=3")
    assert result.exit_code == 2 and "method 'static' takes no option 'prune_target'" in result.output
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["sparsity"]["bogus"] = 1
    path = tmp_path / "bogus.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["check", str(path), "--set", "sparsity.method=static"])
    assert result.exit_code == 2 and "takes no option 'bogus' (no method's option" in result.output


def test_milestones_past_the_last_epoch_are_a_note_and_bad_ones_an_error():
    result = check_quickstart("train.epochs=3")
    assert result.exit_code == 0, result.output
    assert "note: train.milestones [20, 30, 36] are not reached in 3 epochs" in result.output
    assert "note:" not in check_quickstart().output  # the file as it is reaches all of its milestones
    # A milestone at the last epoch is not reached either: the LR changes after it, for no epoch.
    assert (
        "note: train.milestones [36] are not reached in 36 epochs"
        in check_quickstart("train.epochs=36").output
    )
    assert "note:" not in check_quickstart("train.epochs=37").output
    for bad in ("[30, 20]", "[-1, 20]", "[20, 20]"):
        result = check_quickstart(f"train.milestones={bad}")
        assert result.exit_code == 2 and "milestones must be increasing epochs from 0" in result.output


def test_version():
    from dsrpipe import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"dsrpipe {__version__}\n"


def test_every_method_is_one_module_whose_options_class_names_it_and_its_sparsifier():
    """One module per built-in method (dsrpipe/config/methods/<name>.py), found by the package:
    its options class answers to the method's name and names the library class that trains with
    it. A class that names no method or no sparsifier, or a name taken, is refused."""
    modules = {module.name for module in pkgutil.iter_modules(config_methods.__path__)} - {"base"}
    assert {name.replace("-", "_") for name in METHOD_OPTIONS} == modules
    for name, options in METHOD_OPTIONS.items():
        assert options.__module__ == f"dsrpipe.config.methods.{name.replace('-', '_')}"
        assert options.model_fields["method"].default == name and issubclass(options.sparsifier, Sparsifier)

    class Nameless(FromScratchOptions):
        sparsifier: ClassVar[type[Sparsifier]] = Sparsifier

    class Halved(FromScratchOptions):
        method: Literal["magic"] = "magic"

    with pytest.raises(TypeError, match="Nameless names no method"):
        register_method(Nameless)
    with pytest.raises(TypeError, match="method 'magic' names no sparsifier"):
        register_method(Halved)
    with pytest.raises(ValueError, match="'dsr' is registered already"):
        register_method(METHOD_OPTIONS["dsr"])
    assert "magic" not in METHOD_OPTIONS


def test_every_option_reaches_the_library():
    """An option passes to the sparsifier's keyword of the same name, or is one of those built
    from several settings: a misnamed option would be dropped silently, and fails here."""
    built = {"method", "dense_first", "dense_last", "exclude", "sparse_tensors"}  # method; layers
    built |= {"rewire_periods", "stop_rewire_epoch", "begin_epoch", "end_epoch", "remove_channels"}
    built |= {"macs", "latency"}  # the cost budget (`budget`)
    for name, options in METHOD_OPTIONS.items():
        unused = set(options.model_fields) - built - set(method_options(options.sparsifier))
        # sparsity names the grid column of the methods whose weights it does not decide
        assert unused <= {"sparsity"}, (name, unused)
        assert "sparsity" not in unused or name in ("dense", "thin-dense", "frozen", "prune-channels"), name


def test_a_grids_relative_paths_and_override_errors(tmp_path, monkeypatch):
    """The grid's own relative paths are taken from its folder, as `base:` is, whatever the
    working folder; an error in its overrides quotes the cause and names the override."""
    folder = tmp_path / "grids"
    write_tree(folder / "images", image_tree())
    (folder / "base.yaml").write_text(yaml.safe_dump({"name": "b", "train": {"epochs": 1}}))
    monkeypatch.chdir(tmp_path)  # not the grid's folder

    def plan(overrides, base="base.yaml"):
        grid = {"name": "g", "base": base, "methods": ["dsr"], "sparsities": [0.9], "overrides": overrides}
        (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
        loaded = compare_module.load_grid(folder / "grid.yaml")
        return compare_module.plan_runs(*loaded, tmp_path / "runs", "grid.yaml")

    [run] = plan({"dsr": {"data.dataset": "imagefolder", "data.root": "images"}})
    assert run.cfg.data.root == folder / "images"
    [run] = plan({}, base={"name": "b", "data": {"dataset": "imagefolder", "root": "images"}})
    assert run.cfg.data.root == folder / "images"  # an inline base is the grid's too
    with pytest.raises(UserError) as error:
        plan({"dsr": {"data.dataset": "imagefolder", "data.root": "missing"}})
    assert str(error.value) == (
        f"grid.yaml: g-dsr-s0.9-seed0: data: root does not exist: {folder / 'missing'} "
        "(from overrides.dsr: data.dataset, data.root)"
    )
    with pytest.raises(
        UserError, match=r"train.epochs: Input should be greater .* \(from overrides.dsr: train.epochs\)$"
    ):
        plan({"dsr": {"train.epochs": -3}})


def test_a_grid_named_relatively_or_absolutely_plans_the_same_runs(tmp_path, monkeypatch):
    """Its runs' settings, and so their fingerprints, do not depend on how the grid file is named:
    another spelling would make every finished run stale, and `compare` would start them over."""
    folder = tmp_path / "grids"
    write_tree(folder / "images", image_tree())
    grid = {
        "name": "g",
        "base": {"data": {"dataset": "imagefolder", "root": "images"}},  # an inline base's path
        "methods": ["dsr", "other"],
        "sparsities": [0.9],
        "variants": {"other": {"method": "dsr", "settings": {"data.root": "images"}}},  # a variant's
    }
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.chdir(tmp_path)

    def fingerprints(path):
        runs = compare_module.plan_runs(*compare_module.load_grid(path), tmp_path / "runs")
        return [settings_fingerprint(run.cfg, "train") for run in runs]

    assert fingerprints(Path("grids/grid.yaml")) == fingerprints(folder / "grid.yaml")


def test_a_grid_override_of_a_whole_section_merges_into_the_base(tmp_path):
    """An override that gives a section as a mapping sets the keys it names and keeps the base's
    others, its sub-sections' too: `sparsity: {remove_channels: {share: 0.5}}` keeps the base's
    N_p, granularity and removal floor (it used to replace the section: they were dropped). A
    setting whose value is a mapping (rewire_periods) is replaced whole. An error in such an
    override names it by its section; the grid's own axes are refused inside it too; a path from
    the home folder stays as written, for the run to expand."""
    base = {
        "name": "b",
        "train": {"epochs": 4, "lr": 0.05},
        "sparsity": {
            "method": "dsr",
            "sparsity": 0.8,
            "prune_target": 600,
            "rewire_periods": {0: 50, 2: 100},
            "granularity": "kernel",
            "remove_channels": {"share": 0.3, "floor": 0.2},
        },
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))

    def plan(overrides, base="base.yaml"):
        grid = {"name": "g", "base": base, "methods": ["dsr"], "sparsities": [0.9], "overrides": overrides}
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
        loaded = compare_module.load_grid(tmp_path / "grid.yaml")
        return compare_module.plan_runs(*loaded, tmp_path / "runs", "grid.yaml")

    [run] = plan(
        {
            "dsr": {
                "sparsity": {"remove_channels": {"share": 0.5}, "rewire_periods": {0: 20}},
                "train": {"epochs": 6},
                "data": {"root": "~/images"},
            }
        }
    )
    options = run.cfg.sparsity
    assert (options.prune_target, options.granularity, options.sparsity) == (600, "kernel", 0.9)
    assert (options.remove_channels.share, options.remove_channels.floor) == (0.5, 0.2)
    assert options.rewire_periods == {0: 20}
    assert (run.cfg.train.epochs, run.cfg.train.lr) == (6, 0.05)
    assert run.raw["data"]["root"] == "~/images"  # neither taken from the grid's folder nor expanded here
    [run] = plan({"dsr": {"data.root": "~/images"}})
    assert run.raw["data"]["root"] == "~/images"
    [run] = plan({}, base={**base, "data": {"root": "~/images"}})
    assert run.raw["data"]["root"] == "~/images"

    with pytest.raises(
        UserError, match=r"train.epochs: Input should be greater .* \(from overrides.dsr: train\)$"
    ):
        plan({"dsr": {"train": {"epochs": -3}}})
    for axis in ("sparsity", "method"):
        with pytest.raises(UserError, match=f"overrides.dsr: 'sparsity.{axis}' is set by the grid itself"):
            plan({"dsr": {"sparsity": {axis: "static" if axis == "method" else 0.5}}})


REMOVAL_RULE = "channel removal must begin before it ends, within train.epochs (4)"


@pytest.mark.parametrize(
    "method, sections, where, rule",
    [
        (
            "dsr",
            {"remove_channels": {"share": 0.5, "begin_epoch": 3, "end_epoch": 3}},
            "sparsity.remove_channels.begin_epoch",
            REMOVAL_RULE,
        ),
        (
            "dsr",
            {"remove_channels": {"share": 0.5, "begin_epoch": 5}},
            "sparsity.remove_channels.begin_epoch",
            REMOVAL_RULE,
        ),
        (
            "dsr",
            {"remove_channels": {"share": 0.5, "end_epoch": 9}},
            "sparsity.remove_channels.end_epoch",
            REMOVAL_RULE,
        ),
        ("deepr", {}, "train.weight_decay", "method 'deepr' regularises with its L1 term"),
        ("gmp", {"begin_epoch": 3, "end_epoch": 2}, "sparsity.begin_epoch", "begin_epoch 3 must be before"),
    ],
    ids=["begin at end", "begin past training", "end past training", "deepr with weight decay", "gmp span"],
)
def test_a_rule_between_settings_names_the_setting_to_change(tmp_path, method, sections, where, rule):
    """A rule that ties settings together, broken (channel removal within training, deepr without
    weight decay): the one line leads with the setting to change, not with `(top level)`; so it
    does for a grid's base file, whose text is not quoted."""
    raw = tiny(train={"weight_decay": 0.1})  # 4 epochs
    raw["sparsity"] = {"method": method, "sparsity": 0.9, **sections}
    path = write_pipeline(tmp_path, raw)
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: {path}: {where}: {rule}"), line
    grid = {"name": "g", "base": path.name, "methods": [method], "sparsities": [0.9]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(
        UserError, match=rf"g-{method}-s0.9-seed0: {where}: invalid value \(its text is not quoted"
    ):
        compare_module.plan_runs(*compare_module.load_grid(tmp_path / "grid.yaml"), tmp_path / "runs")


def test_set_merges_a_section_given_as_a_mapping(tmp_path):
    """`--set sparsity={granularity: kernel}` is `--set sparsity.granularity=kernel`: the file's
    method, sparsity and N_p stay; a mapping for a method switch drops what the new method does
    not take, as `--set sparsity.method=...` does."""
    result = check_quickstart("sparsity={granularity: kernel}")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("dsr at sparsity 0.9)\n")
    cfg = load_pipeline(QUICKSTART, ["sparsity={granularity: kernel, remove_channels: {share: 0.5}}"])
    assert (cfg.sparsity.prune_target, cfg.sparsity.remove_channels.share) == (600, 0.5)
    result = check_quickstart("sparsity={method: static}")
    assert result.exit_code == 0, result.output
    assert "note: sparsity.method=static: dropped the file's prune_target" in result.output


def test_switching_to_prune_channels_makes_sparsity_0_and_says_so(tmp_path):
    """prune-channels keeps every weight: the file's sparsity 0.9 becomes 0, with a note (and no
    error), unless --set names a sparsity too."""
    dense_run = tmp_path / "final.pt"  # only its existence is checked here
    dense_run.write_bytes(b"")
    switch = ("sparsity.method=prune-channels", f"sparsity.prune_from={dense_run}")
    result = check_quickstart(*switch)
    assert result.exit_code == 0, result.output
    assert (
        "note: sparsity.method=prune-channels: keeps every weight, so sparsity 0.9 is now 0\n"
        in result.output
    )
    assert result.output.endswith("prune-channels at sparsity 0.0)\n")
    result = check_quickstart(*switch, "sparsity.sparsity=0.5")
    assert result.exit_code == 2 and "sparsity must be 0" in result.output and "is now 0" not in result.output


def test_a_grids_base_file_may_not_name_code_but_the_grid_may(tmp_path):
    """A `base:` file may be anyone's: a model it names as module:function is refused in one line,
    before any run is planned (nothing imported); the grid itself may name one."""
    base = {**tiny("b"), "model": {"name": "somebody_elses:build"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"name": "g", "base": "base.yaml", "methods": ["dsr"], "sparsities": [0.9], "seeds": [0]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(UserError) as refused:
        compare_module.load_grid(tmp_path / "grid.yaml")
    assert str(refused.value) == (
        f"{tmp_path / 'base.yaml'}: model.name: a base: file may not name code (module:function); "
        "name the model in the grid itself (an inline base, or overrides) (docs/security.md)"
    )
    inline = {**grid, "base": base}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(inline))
    [run] = compare_module.plan_runs(*compare_module.load_grid(tmp_path / "grid.yaml"), tmp_path / "runs")
    assert run.cfg.model.name == "somebody_elses:build"
