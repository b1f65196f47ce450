"""The real bundled model: cache parity, RoPE layout, answers, perplexity, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data, load_model
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.methods import make_attention
from dashkv_jax.generate import Sampling, generate, generate_each, generate_ids, sample
from dashkv_jax.models.llama import (
    apply_rope,
    capture_qk,
    decode_step,
    forward,
    prefill,
    rope_frequencies,
)
from dashkv_jax.models.loaders import undo_rope_permutation

FULL = FullAttention()


@pytest.fixture(scope="module")
def heldout_ids(smollm2):
    """The first 1024 tokens of the first long held-out Wikipedia article."""
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    return next(data.iter_token_windows(docs, tokenizer, 1024))


@pytest.mark.parametrize("prompt_len", [1, 7, 100])
def test_prefill_then_decode_equals_full_forward(smollm2, heldout_ids, prompt_len):
    model, _ = smollm2
    steps = 4
    ids = jnp.asarray(heldout_ids[None, : prompt_len + steps])
    full = forward(model, ids)  # [1, T + steps, V]

    cache = model.init_cache(1, prompt_len + steps, FULL)
    logits, cache = prefill(model, ids[:, :prompt_len], cache, FULL)
    cached = [logits]
    for t in range(prompt_len, prompt_len + steps - 1):
        logits, cache = decode_step(model, ids[:, t], cache, FULL)
        cached.append(logits)
    cached = jnp.stack(cached, axis=1)
    # float32 through 30 layers: summation order alone moves a logit by up to about 1e-4.
    np.testing.assert_allclose(cached, full[:, prompt_len - 1 : -1], atol=2e-4, rtol=0)
    assert int(cache.lengths[0]) == prompt_len + steps - 1


def _llama_cpp_permute(w, n_heads):
    """llama.cpp converter, convert_hf_to_gguf.py LlamaModel.permute, on HF q/k rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_undo_rope_permutation_inverts_llama_cpp():
    w = np.random.default_rng(0).normal(size=(3 * 64, 10)).astype(np.float32)
    np.testing.assert_array_equal(undo_rope_permutation(_llama_cpp_permute(w, 3), 3), w)
    bias = np.arange(3 * 64, dtype=np.float32)
    np.testing.assert_array_equal(undo_rope_permutation(_llama_cpp_permute(bias, 3), 3), bias)


def test_interleaved_rope_on_gguf_rows_equals_rotate_half_on_ours():
    """Why the permutation exists: llama.cpp rotates adjacent pairs of its permuted rows."""
    heads, dim, position = 2, 8, 13
    rng = np.random.default_rng(1)
    w_hf = rng.normal(size=(heads * dim, 5)).astype(np.float32)
    x = rng.normal(size=(5,)).astype(np.float32)
    inv_freq = rope_frequencies(dim, 10000.0, None)

    # Ours: Hugging Face rows, rotate-half RoPE.
    q = jnp.asarray((w_hf @ x).reshape(1, 1, heads, dim))
    ours = np.asarray(apply_rope(q, jnp.array([[position]]), inv_freq)).reshape(-1)

    # llama.cpp: permuted rows, each adjacent pair (2i, 2i+1) rotated by position * inv_freq[i].
    pairs = (_llama_cpp_permute(w_hf, heads) @ x).reshape(heads, dim // 2, 2)
    cos, sin = np.cos(position * inv_freq), np.sin(position * inv_freq)
    theirs = np.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin],
        axis=-1,
    ).reshape(-1)

    np.testing.assert_allclose(undo_rope_permutation(theirs, heads), ours, atol=1e-5)


def test_real_model_answers_paris(smollm2):
    model, tokenizer = smollm2
    answer = generate(
        model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=24
    )
    assert "Paris" in answer


def test_perplexity_on_heldout_wikipedia(smollm2, heldout_ids):
    model, _ = smollm2
    ids = jnp.asarray(heldout_ids[None])
    logits = forward(model, ids)
    logprobs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    nll = -jnp.take_along_axis(logprobs, ids[0, 1:, None], axis=-1).mean()
    perplexity = float(jnp.exp(nll))
    print(f"held-out perplexity over 1024 tokens: {perplexity:.2f}")
    assert perplexity < 40


