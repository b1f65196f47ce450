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

from dashkv_jax.attention.full import (
    FullAttention,
    KVCache,
    attend_all,
    backend,
    write_prefill,
    write_token,
)
from dashkv_jax.models.causal import causal_attention

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


def gather_rows(x: Array, indices: Array) -> Array:
    """x [B, Hkv, S, D], indices [B, Hkv, K] -> [B, Hkv, K, D]."""
    return jnp.take_along_axis(x, indices[..., None], axis=2)


@backend
class SparseAttention(FullAttention):
    """Base of the token-budget methods; subclasses implement `select`.

    `teacher_forced=True` makes prefill attend through the method too, every prompt position as
    if it were being decoded with the prompt before it in the cache: decode-mode evaluation of a
    whole text in one pass instead of one step per token.
    """

    budget: int = struct.field(pytree_node=False, default=256)
    sinks: int = struct.field(pytree_node=False, default=4)
    window: int = struct.field(pytree_node=False, default=64)
    dense_layers: int = struct.field(pytree_node=False, default=2)
    teacher_forced: bool = struct.field(pytree_node=False, default=False)
    query_chunk: int = struct.field(pytree_node=False, default=256)

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

    def select(self, cache: KVCache, layer: Array, q: Array, pos: Array, lo: Array, hi: Array):
        """Pick middle tokens for queries q [B, Hkv, G, D] at positions pos [B].

        Returns (indices [B, Hkv, selected] int32, valid [B, Hkv, selected] bool). Must only
        look at cache slots <= pos, so teacher-forced evaluation sees no future token.
        """
        raise NotImplementedError

    def prefill(self, cache, layer, q, k, v):
        cache = write_prefill(cache, layer, k, v)
        if not self.teacher_forced:
            return causal_attention(q, k, v), cache
        b, t = q.shape[:2]
        full = jnp.broadcast_to(jnp.arange(1, t + 1, dtype=jnp.float32).mean(), (b, k.shape[2]))
        out, attended = jax.lax.cond(
            layer < self.dense_layers,
            lambda: (causal_attention(q, k, v), full),
            lambda: self._attend_every_position(cache, layer, q),
        )
        return out, self.record(cache, layer, attended)

    def decode(self, cache, layer, q, k, v):
        cache = write_token(cache, layer, k, v)
        b, _, hq, d = q.shape
        qg = q.reshape(b, cache.k.shape[2], -1, d)
        everything = jnp.broadcast_to(cache.lengths[:, None] + 1.0, qg.shape[:2])
        out, attended = jax.lax.cond(
            layer < self.dense_layers,
            lambda: (attend_all(cache, layer, q), everything),
            lambda: self._decode_critical(cache, layer, qg),
        )
        return out, self.record(cache, layer, attended)

    def _decode_critical(self, cache, layer, qg):
        out, attended = self.attend_critical(cache, layer, qg, cache.lengths)
        return out.reshape(qg.shape[0], 1, -1, qg.shape[-1]), attended.astype(jnp.float32)

    def record(self, cache, layer: Array, attended: Array):
        """Keep tokens attended per KV head [B, Hkv] where the cache has room (see hashed.py)."""
        return cache

    def attend_critical(self, cache: KVCache, layer: Array, q: Array, pos: Array):
        """Exact attention over sinks + window + selected middle; q [B, Hkv, G, D] at pos [B].

        Returns (out [B, Hkv, G, D], tokens attended per KV head [B, Hkv] int32).
        """
        d = q.shape[-1]
        lo, hi = middle_bounds(pos, self.sinks, self.window)
        middle, middle_ok = self.select(cache, layer, q, pos, lo, hi)
        indices, ok = self.critical_set(middle, middle_ok, pos, hi)
        keys = gather_rows(cache.k[layer], indices)  # [B, Hkv, budget, D]
        values = gather_rows(cache.v[layer], indices)
        logits = jnp.einsum("bhgd,bhkd->bhgk", q, keys, preferred_element_type=jnp.float32)
        logits = jnp.where(ok[:, :, None, :], logits * d**-0.5, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        return jnp.einsum("bhgk,bhkd->bhgd", weights, values), ok.sum(-1, dtype=jnp.int32)

    def critical_set(self, middle: Array, middle_ok: Array, pos: Array, hi: Array):
        """Sinks + window + the selected middle [B, Hkv, selected], for new tokens at pos [B].

        Returns (indices, ok) [B, Hkv, S + R + selected]; indices are 0 where not ok.
        """
        b, hkv = middle.shape[:2]
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
        return jnp.where(ok, indices, 0), ok

    def _attend_every_position(self, cache: KVCache, layer: Array, q: Array):
        """Each prompt position t attends through the method to slots <= t; q [B,T,Hq,D].

        Returns (out [B, T, Hq, D], mean tokens attended per KV head over positions [B, Hkv]).
        """
        b, t, hq, d = q.shape
        hkv = cache.k.shape[2]
        chunk = min(self.query_chunk, t)
        padded = -(-t // chunk) * chunk
        qg = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0), (0, 0))).reshape(b, padded, hkv, -1, d)
        positions = jnp.minimum(jnp.arange(padded), t - 1)
        one_query = jax.vmap(self.attend_critical, in_axes=(None, None, 1, 0), out_axes=1)

        def chunk_out(start):
            q_chunk = jax.lax.dynamic_slice_in_dim(qg, start, chunk, axis=1)
            pos = jax.lax.dynamic_slice_in_dim(positions, start, chunk)
            return one_query(cache, layer, q_chunk, jnp.broadcast_to(pos[:, None], (chunk, b)))

        out, attended = jax.lax.map(chunk_out, jnp.arange(0, padded, chunk))
        out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, padded, hq, d)  # from [n, B, c, ...]
        attended = attended.transpose(1, 0, 2, 3).reshape(b, padded, hkv)[:, :t]
        return out[:, :t], attended.astype(jnp.float32).mean(axis=1)


