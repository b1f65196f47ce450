"""DASH-KV decode attention: a code cache, calibrated Hamming distances, three tiers.

Per DASH-KV layer (all but the sandwich's first and last ones), KV head and decode step
(DESIGN.md section 2):

1. every key's code is written once, when its token enters the cache (prefill or decode);
2. the query heads of the group are encoded (sign codes: hamming scoring, the paper; or real
   weights: this project's asymmetric-scoring extension);
3. one pass over the code cache gives every selectable slot's group distance D (the sum over
   the G query heads of the Hamming distance) and the histogram of D (`pallas_kernels`);
4. calibration: a token that at least `t_vote` KV heads of the layer put in their first-pass
   tier 1 loses the learned consensus discount (majority vote corrects one head's miss), and a
   token the previous DASH-KV layer attended to loses the learned momentum discount times that
   layer's attention weight on it (mean over its query heads); discounts are rounded to whole
   distance units and the histogram follows;
5. tiers by rank of the calibrated distance (ties to the older token), thresholds read off the
   cumulative histogram, slots compacted into fixed-size lists: tier 1, the `budget - S - R`
   closest, attends exactly (K and V read); tier 2, the next `tier2`, enters the same softmax
   with an approximate logit from the codes (`Hasher.approx_logits`: the hash inner product
   scaled, plus the residual MLP; computed from the codes by `pallas_kernels.code_logits`) and
   its V read in full; the rest is masked for this step, not evicted. Sinks and the recent
   window are always exact.

The approximate logits are fixed up to a constant per query (the softmax, and the KL loss that
trains them, cannot see one); each step anchors them on tokens whose exact logits it has, the
window and the oldest `ANCHORS` of tier 1: a learned hasher adds the mean gap, SimHash fits a
line (it has no learned scale). Every component can be switched off (`consensus`, `momentum`,
`tier2=0`, `residual`) for the ablation.

The same class runs the hashed baselines at equal bits and tiers: SimHash (random projections,
the paper's "naive LSH") and a symmetric learned hasher.
"""

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels
from dashkv_jax.attention.full import FullAttention, KVCache, backend
from dashkv_jax.attention.sparse import (
    SparseAttention,
    SparseCache,
    fixed_slots,
    middle_bounds,
)
from dashkv_jax.hashing.encoders import Hasher
from pallas_kernels.reference import unfused

Array = jax.Array
# The asymmetric-scoring extension ranks real scores in distance steps of 1/ASYMMETRIC_STEPS.
ASYMMETRIC_STEPS = 8
DISTANCE_SENTINEL = pallas_kernels.DISTANCE_SENTINEL  # slots that are not selectable
ANCHORS = 64  # tier-1 tokens (with the window) that anchor tier 2's logits


@struct.dataclass
class CodeCache(SparseCache):
    """The KV cache plus packed key codes and the momentum prior carried from layer to layer."""

    codes: Array = None  # [layers, batch, kv_heads, max_len, bits / 32] uint32
    # The previous DASH-KV layer's attended slots and their weight (mean over its query heads),
    # per query: one at a decode step, every prompt position when teacher-forced.
    prior_slots: Array = None  # [batch, queries, M] int32, -1 where unused
    prior_weights: Array = None  # [batch, queries, M] float32


