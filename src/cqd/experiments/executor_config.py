"""`executor:` of a grid or a study: where its cells (or trials) run. `local` (default): this process, and any other
process started on the same folder (lock files); `ray`: tasks on Ray (a local instance, or a cluster); `slurm`: job
arrays through submitit. Each default follows a reference, named in its description (and in docs/hardware.md).

Only the schema lives here (no Ray or submitit import): a config is checked before anything heavy is imported.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from cqd.experiments.flags import EXECUTORS
from cqd.schema import Strict

EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "slurm")}  # executor -> (package, pip extra of cqd-distill)


class RayOptions(Strict):
    """`executor.ray`: which Ray instance runs the tasks."""

    address: str | None = Field(None, description="an existing cluster: `auto` (the one on this machine, or "
                                                  "RAY_ADDRESS), `host:port` or `ray://host:10001`; default: start a "
                                                  "Ray instance on this machine for the call, shut down after it")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the instance started here (default: the "
                                                         "machine's, as ray.init counts them)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the instance started here (default: the machine's, "
                                                         "as ray.init counts them; more than it has are logical GPUs)")


class SlurmOptions(Strict):
    """`executor.slurm`: submitit's SLURM parameters (without submitit's `slurm_` prefix: partition, time, qos,
    account, mem_gb, constraint, array_parallelism, additional_parameters (more sbatch options, e.g. {mail-type:
    END}), setup (shell lines before each job), ...); every key but `cluster` and `folder` goes to submitit, which
    checks it before anything is submitted. Defaults: submitit's (array_parallelism 256), except `time`, which
    must be given."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    cluster: Literal["slurm", "local"] = Field("slurm", description="slurm: sbatch on this cluster; local: "
                                                                    "submitit's local executor, which runs the "
                                                                    "same jobs as processes of this machine "
                                                                    "(for a test without a cluster)")
    folder: str | None = Field(None, description="submitit's job files and logs (default: <out_dir>/slurm); on a "
                                                 "folder that the compute nodes share")
    time: int | None = Field(None, ge=1, description="each job's time limit in minutes (required: submitit's "
                                                     "default of 5 min would end most training runs)")


class ExecutorConfig(Strict):
    """Where a grid's cells, or a study's trials, run. `executor: ray` is short for `executor: {name: ray}`."""

    name: Literal[EXECUTORS] = Field("local", description="local: processes sharing the folder (lock files); ray; "
                                                          "slurm (submitit)")
    cpus_per_cell: int | None = Field(None, ge=1, description="CPUs and torch threads of each cell or study worker "
                                                              "(default: 1 for ray and slurm; local: torch's default "
                                                              "for the process, which the run says)")
    gpus_per_cell: float | None = Field(None, ge=0, description="GPUs of each cell or study worker (default: ray: 1 "
                                                                "where the instance has GPUs, else 0; slurm: 0)")
    max_retries: int = Field(3, ge=0, description="runs again a cell whose worker or job died, this many times "
                                                  "(Ray's default for tasks, 3); an error raised by the cell is not "
                                                  "retried")
    workers: int | None = Field(None, ge=1, description="`cqd tune`: workers running trials of the one study "
                                                        "(default: ray: as many as its resources run at once; slurm: "
                                                        "n_trials); not used by grids")
    ray: RayOptions = RayOptions()
    slurm: SlurmOptions = SlurmOptions()

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


def executor_section(data: Any) -> Any:
    """A config's `executor: NAME` as `{name: NAME}`, so that overrides (`executor.name=ray`, `--executor`) reach it."""
    if isinstance(data, dict) and isinstance(data.get("executor"), str):
        return {**data, "executor": {"name": data["executor"]}}
    return data
