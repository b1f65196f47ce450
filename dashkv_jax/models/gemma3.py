"""Gemma 3's text decoder in Flax NNX: sliding-window local layers and global layers.

Per layer: RMSNorm -> q, k, v -> RMSNorm on each q and k head (QK-norm) -> RoPE (base 10K on
local layers, the config's base and scaling on global ones) -> attention -> RMSNorm -> residual;
RMSNorm -> GeGLU (tanh GELU) -> RMSNorm -> residual: Gemma's "sandwich" norms, each scaling by
(1 + weight). Embeddings are scaled by sqrt(hidden) and tied to the output head.

Attention backends (`dashkv_jax.attention`) see only the global layers: their cache has one
layer per global layer (`Gemma3Config.attention_view`), and `layer` is the index among them, so
DASH-KV, the baselines and capture apply to global layers. The local layers keep their own ring
buffer of the last `sliding_window` tokens (`Gemma3Cache`), owned by the model.

Layer weights are stacked on a leading layer axis like `llama.py`. The layers run as a scan
over repeats of the model's pattern (5 local + 1 global for Gemma 3), each repeat a scan over
its run of local layers then its global layer, so the program holds one local and one global
layer body however deep the model is; a layer reads its weights by index from the stack.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dashkv_jax.models.causal import Attention, causal_attention
from dashkv_jax.models.config import Gemma3Config
from dashkv_jax.models.llama import apply_rope, next_token_nll, rope_frequencies

Array = jax.Array


def gemma_rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm over the last axis scaled by (1 + weight): Gemma stores its weights around 0."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


@struct.dataclass
class Gemma3Cache:
    """The backend's cache of the global layers plus the local layers' ring buffers.

    Reads of the backend cache's fields (`lengths`, `attended`, `k`, ...) pass through.
    """

    attention: Any  # the backend's cache (e.g. a KVCache) with one layer per global layer
    local_k: Array  # [local layers, batch, kv_heads, ring, head_dim]: position p in slot p % ring
    local_v: Array  # [local layers, batch, kv_heads, ring, head_dim]

    def __getattr__(self, name):
        if name.startswith("__") or name == "attention":  # not yet set, or copy/pickle probes
            raise AttributeError(name)
        return getattr(self.attention, name)

    @property
    def ring(self) -> int:
        """Slots per local layer: min(sliding window, cache length)."""
        return self.local_k.shape[3]


class Gemma3Stack(nnx.Module):
    """All decoder layers' weights, each with a leading [layers] axis (local and global alike)."""

    def __init__(self, arch: Gemma3Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        n, e, f = arch.num_layers, arch.hidden_size, arch.intermediate_size
        q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        init = nnx.initializers.normal(0.02)

        def weight(*shape):
            return nnx.Param(init(rngs.params(), (n, *shape), dtype))

        def norm(size):  # zeros: a (1 + weight) norm starts as the identity scale
            return nnx.Param(jnp.zeros((n, size), dtype))

        self.attn_norm = norm(e)
        self.wq, self.wk, self.wv = weight(e, q_dim), weight(e, kv_dim), weight(e, kv_dim)
        self.q_norm, self.k_norm = norm(arch.head_dim), norm(arch.head_dim)
        self.wo = weight(q_dim, e)
        self.post_attn_norm = norm(e)
        self.mlp_norm = norm(e)
        self.w_gate, self.w_up, self.w_down = weight(e, f), weight(e, f), weight(f, e)
        self.post_mlp_norm = norm(e)

    def arrays(self) -> dict[str, Array]:
        """The stacked weights as plain arrays."""
        return {name: p[...] for name, p in vars(self).items() if isinstance(p, nnx.Param)}


def pattern_period(is_global: tuple[bool, ...]) -> int:
    """The shortest p such that layer i has the type of layer i % p (6 for Gemma 3)."""
    n = len(is_global)
    return next(
        p for p in range(1, n + 1) if all(is_global[i] == is_global[i % p] for i in range(n))
    )


def layer_runs(is_global: tuple[bool, ...]) -> list[tuple[bool, int, int]]:
    """Maximal runs of one layer type: [(is_global, first layer, length)]."""
    runs = []
    for i, flag in enumerate(is_global):
        if runs and runs[-1][0] == flag:
            runs[-1] = (flag, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((flag, i, 1))
    return runs


class Gemma3(nnx.Module):
    """Gemma 3 decoder. `model(ids)` is the full causal forward without a cache.

    `arch` is the whole architecture; `config` is the `ModelConfig` of the global layers, what
    attention backends, hashers and captures see.
    """

    def __init__(self, arch: Gemma3Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.arch = arch
        self.config = arch.attention_view
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (arch.vocab_size, arch.hidden_size), dtype))
        self.layers = Gemma3Stack(arch, rngs=rngs, dtype=dtype)
        self.final_norm = nnx.Param(jnp.zeros((arch.hidden_size,), dtype))
        self.chat_template: str | None = None  # set by the loaders from tokenizer metadata

    # -- building blocks -------------------------------------------------------------------

    def _embed(self, ids: Array) -> Array:
        embed = self.embed[...]
        return embed[ids] * jnp.asarray(math.sqrt(self.arch.hidden_size), embed.dtype)

    def _qkv(self, h: Array, w: dict[str, Array], positions: Array, is_global: bool):
        """Post-RoPE q [B,T,Hq,D] (rescaled, see below) and k, v [B,T,Hkv,D]."""
        a = self.arch
        b, t, _ = h.shape
        q = (h @ w["wq"]).reshape(b, t, a.num_heads, a.head_dim)
        k = (h @ w["wk"]).reshape(b, t, a.num_kv_heads, a.head_dim)
        v = (h @ w["wv"]).reshape(b, t, a.num_kv_heads, a.head_dim)
        q = gemma_rms_norm(q, w["q_norm"], a.rms_norm_eps)
        k = gemma_rms_norm(k, w["k_norm"], a.rms_norm_eps)
        if is_global:
            inv_freq = rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)
        else:
            inv_freq = rope_frequencies(a.head_dim, a.rope_local_theta, None)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        # Backends scale logits by head_dim**-0.5; Gemma wants query_pre_attn_scalar**-0.5.
        rescale = math.sqrt(a.head_dim / a.query_pre_attn_scalar)
        if rescale != 1.0:
            q = (q.astype(jnp.float32) * rescale).astype(q.dtype)
        return q, k, v

    def _mlp(self, x: Array, w: dict[str, Array]) -> Array:
        h = gemma_rms_norm(x, w["mlp_norm"], self.arch.rms_norm_eps)
        h = (jax.nn.gelu(h @ w["w_gate"], approximate=True) * (h @ w["w_up"])) @ w["w_down"]
        return gemma_rms_norm(h, w["post_mlp_norm"], self.arch.rms_norm_eps)

    def _run_layers(self, x: Array, positions: Array, attend_local, attend_global, state):
        """Run every layer in order. state = (global state, local state);
        attend_*(state part, index among layers of that type, q, k, v) -> (out, state part)."""
        a = self.arch
        flags = a.is_global
        period = pattern_period(flags)
        repeats = a.num_layers // period
        # Per layer, its index among the layers of its own type.
        kinds = np.asarray(flags)
        same_before = np.where(kinds, np.cumsum(kinds) - 1, np.cumsum(~kinds) - 1)
        kind_index = jnp.asarray(same_before, jnp.int32)
        weights = self.layers.arrays()

        def one_layer(x, state, layer, is_global: bool):
            w = jax.tree.map(
                lambda s: jax.lax.dynamic_index_in_dim(s, layer, keepdims=False), weights
            )
            h = gemma_rms_norm(x, w["attn_norm"], a.rms_norm_eps)
            q, k, v = self._qkv(h, w, positions, is_global)
            global_state, local_state = state
            if is_global:
                out, global_state = attend_global(global_state, kind_index[layer], q, k, v)
            else:
                out, local_state = attend_local(local_state, kind_index[layer], q, k, v)
            out = out.reshape(*x.shape[:2], -1) @ w["wo"]
            x = x + gemma_rms_norm(out, w["post_attn_norm"], a.rms_norm_eps)
            return x + self._mlp(x, w), (global_state, local_state)

        def run(x, state, first, runs):
            for is_global, start, length in runs:
                if length == 1:
                    x, state = one_layer(x, state, first + start, is_global)
                    continue

                def step(carry, i, start=start, is_global=is_global):
                    return one_layer(*carry, first + start + i, is_global), None

                (x, state), _ = jax.lax.scan(step, (x, state), jnp.arange(length))
            return x, state

        def repeat(carry, r):
            return run(*carry, r * period, layer_runs(flags[:period])), None

        (x, state), _ = jax.lax.scan(repeat, (x, state), jnp.arange(repeats))
        return run(x, state, repeats * period, layer_runs(flags[repeats * period :]))

    def _local_attention(self, q: Array, k: Array, v: Array) -> Array:
        return causal_attention(q, k, v, window=self.arch.sliding_window)

    def _write_rings(self, rings, index: Array, k: Array, v: Array):
        """Write a prompt's last `ring` tokens (k/v [B, T, Hkv, D]) into local layer `index`."""
        ring_k, ring_v = rings
        ring, t = ring_k.shape[3], k.shape[1]
        kept = min(t, ring)

        def layer_ring(x):  # [B, T, Hkv, D] -> [1, B, Hkv, ring, D], position p at slot p % ring
            tail = x[:, t - kept :].transpose(0, 2, 1, 3)
            if kept == ring:
                tail = jnp.roll(tail, (t - kept) % ring, axis=2)
            else:  # the prompt is shorter than the ring: positions 0..T-1 at slots 0..T-1
                tail = jnp.pad(tail, ((0, 0), (0, 0), (0, ring - kept), (0, 0)))
            return tail[None].astype(ring_k.dtype)

        start = (index, 0, 0, 0, 0)
        return (
            jax.lax.dynamic_update_slice(ring_k, layer_ring(k), start),
            jax.lax.dynamic_update_slice(ring_v, layer_ring(v), start),
        )

    def _attend_ring(self, rings, index: Array, q: Array, k: Array, v: Array, pos: Array):
        """One new token per row at pos [B]: write it into the ring of local layer `index`, then
        attend over the ring's tokens inside the window. q [B,1,Hq,D], k/v [B,1,Hkv,D]."""
        ring_k, ring_v = rings
        b, _, hq, d = q.shape
        hkv, ring = k.shape[2], ring_k.shape[3]
        rows = jnp.arange(b)
        ring_k = ring_k.at[index, rows, :, pos % ring].set(k[:, 0].astype(ring_k.dtype))
        ring_v = ring_v.at[index, rows, :, pos % ring].set(v[:, 0].astype(ring_v.dtype))
        keys, values = ring_k[index], ring_v[index]  # [B, Hkv, ring, D]
        # The newest position each slot holds; negative where nothing was written yet.
        held = pos[:, None] - (pos[:, None] - jnp.arange(ring)[None, :]) % ring  # [B, ring]
        visible = (held >= 0) & (pos[:, None] - held < self.arch.sliding_window)
        qg = q.reshape(b, hkv, hq // hkv, d)
        logits = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, preferred_element_type=jnp.float32)
        logits = jnp.where(visible[:, None, None, :], logits * d**-0.5, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        out = jnp.einsum("bhgs,bhsd->bhgd", weights, values, preferred_element_type=jnp.float32)
        return out.astype(v.dtype).reshape(b, 1, hq, d), (ring_k, ring_v)

    def _logits(self, x: Array) -> Array:
        x = gemma_rms_norm(x, self.final_norm[...], self.arch.rms_norm_eps)
        return jnp.matmul(x, self.embed[...].T, preferred_element_type=jnp.float32)

    # -- public entry points (the same signatures as `Llama`'s) -------------------------------

    def __call__(self, ids: Array) -> Array:
        """ids [B, T] int32 -> logits [B, T, vocab] float32, exact attention, no cache."""
        b, t = ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))

        def attend_global(state, index, q, k, v):
            return causal_attention(q, k, v), state

        def attend_local(state, index, q, k, v):
            return self._local_attention(q, k, v), state

        x, _ = self._run_layers(
            self._embed(ids), positions, attend_local, attend_global, (None, None)
        )
        return self._logits(x)

    def capture_qk(self, ids: Array) -> tuple[Array, Array]:
        """Post-RoPE queries and keys of the global layers for a causal pass over ids [B, T].

        Returns q [global layers, B, T, Hq, D] (as the backends see it: rescaled for their
        head_dim**-0.5) and k [global layers, B, T, Hkv, D].
        """
        b, t = ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))

        def attend_and_keep(captured, index, q, k, v):
            return causal_attention(q, k, v), (
                captured[0].at[index].set(q),
                captured[1].at[index].set(k),
            )

        def attend_local(state, index, q, k, v):
            return self._local_attention(q, k, v), state

        c = self.config
        dtype = self.embed.dtype
        captured = (
            jnp.zeros((c.num_layers, b, t, c.num_heads, c.head_dim), dtype),
            jnp.zeros((c.num_layers, b, t, c.num_kv_heads, c.head_dim), dtype),
        )
        x = self._embed(ids)
        _, (captured, _) = self._run_layers(
            x, positions, attend_local, attend_and_keep, (captured, None)
        )
        return captured

    def init_cache(self, batch: int, max_len: int, attention: Attention, dtype=None) -> Gemma3Cache:
        """An empty cache of `max_len` slots: `attention`'s for the global layers, rings of
        min(sliding window, max_len) slots for the local ones."""
        a = self.arch
        if max_len > a.max_position:
            raise ValueError(
                f"a cache of {max_len} tokens exceeds the model's context of "
                f"{a.max_position} tokens"
            )
        dtype = dtype or self.embed.dtype
        ring = min(a.sliding_window, max_len)
        shape = (a.num_local_layers, batch, a.num_kv_heads, ring, a.head_dim)
        return Gemma3Cache(
            attention=attention.init_cache(self.config, batch, max_len, dtype),
            local_k=jnp.zeros(shape, dtype),
            local_v=jnp.zeros(shape, dtype),
        )

    def prefill(
        self,
        ids: Array,
        cache: Gemma3Cache,
        attention: Attention,
        all_logits=False,
        chunk=None,
        nll=False,
    ):
        """Run a prompt ids [B, T] into an empty cache -> (logits, cache).

        Logits are the last position's [B, V], or every position's [B, T, V] with `all_logits`;
        with `nll`, the NLL of each next token of ids [B, T - 1] instead (`next_token_nll`).
        The whole prompt runs at once (no `chunk`: a chunk's local layers would need the ring
        buffers' window from the chunk before); blocked attention keeps its memory bounded, a
        32K prompt peaks at 3 GB.
        """
        b, t = ids.shape
        if chunk is not None and t > chunk:
            raise ValueError("Gemma 3 prefills whole prompts, not chunks")
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))

        def attend_local(rings, index, q, k, v):
            return self._local_attention(q, k, v), self._write_rings(rings, index, k, v)

        state = (cache.attention, (cache.local_k, cache.local_v))
        x, (backend, rings) = self._run_layers(
            self._embed(ids), positions, attend_local, attention.prefill, state
        )
        backend = backend.replace(lengths=jnp.full((b,), t, jnp.int32))
        cache = Gemma3Cache(attention=backend, local_k=rings[0], local_v=rings[1])
        if nll:
            return next_token_nll(self._logits, x, ids), cache
        return self._logits(x if all_logits else x[:, -1]), cache

    def decode_step(self, tokens: Array, cache: Gemma3Cache, attention: Attention):
        """One token per row, tokens [B] -> (logits [B, V], cache advanced by one)."""
        if not isinstance(cache, Gemma3Cache):
            raise TypeError(
                f"Gemma 3 decodes from a Gemma3Cache (it holds the local layers' rings), got "
                f"{type(cache).__name__}: adopt a prefilled cache with model.adopt_cache"
            )
        pos = cache.attention.lengths  # [B]

        def attend_local(rings, index, q, k, v):
            return self._attend_ring(rings, index, q, k, v, pos)

        state = (cache.attention, (cache.local_k, cache.local_v))
        x, (backend, rings) = self._run_layers(
            self._embed(tokens)[:, None, :], pos[:, None], attend_local, attention.decode, state
        )
        backend = backend.replace(lengths=pos + 1)
        cache = Gemma3Cache(attention=backend, local_k=rings[0], local_v=rings[1])
        return self._logits(x[:, 0]), cache

    def adopt_cache(self, cache: Gemma3Cache, attention: Attention) -> Gemma3Cache:
        """`attention`'s cache for a prompt that exact prefill (`FullAttention`) wrote: the
        backend adopts the global layers' cache, the local rings stay as they are."""
        return cache.replace(attention=attention.adopt(cache.attention))
