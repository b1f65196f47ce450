"""XLA reference: the meaning of correct, and the CPU implementation.

Scores are written as sums of per-word slices (`k_codes[..., w]`, [B, Hkv, N]) rather than a
reduction over the minor word axis: XLA:CPU vectorises the former over tokens, not the latter.
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

WORD_BITS = common.WORD_BITS


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
            total = total + (lax.population_count(level[0]).astype(jnp.int32) << j)
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


def hamming_scores_reference(
    q_codes: jax.Array,  # [B, Hkv, G, W] uint32
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32
    lengths: jax.Array,  # [B] int32
) -> jax.Array:  # [B, Hkv, N] int32
    """sum_g (b - 2 * popcount(q_g XOR k)); slots >= lengths[b] get HAMMING_SENTINEL.

    The G * W popcounts per token are cut to about log2(W * log2 G) by `query_bit_planes` and
    `weighted_popcount_sum`; tests check the result against a NumPy bit-by-bit count.
    """
    _, _, g_size, n_words = q_codes.shape
    planes, offset = query_bit_planes(q_codes)
    words = [
        (j, k_codes[..., w] ^ plane[:, :, w, None])  # [B, Hkv, N]
        for j, plane in planes
        for w in range(n_words)
    ]
    differing = weighted_popcount_sum(words) - offset  # [B, Hkv, N]
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
