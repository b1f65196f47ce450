"""Packed-bit scoring: every implementation against the XLA reference, exactly.

One base class holds the suite; subclasses run it for the XLA path and for the TPU (Mosaic) and
GPU (Triton) kernel sources in Pallas interpret mode on the CPU.
"""

import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pallas_kernels as pk
from pallas_kernels import pallas_gpu, pallas_tpu

BITS = (32, 64, 128, 256)
GROUPS = (1, 3, 4, 8)
SENTINEL = pk.HAMMING_SENTINEL


def random_codes(rng, batch, kv_heads, g_size, n_tokens, bits):
    n_words = bits // 32
    q = rng.integers(0, 2**32, size=(batch, kv_heads, g_size, n_words), dtype=np.uint32)
    k = rng.integers(0, 2**32, size=(batch, kv_heads, n_tokens, n_words), dtype=np.uint32)
    return jnp.asarray(q), jnp.asarray(k)


def dyadic_weights(rng, shape):
    """Multiples of 1/8 in [-4, 4]: every float32 sum of them is exact, in any order."""
    return jnp.asarray(rng.integers(-32, 33, size=shape).astype(np.float32) / 8)


def ragged_lengths(rng, batch, n_tokens):
    """Lengths 0 and N first, then random ones."""
    fixed = [0, n_tokens][:batch]
    rest = rng.integers(0, n_tokens + 1, size=batch - len(fixed)).tolist()
    return jnp.asarray(fixed + rest, jnp.int32)


def assert_equal(actual, expected):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


class TestPacking:
    def test_bit_order(self):
        x = np.full((2, 64), -1.0, np.float32)
        x[0, 0] = x[0, 33] = x[1, 31] = 1.0
        x[1, 5] = 0.0  # zero packs as 0
        codes = pk.pack_bits(jnp.asarray(x))
        assert codes.dtype == jnp.uint32 and codes.shape == (2, 2)
        assert_equal(codes, np.array([[1, 2], [2**31, 0]], np.uint32))

    @pytest.mark.parametrize("bits", BITS)
    def test_roundtrip(self, bits):
        x = np.random.default_rng(bits).standard_normal((3, 5, bits)).astype(np.float32)
        bits_back = pk.unpack_bits(pk.pack_bits(jnp.asarray(x)))
        assert_equal(bits_back, x > 0)

    def test_pack_rejects_bad_width(self):
        with pytest.raises(ValueError, match="x.shape"):
            pk.pack_bits(jnp.ones((2, 48)))


def numpy_hamming(q, k, lengths):
    """The definition, bit by bit: sum_g (b - 2 * #bits where q_g and k differ)."""
    q_bits = np.unpackbits(np.asarray(q).view(np.uint8), axis=-1)  # [B, Hkv, G, b]
    k_bits = np.unpackbits(np.asarray(k).view(np.uint8), axis=-1)  # [B, Hkv, N, b]
    differing = (q_bits[:, :, :, None, :] != k_bits[:, :, None, :, :]).sum(axis=(2, 4))
    scores = q_bits.shape[2] * q_bits.shape[-1] - 2 * differing
    valid = np.arange(k.shape[2])[None, None, :] < np.asarray(lengths)[:, None, None]
    return np.where(valid, scores, SENTINEL).astype(np.int32)


def numpy_asymmetric(q_weights, k, lengths):
    """The definition: sum_g sum_i w_gi * (2 * bit_i - 1), bit i of word w = bit 32 * w + i."""
    k_bits = np.unpackbits(np.asarray(k).view(np.uint8), axis=-1, bitorder="little")
    signs = 2.0 * k_bits - 1.0  # [B, Hkv, N, b]
    scores = np.einsum("bhgi,bhni->bhn", np.asarray(q_weights, np.float64), signs)
    valid = np.arange(k.shape[2])[None, None, :] < np.asarray(lengths)[:, None, None]
    return np.where(valid, scores, -np.inf)


