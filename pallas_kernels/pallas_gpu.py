"""Pallas-Triton (GPU) kernels: packed-bit hamming and asymmetric scores over blocks of tokens,
and the selection primitives (distances + histogram, rank counts, compaction).

One program scores `block_n` tokens of one (batch, KV head) row. Word w of the block is a
strided [block_n] column load of the [block_n, W] code tile (the W columns share cache lines, so
the tile is read from memory once). Triton wants power-of-two tensor sizes: block_n is one, and
G and W are unrolled loops. Loads past the cache end or the row's length are masked off, so
blocks past the length read nothing and only write the sentinel.

Selection kernels walk a block of `block_n` tokens in chunks of `chunk_n`:
  histogram     distances of the chunk, and its histogram as one tensor-core matmul of one-hot
                matrices, [high bins, chunk] @ [chunk, 32 low bins]; one partial histogram per
                block, summed by XLA (deterministic, and exact in interpret mode, where atomic
                adds with repeated indices are not).
  rank counts   per block, the slots below and at each of the two thresholds.
  compaction    from per-block offsets (an XLA prefix sum over the counts), an in-chunk cumsum
                gives each selected slot its list position; a masked scatter store writes it.

Sparse attention kernels read cache rows by slot with one pointer-gather load of a
[block, D] tile (D a power of two): gathered_logits one program per block of slots,
gathered_attention flash-decoding (one program per split of the list, an online softmax over
its blocks, the splits merged by XLA). G < 16 is below Triton's dot, so both multiply-add
per query head.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

WORD_BITS = common.WORD_BITS


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tokens per program and Triton launch parameters."""

    block_n: int = 1024
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_n <= 0 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two, got {self.block_n=}")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(f"need positive {self.num_warps=} and {self.num_stages=}")

    @classmethod
    def get_default(cls, n_tokens: int) -> "BlockSizes":
        """1024 tokens per program, or the cache rounded up to a power of two if smaller."""
        return cls(block_n=min(1024, pl.next_power_of_2(n_tokens)))


def _block_tokens(block_n: int, length_ref, n_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Token numbers of this program's block, and which of them are real, readable slots."""
    token = pl.program_id(2) * block_n + jnp.arange(block_n, dtype=jnp.int32)  # [block_n]
    in_cache = token < n_tokens
    return token, in_cache & (token < length_ref[0])


def popcount(x: jax.Array) -> jax.Array:
    """Set bits of each uint32, by SWAR adds: Pallas-Triton cannot lower population_count."""
    x = x - ((x >> 1) & 0x55555555)  # 2-bit sums
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)  # 4-bit sums
    x = (x + (x >> 4)) & 0x0F0F0F0F  # 8-bit sums
    return ((x * 0x01010101) >> 24).astype(jnp.int32)  # the top byte sums all four


def hamming_kernel(
    length_ref,  # [1] int32: this batch row's valid length
    q_ref,  # [G, W] uint32
    k_ref,  # [block_n, W] uint32
    o_ref,  # [block_n] int32
    *,
    n_tokens: int,
):
    block_n = o_ref.shape[0]
    g_size, n_words = q_ref.shape
    token, valid = _block_tokens(block_n, length_ref, n_tokens)
    differing = jnp.zeros((block_n,), jnp.int32)
    for w in range(n_words):
        k_word = plgpu.load(k_ref.at[:, jnp.int32(w)], mask=valid, other=0)  # [block_n]
        for g in range(g_size):
            differing += popcount(k_word ^ q_ref[g, w])
    scores = g_size * WORD_BITS * n_words - 2 * differing
    scores = jnp.where(valid, scores, common.HAMMING_SENTINEL)
    plgpu.store(o_ref.at[:], scores, mask=token < n_tokens)


