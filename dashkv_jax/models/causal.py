"""The models' own attention: exact causal attention for a whole sequence (the no-cache forward,
capture and every backend's exact prefill), and the `Attention` protocol a model calls per layer.

The model computes post-RoPE q, k, v and hands them to a backend from `dashkv_jax.attention`;
the backend writes its cache and returns the attention output, so swapping backends (full,
DASH-KV, a baseline) never touches the model, and this folder never imports that one.

`causal_attention` is the one entry the models call. It never materialises `[T, T]` logits
unless asked to: on CPU a blocked online softmax (query blocks x key blocks, key blocks above
the diagonal or outside a sliding window skipped), on GPU cuDNN flash attention, on TPU splash
attention; `causal_attention_reference` is the plain `[T, T]` version the others are tested
against, as in tokamax (`implementation=None | "xla" | "blocked" | "cudnn" | "splash"`).
"""

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from dashkv_jax.models.config import ModelConfig

Array = jax.Array


class Attention(Protocol):
    """What a model needs from an attention backend (`dashkv_jax.attention`)."""

    def init_cache(self, config: ModelConfig, batch: int, max_len: int, dtype) -> Any: ...

    def prefill(self, cache, layer: Array, q: Array, k: Array, v: Array) -> tuple[Array, Any]:
        """Causal attention over a whole prompt written from position 0; q [B,T,Hq,D]."""

    def prefill_chunk(self, cache, layer, q, k, v, start) -> tuple[Array, Any]:
        """A chunk of a long prompt at positions start..start+T-1, the chunks before it in the
        cache (`Llama.prefill(..., chunk=...)`); q [B,T,Hq,D], k/v [B,T,Hkv,D]."""

    def decode(self, cache, layer: Array, q: Array, k: Array, v: Array) -> tuple[Array, Any]:
        """One new token per row at position `cache.lengths`; q [B,1,Hq,D], k/v [B,1,Hkv,D]."""

    def adopt(self, cache) -> Any:
        """This backend's cache for a prompt that exact prefill wrote into `cache` (a
        `KVCache`): what its own prefill would have left (every backend's prefill is exact),
        so methods can share one."""


# -- reference ---------------------------------------------------------------------------------


def visible_keys(query_pos: Array, key_pos: Array, window: int | None) -> Array:
    """Which keys a query sees: key <= query, and key > query - window with a sliding window."""
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    return visible


