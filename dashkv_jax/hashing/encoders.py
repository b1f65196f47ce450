"""Hash encoders for keys and queries, and DASH-KV's learned tier-2 logit and calibration.

A `Hasher` holds, for every layer of a model (stacked on a leading [layers] axis):

- the encoders (DESIGN.md section 2): keys -> `bits` signs packed in uint32 words
  (`encode_keys`), queries -> signs (`encode_queries`, hamming scoring, the paper) or real
  weights in (-1, 1) (`query_weights`, this project's asymmetric-scoring extension). Three kinds:
  - "asymmetric" (DASH-KV): a linear key map per (layer, KV head), `h_k = sign(W_k k)`, and a
    query MLP per (layer, query head), d -> 256 -> 256 -> b with GELU between (the paper's
    widths; `query_hidden`), beside a linear path started equal to the head's key map (ours,
    `query_skip`: training starts from the symmetric hasher, measured better than without);
  - "symmetric" (Spotlight-style, the paper's symmetric ablation): the key map of each KV head
    applied to the queries of its group too;
  - "simhash" (the paper's "naive LSH"): one Gaussian random projection per (layer, KV head)
    for both sides, untrained, without input statistics.
- the tier-2 logit (`approx_logits`): a token in tier 2 enters the softmax with
  `alpha_{l,g} * s / b + Delta_l(a)`, where s = b - 2 popcount(h_q XOR h_k) is query head g's
  hash inner product and `Delta_l` a small residual MLP over the agreement counts `a` of
  `residual_groups` groups of bits (the per-group Hamming similarities: a learned,
  non-linear weighting of the bits). The softmax fixes logits up to a constant per query, and
  so does the KL loss that trains them: decoding supplies that constant from the tier-1 tokens
  (`attention.hashed`).
- the calibration discounts (`discounts`): the distance units a token's calibrated distance
  loses when at least `t_vote` KV heads put it in their first-pass tier 1 (consensus) and per
  unit of the previous DASH-KV layer's attention on it (momentum).

Inputs are standardised by statistics fixed before training (`fit_input_stats`): learned kinds
centre keys per (layer, KV head), which leaves every ranking of keys for a query unchanged
(q . (k - mu) = q . k - q . mu), and divide keys and queries by their RMS.

A method with `layer=None` takes inputs with a leading layer axis and applies all layers at once
(training); with an int or traced `layer` it takes one layer's inputs (decoding, inside the
layer scan).

Group distance for KV head h: D = sum over its G query heads j of popcount(h_q_j XOR h_k), an
integer in [0, G b] (hamming scoring); the asymmetric extension scores sum_j tanh(f(q_j)).sign(k).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.errors import DashKVError
from pallas_kernels.packing import pack_bits, unpack_bits

Array = jax.Array

KINDS = ("asymmetric", "symmetric", "simhash")
# The sandwich: the first and last layers every budget method keeps exact, chosen for the bundled
# model from each layer's sensitivity on validation text (experiments/layer_sensitivity.py: layer
# 0 costs 0.51% of perplexity alone, 5x the median layer; RESULTS.md).
SANDWICH = (1, 0)
SCORINGS = ("hamming", "asymmetric")
WORD_BITS = 32


@dataclasses.dataclass(slots=True, frozen=True)
class HasherConfig:
    """The hasher's shape, the model it is for, and how decoding uses it (saved beside its
    weights; `artifact.load_hasher` checks it against the model)."""

    model_id: str
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    bits: int = 128
    kind: str = "asymmetric"
    query_hidden: tuple[int, ...] = (256, 256)  # the paper's query MLP; () for a linear map
    # Ours: a linear path beside the query MLP, started equal to the key map of the head's KV
    # group, so training starts from the symmetric hasher and the MLP learns the difference.
    query_skip: bool = True
    scoring: str = "hamming"  # how tiers rank tokens; "asymmetric" is this project's extension
    residual_groups: int = 16  # agreement counts fed to the tier-2 residual MLP
    residual_hidden: int = 16
    dense_first: int = SANDWICH[0]  # layers at each end kept exact (decoding's default)
    dense_last: int = SANDWICH[1]
    t_vote: int = 2  # KV heads that must agree for the consensus discount
    # Tier-2 tokens per KV head and step decoding defaults to, a fraction of the context or a
    # count: 1/64 was chosen on validation text (RESULTS.md).
    tier2: str = "1/64"
    train_length: int = 0  # tokens per training window (0: not trained)

    def __post_init__(self):
        object.__setattr__(self, "query_hidden", tuple(self.query_hidden))
        if self.kind not in KINDS:
            raise DashKVError(f"hasher kind must be one of {KINDS}, got {self.kind!r}")
        if self.bits < WORD_BITS or self.bits % WORD_BITS:
            raise DashKVError(f"bits must be a positive multiple of 32, got {self.bits}")
        if self.num_heads % self.num_kv_heads:
            raise DashKVError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")
        if any(w < 1 for w in self.query_hidden) or self.residual_hidden < 1:
            raise DashKVError(f"bad widths: {self.query_hidden=} {self.residual_hidden=}")
        group_bits = self.bits // max(self.residual_groups, 1)
        if (
            self.residual_groups < 1
            or self.bits % self.residual_groups
            or (WORD_BITS % group_bits and group_bits % WORD_BITS)
        ):
            raise DashKVError(
                f"residual_groups must split {self.bits} bits into groups that tile 32-bit "
                f"words, got {self.residual_groups}"
            )
        if self.scoring not in SCORINGS:
            raise DashKVError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.scoring == "asymmetric" and self.kind != "asymmetric":
            raise DashKVError(f"asymmetric scoring needs an asymmetric hasher, not {self.kind}")
        if min(self.dense_first, self.dense_last) < 0:
            raise DashKVError(f"dense layers must be >= 0: {self.dense_first=} {self.dense_last=}")
        if not 1 <= self.t_vote:
            raise DashKVError(f"t_vote must be >= 1, got {self.t_vote}")
        try:
            tier2 = Fraction(self.tier2)
        except (ValueError, ZeroDivisionError):
            tier2 = Fraction(-1)
        if tier2 < 0:
            raise DashKVError(f"tier2 must be a fraction like 1/16 or a count, got {self.tier2!r}")

    @classmethod
    def for_model(cls, model_config, model_id: str | None = None, **overrides) -> HasherConfig:
        """A config shaped like `model_config` (a `ModelConfig`)."""
        return cls(
            model_id=model_id or model_config.name,
            num_layers=model_config.num_layers,
            num_heads=model_config.num_heads,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            **overrides,
        )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def words(self) -> int:
        return self.bits // WORD_BITS

    @property
    def max_distance(self) -> int:
        """The largest group distance G b (the histogram has G b + 1 bins)."""
        return self.group_size * self.bits


class InputStat(nnx.Variable):
    """A statistic of the training data fixed before training; the optimizer leaves it alone."""


class StackedLinear(nnx.Module):
    """One affine map per (layer, head): w [L, H, in, out], b [L, H, out]."""

    def __init__(self, layers, heads, d_in, d_out, *, rngs: nnx.Rngs, scale: float, bias=True):
        self.w = nnx.Param(scale * jax.random.normal(rngs.params(), (layers, heads, d_in, d_out)))
        self.b = nnx.Param(jnp.zeros((layers, heads, d_out))) if bias else None

    def __call__(self, x: Array, layer, head_repeat: int = 1) -> Array:
        """x [L, ..., H, in] (layer None) or [..., H, in] -> same with out features."""
        w = self.w[...]
        b = None if self.b is None else self.b[...]
        if head_repeat > 1:  # a KV head's map, used for each query head of its group
            w = jnp.repeat(w, head_repeat, axis=1)
            b = None if b is None else jnp.repeat(b, head_repeat, axis=1)
        if layer is None:
            flat = x.reshape(x.shape[0], -1, *x.shape[-2:])  # [L, M, H, in]
            y = jnp.einsum("lmhi,lhio->lmho", flat, w)
            y = y if b is None else y + b[:, None]
            return y.reshape(*x.shape[:-1], w.shape[-1])
        y = jnp.einsum("...hi,hio->...ho", x, w[layer])
        return y if b is None else y + b[layer]


class StackedMLP(nnx.Module):
    """Per (layer, head) MLP: widths [in, hidden..., out], GELU between the affine maps."""

    def __init__(self, layers, heads, widths, *, rngs: nnx.Rngs, last_scale: float | None = None):
        maps = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            last = i == len(widths) - 2
            scale = (2.0 / d_in) ** 0.5 if not last else (last_scale or d_in**-0.5)
            maps.append(StackedLinear(layers, heads, d_in, d_out, rngs=rngs, scale=scale))
        self.maps = nnx.List(maps)

    def __call__(self, x: Array, layer, head_repeat: int = 1) -> Array:
        for i, linear in enumerate(self.maps):
            if i:
                x = jax.nn.gelu(x)
            x = linear(x, layer, head_repeat)
        return x


class Hasher(nnx.Module):
    """Key and query encoders, the tier-2 logit and the calibration discounts of every layer."""

    def __init__(self, config: HasherConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        layers, hq, hkv, d, b = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.bits
        self.key_mean = InputStat(jnp.zeros((layers, hkv, d)))
        self.key_scale = InputStat(jnp.ones((layers, hkv, 1)))
        self.query_scale = InputStat(jnp.ones((layers, hq, 1)))
        simhash = c.kind == "simhash"
        # SimHash: a standard Gaussian projection (sign is scale-free), through the origin.
        self.key_encoder = StackedLinear(
            layers, hkv, d, b, rngs=rngs, scale=1.0 if simhash else d**-0.5, bias=not simhash
        )
        if c.kind == "asymmetric":
            last = (
                0.1 * (c.query_hidden[-1] if c.query_hidden else d) ** -0.5
                if c.query_skip
                else None
            )
            self.query_encoder = StackedMLP(
                layers, hq, [d, *c.query_hidden, b], rngs=rngs, last_scale=last
            )
            if c.query_skip:
                self.query_skip = StackedLinear(layers, hq, d, b, rngs=rngs, scale=1.0)
                g = c.group_size
                self.query_skip.w[...] = jnp.repeat(self.key_encoder.w[...], g, axis=1)
                self.query_skip.b[...] = jnp.repeat(self.key_encoder.b[...], g, axis=1)
        # Tier 2: logits per unit of s / b start near the spread of real logits (a few units).
        self.logit_scale = nnx.Param(jnp.full((layers, hq), 4.0))
        self.residual = StackedMLP(
            layers, 1, [c.residual_groups, c.residual_hidden, 1], rngs=rngs, last_scale=1e-3
        )
        # Calibration discounts in distance units, through softplus: start near 0.5 and 0.5 G b.
        self.consensus_raw = nnx.Param(jnp.zeros((layers,)))
        self.momentum_raw = nnx.Param(jnp.full((layers,), float(np.log(np.expm1(0.5)))))

    # -- encoders ----------------------------------------------------------------------------

    def _stats(self, stat: InputStat, layer, ndim: int) -> Array:
        """A [L, H, X] statistic for inputs of `ndim` dims: one layer's [H, X], or all layers'
        reshaped to broadcast over the middle axes of [L, ..., H, X]."""
        value = stat[...]
        if layer is not None:
            return value[layer]
        return value.reshape(value.shape[0], *(1,) * (ndim - value.ndim), *value.shape[1:])

    def key_logits(self, k: Array, layer=None) -> Array:
        """Keys [L?, ..., Hkv, D] -> pre-sign logits [L?, ..., Hkv, bits] float32."""
        k = k.astype(jnp.float32)
        mean, scale = (self._stats(s, layer, k.ndim) for s in (self.key_mean, self.key_scale))
        return self.key_encoder((k - mean) / scale, layer)

    def query_logits(self, q: Array, layer=None) -> Array:
        """Queries [L?, ..., Hq, D] -> pre-sign/pre-tanh logits [L?, ..., Hq, bits] float32."""
        q = q.astype(jnp.float32) / self._stats(self.query_scale, layer, q.ndim)
        if self.config.kind == "asymmetric":
            logits = self.query_encoder(q, layer)
            return logits + self.query_skip(q, layer) if self.config.query_skip else logits
        return self.key_encoder(q, layer, head_repeat=self.config.group_size)

    def encode_keys(self, k: Array, layer=None) -> Array:
        """Keys [L?, ..., Hkv, D] -> packed codes [L?, ..., Hkv, bits/32] uint32."""
        return pack_bits(self.key_logits(k, layer))

    def encode_queries(self, q: Array, layer=None) -> Array:
        """Queries [L?, ..., Hq, D] -> packed codes [L?, ..., Hq, bits/32] uint32."""
        return pack_bits(self.query_logits(q, layer))

    def query_weights(self, q: Array, layer=None) -> Array:
        """Queries [L?, ..., Hq, D] -> real weights in (-1, 1) [L?, ..., Hq, bits] (the
        asymmetric-scoring extension)."""
        return jnp.tanh(self.query_logits(q, layer))

    # -- tier 2 and calibration --------------------------------------------------------------

    def approx_logits(self, similarity: Array, agreement: Array, layer=None) -> Array:
        """Tier-2 logits before decoding's per-query offset.

        similarity [L?, ..., Hq, T]: s / b in [-1, 1] per query head and token; agreement
        [L?, ..., Hq, T, groups]: each group's share of equal bits, in [0, 1]. Both may be
        relaxed (training) or exact. Returns [L?, ..., Hq, T] float32. Decoding computes the
        same map from the codes in `pallas_kernels.code_logits` (`code_logit_weights`).
        """
        if self.config.kind == "simhash":  # untrained: decoding fits a line per query and step
            return similarity
        scale = self._stats(self.logit_scale, layer, similarity.ndim - 1)[..., None]
        x = 2.0 * agreement - 1.0  # [.., Hq, T, groups] in [-1, 1]
        if layer is None:
            flat = x.reshape(x.shape[0], -1, 1, x.shape[-1])  # [L, M, 1, groups]
            residual = self.residual(flat, None).reshape(x.shape[:-1])
        else:
            residual = self.residual(x[..., None, :], layer)[..., 0, 0]  # one MLP for all heads
        return scale * similarity + residual

    def code_logit_weights(self, layer) -> tuple[Array, tuple | None]:
        """`approx_logits` of one layer as `pallas_kernels.code_logits` takes it: (scale [Hq],
        the residual MLP (w1 [groups, hidden], b1 [hidden], w2 [hidden], b2 [])), or (ones,
        None) for SimHash, whose decoding fits its own line."""
        if self.config.kind == "simhash":
            return jnp.ones(self.config.num_heads), None
        first, last = self.residual.maps
        mlp = (first.w[...][layer, 0], first.b[...][layer, 0], last.w[...][layer, 0, :, 0])
        return self.logit_scale[...][layer], (*mlp, last.b[...][layer, 0, 0])

    def discounts(self, layer=None) -> tuple[Array, Array]:
        """(consensus, momentum) discounts in distance units, >= 0: [L] or one layer's []."""
        consensus = jax.nn.softplus(self.consensus_raw[...])
        momentum = jax.nn.softplus(self.momentum_raw[...]) * self.config.max_distance
        if layer is None:
            return consensus, momentum
        return consensus[layer], momentum[layer]


