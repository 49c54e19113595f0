"""Online distillation, `dml` and `afd`: the losses against hand-written formulas, which network each
gradient reaches, the phases' order and what each one moves, every network trained, checkpointed and
resumed bit-exactly, learning on a small subset (CE falls, discriminators beat chance), clear errors
for bad settings, the online grid and its reference text, and two DDP processes equal to one."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cqd.data.paired import Pair
from cqd.engine.schema import run_config
from cqd.engine.trainer import train
from cqd.errors import ConfigError
from cqd.experiments.schema import load_grid_config
from cqd.files import load_checkpoint
from cqd.methods import METHODS, Step
from cqd.methods.afd import AFD, AFDParams, discriminator_loss, generator_loss
from cqd.methods.dml import DML, DMLParams, mutual_terms
from cqd.models import create_model
from helpers import Score, interrupt_at_step, tiny_cfg

SAMPLE = torch.zeros(2, 1, 32, 32)


def cfg_for(root: Path, name: str, **over) -> dict:
    """helpers.tiny_cfg at 32 px: 96 items, 2 epochs of 3 steps of 32, two resnet8 in deep mutual learning."""
    return tiny_cfg(root, name, **{"data__train_subset": 96, "data__image_size": 32,
                                   "data__degradation": "lowres:size=8",
                                   "train__epochs": 2, "train__batch_size": 32, "train__max_steps_per_epoch": 3,
                                   "method__name": "dml", **over})


def _pair(n: int = 4) -> Pair:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 32, 32, generator=g)
    return Pair(x, x.flip(-1) * 0.5, torch.arange(n) % 10, torch.zeros(n, 4), torch.arange(n))


def _kl_by_hand(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """Mean over the batch of sum_c q_c (log q_c - log p_c), q = softmax(teacher / T), p = softmax(student / T)."""
    q = (teacher / T).exp() / (teacher / T).exp().sum(1, keepdim=True)
    p = (student / T).exp() / (student / T).exp().sum(1, keepdim=True)
    return (q * (q.log() - p.log())).sum(1).mean()


# --- the losses on fixed tensors -------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 3])
def test_the_mutual_term_is_T2_times_the_mean_kl_toward_the_others(K):
    T = 2.5
    logits = [torch.randn(5, 7, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 3 for k in range(K)]
    got = mutual_terms(logits, T)
    for k in range(K):
        want = T * T * sum(_kl_by_hand(logits[j], logits[k], T) for j in range(K) if j != k) / (K - 1)
        assert torch.allclose(got[k], want, rtol=1e-10), (k, got[k], want)
    assert got[0] > 0.1  # different logits: a term far from zero


def test_dml_losses_are_ce_and_lam_times_the_mutual_term_each_network_on_its_own_view():
    torch.manual_seed(0)
    method = DML(create_model("resnet8", 10, 1), DMLParams(T=3.0, lam=2.0, views=["z", "x"]))
    pair = _pair()
    out, losses = method(Step(pair))
    l1, l2 = method.student(pair.z), method.peers[0](pair.x)  # network 2 sees x (train mode: batch statistics)
    assert torch.allclose(out, l1)
    assert set(losses) == {"loss_ce", "loss_kd", "net2/loss_ce", "net2/loss_kd"}
    assert torch.allclose(losses["loss_ce"], F.cross_entropy(l1, pair.y))
    assert torch.allclose(losses["net2/loss_ce"], F.cross_entropy(l2, pair.y))
    assert torch.allclose(losses["loss_kd"], 2.0 * 9.0 * _kl_by_hand(l2, l1, 3.0), atol=1e-6)
    assert torch.allclose(losses["net2/loss_kd"], 2.0 * 9.0 * _kl_by_hand(l1, l2, 3.0), atol=1e-6)
    _, off = DML(create_model("resnet8", 10, 1), DMLParams(lam=0.0))(Step(pair))
    assert set(off) == {"loss_ce", "net2/loss_ce"}  # lam 0: each network alone


def test_a_networks_mutual_term_sends_no_gradient_to_the_others():
    torch.manual_seed(0)
    method = DML(create_model("resnet8", 10, 1), DMLParams(k=3))
    _, losses = method(Step(_pair()))
    losses["net2/loss_kd"].backward()
    grads = [[p.grad for p in net.parameters()] for net in method.nets]
    assert all(g is None for g in grads[0] + grads[2])
    assert sum(g.abs().sum() for g in grads[1] if g is not None) > 0


def test_lsgan_losses_on_known_scores():
    real, fake = torch.tensor([[1.0], [0.5]]), torch.tensor([[0.0], [0.5]])
    assert discriminator_loss(real, fake).item() == pytest.approx((0 + 0.25) / 2 + (0 + 0.25) / 2)
    assert generator_loss(fake).item() == pytest.approx((1 + 0.25) / 2)


def test_afd_legacy_direction_next_pairs_each_network_with_the_next_cyclically_for_K_3():
    """`direction: next` (cqd before the key; the default, the paper's, is in test_reference_defaults.py)."""
    torch.manual_seed(0)
    method = AFD(create_model("resnet8", 10, 1), AFDParams(k=3, direction="next", real="raw"), sample=SAMPLE)
    a = [0.5, 2.0, -1.5]  # distinct, so a discriminator given another pair's maps gives other numbers
    method.discs = nn.ModuleList(Score(v) for v in a)
    pair = _pair()
    _, adv = method(Step(pair, phase="adv"))
    _, disc = method(Step(pair, phase="disc"))
    with torch.no_grad():
        m = [net.features(pair.z).mean((1, 2, 3)) for net in method.nets]  # same batch, train mode: same maps
    for i, t in enumerate(["", "net2/", "net3/"]):
        j = (i + 1) % 3
        assert torch.allclose(adv[f"{t}loss_adv"], ((1 - a[i] * m[i]) ** 2).mean(), atol=1e-6)
        assert torch.allclose(disc[f"{t}loss_disc"], ((1 - a[i] * m[j]) ** 2).mean() + ((a[i] * m[i]) ** 2).mean(),
                              atol=1e-6)
    with pytest.raises(RuntimeError, match="run 'adv' first"):  # the adv phase's maps are used once
        method(Step(pair, phase="disc"))


def test_afd_transfer_layers_map_each_network_into_the_shared_shape_or_with_real_raw_the_other_ones():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)
    method = AFD(create_model("resnet8", 10, 1), AFDParams(layers=["features.4", "features"]), sample=SAMPLE)
    assert method.transfers[0](f1, (8, 8)).shape == method.transfers[1](f2, (8, 8)).shape == (2, 32, 8, 8)
    method = AFD(create_model("resnet8", 10, 1), AFDParams(layers=["features.4", "features"], real="raw"),
                 sample=SAMPLE)
    assert method.transfers[0](f1, f2.shape[-2:]).shape == f2.shape
    assert method.transfers[1](f2, f1.shape[-2:]).shape == f1.shape
    same = AFD(create_model("resnet8", 10, 1), AFDParams(), sample=SAMPLE)
    assert not list(same.transfers.parameters())  # same shapes: no transfer layer
    assert torch.equal(same.transfers[0](f2, f2.shape[-2:]), f2)


