"""Method `sgn` (task sr): one SR generator g(z, c) whose mix c of L1, LSGAN and distillation is chosen at
test time. The mixed loss at a corner is that loss alone, c changes a trained g, each phase steps only its
own network, a corner student is single-loss training, resume is bit-exact, and `cqd eval` takes c."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from cqd.data.paired import Pair
from cqd.engine import phases
from cqd.engine.model_files import load_model
from cqd.engine.schema import run_config
from cqd.engine.trainer import Run, train
from cqd.errors import ConfigError
from cqd.methods import METHODS, Step
from cqd.methods.sgn import LOSSES
from cqd.models import create_model
from cqd.models.taps import FeatureTaps
from cqd.sym import mix_losses
from helpers import interrupt_after_epoch, nested


def _tiny(skip: str = "none", **params):
    """An sgn method on a 2-block student (skip=none: its output depends on the gates from the start), a batch
    of 4 and the teacher's outputs on it."""
    torch.manual_seed(0)
    s = create_model(f"edsr:blocks=2,feats=4,scale=2,skip={skip}", 3, 3)
    t = create_model("edsr:blocks=2,feats=6,scale=2", 3, 3)
    cls = METHODS.get("sgn")
    method = cls(s, cls.Params(**params), [t], torch.zeros(2, 3, 8, 8))
    g = torch.Generator().manual_seed(0)
    z, y = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    taps = FeatureTaps(t, method.teacher_taps[0])
    with torch.no_grad():
        f = t(z + 0.2)  # a teacher unlike the student
    return method, Step(Pair(y, z, y, torch.zeros(4, 4), torch.arange(4)), [f], [dict(taps.out)])


def test_one_hot_c_gives_exactly_that_single_loss():
    method, step = _tiny()
    y, f = step.pair.y, step.teacher_logits[0]
    p = method.params
    for k in range(3):
        c = F.one_hot(torch.full((4,), k), 3).float()
        method.mix = lambda step, c=c: c
        out, losses = method(step)
        if k == 0:
            single = F.l1_loss(out, y)
        elif k == 1:
            single = p.adv_weight * F.mse_loss(method.disc(out), torch.ones(4, 1, 4, 4))
        else:
            maps = step.teacher_features[0]
            single = p.beta * torch.stack([F.mse_loss(r(method.taps.out[s]), maps[t]) for r, (s, t) in
                                           zip(method.regressors, method.pairs)]).mean() + p.lam * F.l1_loss(out, f)
        total = sum(losses.values())
        assert float(total.detach()) == pytest.approx(float(single.detach()), rel=1e-6), LOSSES[k]
        assert all(float(v.detach()) == 0 for n, v in losses.items() if n != f"loss_{LOSSES[k]}")
    # any c: the logged terms add up to SGN's mix, mean_i sum_k c_ik L_k(i)
    c = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.9, 0.1], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    method.mix = lambda step: c
    out, losses = method(step)
    per = method.per_sample_losses(out, step)
    assert float(sum(losses.values()).detach()) == pytest.approx(float(mix_losses(c, per, LOSSES).detach()), rel=1e-6)


