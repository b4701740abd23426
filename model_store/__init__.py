"""Model registry, resolution of names/directories/hub ids, and preparation of the embedded default."""

from model_store.prepare import prepare_default
from model_store.registry import REGISTRY, ModelSpec, ResolvedModel, resolve, verify_model_dir

__all__ = ["REGISTRY", "ModelSpec", "ResolvedModel", "prepare_default", "resolve", "verify_model_dir"]