# --- through the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("online")


def _params(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith(("weight", "bias"))}


@pytest.mark.parametrize("method", ["dml", "afd"])
def test_every_network_trains_is_checkpointed_and_resume_is_bit_exact(method, root, monkeypatch):
    """`method.name=<method>` and nothing else; afd with taps of other sizes, so network 2's transfer layer (into
    network 1's 32 channels) trains too."""
    over = {"method__name": method}
    if method == "afd":
        over["method__afd"] = {"layers": ["features.4", "features"]}
    ref = train(cfg_for(root, f"{method}-ref", **over))
    cfgs = {cut: cfg_for(root, f"{method}-{cut}", **over) for cut in (1, 5)}  # before step 1; epoch 2, step 2
    for cut, cfg in cfgs.items():
        with monkeypatch.context() as m:
            interrupt_at_step(m, cut)
            with pytest.raises(KeyboardInterrupt):
                train(copy.deepcopy(cfg))
    init = load_checkpoint(Path(cfgs[1]["out_dir"]) / "last.ckpt")["method"]
    res = train(copy.deepcopy(cfgs[5]), resume=True)
    final = load_checkpoint(Path(cfgs[5]["out_dir"]) / "last.ckpt")["method"]
    want = load_checkpoint(root / f"{method}-ref" / "last.ckpt")["method"]
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
    assert [r["loss_ce"] for r in res["history"]] == [r["loss_ce"] for r in ref["history"]]
    parts = ["student.", "peers.0."] + (["transfers.1.", "discs.0.", "discs.1."]
                                        if method == "afd" else [])
    for part in parts:
        moved = _params(final, part)
        assert moved and all(not torch.equal(v, init[k]) for k, v in moved.items()), part
    n1, n2 = _params(init, "student."), _params(init, "peers.0.")
    assert any(not torch.equal(v, n2["peers.0." + k[len("student."):]]) for k, v in n1.items())  # own inits
    deployed = load_checkpoint(root / f"{method}-ref" / "model.pt")["model"]
    assert all(torch.equal(v, want["student." + k]) for k, v in deployed.items())  # model.pt is network 1
    assert {"acc_lq", "acc_hq", "net2/acc_lq", "net2/acc_hq", "net2/loss_ce"} <= set(ref["history"][-1])


