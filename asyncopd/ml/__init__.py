"""Torch code the model-hosting services share: engines, evaluation, weight versions, tiny models."""