def test_greedy_generation_matches_stepwise_argmax(smollm2, heldout_ids):
    """The while_loop decode equals re-running the full forward and taking the argmax."""
    model, _ = smollm2
    prompt = jnp.asarray(heldout_ids[None, :20])
    out, counts = generate_ids(model, prompt, jax.random.key(0), max_new_tokens=6)
    ids = prompt
    for _ in range(6):
        ids = jnp.concatenate([ids, jnp.argmax(forward(model, ids)[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids[:, 20:])
    assert int(counts[0]) == 6


def test_generate_each_shares_one_prefill_and_matches_generate(smollm2, heldout_ids):
    model, tokenizer = smollm2
    text = tokenizer.decode(heldout_ids[:500].tolist())
    prompt = f"{text}\n\nWhat is the text above about? Answer in one sentence."
    attentions = [make_attention("full"), make_attention("dashkv", 128, model, tier2=32)]
    each = generate_each(model, tokenizer, prompt, attentions, max_new_tokens=10, chat=True)
    one_by_one = [
        generate(model, tokenizer, prompt, attention=a, max_new_tokens=10, chat=True)
        for a in attentions
    ]
    assert each == one_by_one and all(each)


def test_generation_stops_at_eos(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n").ids
    out, counts = generate_ids(model, jnp.asarray([prompt]), jax.random.key(0), max_new_tokens=64)
    n = int(counts[0])
    assert 0 < n < 64
    assert (np.asarray(out[0, n:]) == model.config.eos_token_ids[0]).all()


def test_sampling_modes():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    key = jax.random.key(0)
    assert int(sample(logits, key, Sampling())[0]) == 0
    # top_p below the top token's mass keeps only that token.
    draws = [
        int(sample(logits, k, Sampling(temperature=1.0, top_p=0.5))[0])
        for k in jax.random.split(key, 50)
    ]
    assert set(draws) == {0}
    # top_p = 0.8 keeps tokens 0 and 1, never 2; with plain sampling all three appear.
    draws = [
        int(sample(logits, k, Sampling(temperature=1.0, top_p=0.8))[0])
        for k in jax.random.split(key, 300)
    ]
    assert set(draws) == {0, 1}
    draws = [
        int(sample(logits, k, Sampling(temperature=1.0))[0]) for k in jax.random.split(key, 300)
    ]
    assert set(draws) == {0, 1, 2}


def test_capture_qk_matches_the_cache_written_by_prefill(smollm2, heldout_ids):
    """Captured keys are exactly what the model caches (post-RoPE), layer by layer."""
    model, _ = smollm2
    ids = jnp.asarray(heldout_ids[None, :48])
    q, k = capture_qk(model, ids)
    assert q.shape == (30, 1, 48, 9, 64) and k.shape == (30, 1, 48, 3, 64)
    _, cache = prefill(model, ids, model.init_cache(1, 48, FULL), FULL)
    np.testing.assert_allclose(k.transpose(0, 1, 3, 2, 4), cache.k, atol=1e-6)


def test_bfloat16_logits_close_to_float32(smollm2, heldout_ids):
    """load_model(dtype=bfloat16): bf16 weights, activations and cache; float32 logits whose
    next-token distributions stay close to the float32 model's on real text."""
    model32, _ = smollm2
    model16, _ = load_model(dtype=jnp.bfloat16)
    assert model16.embed.dtype == jnp.bfloat16
    ids = jnp.asarray(heldout_ids[None, :256])
    high = jax.nn.log_softmax(forward(model32, ids), -1)
    low16 = forward(model16, ids)
    assert low16.dtype == jnp.float32
    low = jax.nn.log_softmax(low16, -1)
    kl = float((jnp.exp(high) * (high - low)).sum(-1).mean())
    agree = float((low.argmax(-1) == high.argmax(-1)).mean())
    nll = [float(-jnp.take_along_axis(x[0, :-1], ids[0, 1:, None], -1).mean()) for x in (low, high)]
    print(
        f"bf16 vs f32: KL {kl:.4f}, argmax agreement {agree:.3f}, NLL {nll[0]:.4f} / {nll[1]:.4f}"
    )
    assert kl < 0.01 and agree > 0.95 and abs(nll[0] - nll[1]) < 0.02

    cache = model16.init_cache(1, 257, FULL)
    assert cache.k.dtype == jnp.bfloat16
    _, cache = prefill(model16, ids, cache, FULL)
    logits, _ = decode_step(model16, ids[:, -1], cache, FULL)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