def test_afd_phases_step_in_order_and_each_moves_only_its_own_parts(root, monkeypatch):
    seen = []
    real = AFD.forward

    def spy(self, step):
        seen.append((step.phase, {k: v.detach().clone() for k, v in self.named_parameters()}))
        return real(self, step)

    monkeypatch.setattr(AFD, "forward", spy)
    res = train(cfg_for(root, "afd-order", method__name="afd", train__epochs=1,
                        method__afd={"layers": ["features.4", "features"]}))
    assert [p for p, _ in seen] == ["main", "adv", "disc"] * 3
    assert {"loss_adv", "net2/loss_adv", "loss_disc", "net2/loss_disc", "loss_kd"} <= set(res["history"][-1])
    moved_by = {"main": {"student", "peers"}, "adv": {"student", "peers", "transfers"}, "disc": {"discs"}}
    for (phase, before), (_, after) in zip(seen, seen[1:]):
        changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert changed == moved_by[phase], phase


def _held_out_pair(cfg: dict) -> Pair:
    """The first test batch of `cfg`'s data, as the engine makes it."""
    from cqd.engine.loaders import eval_loader
    from cqd.tasks.classification.data import build_datasets, make_maker

    rc = run_config(cfg)
    _, test_ds, _, base_test = build_datasets(rc)
    return make_maker(rc, base_test)(next(iter(eval_loader(rc, test_ds, base_test))), "cpu")


def test_on_a_small_subset_the_ce_falls_and_each_discriminator_beats_chance_on_held_out_maps(root):
    """K = 3 on 64 items, 16 steps. Chance for a discriminator: a constant score c has LSGAN loss
    (1 - c)^2 + c^2, least at c = 0.5: 0.5. Each D_i must score below that on a held-out test batch
    (untrained, its scores are near 0: loss near 1)."""
    cfg = cfg_for(root, "afd-learns", method={"name": "afd", "afd": {"k": 3}},
                  data__train_subset=64, data__test_subset=64, train__epochs=8, train__lr=0.1,
                  train__schedule="constant")
    res = train(copy.deepcopy(cfg))
    first, last = res["history"][0], res["history"][-1]
    for t in ("", "net2/", "net3/"):
        assert last[f"{t}loss_ce"] < 0.8 * first[f"{t}loss_ce"], (t, first[f"{t}loss_ce"], last[f"{t}loss_ce"])
    method = AFD(create_model("resnet8", 10, 1), AFDParams(k=3), sample=SAMPLE)
    method.load_state_dict(load_checkpoint(Path(cfg["out_dir"]) / "last.ckpt")["method"])
    pair = _held_out_pair(cfg)
    with torch.no_grad():  # train mode, as the maps were scored in training (BatchNorm on batch statistics)
        method(Step(pair, phase="adv"))
        _, disc = method(Step(pair, phase="disc"))
    assert set(disc) == {"loss_disc", "net2/loss_disc", "net3/loss_disc"}
    for k, v in disc.items():
        assert v < 0.5, (k, float(v))


def test_bad_online_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"method\.dml\.k"):
        run_config({"method": {"name": "dml", "dml": {"k": 1}}})
    with pytest.raises(ConfigError, match="models has 1 entries but k=3 networks need 2"):
        run_config({"method": {"name": "dml", "dml": {"k": 3, "models": ["resnet14"]}}})
    with pytest.raises(ConfigError, match="views has 1 entries but k=2 networks need 2"):
        run_config({"method": {"name": "afd", "afd": {"views": ["x"]}}})
    with pytest.raises(ConfigError, match="Unknown model 'resnet9'"):
        run_config({"method": {"name": "dml", "dml": {"models": ["resnet9"]}}})
    with pytest.raises(ConfigError, match="layers has 1 entries but k=2"):
        run_config({"method": {"name": "afd", "afd": {"layers": ["features"]}}})
    with pytest.raises(ConfigError,
                       match="method.afd.layers on network 2: no layer named 'featurs'.*Did you mean 'features'"):
        AFD(create_model("resnet8", 10, 1), AFDParams(layers=["features", "featurs"]), sample=SAMPLE)


def test_a_grids_reference_text_is_printed_under_its_table_in_place_of_the_papers(tmp_path):
    from cqd.tasks.classification.report import PAPER_TABLE1, write_report

    grid = load_grid_config("configs/online.yaml")
    assert "other data" in grid.reference and "74.03" in grid.reference
    md, _ = write_report([], grid, tmp_path / "online")
    saved = (tmp_path / "online" / "table.md").read_text()
    assert grid.reference.strip() in md and md.index("| Method |") < md.index(grid.reference.strip())
    assert grid.reference.strip() in saved
    assert PAPER_TABLE1 not in saved
    plain = load_grid_config("configs/full.yaml")
    assert plain.reference is None
    md, _ = write_report([], plain, tmp_path / "full")
    assert PAPER_TABLE1 in (tmp_path / "full" / "table.md").read_text() and PAPER_TABLE1 not in md


