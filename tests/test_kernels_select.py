"""Linear-time top-k selection: equal to `lax.top_k`, and no sort of the N scores."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pallas_kernels as pk
from pallas_kernels import select

INT32_MIN = np.iinfo(np.int32).min


def assert_matches_top_k(scores, k, **kwargs):
    scores = jnp.asarray(scores)
    values, indices = select.select_topk(scores, k, **kwargs)
    expected_values, expected_indices = lax.top_k(scores, k)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected_indices))
    # Compare bit patterns, so that -0.0 and +0.0 count as different.
    np.testing.assert_array_equal(
        np.asarray(values).view(np.int32), np.asarray(expected_values).view(np.int32)
    )


def test_hand_computed():
    # Ties go to the lower index: the three 3s at 0, 2, 4 come in that order.
    values, indices = select.select_topk(jnp.asarray([3, 1, 3, 2, 3, INT32_MIN], jnp.int32), 5)
    np.testing.assert_array_equal(values, [3, 3, 3, 2, 1])
    np.testing.assert_array_equal(indices, [0, 2, 4, 3, 1])


@pytest.mark.parametrize("k", [1, 300, 1000])
def test_hamming_like_ties_and_sentinels(k):
    rng = np.random.default_rng(k)
    scores = (128 - 2 * rng.binomial(128, 0.5, size=(4, 1000))).astype(np.int32)  # many ties
    scores[0, 500:] = INT32_MIN  # length 500
    scores[1, :] = INT32_MIN  # length 0
    scores[2, ::3] = INT32_MIN
    assert_matches_top_k(scores, k, value_range=(-128, 128) if k == 300 else None)


def test_int_ranges():
    # One row per range: narrow, full width (several radix passes), and at both ends of int32.
    rng = np.random.default_rng(0)
    ranges = [(-5, 5), (-(2**31), 2**31 - 1), (2**31 - 10, 2**31 - 1), (-(2**31), -(2**31) + 9)]
    scores = [rng.integers(lo, hi, size=777, endpoint=True, dtype=np.int64) for lo, hi in ranges]
    assert_matches_top_k(np.stack(scores).astype(np.int32), 50)


def test_floats_with_sentinels_and_signed_zeros():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 999)).astype(np.float32)
    scores[0, rng.random(999) < 0.5] = -np.inf
    scores[1, :] = -np.inf
    scores[2, ::4] = 0.0
    scores[2, 1::4] = -0.0
    for k in (333, 999):
        assert_matches_top_k(scores, k)


def test_leading_axes_and_single_slot():
    rng = np.random.default_rng(1)
    assert_matches_top_k(rng.integers(-9, 9, size=(2, 3, 5, 64)).astype(np.int32), 9)
    assert_matches_top_k(np.asarray([[7]], np.int32), 1)


@hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
@hypothesis.given(
    rows=st.integers(1, 3),
    n=st.integers(1, 2000),
    k_fraction=st.floats(0.0, 1.0),
    spread=st.sampled_from([3, 1000, 2**30]),
    sentinel_fraction=st.floats(0.0, 1.0),
    is_float=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_equals_top_k(rows, n, k_fraction, spread, sentinel_fraction, is_float, seed):
    rng = np.random.default_rng(seed)
    if is_float:
        scores = (rng.standard_normal((rows, n)) * spread).astype(np.float32)
        scores[rng.random((rows, n)) < sentinel_fraction] = pk.ASYMMETRIC_SENTINEL
    else:
        scores = rng.integers(-spread, spread, size=(rows, n)).astype(np.int32)
        scores[rng.random((rows, n)) < sentinel_fraction] = pk.HAMMING_SENTINEL
    assert_matches_top_k(scores, max(1, round(k_fraction * n)))


def _sort_sizes(jaxpr):
    """Operand sizes of every sort / top_k in a jaxpr, nested jaxprs included."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("sort", "top_k"):
            sizes.append((eqn.primitive.name, eqn.invars[0].aval.shape[-1]))
        for sub in jex.core.jaxprs_in_params(eqn.params):
            sizes.extend(_sort_sizes(sub))
    return sizes


def test_no_sort_of_the_n_scores():
    n, k = 1 << 16, 1 << 11
    jaxpr = jax.make_jaxpr(lambda s: select.select_topk(s, k))(jnp.zeros((4, n), jnp.int32))
    sizes = _sort_sizes(jaxpr.jaxpr)
    assert sizes and all(name == "sort" and size <= k for name, size in sizes), sizes


def test_bad_input():
    with pytest.raises(ValueError, match="scores.dtype"):
        select.select_topk(jnp.zeros((2, 8), jnp.int16), 2)
    with pytest.raises(ValueError, match=r"k=0 for scores_shape=\(2, 8\)"):
        select.select_topk(jnp.zeros((2, 8), jnp.int32), 0)
    with pytest.raises(ValueError, match="k=9"):
        select.select_topk(jnp.zeros((2, 8), jnp.float32), 9)
    with pytest.raises(ValueError, match="value_range"):
        select.select_topk(jnp.zeros((2, 8), jnp.float32), 2, value_range=(0, 1))


def test_backend_route_equals_top_k():
    # pk.select_topk: the radix select here, XLA's top_k on GPU; the same answer either way.
    scores = jnp.asarray(np.random.default_rng(0).integers(-50, 50, (3, 2, 1000)), jnp.int32)
    values, indices = pk.select_topk(scores, 100)
    expected_values, expected_indices = lax.top_k(scores, 100)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected_indices))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
