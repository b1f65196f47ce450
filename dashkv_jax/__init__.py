"""DASH-KV in JAX: long-context decoding through learned asymmetric hashing of the KV cache."""

from dashkv_jax.config import ModelConfig
from dashkv_jax.errors import DashKVError
from dashkv_jax.loaders import DEFAULT_MODEL, load_model
from dashkv_jax.model import Llama

__all__ = ["DEFAULT_MODEL", "DashKVError", "Llama", "ModelConfig", "load_model"]
