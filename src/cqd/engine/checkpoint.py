"""Run files: model files, resumable checkpoints and the settings they were written with.

Writing and safe loading live in `cqd.files`; this module knows what a cqd checkpoint holds.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

from cqd.errors import CheckpointError
from cqd.files import load_checkpoint
from cqd.methods.schema import MOVED_KEYS
from cqd.tasks import TASKS


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def load_model_file(path: str | Path) -> dict:
    """A `model.pt` (or `last.ckpt`) written by `cqd train`, with its fields checked."""
    ck = load_checkpoint(path)
    if not isinstance(ck.get("model"), Mapping) or not isinstance(ck.get("model_name"), str):
        raise CheckpointError(f"{path} is not a cqd model file (expected the model.pt written at the end of "
                              "`cqd train`; a bare state_dict goes in `pretrained: <path>` instead)")
    bad = [k for k in ("num_classes", "in_chans") if not _positive_int(ck.get(k))]
    if bad:
        raise CheckpointError(f"{path} is not a complete cqd model file: {', '.join(bad)} missing or invalid "
                              f"({', '.join(f'{k}={ck.get(k)!r}' for k in bad)})")
    if isinstance(ck.get("config"), Mapping):
        ck["config"] = migrate_config(ck["config"])
    return ck


def _mismatch(e: Exception) -> str:
    """load_state_dict's many-line complaint, counted: '2 missing keys (a, b), 1 size mismatch (c: ...)'."""
    text = str(e)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} key(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    if sizes:
        shown = ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in sizes[:3])
        parts.append(f"{len(sizes)} shape mismatch(es) ({shown}{', ...' if len(sizes) > 3 else ''})")
    if parts:
        return "; ".join(parts)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_state(target, state, path: str | Path, what: str) -> None:
    """`target.load_state_dict(state)`, any mismatch a CheckpointError naming `path` and `what`."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot load its {what}: {_mismatch(e)}. Was it saved from another "
                              "architecture or dataset?") from None


# settings that may change between a run and its resumption; any other difference is an error
RESUMABLE_CHANGES = ("name", "out_dir", "cache_dir", "pretrained", "teacher.pretrained", "teacher.checkpoint",
                     "data.root", "data.num_workers", "train.epochs", "train.eval_every", "train.progress",
                     "train.accelerator", "train.devices", "train.num_nodes", "train.strategy", "train.precision",
                     "train.feature_cache_mb", "train.check_every")
FORMAT = "cqd-checkpoint-v2"


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# Conventions whose defaults became the reference implementations' (issue 31), with the value every file written
# before the key existed was made under. A config dump holds every key, so a section without one is older.
LEGACY_METHOD_KEYS = {"at": {"convention": "cqd_v1"}, "fitnet": {"convention": "cqd_v1"},
                      "afd": {"direction": "next", "real": "raw"}, "sgn": {"d_loss": "cqd_v1", "replay": 0}}
LEGACY_TASK_KEYS = {"sr": {"resize": "pil"}}


def _with_legacy(section, legacy: Mapping) -> Any:
    return {**legacy, **section} if isinstance(section, Mapping) else section


def migrate_config(config: Mapping) -> dict:
    """A config dump of any cqd version in today's layout: the flat `method.T/lam/loss/scale` of files written
    before each method had its own section move to `method.cqd`, the sections of other tasks than the
    run's (every run held an `sr:` section before each task owned its own) are dropped, and a method's or the
    task's section that lacks a key of LEGACY_METHOD_KEYS / LEGACY_TASK_KEYS gets the legacy value it was made
    under (e.g. `method.at.convention: cqd_v1`, `sr.resize: pil`), so an old file keeps its meaning and compares
    unequal to a new config of the reference defaults."""
    config = dict(config)
    method = dict(config.get("method") or {})
    for key, section in MOVED_KEYS.items():
        if key in method:
            method[section] = {**method.get(section, {}), key: method.pop(key)}
    for name, legacy in LEGACY_METHOD_KEYS.items():
        if name in method:
            method[name] = _with_legacy(method[name], legacy)
    config["method"] = method
    for name in TASKS.names():
        if name != config.get("task", "classification"):
            config.pop(name, None)
    for name, legacy in LEGACY_TASK_KEYS.items():
        if name in config:
            config[name] = _with_legacy(config[name], legacy)
    return config


def weight_settings(config: Mapping) -> dict[str, Any]:
    """The flattened config without the sections of methods other than the chosen one (unused)."""
    config = migrate_config(config)
    chosen = config["method"].get("name")
    return {k: v for k, v in _flat(config).items()
            if not (k.startswith("method.") and k.count(".") > 1 and k.split(".")[1] != chosen)}


def load_resume_checkpoint(path: str | Path, config: Mapping) -> dict:
    """`last.ckpt` for `--resume`: complete, and written by a run with the same settings as `config`
    (except RESUMABLE_CHANGES); otherwise a CheckpointError saying what differs. A file written before
    the method API had phases (one `optimizer`, one `scheduler`, only the student) is converted."""
    ck = load_model_file(path)
    if "method" not in ck and "optimizer" in ck and "scheduler" in ck:  # the first format
        ck["method"] = {f"student.{k}": v for k, v in ck["model"].items()}
        ck["optimizers"], ck["schedulers"] = {"main": ck.pop("optimizer")}, {"main": ck.pop("scheduler")}
    missing = [k for k in ("method", "optimizers", "schedulers", "epoch", "step_in_epoch", "history") if k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a resumable checkpoint (no {', '.join(missing)}); "
                              "use another out_dir or drop --resume")
    if ck["model_name"] != config.get("model"):
        raise CheckpointError(f"{path} is for model {ck['model_name']!r}, not {config.get('model')!r}; "
                              "use another out_dir or drop --resume")
    if isinstance(ck.get("config"), Mapping):
        old, new = weight_settings(ck["config"]), weight_settings(config)
        diff = [k for k in sorted(set(old) & set(new))
                if k not in RESUMABLE_CHANGES and not _same(old.get(k), new.get(k))]
        if diff:
            shown = ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise CheckpointError(f"{path} was written with {shown}{more}; resume with the same settings, "
                                  "or use another out_dir / drop --resume to start over")
    return ck