def asymmetric_kernel(
    length_ref,  # [1] int32: this batch row's valid length
    w_ref,  # [b] float32: per-bit weights, summed over the G query heads
    k_ref,  # [block_n, W] uint32
    o_ref,  # [block_n] float32
    *,
    n_tokens: int,
):
    block_n = o_ref.shape[0]
    n_words = k_ref.shape[1]
    token, valid = _block_tokens(block_n, length_ref, n_tokens)
    scores = jnp.zeros((block_n,), jnp.float32)
    # One [block_n] select-add per bit, in the reference's order (bit-exact with it): a
    # [block_n, 32] tile summed over its bits instead ran 6x slower on an H100.
    for w in range(n_words):
        k_word = plgpu.load(k_ref.at[:, jnp.int32(w)], mask=valid, other=0)  # [block_n]
        for j in range(WORD_BITS):
            weight = w_ref[w * WORD_BITS + j]  # scalar
            scores += jnp.where(((k_word >> j) & 1) == 1, weight, -weight)
    scores = jnp.where(valid, scores, common.ASYMMETRIC_SENTINEL)
    plgpu.store(o_ref.at[:], scores, mask=token < n_tokens)


def _score_blocks(
    kernel,
    query: jax.Array,  # [B, Hkv, ...] per-row query operand
    k_codes: jax.Array,  # [B, Hkv, N, W] uint32
    lengths: jax.Array,  # [B] int32
    out_dtype,
    block_sizes: BlockSizes | None,
    interpret: bool,
) -> jax.Array:  # [B, Hkv, N]
    """Shared pallas_call: grid (B, Hkv, N-blocks)."""
    batch, kv_heads, n_tokens, n_words = k_codes.shape
    block_sizes = block_sizes or BlockSizes.get_default(n_tokens)
    block_n = block_sizes.block_n
    query_block = (None, None, *query.shape[2:])
    query_index = (0,) * (query.ndim - 2)
    return pl.pallas_call(
        functools.partial(kernel, n_tokens=n_tokens),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, n_tokens), out_dtype),
        grid=(batch, kv_heads, pl.cdiv(n_tokens, block_n)),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, i: (b,)),
            pl.BlockSpec(query_block, lambda b, h, i: (b, h, *query_index)),
            pl.BlockSpec((None, None, block_n, n_words), lambda b, h, i: (b, h, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_n), lambda b, h, i: (b, h, i)),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name=kernel.__name__,
    )(lengths, query, k_codes)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def hamming_scores_pallas_gpu(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Hamming scores with the Pallas-Triton kernel.

    Args:
      q_codes: [B, Hkv, G, W] uint32 query codes.
      k_codes: [B, Hkv, N, W] uint32 key codes.
      lengths: [B] int32 valid slots per batch row.
      block_sizes: tokens per program and launch parameters; defaults when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      [B, Hkv, N] int32: sum_g (b - 2 popcount(q_g ^ k)), HAMMING_SENTINEL past the length.
    """
    common.check_hamming_inputs(q_codes, k_codes, lengths)
    return _score_blocks(
        hamming_kernel, q_codes, k_codes, lengths, jnp.int32, block_sizes, interpret
    )


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def asymmetric_scores_pallas_gpu(
    q_weights: jax.Array,
    k_codes: jax.Array,
    lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Asymmetric scores with the Pallas-Triton kernel.

    Args:
      q_weights: [B, Hkv, G, b] float32 real-valued query encodings, b = 32 * W.
      k_codes: [B, Hkv, N, W] uint32 key codes.
      lengths: [B] int32 valid slots per batch row.
      block_sizes: tokens per program and launch parameters; defaults when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      [B, Hkv, N] float32: sum_g sum_i w_gi (2 bit_i - 1), ASYMMETRIC_SENTINEL past the length.
    """
    common.check_asymmetric_inputs(q_weights, k_codes, lengths)
    weights = jnp.sum(q_weights, axis=2)  # [B, Hkv, b]
    return _score_blocks(
        asymmetric_kernel, weights, k_codes, lengths, jnp.float32, block_sizes, interpret
    )


# --- Selection primitives: distances + histogram in one pass, rank counts, compaction ---------


@dataclasses.dataclass(frozen=True, slots=True)
class SelectionBlockSizes:
    """Tokens per program (block_n) and per inner step (chunk_n), for the selection kernels.

    A program walks its block in chunks; each chunk's histogram is one small matmul of one-hot
    matrices, whose contraction length is chunk_n. One partial histogram (or one row of counts)
    is written per block, so larger blocks mean less to combine.
    """

    block_n: int = 4096
    chunk_n: int = 256
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "chunk_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {self}")
        if self.block_n % self.chunk_n:
            raise ValueError(f"chunk_n must divide block_n, got {self}")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(f"need positive {self.num_warps=} and {self.num_stages=}")

    @classmethod
    def get_default(cls, n_tokens: int) -> "SelectionBlockSizes":
        """4096 tokens per program in chunks of 256, or less for a short cache."""
        block_n = max(16, min(4096, pl.next_power_of_2(n_tokens)))
        return cls(block_n=block_n, chunk_n=min(256, block_n))


