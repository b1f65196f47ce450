"""Every implementation, jitted with shardings over (batch, KV head) on 8 CPU devices, equals the
unsharded result. tests/conftest.py asks XLA for the 8 host devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

import pallas_kernels as pk

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
IMPLEMENTATIONS = ("xla", "interpret", "interpret_gpu")
BATCH, KV_HEADS, G_SIZE, N_TOKENS, BITS, TOP_K = 2, 4, 3, 300, 64, 40


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("batch", "kv"), axis_types=(AxisType.Auto, AxisType.Auto))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    words = BITS // 32
    q = rng.integers(0, 2**32, size=(BATCH, KV_HEADS, G_SIZE, words), dtype=np.uint32)
    k = rng.integers(0, 2**32, size=(BATCH, KV_HEADS, N_TOKENS, words), dtype=np.uint32)
    weights = rng.integers(-32, 33, size=(BATCH, KV_HEADS, G_SIZE, BITS)) / 8  # exact sums
    lengths = np.asarray([N_TOKENS, 123], np.int32)
    return tuple(map(jnp.asarray, (q, k, weights.astype(np.float32), lengths)))


def _shardings(mesh):
    heads = NamedSharding(mesh, jax.P("batch", "kv"))
    return heads, NamedSharding(mesh, jax.P("batch"))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_with_shardings(mesh, inputs, implementation):
    q, k, weights, lengths = inputs
    heads, rows = _shardings(mesh)
    in_shardings = (heads, heads, rows)
    for scorer, query in ((pk.hamming_scores, q), (pk.asymmetric_scores, weights)):
        fn = functools.partial(scorer, implementation=implementation)
        sharded = jax.jit(fn, in_shardings=in_shardings, out_shardings=heads)(query, k, lengths)
        assert sharded.sharding.is_equivalent_to(heads, sharded.ndim)
        np.testing.assert_array_equal(sharded, fn(query, k, lengths))
    topk = functools.partial(pk.hamming_topk, k=TOP_K, implementation=implementation)
    sharded = jax.jit(topk, in_shardings=in_shardings, out_shardings=(heads, heads))(q, k, lengths)
    for got, want in zip(sharded, topk(q, k, lengths), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map(mesh, inputs, implementation):
    # The way to run a kernel on each device's own shard: XLA cannot partition a custom call.
    q, k, _, lengths = inputs
    heads, rows = jax.P("batch", "kv"), jax.P("batch")
    topk = functools.partial(pk.hamming_topk, k=TOP_K, implementation=implementation)
    # Pallas calls carry no varying-axes types, so kernels run with check_vma=False (as JAX's
    # own Pallas ops do); the plain-JAX path passes the check.
    per_shard = jax.shard_map(
        topk,
        mesh=mesh,
        in_specs=(heads, heads, rows),
        out_specs=heads,
        check_vma=implementation == "xla",
    )
    for got, want in zip(jax.jit(per_shard)(q, k, lengths), topk(q, k, lengths), strict=True):
        np.testing.assert_array_equal(got, want)
