"""The hashers' training data: post-RoPE q and k captured from the frozen model, oracle targets.

`capture(model, tokenizer, config)` runs the model over `config.contexts` token windows of a
corpus split and keeps, per window, every layer's keys and the queries at `queries_per_context`
sampled positions. The result is cached on disk (keyed by the model and the capture config), so
a second run skips the model pass.

Eligibility, shared by training targets, scoring and the recall metrics: for a query at
position p, the keys that selection may pick are j in [sinks, p - window], i.e. not one of the
first `sinks` tokens and not one of the `window` most recent tokens p - window + 1 .. p (the
query's own key included). Sinks and window are always attended, so they are neither targets
nor candidates.

The oracle for a (layer, KV head, position) is the group's exact attention over the eligible
keys: the sum over the G query heads of the KV group of softmax(q_g . k / sqrt(d)) over the
eligible keys. Selection is per KV head, shared by its G query heads (DESIGN.md section 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dashkv_jax import data
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.llama import Llama, capture_qk

Array = jax.Array

# Bump when the capture layout or sampling changes, so cached captures are redone.
_CAPTURE_VERSION = 1


@dataclasses.dataclass(slots=True, frozen=True)
class CaptureConfig:
    """Which text to run the model over, and which query positions to keep."""

    corpus: str = data.BUNDLED_CORPUS
    split: str = "train"
    context: int = 1024  # tokens per window
    contexts: int = 16  # windows, cut from the split's documents joined end to end
    queries_per_context: int = 256
    min_position: float = 0.5  # queries are sampled from [min_position * context, context)
    sinks: int = 4
    window: int = 64
    seed: int = 0
    # Share of windows whose query region repeats short spans of their own earlier text
    # (`with_copies`): retrieval and copying (induction) are what long-context tasks need most,
    # and what natural text shows least at a distance.
    copies: float = 0.0

    def __post_init__(self):
        if self.contexts < 1 or self.queries_per_context < 1:
            raise DashKVError(f"need >= 1 context and query, got {self.contexts=}")
        if not 0.0 <= self.copies <= 1.0:
            raise DashKVError(f"copies is a share of windows in [0, 1], got {self.copies}")
        first = self.first_position
        if first - self.window - self.sinks + 1 < 1 or first >= self.context:
            raise DashKVError(
                f"context {self.context} with min_position {self.min_position} leaves no "
                f"eligible keys beside {self.sinks} sinks and a window of {self.window}"
            )
        if self.queries_per_context > self.context - first:
            raise DashKVError(
                f"{self.queries_per_context} queries per context do not fit in positions "
                f"[{first}, {self.context})"
            )

    @property
    def first_position(self) -> int:
        return int(self.min_position * self.context)


@dataclasses.dataclass
class Captured:
    """Captured activations of `contexts` windows (host numpy arrays)."""

    keys: np.ndarray  # [C, L, T, Hkv, D] float32, every position
    queries: np.ndarray  # [C, Q, L, Hq, D] float32, at the sampled positions only
    positions: np.ndarray  # [C, Q] int32, ascending per context

    @property
    def num_samples(self) -> int:
        return self.positions.size


def sample_positions(config: CaptureConfig, index: int) -> np.ndarray:
    """[Q] int32 ascending query positions of window `index`, fixed by the config's seed."""
    rng = np.random.default_rng([config.seed, index])
    choices = rng.choice(
        np.arange(config.first_position, config.context), config.queries_per_context, False
    )
    return np.sort(choices).astype(np.int32)


def with_copies(ids: np.ndarray, config: CaptureConfig, index: int) -> np.ndarray:
    """Window `index`'s ids [T], with copies when the config's `copies` share picks it.

    A picked window's query region [first_position, T) is rewritten as alternating runs of its
    own text and copies of spans of 8-32 tokens from anywhere earlier (beyond the recent window,
    so the original is a selectable key), about half of it copies: a query inside a copy
    attends to the token after its match in the original, as when a model reads back a passkey.
    """
    rng = np.random.default_rng([config.seed, index, 1])
    if rng.random() >= config.copies:
        return ids
    out = np.array(ids, copy=True)
    at = config.first_position
    while True:
        length = int(rng.integers(8, 33))
        start = at + int(rng.integers(0, 2 * length))  # own text between copies
        if start + length > len(out) or start - config.window - length <= config.sinks:
            return out
        source = int(rng.integers(config.sinks, start - config.window - length + 1))
        out[start : start + length] = out[source : source + length]
        at = start + length


def capture_ids(model: Llama, ids: np.ndarray, positions: np.ndarray) -> tuple:
    """Keys [L, T, Hkv, D] and queries at `positions` [Q, L, Hq, D] for one window ids [T]."""
    q, k = capture_qk(model, jnp.asarray(ids, jnp.int32)[None])  # [L, 1, T, H, D]
    queries = np.asarray(q[:, 0, positions], np.float32).transpose(1, 0, 2, 3)
    return np.asarray(k[:, 0], np.float32), queries


