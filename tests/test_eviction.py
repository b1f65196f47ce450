"""Eviction baselines (H2O, SnapKV, HashEvict): each rule on a case small enough to check by hand,
exactness when the budget covers the context, a cache that really holds `budget` slots, what
each step reads, the stepwise decode-mode perplexity, and the settings they refuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.attention.eviction import (
    CannotAdopt,
    H2OAttention,
    HashEvictAttention,
    SnapKVAttention,
)
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.methods import make_attention
from dashkv_jax.errors import DashKVError
from dashkv_jax.evaluation.perplexity import decode_perplexity, token_nll
from dashkv_jax.generate import generate_each
from dashkv_jax.hashing.encoders import SANDWICH, HasherConfig, simhash
from dashkv_jax.models.config import ModelConfig
from dashkv_jax.models.llama import decode_step, prefill

FULL = FullAttention()
TINY = {"dense_first": 0, "dense_last": 0}  # one layer, compressed


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    return next(data.iter_token_windows(docs, tokenizer, 180))


def _methods(model, budget, **options):
    hasher = HashEvictAttention.projections(model.config)
    return [
        H2OAttention(budget=budget, **options),
        SnapKVAttention(budget=budget, room=16, **options),
        HashEvictAttention(budget=budget, hasher=hasher, **options),
    ]


def _name(attention):
    return type(attention).__name__


# -- each rule by hand: one layer, one KV head, one query head --------------------------------


def _config(d):
    return ModelConfig(
        vocab_size=8, hidden_size=d, intermediate_size=d, num_layers=1, num_heads=1,
        num_kv_heads=1, head_dim=d, max_position=64,
    )  # fmt: skip


def _run(attention, q, k, v, prompt, steps, max_len):
    """Prefill q/k/v [T, D] up to `prompt`, then decode `steps` tokens -> (cache, last out [D])."""
    q, k, v = (jnp.asarray(x, jnp.float32)[None, :, None, :] for x in (q, k, v))
    layer = jnp.int32(0)
    cache = attention.init_cache(_config(q.shape[-1]), 1, max_len)
    out, cache = attention.prefill(cache, layer, q[:, :prompt], k[:, :prompt], v[:, :prompt])
    out = out[0, -1, 0]
    cache = cache.replace(lengths=jnp.array([prompt], jnp.int32))
    for p in range(prompt, prompt + steps):
        step = slice(p, p + 1)
        out, cache = attention.decode(cache, layer, q[:, step], k[:, step], v[:, step])
        out = out[0, 0, 0]
        cache = cache.replace(lengths=cache.lengths + 1)
    return cache, np.asarray(out)


def _held(cache):
    """Positions the one layer and head holds, ascending."""
    positions = np.asarray(cache.positions[0, 0, 0])
    return sorted(positions[positions >= 0].tolist())


def test_h2o_keeps_the_heavy_hitter_and_evicts_the_lightest():
    # Keys are 0 except key 2 = 10 e0, every query 10 e0: query i >= 2 puts all its attention
    # on key 2 (logit 100 / sqrt(8) = 35.4 against 0), queries 0 and 1 spread it evenly.
    # Received over the 5-token prompt: key 0: 1 + 1/2, key 1: 1/2, key 2: 3 (q2, q3, q4),
    # keys 3, 4: ~0. Budget 4 = 1 sink + window 2 + 1 heavy hitter from the middle {1, 2}:
    # key 2 (3 > 1/2) stays, key 1 goes -> {0, 2, 3, 4}.
    d, t = 8, 8
    k = np.zeros((t, d))
    k[2, 0] = 10
    q = np.zeros((t, d))
    q[:, 0] = 10
    v = np.eye(t, d)  # one-hot by position: the output shows who was attended
    h2o = H2OAttention(budget=4, sinks=1, window=2, **TINY)
    cache, _ = _run(h2o, q, k, v, prompt=5, steps=0, max_len=16)
    assert _held(cache) == [0, 2, 3, 4]
    np.testing.assert_allclose(cache.scores[0, 0, 0], [1.5, 3, 0, 0], atol=1e-6)
    # Position 5: the cache is full; candidates are outside sink and window [4, 5]: {2, 3};
    # key 3 has ~0 < 3 and goes. Query 5 attends to key 2: its score becomes 4.
    # Position 6: candidates {2, 4} (window [5, 6]): key 4 (~0) goes, key 2 (4 -> 5) stays.
    cache, out = _run(h2o, q, k, v, prompt=5, steps=2, max_len=16)
    assert _held(cache) == [0, 2, 5, 6]
    held = np.asarray(cache.positions[0, 0, 0])
    np.testing.assert_allclose(cache.scores[0, 0, 0, held == 2], [5.0], atol=1e-6)
    np.testing.assert_allclose(out, np.eye(d)[2], atol=1e-6)
    assert cache.k.shape[3] == 4 and float(cache.usage[0, 0, 0, 0]) == 4


def test_snapkv_keeps_what_the_observation_window_votes_for():
    # A 12-token prompt; observe 2 (queries 10, 11), 1 sink, window 2, budget 6: 3 middle
    # tokens from [1, 10). Keys 0 except key 4 = 10 e0 and key 8 = 10 e1; query 10 = 10 e0
    # votes 1 for key 4, query 11 = 10 (e0 + e1) votes 1/2 each for keys 4 and 8.
    # Votes: key 4: 1.5, key 8: 0.5, the rest ~0 (equal).
    d, t = 8, 14
    k = np.zeros((t, d))
    k[4, 0] = k[8, 1] = 10
    q = np.zeros((t, d))
    q[10, 0] = q[11, 0] = q[11, 1] = 10
    v = np.zeros((t, d))
    snapkv = SnapKVAttention(budget=6, sinks=1, window=2, observe=2, room=4, **TINY)
    # No pooling: keys 4, 8 and the oldest of the ties, 1.
    cache, _ = _run(snapkv.replace(kernel=1), q, k, v, prompt=12, steps=0, max_len=14)
    assert _held(cache) == [0, 1, 4, 8, 10, 11]
    # Max pooling over 3 neighbours: keys 3, 4, 5 all score 1.5 and take the middle.
    cache, _ = _run(snapkv.replace(kernel=3), q, k, v, prompt=12, steps=0, max_len=14)
    assert _held(cache) == [0, 3, 4, 5, 10, 11]
    # Average pooling: 3, 4, 5 score ~0.5, 7, 8, 9 ~0.17.
    avg = snapkv.replace(kernel=3, pooling="avg")
    cache, _ = _run(avg, q, k, v, prompt=12, steps=0, max_len=14)
    assert _held(cache) == [0, 3, 4, 5, 10, 11]
    # Decoding appends into the room: budget 6 + room 4 slots, 8 of them used and read.
    cache, _ = _run(snapkv.replace(kernel=3), q, k, v, prompt=12, steps=2, max_len=14)
    assert _held(cache) == [0, 3, 4, 5, 10, 11, 12, 13]
    assert cache.k.shape[3] == 10 and float(cache.usage[0, 0, 0, 0]) == 8


def test_hashevict_replaces_the_token_whose_code_is_farthest():
    # 32-bit codes with the identity as projection: bit j is the sign of dimension j. Every
    # query is +1, key j is -1 in its first m_j dimensions: its Hamming distance is m_j.
    m = [5, 3, 10, 1, 7, 2, 4, 6]
    d, t = 32, len(m)
    k = np.ones((t, d))
    for j, flipped in enumerate(m):
        k[j, :flipped] = -1
    q = np.ones((t, d))
    hasher = simhash(HasherConfig.for_model(_config(d), bits=32))
    hasher.key_encoder.w[...] = jnp.eye(d)[None, None]
    hashevict = HashEvictAttention(budget=4, sinks=1, window=2, hasher=hasher, **TINY)
    # Prefill of 6: tokens 0-3 fill the 4 slots. Token 4: candidates outside sink and window
    # [3, 4] are {1, 2} at distances 3, 10: 2 goes. Token 5: candidates {1, 3} at 3, 1: 1 goes.
    cache, _ = _run(hashevict, q, k, k, prompt=6, steps=0, max_len=16)
    assert _held(cache) == [0, 3, 4, 5]
    # Token 6: candidates {3, 4} at 1, 7: 4 goes.
    cache, _ = _run(hashevict, q, k, k, prompt=6, steps=1, max_len=16)
    assert _held(cache) == [0, 3, 5, 6]
    codes = np.asarray(cache.codes[0, 0, 0, :, 0])  # bit j is 1 where key dim j > 0
    held = np.asarray(cache.positions[0, 0, 0])
    assert [32 - bin(int(c)).count("1") for c in codes] == [m[p] for p in held]


# -- the real model ---------------------------------------------------------------------------


def test_budget_covering_the_context_equals_full_attention(smollm2, ids):
    model, _ = smollm2
    ids = jnp.asarray(ids[None])
    expected, cache = [], model.init_cache(1, 192, FULL)
    _, cache = prefill(model, ids[:, :170], cache, FULL)
    for t in range(170, 174):
        logits, cache = decode_step(model, ids[:, t], cache, FULL)
        expected.append(logits)
    for attention in _methods(model, budget=256):
        _, cache = prefill(model, ids[:, :170], model.init_cache(1, 192, attention), attention)
        for t, want in zip(range(170, 174), expected, strict=True):
            got, cache = decode_step(model, ids[:, t], cache, attention)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=_name(attention))


def test_the_cache_holds_budget_slots_and_a_step_reads_them(smollm2, ids):
    model, _ = smollm2
    c = model.config
    ids = jnp.asarray(ids[None])
    budget, prompt, steps, context = 100, 170, 3, 180
    for attention in _methods(model, budget):
        name = _name(attention)
        cache = model.init_cache(1, context, attention)
        _, cache = prefill(model, ids[:, :prompt], cache, attention)
        for t in range(prompt, prompt + steps):
            _, cache = decode_step(model, ids[:, t], cache, attention)
        pos = prompt + steps - 1  # the newest token
        appended = steps if isinstance(attention, SnapKVAttention) else 0
        room = 16 if isinstance(attention, SnapKVAttention) else 0
        # The sandwich's dense layers hold `context` slots, the others `budget` (+ SnapKV's room).
        dense_layers = sum(SANDWICH)
        sparse_layers = c.num_layers - dense_layers
        assert cache.k.shape == (sparse_layers, 1, c.num_kv_heads, budget + room, c.head_dim)
        assert cache.dense_k.shape == (dense_layers, 1, c.num_kv_heads, context, c.head_dim)
        for layer_heads in np.asarray(cache.positions).reshape(-1, budget + room):
            held = layer_heads[layer_heads >= 0]
            assert len(held) == len(set(held)) == budget + appended, name
            assert set(range(4)) <= set(held) and set(range(pos - 63, pos + 1)) <= set(held)
        usage = np.asarray(cache.usage[:, 0, :, :])  # [L, Hkv, 2]: the last step's
        is_dense = np.asarray(attention.is_dense(np.arange(c.num_layers), c.num_layers))
        np.testing.assert_array_equal(usage[is_dense, :, 0], pos + 1)
        np.testing.assert_array_equal(usage[~is_dense, :, 0], budget + appended)
        np.testing.assert_array_equal(usage[..., 1], 0)
        # Float32 K and V of 64 dims per token read, plus H2O's score and HashEvict's code.
        metadata = {"H2OAttention": 4, "SnapKVAttention": 0, "HashEvictAttention": 4}[name]
        assert attention.step_bytes(budget, 0, pos + 1, 64, 4) == budget * (512 + metadata)
        per_slot = {"H2OAttention": 4 + 4, "SnapKVAttention": 4, "HashEvictAttention": 4 + 4}
        compressed = sparse_layers * c.num_kv_heads * (budget + room)
        dense = dense_layers * c.num_kv_heads * context * 2 * c.head_dim * 4
        assert cache.cache_bytes == compressed * (2 * c.head_dim * 4 + per_slot[name]) + dense
        assert cache.full_cache_bytes == c.num_layers * c.num_kv_heads * context * 2 * 64 * 4


@pytest.mark.parametrize("method", [H2OAttention, SnapKVAttention, HashEvictAttention])
def test_stepwise_perplexity_equals_decode_steps_by_hand(smollm2, ids, method):
    """decode_perplexity's scan over positions is what prefilling one token and calling
    decode_step for each later one computes: nll, and the tokens each layer read."""
    model, _ = smollm2
    text = ids[:100]
    options = {"hasher": HashEvictAttention.projections(model.config)}
    attention = method(budget=80, **(options if method is HashEvictAttention else {}))
    result = decode_perplexity(model, text, attention)

    stepwise = attention.appending(len(text) - 1)
    cache = model.init_cache(1, len(text), stepwise)
    logits, cache = prefill(model, jnp.asarray(text[None, :1]), cache, stepwise)
    nll, exact = [], [np.ones(model.config.num_layers)]  # position 0 reads itself
    for p in range(1, len(text)):
        nll.append(-jax.nn.log_softmax(logits[0])[text[p]])
        logits, cache = decode_step(model, jnp.asarray(text[None, p]), cache, stepwise)
        exact.append(np.asarray(cache.usage[:, 0, :, 0]).mean(-1))
    exact = np.mean(exact, axis=0)
    assert result["nll"] == pytest.approx(float(np.mean(nll)), rel=1e-5)
    np.testing.assert_allclose(token_nll(model, text, attention), nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["per_layer"]["exact_tokens"], exact, atol=0.01)
    # Float32 K and V of 64 dims: full attention's price in the dense layers (0), the
    # method's, with H2O's score and HashEvict's code, in the compressed ones (5).
    metadata = 0 if method is SnapKVAttention else 4
    layer_bytes = result["per_layer"]["bytes"]
    assert layer_bytes[0] == pytest.approx(exact[0] * 512, abs=0.1)
    assert layer_bytes[5] == pytest.approx(exact[5] * (512 + metadata), abs=0.1)
    if method is SnapKVAttention:  # a one-token prompt: every later token is appended
        assert result["exact_tokens"] == pytest.approx((len(text) + 1) / 2)
    else:  # from position 80 on the compressed layers read the budget
        assert result["per_layer"]["exact_tokens"][5] < (len(text) + 1) / 2
        assert result["cache_bytes"] < result["full_cache_bytes"]


def test_generate_each_runs_eviction_methods_from_their_own_prefill(smollm2):
    """They cannot adopt the shared exact prefill; with a covering budget they generate what
    full attention does."""
    model, tokenizer = smollm2
    prompt = "The capital of France is Paris. The capital of Italy is"
    texts = generate_each(
        model, tokenizer, prompt, [FULL, H2OAttention(budget=128)], max_new_tokens=4
    )
    assert texts[0] == texts[1] and texts[0].strip()


# -- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: H2OAttention(budget=68), "leaves no room"),
        (lambda: H2OAttention(budget=100, dense_first=-1), "dense layers"),
        (lambda: H2OAttention(budget=100, sinks=-1), "must be >= 0"),
        (lambda: SnapKVAttention(budget=100, window=8, observe=96), "leaves no room"),
        (lambda: SnapKVAttention(budget=100, observe=0), "observation window"),
        (lambda: SnapKVAttention(budget=100, kernel=4), "odd and positive"),
        (lambda: SnapKVAttention(budget=100, pooling="min"), "'max' or 'avg'"),
        (lambda: SnapKVAttention(budget=100, room=-1), "room"),
        (lambda: HashEvictAttention(budget=100), "needs a hasher"),
    ],
)
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_make_attention_builds_and_refuses(smollm2):
    model, _ = smollm2
    for name, cls in [("h2o", H2OAttention), ("snapkv", SnapKVAttention),
                      ("hashevict", HashEvictAttention)]:  # fmt: skip
        attention = make_attention(name, 256, model)
        assert type(attention) is cls and attention.budget == 256
    assert make_attention("hashevict", 256, model).hasher.config.bits == 32
    with pytest.raises(DashKVError, match="needs the model"):
        make_attention("hashevict", 256)
    with pytest.raises(DashKVError, match="takes no consensus"):
        make_attention("h2o", 256, model, consensus=False)
    with pytest.raises(DashKVError, match="leaves nothing"):
        make_attention("snapkv", 60, model)


def test_adopt_refuses_and_snapkv_refuses_a_cache_without_room(smollm2, ids):
    model, _ = smollm2
    for attention in _methods(model, budget=100):
        with pytest.raises(CannotAdopt, match="prompt's queries"):
            attention.adopt(FULL.init_cache(model.config, 1, 64))
    # 150 prompt tokens and a cache of 200 positions: 50 to append, room for 16.
    snapkv = SnapKVAttention(budget=100, room=16)
    with pytest.raises(DashKVError, match="room >= 50"):
        prefill(model, jnp.asarray(ids[None, :150]), model.init_cache(1, 200, snapkv), snapkv)
