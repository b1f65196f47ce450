"""Sequence-sharded decoding: the KV and code caches split along the sequence over a device mesh.

A decoding mesh has two axes: "batch" splits the rows and "seq" the cache slots, so device
(i, j) holds rows block i and slots [j * S/n, (j + 1) * S/n) of every layer, for K, V and the
key codes alike. `ShardedAttention` wraps a backend (`full`, or DASH-KV's `HashedAttention`) and
runs its per-layer attention inside `jax.shard_map`, each device on its own slots:

  prefill   every device writes the prompt tokens whose positions it owns and attends all
            prompt queries to its own keys (causally);
  decode    the device owning position `lengths` writes the new token's K, V and code. Full
            attention: every device attends to its own visible slots. DASH-KV: every device
            computes the distances and the histogram of its own codes (`pallas_kernels`); the
            histograms are summed over "seq" ([B, Hkv, G b + 1] each, tiny), so every device
            knows the global tier thresholds, and an exclusive prefix sum of its tie counts
            tells it which of its tokens at a threshold the older devices' tokens leave in; it
            then lists its own tier-1 and tier-2 tokens (the momentum prior of a device stays
            on the device, its slots being its own), attends to them, and the tier-2 anchors'
            sums are summed over "seq".

Each device returns an unnormalised partial output with its softmax maximum and denominator,
and `merge_over_seq` combines them by log-sum-exp (pmax, then psum of the rescaled parts). Only
histograms, counts and [B, Hq, D] partials cross devices: no device reads another's cache, and
the selection equals one device's exactly.

The weights split over "seq" too (`shard_model`: tensor-parallel projections, MLP and
vocabulary), so no device holds or runs the whole model; XLA partitions those matmuls itself.
The prompt's activations are not sequence-parallel: prefill attention memory per device is
[T, S/n] per head, but its projections and MLP see all T tokens.
"""

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from dashkv_jax.attention.full import FullAttention, backend
from dashkv_jax.attention.hashed import HashedAttention
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.loaders import DEFAULT_MODEL

Array = jax.Array

BATCH, SEQ = "batch", "seq"
AXES = (BATCH, SEQ)  # "seq" last: jax.make_mesh gives the last axis the nearest devices
# Each cache field's layout, by name: slots over "seq", rows over "batch".
CACHE_SPECS = {
    "k": P(None, BATCH, None, SEQ, None),  # [layers, batch, kv_heads, max_len, head_dim]
    "v": P(None, BATCH, None, SEQ, None),
    "codes": P(None, BATCH, None, SEQ, None),  # [layers, batch, kv_heads, max_len, words]
    "lengths": P(BATCH),  # [batch]
    "usage": P(None, BATCH, None, None),  # [layers, batch, kv_heads, 2]
    # DASH-KV's momentum prior: each device's own tokens, so the "seq" devices' lists side by
    # side along the last axis.
    "prior_slots": P(BATCH, None, SEQ),  # [batch, 1, seq * M]
    "prior_weights": P(BATCH, None, SEQ),
}
# Weights split over "seq" along a feature axis (tensor parallel); the rest is replicated.
WEIGHT_SPECS = {
    "embed": P(SEQ, None),  # [vocab, hidden]
    "lm_head": P(None, SEQ),  # [hidden, vocab]
    "wq": P(None, None, SEQ),  # [layers, hidden, heads * head_dim]: output features
    "wk": P(None, None, SEQ),
    "wv": P(None, None, SEQ),
    "w_gate": P(None, None, SEQ),  # [layers, hidden, intermediate]
    "w_up": P(None, None, SEQ),
    "wo": P(None, SEQ, None),  # [layers, heads * head_dim, hidden]: input features
    "w_down": P(None, SEQ, None),  # [layers, intermediate, hidden]
}


@dataclasses.dataclass(slots=True, frozen=True)
class DecodeConfig:
    """A long-context decoding study (`experiments/decode.py`, `experiments/configs/decode_*`).

    `max_slots_per_device` is the cache capacity of one device in tokens: a cache that would
    put more slots on a device is refused, so a context beyond it needs seq > 1.
    """

    name: str
    model: str = DEFAULT_MODEL
    attention: str = "dashkv"  # a method of dashkv_jax.attention.methods: "full" or a hashed one
    budget: str = "1/32"  # tokens attended per KV head and step, of the context or absolute
    tier2: str | None = None  # DASH-KV's approximate tokens; None: the hasher's
    hasher: str | None = None  # an artifact folder; None: the one shipped for the model
    mesh: str = "seq=8,batch=1"
    context: int = 4096  # prompt tokens of real text
    steps: int = 16  # decoded tokens, each timed
    batch: int = 1
    max_slots_per_device: int | None = None
    host_devices: int | None = None  # simulated CPU devices (before JAX starts)
    dtype: str = "float32"  # weights and caches
    text: str = "bundled"  # a corpus for dashkv_jax.data.load_documents ("bundled": Wikipedia)
    split: str = "heldout"  # of that corpus


