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
import io
import os
import re
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
                 atol: float = 1e-3, max_drop: float = 0.5, force: bool = False) -> dict:
    """Write `model_path` (a `model.pt`) as `fmt` to `out` (default beside it: model.onnx, model.ts.pt, model.pt2)
    and check it; `cfg` (default: the run's own config, from model.pt) gives the test set of the check, and must be
    of the model's task. An existing `out` is replaced only with `force`; the model itself never."""
    from cqd.compress.compressor import deployed
    from cqd.engine.checkpoint import load_model_file
    from cqd.engine.model_files import check_task, load_model
    from cqd.engine.schema import run_config

    if fmt not in FORMATS:
        raise CQDError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_name("model" + SUFFIX[fmt])
    _check_target(model_path, out, fmt, force)
    if fmt == "torchscript" and (load_model_file(model_path).get("compress") or {}).get("qat"):
        raise CQDError(f"{model_path} is a QAT model, whose int8 form (torchao's quantize/dequantize graph) has no "
                       "TorchScript export; use --format onnx (QDQ, run by onnxruntime) or --format pt2")
    model, ck = load_model(model_path)
    model.eval()  # (an exported graph's eval() returns None, so not chained)
    model, form = deployed(model, ck, model_path)
    cfg = run_config(cfg if cfg is not None else ck["config"])
    check_task(ck, cfg.task, model_path)
    loader, maker = _test_data(cfg)
    sample = _first_batch(loader, maker, 64)
    if sample.shape[1] != ck["in_chans"]:
        raise CQDError(f"{model_path} takes {ck['in_chans']}-channel images, but the config's test images "
                       f"({cfg.data.name}) have {sample.shape[1]} channel(s): export it with the config it was "
                       "trained with (leave --config out for its own)")
    tmp = _writable(out)
    try:
        t0 = time.perf_counter()
        try:
            _write(model, fmt, sample, tmp)
        except Exception as e:  # noqa: BLE001 - the exporter's failure on this model, told in one paragraph
            raise CQDError(failure(fmt, model, e).replace(str(tmp), str(out))) from None
        if fmt == "onnx":
            write_onnx_metadata(tmp, ck, model_path)
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


def _check_target(model_path: Path, out: Path, fmt: str, force: bool) -> None:
    """`out` is neither the model being exported nor (without `force`) an existing file or a folder."""
    if out.exists() and model_path.exists() and out.resolve() == model_path.resolve():
        raise CQDError(f"--out {out} is the model being exported: writing there would replace it; choose another "
                       f"--out (default: beside it, {model_path.with_name('model' + SUFFIX[fmt])})")
    if out.is_dir():
        raise CQDError(f"--out {out} is a folder; give a file name, e.g. {out / ('model' + SUFFIX[fmt])}")
    if out.exists() and not force:
        raise CQDError(f"{out} exists; pass --force (api: force=True) to replace it, or choose another --out")


def _writable(out: Path) -> Path:
    """The temporary file `out` is written to first, created now: a folder that cannot hold it is an error naming
    `out` (the path the user gave), before any export work."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"")
    except OSError as e:
        raise CQDError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    return tmp


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:300]}"


def failure(fmt: str, model: nn.Module, e: BaseException) -> str:
    """An exporter's failure in one line: its message's first line (colour codes removed) and, where it wraps
    another exception (torch.onnx's TorchExportError wraps torch.export's), the innermost one: the cause."""
    chain = [e]
    while len(chain) < 20:
        nxt = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if nxt is None:
            break
        chain.append(nxt)
    name = getattr(model, "model_name", type(model).__name__)
    cause = f" (cause: {_first_line(chain[-1])})" if len(chain) > 1 else ""
    return f"{FORMAT_NAMES[fmt]} export of {name!r} failed: {_first_line(e)}{cause}"


FORMAT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript", "pt2": "pt2 (torch.export)"}


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx and torch.export log their progress and errors ("E1206 ... always_classified is unsupported")
    on stderr; the failure, if any, is told once by `failure`."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write(model: nn.Module, fmt: str, sample: Tensor, path: Path) -> None:
    batch = {0: torch.export.Dim("batch", min=1)}
    if fmt == "onnx":
        with _quiet_exporter():
            torch.onnx.export(model, (sample,), str(path), dynamic_shapes=(batch,), dynamo=True, external_data=False,
                              verbose=False)
    elif fmt == "torchscript":  # deprecated by torch in favour of torch.export (pt2), still asked for by deployments
        with torch.no_grad(), _no_jit_deprecation():
            traced = torch.jit.trace(model, (sample,), check_trace=False)
            torch.jit.save(traced, str(path))
    else:
        with _quiet_exporter():
            program = torch.export.export(model, (sample,), dynamic_shapes=(batch,))
        torch.export.save(program, str(path))


def write_onnx_metadata(path: Path, ck: dict, model_path: Path) -> None:
    """The model's preprocessing (classes, mean, std, image_size, in_chans; `cqd predict` reads them) as JSON
    values of the ONNX file's metadata_props; a file without them (and no config to rebuild them) gets a warning."""
    import json

    import onnx

    from cqd.engine.model_files import preprocessing
    from cqd.errors import CheckpointError

    try:
        meta = preprocessing(ck, model_path)
    except CheckpointError as e:
        warnings.warn(f"the ONNX file gets no preprocessing metadata (cqd predict will refuse it): {e}", stacklevel=2)
        return
    graph = onnx.load(str(path))
    for key, value in meta.items():
        prop = graph.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value)
    onnx.save(graph, str(path))


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
