"""asyncopd: asynchronous on-policy distillation as a service.

This package is the core every service shares. It is torch-free except for `asyncopd.engines` and
`asyncopd.tinymodels`, which only the model-serving services and tooling import.
"""

__version__ = "0.1.0"
