"""XLA reference: the meaning of correct, and the CPU implementation.

Distances are counted word by word over the codes as stored ([B, Hkv, N, W], contiguous) and
summed over the W words last; `asymmetric_scores_reference` reads one word's slice at a time.

The selection primitives (`hamming_histogram_reference`, `rank_threshold`,
`select_ranks_reference`) work in distance units, D = sum_g popcount(q_g XOR k) in [0, G*b], and
use no sort. XLA:CPU runs a one-dimensional scatter-add at about a nanosecond an update but a
batched one several times slower, and a cumulative sum over N at about 9 ns a slot (a log-depth
scan); so histograms are one flat scatter over every (row, bin), and prefix sums run over
bit-packed masks (N / 32 words) rather than over the N slots.

Sparse attention (`gathered_logits_reference`, `gathered_attention_reference`) reads cache rows
by slot in blocks that stay in cache, each gathered as 64-byte lines in an order that keeps many
loads in flight (see that section).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import common

WORD_BITS = common.WORD_BITS


def _popcount(x: jax.Array) -> jax.Array:
    """Set bits of each uint32, as int32."""
    return lax.population_count(x).astype(jnp.int32)


def valid_slots(lengths: jax.Array, n: int) -> jax.Array:
    """[B] int32 lengths -> [B, 1, N] bool, True for slots below the row's length."""
    return jnp.arange(n, dtype=jnp.int32)[None, None, :] < lengths[:, None, None]


def _carry_save_add(a, b, c):
    """Bitwise full adder over words: (sum, carry) with popcount(a)+popcount(b)+popcount(c) =
    popcount(sum) + 2 * popcount(carry)."""
    partial = a ^ b
    return partial ^ c, (a & b) | (partial & c)


def weighted_popcount_sum(terms: list[tuple[int, jax.Array]]) -> jax.Array:
    """sum over (j, x) in terms of 2**j * popcount(x), for uint32 arrays x of one shape -> int32.

    A carry-save adder tree (Harley-Seal) merges words of equal weight three into two, so m
    words cost about log2(m) popcounts instead of m.
    """
    pending: dict[int, list[jax.Array]] = {}
    for j, x in terms:
        pending.setdefault(j, []).append(x)
    total = 0
    j = 0
    while pending:
        level, carries = pending.pop(j, []), []
        while len(level) >= 3:
            total_bits, carry = _carry_save_add(level.pop(), level.pop(), level.pop())
            level.append(total_bits)
            carries.append(carry)
        if len(level) == 2:  # half adder
            a, b = level
            level = [a ^ b]
            carries.append(a & b)
        if level:
            total = total + (_popcount(level[0]) << j)
        if carries:
            pending.setdefault(j + 1, []).extend(carries)
        j += 1
    return total


def query_bit_planes(q_codes: jax.Array) -> tuple[list[tuple[int, jax.Array]], int]:
    """Rewrites a query group so that sum_g popcount(q_g ^ k) needs fewer popcounts.

    For G' = 2**L - 1 query words, let c_i count those with bit i set and P_j be the word of bits
    j of the c_i. Then sum_g [q_gi != k_i] is c_i when k_i = 0 and G' - c_i when k_i = 1, and
    both equal sum_j 2**j [P_ji != k_i] (G' - c_i is c_i with its L bits flipped). So
    sum_g popcount(q_g ^ k) = sum_j 2**j popcount(P_j ^ k): L popcounts for G' words.
    An odd G is padded to G' with pairs of words (0, ~0), which add exactly 32 per word pair;
    an even G keeps one word apart as its own term.

    Args:
      q_codes: [B, Hkv, G, W] uint32.

    Returns:
      (terms, offset): terms are (j, [B, Hkv, W] uint32 planes) such that for key words k_w,
      sum_g sum_w popcount(q_gw ^ k_w) = sum_(j, plane) sum_w 2**j popcount(plane_w ^ k_w) - offset.
    """
    g_size, n_words = q_codes.shape[2:]
    terms = []
    if g_size % 2 == 0:
        terms.append((0, q_codes[:, :, -1]))
        q_codes, g_size = q_codes[:, :, :-1], g_size - 1
    n_planes = g_size.bit_length()
    pad_pairs = (2**n_planes - 1 - g_size) // 2
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    bits = (q_codes[..., None] >> shifts) & 1  # [B, Hkv, G, W, 32]
    counts = jnp.sum(bits, axis=2, dtype=jnp.uint32) + pad_pairs  # [B, Hkv, W, 32]
    for j in range(n_planes):
        plane = jnp.sum(((counts >> j) & 1) << shifts, axis=-1, dtype=jnp.uint32)  # [B, Hkv, W]
        terms.append((j, plane))
    return terms, pad_pairs * WORD_BITS * n_words


