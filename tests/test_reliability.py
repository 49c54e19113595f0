"""Bad input, crashes and untrusted files: every entry point answers with one clear message.

Each bad input goes through the Python API (a CQDError whose message names the key, value or file)
and/or the CLI (`cqd.cli.main`: non-zero exit, one `cqd: error:` paragraph on stderr, no traceback).
Crashes (full disk, NaN loss, Ctrl-C) keep the last checkpoint loadable; crafted pickles and YAML
tags run nothing.
"""
from __future__ import annotations

import copy
import errno
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cqd import api
from cqd.cli import main
from cqd.engine.schema import load_run_config, run_config
from cqd.errors import CheckpointError, ConfigError, CQDError, DataError, TrainingDiverged, describe
from cqd.files import load_checkpoint, save_checkpoint, save_json
from cqd.methods.supervised import TrainOnB
from cqd.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from test_data_loaders import make_cub, make_folder, set_cub_box, truncated_jpeg  # noqa: E402

CUB = ["data.name=cub", "data.image_size=16", "data.degradation=lowres:size=4", "train.batch_size=4"]


# --- helpers ------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_error(rc: int, err: str, *names) -> str:
    """The CLI failed cleanly: non-zero exit, exactly one `cqd: error:` paragraph naming `names`."""
    assert rc != 0, err
    assert err.count("cqd: error:") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    msg = err[err.index("cqd: error:"):]
    assert "\n\n" not in msg.strip(), f"not one paragraph: {msg!r}"
    for name in names:
        assert str(name) in msg, f"{name!r} not in {msg!r}"
    return msg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def config_error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_run_config(path, list(overrides))
    return str(e.value)


def model_file(path: Path, num_classes: int = 10, in_chans: int = 1, name: str = "resnet8") -> Path:
    """A model.pt as `cqd train` writes it, without training (random weights)."""
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    save_checkpoint({"model_name": name, "num_classes": num_classes, "in_chans": in_chans,
                     "model": model.state_dict(), "config": {}}, path)
    return path


class Payload:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tensors(path: Path) -> dict:
    return load_checkpoint(path)["model"]


# --- unknown names, keys, types, values (config level: nothing is loaded or trained) ----------


@pytest.mark.parametrize("override, key, value", [
    ("method.name=distill", "method.name", "Known: afd, at, augment, cqd, dml, ens, feed, fitnet, ft, hq, lq, lsfd, "
                                           "quality, quality_mix, sgn, sr_fitnet, sr_l1, sr_okd, sr_teacher, staged, "
                                           "symcqd."),
    ("model=resnet9", "model", "Did you mean 'resnet8'?"),
    ("teacher.model=vgg", "teacher.model", "vgg8"),
    ("model=hf:bert", "model", "'hf'"),
    ("data.name=cifar", "data.name", "Known: cars, cub, fashion_mnist, folder"),
    ("data.degradation=blurr", "data.degradation", "Did you mean 'blur'?"),
    ("data.hq_degradation=lowres:sise=3", "data.hq_degradation", "allowed: size"),
    ("data.degradation=lowres:size=x", "data.degradation", "should be of type int"),
    ("data.degradation=lowres+", "data.degradation", "empty part"),
])
def test_unknown_names(override, key, value, capsys):
    msg = config_error(override)
    assert f"{key}:" in msg and value in msg and f"override {override!r}" in msg
    one_error(*cli(capsys, "train", override), key, value)


