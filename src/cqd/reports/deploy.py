"""A grid's deployment report (`deploy:`): size and CPU latency of each row's model, and each pair's
distillation gain, the test of "distillation's gain adds to pruning's and quantization's".

Measured after the cells, in one process (the `cqd table` process that takes `deploy/.lock`; another one
sharing the grid skips it and says so): each row's first-seed `model.pt` is exported to ONNX (a QAT row in
its int8 QDQ form, checked as `cqd export` checks) and timed with onnxruntime on random batches (median of
`repeats` runs after 3 warm-up runs, `threads` intra-op threads). The files are kept in `report/deploy/`,
so a second call re-times without re-exporting a file newer than its model.pt.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from cqd.files import save_json, save_text


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.2f} ± {sd:.2f}"


def _measure_rows(grid, acc: dict, folder: Path, log) -> list[dict]:
    """Form, size, CPU latencies and top-1s of each row's first-seed model in each column; a model is exported to
    ONNX in `folder` unless its file there is newer than the model.pt."""
    from cqd.export import export_model, latency_ms, runner

    d = grid.deploy
    first = grid.seeds[0]
    rows = []
    for column in grid.columns:
        for row in grid.rows:
            res = acc.get((column, row.id, first))
            if res is None:
                continue
            model_pt = Path(res["config"]["out_dir"]) / "model.pt"
            target = folder / column / f"{row.id}.onnx"
            if not (target.is_file() and target.stat().st_mtime > model_pt.stat().st_mtime):
                target.parent.mkdir(parents=True, exist_ok=True)
                log(f"deployment report: exporting {column}/{row.id} ({model_pt})")
                info = export_model(model_pt, "onnx", target, force=True)  # older than the model: replaced
                save_json(info, target.with_suffix(".json"))
            info = json.loads(target.with_suffix(".json").read_text())
            size = res["config"]["data"]["image_size"]
            chw = (_in_chans(model_pt), size, size)
            run = runner(target, "onnx", threads=d.threads)
            ms = {b: latency_ms(run, chw, b, d.repeats) for b in d.batches}
            tops = [100 * acc[(column, row.id, s)]["acc_lq"] for s in grid.seeds if (column, row.id, s) in acc]
            m = {"column": column, "row": row.id, "label": row.label or row.id, "form": info["form"],
                 "params": res.get("params"), "onnx_bytes": info["bytes"],
                 "model_pt_bytes": model_pt.stat().st_size,
                 "latency_ms": {str(b): v for b, v in ms.items()}, "top1": tops, "check": info.get("check")}
            rows.append(m)
    return rows


def _gains(grid, acc: dict) -> list[dict]:
    """Per pair (twin, distilled) and column, the distilled row's gain over its twin in top-1 points on z, per seed
    that both have."""
    gains = []
    for twin, distilled in grid.deploy.pairs:
        for column in grid.columns:
            per_seed = [100 * (acc[(column, distilled, s)]["acc_lq"] - acc[(column, twin, s)]["acc_lq"])
                        for s in grid.seeds if (column, distilled, s) in acc and (column, twin, s) in acc]
            gains.append({"twin": twin, "distilled": distilled, "column": column, "gain_per_seed": per_seed})
    return gains


def deploy_report(cells, grid, out: Path, log=print) -> str:
    """Markdown (and deploy.json in `out`) of sizes, latencies and gains; '' when another process holds the lock."""
    d = grid.deploy
    folder = out / "deploy"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        log(f"deployment report: {lock} is held by another process, which measures; skipped here")
        return ""
    try:
        os.write(fd, json.dumps({"pid": os.getpid()}).encode())
        os.close(fd)
        acc = {(c.column, c.row, c.cfg.seed): res for c, res in cells if res is not None and c.row is not None}
        rows = _measure_rows(grid, acc, folder, log)
        gains = _gains(grid, acc)
        save_json({"threads": d.threads, "repeats": d.repeats, "batches": d.batches, "rows": rows, "gains": gains},
                  out / "deploy.json")
        md = _markdown(grid, rows, gains)
        save_text(md, out / "deploy.md")
        return md
    finally:
        lock.unlink(missing_ok=True)


def _in_chans(model_pt: Path) -> int:
    from cqd.engine.checkpoint import load_model_file

    return int(load_model_file(model_pt)["in_chans"])


def _markdown(grid, rows: list[dict], gains: list[dict]) -> str:
    d = grid.deploy
    bs = " | ".join(f"ms @ batch {b}" for b in d.batches)
    lines = [f"\n## Size and CPU latency (first seed's model of each row; ONNX Runtime, {d.threads} thread(s), "
             f"median of {d.repeats} runs)\n",
             f"| column | row | top-1 on z (%), {len(grid.seeds)} seeds | params | ONNX KB | form | {bs} |",
             "|---|---|---|---|---|---|" + "---|" * len(d.batches)]
    for m in rows:
        t = m["top1"]
        top = f"{statistics.fmean(t):.2f} ± {statistics.stdev(t) if len(t) > 1 else 0.0:.2f}" if t else "-"
        lat = " | ".join(f"{m['latency_ms'][str(b)]:.2f}" for b in d.batches)
        label = grid.columns[m["column"]].label or m["column"]
        lines.append(f"| {label} | {m['label']} | {top} | {m['params']:,} | {m['onnx_bytes'] / 1024:.0f} | "
                     f"{m['form']} | {lat} |")
    if gains:
        cols = list(grid.columns)
        lines += ["\n## Distillation gain (distilled row - its lambda-0 twin, top-1 points on z, "
                  "mean ± std over seeds)\n",
                  "| pair | " + " | ".join(grid.columns[c].label or c for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        label = {r.id: r.label or r.id for r in grid.rows}
        for twin, distilled in d.pairs:
            cells = [_stat(next(g["gain_per_seed"] for g in gains
                                if (g["twin"], g["distilled"], g["column"]) == (twin, distilled, c)))
                     for c in cols]
            lines.append(f"| {label[distilled]} vs {label[twin]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