def simhash(config: HasherConfig, seed: int = 0) -> Hasher:
    """The untrained baseline: Gaussian random projections with the config's bits."""
    config = dataclasses.replace(config, kind="simhash", scoring="hamming", train_length=0)
    hasher = Hasher(config, rngs=nnx.Rngs(seed))
    hasher.consensus_raw[...] = jnp.full_like(hasher.consensus_raw[...], -30.0)  # no discounts
    hasher.momentum_raw[...] = jnp.full_like(hasher.momentum_raw[...], -30.0)
    return hasher


def fit_input_stats(
    hasher: Hasher,
    keys: np.ndarray,  # [C, L, T, Hkv, D]
    queries: np.ndarray,  # [N, L, Hq, D]
    *,
    sinks: int = 4,
) -> None:
    """Sets the hasher's input statistics from captured data (learned kinds only).

    Keys are centred by their mean over positions (sinks excluded: the first tokens' keys are
    outliers) and scaled by the RMS of the centred keys; queries are scaled by their RMS.
    """
    if hasher.config.kind == "simhash":
        return
    # One window at a time in float64: a capture is gigabytes in float32 already.
    count = keys.shape[0] * (keys.shape[2] - sinks)
    mean = sum(np.asarray(w[:, sinks:], np.float64).sum(axis=1) for w in keys) / count
    square = sum(
        ((np.asarray(w[:, sinks:], np.float64) - mean[:, None]) ** 2).sum(axis=(1, 3)) for w in keys
    )  # [L, Hkv]
    key_rms = np.sqrt(square / (count * keys.shape[-1]))[..., None]  # [L, Hkv, 1]
    query_rms = np.sqrt(
        sum((np.asarray(q, np.float64) ** 2).mean(axis=2) for q in queries) / len(queries)
    )[..., None]  # [L, Hq, 1]
    hasher.key_mean[...] = jnp.asarray(mean, jnp.float32)
    hasher.key_scale[...] = jnp.asarray(key_rms, jnp.float32)
    hasher.query_scale[...] = jnp.asarray(query_rms, jnp.float32)


# -- codes -------------------------------------------------------------------------------------


def signs(codes: Array) -> Array:
    """Packed codes [..., W] uint32 -> +-1 float32 [..., 32 W] (bit 1 -> +1)."""
    return 2.0 * unpack_bits(codes, dtype=jnp.float32) - 1.0


def popcount(x: Array) -> Array:
    return jax.lax.population_count(x).astype(jnp.int32)


def soft_agreement(q_soft: Array, k_soft: Array, groups: int) -> Array:
    """`group_agreement` of relaxed codes in [-1, 1]: q [..., b], k [..., b] -> [..., groups]."""
    same = 0.5 * (1.0 + q_soft * k_soft)  # [..., b]
    return same.reshape(*same.shape[:-1], groups, -1).mean(-1)
