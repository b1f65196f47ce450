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
    _check_codes(q_codes, k_codes)
    _check_common(q_codes.shape, k_codes, lengths)


def _check_codes(q_codes: jax.Array, k_codes: jax.Array) -> None:
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


# Distance of a slot outside its row's selectable range [lo, hi). It is above every real distance
# (hamming distances lie in [0, G*b]), so no rank threshold ever reaches it.
DISTANCE_SENTINEL = int(np.iinfo(np.int32).max)


def histogram_bins(q_shape: tuple[int, ...]) -> int:
    """G * b + 1: the histogram bins of a query group [B, Hkv, G, W] (distances 0 .. G * b)."""
    return q_shape[2] * WORD_BITS * q_shape[3] + 1


def check_histogram_inputs(
    q_codes: jax.Array, k_codes: jax.Array, lo: jax.Array, hi: jax.Array
) -> None:
    """Raises ValueError unless q [B, Hkv, G, W], k [B, Hkv, N, W] uint32 and lo, hi [B] int32."""
    _check_codes(q_codes, k_codes)
    if min(q_codes.shape) < 1 or min(k_codes.shape) < 1:
        raise ValueError(f"empty axis in {q_codes.shape=} or {k_codes.shape=}")
    if any(x.dtype != jnp.int32 or x.shape != (k_codes.shape[0],) for x in (lo, hi)):
        raise ValueError(
            f"lo and hi must be int32 [B], got {lo.dtype=} {lo.shape=} {hi.dtype=} {hi.shape=} "
            f"for {k_codes.shape=}"
        )


def check_threshold_inputs(histogram: jax.Array, k) -> None:
    """Raises ValueError unless histogram [B, Hkv, bins] int32 and k an int >= 0 or int32 [B, Hkv]
    (or anything that broadcasts to it)."""
    if histogram.dtype != jnp.int32 or histogram.ndim != 3 or histogram.shape[-1] < 1:
        raise ValueError(
            f"histogram must be int32 [B, Hkv, bins], got {histogram.dtype=} {histogram.shape=}"
        )
    if isinstance(k, int):
        if k < 0:
            raise ValueError(f"need k >= 0, got {k=}")
        return
    k_dtype, k_shape = jnp.result_type(k), jnp.shape(k)
    try:
        broadcasts = jnp.broadcast_shapes(k_shape, histogram.shape[:-1]) == histogram.shape[:-1]
    except ValueError:
        broadcasts = False
    if k_dtype != jnp.int32 or not broadcasts:
        raise ValueError(
            f"k must be an int or int32 broadcasting to [B, Hkv], got {k_dtype=} {k_shape=} "
            f"for {histogram.shape=}"
        )


def check_calibrate_inputs(distances: jax.Array, histogram: jax.Array, consensus, momentum) -> None:
    """Raises ValueError unless distances [B, Hkv, N] and histogram [B, Hkv, bins] int32,
    consensus None or (thresholds [B, Hkv] int32, t_vote, discount int32 scalars), momentum None
    or (slots [B, M] int32, weights [B, M] float32, scale a float32 scalar)."""
    if distances.dtype != jnp.int32 or distances.ndim != 3 or min(distances.shape) < 1:
        raise ValueError(
            f"distances must be int32 [B, Hkv, N], got {distances.dtype=} {distances.shape=}"
        )
    if (
        histogram.dtype != jnp.int32
        or histogram.shape[:2] != distances.shape[:2]
        or (histogram.ndim != 3 or histogram.shape[2] < 1)
    ):
        raise ValueError(
            f"histogram must be int32 [B, Hkv, bins], got {histogram.dtype=} "
            f"{histogram.shape=} for {distances.shape=}"
        )

    def want(x, dtype, shape, what):
        if jnp.result_type(x) != dtype or jnp.shape(x) != shape:
            raise ValueError(
                f"{what} must be {jnp.dtype(dtype).name} {list(shape)}, got "
                f"{jnp.result_type(x)} {list(jnp.shape(x))}"
            )

    if consensus is not None:
        thresholds, t_vote, discount = consensus
        want(thresholds, jnp.int32, distances.shape[:2], "consensus thresholds")
        want(t_vote, jnp.int32, (), "consensus t_vote")
        want(discount, jnp.int32, (), "consensus discount")
    if momentum is not None:
        slots, weights, scale = momentum
        if jnp.ndim(slots) != 2 or jnp.shape(slots)[0] != distances.shape[0]:
            raise ValueError(f"momentum slots must be [B, M], got {jnp.shape(slots)}")
        want(slots, jnp.int32, jnp.shape(slots), "momentum slots")
        want(weights, jnp.float32, jnp.shape(slots), "momentum weights")
        want(scale, jnp.float32, (), "momentum scale")