def group_distances(
    q_codes: jax.Array,  # [B, Hkv, G, W] uint32
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32
) -> jax.Array:  # [B, Hkv, N] int32
    """sum_g popcount(q_g XOR k_n), in [0, G * b], for every slot.

    The G popcounts per word are cut to about log2 G by `query_bit_planes` and
    `weighted_popcount_sum`, counted over the codes as stored and summed over the words last:
    a slice per word strides by W, which XLA:CPU ran at a third of the speed (N = 1M, W = 4).
    Tests check the result against a NumPy bit-by-bit count.
    """
    planes, offset = query_bit_planes(q_codes)
    words = [(j, k_codes ^ plane[:, :, None, :]) for j, plane in planes]  # [B, Hkv, N, W]
    per_word = weighted_popcount_sum(words)  # [B, Hkv, N, W]
    return per_word.sum(axis=-1) - offset


def hamming_scores_reference(
    q_codes: jax.Array,  # [B, Hkv, G, W] uint32
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32
    lengths: jax.Array,  # [B] int32
) -> jax.Array:  # [B, Hkv, N] int32
    """sum_g (b - 2 * popcount(q_g XOR k)); slots >= lengths[b] get HAMMING_SENTINEL."""
    _, _, g_size, n_words = q_codes.shape
    differing = group_distances(q_codes, k_codes)  # [B, Hkv, N]
    scores = g_size * WORD_BITS * n_words - 2 * differing
    return jnp.where(valid_slots(lengths, k_codes.shape[2]), scores, common.HAMMING_SENTINEL)


def asymmetric_scores_reference(
    q_weights: jax.Array,  # [B, Hkv, G, b] float32
    k_codes: jax.Array,  # [B, Hkv, N, b // 32] uint32
    lengths: jax.Array,  # [B] int32
) -> jax.Array:  # [B, Hkv, N] float32
    """sum_g sum_i w_gi * (2 * bit_i - 1), read by bit slicing; slots >= length get -inf.

    The group sum is taken first (sum_g w_gi), then bits are added in order i = 0, 1, ..., b-1.
    """
    weights = jnp.sum(q_weights, axis=2)  # [B, Hkv, b]

    def add_word(w, scores):  # scores [B, Hkv, N] += the 32 bits of word w, in order
        k_word = lax.dynamic_index_in_dim(k_codes, w, axis=3, keepdims=False)  # [B, Hkv, N]
        word_weights = lax.dynamic_slice_in_dim(weights, w * WORD_BITS, WORD_BITS, axis=2)
        for j in range(WORD_BITS):
            weight = word_weights[:, :, j, None]  # [B, Hkv, 1]
            bit_set = (k_word >> j) & 1 == 1
            scores += jnp.where(bit_set, weight, -weight)
        return scores

    # A loop, not b adds in one expression: XLA:CPU fused that expression into each consumer
    # (the top-C's mask packing, 7 places) and recomputed it there; scores + top-C took 3x to
    # 19x as long as the two apart (b = 128, N = 8064 and 8026).
    scores = lax.fori_loop(
        0, k_codes.shape[-1], add_word, jnp.zeros(k_codes.shape[:3], jnp.float32)
    )  # [B, Hkv, N]
    return jnp.where(valid_slots(lengths, k_codes.shape[2]), scores, common.ASYMMETRIC_SENTINEL)