@pytest.mark.parametrize("bits,g_size", list(itertools.product(BITS, GROUPS + (2, 5, 7))))
def test_reference_is_the_definition(bits, g_size):
    rng = np.random.default_rng(bits + g_size)
    q, k = random_codes(rng, 2, 2, g_size, 70, bits)
    lengths = jnp.asarray([70, 33], jnp.int32)
    assert_equal(pk.hamming_scores_reference(q, k, lengths), numpy_hamming(q, k, lengths))
    q_weights = dyadic_weights(rng, (2, 2, g_size, bits))
    assert_equal(
        pk.asymmetric_scores_reference(q_weights, k, lengths),
        numpy_asymmetric(q_weights, k, lengths),
    )


class ScoresSuite:
    """The shared suite; a subclass sets IMPLEMENTATION."""

    IMPLEMENTATION: str
    HYPOTHESIS_EXAMPLES = 3

    def hamming(self, q, k, lengths):
        return pk.hamming_scores(q, k, lengths, implementation=self.IMPLEMENTATION)

    def asymmetric(self, q, k, lengths):
        return pk.asymmetric_scores(q, k, lengths, implementation=self.IMPLEMENTATION)

    def test_hand_computed(self):
        # b = 32, G = 2, N = 3, length 2.
        #   q0 = 0x0F, q1 = 0xFF.
        #   k0 = 0x0F:       popcounts 0 and 4  -> (32 - 0) + (32 - 8) = 56
        #   k1 = 0xFFFFFFFF: popcounts 28 and 24 -> (32 - 56) + (32 - 48) = -40
        #   k2 = 0:          slot 2 >= length 2 -> sentinel
        q = jnp.asarray([[[[0x0F], [0xFF]]]], jnp.uint32)
        k = jnp.asarray([[[[0x0F], [0xFFFFFFFF], [0]]]], jnp.uint32)
        lengths = jnp.asarray([2], jnp.int32)
        assert_equal(self.hamming(q, k, lengths), [[[56, -40, SENTINEL]]])
        values, indices = pk.hamming_topk(q, k, lengths, 3, implementation=self.IMPLEMENTATION)
        assert_equal(values, [[[56, -40, SENTINEL]]])
        assert_equal(indices, [[[0, 1, 2]]])
        # Asymmetric, summed over G: bit 0 weighs 1 + 0.5, bit 1 weighs 2, bit 31 weighs 3.
        #   k = 0x80000001 (bits 0, 31): 1.5 - 2 + 3 = 2.5;  k = 0: -1.5 - 2 - 3 = -6.5.
        w = np.zeros((1, 1, 2, 32), np.float32)
        w[0, 0, 0, :2] = [1.0, 2.0]
        w[0, 0, 1, 0], w[0, 0, 1, 31] = 0.5, 3.0
        k = jnp.asarray([[[[0x80000001], [0], [0]]]], jnp.uint32)
        assert_equal(self.asymmetric(jnp.asarray(w), k, lengths), [[[2.5, -6.5, -np.inf]]])

    @pytest.mark.parametrize("bits,g_size", list(itertools.product(BITS, GROUPS)))
    def test_hamming_matches_reference(self, bits, g_size):
        rng = np.random.default_rng(bits * 10 + g_size)
        n_tokens = 2500  # not a multiple of any block size, nor of 32
        q, k = random_codes(rng, 3, 2, g_size, n_tokens, bits)
        lengths = ragged_lengths(rng, 3, n_tokens)
        expected = pk.hamming_scores_reference(q, k, lengths)
        actual = self.hamming(q, k, lengths)
        assert actual.dtype == jnp.int32 and actual.shape == (3, 2, n_tokens)
        assert_equal(actual, expected)

    @pytest.mark.parametrize("bits,g_size", [(32, 8), (64, 1), (128, 3), (256, 4)])
    def test_asymmetric_matches_reference(self, bits, g_size):
        rng = np.random.default_rng(bits + g_size)
        n_tokens = 1100
        _, k = random_codes(rng, 3, 2, g_size, n_tokens, bits)
        lengths = ragged_lengths(rng, 3, n_tokens)
        q_weights = dyadic_weights(rng, (3, 2, g_size, bits))
        expected = pk.asymmetric_scores_reference(q_weights, k, lengths)
        actual = self.asymmetric(q_weights, k, lengths)
        assert actual.dtype == jnp.float32 and actual.shape == (3, 2, n_tokens)
        assert_equal(actual, expected)
        # Real-valued weights: equal up to the order of float32 additions.
        q_weights = jnp.asarray(rng.standard_normal((3, 2, g_size, bits)).astype(np.float32))
        np.testing.assert_allclose(
            self.asymmetric(q_weights, k, lengths),
            pk.asymmetric_scores_reference(q_weights, k, lengths),
            rtol=1e-5,
            atol=1e-4,
        )

    @pytest.mark.parametrize("k", [100, 700])
    def test_topk_matches_reference(self, k):
        rng = np.random.default_rng(k)
        n_tokens = 700
        q, codes = random_codes(rng, 3, 2, 3, n_tokens, 64)
        lengths = jnp.asarray([0, n_tokens, 90], jnp.int32)  # k >= length in some rows
        expected = lax.top_k(pk.hamming_scores_reference(q, codes, lengths), k)
        values, indices = pk.hamming_topk(q, codes, lengths, k, self.IMPLEMENTATION)
        assert_equal(values, expected[0])
        assert_equal(indices, expected[1])
        # Sentinel slots come only after every real slot: min(length, k) real picks per row.
        real_picks = (np.asarray(values) != SENTINEL).sum(-1)  # [B, Hkv]
        assert_equal(real_picks, np.minimum(np.asarray(lengths), k)[:, None].repeat(2, axis=1))

    def test_property_random_shapes(self):
        @hypothesis.settings(max_examples=self.HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True)
        @hypothesis.given(
            batch=st.integers(1, 3),
            kv_heads=st.integers(1, 3),
            g_size=st.integers(1, 8),
            n_words=st.sampled_from([1, 2, 4, 8]),
            n_tokens=st.integers(1, 600),
            k_fraction=st.floats(0.0, 1.0),
            seed=st.integers(0, 2**16),
        )
        def check(batch, kv_heads, g_size, n_words, n_tokens, k_fraction, seed):
            rng = np.random.default_rng(seed)
            q, codes = random_codes(rng, batch, kv_heads, g_size, n_tokens, 32 * n_words)
            lengths = jnp.asarray(rng.integers(0, n_tokens + 1, size=batch), jnp.int32)
            expected = pk.hamming_scores_reference(q, codes, lengths)
            assert_equal(self.hamming(q, codes, lengths), expected)
            k = max(1, round(k_fraction * n_tokens))
            values, indices = pk.hamming_topk(q, codes, lengths, k, self.IMPLEMENTATION)
            expected_values, expected_indices = lax.top_k(expected, k)
            assert_equal(values, expected_values)
            assert_equal(indices, expected_indices)

        check()

    def test_bad_input(self):
        q, k = random_codes(np.random.default_rng(0), 2, 2, 3, 50, 64)
        lengths = jnp.asarray([10, 50], jnp.int32)
        with pytest.raises(ValueError, match="q_codes.dtype"):
            self.hamming(q.astype(jnp.int32), k, lengths)
        with pytest.raises(ValueError, match=r"q_codes.shape=\(2, 2, 3, 2\)"):
            self.hamming(q, k[..., :1], lengths)  # mismatched word count
        with pytest.raises(ValueError, match="lengths.shape"):
            self.hamming(q, k, lengths[:1])
        with pytest.raises(ValueError, match="q_weights.shape"):
            self.asymmetric(jnp.ones((2, 2, 3, 48), jnp.float32), k, lengths)  # b % 32
        with pytest.raises(ValueError, match="q_weights.shape"):
            self.asymmetric(jnp.ones((2, 2, 3, 96), jnp.float32), k, lengths)  # b != 32 W
        with pytest.raises(ValueError, match="q_weights.dtype"):
            self.asymmetric(jnp.ones((2, 2, 3, 64), jnp.int32), k, lengths)
        for bad_k in (0, 51):
            with pytest.raises(ValueError, match="k="):
                pk.hamming_topk(q, k, lengths, bad_k, self.IMPLEMENTATION)


