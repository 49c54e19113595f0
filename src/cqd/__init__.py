"""cqd: Cross Quality Distillation (Su and Maji) for classifiers that must work on degraded images."""

__version__ = "0.1.0"
