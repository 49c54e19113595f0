"""Several teachers: the logit ensemble (`ens`) against its formula, each teacher on its own view and
tap, parallel FEED's transforms (trained, checkpointed, resumed bit-exactly, not deployed), factor
transfer's paraphraser stage (cached per teacher) and sequential rounds."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cqd.degradations import parse_degradation
from cqd.engine.model_files import load_model
from cqd.engine.schema import run_config
from cqd.errors import ConfigError
from cqd.experiments.rounds import train
from cqd.files import load_checkpoint
from cqd.methods.cqd import KDParams, kd_term, soft_kl
from cqd.methods.ens import Ensemble, ensemble_kl, ensemble_target, ensemble_term
from cqd.methods.feed import FEED
from cqd.models import create_model
from cqd.tasks.classification.data import build_datasets, make_maker
from helpers import interrupt_after_epoch, tiny_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ens")


@pytest.fixture(scope="module")
def teachers(root) -> list[str]:
    """Two teachers of different architectures, trained a few steps on x."""
    paths = []
    for model in ("resnet8", "resnet14"):
        train(tiny_cfg(root, f"t-{model}", model=model, method__name="hq", train__max_steps_per_epoch=3))
        paths.append(str(root / f"t-{model}" / "model.pt"))
    return paths


def _record(monkeypatch, cls) -> list:
    """Every Step the method's forward gets, in order."""
    seen, real = [], cls.forward

    def forward(self, step):
        seen.append(step)
        return real(self, step)

    monkeypatch.setattr(cls, "forward", forward)
    return seen


# --- the ensemble target ---------------------------------------------------------------------------

def test_ensemble_target_is_the_mean_of_the_teachers_softened_outputs():
    gen = torch.Generator().manual_seed(0)
    f1, f2, f3, g = (torch.randn(4, 5, generator=gen) * 3 for _ in range(4))
    T = 4.0
    q = (torch.softmax(f1 / T, 1) + torch.softmax(f2 / T, 1) + torch.softmax(f3 / T, 1)) / 3
    assert torch.allclose(ensemble_target([f1, f2, f3], T), q, atol=1e-7)
    kl = (q * (q.log() - torch.log_softmax(g / T, 1))).sum(1).mean()
    assert torch.allclose(ensemble_kl(g, [f1, f2, f3], T), kl, atol=1e-6)
    p = KDParams(T=T, lam=3.0, scale="hinton")
    assert torch.allclose(ensemble_term(g, [f1, f2, f3], p), 3.0 * T * T * kl, atol=1e-5)
    # not CQD's several-teacher target (the softmax of the mean logits), and one teacher is CQD
    assert not torch.allclose(ensemble_term(g, [f1, f2, f3], p), kd_term(g, [f1, f2, f3], p), atol=1e-3)
    assert torch.allclose(ensemble_kl(g, [f1], T), soft_kl(g, f1, T), atol=1e-6)


def test_ens_gives_each_teacher_its_own_view(root, teachers, monkeypatch):
    """Teacher 2 (the same weights) sees a blurred x: its logits are f(blur(x)), teacher 1's f(x)."""
    seen = _record(monkeypatch, Ensemble)
    two = [{"checkpoint": teachers[0]}, {"checkpoint": teachers[0], "degradation": "blur:sigma=1.5"}]
    cfg = tiny_cfg(root, "ens-views", method__name="ens", teachers=two, train__max_steps_per_epoch=1,
                   train__channels_last=False)
    res = train(copy.deepcopy(cfg))
    assert {"loss_ce", "loss_kd"} <= set(res["history"][-1])
    step = seen[0]
    f, _ = load_model(teachers[0])
    maker = make_maker(run_config(cfg), build_datasets(run_config(cfg))[2])
    x01 = step.pair.x * maker.std + maker.mean  # back to [0, 1], then blurred by hand
    blurred = maker.normalize(parse_degradation("blur:sigma=1.5")(x01, step.pair.index, 0, None)[0])
    with torch.no_grad():
        want = [f.eval()(step.pair.x), f(blurred)]
    assert not torch.allclose(want[0], want[1], atol=1e-3)
    for got, w in zip(step.teacher_logits, want):
        assert torch.allclose(got, w, atol=1e-4)


# --- FEED ------------------------------------------------------------------------------------------

def feed_cfg(root: Path, name: str, teachers: list[str], **over) -> dict:
    two = [{"checkpoint": teachers[0]}, {"checkpoint": teachers[1]}]
    over = {"method__name": "feed", "method__feed": {"teacher_layers": [None, "features.6"]}, **over}
    return tiny_cfg(root, name, teachers=two, **over)


