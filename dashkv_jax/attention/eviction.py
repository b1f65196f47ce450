"""The paper's eviction baselines: a KV cache of fixed size whose tokens, once evicted, are gone.

Unlike the budget methods of `sparse.py`, which keep every token and choose some at each step,
these hold only `budget` tokens per layer and KV head (`EvictionCache`: `budget` K/V slots, a
slot map of the position each slot holds, the method's per-slot metadata), so they save memory
as well as reads. Keys are cached after RoPE, so a slot's position is bookkeeping alone.

- `H2OAttention` (Heavy-Hitter Oracle, Zhang et al. 2023): the heavy hitters by accumulated
  attention plus the recent tokens. Prefill keeps the prompt tokens that received the most
  attention from the prompt's queries; each decode step the new token takes the slot of the
  token with the lowest accumulated attention, and its query's attention accumulates.
- `SnapKVAttention` (Li et al. 2024): the prompt's last `observe` queries vote (their attention,
  pooled over neighbouring positions) for the prompt tokens to keep; decoding appends, so its
  cache has `budget` slots for the prompt plus `room` for generated tokens.
- `HashEvictAttention` (Liu et al. 2024, the seed's LSH eviction): SimHash codes of the keys;
  every token from the first that finds the cache full (prompt included) takes the slot of the
  cached token whose code is farthest, in Hamming distance summed over the KV group's query
  heads, from its own query's code: the least likely to be attended. Decided before attention.

As for the other budget methods, the first `sinks` tokens and the recent `window` (the new
token's position and the `window - 1` before it) are never evicted, and the sandwich's
`dense_first` and `dense_last` layers keep a full cache (`EvictionCache.dense_k`) and attend
exactly. Prefill attends exactly (every backend's does) and then compresses what it keeps.

Each step attends exactly over the tokens its cache holds: `usage` records them (exact tokens;
approximate 0) and `step_bytes` prices them, K and V plus the per-token metadata the eviction
reads (H2O's accumulated score, HashEvict's code). `EvictionCache.cache_bytes` is what the
cache holds, beside `full_cache_bytes`, a full cache of the same context.

`adopt` cannot be exact: each method chooses the prompt tokens it keeps from the prompt's
queries, which an exact prefill's `KVCache` does not hold, so it raises `CannotAdopt` and a
caller runs the method's own prefill (`generate.generate_each` does).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dashkv_jax.attention.full import FullAttention, KVCache, attend_all, backend
from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.encoders import SANDWICH, Hasher, HasherConfig, popcount, simhash
from dashkv_jax.models.causal import causal_attention

Array = jax.Array
# Logits per query block of `received_attention`: 32 MB of float32 whatever the prompt length.
RECEIVED_BLOCK_ELEMENTS = 1 << 23
# HashEvict's code length: the paper's projections are much shorter than head_dim; 32 bits is
# the shortest the packed codes allow.
HASHEVICT_BITS = 32


class CannotAdopt(DashKVError):
    """An eviction method cannot compress another backend's prefill: it needs the prompt's
    queries."""


@struct.dataclass
class EvictionCache:
    """A fixed-size KV cache per compressed layer and KV head, and a full one per dense layer."""

    k: Array  # [compressed_layers, batch, kv_heads, slots, head_dim]
    v: Array  # [compressed_layers, batch, kv_heads, slots, head_dim]
    positions: Array  # [compressed_layers, batch, kv_heads, slots] int32: -1 while empty
    lengths: Array  # [batch] int32: tokens seen so far (the next token's position)
    usage: Array  # [layers, batch, kv_heads, 2] float32: exact, approximate tokens of the step
    dense_k: Array | None = None  # [dense_layers, batch, kv_heads, context, head_dim]
    dense_v: Array | None = None  # [dense_layers, batch, kv_heads, context, head_dim]
    scores: Array | None = None  # [compressed_layers, batch, kv_heads, slots] float32 (H2O)
    codes: Array | None = None  # [compressed_layers, batch, kv_heads, slots, bits/32] uint32
    context: int = struct.field(pytree_node=False, default=0)  # positions it was made for

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds: K, V, slot map and metadata of the compressed layers, K and V
        of the dense ones."""
        arrays = [self.k, self.v, self.positions, self.scores, self.codes]
        arrays += [self.dense_k, self.dense_v]
        return sum(x.size * x.dtype.itemsize for x in arrays if x is not None)

    @property
    def full_cache_bytes(self) -> int:
        """Bytes of a full `KVCache` of the same context, layers, heads and dtype."""
        layers, batch, kv_heads = self.usage.shape[:3]
        per_layer = batch * kv_heads * self.context * self.k.shape[4] * self.k.dtype.itemsize
        return 2 * layers * per_layer