@pytest.mark.parametrize("override, key, hint", [
    ("foo=1", "foo", "the top level takes: name, seed"),
    ("method.cqd.lamb=1", "method.cqd.lamb", "did you mean 'lam'? (method.cqd takes: T, lam, loss, scale)"),
    ("method.fitnet.bta=1", "method.fitnet.bta",
     "did you mean 'beta'? (method.fitnet takes: T, lam, loss, scale, beta, convention, hint, guided)"),
    ("method.fitnet_beta=1", "method.fitnet_beta",
     "method takes: name, init, afd, at, augment, cqd, dml, ens, feed, fitnet, ft, hq, lq, "
     "lsfd, quality, quality_mix, sgn, sr_fitnet, sr_l1, sr_okd, sr_teacher, staged, symcqd"),
    ("train.epoch=3", "train.epoch", "did you mean 'epochs'?"),
    ("data={sise: 3}", "data.sise", "data takes: name, root, root_lq, test_lq_only, image_size"),
])
def test_unknown_keys(override, key, hint, capsys):
    msg = config_error(override)
    assert f"{key}: unknown key" in msg and hint in msg
    one_error(*cli(capsys, "train", override), key)


def test_unknown_nested_key_in_file(tmp_path, capsys):
    path = write_yaml(tmp_path / "run.yaml", {"method": {"name": "cqd", "cqd": {"lamb": 200}}, "train": {"epochs": 1}})
    msg = config_error(path=path)
    assert str(path) in msg and "method.cqd.lamb: unknown key; did you mean 'lam'?" in msg and "override" not in msg
    one_error(*cli(capsys, "train", "--config", path), path, "method.cqd.lamb")


@pytest.mark.parametrize("how", ["override", "file"])
def test_an_old_flat_method_key_says_where_it_moved(how, tmp_path, capsys):
    """Before each method had its own section, CQD's keys were flat under `method:`."""
    if how == "override":
        msg = config_error("method.lam=200")
        args = ["train", "method.lam=200"]
    else:
        path = write_yaml(tmp_path / "old.yaml", {"method": {"name": "cqd", "T": 10, "lam": 200}})
        msg = config_error(path=path)
        args = ["train", "--config", path]
    assert "method.lam moved to method.cqd.lam" in msg or "method.T moved to method.cqd.T" in msg
    assert "method: {name: cqd, cqd:" in msg
    one_error(*cli(capsys, *args), "moved to method.cqd.")


@pytest.mark.parametrize("override, key, what", [
    ("method.cqd.lam=-1", "method.cqd.lam", "greater than or equal to 0"),
    ("method.cqd.T=-1", "method.cqd.T", "greater than 0"),
    ("method.cqd.T=0", "method.cqd.T", "greater than 0"),
    ("method.at.p=0", "method.at.p", "greater than 0"),
    ("train.lr=0", "train.lr", "greater than 0"),
    ("train.epochs=abc", "train.epochs", "valid integer"),
    ("train.batch_size=1.5", "train.batch_size", "fractional part"),
    ("train.momentum=1", "train.momentum", "less than 1"),
    ("data.image_size=3", "data.image_size", "greater than or equal to 8"),
    ("data.on_corrupt=ignore", "data.on_corrupt", "'error' or 'skip'"),
    ("method.cqd.loss=l1", "method.cqd.loss", "'ce' or 'mse'"),
    ("data=[1, 2]", "data", "must be a section"),
    ("seed=1e999", "seed", "valid integer"),
    ("data.mix={degradations: [blur, lowres, blur]}", "data.mix", "listed twice"),  # issue 34: was accepted
    ("data.mix={degradations: [blur, lowres], c: [.nan, 1.0]}", "data.mix", "on the simplex"),  # NaN passed min(c)
])
def test_wrong_types_and_out_of_range(override, key, what, capsys):
    msg = config_error(override)
    assert f"{key}:" in msg and what in msg
    one_error(*cli(capsys, "train", override), key)


