"""Small and fast students: structured pruning (Torch-Pruning), quantization-aware training (torchao's
PT2E flow) and what `model.pt` records to rebuild them. The `compress:` config section composes with
every method: the engine applies it to the student g after g starts from f (see `compressor.py`).

This package's `__init__` stays light (the config schema imports `cqd.compress.schema`); Torch-Pruning
and torchao are imported by the modules that use them.
"""
