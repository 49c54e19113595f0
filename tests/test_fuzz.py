"""Fuzzing the ways in: malformed configs, overrides, YAML text, degradation specs and CLI arguments
either work or raise a CQDError (the CLI: exit 0 or 2 with one `cqd: error:` paragraph), never
another exception."""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqd import api
from cqd.cli import main
from cqd.config import apply_overrides
from cqd.degradations import DEGRADATIONS, Degradation, parse_degradation
from cqd.engine.schema import RunConfig, load_run_config, run_config
from cqd.errors import CQDError
from cqd.experiments.schema import load_grid_config


def examples(n: int) -> int:
    """n under the default `ci` hypothesis profile (derandomized), 10x under `explore` (see conftest.py)."""
    return max(1, n * settings.default.max_examples // 100)


# allow_subnormal=False: training sets torch.set_flush_denormal(True), process-wide, which hypothesis refuses
FUZZ = settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# real keys (so values reach the validators) mixed with near misses and junk
SECTIONS = {name: list(field.annotation.model_fields) for name, field in RunConfig.model_fields.items()
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")}
SECTIONS["method"] = ["name"]  # method-specific keys (method.lam, method.T, ...) are being moved: not fuzzed for now
TOP = list(RunConfig.model_fields)
LEAVES = [k for k in TOP if k not in SECTIONS] + [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]
NAMES = DEGRADATIONS.names() + ["lowres", "clutter", "blurr", "LOWRES", "low res", "", "9x"]
PARAMS = ["size", "sigma", "std", "quality", "grid", "canvas", "min_scale", "max_scale", "pieces", "low", "high",
          "model", "x", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3000),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.text(max_size=20),
    st.sampled_from(["lq", "cqd", "resnet8", "lowres:size=8", "fashion_mnist", "error", "skip", "full", "crop",
                     "32-true", "auto", "tv:resnet18", "timm:nope", "1e999", "nan", "-1", "0"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
keys = st.one_of(st.sampled_from(TOP), st.text(max_size=10))
section = st.dictionaries(st.one_of(st.sampled_from(sorted({k for ks in SECTIONS.values() for k in ks})),
                                    st.text(max_size=8)), values, max_size=5)
configs = st.dictionaries(keys, st.one_of(values, section), max_size=8)

override_keys = st.one_of(st.sampled_from(LEAVES), st.sampled_from(TOP),
                          st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(LEAVES), st.text(max_size=5)),
                          st.text(max_size=15))
override_values = st.one_of(st.text(max_size=20),
                            scalars.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip()),
                            st.sampled_from(["{a: 1}", "[1, 2]", "!!python/object/apply:os.system [x]", "&a [*a]",
                                             "{", "'", "null", ".inf", "2020-01-01", "0x10", "1_000"]))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
                               st.text(max_size=20)), max_size=5)

param = st.builds(lambda k, v: f"{k}={v}" if k else v, st.sampled_from(PARAMS),
                  st.one_of(st.text(max_size=6), st.sampled_from(["0", "1", "-1", "8", "0.5", "1e9", "nan", "inf",
                                                                 "true", "none", "", "1,2", "a=b"])))
one_spec = st.builds(lambda n, ps, colon: n + ((":" + ",".join(ps)) if colon else ""),
                     st.sampled_from(NAMES), st.lists(param, max_size=3), st.booleans())
specs = st.one_of(st.builds("+".join, st.lists(one_spec, min_size=1, max_size=3)), st.text(max_size=30))


def _ok_or_cqd(fn, *args):
    """fn(*args) returns, or raises a CQDError with a non-empty message: nothing else."""
    try:
        return fn(*args)
    except CQDError as e:
        assert str(e).strip()
        return None


@FUZZ
@given(configs)
def test_random_config_dicts(data):
    cfg = _ok_or_cqd(run_config, data)
    assert cfg is None or isinstance(cfg, RunConfig)


@FUZZ
@given(configs, overrides)
def test_random_overrides_on_random_configs(data, items):
    merged = _ok_or_cqd(apply_overrides, data, items)
    if merged is not None:
        _ok_or_cqd(run_config, merged)


@FUZZ
@given(overrides)
def test_random_overrides_on_the_defaults(items):
    _ok_or_cqd(load_run_config, None, items)


@FUZZ
@given(st.one_of(configs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=80),
                 st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                 st.sampled_from(["!!python/object/apply:os.system [x]", "a: &x [*x]", "a: 1\na: 2", "- 1",
                                  "? [1, 2]\n: 3", "{[1]: 2}", "\t\tbad", "%YAML 9.9\n---\na: 1"])))
