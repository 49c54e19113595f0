"""Sym-parameters (issue 16): Dirichlet draws keyed by (seed, index, epoch) on the simplex, blends whose
corners are the plain twins, SGN's loss mixing, c-gates at named taps that a trained net listens to, the
c regressor's loss, routing, clear errors, and a bit-exact resume of the quality-conditioned student."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cqd.analysis.symtable import load_sym_config, mixes_of, route
from cqd.data.blend import BlendMaker
from cqd.data.paired import PairMaker
from cqd.engine.model_files import load_model
from cqd.engine.schema import run_config
from cqd.engine.trainer import train
from cqd.errors import ConfigError, CQDError
from cqd.files import load_checkpoint
from cqd.methods.symcqd import conditioned_logits, soft_target_kl
from cqd.models import create_model
from cqd.models.sym import SymNet, _GateHook, stage_outputs, sym_net
from cqd.sym import dirichlet_moments, draw_c, mix_losses
from helpers import interrupt_at_step, tiny_cfg

MIX = ["lowres:size=4", "blur:sigma=1", "noise:std=0.2", "jpeg:quality=10"]
N, S = 24, 16


def batches(indices, size=8):
    images = torch.randint(0, 256, (N, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i in range(0, len(indices), size):
        idx = torch.tensor(indices[i:i + size])
        yield {"full": images[idx], "label": idx % 3, "box": torch.zeros(len(idx), 4), "index": idx}


# --- Dirichlet draws ---------------------------------------------------------------------------------------

def test_dirichlet_draws_are_reproducible_per_seed_index_epoch_and_lie_on_the_simplex():
    a = draw_c(3, torch.tensor([5, 3, 9]), 2, 0.5, 4)
    b = draw_c(3, torch.tensor([9, 100, 5, 3, 7]), 2, 0.5, 4)  # same samples in another batch and order
    assert torch.equal(a, b[[2, 3, 0]])
    assert not torch.equal(a, draw_c(3, torch.tensor([5, 3, 9]), 3, 0.5, 4))  # another epoch
    assert not torch.equal(a, draw_c(4, torch.tensor([5, 3, 9]), 2, 0.5, 4))  # another seed
    c = draw_c(0, torch.arange(5000), 0, 0.05, 3)  # small alpha: mass at the corners, no 0/0
    assert torch.isfinite(c).all() and (c >= 0).all()
    assert torch.allclose(c.sum(1), torch.ones(5000), atol=1e-6)
    assert float(c.max(1).values.mean()) > 0.9


@pytest.mark.parametrize("alpha", [0.5, [2.0, 1.0, 0.3]])
def test_dirichlet_marginals_follow_the_beta_law_and_the_moments(alpha):
    """c_k of Dirichlet(a) is Beta(a_k, a0 - a_k): a Kolmogorov-Smirnov test per component, and the moments."""
    k = 3
    a = [alpha] * k if isinstance(alpha, float) else alpha
    c = draw_c(1, torch.arange(20000), 0, alpha, k).double()
    mean, var = dirichlet_moments(a)
    for j in range(k):
        assert stats.kstest(c[:, j].numpy(), stats.beta(a[j], sum(a) - a[j]).cdf).pvalue > 1e-3
        assert abs(float(c[:, j].mean()) - mean[j]) < 0.01
        assert abs(float(c[:, j].var()) - var[j]) < 0.1 * var[j]


# --- blends ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixed", [True, False])
def test_blend_at_a_one_hot_c_equals_that_degradations_twin(fixed):
    for k, spec in enumerate(MIX):
        blend = BlendMaker(MIX, c_table=F.one_hot(torch.tensor([k]), len(MIX)).float(), seed=7)
        plain = PairMaker(spec, seed=7)
        if fixed:
            blend.fix_twins(batches(list(range(N))), "cpu", N)
            plain.fix_twins(batches(list(range(N))), "cpu", N)
        for got, want in zip((blend(b, "cpu") for b in batches([3, 17, 0, 9, 21])),
                             (plain(b, "cpu") for b in batches([3, 17, 0, 9, 21]))):
            assert torch.equal(got.z, want.z) and torch.equal(got.x, want.x)
            assert torch.equal(got.c, F.one_hot(torch.full((len(got),), k), len(MIX)).float())


def test_blend_is_the_c_weighted_sum_of_the_twins_with_c_drawn_per_epoch():
    blend = BlendMaker(MIX, alpha=0.5, seed=2)
    blend.fix_twins(batches(list(range(N))), "cpu", N)
    plains = [PairMaker(spec, seed=2) for spec in MIX]
    batch = next(batches([4, 11, 2, 19]))
    for epoch in (0, 1):
        _, z, _, c = blend.blend_views(batch, "cpu", epoch)
        assert torch.equal(c, draw_c(2, batch["index"], epoch, 0.5, len(MIX)))
        want = sum(c[:, k, None, None, None] * p.views(batch, "cpu")[1] for k, p in enumerate(plains))
        torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(blend.mix_of(batch["index"], 0), blend.mix_of(batch["index"], 1))


# --- loss mixing --------------------------------------------------------------------------------------------

def test_mixed_loss_with_a_one_hot_c_equals_that_single_loss_and_else_the_weighted_sum():
    g = torch.Generator().manual_seed(0)
    losses = {"l1": torch.rand(6, generator=g), "gan": torch.rand(6, generator=g), "style": torch.rand(6, generator=g)}
    names = ["gan", "l1", "style"]
    for k, name in enumerate(names):
        c = F.one_hot(torch.full((6,), k), 3).float()
        assert torch.equal(mix_losses(c, losses, names), losses[name].mean())
    c = torch.softmax(torch.randn(6, 3, generator=g), 1)
    want = sum(float(c[b, j]) * float(losses[n][b]) for b in range(6) for j, n in enumerate(names)) / 6
    assert abs(float(mix_losses(c, losses, names)) - want) < 1e-6
    with pytest.raises(CQDError, match="no loss named 'vgg'"):
        mix_losses(c, losses, ["gan", "l1", "vgg"])
    with pytest.raises(CQDError, match=r"c must be \(B, 2\)"):
        mix_losses(c, losses, ["gan", "l1"])


# --- gates ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "tv:resnet18", "timm:resnet10t"])
def test_gates_sit_at_the_named_taps_start_as_identities_and_see_c(name):
    torch.manual_seed(0)
    net = create_model(name, 10, 1).eval()
    ref = copy.deepcopy(net)
    sample = torch.zeros(2, 1, 32, 32)
    layers = stage_outputs(net, sample)
    sym = sym_net(net, 3, None, sample).eval()
    modules = dict(sym.net.named_modules())
    assert layers and sym.gated == layers
    for n, gate in sym.gate_of().items():
        assert [h.gate for h in modules[n]._forward_hooks.values() if isinstance(h, _GateHook)] == [gate]
    assert ref.state_dict().keys() == {k[len("net."):] for k in sym.state_dict() if k.startswith("net.")}
    x = torch.randn(4, 1, 32, 32)
    c1, c2 = torch.eye(3)[[0, 1, 2, 0]], torch.full((4, 3), 1 / 3)
    with torch.no_grad():
        assert torch.equal(sym(x, c1), ref(x)) and torch.equal(sym(x, c2), ref(x))  # 2 sigmoid(0) = 1
        twin = copy.deepcopy(sym)
        for gate in sym.gates:
            gate.fc2.bias.normal_()
            gate.fc2.weight.normal_()
        assert not torch.allclose(sym(x, c1), sym(x, c2))
        assert torch.equal(twin(x, c1), ref(x)) and torch.equal(twin(x, c2), ref(x))  # a copy has its own gates
    with pytest.raises(CQDError, match=r"model\(x, c\)"):
        sym(x, None)
    with pytest.raises(ConfigError, match="no layer named 'layer9'"):
        sym_net(create_model(name, 10, 1), 3, ["layer9"], sample)


def test_a_trained_students_output_depends_on_c_and_model_pt_rebuilds_it(tmp_path):
    root = tmp_path
    train(tiny_cfg(root, "f", method__name="hq"))
    cfg = tiny_cfg(root, "sym", method__name="symcqd", data__mix={"degradations": MIX[:3]}, train__lr=0.2,
                   train__max_steps_per_epoch=3, teacher__checkpoint=str(root / "f" / "model.pt"))
    train(cfg)
    model, ck = load_model(root / "sym" / "model.pt", 10, 1)
    assert (isinstance(model, SymNet) and ck["sym"]["k"] == 3
            and set(ck["sym"]["gates"]) == {"features.3", "features.4", "features"})
    model.eval()
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        outs = [model(x, torch.eye(3)[[k] * 8]) for k in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    regressor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    torch.testing.assert_close(conditioned_logits(model, x, regressor=regressor),
                               model(x, torch.softmax(regressor(x), 1)))
    with pytest.raises(CQDError, match="give the mix c"):
        conditioned_logits(model, x)
    state = load_checkpoint(root / "sym" / "last.ckpt")["method"]
    assert all(torch.equal(v, state["student." + k]) for k, v in model.state_dict().items())


# --- training: resume, errors, the regressor's loss, routing ----------------------------------------------

def test_symcqd_resume_is_bit_exact(tmp_path, monkeypatch):
    root = tmp_path
    train(tiny_cfg(root, "f", method__name="hq"))
    over = {"method__name": "symcqd", "data__mix": {"degradations": MIX[:2]}, "train__epochs": 2,
            "teacher__checkpoint": str(root / "f" / "model.pt")}
    ref = train(tiny_cfg(root, "ref", **over))
    cfg = tiny_cfg(root, "cut", **over)
    with monkeypatch.context() as m:
        interrupt_at_step(m, 4)  # epoch 2, step 2
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    res = train(copy.deepcopy(cfg), resume=True)
    got, want = (load_checkpoint(root / n / "last.ckpt")["method"] for n in ("cut", "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [r["loss_kd"] for r in res["history"]] == [r["loss_kd"] for r in ref["history"]]
    assert (any(k.startswith("student.gates.1.") for k in got)
            and any(k.startswith("student.net.features.4.") for k in got))


def test_mix_configs_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="set data.mix"):
        run_config(tiny_cfg(tmp_path, "a", method__name="symcqd"))
    with pytest.raises(ConfigError, match="k=3 but data.mix has 2"):
        run_config(tiny_cfg(tmp_path, "a", method__name="quality_mix", method__quality_mix={"k": 3},
                            data__mix={"degradations": MIX[:2]}))
    with pytest.raises(ConfigError, match="cannot be blended"):
        run_config(tiny_cfg(tmp_path, "a", data__mix={"degradations": ["clutter", "blur"]}))
    with pytest.raises(ConfigError, match="on the simplex"):
        run_config(tiny_cfg(tmp_path, "a", data__mix={"degradations": MIX[:2], "c": [0.7, 0.7]}))
    cfg = run_config(tiny_cfg(tmp_path, "a", method__name="symcqd", data__mix={"degradations": MIX}))
    assert cfg.method.symcqd.k == 4
    with pytest.raises(ConfigError, match="set base.data.mix"):
        load_sym_config({"base": tiny_cfg(tmp_path, "a")})


def test_regressor_loss_is_the_kl_to_c_and_zero_at_p_equal_c():
    g = torch.Generator().manual_seed(0)
    c = torch.softmax(torch.randn(5, 4, generator=g), 1)
    c[0] = torch.tensor([1.0, 0, 0, 0])
    logits = torch.randn(5, 4, generator=g)
    p = torch.softmax(logits, 1)
    want = sum(float(c[b, j]) * (float(torch.log(c[b, j])) - float(torch.log(p[b, j])))
               for b in range(5) for j in range(4) if c[b, j] > 0) / 5
    assert abs(float(soft_target_kl(logits, c)) - want) < 1e-5
    assert abs(float(soft_target_kl(torch.log(c[1:]), c[1:]))) < 1e-6


def test_routing_takes_the_specialist_of_the_dominant_degradation_and_the_test_mixes_are_the_issues():
    spec = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]])  # (K, B): specialist k predicts 10k + b
    c = torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.2, 0.2], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    assert route(spec, c).tolist() == [10, 1, 22, 3]  # a tie goes to the first
    cfg = load_sym_config({"base": {"data": {"mix": {"degradations": MIX}}}, "eval": {"random": 9}})
    mixes = mixes_of(cfg)
    groups = [g for g, _ in mixes.values()]
    assert (groups.count("corners"), groups.count("midpoints"), groups.count("centre")) == (4, 6, 1)
    assert mixes["mid13"][1].tolist() == [[0, 0.5, 0, 0.5]] and mixes["random"][1].shape == (9, 4)
    assert torch.allclose(mixes["random"][1].sum(1), torch.ones(9))


def test_cqd_sym_writes_the_table_and_the_oracle_at_a_corner_is_that_specialist_on_its_own_test_set(tmp_path):
    """`cqd sym` end to end on a tiny budget (K = 2, one seed). At corner k the blend is exactly T_k's twin, so
    row (4) there is specialist k's own acc_lq, which the engine measured on its plain test set."""
    import json

    import yaml

    from cqd.cli import main

    base = tiny_cfg(tmp_path, "x", data__mix={"degradations": MIX[:2]})
    del base["name"], base["out_dir"]
    path = tmp_path / "sym.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sym"), "seeds": [0], "base": base,
                                    "eval": {"random": 5}}))
    assert main(["sym", "--config", str(path)]) == 0
    report = json.loads((tmp_path / "sym" / "report" / "sym.json").read_text())
    seed = report["per_seed"]["0"]
    assert set(seed["acc"]) == {"corner0", "corner1", "mid01", "centre", "random"}
    for k, spec in enumerate(["cqd1_lowres", "cqd2_blur"]):
        own = json.loads((tmp_path / "sym" / "cells" / "mix" / spec / "s0" / "result.json").read_text())
        assert seed["acc"][f"corner{k}"]["route_true"] == own["acc_lq"]
    cost = seed["cost"]
    assert cost["route_true"]["params"] == 2 * cost["cqd_mix"]["params"] < cost["route_pred"]["params"]
    assert cost["sym_true"]["params"] > cost["cqd_mix"]["params"]  # the gates
    md = (tmp_path / "sym" / "report" / "sym.md").read_text()
    assert "(4) K CQD specialists, routed by true dominant T (oracle)" in md and "random mixes" in md