# issue 34: grid settings that were accepted and then trained one run as two, wrote an empty table, crashed the report
# or were silently ignored
@pytest.mark.parametrize("override, key, what", [
    ("seeds=[0, 1, 0]", "seeds", "seed 0 is given twice"),
    ("rows=[]", "rows", "empty"),
    ("columns={}", "columns", "empty"),
    ("rows=[{id: a, set: {method.name: lq, out_dir: x}}]", "row 'a'", "set.out_dir cannot be set per cell"),
    ("rows=[{id: a, set: {method.name: lq, name: x}}]", "row 'a'", "set.name cannot be set per cell"),
    ("columns={x: {set: {seed: 1}}}", "column 'x'", "set.seed cannot be set per cell"),
    ("columns={x: {set: {cache_dir: c}}}", "column 'x'", "set.cache_dir cannot be set per cell"),
])
def test_grid_mistakes(override, key, what, tmp_path, capsys):
    from cqd.experiments.schema import load_grid_config

    path = write_yaml(tmp_path / "grid.yaml", {"out_dir": str(tmp_path / "grid"), "rows": ["lq"],
                                               "columns": {"lowres": {"degradation": "lowres:size=8"}}})
    with pytest.raises(ConfigError) as e:
        load_grid_config(path, [override])
    assert key in str(e.value) and what in str(e.value)
    one_error(*cli(capsys, "table", "--config", path, override), key, what)
    assert not (tmp_path / "grid").exists()


def test_all_errors_of_a_config_in_one_message():
    msg = config_error("method.cqd.lam=-1", "train.epochs=0", "foo=1")
    assert all(k in msg for k in ("method.cqd.lam", "train.epochs", "foo: unknown key"))


@pytest.mark.parametrize("spec, size", [("lowres:size=64", 32), ("clutter:canvas=16", 32),
                                        ("clutter+lowres:size=40", 32)])
def test_degradation_that_does_not_fit_the_image_fails_before_loading_data(spec, size, tiny_config, tmp_path):
    cfg = tiny_config(data__degradation=spec, data__image_size=size, data__root=str(tmp_path / "no-data-here"))
    with pytest.raises(ConfigError) as e:
        api.train(cfg)
    msg = str(e.value)
    assert "data.degradation" in msg and f"({size} px)" in msg and spec.split("+")[-1] in msg
    assert not (tmp_path / "run").exists()  # nothing started


def test_override_syntax(capsys):
    for bad, expect in [("method", "should look like key=value"), ("=3", "should look like key=value"),
                        ("a..b=1", "should look like key=value"), ("method.name.x=1", "method.name is a value")]:
        with pytest.raises(ConfigError, match=expect):
            load_run_config(None, ["method.name=lq", bad])
        one_error(*cli(capsys, "train", "method.name=lq", bad), bad)
    msg = config_error("method.name.x=1")  # no method.name yet: the override makes it a section
    assert "method.name: Input should be a valid string (got {'x': 1}) (from override 'method.name.x=1')" in msg


# --- config files ------------------------------------------------------------------------------


def test_missing_config_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(path)
    one_error(*cli(capsys, "train", "--config", path), path, "does not exist")
    one_error(*cli(capsys, "train", "--config", tmp_path), tmp_path, "is a folder")


