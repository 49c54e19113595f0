"""Compression of the student (`compress:`): structured pruning (Torch-Pruning) and quantization-aware
training (torchao PT2E), composed with the engine's methods, saved in model.pt and loaded back."""
from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from cqd.compress.compressor import Compressor
from cqd.compress.pruning import Pruner, channel_counts, count_params, reshape_to
from cqd.engine.precision import fp32_for_qat
from cqd.engine.schema import run_config
from cqd.errors import ConfigError
from cqd.experiments.schema import grid_config
from cqd.files import load_checkpoint
from cqd.models import create_model
from helpers import interrupt_after_epoch, tiny_cfg


def _prune(name: str, ratio: float, importance: str = "magnitude", seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_chans=1)
    cfg = run_config({"compress": {"prune": {"ratio": ratio, "importance": importance}}}).compress.prune
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    pruner = Pruner(model, cfg, x[:2], lambda n: [(x, y)])
    before = count_params(model)
    pruner.step()
    return model, pruner, before


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pruning_removes_channels_and_parameters_fall_to_about_one_minus_r_squared(name, ratio):
    model, pruner, before = _prune(name, ratio)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    full = [m for m in create_model(name, num_classes=10, in_chans=1).modules() if isinstance(m, torch.nn.Conv2d)]
    for m, f in zip(convs, full):  # every conv really lost its share of output channels (a weight of that shape)
        assert m.weight.shape[0] == f.out_channels - int(f.out_channels * ratio)
    share = count_params(model) / before
    assert abs(share - (1 - ratio) ** 2) < 0.03 * (1 - ratio) ** 2 + 0.01, share  # stem input and the 10 classes stay
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    assert model.head.out_features == 10


def test_pruned_shapes_depend_on_the_ratio_not_on_the_weights_and_rebuild_from_the_record():
    a, pa, _ = _prune("resnet8", 0.5, "magnitude", seed=0)
    b, pb, _ = _prune("resnet8", 0.5, "taylor", seed=1)
    assert channel_counts(a) == channel_counts(b)  # what a resumed run's replay relies on
    kept_a = a.features[0].weight.detach()
    assert pa.channels() == pb.channels() and "features.0" in pa.channels()
    fresh = reshape_to(create_model("resnet8", num_classes=10, in_chans=1), pa.channels())
    fresh.load_state_dict(a.state_dict())  # shapes fit exactly
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(fresh.eval()(x), a.eval()(x)) and torch.equal(fresh.features[0].weight, kept_a)


def test_taylor_importance_keeps_the_channels_with_the_largest_weight_times_gradient():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    ref = copy.deepcopy(model).eval()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    # the stem's 16 channels are one group: they are the residual stream of stage 1 (Torch-Pruning's DepGraph couples
    # the stem conv and BN, block 1's conv1 inputs and conv2/bn2 outputs, block 2's conv1 and shortcut inputs).
    # A channel's score: the sum over those layers of |w * dCE/dw| over its slice
    # (Molchanov et al.'s first-order Taylor)
    f, b1, b2 = ref.features[0], ref.features[3], ref.features[4]
    t = lambda m: (m.weight * m.weight.grad).abs()  # noqa: E731
    score = (t(f).sum((1, 2, 3)) + t(ref.features[1]) + t(b1.conv2).sum((1, 2, 3)) + t(b1.bn2)
             + t(b1.conv1).sum((0, 2, 3)) + t(b2.conv1).sum((0, 2, 3)) + t(b2.shortcut[0]).sum((0, 2, 3)))
    cfg = run_config({"compress": {"prune": {"ratio": 0.5, "importance": "taylor"}}}).compress.prune
    Pruner(model, cfg, x[:2], lambda n: [(x, y)]).step()
    kept = model.features[0].weight.detach()
    full = ref.features[0].weight.detach()
    idx = [int(((full - k).abs().flatten(1).sum(1)).argmin()) for k in kept]
    top = set(score.argsort(descending=True)[:8].tolist())
    assert sorted(idx) == sorted(top)