def test_feed_taps_each_teacher_at_its_own_layer(root, teachers, monkeypatch):
    """resnet8's last map (64 x 4 x 4) and resnet14's features.6 (32 x 8 x 8), each from its own network."""
    seen = _record(monkeypatch, FEED)
    res = train(feed_cfg(root, "feed-taps", teachers, train__max_steps_per_epoch=1))
    assert {"loss_ce", "loss_feed1", "loss_feed2"} <= set(res["history"][-1]) and "loss_kd" not in res["history"][-1]
    step = seen[0]
    r8, _ = load_model(teachers[0])
    r14, _ = load_model(teachers[1])
    with torch.no_grad():
        want = [{"features": r8.eval().features(step.pair.x)}, {"features.6": r14.eval().features[:7](step.pair.x)}]
    assert [list(f) for f in step.teacher_features] == [["features"], ["features.6"]]
    for got, w in zip(step.teacher_features, want):
        name = next(iter(w))
        assert got[name].shape == w[name].shape and torch.allclose(got[name], w[name], atol=1e-4)
    state = load_checkpoint(root / "feed-taps" / "last.ckpt")["method"]
    assert state["transforms.0.6.weight"].shape[:2] == (64, 64) and state["transforms.1.6.weight"].shape[:2] == (32, 64)


def test_feed_transforms_train_are_checkpointed_and_resume_is_bit_exact(root, teachers, monkeypatch):
    over = {"train__epochs": 2, "method__feed": {"teacher_layers": [None, "features.6"], "lam": 1.0}}
    ref = train(feed_cfg(root, "feed-ref", teachers, **over))
    assert "loss_kd" in ref["history"][-1]
    cfg = feed_cfg(root, "feed-cut", teachers, **over)
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    after_one = load_checkpoint(Path(cfg["out_dir"]) / "last.ckpt")["method"]
    res = train(copy.deepcopy(cfg), resume=True)
    final = load_checkpoint(Path(cfg["out_dir"]) / "last.ckpt")
    want = load_checkpoint(root / "feed-ref" / "last.ckpt")["method"]
    assert final["method"].keys() == want.keys()
    assert [k for k in want if not torch.equal(final["method"][k], want[k])] == []
    assert res["history"][-1]["loss_feed2"] == ref["history"][-1]["loss_feed2"]
    for k in ("transforms.0.0.weight", "transforms.1.6.weight"):
        assert not torch.equal(after_one[k], final["method"][k])  # trained (only the optimizer moves them)
    n_student = len([k for k in want if k.startswith("student.") and k.endswith(("weight", "bias"))])
    assert len(final["optimizers"]["main"]["param_groups"][0]["params"]) == n_student + 2 * 3 * 3


def test_feed_model_pt_holds_exactly_the_student(root, teachers):
    train(feed_cfg(root, "feed-deploy", teachers, train__max_steps_per_epoch=1))
    got = load_checkpoint(root / "feed-deploy" / "model.pt")["model"]
    plain = create_model("resnet8", 10, 1).state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in plain.items()}


@pytest.mark.parametrize("over, message", [
    ({"method__feed": {"teacher_layers": ["features"]}}, "teacher_layers has 1 entries but the run has 2 teacher"),
    ({"method__feed": {"teacher_layers": [None, "featurs.6"]}},
     r"method.feed.teacher_layers\[1\] on teacher 1: no layer named 'featurs.6'.*Did you mean 'features.6'"),
    ({"method__feed": {"student_layer": "head.x"}},
     "method.feed.student_layer on the student: no layer named 'head.x'"),
    ({"method__feed": {"depth": 0}}, "method.feed.depth: Input should be greater than or equal to 1"),
    ({"method__feed": {"distance": "l3"}}, "method.feed.distance: Input should be 'l1', 'repdistiller' or 'l2'"),
    ({"method__name": "ens", "method__ens": {"loss": "mse"}}, "method.ens.loss: Input should be 'ce'"),
])
def test_bad_config_values_are_clear_errors(root, teachers, over, message):
    with pytest.raises(ConfigError, match=message):
        train(feed_cfg(root, "feed-bad", teachers, **over))


# --- factor transfer: the paraphraser's own stage, cached -----------------------------------------

