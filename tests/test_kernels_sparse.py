"""Sparse attention over cache rows read by slot: gathered_logits and gathered_attention.

Every implementation is checked against a plain NumPy computation in float64 (np.take of the
rows, a float64 softmax). One base class holds the suite; subclasses run it for the XLA path
and for the TPU (Mosaic) and GPU (Triton) kernel sources in Pallas interpret mode on the CPU.
Interpret mode is slow: shapes stay small, and one shape serves several checks.

Tolerances are float32 error bounds, per element, not fitted constants (u = 2**-24):
  logits  Every implementation forms the D products (exact for bfloat16 inputs, one rounding
          for float32), adds them in float32 in some order and multiplies by the scale:
          |error| <= (D + 2) u * scale * sum_d |q_d k_d| (the dot-product bound gamma_D, plus
          the scale's rounding), doubled for slack.
  out     A convex combination sum_m w_m v_m: each weight exp(l - shift) / total carries a
          relative error of about (|l - shift| + M + 4) u (the shift, exp, the M-term total,
          the division; the merge of splits adds a few more), so |error| <= 2 (M + 16 + 2L) u
          max|v|, L the largest |logit|.
  lse     shift + log(total): log turns total's relative error (M + 4) u into an absolute one,
          plus the rounding of the sum: 2 (M + 16 + 2L) u + 2 u |lse|.
Unused entries must be exactly -inf (logits); rows without a valid entry exactly 0 and -inf.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, NamedSharding

import pallas_kernels as pk
from pallas_kernels import cpu_native, pallas_gpu, pallas_tpu

U = 2.0**-24  # float32 unit roundoff

# --- The definition, in NumPy --------------------------------------------------------------


def as_float64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def numpy_rows(cache, slots):
    """cache [B, Hkv, N, D], slots [B, Hkv, K] -> (valid [B, Hkv, K], rows [B, Hkv, K, D])."""
    cache, slots = as_float64(cache), np.asarray(slots)
    valid = (slots >= 0) & (slots < cache.shape[2])
    rows = np.take_along_axis(cache, np.where(valid, slots, 0)[..., None], axis=2)
    return valid, rows


def numpy_logits(q, k_cache, slots, scale):
    """scale * q_g . k[slot] in float64; -inf at unused entries."""
    valid, rows = numpy_rows(k_cache, slots)
    logits = scale * np.einsum("bhgd,bhed->bhge", as_float64(q), rows)
    return np.where(valid[:, :, None], logits, -np.inf)


def numpy_attention(logits, v_cache, slots):
    """softmax(logits) @ v[slots] and logsumexp, over the valid entries, in float64."""
    valid, rows = numpy_rows(v_cache, slots)
    logits = np.where(valid[:, :, None], as_float64(logits), -np.inf)
    batch, kv_heads, g_size, _ = logits.shape
    out = np.zeros((batch, kv_heads, g_size, rows.shape[-1]))
    lse = np.full((batch, kv_heads, g_size), -np.inf)
    for b, h, g in np.ndindex(batch, kv_heads, g_size):
        if valid[b, h].any():
            row = logits[b, h, g]
            top = row.max()
            weights = np.exp(row - top)
            out[b, h, g] = weights @ rows[b, h] / weights.sum()
            lse[b, h, g] = top + np.log(weights.sum())
    return out, lse


def check_logits(actual, q, k_cache, slots, scale):
    assert actual.dtype == jnp.float32 and actual.shape == (*q.shape[:3], slots.shape[-1])
    actual, expected = np.asarray(actual), numpy_logits(q, k_cache, slots, scale)
    unused = np.isinf(expected)
    np.testing.assert_array_equal(np.isneginf(actual), unused)
    _, rows = numpy_rows(k_cache, slots)
    magnitude = scale * np.einsum("bhgd,bhed->bhge", np.abs(as_float64(q)), np.abs(rows))
    bound = 2 * (q.shape[-1] + 2) * U * magnitude
    error = np.abs(np.where(unused, 0.0, actual) - np.where(unused, 0.0, expected))
    assert (error <= bound).all(), (
        f"max error {error.max()}, bound there {bound.flat[error.argmax()]}"
    )


def check_attention(actual, logits, v_cache, slots):
    out, lse = (np.asarray(x) for x in actual)
    assert out.dtype == lse.dtype == np.float32
    assert out.shape == (*logits.shape[:3], v_cache.shape[-1]) and lse.shape == logits.shape[:3]
    want_out, want_lse = numpy_attention(logits, v_cache, slots)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    empty = np.isneginf(want_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_array_equal(out[empty], 0.0)
    valid, _ = numpy_rows(v_cache, slots)
    finite = np.where(valid[:, :, None], as_float64(logits), 0.0)
    slack = 2 * (logits.shape[-1] + 16 + 2 * np.abs(finite).max()) * U
    out_bound = slack * np.abs(as_float64(v_cache)).max()
    np.testing.assert_allclose(out, want_out, rtol=0, atol=out_bound)
    lse, want_lse = np.where(empty, 0.0, lse), np.where(empty, 0.0, want_lse)
    assert (np.abs(lse - want_lse) <= slack + 2 * U * np.abs(want_lse)).all()
    # The caller's weights: exp(logit - lse) over the valid entries sums to 1.
    weights = np.where(valid[:, :, None], np.exp(finite - lse[..., None]), 0.0)
    np.testing.assert_allclose(weights.sum(-1)[~empty], 1.0, atol=slack)


# --- Inputs ------------------------------------------------------------------------------


def ragged_slots(rng, batch, kv_heads, n_tokens, size):
    """[B, Hkv, size] int32 slot lists as DASH-KV builds them: two lists, each ascending and
    padded with -1 (as select_ranks gives them), concatenated, so -1 sits in the middle and at
    the end. Row (0, 0) has no valid slot; row (B-1, Hkv-1), when not that one, also names
    slot N (out of range: unused too)."""
    slots = np.full((batch, kv_heads, size), -1, np.int32)
    for b, h in np.ndindex(batch, kv_heads):
        if (b, h) == (0, 0):
            continue
        first = int(rng.integers(0, size + 1))
        parts = []
        for length in (first, size - first):
            count = int(rng.integers(0, length + 1))
            chosen = np.sort(rng.choice(n_tokens, min(count, n_tokens), replace=False))
            parts += [chosen, np.full(length - len(chosen), -1)]
        slots[b, h] = np.concatenate(parts)
    if (batch, kv_heads) != (1, 1):
        slots[-1, -1, -1] = n_tokens
    return jnp.asarray(slots)


def attention_logits(rng, slots, g_size):
    """[B, Hkv, G, M] float32 logits, -inf at unused entries (the caller's contract), except in
    the last row, where they are finite: they must be ignored all the same."""
    batch, kv_heads, size = slots.shape
    logits = 2.0 * rng.standard_normal((batch, kv_heads, g_size, size)).astype(np.float32)
    unused = np.asarray(slots < 0)[:, :, None] & np.ones((1, 1, g_size, 1), bool)
    unused[-1, -1] = False
    return jnp.asarray(np.where(unused, -np.inf, logits), jnp.float32)


def random_inputs(rng, batch, kv_heads, g_size, n_tokens, head_dim, dtype):
    q = jnp.asarray(rng.standard_normal((batch, kv_heads, g_size, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_heads, n_tokens, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_heads, n_tokens, head_dim)), dtype)
    return q, k, v


# --- The shared suite -----------------------------------------------------------------------


class SparseSuite:
    """The shared suite; a subclass sets IMPLEMENTATION."""

    IMPLEMENTATION: str
    HYPOTHESIS_EXAMPLES = 3

    def logits(self, q, k_cache, slots, scale, layer=None):
        return pk.gathered_logits(
            q, k_cache, slots, scale=scale, layer=layer, implementation=self.IMPLEMENTATION
        )

    def attention(self, logits, v_cache, slots, layer=None):
        return pk.gathered_attention(
            logits, v_cache, slots, layer=layer, implementation=self.IMPLEMENTATION
        )

    def test_hand_computed(self):
        # K rows k0 = (1, 0), k1 = (0, 1), k2 = (1, 1), k3 = (2, -1); q0 = (1, 2), q1 = (0, 1);
        # slots (2, -1, 0, 3), scale 1/2:
        #   q0: k2 -> (1 + 2) / 2 = 1.5;  unused -> -inf;  k0 -> 1 / 2 = 0.5;  k3 -> (2 - 2) / 2 = 0
        #   q1: k2 -> 1 / 2 = 0.5;        unused -> -inf;  k0 -> 0;          k3 -> -1 / 2 = -0.5
        # Batch row 1 names no slot: every logit -inf.
        k = jnp.asarray([[[[1, 0], [0, 1], [1, 1], [2, -1]]]] * 2, jnp.float32)  # [2, 1, 4, 2]
        q = jnp.asarray([[[[1, 2], [0, 1]]]] * 2, jnp.float32)  # [2, 1, 2, 2]
        slots = jnp.asarray([[[2, -1, 0, 3]], [[-1, -1, -1, -1]]], jnp.int32)
        inf = np.inf
        expected = [[[[1.5, -inf, 0.5, 0.0], [0.5, -inf, 0.0, -0.5]]], [[[-inf] * 4] * 2]]
        np.testing.assert_array_equal(self.logits(q, k, slots, 0.5), expected)
        # V rows v0 = (4, 0), v1 = (0, 8), v2 = (2, 2), v3 = (-4, 4).
        #   q0 logits (0, -inf, ln 3, -inf): weights 1/4 on v2, 3/4 on v0
        #      -> (0.5 + 3, 0.5) = (3.5, 0.5), lse = ln(1 + 3) = ln 4
        #   q1 logits (ln 2, 7, ln 2, ln 4), the 7 at the unused entry ignored: weights 2/8 on
        #      v2, 2/8 on v0, 4/8 on v3 -> (0.5 + 1 - 2, 0.5 + 0 + 2) = (-0.5, 2.5), lse = ln 8
        #   batch row 1: out (0, 0), lse -inf
        v = jnp.asarray([[[[4, 0], [0, 8], [2, 2], [-4, 4]]]] * 2, jnp.float32)
        ln = np.log
        logits = jnp.asarray(
            [[[[0, -inf, ln(3), -inf], [ln(2), 7, ln(2), ln(4)]]], [[[-inf] * 4] * 2]],
            jnp.float32,
        )
        out, lse = self.attention(logits, v, slots)
        np.testing.assert_allclose(
            out, [[[[3.5, 0.5], [-0.5, 2.5]]], [[[0, 0], [0, 0]]]], atol=1e-6
        )
        np.testing.assert_allclose(lse, [[[ln(4), ln(8)]], [[-inf, -inf]]], rtol=1e-6)

    @pytest.mark.parametrize(
        "g_size,head_dim,dtype",
        [(1, 64, jnp.float32), (3, 256, jnp.float32), (3, 64, jnp.bfloat16)],
        ids=["g1-d64", "g3-d256", "g3-d64-bf16"],
    )
    def test_matches_numpy(self, g_size, head_dim, dtype):
        rng = np.random.default_rng(g_size * head_dim)
        n_tokens = 300
        q, k, v = random_inputs(rng, 2, 2, g_size, n_tokens, head_dim, dtype)
        slots = ragged_slots(rng, 2, 2, n_tokens, 70)  # not a multiple of any block
        check_logits(self.logits(q, k, slots, head_dim**-0.5), q, k, slots, head_dim**-0.5)
        slots = ragged_slots(rng, 2, 2, n_tokens, 150)
        logits = attention_logits(rng, slots, g_size)
        check_attention(self.attention(logits, v, slots), logits, v, slots)

    def test_property_ragged(self):
        @hypothesis.settings(max_examples=self.HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True)
        @hypothesis.given(
            batch=st.integers(1, 2),
            kv_heads=st.integers(1, 2),
            g_size=st.integers(1, 4),
            head_dim=st.sampled_from([16, 64]),
            n_tokens=st.integers(1, 200),
            size=st.integers(1, 260),
            bfloat16=st.booleans(),
            seed=st.integers(0, 2**16),
        )
        def check(batch, kv_heads, g_size, head_dim, n_tokens, size, bfloat16, seed):
            rng = np.random.default_rng(seed)
            dtype = jnp.bfloat16 if bfloat16 else jnp.float32
            q, k, v = random_inputs(rng, batch, kv_heads, g_size, n_tokens, head_dim, dtype)
            slots = ragged_slots(rng, batch, kv_heads, n_tokens, size)
            check_logits(self.logits(q, k, slots, 0.3), q, k, slots, 0.3)
            logits = attention_logits(rng, slots, g_size)
            check_attention(self.attention(logits, v, slots), logits, v, slots)

        check()

    def test_stacked_layer(self):
        # A stack [L, B, Hkv, N, D] read at `layer` (traced or not) in place: the same result
        # as the layer's own [B, Hkv, N, D] array. An out-of-range layer is clipped.
        rng = np.random.default_rng(3)
        q, _, _ = random_inputs(rng, 2, 2, 3, 90, 16, jnp.float32)
        stack = jnp.asarray(rng.standard_normal((3, 2, 2, 90, 16)), jnp.float32)
        exact, slots = ragged_slots(rng, 2, 2, 90, 40), ragged_slots(rng, 2, 2, 90, 70)
        logits = attention_logits(rng, slots, 3)
        logits_at = jax.jit(functools.partial(self.logits, scale=0.5))
        attention_at = jax.jit(self.attention)
        for layer, which in ((jnp.int32(2), 2), (1, 1), (jnp.int32(7), 2)):
            got = logits_at(q, stack, exact, layer=layer)
            np.testing.assert_array_equal(got, self.logits(q, stack[which], exact, 0.5))
            got = attention_at(logits, stack, slots, layer=layer)
            for got_part, want in zip(
                got, self.attention(logits, stack[which], slots), strict=True
            ):
                np.testing.assert_array_equal(got_part, want)

    def test_empty_lists(self):
        q, k, v = random_inputs(np.random.default_rng(0), 1, 2, 3, 10, 16, jnp.float32)
        slots = jnp.zeros((1, 2, 0), jnp.int32)
        assert self.logits(q, k, slots, 1.0).shape == (1, 2, 3, 0)
        out, lse = self.attention(jnp.zeros((1, 2, 3, 0), jnp.float32), v, slots)
        np.testing.assert_array_equal(out, np.zeros((1, 2, 3, 16)))
        np.testing.assert_array_equal(lse, np.full((1, 2, 3), -np.inf))

    def test_bad_input(self):
        q, k, v = random_inputs(np.random.default_rng(0), 2, 2, 3, 50, 16, jnp.float32)
        slots = jnp.zeros((2, 2, 8), jnp.int32)
        logits = jnp.zeros((2, 2, 3, 8), jnp.float32)
        with pytest.raises(ValueError, match=r"q.shape=\(2, 2, 3, 8\)"):
            self.logits(q[..., :8], k, slots, 1.0)  # head_dim mismatch
        with pytest.raises(ValueError, match=r"q.shape=\(2, 3, 16\)"):
            self.logits(q[0], k, slots, 1.0)
        with pytest.raises(ValueError, match="q.dtype=dtype\\('int32'\\)"):
            self.logits(q.astype(jnp.int32), k, slots, 1.0)
        with pytest.raises(ValueError, match=r"slots.shape=\(2, 1, 8\)"):
            self.logits(q, k, slots[:, :1], 1.0)
        with pytest.raises(ValueError, match="slots.dtype"):
            self.logits(q, k, slots.astype(jnp.float32), 1.0)
        with pytest.raises(ValueError, match="scale=True"):
            self.logits(q, k, slots, True)
        with pytest.raises(ValueError, match="logits.dtype"):
            self.attention(logits.astype(jnp.bfloat16), v, slots)
        with pytest.raises(ValueError, match=r"logits.shape=\(2, 2, 3, 7\)"):
            self.attention(logits[..., :7], v, slots)  # M disagrees with the slots
        with pytest.raises(ValueError, match=r"v_cache.shape=\(2, 2, 50\)"):
            self.attention(logits, v[..., 0], slots)
        with pytest.raises(ValueError, match="cache.dtype=dtype\\('float16'\\)"):
            self.attention(logits, v.astype(jnp.float16), slots)
        with pytest.raises(
            ValueError, match=r"stack \[L, B, Hkv, N, D\], got cache.shape=\(2, 2, 50"
        ):
            self.attention(logits, v, slots, layer=0)  # a layer needs a stacked cache
        with pytest.raises(ValueError, match="layer_dtype=dtype\\('float32'\\)"):
            self.logits(q, k[None], slots, 1.0, layer=jnp.float32(0))

    def test_no_gathered_copy(self):
        # The kernels read rows by index: no gather at all outside them. The XLA path gathers
        # one block of rows at a time: no gather as large as the [B, Hkv, E, D] copy.
        q, k, _ = random_inputs(np.random.default_rng(0), 1, 4, 3, 8192, 64, jnp.float32)
        slots = jnp.zeros((1, 4, 4096), jnp.int32)
        jaxpr = jax.make_jaxpr(functools.partial(self.logits, scale=1.0))(q, k, slots)
        sizes = _gather_sizes(jaxpr.jaxpr)
        if self.IMPLEMENTATION == "xla":
            assert sizes and max(sizes) < slots.size * 64
        else:
            assert not sizes


def _gather_sizes(jaxpr) -> list[int]:
    """Output sizes of every gather in a jaxpr, nested jaxprs included."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "gather":
            sizes.append(int(np.prod(eqn.outvars[0].aval.shape)))
        for sub in jex.core.jaxprs_in_params(eqn.params):
            sizes += _gather_sizes(sub)
    return sizes


class SeveralBlocks:
    """For the implementations fast enough for long lists (not interpret mode)."""

    def test_several_blocks(self):
        # Lists longer than one block and not a multiple of it: the XLA path's fori_loop over
        # blocks of at most 4096 slots plus a shorter last one; the CPU kernels' 2048-slot
        # tasks, merged into one softmax.
        rng = np.random.default_rng(5)
        q, k, v = random_inputs(rng, 1, 1, 2, 20_000, 16, jnp.float32)
        slots = ragged_slots(rng, 1, 2, 20_000, 9000)[:, 1:]
        check_logits(self.logits(q, k, slots, 0.25), q, k, slots, 0.25)
        logits = attention_logits(rng, slots, 2)
        check_attention(self.attention(logits, v, slots), logits, v, slots)


class TestXla(SeveralBlocks, SparseSuite):
    IMPLEMENTATION = "xla"
    HYPOTHESIS_EXAMPLES = 8


class TestInterpretTpu(SparseSuite):
    IMPLEMENTATION = "interpret"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are the CPU's")
class TestCpuNative(SeveralBlocks, SparseSuite):
    """The native CPU kernels (`make native`): built by `make test`, so never skipped on a CPU."""

    IMPLEMENTATION = "cpu"
    HYPOTHESIS_EXAMPLES = 30

    def test_built_and_picked_by_default(self):
        assert cpu_native.available(), cpu_native._load()
        q, k, _ = random_inputs(np.random.default_rng(0), 1, 2, 3, 50, 16, jnp.float32)
        slots = ragged_slots(np.random.default_rng(1), 1, 2, 50, 20)
        hlo = jax.jit(functools.partial(pk.gathered_logits, scale=1.0)).lower(q, k, slots)
        assert "dashkv_gathered_logits" in hlo.as_text()

    def test_full_attention_decodes_through_them(self):
        # One new query per row: attend_all lists every slot up to the row's position for the
        # kernels; the XLA loop's result to float32 rounding, ragged lengths, a stacked cache.
        from dashkv_jax.attention.full import KVCache, attend_all

        rng = np.random.default_rng(2)
        for dtype, atol in ((jnp.float32, 2e-6), (jnp.bfloat16, 2**-7)):
            k, v = (jnp.asarray(rng.standard_normal((2, 2, 3, 300, 64)), dtype) for _ in "kv")
            cache = KVCache(k=k, v=v, lengths=jnp.asarray([17, 299], jnp.int32))
            q = jnp.asarray(rng.standard_normal((2, 1, 9, 64)), dtype)
            native = jax.jit(lambda c, q: attend_all(c, jnp.int32(1), q))
            assert "dashkv_gathered_attention" in native.lower(cache, q).as_text()
            xla = attend_all(cache, jnp.int32(1), q, implementation="xla")
            got = native(cache, q)
            assert got.dtype == dtype
            np.testing.assert_allclose(as_float64(got), as_float64(xla), rtol=0, atol=atol)

    @pytest.mark.parametrize("head_dim", [1, 20, 47])
    def test_head_dims_past_the_vector_width(self, head_dim):
        # The kernels take 16 lanes of a row at a time and the rest one by one; rows four at a
        # time, lists of any length. Logits spread over [-90, 90]: the vector exp's range
        # (its zero below -87.3 included), against float64.
        rng = np.random.default_rng(head_dim)
        q, k, v = random_inputs(rng, 1, 2, 3, 120, head_dim, jnp.float32)
        slots = ragged_slots(rng, 1, 2, 120, 61)
        check_logits(self.logits(q, k, slots, 0.5), q, k, slots, 0.5)
        logits = attention_logits(rng, slots, 3)
        spread = jnp.asarray(rng.uniform(-90, 90, logits.shape), jnp.float32)
        logits = jnp.where(jnp.isneginf(logits), logits, spread)
        check_attention(self.attention(logits, v, slots), logits, v, slots)

    def test_only_the_decode_entries(self):
        # hamming_scores (the first decode path's) has no CPU kernel: one clear error.
        codes = jnp.zeros((1, 1, 8, 4), jnp.uint32)
        with pytest.raises(ValueError, match="implementation='cpu' has only hamming_histogram"):
            pk.hamming_scores(codes[:, :, :1], codes, jnp.asarray([8]), implementation="cpu")


class TestInterpretGpu(SparseSuite):
    IMPLEMENTATION = "interpret_gpu"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(SparseSuite):
    """The Triton kernels compiled and run on a real GPU (skipped elsewhere, CI included)."""

    IMPLEMENTATION = "pallas_gpu"
    HYPOTHESIS_EXAMPLES = 10


# --- Kernel details: several blocks and splits, the DMA protocol, lowering --------------------


@pytest.fixture(scope="module")
def detail_inputs():
    """Several blocks per list at small block sizes: 300 and 390 slots, ragged."""
    rng = np.random.default_rng(11)
    q, k, v = random_inputs(rng, 1, 2, 3, 500, 32, jnp.float32)
    exact = ragged_slots(rng, 1, 2, 500, 300)
    slots = ragged_slots(rng, 1, 2, 500, 390)
    return q, k, v, exact, slots, attention_logits(rng, slots, 3)


class TestKernelDetails:
    """Paths the shared suite does not reach with default block sizes (one block per list)."""

    @pytest.mark.parametrize(
        "logits_fn,attention_fn,block_sizes",
        [
            (
                pallas_tpu.gathered_logits_pallas_tpu,
                pallas_tpu.gathered_attention_pallas_tpu,
                pallas_tpu.SparseBlockSizes(block_slots=128, num_splits=2),
            ),
            (
                pallas_gpu.gathered_logits_pallas_gpu,
                pallas_gpu.gathered_attention_pallas_gpu,
                pallas_gpu.SparseBlockSizes(block_slots=16, split_slots=64),
            ),
        ],
        ids=["tpu", "gpu"],
    )
    def test_several_blocks_and_splits(self, detail_inputs, logits_fn, attention_fn, block_sizes):
        q, k, v, exact, slots, logits = detail_inputs
        actual = logits_fn(q, k, exact, scale=0.2, block_sizes=block_sizes, interpret=True)
        check_logits(actual, q, k, exact, 0.2)
        actual = attention_fn(logits, v, slots, block_sizes=block_sizes, interpret=True)
        check_attention(actual, logits, v, slots)

    def test_tpu_dma_protocol(self, detail_inputs):
        # The TPU interpreter that models the hardware: a DMA lands only when waited for,
        # scratch memory starts as NaN, and a race detector watches every buffer. A missing
        # wait, a read of the half being filled or a stale row under p = 0 would all show.
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call

        q, k, v, exact, slots, logits = detail_inputs
        strict = pltpu.InterpretParams(detect_races=True)
        block_sizes = pallas_tpu.SparseBlockSizes(block_slots=128, num_splits=2)
        exact, slots, logits = exact[:, :1], slots[:, :1], logits[:, :1]  # one row: fast enough
        actual = pallas_tpu.gathered_logits_pallas_tpu(
            q[:, :1], k[:, :1], exact, scale=0.2, block_sizes=block_sizes, interpret=strict
        )
        check_logits(actual, q[:, :1], k[:, :1], exact, 0.2)
        assert not interpret_pallas_call.races.races_found
        actual = pallas_tpu.gathered_attention_pallas_tpu(
            logits, v[:, :1], slots, block_sizes=block_sizes, interpret=strict
        )
        check_attention(actual, logits, v[:, :1], slots)
        assert not interpret_pallas_call.races.races_found

    def test_block_size_checks(self):
        with pytest.raises(ValueError, match="block_slots"):
            pallas_tpu.SparseBlockSizes(block_slots=100)
        with pytest.raises(ValueError, match="num_splits"):
            pallas_tpu.SparseBlockSizes(num_splits=0)
        with pytest.raises(ValueError, match="block_slots"):
            pallas_gpu.SparseBlockSizes(block_slots=48)
        with pytest.raises(ValueError, match="split_slots"):
            pallas_gpu.SparseBlockSizes(block_slots=64, split_slots=96)
        assert pallas_tpu.SparseBlockSizes.get_default(70).block_slots == 128
        assert pallas_gpu.SparseBlockSizes.get_default(5, 64) == pallas_gpu.SparseBlockSizes(16, 16)
        assert pallas_gpu.SparseBlockSizes.get_default(10**5, 128).block_slots == 64

    def test_gpu_rejects_head_dim_not_power_of_two(self):
        q, k, _ = random_inputs(np.random.default_rng(0), 1, 1, 1, 8, 24, jnp.float32)
        slots = jnp.zeros((1, 1, 4), jnp.int32)
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            pk.gathered_logits(q, k, slots, scale=1.0, implementation="pallas_gpu")


class TestLowering:
    """The kernels lower to Mosaic and to Triton IR on this CPU-only machine (no compile), at
    the benchmark's lengths (N = 1M, E = N/32, M = N/32 + N/16), from a stack of 4 layers read
    at a traced layer: over 4 GiB, so Triton needs 64-bit offsets."""

    @pytest.mark.parametrize("module", [pallas_tpu, pallas_gpu], ids=["mosaic", "triton"])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    def test_lowers(self, module, dtype):
        if module is pallas_tpu:
            platform, marker, checks = "tpu", "tpu_custom_call", []
        else:
            platform, marker = "cuda", "xla.gpu.triton"
            checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        suffix = "tpu" if module is pallas_tpu else "gpu"
        logits_kernel = getattr(module, f"gathered_logits_pallas_{suffix}")
        attention_kernel = getattr(module, f"gathered_attention_pallas_{suffix}")

        def logits_fn(q, k_cache, slots, layer):
            return logits_kernel(q, k_cache, slots, scale=0.1, layer=layer)

        def attention_fn(logits, v_cache, slots, layer):
            return attention_kernel(logits, v_cache, slots, layer=layer)

        n_tokens, exact, listed = 2**20, 2**15, 3 * 2**15
        cache = jax.ShapeDtypeStruct((4, 1, 3, n_tokens, 128), dtype)
        layer = jax.ShapeDtypeStruct((), jnp.int32)
        logits_args = (
            jax.ShapeDtypeStruct((1, 3, 3, 128), dtype),
            cache,
            jax.ShapeDtypeStruct((1, 3, exact), jnp.int32),
            layer,
        )
        attention_args = (
            jax.ShapeDtypeStruct((1, 3, 3, listed), jnp.float32),
            cache,
            jax.ShapeDtypeStruct((1, 3, listed), jnp.int32),
            layer,
        )
        for fn, args in ((logits_fn, logits_args), (attention_fn, attention_args)):
            exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)
            assert exported(*args).mlir_module().count(marker) == 1


