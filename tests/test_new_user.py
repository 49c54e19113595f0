"""What a new user trips on: a missing GPU, the Python API's dicts and override notes, a run that
diverges without a NaN, and launching on several processes (torchrun, SLURM)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from cqd import api
from cqd.cli import main
from cqd.engine.precision import launcher
from cqd.errors import ConfigError


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_a_missing_gpu_is_a_clear_error_naming_what_is_there(tiny_config, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.accelerator=cuda: this machine has no CUDA device .*sees: cpu"):
        api.train(tiny_config(), "train.accelerator=cuda")
    code, err = _cli(capsys, "train", f"out_dir={tmp_path / 'x'}", "train.accelerator=gpu")
    assert code == 2 and err.startswith("cqd: error: train.accelerator=gpu: this machine has no CUDA device")
    assert "internal error" not in err and not (tmp_path / "x").exists()


def test_api_errors_name_the_override_like_the_cli(tiny_config):
    with pytest.raises(ConfigError, match=r"train.epochs: .* \(from override 'train.epochs=0'\)"):
        api.train(tiny_config(), "train.epochs=0")
    with pytest.raises(ConfigError, match=r"method.cqd.lam: .* \(from override 'method.cqd.lam=-1'\)"):
        api.evaluate("nowhere.pt", tiny_config(), "method.cqd.lam=-1")


def test_api_table_takes_a_dict(tiny_config, tmp_path):
    base = tiny_config()
    base["train"].update(epochs=1, max_steps_per_epoch=1)
    grid = {"name": "dict grid", "out_dir": str(tmp_path / "grid"), "rows": ["lq"],
            "columns": {"lowres": {"degradation": "lowres:size=8"}}, "base": base}
    out = api.table(grid)
    assert "| B -> B fine-tuning |" in out["markdown"] and Path(out["report_dir"], "table.md").is_file()
    with pytest.raises(ConfigError, match=r"(?s)\(dict\).*seeds.*\(from override 'seeds=\[-1\]'\)"):
        api.table(grid, "seeds=[-1]")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("div")
    api.train({"out_dir": str(root / "t"), "cache_dir": str(root / "c"), "method": {"name": "hq"},
               "data": {"train_subset": 128, "test_subset": 64},
               "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2, "progress": False,
                         "precision": "32-true"}})
    return str(root / "t" / "model.pt")


DIVERGES = ["method.name=cqd", "method.cqd.lam=5000", "train.lr=1.0", "train.epochs=1"]  # loss_ce ~4e4, no NaN


def test_a_run_that_diverges_without_a_nan_is_warned_about(tiny_config, teacher, capsys):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = api.train(tiny_config(teacher__checkpoint=teacher), *DIVERGES)
    assert res["history"][-1]["loss_ce"] > 100
    said = [str(w.message) for w in seen if "diverging" in str(w.message)]
    assert (len(said) == 1 and "far above chance level (log 10 = 2.30)" in said[0]
            and "Lower train.lr (now 1)" in said[0])
    assert "method.cqd.lam" in said[0] and "lr 0.0005 with lambda 200" in said[0]
    # through the CLI: one 'cqd: warning:' line, and the run still finishes
    cfg = tiny_config(teacher__checkpoint=teacher, out_dir=str(Path(tiny_config()["out_dir"]).parent / "cli"))
    args = [f"{k}={json.dumps(v)}" for k, v in _flat(cfg).items()] + DIVERGES
    code, err = _cli(capsys, "train", *args)
    assert code == 0 and err.count("cqd: warning:") == 1 and "the run is diverging" in err


def test_a_healthy_run_is_not_warned_about(tiny_config):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        api.train(tiny_config())
    assert not [w for w in seen if "diverging" in str(w.message)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class _T(BaseModel):
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"


@pytest.mark.parametrize("env, want", [
    ({}, (1, 1, "auto")),
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, (2, 2, "ddp")),
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, (1, 1, "auto")),  # torchrun with one process: as given
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}, (4, 2, "ddp")),
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "bash"}, (1, 1, "auto")),  # an interactive shell
])
def test_the_launchers_environment_sets_devices_and_machines(env, want):
    assert launcher(_T(), env) == want


def test_a_config_that_contradicts_the_launcher_is_an_error():
    with pytest.raises(ConfigError, match=r"torchrun started 4 processes \(2 per machine on 2 machine\(s\)\) "
                                          r"but the config says train.devices=3"):
        launcher(_T(devices=3), {"LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (launcher(_T(devices=2, num_nodes=2, strategy="ddp_find_unused_parameters_true"),
                     {"LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
            == (2, 2, "ddp_find_unused_parameters_true"))


@pytest.mark.slow
def test_torchrun_with_no_extra_keys_is_one_run_of_two_processes(tiny_config, tmp_path):
    """`torchrun --nproc_per_node 2 -m cqd train ...` without train.devices/strategy: one DDP run (world size 2)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(train__accelerator="cpu", train__epochs=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "cqd", "train", *[f"{k}={json.dumps(v)}" for k, v in _flat(cfg).items()]]
    p = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, out[-4000:]
    res = json.loads((Path(cfg["out_dir"]) / "result.json").read_text())
    assert res["world_size"] == 2
    assert out.count('"acc_lq"') == 1  # one process prints the result
