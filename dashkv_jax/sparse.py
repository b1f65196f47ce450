"""Sparse decode attention over a critical set: sinks + recent window + selected middle tokens.

Every token-budget method (oracle top-k, StreamingLLM, Quest, and DASH-KV's hashed selection)
differs only in how it picks the middle tokens; this module owns the rest. Prefill stays exact
(it writes the cache); decoding attends, per KV head, to

    sinks   [0, S)                  always kept
    middle  [S, pos - R + 1)        `select` picks at most `budget - S - R` of these
    window  [pos - R + 1, pos]      always kept (the newest token included)

with one exact softmax over the union. One selection per KV head, shared by its G query heads
(GQA), so only the chosen K/V rows are read. The first `dense_layers` layers stay exact.
"""

import jax
import jax.numpy as jnp
from flax import struct

from dashkv_jax.attention import FullAttention, KVCache, attend_all, write_token

Array = jax.Array


def middle_bounds(lengths: Array, sinks: int, window: int) -> tuple[Array, Array]:
    """[lo, hi) of the selectable middle per row, for a new token at position `lengths`."""
    hi = jnp.maximum(lengths - window + 1, sinks)
    return jnp.full_like(lengths, sinks), hi


def group_attention_mass(q: Array, keys: Array, visible: Array) -> Array:
    """Exact attention probability summed over each KV head's query heads.

    q [B, Hkv, G, D], keys [B, Hkv, S, D], visible [B, S] -> [B, Hkv, S] (0 where not visible).
    """
    logits = jnp.einsum("bhgd,bhsd->bhgs", q, keys, preferred_element_type=jnp.float32)
    logits = jnp.where(visible[:, None, None, :], logits * q.shape[-1] ** -0.5, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).sum(axis=2)


def topk_in_middle(scores: Array, lo: Array, hi: Array, k: int) -> tuple[Array, Array]:
    """Top-k slots of scores [B, Hkv, S] inside [lo, hi) per row -> (indices, valid) [B, Hkv, k]."""
    slots = jnp.arange(scores.shape[-1])
    inside = (slots >= lo[:, None]) & (slots < hi[:, None])  # [B, S]
    masked = jnp.where(inside[:, None, :], scores, -jnp.inf)
    values, indices = jax.lax.top_k(masked, k)
    return indices.astype(jnp.int32), values > -jnp.inf


def _gather_rows(x: Array, indices: Array) -> Array:
    """x [B, Hkv, S, D], indices [B, Hkv, K] -> [B, Hkv, K, D]."""
    return jnp.take_along_axis(x, indices[..., None], axis=2)


