"""Quantization-aware training with torchao's PT2E flow: `torch.export` the student, `prepare_qat_pt2e`
with the x86 inductor quantizer (int8 per-channel symmetric weights, uint8 per-tensor activations, the
QAT config), train the fake-quantized graph as usual, then `convert_pt2e` to the int8 form
(quantize/dequantize ops around fp32 kernels in PyTorch; real int8 kernels after `torch.compile` or in
onnxruntime, which fuses the QDQ pairs).

The exported graph takes any batch size (a dynamic batch dimension) and its image size is fixed (the
run's `data.image_size`). `model.train()` / `model.eval()` work on it (torchao's
`allow_exported_model_train_eval`: BatchNorm and dropout switch as in eager mode).

Fake-quant training runs in fp32: the observers' ranges and the rounding simulate int8 on fp32 values,
and bf16 autocast would change both (the engine switches `train.precision` to 32-true and says so).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cqd.errors import ConfigError

_SAMPLE_BATCH = 2  # export specializes batch sizes 0 and 1; with 2 the batch dimension stays symbolic
ZERO_BN_WEIGHT = 1e-5  # what a BatchNorm weight of exactly 0 becomes before QAT (the block's output changes by ~1e-5)


def _quiet_import() -> None:
    """Import torchao's PT2E modules with torch's pytree logger quieted: on torch 2.14 torchao 0.18 logs a
    deprecation line (an Enum registered as a pytree constant) at import, which says nothing to a cqd user."""
    import logging

    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    finally:
        log.setLevel(level)


def _quantizer():
    _quiet_import()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))


def prepare(model: nn.Module, chw: tuple[int, int, int]) -> nn.Module:
    """The fake-quantized training graph of `model` for `chw`-shaped images. The model itself is not changed,
    except that BatchNorm weights of exactly 0 become `ZERO_BN_WEIGHT` (torchao's QAT conv-BN pattern computes
    conv(x, w * gamma / sigma) / (gamma / sigma): NaN at gamma = 0, e.g. a timm ResNet from scratch)."""
    _quiet_import()
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    p = next(model.parameters())
    fmt = (torch.channels_last if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    sample = torch.zeros(_SAMPLE_BATCH, *chw, device=p.device).to(memory_format=fmt)
    with torch.no_grad():  # torchao's simulated conv-BN folding divides by the BN weight: 0/0 at an exact zero
        for m in model.modules():  # (timm's ResNets zero-initialise each block's last BN weight)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight[m.weight == 0] = ZERO_BN_WEIGHT
    mode = model.training
    model.train()
    try:
        graph = torch.export.export(model, (sample,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    except Exception as e:  # torch.export names the Python construct it cannot trace
        raise ConfigError(f"compress.qat: torch.export cannot capture model "
                          f"{getattr(model, 'model_name', type(model).__name__)!r} "
                          f"as one graph ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                          f"QAT needs an exportable model") from None
    finally:
        model.train(mode)
    prepared = prepare_qat_pt2e(graph, _quantizer())
    allow_exported_model_train_eval(prepared)
    prepared.train(mode)
    for attr in ("num_classes", "in_chans", "model_name"):
        if hasattr(model, attr):
            setattr(prepared, attr, getattr(model, attr))
    return prepared


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 form of a trained fake-quant graph (a copy; `prepared` is kept). BatchNorm is folded into
    the convolutions and the weights are stored as int8 (torchao's `convert_pt2e`, ~20 s on 2 CPU cores:
    it traces the patterns it rewrites)."""
    _quiet_import()
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model = copy.deepcopy(prepared)
    move_exported_model_to_eval(model)
    out = convert_pt2e(model)
    allow_exported_model_train_eval(out)
    to_eval(out)
    for attr in ("num_classes", "in_chans", "model_name"):
        if hasattr(prepared, attr):
            setattr(out, attr, getattr(prepared, attr))
    return out


def to_eval(model: nn.Module) -> nn.Module:
    """An exported graph in eval mode, `training` flags included (torchao's eval() rewrites the graph's
    BatchNorm/dropout but leaves the flags, which exporters read)."""
    model.eval()
    for m in model.modules():
        m.training = False
    return model


def is_quantized_graph(model: nn.Module) -> bool:
    """A graph with fake-quant observers (prepared) or quantize/dequantize ops (converted)."""
    graph = getattr(model, "graph", None)
    return graph is not None and any("quantize" in str(n.target) or "activation_post_process" in str(n.target)
                                     for n in graph.nodes)
