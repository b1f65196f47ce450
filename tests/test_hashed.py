"""DASH-KV decode attention: the code cache, calibrated distances, three tiers, anchoring, and
exactness where the tiers cover the context, on the real model where it matters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dashkv_jax import data
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.hashed import CodeCache, HashedAttention, anchor_sums, apply_anchor
from dashkv_jax.hashing.encoders import Hasher, HasherConfig, simhash
from dashkv_jax.models.config import ModelConfig
from dashkv_jax.models.llama import decode_step, prefill

FULL = FullAttention()


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    return jnp.asarray(next(data.iter_token_windows(docs, tokenizer, 180))[None])


@pytest.fixture(scope="module")
def learned(smollm2):
    """An untrained asymmetric hasher with non-zero discounts: every DASH-KV component runs."""
    model, _ = smollm2
    hasher = Hasher(
        HasherConfig.for_model(model.config, bits=64, query_hidden=(16,)), rngs=nnx.Rngs(3)
    )
    hasher.consensus_raw[...] = jnp.full(hasher.consensus_raw.shape, 3.0)
    return hasher


def _decode(model, ids, attention, prompt, steps):
    _, cache = prefill(model, ids[:, :prompt], model.init_cache(1, 192, attention), attention)
    logits = []
    for t in range(prompt, prompt + steps):
        step_logits, cache = decode_step(model, ids[:, t], cache, attention)
        logits.append(np.asarray(step_logits))
    return np.stack(logits), cache


@pytest.mark.parametrize("scoring", ["hamming", "asymmetric"])
def test_tiers_covering_the_context_equal_full_attention(smollm2, text_ids, learned, scoring):
    model, _ = smollm2
    expected, _ = _decode(model, text_ids, FULL, 170, 3)
    attention = HashedAttention(budget=192, tier2=8, hasher=learned, scoring=scoring)
    got, cache = _decode(model, text_ids, attention, 170, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Sparse layers read every token exactly (173 = 170 prompt + 3 decoded); none is left over
    # for tier 2.
    np.testing.assert_array_equal(cache.usage[1:, ..., 0], 173)  # layer 0 is the sandwich
    np.testing.assert_array_equal(cache.usage[..., 1], 0)


def test_usage_is_the_tiers_sizes(smollm2, text_ids, learned):
    model, _ = smollm2
    attention = HashedAttention(budget=100, tier2=40, hasher=learned)
    logits, cache = _decode(model, text_ids, attention, 170, 1)
    usage = np.asarray(cache.usage)  # [L, B, Hkv, 2]
    # 171 tokens: 4 sinks + 64 window + 32 tier 1 exact, 40 tier 2 (of the 103 middle ones).
    np.testing.assert_array_equal(usage[1:, ..., 0], 100)
    np.testing.assert_array_equal(usage[1:, ..., 1], 40)
    np.testing.assert_array_equal(usage[:1, ..., 0], 171)  # the sandwich's exact layer
    assert np.isfinite(logits).all()


def test_codes_are_written_once_per_token(smollm2, text_ids, learned):
    """The code cache holds exactly the hasher's codes of the cached keys, prefill and decode."""
    model, _ = smollm2
    attention = HashedAttention(budget=120, tier2=16, hasher=learned)
    _, cache = prefill(model, text_ids[:, :100], model.init_cache(1, 110, attention), attention)
    for t in range(100, 103):
        _, cache = decode_step(model, text_ids[:, t], cache, attention)
    keys = cache.k[:, 0].transpose(0, 2, 1, 3)  # [L, S, Hkv, D]
    expected = learned.encode_keys(keys).transpose(0, 2, 1, 3)  # [L, Hkv, S, W]
    np.testing.assert_array_equal(cache.codes[:, 0, :, :103], expected[:, :, :103])
    np.testing.assert_array_equal(cache.codes[:, 0, :, 103:], 0)  # unwritten slots stay empty