def capture(
    model: Llama,
    tokenizer,
    config: CaptureConfig,
    *,
    model_id: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Captured:
    """Runs the model over the corpus and captures keys and sampled queries, cached on disk.

    Args:
      model, tokenizer: the frozen model and its tokenizer.
      config: which windows and positions.
      model_id: names the model in the cache key (default: the model's config name).
      cache_dir: where captures are kept (default: `data.cache_dir() / "captures"`); None there
        and `DASHKV_NO_CAPTURE_CACHE=1` in the environment turns the cache off.
      progress: show a progress bar over the windows.
    """
    c = model.config
    key = {
        "version": _CAPTURE_VERSION,
        "model": model_id or c.name,
        "shape": [c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size],
        "capture": dataclasses.asdict(config),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else data.cache_dir() / "captures"
    path = folder / f"{config.split}-{config.context}x{config.contexts}-{digest}.npz"
    use_cache = cache_dir is not None or os.environ.get("DASHKV_NO_CAPTURE_CACHE") != "1"
    if use_cache and path.is_file():
        with np.load(path) as saved:
            return Captured(saved["keys"], saved["queries"], saved["positions"])

    documents = data.load_documents(config.corpus, config.split)
    windows = list(
        itertools.islice(
            data.iter_token_windows(
                documents, tokenizer, config.context, concatenate=True, bos_id=c.bos_token_id
            ),
            config.contexts,
        )
    )
    if len(windows) < config.contexts:
        raise DashKVError(
            f"the {config.split!r} split of {config.corpus!r} holds only {len(windows)} windows "
            f"of {config.context} tokens, {config.contexts} asked for"
        )
    keys, queries, positions = [], [], []
    bar = tqdm(windows, desc=f"capture {config.split}", unit="ctx", disable=not progress)
    for index, ids in enumerate(bar):
        pos = sample_positions(config, index)
        k, q = capture_ids(model, with_copies(np.asarray(ids), config, index), pos)
        keys.append(k)
        queries.append(q)
        positions.append(pos)
    captured = Captured(np.stack(keys), np.stack(queries), np.stack(positions))
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            partial, keys=captured.keys, queries=captured.queries, positions=captured.positions
        )
        os.replace(partial, path)  # a concurrent reader never sees a half-written file
    return captured


# -- oracle ------------------------------------------------------------------------------------


def eligible_mask(positions: Array, n: int, sinks: int, window: int) -> Array:
    """positions [...] int -> [..., n] bool: keys j with sinks <= j <= position - window."""
    j = jnp.arange(n)
    return (j >= sinks) & (j <= positions[..., None] - window)


def group_attention(
    queries: Array,  # [L, Q, Hq, D]
    keys: Array,  # [L, T, Hkv, D]
    eligible: Array,  # [Q, T] bool
) -> tuple[Array, Array]:
    """The oracle: (group probabilities [L, Hkv, Q, T], log-normalisers [L, Q, Hq]).

    probs[l, h, q, j] = sum over the G query heads g of KV head h of softmax over the eligible
    keys of q_g . k_j / sqrt(d); ineligible keys get 0.
    """
    num_layers, num_q, hq, d = queries.shape
    hkv = keys.shape[2]
    qg = queries.reshape(num_layers, num_q, hkv, hq // hkv, d)
    logits = jnp.einsum("lqhgd,lthd->lhgqt", qg, keys) * d**-0.5
    logits = jnp.where(eligible[None, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [L, Hkv, G, Q]
    probs = jnp.sum(jnp.exp(logits - lse[..., None]), axis=2)  # [L, Hkv, Q, T]
    lse = lse.transpose(0, 3, 1, 2).reshape(num_layers, num_q, hq)
    return probs, lse


@jax.jit(static_argnames=("sinks", "window", "positives"))
def _context_targets(keys, queries, positions, *, sinks, window, positives):
    """One window: keys [L,T,Hkv,D], queries [Q,L,Hq,D] -> top [Q,L,Hkv,P], lse [Q,L,Hq]."""
    eligible = eligible_mask(positions, keys.shape[1], sinks, window)  # [Q, T]

    def one_layer(xs):
        k, q = xs  # [T, Hkv, D], [Q, Hq, D]
        probs, lse = group_attention(q[None], k[None], eligible)
        _, top = jax.lax.top_k(probs[0], positives)  # [Hkv, Q, P]
        return top.transpose(1, 0, 2), lse[0]

    top, lse = jax.lax.map(one_layer, (keys, queries.transpose(1, 0, 2, 3)))  # [L, Q, ...]
    return top.transpose(1, 0, 2, 3).astype(jnp.int32), lse.transpose(1, 0, 2)


@dataclasses.dataclass
class Targets:
    """Per sampled query (flattened over windows): oracle top keys and softmax normalisers."""

    top: np.ndarray  # [N, L, Hkv, P] int32, oracle top-P eligible keys, best first
    lse: np.ndarray  # [N, L, Hq] float32, log-sum-exp of q . k / sqrt(d) over eligible keys


def oracle_targets(captured: Captured, *, sinks: int, window: int, positives: int) -> Targets:
    """The oracle top-`positives` keys and the log-normalisers of every sampled query."""
    eligible_min = int(captured.positions.min()) - window - sinks + 1
    if positives > eligible_min:
        raise DashKVError(
            f"{positives} positives need as many eligible keys, the earliest query has "
            f"{eligible_min}"
        )
    tops, lses = [], []
    for keys, queries, positions in zip(
        captured.keys, captured.queries, captured.positions, strict=True
    ):
        top, lse = _context_targets(
            keys, queries, positions, sinks=sinks, window=window, positives=positives
        )
        tops.append(np.asarray(top))
        lses.append(np.asarray(lse))
    return Targets(np.concatenate(tops), np.concatenate(lses))
