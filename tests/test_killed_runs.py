"""SIGKILL a real `python -m cqd train` inside its checkpoint writes, resume it, and get exactly the
model and results of an uninterrupted run.

SIGKILL cannot be caught, so nothing is saved at the kill: the run relies on the epoch checkpoints
being written atomically (temp file, fsync, rename over the target) and on the next write into the
folder removing a dead writer's temp file. A kill at a random moment only sometimes lands inside a
write, so the child runs the CLI under a small wrapper (HOOK) that stops inside a chosen write: when
it fsyncs the temp file of its n-th `last.ckpt`, it leaves a marker naming that temp file and sleeps
until the test kills it. Every child is killed (with its process group) when a test ends, pass or fail.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cqd.errors import CheckpointError
from cqd.files import load_checkpoint, save_checkpoint, save_json

# Runs `cqd.cli.main(argv[4:])` with os.fsync wrapped: each fsync of a temp file of `target`
# (".<target name>.*.tmp" in its folder) adds a line to `marker`.writes; at the n-th (n > 0) it writes
# the temp file's path to `marker` and sleeps forever.
HOOK = r"""
import os, sys, time
marker, target, nth = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
folder, stem = os.path.dirname(target), "." + os.path.basename(target) + "."
real_fsync, seen = os.fsync, [0]

def temp_file(fd):
    st = os.fstat(fd)
    for name in os.listdir(folder):
        if name.startswith(stem) and name.endswith(".tmp"):
            try:
                other = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return os.path.join(folder, name)
    return None

def fsync(fd):
    real_fsync(fd)
    temp = temp_file(fd if isinstance(fd, int) else fd.fileno())
    if temp is not None:
        seen[0] += 1
        with open(marker + ".writes", "a") as f:
            f.write(temp + "\n")
        if seen[0] == nth:
            with open(marker + ".part", "w") as f:
                f.write(temp)
            os.rename(marker + ".part", marker)
            while True:
                time.sleep(60)

os.fsync = fsync
from cqd.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture
def children():
    """Popen objects started by the test; any still running at the end is killed with its process group."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # started with start_new_session: the group is its own
            except ProcessLookupError:
                pass
        p.wait(timeout=60)


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the test process dies, even when that is killed outright (a CI
    time limit, pytest-timeout's os._exit) and no fixture teardown runs."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(children: list, argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    children.append(proc)
    return proc


def train_args(out: Path, cache: Path) -> list[str]:
    return ["train", "method.name=lq", "seed=0", f"out_dir={out}", f"cache_dir={cache}",
            "data.train_subset=256", "data.test_subset=128", "data.image_size=32", "data.degradation=lowres:size=8",
            "train.epochs=5", "train.batch_size=32", "train.lr=0.05", "train.progress=false",
            "train.max_steps_per_epoch=3", "train.precision=32-true"]


def stopped_in_write(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 150) -> Path:
    """The temp file the hooked child is writing when it stops; fails if it ends or stalls first."""
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"the child did not stop inside the write (rc {proc.returncode}, {time.monotonic() - t0:.0f}s; "
                        f"does the atomic write still fsync a '.NAME.*.tmp' file?):\n{tail}")
        time.sleep(0.02)
    return Path(marker.read_text())


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_sigkill_inside_checkpoint_writes_then_resume_equals_an_uninterrupted_run(tmp_path, children):
    cache, out, log = tmp_path / "cache", tmp_path / "run", tmp_path / "log.txt"
    ckpt = out / "last.ckpt"
    reference = start(children, ["-c", HOOK, str(tmp_path / "mref"), str(tmp_path / "ref" / "last.ckpt"), "0",
                                 *train_args(tmp_path / "ref", cache)], tmp_path / "ref.txt")

    # run 1 stops inside its 2nd checkpoint write (end of epoch 2) and is killed there
    first = start(children, ["-c", HOOK, str(tmp_path / "m1"), str(ckpt), "2", *train_args(out, cache)], log)
    dead_temp = stopped_in_write(tmp_path / "m1", first, log)
    assert dead_temp.parent == out and dead_temp.is_file() and dead_temp.stat().st_size > 0
    assert f".{first.pid}." in dead_temp.name
    sigkill(first)
    assert temps(out) == [dead_temp]  # SIGKILL cleans nothing up ...
    ck = load_checkpoint(ckpt)  # ... and last.ckpt is still epoch 1's complete file
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0)

    # run 2 resumes at epoch 1; its writes remove the dead writer's temp file; killed inside its 2nd write
    second = start(children, ["-c", HOOK, str(tmp_path / "m2"), str(ckpt), "2", *train_args(out, cache), "--resume"],
                   log)
    own_temp = stopped_in_write(tmp_path / "m2", second, log)
    assert not dead_temp.exists(), "the next writer did not remove the killed writer's temp file"
    assert temps(out) == [own_temp] and f".{second.pid}." in own_temp.name
    sigkill(second)
    ck = load_checkpoint(ckpt)
    assert (ck["epoch"], ck["step_in_epoch"]) == (2, 0)

    # run 3 resumes at epoch 2 and finishes
    third = start(children, ["-c", HOOK, str(tmp_path / "m3"), str(ckpt), "0", *train_args(out, cache), "--resume"],
                  log)
    assert third.wait(timeout=180) == 0, log.read_text(errors="replace")[-3000:]
    assert reference.wait(timeout=180) == 0, (tmp_path / "ref.txt").read_text(errors="replace")[-3000:]
    writes = {m: len((tmp_path / f"{m}.writes").read_text().splitlines()) for m in ("m3", "mref")}
    assert writes["m3"] == writes["mref"] - 2, f"run 3 did not start at epoch 3 (checkpoint writes: {writes})"
    assert temps(out) == [], "a killed writer's temp file was left behind"

    got, want = load_checkpoint(out / "model.pt")["model"], load_checkpoint(tmp_path / "ref" / "model.pt")["model"]
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"resumed weights differ in {differ[:5]}"
    result, ref = (json.loads((d / "result.json").read_text()) for d in (out, tmp_path / "ref"))
    assert (result["acc_hq"], result["acc_lq"]) == (ref["acc_hq"], ref["acc_lq"])
    assert len(result["history"]) == len(ref["history"]) == 5

    def untimed(row: dict) -> dict:
        return {k: v for k, v in row.items() if not k.endswith("_s")}  # images_per_s etc. differ

    assert [untimed(r) for r in result["history"]] == [untimed(r) for r in ref["history"]]


# Writes {"i": i, "w": 4 MB} to argv[1] for i = 0, 1, ...; write number argv[3] gets half its bytes into
# the temp file, then the writer leaves the temp file's path in argv[2] and sleeps.
WRITER = r"""
import io, os, sys, time, torch
from cqd.files import save_checkpoint
path, marker, torn_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_save = torch.save

