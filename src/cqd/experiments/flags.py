"""The command-line flags of the executors (`cqd table`, `cqd tune`): argparse only, so `cqd --help` stays light."""
from __future__ import annotations

import argparse

EXECUTORS = ("local", "ray", "slurm")


def add_executor_flags(p: argparse.ArgumentParser, no_wait: bool = False) -> None:
    """`--executor` (and for grids `--no-wait`)."""
    p.add_argument("--executor", choices=EXECUTORS,
                   help="where the cells (trials) run: local processes sharing the folder (default), ray (a local "
                        "Ray instance, or executor.ray.address=auto for a cluster) or slurm (submitit; "
                        "executor.slurm.partition=..., executor.slurm.time=MINUTES); sets executor.name")
    if no_wait:
        p.add_argument("--no-wait", action="store_true",
                       help="slurm: submit the jobs and return; a later `cqd table` waits for them and writes the "
                            "report")


def executor_overrides(args: argparse.Namespace) -> list[str]:
    """--executor NAME as the override executor.name=NAME (none without the flag)."""
    name = getattr(args, "executor", None)
    return [f"executor.name={name}"] if name else []
