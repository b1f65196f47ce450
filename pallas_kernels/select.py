"""Exact top-k along the last axis in time linear in N: radix select, then bit-packed compaction.

`select_topk(scores, k)` returns what `lax.top_k(scores, k)` returns (values in descending order,
ties toward the lower index) without sorting the N scores. Per row:

1. Scores become int32 order keys (floats through their total-order bit pattern), so one
   routine serves hamming and asymmetric scores.
2. Radix select finds the k-th largest key T: each pass histograms the keys of the current
   window into `RADIX_BINS` buckets and narrows the window to the bucket holding the k-th
   largest. For int32 scores the first window is the `RADIX_BINS` values below the row maximum:
   hamming scores span at most 2*G*b + 1 values, so one pass suffices, and sentinel slots
   (below every real score) only cost a pass when a row holds fewer than k real scores.
3. The picks are every key > T plus the first (k - count(key > T)) keys == T in index order.
   Their positions come from bit-packed masks: a cumulative popcount over the N/32 words, a
   merge of the k ranks into it, and a 5-step search inside each word, O(N + k).
4. The k picks (not the N scores) are sorted by (key descending, index ascending), as one
   packed word each when the key range allows.

On CPU rows are processed one at a time by `lax.map` (see `map_rows`); elsewhere all rows go in
one vectorised step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import common, reference

RADIX_BITS = 12
RADIX_BINS = 1 << RADIX_BITS
WORD_BITS = 32
# On CPU, rows are processed in groups of about this many scores.
CPU_GROUP_ELEMENTS = 1 << 16
_INT32_MIN = int(np.iinfo(np.int32).min)
_INT32_MAX = int(np.iinfo(np.int32).max)
_SENTINEL_BITS = int(np.array(common.ASYMMETRIC_SENTINEL, np.float32).view(np.int32))
_ASYMMETRIC_SENTINEL_KEY = _SENTINEL_BITS ^ (_INT32_MAX if _SENTINEL_BITS < 0 else 0)


def order_keys(scores: jax.Array) -> jax.Array:
    """int32 or float32 scores -> int32 keys in the same (total) order.

    A float's bit pattern read as int32 orders non-negative floats; flipping the magnitude bits
    of negative ones reverses their order. -0.0 sorts below +0.0, as in `lax.top_k`.
    """
    if scores.dtype == jnp.int32:
        return scores
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    return bits ^ ((bits >> 31) & _INT32_MAX)


def kth_largest_key(
    keys: jax.Array, k: int, lo: jax.Array, hi: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Radix select on one row.

    Args:
      keys: [N] int32.
      k: static rank, 1 <= k <= N.
      lo, hi: int32 scalars, the first window [lo, hi]; it must contain the row maximum. If it
        holds fewer than k keys, the search moves to [int32 min, lo - 1].

    Returns:
      (T, needed): the k-th largest key, and k - count(keys > T), the number of keys equal
      to T among the top k.
    """

    def one_pass(state):
        lo, hi, rank, _ = state  # int32 scalars; rank is the wanted rank within [lo, hi]
        span = hi.astype(jnp.uint32) - lo.astype(jnp.uint32)  # exact: hi - lo < 2**32
        shift = jnp.maximum(WORD_BITS - lax.clz(span).astype(jnp.int32) - RADIX_BITS, 0)
        shift = shift.astype(jnp.uint32)
        in_window = (keys >= lo) & (keys <= hi)
        bucket = (keys.astype(jnp.uint32) - lo.astype(jnp.uint32)) >> shift  # < bins in window
        bucket = jnp.where(in_window, bucket.astype(jnp.int32), RADIX_BINS)  # outside: dropped
        hist = jnp.zeros(RADIX_BINS, jnp.int32).at[bucket].add(1, mode="drop")
        at_or_above = jnp.cumsum(hist[::-1])[::-1]  # [bins] keys in buckets >= j
        total = at_or_above[0]
        j = jnp.sum(at_or_above >= rank, dtype=jnp.int32) - 1  # bucket holding the rank
        above = jnp.where(j + 1 < RADIX_BINS, at_or_above[jnp.minimum(j + 1, RADIX_BINS - 1)], 0)
        width = (j.astype(jnp.uint32) << shift).astype(jnp.uint32)
        new_lo = lo.astype(jnp.uint32) + width
        new_hi = new_lo + jnp.minimum(span - width, (jnp.uint32(1) << shift) - 1)
        fits = total >= rank
        return (
            jnp.where(fits, new_lo.astype(jnp.int32), _INT32_MIN),
            jnp.where(fits, new_hi.astype(jnp.int32), lo - 1),
            jnp.where(fits, rank - above, rank - total),
            fits & (shift == 0),
        )

    # Scalars shaped like `keys` (full_like keeps shard_map's varying-axes type for the carry).
    zero = lax.full_like(keys, 0, shape=())
    state = (zero + lo, zero + hi, zero + k, lax.full_like(keys, False, jnp.bool_, ()))
    threshold, _, needed, _ = lax.while_loop(lambda s: ~s[3], one_pass, state)
    return threshold, needed


