"""The method API of the engine: a training step against a hand-written one, method-owned parts in the
optimizer and in last.ckpt, several phases, a student changed between epochs, feature taps, several
teachers, the per-epoch callback and checkpoints written before the API had phases."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cqd.engine import teachers as teachers_module
from cqd.engine.loaders import make_loader
from cqd.engine.model_files import load_model
from cqd.engine.sampling import EpochSampler
from cqd.engine.trainer import train
from cqd.errors import ConfigError
from cqd.files import load_checkpoint
from cqd.methods import METHODS, Method, Phase
from cqd.models import create_model
from cqd.models.taps import FeatureTaps, last_feature_map
from cqd.tasks.classification.data import build_datasets, make_maker
from helpers import interrupt_after_epoch, interrupt_at_step, tiny_cfg


def cfg_for(root: Path, name: str, **over) -> dict:
    """helpers.tiny_cfg at 32 px: 128 items (64 test), 3 epochs of 3 steps of 32, B by default."""
    return tiny_cfg(root, name, **{"data__train_subset": 128, "data__test_subset": 64, "data__image_size": 32,
                                   "data__degradation": "lowres:size=8", "train__epochs": 3, "train__batch_size": 32,
                                   "train__max_steps_per_epoch": 3, "method__name": "lq", **over})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def teacher(root) -> str:
    train(cfg_for(root, "teacher", method__name="hq", train__epochs=1, train__max_steps_per_epoch=4))
    return str(root / "teacher" / "model.pt")


def _state(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["method"]


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# --- one step, by hand ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lq", "cqd"])
def test_one_training_step_equals_a_hand_written_sgd_step(method, root, teacher, tmp_path):
    """One step of B and of CQD through the engine gives the weights of SGD written out by hand:
    loss = CE(g(z), y) [+ lambda * KL(softmax(f(x)/T) || softmax(g(z)/T))], d = grad + wd * w, w -= lr * d."""
    lr, wd, lam, T = 0.05, 5e-4, 7.0, 4.0
    cfg = cfg_for(tmp_path, method, method__name=method, teacher__checkpoint=teacher, data__train_subset=32,
                  train__epochs=1, train__batch_size=32, train__channels_last=False, train__lr=lr,
                  method__cqd={"lam": lam, "T": T})
    train(copy.deepcopy(cfg))
    got = load_checkpoint(Path(cfg["out_dir"]) / "model.pt")["model"]

    from cqd.engine.schema import run_config

    rc = run_config(cfg)
    train_ds, _, base, _ = build_datasets(rc)
    batch = next(iter(make_loader(train_ds, base, 32, EpochSampler(len(train_ds), rc.seed), 0, False)))
    pair = make_maker(rc, base)(batch, "cpu")
    f, _ = load_model(teacher)
    torch.manual_seed(0)
    g = create_model("resnet8", 10, 1)
    if method == "cqd":  # CQD starts g from f (same architecture)
        g.load_state_dict(f.state_dict())
    g.train()
    logits = g(pair.z)
    loss = F.cross_entropy(logits, pair.y)
    if method == "cqd":
        with torch.no_grad():
            log_q = torch.log_softmax(f.eval()(pair.x) / T, 1)
        loss = loss + lam * (log_q.exp() * (log_q - torch.log_softmax(logits / T, 1))).sum(1).mean()
    loss.backward()
    with torch.no_grad():
        for name, p in g.named_parameters():
            p -= lr * (p.grad + wd * p)  # the first SGD step: the momentum buffer is d itself
    want = g.state_dict()
    assert want.keys() == got.keys()
    bad = [k for k in want if not torch.allclose(want[k].float(), got[k].float(), atol=2e-6, rtol=1e-5)]
    assert not bad, bad[:5]
    moved = [k for k in want if k.endswith("weight") and not torch.equal(want[k], f.state_dict()[k])]
    assert moved  # the step changed something (the comparison is not between two untouched copies)


# --- method-owned parts: FitNet's regressor -------------------------------------------------------

def test_fitnet_regressor_is_optimized_checkpointed_and_resume_is_bit_exact(root, teacher, monkeypatch):
    ref = train(cfg_for(root, "fitnet-ref", method__name="fitnet", teacher__checkpoint=teacher))
    assert {"loss_ce", "loss_hint"} <= set(ref["history"][-1])
    cfg = cfg_for(root, "fitnet-cut", method__name="fitnet", teacher__checkpoint=teacher)
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    after_one = _state(Path(cfg["out_dir"]) / "last.ckpt")
    assert "regressor.0.weight" in after_one  # the method's own part is in last.ckpt
    train(copy.deepcopy(cfg), resume=True)
    final = _state(Path(cfg["out_dir"]) / "last.ckpt")
    assert not _equal(final, _state(root / "fitnet-ref" / "last.ckpt"))  # resumed == uninterrupted, regressor included
    # the conv learns (only SGD moves it)
    assert not torch.equal(after_one["regressor.0.weight"], final["regressor.0.weight"])
    opt = load_checkpoint(Path(cfg["out_dir"]) / "last.ckpt")["optimizers"]["main"]
    n_student = len([k for k in final if k.startswith("student.") and k.endswith(("weight", "bias"))])
    # + the regressor's conv weight and bias (ConvReg's conv has one), BN weight and bias
    assert len(opt["param_groups"][0]["params"]) == n_student + 4


# --- several phases, and a student that changes between epochs ----------------------------------

class TwoPhase(Method):
    """Phase main: CE on z for the student (SGD). Phase aux (Adam, lr x 0.5): a probe on the detached logits."""

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        self.probe = nn.Linear(10, 10)

    def phases(self):
        return [Phase("main", list(self.student.parameters())),
                Phase("aux", [{"params": list(self.probe.parameters()), "lr_scale": 0.5}], {"optimizer": "adam"})]

    def forward(self, step):
        logits = self.student(step.pair.z)
        if step.phase == "main":
            return logits, {"loss_ce": self.ce(logits, step.pair.y)}
        return logits, {"loss_probe": self.ce(self.probe(logits.detach()), step.pair.y)}


class Grows(Method):
    """After epoch 1 the student's head becomes Linear -> ReLU -> head (new weights, seeded by the epoch)."""

    def on_epoch_end(self, epoch):
        if epoch != 0:
            return False
        width = self.student.head.in_features
        extra = nn.Linear(width, width)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(100 + epoch)
            extra.weight.copy_(torch.eye(width) + 0.01 * torch.randn(width, width, generator=gen))
            extra.bias.zero_()
        self.student.head = nn.Sequential(extra, nn.ReLU(), self.student.head).to(self.student.head.weight.device)
        return True

    def forward(self, step):
        logits = self.student(step.pair.z)
        return logits, {"loss_ce": self.ce(logits, step.pair.y)}


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    """The two test methods are registered for this module only (other tests list the known methods)."""
    for name, cls in (("_test_two_phase", TwoPhase), ("_test_grows", Grows)):
        METHODS.register(name)(cls)
    yield
    for name in ("_test_two_phase", "_test_grows"):
        METHODS._items.pop(name)


