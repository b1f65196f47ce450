"""Pallas Mosaic (TPU) kernels: packed-bit hamming and asymmetric scores over blocks of tokens.

Layout. The code cache [B, Hkv, N, W] is read through a free, lane-dense view
[B, Hkv, N*W/128, 128]: each 128-lane row holds 128/W consecutive tokens, word w of token t in
lane t*W + w. The query words are tiled to the same lane pattern, so the XOR and the vector
popcount run on full vregs; the W lanes of a token are then summed by a small 0/1 matmul on the
MXU (exact in float32: operands are integers below 2**24). The grid is (B, Hkv, N-blocks); the
lengths arrive by scalar prefetch, and blocks wholly past a row's length map to the last block
with valid slots (no new DMA) and are filled with the sentinel.

Selection kernels (the fast decode path) keep to the same lane-dense views and put every
reduction that crosses lanes on the MXU:
  histogram     the scoring pass above, plus the block's distances transposed by an NT matmul
                (tokens along lanes) and counted by one-hot matmuls [high bins, tokens] .
                [128 low bins, tokens]^T; one partial histogram per block, summed by XLA.
  rank counts   the distances viewed as [N/128, 128]; per block, the slots below and at each
                threshold, written to lanes 0-3 of an [8, 128] tile.
  compaction    prefix sums by triangular 0/1 matmuls; each 128-slot row is placed into an
                8-aligned window of the list by a one-hot matmul. No scatter, no sort.

Sparse attention kernels (gathered_logits, gathered_attention) leave the cache in HBM and DMA
the rows a slot list names into VMEM, one row per DMA, double-buffered across grid steps; the
logits are [G, block] tiles, slots along lanes (see the section below).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

LANES = 128
SUBLANES = 8
WORD_BITS = common.WORD_BITS


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tokens scored per grid step; a multiple of 1024."""

    block_n: int = 8192

    def __post_init__(self):
        # block_n / (128 / W) rows must be a multiple of 8 sublanes for every W dividing 128.
        if self.block_n <= 0 or self.block_n % (SUBLANES * LANES):
            raise ValueError(f"block_n must be a positive multiple of 1024, got {self.block_n=}")

    @classmethod
    def get_default(cls, n_tokens: int, n_words: int) -> "BlockSizes":
        """128 KiB of codes per step (8192 tokens at b = 128), or the whole cache if smaller."""
        per_step = max(1024, (128 * 1024 // (4 * n_words)) // 1024 * 1024)
        return cls(block_n=min(per_step, pl.cdiv(n_tokens, 1024) * 1024))


def _sum_lane_groups(x: jax.Array, group: int) -> jax.Array:
    """[R, 128] float32 -> [R, 128 // group], the sum of each run of `group` adjacent lanes."""
    if group == 1:
        return x
    lane = lax.broadcasted_iota(jnp.int32, (LANES, LANES // group), 0)
    token = lax.broadcasted_iota(jnp.int32, (LANES, LANES // group), 1)
    owner = lane >> (group.bit_length() - 1)  # token of each lane; group is a power of two
    selector = jnp.where(owner == token, 1.0, 0.0).astype(jnp.float32)  # [128, 128 / W]
    return jnp.dot(x, selector, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _token_index(first: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Token number of each output element of a [rows, tokens_per_row] block."""
    row = lax.broadcasted_iota(jnp.int32, shape, 0)
    col = lax.broadcasted_iota(jnp.int32, shape, 1)
    return first + row * shape[1] + col


def hamming_kernel(
    lengths_ref,  # [B] int32, SMEM (scalar prefetch)
    q_ref,  # [G, 128] uint32: query words tiled across lanes
    k_ref,  # [block_rows, 128] uint32: 128 / W tokens per row
    o_ref,  # [block_rows, 128 / W] int32
    *,
    n_words: int,
):
    block_shape = o_ref.shape
    first = pl.program_id(2) * block_shape[0] * block_shape[1]
    length = lengths_ref[pl.program_id(0)]

    @pl.when(first < length)
    def _score():
        k = k_ref[...]
        differing = jnp.zeros(k.shape, jnp.int32)  # [block_rows, 128]
        for g in range(q_ref.shape[0]):
            differing += lax.population_count(k ^ q_ref[pl.ds(g, 1), :]).astype(jnp.int32)
        per_token = _sum_lane_groups(differing.astype(jnp.float32), n_words).astype(jnp.int32)
        scores = q_ref.shape[0] * WORD_BITS * n_words - 2 * per_token
        valid = _token_index(first, block_shape) < length
        o_ref[...] = jnp.where(valid, scores, common.HAMMING_SENTINEL)

    @pl.when(first >= length)
    def _past_length():
        o_ref[...] = jnp.full(block_shape, common.HAMMING_SENTINEL, jnp.int32)


def asymmetric_kernel(
    lengths_ref,  # [B] int32, SMEM (scalar prefetch)
    w_ref,  # [32, 128] float32: weight of bit j of the word in each lane (summed over G)
    k_ref,  # [block_rows, 128] uint32: 128 / W tokens per row
    o_ref,  # [block_rows, 128 / W] float32
    *,
    n_words: int,
):
    block_shape = o_ref.shape
    first = pl.program_id(2) * block_shape[0] * block_shape[1]
    length = lengths_ref[pl.program_id(0)]

    @pl.when(first < length)
    def _score():
        k = k_ref[...]
        lane_sums = jnp.zeros(k.shape, jnp.float32)  # [block_rows, 128]
        for j in range(WORD_BITS):
            weight = w_ref[pl.ds(j, 1), :]  # [1, 128]
            bit_set = ((k >> j) & 1) == 1
            lane_sums += jnp.where(bit_set, weight, -weight)
        scores = _sum_lane_groups(lane_sums, n_words)
        valid = _token_index(first, block_shape) < length
        o_ref[...] = jnp.where(valid, scores, common.ASYMMETRIC_SENTINEL)

    @pl.when(first >= length)
    def _past_length():
        o_ref[...] = jnp.full(block_shape, common.ASYMMETRIC_SENTINEL, jnp.float32)


def _score_blocks(
    kernel,
    query_lanes: jax.Array,  # [B, Hkv, Q, 128]
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32
    lengths: jax.Array,  # [B] int32
    out_dtype,
    block_sizes: BlockSizes | None,
    interpret: bool,
    flops_per_word: int,
) -> jax.Array:  # [B, Hkv, N]
    """Shared pallas_call: lane-dense view of the cache, grid (B, Hkv, N-blocks)."""
    batch, kv_heads, n_tokens, n_words = k_codes.shape
    if LANES % n_words:
        raise ValueError(f"pallas_tpu needs b/32 words to divide 128, got {k_codes.shape=}")
    block_sizes = block_sizes or BlockSizes.get_default(n_tokens, n_words)
    tokens_per_row = LANES // n_words
    padded = pl.cdiv(n_tokens, tokens_per_row) * tokens_per_row
    if padded != n_tokens:  # a copy; caches sized in multiples of 128 / W tokens avoid it
        k_codes = jnp.pad(k_codes, ((0, 0), (0, 0), (0, padded - n_tokens), (0, 0)))
    rows = padded // tokens_per_row
    k_rows = k_codes.reshape(batch, kv_heads, rows, LANES)  # free: same bytes
    block_rows = min(block_sizes.block_n // tokens_per_row, rows)
    block_tokens = block_rows * tokens_per_row

    def k_index(b, h, i, lengths_ref):
        # Blocks wholly past the length repeat the last block with valid slots: no new DMA.
        last = jnp.maximum(pl.cdiv(lengths_ref[b], block_tokens) - 1, 0)
        return b, h, jnp.minimum(i, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, pl.cdiv(rows, block_rows)),
        in_specs=[
            pl.BlockSpec((None, None, *query_lanes.shape[2:]), lambda b, h, i, _: (b, h, 0, 0)),
            pl.BlockSpec((None, None, block_rows, LANES), k_index),
        ],
        out_specs=pl.BlockSpec(
            (None, None, block_rows, tokens_per_row), lambda b, h, i, _: (b, h, i, 0)
        ),
    )
    words_read = batch * kv_heads * padded * n_words
    scores = pl.pallas_call(
        functools.partial(kernel, n_words=n_words),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows, tokens_per_row), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        cost_estimate=pl.CostEstimate(
            flops=flops_per_word * words_read,
            transcendentals=0,
            bytes_accessed=4 * (words_read + batch * kv_heads * padded),
        ),
        interpret=interpret,
        name=kernel.__name__,
    )(lengths, query_lanes, k_rows)
    return scores.reshape(batch, kv_heads, padded)[:, :, :n_tokens]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def hamming_scores_pallas_tpu(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Hamming scores with the Mosaic kernel.

    Args:
      q_codes: [B, Hkv, G, W] uint32 query codes; W must divide 128.
      k_codes: [B, Hkv, N, W] uint32 key codes.
      lengths: [B] int32 valid slots per batch row.
      block_sizes: tokens per grid step; `BlockSizes.get_default` when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      [B, Hkv, N] int32: sum_g (b - 2 popcount(q_g ^ k)), HAMMING_SENTINEL past the length.
    """
    common.check_hamming_inputs(q_codes, k_codes, lengths)
    n_words = k_codes.shape[-1]
    query_lanes = jnp.tile(q_codes, (1, 1, 1, LANES // n_words))  # [B, Hkv, G, 128]
    return _score_blocks(
        hamming_kernel,
        query_lanes,
        k_codes,
        lengths,
        jnp.int32,
        block_sizes,
        interpret,
        flops_per_word=3 * q_codes.shape[2],
    )


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def asymmetric_scores_pallas_tpu(
    q_weights: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Asymmetric scores with the Mosaic kernel.

    Args:
      q_weights: [B, Hkv, G, b] float32 real-valued query encodings, b = 32 * W.
      k_codes: [B, Hkv, N, W] uint32 key codes; W must divide 128.
      lengths: [B] int32 valid slots per batch row.
      block_sizes: tokens per grid step; `BlockSizes.get_default` when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      [B, Hkv, N] float32: sum_g sum_i w_gi (2 bit_i - 1), ASYMMETRIC_SENTINEL past the length.
    """
    common.check_asymmetric_inputs(q_weights, k_codes, lengths)
    batch, kv_heads, _, bits = q_weights.shape
    n_words = bits // WORD_BITS
    weights = jnp.sum(q_weights, axis=2).reshape(batch, kv_heads, n_words, WORD_BITS)
    # [B, Hkv, 32, 128]: lane l holds the weights of word l % W, one row per bit position.
    weight_lanes = jnp.tile(jnp.swapaxes(weights, 2, 3), (1, 1, 1, LANES // n_words))
    return _score_blocks(
        asymmetric_kernel,
        weight_lanes,
        k_codes,
        lengths,
        jnp.float32,
        block_sizes,
        interpret,
        flops_per_word=4 * WORD_BITS,
    )


# --- Selection primitives: distances + histogram in one pass, rank counts, compaction ---------


@dataclasses.dataclass(frozen=True, slots=True)
class SelectionBlockSizes:
    """Tokens per grid step of the selection kernels; a multiple of 1024.

    The histogram kernel reads block_n tokens of codes per step (as `BlockSizes`); the two
    rank kernels read block_n distances, a [block_n / 128, 128] tile.
    """

    block_n: int = 8192

    def __post_init__(self):
        if self.block_n <= 0 or self.block_n % (SUBLANES * LANES):
            raise ValueError(f"block_n must be a positive multiple of 1024, got {self.block_n=}")

    @classmethod
    def get_default(cls, n_tokens: int) -> "SelectionBlockSizes":
        """8192 tokens per step, or the cache rounded up to 1024 if smaller."""
        return cls(block_n=min(8192, pl.cdiv(n_tokens, 1024) * 1024))


def histogram_rows(n_bins: int) -> int:
    """Sublane rows of the [rows, 128] histogram tile (bin d at [d >> 7, d & 127])."""
    return pl.cdiv(pl.cdiv(n_bins, LANES), SUBLANES) * SUBLANES


def _lane_group_sums_transposed(x: jax.Array, group: int, first: jax.Array, count: int):
    """[R, 128] float32 -> [count, R]: for tokens t = first .. first + count - 1 of each row (a
    token owns `group` adjacent lanes), the sum of its lanes, with the R rows along lanes. An NT
    matmul (the q @ k.T form) on the MXU, exact for integers below 2**24."""
    token = first + lax.broadcasted_iota(jnp.int32, (count, LANES), 0)
    owner = lax.broadcasted_iota(jnp.int32, (count, LANES), 1) >> (group.bit_length() - 1)
    selector = jnp.where(owner == token, 1.0, 0.0).astype(jnp.float32)  # [count, 128]
    return _dot_nt(selector, x, precision=lax.Precision.HIGHEST)


def _dot_nt(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """a [M, K] . b [N, K] -> [M, N] float32."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def histogram_kernel(
    bounds_ref,  # [2 * B] int32, SMEM (scalar prefetch): lo, hi of each batch row
    q_ref,  # [G, 128] uint32: query words tiled across lanes
    k_ref,  # [block_rows, 128] uint32: 128 / W tokens per row
    d_ref,  # [block_rows, 128 / W] int32: distances
    h_ref,  # [high_rows, 128] int32: this block's histogram, bin d at [d >> 7, d & 127]
    *,
    n_words: int,
):
    block_rows, tokens_per_row = d_ref.shape
    high_rows = h_ref.shape[0]
    first = pl.program_id(2) * block_rows * tokens_per_row
    lo, hi = bounds_ref[2 * pl.program_id(0)], bounds_ref[2 * pl.program_id(0) + 1]
    active = (first < hi) & (first + block_rows * tokens_per_row > lo) & (lo < hi)

    @pl.when(active)
    def _count():
        k = k_ref[...]
        differing = jnp.zeros(k.shape, jnp.int32)  # [block_rows, 128]
        for g in range(q_ref.shape[0]):
            differing += lax.population_count(k ^ q_ref[pl.ds(g, 1), :]).astype(jnp.int32)
        lanes = differing.astype(jnp.float32)
        per_token = _sum_lane_groups(lanes, n_words).astype(jnp.int32)  # [block_rows, 128 / W]
        token = _token_index(first, d_ref.shape)
        selectable = (token >= lo) & (token < hi)
        d_ref[...] = jnp.where(selectable, per_token, common.DISTANCE_SENTINEL)
        # Histogram by one-hot matmuls, which want the tokens along lanes: the distances of
        # column c (tokens first + r * 128 / W + c, r < block_rows) as a row, 8 columns at a
        # time (an 8-sublane tile; no dynamic single-row slices).
        group = min(SUBLANES, tokens_per_row)
        row_token = first + tokens_per_row * lax.broadcasted_iota(jnp.int32, (1, block_rows), 1)
        low_bin = lax.broadcasted_iota(jnp.int32, (LANES, block_rows), 0)
        high_bin = lax.broadcasted_iota(jnp.int32, (high_rows, block_rows), 0)

        def columns(j, histogram):  # histogram [high_rows, 128] float32
            distances = _lane_group_sums_transposed(lanes, n_words, j * group, group)
            distances = distances.astype(jnp.int32)  # [group, block_rows]
            for r in range(group):
                distance = distances[r : r + 1, :]  # [1, block_rows]
                token = row_token + j * group + r
                selectable = (token >= lo) & (token < hi)
                low = jnp.where(((distance & (LANES - 1)) == low_bin) & selectable, 1.0, 0.0)
                high = jnp.where((distance >> 7) == high_bin, 1.0, 0.0)
                # 0/1 operands, counts below 2**24: exact at the MXU's default precision.
                histogram += _dot_nt(high, low)  # [high_rows, 128]
            return histogram

        histogram = lax.fori_loop(
            0, tokens_per_row // group, columns, jnp.zeros((high_rows, LANES), jnp.float32)
        )
        h_ref[...] = histogram.astype(jnp.int32)

    @pl.when(jnp.logical_not(active))
    def _outside():
        d_ref[...] = jnp.full(d_ref.shape, common.DISTANCE_SENTINEL, jnp.int32)
        h_ref[...] = jnp.zeros(h_ref.shape, jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def hamming_histogram_pallas_tpu(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    block_sizes: SelectionBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Distances and their histogram with the Mosaic kernel: one read of the codes.

    Args:
      q_codes: [B, Hkv, G, W] uint32 query codes; W must divide 128.
      k_codes: [B, Hkv, N, W] uint32 key codes.
      lo, hi: [B] int32: the selectable slots lo <= n < hi of each batch row.
      block_sizes: tokens per grid step; `SelectionBlockSizes.get_default` when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      distances [B, Hkv, N] int32 (sum_g popcount(q_g ^ k), DISTANCE_SENTINEL outside
      [lo, hi)) and histogram [B, Hkv, G*b + 1] int32: the sum of the per-block histograms.
    """
    common.check_histogram_inputs(q_codes, k_codes, lo, hi)
    batch, kv_heads, n_tokens, n_words = k_codes.shape
    if LANES % n_words:
        raise ValueError(f"pallas_tpu needs b/32 words to divide 128, got {k_codes.shape=}")
    n_bins = common.histogram_bins(q_codes.shape)
    high_rows = histogram_rows(n_bins)
    block_sizes = block_sizes or SelectionBlockSizes.get_default(n_tokens)
    tokens_per_row = LANES // n_words
    padded = pl.cdiv(n_tokens, tokens_per_row) * tokens_per_row
    if padded != n_tokens:  # a copy; caches sized in multiples of 128 / W tokens avoid it
        k_codes = jnp.pad(k_codes, ((0, 0), (0, 0), (0, padded - n_tokens), (0, 0)))
    rows = padded // tokens_per_row
    k_rows = k_codes.reshape(batch, kv_heads, rows, LANES)  # free: same bytes
    block_rows = min(block_sizes.block_n // tokens_per_row, rows)
    block_tokens = block_rows * tokens_per_row
    n_blocks = pl.cdiv(rows, block_rows)
    query_lanes = jnp.tile(q_codes, (1, 1, 1, LANES // n_words))  # [B, Hkv, G, 128]
    # Past the length, padded slots are not selectable: hi <= N.
    bounds = jnp.stack([lo, jnp.minimum(hi, n_tokens)], axis=1).reshape(-1)  # [2 * B]

    def k_index(b, h, i, bounds_ref):
        # Blocks with no selectable slot repeat the nearest block that has one: no new DMA.
        lo, hi = bounds_ref[2 * b], bounds_ref[2 * b + 1]
        first = jnp.minimum(lax.div(lo, block_tokens), n_blocks - 1)
        last = jnp.clip(lax.div(jnp.maximum(hi, 1) - 1, block_tokens), first, n_blocks - 1)
        return b, h, jnp.clip(i, first, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, n_blocks),
        in_specs=[
            pl.BlockSpec((None, None, *query_lanes.shape[2:]), lambda b, h, i, _: (b, h, 0, 0)),
            pl.BlockSpec((None, None, block_rows, LANES), k_index),
        ],
        out_specs=(
            pl.BlockSpec((None, None, block_rows, tokens_per_row), lambda b, h, i, _: (b, h, i, 0)),
            pl.BlockSpec((None, None, None, high_rows, LANES), lambda b, h, i, _: (b, h, i, 0, 0)),
        ),
    )
    words_read = batch * kv_heads * padded * n_words
    distances, partial = pl.pallas_call(
        functools.partial(histogram_kernel, n_words=n_words),
        out_shape=(
            jax.ShapeDtypeStruct((batch, kv_heads, rows, tokens_per_row), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, n_blocks, high_rows, LANES), jnp.int32),
        ),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        cost_estimate=pl.CostEstimate(
            flops=3 * q_codes.shape[2] * words_read
            + 2 * (LANES + high_rows) * LANES * (batch * kv_heads * padded),
            transcendentals=0,
            bytes_accessed=4 * (words_read + batch * kv_heads * padded),
        ),
        interpret=interpret,
        name="hamming_histogram",
    )(bounds, query_lanes, k_rows)
    histogram = jnp.sum(partial, axis=2).reshape(batch, kv_heads, high_rows * LANES)
    distances = distances.reshape(batch, kv_heads, padded)[:, :, :n_tokens]
    return distances, histogram[..., :n_bins]


def _exclusive_prefix(x: jax.Array) -> jax.Array:
    """[R, 128] float32 0/1 -> [R, 128] float32: the sum of the elements before each one in
    row-major order, by two matmuls with triangular 0/1 matrices (exact for sums < 2**24)."""
    n_rows = x.shape[0]
    earlier_lane = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 0) < lax.broadcasted_iota(
        jnp.int32, (LANES, LANES), 1
    )
    earlier_row = lax.broadcasted_iota(jnp.int32, (n_rows, n_rows), 1) < lax.broadcasted_iota(
        jnp.int32, (n_rows, n_rows), 0
    )
    within_row = jnp.dot(
        x, jnp.where(earlier_lane, 1.0, 0.0), preferred_element_type=jnp.float32
    )  # [R, 128]: earlier lanes of the same row
    rows_above = jnp.dot(
        jnp.where(earlier_row, 1.0, 0.0), x, preferred_element_type=jnp.float32
    )  # [R, 128]: per lane, the rows above
    return within_row + jnp.sum(rows_above, axis=1, keepdims=True)


def _below_rank(d, in_cache, threshold, ties, equal_before):
    """Slots of rank below k, given (threshold, ties) of k and the count of earlier slots at the
    threshold: D < T, or D == T and fewer than `ties` slots at T come before."""
    equal = in_cache & (d == threshold)
    before = equal_before + _exclusive_prefix(jnp.where(equal, 1.0, 0.0)).astype(jnp.int32)
    return (in_cache & (d < threshold)) | (equal & (before < ties))


def rank_count_kernel(
    thresholds_ref,  # [4 * B * Hkv] int32, SMEM (scalar prefetch): T_a, ties_a, T_b, ties_b
    d_ref,  # [block_rows, 128] int32
    o_ref,  # [8, 128] int32: lanes 0-3 hold the block's slots with D < T_a, == T_a, < T_b, == T_b
    *,
    n_tokens: int,
    kv_heads: int,
):
    row = pl.program_id(0) * kv_heads + pl.program_id(1)
    t_a, t_b = thresholds_ref[4 * row], thresholds_ref[4 * row + 2]
    d = d_ref[...]
    in_cache = _token_index(pl.program_id(2) * d.size, d.shape) < n_tokens
    counts = [
        jnp.sum(jnp.where(mask, 1.0, 0.0), axis=(0, 1), keepdims=True)  # [1, 1], exact
        for mask in (
            in_cache & (d < t_a),
            in_cache & (d == t_a),
            in_cache & (d < t_b),
            in_cache & (d == t_b),
        )
    ]
    lane = lax.broadcasted_iota(jnp.int32, o_ref.shape, 1)
    out = jnp.zeros(o_ref.shape, jnp.float32)
    for j, count in enumerate(counts):
        out = jnp.where(lane == j, count, out)
    o_ref[...] = out.astype(jnp.int32)


def select_ranks_kernel(
    thresholds_ref,  # [4 * B * Hkv] int32, SMEM (scalar prefetch): T_a, ties_a, T_b, ties_b
    offsets_ref,  # [4 * B * Hkv * n_blocks] int32, SMEM: per block, slots at T_a and at T_b
    #               before it, list entries before it, its selected count
    d_ref,  # [block_rows, 128] int32
    o_ref,  # [list_rows, 128] int32: the list, row-major; resident across the block axis
    position_ref,  # [block_rows, 128] int32 scratch: list position of each kept slot, else -1
    *,
    n_tokens: int,
    size: int,
    kv_heads: int,
    n_blocks: int,
):
    i = pl.program_id(2)
    row = pl.program_id(0) * kv_heads + pl.program_id(1)
    t_a, ties_a, t_b, ties_b = (thresholds_ref[4 * row + j] for j in range(4))
    base = 4 * (row * n_blocks + i)
    equal_a_before, equal_b_before = offsets_ref[base], offsets_ref[base + 1]
    listed, selected_here = offsets_ref[base + 2], offsets_ref[base + 3]
    block_rows = d_ref.shape[0]
    window_rows = block_rows + SUBLANES

    @pl.when(i == 0)
    def _fill():
        o_ref[...] = jnp.full(o_ref.shape, -1, jnp.int32)

    @pl.when((selected_here > 0) & (listed < size))
    def _compact():
        d = d_ref[...]
        first = i * d.size
        in_cache = _token_index(first, d.shape) < n_tokens
        below_a = _below_rank(d, in_cache, t_a, ties_a, equal_a_before)
        below_b = _below_rank(d, in_cache, t_b, ties_b, equal_b_before)
        selected = below_b & jnp.logical_not(below_a)
        position = listed + _exclusive_prefix(jnp.where(selected, 1.0, 0.0)).astype(jnp.int32)
        position_ref[...] = jnp.where(selected & (position < size), position, -1)
        # The block's entries fill list positions [listed, listed + selected_here): rows of a
        # window of block_rows + 8 list rows that starts at an 8-aligned row.
        window_start = (listed >> 10) << 3
        window_row = lax.broadcasted_iota(jnp.int32, (window_rows, LANES), 0)
        dest_lane = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 0)
        source_lane = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)

        # Rows of slots 8 at a time: an aligned 8-sublane load, then one row after another.
        group = SUBLANES if block_rows % SUBLANES == 0 else block_rows

        def place_rows(j, window):  # window [window_rows, 128] float32: 1 + slot in block, or 0
            positions = position_ref[pl.ds(pl.multiple_of(j * group, group), group), :]
            for r in range(group):
                position = positions[r : r + 1, :]  # [1, 128]
                to_row = jnp.where(position >= 0, (position >> 7) - window_start, -1)
                one_hot_row = jnp.where(to_row == window_row, 1.0, 0.0)  # [window_rows, src]
                source = (j * group + r) * LANES + source_lane + 1  # [1, 128], <= block_n
                by_lane = jnp.where(
                    (position & (LANES - 1)) == dest_lane, source.astype(jnp.float32), 0.0
                )  # [128 dest, 128 src]
                # Each list entry receives at most one slot: exact at HIGHEST precision.
                window += _dot_nt(one_hot_row, by_lane, precision=lax.Precision.HIGHEST)
            return window

        window = lax.fori_loop(
            0, block_rows // group, place_rows, jnp.zeros((window_rows, LANES), jnp.float32)
        )
        start = pl.multiple_of(window_start, SUBLANES)
        current = o_ref[pl.ds(start, window_rows), :]
        slot = first - 1 + window.astype(jnp.int32)
        o_ref[pl.ds(start, window_rows), :] = jnp.where(window > 0, slot, current)


def _distance_rows(distances: jax.Array) -> tuple[jax.Array, int]:
    """[B, Hkv, N] -> the lane-dense view [B, Hkv, ceil(N / 128), 128] (a copy only when N is
    not a multiple of 128; the padding is past n_tokens, which the kernels mask)."""
    batch, kv_heads, n_tokens = distances.shape
    padded = pl.cdiv(n_tokens, LANES) * LANES
    if padded != n_tokens:
        distances = jnp.pad(
            distances,
            ((0, 0), (0, 0), (0, padded - n_tokens)),
            constant_values=common.DISTANCE_SENTINEL,
        )
    return distances.reshape(batch, kv_heads, padded // LANES, LANES), padded // LANES


@functools.partial(jax.jit, static_argnames=("size", "block_sizes", "interpret"))
def select_ranks_pallas_tpu(
    distances: jax.Array,
    lower: tuple[jax.Array, jax.Array],
    upper: tuple[jax.Array, jax.Array],
    size: int,
    *,
    block_sizes: SelectionBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The slots of rank in [k_a, k_b) as a fixed-size list, with two Mosaic passes: per block
    counts at the thresholds, an XLA prefix sum over the blocks, then compaction.

    Compaction without a scatter: within a block, list positions come from prefix sums by
    triangular matmuls; then each 128-slot row is placed into an 8-aligned window of the list
    by a one-hot matmul [window rows, 128 slots] . [128 lanes, 128 slots]^T.

    Args:
      distances: [B, Hkv, N] int32.
      lower, upper: (threshold, ties) [B, Hkv] int32 each, from rank_threshold of k_a <= k_b.
      size: static list length >= 1.
      block_sizes: tokens per grid step; `SelectionBlockSizes.get_default` when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      indices [B, Hkv, size] int32 (ascending, then -1) and count [B, Hkv] int32.
    """
    common.check_select_inputs(distances, lower, upper, size)
    batch, kv_heads, n_tokens = distances.shape
    block_sizes = block_sizes or SelectionBlockSizes.get_default(n_tokens)
    d_rows, rows = _distance_rows(distances)
    block_rows = min(block_sizes.block_n // LANES, rows)
    n_blocks = pl.cdiv(rows, block_rows)
    thresholds = jnp.stack([lower[0], lower[1], upper[0], upper[1]], axis=-1).reshape(-1)
    block_spec = pl.BlockSpec((None, None, block_rows, LANES), lambda b, h, i, *_: (b, h, i, 0))
    counts = pl.pallas_call(
        functools.partial(rank_count_kernel, n_tokens=n_tokens, kv_heads=kv_heads),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, n_blocks, SUBLANES, LANES), jnp.int32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, kv_heads, n_blocks),
            in_specs=[block_spec],
            out_specs=pl.BlockSpec(
                (None, None, None, SUBLANES, LANES), lambda b, h, i, _: (b, h, i, 0, 0)
            ),
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        interpret=interpret,
        name="rank_count",
    )(thresholds, d_rows)
    offsets, total = common.rank_offsets(counts[..., 0, :4], lower[1], upper[1])
    list_rows = pl.cdiv(pl.cdiv(size, LANES), SUBLANES) * SUBLANES + block_rows + SUBLANES
    indices = pl.pallas_call(
        functools.partial(
            select_ranks_kernel,
            n_tokens=n_tokens,
            size=size,
            kv_heads=kv_heads,
            n_blocks=n_blocks,
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, list_rows, LANES), jnp.int32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, kv_heads, n_blocks),
            in_specs=[block_spec],
            out_specs=pl.BlockSpec(
                (None, None, list_rows, LANES), lambda b, h, i, *_: (b, h, 0, 0)
            ),
            scratch_shapes=[pltpu.VMEM((block_rows, LANES), jnp.int32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="select_ranks",
    )(thresholds, offsets.reshape(-1), d_rows)
    indices = indices.reshape(batch, kv_heads, list_rows * LANES)[..., :size]
    return indices, jnp.minimum(total, size)


# --- Sparse attention: K and V rows read by slot -----------------------------------------------
#
# The cache stays in HBM (memory_space=pl.ANY), a stack [L, B, Hkv, N, D] whose layer arrives
# by scalar prefetch (a [B, Hkv, N, D] cache is a one-layer stack, a free reshape). A grid step
# owns a block of `block_slots` list entries: its slots arrive twice, lane-dense in VMEM (the
# validity mask of the [G, block] logits) and in SMEM (addresses for the DMAs); the next
# block's slots arrive in SMEM too, so that the step can start one row DMA per valid slot of
# the next block into the other half of a [2, block, D] VMEM buffer before it waits for its own
# rows: the reads of block i + 1 overlap the work on block i. The grid is (B, Hkv, splits,
# steps): steps of one split run in order on one core, the other axes are parallel (megacore).


@dataclasses.dataclass(frozen=True, slots=True)
class SparseBlockSizes:
    """Slots per grid step (a multiple of 128: the lanes of the [G, block] logits; rows DMA'd
    into VMEM per step, double-buffered) and splits of each list over parallel grid steps."""

    block_slots: int = 512
    num_splits: int = 1

    def __post_init__(self):
        if self.block_slots <= 0 or self.block_slots % LANES:
            raise ValueError(f"block_slots must be a positive multiple of 128, got {self}")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self}")

    @classmethod
    def get_default(cls, n_slots: int) -> "SparseBlockSizes":
        """512 slots per step (or the list rounded up to 128), one split: with B * Hkv >= 2
        rows the parallel axes already feed both cores of a megacore chip."""
        return cls(block_slots=min(512, pl.cdiv(max(n_slots, 1), LANES) * LANES))


def _row_copies(
    cache,  # [N, D] ref in HBM: one (batch, KV head)'s cache
    buffer,  # [block, D] VMEM
    semaphore,  # DMA semaphore
    slots_ref,  # [block] int32 SMEM
    n_tokens: int,
    *,
    start: bool,
    zero_invalid: bool = False,
):
    """Starts (start=True) or waits for one DMA per valid slot: cache row slots[j] -> buffer row
    j. With zero_invalid, rows of invalid slots are zeroed instead (a later p @ rows must not
    meet stale VMEM, NaN perhaps, with p = 0)."""

    def row(j, carry):
        slot = slots_ref[j]
        valid = (slot >= 0) & (slot < n_tokens)
        copy = pltpu.make_async_copy(
            cache.at[pl.ds(jnp.where(valid, slot, 0), 1)], buffer.at[pl.ds(j, 1)], semaphore
        )

        @pl.when(valid)
        def _copy():
            if start:
                copy.start()
            else:
                copy.wait()

        if start and zero_invalid:

            @pl.when(jnp.logical_not(valid))
            def _zero():
                buffer[pl.ds(j, 1), :] = jnp.zeros((1, buffer.shape[1]), buffer.dtype)

        return carry

    lax.fori_loop(0, buffer.shape[0], row, 0)


def _fetch_rows(cache_hbm, layer, rows_ref, semaphores, now_ref, next_ref, n_tokens, zero_invalid):
    """The double-buffered row reads of one grid step: at a split's first step, start this
    block's rows; start the next block's (if any) into the other buffer; wait for this block's.
    Returns this block's buffer, [block, D]."""
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    cache = cache_hbm.at[layer, b, h]  # [N, D]
    current = i % 2
    copies = functools.partial(_row_copies, cache, n_tokens=n_tokens, zero_invalid=zero_invalid)

    @pl.when(i == 0)
    def _first():
        copies(rows_ref.at[0], semaphores.at[0], now_ref, start=True)

    @pl.when(i + 1 < pl.num_programs(3))
    def _next():
        copies(rows_ref.at[1 - current], semaphores.at[1 - current], next_ref, start=True)

    copies(rows_ref.at[current], semaphores.at[current], now_ref, start=False)
    return rows_ref[current]


def gathered_logits_kernel(
    layer_ref,  # [1] int32, SMEM (scalar prefetch): the layer of the stacked cache
    slots_ref,  # [1, block] int32: this block's slots, lane-dense
    now_ref,  # [block] int32, SMEM: the same slots
    next_ref,  # [block] int32, SMEM: the next block's slots (of this split)
    q_ref,  # [G, D]
    k_hbm,  # [L, B, Hkv, N, D], HBM
    o_ref,  # [G, block] float32
    rows_ref,  # [2, block, D] VMEM scratch: this block's K rows and the next one's
    semaphores,  # [2] DMA semaphores, one per buffer half
    *,
    n_tokens: int,
    scale: float,
):
    rows = _fetch_rows(
        k_hbm, layer_ref[0], rows_ref, semaphores, now_ref, next_ref, n_tokens, False
    )
    logits = _dot_nt(
        q_ref[...].astype(jnp.float32), rows.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )  # [G, block]; a column of a row never read is stale, and replaced below
    slots = slots_ref[...]
    valid = (slots >= 0) & (slots < n_tokens)  # [1, block]
    o_ref[...] = jnp.where(valid, scale * logits, -jnp.inf)


def gathered_attention_kernel(
    layer_ref,  # [1] int32, SMEM (scalar prefetch): the layer of the stacked cache
    slots_ref,  # [1, block] int32: this block's slots, lane-dense
    now_ref,  # [block] int32, SMEM: the same slots
    next_ref,  # [block] int32, SMEM: the next block's slots (of this split)
    logits_ref,  # [G, block] float32
    v_hbm,  # [L, B, Hkv, N, D], HBM
    acc_out,  # [G, D] float32: this split's sum of exp(logit - top) v
    top_out,  # [G, 128] float32: this split's max logit, in every lane
    total_out,  # [G, 128] float32: this split's sum of exp(logit - top), in every lane
    rows_ref,  # [2, block, D] VMEM scratch: this block's V rows and the next one's
    semaphores,  # [2] DMA semaphores
    acc_ref,  # [G, D] float32 scratch
    top_ref,  # [G, 128] float32 scratch
    total_ref,  # [G, 128] float32 scratch
    *,
    n_tokens: int,
):
    i = pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        top_ref[...] = jnp.full(top_ref.shape, -jnp.inf, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)

    rows = _fetch_rows(v_hbm, layer_ref[0], rows_ref, semaphores, now_ref, next_ref, n_tokens, True)
    slots = slots_ref[...]
    valid = (slots >= 0) & (slots < n_tokens)  # [1, block]
    logits = jnp.where(valid, logits_ref[...], -jnp.inf)  # [G, block]
    top = top_ref[...]  # [G, 128]
    new_top = jnp.maximum(top, jnp.max(logits, axis=1, keepdims=True))
    shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)  # finite: no -inf - -inf
    rescale = jnp.exp(top - shift)  # [G, 128]
    p = jnp.exp(logits - shift[:, :1])  # [G, block], 0 at invalid slots
    total_ref[...] = rescale * total_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    weighted = jnp.dot(
        p,
        rows.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # [G, D]
    acc_ref[...] = rescale[:, :1] * acc_ref[...] + weighted
    top_ref[...] = new_top

    @pl.when(i == pl.num_programs(3) - 1)
    def _write():
        acc_out[...] = acc_ref[...]
        top_out[...] = top_ref[...]
        total_out[...] = total_ref[...]


def _sparse_layout(slots: jax.Array, block_sizes: SparseBlockSizes):
    """Grid geometry for a slot list [B, Hkv, K]: (slots padded with -1 to splits * steps *
    block, as [B, Hkv, 1, K'] (a copy only when K is not already that long), block, splits,
    steps), and the three slot BlockSpecs: lane-dense VMEM, this block in SMEM, the next."""
    n_slots = slots.shape[2]
    block = block_sizes.block_slots
    n_blocks = pl.cdiv(n_slots, block)
    splits = min(block_sizes.num_splits, n_blocks)
    steps = pl.cdiv(n_blocks, splits)
    padded = splits * steps * block
    if padded != n_slots:
        slots = jnp.pad(slots, ((0, 0), (0, 0), (0, padded - n_slots)), constant_values=-1)
    slots = slots[:, :, None, :]  # [B, Hkv, 1, K']

    def now(b, h, s, i, _):
        return b, h, 0, s * steps + i

    def following(b, h, s, i, _):
        return b, h, 0, s * steps + jnp.minimum(i + 1, steps - 1)

    specs = [
        pl.BlockSpec((None, None, 1, block), now),
        pl.BlockSpec((None, None, None, block), now, memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, None, block), following, memory_space=pltpu.SMEM),
    ]
    return slots, block, splits, steps, specs


_SPARSE_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def gathered_logits_pallas_tpu(
    q: jax.Array,
    k_cache: jax.Array,
    slots: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    block_sizes: SparseBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Logits of the K rows named by `slots`, DMA'd row by row from HBM inside the Mosaic
    kernel (double-buffered; no gathered copy in HBM).

    Args:
      q: [B, Hkv, G, D] float32 or bfloat16.
      k_cache: [B, Hkv, N, D] float32 or bfloat16, or with `layer` a stack [L, B, Hkv, N, D].
      slots: [B, Hkv, E] int32; entries outside [0, N) (-1) are unused.
      scale: static float.
      layer: None, or the layer (int32 scalar, clipped to [0, L)) whose rows to read.
      block_sizes: slots per grid step and splits; `SparseBlockSizes.get_default` when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      [B, Hkv, G, E] float32: scale * q_g . k_cache[slot], -inf at unused entries.
    """
    common.check_gathered_logits_inputs(q, k_cache, slots, scale, layer)
    batch, kv_heads, g_size, head_dim = q.shape
    k_cache, layer = common.stacked_cache(k_cache, layer)
    n_slots = slots.shape[2]
    block_sizes = block_sizes or SparseBlockSizes.get_default(n_slots)
    slots, block, splits, steps, slot_specs = _sparse_layout(slots, block_sizes)
    padded = slots.shape[-1]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, splits, steps),
        in_specs=[
            *slot_specs,
            pl.BlockSpec((None, None, g_size, head_dim), lambda b, h, s, i, _: (b, h, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec(
            (None, None, g_size, block), lambda b, h, s, i, _: (b, h, 0, s * steps + i)
        ),
        scratch_shapes=[
            pltpu.VMEM((2, block, head_dim), k_cache.dtype),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    logits = pl.pallas_call(
        functools.partial(gathered_logits_kernel, n_tokens=k_cache.shape[3], scale=float(scale)),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, g_size, padded), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SPARSE_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=2 * batch * kv_heads * g_size * padded * head_dim,
            transcendentals=0,
            bytes_accessed=batch * kv_heads * padded * (head_dim * k_cache.dtype.itemsize + 12),
        ),
        interpret=interpret,
        name="gathered_logits",
    )(layer.reshape(1), slots, slots, slots, q, k_cache)
    return logits[..., :n_slots]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gathered_attention_pallas_tpu(
    logits: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    block_sizes: SparseBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Softmax-weighted sum of the V rows named by `slots`, DMA'd row by row from HBM inside the
    Mosaic kernel: an online softmax over blocks of slots per (batch, KV head, split), the
    splits merged by XLA.

    Args:
      logits: [B, Hkv, G, M] float32.
      v_cache: [B, Hkv, N, D] float32 or bfloat16, or with `layer` a stack [L, B, Hkv, N, D].
      slots: [B, Hkv, M] int32; entries outside [0, N) (-1) are unused, whatever their logit.
      layer: None, or the layer (int32 scalar, clipped to [0, L)) whose rows to read.
      block_sizes: slots per grid step and splits; `SparseBlockSizes.get_default` when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      out [B, Hkv, G, D] float32 (softmax(logits) @ v_cache[slots]; 0 with no valid slot) and
      lse [B, Hkv, G] float32 (logsumexp of the logits; -inf with no valid slot).
    """
    common.check_gathered_attention_inputs(logits, v_cache, slots, layer)
    batch, kv_heads, g_size, n_slots = logits.shape
    v_cache, layer = common.stacked_cache(v_cache, layer)
    head_dim = v_cache.shape[4]
    block_sizes = block_sizes or SparseBlockSizes.get_default(n_slots)
    slots, block, splits, steps, slot_specs = _sparse_layout(slots, block_sizes)
    last_block = pl.cdiv(n_slots, block) - 1  # blocks past the logits only hold padding slots

    def logits_index(b, h, s, i, _):
        return b, h, 0, jnp.minimum(s * steps + i, last_block)

    def split_index(b, h, s, i, _):
        return b, h, s, 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, splits, steps),
        in_specs=[
            *slot_specs,
            pl.BlockSpec((None, None, g_size, block), logits_index),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=(
            pl.BlockSpec((None, None, None, g_size, head_dim), split_index),
            pl.BlockSpec((None, None, None, g_size, LANES), split_index),
            pl.BlockSpec((None, None, None, g_size, LANES), split_index),
        ),
        scratch_shapes=[
            pltpu.VMEM((2, block, head_dim), v_cache.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((g_size, head_dim), jnp.float32),
            pltpu.VMEM((g_size, LANES), jnp.float32),
            pltpu.VMEM((g_size, LANES), jnp.float32),
        ],
    )
    acc, top, total = pl.pallas_call(
        functools.partial(gathered_attention_kernel, n_tokens=v_cache.shape[3]),
        out_shape=(
            jax.ShapeDtypeStruct((batch, kv_heads, splits, g_size, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, g_size, LANES), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, g_size, LANES), jnp.float32),
        ),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SPARSE_SEMANTICS),
        cost_estimate=pl.CostEstimate(
            flops=2 * batch * kv_heads * g_size * slots.shape[-1] * (head_dim + 2),
            transcendentals=batch * kv_heads * g_size * slots.shape[-1],
            bytes_accessed=batch
            * kv_heads
            * slots.shape[-1]
            * (head_dim * v_cache.dtype.itemsize + 4 * g_size + 12),
        ),
        interpret=interpret,
        name="gathered_attention",
    )(layer.reshape(1), slots, slots, slots, logits, v_cache)
    return common.combine_splits(acc, top[..., 0], total[..., 0])