def test_random_yaml_files(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        _ok_or_cqd(load_run_config, path)
        _ok_or_cqd(load_grid_config, path)


@FUZZ
@given(specs)
def test_random_degradation_specs(spec):
    T = _ok_or_cqd(parse_degradation, spec)
    if T is not None:
        assert isinstance(T, Degradation)
        _ok_or_cqd(T.check, 3, 32)
        # the canonical spec of a parsed T parses back to the same spec
        assert parse_degradation(T.spec()).spec() == T.spec()


@FUZZ
@given(st.one_of(st.sampled_from([None, 1, 1.5, b"lowres", ["lowres"], {"lowres": 1}]), st.text(max_size=5)))
def test_degradation_spec_of_any_type(spec):
    _ok_or_cqd(parse_degradation, spec)


argv_tokens = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), st.text(max_size=12),
    st.sampled_from(["--config", "--data-dir", "--model", "--resume", "--debug", "--specs", "-n", "--", "-x",
                     "--config=", "/nonexistent.yaml", "/", ".", "x=1",
                     # issue 34's inputs: --force, a NaN mix, an empty ensemble, a subset above the split
                     "--force", "--c", "nan,0.5,0.5", "method.name=feed", "method.name=ens", "teachers=[]",
                     "data.train_subset=99999999", "data.mix={degradations: [blur, blur]}"]))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["train", "eval"]), st.lists(argv_tokens, max_size=6))
def test_random_cli_arguments(command, tokens):
    """The CLI path up to the engine (the config is loaded as the API loads it, the engine is stubbed):
    exit 0 or 2, never a traceback or an exception."""
    result = {"name": "x", "method": "lq", "degradation": "none", "acc_hq": 0, "acc_lq": 0, "wall_s": 0,
              "images_per_s": 0}

    def train(config=None, *overrides, **_):
        load_run_config(config, list(overrides))
        return result

    def evaluate(model_path, config=None, *overrides, **_):
        load_run_config(config, list(overrides))
        return result

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(api, "train", train)
        mp.setattr(api, "evaluate", evaluate)
        debug = "--debug" in tokens[: tokens.index("--") if "--" in tokens else len(tokens)]
        try:
            rc = main([command, *tokens])
        except CQDError:
            assert debug  # --debug re-raises the user's error with its traceback
            return
    text = err.getvalue()
    assert rc in (0, 2), text
    assert "Traceback" not in text and "internal error" not in text, text
    if rc:
        assert text.count("cqd: error:") == 1, text


def test_the_default_hypothesis_profile_draws_the_same_examples_every_run():
    """conftest.py loads the derandomized `ci` profile: a property sees the same examples on every run,
    so a pass or a failure does not depend on luck (`--hypothesis-profile=explore` draws new ones)."""
    if settings.get_current_profile_name() != "ci":
        pytest.skip("only the default `ci` profile is derandomized")
    runs = []
    for _ in range(2):
        seen = []

        @settings(max_examples=20)
        @given(st.text(max_size=10))
        def record(text):
            seen.append(text)

        record()
        runs.append(seen)
    assert runs[0] == runs[1] and len(set(runs[0])) > 5


# issue 34: grids and study storages that passed validation and then crashed, hung or trained the wrong thing
grid_over = st.lists(st.one_of(
    st.builds(lambda s: f"seeds={s}", st.lists(st.integers(0, 3), max_size=4)),
    st.sampled_from(["rows=[]", "columns={}", "rows=[lq, lq]", "rows=[{id: a, set: {out_dir: x}}]",
                     "rows=[{id: a, set: {seed: 2}}]", "columns={c: {set: {name: n}}}", "columns={c: {}}",
                     "rows=[{id: f, set: {method.name: feed, teachers: []}}]", "tune.storage=foo://x"]),
    override_values.map(lambda v: f"rows={v}"), override_values.map(lambda v: f"columns={v}")), max_size=3)


@FUZZ
@given(grid_over)
def test_random_grid_overrides(items):
    """A grid config either loads, and then has rows, columns, distinct seeds and no cell key set per row or
    column, or is a CQDError."""
    from cqd.experiments.schema import CELL_KEYS

    base = {"out_dir": "/nonexistent/grid", "rows": ["lq"], "columns": {"lowres": {"degradation": "lowres:size=8"}},
            "base": {"data": {"image_size": 16}}}
    grid = _ok_or_cqd(load_grid_config, base, items)
    if grid is not None:
        assert grid.rows and grid.columns and len(set(grid.seeds)) == len(grid.seeds)
        sets = [r.set for r in grid.rows] + [c.set for c in grid.columns.values()]
        assert not any(k.split(".")[0] in CELL_KEYS for s in sets for k in s)


@FUZZ
@given(st.one_of(st.text(max_size=30), st.builds(lambda d, rest: f"{d}{rest}", st.sampled_from(
    ["sqlite://", "sqlite:///", "sqlite:////proc/", "postgresql://", "mysql://", "foo://", "sqlite+pysqlite:///",
     "://", "sqlite:///:memory:", "sqlite:///file::memory:?"]), st.text(max_size=15))))
def test_random_study_storages(url):
    """`cqd tune`'s storage check accepts a URL or raises a CQDError naming it: never another exception."""
    from types import SimpleNamespace

    from cqd.experiments.tune import check_storage

    try:
        check_storage(SimpleNamespace(storage=url))
    except CQDError as e:
        assert "storage=" in str(e)
