"""Sequence-sharded decoding: the KV and code caches split along the sequence over a device mesh.

A decoding mesh has two axes: "batch" splits the rows and "seq" the cache slots, so device
(i, j) holds rows block i and slots [j * S/n, (j + 1) * S/n) of every layer, for K, V and the
key codes alike. `ShardedAttention` wraps a backend (`full`, or DASH-KV's `HashedAttention`) and
runs its per-layer attention inside `jax.shard_map`, each device on its own slots:

  prefill   every device writes the prompt tokens whose positions it owns and attends all
            prompt queries to its own keys (causally);
  decode    the device owning position `lengths` writes the new token's K, V and code. Full
            attention: every device attends to its own visible slots. DASH-KV: every device
            scores its own codes with `pallas_kernels` and keeps its local top-C; the [B, Hkv, C]
            score and slot lists are all-gathered and merged into the exact global top-C; the
            devices holding those C keys compute their exact q.k (psum), which every device cuts
            as `HashedAttention.fine_cut` does; every device then attends to the critical tokens
            (sinks + window + cut) that it holds.

Each device returns an unnormalised partial output with its softmax maximum and denominator,
and `merge_over_seq` combines them by log-sum-exp (pmax, then psum of the rescaled parts). Only
candidate lists, their [B, Hq, C] logits and [B, Hq, D] partials cross devices: no device reads
another's cache.

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
from dashkv_jax.attention.hashed import HashedAttention, exclude_below
from dashkv_jax.attention.sparse import gather_rows, middle_bounds
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
    "attended": P(None, BATCH, None),  # [layers, batch, kv_heads]
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
    candidates: str = "1/8"  # the coarse filter's output C
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
    [B, Hkv, G, T, K]. Returns (out [B, Hkv, G, T, D] float32 = sum_k p_k v_k, peak, total
    [B, Hkv, G, T]) with p_k = exp(logit_k - peak), peak the largest visible logit (-inf where
    none is visible) and total = sum_k p_k.
    """
    logits = jnp.einsum("bhgtd,bhkd->bhgtk", q, keys, preferred_element_type=jnp.float32)
    logits = jnp.where(visible, logits * q.shape[-1] ** -0.5, -jnp.inf)
    peak = logits.max(axis=-1)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)[..., None])  # 0 where hidden
    out = jnp.einsum(
        "bhgtk,bhkd->bhgtd", p.astype(values.dtype), values, preferred_element_type=jnp.float32
    )
    return out, peak, p.sum(axis=-1)