class TestXla(ScoresSuite):
    IMPLEMENTATION = "xla"
    HYPOTHESIS_EXAMPLES = 5


class TestInterpretTpu(ScoresSuite):
    IMPLEMENTATION = "interpret"


class TestInterpretGpu(ScoresSuite):
    IMPLEMENTATION = "interpret_gpu"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(ScoresSuite):
    """The Triton kernels compiled and run on a real GPU (skipped elsewhere, CI included)."""

    IMPLEMENTATION = "pallas_gpu"


class TestKernelDetails:
    """Kernel-specific paths the shared suite does not reach with default block sizes."""

    @pytest.mark.parametrize("n_tokens", [3000, 4096])  # padded view; whole rows
    def test_tpu_several_blocks(self, n_tokens):
        rng = np.random.default_rng(n_tokens)
        q, k = random_codes(rng, 2, 2, 3, n_tokens, 128)
        lengths = jnp.asarray([n_tokens, 1500], jnp.int32)  # row 1 skips its last blocks
        actual = pallas_tpu.hamming_scores_pallas_tpu(
            q, k, lengths, block_sizes=pallas_tpu.BlockSizes(block_n=1024), interpret=True
        )
        assert_equal(actual, pk.hamming_scores_reference(q, k, lengths))

    def test_gpu_small_blocks(self):
        rng = np.random.default_rng(1)
        q, k = random_codes(rng, 2, 1, 4, 1000, 96)  # W = 3: not a power of two
        lengths = jnp.asarray([999, 300], jnp.int32)
        actual = pallas_gpu.hamming_scores_pallas_gpu(
            q, k, lengths, block_sizes=pallas_gpu.BlockSizes(block_n=128), interpret=True
        )
        assert_equal(actual, pk.hamming_scores_reference(q, k, lengths))

    def test_gpu_popcount(self):
        words = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.uint32)
        words[:4] = [0, 1, 2**31, 2**32 - 1]
        expected = lax.population_count(jnp.asarray(words)).astype(jnp.int32)
        assert_equal(pallas_gpu.popcount(jnp.asarray(words)), expected)

    def test_block_size_checks(self):
        with pytest.raises(ValueError, match="block_n"):
            pallas_tpu.BlockSizes(block_n=1000)
        with pytest.raises(ValueError, match="block_n"):
            pallas_gpu.BlockSizes(block_n=1000)

    def test_tpu_rejects_words_not_dividing_128(self):
        q, k = random_codes(np.random.default_rng(0), 1, 1, 1, 64, 96)
        with pytest.raises(ValueError, match="k_codes.shape"):
            pk.hamming_scores(q, k, jnp.asarray([64], jnp.int32), implementation="pallas_tpu")

    def test_default_implementation_on_cpu(self):
        assert pk.available_implementations("cpu")[0] == "xla"
        assert pk.available_implementations("tpu")[0] == "pallas_tpu"
        assert pk.available_implementations("gpu")[0] == "pallas_gpu"
        if jax.default_backend() == "cpu":
            assert pk.resolve_implementation(None, 4) == "xla"
        with pytest.raises(ValueError, match="implementation"):
            pk.resolve_implementation("mosaic", 4)


