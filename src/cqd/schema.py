"""The base of every config section: unknown keys are errors, assignments are validated.

Every section of a config derives from `Strict` and lives with its owner: a method's `Params` in its
file, `data:` in `cqd.data.schema`, `train:` and the run in `cqd.engine.schema`, a task's section in its
package, grids and studies in `cqd.experiments.schema`.
"""
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoParams(Strict):
    """A method with no settings of its own."""


MAX_SEED = 2**31 - 1  # seeds feed torch.manual_seed and int64 hashes (seed * 100003 + epoch must not overflow)
