"""How well hashed scores find the keys exact attention needs: recall, IoU, attention mass.

For one (query position, layer, KV head), with a budget of k keys and C >= k candidates:

- O: the oracle top-k eligible keys by the group's exact attention (`capture.group_attention`:
  the sum over the KV group's query heads of softmax over the eligible keys).
- candidates: the top C eligible keys by hashed score (ties toward the lower index, as
  `lax.top_k` and the selection kernel break them).
- S: the top k of the candidates after exact re-ranking by the same group attention.

top-k recall = |O ∩ candidates| / k. The candidates are re-ranked exactly afterwards, so this
bounds the quality of the selection.

Quest, the page-bound baseline, is scored the same way with `scoring="quest"`: each key gets its
page's upper bound of q.k (pages of 16, the best query head of the group) and the candidates are
its final choice (C = k, no exact re-ranking), as `sparse.QuestAttention` decodes.
IoU = |S ∩ O| / |S ∪ O|.
attention-mass recall = (attention mass on S) / (attention mass on O), both in the group
attention over the eligible keys.

Every figure is averaged over query positions, layers and KV heads (and windows). Sinks and the
recent window are always attended, so they are neither in O nor candidates (see `capture`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.attention.sparse import page_bound
from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.capture import Captured, eligible_mask, group_attention
from dashkv_jax.hashing.encoders import Hasher, group_scores

Array = jax.Array
METRICS = ("topk_recall", "iou", "mass_recall")
QUEST_PAGE = 16


def _membership(indices: Array, n: int) -> Array:
    """indices [R, m] -> [R, n] bool, True at each row's indices."""
    rows = jnp.arange(indices.shape[0])[:, None]
    return jnp.zeros((indices.shape[0], n), bool).at[rows, indices].set(True)


def selection_metrics(
    probs: Array,  # [..., T] group attention, 0 on ineligible keys
    scores: Array,  # [..., T] hashed scores
    eligible: Array,  # [..., T] bool (broadcastable)
    *,
    k: int,
    candidates: int,
) -> Array:  # [..., 3]: top-k recall, IoU, attention-mass recall per row
    """The three metrics (module docstring) for every row of scores."""
    *batch, n = probs.shape
    eligible = jnp.broadcast_to(eligible, probs.shape).reshape(-1, n)
    probs = probs.reshape(-1, n)
    ranked = jnp.where(eligible, probs, -1.0)  # ineligible keys never enter O or S
    hashed = jnp.where(eligible, scores.reshape(-1, n), -jnp.inf)
    _, oracle = jax.lax.top_k(ranked, k)  # [R, k]
    _, cand = jax.lax.top_k(hashed, candidates)  # [R, C]
    _, best = jax.lax.top_k(jnp.take_along_axis(ranked, cand, axis=1), k)
    chosen = jnp.take_along_axis(cand, best, axis=1)  # [R, k] S
    in_oracle = _membership(oracle, n)
    found = jnp.sum(in_oracle & _membership(cand, n), axis=1)
    overlap = jnp.sum(in_oracle & _membership(chosen, n), axis=1)
    mass_chosen = jnp.sum(jnp.take_along_axis(probs, chosen, axis=1), axis=1)
    mass_oracle = jnp.sum(jnp.take_along_axis(probs, oracle, axis=1), axis=1)
    metrics = jnp.stack(
        [found / k, overlap / (2 * k - overlap), mass_chosen / jnp.maximum(mass_oracle, 1e-30)],
        axis=-1,
    )
    return metrics.reshape(*batch, 3)


@functools.partial(nnx.jit, static_argnames=("scoring", "k", "candidates", "sinks", "window"))
def _context_metrics(
    hasher: Hasher,
    keys: Array,  # [L, T, Hkv, D]
    queries: Array,  # [Q, L, Hq, D]
    positions: Array,  # [Q]
    *,
    scoring: str,
    k: int,
    candidates: int,
    sinks: int,
    window: int,
) -> Array:  # [L, 3] metrics averaged over queries and KV heads
    eligible = eligible_mask(positions, keys.shape[1], sinks, window)  # [Q, T]

    def one_layer(xs):
        layer, k_layer, q_layer = xs  # [], [T, Hkv, D], [Q, Hq, D]
        probs, _ = group_attention(q_layer[None], k_layer[None], eligible)  # [1, Hkv, Q, T]
        if scoring == "quest":
            scores = quest_bounds(q_layer, k_layer)
        else:
            codes = hasher.encode_keys(k_layer, layer)
            scores = group_scores(hasher, q_layer, codes, layer, scoring)
        metrics = selection_metrics(
            probs[0], scores, eligible[None], k=k, candidates=candidates
        )  # [Hkv, Q, 3]
        return jnp.mean(metrics, axis=(0, 1))

    layers = jnp.arange(keys.shape[0])
    return jax.lax.map(one_layer, (layers, keys, queries.transpose(1, 0, 2, 3)))


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


