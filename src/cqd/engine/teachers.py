"""The frozen teachers f_1..f_K of a run: whether a run needs them, the run that trains each one
when no checkpoint is given, and their outputs for each batch (logits and tapped feature maps).

When a teacher's input x is fixed (no fresh per-epoch draws on its view), its logits are computed
once and cached on disk (keyed by its weights, the data, its view and the precision), and its tapped
feature maps are computed once and kept on the device when they fit `train.feature_cache_mb`;
otherwise the teacher runs on each batch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from cqd.engine.calibration import calibration
from cqd.engine.loaders import eval_loader
from cqd.engine.model_files import MODEL, load_model
from cqd.engine.teacher_cache import cache_key, cached_teacher_logits
from cqd.errors import CheckpointError, CQDError
from cqd.methods.base import freeze
from cqd.models.factory import builtin_spec
from cqd.models.taps import FeatureTaps
from cqd.tasks import task_of


def teacher_run_config(cfg, k: int = 0):
    """The run that trains teacher k when it has no checkpoint: method hq (the task's teacher method) on
    the teacher's model, seed, view, x degradation, items and epochs, in `<out_dir>/teacher` (k = 0) or
    `<out_dir>/teacher<k>`. A teacher with its own `train_subset` holds out the run's validation items."""
    from cqd.engine.schema import TeacherConfig

    t = cfg.teacher_list[k]
    tcfg = cfg.model_copy(deep=True)
    tcfg.model, tcfg.pretrained = t.model or cfg.model, t.pretrained
    tcfg.seed = cfg.seed if t.seed is None else t.seed
    tcfg.data.hq_view = t.view or cfg.data.hq_view
    tcfg.data.hq_degradation = t.degradation or cfg.data.hq_degradation
    task = task_of(cfg)
    tcfg.method = type(cfg.method)(name=task.teacher_method)
    task.teacher_run(cfg, tcfg)
    if t.epochs is not None:
        tcfg.train.epochs = t.epochs
    if t.train_subset is not None:  # a privileged teacher: its own items, never the run's validation items
        tcfg.data.train_subset = None if t.train_subset == "all" else t.train_subset
        tcfg.data.val_from = cfg.data.val_from or cfg.data.train_subset or 2**31 - 1  # (>= the split: all of it)
    tcfg.teacher, tcfg.teachers = TeacherConfig(), []
    tcfg.compress = type(cfg.compress)()  # f is never compressed: a compressed g starts from the full f
    suffix = "" if k == 0 else str(k)
    tcfg.out_dir, tcfg.name = str(Path(cfg.out_dir) / f"teacher{suffix}"), f"{cfg.name}-teacher{suffix}"
    return tcfg


def teacher_file(cfg, k: int, train: Callable, log: Callable[[str], None]) -> Path:
    """Teacher k's model.pt: its checkpoint, or trained now (method hq) into its own folder."""
    path = cfg.teacher_list[k].checkpoint
    if path is not None:
        return Path(path)
    tcfg = teacher_run_config(cfg, k)
    path = Path(tcfg.out_dir) / MODEL
    if not path.is_file():
        log(f"no checkpoint for teacher {k}: training it (method {tcfg.method.name}) into {tcfg.out_dir}")
        train(tcfg, resume=True)
    return path


def check_teacher_model(cfg, k: int, ck: dict, path) -> None:
    """An explicitly set `teacher.model` (or `teachers[k].model`) is the architecture of the checkpoint it is given:
    else a CheckpointError naming both (the file's architecture would be used without a word)."""
    want = cfg.teacher_list[k].model
    if want is None:
        return
    want = task_of(cfg).model_name(cfg, want)
    if _same_model(want, ck["model_name"]):
        return
    key = "teacher.model" if not cfg.teachers else f"teachers[{k}].model"
    raise CheckpointError(f"{path} holds a {ck['model_name']!r} network, but {key} is {want!r}: set {key} to "
                          f"{ck['model_name']!r} (or leave it unset to follow the checkpoint), or give a checkpoint "
                          f"of {want!r}")


def _same_model(a: str, b: str) -> bool:
    """The same model name, its `key=value` options in any order (`edsr:blocks=4,feats=16` = `edsr:feats=16,...`)."""
    if a == b:
        return True
    try:
        return builtin_spec(a) == builtin_spec(b)
    except CQDError:
        return False


class Teachers:
    """The loaded, frozen teachers of a run, each with the maker of its own x when its view differs."""

    def __init__(self, cfg, base_train, num_classes: int, in_chans: int, fabric, train: Callable, log):
        self.cfg, self.fabric, self.log = cfg, fabric, log
        # x (classification) or z (sr): what f sees when it has no maker of its own
        self.input_of = task_of(cfg).teacher_input
        self.models: list[nn.Module] = []
        self.paths: list[str] = []
        self.makers = []  # None: the teacher sees the run's x
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        for k, t in enumerate(cfg.teacher_list):
            path = teacher_file(cfg, k, train, log)
            model, ck = load_model(path, num_classes, in_chans)
            check_teacher_model(cfg, k, ck, path)
            self.models.append(freeze(model.to(fabric.device, memory_format=fmt)))
            self.paths.append(str(path))
            own = (t.view or cfg.data.hq_view, t.degradation or cfg.data.hq_degradation)
            same = own == (cfg.data.hq_view, cfg.data.hq_degradation)
            self.makers.append(None if same else task_of(cfg).make_maker(cfg, base_train, *own))
        self.taps: list[FeatureTaps | None] = [None] * len(self.models)
        self.logit_tables: list[Tensor | None] = [None] * len(self.models)
        self.feature_tables: list[tuple[Tensor, dict[str, Tensor]] | None] = [None] * len(self.models)
        self.calibrations: list[dict | None] = [None] * len(self.models)  # teacher.calibrate's fit, per teacher

    def __len__(self) -> int:
        return len(self.models)

    def temperature(self, k: int) -> float:
        """f_k's logits are divided by this: its fitted temperature (teacher.calibrate), else 1."""
        c = self.calibrations[k]
        return 1.0 if c is None else c["temperature"]

    def tap(self, names: list[list[str]]) -> None:
        """Collect these layers' outputs of each teacher (the method's `teacher_taps`)."""
        for k, layers in enumerate(names):
            if layers:
                self.taps[k] = FeatureTaps(self.models[k], layers, f"a feature tap on teacher {k}")

    def _input(self, k: int, batch: dict, pair, epoch: int) -> Tensor:
        maker = self.makers[k]
        return self.input_of(pair) if maker is None else maker.normalize(maker.hq(batch, self.fabric.device, epoch))

    @torch.no_grad()
    def calibrate(self, val_ds, base_train, run_maker) -> None:
        """Fit each `calibrate` teacher's temperature on the validation items (its own x), and log its NLL and ECE
        before and after (`cqd.engine.calibration`)."""
        wanted = [k for k, t in enumerate(self.cfg.teacher_list) if t.calibrate]
        if not wanted:
            return
        loader = eval_loader(self.cfg, val_ds, base_train)  # every rank fits on all of them: the same T
        for k in wanted:
            maker, logits, labels = self.makers[k] or run_maker, [], []
            for batch in loader:
                with self.fabric.autocast():
                    logits.append(self.models[k](maker.normalize(maker.hq(batch, self.fabric.device))).float())
                labels.append(batch["label"])
            c = calibration(torch.cat(logits).cpu(), torch.cat(labels))
            self.calibrations[k] = c
            self.log(f"teacher {k} calibrated on {len(val_ds)} validation items: T_cal {c['temperature']:.3f}, "
                     f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}, "
                     f"ECE (15 bins) {c['ece_before']:.4f} -> {c['ece_after']:.4f}")

    def cache(self, train_ds, base_train, all_loader, run_maker) -> None:
        """Compute what can be computed once (x fixed and `train.cache_teacher`): logits on disk, tapped maps on the
        device."""
        cfg, fabric = self.cfg, self.fabric
        if not cfg.train.cache_teacher:
            return
        identity = self._identity(train_ds, base_train)
        for k, model in enumerate(self.models):
            maker = self.makers[k] or run_maker
            if not maker.teacher_input_fixed:
                continue
            t, size = self.temperature(k), len(base_train)
            mb = self._feature_mb(k, maker, len(train_ds)) if self.taps[k] is not None else 0.0
            keep = self.taps[k] is not None and mb <= cfg.train.feature_cache_mb
            passes = []  # a logits miss's pass, whose maps (when kept) serve below: one pass over x, not two

            def compute():  # called at once, in this iteration
                passes.append(self._pass(k, all_loader, maker, size, keep))
                return passes[0][0] / t

            key = cache_key(model, identity if t == 1.0 else {**identity, "temperature": t}, maker.view_key())
            table, hit = cached_teacher_logits(cfg.cache_dir, key, compute, {"temperature": t})
            self.logit_tables[k] = table.to(fabric.device)
            self.log(f"teacher {k} logits: {'cache hit' if hit else 'computed and cached'} "
                     f"({cfg.cache_dir}/teacher-{key}.pt)")
            if keep:
                _, slots, maps = passes[0] if passes else self._pass(k, all_loader, maker, size, True)
                self.feature_tables[k] = (slots, maps)
                self.log(f"teacher {k} feature maps: computed once ({mb:.0f} MB on {fabric.device})")
            elif self.taps[k] is not None:
                self.log(f"teacher {k} feature maps: {mb:.0f} MB > "
                         f"train.feature_cache_mb={cfg.train.feature_cache_mb}: computed every step")

    def _identity(self, train_ds, base_train) -> dict:
        """What the teachers' inputs depend on, besides their view: the data and the precision."""
        cfg = self.cfg
        identity = {"dataset": cfg.data.name, "root": cfg.data.root, "split": "train", "size": cfg.data.image_size,
                    "n": len(base_train), "data_seed": cfg.data.seed,
                    "precision": self.fabric.strategy.precision.precision}
        if isinstance(train_ds, Subset):  # f(x) only for the items this run trains on, not the whole split
            identity["items"] = hashlib.sha256(",".join(map(str, train_ds.indices)).encode()).hexdigest()[:16]
        return identity

    def pretrain(self, method, train_ds, base_train, all_loader, run_maker) -> None:
        """The method's own stage before training, if it has one (e.g. factor transfer's paraphraser):
        `method.pretrain(k, maps, key, cache_dir, log)` for each teacher k it taps, where `maps()` yields
        teacher k's tapped maps over the training items (batches in index order, from the device cache
        when kept) and `key` names teacher k's weights, the data and its view, as the logits cache's key,
        so the stage can keep its result on disk and redo it only when one of them changes."""
        if not method.pretrains:
            return
        identity = self._identity(train_ds, base_train)
        for k, model in enumerate(self.models):
            if self.taps[k] is not None:
                maker = self.makers[k] or run_maker
                key = cache_key(model, identity, maker.view_key())
                method.pretrain(k, lambda k=k, maker=maker: self._maps(k, all_loader, maker), key, self.cfg.cache_dir,
                                self.log)

    def _maps(self, k: int, loader, maker):
        """Teacher k's tapped maps over `loader`, batch by batch."""
        if self.feature_tables[k] is not None:
            maps = self.feature_tables[k][1]
            n = len(next(iter(maps.values())))
            for i in range(0, n, loader.batch_size):
                yield {name: m[i:i + loader.batch_size] for name, m in maps.items()}
            return
        for batch in loader:
            with torch.no_grad(), self.fabric.autocast():
                self.models[k](maker.normalize(maker.hq(batch, self.fabric.device)))
            yield {name: f.float() for name, f in self.taps[k].out.items()}

    @torch.no_grad()
    def _feature_mb(self, k: int, maker, n: int) -> float:
        size = self.cfg.data.image_size
        self.models[k](torch.zeros(1, len(maker.mean.view(-1)), size, size, device=self.fabric.device))
        return n * sum(t.numel() for t in self.taps[k].out.values()) * 4 / 2**20

    @torch.no_grad()
    def _pass(self, k: int, loader, maker, size: int, keep_maps: bool):
        """(logits table by dataset index, slot of each dataset index, tapped maps by slot, when `keep_maps`) over
        `loader`."""
        model, taps, device = self.models[k], self.taps[k], self.fabric.device
        table, slots, maps, n = None, torch.full((size,), -1, dtype=torch.long, device=device), {}, 0
        for batch in loader:
            index = batch["index"].to(device)
            with self.fabric.autocast():
                logits = model(maker.normalize(maker.hq(batch, device))).float()
            if table is None:
                table = torch.full((size, logits.shape[1]), float("nan"), device=device)
            table[index] = logits
            slots[index] = torch.arange(n, n + len(index), device=device)
            n += len(index)
            for name, f in (taps.out.items() if keep_maps else ()):
                maps.setdefault(name, []).append(f.float())
        return table, slots, {name: torch.cat(fs) for name, fs in maps.items()}

    @torch.no_grad()
    def __call__(self, batch: dict, pair, epoch: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Each teacher's logits and tapped maps for this batch: looked up when cached, else computed now."""
        logits, features = [], []
        for k, model in enumerate(self.models):
            cached_maps = self.feature_tables[k]
            if self.logit_tables[k] is not None and (self.taps[k] is None or cached_maps is not None):
                logits.append(self.logit_tables[k][pair.index])
                slots, maps = cached_maps or (None, {})
                features.append({name: m[slots[pair.index]] for name, m in maps.items()})
                continue
            with self.fabric.autocast():
                out = model(self._input(k, batch, pair, epoch)).float()
            t = self.temperature(k)
            logits.append(out if t == 1.0 else out / t)
            features.append({name: f.float() for name, f in (self.taps[k].out.items() if self.taps[k] else ())})
        return logits, features
