"""The KV cache every backend owns, the backend decorator, and full attention.

A backend implements `dashkv_jax.models.causal.Attention`: the model hands it post-RoPE q, k, v
per layer, and it writes its cache and returns the attention output. Backends are pytrees, so
their parameters (e.g. trained hashers) are traced jit arguments.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels
from dashkv_jax.models.causal import causal_attention
from dashkv_jax.models.config import ModelConfig

Array = jax.Array


@struct.dataclass
class KVCache:
    """Preallocated full-precision KV cache, one layout for every backend."""

    k: Array  # [layers, batch, kv_heads, max_len, head_dim]
    v: Array  # [layers, batch, kv_heads, max_len, head_dim]
    lengths: Array  # [batch] int32: tokens written so far (the next token's position)

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32):
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def write_prefill(cache: KVCache, layer: Array, k: Array, v: Array, start: Array = 0) -> KVCache:
    """Write a prompt's (or a chunk's) k/v [B, T, Hkv, D] at positions start..start+T-1 of one
    layer."""
    k_heads = k.transpose(0, 2, 1, 3)[None].astype(cache.k.dtype)  # [1, B, Hkv, T, D]
    v_heads = v.transpose(0, 2, 1, 3)[None].astype(cache.v.dtype)
    start = (layer, 0, 0, start, 0)
    return cache.replace(
        k=jax.lax.dynamic_update_slice(cache.k, k_heads, start),
        v=jax.lax.dynamic_update_slice(cache.v, v_heads, start),
    )


def write_token(cache: KVCache, layer: Array, k: Array, v: Array) -> KVCache:
    """Write one token's k/v [B, 1, Hkv, D] at each row's position `cache.lengths`."""
    rows = jnp.arange(k.shape[0])
    return cache.replace(
        k=cache.k.at[layer, rows, :, cache.lengths].set(k[:, 0].astype(cache.k.dtype)),
        v=cache.v.at[layer, rows, :, cache.lengths].set(v[:, 0].astype(cache.v.dtype)),
    )


def backend(cls):
    """Make an attention backend a frozen dataclass and a pytree whose structure names its class.

    Like `flax.struct.dataclass` (fields marked `struct.field(pytree_node=False)` are static), but
    registered as a plain custom node: JAX compares `register_dataclass` tree structures by their
    static fields alone, ignoring the class, so jit could hand OracleAttention(budget=96) the
    function compiled for StreamingAttention(budget=96).
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    children = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
    static = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))

    def flatten_with_keys(x):
        keyed = [(jax.tree_util.GetAttrKey(name), getattr(x, name)) for name in children]
        return keyed, tuple(getattr(x, name) for name in static)

    def unflatten(static_values, child_values):
        x = object.__new__(cls)  # no __post_init__: leaves may be tracers or placeholders
        for name, value in zip(children + static, (*child_values, *static_values), strict=True):
            object.__setattr__(x, name, value)
        return x

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten)
    cls.replace = dataclasses.replace
    return cls


@backend
class FullAttention:
    """Exact attention over every cached token: the reference every other backend is judged by."""

    chunk: int | None = struct.field(pytree_node=False, default=None)  # None: decode_chunk()
    # Decode: None picks the native CPU kernels where built, "xla" the XLA loop (attend_all).
    implementation: str | None = struct.field(pytree_node=False, default=None)

    def init_cache(self, config, batch, max_len, dtype=jnp.float32) -> KVCache:
        return KVCache.create(config, batch, max_len, dtype)

    def prefill(self, cache, layer, q, k, v):
        return causal_attention(q, k, v), write_prefill(cache, layer, k, v)

    def decode(self, cache, layer, q, k, v):
        cache = write_token(cache, layer, k, v)
        return attend_all(cache, layer, q, self.chunk, implementation=self.implementation), cache

    def prefill_chunk(self, cache, layer, q, k, v, start):
        """A prompt's chunk at positions start..start+T-1 (the chunks before it already in the
        cache): exact causal attention over the cache; q [B, T, Hq, D], k/v [B, T, Hkv, D]."""
        cache = write_prefill(cache, layer, k, v, start)
        positions = start + jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return attend_all(cache, layer, q, positions=positions), cache

    def adopt(self, cache: KVCache) -> KVCache:
        return cache

    def step_bytes(self, exact, approx, n_tokens, head_dim: int, itemsize: int):
        """Bytes read per KV head by a step that used `exact` tokens (K and V read) and
        `approx` ones (V alone) over a cache of `n_tokens`: the unit methods are compared in.
        Full attention and the budget methods read K and V of their tokens and nothing else
        (the oracle's exact scores are an ideal it is not charged for)."""
        return exact * 2 * head_dim * itemsize


# Slots read per step of the decode loop, by backend. XLA:CPU copies a layer sliced out of the
# stacked cache before a dot reads it (128K slots: 100 MB for K alone), so the CPU reads chunks
# of 16K slots (4 MB of K per KV head): of 4K-64K, `bench_decode.py --dense-chunks` measured it
# fastest at 128K and 10% behind 32K at 1M;
# on a GPU each step of the loop costs about 30 us however little it reads (H100), so
# accelerators read large ones.
DECODE_CHUNKS = {"cpu": 16384}
ACCELERATOR_DECODE_CHUNK = 1 << 18


