"""A method turns a paired batch (and the teachers' outputs) into an output and named losses
(mdistiller's shape). The engine sums the losses of each phase, logs each by name, and never
branches on which method it runs.

What a method may declare, each with a default that fits CQD and the baselines:
  Params             its own config section (`method.<name>:`), a pydantic schema
  label              its row label in `table.md` (e.g. "CQD -> B cqd (proposed)")
  uses_teacher       the teachers' logits (and the features it taps) are passed in `Step`
  ensemble           it distills from the `teachers` list (ens, feed): an explicitly empty list is an error
  uses_z             it trains on z (else the engine does not make the training twins)
  init_from_teacher  g starts from f: "never", "always" (staged) or "if_same" (when f and g share
                     an architecture, the paper's best setting)
  teacher_taps       per teacher, the layers whose outputs it needs (`Step.teacher_features`)
  phases()           named optimizer phases, each with its parameters, stepped in turn per batch
  ddp_find_unused    some parameters get no gradient in some phase (a discriminator in the networks'
                     phase), so under DDP the engine lets DDP look for them each step (find_unused_parameters)
  mix_conditioned    g takes (z, c), c the mix of K degradations: the run needs data.mix, `k` follows it
  pretrains          it has a stage before training, `pretrain()`, once per tapped teacher
                     (factor transfer's paraphraser)
  rounds(), round_params()  sequential distillation: R runs in turn (cqd.experiments.rounds)
  transform_student(), on_epoch_end(), deployable(), eval_models(), eval_views(): the lifecycle
Every hook the engine calls is declared here with its default; the engine never probes for others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqd.data.paired import Pair
from cqd.schema import NoParams, Strict


@dataclass
class Phase:
    """One optimizer and schedule. `params` holds parameters, or param-group dicts whose optional
    `lr_scale` multiplies the phase's lr (per-part learning rates). `defaults` are the optimizer
    settings this method suggests (e.g. {"lr_scale": 0.1} or {"optimizer": "adam"}); `train.phases.<name>`
    in the config overrides them, and `train:` fills the rest."""

    name: str
    params: list
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """What `forward` gets for one batch: the pair, the teachers' outputs and where the loop is."""

    pair: Pair
    teacher_logits: list[Tensor] = field(default_factory=list)  # f_k(x_k), one per teacher (uses_teacher)
    teacher_features: list[dict[str, Tensor]] = field(default_factory=list)  # per teacher: tap -> map
    epoch: int = 0
    step: int = 0  # steps done before this one, over the whole run
    total_steps: int = 1
    phase: str = "main"


class Method(nn.Module):
    """Owns the student g and every trainable part it adds; the teachers stay outside (frozen).

    `teachers` and `sample` (a batch-shaped input) are given to `__init__` only to size the parts a
    method adds (e.g. a regressor from the student's to the teacher's channels); they are not kept.
    """

    Params: ClassVar[type[Strict]] = NoParams
    label: ClassVar[str] = ""
    # (label, metric) per table line; default ((label, "acc_lq"),)
    table_lines: ClassVar[tuple[tuple[str, str], ...]] = ()
    uses_teacher: ClassVar[bool] = False
    ensemble: ClassVar[bool] = False  # distills from the `teachers` list (`teachers: []` alone is an error)
    uses_z: ClassVar[bool] = True
    init_from_teacher: ClassVar[str] = "never"
    ddp_find_unused: ClassVar[bool] = False  # off by default: DDP's search walks the autograd graph every step
    mix_conditioned: ClassVar[bool] = False  # g(z, c): needs data.mix; the section's `k` follows the mix
    pretrains: ClassVar[bool] = False  # the engine calls `pretrain` before training (for each tapped teacher)

    def __init__(self, student: nn.Module, params: Strict | None = None, teachers: Sequence[nn.Module] = (),
                 sample: Tensor | None = None):
        super().__init__()
        self.student = student
        self.params = params if params is not None else self.Params()
        self.teacher_taps: list[list[str]] = [[] for _ in teachers]

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        """The one rule, used by the trainer, the grid and the analyses: does a run of `cfg` need f?"""
        return cls.uses_teacher or cls.init_from_teacher == "always" or cfg.method.init == "teacher"

    @classmethod
    def num_outputs(cls, num_classes: int, params: Strict | None = None) -> int:
        """The student's head size for a dataset of `num_classes` classes (`params`: the method's section)."""
        return num_classes

    @classmethod
    def rounds(cls, params: Strict) -> int:
        """Sequential runs this method's section asks for (1: one run; `cqd.experiments.rounds` trains R > 1)."""
        return 1

    @classmethod
    def round_params(cls, params: Strict, first: bool) -> Strict:
        """The section of one round of several (round 1 when `first`)."""
        return params

    def pretrain(self, k: int, maps, key: str, cache_dir: str, log) -> None:
        """A stage before training (called only when `pretrains`), once per tapped teacher k: `maps()` yields
        teacher k's tapped maps over the training items, `key` names its weights, the data and its view (so
        the stage can keep its result on disk under `cache_dir` and redo it only when one of them changes)."""

    def forward(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        """Default: one phase `main` with every trainable parameter the method owns."""
        return [Phase("main", [p for p in self.parameters() if p.requires_grad])]

    def transform_student(self) -> None:
        """After g is built (and started from f), before the optimizers: e.g. prune, insert fake-quant."""

    def on_epoch_end(self, epoch: int) -> bool:
        """After each epoch (0-based); return True if the student changed, so the engine rebuilds the
        optimizers. A resumed run replays this for every finished epoch before loading the weights, so
        a change must depend on the epoch, not on the weights' values, for its shapes."""
        return False

    def deployable(self) -> nn.Module:
        """The network `model.pt` holds."""
        return self.student

    def eval_models(self) -> dict[str, nn.Module]:
        """Networks evaluated at the end of each evaluated epoch; '' is logged as acc_hq/acc_lq, others as
        NAME/acc_hq."""
        return {"": self.student}

    @classmethod
    def eval_views(cls, pair: Pair) -> dict[str, tuple[Tensor, Tensor]]:
        """Test inputs and targets by view: top-1 on x (acc_hq) and on z (acc_lq)."""
        return {"hq": (pair.x, pair.y), "lq": (pair.z, pair.y)}

    @staticmethod
    def ce(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(fp32(logits), y)


class SequentialRounds:
    """For a method whose section holds `rounds: R` and `next_round(first)`: sequential distillation (FEED, FT)."""

    @classmethod
    def rounds(cls, params: Strict) -> int:
        return params.rounds

    @classmethod
    def round_params(cls, params: Strict, first: bool) -> Strict:
        return params.next_round(first)


def fp32(t: Tensor) -> Tensor:
    """Logits for a loss: half/bfloat16 (autocast) go up to float32; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
