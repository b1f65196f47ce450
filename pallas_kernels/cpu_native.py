"""The CPU kernels: DASH-KV's selection, sparse attention and tier-2 logits as native XLA FFI
custom calls (`cpu_native.cc`), with the contracts of `api.py`'s entries of the same names.

XLA:CPU gathers one element at a time and runs scatters and prefix scans serially, so on the
CPU the XLA reference spends most of a long context's decode step copying the rows it selected
(RESULTS.md, issue 15). These kernels make one pass over their input each: the codes, a row's
distances, the rows a slot list names, read by index and used while in cache.

`make` builds `libcpu_native.so` beside this file (`make native`) against the installed jaxlib's
FFI headers. Without it, `available()` is False and `implementation=None` keeps the XLA path;
naming "cpu" then raises, saying how to build it.
"""

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common

LIBRARY = Path(__file__).with_name("libcpu_native.so")
_TARGETS = {
    "dashkv_hamming_histogram": "DashkvHammingHistogram",
    "dashkv_distance_histogram": "DashkvDistanceHistogram",
    "dashkv_calibrate_distances": "DashkvCalibrateDistances",
    "dashkv_select_ranges": "DashkvSelectRanges",
    "dashkv_gathered_logits": "DashkvGatheredLogits",
    "dashkv_gathered_attention": "DashkvGatheredAttention",
    "dashkv_code_logits": "DashkvCodeLogits",
}


@functools.cache
def _load() -> str | None:
    """Registers the FFI targets once; None when loaded, else why not."""
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built: run `make native`"
    try:
        library = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as error:
        return f"{LIBRARY} does not load ({error}): rebuild it with `make native`"
    for target, symbol in _TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return None


def available() -> bool:
    """Whether the kernels are built and registered (they run on the CPU backend only)."""
    return _load() is None


def _require() -> None:
    if (why := _load()) is not None:
        raise RuntimeError(f"implementation='cpu' needs the native kernels: {why}")


def hamming_histogram_cpu(q_codes, k_codes, lo, hi, *, layer=None) -> tuple[jax.Array, jax.Array]:
    """`api.hamming_histogram`: distances [B, Hkv, N] and histogram [B, Hkv, G b + 1] int32."""
    _require()
    k_codes, layer = common.stacked_cache(k_codes, layer)
    batch, kv_heads, n_tokens, _ = k_codes.shape[1:]
    outs = (
        jax.ShapeDtypeStruct((batch, kv_heads, n_tokens), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, common.histogram_bins(q_codes.shape)), jnp.int32),
    )
    call = jax.ffi.ffi_call("dashkv_hamming_histogram", outs, vmap_method="sequential")
    return tuple(call(q_codes, k_codes, lo, hi, layer))


def distance_histogram_cpu(distances, n_bins: int) -> jax.Array:
    """`api.distance_histogram`: [B, Hkv, n_bins] int32 counts of the values in [0, n_bins)."""
    _require()
    out = jax.ShapeDtypeStruct((*distances.shape[:2], n_bins), jnp.int32)
    return jax.ffi.ffi_call("dashkv_distance_histogram", out, vmap_method="sequential")(distances)


def calibrate_distances_cpu(distances, histogram, consensus, momentum) -> tuple:
    """`api.calibrate_distances`, in place: the distances and the histogram XLA hands in are
    updated at the discounted slots only (aliased outputs; XLA copies them first if it still
    needs them)."""
    _require()
    batch, kv_heads, _ = distances.shape
    off_vote = (jnp.zeros((batch, kv_heads), jnp.int32), jnp.int32(0), jnp.int32(0))
    off_momentum = (jnp.full((batch, 1), -1, jnp.int32), jnp.zeros((batch, 1)), jnp.float32(0))
    outs = (
        jax.ShapeDtypeStruct(distances.shape, jnp.int32),
        jax.ShapeDtypeStruct(histogram.shape, jnp.int32),
    )
    call = jax.ffi.ffi_call(
        "dashkv_calibrate_distances",
        outs,
        vmap_method="sequential",
        input_output_aliases={0: 0, 1: 1},
    )
    return tuple(
        call(
            distances,
            histogram,
            *(off_vote if consensus is None else consensus),
            *(off_momentum if momentum is None else momentum),
            consensus=consensus is not None,
            momentum=momentum is not None,
        )
    )


