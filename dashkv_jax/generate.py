"""Sampling and the jit-compiled decode loop (prefill, then `lax.while_loop` over decode steps)."""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from tokenizers import Tokenizer

from dashkv_jax.attention.eviction import EvictionAttention
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.methods import make_attention, method_hasher, parse_budget
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.causal import Attention
from dashkv_jax.models.llama import Llama
from dashkv_jax.models.tokenizer import render_chat

Array = jax.Array


@dataclasses.dataclass(slots=True, frozen=True)
class Sampling:
    """Greedy when `temperature == 0`, otherwise temperature + nucleus (top-p) sampling."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise DashKVError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DashKVError(f"top-p must be in (0, 1], got {self.top_p}")


def sample(logits: Array, key: Array, sampling: Sampling) -> Array:
    """logits [B, V] -> token ids [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        # Drop the tail of tokens outside the smallest set whose mass reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
        cutoff = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "sampling", "on_token"), graph_updates=False)
def generate_ids(
    model: Llama,
    prompt: Array,
    key: Array,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    attention: Attention | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> tuple[Array, Array]:
    """Prefill `prompt` [B, T] and decode up to `max_new_tokens` tokens per row.

    Returns (tokens [B, max_new_tokens] int32, padded with the first EOS id after a row stops,
    counts [B] int32 of tokens generated before stopping). `on_token(tokens [B])` streams each
    step's tokens from inside the loop.
    """
    attention = attention or FullAttention()
    batch, prompt_len = prompt.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens, attention)
    logits, cache = model.prefill(prompt, cache, attention)
    return _decode_loop(model, logits, cache, key, max_new_tokens, sampling, attention, on_token)


@nnx.jit(static_argnames=("max_len",), graph_updates=False)
def prefill_exact(model: Llama, prompt: Array, max_len: int):
    """Exact prefill of `prompt` [B, T] into a `max_len`-slot KV cache -> (logits [B, V], cache),
    which every backend can `adopt`: one prefill shared by several methods."""
    full = FullAttention()
    return model.prefill(prompt, model.init_cache(prompt.shape[0], max_len, full), full)


@nnx.jit(static_argnames=("max_new_tokens", "sampling"), graph_updates=False)
def decode_from(
    model: Llama,
    logits: Array,
    cache,
    key: Array,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    attention: Attention,
) -> tuple[Array, Array]:
    """`generate_ids` after its prefill: decode from the prompt's last logits [B, V] and a
    cache from `prefill_exact`, which `attention` adopts."""
    cache = model.adopt_cache(cache, attention)
    return _decode_loop(model, logits, cache, key, max_new_tokens, sampling, attention, None)


def _decode_loop(model, logits, cache, key, max_new_tokens, sampling, attention, on_token):
    batch = logits.shape[0]
    eos = jnp.asarray(model.config.eos_token_ids or (-1,), jnp.int32)
    key, first_key = jax.random.split(key)
    out = jnp.full((batch, max_new_tokens), eos[0], jnp.int32)
    state = (0, sample(logits, first_key, sampling), cache, key, jnp.zeros(batch, bool), out)

    def not_finished(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(state):
        step, token, cache, key, done, out = state
        out = out.at[:, step].set(jnp.where(done, out[:, step], token))
        if on_token is not None:
            io_callback(on_token, None, jnp.where(done, -1, token), ordered=True)
        done = done | jnp.isin(token, eos)
        logits, cache = model.decode_step(token, cache, attention)
        key, step_key = jax.random.split(key)
        return step + 1, sample(logits, step_key, sampling), cache, key, done, out

    step, _, _, _, done, out = jax.lax.while_loop(not_finished, decode_one, state)
    is_eos = jnp.isin(out, eos)
    counts = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), max_new_tokens)
    return out, counts.astype(jnp.int32)


