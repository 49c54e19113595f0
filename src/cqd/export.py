"""`cqd export`: a finished run's `model.pt` as a deployment file, checked by running the written file.

Formats (what each model can go to):

| model | onnx | torchscript | pt2 |
|---|---|---|---|
| fp32 (built-in nets, `tv:`/`timm:` models, pruned ones) | yes | yes (`torch.jit.trace`) | yes (`torch.export`) |
| QAT, in its converted int8 form | yes: QuantizeLinear/DequantizeLinear (QDQ) around Conv/Gemm, which onnxruntime fuses into int8 kernels | no (clear error) | yes: the int8 graph of `convert_pt2e` |

Every file is written under a temporary name, run, and renamed into place only when its check passes:
fp32, the logits of a test batch within `atol` (1e-3) of PyTorch's; int8, top-1 on the whole test set
(z view) within `max_drop` (0.5) points of the PyTorch int8 graph's. The batch dimension is dynamic.
"""  # noqa: E501 (the table of formats)
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cqd.errors import CQDError

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts.pt", "pt2": ".pt2"}


def export_model(model_path: str | Path, fmt: str, out: str | Path | None = None, cfg=None, check: bool = True,
                 atol: float = 1e-3, max_drop: float = 0.5) -> dict:
    """Write `model_path` (a `model.pt`) as `fmt` to `out` (default beside it: model.onnx, model.ts.pt, model.pt2)
    and check it; `cfg` (default: the run's own config, from model.pt) gives the test set of the check."""
    from cqd.compress.compressor import deployed
    from cqd.engine.checkpoint import load_model_file
    from cqd.engine.model_files import load_model
    from cqd.engine.schema import run_config

    if fmt not in FORMATS:
        raise CQDError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model_path = Path(model_path)
    if fmt == "torchscript" and (load_model_file(model_path).get("compress") or {}).get("qat"):
        raise CQDError(f"{model_path} is a QAT model, whose int8 form (torchao's quantize/dequantize graph) has no "
                       "TorchScript export; use --format onnx (QDQ, run by onnxruntime) or --format pt2")
    model, ck = load_model(model_path)
    model.eval()  # (an exported graph's eval() returns None, so not chained)
    model, form = deployed(model, ck, model_path)
    cfg = run_config(cfg if cfg is not None else ck["config"])
    out = Path(out) if out is not None else model_path.with_name("model" + SUFFIX[fmt])
    loader, maker = _test_data(cfg)
    sample = _first_batch(loader, maker, 64)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        t0 = time.perf_counter()
        _write(model, fmt, sample, tmp)
        res = {"path": str(out), "format": fmt, "form": form, "export_s": time.perf_counter() - t0}
        if check:
            run = runner(tmp, fmt)
            res["check"] = (_check_int8(model, run, loader, maker, max_drop) if form == "int8"
                            else _check_fp32(model, run, sample, atol))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    res["bytes"] = out.stat().st_size
    return res


def _write(model: nn.Module, fmt: str, sample: Tensor, path: Path) -> None:
    batch = {0: torch.export.Dim("batch", min=1)}
    if fmt == "onnx":
        import logging
        logging.getLogger("torch.onnx").setLevel(logging.WARNING)
        try:
            torch.onnx.export(model, (sample,), str(path), dynamic_shapes=(batch,), dynamo=True, external_data=False,
                              verbose=False)
        except Exception as e:  # the exporter names the op it cannot translate
            raise CQDError(f"ONNX export of {getattr(model, 'model_name', type(model).__name__)!r} failed: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    elif fmt == "torchscript":  # deprecated by torch in favour of torch.export (pt2), still asked for by deployments
        with torch.no_grad(), _no_jit_deprecation():
            traced = torch.jit.trace(model, (sample,), check_trace=False)
            torch.jit.save(traced, str(path))
    else:
        torch.export.save(torch.export.export(model, (sample,), dynamic_shapes=(batch,)), str(path))


def runner(path: str | Path, fmt: str, threads: int | None = None):
    """A function images (N, C, H, W) -> logits (numpy) that runs the written file: onnxruntime for ONNX,
    torch.jit.load for TorchScript, torch.export.load for pt2."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: np.ascontiguousarray(x.numpy() if isinstance(x, Tensor) else x)})[0]
    with _no_jit_deprecation():
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    @torch.no_grad()
    def run(x):
        return module(torch.as_tensor(x).contiguous()).float().numpy()

    return run


@contextlib.contextmanager
def _no_jit_deprecation():
    """torch 2.14 warns that torch.jit is deprecated at each trace/save/load; the user chose the format."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


def _test_data(cfg):
    from cqd.engine.loaders import eval_loader
    from cqd.tasks import task_of

    task = task_of(cfg)
    _, test_ds, _, base_test = task.build_datasets(cfg)
    return eval_loader(cfg, test_ds, base_test), task.make_maker(cfg, base_test)


def _first_batch(loader, maker, n: int) -> Tensor:
    got = []
    for batch in loader:
        got.append(maker(batch, "cpu").z.contiguous())
        if sum(len(b) for b in got) >= n:
            break
    return torch.cat(got)[:n]


@torch.no_grad()
def _check_fp32(model, run, sample: Tensor, atol: float) -> dict:
    want = model(sample).float().numpy()
    got = run(sample)
    diff = float(np.abs(got - want).max())
    if not diff <= atol:
        raise CQDError(f"the exported file's logits differ from PyTorch's by up to {diff:.3g} on a test batch "
                       f"(allowed {atol:g}); the file was not written")
    return {"batch": len(sample), "max_abs_diff": diff, "atol": atol,
            "same_top1": float((got.argmax(1) == want.argmax(1)).mean())}


@torch.no_grad()
def _check_int8(model, run, loader, maker, max_drop: float) -> dict:
    hits_torch = hits_file = n = 0
    for batch in loader:
        pair = maker(batch, "cpu")
        z = pair.z.contiguous()
        hits_torch += int((model(z).argmax(1) == pair.y).sum())
        hits_file += int((torch.from_numpy(run(z)).argmax(1) == pair.y).sum())
        n += len(pair.y)
    a, b = 100 * hits_torch / n, 100 * hits_file / n
    if abs(a - b) > max_drop:
        raise CQDError(f"the exported int8 file's top-1 on the test set is {b:.2f}% against PyTorch's int8 graph's "
                       f"{a:.2f}% (allowed difference {max_drop:g} points); the file was not written")
    return {"n_test": n, "top1_torch": a, "top1_file": b, "max_drop": max_drop}


def latency_ms(run, chw, batch: int, repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of `run` on a random batch, in milliseconds."""
    x = torch.randn(batch, *chw).numpy()
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))