def merge_over_seq(out: Array, peak: Array, total: Array) -> Array:
    """Combine every "seq" device's `partial_attention` into the exact softmax output."""
    top = lax.pmax(peak, SEQ)
    scale = jnp.exp(peak - top)  # 0 for a device that saw nothing (peak -inf)
    out = lax.psum(out * scale[..., None], SEQ)
    return out / lax.psum(total * scale, SEQ)[..., None]


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

        def create():
            return self.inner.init_cache(config, batch, max_len, dtype)

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
        out = merge_over_seq(*partial_attention(qg, cache.k[layer], cache.v[layer], causal))
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype), cache

    # -- decode ----------------------------------------------------------------------------

    def decode(self, cache, layer, q, k, v):
        b, _, hq, d = q.shape
        qg = q.reshape(b, k.shape[2], hq // k.shape[2], d)  # [B, Hkv, G, D]
        extra = ()
        if self.hashed:  # the new key's code [B, Hkv, W] and the encoded query
            extra = (
                self.inner.hasher.encode_keys(k[:, 0], layer),
                self.inner.encode_query(qg, layer),
            )
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

    def _decode_shard(self, cache, layer, q, k, v, *extra):
        """On one device: q [b, Hkv, G, D], k/v [b, 1, Hkv, D]; extra: code, encoded query."""
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
            return merge_over_seq(*self._attend_own(cache, layer, q, offset)), cache
        code, query = extra
        cache = cache.replace(codes=cache.codes.at[layer, rows, :, slot].set(code, mode="drop"))
        everything = jnp.broadcast_to(pos[:, None] + 1, q.shape[:2]).astype(jnp.int32)
        partials, attended = lax.cond(
            layer < self.inner.dense_layers,
            lambda: (self._attend_own(cache, layer, q, offset), everything),
            lambda: self._attend_critical(cache, layer, q, query, offset),
        )
        out = merge_over_seq(*partials)
        return out, cache.replace(
            attended=cache.attended.at[layer].set(attended.astype(jnp.float32))
        )

    def _attend_own(self, cache, layer, q, offset):
        """Partials of q [b, Hkv, G, D] over every visible slot this device holds."""
        s = cache.k.shape[3]
        visible = offset + jnp.arange(s)[None, :] <= cache.lengths[:, None]  # [b, s]
        return partial_attention(
            q[:, :, :, None], cache.k[layer], cache.v[layer], visible[:, None, None, None, :]
        )

    def _attend_critical(self, cache, layer, q, query, offset):
        """Partials of q over the critical tokens this device holds, and the critical set's size
        per KV head [b, Hkv] (the same on every device)."""
        s = cache.k.shape[3]
        pos = cache.lengths
        _, hi = middle_bounds(pos, self.inner.sinks, self.inner.window)
        middle, middle_ok = self._merged_selection(cache, layer, q, query, pos, offset)
        indices, ok = self.inner.critical_set(middle, middle_ok, pos, hi)  # global slots
        mine = ok & (indices >= offset) & (indices < offset + s)  # [b, Hkv, budget]
        local = jnp.where(mine, indices - offset, 0)
        keys = gather_rows(cache.k[layer], local)  # [b, Hkv, budget, D]
        values = gather_rows(cache.v[layer], local)
        partials = partial_attention(q[:, :, :, None], keys, values, mine[:, :, None, None, :])
        return partials, ok.sum(-1, dtype=jnp.int32)

    def _merged_selection(self, cache, layer, q, query, pos, offset):
        """DASH-KV's selection for q [b, Hkv, G, D] at pos [b], from every device's local top-C.

        Returns (indices, valid) [b, Hkv, k_max] of global slots, equal to what
        `HashedAttention.select` picks from the whole cache.
        """
        inner = self.inner
        s = cache.codes.shape[3]
        lo, hi = middle_bounds(pos, inner.sinks, inner.window)
        # Slots at or past hi (the window, unwritten slots) score the sentinel, as do the sinks.
        scores = inner.score_codes(query, cache.codes[layer], jnp.clip(hi - offset, 0, s))
        scores = exclude_below(scores, offset + jnp.arange(s), lo)  # [b, Hkv, s]
        values, local = pallas_kernels.select_topk(scores, min(inner.candidates, s))
        # Devices' lists in device order, each best first: equal scores keep the lower slot
        # first, as one device's top-C does.
        values = lax.all_gather(values, SEQ, axis=2, tiled=True)  # [b, Hkv, n * c]
        slots = lax.all_gather(local + offset, SEQ, axis=2, tiled=True)
        n_candidates = min(inner.candidates, s * self.mesh.shape[SEQ])
        _, order = pallas_kernels.select_topk(values, n_candidates)  # [b, Hkv, C]
        candidates = jnp.take_along_axis(slots, order, axis=-1)  # the global top-C
        # Exact q.k on the device that holds each candidate's key; the psum adds one non-zero
        # term per candidate, so every device gets the logits exactly.
        held = (candidates >= offset) & (candidates < offset + s)
        keys = gather_rows(cache.k[layer], jnp.where(held, candidates - offset, 0))
        logits = jnp.einsum("bhgd,bhcd->bhgc", q, keys, preferred_element_type=jnp.float32)
        logits = logits * q.shape[-1] ** -0.5
        logits = lax.psum(jnp.where(held[:, :, None, :], logits, 0.0), SEQ)  # [b, Hkv, G, C]
        return inner.fine_cut(candidates, logits, lo, hi)

    def select(self, cache, layer, q, pos):
        """The merged DASH-KV selection for queries q [B, Hkv, G, D] at positions pos [B]
        (slots <= pos written), as `HashedAttention.select` -> (indices, valid) [B, Hkv, k_max]."""
        rows = P(BATCH)

        def run(cache, layer, q, query, pos):
            offset = lax.axis_index(SEQ) * cache.k.shape[3]
            return self._merged_selection(cache, layer, q, query, pos, offset)

        return jax.shard_map(
            run,
            mesh=self.mesh,
            in_specs=(cache_specs(cache), P(), rows, rows, rows),
            out_specs=rows,
            check_vma=False,
        )(cache, layer, q, self.inner.encode_query(q, layer), pos)