def parse_mesh(text: str) -> dict[str, int]:
    """'seq=8,batch=1' -> {'batch': 1, 'seq': 8}; an axis not named has size 1."""
    sizes = dict.fromkeys(AXES, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in sizes:
            raise DashKVError(
                f"bad mesh entry {item!r} in {text!r}: want AXIS=SIZE with AXIS in {AXES}"
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise DashKVError(f"mesh axis {name} needs an integer size, got {value!r}") from None
        if sizes[name] < 1:
            raise DashKVError(f"mesh axis {name} needs a positive size, got {sizes[name]}")
    return sizes


def make_mesh(shape: str | Mapping[str, int], devices=None) -> Mesh:
    """A ("batch", "seq") mesh from 'seq=8,batch=1' or {'seq': 8}, on the first devices."""
    sizes = parse_mesh(shape) if isinstance(shape, str) else {**dict.fromkeys(AXES, 1), **shape}
    if set(sizes) != set(AXES):
        raise DashKVError(f"a decoding mesh has the axes {AXES}, got {tuple(sizes)}")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    if needed > len(devices):
        raise DashKVError(
            f"a mesh of {sizes[BATCH]} x {sizes[SEQ]} (batch x seq) needs {needed} devices, "
            f"{len(devices)} available"
        )
    if jax.process_count() > 1 and needed != len(devices):  # every process must take part
        raise DashKVError(
            f"with {jax.process_count()} processes a mesh must use all {len(devices)} devices, "
            f"not {needed}"
        )
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES),
        AXES,
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:needed],
    )


def place(tree, mesh: Mesh, spec_of=lambda path, x: P()):
    """Host or single-device arrays (the same on every process) -> global arrays on `mesh`,
    each laid out by `spec_of(path, array)` (default: replicated). Works on several hosts."""

    def one(path, x):
        data = np.asarray(x)
        sharding = NamedSharding(mesh, spec_of(path, data))
        return jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_model(model, mesh: Mesh):
    """A copy of `model` with its weights laid out by WEIGHT_SPECS on `mesh` (a weight whose
    axis does not split evenly stays replicated); `model` itself is left as it was."""
    graphdef, state = nnx.split(model)

    def spec_of(path, x):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        spec = WEIGHT_SPECS.get(names[-1], P()) if names else P()
        fits = all(
            axis is None or x.shape[dim] % mesh.shape[axis] == 0 for dim, axis in enumerate(spec)
        )
        return spec if len(spec) == x.ndim and fits else P()

    return nnx.merge(graphdef, place(state, mesh, spec_of))


def cache_specs(cache):
    """The PartitionSpec of every field of a KVCache or CodeCache, as a tree like it."""
    return jax.tree_util.tree_map_with_path(lambda path, _: CACHE_SPECS[path[0].name], cache)


def partial_attention(q: Array, keys: Array, values: Array, visible: Array):
    """One device's share of softmax attention, to be merged across devices by log-sum-exp.

    q [B, Hkv, G, T, D]; keys, values [B, Hkv, K, D]; visible bool, broadcastable to
    [B, Hkv, G, T, K]. Returns `partial_softmax` of the scaled logits.
    """
    logits = jnp.einsum("bhgtd,bhkd->bhgtk", q, keys, preferred_element_type=jnp.float32)
    return partial_softmax(jnp.where(visible, logits * q.shape[-1] ** -0.5, -jnp.inf), values)


def partial_softmax(logits: Array, values: Array):
    """logits [B, Hkv, G, T, K] (-inf where hidden), values [B, Hkv, K, D] -> (out [B, Hkv,
    G, T, D] float32 = sum_k p_k v_k, peak, total [B, Hkv, G, T], p [B, Hkv, G, T, K]) with
    p_k = exp(logit_k - peak), peak the largest logit (-inf where none is visible) and total =
    sum_k p_k."""
    peak = logits.max(axis=-1)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)[..., None])  # 0 where hidden
    out = jnp.einsum(
        "bhgtk,bhkd->bhgtd", p.astype(values.dtype), values, preferred_element_type=jnp.float32
    )
    return out, peak, p.sum(axis=-1), p


