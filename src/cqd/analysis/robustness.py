"""`cqd robustness`: top-1 of several models under a sweep of degradations, with ImageNet-C's mCE.

The sweep (`cqd.degradations.sweep`: families of one parameter at several severities, the run's own T, and the
clean test set) is validated before anything runs. For each spec the degraded views of the test set are made
once, batched on the device, and every model is scored on them: the same items and the same draws for every
model, and the draws `cqd eval` makes with data.degradation=<spec> (seeded by data.seed and the item). The test
set is decoded once and kept on the device when it fits in data.twin_cache_mb.

mCE (Hendrycks & Dietterich, ImageNet-C): for each family f, CE_f = the model's top-1 errors summed over f's
severities / the baseline model's sum; mCE = the mean of CE_f over the families (the baseline's is 1). Clean
top-1 is reported beside it and counts in neither mCE nor the mean top-1 over all severities.
"""
from __future__ import annotations

import csv
import io
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from cqd.degradations.sweep import Family, SweepConfig, expand
from cqd.errors import ConfigError
from cqd.files import save_json, save_text

CLEAN = "clean"
FIELDS = ("label", "model", "method", "family", "severity", "spec", "top1", "error", "n")


def _labels(paths: list[Path], methods: list[str]) -> list[str]:
    """Each model's method name; a name two models share gets the model's folder appended."""
    out = [m if methods.count(m) == 1 else f"{m} ({p.parent.name or p.stem})" for p, m in zip(paths, methods)]
    return [lab if out.count(lab) == 1 else f"{lab} #{i + 1}" for i, lab in enumerate(out)]


def _load(paths: list[Path], cfg, base_test) -> list[dict]:
    """Each model built for the config's data, as `cqd eval` runs it: deployed form, its own Fabric (int8: fp32)."""
    from cqd.compress.compressor import deployed
    from cqd.engine.model_files import load_model
    from cqd.engine.precision import make_fabric

    fabrics, models = {}, []
    for path in paths:
        model, ck = load_model(path, None, base_test.in_chans)
        model.eval()  # (before deployed: an exported int8 graph's eval() returns None)
        size = ck.get("image_size") or (ck.get("config") or {}).get("data", {}).get("image_size")
        if size and size != cfg.data.image_size:
            warnings.warn(f"{path} was trained on {size}-px images; it is scored at data.image_size="
                          f"{cfg.data.image_size}", stacklevel=2)
        if ck["num_classes"] != base_test.num_classes or ck.get("sym") is not None:
            raise ConfigError(f"{path} does not classify the config's {base_test.num_classes} classes from an image "
                              "alone (a quality predictor, or a network conditioned on a mix c); robustness "
                              "scores plain classifiers")
        model, form = deployed(model, ck, path)
        if cfg.train.channels_last and form == "fp32":  # the views are channels_last: the weights too (~25% faster)
            model = model.to(memory_format=torch.channels_last)
        precision = "32-true" if form == "int8" else cfg.train.precision
        if precision not in fabrics:
            fabrics[precision] = make_fabric(cfg.train.model_copy(update={"precision": precision}), devices=1)
        fabric = fabrics[precision]
        method = (ck.get("config") or {}).get("method", {}).get("name") or "?"
        models.append({"path": path, "method": method, "form": form, "fabric": fabric,
                       "net": fabric.setup_module(model)})
    return models


def _decoded(loader, device, budget_mb: int) -> list[dict] | None:
    """The test batches on `device`, decoded once, when they fit in `budget_mb` (else None: decode per spec)."""
    kept, size = [], 0
    for batch in loader:
        size += sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
        if size > budget_mb * 2**20:
            return None
        kept.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return kept


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _score(models: list[dict], maker, batches, device, clock: dict) -> list[tuple[int, int]]:
    """(correct, total) of each model on the views `maker` makes of `batches`; the view is made once for all."""
    counts = torch.zeros(len(models), 2, dtype=torch.long, device=device)
    for batch in batches():
        t0 = time.perf_counter()
        _, z, _ = maker.views(batch, device)
        z, y = maker.normalize(z), batch["label"].to(device)
        _sync(device)
        t1 = time.perf_counter()
        for i, m in enumerate(models):
            with nullcontext() if m["form"] == "int8" else m["fabric"].autocast():
                pred = m["net"](z).float().argmax(1)
            counts[i, 0] += (pred == y).sum()
        counts[:, 1] += len(y)
        _sync(device)
        clock["views_s"] += t1 - t0
        clock["forward_s"] += time.perf_counter() - t1
        clock["images"] += len(y)
    return [tuple(c) for c in counts.tolist()]


