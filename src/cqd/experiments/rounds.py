"""Sequential distillation (sequential FEED, Park and Kwak): `method.<name>.rounds: R` trains R students
in turn. Round 1 distills from the configured teachers; round r > 1 has one teacher, round r-1's
student, which sees the student's own input (z: with a degraded z, later rounds are self-distillation
on z) and is tapped at the student's layer; each round's student starts from its own init (not from
its teacher), as in born-again networks. Rounds 1..R-1 are kept in `<out_dir>/round<r>`; round R is the
run itself (`<out_dir>/model.pt`, `result.json`). With `--resume` a finished round is not trained again.
"""
from __future__ import annotations

import os
from pathlib import Path

from cqd.engine.model_files import MODEL
from cqd.engine.trainer import RESULT, run_config
from cqd.engine.trainer import train as train_one
from cqd.files import save_json
from cqd.methods import METHODS


def rounds_of(cfg) -> int:
    return METHODS.get(cfg.method.name).rounds(cfg.method.params)


def round_config(cfg, r: int):
    """The run config of round r (1-based) of `cfg`'s R rounds."""
    from cqd.engine.schema import TeacherConfig

    R, out = rounds_of(cfg), Path(cfg.out_dir)
    c = cfg.model_copy(deep=True)
    setattr(c.method, c.method.name, METHODS.get(cfg.method.name).round_params(cfg.method.params, first=r == 1))
    if r < R:
        c.out_dir, c.name = str(out / f"round{r}"), f"{cfg.name}-round{r}"
    if r > 1:
        teacher = out / f"round{r - 1}" / MODEL
        c.teachers = []
        c.teacher = TeacherConfig(model=cfg.model, checkpoint=str(teacher), view=cfg.data.lq_view,
                                  degradation=cfg.data.degradation)
        c.method.init = "scratch"
    return c


def train(cfg, resume: bool = False, fabric=None, on_epoch=None, force: bool = False) -> dict:
    """Train one configured run (`cqd train`): one run of the engine, or a sequential method's R rounds in
    order (round R's result is returned; finished rounds are skipped on resume). Without `resume`, a finished
    run in a folder of the run is an error, or with `force` replaced (the engine's rule)."""
    cfg = run_config(cfg)
    if rounds_of(cfg) == 1:
        return train_one(cfg, resume=resume, fabric=fabric, on_epoch=on_epoch, force=force)
    for r in range(1, rounds_of(cfg) + 1):
        c = round_config(cfg, r)
        if (r < rounds_of(cfg) and resume and (Path(c.out_dir) / RESULT).is_file()
                and (Path(c.out_dir) / MODEL).is_file()):
            continue
        res = train_one(c, resume=resume, fabric=fabric, on_epoch=on_epoch, force=force)
    # round R wrote its own config; the run's result holds the run's (what a grid compares a finished cell with)
    res = {**res, "config": cfg.model_dump(), "round_config": res["config"]}
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here; one writes
        save_json(res, Path(cfg.out_dir) / RESULT)
    return res


def resumable(cfg) -> bool:
    """Whether `--resume` finds something of the run to continue: a last.ckpt in its out_dir or in a round's."""
    cfg = run_config(cfg)
    return any((Path(round_config(cfg, r).out_dir) / "last.ckpt").is_file() for r in range(1, rounds_of(cfg) + 1))
