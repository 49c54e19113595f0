"""The poster's multi-resolution model: a quality predictor routes each test image to the right model.

A small classifier (same model factory, 2 classes: 0 = high quality x, 1 = low quality z = T(x)) is
trained on the paired data through the engine (method `quality`). A test image predicted high quality goes to f
(trained on x, method hq, also CQD's teacher); one predicted low quality goes to the CQD model g. The table
compares f alone, g alone, one A+B model, this router and the oracle router (true quality) on the high-quality test
views x, the low-quality views z and their union.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from cqd.data.paired import Pair
from cqd.engine.checkpoint import weight_settings
from cqd.engine.loaders import eval_loader
from cqd.engine.model_files import MODEL, load_model
from cqd.engine.precision import make_fabric
from cqd.engine.schema import RunConfig
from cqd.engine.teachers import teacher_run_config
from cqd.engine.trainer import train
from cqd.errors import CheckpointError
from cqd.files import load_checkpoint, save_json, save_text
from cqd.methods import METHODS
from cqd.tasks.classification.data import build_datasets, make_maker

ROWS = {
    "hq": "Train on high quality (A): f",
    "cqd": "CQD: g",
    "augment": "Train on high + low quality (A+B)",
    "router": "Multi-quality (predicted quality routes to f or g)",
    "oracle": "Oracle (true quality routes to f or g)",
}
COLUMNS = {"hi": "Test on high quality (x)", "lo": "Test on low quality (z)", "hi+lo": "Test on high + low quality"}
# Settings that cannot change a trained model's weights: a finished run is reused across them.
_NEUTRAL = {"name", "out_dir", "cache_dir", "data.num_workers", "train.progress", "train.eval_every",
            "train.accelerator", "train.devices", "train.strategy", "train.cache_teacher"}


def derive(cfg: RunConfig, sub: str, method: str) -> RunConfig:
    """The run an analysis keeps under `<cfg.out_dir>/<sub>`; hq is f's run, as the engine derives it."""
    if method == "hq":
        d = teacher_run_config(cfg)
    else:
        d = cfg.model_copy(deep=True)
        d.method.name = method
    d.name, d.out_dir = f"{cfg.name}-{sub}", str(Path(cfg.out_dir) / sub)
    return d


def _settings(dump: dict, uses_teacher: bool) -> dict:
    """What decides a run's weights; the method and teacher sections count only when f is used."""
    return {k: v for k, v in weight_settings(dump).items()
            if k not in _NEUTRAL and (uses_teacher or not k.startswith(("method.", "teacher"))) or k == "method.name"}


def _check_same(path: Path, wanted: RunConfig, uses_teacher: bool) -> None:
    a, b = (_settings(load_checkpoint(path).get("config", {}), uses_teacher),
            _settings(wanted.model_dump(), uses_teacher))
    diff = [f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if diff:
        raise CheckpointError(f"{path} was trained with other settings: {', '.join(diff)}. Delete {path.parent} "
                              f"to retrain it, or set out_dir to a new folder")


def trained(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """`<cfg.out_dir>/model.pt`: reused if a finished run with the same settings is there, else trained now."""
    path = Path(cfg.out_dir) / MODEL
    if path.is_file():
        _check_same(path, cfg, METHODS.get(cfg.method.name).needs_teacher(cfg))
        log(f"reusing {path}")
    else:
        log(f"training {cfg.method.name} into {cfg.out_dir}")
        train(cfg, resume=True)
    return path


def trained_f_and_g(cfg: RunConfig, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """f (teacher.checkpoint, else method hq under `<out_dir>/hq`) and the CQD model g distilled from it
    (`<out_dir>/cqd`)."""
    f = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else trained(derive(cfg, "hq", "hq"), log)
    gcfg = derive(cfg, "cqd", "cqd")
    gcfg.teacher.checkpoint = str(f)
    g = Path(gcfg.out_dir) / MODEL
    if g.is_file() and f.stat().st_mtime > g.stat().st_mtime:
        raise CheckpointError(f"{g} was distilled from an older {f}; delete {g.parent} to distill it again from this f")
    return f, trained(gcfg, log)


def route(is_low: Tensor, pred_hq: Tensor, pred_lq: Tensor) -> Tensor:
    """Per image: g's prediction where the image is (predicted) low quality, else f's."""
    return torch.where(is_low, pred_lq, pred_hq)


@torch.no_grad()
def score(models: dict[str, nn.Module], pairs: Iterable[Pair]) -> dict:
    """Accuracies of every row on x ("hi"), z ("lo") and both; `models` holds hq (f), cqd (g), augment, router."""
    for m in models.values():
        m.eval()
    rows = [*(k for k in models if k != "router"), "router", "oracle"]
    correct = {r: {"hi": 0, "lo": 0} for r in [*rows, "quality"]}
    n = 0
    for pair in pairs:
        n += len(pair)
        for view, img in (("hi", pair.x), ("lo", pair.z)):
            pred = {k: m(img).float().argmax(1) for k, m in models.items()}
            is_low = pred.pop("router") == 1
            pred["router"] = route(is_low, pred["hq"], pred["cqd"])
            pred["oracle"] = route(torch.full_like(is_low, view == "lo"), pred["hq"], pred["cqd"])
            for r in rows:
                correct[r][view] += int((pred[r] == pair.y).sum())
            correct["quality"][view] += int((is_low == (view == "lo")).sum())
    return {r: {"hi": c["hi"] / n, "lo": c["lo"] / n, "hi+lo": (c["hi"] + c["lo"]) / (2 * n)}
            for r, c in correct.items()}


def format_table(acc: dict) -> str:
    """The poster's layout: rows as in ROWS, columns hi / lo / hi+lo, accuracies in %."""
    lines = ["| Model | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {label} | " + " | ".join(f"{100 * acc[r][c]:.1f}" for c in COLUMNS) + " |"
              for r, label in ROWS.items()]
    return "\n".join(lines) + "\n"


def multires(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or reuse) f, g, A+B and the quality predictor under `cfg.out_dir`, score them, write
    multires.md and multires.json there; returns the JSON's content."""
    out = Path(cfg.out_dir)
    paths = dict(zip(("hq", "cqd"), trained_f_and_g(cfg, log)))
    paths["augment"] = trained(derive(cfg, "augment", "augment"), log)

    paths["router"] = trained(derive(cfg, "router", "quality"), log)  # the quality predictor (method quality)

    fabric = make_fabric(cfg.train, devices=1)
    _, test_ds, _, base_test = build_datasets(cfg)
    classes, chans = base_test.num_classes, base_test.in_chans
    models = {k: load_model(p, 2 if k == "router" else classes, chans)[0].to(fabric.device) for k, p in paths.items()}
    maker = make_maker(cfg, base_test)
    with fabric.autocast():
        acc = score(models, (maker(b, fabric.device) for b in eval_loader(cfg, test_ds, base_test)))
    table = format_table(acc)
    result = {"degradation": cfg.data.degradation, "n_test": len(test_ds), "columns": COLUMNS,
              "rows": {r: {"label": label, **acc[r]} for r, label in ROWS.items()},
              "router_accuracy": acc["quality"], "models": {k: str(p) for k, p in paths.items()},
              "table": table, "config": cfg.model_dump()}
    save_text(f"# Multi-quality model: {cfg.data.degradation}, {len(test_ds)} test images per view\n\n{table}",
              out / "multires.md")
    save_json(result, out / "multires.json")
    return result
