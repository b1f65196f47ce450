"""DASH-KV on the real model at a 4K-token context, against full attention.

Both methods decode from one prefilled cache: prefill is full causal attention either way
(DASH-KV only adds the key codes), so the difference is all in the decode steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.methods import make_methods
from dashkv_jax.evaluation import synthetic
from dashkv_jax.models.llama import decode_step, prefill
from dashkv_jax.models.tokenizer import render_chat

CONTEXT = 4096
NEW_TOKENS = 32


def dashkv(model, budget="1/16"):
    """The shipped DASH-KV at an exact `budget` of the 4K context, tier 2 at its default."""
    (attention,) = make_methods(model, ["dashkv"], CONTEXT, budget).values()
    return attention


def greedy_both(model, ids, attention, steps: int) -> tuple[list[int], list[int], float]:
    """Greedy tokens after prompt ids [T] with full attention and with `attention`, and the
    mean exact tokens `attention` read per KV head in its sparse layers at the last step."""
    cache = model.init_cache(1, len(ids) + steps, attention)
    logits, cache = prefill(model, jnp.asarray(ids, jnp.int32)[None], cache, attention)
    caches = {"full": jax.tree.map(jnp.copy, cache), "sparse": cache}
    methods = {"full": FullAttention(), "sparse": attention}
    tokens = {name: [int(jnp.argmax(logits[0]))] for name in methods}
    for _ in range(steps - 1):
        for name, method in methods.items():
            step_logits, caches[name] = decode_step(
                model, jnp.asarray(tokens[name][-1:]), caches[name], method
            )
            tokens[name].append(int(jnp.argmax(step_logits[0])))
    layers = caches["sparse"].usage.shape[0]
    usage = caches["sparse"].usage[attention.dense_first : layers - attention.dense_last, ..., 0]
    return tokens["full"], tokens["sparse"], float(usage.mean())


@pytest.fixture(scope="module")
def prompts(smollm2):
    """Five real prompts: held-out Wikipedia windows of 4064 tokens (+ 32 generated = 4K)."""
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    windows = data.iter_token_windows(docs, tokenizer, CONTEXT - NEW_TOKENS, concatenate=True)
    return [next(windows) for _ in range(5)]


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens two greedy continuations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def test_dashkv_continues_real_text_like_full_attention(smollm2, prompts):
    model, tokenizer = smollm2
    attention = dashkv(model)
    agreed, spent = [], []
    for ids in prompts:
        full, sparse, attended = greedy_both(model, ids, attention, NEW_TOKENS)
        agreed.append(agreement(full, sparse))
        spent.append(attended)
        print(f"agree={agreed[-1]} attended={attended:.0f}: {tokenizer.decode(sparse)!r}")
    # Measured on this machine: X of 5 prompts give the same 32 greedy tokens.
    assert sum(a == NEW_TOKENS for a in agreed) >= 1, agreed
    assert all(s == 256 for s in spent), spent  # the exact budget, every step


@pytest.fixture(scope="module")
def haystack(smollm2):
    return synthetic.Haystack(smollm2[1])


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_dashkv_finds_a_passkey_whenever_full_attention_does(smollm2, haystack, depth):
    model, tokenizer = smollm2
    sample = synthetic.passkey(haystack, CONTEXT - 64, depth, seed=1)
    chat = render_chat(model.chat_template, [{"role": "user", "content": sample.prompt}])
    ids = np.asarray(tokenizer.encode(chat).ids)
    full, sparse, _ = greedy_both(model, ids, dashkv(model), 12)
    answers = {name: tokenizer.decode(t) for name, t in (("full", full), ("dashkv", sparse))}
    print(depth, sample.answers, answers)
    found = {name: synthetic.score(sample, text) for name, text in answers.items()}
    # Measured: full attention finds the key at every depth here; DASH-KV too.
    assert found["full"] == 1.0, answers
    assert found["dashkv"] >= found["full"], answers
