"""Optimizers and schedules of a method's phases, from `train:` and `train.phases.<name>`.

A phase's settings are resolved in this order: `train:` (optimizer, lr, momentum, betas,
weight_decay, schedule, lr_final_ratio), then the method's defaults for that phase, then
`train.phases.<name>`; a param group's `lr_scale` multiplies its lr. Schedules run over the whole
run's steps: linear (the paper: lr decays linearly to lr * lr_final_ratio), cosine, constant.
"""
from __future__ import annotations

import math

import torch

from cqd.errors import ConfigError

_KEYS = ("optimizer", "lr", "momentum", "betas", "weight_decay", "schedule", "lr_final_ratio")


def settings(phase, train) -> dict:
    s = {k: getattr(train, k) for k in _KEYS}
    s.update({k: v for k, v in phase.defaults.items() if k in _KEYS})
    override = train.phases.get(phase.name)
    if override is not None:
        s.update({k: v for k, v in override.model_dump().items() if v is not None})
    return s


def _factor(schedule: str, ratio: float, total: int, offset: int):
    total = max(total, 1)

    def f(s: int) -> float:
        if schedule == "linear":
            return 1 - (1 - ratio) * min(s + offset, total) / total
        if schedule == "cosine":
            return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(s + offset, total) / total))
        return 1.0
    return f


def build(phases: list, train, total_steps: int, offset: int = 0) -> dict[str, tuple]:
    """{phase name: (optimizer, scheduler)} in the method's order; `offset` steps of the schedule are done."""
    unknown = sorted(set(train.phases) - {p.name for p in phases})
    if unknown:
        raise ConfigError(f"train.phases.{unknown[0]}: this method has no phase {unknown[0]!r}; "
                          f"its phases are: {', '.join(p.name for p in phases)}")
    out = {}
    for phase in phases:
        s = settings(phase, train)
        plain = [p for p in phase.params if not isinstance(p, dict)]  # one group, as a plain optimizer has
        groups = [{"params": plain}] + [dict(g) for g in phase.params if isinstance(g, dict)]
        for g in groups:
            g["lr"] = s["lr"] * g.pop("lr_scale", 1.0)
            g["params"] = [p for p in g["params"] if p.requires_grad]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError(f"phase {phase.name!r} has no trainable parameters")
        if s["optimizer"] == "sgd":
            opt = torch.optim.SGD(groups, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
        else:
            cls = torch.optim.Adam if s["optimizer"] == "adam" else torch.optim.AdamW
            opt = cls(groups, lr=s["lr"], betas=tuple(s["betas"]), weight_decay=s["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _factor(s["schedule"], s["lr_final_ratio"], total_steps, offset))
        out[phase.name] = (opt, sched)
    return out