def merge_over_seq(out: Array, peak: Array, total: Array, p: Array | None = None):
    """Combine every "seq" device's `partial_softmax` into the exact softmax output; with `p`,
    also this device's tokens' share of the softmax ([B, Hkv, G, T, K]) -> (out, weights)."""
    top = lax.pmax(peak, SEQ)
    scale = jnp.exp(peak - top)  # 0 for a device that saw nothing (peak -inf)
    out = lax.psum(out * scale[..., None], SEQ)
    denominator = lax.psum(total * scale, SEQ)[..., None]
    weights = None if p is None else p * (scale[..., None] / denominator)
    return out / denominator, weights


@backend
class ShardedAttention:
    """`inner` (FullAttention or HashedAttention) with its caches split along the sequence.

    `max_slots_per_device` (tokens) refuses a cache that would put more slots on one device.
    The inner backend's arrays (a hasher) are replicated on the mesh at construction.
    """

    inner: FullAttention | HashedAttention
    mesh: Mesh = struct.field(pytree_node=False)
    max_slots_per_device: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if set(self.mesh.axis_names) != set(AXES):
            raise DashKVError(f"a decoding mesh has the axes {AXES}, got {self.mesh.axis_names}")
        hashed = isinstance(self.inner, HashedAttention)
        if not (hashed or type(self.inner) is FullAttention):
            raise DashKVError(
                "sequence-sharded decoding runs full attention and the hashed methods (dashkv, "
                f"dashkv-symmetric, simhash), not {type(self.inner).__name__}"
            )
        if hashed and self.inner.teacher_forced:
            raise DashKVError("sequence-sharded decoding has no teacher-forced prefill")
        if self.max_slots_per_device is not None and self.max_slots_per_device < 1:
            raise DashKVError(f"max_slots_per_device must be positive: {self.max_slots_per_device}")
        object.__setattr__(self, "inner", place(self.inner, self.mesh))

    @property
    def hashed(self) -> bool:
        return isinstance(self.inner, HashedAttention)

    def slots_per_device(self, batch: int, max_len: int) -> int:
        """Cache slots each device holds for `max_len`; DashKVError if the mesh cannot hold it."""
        seq, rows = self.mesh.shape[SEQ], self.mesh.shape[BATCH]
        if max_len % seq:
            raise DashKVError(
                f"a cache of {max_len} slots does not split evenly over seq={seq} devices: "
                f"make it a multiple of {seq}"
            )
        if batch % rows:
            raise DashKVError(f"a batch of {batch} rows does not split over batch={rows} devices")
        per_device = max_len // seq
        cap = self.max_slots_per_device
        if cap is not None and per_device > cap:
            raise DashKVError(
                f"a cache of {max_len} tokens puts {per_device} slots on each of seq={seq} "
                f"device(s), over the per-device capacity of {cap}: shard it over "
                f"seq >= {-(-max_len // cap)} devices"
            )
        return per_device

    def shardings(self, cache):
        """NamedShardings of a cache (or its abstract shape) on this mesh."""
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), cache_specs(cache))

    def init_cache(self, config, batch, max_len, dtype=jnp.float32):
        self.slots_per_device(batch, max_len)
        seq = self.mesh.shape[SEQ]

        def create():
            cache = self.inner.init_cache(config, batch, max_len, dtype)
            if self.hashed:  # every device keeps the prior of its own tokens
                tile = (1, 1, seq)
                cache = cache.replace(
                    prior_slots=jnp.tile(cache.prior_slots, tile),
                    prior_weights=jnp.tile(cache.prior_weights, tile),
                )
            return cache

        # Created in place on the mesh: no device ever holds the whole (empty) cache.
        return jax.jit(create, out_shardings=self.shardings(jax.eval_shape(create)))()

    # -- prefill ---------------------------------------------------------------------------

    def prefill(self, cache, layer, q, k, v):
        if k.shape[1] > cache.k.shape[3]:  # own_slots would drop the tail silently
            raise DashKVError(f"a prompt of {k.shape[1]} tokens overflows {cache.k.shape[3]} slots")
        codes = (self.inner.hasher.encode_keys(k, layer),) if self.hashed else ()  # [B,T,Hkv,W]
        rows = P(BATCH)  # the prompt, whole on every "seq" device of its rows
        specs = cache_specs(cache)
        return jax.shard_map(
            self._prefill_shard,
            mesh=self.mesh,
            in_specs=(specs, P(), rows, rows, rows, *(rows,) * len(codes)),
            out_specs=(rows, specs),
            check_vma=False,  # Pallas calls carry no varying-axes types
        )(cache, layer, q, k, v, *codes)

    def _prefill_shard(self, cache, layer, q, k, v, *codes):
        """On one device: q [b, T, Hq, D], k/v [b, T, Hkv, D], codes [b, T, Hkv, W]."""
        b, t, hq, d = q.shape
        hkv, s = k.shape[2], cache.k.shape[3]
        offset = lax.axis_index(SEQ) * s  # this device's first slot

        def own_slots(x):  # [b, T, Hkv, X] -> [1, b, Hkv, s, X], zeros past the prompt
            x = jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s), (0, 0)))
            return lax.dynamic_slice_in_dim(x, offset, s, axis=2)[None]  # start clamps to T

        start = (layer, 0, 0, 0, 0)
        cache = cache.replace(
            k=lax.dynamic_update_slice(cache.k, own_slots(k).astype(cache.k.dtype), start),
            v=lax.dynamic_update_slice(cache.v, own_slots(v).astype(cache.v.dtype), start),
        )
        if codes:
            cache = cache.replace(
                codes=lax.dynamic_update_slice(cache.codes, own_slots(codes[0]), start)
            )
        qg = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)  # [b, Hkv, G, T, D]
        causal = offset + jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]  # [T, s]
        out, _ = merge_over_seq(*partial_attention(qg, cache.k[layer], cache.v[layer], causal)[:3])
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype), cache

    # -- decode ----------------------------------------------------------------------------

    def decode(self, cache, layer, q, k, v):
        b, _, hq, d = q.shape
        qg = q.reshape(b, k.shape[2], hq // k.shape[2], d)  # [B, Hkv, G, D]
        extra = (self.inner.hasher.encode_keys(k[:, 0], layer),) if self.hashed else ()
        rows = P(BATCH)
        specs = cache_specs(cache)
        out, cache = jax.shard_map(
            self._decode_shard,
            mesh=self.mesh,
            in_specs=(specs, P(), rows, rows, rows, *(rows,) * len(extra)),
            out_specs=(rows, specs),
            check_vma=False,  # Pallas calls carry no varying-axes types
        )(cache, layer, qg, k, v, *extra)
        return out.reshape(b, 1, hq, d).astype(q.dtype), cache

    def _decode_shard(self, cache, layer, q, k, v, *code):
        """On one device: q [b, Hkv, G, D], k/v [b, 1, Hkv, D]; code: the new key's [b, Hkv, W]."""
        s = cache.k.shape[3]
        offset = lax.axis_index(SEQ) * s
        pos = cache.lengths  # [b] the new token's position
        mine = (pos >= offset) & (pos < offset + s)
        slot = jnp.where(mine, pos - offset, s)  # s is out of bounds: the write is dropped
        rows = jnp.arange(q.shape[0])
        cache = cache.replace(
            k=cache.k.at[layer, rows, :, slot].set(k[:, 0].astype(cache.k.dtype), mode="drop"),
            v=cache.v.at[layer, rows, :, slot].set(v[:, 0].astype(cache.v.dtype), mode="drop"),
        )
        if not self.hashed:
            return merge_over_seq(*self._attend_own(cache, layer, q, offset)[:3])[0][
                :, :, :, 0
            ], cache
        cache = cache.replace(codes=cache.codes.at[layer, rows, :, slot].set(code[0], mode="drop"))
        inner = self.inner
        b, hkv, g, _ = q.shape
        prior = (cache.prior_slots[:, 0], cache.prior_weights[:, 0])  # this device's tokens
        m = prior[0].shape[-1] // hkv  # tokens per KV head in a prior

        def dense():
            out, peak, total, _ = self._attend_own(cache, layer, q, offset)
            everything = jnp.zeros((b, hkv, 2)).at[..., 0].set(pos[:, None] + 1.0)
            unused = (jnp.zeros((b, hkv, g, 1, m)), jnp.full((b, hkv, m), -1, jnp.int32))
            return (out, peak, total, *unused), everything

        def sparse():
            return self._attend_tiers(cache, layer, q, pos, prior, offset)

        (out, peak, total, p, slots), usage = lax.cond(
            inner.is_dense(layer, cache.k.shape[0]), dense, sparse
        )
        out, weights = merge_over_seq(out, peak, total, p)
        # The next layer's prior: this layer's attention on this device's tokens, mean over
        # every query head of the layer (a dense layer leaves the prior as it was).
        new_prior = (slots.reshape(b, -1), (weights[:, :, :, 0].sum(2) / (hkv * g)).reshape(b, -1))
        dense_layer = inner.is_dense(layer, cache.k.shape[0])
        prior = jax.tree.map(lambda old, new: jnp.where(dense_layer, old, new), prior, new_prior)
        cache = cache.replace(
            usage=cache.usage.at[layer].set(usage),
            prior_slots=prior[0][:, None],
            prior_weights=prior[1][:, None],
        )
        return out[:, :, :, 0], cache

    def _attend_own(self, cache, layer, q, offset):
        """Partials of q [b, Hkv, G, D] over every visible slot this device holds."""
        s = cache.k.shape[3]
        visible = offset + jnp.arange(s)[None, :] <= cache.lengths[:, None]  # [b, s]
        return partial_attention(
            q[:, :, :, None], cache.k[layer], cache.v[layer], visible[:, None, None, None, :]
        )

    def _attend_tiers(self, cache, layer, q, pos, prior, offset):
        """Partials of q [b, Hkv, G, D] over the tier-1 and tier-2 tokens this device holds
        (those one device would pick), this device's slots of them [b, Hkv, M] (-1 where
        unused) and the usage over every device [b, Hkv, 2]."""
        inner = self.inner

        def psum(x):
            return lax.psum(x, SEQ)

        def before(count):  # the sum of `count` over the "seq" devices before this one
            counts = lax.all_gather(count, SEQ)  # [n, ...]
            earlier = jnp.arange(counts.shape[0]) < lax.axis_index(SEQ)
            return jnp.sum(jnp.where(earlier.reshape(-1, *(1,) * count.ndim), counts, 0), 0)

        tier1, tier2, query = inner.tiers(
            cache, layer, q, pos, prior, offset=offset, combine=psum, before=before
        )
        slots, local, logits, exact = inner.tier_logits(
            cache, layer, q, query, pos, tier1, tier2, offset=offset,
            reduce=lambda sums: jax.tree.map(psum, sums),
        )  # fmt: skip
        out, lse = pallas_kernels.gathered_attention(logits, cache.v, local, layer=layer)
        # This device's share as partial_softmax gives it, its own softmax's log-sum-exp as
        # the peak: weights exp(logit - lse) that sum to 1 (0 where it holds none).
        seen = jnp.isfinite(lse)
        p = jnp.where(seen[..., None], jnp.exp(logits - jnp.where(seen, lse, 0.0)[..., None]), 0)
        partial = (out[:, :, :, None], lse[..., None], seen.astype(jnp.float32)[..., None])
        used = (slots >= 0).sum(-1)
        usage = psum(jnp.stack([exact, used - exact], axis=-1).astype(jnp.float32))
        return (*partial, p[:, :, :, None], slots), usage

    def select(self, cache, layer, q, pos):
        """The tiers of DASH-KV for queries q [B, Hkv, G, D] at positions pos [B] (slots <= pos
        written), from every device's share, as `HashedAttention.tiers` picks them on one
        device -> (tier1 [B, Hkv, selected], tier2 [B, Hkv, tier2]) of global slots in slot
        order, -1 padded."""
        rows = P(BATCH)
        b, hkv = q.shape[:2]
        m = self.inner.prior_size
        prior = (jnp.full((b, m), -1, jnp.int32), jnp.zeros((b, m), jnp.float32))

        def run(cache, layer, q, pos):
            offset = lax.axis_index(SEQ) * cache.k.shape[3]

            def before(count):
                counts = lax.all_gather(count, SEQ)
                earlier = jnp.arange(counts.shape[0]) < lax.axis_index(SEQ)
                return jnp.sum(jnp.where(earlier.reshape(-1, *(1,) * count.ndim), counts, 0), 0)

            tier1, tier2, _ = self.inner.tiers(
                cache, layer, q, pos, prior, offset=offset,
                combine=lambda x: lax.psum(x, SEQ), before=before,
            )  # fmt: skip
            # Each device's list holds its own slots first-come: gather them all, in order.
            return lax.all_gather(tier1, SEQ, axis=2, tiled=True), lax.all_gather(
                tier2, SEQ, axis=2, tiled=True
            )

        tier1, tier2 = jax.shard_map(
            run,
            mesh=self.mesh,
            in_specs=(cache_specs(cache), P(), rows, rows),
            out_specs=(rows, rows),
            check_vma=False,
        )(cache, layer, q, pos)

        # Every device's list, -1 padded, side by side: keep the real slots, in slot order.
        def compact(lists, size):
            order = jnp.argsort(jnp.where(lists >= 0, lists, jnp.iinfo(jnp.int32).max), axis=-1)
            return jnp.take_along_axis(lists, order, axis=-1)[..., :size]

        return compact(tier1, self.inner.selected), compact(tier2, self.inner.tier2)