def select_ranges_cpu(distances, bounds, sizes: tuple[int, ...]) -> tuple:
    """The slots of each rank range [k_i, k_{i+1}), given bounds (T_i, ties_i) = rank_threshold
    of k_0 <= k_1 <= ... (2 to 4 of them): one (indices [B, Hkv, sizes[i]], count [B, Hkv]) per
    range, as `api.select_ranks` gives them, from two passes over the distances."""
    _require()
    heads = distances.shape[:2]
    outs = (
        jax.ShapeDtypeStruct((*heads, sum(sizes)), jnp.int32),
        jax.ShapeDtypeStruct((*heads, len(sizes)), jnp.int32),
    )
    call = jax.ffi.ffi_call("dashkv_select_ranges", outs, vmap_method="sequential")
    thresholds, ties = (
        jnp.stack([jnp.broadcast_to(bound[part], heads) for bound in bounds], -1).astype(jnp.int32)
        for part in (0, 1)
    )
    indices, counts = call(distances, thresholds, ties, sizes=np.asarray(sizes, np.int64))
    starts = np.cumsum((0, *sizes))
    return tuple(
        (indices[..., start : start + size], counts[..., i])
        for i, (start, size) in enumerate(zip(starts, sizes, strict=False))
    )


def select_ranks_cpu(distances, lower, upper, size: int) -> tuple[jax.Array, jax.Array]:
    """`api.select_ranks`: indices [B, Hkv, size] (ascending, then -1) and count [B, Hkv]."""
    ((indices, count),) = select_ranges_cpu(distances, (lower, upper), (size,))
    return indices, count


def gathered_logits_cpu(q, k_cache, slots, *, scale: float, layer=None) -> jax.Array:
    """`api.gathered_logits` as one custom call: [B, Hkv, G, E] float32, -inf at unused slots."""
    _require()
    k_cache, layer = common.stacked_cache(k_cache, layer)
    out = jax.ShapeDtypeStruct((*q.shape[:3], slots.shape[2]), jnp.float32)
    call = jax.ffi.ffi_call("dashkv_gathered_logits", out, vmap_method="sequential")
    return call(q.astype(jnp.float32), k_cache, slots, layer, scale=np.float32(scale))


def gathered_attention_cpu(logits, v_cache, slots, *, layer=None) -> tuple[jax.Array, jax.Array]:
    """`api.gathered_attention` as one custom call: out [B, Hkv, G, D], lse [B, Hkv, G]."""
    _require()
    v_cache, layer = common.stacked_cache(v_cache, layer)
    heads = logits.shape[:3]
    outs = (
        jax.ShapeDtypeStruct((*heads, v_cache.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct(heads, jnp.float32),
    )
    call = jax.ffi.ffi_call("dashkv_gathered_attention", outs, vmap_method="sequential")
    return tuple(call(logits, v_cache, slots, layer))


def code_logits_cpu(q_codes, k_codes, slots, scale, mlp, *, groups: int, layer=None) -> jax.Array:
    """`api.code_logits` as one custom call: [B, Hkv, G, K] float32, -inf at unused slots. No
    MLP is one hidden unit of zero weight (a residual of exactly 0)."""
    _require()
    k_codes, layer = common.stacked_cache(k_codes, layer)
    if mlp is None:
        mlp = (jnp.zeros((groups, 1)), jnp.zeros(1), jnp.zeros(1), jnp.zeros(()))
    w1, b1, w2, b2 = (jnp.asarray(w, jnp.float32) for w in mlp)
    out = jax.ShapeDtypeStruct((*q_codes.shape[:3], slots.shape[2]), jnp.float32)
    call = jax.ffi.ffi_call("dashkv_code_logits", out, vmap_method="sequential")
    return call(q_codes, k_codes, slots, layer, scale, w1, b1, w2, b2.reshape(1))
