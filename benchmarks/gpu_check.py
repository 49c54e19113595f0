"""One-command GPU check of cqd's CUDA paths: CUDA tests, throughput of the real loop vs a bare step, methods,
degradations, the quick demo, peak memory, and the syncs the loop makes (issue 33, part 1).

Writes `gpu_check.json` (into --out, default the current folder) after EACH case, so a run cut short keeps
what it measured, and `gpu_check.md` (a markdown table) at the end. Every case ends with a number or a
stated reason (skipped, or failed with the exception text); no case can crash the whole check.

On a GPU machine set up from the bundle (`bash scripts/gpu_bundle.sh --with-data`, run where pip has internet):

    pip install --no-index --no-deps --target .gpu_bundle/site .gpu_bundle/*.whl
    PYTHONPATH=src:.gpu_bundle/site python benchmarks/gpu_check.py --out gpu_check_out

Options: --device cuda|cpu (default cuda when available), --quick (tiny sizes: seconds on a CPU), --out DIR,
--only CASE (repeatable: a group such as `throughput`, or a case name such as `loop/lq/resnet8`),
--data-dir DIR (Fashion-MNIST for the demo), --budget-s S (cases after S seconds are skipped, default 290),
--demo-timeout-s S, --work DIR and --keep-work (the runs' scratch folder).

Cases (groups -> case names):
  cuda_tests    cuda_tests                    the test suite's CUDA-only cases (pytest in a subprocess)
  degradations  degradation/<family>          cost per image of each family at 224 px, batched on the device
  throughput    bare/<net>                    bare student step (fwd + bwd + SGD, channels_last, bf16 autocast)
                loop/{lq,cqd_cached,cqd_live}/<net>  images/s of the real loop (cqd.api.train); ratio to bare
  methods       step/{dml,afd,fitnet_cached,fitnet_live}  ms per step of the real loop
  sync_debug    sync_debug                    torch.cuda.set_sync_debug_mode("warn") over a few loop steps
  demo          demo                          wall time of `python -m cqd demo` (needs the Fashion-MNIST files)
<net>: resnet8 (32 px, batch 256) and resnet18 (torchvision's, 224 px, batch 128); --quick shrinks all of them.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import lzma
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SYNTH = "gpu_check_synthetic"  # the in-memory dataset this check registers (random uint8 images, 10 classes)


# ==== cqd internals: the ONLY place this check imports cqd (the src/ refactor moves modules: repoint here) ====
_C = None


def _cqd() -> SimpleNamespace:
    """The handful of cqd callables the check uses, imported once; everything else goes through the CLI.

    train(config dict) -> result dict, result["history"][i]["images_per_s"]   (the public API, cqd.api)
    DATASETS.register(name)(builder(root, split, image_size, on_corrupt))    (dataset registry)
    InMemoryImages(uint8 images (N, C, S, S), labels)                         (cqd.data.base)
    parse_degradation(spec) -> T; T.check(C, S); T.bind(uint8 bank); T(x, index) -> (z, box)
    create_model(name, num_classes, in_chans) -> nn.Module                   (the student the loop builds)

    Beside these the check relies only on: the run config's keys (Ctx.run_cfg), a finished run's
    `<out_dir>/model.pt` (the teachers), `python -m cqd demo --data-dir D out_dir=.. base.cache_dir=..` and its
    `<out_dir>/report/table.md`, and, to sort sync warnings by phase, the trainer's method names in
    _LOOP_FRAMES_OUT and `fit`/`_step` (a rename only blurs that sorting).
    """
    global _C
    if _C is None:
        from cqd.api import train
        from cqd.data import DATASETS
        from cqd.data.base import InMemoryImages
        from cqd.degradations import parse_degradation
        from cqd.models import create_model

        if SYNTH not in DATASETS:
            DATASETS.register(SYNTH)(_build_synthetic)
        _C = SimpleNamespace(train=train, create_model=create_model, parse_degradation=parse_degradation,
                             InMemoryImages=InMemoryImages)
    return _C
# ==== end of cqd internals ======================================================================================


def synthetic_images(n: int, size: int, seed: int):
    """Fashion-MNIST's in-memory shape (cqd.data.base.InMemoryImages: uint8 tensors sliced per batch), with
    3-channel random images of any size and 10 classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    data = _cqd().InMemoryImages(images, torch.randint(0, 10, (n,), generator=g))
    data.num_classes, data.classes = 10, [f"class{i}" for i in range(10)]
    data.mean, data.std = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)
    return data


