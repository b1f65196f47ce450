"""The models' own attention: exact causal attention for a whole sequence (the no-cache forward
and every backend's exact prefill), and the `Attention` protocol a model calls per layer.

The model computes post-RoPE q, k, v and hands them to a backend from `dashkv_jax.attention`;
the backend writes its cache and returns the attention output, so swapping backends (full,
DASH-KV, a baseline) never touches the model, and this folder never imports that one.
"""

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from dashkv_jax.models.config import ModelConfig

Array = jax.Array


class Attention(Protocol):
    """What a model needs from an attention backend (`dashkv_jax.attention`)."""

    def init_cache(self, config: ModelConfig, batch: int, max_len: int, dtype) -> Any: ...

    def prefill(self, cache, layer: Array, q: Array, k: Array, v: Array) -> tuple[Array, Any]:
        """Causal attention over a whole prompt written from position 0; q [B,T,Hq,D]."""

    def decode(self, cache, layer: Array, q: Array, k: Array, v: Array) -> tuple[Array, Any]:
        """One new token per row at position `cache.lengths`; q [B,1,Hq,D], k/v [B,1,Hkv,D]."""

    def adopt(self, cache) -> Any:
        """This backend's cache for a prompt that exact prefill wrote into `cache` (a
        `KVCache`): what its own prefill would have left (every backend's prefill is exact),
        so methods can share one."""


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Exact causal GQA attention within one sequence, fp32 softmax.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits * d**-0.5, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgts,bshd->bthgd", weights, v)
    return out.reshape(b, t, hq, d)