def _families(cfg, specs: list[str] | None) -> tuple[list[Family], list[str]]:
    sweep = cfg.robustness or SweepConfig()
    if specs:
        sweep = sweep.model_copy(update={"specs": SweepConfig(specs=list(specs)).specs})
    own = None if cfg.data.mix is not None else cfg.data.degradation
    families, notes = expand(sweep, cfg.data.image_size, own)
    return [Family(CLEAN, [("-", "none")]), *families], notes


def _baseline(baseline, paths: list[Path], labels: list[str]) -> int:
    if baseline is None:
        return 0
    if isinstance(baseline, int) and 0 <= baseline < len(paths):
        return baseline
    for i, (p, lab) in enumerate(zip(paths, labels)):
        if str(baseline) == lab or Path(str(baseline)).expanduser().resolve() == p.resolve():
            return i
    raise ConfigError(f"baseline {baseline!r} is none of the models ({', '.join(map(str, paths))}) nor their labels "
                      f"({', '.join(labels)})")


def robustness(model_paths, cfg, specs: list[str] | None = None, baseline=None, out=None,
               labels: list[str] | None = None, log=print) -> dict:
    """Score every model of `model_paths` on the sweep of `cfg` (`specs` replaces it) and write robustness.csv,
    .json, .md and .png in `out` (default <out_dir>/robustness). `baseline` (a path, label or index; default
    the first model) is mCE's reference; `labels` name the models (default: their methods)."""
    from cqd.engine.loaders import eval_loader
    from cqd.engine.precision import flush_denormals
    from cqd.tasks import task_of

    paths = [Path(p).expanduser() for p in model_paths]
    if not paths:
        raise ConfigError("give at least one model")
    task = task_of(cfg)
    if task.name != "classification":
        raise ConfigError(f"robustness scores classifiers (top-1); this config's task is {task.name!r}")
    families, notes = _families(cfg, specs)  # validated before anything is loaded or run
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"model file(s) {', '.join(missing)} do not exist")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"{len(labels)} labels for {len(paths)} models")
    t0 = time.perf_counter()
    with flush_denormals():
        _, test_ds, _, base_test = task.build_datasets(cfg)
        models = _load(paths, cfg, base_test)
        labels = list(labels) if labels else _labels(paths, [m["method"] for m in models])
        ref = _baseline(baseline, paths, labels)
        device = models[0]["fabric"].device
        loader = eval_loader(cfg, test_ds, base_test)
        kept = _decoded(loader, device, cfg.data.twin_cache_mb)
        batches = (lambda: kept) if kept is not None else (lambda: loader)
        clock, rows = {"views_s": 0.0, "forward_s": 0.0, "images": 0}, []
        for family in families:
            for severity, spec in family.severities:
                data = cfg.data.model_copy(update={"degradation": spec, "mix": None})
                maker = task.make_maker(cfg.model_copy(update={"data": data}), base_test)
                for m, lab, (correct, n) in zip(models, labels, _score(models, maker, batches, device, clock)):
                    rows.append({"label": lab, "model": str(m["path"]), "method": m["method"], "family": family.name,
                                 "severity": severity, "spec": spec, "top1": correct / n, "error": 1 - correct / n,
                                 "n": n})
                log(f"robustness: {spec}: " + ", ".join(f"{r['label']} {100 * r['top1']:.1f}%"
                                                         for r in rows[-len(models):]))
    clock.update(total_s=time.perf_counter() - t0, device=str(device), decoded_once=kept is not None)
    clock["images_per_s"] = clock["images"] * len(models) / clock["total_s"]
    res = {"models": summarize(rows, families, labels, ref), "baseline": labels[ref], "n_test": len(test_ds),
           "families": [{"name": f.name, "severities": f.severities} for f in families], "notes": notes,
           "timing": clock, "rows": rows}
    return write(res, Path(out) if out else Path(cfg.out_dir) / "robustness")