_SYNTH_CACHE: dict = {}


def _build_synthetic(root, split, image_size=32, on_corrupt="error"):
    """data.root is `N_TRAIN:N_TEST` (item counts); built once per (root, split, size) in this process."""
    n_train, n_test = (int(v) for v in str(root).split(":"))
    key = (n_train, n_test, split, image_size)
    if key not in _SYNTH_CACHE:
        _SYNTH_CACHE[key] = synthetic_images(n_train if split == "train" else n_test, image_size,
                                             0 if split == "train" else 1)
    return _SYNTH_CACHE[key]


# ---- sizes -------------------------------------------------------------------------------------------------------

NETS = {  # name -> (model, image px, batch, steps per epoch, degradation of the loop's z)
    "full": {"resnet8": ("resnet8", 32, 256, 50, "lowres:size=8"),
             "resnet18": ("tv:resnet18", 224, 128, 30, "lowres:size=56")},
    "quick": {"resnet8": ("resnet8", 16, 16, 2, "lowres:size=4"),
              "resnet18": ("tv:resnet18", 16, 4, 2, "lowres:size=4")},
}
LOOPS = [("lq", "lq", True), ("cqd_cached", "cqd", True), ("cqd_live", "cqd", False)]  # (case, method, cache_teacher)
METHOD_CASES = [("dml", "dml", {}), ("afd", "afd", {}), ("fitnet_cached", "fitnet", {}),
                ("fitnet_live", "fitnet", {"feature_cache_mb": 0})]  # on resnet8 (its sizes)
FAMILIES = ["lowres", "blur", "noise", "jpeg", "edges", "tps", "clutter"]
GROUPS = ["cuda_tests", "degradations", "throughput", "methods", "sync_debug", "demo"]  # the order they run in


def family_spec(family: str, size: int) -> str:
    return {"lowres": f"lowres:size={size // 4}", "blur": f"blur:sigma={max(1.5, size / 75):.2g}",
            "noise": "noise:std=0.1", "jpeg": "jpeg:quality=20", "edges": "edges", "tps": "tps:grid=14,sigma=4",
            "clutter": f"clutter:canvas={2 * size}"}[family]


def plan() -> list[tuple[str, str]]:
    """Every (group, case name) the check reports, in order (the same with --quick)."""
    cases = [("cuda_tests", "cuda_tests")] + [("degradations", f"degradation/{f}") for f in FAMILIES]
    for net in NETS["full"]:
        cases += [("throughput", f"bare/{net}")] + [("throughput", f"loop/{c}/{net}") for c, _, _ in LOOPS]
    cases += [("methods", f"step/{c}") for c, _, _ in METHOD_CASES]
    return cases + [("sync_debug", "sync_debug"), ("demo", "demo")]


def selected(only: list[str] | None) -> list[tuple[str, str]]:
    if not only:
        return plan()
    return [(g, n) for g, n in plan() if any(o in (g, n) or n.startswith(o.rstrip("/") + "/") for o in only)]


