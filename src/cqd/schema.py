"""The base of every config section: unknown keys are errors, assignments are validated.

Kept apart from `cqd.config` so that a method file can declare its own section (`Params`)
without importing the whole config schema (which imports every method).
"""
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoParams(Strict):
    """A method with no settings of its own."""