def check_select_inputs(distances: jax.Array, lower, upper, size: int) -> None:
    """Raises ValueError unless distances [B, Hkv, N] int32, lower and upper pairs of int32
    [B, Hkv] (threshold, ties), and size an int >= 0."""
    if distances.dtype != jnp.int32 or distances.ndim != 3 or min(distances.shape) < 1:
        raise ValueError(
            f"distances must be int32 [B, Hkv, N], got {distances.dtype=} {distances.shape=}"
        )
    for name, bound in (("lower", lower), ("upper", upper)):
        pair = isinstance(bound, tuple | list) and len(bound) == 2
        shapes = [(jnp.result_type(x), jnp.shape(x)) for x in bound] if pair else None
        if shapes is None or any(
            dtype != jnp.int32 or shape != distances.shape[:2] for dtype, shape in shapes
        ):
            raise ValueError(
                f"{name} must be (threshold, ties), each int32 [B, Hkv] = {distances.shape[:2]}, "
                f"got {shapes=} for {distances.shape=}"
            )
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a static int >= 0, got {size=} for {distances.shape=}")


def rank_offsets(
    counts: jax.Array,  # [B, Hkv, n_blocks, 4] int32: D < T_a, == T_a, < T_b, == T_b per block
    ties_a: jax.Array,  # [B, Hkv] int32
    ties_b: jax.Array,  # [B, Hkv] int32
) -> tuple[jax.Array, jax.Array]:
    """The per-block offsets the compaction pass starts from, and each row's selected count.

    The slots below rank k (D < T, or the first `ties` at D == T) are a prefix of the rank order
    for any (T, ties), so the lower set lies inside the upper one (or the other way round, and
    nothing is selected): per block, selected = max(below_b - below_a, 0).

    Returns:
      offsets [B, Hkv, n_blocks, 4] int32 (slots at T_a and at T_b before each block, list
      entries before it, the block's selected count) and total [B, Hkv] int32.
    """
    less_a, equal_a, less_b, equal_b = (counts[..., j] for j in range(4))

    def exclusive(x):
        return jnp.cumsum(x, axis=-1) - x

    equal_a_before, equal_b_before = exclusive(equal_a), exclusive(equal_b)
    below_a = less_a + jnp.clip(ties_a[..., None] - equal_a_before, 0, equal_a)
    below_b = less_b + jnp.clip(ties_b[..., None] - equal_b_before, 0, equal_b)
    selected = jnp.maximum(below_b - below_a, 0)  # [B, Hkv, n_blocks]
    offsets = jnp.stack([equal_a_before, equal_b_before, exclusive(selected), selected], axis=-1)
    return offsets, jnp.sum(selected, axis=-1)


# --- Sparse attention over rows read by slot ---------------------------------------------------

CACHE_DTYPES = (jnp.float32, jnp.bfloat16)


def check_gathered_logits_inputs(
    q: jax.Array, k_cache: jax.Array, slots: jax.Array, scale: float, layer=None
) -> None:
    """Raises ValueError unless q [B, Hkv, G, D] and k_cache [B, Hkv, N, D] (with `layer`: a
    stack [L, B, Hkv, N, D]) are float32 or bfloat16, slots [B, Hkv, E] int32, scale a Python
    real number and layer None, an int or an int32 scalar."""
    k_cache = _one_layer("k_cache", k_cache, layer)
    _check_cache_operand("q", q, "k_cache", k_cache, CACHE_DTYPES)
    if q.shape[:2] != k_cache.shape[:2] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(
            f"q [B, Hkv, G, D] and k_cache [B, Hkv, N, D] disagree: {q.shape=} {k_cache.shape=}"
        )
    _check_slots(slots, k_cache, "E")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ValueError(f"scale must be a static Python float, got {scale=!r}")