@struct.dataclass
class SparseAttention(FullAttention):
    """Base of the token-budget methods; subclasses implement `select`."""

    budget: int = struct.field(pytree_node=False, default=256)
    sinks: int = struct.field(pytree_node=False, default=4)
    window: int = struct.field(pytree_node=False, default=64)
    dense_layers: int = struct.field(pytree_node=False, default=2)

    def __post_init__(self):
        if self.budget <= self.sinks + self.window:
            raise ValueError(
                f"budget {self.budget} leaves no room to select beyond {self.sinks} sinks + "
                f"{self.window} window tokens"
            )

    @property
    def selected(self) -> int:
        """Middle tokens chosen per KV head and step."""
        return self.budget - self.sinks - self.window

    def select(self, cache: KVCache, layer: Array, q: Array, lo: Array, hi: Array):
        """q [B, Hkv, G, D] -> (indices [B, Hkv, selected] int32, valid [B, Hkv, selected])."""
        raise NotImplementedError

    def decode(self, cache, layer, q, k, v):
        cache = write_token(cache, layer, k, v)
        return jax.lax.cond(
            layer < self.dense_layers,
            lambda: attend_all(cache, layer, q),
            lambda: self._sparse_decode(cache, layer, q),
        ), cache

    def _sparse_decode(self, cache: KVCache, layer: Array, q: Array) -> Array:
        b, _, hq, d = q.shape
        hkv = cache.k.shape[2]
        qg = q.reshape(b, hkv, hq // hkv, d)
        pos = cache.lengths  # the new token's position, already written
        lo, hi = middle_bounds(pos, self.sinks, self.window)
        middle, middle_ok = self.select(cache, layer, qg, lo, hi)
        sink_idx = jnp.broadcast_to(jnp.arange(self.sinks), (b, self.sinks))
        window_idx = pos[:, None] - self.window + 1 + jnp.arange(self.window)  # [B, R]
        fixed = jnp.concatenate([sink_idx, window_idx], axis=1)  # [B, S + R]
        # Window slots start at hi >= S, so no token is counted twice.
        fixed_ok = jnp.concatenate(
            [sink_idx <= pos[:, None], (window_idx >= hi[:, None]) & (window_idx <= pos[:, None])],
            axis=1,
        )
        per_head = (b, hkv, fixed.shape[1])
        indices = jnp.concatenate([jnp.broadcast_to(fixed[:, None], per_head), middle], axis=2)
        ok = jnp.concatenate([jnp.broadcast_to(fixed_ok[:, None], per_head), middle_ok], axis=2)
        indices = jnp.where(ok, indices, 0)
        keys = _gather_rows(cache.k[layer], indices)  # [B, Hkv, budget, D]
        values = _gather_rows(cache.v[layer], indices)
        logits = jnp.einsum("bhgd,bhkd->bhgk", qg, keys, preferred_element_type=jnp.float32)
        logits = jnp.where(ok[:, :, None, :], logits * d**-0.5, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        out = jnp.einsum("bhgk,bhkd->bhgd", weights, values)
        return out.reshape(b, 1, hq, d)


@struct.dataclass
class OracleAttention(SparseAttention):
    """Exact top-k by the group's attention mass: the ceiling any selection can reach."""

    def select(self, cache, layer, q, lo, hi):
        visible = jnp.arange(cache.max_len)[None, :] <= cache.lengths[:, None]
        mass = group_attention_mass(q, cache.k[layer], visible)
        return topk_in_middle(mass, lo, hi, self.selected)


@struct.dataclass
class StreamingAttention(SparseAttention):
    """StreamingLLM: sinks + the most recent tokens, the whole budget spent on recency."""

    def select(self, cache, layer, q, lo, hi):
        b, hkv = q.shape[:2]
        recency = jnp.broadcast_to(
            jnp.arange(cache.max_len, dtype=jnp.float32), (b, hkv, cache.max_len)
        )
        return topk_in_middle(recency, lo, hi, self.selected)


@struct.dataclass
class QuestAttention(SparseAttention):
    """Quest: an upper bound of q.k per page of keys from its per-dimension min and max."""

    page_size: int = struct.field(pytree_node=False, default=16)

    def select(self, cache, layer, q, lo, hi):
        keys = cache.k[layer]  # [B, Hkv, S, D]
        b, hkv, s, d = keys.shape
        pages = -(-s // self.page_size)
        slots = jnp.arange(pages * self.page_size)
        inside = (slots >= lo[:, None]) & (slots < hi[:, None])  # [B, P * page]
        padded = jnp.pad(keys, ((0, 0), (0, 0), (0, pages * self.page_size - s), (0, 0)))
        paged = padded.reshape(b, hkv, pages, self.page_size, d)
        in_page = inside.reshape(b, 1, pages, self.page_size, 1)
        k_max = jnp.where(in_page, paged, -jnp.inf).max(axis=3)  # [B, Hkv, P, D]
        k_min = jnp.where(in_page, paged, jnp.inf).min(axis=3)
        bound = jnp.maximum(
            q[:, :, :, None] * k_max[:, :, None], q[:, :, :, None] * k_min[:, :, None]
        )
        bound = jnp.where(jnp.isfinite(bound), bound, 0.0).sum(axis=-1).max(axis=2)  # [B, Hkv, P]
        has_tokens = inside.reshape(b, pages, self.page_size).any(-1)
        bound = jnp.where(has_tokens[:, None], bound, -jnp.inf)
        n_pages = -(-self.selected // self.page_size)
        _, top_pages = jax.lax.top_k(bound, n_pages)  # [B, Hkv, n_pages]
        token_idx = top_pages[..., None] * self.page_size + jnp.arange(self.page_size)
        token_idx = token_idx.reshape(b, hkv, -1)[..., : self.selected].astype(jnp.int32)
        valid = (token_idx >= lo[:, None, None]) & (token_idx < hi[:, None, None])
        return jnp.where(valid, token_idx, 0), valid
