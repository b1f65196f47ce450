"""Hash encoders for keys and queries, all layers stacked in one parameter tree.

A `Hasher` maps post-RoPE keys to `bits` signs packed in uint32 words (`encode_keys`) and
post-RoPE queries to `bits` real weights (`query_weights`, asymmetric scoring) or signs
(`encode_queries`, hamming scoring). Three kinds share one class:

- "asymmetric" (DASH-KV): a light key encoder per (layer, KV head), linear by default or a
  one-hidden-layer MLP, and a deeper query encoder per (layer, query head), a 2-3 layer MLP.
- "symmetric" (Spotlight-style ablation): one encoder per (layer, KV head) applied to keys and
  to the queries of its group.
- "simhash" (HashEvict-style baseline): one Gaussian random projection per (layer, KV head) for
  both sides, untrained, no bias, no input statistics.

Every parameter has a leading [layers] axis; a method with `layer=None` takes inputs with a
leading layer axis and applies all layers at once (an einsum over the stacked axes), with an
int or traced `layer` it takes one layer's inputs (the decode path, inside the layer scan).

Inputs are standardised by statistics fixed before training (`fit_input_stats`): learned kinds
centre keys per (layer, KV head), which leaves every ranking of keys for a query unchanged
(q . (k - mu) = q . k - q . mu), and divide keys and queries by their RMS.

Scores for KV head h sum over the G query heads j of its group (DESIGN.md section 2):
hamming: sum_j (b - 2 popcount(code_q_j XOR code_k)) = sum_j sign(q_j) . sign(k);
asymmetric: sum_j tanh(f(q_j)) . sign(k).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.errors import DashKVError
from pallas_kernels.packing import pack_bits, unpack_bits

Array = jax.Array

KINDS = ("asymmetric", "symmetric", "simhash")
SCORINGS = ("hamming", "asymmetric")


@dataclasses.dataclass(slots=True, frozen=True)
class HasherConfig:
    """The hasher's shape and the model it is for (saved beside the artifact's weights)."""

    model_id: str
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    bits: int = 128
    kind: str = "asymmetric"
    key_hidden: int = 0  # 0: linear key encoder; > 0: one hidden layer of this width
    query_width: int = 16
    query_depth: int = 2  # linear maps in the query MLP (asymmetric kind only)
    query_skip: bool = True  # add a linear input-to-output map to the query MLP
    scoring: str = ""  # default scoring mode; "" picks asymmetric for asymmetric, else hamming

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DashKVError(f"hasher kind must be one of {KINDS}, got {self.kind!r}")
        if self.bits < 32 or self.bits % 32:
            raise DashKVError(f"bits must be a positive multiple of 32, got {self.bits}")
        if self.num_heads % self.num_kv_heads:
            raise DashKVError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")
        if self.query_depth not in (1, 2, 3):
            raise DashKVError(f"query_depth must be 1, 2 or 3, got {self.query_depth}")
        if self.key_hidden < 0 or self.query_width < 1:
            raise DashKVError(f"bad widths: {self.key_hidden=} {self.query_width=}")
        if self.scoring == "":
            default = "asymmetric" if self.kind == "asymmetric" else "hamming"
            object.__setattr__(self, "scoring", default)
        if self.scoring not in SCORINGS:
            raise DashKVError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")

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
        return self.bits // 32


class InputStat(nnx.Variable):
    """A statistic of the training data fixed before training; the optimizer leaves it alone."""


class StackedLinear(nnx.Module):
    """One affine map per (layer, head): w [L, H, in, out], b [L, H, out]."""

    def __init__(self, layers, heads, d_in, d_out, *, rngs: nnx.Rngs, scale: float):
        self.w = nnx.Param(scale * jax.random.normal(rngs.params(), (layers, heads, d_in, d_out)))
        self.b = nnx.Param(jnp.zeros((layers, heads, d_out)))

    def __call__(self, x: Array, layer, head_repeat: int = 1) -> Array:
        """x [L, ..., H, in] (layer None) or [..., H, in] -> same with out features."""
        w, b = self.w[...], self.b[...]
        if head_repeat > 1:  # a KV head's map, used for each query head of its group
            w, b = jnp.repeat(w, head_repeat, axis=1), jnp.repeat(b, head_repeat, axis=1)
        if layer is None:
            flat = x.reshape(x.shape[0], -1, *x.shape[-2:])  # [L, M, H, in]
            y = jnp.einsum("lmhi,lhio->lmho", flat, w) + b[:, None]
            return y.reshape(*x.shape[:-1], w.shape[-1])
        y = jnp.einsum("...hi,hio->...ho", x, w[layer])
        return y + b[layer]


class StackedMLP(nnx.Module):
    """Per (layer, head) MLP: widths [in, hidden..., out], GELU between the affine maps.

    With `skip`, a linear map from input to output is added to the MLP's output and the MLP's
    last map starts at a tenth of its usual scale: the encoder starts near linear and learns
    non-linear corrections.
    """

    def __init__(
        self,
        layers,
        heads,
        widths,
        *,
        rngs: nnx.Rngs,
        last_scale: float | None = None,
        skip: bool = False,
    ):
        maps = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i < len(widths) - 2:
                scale = (2.0 / d_in) ** 0.5  # He init before a GELU
            else:
                scale = last_scale if last_scale is not None else d_in**-0.5
                scale = scale * 0.1 if skip else scale
            maps.append(StackedLinear(layers, heads, d_in, d_out, rngs=rngs, scale=scale))
        self.maps = nnx.List(maps)
        d_in, d_out = widths[0], widths[-1]
        self.skip = (
            StackedLinear(layers, heads, d_in, d_out, rngs=rngs, scale=d_in**-0.5)
            if skip and len(widths) > 2
            else None
        )

    def __call__(self, x: Array, layer, head_repeat: int = 1) -> Array:
        linear_part = None if self.skip is None else self.skip(x, layer, head_repeat)
        for i, linear in enumerate(self.maps):
            if i:
                x = jax.nn.gelu(x)
            x = linear(x, layer, head_repeat)
        return x if linear_part is None else x + linear_part


class Hasher(nnx.Module):
    """Key and query encoders of every layer and head, and the input statistics."""

    def __init__(self, config: HasherConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        layers, hq, hkv, d = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim
        self.key_mean = InputStat(jnp.zeros((layers, hkv, d)))
        self.key_scale = InputStat(jnp.ones((layers, hkv, 1)))
        self.query_scale = InputStat(jnp.ones((layers, hq, 1)))
        key_widths = [d, c.key_hidden, c.bits] if c.key_hidden else [d, c.bits]
        # SimHash: a standard Gaussian projection (sign is scale-free, so 1.0 is as good as any).
        last_scale = 1.0 if c.kind == "simhash" else None
        self.key_encoder = StackedMLP(layers, hkv, key_widths, rngs=rngs, last_scale=last_scale)
        if c.kind == "asymmetric":
            hidden = [c.query_width] * (c.query_depth - 1)
            self.query_encoder = StackedMLP(
                layers, hq, [d, *hidden, c.bits], rngs=rngs, skip=c.query_skip
            )

    # -- encoders ----------------------------------------------------------------------------

    def _stats(self, stat: InputStat, layer) -> Array:
        return stat[...] if layer is None else stat[...][layer]

    def key_logits(self, k: Array, layer=None) -> Array:
        """Keys [L?, ..., Hkv, D] -> pre-sign logits [L?, ..., Hkv, bits] float32."""
        k = k.astype(jnp.float32)
        mean, scale = self._stats(self.key_mean, layer), self._stats(self.key_scale, layer)
        if layer is None:
            extra = k.ndim - mean.ndim  # broadcast the [L, H, D] stats over the middle axes
            mean = mean.reshape(mean.shape[0], *(1,) * extra, *mean.shape[1:])
            scale = scale.reshape(scale.shape[0], *(1,) * extra, *scale.shape[1:])
        return self.key_encoder((k - mean) / scale, layer)

    def query_logits(self, q: Array, layer=None) -> Array:
        """Queries [L?, ..., Hq, D] -> pre-sign/pre-tanh logits [L?, ..., Hq, bits] float32."""
        q = q.astype(jnp.float32)
        scale = self._stats(self.query_scale, layer)
        if layer is None:
            scale = scale.reshape(scale.shape[0], *(1,) * (q.ndim - scale.ndim), *scale.shape[1:])
        q = q / scale
        if self.config.kind == "asymmetric":
            return self.query_encoder(q, layer)
        return self.key_encoder(q, layer, head_repeat=self.config.group_size)

    def encode_keys(self, k: Array, layer=None) -> Array:
        """Keys [L?, ..., Hkv, D] -> packed codes [L?, ..., Hkv, bits/32] uint32."""
        return pack_bits(self.key_logits(k, layer))

    def encode_queries(self, q: Array, layer=None) -> Array:
        """Queries [L?, ..., Hq, D] -> packed codes [L?, ..., Hq, bits/32] uint32 (hamming)."""
        return pack_bits(self.query_logits(q, layer))

    def query_weights(self, q: Array, layer=None) -> Array:
        """Queries [L?, ..., Hq, D] -> real weights in (-1, 1) [L?, ..., Hq, bits] (asymmetric)."""
        return jnp.tanh(self.query_logits(q, layer))


def simhash(config: HasherConfig, seed: int = 0) -> Hasher:
    """The untrained baseline: Gaussian random projections with the config's bits."""
    config = dataclasses.replace(config, kind="simhash", key_hidden=0, scoring="hamming")
    return Hasher(config, rngs=nnx.Rngs(seed))


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
    k = np.asarray(keys[:, :, sinks:], np.float64)
    mean = k.mean(axis=(0, 2))  # [L, Hkv, D]
    centred = k - mean[None, :, None]
    key_rms = np.sqrt((centred**2).mean(axis=(0, 2, 4)))[..., None]  # [L, Hkv, 1]
    query_rms = np.sqrt((np.asarray(queries, np.float64) ** 2).mean(axis=(0, 3)))[..., None]
    hasher.key_mean[...] = jnp.asarray(mean, jnp.float32)
    hasher.key_scale[...] = jnp.asarray(key_rms, jnp.float32)
    hasher.query_scale[...] = jnp.asarray(query_rms, jnp.float32)


