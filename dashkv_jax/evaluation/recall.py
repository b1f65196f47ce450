"""Retrieval fidelity of every selection method, and the `dashkv recall` report.

The metrics (top-k recall, IoU, attention-mass recall) are defined in
`dashkv_jax.hashing.retrieval`, which scores hashers; this module adds Quest, the page-bound
baseline, scored the same way: each key gets its page's upper bound of q.k (pages of 16, the
best query head of the group) and the candidates are its final choice (C = k, no exact
re-ranking), as `attention.sparse.QuestAttention` decodes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dashkv_jax.attention.sparse import page_bound
from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.capture import Captured
from dashkv_jax.hashing.encoders import Hasher
from dashkv_jax.hashing.retrieval import METRICS, Budget, compare_hashers, evaluate

Array = jax.Array
QUEST_PAGE = 16


def quest_bounds(queries: Array, keys: Array, page: int = QUEST_PAGE) -> Array:
    """Quest's score of every key: its page's upper bound of q.k, the best query head of the
    KV group. queries [Q, Hq, D], keys [T, Hkv, D] -> [Hkv, Q, T]."""
    t, hkv, d = keys.shape
    pages = -(-t // page)
    padded = jnp.pad(keys, ((0, pages * page - t), (0, 0), (0, 0)), mode="edge")
    paged = padded.reshape(pages, page, hkv, d)
    upper, lower = paged.max(axis=1).transpose(1, 0, 2), paged.min(axis=1).transpose(1, 0, 2)
    qg = queries.reshape(queries.shape[0], hkv, -1, d)  # [Q, Hkv, G, D]
    bound = page_bound(qg, upper, lower)  # [Q, Hkv, P] (the pages [Hkv, P, D] broadcast)
    return jnp.repeat(bound, page, axis=-1)[..., :t].transpose(1, 0, 2)


def quest_scorer(hasher, layer, queries: Array, keys: Array) -> Array:
    """`retrieval.Scorer` of Quest (the hasher is not used)."""
    return quest_bounds(queries, keys)


def compare_methods(
    captured: Captured,
    hasher: Hasher | None,
    *,
    k: int,
    candidates: int,
    symmetric: Hasher | None = None,
    sinks: int = 4,
    window: int = 64,
    seed: int = 0,
) -> dict:
    """{method: metrics} for Quest (its pages are its final choice: C = k) and every hashed
    method `retrieval.compare_hashers` compares."""
    reference = hasher or symmetric
    if reference is None:
        raise DashKVError("compare_methods needs a hasher or a symmetric hasher")
    quest = evaluate(
        reference, captured, k=k, candidates=k, scoring=quest_scorer, sinks=sinks, window=window
    )
    hashed = compare_hashers(
        captured,
        hasher,
        k=k,
        candidates=candidates,
        symmetric=symmetric,
        sinks=sinks,
        window=window,
        seed=seed,
    )
    return {"quest": quest, **hashed}


def recall_report(
    model,
    tokenizer,
    text: str,
    *,
    hasher,
    symmetric=None,
    context: int = 1024,
    budget: Budget | None = None,
    queries: int = 128,
    min_position: float = 0.5,
    sinks: int = 4,
    window: int = 64,
    seed: int = 0,
) -> dict:
    """Runs the model over the first `context` tokens of `text` and compares the methods.

    `hasher` and `symmetric` are artifact folders (validated against the model) or Hashers.
    Returns a JSON-ready dict: the settings and, per method, the three metrics.
    """
    budget = budget or Budget()
    from dashkv_jax.hashing.artifact import load_hasher
    from dashkv_jax.hashing.capture import CaptureConfig, capture_ids, sample_positions

    def as_hasher(h):
        return h if h is None or isinstance(h, Hasher) else load_hasher(h, model)

    hasher, symmetric = as_hasher(hasher), as_hasher(symmetric)
    bos = model.config.bos_token_id
    ids = ([] if bos is None else [bos]) + tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < context:
        raise DashKVError(
            f"the text has {len(ids)} tokens, fewer than the context of {context}: give a "
            "longer text or a smaller --context"
        )
    if context > model.config.max_position:
        raise DashKVError(
            f"context {context} exceeds the model's context of {model.config.max_position}"
        )
    config = CaptureConfig(
        split="text",
        context=context,
        contexts=1,
        queries_per_context=min(queries, context - int(min_position * context)),
        min_position=min_position,
        sinks=sinks,
        window=window,
        seed=seed,
    )
    positions = sample_positions(config, 0)
    keys, sampled = capture_ids(model, np.asarray(ids[:context], np.int32), positions)
    captured = Captured(keys[None], sampled[None], positions[None])
    k, candidates = budget.sizes(context)
    methods = compare_methods(
        captured,
        hasher,
        symmetric=symmetric,
        k=k,
        candidates=candidates,
        sinks=sinks,
        window=window,
        seed=seed,
    )
    reference = hasher or symmetric
    return {
        "model": model.config.name,
        "context": context,
        "k": k,
        "candidates": candidates,
        "queries": len(positions),
        "bits": reference.config.bits,
        "sinks": sinks,
        "window": window,
        "methods": {
            name: {metric: round(m[metric], 4) for metric in METRICS} for name, m in methods.items()
        },
    }


def format_report(report: dict) -> str:
    """A plain-text table of `recall_report`'s result."""
    rows = [
        f"context {report['context']}, budget k={report['k']}, candidates C={report['candidates']}"
        f", {report['bits']} bits, {report['queries']} query positions",
        f"{'method':<24} {'top-k recall':>12} {'IoU':>7} {'mass recall':>12}",
    ]
    for name, m in report["methods"].items():
        rows.append(
            f"{name:<24} {m['topk_recall']:>12.4f} {m['iou']:>7.4f} {m['mass_recall']:>12.4f}"
        )
    return "\n".join(rows)
