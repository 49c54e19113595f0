"""The losses of Eq. 1 against the paper's formulas computed by hand, and what each method returns."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cqd.data.paired import Pair
from cqd.methods import METHODS, Step
from cqd.methods.cqd import CQD, KDParams, distillation_loss, soft_cross_entropy

S = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.5, 4.0, 1.0, 0.3]])
TL = torch.tensor([[1.0, 0.0, -1.0, 2.5], [0.0, 0.0, 5.0, 1.0], [2.0, 2.0, -3.0, 0.7]])


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def paper_ce_t(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """Section 3: p = sigma(s), q = sigma(t), L1(p, q) = -sum q log p (as a loss),
    L2(p, q) = L1(sigma(log p / T), sigma(log q / T)); averaged over the batch."""
    p, q = _softmax(s.astype(np.float64)), _softmax(t.astype(np.float64))
    pT, qT = _softmax(np.log(p) / T), _softmax(np.log(q) / T)
    return float(np.mean(-(qT * np.log(pT)).sum(axis=1)))


def teacher_entropy(t: np.ndarray, T: float) -> float:
    """Mean over the batch of H(softmax(t / T)): the constant between CE_T and the KL cqd logs."""
    q = _softmax(t.astype(np.float64) / T)
    return float(np.mean(-(q * np.log(q)).sum(axis=1)))


@pytest.mark.parametrize("T", [1.0, 2.0, 10.0])
def test_soft_cross_entropy_is_the_papers_L2(T):
    want = paper_ce_t(S.numpy(), TL.numpy(), T)
    assert soft_cross_entropy(S, TL, T).item() == pytest.approx(want, abs=1e-6)
    # default scale="paper": the logged term is CE_T less the teacher's entropy (a KL, 0 when g = f)
    assert distillation_loss(S, TL, T).item() == pytest.approx(want - teacher_entropy(TL.numpy(), T), abs=1e-6)
    assert distillation_loss(TL, TL, T).item() == pytest.approx(0.0, abs=1e-6)
    # hand value for one row, written out: T=2 row 0
    if T == 2.0:
        q = np.exp(TL[0].numpy() / 2) / np.exp(TL[0].numpy() / 2).sum()
        logp = S[0].numpy() / 2 - np.log(np.exp(S[0].numpy() / 2).sum())
        assert soft_cross_entropy(S[:1], TL[:1], 2.0).item() == pytest.approx(-(q * logp).sum(), abs=1e-6)


def test_T1_is_cross_entropy_with_the_teachers_softmax_as_labels():
    got = soft_cross_entropy(S, TL, 1.0)
    assert torch.allclose(got, F.cross_entropy(S, F.softmax(TL, 1)), atol=1e-6)
    # a (near) one-hot teacher makes it the ordinary cross-entropy with hard labels
    y = torch.tensor([0, 2, 1])
    onehot_like = 50.0 * F.one_hot(y, 4).float()
    assert torch.allclose(soft_cross_entropy(S, onehot_like, 1.0), F.cross_entropy(S, y), atol=1e-5)
    # ... and not with other labels (the test can fail)
    assert not torch.allclose(soft_cross_entropy(S, onehot_like, 1.0), F.cross_entropy(S, (y + 1) % 4), atol=1e-2)


@pytest.mark.parametrize("T", [1.0, 3.0, 10.0])
def test_hinton_scale_is_T_squared_times_paper(T):
    paper = distillation_loss(S, TL, T, scale="paper")
    hinton = distillation_loss(S, TL, T, scale="hinton")
    assert torch.allclose(hinton, paper * T * T, rtol=1e-6)
    if T != 1.0:
        assert not torch.allclose(hinton, paper, rtol=1e-3)


def test_mse_is_mean_squared_logit_difference():
    want = float(((S.numpy() - TL.numpy()) ** 2).mean())
    for T in (1.0, 10.0):  # the temperature plays no part in the logit regression
        assert distillation_loss(S, TL, T, loss="mse").item() == pytest.approx(want, rel=1e-6)


def test_ce_t_gradcheck_float64():
    s = S.double().clone().requires_grad_(True)
    t = TL.double().clone().requires_grad_(True)
    assert soft_cross_entropy(s, t, 3.0).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: soft_cross_entropy(a, b, 3.0), (s, t))
    assert torch.autograd.gradcheck(lambda a: distillation_loss(a, t, 10.0, scale="hinton"), (s,))


def test_logged_kl_has_the_gradient_of_ce_t():
    """Logging the KL instead of CE_T changes the number, not the student's gradient (issue: a loss that never moves)."""  # noqa: E501
    a = S.double().clone().requires_grad_(True)
    b = S.double().clone().requires_grad_(True)
    soft_cross_entropy(a, TL.double(), 10.0).backward()
    distillation_loss(b, TL.double(), 10.0).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_ce_t_gradient_is_softmax_difference_over_T():
    """d CE_T / ds = (softmax(s/T) - softmax(t/T)) / (T B): why Hinton's T^2 keeps gradients comparable."""
    T = 4.0
    s = S.double().clone().requires_grad_(True)
    soft_cross_entropy(s, TL.double(), T).backward()
    want = (F.softmax(S.double() / T, 1) - F.softmax(TL.double() / T, 1)) / (T * len(S))
    assert torch.allclose(s.grad, want, atol=1e-12)


