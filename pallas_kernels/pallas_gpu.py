"""Pallas-Triton (GPU) kernels: packed-bit hamming and asymmetric scores over blocks of tokens.

One program scores `block_n` tokens of one (batch, KV head) row. Word w of the block is a
strided [block_n] column load of the [block_n, W] code tile (the W columns share cache lines, so
the tile is read from memory once). Triton wants power-of-two tensor sizes: block_n is one, and
G and W are unrolled loops. Loads past the cache end or the row's length are masked off, so
blocks past the length read nothing and only write the sentinel.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
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
