"""Public entries: packed-bit scores and top-k selection behind `implementation=`.

Implementations:
  "xla"           the XLA reference (`reference.py`): the definition of correct, and the CPU path.
  "pallas_tpu"    the Pallas Mosaic kernel (`pallas_tpu.py`); TPU only.
  "pallas_gpu"    the Pallas-Triton kernel (`pallas_gpu.py`); GPU only.
  "interpret"     the Mosaic kernel's source in Pallas interpret mode; any backend (tests).
  "interpret_gpu" the Triton kernel's source in Pallas interpret mode; any backend (tests).
  None            the best for the current backend: pallas_tpu on TPU, pallas_gpu on GPU, else
                  xla; and xla wherever the kernel cannot take the shape (pallas_tpu needs the
                  word count W = b/32 to divide 128).

Selection has one implementation for every backend (`select.py`, plain JAX).

Sharding: every entry is jit-able with in/out shardings over the batch and KV-head axes. XLA
cannot split a compiled Pallas kernel (a custom call), so to run a kernel on each device's own
shard, wrap the entry in `jax.shard_map` over those axes (tests/test_kernels_sharding.py).
"""

import functools
from typing import Literal

import jax
from jax import lax

from pallas_kernels import common, pallas_gpu, pallas_tpu, reference, select

Implementation = Literal["xla", "pallas_tpu", "pallas_gpu", "interpret", "interpret_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = (
    "xla",
    "pallas_tpu",
    "pallas_gpu",
    "interpret",
    "interpret_gpu",
)
_HAMMING = {
    "xla": reference.hamming_scores_reference,
    "pallas_tpu": pallas_tpu.hamming_scores_pallas_tpu,
    "pallas_gpu": pallas_gpu.hamming_scores_pallas_gpu,
    "interpret": functools.partial(pallas_tpu.hamming_scores_pallas_tpu, interpret=True),
    "interpret_gpu": functools.partial(pallas_gpu.hamming_scores_pallas_gpu, interpret=True),
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


def resolve_implementation(implementation: str | None, n_words: int) -> str:
    """The implementation to run: `implementation` itself, or the best one for None."""
    if implementation is None:
        best = available_implementations()[0]
        if best == "pallas_tpu" and pallas_tpu.LANES % n_words:
            return "xla"
        return best
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {implementation=}; choose from {IMPLEMENTATIONS} or None")
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
