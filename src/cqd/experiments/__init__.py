"""Above one run: grids of runs (Table 1), Optuna studies and sequential distillation rounds."""
