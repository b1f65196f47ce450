"""DASH-KV decode attention: code cache, coarse filter + exact cut, exactness at full budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dashkv_jax import data
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.hashed import HashedAttention, adaptive_cut
from dashkv_jax.hashing.encoders import HasherConfig, simhash
from dashkv_jax.models.llama import decode_step, prefill

FULL = FullAttention()


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tokenizer = smollm2
    docs = data.load_documents(split="heldout")
    return jnp.asarray(next(data.iter_token_windows(docs, tokenizer, 180))[None])


@pytest.fixture(scope="module")
def random_hasher(smollm2):
    model, _ = smollm2
    return simhash(HasherConfig.for_model(model.config, bits=64), seed=3)


def test_adaptive_cut_by_hand():
    # Sorted masses 0.5, 0.3, 0.1, 0.05, 0.05 (total 1). Mass before each: 0, .5, .8, .9, .95.
    # tau = 0.75: keep while the mass before is < 0.75 -> the first 2 (0.5 + 0.3 = 0.8 >= 0.75).
    mass = jnp.array([[0.5, 0.3, 0.1, 0.05, 0.05]])
    total = mass.sum(-1, keepdims=True)
    assert adaptive_cut(mass, total, 0.75, k_min=1).tolist() == [[True, True, False, False, False]]
    # k_min raises the floor to 3; tau = 1 keeps all five.
    assert adaptive_cut(mass, total, 0.75, k_min=3).sum() == 3
    assert adaptive_cut(mass, total, 1.0, k_min=1).sum() == 5


@pytest.mark.parametrize("scoring", ["hamming", "asymmetric"])
def test_budget_covering_the_context_equals_full_attention(
    smollm2, text_ids, random_hasher, scoring
):

    model, _ = smollm2
    attention = HashedAttention(
        budget=256, candidates=256, tau=1.0, hasher=random_hasher, scoring=scoring
    )
    _, full_cache = prefill(model, text_ids[:, :170], model.init_cache(1, 192, FULL), FULL)
    _, cache = prefill(model, text_ids[:, :170], model.init_cache(1, 192, attention), attention)
    for t in range(170, 173):
        expected, full_cache = decode_step(model, text_ids[:, t], full_cache, FULL)
        got, cache = decode_step(model, text_ids[:, t], cache, attention)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Sparse layers attended every token: 173 = 170 prompt + 3 decoded.
    np.testing.assert_array_equal(cache.attended[2:], 173)


def test_codes_are_written_once_per_token(smollm2, text_ids, random_hasher):
    """The code cache holds exactly the hasher's codes of the cached keys, prefill and decode."""
    model, _ = smollm2
    attention = HashedAttention(budget=120, candidates=160, hasher=random_hasher)
    _, cache = prefill(model, text_ids[:, :100], model.init_cache(1, 110, attention), attention)
    for t in range(100, 103):
        _, cache = decode_step(model, text_ids[:, t], cache, attention)
    keys = cache.k[:, 0].transpose(0, 2, 1, 3)  # [L, S, Hkv, D]
    expected = random_hasher.encode_keys(keys).transpose(0, 2, 1, 3)  # [L, Hkv, S, W]
    np.testing.assert_array_equal(cache.codes[:, 0, :, :103], expected[:, :, :103])
    np.testing.assert_array_equal(cache.codes[:, 0, :, 103:], 0)  # unwritten slots stay empty


def test_adopting_an_exact_prefill_equals_its_own_prefill(smollm2, text_ids, random_hasher):
    model, _ = smollm2
    attention = HashedAttention(budget=120, candidates=160, hasher=random_hasher)
    _, own = prefill(model, text_ids[:, :100], model.init_cache(1, 110, attention), attention)
    _, exact = prefill(model, text_ids[:, :100], model.init_cache(1, 110, FULL), FULL)
    adopted = attention.adopt(exact)
    for got, expected in zip(jax.tree.leaves(adopted), jax.tree.leaves(own), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_small_budget_spends_within_its_bounds(smollm2, text_ids, random_hasher):
    model, _ = smollm2
    attention = HashedAttention(
        budget=100, candidates=120, tau=0.9, k_min=8, hasher=random_hasher, dense_layers=2
    )
    _, cache = prefill(model, text_ids[:, :170], model.init_cache(1, 192, attention), attention)
    logits, cache = decode_step(model, text_ids[:, 170], cache, attention)
    attended = np.asarray(cache.attended[2:])
    # sinks 4 + window 64 + between k_min 8 and k_max 32 selected tokens.
    assert (attended >= 4 + 64 + 8).all() and (attended <= 100).all()
    assert np.isfinite(np.asarray(logits)).all()


def test_candidates_must_cover_the_selection(random_hasher):
    with pytest.raises(ValueError, match="candidates"):
        HashedAttention(budget=300, candidates=100, hasher=random_hasher)
