"""Decode-mode perplexity: every position of a text attends through an attention method.

Teacher-forced in one pass (`SparseAttention(teacher_forced=True)`), which computes exactly what
token-by-token decoding would (tests/test_sparse.py checks it), at the cost of one prefill. The
result says what the method used: exact and approximate tokens per KV head and step and the
bytes a step reads per KV head (`step_bytes`), each the mean over positions and layers, so that
methods are compared by what they cost as well as by what they lose.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.attention.eviction import EvictionAttention
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.sparse import SparseAttention
from dashkv_jax.errors import DashKVError
from dashkv_jax.evaluation.recall import text_window
from dashkv_jax.models.causal import Attention
from dashkv_jax.models.llama import Llama, prefill


def decode_perplexity(
    model: Llama, ids: np.ndarray, attention: Attention | None = None, *, prompt: int = 0
) -> dict:
    """ids [T] int32 -> {"perplexity", "nll", "tokens", "exact_tokens", "approx_tokens",
    "bytes", "per_layer"} under `attention` (full attention by default).

    exact_tokens, approx_tokens and bytes are means per KV head and step over positions and
    every layer (the sandwich's exact layers included); per_layer holds each layer's. With a
    `prompt`, only the tokens after the first `prompt` are scored (`prompted_perplexity`).
    """
    attention = attention or FullAttention()
    if prompt:
        return prompted_perplexity(model, ids, attention, prompt)
    if isinstance(attention, EvictionAttention):  # no one-pass teacher forcing: step by step
        return eviction_perplexity(model, ids, attention)
    t = len(ids)
    nll, cache = _teacher_forced(model, ids, attention)
    visible = (t + 1) / 2  # position p sees p + 1 tokens
    usage = getattr(cache, "usage", None)
    if usage is None:  # full attention: every visible token, exactly
        usage = np.tile([visible, 0.0], (model.config.num_layers, 1))
    else:
        usage = np.asarray(usage).mean(axis=(1, 2))  # [L, 2] over batch and KV heads
    return _figures(model, attention, cache, nll, usage, visible, tokens=t)


def token_nll(model: Llama, ids: np.ndarray, attention: Attention | None = None) -> np.ndarray:
    """ids [T] -> [T - 1]: the negative log-likelihood of each next token under `attention`
    (entry p scores ids[p + 1] from the positions up to p), what `decode_perplexity` averages."""
    attention = attention or FullAttention()
    if isinstance(attention, EvictionAttention):  # step by step, as `eviction_perplexity`
        return np.asarray(_stepwise(model, ids, attention)[0][:, 0])
    return np.asarray(_teacher_forced(model, ids, attention)[0])


def _teacher_forced(model, ids, attention):
    """One prefill in which every position attends through `attention` -> (nll [T - 1], cache)."""
    if isinstance(attention, SparseAttention):
        attention = dataclasses.replace(attention, teacher_forced=True)
    ids = jnp.asarray(ids, jnp.int32)[None]
    cache = model.init_cache(1, ids.shape[1], attention)
    nll, cache = prefill(model, ids, cache, attention, nll=True)
    return nll[0], cache


def layer_bytes(attention, exact, approx, n_tokens, config, dtype) -> np.ndarray:
    """Bytes each layer reads per KV head for a step that used `exact` and `approx` [L] tokens
    over a cache of `n_tokens`: the method's cost in its sparse layers, full attention's in the
    sandwich's exact ones."""
    layers = np.arange(config.num_layers)
    itemsize, d = jnp.dtype(dtype).itemsize, config.head_dim
    dense = np.ones(config.num_layers, bool)
    if isinstance(attention, SparseAttention | EvictionAttention):
        dense = np.asarray(attention.is_dense(layers, config.num_layers))
    full = FullAttention().step_bytes(exact, approx, n_tokens, d, itemsize)
    sparse = attention.step_bytes(exact, approx, n_tokens, d, itemsize)
    return np.where(dense, full, sparse).astype(np.float64)


# -- eviction methods: one decode step per position ---------------------------------------------


def eviction_perplexity(model: Llama, ids: np.ndarray, attention: EvictionAttention) -> dict:
    """`decode_perplexity` of an eviction method, plus "cache_bytes" and "full_cache_bytes"
    (its cache at the end, and a full one of the same context).

    No one-pass teacher forcing here: what the cache holds at position p depends on every
    eviction before p. The first token is prefilled and each later one decoded, one
    `decode_step` per position in a `lax.scan`. SnapKV compresses only a prompt, so after a
    one-token prompt it appends every token and equals full attention.
    """
    t = len(ids)
    nll, usage, cache = _stepwise(model, ids, attention)
    # Position 0 (the prompt) reads itself in every layer; each later one what usage says.
    usage = (np.asarray(usage).mean(axis=(2, 3)).sum(axis=0) + [1.0, 0.0]) / t  # [L, 2]
    return _figures(model, attention, cache, nll, usage, (t + 1) / 2, tokens=t)


def prompted_perplexity(model: Llama, ids: np.ndarray, attention: Attention, prompt: int) -> dict:
    """`decode_perplexity` of the tokens after a prompt, as generation meets them: ids[:prompt]
    prefilled the way each method prefills a prompt (SnapKV keeps the tokens its observation
    window votes for, H2O and HashEvict evict down to their budget, the others keep it all),
    then ids[prompt:] scored, each decode step reading what the method kept. The one protocol
    under which SnapKV differs from full attention. Token and byte counts are means over the
    decode steps whose logits are scored (the first token after the prompt is scored from the
    prefill's). Adds "prompt" and "scored" (token counts) to the result."""
    t = len(ids)
    if not 1 <= prompt <= t - 2:
        raise DashKVError(f"a prompt of {prompt} tokens leaves nothing to decode in {t} tokens")
    nll, usage, cache = _stepwise(model, ids, attention, prompt)
    steps = t - 1 - prompt  # decode steps whose logits are scored: tokens prompt .. t - 2
    visible = prompt + 1 + (steps - 1) / 2  # the step decoding token p reads p + 1 tokens
    if usage is None:  # full attention: every visible token, exactly
        usage = np.tile([visible, 0.0], (model.config.num_layers, 1))
    else:
        usage = np.asarray(usage)[:steps].mean(axis=(0, 2, 3))  # [L, 2]
    return _figures(
        model, attention, cache, nll, usage, visible, tokens=t, prompt=prompt, scored=t - prompt
    )


def _figures(model, attention, cache, nll, usage, visible, **counts) -> dict:
    """A run's result: nll of the scored tokens, usage [L, 2] (exact and approximate tokens per
    KV head and step, means over the steps) of steps that saw `visible` tokens on average;
    `counts` (tokens, ...) and an eviction cache's sizes go in as they are."""
    exact, approx = usage[:, 0], usage[:, 1]
    step_bytes = layer_bytes(attention, exact, approx, visible, model.config, cache.k.dtype)
    nll = float(np.mean(nll))
    sizes = ("cache_bytes", "full_cache_bytes")
    return {
        "perplexity": float(np.exp(nll)),
        "nll": nll,
        **counts,
        "exact_tokens": float(exact.mean()),
        "approx_tokens": float(approx.mean()),
        "bytes": float(step_bytes.mean()),
        **{size: getattr(cache, size) for size in sizes if hasattr(cache, size)},
        "per_layer": {
            "exact_tokens": exact.round(2).tolist(),
            "approx_tokens": approx.round(2).tolist(),
            "bytes": step_bytes.round(1).tolist(),
        },
    }


def _stepwise(model, ids, attention, prompt: int = 1):
    """ids [T]: the first `prompt` tokens prefilled, each later one decoded, with room to append
    them all -> `_decode_each_position`'s (nll [T - prompt, 1], usage or None, cache)."""
    if isinstance(attention, EvictionAttention):
        attention = attention.appending(len(ids) - prompt)
    cache = model.init_cache(1, len(ids), attention)
    ids = jnp.asarray(ids, jnp.int32)[None]
    return _decode_each_position(model, ids[:, :prompt], ids[:, prompt:], cache, attention)


@functools.partial(nnx.jit, graph_updates=False, donate_argnames="cache")
def _decode_each_position(model, prompt, rest, cache, attention):
    """Prefill prompt [B, P], then score and decode rest [B, R] one by one -> (nll of each of
    rest's tokens [R, B], usage of each decode step [R, L, B, Hkv, 2] (None for a cache that
    keeps none: full attention's), the final cache)."""
    logits, cache = model.prefill(prompt, cache, attention)

    def step(carry, token):  # token [B]: scored by the logits before it, then decoded
        logits, cache = carry
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        logits, cache = model.decode_step(token, cache, attention)
        return (logits, cache), (nll, getattr(cache, "usage", None))

    (_, cache), (nll, usage) = jax.lax.scan(step, (logits, cache), rest.T)
    return nll, usage, cache


def perplexity_report(
    model,
    tokenizer,
    text: str,
    *,
    methods=("full", "simhash", "dashkv"),
    context: int = 4096,
    budget: str = "1/32",
    tier2: str | None = None,
    hasher=None,
    symmetric=None,
    options: dict | None = None,
    equal_bytes: bool = False,
    prompt: int = 0,
) -> dict:
    """Decode-mode perplexity of the first `context` tokens of `text` through each method (see
    `attention.methods.make_methods` for the settings, `equal_bytes` among them) -> a
    JSON-ready dict: the settings and, per method, `decode_perplexity`'s figures and its token
    budget. `prompt` > 0 scores only the tokens after a prompt of that many
    (`prompted_perplexity`)."""
    from dashkv_jax.attention.methods import make_methods, parse_budget

    ids = text_window(model, tokenizer, text, context)
    attentions = make_methods(
        model, methods, context, budget, tier2, hasher, symmetric, options, equal_bytes
    )
    window = np.asarray(ids[:context], np.int32)
    results = {
        name: {
            **decode_perplexity(model, window, a, prompt=prompt),
            "budget": getattr(a, "budget", None),
        }
        for name, a in attentions.items()
    }
    budgeted = [a for a in attentions.values() if hasattr(a, "budget")]
    return {
        "model": model.config.name,
        "context": context,
        "prompt": prompt,
        "equal_bytes": equal_bytes,
        # The exact budget asked for; with equal_bytes the others' own are under "methods".
        "budget": parse_budget(budget, context) if budgeted else None,
        "tier2": max((getattr(a, "tier2", 0) for a in budgeted), default=0),
        "methods": results,
    }


def format_report(report: dict) -> str:
    """A plain-text table of `perplexity_report`'s result."""
    scored = (
        "positions"
        if not report.get("prompt")
        else f"steps after a {report['prompt']}-token prompt"
    )
    rows = [
        f"context {report['context']}, exact budget {report['budget']}, tier 2 {report['tier2']}"
        f", means per KV head and step over {scored} and layers",
        f"{'method':<18} {'budget':>7} {'perplexity':>10} {'exact':>8} {'approx':>8} {'bytes':>10}",
    ]
    for name, m in report["methods"].items():
        budget = "all" if m["budget"] is None else str(m["budget"])
        rows.append(
            f"{name:<18} {budget:>7} {m['perplexity']:>10.3f} {m['exact_tokens']:>8.1f}"
            f" {m['approx_tokens']:>8.1f} {m['bytes']:>10.0f}"
        )
    return "\n".join(rows)