def causal_attention_reference(q: Array, k: Array, v: Array, *, window: int | None = None):
    """Exact causal GQA attention with `[T, T]` float32 logits: the meaning of correct.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]. With `window`, query i sees keys
    i - window < j <= i (Gemma's sliding window: itself and the window - 1 before it).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32)
    positions = jnp.arange(t)
    visible = visible_keys(positions[:, None], positions[None, :], window)  # [T, T]
    logits = jnp.where(visible, logits * d**-0.5, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgts,bshd->bthgd", weights, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype).reshape(b, t, hq, d)


# -- blocked online softmax (XLA, any backend) ----------------------------------------------------


@dataclasses.dataclass(slots=True, frozen=True)
class BlockSizes:
    """Query and key rows per block of `blocked_causal_attention`."""

    block_q: int
    block_k: int

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be positive, got {self.block_q=}, {self.block_k=}")

    @classmethod
    def get_default(cls) -> "BlockSizes":
        # At T = 8192 on a 2-core CPU (SmolLM2's and Gemma 3's heads), blocks of 128 to 512
        # rows ran within noise of each other and 1024 slower; 512 keeps the loop shortest.
        return cls(block_q=512, block_k=512)


def _blocks(t: int, block: int) -> tuple[int, int]:
    """(count, size) of the fewest blocks of at most `block` rows covering t rows, evened out
    so padding stays under 8 rows per block."""
    count = -(-t // block)
    size = -(-t // count)
    return count, min(-(-size // 8) * 8, block) if count > 1 else t


@functools.partial(jax.jit, static_argnames=("window", "block_sizes"))
def blocked_causal_attention(
    q: Array,  # [B, T, Hq, D]
    k: Array,  # [B, T, Hkv, D]
    v: Array,  # [B, T, Hkv, D]
    *,
    window: int | None = None,
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Exact causal GQA attention in O(T x block) memory: an online softmax over key blocks.

    For each block of queries, a loop over only the key blocks it can see (none above the
    diagonal, none wholly outside the sliding window) carries the running max, denominator and
    output in float32. The G query heads of a KV head share one matmul. -> [B, T, Hq, D].
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    sizes = block_sizes or BlockSizes.get_default()
    n_q, bq = _blocks(t, sizes.block_q)
    n_k, bk = _blocks(t, sizes.block_k)

    def pad(x, rows):  # [B, T, H, D] -> [B, H, rows, D], zeros past T
        return jnp.pad(x, ((0, 0), (0, rows - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    keys, values = pad(k, n_k * bk), pad(v, n_k * bk)  # [B, Hkv, n_k * bk, D]
    # [n_q, B, Hkv, bq * G, D]: a block's G heads of one KV head stacked as rows of one matmul.
    queries = (
        jnp.pad(q, ((0, 0), (0, n_q * bq - t), (0, 0), (0, 0)))
        .reshape(b, n_q, bq, hkv, g, d)
        .transpose(1, 0, 3, 2, 4, 5)
        .reshape(n_q, b, hkv, bq * g, d)
    )

    def query_block(xs):
        i, qb = xs  # qb [B, Hkv, bq * G, D]
        query_pos = i * bq + jnp.arange(bq * g) // g  # [bq * G], rows ordered (position, head)
        first = 0 if window is None else jnp.maximum(i * bq - window + 1, 0) // bk
        last = jnp.minimum((i + 1) * bq - 1, t - 1) // bk

        def key_block(j, carry):
            peak, total, out = carry  # [B, Hkv, bq*G], [B, Hkv, bq*G], [B, Hkv, bq*G, D]
            kb = jax.lax.dynamic_slice_in_dim(keys, j * bk, bk, axis=2)  # [B, Hkv, bk, D]
            vb = jax.lax.dynamic_slice_in_dim(values, j * bk, bk, axis=2)
            logits = jnp.einsum("bhmd,bhkd->bhmk", qb, kb, preferred_element_type=jnp.float32)
            visible = visible_keys(query_pos[:, None], j * bk + jnp.arange(bk)[None], window)
            logits = jnp.where(visible, logits * d**-0.5, -jnp.inf)
            new_peak = jnp.maximum(peak, logits.max(axis=-1))
            # A row that has seen no key yet (the window's first block) stays at zero, not NaN.
            shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
            weights = jnp.exp(logits - shift[..., None])
            rescale = jnp.exp(peak - shift)
            out = out * rescale[..., None] + jnp.einsum(
                "bhmk,bhkd->bhmd", weights.astype(vb.dtype), vb,
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            return new_peak, total * rescale + weights.sum(axis=-1), out

        rows = (b, hkv, bq * g)
        init = (
            jnp.full(rows, -jnp.inf, jnp.float32),
            jnp.zeros(rows, jnp.float32),
            jnp.zeros((*rows, d), jnp.float32),
        )
        _, total, out = jax.lax.fori_loop(first, last + 1, key_block, init)
        return (out / total[..., None]).astype(v.dtype)

    out = jax.lax.map(query_block, (jnp.arange(n_q), queries))  # [n_q, B, Hkv, bq * G, D]
    out = out.reshape(n_q, b, hkv, bq, g, d).transpose(1, 0, 3, 2, 4, 5)
    return out.reshape(b, n_q * bq, hq, d)[:, :t]


# -- accelerators --------------------------------------------------------------------------------


def cudnn_causal_attention(q: Array, k: Array, v: Array, *, window: int | None = None) -> Array:
    """cuDNN flash attention (GPU; bfloat16 / float16, GQA native). Raises where cuDNN refuses
    the shape or dtype."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cuDNN flash attention needs bf16 or fp16, got {q.dtype}")
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )


