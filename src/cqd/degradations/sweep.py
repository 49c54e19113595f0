"""A robustness sweep (`robustness:` of a run config): families of degradations at several severities, as specs.

A family is one parameter of one degradation swept from mild to severe (by default lowres `size`, blur `sigma`,
noise `std` and jpeg `quality`, ImageNet-C's five severities each); `cqd robustness` (`cqd.analysis.robustness`)
evaluates every model on every spec. An explicit list of `specs` replaces the families, grouped by their
degradation names. Here because the run schema holds the section: it only builds and checks spec strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field, field_validator

from cqd.degradations import check_spec, parse_degradation
from cqd.errors import ConfigError
from cqd.schema import Strict

PARAMS = {"lowres": "size", "blur": "sigma", "noise": "std", "jpeg": "quality"}  # the swept parameter of each family


class SweepConfig(Strict):
    """The degradations `cqd robustness` evaluates on: each family's severities, mildest first ([] drops it)."""

    lowres: list[int] = Field([24, 16, 12, 8, 6], description="lowres sizes (px); sizes >= data.image_size are "
                                                               "skipped with a note")
    blur: list[float] = Field([0.5, 1, 1.5, 2, 3], description="blur sigmas (px)")
    noise: list[float] = Field([0.05, 0.1, 0.2, 0.3, 0.4], description="noise stds")
    jpeg: list[int] = Field([50, 30, 20, 10, 5], description="jpeg qualities")
    more: dict[str, list[float]] = Field({}, description="more families, 'name:param' -> severities, e.g. "
                                                         "{'tps:sigma': [8, 16]}")
    specs: list[str] | None = Field(None, min_length=1, description="explicit specs that replace the families "
                                                                    "(each must fit data.image_size)")
    own: bool = Field(True, description="also the run's own data.degradation (family T) when the sweep lacks it")

    @field_validator("more")
    @classmethod
    def _more(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for key, values in v.items():
            name, colon, param = key.partition(":")
            if not colon or not param:
                raise ValueError(f"family {key!r}: name it as 'degradation:parameter', e.g. 'tps:sigma'")
            for value in values:
                check_spec(_spec(name, param, value))
        return v

    @field_validator("specs")
    @classmethod
    def _specs(cls, v: list[str] | None) -> list[str] | None:
        for spec in v or []:
            check_spec(spec)
        return v


@dataclass
class Family:
    name: str  # "lowres", "tps:sigma", "clutter+lowres" (explicit specs) or "T" (the run's own degradation)
    severities: list[tuple[str, str]] = field(default_factory=list)  # (label, spec), mildest first


def _spec(name: str, param: str, value: float) -> str:
    return f"{name}:{param}={value:g}"


def _canonical(spec: str) -> str:
    return parse_degradation(spec).spec()


def _too_big(spec: str, image_size: int) -> str | None:
    """Why `spec` does not fit `image_size`-px images (None: it fits). A lowres size at or above the image's
    leaves it as it is."""
    try:
        check_spec(spec, image_size)
    except ValueError as e:
        return str(e)
    T = parse_degradation(spec)
    if T.name == "lowres" and T.size >= image_size:
        return f"lowres size {T.size} >= the {image_size}-px images: no degradation"
    return None


def _group(specs: list[str], image_size: int) -> list[Family]:
    """Explicit specs by family (their degradation names); one that does not fit the images is an error."""
    families: dict[str, Family] = {}
    for spec in specs:
        why = _too_big(spec, image_size)
        if why:
            raise ConfigError(f"robustness spec {spec!r} does not fit data.image_size={image_size}: {why}")
        parts = [p.strip().partition(":") for p in spec.split("+")]
        name = "+".join(p[0] for p in parts)
        label = "+".join(p[2] for p in parts if p[2]) or spec
        families.setdefault(name, Family(name)).severities.append((label, spec))
    return list(families.values())


def expand(sweep: SweepConfig | None, image_size: int, own: str | None = None) -> tuple[list[Family], list[str]]:
    """(families, notes): the sweep as specs for `image_size`-px images, plus `own` (the run's degradation) as
    family T when the sweep lacks it. A family's severity that does not fit the images is skipped with a note;
    an explicit spec that does not is a ConfigError naming it."""
    sweep, notes = sweep or SweepConfig(), []
    if sweep.specs is not None:
        families = _group(sweep.specs, image_size)
    else:
        families = []
        swept = [(name, PARAMS[name], getattr(sweep, name)) for name in PARAMS]
        swept += [(*key.split(":", 1), values) for key, values in sweep.more.items()]
        for name, param, values in swept:
            family = Family(name if name in PARAMS else f"{name}:{param}")
            for value in values:
                spec = _spec(name, param, value)
                why = _too_big(spec, image_size)
                if why:
                    notes.append(f"skipped {spec}: {why}")
                else:
                    family.severities.append((f"{value:g}", spec))
            if family.severities:
                families.append(family)
    taken = {_canonical(s) for f in families for _, s in f.severities}
    if sweep.own and own and own != "none" and _canonical(own) not in taken:
        why = _too_big(own, image_size)
        if why:
            notes.append(f"skipped the run's own degradation {own}: {why}")
        else:
            families.append(Family("T", [(own, own)]))
    if not families:
        raise ConfigError(f"the robustness sweep holds no degradation that fits data.image_size={image_size}"
                          + (f" ({'; '.join(notes)})" if notes else ""))
    return families, notes
