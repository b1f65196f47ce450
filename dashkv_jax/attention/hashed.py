"""DASH-KV decode attention: a code cache, the packed-bit coarse filter, the adaptive exact cut.

Per layer, KV head and decode step (DESIGN.md section 2):

1. every key's code is written once, when its token enters the cache (prefill or decode);
2. the query is encoded (hamming: sign codes; asymmetric: real weights);
3. `pallas_kernels` scores every middle slot and keeps the top `candidates`;
4. exact q.k on the candidates; they are ranked by the group's softmax mass among them and cut
   at the smallest prefix reaching `tau` of that mass, clipped to [k_min, k_max];
5. exact attention over sinks + window + the cut (`SparseAttention.attend_critical`).

The same class runs the hashed baselines: a SimHash hasher (random projections) and a symmetric
learned hasher, each at the same bits and budget.
"""

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels
from dashkv_jax.attention.full import KVCache, backend
from dashkv_jax.attention.sparse import SparseAttention, gather_rows
from dashkv_jax.hashing.encoders import Hasher
from dashkv_jax.models.config import ModelConfig

Array = jax.Array
# Asymmetric coarse scores (|score| <= G * bits) are ranked in steps of 1 / ASYMMETRIC_STEPS.
ASYMMETRIC_STEPS = 16


def adaptive_cut(sorted_mass: Array, total: Array, tau: float, k_min: int) -> Array:
    """Keep the smallest prefix of sorted_mass [..., K] (descending) whose sum reaches
    tau * total [..., 1], and at least k_min entries -> bool [..., K]."""
    if tau >= 1:  # keep all: rounding in the running sum must not drop a tail of tiny masses
        return jnp.ones(sorted_mass.shape, bool)
    before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass
    return (before < tau * total) | (jnp.arange(sorted_mass.shape[-1]) < k_min)


@struct.dataclass
class CodeCache(KVCache):
    """The KV cache plus packed key codes, and what the adaptive cut spent."""

    codes: Array = None  # [layers, batch, kv_heads, max_len, bits / 32] uint32
    attended: Array = None  # [layers, batch, kv_heads] float32: tokens attended, latest step

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, dtype, words: int):
        base = KVCache.create(config, batch, max_len, dtype)
        shape = (config.num_layers, batch, config.num_kv_heads)
        return cls(
            k=base.k,
            v=base.v,
            lengths=base.lengths,
            codes=jnp.zeros((*shape, max_len, words), jnp.uint32),
            attended=jnp.zeros(shape, jnp.float32),
        )