def select_topk_reference(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-k along the last axis: `lax.top_k` (descending, ties toward the lower index)."""
    return lax.top_k(scores, k)


def unfused(fn, *args):
    """fn(*args), where XLA cannot fuse it into its consumers.

    XLA:CPU fuses cheap producers into every consumer: into two, it computes them twice (the
    popcounts would read the codes twice); fused with a gather, a whole elementwise loop runs
    unvectorised (the compaction below ran 3x slower). `lax.optimization_barrier` does not
    hold (XLA:CPU removes barriers before fusion); a conditional does. Both branches are fn, so
    the predicate, which XLA cannot fold, decides nothing else.
    """
    first = jax.tree.leaves(args)[0].reshape(-1)[0].astype(jnp.int32)
    return lax.cond(first != np.iinfo(np.int32).min, fn, fn, *args)


def selectable_slots(lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
    """[B] int32 bounds -> [B, 1, N] bool, True for the slots lo[b] <= n < hi[b]."""
    slot = jnp.arange(n, dtype=jnp.int32)[None, None, :]
    return (slot >= lo[:, None, None]) & (slot < hi[:, None, None])


def masked_distances(
    q_codes: jax.Array,  # [B, Hkv, G, W] uint32
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32
    lo: jax.Array,  # [B] int32
    hi: jax.Array,  # [B] int32
) -> jax.Array:  # [B, Hkv, N] int32
    """`group_distances` of the slots lo <= n < hi, DISTANCE_SENTINEL elsewhere."""
    selectable = selectable_slots(lo, hi, k_codes.shape[2])  # [B, 1, N]
    return jnp.where(selectable, group_distances(q_codes, k_codes), common.DISTANCE_SENTINEL)


def hamming_histogram_reference(
    q_codes: jax.Array,  # [B, Hkv, G, W] uint32
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32, or [L, B, Hkv, N, W] with `layer`
    lo: jax.Array,  # [B] int32
    hi: jax.Array,  # [B] int32
    layer: jax.Array | None = None,  # int32 scalar
) -> tuple[jax.Array, jax.Array]:  # [B, Hkv, N] int32, [B, Hkv, G*b + 1] int32
    """Distances sum_g popcount(q_g XOR k) of the selectable slots (DISTANCE_SENTINEL elsewhere)
    and their histogram, from one evaluation of the distances.

    The histogram is one scatter-add over a flat [B * Hkv * bins] array (bin row * bins + D);
    slots outside [lo, hi) point past its end and are dropped.
    """

    def layer_distances(q_codes, k_codes, lo, hi, layer):
        # Sliced here, inside the conditional, the layer is read in place: an operand of the
        # conditional is materialised first (a copy of the layer, 4x the scan at N = 1M).
        return masked_distances(q_codes, k_codes if layer is None else k_codes[layer], lo, hi)

    # Fused into both consumers (this output and the scatter's indices), the popcounts would
    # read the codes twice.
    distances = unfused(layer_distances, q_codes, k_codes, lo, hi, layer)  # [B, Hkv, N]
    return distances, distance_histogram(distances, common.histogram_bins(q_codes.shape))


def distance_histogram(distances: jax.Array, n_bins: int) -> jax.Array:
    """Counts of each distance in [0, n_bins) per row: [B, Hkv, N] int32 -> [B, Hkv, n_bins]
    int32 (other values, the sentinel among them, are not counted).

    One scatter-add over a flat [B * Hkv * n_bins] array (bin row * n_bins + D): on CPU about
    7x faster than a batched scatter; a value out of range points past its end and is dropped.
    """
    batch, kv_heads, _ = distances.shape
    n_rows = batch * kv_heads
    row_start = (jnp.arange(n_rows, dtype=jnp.int32) * n_bins).reshape(batch, kv_heads, 1)
    inside = (distances >= 0) & (distances < n_bins)
    flat_bin = jnp.where(inside, row_start + distances, n_rows * n_bins)
    histogram = jnp.zeros(n_rows * n_bins, jnp.int32).at[flat_bin.reshape(-1)].add(1, mode="drop")
    return histogram.reshape(batch, kv_heads, n_bins)


def calibrate_distances_reference(
    distances: jax.Array,  # [B, Hkv, N] int32
    histogram: jax.Array,  # [B, Hkv, bins] int32
    consensus: tuple | None,  # (thresholds [B, Hkv] int32, t_vote, discount) int32 scalars
    momentum: tuple | None,  # (slots [B, M] int32, weights [B, M] float32, scale float32 [])
) -> tuple[jax.Array, jax.Array]:  # [B, Hkv, N], [B, Hkv, bins] int32
    """DASH-KV's calibrated distances and their histogram (`api.calibrate_distances`): each
    slot's discount, summed over the two, is taken off its distance in every KV head, clipped
    to [0, bins). The histogram is counted again (the kernels update the one given)."""
    batch, _, n = distances.shape
    n_bins = histogram.shape[-1]
    discount = jnp.zeros((batch, n), jnp.int32)
    if consensus is not None:
        thresholds, t_vote, units = consensus
        votes = (distances <= thresholds[..., None]).sum(axis=1)  # [B, N]: ties count
        discount += jnp.where(votes >= t_vote, units, 0)
    if momentum is not None:
        slots, weights, scale = momentum
        slots = jnp.where((slots >= 0) & (slots < n), slots, n)  # n: dropped
        rows = jnp.arange(batch)[:, None]
        attention = jnp.zeros((batch, n), jnp.float32).at[rows, slots].add(weights, mode="drop")
        discount += jnp.round(scale * attention).astype(jnp.int32)

    def discounted(distances, discount):  # [B, Hkv, N], [B, N] -> [B, Hkv, N]
        calibrated = jnp.clip(distances - discount[:, None], 0, n_bins - 1)
        return jnp.where(distances != common.DISTANCE_SENTINEL, calibrated, distances)

    # Written once: fused into its consumers (the histogram, each tier's mask packing), the
    # vote and the discounts were computed five times over every slot.
    calibrated = unfused(discounted, distances, discount)
    return calibrated, distance_histogram(calibrated, n_bins)


def rank_threshold(
    histogram: jax.Array,  # [B, Hkv, bins] int32
    k: jax.Array | int,  # [B, Hkv] int32 (or broadcastable), >= 0
) -> tuple[jax.Array, jax.Array]:  # [B, Hkv] int32 each
    """(T, ties) of rank k: T = the smallest t with cumsum(histogram)[t] >= k, ties = k - the
    count of slots below T. k == 0 gives (-1, 0); k >= the count of slots gives
    (bins - 1, histogram[bins - 1]): everything. Negative k counts as 0."""
    n_bins = histogram.shape[-1]
    k = jnp.maximum(jnp.broadcast_to(jnp.asarray(k, jnp.int32), histogram.shape[:-1]), 0)
    cumulative = jnp.cumsum(histogram, axis=-1)  # [B, Hkv, bins]
    everything = k >= cumulative[..., -1]
    threshold = jnp.sum(cumulative < k[..., None], axis=-1, dtype=jnp.int32)
    threshold = jnp.where(everything, n_bins - 1, threshold)
    at_threshold = jnp.take_along_axis(histogram, threshold[..., None], axis=-1)[..., 0]
    below = jnp.take_along_axis(cumulative, threshold[..., None], axis=-1)[..., 0] - at_threshold
    ties = jnp.minimum(k - below, at_threshold)
    return jnp.where(k == 0, -1, threshold), jnp.where(k == 0, 0, ties)


def pack_rows(mask: jax.Array) -> jax.Array:
    """[..., N] bool -> [..., ceil(N / 32)] uint32, bit i of word w = mask[..., 32 * w + i].

    The whole words and the last partial one are packed apart: padding the mask to whole words
    inside the fused loop made XLA:CPU run it unvectorised, 10x slower (a cache of 32786 slots
    decoded 3x slower than one of 32832)."""
    *lead, n = mask.shape
    whole = n // WORD_BITS * WORD_BITS

    def pack(bits):  # [..., 32 k] bool -> [..., k] uint32
        bits = bits.reshape(*lead, -1, WORD_BITS).astype(jnp.uint32)
        # Distinct powers of two: the sum is a bitwise OR.
        return jnp.sum(bits << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)

    if whole == n:
        return pack(mask)
    tail = jnp.pad(mask[..., whole:], [(0, 0)] * len(lead) + [(0, whole + WORD_BITS - n)])
    return jnp.concatenate([pack(mask[..., :whole]), pack(tail)], axis=-1)


def nth_set_bit_in_word(word: jax.Array, n: jax.Array) -> jax.Array:
    """Position of the n-th (0-based) set bit of each uint32 `word`, for n < popcount(word)."""
    position = jnp.zeros(word.shape, jnp.int32)
    for width in (16, 8, 4, 2, 1):
        low = _popcount(word & jnp.uint32((1 << width) - 1))
        upper = n >= low
        n = jnp.where(upper, n - low, n)
        word = jnp.where(upper, word >> width, word)
        position = position + jnp.where(upper, width, 0)
    return position


def _take_rows(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [R, M], index [R, K] in [0, M) -> values[r, index[r, j]] as [R, K], by one flat
    gather (XLA:CPU runs it faster than a batched one)."""
    n_rows, width = values.shape
    flat = jnp.arange(n_rows, dtype=jnp.int32)[:, None] * width + index
    return values.reshape(-1).at[flat].get(mode="promise_in_bounds")


def tie_cut(equal_words: jax.Array, ties: jax.Array) -> jax.Array:
    """The slot after the ties-th set bit of each row (0 when ties <= 0; past every slot when the
    row has fewer): the ties taken at a threshold are the equal slots below the cut.

    Args:
      equal_words: [R, NW] uint32 packed mask of the slots at the threshold.
      ties: [R] int32.

    Returns:
      [R] int32.
    """
    n_words = equal_words.shape[-1]
    counts = _popcount(equal_words)  # [R, NW]
    inclusive = jnp.cumsum(counts, axis=-1)
    word = jnp.sum(inclusive < ties[:, None], axis=-1, dtype=jnp.int32)  # holds tie number ties-1
    clipped = jnp.minimum(word, n_words - 1)[:, None]  # [R, 1]
    before = _take_rows(inclusive - counts, clipped)[:, 0]
    bit = nth_set_bit_in_word(_take_rows(equal_words, clipped)[:, 0], ties - 1 - before)
    cut = jnp.where(word >= n_words, n_words * WORD_BITS, word * WORD_BITS + bit + 1)
    return jnp.where(ties <= 0, 0, cut)


def compact_words(words: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the set bits of each row, ascending, in a fixed-size list.

    Rank j lies in word #{w : inclusive[w] <= j} (inclusive: set bits up to and including w):
    each word end inclusive[w] < size is marked by one flat scatter-add, and a cumulative sum
    over the `size` ranks turns the marks into word numbers: O(N / 32 + size), no search over
    the words.

    Args:
      words: [R, NW] uint32 packed masks.
      size: static list length.

    Returns:
      indices [R, size] int32 (the first `size` set bits, then -1) and count [R] int32.
    """
    n_rows, n_words = words.shape
    counts = _popcount(words)  # [R, NW]
    inclusive = jnp.cumsum(counts, axis=-1)
    row_start = jnp.arange(n_rows, dtype=jnp.int32)[:, None] * size
    ends = jnp.where(inclusive < size, row_start + inclusive, n_rows * size)  # [R, NW]
    marks = jnp.zeros(n_rows * size, jnp.int32).at[ends.reshape(-1)].add(1, mode="drop")
    word = jnp.minimum(jnp.cumsum(marks.reshape(n_rows, size), axis=-1), n_words - 1)  # [R, size]

    def gather(word, inclusive, counts, words):  # [R, size] each
        return _take_rows(inclusive - counts, word), _take_rows(words, word)

    # Apart, so that the in-word search below runs vectorised.
    before, bits = unfused(gather, word, inclusive, counts, words)
    rank = jnp.arange(size, dtype=jnp.int32)[None, :]
    bit = nth_set_bit_in_word(bits, rank - before)
    count = jnp.minimum(inclusive[:, -1], size)  # [R]
    return jnp.where(rank < count[:, None], word * WORD_BITS + bit, -1), count


def _below_rank(rows: jax.Array, threshold: jax.Array, ties: jax.Array) -> jax.Array:
    """rows [R, N] int32, (threshold, ties) [R] each -> [R, N] bool: the slots below that rank,
    D < T, or D == T and below `tie_cut` of the packed D == T mask."""
    slot = jnp.arange(rows.shape[1], dtype=jnp.int32)[None, :]
    threshold = threshold[:, None]
    cut = tie_cut(pack_rows(rows == threshold), ties)  # [R]
    return (rows < threshold) | ((rows == threshold) & (slot < cut[:, None]))


def select_ranks_reference(
    distances: jax.Array,  # [B, Hkv, N] int32
    lower: tuple[jax.Array, jax.Array],  # (T_a, ties_a) [B, Hkv] int32 each
    upper: tuple[jax.Array, jax.Array],  # (T_b, ties_b) [B, Hkv] int32 each
    size: int,
) -> tuple[jax.Array, jax.Array]:  # [B, Hkv, size] int32, [B, Hkv] int32
    """The slots of rank in [k_a, k_b), ascending, padded with -1; and their count (<= size).

    A slot is below rank k, given (T, ties) = rank_threshold(histogram, k), when D < T, or
    D == T and it is among the first `ties` slots with D == T: below `tie_cut` of the packed
    D == T mask. Ranks below k_b and not below k_a are packed into N / 32 words and compacted.
    """
    batch, kv_heads, n_tokens = distances.shape
    rows = distances.reshape(batch * kv_heads, n_tokens)
    below = [_below_rank(rows, t.reshape(-1), ties.reshape(-1)) for t, ties in (lower, upper)]
    indices, count = compact_words(pack_rows(below[1] & ~below[0]), size)
    return indices.reshape(batch, kv_heads, size), count.reshape(batch, kv_heads)


def select_tiers_reference(
    distances: jax.Array,  # [B, Hkv, N] int32
    uppers: tuple[tuple[jax.Array, jax.Array], ...],  # (T_i, ties_i) [B, Hkv] int32 each
    sizes: tuple[int, ...],
) -> tuple[tuple[jax.Array, jax.Array], ...]:  # ([B, Hkv, size_i], [B, Hkv]) int32 per tier
    """`select_ranks` of the consecutive rank ranges [0, k_1), [k_1, k_2), ...: each rank's
    below-mask is computed once and shared by the two tiers it bounds."""
    batch, kv_heads, n_tokens = distances.shape
    rows = distances.reshape(batch * kv_heads, n_tokens)
    tiers, before = [], None
    for (threshold, ties), size in zip(uppers, sizes, strict=True):
        below = _below_rank(rows, threshold.reshape(-1), ties.reshape(-1))
        indices, count = compact_words(
            pack_rows(below if before is None else below & ~before), size
        )
        tiers.append((indices.reshape(batch, kv_heads, size), count.reshape(batch, kv_heads)))
        before = below
    return tuple(tiers)


# --- Sparse attention: K and V rows read by slot -----------------------------------------------
#
# XLA:CPU gathers a [K, D] block of rows in output order, one row after another, and each row
# of a sparse slot list is a cache miss: about 200 ns a row (N = 1M, K = N/32, 2-core VM), 2.6x
# NumPy's `take`. Cut into 64-byte lines and ordered line-major within groups of 32 rows, the
# same gather keeps 32 misses in flight and runs 2.5x faster. Fused into a consumer, the gather
# would follow that consumer's order instead, so each block of rows is gathered apart
# (`unfused`) and consumed while it is in cache: no [B, Hkv, K, D] copy in memory.

LINE_BYTES = 64  # a cache line
ROW_GROUP = 32  # rows whose lines are loaded together
BLOCK_BYTES = 1 << 20  # gathered rows per loop step (all B * Hkv lists): about an L2


def valid_rows(slots: jax.Array, n_tokens: int) -> jax.Array:
    """[B, Hkv, K] int32 -> bool: the slots that name a cache row (0 <= slot < N)."""
    return (slots >= 0) & (slots < n_tokens)


def line_width(head_dim: int, itemsize: int) -> int:
    """Elements per gathered line: a cache line's worth when it divides the row, else the row."""
    width = LINE_BYTES // itemsize
    return width if head_dim % width == 0 else head_dim


def gather_lines(slots: jax.Array, cache: jax.Array, layer: jax.Array, width: int) -> jax.Array:
    """The rows cache[layer, b, h, slots[b, h, j]] as lines, grouped to keep many loads in flight.

    Args:
      slots: [B, Hkv, K] int32 in [0, N), K a multiple of ROW_GROUP.
      cache: [L, B, Hkv, N, D].
      layer: int32 scalar in [0, L).
      width: elements per line, dividing D.

    Returns:
      [B, Hkv, K / 32, D / width, 32, width]: [b, h, i, c, r] is line c of row slots[32 i + r].
    """
    n_layers, batch, kv_heads, n_tokens, head_dim = cache.shape
    n_lines = head_dim // width
    lines = cache.reshape(n_layers, batch * kv_heads * n_tokens, n_lines, width)  # free
    row = jnp.arange(batch * kv_heads, dtype=jnp.int32).reshape(batch, kv_heads, 1, 1, 1)
    row = row * n_tokens + slots.reshape(batch, kv_heads, -1, 1, ROW_GROUP)  # [B, Hkv, K/32, 1, 32]
    line = jnp.arange(n_lines, dtype=jnp.int32)[:, None]  # [c, 1]
    return lines.at[layer, row, line].get(mode="promise_in_bounds")


def slot_block(n_slots: int, rows: int, row_bytes: int) -> int:
    """Slots per list and loop step: BLOCK_BYTES of gathered rows over the `rows` lists, a power
    of two in [256, 4096] (at most the list rounded up to ROW_GROUP)."""
    block = max(256, min(4096, 1 << max(0, (BLOCK_BYTES // (rows * row_bytes)).bit_length() - 1)))
    return min(block, _cdiv(n_slots, ROW_GROUP) * ROW_GROUP)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded_tail(x: jax.Array, start: int, multiple: int, value) -> jax.Array:
    """x[..., start:] padded with `value` to a multiple of `multiple` along the last axis."""
    tail = x[..., start:]
    pad = _cdiv(tail.shape[-1], multiple) * multiple - tail.shape[-1]
    return jnp.pad(tail, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


def gathered_logits_reference(
    q: jax.Array,  # [B, Hkv, G, D] float32 or bfloat16
    k_cache: jax.Array,  # [B, Hkv, N, D] float32 or bfloat16
    slots: jax.Array,  # [B, Hkv, E] int32
    *,
    scale: float,
    layer: jax.Array | int | None = None,  # with a stack k_cache [L, B, Hkv, N, D]
) -> jax.Array:  # [B, Hkv, G, E] float32
    """scale * q_g . k_cache[layer][slot] in float32 (products of the inputs, float32 sums);
    -inf where the slot names no row (slot < 0 or >= N).

    Blocks of slots run in a loop: each block's rows are gathered as lines (`gather_lines`) and
    multiplied while in cache; a last, shorter block takes the remainder.
    """
    batch, kv_heads, g_size, head_dim = q.shape
    k_cache, layer = common.stacked_cache(k_cache, layer)
    n_tokens, n_slots = k_cache.shape[3], slots.shape[2]
    valid = valid_rows(slots, n_tokens)
    safe = jnp.where(valid, slots, 0)
    width = line_width(head_dim, k_cache.dtype.itemsize)
    q_lines = q.astype(jnp.float32).reshape(batch, kv_heads, g_size, head_dim // width, width)

    def block_logits(block_slots):  # [B, Hkv, K], K % 32 == 0 -> [B, Hkv, G, K]
        lines = unfused(functools.partial(gather_lines, width=width), block_slots, k_cache, layer)
        logits = jnp.einsum(
            "bhgcx,bhicrx->bhgir",
            q_lines,
            lines.astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )
        return logits.reshape(batch, kv_heads, g_size, -1)

    block = slot_block(n_slots, batch * kv_heads, head_dim * k_cache.dtype.itemsize)
    n_blocks = n_slots // block
    parts = []
    if n_blocks:
        blocked = safe[..., : n_blocks * block].reshape(batch, kv_heads, n_blocks, block)

        def step(i, out):  # out [B, Hkv, G, n_blocks, block]
            logits = block_logits(lax.dynamic_index_in_dim(blocked, i, 2, keepdims=False))
            return lax.dynamic_update_index_in_dim(out, logits, i, 3)

        out = jnp.zeros((batch, kv_heads, g_size, n_blocks, block), jnp.float32)
        out = lax.fori_loop(0, n_blocks, step, out)
        parts.append(out.reshape(batch, kv_heads, g_size, n_blocks * block))
    if n_slots > n_blocks * block:
        tail = block_logits(_padded_tail(safe, n_blocks * block, ROW_GROUP, 0))
        parts.append(tail[..., : n_slots - n_blocks * block])
    logits = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return jnp.where(valid[:, :, None], scale * logits, -jnp.inf)


def softmax_stats(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., M] float32 -> (a finite shift: the max, or 0 where every logit is -inf; the sum of
    exp(logit - shift)), both [...]."""
    top = jnp.max(logits, axis=-1)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    return shift, jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1)


def gathered_attention_reference(
    logits: jax.Array,  # [B, Hkv, G, M] float32
    v_cache: jax.Array,  # [B, Hkv, N, D] float32 or bfloat16
    slots: jax.Array,  # [B, Hkv, M] int32
    *,
    layer: jax.Array | int | None = None,  # with a stack v_cache [L, B, Hkv, N, D]
) -> tuple[jax.Array, jax.Array]:  # [B, Hkv, G, D] float32, [B, Hkv, G] float32
    """softmax(logits) @ v_cache[layer][slots] and logsumexp(logits), over the slots that name a
    row (the others count as -inf whatever their logit). No valid slot: out 0, lse -inf.

    The logits are given in full, so the softmax shift and sum come first (one pass over
    [B, Hkv, G, M]); then blocks of V rows are gathered as lines and weighted while in cache.
    """
    batch, kv_heads, g_size, n_slots = logits.shape
    v_cache, layer = common.stacked_cache(v_cache, layer)
    n_tokens, head_dim = v_cache.shape[3:]
    valid = valid_rows(slots, n_tokens)
    logits = jnp.where(valid[:, :, None], logits, -jnp.inf)
    shift, total = softmax_stats(logits)  # [B, Hkv, G] each
    weights = jnp.exp(logits - shift[..., None])  # [B, Hkv, G, M], 0 at invalid slots
    safe = jnp.where(valid, slots, 0)
    width = line_width(head_dim, v_cache.dtype.itemsize)

    def block_sum(block_weights, block_slots):  # [B, Hkv, G, K], [B, Hkv, K] -> [B, Hkv, G, D]
        lines = unfused(functools.partial(gather_lines, width=width), block_slots, v_cache, layer)
        grouped = block_weights.reshape(batch, kv_heads, g_size, -1, ROW_GROUP)
        acc = jnp.einsum(
            "bhgir,bhicrx->bhgcx",
            grouped,
            lines.astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )
        return acc.reshape(batch, kv_heads, g_size, head_dim)

    block = slot_block(n_slots, batch * kv_heads, head_dim * v_cache.dtype.itemsize)
    n_blocks = n_slots // block
    acc = jnp.zeros((batch, kv_heads, g_size, head_dim), jnp.float32)
    if n_blocks:
        main = n_blocks * block
        blocked_slots = safe[..., :main].reshape(batch, kv_heads, n_blocks, block)
        blocked_weights = weights[..., :main].reshape(batch, kv_heads, g_size, n_blocks, block)

        def step(i, acc):
            return acc + block_sum(
                lax.dynamic_index_in_dim(blocked_weights, i, 3, keepdims=False),
                lax.dynamic_index_in_dim(blocked_slots, i, 2, keepdims=False),
            )

        acc = lax.fori_loop(0, n_blocks, step, acc)
    if n_slots > n_blocks * block:
        start = n_blocks * block
        acc += block_sum(
            _padded_tail(weights, start, ROW_GROUP, 0.0), _padded_tail(safe, start, ROW_GROUP, 0)
        )
    return common.normalise(acc, shift, total)


# --- Approximate logits from the codes (DASH-KV's tier 2) ---------------------------------------


def group_agreement(q_codes: jax.Array, k_codes: jax.Array, groups: int) -> jax.Array:
    """Each group's share of equal bits between packed codes: q [..., W], k [..., W] (they
    broadcast) -> [..., groups] float32 in [0, 1]; group i holds bits [i b/groups, (i+1)
    b/groups)."""
    same = ~(q_codes ^ k_codes)  # [..., W] uint32: 1 where the bits agree
    words = same.shape[-1]
    group_bits = words * WORD_BITS // groups
    if group_bits >= WORD_BITS:  # whole words per group
        counts = _popcount(same).reshape(*same.shape[:-1], groups, -1).sum(-1)
    else:
        per_word = WORD_BITS // group_bits
        shifts = jnp.arange(per_word, dtype=jnp.uint32) * group_bits
        mask = jnp.uint32((1 << group_bits) - 1)
        counts = _popcount((same[..., None] >> shifts) & mask)  # [..., W, per_word]
        counts = counts.reshape(*same.shape[:-1], groups)
    return counts.astype(jnp.float32) / group_bits


def code_logits_reference(
    q_codes: jax.Array,  # [B, Hkv, G, W] uint32
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32; with `layer`, a stack [L, B, Hkv, N, W]
    slots: jax.Array,  # [B, Hkv, K] int32
    scale: jax.Array,  # [Hkv, G] float32
    mlp: tuple | None,  # (w1 [groups, H], b1 [H], w2 [H], b2 []) float32, or None
    *,
    groups: int,
    layer: jax.Array | int | None = None,
) -> jax.Array:  # [B, Hkv, G, K] float32
    """scale (1 - 2 hamming / b) + mlp(2 agreement - 1) of the codes the slots name; -inf where
    a slot names no row. The MLP is written as multiply-adds of scalar weights over one array
    per feature: XLA:CPU fuses that into one loop, where dots over a minor axis of a few
    features cost transposes."""
    k_codes, layer = common.stacked_cache(k_codes, layer)
    batch, kv_heads, _, words = q_codes.shape
    valid = valid_rows(slots, k_codes.shape[3])
    rows, heads = jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None]
    codes = k_codes[layer, rows, heads, jnp.where(valid, slots, 0)]  # [B, Hkv, K, W]
    pair = (q_codes[:, :, :, None, :], codes[:, :, None, :, :])  # [B, Hkv, G, K, W]
    bits = WORD_BITS * words
    similarity = 1.0 - 2.0 * _popcount(pair[0] ^ pair[1]).sum(-1) / bits  # [B, Hkv, G, K]
    logits = scale[None, :, :, None] * similarity
    if mlp is not None:
        w1, b1, w2, b2 = mlp
        x = 2.0 * group_agreement(*pair, groups) - 1.0  # [B, Hkv, G, K, groups] in [-1, 1]
        features = [x[..., j] for j in range(groups)]
        hidden = [
            jax.nn.gelu(b1[o] + sum(w1[j, o] * f for j, f in enumerate(features)))
            for o in range(w1.shape[1])
        ]
        logits = logits + (b2 + sum(w2[o] * h for o, h in enumerate(hidden)))
    return jnp.where(valid[:, :, None], logits, -jnp.inf)