@pytest.mark.parametrize("text, what", [
    ("- a\n- b\n", "must hold a mapping of keys"),
    ("just a string\n", "must hold a mapping of keys"),
    ("method: [1\n", "line 2, column 1"),
    ("method: {name: lq}\nmethod: {lam: 3}\n", "key 'method' appears twice (first on line 1)"),
    ("data:\n  image_size: 32\n  image_size: 64\n", "key 'image_size' appears twice"),
])
def test_bad_yaml(text, what, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert str(path) in str(e.value) and what in str(e.value)
    one_error(*cli(capsys, "train", "--config", path), path, what)


def test_config_not_utf8(tmp_path, capsys):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    one_error(*cli(capsys, "train", "--config", path), path, "UTF-8")


def test_python_api_bad_arguments(tiny_config):
    with pytest.raises(ConfigError, match="got int 123"):
        api.load_config(123)
    with pytest.raises(ConfigError, match="'key=value' string"):
        api.load_config(None, 5)
    with pytest.raises(ConfigError, match="should look like key=value"):
        api.train(tiny_config(), "epochs")
    with pytest.raises(ConfigError, match="must be a dict"):
        run_config([1, 2])
    with pytest.raises(ConfigError, match=r"(?s)\(dict\).*method\.lamb: unknown key"):
        api.train(tiny_config(method__lamb=3))
    with pytest.raises(ConfigError, match="train.epochs"):
        api.train(api.load_config(), "train.epochs=-1")
    with pytest.raises(CheckpointError, match="file name, got NoneType"):
        api.evaluate(None, tiny_config())


# --- the CLI's own wording -------------------------------------------------------------------


def test_usage_errors_are_one_paragraph(capsys):
    for args, what in [(["frobnicate"], "invalid choice"), (["train", "--bogus"], "unrecognized arguments: --bogus"),
                       (["eval"], "required: --model")]:
        one_error(*cli(capsys, *args), what)


def test_debug_shows_the_traceback_anywhere_on_the_line(capsys):
    with pytest.raises(ConfigError):
        main(["--debug", "train", "method.lamb=1"])
    with pytest.raises(ConfigError):
        main(["train", "method.lamb=1", "--debug"])


def test_a_bug_is_one_line_and_exit_1(monkeypatch, capsys):
    import cqd.api

    monkeypatch.setattr(cqd.api, "train", lambda *a, **k: {}["boom"])
    rc, err = cli(capsys, "train")
    assert rc == 1 and err.startswith("cqd: internal error: KeyError") and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["--debug", "train"])


def test_dataloader_worker_error_is_unwrapped(tmp_path):
    """A DataError raised in a DataLoader worker comes back wrapped in the worker's traceback."""
    from cqd.data.images import FileImageDataset, Record

    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    ds = FileImageDataset([Record(tmp_path / "bad.jpg", 0)], ["a"], 8)
    with pytest.raises(DataError) as e:
        next(iter(torch.utils.data.DataLoader(ds, num_workers=1)))
    assert "Traceback" in str(e.value)  # what torch gives
    text, code = describe(e.value)
    assert (code == 2 and "Traceback" not in text
            and text.startswith(f"cqd: error: Cannot read image {tmp_path / 'bad.jpg'}"))


# --- datasets: annotation files and images ---------------------------------------------------


@pytest.fixture
def cub_root(tmp_path):
    make_cub(tmp_path / "cub")
    return tmp_path / "cub"


def test_cub_zero_sized_box(cub_root, capsys):
    set_cub_box(cub_root / "CUB_200_2011", 2, "5 10 0 20")
    one_error(*cli(capsys, "train", *CUB, f"data.root={cub_root}"), "Red_bird_0002.jpg", "zero or negative size",
              "[5, 10, 5, 30]")


@pytest.mark.parametrize("damage, names", [
    (lambda b: (b / "bounding_boxes.txt").write_text("1 10 6 20\n"),
     ["bounding_boxes.txt, line 1", "<width> <height>"]),
    (lambda b: (b / "classes.txt").unlink(), ["missing classes.txt"]),
    (lambda b: (b / "image_class_labels.txt").write_text("1 1\n"),
     ["image_class_labels.txt has no line for image id 2"]),
    (lambda b: (b / "image_class_labels.txt").write_bytes(b"1 1\n2 \xff\xfe\n"),
     ["image_class_labels.txt", "not UTF-8"]),
])
def test_cub_broken_annotation_files(damage, names, cub_root, capsys):
    damage(cub_root / "CUB_200_2011")
    one_error(*cli(capsys, "train", *CUB, f"data.root={cub_root}"), *names)


