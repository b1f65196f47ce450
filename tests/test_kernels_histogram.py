"""Selection primitives: hamming_histogram, rank_threshold and select_ranks, exactly.

Every implementation is checked against the XLA reference and against a plain NumPy computation
written independently (bit-by-bit popcount, np.bincount, a stable argsort on (distance, slot)).
One base class holds the suite; subclasses run it for the XLA path and for the TPU (Mosaic) and
GPU (Triton) kernel sources in Pallas interpret mode on the CPU. Interpret mode is slow: shapes
stay small, and one shape serves several tests (compiles are cached per shape).
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

import pallas_kernels as pk
from pallas_kernels import pallas_gpu, pallas_tpu

SENTINEL = pk.DISTANCE_SENTINEL
select_ranks_reference = jax.jit(pk.select_ranks_reference, static_argnums=3)


# --- The definition, in NumPy --------------------------------------------------------------


def numpy_distances(q, k, lo, hi):
    """sum_g (bits where q_g and k differ), bit by bit; SENTINEL outside [lo, hi)."""
    q_bits = np.unpackbits(np.asarray(q).view(np.uint8), axis=-1)  # [B, Hkv, G, b]
    k_bits = np.unpackbits(np.asarray(k).view(np.uint8), axis=-1)  # [B, Hkv, N, b]
    differing = sum(
        (q_bits[:, :, g, None, :] != k_bits).sum(axis=-1) for g in range(q_bits.shape[2])
    )  # [B, Hkv, N]
    slot = np.arange(k_bits.shape[2])[None, None, :]
    lo, hi = np.asarray(lo)[:, None, None], np.asarray(hi)[:, None, None]
    return np.where((slot >= lo) & (slot < hi), differing, SENTINEL).astype(np.int32)


def numpy_histogram(distances, n_bins):
    rows = [
        np.bincount(row[row != SENTINEL], minlength=n_bins)
        for row in distances.reshape(-1, distances.shape[-1])
    ]
    return np.stack(rows).reshape(*distances.shape[:2], n_bins).astype(np.int32)


def numpy_threshold(histogram, k):
    """(T, ties) per row: the smallest T with cumsum >= k, ties = k - count(D < T)."""
    k = np.broadcast_to(np.asarray(k), histogram.shape[:2])
    threshold = np.zeros(histogram.shape[:2], np.int32)
    ties = np.zeros(histogram.shape[:2], np.int32)
    for index in np.ndindex(*histogram.shape[:2]):
        row, want = histogram[index], int(k[index])
        cumulative = np.cumsum(row)
        if want == 0:
            threshold[index], ties[index] = -1, 0
        elif want >= cumulative[-1]:  # everything
            threshold[index], ties[index] = len(row) - 1, row[-1]
        else:
            t = int(np.searchsorted(cumulative, want, side="left"))
            threshold[index], ties[index] = t, want - (cumulative[t] - row[t])
    return threshold, ties


def numpy_select(distances, k_a, k_b, size):
    """Slots of rank in [k_a, k_b): a stable argsort on distance orders ties by slot."""
    k_a = np.broadcast_to(np.asarray(k_a), distances.shape[:2])
    k_b = np.broadcast_to(np.asarray(k_b), distances.shape[:2])
    indices = np.full((*distances.shape[:2], size), -1, np.int32)
    count = np.zeros(distances.shape[:2], np.int32)
    for index in np.ndindex(*distances.shape[:2]):
        row = distances[index]
        order = np.argsort(row, kind="stable")
        order = order[row[order] != SENTINEL]  # selectable slots in rank order
        picked = np.sort(order[int(k_a[index]) : int(k_b[index])])[:size]
        indices[index][: len(picked)] = picked
        count[index] = len(picked)
    return indices, count


# --- Inputs ------------------------------------------------------------------------------


def random_codes(rng, batch, kv_heads, g_size, n_tokens, bits, pool=None):
    """Random codes; with `pool`, keys drawn from that many distinct codes (many equal
    distances: ties at every threshold)."""
    n_words = bits // 32
    q = rng.integers(0, 2**32, size=(batch, kv_heads, g_size, n_words), dtype=np.uint32)
    if pool is None:
        k = rng.integers(0, 2**32, size=(batch, kv_heads, n_tokens, n_words), dtype=np.uint32)
    else:
        codes = rng.integers(0, 2**32, size=(pool, n_words), dtype=np.uint32)
        k = codes[rng.integers(0, pool, size=(batch, kv_heads, n_tokens))]
    return jnp.asarray(q), jnp.asarray(k)


def ragged_bounds(rng, batch, n_tokens):
    """lo, hi [B] int32: the whole cache, an empty row (lo == hi), hi < lo, then random ones."""
    fixed = [(0, n_tokens), (n_tokens // 3, n_tokens // 3), (n_tokens // 2, n_tokens // 4)]
    rest = [tuple(rng.integers(0, n_tokens + 1, size=2)) for _ in range(max(0, batch - 3))]
    lo, hi = zip(*(fixed + rest)[:batch], strict=True)
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def assert_equal(actual, expected):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


@pytest.mark.parametrize("bits,g_size", [(32, 1), (32, 2), (64, 3), (128, 3), (128, 4), (256, 8)])
def test_reference_is_the_definition(bits, g_size):
    rng = np.random.default_rng(bits + g_size)
    q, k = random_codes(rng, 3, 2, g_size, 200, bits, pool=40)
    lo, hi = ragged_bounds(rng, 3, 200)
    distances, histogram = pk.hamming_histogram_reference(q, k, lo, hi)
    expected = numpy_distances(q, k, lo, hi)
    assert_equal(distances, expected)
    assert_equal(histogram, numpy_histogram(expected, g_size * bits + 1))
    for k_a, k_b in [(0, 10), (10, 60), (60, 1000), (0, 0), (7, 3)]:
        lower, upper = pk.rank_threshold(histogram, k_a), pk.rank_threshold(histogram, k_b)
        assert_equal(lower, numpy_threshold(np.asarray(histogram), k_a))
        indices, count = pk.select_ranks_reference(distances, lower, upper, 32)
        want = numpy_select(expected, k_a, k_b, 32)
        assert_equal(indices, want[0])
        assert_equal(count, want[1])


# --- rank_threshold: one implementation ---------------------------------------------------


class TestRankThreshold:
    def test_hand_computed(self):
        # histogram [2, 0, 3, 1]: cumulative [2, 2, 5, 6].
        #   k = 1: T = 0 (2 >= 1), ties = 1 - 0 = 1;   k = 3: T = 2 (5 >= 3), ties = 3 - 2 = 1
        #   k = 5: T = 2, ties = 3;  k = 0: (-1, 0);  k = 6 and k = 9: everything, (3, hist[3] = 1)
        histogram = jnp.asarray([[[2, 0, 3, 1]]], jnp.int32)
        for k, expected in [
            (1, (0, 1)),
            (3, (2, 1)),
            (5, (2, 3)),
            (0, (-1, 0)),
            (6, (3, 1)),
            (9, (3, 1)),
        ]:
            threshold, ties = pk.rank_threshold(histogram, k)
            assert (int(threshold[0, 0]), int(ties[0, 0])) == expected, k

    def test_per_row_k_and_empty_rows(self):
        rng = np.random.default_rng(0)
        histogram = rng.integers(0, 4, size=(3, 2, 50)).astype(np.int32)
        histogram[1, 0] = 0  # no selectable slot: any k > 0 is everything
        k = rng.integers(0, 120, size=(3, 2)).astype(np.int32)
        k[0, 0], k[1, 0], k[2, 1] = 0, 5, int(histogram[2, 1].sum())
        threshold, ties = pk.rank_threshold(jnp.asarray(histogram), jnp.asarray(k))
        assert threshold.dtype == ties.dtype == jnp.int32 and threshold.shape == (3, 2)
        assert_equal(threshold, numpy_threshold(histogram, k)[0])
        assert_equal(ties, numpy_threshold(histogram, k)[1])
        # A [B, 1] k broadcasts over the KV heads.
        threshold, _ = pk.rank_threshold(jnp.asarray(histogram), jnp.asarray(k[:, :1]))
        assert_equal(threshold, numpy_threshold(histogram, np.repeat(k[:, :1], 2, axis=1))[0])

    def test_bad_input(self):
        histogram = jnp.zeros((2, 3, 65), jnp.int32)
        with pytest.raises(ValueError, match=r"k=-1"):
            pk.rank_threshold(histogram, -1)
        with pytest.raises(ValueError, match=r"histogram.shape=\(3, 65\)"):
            pk.rank_threshold(histogram[0], 1)
        with pytest.raises(ValueError, match="histogram.dtype"):
            pk.rank_threshold(histogram.astype(jnp.float32), 1)
        with pytest.raises(ValueError, match=r"k_shape=\(3, 2\)"):
            pk.rank_threshold(histogram, jnp.zeros((3, 2), jnp.int32))
        with pytest.raises(ValueError, match="k_dtype"):
            pk.rank_threshold(histogram, jnp.zeros((2, 3), jnp.float32))


# --- calibrate_distances: the XLA reference and the CPU kernel -------------------------------


def numpy_calibrate(distances, consensus, momentum, n_bins):
    """The discounts slot by slot: the votes, the momentum weights summed in list order."""
    distances = np.asarray(distances)
    batch, kv_heads, n = distances.shape
    discount = np.zeros((batch, n), np.int64)
    if consensus is not None:
        thresholds, t_vote, units = (np.asarray(x) for x in consensus)
        votes = (distances <= thresholds[..., None]).sum(axis=1)
        discount += np.where(votes >= t_vote, units, 0)
    if momentum is not None:
        slots, weights, scale = (np.asarray(x) for x in momentum)
        for b in range(batch):
            attention = np.zeros(n, np.float32)
            for slot, weight in zip(slots[b], weights[b], strict=True):
                if 0 <= slot < n:
                    attention[slot] += weight
            discount[b] += np.round(np.float32(scale) * attention).astype(np.int64)
    calibrated = np.clip(distances - discount[:, None], 0, n_bins - 1)
    calibrated = np.where(distances == SENTINEL, SENTINEL, calibrated).astype(np.int32)
    return calibrated, numpy_histogram(calibrated, n_bins)


def calibration_inputs(rng, batch, kv_heads, n, m, n_bins=385):
    distances = rng.integers(0, n_bins, (batch, kv_heads, n)).astype(np.int32)
    distances[:, :, : n // 10] = SENTINEL  # sinks, and slots past the length
    distances = jnp.asarray(distances)
    consensus = (
        jnp.asarray(rng.integers(-1, n_bins // 4, (batch, kv_heads)), jnp.int32),
        jnp.int32(2),
        jnp.int32(rng.integers(1, 40)),
    )
    # Duplicates across the list (the previous layer's KV heads pick the same tokens) and slots
    # outside [0, n); weights large enough that many round to discounts.
    slots = jnp.asarray(rng.integers(-2, n + 2, (batch, m)), jnp.int32)
    momentum = (slots, jnp.asarray(rng.random((batch, m)), jnp.float32), jnp.float32(6.5))
    return (
        distances,
        pk.distance_histogram(distances, n_bins, implementation="xla"),
        (
            consensus,
            momentum,
        ),
    )


class TestCalibrate:
    def test_hand_computed(self):
        # One row, two KV heads, five slots, 10 bins; slot 0 is the sentinel in both heads.
        #   votes (D <= thresholds 3 and 4): slot 1 (2 <= 3, 4 <= 4) and slot 3 (0, 1): 2 each,
        #   slot 2 (5, 4): 1 -> consensus discount 2 on slots 1 and 3.
        #   momentum, scale 4: slot 2 listed twice (0.25 + 0.5 -> 3 units), slot 4 once (0.125
        #   -> 0.5 rounds to even: 0), slot 7 outside the cache.
        distances = jnp.asarray([[[SENTINEL, 2, 5, 0, 9], [SENTINEL, 4, 4, 1, 8]]], jnp.int32)
        histogram = pk.distance_histogram(distances, 10)
        consensus = (jnp.asarray([[3, 4]], jnp.int32), jnp.int32(2), jnp.int32(2))
        momentum = (
            jnp.asarray([[2, 4, 2, 7]], jnp.int32),
            jnp.asarray([[0.25, 0.125, 0.5, 1.0]], jnp.float32),
            jnp.float32(4.0),
        )
        want = [[[SENTINEL, 0, 2, 0, 9], [SENTINEL, 2, 1, 0, 8]]]  # slot 3: 0 - 2 clips to 0
        for implementation in ("xla", "cpu"):
            calibrated, new_histogram = pk.calibrate_distances(
                distances, histogram, consensus, momentum, implementation=implementation
            )
            assert_equal(calibrated, want)
            assert_equal(new_histogram, numpy_histogram(np.asarray(want), 10))

    @pytest.mark.parametrize("parts", ["consensus", "momentum", "both"])
    def test_reference_is_the_definition(self, parts):
        rng = np.random.default_rng(len(parts))
        distances, histogram, (consensus, momentum) = calibration_inputs(rng, 2, 3, 700, 300)
        consensus = None if parts == "momentum" else consensus
        momentum = None if parts == "consensus" else momentum
        want = numpy_calibrate(distances, consensus, momentum, 385)
        got = pk.calibrate_distances(
            distances, histogram, consensus, momentum, implementation="xla"
        )
        assert_equal(got[0], want[0])
        assert_equal(got[1], want[1])

    def test_off_returns_the_input(self):
        distances, histogram, _ = calibration_inputs(np.random.default_rng(0), 1, 3, 50, 4)
        got = pk.calibrate_distances(distances, histogram)
        assert_equal(got[0], distances)
        assert_equal(got[1], histogram)

    def test_bad_input(self):
        distances, histogram, (consensus, momentum) = calibration_inputs(
            np.random.default_rng(0), 1, 3, 50, 4
        )
        with pytest.raises(ValueError, match="histogram must be int32"):
            pk.calibrate_distances(distances, histogram[:, :2])
        with pytest.raises(ValueError, match="consensus thresholds must be int32"):
            pk.calibrate_distances(distances, histogram, (consensus[0][:, :2], *consensus[1:]))
        with pytest.raises(ValueError, match="momentum weights must be float32"):
            pk.calibrate_distances(
                distances, histogram, None, (momentum[0], momentum[1][:, :3], momentum[2])
            )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are the CPU's")
class TestCalibrateCpuNative:
    """The kernel updates the distances and the histogram in place; the reference recounts."""

    def check(self, distances, histogram, consensus, momentum):
        args = (distances, histogram, consensus, momentum)
        want = pk.calibrate_distances(*args, implementation="xla")
        got = pk.calibrate_distances(*args, implementation="cpu")
        assert_equal(got[0], want[0])
        assert_equal(got[1], want[1])

    @pytest.mark.parametrize("parts", ["consensus", "momentum", "both"])
    def test_several_blocks(self, parts):
        # 40K slots: three 16K-slot blocks per row, each with its own momentum bucket.
        rng = np.random.default_rng(len(parts))
        distances, histogram, (consensus, momentum) = calibration_inputs(rng, 2, 3, 40_000, 9000)
        self.check(
            distances,
            histogram,
            None if parts == "momentum" else consensus,
            None if parts == "consensus" else momentum,
        )

    @hypothesis.settings(max_examples=30, deadline=None)
    @hypothesis.given(
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 3),
        kv_heads=st.integers(1, 4),
        n=st.integers(1, 3000),
        m=st.integers(1, 400),
    )
    def test_property_ragged(self, seed, batch, kv_heads, n, m):
        rng = np.random.default_rng(seed)
        distances, histogram, (consensus, momentum) = calibration_inputs(rng, batch, kv_heads, n, m)
        consensus = (consensus[0], jnp.int32(rng.integers(1, kv_heads + 1)), consensus[2])
        self.check(distances, histogram, consensus, momentum)

    def test_inside_jit_keeps_its_input(self):
        # The kernel writes in place: a caller that still holds the distances gets them intact
        # (XLA copies them before the call).
        distances, histogram, (consensus, momentum) = calibration_inputs(
            np.random.default_rng(3), 1, 3, 5000, 800
        )

        @jax.jit
        def both(distances, histogram):
            calibrated = pk.calibrate_distances(
                distances, histogram, consensus, momentum, implementation="cpu"
            )
            return distances, calibrated

        before = np.asarray(distances).copy()
        kept, (calibrated, _) = both(distances, histogram)
        assert_equal(kept, before)
        assert_equal(distances, before)
        assert (np.asarray(calibrated) != before).any()


# --- The shared suite -----------------------------------------------------------------------


class SelectionSuite:
    """The shared suite; a subclass sets IMPLEMENTATION."""

    IMPLEMENTATION: str
    HYPOTHESIS_EXAMPLES = 3

    def histogram(self, q, k, lo, hi):
        return pk.hamming_histogram(q, k, lo, hi, implementation=self.IMPLEMENTATION)

    def select(self, distances, lower, upper, size):
        return pk.select_ranks(distances, lower, upper, size, implementation=self.IMPLEMENTATION)

    def check_selection(self, distances, histogram, k_a, k_b, size):
        """select_ranks of [k_a, k_b) against the reference and against NumPy."""
        lower, upper = pk.rank_threshold(histogram, k_a), pk.rank_threshold(histogram, k_b)
        indices, count = self.select(distances, lower, upper, size)
        assert indices.dtype == count.dtype == jnp.int32
        assert indices.shape == (*distances.shape[:2], size) and count.shape == distances.shape[:2]
        expected = numpy_select(np.asarray(distances), k_a, k_b, size)
        assert_equal(indices, expected[0])
        assert_equal(count, expected[1])
        if self.IMPLEMENTATION != "xla":
            reference = select_ranks_reference(distances, lower, upper, size)
            assert_equal(indices, reference[0])
            assert_equal(count, reference[1])

    def test_hand_computed(self):
        # b = 32, G = 2: q0 = 0x0F, q1 = 0xFF; bins 0 .. G b = 64. Row 0 selects slots [1, 5).
        #   k0 = 0x0F:       slot 0 < lo                             -> SENTINEL
        #   k1 = 0xFF:       popcount(0xF0) + popcount(0)   = 4 + 0  -> 4
        #   k2 = 0:          popcount(0x0F) + popcount(0xFF) = 4 + 8 -> 12
        #   k3 = 0x0F:       popcount(0) + popcount(0xF0)   = 0 + 4  -> 4
        #   k4 = 0xFFFFFFFF: 28 + 24                                 -> 52
        # Histogram: [4] = 2, [12] = 1, [52] = 1. Rank order: slot 1, slot 3 (tie at 4: older
        # first), slot 2, slot 4. Row 1 selects nothing (lo == hi == 2).
        q = jnp.asarray([[[[0x0F], [0xFF]]]] * 2, jnp.uint32)  # [2, 1, 2, 1]
        k = jnp.asarray([[[[0x0F], [0xFF], [0], [0x0F], [0xFFFFFFFF]]]] * 2, jnp.uint32)
        lo, hi = jnp.asarray([1, 2], jnp.int32), jnp.asarray([5, 2], jnp.int32)
        distances, histogram = self.histogram(q, k, lo, hi)
        assert_equal(distances, [[[SENTINEL, 4, 12, 4, 52]], [[SENTINEL] * 5]])
        expected = np.zeros((2, 1, 65), np.int32)
        expected[0, 0, [4, 12, 52]] = [2, 1, 1]
        assert_equal(histogram, expected)
        # k = 1: T = 4, ties 1 (slot 1);  k = 3: T = 12, ties 1;  an empty row is "everything".
        assert_equal(pk.rank_threshold(histogram, 1), ([[4], [64]], [[1], [0]]))
        assert_equal(pk.rank_threshold(histogram, 3), ([[12], [64]], [[1], [0]]))
        cases = [
            (1, 3, 4, [2, 3, -1, -1], 2),  # ranks 1, 2: slot 3 (tied 4), slot 2 (12)
            (0, 1, 2, [1, -1], 1),  # rank 0: slot 1
            (0, 4, 3, [1, 2, 3], 3),  # all four qualify; the list keeps the first three
            (2, 2, 2, [-1, -1], 0),  # an empty range
        ]
        for k_a, k_b, size, row_0, count_0 in cases:
            lower, upper = pk.rank_threshold(histogram, k_a), pk.rank_threshold(histogram, k_b)
            indices, count = self.select(distances, lower, upper, size)
            assert_equal(indices, [[row_0], [[-1] * size]])
            assert_equal(count, [[count_0], [0]])

    @pytest.mark.parametrize("bits,g_size", [(32, 4), (128, 3), (256, 2)])
    def test_histogram_matches_reference(self, bits, g_size):
        rng = np.random.default_rng(bits + g_size)
        n_tokens = 1100  # not a multiple of any block size, nor of 32
        q, k = random_codes(rng, 4, 2, g_size, n_tokens, bits)
        lo, hi = ragged_bounds(rng, 4, n_tokens)
        distances, histogram = self.histogram(q, k, lo, hi)
        assert distances.dtype == histogram.dtype == jnp.int32
        assert distances.shape == (4, 2, n_tokens)
        assert histogram.shape == (4, 2, g_size * bits + 1)
        expected = pk.hamming_histogram_reference(q, k, lo, hi)
        assert_equal(distances, expected[0])
        assert_equal(histogram, expected[1])
        assert_equal(distances, numpy_distances(q, k, lo, hi))
        assert_equal(histogram, numpy_histogram(np.asarray(expected[0]), g_size * bits + 1))

    def test_histogram_reads_a_layer_in_place(self):
        # With `layer`, k_codes is every layer's cache [L, B, Hkv, N, W]: the result is that of
        # the layer's slice, read without copying it first.
        rng = np.random.default_rng(3)
        q, k = random_codes(rng, 2, 2, 3, 300, 64)
        layers = jnp.stack([k ^ jnp.uint32(0x5A5A5A5A), k, ~k])  # [3, B, Hkv, N, W]
        lo, hi = ragged_bounds(rng, 2, 300)
        for layer in range(3):
            got = pk.hamming_histogram(
                q, layers, lo, hi, layer=jnp.int32(layer), implementation=self.IMPLEMENTATION
            )
            for got_part, want in zip(got, self.histogram(q, layers[layer], lo, hi), strict=True):
                assert_equal(got_part, want)

    def test_select_with_ties(self):
        rng = np.random.default_rng(7)
        n_tokens = 1100
        q, k = random_codes(rng, 4, 2, 3, n_tokens, 64, pool=12)  # at most 12 distinct distances
        lo, hi = ragged_bounds(rng, 4, n_tokens)
        distances, histogram = self.histogram(q, k, lo, hi)
        everything = n_tokens + 5
        for k_a, k_b, size in [  # two list sizes: one compile each in interpret mode
            (0, 34, 64),  # tier 1 at k = N/32: ties at the threshold
            (34, 103, 64),  # tier 2: more qualify than the list holds
            (0, 0, 64),  # k = 0: nothing
            (0, everything, n_tokens),  # everything, all of it listed
            (500, everything, 64),  # from rank 500 on, the first 64
            (90, 40, 64),  # k_a > k_b: nothing
        ]:
            self.check_selection(distances, histogram, k_a, k_b, size)
        # Per-row k, as the decode path passes them: [B, Hkv] int32.
        k_a = jnp.asarray(rng.integers(0, 300, size=(4, 2)), jnp.int32)
        k_b = k_a + jnp.asarray(rng.integers(0, 60, size=(4, 2)), jnp.int32)
        self.check_selection(distances, histogram, k_a, k_b, 64)

    def test_select_tiers_equals_select_ranks(self):
        # Consecutive ranges [0, k1), [k1, k2) with ties at both thresholds: the shared-mask
        # route returns what one select_ranks call per range returns, and NumPy agrees.
        rng = np.random.default_rng(11)
        n_tokens = 1100
        q, k = random_codes(rng, 4, 2, 3, n_tokens, 64, pool=12)
        lo, hi = ragged_bounds(rng, 4, n_tokens)
        distances, histogram = self.histogram(q, k, lo, hi)
        k1 = jnp.asarray(rng.integers(0, 300, size=(4, 2)), jnp.int32)
        k2 = k1 + jnp.asarray(rng.integers(0, 60, size=(4, 2)), jnp.int32)
        bounds = (pk.rank_threshold(histogram, k1), pk.rank_threshold(histogram, k2))
        tiers = pk.select_tiers(distances, bounds, (64, 32), implementation=self.IMPLEMENTATION)
        lowers = (pk.rank_threshold(histogram, 0), bounds[0])
        ranges = ((0, k1, 64), (k1, k2, 32))
        for (got, count), lower, upper, (k_a, k_b, size) in zip(
            tiers, lowers, bounds, ranges, strict=True
        ):
            want = self.select(distances, lower, upper, size)
            assert_equal(got, want[0])
            assert_equal(count, want[1])
            expected = numpy_select(np.asarray(distances), k_a, k_b, size)
            assert_equal(got, expected[0])

    def test_property_ragged(self):
        @hypothesis.settings(max_examples=self.HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True)
        @hypothesis.given(
            batch=st.integers(1, 3),
            kv_heads=st.integers(1, 2),
            g_size=st.integers(1, 4),
            n_words=st.sampled_from([1, 2, 4]),
            n_tokens=st.integers(1, 300),
            pool=st.sampled_from([1, 3, 50, None]),
            fractions=st.tuples(st.floats(0.0, 1.2), st.floats(0.0, 1.2), st.floats(0.0, 1.2)),
            seed=st.integers(0, 2**16),
        )
        def check(batch, kv_heads, g_size, n_words, n_tokens, pool, fractions, seed):
            rng = np.random.default_rng(seed)
            q, k = random_codes(rng, batch, kv_heads, g_size, n_tokens, 32 * n_words, pool)
            bounds = rng.integers(0, n_tokens + 1, size=(2, batch))
            bounds[:, 0] = [n_tokens // 2, n_tokens // 2]  # lo == hi in the first row
            lo, hi = (jnp.asarray(x, jnp.int32) for x in bounds)
            distances, histogram = self.histogram(q, k, lo, hi)
            expected = numpy_distances(q, k, lo, hi)
            assert_equal(distances, expected)
            assert_equal(histogram, numpy_histogram(expected, g_size * n_words * 32 + 1))
            k_a = round(fractions[0] * n_tokens)
            k_b = k_a + round(fractions[1] * n_tokens)
            size = max(1, round(fractions[2] * n_tokens))
            self.check_selection(distances, histogram, k_a, k_b, size)

        check()

    def test_no_sort(self):
        # Neither primitive sorts or calls top_k, whatever the implementation.
        q, k = random_codes(np.random.default_rng(0), 1, 2, 3, 4096, 128)
        bounds = jnp.asarray([0], jnp.int32), jnp.asarray([4096], jnp.int32)

        def selection(q, k, lo, hi):
            distances, histogram = self.histogram(q, k, lo, hi)
            lower = pk.rank_threshold(histogram, 128)
            upper = pk.rank_threshold(histogram, 384)
            return self.select(distances, lower, upper, 256)

        jaxpr = jax.make_jaxpr(selection)(q, k, *bounds)
        assert not _primitives(jaxpr.jaxpr) & {"sort", "top_k", "approx_top_k"}

    def test_bad_input(self):
        q, k = random_codes(np.random.default_rng(0), 2, 2, 3, 50, 64)
        lo, hi = jnp.asarray([0, 10], jnp.int32), jnp.asarray([50, 40], jnp.int32)
        with pytest.raises(ValueError, match="q_codes.dtype"):
            self.histogram(q.astype(jnp.int32), k, lo, hi)
        with pytest.raises(ValueError, match=r"q_codes.shape=\(2, 2, 3, 2\)"):
            self.histogram(q, k[..., :1], lo, hi)  # mismatched word count
        with pytest.raises(ValueError, match=r"lo.shape=\(1,\)"):
            self.histogram(q, k, lo[:1], hi)
        with pytest.raises(ValueError, match=r"hi.shape=\(2, 1\)"):
            self.histogram(q, k, lo, hi[:, None])
        with pytest.raises(ValueError, match="lo.dtype"):
            self.histogram(q, k, lo.astype(jnp.float32), hi)
        distances, histogram = self.histogram(q, k, lo, hi)
        bound = pk.rank_threshold(histogram, 5)
        with pytest.raises(ValueError, match=r"distances.shape=\(2, 2, 50, 1\)"):
            self.select(distances[..., None], bound, bound, 8)
        with pytest.raises(ValueError, match="distances.dtype"):
            self.select(distances.astype(jnp.float32), bound, bound, 8)
        with pytest.raises(ValueError, match=r"lower must be .* got shapes="):
            self.select(distances, (bound[0][:1], bound[1]), bound, 8)
        with pytest.raises(ValueError, match="upper must be"):
            self.select(distances, bound, bound[0], 8)
        with pytest.raises(ValueError, match=r"size=-1"):
            self.select(distances, bound, bound, -1)


def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in a jaxpr, nested jaxprs included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jex.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


class TestXla(SelectionSuite):
    IMPLEMENTATION = "xla"
    HYPOTHESIS_EXAMPLES = 6

    def test_size_zero(self):
        distances = jnp.zeros((2, 3, 10), jnp.int32)
        bound = (jnp.zeros((2, 3), jnp.int32),) * 2
        indices, count = pk.select_ranks(distances, bound, bound, 0)
        assert indices.shape == (2, 3, 0) and count.shape == (2, 3)
        assert_equal(count, np.zeros((2, 3)))


class TestInterpretTpu(SelectionSuite):
    IMPLEMENTATION = "interpret"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are the CPU's")
class TestCpuNative(SelectionSuite):
    """The native CPU kernels (`make native`): built by `make test`, so never skipped on a CPU."""

    IMPLEMENTATION = "cpu"
    HYPOTHESIS_EXAMPLES = 30

    def test_several_tasks_and_the_calibrated_histogram(self):
        # 150K slots: three 64K-slot scan tasks per row, lo and hi inside different ones; and
        # distance_histogram (the calibrated distances') against the reference.
        rng = np.random.default_rng(7)
        q, k = random_codes(rng, 2, 3, 3, 150_000, 128, pool=4000)
        lo, hi = jnp.asarray([70_000, 5], jnp.int32), jnp.asarray([140_000, 150_000], jnp.int32)
        distances, histogram = self.histogram(q, k, lo, hi)
        want = pk.hamming_histogram_reference(q, k, lo, hi)
        assert_equal(distances, want[0])
        assert_equal(histogram, want[1])
        shifted = jnp.where(distances < 40, distances - 300, distances)  # some out of range
        for bins in (385, 200):
            assert_equal(
                pk.distance_histogram(shifted, bins, implementation="cpu"),
                pk.distance_histogram(shifted, bins, implementation="xla"),
            )
        self.check_selection(distances, histogram, 3000, 9000, 6500)

    @pytest.mark.parametrize("bits,g_size", [(64, 9), (128, 1), (256, 5)])
    def test_vector_loop_widths_and_count_chunks(self, bits, g_size):
        # The AVX-512 loop (16 slots a step) for each code width it takes, from odd starts, over
        # 2048-slot counting chunks, with up to nine queries per KV head.
        rng = np.random.default_rng(bits * g_size)
        q, k = random_codes(rng, 2, 2, g_size, 5000, bits, pool=700)
        lo, hi = jnp.asarray([3, 2047], jnp.int32), jnp.asarray([4999, 4100], jnp.int32)
        distances, histogram = self.histogram(q, k, lo, hi)
        assert_equal(distances, numpy_distances(q, k, lo, hi))
        assert_equal(histogram, pk.hamming_histogram_reference(q, k, lo, hi)[1])


class TestInterpretGpu(SelectionSuite):
    IMPLEMENTATION = "interpret_gpu"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasGpu(SelectionSuite):
    """The Triton kernels compiled and run on a real GPU (skipped elsewhere, CI included)."""

    IMPLEMENTATION = "pallas_gpu"
    HYPOTHESIS_EXAMPLES = 10


# --- Kernel details: several blocks per row, block sizes, lowering ---------------------------


@pytest.fixture(scope="module")
def inputs():
    """Several blocks per row at small block sizes: 3000 slots, ragged, with ties."""
    rng = np.random.default_rng(3)
    q, k = random_codes(rng, 3, 1, 3, 3000, 128, pool=20)
    lo = jnp.asarray([0, 1100, 2000], jnp.int32)  # row 1 starts in a later block
    hi = jnp.asarray([3000, 2500, 2000], jnp.int32)  # row 2 is empty
    return q, k, lo, hi, pk.hamming_histogram_reference(q, k, lo, hi)


class TestKernelDetails:
    """Paths the shared suite does not reach with default block sizes (one block per row)."""

    @pytest.mark.parametrize(
        "histogram_fn,block_sizes",
        [
            (pallas_tpu.hamming_histogram_pallas_tpu, pallas_tpu.SelectionBlockSizes(block_n=1024)),
            (pallas_gpu.hamming_histogram_pallas_gpu, pallas_gpu.SelectionBlockSizes(256, 64)),
        ],
    )
    def test_histogram_several_blocks(self, inputs, histogram_fn, block_sizes):
        q, k, lo, hi, expected = inputs
        actual = histogram_fn(q, k, lo, hi, block_sizes=block_sizes, interpret=True)
        assert_equal(actual[0], expected[0])
        assert_equal(actual[1], expected[1])

    @pytest.mark.parametrize(
        "select_fn,block_sizes",
        [
            (pallas_tpu.select_ranks_pallas_tpu, pallas_tpu.SelectionBlockSizes(block_n=1024)),
            (pallas_gpu.select_ranks_pallas_gpu, pallas_gpu.SelectionBlockSizes(256, 64)),
        ],
    )
    def test_select_several_blocks(self, inputs, select_fn, block_sizes):
        *_, (distances, histogram) = inputs
        for k_a, k_b, size in [(0, 94, 128), (94, 282, 128), (282, 2500, 3000), (0, 4000, 3000)]:
            lower, upper = pk.rank_threshold(histogram, k_a), pk.rank_threshold(histogram, k_b)
            expected = select_ranks_reference(distances, lower, upper, size)
            actual = select_fn(
                distances, lower, upper, size, block_sizes=block_sizes, interpret=True
            )
            assert_equal(actual[0], expected[0])
            assert_equal(actual[1], expected[1])

    def test_block_size_checks(self):
        with pytest.raises(ValueError, match="block_n"):
            pallas_tpu.SelectionBlockSizes(block_n=1000)
        with pytest.raises(ValueError, match="block_n"):
            pallas_gpu.SelectionBlockSizes(block_n=1000)
        with pytest.raises(ValueError, match="chunk_n"):
            pallas_gpu.SelectionBlockSizes(block_n=256, chunk_n=512)
        assert pallas_gpu.SelectionBlockSizes.get_default(5).block_n == 16
        assert pallas_tpu.SelectionBlockSizes.get_default(5).block_n == 1024

    def test_tpu_rejects_words_not_dividing_128(self):
        q, k = random_codes(np.random.default_rng(0), 1, 1, 1, 64, 96)
        bound = jnp.asarray([64], jnp.int32)
        with pytest.raises(ValueError, match="k_codes.shape"):
            pk.hamming_histogram(q, k, bound * 0, bound, implementation="pallas_tpu")


class TestLowering:
    """The kernels lower to Mosaic and to Triton IR on this CPU-only machine (no compile)."""

    CODES = (
        jax.ShapeDtypeStruct((2, 3, 3, 4), jnp.uint32),
        jax.ShapeDtypeStruct((2, 3, 20_000, 4), jnp.uint32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    ROW = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    SELECT = (jax.ShapeDtypeStruct((2, 3, 20_000), jnp.int32), (ROW, ROW), (ROW, ROW))

    @pytest.mark.parametrize("module", [pallas_tpu, pallas_gpu], ids=["mosaic", "triton"])
    def test_lowers(self, module):
        if module is pallas_tpu:
            platform, marker, checks = "tpu", "tpu_custom_call", []
        else:
            platform, marker = "cuda", "xla.gpu.triton"
            checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        suffix = platform if platform == "tpu" else "gpu"
        histogram = getattr(module, f"hamming_histogram_pallas_{suffix}")
        select = functools.partial(getattr(module, f"select_ranks_pallas_{suffix}"), size=1000)
        for fn, args, calls in ((histogram, self.CODES, 1), (select, self.SELECT, 2)):
            exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)
            assert exported(*args).mlir_module().count(marker) >= calls


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
    q, k = random_codes(rng, 2, 4, 3, 300, 64, pool=30)
    lo, hi = jnp.asarray([0, 40], jnp.int32), jnp.asarray([300, 250], jnp.int32)
    distances, histogram = pk.hamming_histogram_reference(q, k, lo, hi)
    bounds = pk.rank_threshold(histogram, 10), pk.rank_threshold(histogram, 40)
    return q, k, lo, hi, distances, bounds


@needs_8_devices
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_with_shardings(mesh, sharding_inputs, implementation):
    q, k, lo, hi, distances, (lower, upper) = sharding_inputs
    heads, rows = NamedSharding(mesh, jax.P("batch", "kv")), NamedSharding(mesh, jax.P("batch"))
    histogram_fn = functools.partial(pk.hamming_histogram, implementation=implementation)
    sharded = jax.jit(
        histogram_fn, in_shardings=(heads, heads, rows, rows), out_shardings=(heads, heads)
    )(q, k, lo, hi)
    for got, want in zip(sharded, histogram_fn(q, k, lo, hi), strict=True):
        assert got.sharding.is_equivalent_to(heads, got.ndim)
        assert_equal(got, want)
    select_fn = functools.partial(pk.select_ranks, size=32, implementation=implementation)
    pair = (heads, heads)
    sharded = jax.jit(select_fn, in_shardings=(heads, pair, pair), out_shardings=pair)(
        distances, lower, upper
    )
    for got, want in zip(sharded, select_fn(distances, lower, upper), strict=True):
        assert_equal(got, want)


@needs_8_devices
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map(mesh, sharding_inputs, implementation):
    # Each device runs the kernel on its own (batch, KV head) shard: XLA cannot partition a
    # custom call. Pallas calls carry no varying-axes types, hence check_vma only for XLA.
    q, k, lo, hi, distances, (lower, upper) = sharding_inputs
    heads, rows = jax.P("batch", "kv"), jax.P("batch")

    def selection(q, k, lo, hi, lower, upper):
        distances, histogram = pk.hamming_histogram(q, k, lo, hi, implementation=implementation)
        indices, count = pk.select_ranks(distances, lower, upper, 32, implementation=implementation)
        return distances, histogram, indices, count

    per_shard = jax.shard_map(
        selection,
        mesh=mesh,
        in_specs=(heads, heads, rows, rows, (heads, heads), (heads, heads)),
        out_specs=heads,
        check_vma=implementation == "xla",
    )
    got = jax.jit(per_shard)(q, k, lo, hi, lower, upper)
    for got_part, want in zip(got, selection(q, k, lo, hi, lower, upper), strict=True):
        assert_equal(got_part, want)
    assert_equal(got[0], distances)
