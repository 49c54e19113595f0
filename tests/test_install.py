"""scripts/install.sh picks where to install: the Python on PATH, or a .venv where that Python is
externally managed (PEP 668, as Debian/Ubuntu's own) or CQD_VENV=1 asks. Run as a dry run: nothing is
installed or downloaded.

The externally managed Python is this one, started with PYTHONHOME on a folder of links to its standard
library plus an EXTERNALLY-MANAGED marker: a virtual environment cannot stand in for it, since its
stdlib folder is its base's and pip ignores the marker inside one.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"
BASE = getattr(sys, "_base_executable", sys.executable)  # not a virtual environment's python


def _home(tmp_path: Path, marked: bool) -> Path:
    """A PYTHONHOME whose stdlib links to this Python's, with the PEP 668 marker or without."""
    home = tmp_path / "home"
    for key in ("stdlib", "platstdlib"):
        real = Path(sysconfig.get_paths()[key])
        mirror = home / os.path.relpath(real, sys.base_prefix)
        mirror.mkdir(parents=True, exist_ok=True)
        for entry in real.iterdir():
            if entry.name != "EXTERNALLY-MANAGED" and not (mirror / entry.name).exists():
                (mirror / entry.name).symlink_to(entry)
    if marked:
        stdlib = home / os.path.relpath(sysconfig.get_paths()["stdlib"], sys.base_prefix)
        (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use a virtual environment\n")
    return home


def _plan(tmp_path: Path, marked: bool, in_venv: bool = False, args=("test",), **env) -> str:
    """What install.sh prints in a dry run, with `python` on PATH being the interpreter described."""
    home = _home(tmp_path, marked)
    python = BASE
    if in_venv:
        subprocess.run([BASE, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=60)
        python = tmp_path / "venv" / "bin" / "python"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nPYTHONHOME="{home}" exec "{python}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    repo = tmp_path / "repo"  # a copy, so the run sees no .venv of the real checkout
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "install.sh")
    env = {**{k: v for k, v in os.environ.items() if k != "CQD_VENV"}, "CQD_INSTALL_DRY_RUN": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    done = subprocess.run(["bash", str(repo / "scripts" / "install.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (repo / ".venv").exists()  # a dry run makes nothing
    return done.stdout


def _pip_steps(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("+ ") and ("pip" in line or "venv" in line)]


def test_an_externally_managed_python_gets_a_venv(tmp_path):
    out = _plan(tmp_path, marked=True)
    assert _pip_steps(out) == ["+ python -m venv .venv", "+ .venv/bin/python -m pip install -q -e .[test]"]
    assert "externally managed" in out
    assert ".venv/bin/cqd demo" in out and ".venv/bin/python -m pytest" in out


def test_a_plain_python_installs_into_itself_as_before(tmp_path):
    out = _plan(tmp_path, marked=False, args=())
    assert _pip_steps(out) == ["+ python -m pip install -q -e ."]
    assert ".venv" not in out


def test_a_venv_of_a_managed_python_installs_into_that_venv(tmp_path):
    out = _plan(tmp_path, marked=True, in_venv=True)
    assert _pip_steps(out) == ["+ python -m pip install -q -e .[test]"]


@pytest.mark.parametrize("marked", [False, True])
def test_cqd_venv_1_asks_for_the_venv(tmp_path, marked):
    out = _plan(tmp_path, marked=marked, CQD_VENV="1")
    assert _pip_steps(out) == ["+ python -m venv .venv", "+ .venv/bin/python -m pip install -q -e .[test]"]
    assert ".venv/bin/cqd demo" in out
