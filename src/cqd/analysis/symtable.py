"""One student for every quality mix (`cqd sym`): the sym-parameter CQD student against K specialists.

Trains, per seed, as one grid (`engine/grid.py`: resumable, several processes share it through cell locks,
one teacher f per seed shared by every student): the sym-parameter student `symcqd` on blends z_c, the c
regressor `quality_mix`, K CQD students each on one pure degradation T_k, A+B (`augment`) on blends without
c and CQD on blends without c. Then scores them on test sets of fixed c: the K corners, the K(K-1)/2
mid-points, the centre, and `eval.random` random Dirichlet(`eval.random_alpha`) mixes (test item i gets
mix i mod R, so every item is seen once per group: the R mixes share the test set instead of each taking a
whole copy of it, which would cost R times the evaluation).

Rows: (1) g(z_c, c) with the true c; (2) with c predicted by the regressor; (3) the K specialists routed by
the predicted dominant degradation argmax c_hat; (4) routed by the true one (oracle; at the mid-points and
the centre the tie goes to the first listed degradation); (5) A+B on blends; (6) CQD on blends without c.
Each row's parameters and test-time cost (FLOPs per image of the networks it runs, counted with torch's
FlopCounterMode) are reported beside its accuracies.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field, field_validator
from torch import nn

from cqd.config import apply_overrides, load_yaml, validate
from cqd.engine.loaders import eval_loader
from cqd.engine.model_files import MODEL, load_model
from cqd.engine.precision import flush_denormals, make_fabric
from cqd.engine.schema import RunConfig
from cqd.errors import CheckpointError, ConfigError
from cqd.experiments.grid import cell_config, run_grid
from cqd.experiments.locks import claim
from cqd.experiments.schema import ColumnConfig, GridConfig, RowConfig, distinct_seeds, with_base
from cqd.files import load_json, save_json, save_text
from cqd.methods.symcqd import conditioned_logits, predict_mix
from cqd.schema import Strict
from cqd.sym import corners_midpoints_centre, draw_c
from cqd.tasks.classification.data import build_datasets, make_maker

COLUMN = "mix"
RANDOM_STREAM = 0x5D  # the random test mixes' draws, apart from the training mixes' (cqd.sym.C_STREAM)
ROWS = {
    "sym_true": "(1) sym-parameter student, true c",
    "sym_pred": "(2) sym-parameter student, predicted c",
    "route_pred": "(3) K CQD specialists, routed by predicted dominant T",
    "route_true": "(4) K CQD specialists, routed by true dominant T (oracle)",
    "augment_mix": "(5) A+B on blends, no c",
    "cqd_mix": "(6) CQD on blends, no c",
}
GROUPS = {"corners": "corners (pure T_k)", "midpoints": "mid-points", "centre": "centre", "random": "random mixes"}


class SymEvalConfig(Strict):
    random: int = Field(200, ge=1, description="random Dirichlet test mixes (item i of the test set gets mix i mod R)")
    random_alpha: float = Field(1.0, gt=0, description="their Dirichlet concentration (1: uniform on the simplex)")


class SymTableConfig(Strict):
    """`cqd sym`: the base run (with data.mix), seeds and the test mixes."""

    name: str = "Sym-parameter student vs K specialists"
    out_dir: str = "runs/sym"
    seeds: list[int] = Field([0], min_length=1)
    reference: str | None = Field(None, description="text printed under the table")
    base: RunConfig
    eval: SymEvalConfig = SymEvalConfig()

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        return distinct_seeds(v)

    def model_post_init(self, _) -> None:
        if self.base.data.mix is None:
            raise ConfigError("cqd sym compares students on quality mixes: set base.data.mix.degradations "
                              "(e.g. [lowres:size=8, blur:sigma=1.5, noise:std=0.2, jpeg:quality=10])")


def load_sym_config(path: str | Path | dict, overrides: list[str] = ()) -> SymTableConfig:
    overrides = list(overrides)
    data = apply_overrides(path if isinstance(path, dict) else load_yaml(path), overrides)
    return validate(with_base(SymTableConfig, data), data, "(dict)" if isinstance(path, dict) else str(path), overrides)


def specialist_ids(degradations: list[str]) -> list[str]:
    return [f"cqd{k + 1}_{spec.split(':')[0]}" for k, spec in enumerate(degradations)]


def grid_of(cfg: SymTableConfig) -> GridConfig:
    """The training runs as one grid: one column (the base's mix), a row per network the table needs."""
    degs = cfg.base.data.mix.degradations
    rows = [RowConfig(id="sym", label=ROWS["sym_true"], set={"method.name": "symcqd"}),
            RowConfig(id="quality", label="quality regressor (c from z_c)", set={"method.name": "quality_mix"})]
    rows += [RowConfig(id=i, label=f"CQD on {spec} alone",
                       set={"method.name": "cqd", "data.mix": None, "data.degradation": spec})
             for i, spec in zip(specialist_ids(degs), degs)]
    rows += [RowConfig(id="augment_mix", label=ROWS["augment_mix"], set={"method.name": "augment"}),
             RowConfig(id="cqd_mix", label=ROWS["cqd_mix"], set={"method.name": "cqd"})]
    return GridConfig(name=cfg.name, out_dir=cfg.out_dir, seeds=cfg.seeds, rows=rows,
                      columns={COLUMN: ColumnConfig(label="blends of " + ", ".join(degs))}, base=cfg.base)


def mixes_of(cfg: SymTableConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (group, c table (R, K)): corners, mid-points, centre (one mix each) and the R random mixes."""
    k = len(cfg.base.data.mix.degradations)
    out = {}
    for name, c in corners_midpoints_centre(k).items():
        group = "corners" if name.startswith("corner") else "midpoints" if name.startswith("mid") else "centre"
        out[name] = (group, torch.tensor([c]))
    r = cfg.eval.random
    out["random"] = ("random",
                     draw_c(cfg.base.data.seed, torch.arange(r), None, cfg.eval.random_alpha, k, RANDOM_STREAM))
    return out


def route(spec_preds: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per image, the prediction of the specialist of its dominant degradation argmax_k c_k (ties: the first
    listed); `spec_preds` is (K, B), specialist k's predictions."""
    return spec_preds[c.argmax(1), torch.arange(spec_preds.shape[1], device=spec_preds.device)]


def flops_per_image(model: nn.Module, sample: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*sample)
    return counter.get_total_flops() / sample[0].shape[0]


def _load_nets(cells: dict[str, RunConfig], spec_ids: list[str], classes: int, chans: int,
               dev: torch.device) -> dict[str, nn.Module]:
    """Every row's network on `dev`, in eval mode; the quality regressor has one output per specialist."""
    nets = {}
    for rid, c in cells.items():
        nets[rid] = load_model(Path(c.out_dir) / MODEL, len(spec_ids) if rid == "quality" else classes,
                               chans)[0].to(dev).eval()
    return nets


def _score_mix(fabric, maker, loader, nets: dict[str, nn.Module], specialists: list[nn.Module],
               k: int) -> tuple[dict[str, int], int, float, int]:
    """One pass over the test set at the maker's current mixes: correct predictions per row, the number of
    items, the regressor's summed mean abs. error of c and its count of dominant degradations named."""
    dev = fabric.device
    correct = {r: 0 for r in ROWS}
    n, mae, dominant = 0, 0.0, 0
    for batch in loader:
        pair = maker(batch, dev)
        z, c, y = pair.z, pair.c, pair.y
        with fabric.autocast():
            c_hat = predict_mix(nets["quality"], z)
            spec = torch.stack([m(z).float().argmax(1) for m in specialists])  # (K, B)
            pred = {"sym_true": conditioned_logits(nets["sym"], z, c).float().argmax(1),
                    "sym_pred": conditioned_logits(nets["sym"], z, c_hat).float().argmax(1),
                    "augment_mix": nets["augment_mix"](z).float().argmax(1),
                    "cqd_mix": nets["cqd_mix"](z).float().argmax(1)}
        pred["route_pred"], pred["route_true"] = route(spec, c_hat), route(spec, c)
        for r in ROWS:
            correct[r] += int((pred[r] == y).sum())
        n += len(y)
        mae += float((c_hat - c).abs().sum(1).sum()) / k
        dominant += int((c_hat.argmax(1) == c.argmax(1)).sum())
    return correct, n, mae, dominant


def _costs(nets: dict[str, nn.Module], spec_ids: list[str], sample: torch.Tensor, k: int,
           dev: torch.device) -> dict[str, dict]:
    """Per row, the parameters and FLOPs per image of the networks it runs (a router runs one specialist)."""
    c0 = torch.full((1, k), 1.0 / k, device=dev)
    flops = {rid: flops_per_image(m, (sample, c0) if rid == "sym" else (sample,)) for rid, m in nets.items()}
    params = {rid: sum(p.numel() for p in m.parameters()) for rid, m in nets.items()}
    spec_params = sum(params[i] for i in spec_ids)
    cost = {"sym_true": (params["sym"], flops["sym"]),
            "sym_pred": (params["sym"] + params["quality"], flops["sym"] + flops["quality"]),
            "route_pred": (spec_params + params["quality"], flops["quality"] + max(flops[i] for i in spec_ids)),
            "route_true": (spec_params, max(flops[i] for i in spec_ids)),
            "augment_mix": (params["augment_mix"], flops["augment_mix"]),
            "cqd_mix": (params["cqd_mix"], flops["cqd_mix"])}
    return {r: {"params": p, "flops": f} for r, (p, f) in cost.items()}


@torch.no_grad()
def score_seed(cfg: SymTableConfig, grid: GridConfig, seed: int, log: Callable[[str], None] = print) -> dict:
    """Accuracy of every row on every test mix of one seed, the regressor's error, parameters and FLOPs."""
    out = Path(cfg.out_dir)
    cells = {row.id: cell_config(grid, COLUMN, row, seed, out) for row in grid.rows}
    run = cells["sym"]
    fabric = make_fabric(run.train, devices=1)
    dev = fabric.device
    _, test_ds, _, base_test = build_datasets(run)
    classes, chans = base_test.num_classes, base_test.in_chans
    spec_ids = specialist_ids(cfg.base.data.mix.degradations)
    nets = _load_nets(cells, spec_ids, classes, chans, dev)
    maker = make_maker(run, base_test)
    loader = eval_loader(run, test_ds, base_test)
    maker.fix_twins(loader, dev, len(base_test))
    k = maker.k
    specialists = [nets[i] for i in spec_ids]
    acc, reg = {}, {}
    for name, (group, table) in mixes_of(cfg).items():
        maker.c_table = table.to(dev)
        correct, n, mae, dominant = _score_mix(fabric, maker, loader, nets, specialists, k)
        acc[name] = {"group": group, "c": table.tolist() if len(table) == 1 else f"{len(table)} random mixes",
                     **{r: correct[r] / n for r in ROWS}}
        reg[name] = {"group": group, "c_mae": mae / n, "dominant_acc": dominant / n}
        log(f"s{seed} {name}: " + " ".join(f"{r}={100 * correct[r] / n:.1f}" for r in ROWS))
    sample = torch.zeros(1, chans, run.data.image_size, run.data.image_size, device=dev)
    return {"seed": seed, "n_test": len(test_ds), "acc": acc, "regressor": reg,
            "cost": _costs(nets, spec_ids, sample, k, dev)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def summarize(cfg: SymTableConfig, per_seed: list[dict]) -> tuple[str, dict]:
    """table.md's text and the summary: per row and group, mean +- std over seeds of the group's accuracy."""
    degs = cfg.base.data.mix.degradations
    groups = [g for g in GROUPS if any(v["group"] == g for v in per_seed[0]["acc"].values())]

    def group_acc(res, row, group):
        vals = [v[row] for v in res["acc"].values() if v["group"] == group]
        return sum(vals) / len(vals)

    summary = {"rows": {}, "corners": {}, "regressor": {}}
    head = "| Row | " + " | ".join(GROUPS[g] for g in groups) + " | parameters | MMACs / image |"
    lines = [head, "|---|" + "---:|" * (len(groups) + 2)]
    for r, label in ROWS.items():
        cells, summary["rows"][r] = [], {"label": label}
        for g in groups:
            m, s = _mean_std([group_acc(res, r, g) for res in per_seed])
            summary["rows"][r][g] = {"mean": m, "std": s}
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        cost = per_seed[0]["cost"][r]
        summary["rows"][r].update(cost)
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {cost['params'] / 1e3:.0f}k | {cost['flops'] / 2e6:.1f} |")
    md = "\n".join(lines) + "\n"
    # per corner: where one conditioned student matches the specialist of that degradation
    clines = ["| Test set | " + " | ".join(label.split(" ", 1)[1] for label in ROWS.values()) + " |",
              "|---|" + "---:|" * len(ROWS)]
    for i, spec in enumerate(degs):
        name = f"corner{i}"
        row = []
        for r in ROWS:
            m, s = _mean_std([res["acc"][name][r] for res in per_seed])
            summary["corners"].setdefault(spec, {})[r] = {"mean": m, "std": s}
            row.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        clines.append(f"| {spec} | " + " | ".join(row) + " |")
    md += "\nPer corner (one pure degradation):\n\n" + "\n".join(clines) + "\n"
    rlines = ["| Test group | c mean abs. error | dominant T named |", "|---|---:|---:|"]
    for g in groups:
        mae = _mean_std([sum(v["c_mae"] for v in res["regressor"].values() if v["group"] == g)
                         / sum(1 for v in res["regressor"].values() if v["group"] == g) for res in per_seed])
        dom = _mean_std([sum(v["dominant_acc"] for v in res["regressor"].values() if v["group"] == g)
                         / sum(1 for v in res["regressor"].values() if v["group"] == g) for res in per_seed])
        summary["regressor"][g] = {"c_mae": mae[0], "dominant_acc": dom[0]}
        rlines.append(f"| {GROUPS[g]} | {mae[0]:.3f} ± {mae[1]:.3f} | {100 * dom[0]:.1f} ± {100 * dom[1]:.1f} |")
    md += ("\nQuality regressor (mean |c_hat - c| per component; at mid-points and the centre the dominant T is a tie, "
           "scored against the first listed):\n\n" + "\n".join(rlines) + "\n")
    return md, summary


def _scored(path: Path, settings: dict, log: Callable[[str], None]) -> bool:
    """Whether `path` holds a seed's scores made with these test mixes (a file of other `eval:` settings, or one
    that cannot be read, is scored again; files written before the settings were recorded count as scored)."""
    if not path.is_file():
        return False
    try:
        saved = load_json(path).get("settings", settings)
    except (CheckpointError, AttributeError):
        log(f"{path} cannot be read: scoring that seed again")
        return False
    if saved != json.loads(json.dumps(settings)):
        log(f"{path} was scored with other test mixes ({saved} -> {settings}): scoring that seed again")
        return False
    return True


def sym_table(cfg: SymTableConfig, force: bool = False, on_cell=None, log: Callable[[str], None] = print,
              poll_s: float = 5.0) -> dict:
    """Train (or reuse) every network of the table, score each seed once (several processes split the seeds),
    write `<out_dir>/report/sym.md` and `sym.json`; returns {"markdown", "summary", "report_dir"}."""
    t0 = time.perf_counter()
    grid = grid_of(cfg)
    with flush_denormals():
        run_grid(grid, force=force, on_cell=on_cell, log=log)
        out = Path(cfg.out_dir)
        results = {}
        settings = {"eval": cfg.eval.model_dump(), "degradations": list(cfg.base.data.mix.degradations)}
        for seed in cfg.seeds:
            path = out / "scores" / f"s{seed}.json"
            with claim(path.parent / f"s{seed}") as mine:
                if mine and (force or not _scored(path, settings, log)):
                    save_json({**score_seed(cfg, grid, seed, log), "settings": settings}, path)
        for seed in cfg.seeds:  # scored here or by another process
            path = out / "scores" / f"s{seed}.json"
            while not path.is_file():
                time.sleep(poll_s)
            results[seed] = load_json(path)
    md, summary = summarize(cfg, [results[s] for s in cfg.seeds])
    degs = cfg.base.data.mix.degradations
    header = (f"# {cfg.name}\n\nK = {len(degs)}: {', '.join(degs)}; model {cfg.base.model}; seeds {cfg.seeds}; "
              f"{results[cfg.seeds[0]]['n_test']} test items per test mix; {cfg.eval.random} random mixes "
              f"(Dirichlet {cfg.eval.random_alpha:g}); accuracy %, mean ± std over seeds.\n\n")
    text = header + md + (f"\n{cfg.reference}\n" if cfg.reference else "")
    report = out / "report"
    save_text(text, report / "sym.md")
    save_json({"summary": summary, "per_seed": results, "config": cfg.model_dump(),
               "wall_s": time.perf_counter() - t0}, report / "sym.json")
    return {"markdown": text, "summary": summary, "report_dir": str(report)}
