"""`cqd` takes a subcommand's options anywhere on the line: before, between or after key=value overrides."""
import subprocess
import sys

import pytest

import cqd.cli as cli

# subcommand: (the function it runs, its options, what they parse to); the first two words are one option
LINES = {
    "train": ("cmd_train", ["--config", "c.yaml", "--resume", "--data-dir", "d"],
              {"config": "c.yaml", "resume": True, "data_dir": "d"}),
    "eval": ("cmd_eval", ["--model", "m.pt", "--config", "c.yaml"], {"model": "m.pt", "config": "c.yaml"}),
    "table": ("cmd_table", ["--config", "c.yaml", "--force"], {"config": "c.yaml", "force": True}),
    "demo": ("cmd_table", ["--data-dir", "d", "--force"],
             {"config": "configs/quick.yaml", "data_dir": "d", "force": True}),
    "show-degradations": ("cmd_show", ["-n", "3", "--out", "o.png", "--specs", "edges", "blur"],
                          {"n": 3, "out": "o.png", "specs": ["edges", "blur"]}),
    "multires": ("cmd_multires", ["--config", "c.yaml", "--data-dir", "d"], {"config": "c.yaml", "data_dir": "d"}),
    "explain": ("cmd_explain", ["--config", "explain", "--n", "8"], {"config": "explain", "n": 8}),
}


def _run(monkeypatch, func: str, argv: list[str]):
    """main(argv) with the subcommand's work replaced by recording its parsed arguments."""
    seen = []
    monkeypatch.setattr(cli, func, lambda args: seen.append(args) or 0)
    rc = cli.main(argv)
    return rc, seen


@pytest.mark.parametrize("command", LINES)
def test_options_between_and_after_overrides_are_parsed(command, monkeypatch):
    func, options, expected = LINES[command]
    rc, seen = _run(monkeypatch, func, [command, "a.b=1", *options[:2], "c.d=2", *options[2:]])
    assert rc == 0 and len(seen) == 1
    args = seen[0]
    assert args.overrides == ["a.b=1", "c.d=2"]
    assert {k: getattr(args, k) for k in expected} == expected


def test_an_unknown_option_after_overrides_is_still_a_usage_error(monkeypatch, capsys):
    rc, seen = _run(monkeypatch, "cmd_explain", ["explain", "a.b=1", "--bogus"])
    assert rc == 2 and not seen
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_help_and_import_load_no_torch():
    code = ("import sys, contextlib, io\nimport cqd.cli\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = cqd.cli.main(['--help'])\n"
            "print(rc, sorted(m for m in ('torch', 'lightning', 'lightning_fabric') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["0", "[]"]


def test_overrides_typed_after_specs_are_overrides_not_specs(monkeypatch):
    """`--specs` takes every word after it; key=value words among them go to the config, specs stay specs."""
    import cqd.reports.figures

    seen = {}

    def grid(ds, specs, out, **kw):
        seen.update(specs=specs, size=ds.image_size)
        return out

    monkeypatch.setattr(cqd.reports.figures, "degradation_grid", grid)
    argv = ["show-degradations", "--specs", "blur", "clutter:min_scale=0.5,max_scale=0.8+lowres:size=8",
            "data.image_size=16", "--out", "o.png"]
    assert cli.main(argv) == 0
    assert seen == {"specs": ["blur", "clutter:min_scale=0.5,max_scale=0.8+lowres:size=8"], "size": 16}


@pytest.mark.parametrize("command, config", [("table", "configs/cub.yaml"), ("demo", "configs/quick.yaml")])
def test_data_dir_is_the_data_root_of_a_grids_base(command, config, monkeypatch, tmp_path):
    """A grid has no data.root: `--data-dir` is its base.data.root, so every cell reads from there."""
    from cqd.experiments.schema import load_grid_config

    seen = []
    monkeypatch.setattr(cli, "_run_table",
                        lambda config, overrides, force, wait=True: seen.append((config, overrides)) or 0)
    assert cli.main([command, *(["--config", config] if command == "table" else []), "--data-dir", str(tmp_path)]) == 0
    grid = load_grid_config(*seen[0])
    assert grid.base.data.root == str(tmp_path)