@backend
class HashedAttention(SparseAttention):
    """Hashed coarse filter + exact fine ranking with an adaptive, mass-based cut.

    `budget` bounds the tokens attended (sinks + window + k_max); `candidates` (C) is how many
    the coarse filter passes to exact scoring.
    """

    hasher: Hasher = None
    candidates: int = struct.field(pytree_node=False, default=1024)
    scoring: str = struct.field(pytree_node=False, default="hamming")
    tau: float = struct.field(pytree_node=False, default=0.95)
    k_min: int = struct.field(pytree_node=False, default=16)
    implementation: str | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        SparseAttention.__post_init__(self)
        if self.candidates < self.selected:
            raise ValueError(
                f"{self.candidates=} must be at least the {self.selected} tokens the budget selects"
            )
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")

    def init_cache(self, config, batch, max_len, dtype=jnp.float32) -> CodeCache:
        return CodeCache.create(config, batch, max_len, dtype, self.hasher.config.words)

    def prefill(self, cache, layer, q, k, v):
        codes = self.hasher.encode_keys(k, layer).transpose(0, 2, 1, 3)  # [B, Hkv, T, W]
        cache = cache.replace(
            codes=jax.lax.dynamic_update_slice(cache.codes, codes[None], (layer, 0, 0, 0, 0))
        )
        return SparseAttention.prefill(self, cache, layer, q, k, v)

    def decode(self, cache, layer, q, k, v):
        code = self.hasher.encode_keys(k[:, 0], layer)  # [B, Hkv, W]
        rows = jnp.arange(k.shape[0])
        cache = cache.replace(codes=cache.codes.at[layer, rows, :, cache.lengths].set(code))
        return SparseAttention.decode(self, cache, layer, q, k, v)

    def adopt(self, cache: KVCache) -> CodeCache:
        def encode(layer):  # one layer at a time: the key encoder's activations are large
            return self.hasher.encode_keys(cache.k[layer].transpose(0, 2, 1, 3), layer)

        codes = jax.lax.map(encode, jnp.arange(cache.k.shape[0])).transpose(0, 1, 3, 2, 4)
        written = jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None]  # [B, S]
        return CodeCache(
            k=cache.k,
            v=cache.v,
            lengths=cache.lengths,
            codes=jnp.where(written[None, :, None, :, None], codes, 0),  # as prefill leaves them
            attended=jnp.zeros(cache.k.shape[:3], jnp.float32),
        )

    def record(self, cache, layer, attended):
        return cache.replace(attended=cache.attended.at[layer].set(attended))

    def coarse_scores(self, cache: CodeCache, layer: Array, q: Array, hi: Array) -> Array:
        """Coarse scores of every slot below hi; q [B, Hkv, G, D] -> [B, Hkv, S] int32."""
        return self.score_codes(self.encode_query(q, layer), cache.codes[layer], hi)

    def encode_query(self, q: Array, layer: Array) -> Array:
        """q [B, Hkv, G, D] -> packed codes [B, Hkv, G, W] (hamming) or weights [B, Hkv, G, b]."""
        b, hkv, g, d = q.shape
        flat = q.reshape(b, hkv * g, d)
        if self.scoring == "hamming":
            return self.hasher.encode_queries(flat, layer).reshape(b, hkv, g, -1)
        return self.hasher.query_weights(flat, layer).reshape(b, hkv, g, -1)

    def score_codes(self, query: Array, codes: Array, lengths: Array) -> Array:
        """An encoded query against key codes [B, Hkv, N, W] -> int32 coarse scores [B, Hkv, N]:
        hamming scores, or asymmetric ones rounded to steps of 1 / ASYMMETRIC_STEPS. Slots >=
        lengths [B] get `pallas_kernels.HAMMING_SENTINEL`."""
        if self.scoring == "hamming":
            return pallas_kernels.hamming_scores(
                query, codes, lengths, implementation=self.implementation
            )
        scores = pallas_kernels.asymmetric_scores(
            query, codes, lengths, implementation=self.implementation
        )
        # Integer keys let the top-C take one radix pass instead of three over float bit
        # patterns (3x faster on CPU); only the candidate set matters, and steps this fine
        # only tie scores at its margin (ties go to the older token).
        quantized = jnp.round(scores * ASYMMETRIC_STEPS).astype(jnp.int32)
        return jnp.where(jnp.isfinite(scores), quantized, pallas_kernels.HAMMING_SENTINEL)

    def select(self, cache, layer, q, pos, lo, hi):
        scores = exclude_below(
            self.coarse_scores(cache, layer, q, hi), jnp.arange(cache.max_len), lo
        )
        n_candidates = min(self.candidates, scores.shape[-1])  # a short cache has fewer slots
        _, candidates = pallas_kernels.select_topk(scores, n_candidates)  # [B, Hkv, C]
        keys = gather_rows(cache.k[layer], candidates)  # [B, Hkv, C, D]
        logits = jnp.einsum("bhgd,bhcd->bhgc", q, keys, preferred_element_type=jnp.float32)
        return self.fine_cut(candidates, logits * q.shape[-1] ** -0.5, lo, hi)

    def fine_cut(self, candidates: Array, logits: Array, lo: Array, hi: Array):
        """Fine ranking of the coarse candidates [B, Hkv, C] (best first) by their exact scaled
        logits [B, Hkv, G, C]: the group's softmax mass among them, cut adaptively.

        Returns (indices, valid) [B, Hkv, min(selected, C)]; indices are 0 where not valid.
        """
        real = (candidates >= lo[:, None, None]) & (candidates < hi[:, None, None])
        logits = jnp.where(real[:, :, None, :], logits, -jnp.inf)
        mass = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1)).sum(axis=2)  # [B, Hkv, C]
        k_max = min(self.selected, candidates.shape[-1])
        top_mass, order = jax.lax.top_k(mass, k_max)  # [B, Hkv, k_max]

        keep = adaptive_cut(top_mass, mass.sum(-1, keepdims=True), self.tau, self.k_min)
        indices = jnp.take_along_axis(candidates, order, axis=-1)
        valid = keep & jnp.take_along_axis(real, order, axis=-1)
        return jnp.where(valid, indices, 0).astype(jnp.int32), valid


def exclude_below(scores: Array, slots: Array, lo: Array) -> Array:
    """Coarse scores [B, Hkv, N] of slots [N] (cache positions) below lo [B] set to the sentinel,
    so the sinks are never candidates."""
    below = (slots[None, :] < lo[:, None])[:, None, :]
    return jnp.where(below, pallas_kernels.HAMMING_SENTINEL, scores)