@pytest.mark.parametrize("name", ["_test_two_phase", "_test_grows"])
@pytest.mark.parametrize("cut", ["mid_epoch", "end_of_epoch"])
def test_multi_phase_and_changing_students_resume_bit_exactly(name, cut, root, monkeypatch):
    ref = train(cfg_for(root, f"{name}-ref", method__name=name), force=True)  # (both cuts train the same ref)
    cfg = cfg_for(root, f"{name}-{cut}", method__name=name)
    with monkeypatch.context() as m:
        interrupt_at_step(m, 5) if cut == "mid_epoch" else interrupt_after_epoch(m, 1)  # 5th batch: epoch 2, step 2
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    ck = load_checkpoint(Path(cfg["out_dir"]) / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == ((1, 1) if cut == "mid_epoch" else (1, 0))
    res = train(copy.deepcopy(cfg), resume=True)
    a, b = _state(Path(cfg["out_dir"]) / "last.ckpt"), _state(root / f"{name}-ref" / "last.ckpt")
    assert not _equal(a, b)
    strip = [{k: v for k, v in r.items() if k != "images_per_s"} for r in res["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "images_per_s"} for r in ref["history"]]
    last = load_checkpoint(root / f"{name}-ref" / "last.ckpt")
    if name == "_test_two_phase":
        assert (set(last["optimizers"]) == {"main", "aux"}
                and "exp_avg" in str(last["optimizers"]["aux"]["state"][0].keys()))
        assert last["optimizers"]["aux"]["param_groups"][0]["lr"] < last["optimizers"]["main"]["param_groups"][0]["lr"]
        assert {"loss_ce", "loss_probe"} <= set(ref["history"][-1])
    else:  # the new layer is trained after the change, and the student kept learning
        assert "student.head.0.weight" in a
        first = torch.eye(a["student.head.0.weight"].shape[0])
        assert (a["student.head.0.weight"] - first).abs().max() > 0.011  # moved away from its seeded init
        assert ref["history"][-1]["loss_ce"] < ref["history"][0]["loss_ce"]


# --- feature taps --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, layer, by_hand", [
    ("resnet8", "features", lambda m, x: m.features(x)),
    ("resnet8", "features.4",
     lambda m, x: m.features[4](m.features[3](m.features[2](m.features[1](m.features[0](x)))))),
    ("tv:resnet18", "layer1", lambda m, x: m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))),
    ("timm:convnext_zepto_rms", "stem", lambda m, x: m.stem(x)),
])
def test_feature_taps_return_the_named_layers_output(name, layer, by_hand):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=3).eval()
    x = torch.randn(2, 3, 64, 64)
    taps = FeatureTaps(model, [layer])
    with torch.no_grad():
        model(x)
        want = by_hand(model, x)
    assert torch.allclose(taps.out[layer], want, atol=1e-5)
    taps.remove()
    taps.out.clear()
    with torch.no_grad():
        model(x)
    assert taps.out == {}  # removed hooks collect nothing


