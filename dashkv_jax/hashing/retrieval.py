"""How well a hasher's scores find the keys exact attention needs, on captured q and k.

For one (query position, layer, KV head), with a budget of k keys and C >= k candidates:

- O: the oracle top-k eligible keys by the group's exact attention (`capture.group_attention`:
  the sum over the KV group's query heads of softmax over the eligible keys).
- candidates: the top C eligible keys by hashed score (ties toward the lower index, as
  `lax.top_k` and the selection kernel break them).
- S: the top k of the candidates after exact re-ranking by the same group attention.

top-k recall = |O ∩ candidates| / k. The candidates are re-ranked exactly afterwards, so this
bounds the quality of the selection.
IoU = |S ∩ O| / |S ∪ O|.
attention-mass recall = (attention mass on S) / (attention mass on O), both in the group
attention over the eligible keys.

Every figure is averaged over query positions, layers and KV heads (and windows). Sinks and the
recent window are always attended, so they are neither in O nor candidates (see `capture`).
Training reports these on held-out windows; `dashkv_jax.evaluation.recall` adds the non-hashed
baselines and the command's report.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.capture import Captured, eligible_mask, group_attention
from dashkv_jax.hashing.encoders import Hasher, group_scores

Array = jax.Array
METRICS = ("topk_recall", "iou", "mass_recall")
# scorer(hasher, layer, queries [Q, Hq, D], keys [T, Hkv, D]) -> scores [Hkv, Q, T]
Scorer = Callable[[Hasher, Array, Array, Array], Array]


def hamming_scorer(hasher: Hasher, layer, queries: Array, keys: Array) -> Array:
    return group_scores(hasher, queries, hasher.encode_keys(keys, layer), layer, "hamming")


def asymmetric_scorer(hasher: Hasher, layer, queries: Array, keys: Array) -> Array:
    return group_scores(hasher, queries, hasher.encode_keys(keys, layer), layer, "asymmetric")


SCORERS: dict[str, Scorer] = {"hamming": hamming_scorer, "asymmetric": asymmetric_scorer}


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


@functools.partial(nnx.jit, static_argnames=("scorer", "k", "candidates", "sinks", "window"))
def _context_metrics(
    hasher: Hasher,
    keys: Array,  # [L, T, Hkv, D]
    queries: Array,  # [Q, L, Hq, D]
    positions: Array,  # [Q]
    *,
    scorer: Scorer,
    k: int,
    candidates: int,
    sinks: int,
    window: int,
) -> Array:  # [L, 3] metrics averaged over queries and KV heads
    eligible = eligible_mask(positions, keys.shape[1], sinks, window)  # [Q, T]

    def one_layer(xs):
        layer, k_layer, q_layer = xs  # [], [T, Hkv, D], [Q, Hq, D]
        probs, _ = group_attention(q_layer[None], k_layer[None], eligible)  # [1, Hkv, Q, T]
        scores = scorer(hasher, layer, q_layer, k_layer)  # [Hkv, Q, T]
        metrics = selection_metrics(
            probs[0], scores, eligible[None], k=k, candidates=candidates
        )  # [Hkv, Q, 3]
        return jnp.mean(metrics, axis=(0, 1))

    layers = jnp.arange(keys.shape[0])
    return jax.lax.map(one_layer, (layers, keys, queries.transpose(1, 0, 2, 3)))


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
    scoring: str | Scorer | None = None,
    sinks: int = 4,
    window: int = 64,
    max_queries: int | None = None,
) -> dict:
    """Metrics of `hasher` on captured windows, averaged over windows, queries, layers, heads.

    Args:
      hasher: any kind.
      scoring: "hamming" or "asymmetric" (default: the hasher's config), or a `Scorer` (a
        module-level function, so that jit caches it) for a method that is not a hasher.
      captured: keys and sampled queries (`capture.capture`).
      k, candidates: the budget and the number of hashed candidates.
      max_queries: use only the first queries of each window (faster periodic evaluation).

    Returns:
      {"topk_recall": float, "iou": float, "mass_recall": float, "per_layer": {name: [L]}}.
    """
    scoring = scoring or hasher.config.scoring
    scorer = SCORERS[scoring] if isinstance(scoring, str) else scoring
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
                scorer=scorer,
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


def compare_hashers(
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
    """{method: metrics} for SimHash with the same bits, the symmetric hasher if given, and
    `hasher` in hamming and (asymmetric kind) asymmetric scoring."""
    from dashkv_jax.hashing.encoders import simhash

    reference = hasher or symmetric
    if reference is None:
        raise DashKVError("compare_hashers needs a hasher or a symmetric hasher")
    if symmetric is not None and hasher is not None and symmetric.config.bits != hasher.config.bits:
        raise DashKVError(
            f"compare at equal bits: the hasher has {hasher.config.bits}, the symmetric one "
            f"{symmetric.config.bits}"
        )
    evaluate_all = functools.partial(
        evaluate, captured=captured, k=k, candidates=candidates, sinks=sinks, window=window
    )
    methods = {"simhash": evaluate_all(simhash(reference.config, seed))}
    if symmetric is not None:
        methods[f"{symmetric.config.kind}-hamming"] = evaluate_all(symmetric, scoring="hamming")
    if hasher is not None:
        scorings = ("hamming", "asymmetric") if hasher.config.kind == "asymmetric" else ("hamming",)
        for scoring in scorings:
            methods[f"{hasher.config.kind}-{scoring}"] = evaluate_all(hasher, scoring=scoring)
    return methods
