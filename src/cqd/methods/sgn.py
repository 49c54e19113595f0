"""SGN's own setting on task `sr`: one generator g(z, c) whose mix c of K = 3 losses is chosen at test time.

SGN (Chang, Park, Yang, Kwak, ICCV 2019) draws a sym-parameter c ~ Dirichlet(alpha) per sample, weights the
K losses by it, L = mean_i sum_k c_ik L_k(i), and feeds the same c to the network through gates, so at test
time a chosen c gives that mix of the behaviours each loss alone would give. In super-resolution this is the
perception-distortion trade-off: one student serves every point between fidelity and texture.

  L_1(i)  fidelity: mean |g(z_i, c_i) - y_i| over image i (EDSR's L1)
  L_2(i)  adversarial: adv_weight * mean over image i's patch scores of (1 - D(g(z_i, c_i)))^2 (LSGAN)
  L_3(i)  distillation from the SR teacher f: beta * mean over the tapped body blocks of FitNet's
          mean (r(F_s) - F_t)^2 on image i (`methods/sr.py`'s regressors and layers), plus
          lam * mean |g(z_i, c_i) - f(z_i)|

Two phases per batch (AFD's pattern, `methods/afd.py`): `main` steps g, its gates and the regressors on
the mixed loss; `disc` steps D on 0.5 * mean_i [c_i2 mean (1 - D(y_i))^2 + c'_i2 mean D(g'_i)^2], scoring the
outputs of `main`'s forward (detached: no second forward of g) through a replay buffer of `replay` (50)
generated images: g'_i is the batch's g(z_i, c_i) or an image kept from an earlier batch, c'_i2 its share.
The 0.5 and the buffer are the official SGN code's (its D loss, and pix2pix/CycleGAN's ImagePool: until the
buffer is full each image is kept and shown; then, with probability 1/2, a kept image drawn uniformly is shown
and the new one kept in its place, else the new one is shown). The buffer's draws come from its own generator
(seeded by c_seed); the kept images, their shares and the generator's state are in `last.ckpt`, so a resumed
run is bit-exact. `d_loss: cqd_v1` (no 0.5) with `replay: 0` (the batch's own images) is cqd's earlier
form, which files written before the keys are read with. Adam 2e-4, betas (0.5, 0.999) for both (SGN's),
the phases' defaults (`train.phases.<main|disc>` overrides them).

`fixed_c: [1, 0, 0]` trains the same network and pipeline with one loss alone (the single-loss baselines,
the simplex's corners): a loss whose weight is 0 is not computed, the discriminator only exists when
c_2 > 0 and the teacher only runs when c_3 > 0. Metrics: `psnr`/`ssim` at `eval_c` (default: fixed_c, or
the centre), and with drawn c also `corner0/psnr` ... `mid01/psnr` ... `centre/psnr` at the simplex's
corners, mid-points and centre (`cqd.sym.corners_midpoints_centre`).

Our choices where SGN gives none (each a key):
  - gates: `cqd.models.sym`'s (each starts as exactly 1, so a fresh g ignores c) after the head, the middle
    body block and the last body block (`layers`), SGN's three depths (stem, middle, after the residual
    blocks); EDSR's maps all have one size, so the sym gates' default by resolution stage does not apply.
  - alpha 0.5 (SGN's): draws lie mostly near the corners and edges, so each loss is often seen nearly alone.
    c is keyed by (c_seed, item, epoch) with the project's counter-based draws: a resumed run draws the same.
  - D: a patch discriminator on HR images, conv 4x4/2 -> LeakyReLU(0.2) -> conv 4x4/2 (2 x width) ->
    LeakyReLU -> conv 3x3 to one score per position (18 px receptive field on 4*patch px patches; pix2pix's
    PatchGAN, smaller for small patches); no normalization (real and fake are scored in separate calls).
  - D's loss per sample is weighted by the sample's adversarial share c_i2: D learns what the fakes look
    like where g is asked to fool it; an L1-only output (c_2 = 0) is easy to reject and would only teach D
    to spot blur. D is not conditioned on c (SGN's is not).
  - adv_weight 0.15: the gradient on g's weights of 0.15 * LSGAN is about that of L1 (measured after 400 steps
    on the x4 sample images: norms 0.09 for L1, 0.59 for LSGAN, 0.18 for L_3), so in a mix neither drowns the
    other; at 0.5 the adversarial term also pulled the L1 corner down 0.4 dB. At a corner alone the weight
    barely matters (Adam).
  - the gates learn at 10x g's lr (`gate_lr_scale`): they start as identities and are c's only way in; at g's
    lr (2e-4) they had not moved in 400 steps (PSNR at every c within 0.001 dB), at 10x the adversarial corner
    separates, at 25x all of g lost 0.15 dB.
  - the distillation loss has an output term (lam 1) beside FitNet's: a feature term alone never reaches
    the layers after the taps, and EDSR's last conv starts at zero (skip=bicubic), so at the c = (0, 0, 1)
    corner g's output would stay bicubic. beta 0.5 as in `configs/sr_x4.yaml`. The hints tap the blocks'
    outputs before the gates.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from cqd.errors import ConfigError, CQDError
from cqd.methods import METHODS
from cqd.methods.base import Phase
from cqd.methods.sr import FeatureParams, SRMethod, body_blocks, hints
from cqd.models.sym import AtMix, sym_net
from cqd.sym import corners_midpoints_centre, draw_c

LOSSES = ("l1", "adv", "kd")  # the order of c's components
K = len(LOSSES)
ADAM = {"optimizer": "adam", "lr": 2e-4, "betas": (0.5, 0.999), "weight_decay": 0.0}  # SGN's, for g and D
C_STREAM = 0x56  # the counter-based draws' stream for this method's c
REPLAY_STREAM = 0x57  # with c_seed, seeds the replay buffer's generator


def _simplex(v: list[float] | None, key: str) -> list[float] | None:
    if v is not None and (len(v) != K or min(v) < 0 or abs(sum(v) - 1) > 1e-4):
        raise ValueError(f"{key}={v} must be a point on the simplex of the {K} losses ({', '.join(LOSSES)}): "
                         f"{K} weights >= 0 summing to 1")
    return v


class SGNParams(FeatureParams):
    beta: float = Field(0.5, ge=0, description="weight of FitNet's feature term in the distillation loss L_3")
    lam: float = Field(1.0, ge=0, description="weight of L1(g(z), f(z)) in the distillation loss L_3")
    adv_weight: float = Field(0.15, gt=0, description="weight of the LSGAN generator term in L_2")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of the training c (SGN's 0.5)")
    fixed_c: list[float] | None = Field(None, description="one c for every sample, e.g. [1, 0, 0]: a single-loss "
                                                          "student; default (null): drawn per sample")
    eval_c: list[float] | None = Field(None, description="c of the psnr/ssim metrics; "
                                                         "default: fixed_c, else the centre")
    c_seed: int = Field(0, ge=0, description="seeds the per-sample draws of c (with the item index and epoch)")
    layers: list[str] | None = Field(None, description="module paths gated by c; "
                                                       "default: head, the middle and the last body block")
    embed: int = Field(16, ge=1, description="width of the c embedding ReLU(Linear(c)) in each gate")
    reduction: int = Field(4, ge=1, description="SE bottleneck: a gate's hidden width is max(C // reduction, 4)")
    gate_lr_scale: float = Field(10.0, gt=0, description="the gates' lr as a multiple of the main phase's")
    disc_width: int = Field(32, ge=1, description="channels of the patch discriminator's first conv (2x in the second)")
    d_loss: Literal["official", "cqd_v1"] = Field(
        "official", description="official: 0.5 * (real + fake terms), the official SGN code's; cqd_v1: their sum "
                                "(cqd before the key)")
    replay: int = Field(50, ge=0, description="generated images kept for D (the official code's image pool, 50); "
                                              "0: D sees only the batch's own")

    @field_validator("fixed_c", "eval_c")
    @classmethod
    def _on_simplex(cls, v, info):
        return _simplex(v, info.field_name)


def patch_discriminator(width: int, chans: int = 3) -> nn.Sequential:
    """One LSGAN score per position of an (N, chans, H, W) image: (N, 1, H/4, W/4)."""
    return nn.Sequential(nn.Conv2d(chans, width, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(2 * width, 1, 3, 1, 1))


class ReplayBuffer(nn.Module):
    """The official SGN code's pool of generated images for D (pix2pix/CycleGAN's ImagePool), each kept with its
    adversarial share. Its draws come from its own generator; the kept images, shares and the generator's state are
    the module's extra state, so a checkpoint of the method holds them."""

    def __init__(self, size: int, seed: int):
        super().__init__()
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.images: list[Tensor] = []
        self.shares: list[Tensor] = []

    def query(self, images: Tensor, shares: Tensor) -> tuple[Tensor, Tensor]:
        """The images (B, ...) D is shown in place of `images`, and their shares (B,)."""
        out, out_shares = [], []
        for image, share in zip(images, shares):
            if len(self.images) < self.size:  # filling: keep it, show it
                self.images.append(image.clone())
                self.shares.append(share.clone())
            elif float(torch.rand((), generator=self.generator)) > 0.5:  # show a kept one, keep this one instead
                k = int(torch.randint(self.size, (), generator=self.generator))
                kept, kept_share = self.images[k].to(image), self.shares[k].to(share)
                self.images[k], self.shares[k] = image.clone(), share.clone()
                image, share = kept, kept_share
            out.append(image)
            out_shares.append(share)
        return torch.stack(out), torch.stack(out_shares)

    def get_extra_state(self) -> dict:
        return {"images": _stacked(self.images), "shares": _stacked(self.shares),
                "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.images, self.shares = list(state["images"].unbind(0)), list(state["shares"].unbind(0))
        self.generator.set_state(state["generator"])


def _stacked(ts: list[Tensor]) -> Tensor:
    return torch.stack([t.cpu() for t in ts]) if ts else torch.empty(0)


def per_image(t: Tensor) -> Tensor:
    """Mean over every dimension but the batch's, in float32: (B, ...) -> (B,)."""
    return t.float().flatten(1).mean(1)


def gate_layers(net: nn.Module) -> list[str]:
    """head, the middle and the last body block of an EDSR-style net (fewer when they coincide)."""
    blocks = body_blocks(net)
    if not blocks or "head" not in dict(net.named_modules()):
        raise ConfigError(f"method sgn gates an EDSR-style network (head, body.N); {type(net).__name__} has none: "
                          "use model edsr:... or name the gated layers in method.sgn.layers")
    return list(dict.fromkeys(["head", blocks[(len(blocks) - 1) // 2], blocks[-1]]))


@METHODS.register("sgn")
class SGN(SRMethod):
    """g(z, c) on mean_i sum_k c_ik L_k(i) over (L1, LSGAN, distillation), with c ~ Dirichlet(alpha)."""

    Params = SGNParams
    label = "SGN student g(z, c)"
    section = "sgn"
    uses_teacher = True
    ddp_find_unused = True  # D gets no step in `main`, g none in `disc`

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        c = cfg.method.params.fixed_c
        return c is None or c[2] > 0 or cfg.method.init == "teacher"

    def __init__(self, student, params=None, teachers=(), sample=None):
        super().__init__(student, params, teachers, sample)
        p = self.params
        if sample is None:
            raise CQDError("method sgn sizes its gates on a sample batch; none was given")
        self.active = [n for n, w in zip(LOSSES, p.fixed_c or [1.0] * K) if w > 0]
        self.uses_teacher = "kd" in self.active  # the engine runs f on each batch only then
        if self.uses_teacher:
            if not teachers:
                raise CQDError("method sgn distils from the SR teacher (its third loss): give it a teacher")
            self.pairs, self.regressors, self.taps = hints(student, teachers[0], p, sample, self.section)
            self.teacher_taps[0] = [t for _, t in self.pairs]
        self.student = sym_net(student, K, p.layers or gate_layers(student), sample, p.embed, p.reduction)
        self.disc = patch_discriminator(p.disc_width, sample.shape[1]) if "adv" in self.active else None
        self.replay = (ReplayBuffer(p.replay, (p.c_seed << 8) + REPLAY_STREAM) if self.disc is not None and p.replay
                       else None)
        self._for_disc = None

    def phases(self):
        gates = list(self.student.gates.parameters())
        rest = [q for name, q in self.named_parameters() if not name.startswith(("disc.", "student.gates."))]
        main = rest + [{"params": gates, "lr_scale": self.params.gate_lr_scale}]
        return [Phase("main", main, ADAM)] + ([Phase("disc", list(self.disc.parameters()), ADAM)] if self.disc else [])

    def mix(self, step) -> Tensor:
        """c of each sample of the batch, (B, K): fixed_c, or drawn from Dirichlet(alpha) by (c_seed, item, epoch)."""
        index, p = step.pair.index, self.params
        if p.fixed_c is not None:
            return torch.tensor(p.fixed_c, device=index.device).expand(len(index), K)
        return draw_c(p.c_seed, index, step.epoch, p.alpha, K, C_STREAM)

    def per_sample_losses(self, out: Tensor, step) -> dict[str, Tensor]:
        """L_k(i), shape (B,), of each active loss k."""
        p, per = self.params, {}
        if "l1" in self.active:
            per["l1"] = per_image((out.float() - step.pair.y.float()).abs())
        if "adv" in self.active:
            per["adv"] = p.adv_weight * per_image((1 - self.disc(out).float()).pow(2))
        if "kd" in self.active:
            maps = step.teacher_features[0]
            feat = torch.stack([per_image((r(self.taps.out[s]).float() - maps[t].float()).pow(2))
                                for r, (s, t) in zip(self.regressors, self.pairs)]).mean(0)
            per["kd"] = p.beta * feat + p.lam * per_image((out.float() - step.teacher_logits[0].float()).abs())
        return per

    def forward(self, step):
        if step.phase == "disc":
            return self._disc_step()
        c = self.mix(step)
        out = self.student(step.pair.z, c)
        per = self.per_sample_losses(out, step)
        if self.disc is not None:
            self._for_disc = (out.detach(), step.pair.y, c[:, LOSSES.index("adv")])
        # the terms apart, for the logs: mean_i c_ik L_k(i); their sum is cqd.sym.mix_losses(c, per, LOSSES)
        return out, {f"loss_{n}": (c[:, LOSSES.index(n)] * v).mean() for n, v in per.items()}

    def _disc_step(self):
        if self._for_disc is None:
            raise RuntimeError("sgn: phase 'disc' scores the outputs of phase 'main' on the same batch; "
                               "run 'main' first")
        fake, real, share = self._for_disc
        self._for_disc = None
        if self.replay is None:
            per = per_image((1 - self.disc(real).float()).pow(2)) + per_image(self.disc(fake).float().pow(2))
            loss = (share * per).mean()
        else:
            shown, shown_share = self.replay.query(fake, share)
            loss = (share * per_image((1 - self.disc(real).float()).pow(2))
                    + shown_share * per_image(self.disc(shown).float().pow(2))).mean()
        return fake, {"loss_disc": 0.5 * loss if self.params.d_loss == "official" else loss}

    def deployable(self):
        return self.student

    @property
    def eval_c(self) -> list[float]:
        p = self.params
        return p.eval_c or p.fixed_c or [1.0 / K] * K

    def eval_models(self):
        """g at eval_c ('' : psnr, ssim) and, for a student trained on drawn c, at each corner, mid-point and the
        centre."""
        out = {"": AtMix(self.student, self.eval_c)}
        if self.params.fixed_c is None:
            out.update({name: AtMix(self.student, c) for name, c in corners_midpoints_centre(K).items()})
        return out
