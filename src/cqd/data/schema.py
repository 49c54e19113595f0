"""The `data:` section of a run config: which dataset, its views and degradations, subsets and splits."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cqd.data import DATASETS
from cqd.data.blend import check_mixable
from cqd.degradations import check_spec
from cqd.errors import CQDError
from cqd.schema import MAX_SEED, Strict


class MixConfig(Strict):
    """`data.mix`: z is the blend sum_k c_k T_k(x) of K degradations, c ~ Dirichlet(alpha) per sample and
    epoch (`cqd.data.blend`); it replaces data.degradation, and the Pair carries c."""

    degradations: list[str] = Field(min_length=2, description="the K degradation specs T_1..T_K")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of the training mixes "
                                                "(SGN's 0.5: mostly near the corners)")
    c: list[float] | None = Field(None, description="one fixed mix for every sample (a test set at that c); "
                                                    "default: drawn")

    @model_validator(mode="after")
    def _mixable(self) -> "MixConfig":
        try:
            check_mixable(self.degradations)
        except CQDError as e:
            raise ValueError(str(e)) from None
        if self.c is not None and (len(self.c) != len(self.degradations) or not all(v >= 0 for v in self.c)
                                   or not abs(sum(self.c) - 1) <= 1e-4):  # NaN fails both
            raise ValueError(f"c={self.c} must be a point on the simplex with one weight per degradation "
                             f"({len(self.degradations)}): every weight >= 0, summing to 1")
        return self


class DataConfig(Strict):
    name: str = "fashion_mnist"
    root: str | None = None
    root_lq: str | None = Field(None, description="dataset paired_folder: the low-quality tree, matched to data.root "
                                                  "by relative path (<split>/<class>/<name>, any extension)")
    test_lq_only: bool = Field(False, description="dataset paired_folder: the test set is root_lq/test alone (real "
                                                  "low-quality images without twins; acc_hq is not reported)")
    image_size: int = Field(32, ge=8, le=2048)
    train_subset: int | None = Field(None, ge=1, description="use the first N of a fixed shuffle of the train split")
    test_subset: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.0, ge=0, lt=1, description="hold this share of the training items out as a "
                                "validation split (fixed by data.seed; runs then report val_acc_hq/val_acc_lq); "
                                "0: none")
    val_from: int | None = Field(None, ge=1, description="draw the validation items from the first N items of the "
                                 "train split's fixed shuffle (as a run with data.train_subset=N draws them) and "
                                 "leave them out of this run's training items; a privileged teacher's run "
                                 "(teacher.train_subset) holds out its student's validation items this way; "
                                 "default: from this run's training items")
    hq_view: Literal["full", "crop"] = "full"
    lq_view: Literal["full", "crop"] = "full"
    degradation: str = "lowres:size=8"
    hq_degradation: str = "none"
    fresh_each_epoch: bool = False
    twin_cache_mb: int = Field(1024, ge=0, description="fixed twins are made once and kept on the device when they "
                                                       "fit in this many MB (0: made every step)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the degraded twins (fixed across runs and methods)")
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)
    mix: MixConfig | None = Field(None, description="blend K degradations per sample (sym-parameter runs); "
                                                    "replaces degradation")

    @field_validator("name")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return DATASETS.check(v)

    @model_validator(mode="after")
    def _real_pairs(self) -> "DataConfig":
        if self.name == "paired_folder" and self.root_lq is None:
            raise ValueError("data.name: paired_folder needs data.root_lq, the folder of the low-quality images")
        if self.name != "paired_folder" and self.root_lq is not None:
            raise ValueError(f"data.root_lq is for data.name: paired_folder, not {self.name!r}")
        if self.test_lq_only and self.name != "paired_folder":
            raise ValueError("data.test_lq_only is for data.name: paired_folder (a low-quality test tree)")
        return self

    @field_validator("degradation", "hq_degradation")
    @classmethod
    def _spec(cls, v: str, info: ValidationInfo) -> str:
        """A known spec, and one that fits data.image_size (e.g. lowres:size must not exceed it)."""
        return check_spec(v, info.data.get("image_size"))