# ---- measuring -----------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.nets = NETS["quick" if args.quick else "full"]
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.teachers: dict[str, Path] = {}
        self.bare: dict[str, float] = {}
        if self.cuda:
            self.precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
            self.amp = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        else:  # the CPU run only checks that every case works; fp32 keeps it fast where bf16 is emulated
            self.precision, self.amp = "32-true", None

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0) if self.args.budget_s else math.inf

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run_cfg(self, net: str, name: str, method: str, epochs: int, steps: int | None = None, cache: bool = True,
                train_extra: dict | None = None, teacher: Path | None = None) -> dict:
        model, size, batch, n_steps, spec = self.nets[net]
        steps = steps or n_steps
        cfg = {"name": name, "seed": 0, "out_dir": str(self.work / "runs" / name),
               "cache_dir": str(self.work / "cache"),
               "model": model,
               "data": {"name": SYNTH, "root": f"{steps * batch}:{batch}", "image_size": size, "degradation": spec},
               "train": {"epochs": epochs, "batch_size": batch, "max_steps_per_epoch": steps, "progress": False,
                         "precision": self.precision, "accelerator": self.device.type, "channels_last": True,
                         "cache_teacher": cache, **(train_extra or {})},
               "method": {"name": method}}
        if teacher is not None:
            cfg["teacher"] = {"checkpoint": str(teacher)}
        return cfg

    def train(self, cfg: dict) -> dict:
        """cqd's real loop, its log kept out of the terminal (its tail goes into a failure's reason)."""
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                return _cqd().train(cfg)
        except Exception as e:
            if buf.getvalue().strip() and hasattr(e, "add_note"):
                e.add_note(f"the run's log (tail): {buf.getvalue()[-1500:]}")
            raise

    def teacher(self, net: str) -> Path:
        """f for `net`: an `hq` run of one step (its weights are irrelevant to the timings), trained once."""
        if net not in self.teachers:
            cfg = self.run_cfg(net, f"teacher-{net}", "hq", epochs=1, steps=1)
            self.train(cfg)
            path = Path(cfg["out_dir"]) / "model.pt"
            if not path.is_file():
                raise FileNotFoundError(f"the teacher run wrote no {path}")
            self.teachers[net] = path
        return self.teachers[net]

    def loop(self, net: str, name: str, method: str, cache: bool = True, train_extra: dict | None = None,
             teacher: bool = False) -> dict:
        """Steady-state images/s of the real loop: the last epoch's rate; epoch 1 (warm-up) is left out."""
        _, size, batch, steps, _ = self.nets[net]
        cfg = self.run_cfg(net, name.replace("/", "-"), method, epochs=2, cache=cache, train_extra=train_extra,
                           teacher=self.teacher(net) if teacher else None)
        res = self.train(cfg)
        rates = [row.get("images_per_s") for row in res.get("history", [])]
        if not rates or not _finite(rates[-1]):
            raise RuntimeError(f"the run reported no images_per_s for its last epoch (history: {rates})")
        twin_mb = steps * batch * 3 * size * size * 4 / 2**20  # z of every item, fp32, as the trainer sizes them
        return {"ips": float(rates[-1]), "epochs_images_per_s": rates, "batch": batch, "image_size": size,
                "steps_per_epoch": steps, "precision": res.get("precision"), "model": cfg["model"],
                "twins_mb": round(twin_mb), "timing": "the trainer's wall time of epoch 2 (epoch 1: warm-up)"}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def timed(ctx: Ctx, fn, warmup: int, iters: int) -> float:
    """Seconds per call of fn, after `warmup` calls (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    if ctx.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


# ---- cases ---------------------------------------------------------------------------------------------------

def ok(value: float, unit: str, **details) -> dict:
    return {"status": "ok", "value": value, "unit": unit, "details": details}


def skipped(reason: str, **details) -> dict:
    return {"status": "skipped", "reason": reason, "details": details}


def child_env() -> dict:
    """The children import the cqd and packages this process imports: src first, PYTHONPATH made absolute."""
    env = dict(os.environ, CQD_NO_DOWNLOAD="1")
    here = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    src = str(Path(sys.modules["cqd"].__file__).resolve().parents[1]) if "cqd" in sys.modules else str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([src, *here]))
    return env


def case_cuda_tests(ctx: Ctx, explicit: bool) -> dict:
    import importlib.util

    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "cuda.is_available()" in p.read_text(errors="replace"))
    if not files:
        return skipped("no test file in tests/ uses torch.cuda.is_available()")
    if not ctx.cuda and not explicit:
        return skipped("device is cpu: the suite's CUDA cases skip themselves there (ask with --only cuda_tests to "
                       "run pytest anyway)", files=files)
    missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
    if missing:
        return skipped(f"{' and '.join(missing)} not importable (tests/conftest.py and the CUDA tests need pytest and "
                       "hypothesis): install the bundle's wheels", files=files)
    xml = ctx.work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-p", "no:cacheprovider", "-q", "-rfEs",
           f"--junitxml={xml}"]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                           timeout=max(30, min(300, ctx.left_s())))
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"pytest timed out after {e.timeout:.0f} s: {' '.join(cmd)}") from None
    tail = (p.stdout + p.stderr)[-3000:]
    if not xml.is_file():
        raise RuntimeError(f"pytest exited {p.returncode} without a report: {tail}")
    suites = ET.parse(xml).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    bad = []
    for tc in (tc for s in suites for tc in s.iter("testcase")):
        for child in tc:
            if child.tag in ("failure", "error"):
                bad.append(f"{tc.get('name')}: {(child.get('message') or child.text or '')[:300]}")
    details = {"passed": passed, "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"],
               "files": files, "selection": "-k cuda", "returncode": p.returncode, "failures": bad[:20]}
    if n["failures"] or n["errors"]:
        return {"status": "failed", "value": passed, "unit": "tests passed",
                "reason": f"{n['failures'] + n['errors']} of {n['tests']} CUDA tests failed: " + "; ".join(bad[:3]),
                "details": details}
    if n["tests"] == 0 or passed == 0:
        why = "no CUDA device" if not ctx.cuda else "see the pytest output"
        return skipped(f"all {n['tests']} selected tests skipped ({why})", output_tail=tail[-800:], **details)
    return ok(passed, "tests passed", **details)


def case_degradation(ctx: Ctx, family: str) -> dict:
    C = _cqd()
    size = 32 if ctx.quick else 224
    batch, warmup, iters = (4, 1, 2) if ctx.quick else (64, 2, 10)
    spec = family_spec(family, size)
    T = C.parse_degradation(spec)
    T.check(3, size)
    g = torch.Generator().manual_seed(0)
    if getattr(T, "needs_bank", False):
        T.bind(torch.randint(0, 256, (64, 3, size, size), generator=g, dtype=torch.uint8))
    x = torch.rand(batch, 3, size, size, generator=g).to(ctx.device)
    index = torch.arange(batch, device=ctx.device)
    s = timed(ctx, lambda: T(x, index, seed=0), warmup, iters)
    return ok(s / batch * 1e6, "us/image", spec=spec, batch=batch, image_size=size, iters=iters,
              images_per_s=batch / s)


def case_bare(ctx: Ctx, net: str) -> dict:
    model_name, size, batch, _, _ = ctx.nets[net]
    warmup, iters = (1, 2) if ctx.quick else (10, 40)
    torch.manual_seed(0)
    model = _cqd().create_model(model_name, num_classes=10, in_chans=3)
    model = model.to(ctx.device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, size, size, device=ctx.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=ctx.device)

    def step():
        with torch.autocast(ctx.device.type, dtype=ctx.amp or torch.bfloat16, enabled=ctx.amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = timed(ctx, step, warmup, iters)
    ctx.bare[net] = batch / s
    return ok(batch / s, "images/s", model=model_name, image_size=size, batch=batch, warmup=warmup, iters=iters,
              ms_per_step=s * 1000, autocast=str(ctx.amp).replace("torch.", "") if ctx.amp else "off (fp32)",
              channels_last=True, cudnn_benchmark=torch.backends.cudnn.benchmark)


def case_loop(ctx: Ctx, net: str, case: str, method: str, cache: bool) -> dict:
    r = ctx.loop(net, f"loop/{case}/{net}", method, cache=cache, teacher=method != "lq")
    bare = ctx.bare.get(net)
    ratio = r["ips"] / bare if bare else None
    note = "no teacher: train.cache_teacher does not apply" if method == "lq" else f"train.cache_teacher={cache}"
    res = ok(r["ips"], "images/s", ms_per_step=1000 * r["batch"] / r["ips"], bare_images_per_s=bare,
             note=note, **{k: v for k, v in r.items() if k != "ips"})
    res["ratio"] = ratio
    if ratio is None:
        res["details"]["ratio_reason"] = f"no bare/{net} measurement in this run"
    return res


def case_method(ctx: Ctx, case: str, method: str, train_extra: dict) -> dict:
    net = "resnet8"
    r = ctx.loop(net, f"step/{case}", method, train_extra=train_extra, teacher=method == "fitnet")
    return ok(1000 * r["batch"] / r["ips"], "ms/step", images_per_s=r["ips"], net=net,
              train_extra=train_extra, **{k: v for k, v in r.items() if k != "ips"})


_LOOP_FRAMES_OUT = {"_end_epoch", "evaluate", "_finish", "_checkpoint", "_open_logs", "__init__", "_restore"}


def case_sync_debug(ctx: Ctx) -> dict:
    if not ctx.cuda:
        return skipped("device is cpu: torch.cuda.set_sync_debug_mode only reports CUDA synchronizations")
    steps = 6
    cfg = ctx.run_cfg("resnet8", "sync-debug", "cqd", epochs=1, steps=steps, teacher=ctx.teacher("resnet8"))
    found: dict[tuple, dict] = {}
    others: list[str] = []

    def hook(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" not in text.lower():
            if len(others) < 20:
                others.append(f"{category.__name__}: {text[:200]} ({filename}:{lineno})")
            return
        stack = traceback.extract_stack()[:-1]
        cqd = [f for f in stack if f"{os.sep}cqd{os.sep}" in f.filename]
        names = {f.name for f in stack}
        if "fit" in names and not names & _LOOP_FRAMES_OUT:
            phase = "step loop" + (" (in _step)" if "_step" in names else " (between steps)")
        else:
            phase = "setup / epoch end / eval"
        site = cqd[-1] if cqd else None
        where = f"{_short(site.filename)}:{site.lineno} in {site.name}" if site else f"{filename}:{lineno}"
        key = (where, phase, text[:120])
        entry = found.setdefault(key, {"where": where, "phase": phase, "count": 0, "message": text[:300],
                                       "warned_at": f"{_short(filename)}:{lineno}",
                                       "cqd_stack": [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in cqd[-8:]]})
        entry["count"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ctx.train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sorted(found.values(), key=lambda e: (not e["phase"].startswith("step loop"), -e["count"]))
    in_loop = sum(e["count"] for e in syncs if e["phase"].startswith("step loop"))
    return ok(in_loop / steps, "syncs/step", steps=steps, syncs=syncs, total_warnings=sum(e["count"] for e in syncs),
              note="device waits in the step loop per step (setup, epoch end and evaluation listed apart)",
              other_warnings=others, method="cqd (teacher cache on)", net="resnet8")


def _short(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("cqd", "torch", "lightning_fabric", "kornia"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1:])
    return path


FMNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fashion_mnist_dir(ctx: Ctx) -> tuple[Path | None, str]:
    """A folder with the four Fashion-MNIST files cqd reads (.gz or raw): --data-dir, the bundle's copy (xz files,
    unpacked into the work folder), or where cqd looks by itself (Debian package, ~/.cache/cqd)."""
    def complete(d: Path) -> bool:
        return all((d / s).is_file() or (d / f"{s}.gz").is_file() for s in FMNIST)

    if ctx.args.data_dir:
        d = Path(ctx.args.data_dir)
        return ((d, "--data-dir") if complete(d)
                else (None, f"--data-dir {d} lacks some of {', '.join(FMNIST)} (.gz or raw)"))
    bundle = REPO / ".gpu_bundle" / "fashion-mnist"
    if all((bundle / f"{s}.xz").is_file() for s in FMNIST):
        out = ctx.work / "fashion-mnist"
        out.mkdir(parents=True, exist_ok=True)
        for s in FMNIST:
            if not (out / s).is_file():
                with lzma.open(bundle / f"{s}.xz") as src, open(out / f"{s}.part", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(out / f"{s}.part", out / s)
        return out, f"the bundle's {bundle} (unpacked)"
    if complete(bundle):
        return bundle, "the bundle"
    cache = Path(os.environ.get("CQD_CACHE", Path.home() / ".cache" / "cqd"))
    for d in (Path("/usr/share/datasets/fashion-mnist"), cache, cache / "FashionMNIST" / "raw"):
        if complete(d):
            return d, str(d)
    return None, ("Fashion-MNIST files not found (looked in --data-dir, .gpu_bundle/fashion-mnist, "
                  f"/usr/share/datasets/fashion-mnist, {cache}); "
                  "bring them with `bash scripts/gpu_bundle.sh --with-data`")


def case_demo(ctx: Ctx) -> dict:
    if ctx.quick:
        return skipped("--quick: the demo is a whole table (201 s on 2 CPU cores); run without --quick")
    data, where = fashion_mnist_dir(ctx)
    if data is None:
        return skipped(where)
    timeout = min(ctx.args.demo_timeout_s, ctx.left_s())
    if timeout < 30:
        return skipped(f"time budget: {ctx.left_s():.0f} s left of --budget-s {ctx.args.budget_s:g} "
                       "(the demo needs more)")
    out = ctx.work / "demo"
    cmd = [sys.executable, "-m", "cqd", "demo", "--data-dir", str(data), f"out_dir={out}",
           f"base.cache_dir={ctx.work / 'demo-cache'}"]
    if not ctx.cuda:
        cmd.append("base.train.accelerator=cpu")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        cells = len(list(out.rglob("result.json")))
        return {"status": "failed", "value": None, "unit": "s",
                "reason": f"timed out after {timeout:.0f} s with {cells} runs finished "
                          "(raise --demo-timeout-s / --budget-s)",
                "details": {"command": " ".join(cmd), "runs_finished": cells, "data": where}}
    wall = time.perf_counter() - t0
    cells = len(list(out.rglob("result.json")))
    if p.returncode != 0:
        return {"status": "failed", "value": None, "unit": "s",
                "reason": f"`cqd demo` exited {p.returncode}: {(p.stderr or p.stdout)[-1500:]}",
                "details": {"command": " ".join(cmd), "wall_s": wall, "data": where}}
    table = out / "report" / "table.md"
    return ok(wall, "s", command=" ".join(cmd), runs_finished=cells, data=where,
              table=table.read_text()[:4000] if table.is_file() else None)


# ---- running, recording ----------------------------------------------------------------------------------------

def case_fn(ctx: Ctx, name: str, explicit: set[str]):
    if name == "cuda_tests":
        return lambda: case_cuda_tests(ctx, explicit=bool(explicit & {"cuda_tests"}))
    if name.startswith("degradation/"):
        return lambda: case_degradation(ctx, name.split("/")[1])
    if name.startswith("bare/"):
        return lambda: case_bare(ctx, name.split("/")[1])
    if name.startswith("loop/"):
        _, case, net = name.split("/")
        method, cache = next((m, c) for c_, m, c in LOOPS if c_ == case)
        return lambda: case_loop(ctx, net, case, method, cache)
    if name.startswith("step/"):
        case = name.split("/")[1]
        method, extra = next((m, e) for c_, m, e in METHOD_CASES if c_ == case)
        return lambda: case_method(ctx, case, method, extra)
    if name == "sync_debug":
        return lambda: case_sync_debug(ctx)
    if name == "demo":
        return lambda: case_demo(ctx)
    raise KeyError(name)


def normalize(name: str, group: str, res, seconds: float, peak: tuple) -> dict:
    """One case's entry: status ok with a finite value, or skipped/failed with a non-empty reason."""
    if not isinstance(res, dict):
        res = {"status": "failed", "reason": f"BUG in gpu_check: case returned {type(res).__name__}, not a dict"}
    e = {"name": name, "group": group, "status": res.get("status"), "value": res.get("value"),
         "unit": res.get("unit"), "ratio": res.get("ratio"), "reason": res.get("reason"),
         "seconds": round(seconds, 3), "peak_gpu_mib": peak[0], "peak_gpu_reason": peak[1],
         "details": res.get("details") or {}}
    if e["value"] is not None and not _finite(e["value"]):
        e["details"]["bad_value"], e["value"] = repr(e["value"]), None
    if e["status"] == "ok" and e["value"] is None:
        e["status"], e["reason"] = "failed", "BUG in gpu_check: case said ok but returned neither a number nor a reason"
    if e["status"] not in ("ok", "skipped", "failed"):
        e["status"], e["reason"] = "failed", f"BUG in gpu_check: unknown status {e['status']!r}"
    if e["status"] != "ok" and not (isinstance(e["reason"], str) and e["reason"].strip()):
        e["status"], e["reason"] = "failed", "BUG in gpu_check: case returned neither a number nor a reason"
    if e["ratio"] is not None and not _finite(e["ratio"]):
        e["ratio"] = None
    return e