def nth_set_bits(words: jax.Array, ranks: jax.Array | int) -> jax.Array:
    """Positions of set bits by rank, in index order from rank 0.

    Args:
      words: [NW] uint32 bit mask.
      ranks: [M] int32 ranks below the number of set bits; or an int M for ranks 0..M-1
        (then M must equal the number of set bits), found by a merge instead of M searches.

    Returns:
      [M] int32 bit positions.
    """
    counts = lax.population_count(words).astype(jnp.int32)  # [NW]
    inclusive = jnp.cumsum(counts)  # [NW] set bits up to and including each word
    if isinstance(ranks, int):
        # The word holding rank r is the number of words whose inclusive count is <= r.
        ends = jnp.zeros(ranks, jnp.int32).at[inclusive].add(1, mode="drop")  # [M]
        word = jnp.cumsum(ends)
        ranks = jnp.arange(ranks, dtype=jnp.int32)
    else:
        word = jnp.searchsorted(inclusive, ranks, side="right")
    word = jnp.minimum(word, words.shape[0] - 1)  # [M]
    bit = reference.nth_set_bit_in_word(words[word], ranks - (inclusive - counts)[word])
    return word * WORD_BITS + bit


def _prefix_mask(n_words: int, cut: jax.Array) -> jax.Array:
    """int32 cut -> [n_words] uint32 words with bits [0, cut) set."""
    bits_in = jnp.clip(cut - jnp.arange(n_words, dtype=jnp.int32) * WORD_BITS, 0, WORD_BITS)
    partial = (jnp.uint32(1) << jnp.minimum(bits_in, WORD_BITS - 1).astype(jnp.uint32)) - 1
    return jnp.where(bits_in == WORD_BITS, jnp.uint32(0xFFFFFFFF), partial)


def _sort_picks(keys: jax.Array, indices: jax.Array, n: int) -> jax.Array:
    """Orders picks [k] (ascending indices) by key descending, then index ascending."""
    index_bits = max(1, (n - 1).bit_length())
    if index_bits >= WORD_BITS:
        return lax.sort((~keys, indices), is_stable=True, num_keys=1)[1]
    # When the key range of the picks fits beside the index in 32 bits, one sort of packed
    # words does it (several times faster than a stable sort of pairs on CPU).
    offset = jnp.max(keys).astype(jnp.uint32) - keys.astype(jnp.uint32)  # [k] >= 0
    fits = jnp.max(offset) < jnp.uint32(1 << (WORD_BITS - index_bits))

    def packed(offset, indices):
        word = (offset << index_bits) | indices.astype(jnp.uint32)
        return (lax.sort(word) & jnp.uint32((1 << index_bits) - 1)).astype(jnp.int32)

    def pairs(offset, indices):
        return lax.sort((offset, indices), is_stable=True, num_keys=1)[1]

    return lax.cond(fits, packed, pairs, offset, indices)


