"""The `compress:` section of a run config and the `deploy:` section of a grid (plain pydantic, no torch)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cqd.schema import Strict


class PruneConfig(Strict):
    """Structured pruning with Torch-Pruning: whole channels are removed from every prunable layer
    (the classifier head keeps its outputs), residual couplings handled by its dependency graph."""

    ratio: float = Field(0.0, ge=0, lt=1, description="share of each layer's channels removed (0: no pruning); "
                                                       "parameters fall to about (1 - ratio)^2 of the original")
    importance: Literal["magnitude", "taylor"] = Field(
        "magnitude", description="magnitude: L2 norm of each coupled channel group's weights; taylor: "
                                 "|weight * gradient| of the student's CE on z, summed over `taylor_batches` batches")
    schedule: Literal["oneshot", "iterative"] = Field(
        "oneshot", description="oneshot: the whole ratio before training; iterative: `steps` equal steps, the first "
                               "before training, the others at the end of epochs 1 .. steps-1")
    steps: int = Field(1, ge=1, description="pruning steps of the iterative schedule (oneshot: 1)")
    taylor_batches: int = Field(4, ge=1, description="training batches whose gradients rank the channels (taylor)")

    @model_validator(mode="after")
    def _steps(self) -> "PruneConfig":
        if self.schedule == "oneshot" and self.steps != 1:
            raise ValueError(f"compress.prune.steps={self.steps} needs schedule: iterative "
                             f"(oneshot prunes in one step)")
        return self


class CompressConfig(Strict):
    """Compression of the student g, after it starts from f and before it is fine-tuned by the run's method."""

    prune: PruneConfig = PruneConfig()
    qat: bool = Field(False, description="quantization-aware training (torchao PT2E, x86 inductor quantizer: int8 "
                                         "per-channel weights, uint8 activations); trains in fp32 "
                                         "(the precision is switched)")
    recalibrate_bn: int | None = Field(None, ge=0, description="BatchNorm statistics of g are re-estimated on this "
                                       "many training batches of z (forward passes, weights unchanged) after each "
                                       "pruning step and before the final evaluation; unset: 16 for a pruned or QAT "
                                       "g, none for another; set: for every run (e.g. every row of a table, so that "
                                       "rows compare alike); 0: never")

    @property
    def bn_batches(self) -> int:
        if self.recalibrate_bn is not None:
            return self.recalibrate_bn
        return 16 if (self.qat or self.prune.ratio > 0) else 0

    @property
    def active(self) -> bool:
        """The engine has something to do: prune, QAT, or re-estimate BatchNorm statistics."""
        return self.qat or self.prune.ratio > 0 or self.bn_batches > 0


class DeployConfig(Strict):
    """A grid's deployment report (`cqd table` with a `deploy:` section): after the cells, each row's first-seed
    model.pt is exported to ONNX (int8 QDQ for QAT rows) and measured in one process; each pair's distillation
    gain is printed."""

    pairs: list[tuple[str, str]] = Field([], description="[twin row, distilled row] ids: gain = distilled - twin")
    batches: list[int] = Field([1, 64], min_length=1, description="batch sizes of the latency columns")
    repeats: int = Field(30, ge=3, description="timed runs per latency; the median is reported")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (1: steadier on a shared machine)")