def generate(
    model: Llama,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),
    chat: bool = False,
    attention: str | Attention = "full",
    budget: str | int | None = None,
    hasher=None,
    tier2: str | int | None = None,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate a continuation of `prompt` (optionally wrapped in the chat template) as text.

    `attention` is a method name from `dashkv_jax.attention.methods` or an attention backend. A
    name takes `budget` (exact tokens: '1/32' of the final context, or a count) and, for hashed
    methods, `hasher` (an artifact path or a `Hasher`; `dashkv` defaults to the shipped one) and
    `tier2` (approximate tokens, the same way; default: the hasher's).
    """
    ids = _prompt_ids(model, tokenizer, prompt, chat, max_new_tokens)
    if isinstance(attention, str):
        context = len(ids) + max_new_tokens
        tokens = None if budget is None else parse_budget(str(budget), context)
        options = {}
        if attention in ("simhash", "dashkv", "dashkv-symmetric") and tokens is not None:
            hasher = method_hasher(attention, model, hasher)
            fraction = hasher.config.tier2 if tier2 is None else str(tier2)
            options = {"hasher": hasher, "tier2": parse_budget(fraction, context, allow_zero=True)}
        attention = make_attention(attention, tokens, model, **options)
    streamed: list[int] = []

    def on_token(tokens: np.ndarray):
        # Decode the whole stream each time so multi-byte characters come out whole.
        if tokens[0] < 0 or int(tokens[0]) in model.config.eos_token_ids:
            return
        before = tokenizer.decode(streamed)
        streamed.append(int(tokens[0]))
        on_text(tokenizer.decode(streamed)[len(before) :])

    out, counts = generate_ids(
        model,
        jnp.asarray([ids], jnp.int32),
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        attention=attention,
        on_token=on_token if on_text else None,
    )
    return tokenizer.decode(np.asarray(out[0, : int(counts[0])]).tolist())


def generate_each(
    model: Llama,
    tokenizer: Tokenizer,
    prompt: str,
    attentions: Sequence[Attention],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),
    chat: bool = False,
    seed: int = 0,
    slot_multiple: int = 512,
) -> list[str]:
    """The continuation of `prompt` under each backend in `attentions`, as text, from one exact
    prefill they all adopt (the prefill of every backend is exact, so this is what `generate`
    gives each, at a fraction of the cost when comparing methods on long prompts).

    The cache has the prompt + new tokens rounded up to `slot_multiple` slots, so prompts of
    nearly equal length reuse one compiled decode loop per backend. Eviction methods cannot
    adopt (they choose by the prompt's queries): each runs its own prefill (`generate_ids`).
    """
    ids = _prompt_ids(model, tokenizer, prompt, chat, max_new_tokens)
    slots = -(-(len(ids) + max_new_tokens) // slot_multiple) * slot_multiple
    slots = min(slots, model.config.max_position)
    logits, cache = prefill_exact(model, jnp.asarray([ids], jnp.int32), slots)
    texts = []
    for attention in attentions:
        method = {"max_new_tokens": max_new_tokens, "sampling": sampling, "attention": attention}
        if isinstance(attention, EvictionAttention):
            prompt_ids = jnp.asarray([ids], jnp.int32)
            out, counts = generate_ids(model, prompt_ids, jax.random.key(seed), **method)
        else:
            out, counts = decode_from(model, logits, cache, jax.random.key(seed), **method)
        texts.append(tokenizer.decode(np.asarray(out[0, : int(counts[0])]).tolist()))
    return texts


def _prompt_ids(model, tokenizer, prompt: str, chat: bool, max_new_tokens: int) -> list[int]:
    if chat:
        prompt = render_chat(model.chat_template, [{"role": "user", "content": prompt}])
    ids = tokenizer.encode(prompt).ids
    check_fits(model, len(ids), max_new_tokens)
    return ids


def check_fits(model: Llama, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt + generation that overflows the model's context, before any work."""
    if max_new_tokens < 1:
        raise DashKVError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if prompt_tokens == 0:
        raise DashKVError("the prompt is empty")
    total = prompt_tokens + max_new_tokens
    if total > model.config.max_position:
        raise DashKVError(
            f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens = {total} exceeds "
            f"the model's context of {model.config.max_position} tokens"
        )
