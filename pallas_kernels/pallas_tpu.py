"""Pallas Mosaic (TPU) kernels: packed-bit hamming and asymmetric scores over blocks of tokens.

Layout. The code cache [B, Hkv, N, W] is read through a free, lane-dense view
[B, Hkv, N*W/128, 128]: each 128-lane row holds 128/W consecutive tokens, word w of token t in
lane t*W + w. The query words are tiled to the same lane pattern, so the XOR and the vector
popcount run on full vregs; the W lanes of a token are then summed by a small 0/1 matmul on the
MXU (exact in float32: operands are integers below 2**24). The grid is (B, Hkv, N-blocks); the
lengths arrive by scalar prefetch, and blocks wholly past a row's length map to the last block
with valid slots (no new DMA) and are filled with the sentinel.
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