def test_a_wrong_tap_name_lists_the_valid_names():
    model = create_model("resnet8", num_classes=5, in_chans=1)
    with pytest.raises(ConfigError) as e:
        FeatureTaps(model, ["featurs.4"], "method.fitnet.hint on the student")
    msg = str(e.value)
    assert "method.fitnet.hint on the student: no layer named 'featurs.4'" in msg and "Did you mean 'features.4'" in msg
    assert "Valid names: features, features.0" in msg and "head" in msg


def test_the_default_tap_is_the_last_feature_map_before_pooling():
    x = torch.zeros(1, 3, 64, 64)
    assert last_feature_map(create_model("resnet8", 5, 3), x) == "features"
    assert last_feature_map(create_model("tv:resnet18", 5, 3), x) == "layer4"
    assert last_feature_map(create_model("timm:convnext_zepto_rms", 5, 3), x) == "stages"


def test_fitnet_and_at_with_a_wrong_layer_name_fail_before_training(root, teacher):
    for method, key in (("fitnet", "hint"), ("at", "student_layers")):
        value = "nope" if key == "hint" else ["nope"]
        with pytest.raises(ConfigError, match=f"method.{method}.{key} on the student: no layer named 'nope'"):
            train(cfg_for(root, f"bad-{method}", method__name=method, teacher__checkpoint=teacher,
                          **{f"method__{method}": {key: value}}))


# --- several teachers ------------------------------------------------------------------------------

def test_each_teacher_has_its_own_cache_entry_and_a_changed_teacher_misses(root, teacher, tmp_path, monkeypatch):
    calls = []
    real = teachers_module.Teachers._pass

    @functools.wraps(real)
    def counting(self, k, *a, **kw):
        calls.append(Path(self.paths[k]).name)
        return real(self, k, *a, **kw)

    monkeypatch.setattr(teachers_module.Teachers, "_pass", counting)
    other = tmp_path / "other.pt"
    ck = load_checkpoint(teacher)
    ck["model"] = {k: v.clone() for k, v in ck["model"].items()}
    ck["model"]["head.bias"][0] += 0.5
    torch.save(ck, other)
    two = [{"checkpoint": teacher}, {"checkpoint": str(other)}]
    short = {"method__name": "cqd", "train__epochs": 1, "train__max_steps_per_epoch": 1,
             "cache_dir": str(tmp_path / "cache")}
    res = train(cfg_for(tmp_path, "two", teachers=two, **short))
    assert calls == ["model.pt", "other.pt"] and len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 2
    assert res["teachers"] == [teacher, str(other)]
    train(cfg_for(tmp_path, "two-again", teachers=two, **short))
    assert len(calls) == 2  # both hit
    ck["model"]["head.bias"][1] += 0.5
    torch.save(ck, other)
    train(cfg_for(tmp_path, "two-changed", teachers=two, **short))
    assert calls[2:] == ["other.pt"] and len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 3
    # the same weights seeing their own view (a blurred x) are a teacher of their own
    own_view = [{"checkpoint": teacher}, {"checkpoint": teacher, "degradation": "blur:sigma=1"}]
    train(cfg_for(tmp_path, "views", teachers=own_view, **short))
    assert calls[3:] == ["model.pt"] and len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 4


def test_teacher_and_teachers_together_is_an_error():
    from cqd.engine.schema import run_config

    with pytest.raises(ConfigError, match="either as `teacher:` .* or as `teachers:`"):
        run_config({"teacher": {"model": "resnet14"}, "teachers": [{"model": "resnet8"}]})


# --- the per-epoch callback, and checkpoints of the first format ----------------------------------

def test_the_per_epoch_callback_sees_each_epoch_and_can_stop_the_run(root):
    seen = []
    res = train(cfg_for(root, "callback"), on_epoch=lambda row: seen.append(row) or row["epoch"] == 2)
    assert [r["epoch"] for r in seen] == [1, 2] and len(res["history"]) == 2
    assert seen[-1]["loss_ce"] == res["history"][-1]["loss_ce"]
    assert (root / "callback" / "model.pt").is_file()


def test_a_last_ckpt_of_the_first_format_resumes(root, monkeypatch):
    """Before phases, last.ckpt held `model`, `optimizer`, `scheduler` and flat method keys (method.lam)."""
    ref = train(cfg_for(root, "v1-ref", method__name="lq"))
    cfg = cfg_for(root, "v1", method__name="lq")
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 1)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(cfg))
    path = Path(cfg["out_dir"]) / "last.ckpt"
    ck = load_checkpoint(path)
    old = {k: v for k, v in ck.items() if k not in ("method", "optimizers", "schedulers")}
    old.update(format="cqd-checkpoint-v1", optimizer=ck["optimizers"]["main"], scheduler=ck["schedulers"]["main"])
    method = {k: v for k, v in old["config"]["method"].items() if k in ("name", "init")}
    old["config"]["method"] = {**method, "T": 10.0, "lam": 50.0, "loss": "ce", "scale": "paper"}
    torch.save(old, path)
    res = train(copy.deepcopy(cfg), resume=True)
    assert res["acc_lq"] == ref["acc_lq"]
    assert not _equal(_state(path), _state(root / "v1-ref" / "last.ckpt"))