# --- Sharding: batch and KV heads over 8 simulated CPU devices -------------------------------

IMPLEMENTATIONS = ("xla", "interpret", "interpret_gpu", "cpu")
needs_8_devices = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("batch", "kv"), axis_types=(AxisType.Auto, AxisType.Auto))


@pytest.fixture(scope="module")
def sharding_inputs():
    rng = np.random.default_rng(0)
    q, k, v = random_inputs(rng, 2, 4, 3, 64, 16, jnp.float32)
    exact = ragged_slots(rng, 2, 4, 64, 40)
    slots = ragged_slots(rng, 2, 4, 64, 80)
    return q, k, v, exact, slots, attention_logits(rng, slots, 3)


@needs_8_devices
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_with_shardings(mesh, sharding_inputs, implementation):
    q, k, v, exact, slots, logits = sharding_inputs
    heads = NamedSharding(mesh, jax.P("batch", "kv"))
    logits_fn = functools.partial(pk.gathered_logits, scale=0.25, implementation=implementation)
    got = jax.jit(logits_fn, in_shardings=(heads,) * 3, out_shardings=heads)(q, k, exact)
    assert got.sharding.is_equivalent_to(heads, got.ndim)
    # Partitioned, XLA may pick other dot kernels for the smaller shapes: equal to rounding.
    np.testing.assert_allclose(got, logits_fn(q, k, exact), rtol=1e-6, atol=1e-6)
    attention_fn = functools.partial(pk.gathered_attention, implementation=implementation)
    got = jax.jit(attention_fn, in_shardings=(heads,) * 3, out_shardings=(heads, heads))(
        logits, v, slots
    )
    for got_part, want in zip(got, attention_fn(logits, v, slots), strict=True):
        assert got_part.sharding.is_equivalent_to(heads, got_part.ndim)
        np.testing.assert_allclose(got_part, want, rtol=1e-6, atol=1e-6)