LOW_BITS = 5
LOW_BINS = 1 << LOW_BITS  # histogram tile [high, 32]: bin d sits at (d >> 5, d & 31)


def histogram_rows(n_bins: int) -> int:
    """Rows of the [rows, LOW_BINS] histogram tile: a power of two >= 16 (Triton's dot minimum)."""
    return max(16, pl.next_power_of_2(pl.cdiv(n_bins, LOW_BINS)))


def histogram_kernel(
    bounds_ref,  # [2] int32: this batch row's selectable slots [lo, hi)
    q_ref,  # [G, W] uint32
    k_ref,  # [block_n, W] uint32
    d_ref,  # [block_n] int32: distances, DISTANCE_SENTINEL outside [lo, hi)
    h_ref,  # [rows, LOW_BINS] int32: this block's histogram, bin d at [d >> 5, d & 31]
    *,
    n_tokens: int,
    chunk_n: int,
):
    block_n = d_ref.shape[0]
    g_size, n_words = q_ref.shape
    rows = h_ref.shape[0]
    lo, hi = bounds_ref[0], bounds_ref[1]
    block_start = pl.program_id(2) * block_n
    q_words = [[q_ref[g, w] for w in range(n_words)] for g in range(g_size)]  # scalars
    high_bin = jnp.arange(rows, dtype=jnp.int32)[:, None]  # [rows, 1]
    low_bin = jnp.arange(LOW_BINS, dtype=jnp.int32)[None, :]  # [1, 32]

    def chunk(c, histogram):  # histogram [rows, LOW_BINS] float32
        start = c * chunk_n
        token = block_start + start + jnp.arange(chunk_n, dtype=jnp.int32)  # [chunk_n]
        selectable = (token >= lo) & (token < hi) & (token < n_tokens)
        differing = jnp.zeros((chunk_n,), jnp.int32)
        for w in range(n_words):
            k_word = plgpu.load(
                k_ref.at[pl.ds(start, chunk_n), jnp.int32(w)], mask=selectable, other=0
            )  # [chunk_n]
            for g in range(g_size):
                differing += popcount(k_word ^ q_words[g][w])
        distances = jnp.where(selectable, differing, common.DISTANCE_SENTINEL)
        plgpu.store(d_ref.at[pl.ds(start, chunk_n)], distances, mask=token < n_tokens)
        # Counts per (high, low) bin pair: one-hot [rows, chunk] @ one-hot [chunk, 32] on the
        # tensor cores; 0/1 in float16 and sums below 2**24 in float32 are exact.
        high = ((differing >> LOW_BITS)[None, :] == high_bin) & selectable[None, :]
        low = (differing & (LOW_BINS - 1))[:, None] == low_bin
        high = jnp.where(high, 1.0, 0.0).astype(jnp.float16)  # [rows, chunk_n]
        low = jnp.where(low, 1.0, 0.0).astype(jnp.float16)  # [chunk_n, 32]
        return histogram + jnp.dot(high, low, preferred_element_type=jnp.float32)

    # Chunks wholly outside [lo, hi) or past the cache still store their sentinels.
    histogram = lax.fori_loop(
        0, block_n // chunk_n, chunk, jnp.zeros((rows, LOW_BINS), jnp.float32)
    )
    h_ref[...] = histogram.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def hamming_histogram_pallas_gpu(
    q_codes: jax.Array,
    k_codes: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    block_sizes: SelectionBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Distances and their histogram with the Pallas-Triton kernel: one read of the codes.

    Args:
      q_codes: [B, Hkv, G, W] uint32 query codes.
      k_codes: [B, Hkv, N, W] uint32 key codes.
      lo, hi: [B] int32: the selectable slots lo <= n < hi of each batch row.
      block_sizes: tokens per program and per step; defaults when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      distances [B, Hkv, N] int32 (sum_g popcount(q_g ^ k), DISTANCE_SENTINEL outside
      [lo, hi)) and histogram [B, Hkv, G*b + 1] int32: the sum of the per-block histograms.
    """
    common.check_histogram_inputs(q_codes, k_codes, lo, hi)
    batch, kv_heads, n_tokens, n_words = k_codes.shape
    n_bins = common.histogram_bins(q_codes.shape)
    rows = histogram_rows(n_bins)
    block_sizes = block_sizes or SelectionBlockSizes.get_default(n_tokens)
    block_n = block_sizes.block_n
    n_blocks = pl.cdiv(n_tokens, block_n)
    bounds = jnp.stack([lo, hi], axis=1)  # [B, 2]
    distances, partial = pl.pallas_call(
        functools.partial(histogram_kernel, n_tokens=n_tokens, chunk_n=block_sizes.chunk_n),
        out_shape=(
            jax.ShapeDtypeStruct((batch, kv_heads, n_tokens), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads, n_blocks, rows, LOW_BINS), jnp.int32),
        ),
        grid=(batch, kv_heads, n_blocks),
        in_specs=[
            pl.BlockSpec((None, 2), lambda b, h, i: (b, 0)),
            pl.BlockSpec((None, None, *q_codes.shape[2:]), lambda b, h, i: (b, h, 0, 0)),
            pl.BlockSpec((None, None, block_n, n_words), lambda b, h, i: (b, h, i, 0)),
        ],
        out_specs=(
            pl.BlockSpec((None, None, block_n), lambda b, h, i: (b, h, i)),
            pl.BlockSpec((None, None, None, rows, LOW_BINS), lambda b, h, i: (b, h, i, 0, 0)),
        ),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="hamming_histogram",
    )(bounds, q_codes, k_codes)
    histogram = jnp.sum(partial, axis=2).reshape(batch, kv_heads, rows * LOW_BINS)
    return distances, histogram[..., :n_bins]


def _below_rank(d, in_cache, threshold, ties, equal_before):
    """Slots of rank below k, given (threshold, ties) of k and the count of earlier slots at the
    threshold: D < T, or D == T and fewer than `ties` slots at T come before."""
    equal = in_cache & (d == threshold)
    equal_i32 = equal.astype(jnp.int32)
    before = equal_before + jnp.cumsum(equal_i32) - equal_i32  # [chunk_n] exclusive counts
    return (in_cache & (d < threshold)) | (equal & (before < ties)), jnp.sum(equal_i32)


def rank_count_kernel(
    thresholds_ref,  # [4] int32: T_a, ties_a, T_b, ties_b
    d_ref,  # [block_n] int32
    o_ref,  # [4] int32: this block's slots with D < T_a, D == T_a, D < T_b, D == T_b
    *,
    n_tokens: int,
    chunk_n: int,
):
    block_n = d_ref.shape[0]
    t_a, t_b = thresholds_ref[0], thresholds_ref[2]
    block_start = pl.program_id(2) * block_n

    def chunk(c, counts):  # counts [4] int32
        start = c * chunk_n
        token = block_start + start + jnp.arange(chunk_n, dtype=jnp.int32)
        in_cache = token < n_tokens
        d = plgpu.load(d_ref.at[pl.ds(start, chunk_n)], mask=in_cache, other=0)
        found = [
            jnp.sum((in_cache & (d < t_a)).astype(jnp.int32)),
            jnp.sum((in_cache & (d == t_a)).astype(jnp.int32)),
            jnp.sum((in_cache & (d < t_b)).astype(jnp.int32)),
            jnp.sum((in_cache & (d == t_b)).astype(jnp.int32)),
        ]
        lane = jnp.arange(4, dtype=jnp.int32)
        for j, value in enumerate(found):
            counts += jnp.where(lane == j, value, 0)
        return counts

    o_ref[...] = lax.fori_loop(0, block_n // chunk_n, chunk, jnp.zeros((4,), jnp.int32))


def select_ranks_kernel(
    thresholds_ref,  # [4] int32: T_a, ties_a, T_b, ties_b
    offsets_ref,  # [4] int32: slots at T_a and at T_b before this block, list entries before
    #               it, its selected count
    d_ref,  # [block_n] int32
    init_ref,  # [size + chunk_n] int32, aliased to o_ref (all -1)
    o_ref,  # [size + chunk_n] int32: the list; the last chunk_n entries are scratch
    *,
    n_tokens: int,
    size: int,
    chunk_n: int,
):
    del init_ref
    block_n = d_ref.shape[0]
    t_a, ties_a, t_b, ties_b = (thresholds_ref[j] for j in range(4))
    block_start = pl.program_id(2) * block_n

    def chunk(c, before):  # before: (at T_a, at T_b, list entries) before this chunk
        equal_a, equal_b, listed = before
        start = c * chunk_n
        lane = jnp.arange(chunk_n, dtype=jnp.int32)
        token = block_start + start + lane
        in_cache = token < n_tokens
        d = plgpu.load(d_ref.at[pl.ds(start, chunk_n)], mask=in_cache, other=0)
        below_a, at_a = _below_rank(d, in_cache, t_a, ties_a, equal_a)
        below_b, at_b = _below_rank(d, in_cache, t_b, ties_b, equal_b)
        selected = (below_b & ~below_a).astype(jnp.int32)
        position = listed + jnp.cumsum(selected) - selected
        keep = (selected == 1) & (position < size)
        # Masked-off lanes point at distinct scratch entries past the list: a masked store
        # writes nothing on the GPU, and interpret mode (a scatter) then has no duplicate index.
        target = jnp.where(keep, position, size + lane)
        plgpu.store(o_ref.at[target], token, mask=keep)
        return equal_a + at_a, equal_b + at_b, listed + jnp.sum(selected)

    @pl.when((offsets_ref[3] > 0) & (offsets_ref[2] < size))  # else nothing to write
    def _compact():
        start = tuple(offsets_ref[j] for j in range(3))
        lax.fori_loop(0, block_n // chunk_n, chunk, start)


@functools.partial(jax.jit, static_argnames=("size", "block_sizes", "interpret"))
def select_ranks_pallas_gpu(
    distances: jax.Array,
    lower: tuple[jax.Array, jax.Array],
    upper: tuple[jax.Array, jax.Array],
    size: int,
    *,
    block_sizes: SelectionBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The slots of rank in [k_a, k_b) as a fixed-size list, with two Pallas-Triton passes: per
    block counts at the thresholds, an XLA prefix sum over the blocks, then compaction.

    Args:
      distances: [B, Hkv, N] int32.
      lower, upper: (threshold, ties) [B, Hkv] int32 each, from rank_threshold of k_a <= k_b.
      size: static list length >= 1.
      block_sizes: tokens per program and per step; defaults when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      indices [B, Hkv, size] int32 (ascending, then -1) and count [B, Hkv] int32.
    """
    common.check_select_inputs(distances, lower, upper, size)
    batch, kv_heads, n_tokens = distances.shape
    block_sizes = block_sizes or SelectionBlockSizes.get_default(n_tokens)
    block_n, chunk_n = block_sizes.block_n, block_sizes.chunk_n
    n_blocks = pl.cdiv(n_tokens, block_n)
    thresholds = jnp.stack([lower[0], lower[1], upper[0], upper[1]], axis=-1)  # [B, Hkv, 4]
    params = plgpu.CompilerParams(
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )
    row_spec = pl.BlockSpec((None, None, 4), lambda b, h, i: (b, h, 0))
    block_spec = pl.BlockSpec((None, None, block_n), lambda b, h, i: (b, h, i))
    counts = pl.pallas_call(
        functools.partial(rank_count_kernel, n_tokens=n_tokens, chunk_n=chunk_n),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, n_blocks, 4), jnp.int32),
        grid=(batch, kv_heads, n_blocks),
        in_specs=[row_spec, block_spec],
        out_specs=pl.BlockSpec((None, None, None, 4), lambda b, h, i: (b, h, i, 0)),
        compiler_params=params,
        interpret=interpret,
        name="rank_count",
    )(thresholds, distances)
    offsets, total = common.rank_offsets(counts, lower[1], upper[1])
    list_spec = pl.BlockSpec((None, None, size + chunk_n), lambda b, h, i: (b, h, 0))
    indices = pl.pallas_call(
        functools.partial(select_ranks_kernel, n_tokens=n_tokens, size=size, chunk_n=chunk_n),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, size + chunk_n), jnp.int32),
        grid=(batch, kv_heads, n_blocks),
        in_specs=[
            row_spec,
            pl.BlockSpec((None, None, None, 4), lambda b, h, i: (b, h, i, 0)),
            block_spec,
            list_spec,
        ],
        out_specs=list_spec,
        input_output_aliases={3: 0},
        compiler_params=params,
        interpret=interpret,
        name="select_ranks",
    )(thresholds, offsets, distances, jnp.full((batch, kv_heads, size + chunk_n), -1, jnp.int32))
    return indices[..., :size], jnp.minimum(total, size)