def test_adopting_an_exact_prefill_equals_its_own_prefill(smollm2, text_ids, learned):
    model, _ = smollm2
    attention = HashedAttention(budget=120, tier2=16, hasher=learned)
    _, own = prefill(model, text_ids[:, :100], model.init_cache(1, 110, attention), attention)
    _, exact = prefill(model, text_ids[:, :100], model.init_cache(1, 110, FULL), FULL)
    adopted = attention.adopt(exact)
    for got, expected in zip(jax.tree.leaves(adopted), jax.tree.leaves(own), strict=True):
        np.testing.assert_array_equal(got, expected)


# -- the tiers by hand --------------------------------------------------------------------------

TOY = ModelConfig(
    vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=3, num_heads=2,
    num_kv_heads=2, head_dim=4, max_position=64, name="toy",
)  # fmt: skip


def _toy_attention(**options) -> HashedAttention:
    """A hand-checkable DASH-KV: 2 KV heads of one query head each, 32-bit codes, 1 sink, a
    window of 2, tier 1 of 3 tokens, tier 2 of 2; the middle layer (1) is the only sparse one."""
    hasher = simhash(HasherConfig.for_model(TOY, bits=32), seed=0)
    settings = dict(budget=6, sinks=1, window=2, dense_first=1, dense_last=1, hasher=hasher)
    return HashedAttention(**{**settings, "tier2": 2, **options})


def _toy_cache(attention, distances_of_head):
    """A cache whose codes give each slot the Hamming distance distances_of_head[h][n] to an
    all-zero query code (a code of d ones): 16 slots, the newest token at position 15."""
    cache = attention.init_cache(TOY, 1, 16)
    codes = np.zeros((3, 1, 2, 16, 1), np.uint32)
    for h, distances in enumerate(distances_of_head):
        codes[1, 0, h, :, 0] = [(1 << d) - 1 for d in distances]
    return cache.replace(codes=jnp.asarray(codes), lengths=jnp.array([15], jnp.int32))


def _tiers(attention, cache, prior=None):
    q = jnp.zeros((1, 2, 1, 4))
    # The query code of an all-negative vector is all zeros: every bit of the projection is <= 0.
    attention = dataclasses.replace(attention, hasher=_zero_queries(attention.hasher))
    prior = prior or (jnp.full((1, attention.prior_size), -1), jnp.zeros((1, attention.prior_size)))
    tier1, tier2, _ = attention.tiers(cache, jnp.int32(1), q, cache.lengths, prior)
    return np.asarray(tier1)[0], np.asarray(tier2)[0]


def _zero_queries(hasher):
    """The same hasher, its query codes all zero whatever the query (a fixed query code)."""
    zeroed = nnx.clone(hasher)
    zeroed.key_encoder.w[...] = jnp.zeros_like(zeroed.key_encoder.w[...])
    return zeroed


def test_tiers_by_hand():
    attention = _toy_attention(consensus=False, momentum=False)
    # The middle is slots [1, 14) (sink 0, window 14-15). Head 0 ranks by (distance, slot):
    # 3 (d 1), 6 (d 2), then 4 and 9 (d 3, the older first), 1 (d 5): tier 1 = {3, 6, 4}, tier 2
    # = {9, 1}. Head 1 has every middle slot at distance 4 but slot 12 (d 1): tier 1 = {12, 1,
    # 2}, tier 2 = {3, 4}, ties going to the older tokens. Lists are in slot order.
    # Slot:    0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    head0 = [0, 5, 8, 1, 3, 7, 2, 9, 9, 3, 5, 6, 8, 9, 0, 0]
    head1 = [0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 1, 4, 0, 0]
    tier1, tier2 = _tiers(attention, _toy_cache(attention, [head0, head1]))
    assert tier1[0].tolist() == [3, 4, 6] and tier2[0].tolist() == [1, 9]
    assert tier1[1].tolist() == [1, 2, 12] and tier2[1].tolist() == [3, 4]


