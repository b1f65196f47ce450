"""Decode-mode perplexity through each attention method on real held-out text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.attention.sparse import OracleAttention, StreamingAttention
from dashkv_jax.evaluation.perplexity import decode_perplexity
from dashkv_jax.models.llama import forward


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    return next(data.iter_token_windows(docs, tokenizer, 400, concatenate=True))


def test_full_attention_equals_the_plain_forward(smollm2, ids):
    model, _ = smollm2
    logprobs = jax.nn.log_softmax(forward(model, jnp.asarray(ids[None]))[0, :-1], axis=-1)
    nll = -jnp.take_along_axis(logprobs, jnp.asarray(ids[1:, None]), axis=-1).mean()
    result = decode_perplexity(model, ids)
    assert result["perplexity"] == pytest.approx(float(jnp.exp(nll)), rel=1e-5)
    assert result["tokens"] == 400 and result["mean_attended"] is None


def test_budgets_order_the_methods(smollm2, ids):
    """Covering the context costs nothing; a small budget costs more with recency than oracle."""
    model, _ = smollm2
    full = decode_perplexity(model, ids)["perplexity"]
    covering = decode_perplexity(model, ids, OracleAttention(budget=400))["perplexity"]
    oracle = decode_perplexity(model, ids, OracleAttention(budget=96))["perplexity"]
    streaming = decode_perplexity(model, ids, StreamingAttention(budget=96))["perplexity"]
    print(f"full {full:.3f}  oracle@96 {oracle:.3f}  streaming@96 {streaming:.3f}")
    np.testing.assert_allclose(covering, full, rtol=1e-4)
    assert full <= oracle * 1.001 and oracle < streaming
