"""Devices and precision: Lightning Fabric for the configured accelerator, and cqd's precision policy."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy

from cqd.errors import ConfigError


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it bf16 is emulated, and slow."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _check_accelerator(accelerator: str) -> None:
    """A clear error for an accelerator this machine lacks (Fabric's own is a traceback)."""
    have = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
            + (["mps"] if torch.backends.mps.is_available() else []))
    want = "cuda" if accelerator == "gpu" else accelerator
    if want not in ("auto", *have):
        raise ConfigError(f"train.accelerator={accelerator}: this machine has no {want.upper()} device "
                          f"(torch {torch.__version__} sees: {', '.join(have)}); use train.accelerator=auto or cpu")


def resolve_precision(t) -> str:
    """`auto`: bf16-mixed on CUDA (16-mixed where it lacks bf16) and on CPUs with native bf16; fp32 on other
    CPUs (bf16 autocast there was ~10x slower) and MPS. Any other value is used as given."""
    if t.precision != "auto":
        return t.precision
    cuda = t.accelerator in ("cuda", "gpu") or (t.accelerator == "auto" and torch.cuda.is_available())
    if cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.backends.mps.is_available())
    return "bf16-mixed" if cpu and cpu_has_bf16() else "32-true"


def launcher(t, env=os.environ) -> tuple[object, int, str]:
    """(devices, num_nodes, strategy): the config's, or the launcher's when cqd runs under torchrun
    (WORLD_SIZE, LOCAL_WORLD_SIZE) or a SLURM job of several tasks (SLURM_NTASKS, SLURM_NNODES); a
    config that says otherwise is an error, not N independent runs writing into one out_dir."""
    if "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", 1)) > 1:
        world, where = int(env["WORLD_SIZE"]), "torchrun"
        local = int(env.get("LOCAL_WORLD_SIZE", world))
    elif int(env.get("SLURM_NTASKS", 1)) > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world, where = int(env["SLURM_NTASKS"]), "SLURM"
        local = world // int(env.get("SLURM_NNODES", 1))
    else:
        return t.devices, t.num_nodes, t.strategy
    nodes = world // local
    if (t.devices not in (1, "auto", local)) or t.num_nodes not in (1, nodes):
        raise ConfigError(f"{where} started {world} processes ({local} per machine on {nodes} machine(s)) but the "
                          f"config says train.devices={t.devices} train.num_nodes={t.num_nodes}; leave them at 1 "
                          f"(cqd follows the launcher) or make them match")
    return local, nodes, "ddp" if t.strategy == "auto" else t.strategy


def make_fabric(t, devices=None, find_unused: bool = False) -> Fabric:
    """Fabric for the configured accelerator, devices and machines, following torchrun or SLURM when it
    launched cqd (`devices` overrides: one process with the auto strategy, e.g. for evaluation).
    `find_unused`: where the strategy is plain DDP (`ddp`, or what `auto` picks for several devices),
    DDP looks for parameters without a gradient each step, as a method with phases needs."""
    _check_accelerator(t.accelerator)
    n, nodes, strategy = (devices, 1, "auto") if devices else launcher(t)
    fabric = _fabric(t, n, nodes, "ddp_find_unused_parameters_true" if find_unused and strategy == "ddp" else strategy)
    if find_unused and strategy == "auto" and type(fabric.strategy) is DDPStrategy:
        fabric = _fabric(t, n, nodes, "ddp_find_unused_parameters_true")
    return fabric


def _fabric(t, n, nodes, strategy) -> Fabric:
    quiet = [logging.getLogger(n) for n in ("lightning_fabric", "lightning.fabric")]  # its "Using bfloat16 AMP" lines
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        return Fabric(accelerator=t.accelerator, devices=n, num_nodes=nodes, strategy=strategy,
                      precision=resolve_precision(t))
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero while cqd computes: on the CPU they made small-net training
    10x slower. Restored to torch's default afterwards, so the caller's process is unchanged."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def fp32_for_qat(cfg) -> tuple[object, str | None]:
    """(cfg, message): fake-quant training runs in fp32, so a QAT run whose precision is, or resolves to,
    anything else gets `train.precision: 32-true`, and a message for the log saying so."""
    if not cfg.compress.qat:
        return cfg, None
    resolved = resolve_precision(cfg.train)
    if resolved == "32-true":
        return cfg, None
    cfg = cfg.model_copy(deep=True)
    given = cfg.train.precision
    cfg.train.precision = "32-true"
    return cfg, (f"compress.qat: fake-quant training runs in fp32, so train.precision={given}"
                 f"{f' (here {resolved})' if given == 'auto' else ''} is switched to 32-true for this run")
