"""Decode-mode perplexity through each attention method on real held-out text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.attention.eviction import SnapKVAttention
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.hashed import HashedAttention
from dashkv_jax.attention.sparse import OracleAttention, StreamingAttention
from dashkv_jax.errors import DashKVError
from dashkv_jax.evaluation.perplexity import decode_perplexity, token_nll
from dashkv_jax.hashing.encoders import HasherConfig, simhash
from dashkv_jax.models.llama import NLL_BLOCK, forward, next_token_nll


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    return next(data.iter_token_windows(docs, tokenizer, 400, concatenate=True))


def test_full_attention_equals_the_plain_forward(smollm2, ids):
    model, _ = smollm2
    logprobs = jax.nn.log_softmax(forward(model, jnp.asarray(ids[None]))[0, :-1], axis=-1)
    per_token = -jnp.take_along_axis(logprobs, jnp.asarray(ids[1:, None]), axis=-1)[:, 0]
    np.testing.assert_allclose(token_nll(model, ids), per_token, atol=2e-4)
    nll = per_token.mean()
    result = decode_perplexity(model, ids)
    assert result["perplexity"] == pytest.approx(float(jnp.exp(nll)), rel=1e-5)
    assert result["tokens"] == 400 and result["approx_tokens"] == 0
    # Position p reads p + 1 tokens: 200.5 on average, K and V of 64 float32 dims each.
    assert result["exact_tokens"] == pytest.approx(200.5)
    assert result["bytes"] == pytest.approx(200.5 * 2 * 64 * 4)


def test_next_token_nll_in_blocks_equals_the_whole_log_softmax():
    rng = np.random.default_rng(0)
    t = 2 * NLL_BLOCK + 77  # two whole blocks and a padded one
    hidden = jnp.asarray(rng.standard_normal((2, t, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, (2, t)), jnp.int32)
    head = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32)
    logits_fn = lambda x: x @ head  # noqa: E731
    logprobs = jax.nn.log_softmax(logits_fn(hidden[:, :-1]), axis=-1)
    want = -jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(next_token_nll(logits_fn, hidden, ids), want, rtol=1e-5, atol=1e-5)


def test_budgets_order_the_methods(smollm2, ids):
    """Covering the context costs nothing; a small budget costs more with recency than oracle."""
    model, _ = smollm2
    full = decode_perplexity(model, ids)["perplexity"]
    covering = decode_perplexity(model, ids, OracleAttention(budget=400))["perplexity"]
    oracle = decode_perplexity(model, ids, OracleAttention(budget=96))["perplexity"]
    streaming = decode_perplexity(model, ids, StreamingAttention(budget=96))["perplexity"]
    per_token = token_nll(model, ids, StreamingAttention(budget=96))
    assert float(np.exp(per_token.mean())) == pytest.approx(streaming, rel=1e-5)
    print(f"full {full:.3f}  oracle@96 {oracle:.3f}  streaming@96 {streaming:.3f}")
    np.testing.assert_allclose(covering, full, rtol=1e-4)
    assert full <= oracle * 1.001 and oracle < streaming


def test_what_each_method_reads(smollm2, ids):
    """Tokens and bytes per KV head and step: the budget in the sparse layers, everything in the
    sandwich's exact ones; DASH-KV adds its codes and tier 2's V (and codes)."""
    model, _ = smollm2
    hasher = simhash(HasherConfig.for_model(model.config, bits=128))
    oracle = decode_perplexity(model, ids, OracleAttention(budget=96, dense_first=2, dense_last=2))
    dashkv = HashedAttention(budget=96, tier2=32, hasher=hasher, dense_first=2, dense_last=2)
    hashed = decode_perplexity(model, ids, dashkv)
    layers = oracle["per_layer"]
    assert (
        layers["exact_tokens"][:2] == [200.5, 200.5] and layers["exact_tokens"][-2:] == [200.5] * 2
    )
    middle = np.asarray(hashed["per_layer"]["exact_tokens"][2:-2])
    # Positions past 96 + 32 = 128 use the whole budget and tier 2; the first ones have less.
    assert (middle < 96).all() and (middle > 70).all()
    assert np.all(np.asarray(hashed["per_layer"]["approx_tokens"][2:-2]) > 10)
    exact, approx = middle[0], hashed["per_layer"]["approx_tokens"][2]
    want = 200.5 * 16 + exact * 2 * 64 * 4 + approx * (64 * 4 + 16)
    assert hashed["per_layer"]["bytes"][2] == pytest.approx(want, rel=1e-4)
    assert hashed["perplexity"] < 1.2 * oracle["perplexity"]


def test_equal_bytes_budgets_read_what_dashkv_reads(smollm2):
    """At 8K tokens DASH-KV (256 exact, 512 in tier 2, 128-bit codes) reads 401,408 bytes per
    step and KV head: 128 KiB of codes, 128 KiB of K and V, 136 KiB of tier 2's V and codes.
    The oracle matches it with 784 tokens (512 bytes each); Quest also reads its pages' bounds
    (512 pages of 512 bytes), leaving room for 272 tokens."""
    from dashkv_jax.attention.methods import equal_bytes_budget, make_attention

    model, _ = smollm2
    hasher = simhash(HasherConfig.for_model(model.config, bits=128))
    dashkv = make_attention("simhash", 256, model, hasher=hasher, tier2=512)
    assert dashkv.step_bytes(256, 512, 8192, 64, 4) == 401_408
    assert equal_bytes_budget("oracle", model, dashkv, 8192) == 784
    assert equal_bytes_budget("quest", model, dashkv, 8192) == 272
    h2o = equal_bytes_budget("h2o", model, dashkv, 8192)
    assert h2o < 784  # its 4-byte score per token counts too


def test_after_a_prompt_full_attention_scores_the_plain_forward(smollm2, ids):
    """Prefilling 300 tokens and decoding the rest scores what the forward pass does there."""
    model, _ = smollm2
    prompt = 300
    result = decode_perplexity(model, ids, prompt=prompt)
    assert (result["prompt"], result["scored"], result["tokens"]) == (prompt, 100, 400)
    per_token = np.asarray(token_nll(model, ids))  # entry p scores ids[p + 1]
    assert result["nll"] == pytest.approx(float(per_token[prompt - 1 :].mean()), rel=1e-4)
    # The steps decoding tokens 300 .. 398 read 301 .. 399 tokens: 350 on average.
    assert result["exact_tokens"] == pytest.approx(350.0)
    assert result["bytes"] == pytest.approx(350.0 * 2 * 64 * 4)


def test_after_a_prompt_snapkv_reads_what_it_kept(smollm2, ids):
    """Teacher-forced, SnapKV keeps every token (its prompt is one token); after a 300-token
    prompt it keeps its budget of it, reads less and scores worse than full attention."""
    model, _ = smollm2
    snapkv = SnapKVAttention(budget=96)
    full = decode_perplexity(model, ids, FullAttention(), prompt=300)
    compressed = decode_perplexity(model, ids, snapkv, prompt=300)
    assert compressed["perplexity"] > full["perplexity"]
    # A sparse layer's step reads the 96 prompt tokens kept and those decoded since (1 .. 99),
    # 146 on average, against full attention's 350.
    assert compressed["exact_tokens"] < 0.6 * full["exact_tokens"]
    assert compressed["bytes"] < 0.6 * full["bytes"]
    teacher_forced = decode_perplexity(model, ids, snapkv)
    assert teacher_forced["perplexity"] == pytest.approx(
        decode_perplexity(model, ids)["perplexity"], rel=1e-4
    )
    with pytest.raises(DashKVError, match="leaves nothing to decode"):
        decode_perplexity(model, ids, snapkv, prompt=399)