SPLASH_BLOCK = 128  # splash attention's default tile; the sequence is padded to a multiple


def splash_causal_attention(
    q: Array, k: Array, v: Array, *, window: int | None = None, interpret: bool = False
) -> Array:
    """Splash attention (TPU Pallas; `interpret=True` runs it anywhere, slowly): one MQA kernel
    per KV head over its G query heads, vmapped over batch and KV heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK  # padded keys come after every real query
    shape = (padded, padded)
    mask = (
        masks.CausalMask(shape)
        if window is None
        else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    )
    kernel = splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([mask] * g),
        block_sizes=splash.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK),
        interpret=interpret,
    )

    def heads_first(x):  # [B, T, H, D] -> [B, H, padded, D]
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # The kernel does not scale its logits.
    scaled = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    qg = heads_first(scaled).reshape(b, hkv, g, padded, d)
    out = jax.vmap(jax.vmap(kernel))(qg, heads_first(k), heads_first(v))  # [B, Hkv, G, P, D]
    return out.reshape(b, hq, padded, d)[:, :, :t].transpose(0, 2, 1, 3).astype(v.dtype)


# -- the entry ---------------------------------------------------------------------------------

IMPLEMENTATIONS = ("xla", "blocked", "cudnn", "splash")
# Tried in order when no implementation is named; "xla" materialises [T, T] and comes last.
FALLBACK_ORDER = {
    "cpu": ("blocked", "xla"),
    "gpu": ("cudnn", "blocked", "xla"),
    "tpu": ("splash", "blocked", "xla"),
}
_RUNS_ON = {"cudnn": ("gpu",), "splash": ("tpu",)}
_MAY_REFUSE = ("cudnn", "splash")  # kernels with shape / dtype limits; XLA takes anything


def available_implementations(backend: str | None = None) -> tuple[str, ...]:
    """The implementations that can run on `backend` (default: JAX's), in fallback order."""
    backend = backend or jax.default_backend()
    if backend in FALLBACK_ORDER:
        return FALLBACK_ORDER[backend]
    return ("blocked", "xla")


def causal_attention(
    q: Array, k: Array, v: Array, *, window: int | None = None, implementation: str | None = None
) -> Array:
    """Exact causal GQA attention within one sequence, float32 softmax statistics.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]; with `window`, query i sees keys
    i - window < j <= i. `implementation` None picks the first of `available_implementations()`
    that accepts the input (cuDNN refuses float32, for one); a named one runs or raises.
    """
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must be positive, got {window=}")
    if q.shape[2] % k.shape[2] or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, Hq, D] and k, v [B, T, Hkv, D] with Hkv | Hq: "
            f"{q.shape=}, {k.shape=}, {v.shape=}"
        )
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown causal attention implementation {implementation!r} "
                f"(known: {', '.join(IMPLEMENTATIONS)})"
            )
        backend = jax.default_backend()
        if backend not in _RUNS_ON.get(implementation, (backend,)):
            raise ValueError(f"{implementation!r} attention does not run on {backend!r}")
        return _IMPLEMENTATION_FNS[implementation](q, k, v, window=window)
    for name in available_implementations():
        if name not in _MAY_REFUSE:
            return _IMPLEMENTATION_FNS[name](q, k, v, window=window)
        try:
            return _IMPLEMENTATION_FNS[name](q, k, v, window=window)
        except (NotImplementedError, ValueError, TypeError, RuntimeError):  # refused: next
            continue
    return blocked_causal_attention(q, k, v, window=window)


_IMPLEMENTATION_FNS = {
    "xla": causal_attention_reference,
    "blocked": blocked_causal_attention,
    "cudnn": cudnn_causal_attention,
    "splash": splash_causal_attention,
}