@backend
class HashedAttention(SparseAttention):
    """DASH-KV's three tiers at an exact `budget` (sinks + window + tier 1) plus `tier2`
    approximate tokens per KV head and step."""

    hasher: Hasher = None
    tier2: int = struct.field(pytree_node=False, default=0)
    consensus: bool = struct.field(pytree_node=False, default=True)
    momentum: bool = struct.field(pytree_node=False, default=True)
    residual: bool = struct.field(pytree_node=False, default=True)
    scoring: str = struct.field(pytree_node=False, default="hamming")
    implementation: str | None = struct.field(pytree_node=False, default=None)
    # Decoding's fast path: a cache shorter than this many slots is read densely, the cheaper
    # step there (0: never, the default: on this project's CPU DASH-KV's step is already the
    # cheaper one at 8K, the shortest cache `bench_decode.py` times).
    dense_below: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        SparseAttention.__post_init__(self)
        if self.tier2 < 0:
            raise ValueError(f"tier2 must be >= 0 tokens, got {self.tier2}")
        if self.scoring not in ("hamming", "asymmetric"):
            raise ValueError(f"scoring must be 'hamming' or 'asymmetric', got {self.scoring!r}")

    # -- shapes ------------------------------------------------------------------------------

    @property
    def prior_size(self) -> int:
        """Slots a layer hands the next one: every KV head's exact and tier-2 tokens."""
        return self.hasher.config.num_kv_heads * (self.budget + self.tier2)

    @property
    def distance_scale(self) -> int:
        """Distance units per unit of Hamming distance."""
        return 1 if self.scoring == "hamming" else ASYMMETRIC_STEPS

    @property
    def bins(self) -> int:
        return self.hasher.config.max_distance * self.distance_scale + 1

    def step_bytes(self, exact, approx, n_tokens, head_dim: int, itemsize: int):
        """Every code once, K and V of exact tokens, V and the code again of tier-2 tokens."""
        code = self.hasher.config.bits // 8
        return (
            n_tokens * code
            + exact * 2 * head_dim * itemsize
            + approx * (head_dim * itemsize + code)
        )

    # -- the cache ---------------------------------------------------------------------------

    def init_cache(self, config, batch, max_len, dtype=jnp.float32) -> CodeCache:
        queries = max_len if self.teacher_forced else 1
        return CodeCache.create(
            config,
            batch,
            max_len,
            dtype,
            codes=jnp.zeros(
                (config.num_layers, batch, config.num_kv_heads, max_len, self.hasher.config.words),
                jnp.uint32,
            ),
            prior_slots=jnp.full((batch, queries, self.prior_size), -1, jnp.int32),
            prior_weights=jnp.zeros((batch, queries, self.prior_size), jnp.float32),
        )

    def prefill(self, cache, layer, q, k, v):
        codes = self.hasher.encode_keys(k, layer).transpose(0, 2, 1, 3)  # [B, Hkv, T, W]
        cache = cache.replace(
            codes=jax.lax.dynamic_update_slice(cache.codes, codes[None], (layer, 0, 0, 0, 0))
        )
        return SparseAttention.prefill(self, cache, layer, q, k, v)

    def prefill_chunk(self, cache, layer, q, k, v, start):
        codes = self.hasher.encode_keys(k, layer).transpose(0, 2, 1, 3)  # [B, Hkv, T, W]
        cache = cache.replace(
            codes=jax.lax.dynamic_update_slice(cache.codes, codes[None], (layer, 0, 0, start, 0))
        )
        return SparseAttention.prefill_chunk(self, cache, layer, q, k, v, start)

    def decode(self, cache, layer, q, k, v):
        code = self.hasher.encode_keys(k[:, 0], layer)  # [B, Hkv, W]
        rows = jnp.arange(k.shape[0])
        cache = cache.replace(codes=cache.codes.at[layer, rows, :, cache.lengths].set(code))
        if cache.max_len < self.dense_below:  # static: the whole decode is dense
            return FullAttention.decode(self, cache, layer, q, k, v)
        return SparseAttention.decode(self, cache, layer, q, k, v)

    def adopt(self, cache: KVCache) -> CodeCache:
        def encode(layer):  # one layer at a time: the key encoder's activations are large
            return self.hasher.encode_keys(cache.k[layer].transpose(0, 2, 1, 3), layer)

        codes = jax.lax.map(encode, jnp.arange(cache.k.shape[0])).transpose(0, 1, 3, 2, 4)
        written = jnp.arange(cache.max_len)[None, :] < cache.lengths[:, None]  # [B, S]
        b = cache.k.shape[1]
        return CodeCache(
            k=cache.k,
            v=cache.v,
            lengths=cache.lengths,
            usage=jnp.zeros((*cache.k.shape[:3], 2), jnp.float32),
            codes=jnp.where(written[None, :, None, :, None], codes, 0),  # as prefill leaves them
            prior_slots=jnp.full((b, 1, self.prior_size), -1, jnp.int32),
            prior_weights=jnp.zeros((b, 1, self.prior_size), jnp.float32),
        )

    def step_state(self, cache):
        return cache.prior_slots[:, 0], cache.prior_weights[:, 0]

    def with_step_state(self, cache, state):
        slots, weights = state
        return cache.replace(prior_slots=slots[:, None], prior_weights=weights[:, None])

    def position_state(self, cache, t: int):
        return cache.prior_slots[:, :t], cache.prior_weights[:, :t]

    def with_position_state(self, cache, state):
        slots, weights = state
        return cache.replace(
            prior_slots=cache.prior_slots.at[:, : slots.shape[1]].set(slots),
            prior_weights=cache.prior_weights.at[:, : weights.shape[1]].set(weights),
        )

    # -- distances, calibration, tiers -------------------------------------------------------

    def encode_query(self, q: Array, layer: Array) -> Array:
        """q [B, Hkv, G, D] -> packed codes [B, Hkv, G, W] (hamming) or weights [B, Hkv, G, b]."""
        b, hkv, g, d = q.shape
        flat = q.reshape(b, hkv * g, d)
        if self.scoring == "hamming":
            return self.hasher.encode_queries(flat, layer).reshape(b, hkv, g, -1)
        return self.hasher.query_weights(flat, layer).reshape(b, hkv, g, -1)

    def distances(self, codes: Array, layer: Array, query: Array, lo: Array, hi: Array):
        """Group distances of the selectable slots [lo, hi) of layer `layer` of the code cache
        [L, B, Hkv, N, W] and their histogram -> ([B, Hkv, N] int32, sentinel elsewhere;
        [B, Hkv, bins] int32)."""
        if self.scoring == "hamming":
            return pallas_kernels.hamming_histogram(
                query, codes, lo, hi, layer=layer, implementation=self.implementation
            )
        codes = codes[layer]
        scores = pallas_kernels.asymmetric_scores(
            query, codes, hi, implementation=self.implementation
        )  # [B, Hkv, N], -inf at slots >= hi
        top = self.hasher.config.max_distance
        distance = jnp.round((top - scores) * (ASYMMETRIC_STEPS / 2)).astype(jnp.int32)
        slots = jnp.arange(codes.shape[2])
        selectable = (slots >= lo[:, None]) & (slots < hi[:, None])
        distance = jnp.where(selectable[:, None], distance, DISTANCE_SENTINEL)
        return distance, pallas_kernels.distance_histogram(
            distance, self.bins, implementation=self.implementation
        )

    def calibrate(self, layer, distance, hist, total, k1, prior, first, offset=0):
        """Consensus and momentum discounts -> calibrated (distance, histogram).

        distance [B, Hkv, n] and hist: this cache's own slots (a shard's, when sharded: `offset`
        is the global position of its slot 0); total: the histogram over every slot; k1 [B]:
        tier-1 sizes; prior: (global slots, weights) [B, M] of the previous DASH-KV layer,
        ignored where `first` (no DASH-KV layer before this one in the step).
        """
        consensus, momentum = self.hasher.discounts(layer)
        scale = self.distance_scale
        vote = prior_list = None
        if self.consensus and distance.shape[1] >= self.hasher.config.t_vote:
            threshold, _ = pallas_kernels.rank_threshold(total, k1[:, None])
            units = jnp.round(consensus * scale).astype(jnp.int32)
            vote = (threshold, jnp.int32(self.hasher.config.t_vote), units)
        if self.momentum:
            slots, weights = prior
            local = jnp.where(slots >= 0, slots - offset, -1)  # outside [0, n): not held here
            prior_list = (local, jnp.where(first, 0.0, weights), momentum * scale)
        return pallas_kernels.calibrate_distances(
            distance, hist, vote, prior_list, implementation=self.implementation
        )

    def tiers(self, cache, layer, q, pos, prior, *, offset=0, combine=None, before=None):
        """Tier 1 and tier 2 of queries q [B, Hkv, G, D] at pos [B] among the slots this cache
        holds -> (tier1 [B, Hkv, selected], tier2 [B, Hkv, tier2]) global slots padded with -1,
        and the encoded query.

        Sharded (attention/sharded.py), `offset` is the shard's first global slot, `combine`
        sums a histogram over the shards and `before` sums a count over the shards before this
        one: the shards then pick exactly the slots one cache would."""
        combine = combine or (lambda x: x)
        lo, hi = middle_bounds(pos, self.sinks, self.window)
        middle = jnp.maximum(hi - lo, 0)
        k1 = jnp.minimum(self.selected, middle)[:, None]  # [B, 1]
        k2 = jnp.minimum(self.tier2, middle[:, None] - k1)
        n = cache.codes.shape[3]
        query = self.encode_query(q, layer)
        distance, hist = self.distances(
            cache.codes, layer, query, jnp.clip(lo - offset, 0, n), jnp.clip(hi - offset, 0, n)
        )
        first = layer == self.dense_first  # no DASH-KV layer before it in this step
        distance, hist = self.calibrate(
            layer, distance, hist, combine(hist), k1[:, 0], prior, first, offset
        )
        total = combine(hist)

        def local(rank):  # (T, ties) over every slot -> over this cache's own
            threshold, ties = rank
            at = jnp.take_along_axis(hist, jnp.maximum(threshold, 0)[..., None], -1)[..., 0]
            earlier = 0 if before is None else before(at)
            ties = jnp.clip(ties - earlier, 0, at)
            return threshold, jnp.where(threshold >= 0, ties, 0)

        bounds, sizes = [local(pallas_kernels.rank_threshold(total, k1))], [self.selected]
        if self.tier2:
            bounds.append(local(pallas_kernels.rank_threshold(total, k1 + k2)))
            sizes.append(self.tier2)
        tiers = pallas_kernels.select_tiers(
            distance, tuple(bounds), tuple(sizes), implementation=self.implementation
        )  # ranks [0, k1), then [k1, k1 + k2)
        tier1 = tiers[0][0]
        tier2 = tiers[1][0] if self.tier2 else jnp.full((*q.shape[:2], 0), -1, jnp.int32)

        def to_global(slots):
            return jnp.where(slots >= 0, slots + offset, -1)

        return to_global(tier1), to_global(tier2), query

    # -- attention over the tiers ------------------------------------------------------------

    def tier_logits(self, cache, layer, q, query, pos, tier1, tier2, *, offset=0, reduce=None):
        """Logits of the critical tokens this cache holds, for q [B, Hkv, G, D] at pos [B]:
        sinks, window and tier 1 (global slots [B, Hkv, selected]) exact, tier 2 approximate,
        anchored on sums that `reduce` adds over the shards (when sharded).

        Returns (slots [B, Hkv, M] global, -1 where not held here; local [B, Hkv, M] slots of
        this cache, -1 likewise; logits [B, Hkv, G, M] (-inf there); exact [B, Hkv] tokens
        read exactly); the first S + R + selected entries are the exact ones.
        """
        b, hkv, g, d = q.shape
        n = cache.k.shape[3]
        _, hi = middle_bounds(pos, self.sinks, self.window)
        fixed, fixed_ok = fixed_slots(pos, hi, self.sinks, self.window)  # [B, S + R]
        per_head = (b, hkv, fixed.shape[1])
        slots = jnp.concatenate([jnp.broadcast_to(fixed[:, None], per_head), tier1], axis=2)
        ok = jnp.concatenate([jnp.broadcast_to(fixed_ok[:, None], per_head), tier1 >= 0], 2)
        ok &= (slots >= offset) & (slots < offset + n)  # held here
        local = jnp.where(ok, slots - offset, -1)  # [B, Hkv, E]
        logits = pallas_kernels.gathered_logits(  # [B, Hkv, G, E], -inf where not ok
            q, cache.k, local, scale=d**-0.5, layer=layer, implementation=self.implementation
        )
        exact = ok.sum(-1)
        if self.tier2:
            tier2_ok = (tier2 >= offset) & (tier2 < offset + n)
            tier2_local = jnp.where(tier2_ok, tier2 - offset, -1)
            approx = self.approx_logits(cache, layer, query, tier2_local)  # [B, Hkv, G, K2]
            # Anchors: the window and the first ANCHORS tier-1 tokens (not the sinks, whose keys
            # are outliers): enough for a per-head offset, a fixed cost at any context.
            anchored = slice(self.sinks, self.sinks + self.window + ANCHORS)
            at_anchors = unfused(self.approx_logits, cache, layer, query, local[..., anchored])
            sums = anchor_sums(at_anchors, logits[..., anchored], local[..., anchored] >= 0)
            sums = sums if reduce is None else reduce(sums)
            approx = apply_anchor(approx, sums, fit_slope=self.fit_slope)
            logits = jnp.concatenate([logits, jnp.where(tier2_ok[:, :, None], approx, -jnp.inf)], 3)
            slots = jnp.concatenate([slots, tier2], axis=2)
            ok = jnp.concatenate([ok, tier2_ok], axis=2)
            local = jnp.concatenate([local, tier2_local], axis=2)
        return jnp.where(ok, slots, -1), local, logits, exact

    def critical_logits(self, cache, layer, q, pos, state):
        """The three tiers' slots [B, Hkv, M] and logits [B, Hkv, G, M] for q [B, Hkv, G, D]
        at pos [B], given the previous DASH-KV layer's prior `state` (see the base class)."""
        tier1, tier2, query = self.tiers(cache, layer, q, pos, state)
        slots, _, logits, exact = self.tier_logits(cache, layer, q, query, pos, tier1, tier2)
        used = (slots >= 0).sum(-1)
        return slots, logits, jnp.stack([exact, used - exact], axis=-1).astype(jnp.float32)

    def next_state(self, slots: Array, weights: Array, state):
        """The momentum prior for the next layer: this layer's attended slots [B, Hkv, M] and
        its attention on them, mean over all its query heads (weights [B, Hkv, G, M])."""
        b, hkv, g, _ = weights.shape

        # The G query heads added one by one: as a reduction over the middle axis, XLA:CPU ran
        # it on one thread, unvectorised; and with the weights' exponentials fused into the
        # sum, those ran unvectorised too (0.77 ms a layer at 1M tokens, 0.21 ms unfused).
        def add_heads(weights):  # [B, Hkv, G, M] -> [B, Hkv, M]
            return sum(weights[:, :, i] for i in range(g))

        group_sum = unfused(add_heads, weights)
        return slots.reshape(b, -1), (group_sum / (hkv * g)).reshape(b, -1)

    @property
    def fit_slope(self) -> bool:
        """SimHash has no learned logit scale: each step fits one (see `anchor`)."""
        return self.hasher.config.kind == "simhash"

    def approx_logits(self, cache, layer, query: Array, slots: Array) -> Array:
        """Tier-2 logits of the codes at slots [B, Hkv, K] for the encoded query [B, Hkv, G, W],
        before anchoring -> [B, Hkv, G, K], -inf where a slot names no row."""
        q_codes = query if self.scoring == "hamming" else pallas_kernels.pack_bits(query)
        b, hkv, g, _ = q_codes.shape
        scale, mlp = self.hasher.code_logit_weights(layer)
        if mlp is not None and not self.residual:  # every pair's input x = 0: "no information"
            mlp = (jnp.zeros_like(mlp[0]), *mlp[1:])
        return pallas_kernels.code_logits(
            q_codes, cache.codes, slots, scale.reshape(hkv, g), mlp,
            groups=self.hasher.config.residual_groups, layer=layer,
            implementation=self.implementation,
        )  # fmt: skip