class Recorder:
    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.cases = out, meta, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, entry: dict) -> None:
        self.cases.append(entry)
        self.write_json()

    def write_json(self) -> None:
        tmp = self.out / "gpu_check.json.part"
        tmp.write_text(json.dumps({"meta": self.meta, "cases": self.cases}, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")

    def write_md(self) -> None:
        m = self.meta
        lines = [f"# GPU check: {m.get('device_name')} ({m.get('device')}), torch {m.get('torch')}, "
                 f"{'--quick, ' if m['args'].get('quick') else ''}{m.get('finished') or 'not finished'}", "",
                 "| case | status | value | unit | loop/bare | peak GPU MiB | s | note |",
                 "|---|---|---:|---|---:|---:|---:|---|"]
        for e in self.cases:
            ratio = "" if e["ratio"] is None else f"{e['ratio']:.3f}" + (" (below 0.8)" if e["ratio"] < 0.8 else "")
            mem = "" if e["peak_gpu_mib"] is None else f"{e['peak_gpu_mib']:.0f}"
            note = e["reason"] or e["details"].get("note") or e["details"].get("spec") or ""
            note = " ".join(str(note).split())[:160].replace("|", "/")
            value = "" if e["value"] is None else f"{e['value']:.4g}"
            lines.append(f"| {e['name']} | {e['status']} | {value} | {e['unit'] or ''} | {ratio} | {mem} | "
                         f"{e['seconds']:.1f} | {note} |")
        sync = next((e for e in self.cases if e["name"] == "sync_debug" and e["status"] == "ok"), None)
        if sync:
            lines += ["", "## Synchronizations (torch.cuda.set_sync_debug_mode('warn'))", "",
                      "| phase | count | where (cqd) | warned at |", "|---|---:|---|---|"]
            lines += [f"| {s['phase']} | {s['count']} | {s['where']} | {s['warned_at']} |"
                      for s in sync["details"]["syncs"]]
        tests = next((e for e in self.cases if e["name"] == "cuda_tests"), None)
        if tests and tests["details"].get("failures"):
            lines += ["", "## CUDA test failures", ""] + [f"- {f}" for f in tests["details"]["failures"]]
        lines += ["", f"peak GPU memory: {self.meta.get('peak_note')}", ""]
        (self.out / "gpu_check.md").write_text("\n".join(lines))


def peak_reset(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_read(ctx: Ctx, name: str) -> tuple:
    if not ctx.cuda:
        return None, "device is cpu: torch.cuda.max_memory_allocated measures CUDA memory only"
    if name in ("cuda_tests", "demo"):
        return None, "ran in a subprocess: this process's allocator does not see it"
    return torch.cuda.max_memory_allocated(ctx.device) / 2**20, None


def meta_info(args) -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("torchvision", "timm", "numpy", "pydantic", "pydantic_core", "kornia", "kornia_rs", "lightning-fabric",
                 "lightning-utilities", "pytest", "hypothesis", "tensorboard", "protobuf", "PyYAML"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    cuda = args.device == "cuda"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, or no repository: the commit stays unknown
        commit = ""
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"), "finished": None, "complete": False,
            "args": vars(args), "device": args.device, "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "versions": versions, "git_commit": commit or None,
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "peak_note": ("torch.cuda.max_memory_allocated, reset before each case" if cuda
                          else "null on the CPU (CUDA memory only)")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a few steps, small batches (seconds on a CPU)")
    ap.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.md (default: here)")
    ap.add_argument("--only", action="append", metavar="CASE",
                    help=f"run only this group ({', '.join(GROUPS)}) or case name (e.g. loop/lq/resnet8); repeatable")
    ap.add_argument("--data-dir",
                    help="Fashion-MNIST folder for the demo (default: the bundle's, then cqd's own places)")
    ap.add_argument("--budget-s", type=float, default=290,
                    help="cases starting after this many seconds are skipped (0: none)")
    ap.add_argument("--demo-timeout-s", type=float, default=240)
    ap.add_argument("--work", help="scratch folder for the runs (default: a new temporary folder, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu")
    todo = selected(args.only)
    if not todo:
        names = ", ".join(GROUPS + [n for _, n in plan()])
        ap.error(f"--only {args.only} matches no case; choose from: {names}")

    ctx = Ctx(args)
    rec = Recorder(Path(args.out), meta_info(args))
    print(f"gpu_check: {len(todo)} cases on {rec.meta['device_name']} ({args.device}, torch {torch.__version__}"
          f"{', --quick' if args.quick else ''}); results in {Path(args.out).resolve()}/gpu_check.json", flush=True)
    explicit = set(args.only or [])
    try:
        for i, (group, name) in enumerate(todo, 1):
            t0 = time.perf_counter()
            if ctx.left_s() <= 0:
                res = skipped(f"time budget: --budget-s {args.budget_s:g} was spent before this case")
            else:
                peak_reset(ctx)
                try:
                    res = case_fn(ctx, name, explicit)()
                except Exception as e:  # noqa: BLE001 - one case's failure is that case's result
                    tb = traceback.format_exception(type(e), e, e.__traceback__)
                    notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", ()))
                    res = {"status": "failed", "reason": f"{type(e).__name__}: {e}{notes}"[:4000],
                           "details": {"traceback": "".join(tb)[-3000:]}}
            try:
                peak = peak_read(ctx, name) if res.get("status") != "skipped" else (None, "case skipped")
            except Exception as e:  # noqa: BLE001
                peak = (None, f"could not read: {type(e).__name__}: {e}")
            entry = normalize(name, group, res, time.perf_counter() - t0, peak)
            rec.add(entry)
            shown = (f"{entry['value']:.4g} {entry['unit']}" if entry["value"] is not None else "")
            shown += f" (loop/bare {entry['ratio']:.2f})" if entry["ratio"] is not None else ""
            why = f" - {' '.join(str(entry['reason']).split())[:200]}" if entry["reason"] else ""
            print(f"[{i:2d}/{len(todo)}] {name}: {entry['status']} {shown}{why} ({entry['seconds']:.1f} s)", flush=True)
    except KeyboardInterrupt:
        print("gpu_check: interrupted; gpu_check.json holds the cases measured so far", file=sys.stderr)
        return 130
    finally:
        rec.meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        rec.meta["complete"] = len(rec.cases) == len(todo)
        rec.meta["wall_s"] = round(time.perf_counter() - ctx.t0, 1)
        rec.write_json()
        rec.write_md()
        if not args.keep_work and not args.work:
            shutil.rmtree(ctx.work, ignore_errors=True)
    print((Path(args.out) / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
