"""DASH-KV in JAX: long-context decoding through learned asymmetric hashing of the KV cache."""

from dashkv_jax.errors import DashKVError
from dashkv_jax.models.config import ModelConfig
from dashkv_jax.models.llama import Llama
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "DashKVError", "Llama", "ModelConfig", "load_model"]
