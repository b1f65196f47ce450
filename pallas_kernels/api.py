"""Public entries: packed-bit scores, top-k selection and the selection primitives behind
`implementation=`.

Selection primitives (the decode path's; distances, not scores, and no sort anywhere):
  hamming_histogram  one pass over the codes: distances D = sum_g popcount(q_g XOR k) of the
                     selectable slots and their histogram over [0, G*b].
  calibrate_distances DASH-KV's consensus and momentum discounts off the distances, and the
                     histogram of the result (XLA, or the CPU kernel).
  rank_threshold     (T, ties) of rank k from the cumulative histogram (one XLA implementation).
  select_ranks       the slots of rank in [k_a, k_b), ascending, in a fixed-size index list, by
                     one prefix-sum pass over N. Rank order is (D ascending, slot ascending).

Implementations:
  "xla"           the XLA reference (`reference.py`): the definition of correct, and the CPU path.
  "pallas_tpu"    the Pallas Mosaic kernel (`pallas_tpu.py`); TPU only.
  "pallas_gpu"    the Pallas-Triton kernel (`pallas_gpu.py`); GPU only.
  "interpret"     the Mosaic kernel's source in Pallas interpret mode; any backend (tests).
  "interpret_gpu" the Triton kernel's source in Pallas interpret mode; any backend (tests).
  "cpu"           native C++ kernels as XLA FFI custom calls (`cpu_native.cc`, built by `make`);
                  CPU only; the entries in NATIVE_ENTRIES (the decode path's).
  None            the best for the current backend: pallas_tpu on TPU, pallas_gpu on GPU, else
                  xla; and xla wherever the kernel cannot take the shape (pallas_tpu needs the
                  word count W = b/32 to divide 128). On the CPU, cpu for NATIVE_ENTRIES
                  when the kernels are built, else xla.

`select_topk` has one implementation for every backend (`select.py`, plain JAX);
`rank_threshold` too (`reference.py`). `hamming_histogram` and `select_ranks` have all five.

Sparse attention over cache rows read by slot (DASH-KV's tiers; the gather happens inside the
kernel, so no [B, Hkv, K, D] copy of the rows is written to memory):
  gathered_logits     scale * q_g . k_cache[slot] for a list of slots (tier 1, sinks, window).
  gathered_attention  softmax(logits) @ v_cache[slot] and the logsumexp, for a list of slots
                      and their logits (exact and approximate); flash-decoding on the kernels.
  code_logits         the approximate logits of tier 2 from the codes the slots name: the hash
                      similarity scaled, plus the residual MLP of each group's agreement (the
                      CPU kernel, or XLA elsewhere).
Slots outside [0, N) (-1 by convention, anywhere in a list) are unused. A stacked cache
[L, B, Hkv, N, D] with `layer=` is read in place: `cache[layer]` would be a copy of the whole
layer before any kernel or gather reads it. Both have all six implementations; None picks xla
on GPU when the head dimension is not a power of two (Triton).

Sharding: every entry is jit-able with in/out shardings over the batch and KV-head axes. XLA
cannot split a compiled Pallas kernel (a custom call), so to run a kernel on each device's own
shard, wrap the entry in `jax.shard_map` over those axes (tests/test_kernels_sharding.py,
tests/test_kernels_histogram.py).
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common, cpu_native, pallas_gpu, pallas_tpu, reference, select

Implementation = Literal["xla", "pallas_tpu", "pallas_gpu", "interpret", "interpret_gpu", "cpu"]
IMPLEMENTATIONS: tuple[str, ...] = (
    "xla",
    "pallas_tpu",
    "pallas_gpu",
    "interpret",
    "interpret_gpu",
    "cpu",
)
NATIVE_ENTRIES = (
    "hamming_histogram",
    "distance_histogram",
    "calibrate_distances",
    "select_ranks",
    "gathered_logits",
    "gathered_attention",
    "code_logits",
)
_HAMMING = {
    "xla": reference.hamming_scores_reference,
    "pallas_tpu": pallas_tpu.hamming_scores_pallas_tpu,
    "pallas_gpu": pallas_gpu.hamming_scores_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.hamming_scores_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.hamming_scores_pallas_gpu, interpret=True),
}
_HISTOGRAM = {
    "xla": reference.hamming_histogram_reference,
    "pallas_tpu": pallas_tpu.hamming_histogram_pallas_tpu,
    "pallas_gpu": pallas_gpu.hamming_histogram_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.hamming_histogram_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.hamming_histogram_pallas_gpu, interpret=True),
}
_SELECT_RANKS = {
    "xla": reference.select_ranks_reference,
    "pallas_tpu": pallas_tpu.select_ranks_pallas_tpu,
    "pallas_gpu": pallas_gpu.select_ranks_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.select_ranks_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.select_ranks_pallas_gpu, interpret=True),
    "cpu": cpu_native.select_ranks_cpu,
}
_GATHERED_LOGITS = {
    "xla": reference.gathered_logits_reference,
    "pallas_tpu": pallas_tpu.gathered_logits_pallas_tpu,
    "pallas_gpu": pallas_gpu.gathered_logits_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.gathered_logits_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.gathered_logits_pallas_gpu, interpret=True),
    "cpu": cpu_native.gathered_logits_cpu,
}
_GATHERED_ATTENTION = {
    "xla": reference.gathered_attention_reference,
    "pallas_tpu": pallas_tpu.gathered_attention_pallas_tpu,
    "pallas_gpu": pallas_gpu.gathered_attention_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.gathered_attention_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.gathered_attention_pallas_gpu, interpret=True),
    "cpu": cpu_native.gathered_attention_cpu,
}
_ASYMMETRIC = {
    "xla": reference.asymmetric_scores_reference,
    "pallas_tpu": pallas_tpu.asymmetric_scores_pallas_tpu,
    "pallas_gpu": pallas_gpu.asymmetric_scores_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.asymmetric_scores_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.asymmetric_scores_pallas_gpu, interpret=True),
}


def available_implementations(backend: str | None = None) -> tuple[str, ...]:
    """Implementations that run on `backend` (default: the current one), best first."""
    backend = backend or jax.default_backend()
    native = {"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",), "cuda": ("pallas_gpu",)}
    return (*native.get(backend, ()), "xla", "interpret", "interpret_gpu")


def resolve_implementation(implementation: str | None, n_words: int, native: bool = False) -> str:
    """The implementation to run: `implementation` itself, or the best one for None. `native`:
    the entry has the CPU kernels, which None picks on the CPU when they are built."""
    if implementation is None:
        best = available_implementations()[0]
        if best == "pallas_tpu" and pallas_tpu.LANES % n_words:
            return "xla"
        if best == "xla" and native and jax.default_backend() == "cpu" and cpu_native.available():
            return "cpu"
        return best
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {implementation=}; choose from {IMPLEMENTATIONS} or None")
    if implementation == "cpu" and not native:
        raise ValueError(f"implementation='cpu' has only {', '.join(NATIVE_ENTRIES)}")
    return implementation


@functools.partial(jax.jit, static_argnames=("implementation",))
def hamming_scores(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    *,
    implementation: Implementation | None = None,
) -> jax.Array:
    """Hamming scores of packed query codes against packed key codes, GQA-aware.

    Args:
      q_codes: [B, Hkv, G, W] uint32: the G query heads sharing each KV head, b = 32 * W bits.
      k_codes: [B, Hkv, N, W] uint32 key codes (bit i of word w is bit 32 * w + i).
      lengths: [B] int32: slots n >= lengths[b] are not real.
      implementation: see the module docstring.

    Returns:
      [B, Hkv, N] int32: sum over g of b - 2 * popcount(q_g XOR k), in [-G*b, G*b];
      `HAMMING_SENTINEL` (int32 min) at slots past the length.
    """
    common.check_hamming_inputs(q_codes, k_codes, lengths)
    implementation = resolve_implementation(implementation, k_codes.shape[-1])
    return _HAMMING[implementation](q_codes, k_codes, lengths)


@functools.partial(jax.jit, static_argnames=("implementation",))
def asymmetric_scores(
    q_weights: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    *,
    implementation: Implementation | None = None,
) -> jax.Array:
    """Asymmetric scores: real query weights against packed key bits, GQA-aware.

    Args:
      q_weights: [B, Hkv, G, b] float32 real-valued query encodings, b = 32 * W.
      k_codes: [B, Hkv, N, W] uint32 key codes.
      lengths: [B] int32: slots n >= lengths[b] are not real.
      implementation: see the module docstring.

    Returns:
      [B, Hkv, N] float32: sum over g and i of w_gi * (2 * bit_i - 1), read from the packed bits;
      `ASYMMETRIC_SENTINEL` (-inf) at slots past the length. Implementations add in different
      orders, so they agree to float32 rounding (exactly when the sums are exact).
    """
    common.check_asymmetric_inputs(q_weights, k_codes, lengths)
    implementation = resolve_implementation(implementation, k_codes.shape[-1])
    return _ASYMMETRIC[implementation](q_weights, k_codes, lengths)


def select_topk(
    scores: jax.Array, k: int, value_range: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(scores, k)` by the fastest exact route on this backend: the linear-time radix
    select (`select.select_topk`, which takes the same arguments), except on GPU, where XLA's
    own top_k measured faster (H100, k = N/8: radix select 0.34x of it at N = 128K, 0.7x at 1M).
    """
    if jax.default_backend() == "gpu":
        common.check_topk_inputs(scores, k)
        return lax.top_k(scores, k)
    return select.select_topk(scores, k, value_range)


