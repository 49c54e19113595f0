"""Online adversarial feature-map distillation, AFD (Chung, Park, Kim, Kwak, ICML 2020).

K networks train together from scratch, as in `dml` (same keys: k, models, views, T, lam; network 1
is deployed). Besides the logits, each network i has a discriminator D_i on feature maps: D_i learns
to call network i's transformed map t_i(F_i) fake and network j's map t_j(F_j) real; network i learns to
fool D_i, so it learns from network j. Least-squares GAN losses:

    L_D_i = mean (1 - D_i(t_j(F_j)))^2 + mean D_i(t_i(F_i))^2        L_G_i = mean (1 - D_i(t_i(F_i)))^2

By default these follow the paper (its losses and its cyclic scheme): `direction: previous`, j = i - 1
(network 1's previous is network K), so knowledge goes 1 -> 2 -> ... -> K -> 1; and `real: transfer`, the
real map passes through its own network's transfer layer t_j, each t_k mapping network k's map into one
shape shared by all (the fewest channels, the smallest size). For K = 2 both directions are the same.
`direction: next` (j = i + 1) and `real: raw` (D_i scores the raw F_j; t_i maps F_i into F_j's shape) are
cqd's earlier form, which files written before the keys are read with.

Three phases, stepped in this order on each batch:
  main  the networks' logit update: CE + lam * T^2 * KL as in `dml` (`lam: 0`: feature maps only)
  adv   the networks' (and transfer layers') adversarial update: sum_i L_G_i, at train.lr * adv_lr_scale
  disc  the discriminators' update: sum_i L_D_i, Adam (lr 2e-4, betas 0.5/0.999, no weight decay)
The disc phase scores the maps of the adv phase's forward (detached), as a GAN's discriminator
scores the generator's samples of that step; a second forward would cost time and move BatchNorm's
statistics once more. `train.phases.<main|adv|disc>` overrides each phase's optimizer settings.

Not published, so chosen here (config keys where they are numbers):
  - the feature map: each network's last feature map before pooling (the engine's default tap), or
    `layers`, one module path per network;
  - t_k: identity when network k's map already has the target shape (the shared one; `real: raw`: F_j's);
    else a 1x1 conv + BN to the target's channels (cqd_v1 FitNet's regressor), then a bilinear resize to its
    size. It is trained with network k in the adv phase (the real maps are detached);
  - D_i: conv 3x3 stride 2 -> LeakyReLU(0.2) -> conv 3x3 stride 2 -> LeakyReLU(0.2) -> global average
    pool -> linear to one score, `disc_width` channels, no BatchNorm (real and fake maps come in
    separate batches);
  - the adversarial lr is train.lr * adv_lr_scale (0.1); with one loss in that phase this is also its weight.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from cqd.methods import METHODS
from cqd.methods.base import Phase
from cqd.methods.dml import DML, DMLParams, tag
from cqd.models.taps import FeatureTaps, probe


class AFDParams(DMLParams):
    layers: list[str] = Field([], description="tapped layer of networks 1..k, one each (module paths); "
                                              "default: each network's last feature map")
    adv_lr_scale: float = Field(0.1, gt=0, description="lr of the adversarial phase, as a multiple of train.lr")
    disc_width: int = Field(64, ge=1, description="channels of each discriminator's conv layers")
    direction: Literal["previous", "next"] = Field(
        "previous", description="whom network i learns from: previous, network i-1 (the paper's 1 -> 2 -> ... -> K "
                                "-> 1); next, network i+1 (cqd before the key)")
    real: Literal["transfer", "raw"] = Field(
        "transfer", description="the map D_i calls real: transfer, through its own network's transfer layer into a "
                                "shape all share (the paper's); raw, as it is (cqd before the key)")

    @model_validator(mode="after")
    def _one_layer_per_network(self):
        if self.layers and len(self.layers) != self.k:
            raise ValueError(f"layers has {len(self.layers)} entries but k={self.k} networks need {self.k} "
                             f"(networks 1..k); give {self.k} or none")
        return self


def discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """LSGAN: real maps scored 1, fake maps 0."""
    return (1 - d_real.float()).pow(2).mean() + d_fake.float().pow(2).mean()


def generator_loss(d_fake: Tensor) -> Tensor:
    """LSGAN: the fake maps scored 1."""
    return (1 - d_fake.float()).pow(2).mean()


def discriminator(channels: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(width, width, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))


class Transfer(nn.Module):
    """t_i: a map into another network's shape (1x1 conv + BN when the channels differ, bilinear resize
    when the sizes do); the identity when both agree."""

    def __init__(self, channels: int, to_channels: int):
        super().__init__()
        self.proj = (nn.Identity() if channels == to_channels else
                     nn.Sequential(nn.Conv2d(channels, to_channels, 1, bias=False), nn.BatchNorm2d(to_channels)))

    def forward(self, f: Tensor, size) -> Tensor:
        f = self.proj(f)
        return f if f.shape[-2:] == size else F.interpolate(f, size=tuple(size), mode="bilinear", align_corners=False)


@METHODS.register("afd")
class AFD(DML):
    Params = AFDParams
    label = "AFD -> B online adversarial (net 1)"
    section = "afd"
    ddp_find_unused = True  # the discriminators get no gradient in `main`, the networks none in `disc`

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p, K = self.params, len(self.nets)
        found = [probe(net, layer, sample, f"method.afd.layers on network {k + 1}")
                 for k, (net, layer) in enumerate(zip(self.nets, p.layers or [None] * K))]
        self.layers = [layer for layer, _ in found]
        channels = [shape[1] for _, shape in found]
        self.taps = [FeatureTaps(net, [layer], f"method.afd.layers on network {k + 1}")
                     for k, (net, layer) in enumerate(zip(self.nets, self.layers))]
        self.source = [(i - 1) % K if p.direction == "previous" else (i + 1) % K for i in range(K)]
        if p.real == "transfer":  # one shape for all: the fewest channels, the smallest size
            shapes = [shape for _, shape in found]
            self.shared_size = (min(s[-2] for s in shapes), min(s[-1] for s in shapes))
            targets = [min(channels)] * K
        else:
            self.shared_size, targets = None, [channels[j] for j in self.source]
        self.transfers = nn.ModuleList(Transfer(c, t) for c, t in zip(channels, targets))
        self.discs = nn.ModuleList(discriminator(t, p.disc_width) for t in targets)
        self._for_disc = None

    def phases(self):
        nets = [q for net in self.nets for q in net.parameters()]
        return [Phase("main", nets),
                Phase("adv", [{"params": nets + list(self.transfers.parameters()),
                               "lr_scale": self.params.adv_lr_scale}]),
                Phase("disc", list(self.discs.parameters()),
                      {"optimizer": "adam", "lr": 2e-4, "betas": (0.5, 0.999), "weight_decay": 0.0})]

    def forward(self, step):
        if step.phase == "main":
            return super().forward(step)
        if step.phase == "adv":
            logits = self.run_all(step.pair)
            maps = [taps.out[layer] for taps, layer in zip(self.taps, self.layers)]
            if self.shared_size is not None:  # each map through its own transfer layer once: D_k's fake, others' real
                moved = [t(m, self.shared_size) for t, m in zip(self.transfers, maps)]
            losses, pairs = {}, []
            for i, (t, d) in enumerate(zip(self.transfers, self.discs)):
                j = self.source[i]
                if self.shared_size is not None:
                    real, fake = moved[j], moved[i]
                else:
                    real = maps[j]
                    fake = t(maps[i], real.shape[-2:])
                losses[f"{tag(i)}loss_adv"] = generator_loss(d(fake))
                pairs.append((real.detach(), fake.detach()))
            self._for_disc = (logits[0].detach(), pairs)
            return logits[0], losses
        if self._for_disc is None:
            raise RuntimeError("afd: phase 'disc' scores the maps of phase 'adv' on the same batch; run 'adv' first")
        out, pairs = self._for_disc
        self._for_disc = None
        return out, {f"{tag(i)}loss_disc": discriminator_loss(d(real), d(fake))
                     for i, (d, (real, fake)) in enumerate(zip(self.discs, pairs))}