# -- scoring -----------------------------------------------------------------------------------


def signs(codes: Array) -> Array:
    """Packed codes [..., W] uint32 -> +-1 float32 [..., 32 W] (bit 1 -> +1)."""
    return 2.0 * unpack_bits(codes, dtype=jnp.float32) - 1.0


def group_scores(
    hasher: Hasher,
    queries: Array,  # [Q, Hq, D] one layer's queries
    key_codes: Array,  # [T, Hkv, W] uint32, that layer's key codes
    layer,
    scoring: str,
) -> Array:  # [Hkv, Q, T] float32
    """Hashed scores of every key for every query, summed over each KV head's query group.

    hamming: sum_j (b - 2 popcount(code_q_j XOR code_k)), an exact integer in [-G b, G b]
    (computed as a product of +-1 signs, exact in float32); asymmetric: sum_j w_j . sign(k).
    """
    if scoring not in SCORINGS:
        raise DashKVError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    c = hasher.config
    if scoring == "hamming":
        q_side = signs(hasher.encode_queries(queries, layer))  # [Q, Hq, b]
    else:
        q_side = hasher.query_weights(queries, layer)
    q_side = q_side.reshape(q_side.shape[0], c.num_kv_heads, c.group_size, c.bits).sum(2)
    return jnp.einsum("qhb,thb->hqt", q_side, signs(key_codes))