def check_budget(captured: Captured, k: int, candidates: int, sinks: int, window: int) -> None:
    """Raises DashKVError unless 1 <= k <= candidates <= the fewest eligible keys of a query."""
    fewest = int(captured.positions.min()) - window - sinks + 1
    if not 1 <= k <= candidates <= fewest:
        raise DashKVError(
            f"need 1 <= budget ({k}) <= candidates ({candidates}) <= eligible keys of the "
            f"earliest query ({fewest}); use a longer context or smaller fractions"
        )


def evaluate(
    hasher: Hasher,
    captured: Captured,
    *,
    k: int,
    candidates: int,
    scoring: str | None = None,
    sinks: int = 4,
    window: int = 64,
    max_queries: int | None = None,
) -> dict:
    """Metrics of `hasher` on captured windows, averaged over windows, queries, layers, heads.

    Args:
      hasher: any kind; `scoring` defaults to its config's scoring mode.
      captured: keys and sampled queries (`capture.capture`).
      k, candidates: the budget and the number of hashed candidates.
      max_queries: use only the first queries of each window (faster periodic evaluation).

    Returns:
      {"topk_recall": float, "iou": float, "mass_recall": float, "per_layer": {name: [L]}}.
    """
    scoring = scoring or hasher.config.scoring
    candidates = k if scoring == "quest" else candidates  # Quest's pages are its final choice
    check_budget(captured, k, candidates, sinks, window)
    per_context = []
    for keys, queries, positions in zip(
        captured.keys, captured.queries, captured.positions, strict=True
    ):
        if max_queries is not None:
            step = max(1, len(positions) // max_queries)
            queries, positions = queries[::step][:max_queries], positions[::step][:max_queries]
        per_context.append(
            _context_metrics(
                hasher,
                jnp.asarray(keys),
                jnp.asarray(queries),
                jnp.asarray(positions),
                scoring=scoring,
                k=k,
                candidates=candidates,
                sinks=sinks,
                window=window,
            )
        )
    per_layer = np.mean(np.stack([np.asarray(m) for m in per_context]), axis=0)  # [L, 3]
    result = {name: float(per_layer[:, i].mean()) for i, name in enumerate(METRICS)}
    result["per_layer"] = {
        name: per_layer[:, i].round(4).tolist() for i, name in enumerate(METRICS)
    }
    return result


@dataclasses.dataclass(slots=True, frozen=True)
class Budget:
    """A budget and a candidate count as fractions of the context."""

    budget: float = 1 / 32
    candidates: float = 1 / 8

    def sizes(self, context: int) -> tuple[int, int]:
        """(k, C) for a context of `context` tokens."""
        return max(1, round(self.budget * context)), max(1, round(self.candidates * context))


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
    """{method: metrics} for Quest, SimHash with the same bits, the symmetric hasher if given,
    and `hasher` in hamming and (asymmetric kind) asymmetric scoring."""
    from dashkv_jax.hashing.encoders import simhash

    reference = hasher or symmetric
    if reference is None:
        raise DashKVError("compare_methods needs a hasher or a symmetric hasher")
    if symmetric is not None and hasher is not None and symmetric.config.bits != hasher.config.bits:
        raise DashKVError(
            f"compare at equal bits: the hasher has {hasher.config.bits}, the symmetric one "
            f"{symmetric.config.bits}"
        )
    evaluate_all = functools.partial(
        evaluate, captured=captured, k=k, candidates=candidates, sinks=sinks, window=window
    )
    methods = {
        "quest": evaluate_all(reference, scoring="quest"),
        "simhash": evaluate_all(simhash(reference.config, seed)),
    }
    if symmetric is not None:
        methods[f"{symmetric.config.kind}-hamming"] = evaluate_all(symmetric, scoring="hamming")
    if hasher is not None:
        scorings = ("hamming", "asymmetric") if hasher.config.kind == "asymmetric" else ("hamming",)
        for scoring in scorings:
            methods[f"{hasher.config.kind}-{scoring}"] = evaluate_all(hasher, scoring=scoring)
    return methods


def recall_report(
    model,
    tokenizer,
    text: str,
    *,
    hasher,
    symmetric=None,
    context: int = 1024,
    budget: Budget = Budget(),
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