@needs_8_devices
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map(mesh, sharding_inputs, implementation):
    # Each device runs the kernel on its own (batch, KV head) shard: XLA cannot partition a
    # custom call. Pallas calls carry no varying-axes types, hence check_vma only for XLA.
    q, k, v, exact, slots, logits = sharding_inputs
    heads = jax.P("batch", "kv")

    def sparse(q, k, v, exact, slots, logits):
        scores = pk.gathered_logits(q, k, exact, scale=0.25, implementation=implementation)
        out, lse = pk.gathered_attention(logits, v, slots, implementation=implementation)
        return scores, out, lse

    per_shard = jax.shard_map(
        sparse, mesh=mesh, in_specs=(heads,) * 6, out_specs=heads, check_vma=implementation == "xla"
    )
    got = jax.jit(per_shard)(q, k, v, exact, slots, logits)
    for got_part, want in zip(got, sparse(q, k, v, exact, slots, logits), strict=True):
        np.testing.assert_allclose(got_part, want, rtol=1e-6, atol=1e-6)
    check_logits(got[0], q, k, exact, 0.25)
    check_attention(got[1:], logits, v, slots)


class TestCodeLogits:
    """`code_logits` (tier 2's logits from the codes): the CPU kernel against the XLA reference,
    which test_hashing ties to the hasher's own map, over the group widths configs allow."""

    @staticmethod
    def inputs(rng, words, groups, hidden):
        q_codes = jnp.asarray(rng.integers(0, 2**32, (2, 2, 3, words), dtype=np.uint32))
        k_codes = jnp.asarray(rng.integers(0, 2**32, (3, 2, 2, 90, words), dtype=np.uint32))
        slots = ragged_slots(rng, 2, 2, 90, 75)  # -1 and N among them; not a multiple of 16
        scale = jnp.asarray(rng.uniform(0, 8, (2, 3)), jnp.float32)
        mlp = None
        if hidden:
            mlp = tuple(
                jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
                for shape in ((groups, hidden), (hidden,), (hidden,), ())
            )
        return q_codes, k_codes, slots, scale, mlp

    @pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are the CPU's")
    @pytest.mark.parametrize(
        "words,groups,hidden",
        [(4, 16, 16), (2, 16, 5), (2, 2, 3), (4, 2, 4), (1, 32, 1), (4, 16, 0)],
        ids=["128b-8bit-groups", "64b-4bit", "64b-word-groups", "128b-two-word-groups",
             "32b-1bit", "no-mlp"],
    )  # fmt: skip
    def test_cpu_matches_the_reference(self, words, groups, hidden):
        q_codes, k_codes, slots, scale, mlp = self.inputs(
            np.random.default_rng(words * groups + hidden), words, groups, hidden
        )
        got, want = (
            pk.code_logits(
                q_codes, k_codes, slots, scale, mlp, groups=groups, layer=jnp.int32(2),
                implementation=implementation,
            )
            for implementation in ("cpu", "xla")
        )  # fmt: skip
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        assert np.isneginf(want).any() and not np.isneginf(want).all()
        finite = ~np.isneginf(want)
        np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], atol=2e-5)

    def test_bad_input(self):
        q_codes, k_codes, slots, scale, mlp = self.inputs(np.random.default_rng(0), 4, 16, 4)
        with pytest.raises(ValueError, match="groups must split 128 bits"):
            pk.code_logits(q_codes, k_codes, slots, scale, mlp, groups=12, layer=0)
        with pytest.raises(ValueError, match="scale must be float32"):
            pk.code_logits(q_codes, k_codes, slots, scale[0], mlp, groups=16, layer=0)
        with pytest.raises(ValueError, match=r"mlp must be float32 \(w1 \[groups=16"):
            pk.code_logits(q_codes, k_codes, slots, scale, mlp[:3], groups=16, layer=0)
        with pytest.raises(ValueError, match="codes must be uint32"):
            pk.code_logits(q_codes.astype(jnp.int32), k_codes, slots, scale, mlp, groups=16)
