"""Decode-mode perplexity: every position of a text attends through an attention method.

Teacher-forced in one pass (`SparseAttention(teacher_forced=True)`), which computes exactly what
token-by-token decoding would (tests/test_sparse.py checks it), at the cost of one prefill.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.sparse import SparseAttention
from dashkv_jax.models.causal import Attention
from dashkv_jax.models.llama import Llama, prefill


def decode_perplexity(model: Llama, ids: np.ndarray, attention: Attention | None = None) -> dict:
    """ids [T] int32 -> {"perplexity", "nll", "tokens", "mean_attended"} under `attention`.

    `mean_attended` is the mean tokens attended per KV head over positions and sparse layers,
    where the method records it (hashed methods, whose cut is adaptive), else None.
    """
    attention = attention or FullAttention()
    if isinstance(attention, SparseAttention):
        attention = dataclasses.replace(attention, teacher_forced=True)
    ids = jnp.asarray(ids, jnp.int32)[None]
    cache = model.init_cache(1, ids.shape[1], attention)
    logits, cache = prefill(model, ids, cache, attention, all_logits=True)
    logprobs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    nll = float(-jnp.take_along_axis(logprobs, ids[0, 1:, None], axis=-1).mean())
    attended = getattr(cache, "attended", None)
    if attended is not None:
        dense = getattr(attention, "dense_layers", 0)
        attended = float(attended[dense:].mean())
    return {
        "perplexity": float(np.exp(nll)),
        "nll": nll,
        "tokens": int(ids.shape[1]),
        "mean_attended": attended,
    }
