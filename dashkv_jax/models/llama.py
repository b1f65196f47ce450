"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings.

Layer weights are stacked on a leading layer axis and run with `lax.scan`, so a 30-layer model
compiles as fast as a 1-layer one and the KV cache can be carried through the scan in place.
`dtype` sets weights, activations and caches (bfloat16 works); norms, RoPE, softmax statistics
and logits stay float32. The jitted entries at the end run any model family (`Gemma3` too).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dashkv_jax.models.causal import Attention, causal_attention
from dashkv_jax.models.config import ModelConfig, RopeScaling

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Array:
    """Inverse frequencies [head_dim // 2], scaled as in Hugging Face's rope_init_fn."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    between = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(between, blended, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate halves (Hugging Face layout). x [B, T, H, D], positions [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class DecoderStack(nnx.Module):
    """All decoder layers' weights, each with a leading [layers] axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        n, d, f = config.num_layers, config.hidden_size, config.intermediate_size
        q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        init = nnx.initializers.normal(0.02)

        def weight(*shape):
            return nnx.Param(init(rngs.params(), (n, *shape), dtype))

        self.attn_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.wq, self.wk, self.wv = weight(d, q_dim), weight(d, kv_dim), weight(d, kv_dim)
        self.wo = weight(q_dim, d)
        if config.qkv_bias:
            self.bq, self.bk, self.bv = weight(q_dim), weight(kv_dim), weight(kv_dim)
        self.mlp_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.w_gate, self.w_up, self.w_down = weight(d, f), weight(d, f), weight(f, d)

    def arrays(self) -> dict[str, Array]:
        """The stacked weights as plain arrays, the `xs` of the layer scan."""
        return {name: p[...] for name, p in vars(self).items() if isinstance(p, nnx.Param)}


NLL_BLOCK = 512  # positions per block of `next_token_nll`: [B, 512, V] logits at a time


def next_token_nll(logits_fn, hidden: Array, ids: Array) -> Array:
    """hidden [B, T, E] (the last layer's output), ids [B, T] -> [B, T - 1] float32: the NLL of
    ids[:, p + 1] under logits_fn(hidden[:, p]), NLL_BLOCK positions at a time, so [T, V]
    logits are never held (a 262K-token vocabulary at 32K positions is 34 GB of them)."""
    b, t, e = hidden.shape
    pad = -(t - 1) % NLL_BLOCK
    x = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, pad)))
    x = x.reshape(b, -1, NLL_BLOCK, e).transpose(1, 0, 2, 3)  # [blocks, B, NLL_BLOCK, E]
    targets = targets.reshape(b, -1, NLL_BLOCK).transpose(1, 0, 2)

    def block_nll(args):
        x, targets = args
        logprobs = jax.nn.log_softmax(logits_fn(x), axis=-1)
        return -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]

    nll = jax.lax.map(block_nll, (x, targets))  # [blocks, B, NLL_BLOCK]
    return nll.transpose(1, 0, 2).reshape(b, -1)[:, : t - 1]