def test_the_online_grid_runs_each_variant_it_names():
    grid = load_grid_config("configs/online.yaml")
    assert [r.id for r in grid.rows] == ["alone", "dml", "afd_feat", "afd"]
    alone = grid.cell("r8+r8", "alone", 0)
    assert alone.method.name == "dml" and alone.method.dml.lam == 0 and alone.data.degradation == "none"
    cross = grid.cell("cross", "afd_feat", 0).method
    assert cross.name == "afd" and cross.afd.views == ["z", "x"] and cross.afd.lam == 0
    assert grid.cell("r8+wrn", "dml", 0).method.dml.models == ["wrn_16_2"]
    three = grid.cell("r8+r14+wrn", "afd", 0).method.afd
    assert (three.k, three.models) == (3, ["resnet14", "wrn_16_2"])
    assert all(not METHODS.get(grid.cell(c, r, 0).method.name).needs_teacher(grid.cell(c, r, 0))
               for c in grid.columns for r in grid.rows)  # no f is trained for this table


def test_with_degradation_none_z_is_x_so_the_tables_line_is_top1_on_x():
    from cqd.data.paired import PairMaker

    maker = PairMaker("none")
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    pair = maker({"full": images, "index": torch.arange(4), "label": torch.arange(4), "box": torch.zeros(4, 4)}, "cpu")
    assert torch.equal(pair.z, pair.x)


# --- several processes -------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_a_method_that_leaves_parameters_unused_gets_ddp_that_finds_them(strategy):
    """`train.devices=2` (Fabric starts the processes; `auto` picks DDP) or an explicit `ddp`: AFD's runs
    get DDP with find_unused_parameters, other methods plain DDP; one device stays one device."""
    from lightning_fabric.strategies import DDPStrategy

    from cqd.engine.precision import make_fabric

    t = run_config({"train": {"accelerator": "cpu", "devices": 2, "strategy": strategy}}).train
    for method, find in (("afd", True), ("dml", False)):
        fabric = make_fabric(t, find_unused=METHODS.get(method).ddp_find_unused)
        assert isinstance(fabric.strategy, DDPStrategy)
        assert fabric.strategy._ddp_kwargs.get("find_unused_parameters", False) is find, method
    one = run_config({"train": {"accelerator": "cpu"}}).train
    assert not isinstance(make_fabric(one, find_unused=True).strategy, DDPStrategy)


DDP_ATOL = 1e-5  # float32 gradient averaging differs from one batch's mean only in summation order


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dml", "afd"])
def test_two_ddp_processes_equal_one_process_with_double_batch(method, tmp_path):
    """2 CPU processes (gloo, torchrun) with batch 16 each = 1 process with batch 32, on BatchNorm-free
    networks (as test_ddp.py). AFD's phases leave the discriminators unused in `main` and the networks
    in `disc`: DDP must be told to look for unused parameters, or its second forward raises."""
    from test_ddp import _launch_ddp

    def cfg(name, batch):
        return cfg_for(tmp_path, name, model="timm:convnext_zepto_rms", method__name=method,
                       data__test_subset=31, train__batch_size=batch, train__epochs=1, train__lr=0.02,
                       train__accelerator="cpu")

    _launch_ddp(cfg("ddp", 16), tmp_path)
    single = train(cfg("single", 32))
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["world_size"] == 2
    a = load_checkpoint(tmp_path / "ddp" / "last.ckpt")["method"]
    b = load_checkpoint(tmp_path / "single" / "last.ckpt")["method"]
    assert a.keys() == b.keys() and any(k.startswith("discs.") for k in a) == (method == "afd")
    diff = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    assert max(diff.values()) <= DDP_ATOL, max(diff.items(), key=lambda kv: kv[1])
    torch.manual_seed(0)  # the engine's init: the same seed, then network 1, then the method's parts
    init = METHODS.get(method)(create_model("timm:convnext_zepto_rms", 10, 1), run_config(cfg("x", 32)).method.params,
                               (), torch.zeros(2, 1, 32, 32)).state_dict()
    for part in ("student.", "peers.", "discs.") if method == "afd" else ("student.", "peers."):
        moved = max(float((a[k] - init[k]).abs().max()) for k in _params(a, part))
        assert moved > 20 * DDP_ATOL, (part, moved)  # every part trained under DDP, so the comparison means something
    for k, v in single["history"][-1].items():
        if "loss" in k:
            assert ddp["history"][-1][k] == pytest.approx(v, rel=1e-4), k