def select_row(
    scores: jax.Array, k: int, value_range: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """One row: [N] scores -> ([k] values, [k] int32 indices), ordered like `lax.top_k`.

    `value_range` (int32 scores only): static bounds of the real scores, if known.
    """
    (n,) = scores.shape
    keys = order_keys(scores)
    if value_range is not None and value_range[1] - value_range[0] < RADIX_BINS:
        # Known narrow range (hamming: [-G*b, G*b]): one pass, and no pass to find the maximum.
        lo, hi = jnp.int32(value_range[0]), jnp.int32(value_range[1])
    elif scores.dtype == jnp.int32:
        hi = jnp.max(keys)
        # Hamming scores span at most 2*G*b + 1 values: try the bins just below the maximum.
        lo = jnp.where(hi < _INT32_MIN + RADIX_BINS - 1, _INT32_MIN, hi - (RADIX_BINS - 1))
    else:
        # Floats spread over the key space: start from the smallest non-sentinel key.
        hi = jnp.max(keys)
        lo = jnp.min(jnp.where(keys > _ASYMMETRIC_SENTINEL_KEY, keys, hi))
    threshold, needed = kth_largest_key(keys, k, lo, hi)
    # Ties at the threshold go to the lowest indices: keep the first `needed` of them.
    tied_words = reference.pack_rows(keys == threshold)
    cut = nth_set_bits(tied_words, needed[None] - 1)[0] + 1  # first tied index not taken
    picked_words = reference.pack_rows(keys > threshold) | (
        tied_words & _prefix_mask(tied_words.shape[0], cut)
    )
    indices = nth_set_bits(picked_words, k)  # [k] ascending
    indices = _sort_picks(keys[indices], indices, n)
    return scores[indices], indices


def map_rows(fn, rows, row_elements: int):
    """Applies the one-row `fn` over the leading axis of `rows` (a pytree).

    On CPU, rows go one at a time (or in groups of about CPU_GROUP_ELEMENTS scores when short):
    a sequential loop keeps temporaries at the size of a row, and XLA:CPU runs the scatter and
    search of one row faster than their batched forms. Elsewhere all rows go in one step.
    """
    n_rows = jax.tree.leaves(rows)[0].shape[0]
    if jax.default_backend() != "cpu":
        return jax.vmap(fn)(rows)
    group = min(n_rows, CPU_GROUP_ELEMENTS // max(row_elements, 1))
    return lax.map(fn, rows, batch_size=group if group > 1 else None)


@functools.partial(jax.jit, static_argnames=("k", "value_range"))
def select_topk(
    scores: jax.Array, k: int, value_range: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k along the last axis, equal to `lax.top_k(scores, k)`, linear in N.

    Args:
      scores: [..., N] int32 (hamming) or float32 (asymmetric) scores. Sentinel slots
        (`HAMMING_SENTINEL`, `ASYMMETRIC_SENTINEL`) are below every real score, so they are
        chosen only when a row holds fewer than k real scores. No NaNs.
      k: static, 1 <= k <= N.
      value_range: static (lo, hi) bounding every real (non-sentinel) int32 score, when known
        (hamming: (-G*b, G*b)); it saves the pass that finds the row maximum. Results are wrong
        if a real score lies outside. None for float32 scores.

    Returns:
      values [..., k] (scores.dtype) in descending order and indices [..., k] int32; equal
      values are ordered by ascending index.
    """
    common.check_topk_inputs(scores, k)
    *batch, n = scores.shape
    rows = scores.reshape(-1, n)
    if value_range is not None and scores.dtype != jnp.int32:
        raise ValueError(f"value_range is for int32 scores, got {scores.dtype=}")
    row_fn = functools.partial(select_row, k=k, value_range=value_range)
    values, indices = map_rows(row_fn, rows, n)
    return values.reshape(*batch, k), indices.reshape(*batch, k)