# -- selection helpers -------------------------------------------------------------------------


def received_attention(q: Array, k: Array, first_query: int = 0) -> Array:
    """Attention each prompt token receives from the queries at positions >= `first_query`.

    q [B, T, Hq, D], k [B, T, Hkv, D] -> [B, Hkv, T] float32: each query's causal softmax,
    summed over the queries and the query heads of each KV group. Blocks of queries keep the
    logits at O(block x T), never [T, T].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    n = t - first_query
    block = max(1, min(n, RECEIVED_BLOCK_ELEMENTS // (b * hq * t)))
    count = -(-n // block)
    queries = jnp.pad(q[:, first_query:], ((0, 0), (0, count * block - n), (0, 0), (0, 0)))
    queries = queries.reshape(b, count, block, hkv, hq // hkv, d).swapaxes(0, 1)
    query_pos = (first_query + jnp.arange(count * block)).reshape(count, block)
    key_pos = jnp.arange(t)

    def add_block(total, xs):
        qb, pos = xs  # [B, block, Hkv, G, D], [block]
        logits = jnp.einsum("bqhgd,bshd->bhgqs", qb, k, preferred_element_type=jnp.float32)
        visible = (key_pos[None, :] <= pos[:, None]) & (pos[:, None] < t)  # [block, T]
        weights = jax.nn.softmax(jnp.where(visible, logits * d**-0.5, -jnp.inf), axis=-1)
        # Padding rows see no key: their NaN softmax is dropped.
        return total + jnp.where(visible, weights, 0.0).sum(axis=(2, 3)), None

    total, _ = jax.lax.scan(add_block, jnp.zeros((b, hkv, t), jnp.float32), (queries, query_pos))
    return total


def keep_top(score: Array, keep: int, sinks: int, recent: int) -> Array:
    """The prompt positions a cache of `keep` tokens holds, by score [B, Hkv, T].

    All of them when T <= keep (then -1); else the sinks, the last `recent` and the top-scoring
    `keep - sinks - recent` of the middle (ties to the older token). -> [B, Hkv, keep] int32,
    ascending.
    """
    b, hkv, t = score.shape
    if t <= keep:
        slots = jnp.arange(keep, dtype=jnp.int32)
        return jnp.broadcast_to(jnp.where(slots < t, slots, -1), (b, hkv, keep))
    positions = jnp.arange(t)
    middle = (positions >= sinks) & (positions < t - recent)
    _, top = jax.lax.top_k(jnp.where(middle, score, -jnp.inf), keep - sinks - recent)
    fixed = jnp.concatenate([jnp.arange(sinks), jnp.arange(t - recent, t)]).astype(jnp.int32)
    kept = jnp.concatenate([jnp.broadcast_to(fixed, (b, hkv, fixed.size)), top], axis=-1)
    return jnp.sort(kept.astype(jnp.int32), axis=-1)


def lowest(score: Array, positions: Array, candidate: Array) -> Array:
    """The slot of the lowest score among candidates, ties to the older token.

    score, positions, candidate [B, Hkv, S] -> [B, Hkv] int32.
    """
    masked = jnp.where(candidate, score, jnp.inf)
    tied = candidate & (masked == masked.min(axis=-1, keepdims=True))
    oldest = jnp.where(tied, positions, jnp.iinfo(jnp.int32).max)
    return jnp.argmin(oldest, axis=-1).astype(jnp.int32)


def group_distance(query_codes: Array, codes: Array) -> Array:
    """Hamming distance summed over a KV group's query heads.

    query_codes [B, Hkv, G, W], codes [B, Hkv, S, W] uint32 -> [B, Hkv, S] int32.
    """
    return popcount(query_codes[:, :, :, None, :] ^ codes[:, :, None, :, :]).sum(axis=(2, 4))


def _write_layer(x: Array, i: Array, value: Array) -> Array:
    """x [N, ...] with `value` written at the start of x[i]; unchanged where i >= N. (A
    dynamic_update_slice stays in place; a dropped scatter of a slice copies all of x.)"""
    last = x.shape[0] - 1
    start = (jnp.minimum(i, last),) + (0,) * (x.ndim - 1)
    old = jax.lax.dynamic_slice(x, start, (1, *value.shape))[0]
    new = jnp.where(i <= last, value.astype(x.dtype), old)
    return jax.lax.dynamic_update_slice(x, new[None], start)


def _gather_slots(x: Array, keep: Array) -> Array:
    """x [B, Hkv, T, ...] at positions keep [B, Hkv, S] (-1: zeros) -> [B, Hkv, S, ...]."""
    shape = (*keep.shape, *(1,) * (x.ndim - 3))
    rows = jnp.take_along_axis(x, jnp.maximum(keep, 0).reshape(shape), axis=2)
    return jnp.where(keep.reshape(shape) >= 0, rows, 0)


# -- the base ------------------------------------------------------------------------------------


@backend
class EvictionAttention(FullAttention):
    """Base of the eviction methods; subclasses choose what the prompt keeps (`keep_prompt`),
    which cached token a new one replaces (`victim`) and what a step remembers (`remember`)."""

    budget: int = struct.field(pytree_node=False, default=256)
    sinks: int = struct.field(pytree_node=False, default=4)
    window: int = struct.field(pytree_node=False, default=64)
    dense_first: int = struct.field(pytree_node=False, default=SANDWICH[0])
    dense_last: int = struct.field(pytree_node=False, default=SANDWICH[1])

    def __post_init__(self):
        if min(self.sinks, self.window) < 0:
            raise ValueError(f"sinks and window must be >= 0: {self.sinks=} {self.window=}")
        if self.budget <= self.sinks + self.window:
            raise ValueError(
                f"budget {self.budget} leaves no room to evict beyond {self.sinks} sinks + "
                f"{self.window} window tokens"
            )
        if min(self.dense_first, self.dense_last) < 0:
            raise ValueError(f"dense layers must be >= 0: {self.dense_first=} {self.dense_last=}")

    # -- sizes and layout --------------------------------------------------------------------

    def slots(self, max_len: int) -> int:
        """K/V slots per compressed layer and KV head for a cache of `max_len` positions."""
        return min(max_len, self.budget)

    def appending(self, tokens: int) -> "EvictionAttention":
        """This method with room to append `tokens` generated tokens (only SnapKV appends)."""
        return self

    def is_dense(self, layer, num_layers: int):
        """Whether `layer` is one of the sandwich's exact layers."""
        return (layer < self.dense_first) | (layer >= num_layers - self.dense_last)

    def layout(self, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """(dense [L] bool, index [L] int32): each layer's kind and its index among its kind."""
        dense = np.asarray(self.is_dense(np.arange(num_layers), num_layers))
        index = np.where(dense, np.cumsum(dense) - 1, np.cumsum(~dense) - 1)
        return dense, index.astype(np.int32)

    def metadata(self, shape: tuple[int, ...]) -> dict:
        """The method's per-slot arrays for slots of `shape` [layers, B, Hkv, S]."""
        return {}

    def init_cache(self, config, batch, max_len, dtype=jnp.float32) -> EvictionCache:
        dense, _ = self.layout(config.num_layers)
        n_dense = int(dense.sum())
        shape = (config.num_layers - n_dense, batch, config.num_kv_heads, self.slots(max_len))
        full = (n_dense, batch, config.num_kv_heads, max_len, config.head_dim)
        return EvictionCache(
            k=jnp.zeros((*shape, config.head_dim), dtype),
            v=jnp.zeros((*shape, config.head_dim), dtype),
            positions=jnp.full(shape, -1, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            usage=jnp.zeros((config.num_layers, batch, config.num_kv_heads, 2), jnp.float32),
            dense_k=jnp.zeros(full, dtype) if n_dense else None,
            dense_v=jnp.zeros(full, dtype) if n_dense else None,
            context=max_len,
            **self.metadata(shape),
        )

    def adopt(self, cache: KVCache):
        """Not exact, so refused: the prompt tokens this method keeps are chosen by the prompt's
        queries, which an exact prefill's `KVCache` does not hold. Run its own prefill."""
        raise CannotAdopt(
            f"{type(self).__name__} cannot compress a prefill made by another backend: it "
            "chooses the prompt tokens it keeps by the prompt's queries, which a KV cache does "
            "not hold; prefill with this backend instead"
        )

    def _indices(self, cache: EvictionCache, layer: Array):
        """(is_dense, index, dense_write, compressed_write) of a layer: index is its place
        among the layers of its kind; the writes index the other kind's arrays past their end,
        where writes do nothing (`_write_layer`, scatters with mode="drop"). Writes stay
        outside `lax.cond`: a cond that returns the cache copies all of it, every layer and
        step."""
        dense, index = self.layout(cache.usage.shape[0])
        is_dense, index = jnp.asarray(dense)[layer], jnp.asarray(index)[layer]
        n_dense, n_compressed = int(dense.sum()), int((~dense).sum())
        dense_write = jnp.where(is_dense, index, n_dense)
        return is_dense, index, dense_write, jnp.where(is_dense, n_compressed, index)

    def _by_kind(self, cache: EvictionCache, is_dense: Array, dense_fn, compressed_fn):
        """dense_fn() on the sandwich's layers, compressed_fn() on the others."""
        if cache.dense_k is None:
            return compressed_fn()
        if not cache.k.shape[0]:
            return dense_fn()
        return jax.lax.cond(is_dense, dense_fn, compressed_fn)

    # -- the model's calls -------------------------------------------------------------------

    def prefill_chunk(self, cache, layer, q, k, v, start):
        """Eviction chooses from the whole prompt's attention: no chunked prefill."""
        raise DashKVError(f"{type(self).__name__} prefills whole prompts, not chunks")

    def prefill(self, cache, layer, q, k, v):
        is_dense, index, dense_write, compressed_write = self._indices(cache, layer)
        k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
        if cache.dense_k is not None:
            cache = cache.replace(
                dense_k=_write_layer(cache.dense_k, dense_write, k_heads),
                dense_v=_write_layer(cache.dense_v, dense_write, v_heads),
            )

        def compressed():  # the layer's kept tokens, [B, Hkv, S, ...] each
            keep, extra = self.keep_prompt(layer, q, k, cache.slots)
            kept = {"k": _gather_slots(k_heads, keep), "v": _gather_slots(v_heads, keep)}
            return {**kept, "positions": keep, **extra}

        def dense():
            return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(compressed))

        if cache.k.shape[0]:
            kept = self._by_kind(cache, is_dense, dense, compressed)
            cache = cache.replace(**{
                name: _write_layer(getattr(cache, name), compressed_write, x)
                for name, x in kept.items()
            })  # fmt: skip
        return causal_attention(q, k, v), cache

    def decode(self, cache, layer, q, k, v):
        b, _, hq, d = q.shape
        hkv = k.shape[2]
        is_dense, index, dense_write, compressed_write = self._indices(cache, layer)
        rows, heads = jnp.arange(b)[:, None], jnp.arange(hkv)[None, :]
        pos = cache.lengths
        if cache.dense_k is not None:  # before attending: attend_all reads the new token's slot
            at = (dense_write, rows[:, 0], slice(None), pos)
            cache = cache.replace(
                dense_k=cache.dense_k.at[at].set(k[:, 0].astype(cache.k.dtype), mode="drop"),
                dense_v=cache.dense_v.at[at].set(v[:, 0].astype(cache.v.dtype), mode="drop"),
            )
        mass = (b, hkv, hq // hkv, cache.slots)

        def dense():
            full = KVCache(cache.dense_k, cache.dense_v, pos)
            usage = jnp.zeros((b, hkv, 2)).at[..., 0].set(pos[:, None] + 1.0)
            slot = jnp.zeros((b, hkv), jnp.int32)
            return attend_all(full, index, q, self.chunk), usage, slot, jnp.zeros(mass)

        def compressed():
            out, usage, slot, weights = self._attend_compressed(cache, layer, index, q, k, v)
            return out.reshape(b, 1, hq, d).astype(cache.v.dtype), usage, slot, weights

        out, usage, slot, weights = self._by_kind(cache, is_dense, dense, compressed)
        cache = cache.replace(usage=cache.usage.at[layer].set(usage))
        if cache.k.shape[0]:
            at = (compressed_write, rows, heads, slot)
            cache = cache.replace(
                k=cache.k.at[at].set(k[:, 0].astype(cache.k.dtype), mode="drop"),
                v=cache.v.at[at].set(v[:, 0].astype(cache.v.dtype), mode="drop"),
                positions=cache.positions.at[at].set(pos[:, None], mode="drop"),
            )
            cache = self.remember(cache, layer, compressed_write, slot, k, weights)
        return out.astype(q.dtype), cache

    def _attend_compressed(self, cache: EvictionCache, layer, i, q, k, v):
        """The new token's slot (an empty one, or the victim's) and one exact softmax over the
        slots with the new token in that slot, before it is written there.

        q [B, 1, Hq, D], k/v [B, 1, Hkv, D] -> (out [B, Hkv, G, D], usage [B, Hkv, 2],
        slot [B, Hkv] int32, weights by slot after the write [B, Hkv, G, S] float32).
        """
        b, _, hq, d = q.shape
        hkv = k.shape[2]
        qg = q[:, 0].reshape(b, hkv, hq // hkv, d)
        positions = cache.positions[i]  # [B, Hkv, S]
        empty = positions < 0
        pos = cache.lengths[:, None, None]
        candidate = (positions >= self.sinks) & (positions < pos - self.window + 1)
        victim = self.victim(cache, layer, i, qg, positions, candidate)  # [B, Hkv]
        slot = jnp.where(empty.any(-1), jnp.argmax(empty, axis=-1), victim).astype(jnp.int32)
        taken = jnp.arange(cache.slots) == slot[..., None]  # [B, Hkv, S]
        kept = ~empty & ~taken
        cached = jnp.einsum("bhgd,bhsd->bhgs", qg, cache.k[i], preferred_element_type=jnp.float32)
        new = jnp.einsum("bhgd,bhd->bhg", qg, k[:, 0], preferred_element_type=jnp.float32)
        logits = jnp.concatenate([cached, new[..., None]], axis=-1)  # [B, Hkv, G, S + 1]
        visible = jnp.concatenate([kept, jnp.ones((b, hkv, 1), bool)], axis=-1)
        weights = jax.nn.softmax(jnp.where(visible[:, :, None], logits * d**-0.5, -jnp.inf), -1)
        values = cache.v[i]
        out = jnp.einsum("bhgs,bhsd->bhgd", weights[..., :-1].astype(values.dtype), values)
        out = out + weights[..., -1:].astype(v.dtype) * v[:, 0, :, None, :]
        usage = jnp.stack([kept.sum(-1) + 1, jnp.zeros_like(slot)], axis=-1).astype(jnp.float32)
        by_slot = jnp.where(taken[:, :, None], weights[..., -1:], weights[..., :-1])
        return out, usage, slot, by_slot

    # -- what subclasses choose ---------------------------------------------------------------

    def keep_prompt(self, layer, q: Array, k: Array, slots: int) -> tuple[Array, dict]:
        """The prompt tokens a compressed layer keeps: q [B, T, Hq, D], k [B, T, Hkv, D] ->
        (positions [B, Hkv, slots] int32, -1 where empty; {metadata field: [B, Hkv, slots,
        ...]})."""
        raise NotImplementedError

    def victim(self, cache, layer, i, q: Array, positions: Array, candidate: Array) -> Array:
        """The slot [B, Hkv] a new token takes when none is empty, among `candidate` [B, Hkv, S]
        (not a sink, not in the window); q [B, Hkv, G, D] is the new token's query."""
        raise NotImplementedError

    def remember(self, cache, layer, i, slot: Array, k: Array, weights: Array):
        """What the step leaves for later evictions: the new token at `slot` [B, Hkv] (key
        k [B, 1, Hkv, D]) and the step's attention weights by slot [B, Hkv, G, S]. `i` is past
        the end of the compressed arrays on a dense layer, where writes must do nothing."""
        return cache


# -- the methods ---------------------------------------------------------------------------------


@backend
class H2OAttention(EvictionAttention):
    """H2O: sinks + the recent window + the heavy hitters by attention accumulated since each
    token entered (its prompt's received attention, then every decode step's, summed over the
    KV group's query heads). A new token takes the slot of the lowest accumulated score outside
    sinks and window, decided before its own query attends, so a step reads `budget` tokens."""

    def step_bytes(self, exact, approx, n_tokens, head_dim: int, itemsize: int):
        """K and V of every cached token and its float32 accumulated score."""
        return exact * (2 * head_dim * itemsize + 4)

    def metadata(self, shape):
        return {"scores": jnp.zeros(shape, jnp.float32)}

    def keep_prompt(self, layer, q, k, slots):
        received = received_attention(q, k)  # [B, Hkv, T]
        keep = keep_top(received, slots, self.sinks, self.window)
        return keep, {"scores": _gather_slots(received, keep)}

    def victim(self, cache, layer, i, q, positions, candidate):
        return lowest(cache.scores[i], positions, candidate)

    def remember(self, cache, layer, i, slot, k, weights):
        fresh = jnp.arange(cache.slots) == slot[..., None]  # [B, Hkv, S]
        old = cache.scores[jnp.minimum(i, cache.scores.shape[0] - 1)]
        scores = jnp.where(fresh, 0.0, old) + weights.sum(axis=2)
        return cache.replace(scores=_write_layer(cache.scores, i, scores))


@backend
class SnapKVAttention(EvictionAttention):
    """SnapKV: the last `observe` prompt queries vote with their attention (summed over them
    and the KV group's query heads) for the earlier prompt tokens; votes are pooled over
    `kernel` neighbouring positions (max or average, padded so each position keeps its own);
    the cache keeps the sinks, the last max(window, observe) prompt tokens and the top-voted
    rest, `budget` in all, and appends every generated token after them (`room` slots)."""

    observe: int = struct.field(pytree_node=False, default=32)
    kernel: int = struct.field(pytree_node=False, default=7)
    pooling: str = struct.field(pytree_node=False, default="max")
    room: int = struct.field(pytree_node=False, default=512)  # LongBench's longest answer

    def __post_init__(self):
        EvictionAttention.__post_init__(self)
        if self.observe < 1:
            raise ValueError(f"SnapKV's observation window must be >= 1 token, got {self.observe}")
        if self.budget <= self.sinks + max(self.window, self.observe):
            raise ValueError(
                f"budget {self.budget} leaves no room to select beyond {self.sinks} sinks + "
                f"{max(self.window, self.observe)} recent tokens"
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV's pooling kernel must be odd and positive: {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV pools with 'max' or 'avg', got {self.pooling!r}")
        if self.room < 0:
            raise ValueError(f"SnapKV's room for generated tokens must be >= 0: {self.room}")

    def slots(self, max_len):
        return min(max_len, self.budget + self.room)

    def appending(self, tokens):
        return self.replace(room=max(self.room, tokens))

    def prefill(self, cache, layer, q, k, v):
        t = q.shape[1]
        if min(t, self.budget) + cache.context - t > cache.slots:  # its prompt + what follows
            raise DashKVError(
                f"SnapKV has room for {self.room} generated tokens, but the cache was made for "
                f"{cache.context - t} after a {t}-token prompt: make it with room >= "
                f"{min(t, self.budget) + cache.context - t - self.budget}"
            )
        return EvictionAttention.prefill(self, cache, layer, q, k, v)

    def votes(self, q: Array, k: Array) -> Array:
        """The observation window's pooled votes for the prompt tokens before it -> [B, Hkv, T]
        (the window's own entries are not votes)."""
        t = q.shape[1]
        received = received_attention(q, k, first_query=t - self.observe)
        before = jnp.arange(t) < t - self.observe
        window, strides = (1, 1, self.kernel), (1, 1, 1)
        padding = ((0, 0), (0, 0), (self.kernel // 2, self.kernel // 2))
        if self.pooling == "max":
            x = jnp.where(before, received, -jnp.inf)
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
        x = jnp.where(before, received, 0.0)
        summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
        return summed / self.kernel  # zero padding counts, as avg_pool1d's default

    def keep_prompt(self, layer, q, k, slots):
        t, keep = q.shape[1], min(self.budget, slots)
        score = self.votes(q, k) if t > keep else jnp.zeros((k.shape[0], k.shape[2], t))
        kept = keep_top(score, keep, self.sinks, max(self.window, self.observe))
        return jnp.pad(kept, ((0, 0), (0, 0), (0, slots - keep)), constant_values=-1), {}

    def victim(self, cache, layer, i, q, positions, candidate):
        # Only past its room (decoding beyond the context it was made for): the oldest goes.
        return lowest(positions, positions, candidate)


@backend
class HashEvictAttention(EvictionAttention):
    """HashEvict: `hasher` (SimHash: one Gaussian projection per layer and KV head for keys
    and its group's queries, `projections`) codes every key as it enters; from the first token
    that finds the cache full, prompt included, the new token takes the slot of the cached
    token farthest in group Hamming distance from the new token's query code, before attention."""

    hasher: Hasher = None

    def __post_init__(self):
        EvictionAttention.__post_init__(self)
        if self.hasher is None:
            raise ValueError(
                "HashEvict needs a hasher: HashEvictAttention.projections(model.config)"
            )

    @staticmethod
    def projections(model_config, bits: int = HASHEVICT_BITS, seed: int = 0) -> Hasher:
        """SimHash projections shaped like the model's heads, `bits` per code."""
        return simhash(HasherConfig.for_model(model_config, bits=bits), seed)

    def step_bytes(self, exact, approx, n_tokens, head_dim: int, itemsize: int):
        """K, V and the code of every cached token (codes are read to find the victim)."""
        return exact * (2 * head_dim * itemsize + self.hasher.config.bits // 8)

    def metadata(self, shape):
        return {"codes": jnp.zeros((*shape, self.hasher.config.words), jnp.uint32)}

    def query_codes(self, q: Array, layer, kv_heads: int) -> Array:
        """q [..., Hq, D] -> packed codes [..., Hkv, G, W]."""
        codes = self.hasher.encode_queries(q, layer)
        return codes.reshape(*codes.shape[:-2], kv_heads, -1, codes.shape[-1])

    def keep_prompt(self, layer, q, k, slots):
        b, t, hkv, _ = k.shape
        key_codes = self.hasher.encode_keys(k, layer).transpose(0, 2, 1, 3)  # [B, Hkv, T, W]
        first = jnp.arange(min(t, slots), dtype=jnp.int32)
        keep = jnp.broadcast_to(jnp.pad(first, (0, slots - first.size), constant_values=-1),
                                (b, hkv, slots))  # fmt: skip
        codes = _gather_slots(key_codes, keep)
        if t <= slots:
            return keep, {"codes": codes}

        def enter(carry, xs):  # token `pos` takes the farthest candidate's slot
            positions, codes = carry  # [B, Hkv, S], [B, Hkv, S, W]
            pos, query_code, key_code = xs  # [], [B, Hkv, G, W], [B, Hkv, W]
            candidate = (positions >= self.sinks) & (positions < pos - self.window + 1)
            slot = lowest(-group_distance(query_code, codes), positions, candidate)
            taken = jnp.arange(slots) == slot[..., None]  # [B, Hkv, S]
            codes = jnp.where(taken[..., None], key_code[:, :, None], codes)
            return (jnp.where(taken, pos, positions), codes), None

        xs = (
            jnp.arange(slots, t, dtype=jnp.int32),
            self.query_codes(q[:, slots:], layer, hkv).swapaxes(0, 1),  # [T - S, B, Hkv, G, W]
            key_codes[:, :, slots:].transpose(2, 0, 1, 3),  # [T - S, B, Hkv, W]
        )
        (keep, codes), _ = jax.lax.scan(enter, (keep, codes), xs)
        return keep, {"codes": codes}

    def victim(self, cache, layer, i, q, positions, candidate):
        b, hkv, g, d = q.shape
        query_codes = self.query_codes(q.reshape(b, hkv * g, d), layer, hkv)  # [B, Hkv, G, W]
        return lowest(-group_distance(query_codes, cache.codes[i]), positions, candidate)

    def remember(self, cache, layer, i, slot, k, weights):
        code = self.hasher.encode_keys(k[:, 0], layer)  # [B, Hkv, W]
        rows, heads = jnp.arange(k.shape[0])[:, None], jnp.arange(k.shape[2])[None, :]
        return cache.replace(codes=cache.codes.at[i, rows, heads, slot].set(code, mode="drop"))
