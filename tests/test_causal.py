"""Exact causal attention without a [T, T] matrix: every implementation against the reference,
and the memory the blocked one (and the models' prefill through it) compiles to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dashkv_jax.attention.full import FullAttention
from dashkv_jax.models import causal
from dashkv_jax.models.config import Gemma3Config, ModelConfig
from dashkv_jax.models.gemma3 import Gemma3
from dashkv_jax.models.llama import Llama

# (batch, T, kv heads, G, head_dim, window): T never a multiple of the blocks below.
SHAPES = [
    (1, 37, 3, 3, 64, None),  # the bundled SmolLM2's heads
    (2, 203, 2, 1, 64, None),
    (1, 203, 1, 4, 256, None),  # Gemma 3 270M's heads
    (1, 203, 1, 4, 256, 50),  # a sliding window that spans block edges
    (2, 130, 1, 3, 64, 7),
    (1, 1, 1, 3, 64, None),
]
SMALL_BLOCKS = causal.BlockSizes(block_q=64, block_k=48)


def _qkv(b, t, hkv, g, d, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, hkv * g, d))
    k = rng.normal(size=(b, t, hkv, d))
    v = rng.normal(size=(b, t, hkv, d))
    return (jnp.asarray(x, dtype) for x in (q, k, v))


def _run(implementation, q, k, v, window):
    if implementation == "blocked":
        return causal.blocked_causal_attention(q, k, v, window=window, block_sizes=SMALL_BLOCKS)
    if implementation == "splash":  # the TPU kernel, interpreted on any backend
        return causal.splash_causal_attention(q, k, v, window=window, interpret=True)
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        pytest.skip("cuDNN flash attention needs a GPU")
    return causal.causal_attention(q, k, v, window=window, implementation=implementation)


@pytest.mark.parametrize("implementation", ["xla", "blocked", "splash", "cudnn"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-t{}-hkv{}-g{}-d{}-w{}".format(*s))
def test_every_implementation_equals_the_reference(implementation, shape):
    *dims, window = shape
    # cuDNN runs bf16 only; compare it at bf16 tolerance.
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    q, k, v = _qkv(*dims, dtype=dtype)
    expected = causal.causal_attention_reference(q, k, v, window=window)
    out = _run(implementation, q, k, v, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    atol = 2e-2 if dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=atol, rtol=0
    )


def test_reference_by_hand():
    """T = 3, one head, D = 1, q = 0: each position averages the values it may see."""
    zeros = jnp.zeros((1, 3, 1, 1))
    v = jnp.asarray([1.0, 2.0, 6.0]).reshape(1, 3, 1, 1)
    # Causal: means of [1], [1, 2], [1, 2, 6]; window 2: [1], [1, 2], [2, 6].
    for window, means in [(None, [1.0, 1.5, 3.0]), (2, [1.0, 1.5, 4.0])]:
        for fn in (causal.causal_attention_reference, causal.blocked_causal_attention):
            out = fn(zeros, zeros, v, window=window)
            np.testing.assert_allclose(out.reshape(-1), means, rtol=1e-6)


def test_blocked_bf16_close_to_reference():
    q, k, v = _qkv(1, 203, 1, 4, 256, dtype=jnp.bfloat16)
    expected = causal.causal_attention_reference(q, k, v)
    out = causal.blocked_causal_attention(q, k, v, block_sizes=SMALL_BLOCKS)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=2e-2
    )


def test_the_entry_picks_blocked_on_cpu_and_refuses_bad_names():
    if jax.default_backend() == "cpu":
        assert causal.available_implementations() == ("blocked", "xla")
    q, k, v = _qkv(1, 37, 3, 3, 64)
    np.testing.assert_allclose(
        causal.causal_attention(q, k, v), causal.causal_attention_reference(q, k, v), atol=2e-6
    )
    with pytest.raises(ValueError, match="unknown causal attention implementation"):
        causal.causal_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="window must be positive"):
        causal.causal_attention(q, k, v, window=0)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="does not run on 'cpu'"):
            causal.causal_attention(q, k, v, implementation="splash")
    with pytest.raises(ValueError, match=r"Hkv \| Hq"):
        causal.causal_attention(q, k[:, :, :2], v[:, :, :2])


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_is_linear_in_t():
    """At T = 8192 the reference needs a float32 [T, T] per query head; the blocked version
    copies of q, k, v and a few blocks of logits: O(T x block), doubling with T."""
    hkv, g, d = 3, 3, 64

    def temp(t, fn):
        q = jax.ShapeDtypeStruct((1, t, hkv * g, d), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.float32)
        return _temp_bytes(fn, q, kv, kv)

    t = 8192
    square = t * t * 4 * hkv * g
    assert temp(t, causal.causal_attention_reference) >= square
    blocked, half = (
        temp(t, causal.blocked_causal_attention),
        temp(t // 2, causal.blocked_causal_attention),
    )
    print(
        f"T={t}: blocked temporaries {blocked >> 20} MiB (T/2: {half >> 20} MiB), "
        f"[T, T] x heads {square >> 20} MiB"
    )
    assert blocked < square / 20
    assert blocked < 2.5 * half


def _prefill_temp_bytes(model_fn, t):
    """Temporaries of a compiled FullAttention prefill of t tokens into a t-slot cache, from
    abstract weights (nothing is allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(model_fn))
    full = FullAttention()

    def run(state, ids):
        model = nnx.merge(graphdef, state)
        return model.prefill(ids, model.init_cache(1, t, full), full)

    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    return _temp_bytes(run, state, ids)


def test_32k_prefill_needs_no_t_by_t_matrix():
    """A Llama-shape model (SmolLM2's heads, 32K context) and Gemma 3 270M compile a 32K-token
    prefill to temporaries far below one float32 [T, T] (4 GiB)."""
    t = 32768
    llama = ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=4,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position=t,
        tie_embeddings=True,
    )
    gemma = Gemma3Config(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        max_position=t,
        sliding_window=512,
        global_layers=Gemma3Config.pattern(18, 6),
    )
    square = t * t * 4
    for name, model_fn in [
        ("llama", lambda: Llama(llama, rngs=nnx.Rngs(0))),
        ("gemma3", lambda: Gemma3(gemma, rngs=nnx.Rngs(0))),
    ]:
        temp = _prefill_temp_bytes(model_fn, t)
        print(f"{name} 32K prefill temporaries: {temp / 2**30:.2f} GiB")
        assert temp < square / 2, name