@functools.partial(jax.jit, static_argnames=("k", "implementation"))
def hamming_topk(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    k: int,
    implementation: Implementation | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k slots by hamming score per (batch, KV head): `select_topk(hamming_scores(...), k)`.

    Args:
      q_codes: [B, Hkv, G, W] uint32.
      k_codes: [B, Hkv, N, W] uint32.
      lengths: [B] int32.
      k: static, 1 <= k <= N. When k > lengths[b], the first sentinel slots fill the rest.
      implementation: see the module docstring.

    Returns:
      values [B, Hkv, k] int32 (descending) and indices [B, Hkv, k] int32.
    """
    common.check_hamming_inputs(q_codes, k_codes, lengths)
    batch, kv_heads, n_tokens, n_words = k_codes.shape
    common.check_k(k, (batch, kv_heads, n_tokens))
    implementation = resolve_implementation(implementation, n_words)
    scores = _HAMMING[implementation](q_codes, k_codes, lengths)  # [B, Hkv, N]
    # Real hamming scores lie in [-G*b, G*b]: the radix select's first window, known statically.
    max_score = q_codes.shape[2] * common.WORD_BITS * n_words
    return select_topk(scores, k, value_range=(-max_score, max_score))


@functools.partial(jax.jit, static_argnames=("implementation",))
def hamming_histogram(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    layer: jax.Array | None = None,
    implementation: Implementation | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Hamming distances of the selectable slots and their histogram, from one pass over the codes.

    Args:
      q_codes: [B, Hkv, G, W] uint32: the G query heads sharing each KV head, b = 32 * W bits.
      k_codes: [B, Hkv, N, W] uint32 key codes; or, with `layer`, every layer's [L, B, Hkv, N, W].
      lo, hi: [B] int32: row b's selectable slots are lo[b] <= n < hi[b] (none when hi <= lo).
      layer: int32 scalar, the layer of `k_codes` to read. The XLA path reads it in place; a
        slice taken by the caller is copied first (at N = 1M on CPU, 4x the scan itself).
      implementation: see the module docstring.

    Returns:
      distances [B, Hkv, N] int32: sum over g of popcount(q_g XOR k_n), in [0, G*b], at the
        selectable slots; `DISTANCE_SENTINEL` (int32 max) elsewhere.
      histogram [B, Hkv, G*b + 1] int32: histogram[d] = selectable slots with distance d.
    """
    one_layer = k_codes if layer is None else jax.ShapeDtypeStruct(k_codes.shape[1:], k_codes.dtype)
    common.check_histogram_inputs(q_codes, one_layer, lo, hi)
    implementation = resolve_implementation(implementation, k_codes.shape[-1], native=True)
    if implementation == "xla":
        return reference.hamming_histogram_reference(q_codes, k_codes, lo, hi, layer=layer)
    if implementation == "cpu":
        return cpu_native.hamming_histogram_cpu(q_codes, k_codes, lo, hi, layer=layer)
    layer_codes = k_codes if layer is None else k_codes[layer]
    return _HISTOGRAM[implementation](q_codes, layer_codes, lo, hi)


_rank_threshold = jax.jit(reference.rank_threshold)


@functools.partial(jax.jit, static_argnames=("n_bins", "implementation"))
def distance_histogram(
    distances: jax.Array, n_bins: int, *, implementation: Implementation | None = None
) -> jax.Array:
    """The histogram of distances that `hamming_histogram` did not produce (the asymmetric
    extension's, and the calibrated ones on XLA): [B, Hkv, N] int32 -> [B, Hkv, n_bins] int32,
    counting the values in [0, n_bins). XLA everywhere but on the CPU kernels ("cpu")."""
    if distances.dtype != jnp.int32 or distances.ndim != 3 or n_bins < 1:
        raise ValueError(f"want int32 distances [B, Hkv, N] and n_bins >= 1: {distances.shape=}")
    if resolve_implementation(implementation, 1, native=True) == "cpu":
        return cpu_native.distance_histogram_cpu(distances, n_bins)
    return reference.distance_histogram(distances, n_bins)


@functools.partial(jax.jit, static_argnames=("implementation",))
def calibrate_distances(
    distances: jax.Array,
    histogram: jax.Array,
    consensus: tuple | None = None,
    momentum: tuple | None = None,
    *,
    implementation: Implementation | None = None,
) -> tuple[jax.Array, jax.Array]:
    """DASH-KV's calibration: per-slot discounts off the distances of every KV head.

    A slot's discount is the sum of (a) consensus: `discount` units where at least `t_vote` KV
    heads of its row have D <= their threshold, and (b) momentum: round(scale * the sum of the
    weights listing it). Calibrated D = clip(D - discount, 0, bins - 1); the sentinel stays.

    Args:
      distances: [B, Hkv, N] int32 in [0, bins) or `DISTANCE_SENTINEL` (`hamming_histogram`'s).
      histogram: [B, Hkv, bins] int32, the histogram of `distances`.
      consensus: None (off) or (thresholds [B, Hkv] int32, t_vote int32 [], discount int32 []).
      momentum: None (off) or (slots [B, M] int32, weights [B, M] float32, scale float32 []):
        slots outside [0, N) are dropped; a slot's weights are summed in list order.
      implementation: see the module docstring; XLA everywhere but on the CPU kernels ("cpu"),
        which visit every slot only for the vote and update the histogram in place.

    Returns:
      calibrated distances [B, Hkv, N] and their histogram [B, Hkv, bins], int32.
    """
    common.check_calibrate_inputs(distances, histogram, consensus, momentum)
    if consensus is None and momentum is None:
        return distances, histogram
    if resolve_implementation(implementation, 1, native=True) == "cpu":
        return cpu_native.calibrate_distances_cpu(distances, histogram, consensus, momentum)
    return reference.calibrate_distances_reference(distances, histogram, consensus, momentum)


def rank_threshold(histogram: jax.Array, k: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """Where rank k falls in the histogram: the threshold T and the ties taken at it.

    Rank order is (distance ascending, slot ascending). The k lowest-ranked slots are those with
    D < T and the first `ties` slots (in slot order) with D == T.

    Args:
      histogram: [B, Hkv, bins] int32, from `hamming_histogram` (bins = G*b + 1).
      k: int >= 0, or int32 [B, Hkv] (or anything broadcasting to it), >= 0.

    Returns:
      threshold [B, Hkv] int32: the smallest t with cumsum(histogram)[t] >= k;
      ties [B, Hkv] int32: k - (slots with D < T).
      k == 0 gives (-1, 0); k >= the number of slots gives (bins - 1, histogram[bins - 1]),
      everything. Negative traced k counts as 0.
    """
    common.check_threshold_inputs(histogram, k)
    return _rank_threshold(histogram, k)


@functools.partial(jax.jit, static_argnames=("size", "implementation"))
def select_ranks(
    distances: jax.Array,
    lower: tuple[jax.Array, jax.Array],
    upper: tuple[jax.Array, jax.Array],
    size: int,
    *,
    implementation: Implementation | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The slots of rank k_a <= r < k_b, in ascending slot order, as a fixed-size index list.

    A slot with distance d ranks below k, for (T, ties) = rank_threshold(histogram, k), when
    d < T, or d == T and fewer than `ties` slots with D == T come before it. No sort: one
    prefix-sum pass over N. DASH-KV's tiers: ranks [0, k1), then [k1, k1 + k2).

    Args:
      distances: [B, Hkv, N] int32, from `hamming_histogram`.
      lower: (T_a, ties_a), int32 [B, Hkv] each: rank_threshold of k_a.
      upper: (T_b, ties_b), int32 [B, Hkv] each: rank_threshold of k_b.
      size: static int >= 0, the list length.
      implementation: see the module docstring.

    Returns:
      indices [B, Hkv, size] int32: the selected slots ascending, then -1; when more than
        `size` qualify, the first `size` of them.
      count [B, Hkv] int32: real entries in `indices`, min(size, selectable slots of rank in
        [k_a, k_b)).
    """
    common.check_select_inputs(distances, lower, upper, size)
    batch, kv_heads, _ = distances.shape
    if size == 0:
        empty = jnp.zeros((batch, kv_heads), jnp.int32)
        return jnp.zeros((batch, kv_heads, 0), jnp.int32), empty
    implementation = resolve_implementation(implementation, 1, native=True)
    return _SELECT_RANKS[implementation](distances, tuple(lower), tuple(upper), size)


def select_tiers(
    distances: jax.Array,
    uppers: tuple[tuple[jax.Array, jax.Array], ...],
    sizes: tuple[int, ...],
    *,
    implementation: Implementation | None = None,
) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """`select_ranks` of consecutive rank ranges [0, k_1), [k_1, k_2), ... (DASH-KV's tiers),
    given (T_i, ties_i) = rank_threshold(histogram, k_i): one (indices [B, Hkv, sizes[i]],
    count [B, Hkv]) per range, equal to those `select_ranks` calls. The XLA path computes each
    rank's mask once for the two ranges it bounds, the CPU kernel takes up to three ranges in
    one call; the Pallas kernels run one `select_ranks` a range."""
    if len(uppers) != len(sizes):
        raise ValueError(f"one size per rank bound, got {len(uppers)=} {len(sizes)=}")
    heads = distances.shape[:2]
    lowers = [(jnp.full(heads, -1, jnp.int32), jnp.zeros(heads, jnp.int32)), *uppers[:-1]]
    for lower, upper, size in zip(lowers, uppers, sizes, strict=True):
        common.check_select_inputs(distances, lower, upper, size)
    implementation = resolve_implementation(implementation, 1, native=True)
    if implementation == "cpu" and 0 not in sizes and len(sizes) < 4:
        return _select_tiers_cpu(distances, (lowers[0], *map(tuple, uppers)), tuple(sizes))
    if implementation != "xla" or 0 in sizes:
        return tuple(
            select_ranks(distances, lower, upper, size, implementation=implementation)
            for lower, upper, size in zip(lowers, uppers, sizes, strict=True)
        )
    return _select_tiers(distances, tuple(map(tuple, uppers)), tuple(sizes))


_select_tiers = jax.jit(reference.select_tiers_reference, static_argnames=("sizes",))
_select_tiers_cpu = jax.jit(cpu_native.select_ranges_cpu, static_argnames=("sizes",))


def _resolve_sparse(implementation: str | None, head_dim: int) -> str:
    """As `resolve_implementation`; None avoids pallas_gpu for a head_dim that is not a power of
    two (Triton's tensor sizes)."""
    if implementation is None and head_dim & (head_dim - 1):
        if available_implementations()[0] == "pallas_gpu":
            return "xla"
    return resolve_implementation(implementation, 1, native=True)


@functools.partial(jax.jit, static_argnames=("scale", "implementation"))
def gathered_logits(
    q: jax.Array,
    k_cache: jax.Array,
    slots: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    """Logits of the query group against the K rows a slot list names, the rows read by index.

    Args:
      q: [B, Hkv, G, D] float32 or bfloat16: the G query heads sharing each KV head.
      k_cache: [B, Hkv, N, D] float32 or bfloat16; with `layer`, a stack [L, B, Hkv, N, D].
      slots: [B, Hkv, E] int32: cache rows, in any order; entries outside [0, N) (-1 by
        convention) are unused.
      scale: static float (1 / sqrt(D) for attention).
      layer: None, or an int / int32 scalar (may be traced): read k_cache[layer] in place.
        Clipped to [0, L).
      implementation: see the module docstring.

    Returns:
      [B, Hkv, G, E] float32: scale * sum_d q[b, h, g, d] * k_cache[b, h, slots[b, h, e], d],
      products and sums in float32; -inf at unused entries.
    """
    common.check_gathered_logits_inputs(q, k_cache, slots, scale, layer)
    if slots.shape[2] == 0:
        return jnp.zeros((*q.shape[:3], 0), jnp.float32)
    implementation = _resolve_sparse(implementation, q.shape[3])
    return _GATHERED_LOGITS[implementation](q, k_cache, slots, scale=float(scale), layer=layer)


@functools.partial(jax.jit, static_argnames=("implementation",))
def gathered_attention(
    logits: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    implementation: Implementation | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One softmax per query head over a slot list, weighting the V rows read by index.

    Args:
      logits: [B, Hkv, G, M] float32: each entry's logit (exact or approximate).
      v_cache: [B, Hkv, N, D] float32 or bfloat16; with `layer`, a stack [L, B, Hkv, N, D].
      slots: [B, Hkv, M] int32: cache rows, in any order; entries outside [0, N) (-1 by
        convention) are unused, whatever their logit.
      layer: None, or an int / int32 scalar (may be traced): read v_cache[layer] in place.
        Clipped to [0, L).
      implementation: see the module docstring.

    Returns:
      out [B, Hkv, G, D] float32: sum_m softmax(logits)[m] * v_cache[slot_m]; 0 where a row has
        no valid entry.
      lse [B, Hkv, G] float32: logsumexp of the valid entries' logits; -inf where there is none.
        Entry m's weight is exp(logits[..., m] - lse).
    """
    common.check_gathered_attention_inputs(logits, v_cache, slots, layer)
    if slots.shape[2] == 0:
        batch, kv_heads, g_size, _ = logits.shape
        out = jnp.zeros((batch, kv_heads, g_size, v_cache.shape[-1]), jnp.float32)
        return out, jnp.full((batch, kv_heads, g_size), -jnp.inf, jnp.float32)
    implementation = _resolve_sparse(implementation, v_cache.shape[-1])
    return _GATHERED_ATTENTION[implementation](logits, v_cache, slots, layer=layer)


@functools.partial(jax.jit, static_argnames=("groups", "implementation"))
def code_logits(
    q_codes: jax.Array,
    k_codes: jax.Array,
    slots: jax.Array,
    scale: jax.Array,
    mlp: tuple | None = None,
    *,
    groups: int,
    layer: jax.Array | int | None = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    """Approximate logits from the codes a slot list names (DASH-KV's tier 2), read by index.

    Args:
      q_codes: [B, Hkv, G, W] uint32: the G query heads sharing each KV head, b = 32 W bits.
      k_codes: [B, Hkv, N, W] uint32; with `layer`, a stack [L, B, Hkv, N, W].
      slots: [B, Hkv, K] int32: code rows; entries outside [0, N) are unused.
      scale: [Hkv, G] float32: each query head's weight on the hash similarity.
      mlp: None, or float32 (w1 [groups, H], b1 [H], w2 [H], b2 []): the residual MLP.
      groups: static: the b bits split into this many equal groups, tiling 32-bit words.
      layer: None, or an int / int32 scalar (may be traced), clipped to [0, L).
      implementation: see the module docstring; the CPU kernel ("cpu") or XLA elsewhere.

    Returns:
      [B, Hkv, G, K] float32: scale[h, g] s + w2 . gelu(x w1 + b1) + b2 with s = 1 - 2
      popcount(q_g XOR k) / b and x_j = 2 (group j's share of equal bits) - 1 (no MLP: 0);
      gelu in jax.nn.gelu's tanh form; -inf at unused entries.
    """
    common.check_code_logits_inputs(q_codes, k_codes, slots, scale, mlp, groups, layer)
    if slots.shape[2] == 0:
        return jnp.zeros((*q_codes.shape[:3], 0), jnp.float32)
    if resolve_implementation(implementation, q_codes.shape[3], native=True) == "cpu":
        return cpu_native.code_logits_cpu(
            q_codes, k_codes, slots, scale, mlp, groups=groups, layer=layer
        )
    return reference.code_logits_reference(
        q_codes, k_codes, slots, scale, mlp, groups=groups, layer=layer
    )