def test_a_pruned_run_trains_resumes_to_the_uninterrupted_result_and_loads_for_eval(tmp_path, monkeypatch):
    import cqd.api as api

    over = dict(method={"name": "lq"}, train__epochs=2,
                compress={"prune": {"ratio": 0.5, "schedule": "iterative", "steps": 2}})
    straight = api.train(tiny_cfg(tmp_path, "straight", **over))
    cfg = tiny_cfg(tmp_path, "resumed", **over)
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        with pytest.raises(KeyboardInterrupt):
            api.train(copy.deepcopy(cfg))
    assert load_checkpoint(tmp_path / "resumed" / "last.ckpt")["epoch"] == 1
    resumed = api.train(cfg, resume=True)
    a, b = (load_checkpoint(tmp_path / n / "model.pt") for n in ("straight", "resumed"))
    assert a["compress"]["channels"] == b["compress"]["channels"] and a["compress"]["channels"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    full = count_params(create_model("resnet8", num_classes=10, in_chans=1))
    assert straight["params"] == resumed["params"] < 0.3 * full  # two steps of 25% each: about (1 - 0.5)^2
    ev = api.evaluate(tmp_path / "straight" / "model.pt", tiny_cfg(tmp_path, "straight", **over))
    assert ev["form"] == "fp32" and ev["acc_lq"] == pytest.approx(straight["acc_lq"])


def test_qat_run_inserts_fake_quant_trains_in_fp32_and_converts_to_int8_for_eval_and_onnx(tmp_path):
    import onnx

    import cqd.api as api
    from cqd.engine.model_files import load_model

    cfg = tiny_cfg(tmp_path, "qat", method={"name": "lq"}, compress={"qat": True, "prune": {"ratio": 0.25}},
                   train__precision="bf16-mixed", train__max_steps_per_epoch=3)
    res = api.train(cfg)
    assert res["precision"] == "32-true"  # switched (and logged), since bf16 was asked for
    model, ck = load_model(tmp_path / "qat" / "model.pt")
    fq = [n for n in model.graph.nodes if n.op == "call_module" and "activation_post_process" in n.target]
    assert len(fq) >= 7 and ck["compress"]["qat"] and ck["compress"]["channels"]
    # the observers trained: a fake-quant's scale is no longer its initial 1.0
    scales = [getattr(model, n.target).scale for n in fq]
    assert all(float(s.reshape(-1)[0]) != 1.0 for s in scales)
    ev = api.evaluate(tmp_path / "qat" / "model.pt", cfg)
    assert ev["form"] == "int8"
    assert abs(ev["acc_lq"] - res["acc_lq"]) <= 2 / 32 + 1e-9  # int8 vs fake-quant: at most 2 of 32 test items differ
    out = api.export(tmp_path / "qat" / "model.pt", "onnx")
    assert out["form"] == "int8" and out["check"]["n_test"] == 32
    assert abs(out["check"]["top1_file"] - out["check"]["top1_torch"]) <= 0.5
    graph = onnx.load(out["path"]).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # int8 conv weights
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in graph.initializer)
    with pytest.raises(Exception, match="no TorchScript export"):
        api.export(tmp_path / "qat" / "model.pt", "torchscript")


def test_qat_switches_a_bf16_precision_to_fp32_and_says_so():
    for given in ("bf16-mixed", "16-mixed"):
        cfg = run_config({"compress": {"qat": True}, "train": {"precision": given, "accelerator": "cpu"}})
        new, note = fp32_for_qat(cfg)
        assert new.train.precision == "32-true" and cfg.train.precision == given
        assert "compress.qat" in note and given in note and "32-true" in note
    same, note = fp32_for_qat(run_config({"compress": {"qat": True}, "train": {"precision": "32-true"}}))
    assert note is None and same.train.precision == "32-true"
    plain, note = fp32_for_qat(run_config({"train": {"precision": "bf16-mixed"}}))
    assert note is None and plain.train.precision == "bf16-mixed"  # without qat nothing changes


@pytest.mark.parametrize("bad, where", [
    ({"prune": {"ratio": 1.0}}, "compress.prune.ratio"),
    ({"prune": {"ratio": -0.1}}, "compress.prune.ratio"),
    ({"prune": {"ratio": 0.5, "steps": 3}}, "schedule: iterative"),
    ({"prune": {"ratio": 0.5, "importance": "l1"}}, "compress.prune.importance"),
    ({"qat": "yes please"}, "compress.qat"),
])
def test_compress_settings_are_validated_and_name_the_key(bad, where):
    from cqd.config import apply_overrides  # noqa: F401  (the config module validates through RunConfig)

    with pytest.raises((ValidationError, ConfigError)) as e:
        run_config({"compress": bad})
    assert where in str(e.value)


def test_iterative_steps_beyond_the_epochs_and_qat_with_a_feature_method_are_errors(tmp_path):
    cfg = run_config(tiny_cfg(tmp_path, "x", compress={"prune": {"ratio": 0.5, "schedule": "iterative", "steps": 3}}))
    with pytest.raises(ConfigError, match="steps=3 is more than train.epochs=1"):
        Compressor(cfg, (1, 16, 16), lambda n: [])

    class Tapping(torch.nn.Module):  # a method that reads the student's layer through a hook (as FitNet does)
        def __init__(self):
            super().__init__()
            self.student = create_model("resnet8", num_classes=10, in_chans=1)
            self.student.features.register_forward_hook(lambda *a: None)

    qcfg = run_config(tiny_cfg(tmp_path, "y", method={"name": "fitnet"}, compress={"qat": True}))
    with pytest.raises(ConfigError, match="method 'fitnet' reads the student's layers features"):
        Compressor(qcfg, (1, 16, 16), lambda n: []).after_method(Tapping())


