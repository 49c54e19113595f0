"""Deep mutual learning (Zhang et al. 2018): K networks train together from scratch and teach each other.

No frozen teacher. Network k minimizes

    CE(p_k, y) + lam * T^2 * mean over j != k of KL(p_j^T || p_k^T),     p^T = softmax(logits / T)

with the other networks' predictions detached in network k's term, so each term moves only its own
network. The K terms are summed and stepped by one optimizer: since no term reaches another network,
that is K simultaneous updates (Zhang et al. update the networks one after another, recomputing the
predictions in between, at K times the forward passes). T = 1, lam = 1 is the paper's loss.

Networks: network 1 is the run's `model` (built by the engine: scratch, or `pretrained`); networks
2..K are `models` (default: `model` again for each), each from scratch with its own random init,
drawn after network 1's. Inputs: network k sees `views[k]`, z by default (every network trains on
the degraded images, as B does); `views: [z, x]` is the cross-quality form, an online CQD: network 2
learns on x and teaches network 1 on z with no teacher trained first.

Network 1 is deployed (`model.pt`) and logged as acc_hq / acc_lq (the table's line); network k as
netk/acc_hq, netk/acc_lq, and its losses as netk/loss_ce, netk/loss_kd. Put the network you want to
deploy first.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from cqd.errors import ConfigError, CQDError
from cqd.methods import METHODS
from cqd.methods.base import Method
from cqd.methods.cqd import soft_kl
from cqd.models import MODELS, create_model
from cqd.schema import Strict


class DMLParams(Strict):
    k: int = Field(2, ge=2, description="number of networks trained together")
    models: list[str] = Field([], description="architectures of networks 2..k, one each (default: `model` for all)")
    views: list[Literal["x", "z"]] = Field([], description="input of networks 1..k, one each (default: z for all)")
    T: float = Field(1.0, gt=0, description="temperature of the mutual term")
    lam: float = Field(1.0, ge=0, description="weight of the mutual term (0: each network trains alone)")

    @field_validator("models")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if ":" not in name:  # tv:/timm: names are checked when the network is built
                try:
                    MODELS.get(name)
                except CQDError as e:
                    raise ValueError(str(e)) from None
        return names

    @model_validator(mode="after")
    def _one_per_network(self):
        for key, n in (("models", self.k - 1), ("views", self.k)):
            got = len(getattr(self, key))
            if got and got != n:
                raise ValueError(f"{key} has {got} entries but k={self.k} networks need {n} "
                                 f"({'networks 2..k' if key == 'models' else 'networks 1..k'}); give {n} or none")
        return self


def mutual_terms(logits: list[Tensor], T: float) -> list[Tensor]:
    """T^2 * mean over j != k of KL(softmax(l_j / T) || softmax(l_k / T)) for each network k; the others'
    logits are detached, so network k's term sends gradient to network k only."""
    out = []
    for k, own in enumerate(logits):
        others = [o.detach() for j, o in enumerate(logits) if j != k]
        out.append(T * T * sum(soft_kl(own, o, T) for o in others) / len(others))
    return out


def tag(k: int) -> str:
    """The prefix of network k's (0-based) logged names: '' for network 1, 'net2/' for network 2, ..."""
    return f"net{k + 1}/" if k else ""


def fresh_like(name: str, like: nn.Module) -> nn.Module:
    """A new network `name` with its own random init, and `like`'s classes, input channels, device and
    memory format."""
    net = create_model(name, like.num_classes, like.in_chans)
    convs = [p for p in like.parameters() if p.dim() == 4]
    last = any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    return net.to(convs[0].device if convs else "cpu",
                  memory_format=torch.channels_last if last else torch.contiguous_format)


@METHODS.register("dml")
class DML(Method):
    Params = DMLParams
    label = "DML -> B mutual learning (net 1)"
    section = "dml"  # its config section, named in errors

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        names = p.models or [getattr(student, "model_name", None)] * (p.k - 1)
        if None in names:
            raise ConfigError(f"method.{self.section}.models: network 1 ({type(student).__name__}) was not built by "
                              f"name, so list the architectures of networks 2..{p.k}")
        self.peers = nn.ModuleList(fresh_like(n, student) for n in names)
        self.views = p.views or ["z"] * p.k

    @property
    def nets(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    def run_all(self, pair) -> list[Tensor]:
        """Every network's logits on its own view."""
        return [net(pair.x if v == "x" else pair.z) for net, v in zip(self.nets, self.views)]

    def forward(self, step):
        logits = self.run_all(step.pair)
        losses = {f"{tag(k)}loss_ce": self.ce(out, step.pair.y) for k, out in enumerate(logits)}
        if self.params.lam:
            for k, term in enumerate(mutual_terms(logits, self.params.T)):
                losses[f"{tag(k)}loss_kd"] = self.params.lam * term
        return logits[0], losses

    def eval_models(self):
        return {tag(k).rstrip("/"): net for k, net in enumerate(self.nets)}
