"""`cqd COMMAND --help` shows examples, and each of them runs (made tiny by overrides appended after it, the way a
user scales a preset down); `cqd train --help` lists the methods and tasks from the registries."""
from __future__ import annotations

import shlex

import pytest

from cqd import cli
from cqd.methods import METHODS
from cqd.tasks import TASKS

DATA = ["data.train_subset=64", "data.test_subset=32", "data.image_size=16"]
TRAIN = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=16", "train.precision=32-true",
         "train.progress=false"]
TINY = {  # per command: the overrides that shrink its example (grids and studies: on their base run)
    "train": DATA + TRAIN, "eval": DATA, "export": DATA,
    "table": ["columns={lowres: {degradation: 'lowres:size=8'}}"] + [f"base.{o}" for o in DATA + TRAIN],
    "tune": [f"base.{o}" for o in DATA + TRAIN] + ["pruner.n_startup_trials=0"],
    "show-degradations": ["data.image_size=16"],
}
ORDER = ["train", "eval", "export", "table", "tune", "show-degradations"]  # eval and export use train's model


def examples(command: str, capsys) -> list[list[str]]:
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines() if "examples:\n" in text else []
    return [shlex.split(line.strip())[1:] for line in lines if line.strip().startswith("cqd ")]


def test_every_command_with_examples_is_in_the_run_order(capsys):
    with_examples = [c for c in cli.build_parser()._subparsers._group_actions[0].choices if examples(c, capsys)]
    assert sorted(with_examples) == sorted(ORDER)


def test_every_example_that_help_shows_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in ORDER:
        for argv in examples(command, capsys):
            assert argv[0] == command
            rc = cli.main(argv + TINY[command])
            err = capsys.readouterr().err
            assert rc == 0, f"`cqd {shlex.join(argv)}` exited {rc}: {err[-2000:]}"
            ran.append(command)
    assert set(ran) == set(ORDER)
    assert (tmp_path / "runs/lowres/model.pt").is_file() and (tmp_path / "runs/lowres/model.onnx").is_file()
    assert (tmp_path / "runs/quick/report/table.md").is_file() and (tmp_path / "runs/degradations.png").is_file()
    assert (tmp_path / "runs/tune_lowres/best.yaml").is_file()


def test_train_help_lists_every_registered_method_and_task(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out.split("methods (method.name):\n", 1)[1]
    listed = [line.split()[0] for line in text.split("\n\n", 1)[0].splitlines()]
    assert listed == METHODS.names()
    assert text.split("tasks (task): ", 1)[1].strip() == ", ".join(TASKS.names())


@pytest.mark.parametrize("command", ["eval", "export", "demo", "sym"])
def test_other_helps_import_no_registry_listing(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert "methods (method.name)" not in capsys.readouterr().out
