"""How well a hasher's raw distances find the keys exact attention needs, on captured q and k.

The hashing-level check that training reports on held-out windows (the whole decode path, with
calibration and tier 2, is measured by `dashkv_jax.evaluation.recall`). For one (query
position, layer, KV head), with a tier 1 of k keys:

- tier 1: the k eligible keys with the smallest group Hamming distance (ties to the older key),
  as decoding's first pass picks them;
- Recall@100: of the 100 eligible keys with the highest exact group attention (the sum over
  the KV group's query heads of softmax over the eligible keys), the share in tier 1 (the
  paper's metric; when fewer than 100 keys are eligible, of all of them);
- mass recall: tier 1's attention mass over that of the oracle's top k.

Every figure is averaged over query positions, layers and KV heads (and windows). Sinks and the
recent window are always attended, so they are never in tier 1 (see `capture`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.capture import Captured, eligible_mask, group_attention
from dashkv_jax.hashing.encoders import Hasher, popcount

Array = jax.Array
METRICS = ("recall_at_100", "mass_recall")
TOP = 100  # the paper's Recall@100


def group_distances(hasher: Hasher, queries: Array, keys: Array, layer) -> Array:
    """Group Hamming distances of every key for every query: queries [Q, Hq, D], keys
    [T, Hkv, D] of one layer -> [Hkv, Q, T] int32 in [0, G b]."""
    c = hasher.config
    q_codes = hasher.encode_queries(queries, layer).reshape(
        -1, c.num_kv_heads, c.group_size, 1, c.words
    )
    k_codes = hasher.encode_keys(keys, layer).transpose(1, 0, 2)  # [Hkv, T, W]
    distance = popcount(q_codes ^ k_codes[None, :, None]).sum(axis=(2, 4))  # [Q, Hkv, T]
    return distance.transpose(1, 0, 2)


def selection_metrics(probs: Array, distance: Array, eligible: Array, *, k: int) -> Array:
    """probs [..., T] group attention (0 on ineligible keys), distance [..., T], eligible
    [..., T] bool (broadcastable) -> [..., 2]: Recall@100 and mass recall per row."""
    *batch, n = probs.shape
    eligible = jnp.broadcast_to(eligible, probs.shape).reshape(-1, n)
    probs = probs.reshape(-1, n)
    ranked = jnp.where(eligible, probs, -1.0)
    # Smallest distance first, the older key first among equals: lax.top_k keeps index order.
    closeness = jnp.where(eligible, -distance.reshape(-1, n), jnp.iinfo(jnp.int32).min)
    _, tier1 = jax.lax.top_k(closeness, k)  # [R, k]
    in_tier1 = jnp.zeros(probs.shape, bool).at[jnp.arange(probs.shape[0])[:, None], tier1].set(True)
    in_tier1 &= eligible
    top_values, _ = jax.lax.top_k(ranked, min(TOP, n))  # [R, 100]
    count = jnp.minimum(eligible.sum(-1), TOP)
    cutoff = jnp.take_along_axis(top_values, jnp.maximum(count - 1, 0)[:, None], axis=1)
    in_top = eligible & (ranked >= cutoff)  # ties at the cutoff count as top
    recall = (in_top & in_tier1).sum(-1) / jnp.maximum(in_top.sum(-1), 1)
    oracle_mass = jax.lax.top_k(ranked, k)[0].clip(0).sum(-1)
    mass = jnp.where(in_tier1, probs, 0.0).sum(-1) / jnp.maximum(oracle_mass, 1e-30)
    return jnp.stack([recall, mass], axis=-1).reshape(*batch, 2)


@functools.partial(nnx.jit, static_argnames=("k", "sinks", "window"))
def _context_metrics(
    hasher: Hasher,
    keys: Array,  # [L, T, Hkv, D]
    queries: Array,  # [Q, L, Hq, D]
    positions: Array,  # [Q]
    *,
    k: int,
    sinks: int,
    window: int,
) -> Array:  # [L, 2] metrics averaged over queries and KV heads
    eligible = eligible_mask(positions, keys.shape[1], sinks, window)  # [Q, T]

    def one_layer(xs):
        layer, k_layer, q_layer = xs  # [], [T, Hkv, D], [Q, Hq, D]
        probs, _ = group_attention(q_layer[None], k_layer[None], eligible)  # [1, Hkv, Q, T]
        distance = group_distances(hasher, q_layer, k_layer, layer)
        return jnp.mean(selection_metrics(probs[0], distance, eligible[None], k=k), axis=(0, 1))

    layers = jnp.arange(keys.shape[0])
    return jax.lax.map(one_layer, (layers, keys, queries.transpose(1, 0, 2, 3)))


def check_budget(captured: Captured, k: int, sinks: int, window: int) -> None:
    """Raises DashKVError unless 1 <= k <= the fewest eligible keys of a query."""
    fewest = int(captured.positions.min()) - window - sinks + 1
    if not 1 <= k <= fewest:
        raise DashKVError(
            f"need 1 <= tier 1 ({k}) <= eligible keys of the earliest query ({fewest}); use a "
            "longer context or a smaller fraction"
        )


def evaluate(
    hasher: Hasher,
    captured: Captured,
    *,
    k: int,
    sinks: int = 4,
    window: int = 64,
    max_queries: int | None = None,
) -> dict:
    """Metrics of `hasher` on captured windows, averaged over windows, queries, layers, heads.

    Returns {"recall_at_100": float, "mass_recall": float, "per_layer": {name: [L]}}.
    """
    check_budget(captured, k, sinks, window)
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
                k=k,
                sinks=sinks,
                window=window,
            )
        )
    per_layer = np.mean(np.stack([np.asarray(m) for m in per_context]), axis=0)  # [L, 2]
    result = {name: float(per_layer[:, i].mean()) for i, name in enumerate(METRICS)}
    result["per_layer"] = {
        name: per_layer[:, i].round(4).tolist() for i, name in enumerate(METRICS)
    }
    return result


@dataclasses.dataclass(slots=True, frozen=True)
class Budget:
    """Tier 1's size as a fraction of the context."""

    tier1: float = 1 / 16

    def size(self, context: int) -> int:
        return max(1, round(self.tier1 * context))


def compare_hashers(
    captured: Captured,
    hasher: Hasher,
    *,
    k: int,
    sinks: int = 4,
    window: int = 64,
    seed: int = 0,
) -> dict:
    """{method: metrics} for SimHash with the same bits and `hasher`."""
    from dashkv_jax.hashing.encoders import simhash

    evaluate_all = functools.partial(evaluate, captured=captured, k=k, sinks=sinks, window=window)
    return {
        "simhash": evaluate_all(simhash(hasher.config, seed)),
        hasher.config.kind: evaluate_all(hasher),
    }