def half_then_hang(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    st = os.fstat(f.fileno())
    folder = os.path.dirname(os.path.abspath(path))
    temp = [os.path.join(folder, n) for n in os.listdir(folder)
            if os.stat(os.path.join(folder, n)).st_ino == st.st_ino][0]
    with open(marker + ".part", "w") as m:
        m.write(temp)
    os.rename(marker + ".part", marker)
    while True:
        time.sleep(60)

for i in range(torn_at + 1):
    if i == torn_at:
        torch.save = half_then_hang
    save_checkpoint({"i": i, "w": torch.full((1_000_000,), float(i))}, path)
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_file(tmp_path, children):
    """The writer is killed with half of a 4 MB checkpoint in its temp file: the target is still the
    previous complete file, and the next write into the folder removes the torn temp file."""
    path, marker, log = tmp_path / "last.ckpt", tmp_path / "marker", tmp_path / "log.txt"
    writer = start(children, ["-c", WRITER, str(path), str(marker), "3"], log)
    torn = stopped_in_write(marker, writer, log)
    assert torn.parent == tmp_path and torn.name.startswith(".last.ckpt.") and torn != path
    sigkill(writer)
    assert torn.is_file() and 1_000_000 < torn.stat().st_size < 3_000_000
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(torn)  # what last.ckpt would be now if the writer wrote it in place
    ck = load_checkpoint(path)
    assert ck["i"] == 2 and torch.equal(ck["w"], torch.full((1_000_000,), 2.0))
    save_checkpoint({"i": 3, "w": torch.zeros(1)}, path)
    assert not torn.exists() and temps(tmp_path) == []
    assert load_checkpoint(path)["i"] == 3


def test_a_write_removes_the_temp_files_of_dead_writers_of_this_host_only(tmp_path, monkeypatch, children):
    folder = tmp_path / "out"
    folder.mkdir()
    written = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (written.append(Path(src).name), real_replace(src, dst))[1])
    save_json({"a": 1}, folder / "x.json")
    monkeypatch.undo()
    # the temp-file name of a write: .<target name>.<host>.<pid>.<random>.tmp
    [name] = written
    *_, host, pid, _, tmp = name.split(".")
    assert (pid, tmp) == (str(os.getpid()), "tmp") and name.startswith(f".x.json.{host}.")

    alive = start(children, ["-c", "import time; time.sleep(120)"], tmp_path / "alive.txt")
    gone = start(children, ["-c", "pass"], tmp_path / "gone.txt")
    assert gone.wait(timeout=60) == 0  # exited and reaped: its pid names no process

    def temp(target: str, host: str, pid: int) -> Path:
        p = folder / f".{target}.{host}.{pid}.k3x9q_ab.tmp"
        p.write_bytes(b"partial")
        return p

    dead = [temp("x.json", host, gone.pid), temp("other.ckpt", host, gone.pid)]
    kept = [temp("x.json", host, alive.pid),  # a live writer's file in progress
            temp("x.json", host, os.getpid()),  # this process's own (another thread may be writing it)
            temp("x.json", "another-host", gone.pid)]  # pids of other hosts cannot be checked from here
    unrelated = [folder / "notes.tmp", folder / ".x.json.tmp", folder / ".hidden"]
    for p in unrelated:
        p.write_text("keep")

    save_json({"a": 2}, folder / "x.json")
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in kept + unrelated)
    assert json.loads((folder / "x.json").read_text()) == {"a": 2}

    os.kill(alive.pid, signal.SIGKILL)
    alive.wait(timeout=60)
    save_json({"a": 3}, folder / "y.json")  # any write into the folder cleans it
    assert not kept[0].exists() and all(p.exists() for p in kept[1:] + unrelated)
