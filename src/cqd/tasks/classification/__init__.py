"""Task `classification` (the paper's): top-1 on x and z; f is trained by method `hq` on x and sees x."""
from __future__ import annotations

from cqd.errors import ConfigError
from cqd.tasks import TASKS
from cqd.tasks.base import Task
from cqd.tasks.classification import data, metrics


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    teacher_method = "hq"
    metrics = ("acc_hq", "acc_lq", "val_acc_hq", "val_acc_lq")
    eval_keys = ("degradation", "acc_hq", "acc_lq")
    compressible = True
    teacher_logits = True
    report = "cqd.tasks.classification.report"
    # Before each task owned its config section every run held an `sr:` section at these defaults, and they went
    # into the digests that name shared teachers' folders: kept, frozen, so folders of earlier grids keep their names.
    legacy_digest = {"sr.scale": 4, "sr.patch": 24, "sr.patches_per_epoch": 1600, "sr.augment": True,
                     "sr.source": "skimage", "sr.root": None,
                     "sr.train": ["hubble_deep_field", "retina", "stereo_motorcycle", "colorwheel", "logo", "brick",
                                  "camera", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "text"],
                     "sr.teacher_epochs": None}

    def build_datasets(self, cfg):
        return data.build_datasets(cfg)

    def val_dataset(self, cfg, base_train):
        return data.val_dataset(cfg, base_train)

    def make_maker(self, cfg, base, hq_view=None, hq_degradation=None):
        return data.make_maker(cfg, base, hq_view, hq_degradation)

    def evaluate(self, models, views, loader, maker, fabric):
        return metrics.evaluate(models, views, loader, maker, fabric)

    def describe(self, cfg) -> dict:
        return {"degradation": cfg.data.degradation}

    def progress(self, res: dict) -> str:
        return " ".join(f"{k}={100 * res[k]:.1f}%" for k in ("acc_hq", "acc_lq") if res.get(k) is not None)

    def at_mix(self, model, ck, c, path):
        """A network conditioned on the mix c is evaluated on the blends of data.mix, which carry c."""
        if c is not None:
            raise ConfigError("a classification model conditioned on c is evaluated on blends: "
                              "set data.mix.c instead of c")
        return model, None