class Llama(nnx.Module):
    """Decoder-only transformer. `model(ids)` is the full causal forward without a cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = DecoderStack(config, rngs=rngs, dtype=dtype)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        if not config.tie_embeddings:
            shape = (config.hidden_size, config.vocab_size)
            self.lm_head = nnx.Param(init(rngs.params(), shape, dtype))
        self.chat_template: str | None = None  # set by the loaders from tokenizer metadata

    # -- building blocks -------------------------------------------------------------------

    def _qkv(self, h: Array, w: dict[str, Array], positions: Array):
        """Post-RoPE q [B,T,Hq,D] and k, v [B,T,Hkv,D] from normed hidden states [B,T,E]."""
        c = self.config
        b, t, _ = h.shape
        q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
        if c.qkv_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def _mlp(self, x: Array, w: dict[str, Array]) -> Array:
        h = rms_norm(x, w["mlp_norm"], self.config.rms_norm_eps)
        return (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]

    def _run_layers(self, x: Array, positions: Array, attend, cache):
        """Scan the decoder layers. attend(cache, layer, q, k, v) -> (out [B,T,Hq,D], cache)."""

        def layer_step(carry, xs):
            x, cache = carry
            w, layer = xs
            h = rms_norm(x, w["attn_norm"], self.config.rms_norm_eps)
            q, k, v = self._qkv(h, w, positions)
            out, cache = attend(cache, layer, q, k, v)
            x = x + out.reshape(*x.shape[:2], -1) @ w["wo"]
            return (x + self._mlp(x, w), cache), None

        layer_ids = jnp.arange(self.config.num_layers)
        (x, cache), _ = jax.lax.scan(layer_step, (x, cache), (self.layers.arrays(), layer_ids))
        return x, cache

    def _logits(self, x: Array) -> Array:
        x = rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)
        head = self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
        return jnp.matmul(x, head, preferred_element_type=jnp.float32)

    def _outputs(self, x: Array, targets: Array | None) -> Array:
        """Logits of hidden states x, or with targets ids [B, T] their next tokens' NLL."""
        return self._logits(x) if targets is None else next_token_nll(self._logits, x, targets)

    # -- public entry points ---------------------------------------------------------------

    def __call__(self, ids: Array) -> Array:
        """ids [B, T] int32 -> logits [B, T, vocab] float32, full causal attention, no cache."""
        b, t = ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))

        def attend(cache, layer, q, k, v):
            return causal_attention(q, k, v), cache

        x, _ = self._run_layers(self.embed[...][ids], positions, attend, None)
        return self._logits(x)

    def capture_qk(self, ids: Array) -> tuple[Array, Array]:
        """Post-RoPE queries and keys of every layer for a full causal pass over ids [B, T].

        Returns q [layers, B, T, Hq, D] and k [layers, B, T, Hkv, D] (what the hashers learn from).
        """
        b, t = ids.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))

        def attend_and_keep(captured, layer, q, k, v):
            return causal_attention(q, k, v), (
                captured[0].at[layer].set(q),
                captured[1].at[layer].set(k),
            )

        c = self.config
        captured = (
            jnp.zeros((c.num_layers, b, t, c.num_heads, c.head_dim), self.embed.dtype),
            jnp.zeros((c.num_layers, b, t, c.num_kv_heads, c.head_dim), self.embed.dtype),
        )
        _, captured = self._run_layers(self.embed[...][ids], positions, attend_and_keep, captured)
        return captured

    def init_cache(self, batch: int, max_len: int, attention: Attention, dtype=None):
        """An empty cache of `max_len` slots for `attention` (a `dashkv_jax.attention` backend)."""
        if max_len > self.config.max_position:
            raise ValueError(
                f"a cache of {max_len} tokens exceeds the model's context of "
                f"{self.config.max_position} tokens"
            )
        return attention.init_cache(self.config, batch, max_len, dtype or self.embed.dtype)

    def prefill(
        self, ids: Array, cache, attention: Attention, all_logits=False, chunk=None, nll=False
    ):
        """Run a prompt ids [B, T] into an empty cache -> (logits, cache).

        Logits are the last position's [B, V], or every position's [B, T, V] with `all_logits`;
        with `nll`, the NLL of each next token of ids [B, T - 1] instead (`next_token_nll`).
        With `chunk`, a prompt longer than that runs through the model `chunk` tokens at a time,
        each chunk attending to the cache the ones before it wrote (`prefill_chunk`), so that
        activations stay [B, chunk, ...] however long the prompt.
        """
        b, t = ids.shape
        all_logits = all_logits or nll
        if chunk is None or t <= chunk:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
            x, cache = self._run_layers(self.embed[...][ids], positions, attention.prefill, cache)
            cache = cache.replace(lengths=jnp.full((b,), t, jnp.int32))
            return self._outputs(x if all_logits else x[:, -1], ids if nll else None), cache

        def run_chunk(cache, start, chunk_ids):  # -> (hidden [B, c, E] of the chunk, cache)
            positions = start + jnp.broadcast_to(jnp.arange(chunk_ids.shape[1]), chunk_ids.shape)

            def attend(cache, layer, q, k, v):
                return attention.prefill_chunk(cache, layer, q, k, v, start)

            return self._run_layers(self.embed[...][chunk_ids], positions, attend, cache)

        whole = t // chunk * chunk  # full chunks in a scan, then the remainder

        def step(cache, xs):
            start, chunk_ids = xs
            x, cache = run_chunk(cache, start, chunk_ids)
            return cache, x if all_logits else x[:, -1]

        starts = jnp.arange(0, whole, chunk)
        chunks = ids[:, :whole].reshape(b, -1, chunk).transpose(1, 0, 2)  # [n, B, c]
        cache, hidden = jax.lax.scan(step, cache, (starts, chunks))
        if whole < t:
            x, cache = run_chunk(cache, jnp.int32(whole), ids[:, whole:])
            last = x if all_logits else x[:, -1]
        else:
            last = None
        if all_logits:
            hidden = hidden.transpose(1, 0, 2, 3).reshape(b, whole, -1)  # [B, whole, E]
            hidden = hidden if last is None else jnp.concatenate([hidden, last], axis=1)
        else:
            hidden = hidden[-1] if last is None else last
        cache = cache.replace(lengths=jnp.full((b,), t, jnp.int32))
        return self._outputs(hidden, ids if nll else None), cache

    def decode_step(self, tokens: Array, cache, attention: Attention):
        """One token per row, tokens [B] -> (logits [B, V], cache advanced by one)."""
        positions = cache.lengths[:, None]  # [B, 1]
        x = self.embed[...][tokens][:, None, :]
        x, cache = self._run_layers(x, positions, attention.decode, cache)
        cache = cache.replace(lengths=cache.lengths + 1)
        return self._logits(x[:, 0]), cache

    def adopt_cache(self, cache, attention: Attention):
        """`attention`'s cache for a prompt that exact prefill (`FullAttention`) wrote."""
        return attention.adopt(cache)