def test_ft_paraphraser_is_trained_once_reused_and_retrained_when_the_teacher_changes(root, teachers, tmp_path, capsys):
    cache = tmp_path / "cache"
    over = {"method__name": "ft", "cache_dir": str(cache), "train__max_steps_per_epoch": 1,
            "method__ft": {"paraphraser_epochs": 2}}
    res = train(tiny_cfg(tmp_path, "ft1", teacher__checkpoint=teachers[1], **over))
    assert {"loss_ce", "loss_ft"} <= set(res["history"][-1])
    assert "paraphraser: trained 2 epochs" in capsys.readouterr().out
    [cached] = cache.glob("paraphraser-*.pt")
    P = load_checkpoint(cached)["paraphraser"]
    first = load_checkpoint(tmp_path / "ft1" / "last.ckpt")["method"]
    for k, v in P.items():  # the run used the cached paraphraser, and left it as the stage did (frozen)
        assert torch.equal(first[f"paraphraser.{k}"], v), k
    init = _paraphraser_before_stage(teachers[1])
    assert not torch.equal(init["encoder.0.weight"], P["encoder.0.weight"])  # the stage trained it

    train(tiny_cfg(tmp_path, "ft2", teacher__checkpoint=teachers[1], seed=1, **over))  # another student seed: a hit
    assert "paraphraser: cache hit" in capsys.readouterr().out and len(list(cache.glob("paraphraser-*.pt"))) == 1
    second = load_checkpoint(tmp_path / "ft2" / "last.ckpt")["method"]
    assert all(torch.equal(second[f"paraphraser.{k}"], v) for k, v in P.items())

    changed = tmp_path / "changed.pt"
    ck = load_checkpoint(teachers[1])
    ck["model"]["head.bias"] = ck["model"]["head.bias"] + 0.5
    torch.save(ck, changed)
    train(tiny_cfg(tmp_path, "ft3", teacher__checkpoint=str(changed), **over))
    assert "paraphraser: trained" in capsys.readouterr().out and len(list(cache.glob("paraphraser-*.pt"))) == 2


def _paraphraser_before_stage(teacher: str) -> dict:
    """The paraphraser's state before its stage (its init does not depend on the run)."""
    from cqd.methods.ft import FactorTransfer

    f, _ = load_model(teacher)
    return FactorTransfer(create_model("resnet8", 10, 1), None, [f], torch.zeros(2, 1, 16, 16)).paraphraser.state_dict()


# --- sequential FEED ---------------------------------------------------------------------------------

def test_sequential_rounds_chain_the_right_checkpoints(root, teachers, monkeypatch):
    """Round 1 learns from the given teachers, round r from round r-1's student (on z); resume skips finished rounds."""
    from cqd.engine import trainer

    cfg = feed_cfg(root, "seq", teachers, train__max_steps_per_epoch=1,
                   method__feed={"teacher_layers": [None, "features.6"], "rounds": 3})
    res = train(copy.deepcopy(cfg))
    out = Path(cfg["out_dir"])
    got = [load_checkpoint(d / "last.ckpt")["config"] for d in (out / "round1", out / "round2", out)]
    assert [[t["checkpoint"] for t in c["teachers"]] or [c["teacher"]["checkpoint"]] for c in got] == [
        teachers, [str(out / "round1" / "model.pt")], [str(out / "round2" / "model.pt")]]
    for c in got[1:]:  # later rounds: the student's architecture and input, its own init, its tap
        assert ((c["teacher"]["model"], c["teacher"]["degradation"], c["method"]["init"])
                == ("resnet8", "lowres:size=4", "scratch"))
        assert c["method"]["feed"]["teacher_layers"] == [None] and c["method"]["feed"]["rounds"] == 1
    assert res["teachers"] == [str(out / "round2" / "model.pt")] and (out / "model.pt").is_file()
    runs = []
    real = trainer.Run.fit
    monkeypatch.setattr(trainer.Run, "fit",
                        lambda self, on_epoch=None: runs.append(self.cfg.out_dir) or real(self, on_epoch))
    train(copy.deepcopy(cfg), resume=True)
    assert runs == [str(out)]  # rounds 1 and 2 are done; the last round resumes (and finds itself finished)


def test_a_finished_sequential_run_counts_as_finished_under_its_own_config(root, teachers):
    """A grid reuses a finished sequential cell: its result holds the run's config (R rounds, round 1's teachers), not
    its last round's, so a change of round 1's settings is still seen; a result written before (the last round's
    config) is compared with the last round's config."""
    from cqd.experiments.grid import CellMismatch, finished
    from cqd.files import load_json, save_json

    cfg = feed_cfg(root, "seq-reuse", teachers, train__max_steps_per_epoch=1,
                   method__feed={"teacher_layers": [None, "features.6"], "rounds": 2})
    train(copy.deepcopy(cfg))
    res = finished(run_config(copy.deepcopy(cfg)))
    assert res["config"]["method"]["feed"]["rounds"] == 2 and res["round_config"]["method"]["feed"]["rounds"] == 1
    assert [t["checkpoint"] for t in res["config"]["teachers"]] == teachers
    other = copy.deepcopy(cfg)
    other["method"]["feed"]["beta"] = 100.0
    with pytest.raises(CellMismatch, match="method.feed.beta"):
        finished(run_config(other))
    path = Path(cfg["out_dir"]) / "result.json"
    before = load_json(path)
    before["config"] = before.pop("round_config")
    save_json(before, path)
    assert finished(run_config(copy.deepcopy(cfg)))["acc_lq"] == res["acc_lq"]
