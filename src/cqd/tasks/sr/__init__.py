"""Task `sr` (super-resolution): PSNR/SSIM on whole images; f is trained by method `sr_teacher` (L1) and
sees the LR input z, as the student does. Its settings are the `sr:` section (`data.SRConfig`)."""
from __future__ import annotations

from cqd.errors import ConfigError
from cqd.tasks import TASKS
from cqd.tasks.base import Task
from cqd.tasks.sr import pipeline
from cqd.tasks.sr.data import SRConfig


@TASKS.register("sr")
class SuperResolution(Task):
    name = "sr"
    Config = SRConfig
    teacher_method = "sr_teacher"
    metrics = pipeline.METRICS
    eval_keys = pipeline.METRICS
    fixes_twins = False
    report = "cqd.tasks.sr.report"

    def build_datasets(self, cfg):
        return pipeline.build_datasets(cfg)

    def make_maker(self, cfg, base, hq_view=None, hq_degradation=None):
        return pipeline.make_maker(cfg, base)

    def evaluate(self, models, views, loader, maker, fabric):
        return pipeline.evaluate(models, views, loader, maker, fabric)

    def model_name(self, cfg, name: str) -> str:
        return pipeline.model_name(cfg, name)

    def teacher_input(self, pair):
        return pair.z

    def teacher_run(self, cfg, tcfg) -> None:
        pipeline.teacher_run(cfg, tcfg)

    def describe(self, cfg) -> dict:
        return {"scale": cfg.sr.scale, "test": cfg.sr.test}

    def progress(self, res: dict) -> str:
        return f"psnr={res['psnr']:.2f} ssim={res['ssim']:.4f} (bicubic {res['psnr_bicubic']:.2f})"

    def at_mix(self, model, ck: dict, c, path):
        """An SR student conditioned on the loss mix c (method sgn) runs at c, by default the `fixed_c` it was
        trained at; c must be K weights >= 0 summing to 1."""
        from cqd.models.sym import AtMix

        if c is None:
            saved = (ck.get("config") or {}).get("method", {})
            c = (saved.get(saved.get("name")) or {}).get("fixed_c")
            if c is None:
                raise ConfigError(f"{path} is conditioned on a mix c of {model.k} losses: give one, e.g. "
                                  f"--c {','.join(['%.3g' % (1 / model.k)] * model.k)} (api: c=[...])")
        c = [float(v) for v in c]
        if len(c) != model.k or not all(v >= 0 for v in c) or not abs(sum(c) - 1) <= 1e-4:  # NaN fails both
            raise ConfigError(f"c={c}: {path} takes a mix of K={model.k}: {model.k} weights, each >= 0, summing to 1")
        return AtMix(model, c), c