# --- Sparse attention: K and V rows read by slot -----------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SparseBlockSizes:
    """Slots per program (gathered_logits) or per loop step (gathered_attention), slots per
    split of a list (gathered_attention: one program each, merged by XLA), launch parameters."""

    block_slots: int = 64
    split_slots: int = 2048
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_slots < 1 or self.block_slots & (self.block_slots - 1):
            raise ValueError(f"block_slots must be a power of two, got {self}")
        if self.split_slots < self.block_slots or self.split_slots % self.block_slots:
            raise ValueError(f"split_slots must be a multiple of block_slots, got {self}")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(f"need positive {self.num_warps=} and {self.num_stages=}")

    @classmethod
    def get_default(cls, n_slots: int, head_dim: int) -> "SparseBlockSizes":
        """8192 elements of gathered rows per step (64 rows at D = 128, at least 16) and about
        2048 slots per split, or less for a short list."""
        block = max(16, min(8192 // head_dim, pl.next_power_of_2(max(n_slots, 1))))
        split = max(block, min(2048, pl.cdiv(n_slots, block) * block) // block * block)
        return cls(block_slots=block, split_slots=split)


def _read_rows(slots_ref, cache_ref, layer, entry, n_slots: int, n_tokens: int):
    """The block of list entries `entry` [block]: their validity and rows (0 where not valid),
    read by slot from layer `layer` of the [L, N, D] cache; loads past the list read nothing."""
    listed = entry < n_slots
    slot = plgpu.load(slots_ref, mask=listed, other=-1)  # [block]
    valid = (slot >= 0) & (slot < n_tokens)
    shape = (entry.shape[0], cache_ref.shape[2])
    row = jnp.where(valid, slot, 0)[:, None]  # [block, 1]
    column = jnp.arange(shape[1], dtype=jnp.int32)[None, :]  # [1, D]
    # Index arrays (not slices) on every axis: interpret mode discharges only these.
    rows = plgpu.load(
        cache_ref.at[layer, row, column], mask=jnp.broadcast_to(valid[:, None], shape), other=0
    )
    return valid, rows.astype(jnp.float32)  # [block], [block, D]


def gathered_logits_kernel(
    layer_ref,  # [1] int32: the layer of the stacked cache
    q_ref,  # [G, D]
    slots_ref,  # [block] int32
    k_ref,  # [L, N, D]: this (batch, KV head)'s cache, every layer, read by slot
    o_ref,  # [G, block] float32
    *,
    n_slots: int,
    n_tokens: int,
    scale: float,
):
    block = slots_ref.shape[0]
    entry = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
    valid, rows = _read_rows(slots_ref.at[:], k_ref, layer_ref[0], entry, n_slots, n_tokens)
    # G dot products per row as [block, D] multiply-adds: G < 16 is below Triton's dot.
    for g in range(q_ref.shape[0]):
        q_g = q_ref[jnp.int32(g), :].astype(jnp.float32)  # [D]
        logits = jnp.sum(rows * q_g[None, :], axis=1) * scale  # [block]
        out = jnp.where(valid, logits, -jnp.inf)
        plgpu.store(o_ref.at[jnp.int32(g), :], out, mask=entry < n_slots)


def gathered_attention_kernel(
    layer_ref,  # [1] int32: the layer of the stacked cache
    logits_ref,  # [G, M] float32
    slots_ref,  # [M] int32
    v_ref,  # [L, N, D]: this (batch, KV head)'s cache, every layer, read by slot
    acc_ref,  # [G, D] float32: this split's sum of exp(logit - top) v
    top_ref,  # [G] float32: this split's max logit (-inf if it has no valid slot)
    total_ref,  # [G] float32: this split's sum of exp(logit - top)
    *,
    n_slots: int,
    n_tokens: int,
    block: int,
    split: int,
):
    g_size = logits_ref.shape[0]
    first = pl.program_id(2) * split
    layer = layer_ref[0]

    def step(j, state):  # state: per query head (top, total, acc [D])
        start = first + j * block
        entry = start + jnp.arange(block, dtype=jnp.int32)
        valid, rows = _read_rows(
            slots_ref.at[pl.ds(start, block)], v_ref, layer, entry, n_slots, n_tokens
        )
        new_state = []
        for g, (top, total, acc) in enumerate(state):
            logit = plgpu.load(
                logits_ref.at[jnp.int32(g), pl.ds(start, block)], mask=valid, other=-jnp.inf
            )
            new_top = jnp.maximum(top, jnp.max(logit))
            shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)  # finite: no -inf - -inf
            rescale = jnp.exp(top - shift)
            p = jnp.exp(logit - shift)  # [block], 0 at invalid slots
            new_state.append(
                (
                    new_top,
                    total * rescale + jnp.sum(p),
                    acc * rescale + jnp.sum(p[:, None] * rows, axis=0),
                )
            )
        return tuple(new_state)

    head_dim = v_ref.shape[2]
    empty = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
    state = lax.fori_loop(0, split // block, step, (empty,) * g_size)
    for g, (top, total, acc) in enumerate(state):
        acc_ref[jnp.int32(g), :] = acc
        top_ref[jnp.int32(g)] = top
        total_ref[jnp.int32(g)] = total


def _check_head_dim(head_dim: int, shape) -> None:
    if head_dim & (head_dim - 1):
        raise ValueError(f"pallas_gpu needs a power-of-two head_dim, got {shape=}")


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def gathered_logits_pallas_gpu(
    q: jax.Array,
    k_cache: jax.Array,
    slots: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    block_sizes: SparseBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Logits of the K rows named by `slots`, read by index inside the Pallas-Triton kernel.

    Args:
      q: [B, Hkv, G, D] float32 or bfloat16; D a power of two.
      k_cache: [B, Hkv, N, D] float32 or bfloat16, or with `layer` a stack [L, B, Hkv, N, D].
      slots: [B, Hkv, E] int32; entries outside [0, N) (-1) are unused.
      scale: static float.
      layer: None, or the layer (int32 scalar, clipped to [0, L)) whose rows to read.
      block_sizes: slots per program and launch parameters; defaults when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      [B, Hkv, G, E] float32: scale * q_g . k_cache[slot], -inf at unused entries.
    """
    common.check_gathered_logits_inputs(q, k_cache, slots, scale, layer)
    batch, kv_heads, g_size, head_dim = q.shape
    _check_head_dim(head_dim, k_cache.shape)
    k_cache, layer = common.stacked_cache(k_cache, layer)
    n_layers, n_tokens, n_slots = k_cache.shape[0], k_cache.shape[3], slots.shape[2]
    block_sizes = block_sizes or SparseBlockSizes.get_default(n_slots, head_dim)
    block = block_sizes.block_slots
    return pl.pallas_call(
        functools.partial(
            gathered_logits_kernel, n_slots=n_slots, n_tokens=n_tokens, scale=float(scale)
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, g_size, n_slots), jnp.float32),
        grid=(batch, kv_heads, pl.cdiv(n_slots, block)),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, i: (0,)),
            pl.BlockSpec((None, None, g_size, head_dim), lambda b, h, i: (b, h, 0, 0)),
            pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i)),
            pl.BlockSpec(
                (n_layers, None, None, n_tokens, head_dim), lambda b, h, i: (0, b, h, 0, 0)
            ),
        ],
        out_specs=pl.BlockSpec((None, None, g_size, block), lambda b, h, i: (b, h, 0, i)),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="gathered_logits",
    )(layer.reshape(1), q, slots, k_cache)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gathered_attention_pallas_gpu(
    logits: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    block_sizes: SparseBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Softmax-weighted sum of the V rows named by `slots`, read by index inside the
    Pallas-Triton kernel: flash-decoding, one program per (batch, KV head, split of the list)
    with an online softmax over blocks of slots, the splits merged by XLA.

    Args:
      logits: [B, Hkv, G, M] float32.
      v_cache: [B, Hkv, N, D] float32 or bfloat16 (D a power of two), or with `layer` a stack
        [L, B, Hkv, N, D].
      slots: [B, Hkv, M] int32; entries outside [0, N) (-1) are unused, whatever their logit.
      layer: None, or the layer (int32 scalar, clipped to [0, L)) whose rows to read.
      block_sizes: slots per step and per split, launch parameters; defaults when None.
      interpret: run in Pallas interpret mode (any backend).

    Returns:
      out [B, Hkv, G, D] float32 (softmax(logits) @ v_cache[slots]; 0 with no valid slot) and
      lse [B, Hkv, G] float32 (logsumexp of the logits; -inf with no valid slot).
    """
    common.check_gathered_attention_inputs(logits, v_cache, slots, layer)
    batch, kv_heads, g_size, n_slots = logits.shape
    _check_head_dim(v_cache.shape[-1], v_cache.shape)
    v_cache, layer = common.stacked_cache(v_cache, layer)
    n_layers, n_tokens, head_dim = v_cache.shape[0], *v_cache.shape[3:]
    block_sizes = block_sizes or SparseBlockSizes.get_default(n_slots, head_dim)
    block, split = block_sizes.block_slots, block_sizes.split_slots
    n_splits = pl.cdiv(n_slots, split)
    row = lambda b, h, s: (b, h, 0, 0)  # noqa: E731
    split_spec = pl.BlockSpec((None, None, None, g_size), lambda b, h, s: (b, h, s, 0))
    acc, top, total = pl.pallas_call(
        functools.partial(
            gathered_attention_kernel,
            n_slots=n_slots,
            n_tokens=n_tokens,
            block=block,
            split=split,
        ),
        out_shape=(
            jax.ShapeDtypeStruct((batch, kv_heads, n_splits, g_size, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, n_splits, g_size), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, n_splits, g_size), jnp.float32),
        ),
        grid=(batch, kv_heads, n_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (0,)),
            pl.BlockSpec((None, None, g_size, n_slots), row),
            pl.BlockSpec((None, None, n_slots), lambda b, h, s: (b, h, 0)),
            pl.BlockSpec(
                (n_layers, None, None, n_tokens, head_dim), lambda b, h, s: (0, b, h, 0, 0)
            ),
        ],
        out_specs=(
            pl.BlockSpec((None, None, None, g_size, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            split_spec,
            split_spec,
        ),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="gathered_attention",
    )(layer.reshape(1), logits, slots, v_cache)
    return common.combine_splits(acc, top, total)
