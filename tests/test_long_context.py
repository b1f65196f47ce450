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


def dashkv(model, budget="1/16", method="dashkv"):
    """The shipped DASH-KV (or another budget `method`) at an exact `budget` of the 4K context,
    tier 2 at the hasher's default."""
    (attention,) = make_methods(model, [method], CONTEXT, budget).values()
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


def test_dashkv_continues_real_text_closer_to_full_attention_than_streaming(smollm2, prompts):
    """Greedy continuations of five held-out prompts: how many tokens each method shares with
    full attention before the first difference, DASH-KV against StreamingLLM (sinks + recent
    window) at the same exact budget."""
    model, tokenizer = smollm2
    agreed, spent = {"dashkv": [], "streaming": []}, []
    for method in agreed:
        attention = dashkv(model, method=method)
        for ids in prompts:
            full, sparse, attended = greedy_both(model, ids, attention, NEW_TOKENS)
            agreed[method].append(agreement(full, sparse))
            spent.append(attended)
            print(f"{method} agree={agreed[method][-1]}: {tokenizer.decode(sparse)!r}")
    # Not all 32 tokens: a 135M model's greedy text flips at near-ties (before tier 2 and the
    # RoPE shift DASH-KV kept all 32 on 1 of 5 prompts). Closer than the window alone, though.
    assert sum(agreed["dashkv"]) > sum(agreed["streaming"]), agreed
    assert all(s == 256 for s in spent), spent  # the exact budget, every step


@pytest.fixture(scope="module")
def haystack(smollm2):
    return synthetic.Haystack(smollm2[1])


# The hasher trained on the paper's reverse KL answered "2761" for 27611 at depth 0.5 (it missed
# the key an induction head copies from); the forward-KL one finds all three.
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
