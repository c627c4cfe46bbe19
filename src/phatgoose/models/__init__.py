"""Base models: load any Hugging Face causal or seq2seq LM, offline, and describe it."""

from phatgoose.models.base import (
    EMBEDDED_MODEL,
    BaseModel,
    bf16_is_faster,
    device_name,
    embedded_model_dir,
    fingerprint,
    linear_dims,
    load_base_model,
    resolve_bf16,
    resolve_target_modules,
)

__all__ = [
    "EMBEDDED_MODEL",
    "BaseModel",
    "bf16_is_faster",
    "device_name",
    "embedded_model_dir",
    "fingerprint",
    "linear_dims",
    "load_base_model",
    "resolve_bf16",
    "resolve_target_modules",
]