def check_gathered_attention_inputs(
    logits: jax.Array, v_cache: jax.Array, slots: jax.Array, layer=None
) -> None:
    """Raises ValueError unless logits [B, Hkv, G, M] float32, v_cache [B, Hkv, N, D] (with
    `layer`: a stack [L, B, Hkv, N, D]) float32 or bfloat16, slots [B, Hkv, M] int32 and layer
    None, an int or an int32 scalar."""
    v_cache = _one_layer("v_cache", v_cache, layer)
    _check_cache_operand("logits", logits, "v_cache", v_cache, (jnp.float32,))
    _check_slots(slots, v_cache, "M")
    if logits.shape[:2] != v_cache.shape[:2] or logits.shape[3] != slots.shape[2]:
        raise ValueError(
            f"logits [B, Hkv, G, M], v_cache [B, Hkv, N, D] and slots [B, Hkv, M] disagree: "
            f"{logits.shape=} {v_cache.shape=} {slots.shape=}"
        )


def _one_layer(name: str, cache: jax.Array, layer) -> jax.Array:
    """The shape and dtype of one layer of `cache`: itself without `layer`, else the stack's
    trailing four axes, after checking that it is a stack and layer a scalar."""
    if layer is None:
        return cache
    layer_dtype, layer_shape = jnp.result_type(layer), jnp.shape(layer)
    if isinstance(layer, bool) or layer_dtype != jnp.int32 or layer_shape != ():
        raise ValueError(
            f"layer must be an int or an int32 scalar, got {layer_dtype=} {layer_shape=}"
        )
    if cache.ndim != 5 or cache.shape[0] < 1:
        raise ValueError(
            f"with a layer, {name} must be a stack [L, B, Hkv, N, D], got {cache.shape=}"
        )
    return jax.ShapeDtypeStruct(cache.shape[1:], cache.dtype)


