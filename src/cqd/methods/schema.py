"""The `method:` section of a run config: `name` and `init`, and one section per registered method."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model, field_validator, model_validator

from cqd.methods import METHODS
from cqd.schema import Strict

# The keys that were flat under `method:` before each method got its own section (all were CQD's).
MOVED_KEYS = {"T": "cqd", "lam": "cqd", "loss": "cqd", "scale": "cqd"}
COMMON_KEYS = ("name", "init")


class MethodBase(Strict):
    """`method.name` and `method.init` are common; each method's own keys live in a section named after
    it (`method: {name: cqd, cqd: {T: 10, lam: 50}, fitnet: {beta: 100}}`), so one base config can hold
    settings for several methods and only the chosen one's section is used."""

    name: str = "cqd"
    init: Literal["auto", "teacher", "scratch"] = Field(
        "auto", description="auto: g starts from f when the method asks for it and the architectures match")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, section in MOVED_KEYS.items():
                if key in data:
                    raise ValueError(f"method.{key} moved to method.{section}.{key}: each method's own keys now live "
                                     f"in a section named after it, e.g. method: {{name: {section}, {section}: "
                                     f"{{{key}: {data[key]!r}}}}} or the override method.{section}.{key}={data[key]}")
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return METHODS.check(v)

    @property
    def params(self) -> BaseModel:
        """The chosen method's own section."""
        return getattr(self, self.name, None) or METHODS.get(self.name).Params()


_SCHEMAS: dict[tuple[str, ...], type[MethodBase]] = {}


def method_schema() -> type[MethodBase]:
    """The `method:` section: the common keys plus one section per method registered now (its `Params`), so a
    method registered from outside the package (a plugin, a notebook) gets its section too."""
    names = tuple(METHODS.names())
    if names not in _SCHEMAS:
        _SCHEMAS[names] = _build(names)
    return _SCHEMAS[names]


def _build(names: tuple[str, ...]) -> type[MethodBase]:
    sections = {}
    for name in names:
        if name.startswith("_"):  # not a config key (e.g. a test's private method): its defaults, via `params`
            continue
        if name in COMMON_KEYS or hasattr(BaseModel, name):
            raise ValueError(f"method name {name!r} clashes with a config key; register it under another name")
        params = METHODS.get(name).Params
        sections[name] = (params, Field(default_factory=params, description=f"settings of method {name}"))
    return create_model("MethodConfig", __base__=MethodBase, __doc__=MethodBase.__doc__, __module__=__name__,
                        **sections)