def test_half_precision_logits_are_computed_in_float32():
    got = soft_cross_entropy(S.bfloat16(), TL.bfloat16(), 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(soft_cross_entropy(S.bfloat16().float(), TL.bfloat16().float(), 2.0).item(),
                                       abs=1e-6)


# --- methods: which view the student sees, and the named losses -------------------------------

class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(2 * 4 * 4, 4)

    def forward(self, img):
        return self.fc(img.flatten(1))


def _pair(seed: int = 1) -> Pair:
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    return Pair(x, z, torch.tensor([0, 3, 1]), torch.zeros(3, 4), torch.arange(3))


@pytest.mark.parametrize("loss,scale", [("ce", "paper"), ("ce", "hinton"), ("mse", "paper")])
def test_cqd_losses_are_ce_on_z_plus_lambda_times_distillation(loss, scale):
    student, pair = _Linear(), _pair()
    method = CQD(student, KDParams(T=5.0, lam=7.5, loss=loss, scale=scale))
    logits, losses = method(Step(pair, [TL]))
    assert set(losses) == {"loss_ce", "loss_kd"}
    assert torch.equal(logits, student(pair.z))  # g sees the degraded view z
    assert torch.allclose(losses["loss_ce"], F.cross_entropy(student(pair.z), pair.y))
    kd = distillation_loss(student(pair.z), TL, 5.0, loss, scale)
    assert torch.allclose(losses["loss_kd"], 7.5 * kd)
    assert not torch.allclose(losses["loss_kd"], kd)
    # no gradient flows into the teacher's logits, through either term (the method detaches them)
    t = TL.clone().requires_grad_(True)
    _, losses = method(Step(pair, [t]))
    (losses["loss_ce"] + losses["loss_kd"]).backward()
    assert t.grad is None
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0


def test_cqd_lambda_zero_is_training_on_B():
    student, pair = _Linear(), _pair()
    _, cqd = CQD(student, KDParams(lam=0.0))(Step(pair, [TL]))
    _, lq = METHODS.get("lq")(student)(Step(pair))
    assert cqd["loss_kd"].item() == 0.0
    assert torch.equal(cqd["loss_ce"], lq["loss_ce"])


def test_baselines_see_the_right_views():
    student, pair = _Linear(), _pair()
    _, hq = METHODS.get("hq")(student)(Step(pair))
    _, lq = METHODS.get("lq")(student)(Step(pair))
    _, ab = METHODS.get("augment")(student)(Step(pair))
    assert torch.allclose(hq["loss_ce"], F.cross_entropy(student(pair.x), pair.y))
    assert torch.allclose(lq["loss_ce"], F.cross_entropy(student(pair.z), pair.y))
    both = F.cross_entropy(student(torch.cat([pair.x, pair.z])), torch.cat([pair.y, pair.y]))
    assert torch.allclose(ab["loss_ce"], both)
    assert torch.allclose(ab["loss_ce"], (hq["loss_ce"] + lq["loss_ce"]) / 2, atol=1e-6)
    assert not torch.allclose(hq["loss_ce"], lq["loss_ce"])
    assert set(hq) == set(lq) == set(ab) == {"loss_ce"}
    assert METHODS.get("staged").init_from_teacher == "always" and METHODS.get("cqd").init_from_teacher == "if_same"
