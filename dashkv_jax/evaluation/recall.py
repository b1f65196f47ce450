"""The paper's retrieval metrics of every method, measured through its real decode path.

The model runs exactly over a text once (`capture_qk`); then, for sampled query positions and
every sparse layer in order, each method's `distribution` (the one decoding attends with:
tiers, calibration, momentum carried from layer to layer) is compared with full attention on the
same queries and keys:

- Recall@100: of the 100 middle keys (sinks and window excluded) with the highest exact group
  attention (the sum over the KV group's query heads of the full softmax), the share in the
  method's tier 1, the tokens it reads exactly (the paper's metric; all middle keys when fewer
  than 100);
- KL: `KL(P_method || P_full)` per query head, P_method the distribution the method attends
  with (tier 2's approximate logits included), P_full the exact one over every visible key;
- what it used: exact and approximate tokens per KV head, and bytes per KV head and step.

Each is averaged over positions, KV (or query) heads and the method's sparse layers, with the
per-layer values beside. Sinks and window are exact for every method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dashkv_jax.attention.full import KVCache
from dashkv_jax.attention.methods import make_methods
from dashkv_jax.attention.sparse import SparseAttention, middle_bounds
from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.capture import CaptureConfig, sample_positions
from dashkv_jax.models.llama import capture_qk

Array = jax.Array
METRICS = ("recall_at_100", "kl", "exact_tokens", "approx_tokens", "bytes")
TOP = 100


@jax.jit
def _layer_metrics(attention: SparseAttention, cache, layer, q, k, positions, state):
    """One layer at every sampled position: q [Q, Hq, D], k [T, Hkv, D] exact, positions [Q].

    Returns ([Q, Hkv] Recall@100, [Q, Hq] KL, [Q, Hkv, 2] usage, the next layer's state).
    """
    n, hkv, d = k.shape
    queries = q.shape[0]
    qg = q.reshape(queries, 1, hkv, -1, d)  # [Q, B=1, Hkv, G, D]
    one_query = jax.vmap(attention.distribution, in_axes=(None, None, 0, 0, 0))
    slots, weights, usage, state = one_query(cache, layer, qg, positions[:, None], state)
    slots, weights, usage = slots[:, 0], weights[:, 0], usage[:, 0]  # [Q, Hkv, M], [Q,Hkv,G,M]

    # Full attention over every visible key.
    logits = jnp.einsum("qhgd,thd->qhgt", qg[:, 0], k) * d**-0.5  # [Q, Hkv, G, T]
    visible = jnp.arange(n)[None] <= positions[:, None]  # [Q, T]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    log_full = jax.nn.log_softmax(logits, axis=-1)

    # KL(P_method || P_full) over the tokens the method uses.
    at_slots = jnp.take_along_axis(log_full, jnp.broadcast_to(slots[:, :, None], weights.shape), 3)
    used = weights > 0
    kl = jnp.sum(
        jnp.where(used, weights * (jnp.log(jnp.where(used, weights, 1.0)) - at_slots), 0), -1
    )

    # Recall@100 of the middle keys, by exact group attention.
    lo, hi = middle_bounds(positions, attention.sinks, attention.window)
    middle = (jnp.arange(n)[None] >= lo[:, None]) & (jnp.arange(n)[None] < hi[:, None])  # [Q, T]
    group = jnp.exp(log_full).sum(axis=2)  # [Q, Hkv, T]
    ranked = jnp.where(middle[:, None], group, -1.0)
    top_values, _ = jax.lax.top_k(ranked, min(TOP, n))
    count = jnp.minimum(middle.sum(-1), TOP)[:, None, None]  # [Q, 1, 1]
    cutoff = jnp.take_along_axis(top_values, jnp.maximum(count - 1, 0), axis=-1)
    in_top = middle[:, None] & (ranked >= cutoff)  # [Q, Hkv, T]; ties at the cutoff count
    fixed = attention.sinks + attention.window
    tier1 = slots[:, :, fixed : fixed + attention.selected]  # [Q, Hkv, selected]
    tier1_ok = tier1 >= attention.sinks  # unused entries are slot 0
    rows = jnp.arange(queries)[:, None, None], jnp.arange(hkv)[None, :, None]
    in_tier1 = (
        jnp.zeros(in_top.shape, bool)
        .at[(*rows, jnp.where(tier1_ok, tier1, n))]
        .set(True, mode="drop")
    )
    recall = (in_top & in_tier1).sum(-1) / jnp.maximum(in_top.sum(-1), 1)
    return recall, kl.reshape(queries, -1), usage, state


def method_metrics(model, ids: np.ndarray, attentions: dict, positions: np.ndarray) -> dict:
    """{name: metrics (module docstring)} of each budget method in `attentions` ({name:
    SparseAttention}) on one text ids [T], at query positions [Q]."""
    c = model.config
    q, k = capture_qk(model, jnp.asarray(ids, jnp.int32)[None])  # [L, 1, T, H, D]
    t = len(ids)
    exact = KVCache(
        k=k.transpose(0, 1, 3, 2, 4),  # [L, 1, Hkv, T, D]
        v=jnp.zeros(k.shape, k.dtype).transpose(0, 1, 3, 2, 4),  # values are not read
        lengths=jnp.array([t], jnp.int32),
    )
    positions = jnp.asarray(positions, jnp.int32)
    results = {}
    for name, attention in attentions.items():
        cache = attention.adopt(exact)
        state = None
        if hasattr(attention, "prior_size"):  # DASH-KV's momentum prior, per position
            m = attention.prior_size
            state = (
                jnp.full((len(positions), 1, m), -1, jnp.int32),
                jnp.zeros((len(positions), 1, m), jnp.float32),
            )
        per_layer = {metric: [] for metric in METRICS}
        sparse = np.flatnonzero(
            ~np.asarray(attention.is_dense(np.arange(c.num_layers), c.num_layers))
        )
        for layer in sparse:
            recall, kl, usage, state = _layer_metrics(
                attention, cache, jnp.int32(layer), q[layer, 0, positions], k[layer, 0],
                positions, state,
            )  # fmt: skip
            usage = np.asarray(usage).mean(axis=(0, 1))  # [2]
            n_tokens = float(np.mean(np.asarray(positions) + 1))
            per_layer["recall_at_100"].append(float(np.mean(recall)))
            per_layer["kl"].append(float(np.mean(kl)))
            per_layer["exact_tokens"].append(float(usage[0]))
            per_layer["approx_tokens"].append(float(usage[1]))
            bytes_ = attention.step_bytes(
                usage[0], usage[1], n_tokens, c.head_dim, k.dtype.itemsize
            )
            per_layer["bytes"].append(float(bytes_))
        results[name] = {
            **{metric: float(np.mean(values)) for metric, values in per_layer.items()},
            "sparse_layers": sparse.tolist(),
            "per_layer": {metric: np.round(v, 4).tolist() for metric, v in per_layer.items()},
        }
    return results


def recall_report(
    model,
    tokenizer,
    text: str,
    *,
    methods: tuple[str, ...] = ("simhash", "dashkv"),
    hasher=None,
    symmetric=None,
    context: int = 4096,
    budget: str = "1/32",
    tier2: str | None = None,
    queries: int = 64,
    min_position: float = 0.5,
    seed: int = 0,
    options: dict | None = None,
) -> dict:
    """Runs the model over the first `context` tokens of `text` and measures each method.

    `hasher`, `symmetric`: artifact folders or Hashers for dashkv and dashkv-symmetric (default:
    the shipped ones); simhash takes the bits and tiers of dashkv's hasher. `budget` is the
    exact budget and `tier2` the approximate one (default: the hasher's), as fractions of
    `context` or token counts. Returns a JSON-ready dict: the settings and, per method, the
    metrics (module docstring).
    """
    ids = text_window(model, tokenizer, text, context)
    attentions = make_methods(model, methods, context, budget, tier2, hasher, symmetric, options)
    if "full" in attentions:
        raise DashKVError("full attention is the reference here, not a method to measure")
    if evicting := [name for name, a in attentions.items() if not isinstance(a, SparseAttention)]:
        raise DashKVError(
            f"{', '.join(evicting)} evict tokens for good: their tiers are not a selection from "
            "the whole cache, which is what Recall@100 and KL measure here"
        )
    sample = CaptureConfig(
        split="text",
        context=context,
        contexts=1,
        queries_per_context=min(queries, context - int(min_position * context)),
        min_position=min_position,
        seed=seed,
    )
    positions = sample_positions(sample, 0)
    results = method_metrics(model, np.asarray(ids[:context], np.int32), attentions, positions)
    first = next(iter(attentions.values()))
    return {
        "model": model.config.name,
        "context": context,
        "budget": first.budget,
        "tier2": max((getattr(a, "tier2", 0) for a in attentions.values()), default=0),
        "queries": len(positions),
        "sinks": first.sinks,
        "window": first.window,
        "methods": results,
    }


def format_report(report: dict) -> str:
    """A plain-text table of `recall_report`'s result."""
    rows = [
        f"context {report['context']}, exact budget {report['budget']}, tier 2 {report['tier2']}"
        f", {report['queries']} query positions, mean over sparse layers",
        f"{'method':<18} {'Recall@100':>10} {'KL':>8} {'exact':>7} {'approx':>7} {'bytes':>9}",
    ]
    for name, m in report["methods"].items():
        rows.append(
            f"{name:<18} {m['recall_at_100']:>10.4f} {m['kl']:>8.4f} {m['exact_tokens']:>7.1f}"
            f" {m['approx_tokens']:>7.1f} {m['bytes']:>9.0f}"
        )
    return "\n".join(rows)


def text_window(model, tokenizer, text: str, context: int) -> list[int]:
    """The token ids of `text` (with the model's BOS), refused when the model cannot hold
    `context` tokens or the text has fewer."""
    bos = model.config.bos_token_id
    ids = ([] if bos is None else [bos]) + tokenizer.encode(text, add_special_tokens=False).ids
    if context > model.config.max_position:
        raise DashKVError(
            f"context {context} exceeds the model's context of {model.config.max_position}"
        )
    if len(ids) < context:
        raise DashKVError(
            f"the text has {len(ids)} tokens, fewer than the context of {context}: give a "
            "longer text or a smaller --context"
        )
    return ids