def summarize(rows: list[dict], families: list[Family], labels: list[str], ref: int) -> list[dict]:
    """Per model: clean top-1, mean top-1 over every severity of every family, CE per family and mCE."""
    errors = {(r["label"], r["family"]): [] for r in rows}
    for r in rows:
        errors[(r["label"], r["family"])].append(r["error"])
    swept = [f.name for f in families if f.name != CLEAN]
    out = []
    for lab in labels:
        ce = {}
        for f in swept:
            base = sum(errors[(labels[ref], f)])
            ce[f] = sum(errors[(lab, f)]) / base if base > 0 else None  # a baseline without errors: undefined
        defined = [v for v in ce.values() if v is not None]
        tops = [1 - e for f in swept for e in errors[(lab, f)]]
        out.append({"label": lab, "clean": 1 - errors[(lab, CLEAN)][0], "mean_top1": statistics.fmean(tops),
                    "mCE": statistics.fmean(defined) if defined else None, "ce": ce})
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(res: dict) -> str:
    """The summary table (clean, mean top-1, mCE, CE per family) and one top-1 table per family."""
    swept = [f for f in res["families"] if f["name"] != CLEAN]
    head = ["model", "clean", "mean top-1", "mCE"] + [f"CE {f['name']}" for f in swept]
    lines = [f"Top-1 (%) of {len(res['models'])} model(s) on {res['n_test']} test images under "
             f"{sum(len(f['severities']) for f in swept)} degradations; mCE and CE relative to "
             f"{res['baseline']} (= 100).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in res["models"]:
        lines.append(f"| {m['label']} | {_pct(m['clean'])} | {_pct(m['mean_top1'])} | {_pct(m['mCE'])} | "
                     + " | ".join(_pct(m["ce"][f["name"]]) for f in swept) + " |")
    top = {(r["label"], r["spec"]): r["top1"] for r in res["rows"]}
    for f in swept:
        specs = f["severities"]
        lines += ["", f"**{f['name']}** (top-1 %, mildest first)", "",
                  "| model | " + " | ".join(label for label, _ in specs) + " |", "|" + "---|" * (len(specs) + 1)]
        lines += [f"| {m['label']} | " + " | ".join(_pct(top[(m["label"], s)]) for _, s in specs) + " |"
                  for m in res["models"]]
    lines += [""] + [f"Note: {n}." for n in res["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def write(res: dict, out: Path) -> dict:
    """robustness.csv (one line per model and spec), .json (everything), .md and .png in `out`."""
    from cqd.reports.figures import robustness_figure

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: r[k] for k in FIELDS} for r in res["rows"])
    save_text(buf.getvalue(), out / "robustness.csv")
    res["figure"] = {"path": str(out / "robustness.png"),
                     "lines": robustness_figure(res["rows"], res["families"], out / "robustness.png")}
    res["markdown"] = markdown(res)
    save_text(res["markdown"], out / "robustness.md")
    save_json(res, out / "robustness.json")
    res["out"] = str(out)
    return res


def grid_robustness(cells, grid, report_dir: Path, log=print) -> str:
    """A grid's `robustness:`: the first seed's models of the listed rows in one column, swept after the table;
    returns its markdown section (also appended to table.md) and writes report/robustness/."""
    want, seed = grid.robustness, grid.seeds[0]
    done = {(c.column, c.row): c for c, res in cells if res is not None and c.row is not None and c.cfg.seed == seed}
    found = [(row, done[(want.column, row)]) for row in want.rows if (want.column, row) in done]
    if not found:
        return ""
    paths = [Path(c.cfg.teacher_list[0].checkpoint) if c.kind == "eval" else Path(c.cfg.out_dir) / "model.pt"
             for _, c in found]
    label = {r.id: r.label or r.id for r in grid.rows}
    res = robustness(paths, found[0][1].cfg, out=report_dir / "robustness", labels=[label[r] for r, _ in found],
                     log=log)
    section = (f"\n## Robustness (column {want.column}, seed {seed})\n\n" + res["markdown"].split("\n\n**")[0].rstrip()
               + "\n\nPer-severity tables and the curves: robustness/robustness.md, robustness/robustness.png\n")
    table = report_dir / "table.md"
    save_text((table.read_text() if table.is_file() else "") + section, table)
    return section