@pytest.mark.parametrize("damage, what", [
    (lambda p: p.unlink(), "does not exist"),
    (lambda p: p.write_bytes(b""), "Cannot read image"),
    (lambda p: p.write_bytes(truncated_jpeg()), "truncated"),
    (lambda p: p.write_bytes(b"this is not an image"), "Cannot read image"),
])
def test_missing_empty_truncated_corrupt_image(damage, what, cub_root, capsys):
    image = sorted((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    damage(image)
    one_error(*cli(capsys, "train", *CUB, f"data.root={cub_root}", f"out_dir={cub_root.parent / 'run'}"),
              image, what)


def test_on_corrupt_skip_warns_with_the_count_and_trains(cub_root, capsys):
    images = sorted((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    images[0].write_bytes(b"garbage")  # train
    images[2].write_bytes(truncated_jpeg())  # test
    run = cub_root.parent / "run"
    base = [*CUB, f"data.root={cub_root}", f"out_dir={run}", "train.epochs=1", "train.progress=false", "method.name=lq"]
    one_error(*cli(capsys, "train", *base), images[0], "on_corrupt='skip'")
    rc, err = cli(capsys, "train", *base, "data.on_corrupt=skip")
    assert rc == 0, err
    assert "cqd: warning: cub: skipped 1 unreadable image(s) of 6" in err and str(images[0]) in err
    assert "cqd: warning: cub: skipped 1 unreadable image(s) of 3" in err and str(images[2]) in err
    assert "Traceback" not in err and (run / "model.pt").is_file()


def test_missing_dataset_root(tmp_path, capsys):
    one_error(*cli(capsys, "train", "data.name=folder", f"data.root={tmp_path / 'nowhere'}"),
              tmp_path / "nowhere", "does not exist")
    one_error(*cli(capsys, "train", "data.name=cub"), "data.root")


# --- checkpoints that do not fit ---------------------------------------------------------------


def test_teacher_checkpoint_with_another_class_count(tmp_path, capsys):
    teacher = model_file(tmp_path / "teacher.pt", num_classes=10)
    root = make_folder(tmp_path / "folder")
    args = ["train", "method.name=cqd", f"teacher.checkpoint={teacher}", "data.name=folder", f"data.root={root}",
            "data.image_size=16", "data.degradation=lowres:size=4", f"out_dir={tmp_path / 'run'}"]
    msg = one_error(*cli(capsys, *args), teacher, "10 classes", "has 3")
    assert "teacher" in msg
    with pytest.raises(CheckpointError, match="10 classes but this dataset has 3"):
        api.train(None, *args[1:])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch, 2-step run: (config dict, out_dir)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = {"name": "done", "out_dir": str(root / "run"), "cache_dir": str(root / "cache"), "model": "resnet8",
           "data": {"train_subset": 64, "test_subset": 32, "image_size": 32, "degradation": "lowres:size=8"},
           "train": {"epochs": 1, "batch_size": 32, "progress": False, "max_steps_per_epoch": 2},
           "method": {"name": "lq"}}
    api.train(copy.deepcopy(cfg))
    return cfg, Path(cfg["out_dir"])


def test_resume_into_another_model(finished, tmp_path, capsys):
    cfg, out = finished
    path = write_yaml(tmp_path / "run.yaml", {**cfg, "model": "resnet14"})
    one_error(*cli(capsys, "train", "--config", path, "--resume"), out / "last.ckpt", "'resnet8'", "'resnet14'")


def test_resume_with_changed_settings(finished, tmp_path, capsys):
    cfg, out = finished
    path = write_yaml(tmp_path / "run.yaml", cfg)
    one_error(*cli(capsys, "train", "--config", path, "--resume", "train.momentum=0", "train.lr=0.1"),
              out / "last.ckpt", "train.momentum=0.9 (now 0.0)", "train.lr=0.05 (now 0.1)")


def test_resume_from_a_model_file(finished, tmp_path, capsys):
    cfg, out = finished
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes((out / "model.pt").read_bytes())
    path = write_yaml(tmp_path / "run.yaml", {**cfg, "out_dir": str(run)})
    one_error(*cli(capsys, "train", "--config", path, "--resume"), run / "last.ckpt", "not a resumable checkpoint")


def test_eval_files_that_are_not_cqd_models(finished, tmp_path, capsys):
    cfg, out = finished
    config = write_yaml(tmp_path / "run.yaml", cfg)
    torch.save(create_model("resnet8", 10, 1).state_dict(), tmp_path / "state_dict.pt")
    (tmp_path / "notes.txt").write_text("hello\n")
    data = (out / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    model_file(tmp_path / "resnet14.pt", name="resnet14")
    ck = torch.load(tmp_path / "resnet14.pt", weights_only=True)
    ck["model_name"] = "resnet8"
    torch.save(ck, tmp_path / "wrong_arch.pt")
    torch.save({"model": {}, "model_name": "resnet8"}, tmp_path / "partial.pt")
    for name, what in [("state_dict.pt", "not a cqd model file"), ("notes.txt", "not a PyTorch file"),
                       ("truncated.pt", "truncated, corrupt or not a PyTorch file"), ("list.pt", "holds a list"),
                       ("wrong_arch.pt", "missing key(s)"), ("partial.pt", "num_classes"),
                       ("missing.pt", "does not exist"), (".", "is a folder")]:
        one_error(*cli(capsys, "eval", "--model", tmp_path / name, "--config", config), tmp_path / name, what)
    rc, err = cli(capsys, "eval", "--model", out / "model.pt", "--config", config)
    assert rc == 0, err


def test_unwritable_out_dir(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    one_error(*cli(capsys, "train", "data.train_subset=32", "data.test_subset=32",
                   f"out_dir={tmp_path / 'file' / 'run'}"), tmp_path / "file")


# --- nothing lost: full disk, NaN, Ctrl-C --------------------------------------------------------


def _half_then_enospc(obj, f, *a, **k):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"epoch": 1, "w": torch.arange(5)}, path)
    monkeypatch.setattr(torch, "save", _half_then_enospc)
    with pytest.raises(CQDError, match=f"no space left on the device while writing {path}"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


def test_full_disk_seen_through_torch_save(tmp_path, monkeypatch):
    """torch.save turns the file's OSError into RuntimeError('unexpected pos'); it is still 'no space'."""
    import cqd.files as ckpt

    path = tmp_path / "model.pt"
    save_checkpoint({"w": torch.arange(5)}, path)
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(CQDError, match="no space left"):
        save_checkpoint({"w": torch.zeros(10000)}, path)
    with pytest.raises(CQDError, match="no space left"):
        save_json({"a": "x" * 1000}, tmp_path / "result.json")
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_full_disk_during_training(tiny_config, tmp_path, monkeypatch, capsys):
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        return real(obj, f, *a, **k) if len(calls) == 1 else _half_then_enospc(obj, f)

    monkeypatch.setattr(torch, "save", save)
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(train__max_steps_per_epoch=2))
    one_error(*cli(capsys, "train", "--config", cfg), "no space left", tmp_path / "run" / "last.ckpt")
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ck["epoch"] == 1 and ck["step_in_epoch"] == 0


def _fail_at(monkeypatch, call: int, make):
    """Make TrainOnB.forward (method lq) misbehave on its `call`-th call (1-based): `make(losses)`
    replaces the losses, or raises before the forward runs (so BatchNorm statistics are untouched)."""
    real, n = TrainOnB.forward, [0]

    def forward(self, step):
        n[0] += 1
        if n[0] != call:
            return real(self, step)
        make(None)
        logits, losses = real(self, step)
        return logits, make(losses)

    monkeypatch.setattr(TrainOnB, "forward", forward)


def _nan(losses):
    return losses and {**losses, "loss_ce": losses["loss_ce"] * float("nan")}


def _ctrl_c(losses):
    raise KeyboardInterrupt


def test_nan_loss_stops_with_step_and_term_and_keeps_the_checkpoint(tiny_config, tmp_path, monkeypatch, capsys):
    _fail_at(monkeypatch, 4, _nan)  # epoch 2, step 2 of 3
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(train__max_steps_per_epoch=3))
    msg = one_error(*cli(capsys, "train", "--config", cfg), "epoch 2 step 1", "loss_ce", "nan",
                    tmp_path / "run" / "last.ckpt")
    assert "lower train.lr" in msg
    ck = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ck["epoch"] == 1 and ck["step_in_epoch"] == 0 and len(ck["history"]) == 1
    assert not (tmp_path / "run" / "model.pt").exists()


def test_real_divergence_from_a_huge_learning_rate(tiny_config):
    with pytest.raises(TrainingDiverged,
                       match=r"loss became (nan|inf) at epoch 1 step \d+ \(non-finite term: loss_ce\)"):
        api.train(tiny_config(train__lr=1e30, train__epochs=1))


def test_ctrl_c_saves_exits_130_and_resume_matches_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch, capsys):
    steps = {"train__max_steps_per_epoch": 3, "train__epochs": 2}
    reference = api.train(tiny_config(out_dir=str(tmp_path / "ref"), **steps))
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(**steps))
    _fail_at(monkeypatch, 5, _ctrl_c)  # epoch 2, before step 2's update
    rc, err = cli(capsys, "train", "--config", cfg)
    assert rc == 130 and "cqd: interrupted" in err and "Traceback" not in err, err
    ck = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 1)
    monkeypatch.undo()
    rc, err = cli(capsys, "train", "--config", cfg, "--resume")
    assert rc == 0, err
    got, want = tensors(tmp_path / "run" / "model.pt"), tensors(tmp_path / "ref" / "model.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    import json

    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (res["acc_hq"], res["acc_lq"]) == (reference["acc_hq"], reference["acc_lq"])


# --- untrusted files run no code ---------------------------------------------------------------


@pytest.fixture
def crafted(tmp_path):
    """Pickles whose loading would create `marker`: torch zip, torch legacy, and a raw pickle."""
    marker = tmp_path / "PWNED"
    files = {}
    torch.save({"model": Payload(marker), "model_name": "resnet8"}, tmp_path / "zip.pt")
    torch.save({"model": Payload(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    files = {name: tmp_path / name for name in ("zip.pt", "legacy.pt", "raw.pkl")}
    assert not marker.exists()
    return marker, files


def test_crafted_pickle_load_checkpoint(crafted):
    marker, files = crafted
    for path in files.values():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value) and "nothing in it ran" in str(e.value)
    assert not marker.exists()


def test_crafted_pickle_via_cli_and_config(crafted, finished, tmp_path, capsys):
    marker, files = crafted
    cfg, _ = finished
    config = write_yaml(tmp_path / "run.yaml", {**cfg, "out_dir": str(tmp_path / "run")})
    for path in files.values():
        one_error(*cli(capsys, "eval", "--model", path, "--config", config), path, "refused")
    one_error(*cli(capsys, "train", "--config", config, "method.name=cqd", f"teacher.checkpoint={files['zip.pt']}"),
              files["zip.pt"], "refused")
    msg = one_error(*cli(capsys, "train", "--config", config, f"pretrained={files['zip.pt']}"), files["zip.pt"],
                    "refused", "nothing in it ran")
    assert "weights_only=False" not in msg  # cqd's refusal, not torch's advice to load it unsafely (issue 34)
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "last.ckpt").write_bytes(files["zip.pt"].read_bytes())
    one_error(*cli(capsys, "train", "--config", config, "--resume"), tmp_path / "run" / "last.ckpt", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch {m}"]',
    '!!python/object/new:os.system ["touch {m}"]',
    '!!python/name:os.system',
    '!!python/object:cqd.config.RunConfig {{}}',
    '!!python/module:os',
])
def test_yaml_tags_that_would_run_code(tag, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: x\nmethod:\n  cqd:\n    lam: {tag.format(m=marker)}\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert str(path) in str(e.value) and "is not allowed" in str(e.value) and "line 4" in str(e.value)
    one_error(*cli(capsys, "train", "--config", path), path, "nothing was run")
    one_error(*cli(capsys, "train", f"method.cqd.lam={tag.format(m=marker)}"), "method.cqd.lam")
    assert not marker.exists()