@pytest.mark.parametrize("d_loss, half", [("official", 0.5), ("cqd_v1", 1.0)])
def test_the_discriminator_loss_is_weighted_by_each_samples_adversarial_share(d_loss, half):
    """The batch's own fakes (replay 0; the buffer is in test_reference_defaults.py): the official D loss halves
    the sum, cqd_v1 (files from before the key) does not."""
    method, step = _tiny(d_loss=d_loss, replay=0)
    y = step.pair.y
    for c in (torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.9, 0.1], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]),
              torch.tensor([[1.0, 0.0, 0.0]] * 4)):
        method.mix = lambda step, c=c: c
        out, _ = method(step)
        _, losses = method(Step(step.pair, step.teacher_logits, step.teacher_features, phase="disc"))
        d = method.disc
        per = ((1 - d(y)) ** 2).mean((1, 2, 3)) + (d(out.detach()) ** 2).mean((1, 2, 3))
        want = half * (c[:, 1] * per).mean()
        assert float(losses["loss_disc"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert float(losses["loss_disc"].detach()) == 0  # no sample asks g to fool D: D learns nothing from this batch


def test_a_fresh_generator_ignores_c_and_a_trained_one_does_not(trained):
    method, step = _tiny()
    z = step.pair.z
    c1, c2 = torch.tensor([[1.0, 0, 0]]).expand(4, 3), torch.tensor([[0, 0.5, 0.5]]).expand(4, 3)
    with torch.no_grad():
        assert torch.equal(method.student(z, c1), method.student(z, c2))  # every gate starts as exactly 1
    model, _ = load_model(trained / "ref" / "model.pt")
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = [model(lr, torch.tensor([c] * 2)) for c in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1 / 3] * 3)]
    for i in range(4):
        for j in range(i):
            assert float((outs[i] - outs[j]).abs().max()) > 1e-6, (i, j)


def test_each_phase_steps_only_its_own_network():
    method, step = _tiny()
    train_cfg = run_config({}).train
    built = phases.build(method.phases(), train_cfg, total_steps=4)
    assert list(built) == ["main", "disc"]
    g = dict(method.student.named_parameters())
    d = dict(method.disc.named_parameters())
    for name, (opt, _) in built.items():
        before_g, before_d = copy.deepcopy(g), copy.deepcopy(d)
        _, losses = method(Step(step.pair, step.teacher_logits, step.teacher_features, phase=name))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        same_g = all(torch.equal(before_g[k], v) for k, v in g.items())
        same_d = all(torch.equal(before_d[k], v) for k, v in d.items())
        assert (same_g, same_d) == ((False, True) if name == "main" else (True, False)), name
    assert built["disc"][0].defaults["lr"] == 2e-4 and built["disc"][0].defaults["betas"] == (0.5, 0.999)