def test_consensus_pulls_in_what_both_heads_agree_on():
    # First-pass tier 1 (3 tokens; ties at the threshold count as votes): head 0 {5, 7, 8}
    # (d 1, 2, 3), head 1 {3, 11, 2} (d 1, 1, 2). No slot has both votes (t_vote = 2): nothing
    # moves.
    # Slot:    0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    head0 = [0, 9, 9, 9, 9, 1, 9, 2, 3, 9, 9, 9, 9, 9, 0, 0]
    head1 = [0, 9, 2, 1, 9, 3, 9, 9, 9, 9, 9, 1, 9, 9, 0, 0]
    voting = _toy_attention(consensus=True, momentum=False, tier2=0)
    voting.hasher.consensus_raw[...] = jnp.full((3,), float(np.log(np.expm1(3.0))))  # 3 units
    tier1, _ = _tiers(voting, _toy_cache(voting, [head0, head1]))
    assert tier1[1].tolist() == [2, 3, 11]
    # Slot 5 at distance 2 for head 1 ties slot 2 at its threshold: both heads now vote for it,
    # it loses 3 units in both (to 0), and head 1's tier 1 takes it over slot 2.
    head1[5] = 2
    tier1, _ = _tiers(voting, _toy_cache(voting, [head0, head1]))
    assert tier1[0].tolist() == [5, 7, 8] and tier1[1].tolist() == [3, 5, 11]
    plain = _toy_attention(consensus=False, momentum=False, tier2=0)
    tier1, _ = _tiers(plain, _toy_cache(plain, [head0, head1]))
    assert tier1[1].tolist() == [2, 3, 11]  # without the vote, the older slot 2 wins the tie


def test_momentum_keeps_what_the_last_layer_attended():
    head = [0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0, 0]  # every middle slot ties
    attention = _toy_attention(consensus=False, momentum=True, tier2=0)
    attention.hasher.momentum_raw[...] = jnp.full((3,), 10.0)  # about 10 G b units per unit
    cache = _toy_cache(attention, [head, head])
    tier1, _ = _tiers(attention, cache)
    assert tier1[0].tolist() == [1, 2, 3]  # the oldest
    m = attention.prior_size
    slots = jnp.full((1, m), -1).at[0, :2].set(jnp.array([9, 11]))
    prior = (slots, jnp.zeros((1, m)).at[0, :2].set(0.5))  # half the attention on each
    # Layer 1 is the first DASH-KV layer of the step: a prior there is stale and ignored.
    tier1, _ = _tiers(attention, cache, prior)
    assert tier1[0].tolist() == [1, 2, 3]
    later = dataclasses.replace(attention, dense_first=0)  # layer 0 is DASH-KV, 1 follows it
    tier1, _ = _tiers(later, cache, prior)
    assert tier1[0].tolist() == [1, 9, 11]


def test_anchoring_by_hand():
    # Exact logits 2, 4 at anchors whose approximate logits are 0 and 1: the mean gap is 2.5,
    # the least-squares line is exact = 2 approx + 2.
    at_anchors = jnp.array([[[0.0, 1.0, 7.0]]])  # [B=1, G=1, E=3]; the third is not an anchor
    exact = jnp.array([[[2.0, 4.0, -jnp.inf]]])
    ok = jnp.array([[True, True, False]])
    sums = anchor_sums(at_anchors, exact, ok)
    approx = jnp.array([[[3.0]]])
    np.testing.assert_allclose(apply_anchor(approx, sums, fit_slope=False), [[[5.5]]])
    np.testing.assert_allclose(apply_anchor(approx, sums, fit_slope=True), [[[8.0]]])


def test_the_cache_holds_one_prior_per_query(learned):
    attention = HashedAttention(budget=120, tier2=16, hasher=learned)
    cache = attention.init_cache(TOY, 2, 64)
    assert isinstance(cache, CodeCache)
    assert cache.prior_slots.shape == (2, 1, attention.prior_size)
    forced = dataclasses.replace(attention, teacher_forced=True)
    assert forced.init_cache(TOY, 2, 64).prior_slots.shape == (2, 64, attention.prior_size)


def test_bad_settings_are_refused(learned):
    with pytest.raises(ValueError, match="tier2"):
        HashedAttention(budget=120, tier2=-1, hasher=learned)
    with pytest.raises(ValueError, match="scoring"):
        HashedAttention(budget=120, hasher=learned, scoring="cosine")