class TestLowering:
    """The kernels lower to Mosaic and to Triton IR on this CPU-only machine (no compile)."""

    SHAPES = (
        jax.ShapeDtypeStruct((2, 3, 3, 4), jnp.uint32),
        jax.ShapeDtypeStruct((2, 3, 20_000, 4), jnp.uint32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    WEIGHTS = jax.ShapeDtypeStruct((2, 3, 3, 128), jnp.float32)

    @pytest.mark.parametrize(
        "scorer",
        [pallas_tpu.hamming_scores_pallas_tpu, pallas_tpu.asymmetric_scores_pallas_tpu],
    )
    def test_mosaic(self, scorer):
        args = self.SHAPES if "hamming" in scorer.__name__ else (self.WEIGHTS, *self.SHAPES[1:])
        module = jax.export.export(scorer, platforms=["tpu"])(*args).mlir_module()
        assert "tpu_custom_call" in module

    @pytest.mark.parametrize(
        "scorer",
        [pallas_gpu.hamming_scores_pallas_gpu, pallas_gpu.asymmetric_scores_pallas_gpu],
    )
    def test_triton(self, scorer):
        args = self.SHAPES if "hamming" in scorer.__name__ else (self.WEIGHTS, *self.SHAPES[1:])
        triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        exported = jax.export.export(scorer, platforms=["cuda"], disabled_checks=[triton_call])
        assert "xla.gpu.triton" in exported(*args).mlir_module()
