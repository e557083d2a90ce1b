"""asyncopd: asynchronous on-policy distillation as a service.

Layers (`tests/unit/test_layers.py` holds each to its allowed imports):
- `asyncopd` itself: the torch-free contracts every process shares — job spec, stream schemas, state keys,
  records, settings, the service runtime, the REST client. The coordinator needs nothing else.
- `asyncopd.ml`: torch code the model-hosting services share (engines, evaluation, weight versions).
- `asyncopd.tools`: developer and operator tooling (the `asyncopd` command, the local stack, benchmarks).
"""

__version__ = "0.1.0"
