"""Sparse decode attention over a critical set: sinks + recent window + selected middle tokens.

Every token-budget method (oracle top-k, StreamingLLM, Quest, and DASH-KV's tiers in hashed.py)
differs only in how it picks the middle tokens; this module owns the rest. Prefill stays exact
(it writes the cache); decoding attends, per KV head, to

    sinks   [0, S)                  always kept
    middle  [S, pos - R + 1)        `select` picks at most `budget - S - R` of these
    window  [pos - R + 1, pos]      always kept (the newest token included)

with one exact softmax over the union. One selection per KV head, shared by its G query heads
(GQA), so only the chosen K/V rows are read. The first `dense_first` and last `dense_last`
layers stay exact (the sandwich).

Every method records what it used, per layer and KV head (`SparseCache.usage`: exact tokens,
whose K and V it read, and approximate ones, whose V alone it read), and says what that costs
in bytes (`step_bytes`): the unit methods are compared in.
"""

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels
from dashkv_jax.attention.full import (
    FullAttention,
    KVCache,
    attend_all,
    backend,
    write_prefill,
    write_token,
)
from dashkv_jax.hashing.encoders import SANDWICH
from dashkv_jax.models.causal import causal_attention

Array = jax.Array


@struct.dataclass
class SparseCache(KVCache):
    """The KV cache plus what the method used at the latest step (or, teacher-forced, the mean
    over the prompt's positions)."""

    usage: Array = None  # [layers, batch, kv_heads, 2] float32: exact and approximate tokens

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype=jnp.float32, **fields):
        base = KVCache.create(config, batch, max_len, dtype)
        usage = jnp.zeros((config.num_layers, batch, config.num_kv_heads, 2), jnp.float32)
        return cls(k=base.k, v=base.v, lengths=base.lengths, usage=usage, **fields)


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


def fixed_slots(pos: Array, hi: Array, sinks: int, window: int) -> tuple[Array, Array]:
    """Sinks and window of new tokens at pos [B] -> (slots, ok) [B, S + R]; slots 0 where not ok.

    Window slots start at hi >= S, so no token is counted twice."""
    b = pos.shape[0]
    sink_idx = jnp.broadcast_to(jnp.arange(sinks), (b, sinks))
    window_idx = pos[:, None] - window + 1 + jnp.arange(window)  # [B, R]
    slots = jnp.concatenate([sink_idx, window_idx], axis=1)
    ok = jnp.concatenate(
        [sink_idx <= pos[:, None], (window_idx >= hi[:, None]) & (window_idx <= pos[:, None])],
        axis=1,
    )
    return jnp.where(ok, slots, 0), ok