def test_a_grid_deploy_pair_must_name_its_rows():
    base = {"columns": {"lowres": {"degradation": "lowres:size=8"}}, "rows": ["lq", "cqd"]}
    grid_config({**base, "deploy": {"pairs": [["lq", "cqd"]]}})
    with pytest.raises(ConfigError, match="deploy.pairs names rows 'ft'"):
        grid_config({**base, "deploy": {"pairs": [["ft", "cqd"]]}})


def test_a_grid_with_deploy_reports_size_latency_and_each_pairs_gain(tmp_path):
    import json

    import cqd.api as api

    base = tiny_cfg(tmp_path, "unused", compress={"prune": {"ratio": 0.5}})
    for k in ("name", "out_dir"):
        base.pop(k)
    grid = {"name": "t", "out_dir": str(tmp_path / "grid"), "seeds": [0],
            "columns": {"lr": {"degradation": "lowres:size=4", "label": "lowres 4"}},
            "rows": [{"id": "ft", "label": "fine-tune", "set": {"method.name": "cqd", "method.cqd.lam": 0}},
                     {"id": "kd", "label": "CQD", "set": {"method.name": "cqd"}}],
            "base": base, "deploy": {"pairs": [["ft", "kd"]], "repeats": 3, "batches": [1, 4]}}
    out = api.table(grid)
    report = tmp_path / "grid" / "report"
    res = {r: json.loads((tmp_path / "grid" / "cells" / "lr" / r / "s0" / "result.json").read_text())
           for r in ("ft", "kd")}
    deploy = json.loads((report / "deploy.json").read_text())
    full = count_params(create_model("resnet8", num_classes=10, in_chans=1))
    for m in deploy["rows"]:
        assert m["form"] == "fp32" and m["params"] == res[m["row"]]["params"] < 0.3 * full
        assert m["onnx_bytes"] == (report / "deploy" / "lr" / f"{m['row']}.onnx").stat().st_size
        assert set(m["latency_ms"]) == {"1", "4"} and all(v > 0 for v in m["latency_ms"].values())
    gain = 100 * (res["kd"]["acc_lq"] - res["ft"]["acc_lq"])
    assert deploy["gains"][0]["gain_per_seed"] == [pytest.approx(gain)]
    md = (report / "table.md").read_text()
    assert "Size and CPU latency" in md and f"| CQD vs fine-tune | {gain:+.2f} ± 0.00 |" in md
    assert out["markdown"].endswith(md[md.index("\n## Size"):])


def test_pruning_reestimates_batchnorm_statistics_exactly_over_the_training_batches(tmp_path):
    cfg = run_config(tiny_cfg(tmp_path, "bn", compress={"prune": {"ratio": 0.5}, "recalibrate_bn": 3}))
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    data = [(torch.randn(8, 1, 16, 16) * (1 + k) + k, torch.arange(8) % 10) for k in range(4)]
    Compressor(cfg, (1, 16, 16), lambda n: data[:n], log=lambda s: None).before_method(model, data[0][0][:2])
    with torch.no_grad():  # the stem BN's input: the pruned stem conv's output on the 3 batches used
        acts = [model.features[0](x) for x, _ in data[:3]]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    bn = model.features[1]
    assert bn.num_batches_tracked == 3 and bn.momentum == 0.1  # exact averages, then the usual momentum back
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, var, atol=1e-4, rtol=1e-4)


def test_batchnorm_reestimation_is_on_for_a_compressed_student_and_for_any_run_that_sets_it():
    assert run_config({}).compress.bn_batches == 0 and not run_config({}).compress.active  # plain runs: unchanged
    assert run_config({"compress": {"qat": True}}).compress.bn_batches == 16
    assert run_config({"compress": {"prune": {"ratio": 0.3}, "recalibrate_bn": 0}}).compress.bn_batches == 0
    plain = run_config({"compress": {"recalibrate_bn": 4}}).compress
    assert plain.active and plain.bn_batches == 4  # e.g. a table's uncompressed rows, to compare alike


def test_qat_of_a_net_with_zero_batchnorm_weights_stays_finite():
    from cqd.compress import qat

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    with torch.no_grad():  # as timm's zero-initialised last BN of each residual block
        model.features[3].bn2.weight.zero_()
    g = qat.prepare(model, (1, 16, 16))
    g.train()
    with torch.no_grad():
        outs = [g(torch.randn(4, 1, 16, 16)) for _ in range(2)]  # without the guard: NaN, then an observer error
    assert all(torch.isfinite(o).all() for o in outs)
    assert float(model.features[3].bn2.weight.detach().abs().min()) == pytest.approx(qat.ZERO_BN_WEIGHT)