# Jitted entry points that take the model as an argument: closing over it in `jax.jit` would bake
# every weight into the compiled program as a constant (slow to compile, duplicated in memory).
# Each calls the model's own method, so one entry serves every family (Llama, Gemma3). None
# changes the model, so `graph_updates=False`: with graph updates, nnx.jit hands every weight
# back as an output, a copy of the whole model per call (SmolLM2 decode step: 400 -> 70 ms).
_jit = functools.partial(nnx.jit, graph_updates=False)


@_jit
def forward(model, ids: Array) -> Array:
    """ids [B, T] int32 -> logits [B, T, vocab] float32 (`model(ids)`)."""
    return model(ids)


@functools.partial(_jit, static_argnames=("all_logits", "chunk", "nll"), donate_argnames="cache")
def prefill(
    model, ids: Array, cache, attention: Attention, all_logits=False, chunk=None, nll=False
):
    """`model.prefill`: a prompt ids [B, T] into an empty cache -> (logits, or with `nll` each
    next token's NLL [B, T - 1]; cache), `chunk` tokens at a time if given."""
    return model.prefill(ids, cache, attention, all_logits=all_logits, chunk=chunk, nll=nll)


@functools.partial(_jit, donate_argnames="cache")
def decode_step(model, tokens: Array, cache, attention: Attention):
    """`model.decode_step`: tokens [B] -> (logits [B, V], cache advanced by one)."""
    return model.decode_step(tokens, cache, attention)


@_jit
def capture_qk(model, ids: Array) -> tuple[Array, Array]:
    """`model.capture_qk`: post-RoPE q [L, B, T, Hq, D] and k [L, B, T, Hkv, D] of the layers
    attention backends see (every layer of a Llama, the global layers of a Gemma 3)."""
    return model.capture_qk(ids)