@backend
class SparseAttention(FullAttention):
    """Base of the token-budget methods; subclasses implement `select` (or `attend_critical`).

    `teacher_forced=True` makes prefill attend through the method too, every prompt position as
    if it were being decoded with the prompt before it in the cache: decode-mode evaluation of a
    whole text in one pass instead of one step per token.
    """

    budget: int = struct.field(pytree_node=False, default=256)
    sinks: int = struct.field(pytree_node=False, default=4)
    window: int = struct.field(pytree_node=False, default=64)
    dense_first: int = struct.field(pytree_node=False, default=SANDWICH[0])
    dense_last: int = struct.field(pytree_node=False, default=SANDWICH[1])
    teacher_forced: bool = struct.field(pytree_node=False, default=False)
    query_chunk: int = struct.field(pytree_node=False, default=256)

    def __post_init__(self):
        if self.budget <= self.sinks + self.window:
            raise ValueError(
                f"budget {self.budget} leaves no room to select beyond {self.sinks} sinks + "
                f"{self.window} window tokens"
            )
        if min(self.dense_first, self.dense_last) < 0:
            raise ValueError(f"dense layers must be >= 0: {self.dense_first=} {self.dense_last=}")

    @property
    def selected(self) -> int:
        """Middle tokens chosen per KV head and step."""
        return self.budget - self.sinks - self.window

    def init_cache(self, config, batch, max_len, dtype=jnp.float32) -> SparseCache:
        return SparseCache.create(config, batch, max_len, dtype)

    def adopt(self, cache: KVCache) -> SparseCache:
        usage = jnp.zeros((*cache.k.shape[:3], 2), jnp.float32)
        return SparseCache(k=cache.k, v=cache.v, lengths=cache.lengths, usage=usage)

    def is_dense(self, layer: Array, num_layers: int) -> Array:
        """Whether `layer` is one of the sandwich's exact layers."""
        return (layer < self.dense_first) | (layer >= num_layers - self.dense_last)

    # -- the model's calls -------------------------------------------------------------------

    def prefill(self, cache, layer, q, k, v):
        cache = write_prefill(cache, layer, k, v)
        if not self.teacher_forced:
            return causal_attention(q, k, v), cache
        b, t = q.shape[:2]
        mean_visible = jnp.arange(1, t + 1, dtype=jnp.float32).mean()
        everything = jnp.zeros((b, k.shape[2], 2)).at[..., 0].set(mean_visible)
        state = self.position_state(cache, t)
        out, usage, state = jax.lax.cond(
            self.is_dense(layer, cache.k.shape[0]),
            lambda: (causal_attention(q, k, v), everything, state),
            lambda: self._attend_every_position(cache, layer, q, state),
        )
        return out, self.with_position_state(self._record(cache, layer, usage), state)

    def prefill_chunk(self, cache, layer, q, k, v, start):
        if self.teacher_forced:  # every position attends through the method: one pass
            raise ValueError("a teacher-forced prefill runs the whole text at once, not chunks")
        return FullAttention.prefill_chunk(self, cache, layer, q, k, v, start)

    def decode(self, cache, layer, q, k, v):
        cache = write_token(cache, layer, k, v)
        b, _, hq, d = q.shape
        qg = q.reshape(b, cache.k.shape[2], -1, d)
        everything = jnp.zeros((b, qg.shape[1], 2)).at[..., 0].set(cache.lengths[:, None] + 1.0)
        state = self.step_state(cache)

        def sparse():
            out, usage, new_state = self.attend_critical(cache, layer, qg, cache.lengths, state)
            return out.reshape(b, 1, hq, d), usage, new_state

        out, usage, state = jax.lax.cond(
            self.is_dense(layer, cache.k.shape[0]),
            lambda: (attend_all(cache, layer, q, self.chunk), everything, state),
            sparse,
        )
        return out, self.with_step_state(self._record(cache, layer, usage), state)

    def _record(self, cache, layer, usage):
        return cache.replace(usage=cache.usage.at[layer].set(usage.astype(jnp.float32)))

    # -- state a method carries from layer to layer (none here; DASH-KV's momentum) ------------

    def step_state(self, cache):
        """What `attend_critical` receives from the previous layer at a decode step."""
        return None

    def with_step_state(self, cache, state):
        return cache

    def position_state(self, cache, t: int):
        """The same for each of `t` prompt positions at once (teacher-forced): [B, T, ...]."""
        return None

    def with_position_state(self, cache, state):
        return cache

    # -- attention over the critical set -----------------------------------------------------

    def select(self, cache: KVCache, layer: Array, q: Array, pos: Array, lo: Array, hi: Array):
        """Pick middle tokens for queries q [B, Hkv, G, D] at positions pos [B].

        Returns (indices [B, Hkv, selected] int32, valid [B, Hkv, selected] bool). Must only
        look at cache slots <= pos, so teacher-forced evaluation sees no future token.
        """
        raise NotImplementedError

    def attend_critical(self, cache: KVCache, layer: Array, q: Array, pos: Array, state=None):
        """Attention over sinks + window + selected middle; q [B, Hkv, G, D] at pos [B].

        Returns (out [B, Hkv, G, D], usage [B, Hkv, 2] (exact, approximate tokens), state).
        The V rows are read by index (`pallas_kernels.gathered_attention`), no gathered copy.
        """
        slots, logits, usage = self.critical_logits(cache, layer, q, pos, state)
        out, lse = pallas_kernels.gathered_attention(logits, cache.v, slots, layer=layer)
        weights = jnp.exp(logits - lse[..., None])  # used only by a method that carries state
        return out.astype(q.dtype), usage, self.next_state(slots, weights, state)

    def distribution(self, cache: KVCache, layer: Array, q: Array, pos: Array, state=None):
        """The attention distribution the method uses for q [B, Hkv, G, D] at pos [B].

        Returns (slots [B, Hkv, M] int32, 0 where unused; weights [B, Hkv, G, M] float32, 0
        where unused; usage [B, Hkv, 2] float32: exact and approximate tokens; state for the
        next layer). The first S + R slots are the sinks and the window; tier 1 (the selected
        middle) follows; a method with a tier 2 puts it last.
        """
        slots, logits, usage = self.critical_logits(cache, layer, q, pos, state)
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.maximum(slots, 0), weights, usage, self.next_state(slots, weights, state)

    def critical_logits(self, cache: KVCache, layer: Array, q: Array, pos: Array, state):
        """The tokens a step attends to and their logits, for q [B, Hkv, G, D] at pos [B].

        Returns (slots [B, Hkv, M] int32, -1 where unused; logits [B, Hkv, G, M] float32, -inf
        where unused; usage [B, Hkv, 2] float32), in the order `distribution` documents. The K
        rows are read by index (`pallas_kernels.gathered_logits`).
        """
        lo, hi = middle_bounds(pos, self.sinks, self.window)
        middle, middle_ok = self.select(cache, layer, q, pos, lo, hi)
        slots, ok = self.critical_set(middle, middle_ok, pos, hi)
        slots = jnp.where(ok, slots, -1)
        logits = pallas_kernels.gathered_logits(
            q, cache.k, slots, scale=q.shape[-1] ** -0.5, layer=layer
        )
        usage = jnp.stack([ok.sum(-1), jnp.zeros(ok.shape[:2], jnp.int32)], axis=-1)
        return slots, logits, usage.astype(jnp.float32)

    def next_state(self, slots: Array, weights: Array, state):
        """The state the next layer receives, from this layer's attention (none here)."""
        return state

    def critical_set(self, middle: Array, middle_ok: Array, pos: Array, hi: Array):
        """Sinks + window + the selected middle [B, Hkv, selected], for new tokens at pos [B].

        Returns (indices, ok) [B, Hkv, S + R + selected]; indices are 0 where not ok.
        """
        b, hkv = middle.shape[:2]
        fixed, fixed_ok = fixed_slots(pos, hi, self.sinks, self.window)
        per_head = (b, hkv, fixed.shape[1])
        indices = jnp.concatenate([jnp.broadcast_to(fixed[:, None], per_head), middle], axis=2)
        ok = jnp.concatenate([jnp.broadcast_to(fixed_ok[:, None], per_head), middle_ok], axis=2)
        return jnp.where(ok, indices, 0), ok

    def _attend_every_position(self, cache: KVCache, layer: Array, q: Array, state):
        """Each prompt position t attends through the method to slots <= t; q [B,T,Hq,D].

        Returns (out [B, T, Hq, D], mean usage per KV head over positions [B, Hkv, 2], state).
        """
        b, t, hq, d = q.shape
        hkv = cache.k.shape[2]
        chunk = min(self.query_chunk, t)
        padded = -(-t // chunk) * chunk
        qg = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0), (0, 0))).reshape(b, padded, hkv, -1, d)
        positions = jnp.minimum(jnp.arange(padded), t - 1)
        pad_state = jax.tree.map(
            lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2)), state
        )
        one_query = jax.vmap(
            self.attend_critical, in_axes=(None, None, 1, 0, 1), out_axes=(1, 1, 1)
        )

        def chunk_out(start):
            q_chunk = jax.lax.dynamic_slice_in_dim(qg, start, chunk, axis=1)
            pos = jax.lax.dynamic_slice_in_dim(positions, start, chunk)
            s = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, 1), pad_state)
            return one_query(cache, layer, q_chunk, jnp.broadcast_to(pos[:, None], (chunk, b)), s)

        out, usage, state = jax.lax.map(chunk_out, jnp.arange(0, padded, chunk))

        def unchunk(x):  # [n, B, chunk, ...] -> [B, T, ...]
            x = jnp.moveaxis(x, 0, 1)
            return x.reshape(b, padded, *x.shape[3:])[:, :t]

        out, usage, state = unchunk(out), unchunk(usage), jax.tree.map(unchunk, state)
        return out.reshape(b, t, hq, d), usage.mean(axis=1), state


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

    def step_bytes(self, exact, approx, n_tokens, head_dim: int, itemsize: int):
        """K and V of the chosen pages, and every page's per-dimension min and max."""
        pages = n_tokens / self.page_size
        return (exact + pages) * 2 * head_dim * itemsize

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