def decode_chunk() -> int:
    """Slots per step of `attend_all`'s loop on the default backend."""
    return DECODE_CHUNKS.get(jax.default_backend(), ACCELERATOR_DECODE_CHUNK)


def attend_all(
    cache: KVCache,
    layer: Array,
    q: Array,
    chunk: int | None = None,
    positions: Array | None = None,
    implementation: str | None = None,
) -> Array:
    """Exact attention of queries q [B, T, Hq, D] at positions [B, T] (default: one new query
    per row at `cache.lengths`) over every written slot up to each one's position.

    An online softmax over chunks of `chunk` slots (default: `decode_chunk()`, smaller for many
    queries so a chunk's logits stay near 16 MiB), up to the last slot any query sees: a cache
    longer than what is written costs nothing. One new query per row on the CPU, with no chunk
    given, goes through the native kernels instead (`attend_all_native`), unless
    `implementation="xla"`.
    """
    b, t, hq, d = q.shape
    if positions is None and t == 1 and chunk is None:
        if pallas_kernels.resolve_implementation(implementation, 1, native=True) == "cpu":
            return attend_all_native(cache, layer, q)
    hkv, max_len = cache.k.shape[2], cache.max_len
    positions = cache.lengths[:, None] if positions is None else positions  # [B, T]
    qg = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    chunk = chunk or max(256, min(decode_chunk(), (1 << 22) // (b * hq * t)))
    # Never the whole cache in one chunk: inside the model's layer scan, XLA:CPU then copies
    # the entire stacked cache at every layer (SmolLM2 at 4096 slots: 2 s a step, not 0.25).
    chunk = min(chunk, max(max_len // 2, 1))

    def read(start, cache_part):  # [B, Hkv, chunk, D] of one layer
        return jax.lax.dynamic_slice(cache_part, (layer, 0, 0, start, 0), (1, b, hkv, chunk, d))[0]

    def step(i, carry):
        running_max, denominator, out = carry  # [B, Hkv, G, T] twice, [B, Hkv, G, T, D]
        start = jnp.minimum(i * chunk, max_len - chunk)  # the last chunk may overlap the one before
        slots = start + jnp.arange(chunk)
        visible = (slots >= i * chunk) & (slots <= positions[..., None])  # [B, T, chunk]
        keys = read(start, cache.k)  # [B, Hkv, chunk, D]
        if t == 1:  # keys first: XLA:CPU otherwise copies the chunk transposed for the dot
            logits = jnp.einsum("bhsd,bhgtd->bhsgt", keys, qg, preferred_element_type=jnp.float32)
            logits = logits.transpose(0, 1, 3, 4, 2)  # [B, Hkv, G, 1, chunk]: small
        else:
            logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys, preferred_element_type=jnp.float32)
        logits = jnp.where(visible[:, None, None], logits * d**-0.5, -jnp.inf)
        # Chunk 0 holds slot 0, visible to every query, so the running max is finite from there.
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        weights = jnp.exp(logits - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        values = read(start, cache.v)
        out = out * rescale[..., None] + jnp.einsum(
            "bhgts,bhsd->bhgtd", weights.astype(values.dtype), values,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return new_max, denominator * rescale + weights.sum(axis=-1), out

    group = qg.shape[:4]
    init = (
        jnp.full(group, -jnp.inf, jnp.float32),
        jnp.zeros(group, jnp.float32),
        jnp.zeros((*group, d), jnp.float32),
    )
    n_chunks = jnp.max(positions) // chunk + 1  # through the chunk holding the last slot seen
    _, denominator, out = jax.lax.fori_loop(0, n_chunks, step, init)
    out = (out / denominator[..., None]).astype(cache.v.dtype)  # [B, Hkv, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def attend_all_native(cache: KVCache, layer: Array, q: Array) -> Array:
    """`attend_all` of one new query per row [B, 1, Hq, D] through the CPU kernels DASH-KV reads
    its tiers with, the slot list naming every slot up to the row's position: one pass over K,
    one over V (`bench_decode.py`: about 2x the byte floor, against 4x for the XLA loop). Every
    slot of the cache is listed, written or not; unwritten ones are skipped, not read."""
    b, _, hq, d = q.shape
    hkv, max_len = cache.k.shape[2], cache.max_len
    slots = jnp.arange(max_len, dtype=jnp.int32)
    slots = jnp.where(slots <= cache.lengths[:, None], slots, -1)  # [B, N]
    slots = jnp.broadcast_to(slots[:, None], (b, hkv, max_len))
    group = q.reshape(b, hkv, hq // hkv, d)
    logits = pallas_kernels.gathered_logits(
        group, cache.k, slots, scale=d**-0.5, layer=layer, implementation="cpu"
    )  # [B, Hkv, G, N]
    out, _ = pallas_kernels.gathered_attention(
        logits, cache.v, slots, layer=layer, implementation="cpu"
    )
    return out.astype(cache.v.dtype).reshape(b, 1, hq, d)