def stacked_cache(cache: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
    """(cache as a stack [L, B, Hkv, N, D], layer as an int32 scalar clipped to [0, L)): a
    [B, Hkv, N, D] cache (layer None) is layer 0 of a one-layer stack, a free reshape. Clipping
    keeps a traced layer from addressing memory outside the stack."""
    if layer is None:
        return cache[None], jnp.zeros((), jnp.int32)
    return cache, jnp.clip(jnp.asarray(layer, jnp.int32), 0, cache.shape[0] - 1)


def _check_cache_operand(name: str, x: jax.Array, cache_name: str, cache: jax.Array, dtypes):
    """x (q or logits) and the cache: 4-D, of the allowed dtypes, no empty axis but x's last."""
    described = f"{name}.shape={x.shape}, {cache_name}.shape={cache.shape}"
    if x.ndim != 4 or cache.ndim != 4:
        raise ValueError(f"want 4-D {name} and {cache_name} [B, Hkv, N, D], got {described}")
    if x.dtype not in dtypes or cache.dtype not in CACHE_DTYPES:
        raise ValueError(
            f"want {name} in {[jnp.dtype(d).name for d in dtypes]} and a float32 or bfloat16 "
            f"{cache_name}, got {name}.dtype={x.dtype!r}, {cache_name}.dtype={cache.dtype!r} "
            f"({described})"
        )
    if min(x.shape[:3]) < 1 or min(cache.shape) < 1:
        raise ValueError(f"empty axis in {described}")


def _check_slots(slots: jax.Array, cache: jax.Array, axis: str) -> None:
    if slots.dtype != jnp.int32 or slots.ndim != 3 or slots.shape[:2] != cache.shape[:2]:
        raise ValueError(
            f"slots must be int32 [B, Hkv, {axis}] matching the cache's [B, Hkv], got "
            f"{slots.dtype=} {slots.shape=} for {cache.shape=}"
        )


def combine_splits(
    acc: jax.Array,  # [B, Hkv, S, G, D] float32: sum of exp(logit - m_s) v over split s
    top: jax.Array,  # [B, Hkv, S, G] float32: split s's max logit (-inf when it has none)
    total: jax.Array,  # [B, Hkv, S, G] float32: sum of exp(logit - m_s) over split s
) -> tuple[jax.Array, jax.Array]:  # [B, Hkv, G, D], [B, Hkv, G]
    """Merges the partial softmaxes of S splits of the slot list (flash-decoding's last step):
    out = sum_s w_s acc_s / sum_s w_s total_s and lse = m + log(sum_s w_s total_s), with
    w_s = exp(m_s - m), m the max over splits. A split with no valid slot has m_s = -inf
    (w_s = 0); a row with none gives out 0 and lse -inf."""
    overall = jnp.max(top, axis=2)  # [B, Hkv, G]
    shift = jnp.where(overall == -jnp.inf, 0.0, overall)
    weight = jnp.exp(top - shift[:, :, None])  # [B, Hkv, S, G]
    merged = jnp.sum(weight * total, axis=2)  # [B, Hkv, G]
    return normalise(jnp.sum(weight[..., None] * acc, axis=2), shift, merged)


def normalise(acc: jax.Array, shift: jax.Array, total: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(acc / total, shift + log(total)), with out = 0 and lse = -inf where total == 0 (no valid
    slot): acc [..., D], shift (finite) and total [...]."""
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out, shift + jnp.log(total)


def check_code_logits_inputs(
    q_codes: jax.Array,
    k_codes: jax.Array,
    slots: jax.Array,
    scale: jax.Array,
    mlp: tuple | None,
    groups: int,
    layer=None,
) -> None:
    """Raises ValueError unless q_codes [B, Hkv, G, W] and k_codes [B, Hkv, N, W] (with `layer`:
    a stack [L, B, Hkv, N, W]) are uint32, slots [B, Hkv, K] int32, scale [Hkv, G] float32,
    groups splits the 32 W bits into groups that tile 32-bit words, and mlp is None or float32
    (w1 [groups, H], b1 [H], w2 [H], b2 [])."""
    k_codes = _one_layer("k_codes", k_codes, layer)
    shapes = f"{q_codes.shape=} {k_codes.shape=}"
    if q_codes.dtype != jnp.uint32 or k_codes.dtype != jnp.uint32:
        raise ValueError(f"codes must be uint32, got {q_codes.dtype=} {k_codes.dtype=}")
    if q_codes.ndim != 4 or k_codes.ndim != 4 or 0 in q_codes.shape:
        raise ValueError(f"want q_codes [B, Hkv, G, W] and k_codes [B, Hkv, N, W], got {shapes}")
    if q_codes.shape[:2] != k_codes.shape[:2] or q_codes.shape[3] != k_codes.shape[3]:
        raise ValueError(f"q_codes [B, Hkv, G, W] and k_codes [B, Hkv, N, W] disagree: {shapes}")
    _check_slots(slots, k_codes, "K")
    if scale.dtype != jnp.float32 or scale.shape != q_codes.shape[1:3]:
        raise ValueError(f"scale must be float32 [Hkv, G], got {scale.dtype=} {scale.shape=}")
    bits = 32 * q_codes.shape[3]
    group_bits = bits // groups if isinstance(groups, int) and groups > 0 else 0
    if not group_bits or bits % groups or (32 % group_bits and group_bits % 32):
        raise ValueError(
            f"groups must split {bits} bits into groups that tile 32-bit words, got {groups=}"
        )
    if mlp is None:
        return
    want = ((groups, None), (None,), (None,), ())
    hidden = mlp[0].shape[1] if len(mlp) == 4 and mlp[0].ndim == 2 else None
    got = tuple(tuple(jnp.shape(w)) for w in mlp)
    if (
        hidden is None
        or hidden < 1
        or got != tuple(tuple(hidden if d is None else d for d in shape) for shape in want)
        or any(jnp.result_type(w) != jnp.float32 for w in mlp)
    ):
        raise ValueError(
            f"mlp must be float32 (w1 [groups={groups}, H], b1 [H], w2 [H], b2 []), got shapes "
            f"{got} and dtypes {tuple(str(jnp.result_type(w)) for w in mlp)}"
        )
