"""benchmarks/gpu_check.py on the CPU with --quick: every case ends with a number or a stated reason, and the
markdown table is written (the GPU run itself needs a GPU: see scripts/gpu_bundle.sh)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
NETS = ("resnet8", "resnet18")
EXPECTED = {
    "cuda_tests", "sync_debug", "demo",
    *(f"degradation/{f}" for f in ("lowres", "blur", "noise", "jpeg", "edges", "tps", "clutter")),
    *(f"bare/{n}" for n in NETS),
    *(f"loop/{c}/{n}" for c in ("lq", "cqd_cached", "cqd_live") for n in NETS),
    *(f"step/{c}" for c in ("dml", "afd", "fitnet_cached", "fitnet_live")),
}
CPU_SKIPS = {"cuda_tests", "sync_debug", "demo"}  # CUDA only, or (the demo) minutes long: skipped under --quick


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _reason(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


@pytest.mark.slow
def test_quick_cpu_run_reports_every_case(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 cores, maybe shared with other tests
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                        "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    data = json.loads((out / "gpu_check.json").read_text())
    names = [c["name"] for c in data["cases"]]
    assert sorted(names) == sorted(EXPECTED), f"missing {EXPECTED - set(names)}, unexpected {set(names) - EXPECTED}"
    assert data["meta"]["complete"] and data["meta"]["device"] == "cpu"
    for c in data["cases"]:
        assert c["status"] in ("ok", "skipped", "failed"), c
        if c["status"] == "ok":
            assert _number(c["value"]) and c["value"] > 0 and _reason(c["unit"]), c
        else:
            assert _reason(c["reason"]), c
        assert _number(c["peak_gpu_mib"]) or _reason(c["peak_gpu_reason"]), c  # null on the CPU, with its reason
    failed = {c["name"]: c["reason"] for c in data["cases"] if c["status"] == "failed"}
    assert not failed, failed
    assert {c["name"] for c in data["cases"] if c["status"] == "skipped"} == CPU_SKIPS
    for c in data["cases"]:
        if c["name"].startswith("loop/"):
            assert _number(c["ratio"]) and _number(c["details"]["bare_images_per_s"]), c
            assert len(c["details"]["epochs_images_per_s"]) == 2, c  # epoch 1 is the warm-up, epoch 2 the number

    md = (out / "gpu_check.md").read_text()
    assert "| case | status | value |" in md
    for name in EXPECTED:
        assert f"| {name} |" in md, name


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_case_without_number_or_reason_is_reported_as_failed():
    g = _module()
    assert {n for _, n in g.plan()} == EXPECTED
    peak = (None, "device is cpu")
    for res in ({"status": "ok"}, {"status": "ok", "value": float("nan")}, {"status": "skipped"},
                {"status": "failed", "reason": "  "}, None, {"status": "weird", "value": 1.0}):
        e = g.normalize("x", "g", res, 0.0, peak)
        assert e["status"] == "failed" and _reason(e["reason"]), (res, e)
    e = g.normalize("x", "g", {"status": "ok", "value": 3.0, "unit": "s"}, 0.0, peak)
    assert (e["status"], e["value"], e["reason"]) == ("ok", 3.0, None)


def test_only_selects_groups_and_names():
    g = _module()
    assert g.selected(["throughput"]) == [c for c in g.plan() if c[0] == "throughput"]
    assert g.selected(["loop/lq"]) == [("throughput", "loop/lq/resnet8"), ("throughput", "loop/lq/resnet18")]
    assert g.selected(["demo", "bare/resnet8"]) == [("throughput", "bare/resnet8"), ("demo", "demo")]
    assert g.selected(["nothing"]) == []
