"""Sign packing of real vectors into uint32 words, and its inverse for tests."""

import functools

import jax
import jax.numpy as jnp

WORD_BITS = 32


@jax.jit
def pack_bits(x: jax.Array) -> jax.Array:
    """Packs the signs of `x` into uint32 words.

    Bit `i` of word `w` is `x[..., 32 * w + i] > 0` (zero and NaN pack as 0).

    Args:
      x: [..., b] real values, b a multiple of 32.

    Returns:
      [..., b // 32] uint32.
    """
    if x.ndim < 1 or x.shape[-1] % WORD_BITS:
        raise ValueError(f"pack_bits needs a last axis that is a multiple of 32, got {x.shape=}")
    bits = (x > 0).reshape(*x.shape[:-1], x.shape[-1] // WORD_BITS, WORD_BITS)
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(WORD_BITS, dtype=jnp.uint32))  # [32]
    # The 32 terms are distinct powers of two, so the sum is a bitwise OR.
    return jnp.sum(jnp.where(bits, weights, jnp.uint32(0)), axis=-1, dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def unpack_bits(codes: jax.Array, *, dtype=jnp.bool_) -> jax.Array:
    """Inverse of `pack_bits`: [..., W] uint32 -> [..., 32 * W] bits as `dtype` (0/1)."""
    if codes.dtype != jnp.uint32:
        raise ValueError(f"unpack_bits needs uint32 codes, got {codes.dtype=} {codes.shape=}")
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)  # [32]
    bits = jnp.right_shift(codes[..., None], shifts) & jnp.uint32(1)  # [..., W, 32]
    return bits.reshape(*codes.shape[:-1], codes.shape[-1] * WORD_BITS).astype(dtype)
