"""Sentinels and input checks shared by every implementation."""

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32

# Score of a slot at or beyond its row's valid length. It is below every real score
# (hamming scores lie in [-G*b, G*b]), so selection takes sentinel slots last.
HAMMING_SENTINEL = int(np.iinfo(np.int32).min)
ASYMMETRIC_SENTINEL = float("-inf")


def check_hamming_inputs(q_codes: jax.Array, k_codes: jax.Array, lengths: jax.Array) -> None:
    """Raises ValueError unless q [B, Hkv, G, W], k [B, Hkv, N, W] uint32 and lengths [B] int32."""
    if q_codes.dtype != jnp.uint32 or k_codes.dtype != jnp.uint32:
        raise ValueError(
            f"codes must be uint32, got {q_codes.dtype=} {q_codes.shape=}, "
            f"{k_codes.dtype=} {k_codes.shape=}"
        )
    if q_codes.ndim != 4 or k_codes.ndim != 4:
        raise ValueError(
            f"want q_codes [B, Hkv, G, W] and k_codes [B, Hkv, N, W], got "
            f"{q_codes.shape=} {k_codes.shape=}"
        )
    if q_codes.shape[:2] != k_codes.shape[:2] or q_codes.shape[-1] != k_codes.shape[-1]:
        raise ValueError(
            f"q_codes and k_codes disagree on batch, KV heads or word count: "
            f"{q_codes.shape=} {k_codes.shape=}"
        )
    _check_common(q_codes.shape, k_codes, lengths)


def check_asymmetric_inputs(q_weights: jax.Array, k_codes: jax.Array, lengths: jax.Array) -> None:
    """Raises ValueError unless q [B, Hkv, G, b] float32, k [B, Hkv, N, b/32] uint32, lengths [B]
    int32."""
    if q_weights.dtype != jnp.float32 or k_codes.dtype != jnp.uint32:
        raise ValueError(
            f"want float32 q_weights and uint32 k_codes, got {q_weights.dtype=} "
            f"{q_weights.shape=}, {k_codes.dtype=} {k_codes.shape=}"
        )
    if q_weights.ndim != 4 or k_codes.ndim != 4:
        raise ValueError(
            f"want q_weights [B, Hkv, G, b] and k_codes [B, Hkv, N, W], got "
            f"{q_weights.shape=} {k_codes.shape=}"
        )
    if q_weights.shape[-1] % WORD_BITS:
        raise ValueError(f"bits b must be a multiple of 32, got {q_weights.shape=}")
    if (
        q_weights.shape[:2] != k_codes.shape[:2]
        or q_weights.shape[-1] != WORD_BITS * k_codes.shape[-1]
    ):
        raise ValueError(
            f"q_weights and k_codes disagree on batch, KV heads or bits (b = 32 * W): "
            f"{q_weights.shape=} {k_codes.shape=}"
        )
    _check_common(q_weights.shape, k_codes, lengths)


def _check_common(q_shape: tuple[int, ...], k_codes: jax.Array, lengths: jax.Array) -> None:
    if lengths.dtype != jnp.int32 or lengths.shape != (k_codes.shape[0],):
        raise ValueError(
            f"lengths must be int32 [B], got {lengths.dtype=} {lengths.shape=} for {k_codes.shape=}"
        )
    if min(q_shape) < 1 or min(k_codes.shape) < 1:
        raise ValueError(f"empty axis in {q_shape=} or {k_codes.shape=}")


def check_topk_inputs(scores: jax.Array, k: int) -> None:
    """Raises ValueError unless scores [..., N] is int32 or float32 and 1 <= k <= N."""
    if scores.dtype not in (jnp.int32, jnp.float32):
        raise ValueError(f"scores must be int32 or float32, got {scores.dtype=} {scores.shape=}")
    if scores.ndim < 1:
        raise ValueError(f"scores need a slot axis, got {scores.shape=}")
    check_k(k, scores.shape)


def check_k(k: int, scores_shape: tuple[int, ...]) -> None:
    """Raises ValueError unless 1 <= k <= N, N the last entry of `scores_shape`."""
    if not isinstance(k, int) or not 1 <= k <= scores_shape[-1]:
        raise ValueError(f"need an int 1 <= k <= N, got {k=} for {scores_shape=}")