def _cfg(root, name, **over):
    cfg = {"name": name, "seed": 0, "out_dir": str(root / name), "cache_dir": str(root / "cache"), "task": "sr",
           "model": "edsr:blocks=2,feats=4,skip=bicubic", "teacher": {"model": "edsr:blocks=2,feats=6", "seed": 0},
           "sr": {"scale": 2, "patch": 8, "patches_per_epoch": 16, "train": ["text", "clock"], "test": ["page"]},
           "method": {"name": "sgn", "sgn": {"replay": 4}},  # full after a step: resume needs its kept images
           "train": {"epochs": 2, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                     "progress": False, "precision": "32-true", "schedule": "cosine",
                     "phases": {"main": {"lr": 1e-3}}}}  # the gates at 1e-2: 4 steps move them visibly
    return nested(cfg, **over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgn")
    train(_cfg(root, "ref"))
    return root


def test_sgn_runs_resume_bit_exactly(trained, monkeypatch):
    ref = load_model(trained / "ref" / "model.pt")[0].state_dict()
    ref_result = json.loads((trained / "ref" / "result.json").read_text())
    cfg = _cfg(trained, "cut", teacher={"model": "edsr:blocks=2,feats=6", "seed": 0,
                                        "checkpoint": str(trained / "ref" / "teacher" / "model.pt")})
    interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    res = train(cfg, resume=True)
    cut = load_model(trained / "cut" / "model.pt")[0].state_dict()
    assert any(k.startswith("gates.") for k in cut)
    for k, v in ref.items():
        assert torch.equal(v, cut[k]), k
    last = res["history"][-1]
    assert res["psnr"] == ref_result["psnr"] and last["corner1/psnr"] == ref_result["history"][-1]["corner1/psnr"]
    assert {f"{p}/psnr" for p in ("corner0", "corner1", "corner2", "mid01", "mid02", "mid12", "centre")} <= set(last)


def test_a_corner_student_is_training_on_that_loss_alone(tmp_path):
    """fixed_c = (1, 0, 0): no discriminator, no teacher, and the same weights as Adam on L1(g(z, e_1), y)
    (the gates at 10x the lr)."""
    cfg = run_config(_cfg(tmp_path, "corner", method={"name": "sgn", "sgn": {"fixed_c": [1, 0, 0]}},
                          train__schedule="constant", train__epochs=1))
    run = Run.start(cfg)
    assert list(run.opts) == ["main"] and run.s.teachers is None and run.method.disc is None
    replica = copy.deepcopy(run.method.student)
    run.fit()
    gates = list(replica.gates.parameters())
    opt = torch.optim.Adam([{"params": list(replica.net.parameters())}, {"params": gates, "lr": 1e-2}], lr=1e-3,
                           betas=(0.5, 0.999))
    run.s.sampler.set_epoch(0, 0)
    for batch in run.s.loader:
        pair = run.s.maker(batch, "cpu", 0)
        loss = F.l1_loss(replica(pair.z, torch.tensor([[1.0, 0, 0]]).expand(len(pair), 3)), pair.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (k, a), b in zip(replica.state_dict().items(), run.method.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_eval_takes_c_and_refuses_a_bad_one(trained, capsys):
    from cqd.api import evaluate
    from cqd.cli import main

    model, cfg = str(trained / "ref" / "model.pt"), run_config(_cfg(trained, "ref"))
    got = {tuple(c): evaluate(model, cfg, c=c)["psnr"] for c in ([1, 0, 0], [0, 1, 0], [0.2, 0.3, 0.5])}
    assert len(set(got.values())) == 3
    assert evaluate(model, cfg, c="0.2, 0.3, 0.5")["psnr"] == got[(0.2, 0.3, 0.5)]
    for bad, msg in (([0.5, 0.5], "K=3"), ([1.2, -0.2, 0], "each >= 0"), (None, "give one"),
                     ([float("nan"), 0.5, 0.5], "each >= 0"), ("nan,0.5,0.5", "each >= 0")):  # NaN passed min(c)
        with pytest.raises(ConfigError, match=msg):
            evaluate(model, cfg, c=bad)
    with pytest.raises(ConfigError, match="no sym gates"):
        evaluate(str(trained / "ref" / "teacher" / "model.pt"), cfg, c=[1, 0, 0])
    path = trained / "ref.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["eval", "--model", model, "--config", str(path), "--c", "0.5,0.6,0"]) == 2
    assert "summing to 1" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--config", str(path), "--c", "nan,0.5,0.5"]) == 2  # issue 34
    err = capsys.readouterr().err
    assert "summing to 1" in err and "internal error" not in err


def test_the_table_shows_each_c_beside_the_single_loss_students_and_draws_the_figure(tmp_path):
    from cqd.api import table
    from cqd.experiments.schema import load_grid_config

    base = _cfg(tmp_path, "base", train__epochs=1)
    grid = {"name": "sgn tiny", "out_dir": str(tmp_path / "grid"), "seeds": [0], "base": base,
            "columns": {"x2": {"set": {"sr.scale": 2}}},
            "rows": [{"id": "sgn", "set": {"method.name": "sgn"}},
                     {"id": "l1", "set": {"method.name": "sgn", "method.sgn.fixed_c": [1, 0, 0]}},
                     {"id": "adv", "set": {"method.name": "sgn", "method.sgn.fixed_c": [0, 1, 0]}}]}
    md = table(load_grid_config(grid))["markdown"]
    lines = {line.split(" |")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| L1 alone (1, 0, 0)" in lines and "| centre (0.33, 0.33, 0.33)" in lines
    assert lines["| L1 + adv (0.5, 0.5, 0)"].count(" - ") == 2  # no single-loss student off the corners
    assert lines["| KD alone (0, 0, 1)"].count(" - ") == 2  # no KD-only row in this grid
    assert lines["| adv alone (0, 1, 0)"].count(" - ") == 0
    assert ((tmp_path / "grid" / "report" / "sgn.png").is_file()
            and (tmp_path / "grid" / "report" / "sgn.json").is_file())