@backend
class OracleAttention(SparseAttention):
    """Exact top-k by the group's attention mass: the ceiling any selection can reach."""

    def select(self, cache, layer, q, pos, lo, hi):
        visible = jnp.arange(cache.max_len)[None, :] <= pos[:, None]
        mass = group_attention_mass(q, cache.k[layer], visible)
        return topk_in_middle(mass, lo, hi, self.selected)


@backend
class StreamingAttention(SparseAttention):
    """StreamingLLM: sinks + the most recent tokens, the whole budget spent on recency."""

    def select(self, cache, layer, q, pos, lo, hi):
        b, hkv = q.shape[:2]
        recency = jnp.arange(cache.max_len, dtype=jnp.float32)
        return topk_in_middle(
            jnp.broadcast_to(recency, (b, hkv, cache.max_len)), lo, hi, self.selected
        )


def page_bound(q: Array, upper: Array, lower: Array) -> Array:
    """Quest's upper bound of q.k over each page, for the best query head of a KV group.

    q [..., G, D] and the per-dimension key max / min of each page [..., P, D] -> [..., P].
    """
    q = q[..., :, None, :]  # [..., G, 1, D]
    bound = jnp.maximum(q * upper[..., None, :, :], q * lower[..., None, :, :])
    return bound.sum(axis=-1).max(axis=-2)


@backend
class QuestAttention(SparseAttention):
    """Quest: pages of keys ranked by an upper bound of q.k from their per-dimension min/max.

    Candidate pages are those overlapping the middle; they lie wholly before the window
    (window >= page size), so every one is fully written and its bounds see no future token.
    """

    page_size: int = struct.field(pytree_node=False, default=16)

    def __post_init__(self):
        SparseAttention.__post_init__(self)
        if self.window < self.page_size:
            raise ValueError(
                f"Quest needs window >= page size, got {self.window=}, {self.page_size=}"
            )

    def select(self, cache, layer, q, pos, lo, hi):
        keys = cache.k[layer]  # [B, Hkv, S, D]
        b, hkv, s, d = keys.shape
        pages = s // self.page_size
        paged = keys[:, :, : pages * self.page_size].reshape(b, hkv, pages, self.page_size, d)
        bound = page_bound(q, paged.max(axis=3), paged.min(axis=3))  # [B, Hkv, P]
        starts = jnp.arange(pages) * self.page_size
        candidate = (starts < hi[:, None]) & (starts + self.page_size > lo[:, None])  # [B, P]
        bound = jnp.where(candidate[:, None], bound, -jnp.inf)
        _, top_pages = jax.lax.top_k(bound, min(pages, -(-self.selected // self.page_size)))
        token_idx = top_pages[..., None] * self.page_size + jnp.arange(self.page_size)
        token_idx = token_idx.reshape(b, hkv, -1)[..., : self.selected].astype(jnp.int32)
        valid = (token_idx >= lo[:, None, None]) & (token_idx < hi[:, None, None])
        return jnp.where(valid, token_idx, 0), valid