def anchor_sums(at_anchors: Array, exact: Array, ok: Array) -> dict:
    """What anchoring needs from the anchors, as sums shards can add: at_anchors and exact
    [..., G, E] the approximate and exact logits of tokens read exactly, ok [..., E]."""
    ok = jnp.broadcast_to(ok[..., None, :], exact.shape)
    x, y = jnp.where(ok, at_anchors, 0.0), jnp.where(ok, exact, 0.0)
    return {
        "n": ok.sum(-1),
        "x": x.sum(-1),
        "y": y.sum(-1),
        "xy": (x * y).sum(-1),
        "xx": (x * x).sum(-1),
    }


def apply_anchor(approx: Array, sums: dict, *, fit_slope: bool) -> Array:
    """Approximate logits [..., G, K] on the exact logits' scale, per query head: plus the mean
    gap exact - approximate over the anchors; with `fit_slope`, the least-squares line
    exact ~ a approx + c instead (a >= 0: similarity never lowers a logit)."""
    n = jnp.maximum(sums["n"], 1)[..., None]
    mean_x, mean_y = sums["x"][..., None] / n, sums["y"][..., None] / n
    if not fit_slope:
        return approx + (mean_y - mean_x)
    covariance = sums["xy"][..., None] / n - mean_x * mean_y
    variance = sums["xx"][..., None] / n - mean_x * mean_x
    slope = jnp.maximum(covariance / jnp.maximum(variance, 1e-6), 0.0)
    return mean_y + slope * (approx - mean_x)
