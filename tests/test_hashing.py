"""Hash encoders, distances, the tier-2 logit and the hasher artifact: shapes, packing, exact
distances, validation."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.artifact import (
    DEFAULT_HASHER,
    DEFAULT_SYMMETRIC_HASHER,
    load_hasher,
    read_metadata,
    save_hasher,
)
from dashkv_jax.hashing.encoders import (
    Hasher,
    HasherConfig,
    fit_input_stats,
    signs,
    simhash,
    soft_agreement,
)
from dashkv_jax.hashing.retrieval import group_distances
from dashkv_jax.models.config import ModelConfig
from pallas_kernels.packing import pack_bits
from pallas_kernels.reference import group_agreement

LAYERS, HQ, HKV, D = 3, 6, 2, 16  # G = 3 query heads per KV head


def _config(**overrides) -> HasherConfig:
    return HasherConfig("toy", LAYERS, HQ, HKV, D, **{"bits": 64, **overrides})


def _inputs(seed=0, n=5):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(LAYERS, n, HKV, D)).astype(np.float32) + 0.5  # off-centre keys
    q = rng.normal(size=(LAYERS, 4, HQ, D)).astype(np.float32)
    return jnp.asarray(k), jnp.asarray(q)


@pytest.mark.parametrize("kind", ["asymmetric", "symmetric", "simhash"])
def test_shapes_and_per_layer_calls_match_the_stacked_call(kind):
    hasher = Hasher(_config(kind=kind, query_hidden=(8, 8)), rngs=nnx.Rngs(0))
    k, q = _inputs()
    codes, q_codes, weights = (
        hasher.encode_keys(k),
        hasher.encode_queries(q),
        hasher.query_weights(q),
    )
    assert codes.shape == (LAYERS, 5, HKV, 2) and codes.dtype == jnp.uint32
    assert q_codes.shape == (LAYERS, 4, HQ, 2) and q_codes.dtype == jnp.uint32
    assert weights.shape == (LAYERS, 4, HQ, 64) and float(jnp.max(jnp.abs(weights))) <= 1

    @jax.jit
    def traced(layer):  # the decode path: a traced layer index inside the layer scan
        return hasher.encode_keys(k[layer], layer), hasher.query_weights(q[layer], layer)

    for layer in range(LAYERS):
        np.testing.assert_array_equal(hasher.encode_keys(k[layer], layer), codes[layer])
        traced_codes, traced_weights = traced(layer)
        np.testing.assert_array_equal(traced_codes, codes[layer])
        np.testing.assert_allclose(traced_weights, weights[layer], atol=1e-6)


def test_codes_are_the_packed_signs_of_the_logits():
    hasher = Hasher(_config(), rngs=nnx.Rngs(1))
    k, q = _inputs(1)
    logits = hasher.key_logits(k)
    np.testing.assert_array_equal(hasher.encode_keys(k), pack_bits(logits))
    np.testing.assert_array_equal(signs(hasher.encode_keys(k)), jnp.where(logits > 0, 1.0, -1.0))
    np.testing.assert_array_equal(
        signs(hasher.encode_queries(q)), jnp.where(hasher.query_logits(q) > 0, 1.0, -1.0)
    )


def test_group_distances_are_the_design_formula():
    """D = sum over the KV head's G query heads of popcount(q_j XOR k), counted bit by bit."""
    hasher = Hasher(_config(), rngs=nnx.Rngs(2))
    k, q = _inputs(2)
    layer = 1
    k_codes = np.asarray(hasher.encode_keys(k[layer], layer))  # [T, Hkv, W]
    q_codes = np.asarray(hasher.encode_queries(q[layer], layer))  # [Q, Hq, W]
    distance = np.asarray(group_distances(hasher, q[layer], k[layer], layer))  # [Hkv, Q, T]
    for h in range(HKV):
        for qi in range(q_codes.shape[0]):
            for t in range(k_codes.shape[0]):
                xor = q_codes[qi, h * 3 : h * 3 + 3] ^ k_codes[t, h]  # [G, W]
                assert distance[h, qi, t] == sum(bin(int(w)).count("1") for w in xor.ravel())


def test_group_distances_equal_the_kernel_reference():
    import pallas_kernels as pk

    hasher = Hasher(_config(), rngs=nnx.Rngs(3))
    k, q = _inputs(3, n=40)
    layer = 2
    want = group_distances(hasher, q[layer, :1], k[layer], layer)[:, 0]  # [Hkv, T]
    kernel_k = hasher.encode_keys(k[layer], layer).transpose(1, 0, 2)[None]  # [1, Hkv, T, W]
    kernel_q = hasher.encode_queries(q[layer, :1], layer).reshape(1, HKV, 3, -1)
    everything = (jnp.array([0], jnp.int32), jnp.array([40], jnp.int32))
    got, histogram = pk.hamming_histogram(kernel_q, kernel_k, *everything)
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(histogram[0].sum(-1), 40)


def test_group_agreement_counts_equal_bits_per_group():
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.integers(0, 2**32, size=(5, 4), dtype=np.uint32))  # b = 128
    k = jnp.asarray(rng.integers(0, 2**32, size=(5, 4), dtype=np.uint32))
    q_bits, k_bits = np.asarray(signs(q)), np.asarray(signs(k))  # [5, 128] +-1
    same = (q_bits == k_bits).reshape(5, 16, 8).mean(-1)  # 16 groups of 8 bits
    np.testing.assert_allclose(group_agreement(q, k, 16), same)
    np.testing.assert_allclose(
        group_agreement(q, k, 2), (q_bits == k_bits).reshape(5, 2, 64).mean(-1)
    )
    # The relaxation agrees with the counts on +-1 codes.
    np.testing.assert_allclose(soft_agreement(jnp.asarray(q_bits), jnp.asarray(k_bits), 16), same)


def test_tier2_logits_are_the_scaled_similarity_plus_a_residual():
    hasher = Hasher(_config(), rngs=nnx.Rngs(6))
    similarity = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (HQ, 7)), jnp.float32)
    neutral = jnp.full((HQ, 7, 16), 0.5)  # every group half equal: residual input 0
    hasher.residual.maps[1].w[...] = jnp.zeros_like(hasher.residual.maps[1].w[...])
    got = hasher.approx_logits(similarity, neutral, 1)
    np.testing.assert_allclose(got, hasher.logit_scale[...][1][:, None] * similarity, rtol=1e-6)
    # SimHash has no learned map: its "logits" are the similarity itself.
    base = simhash(_config(), seed=0)
    np.testing.assert_array_equal(base.approx_logits(similarity, neutral, 1), similarity)
    assert np.all(np.asarray(base.discounts()[0]) < 1e-6)


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_decoding_computes_the_tier2_map_from_the_codes(implementation):
    # pallas_kernels.code_logits with the hasher's weights of a layer: the hasher's own map of
    # the codes' similarity and per-group agreement, at every slot named; -inf where none is.
    hasher = Hasher(_config(), rngs=nnx.Rngs(7))  # 64 bits: 16 groups of 4
    last = hasher.residual.maps[1]
    last.w[...] = jax.random.normal(jax.random.key(7), last.w[...].shape)  # not the tiny init
    rng = np.random.default_rng(7)
    g, k = HQ // HKV, 21
    q_codes = jnp.asarray(rng.integers(0, 2**32, (1, HKV, g, 2), dtype=np.uint32))
    k_codes = jnp.asarray(rng.integers(0, 2**32, (LAYERS, 1, HKV, 40, 2), dtype=np.uint32))
    slots = jnp.asarray(rng.integers(-1, 40, (1, HKV, k)), jnp.int32)
    scale, mlp = hasher.code_logit_weights(1)
    got = pk.code_logits(
        q_codes, k_codes, slots, scale.reshape(HKV, g), mlp, groups=16, layer=1,
        implementation=implementation,
    )[0]  # fmt: skip
    codes = k_codes[1, 0][np.arange(HKV)[:, None], np.maximum(slots[0], 0)]  # [Hkv, K, W]
    pair = (q_codes[0][:, :, None], codes[:, None])  # [Hkv, G, K, W]
    similarity = (1.0 - 2.0 * jax.lax.population_count(pair[0] ^ pair[1]).sum(-1) / 64).reshape(
        HQ, k
    )
    agreement = group_agreement(*pair, 16).reshape(HQ, k, 16)
    want = hasher.approx_logits(similarity, agreement, 1).reshape(HKV, g, k)
    named = np.broadcast_to(np.asarray(slots[0, :, None] >= 0), want.shape)
    np.testing.assert_array_equal(np.isneginf(got), ~named)
    np.testing.assert_allclose(got[named], want[named], rtol=1e-5, atol=1e-5)
    scaled = (scale[:, None] * similarity).reshape(HKV, g, k)
    assert np.abs(got[named] - scaled[named]).mean() > 0.1  # the residual MLP takes part


def test_symmetric_queries_use_their_kv_heads_encoder():
    hasher = Hasher(_config(kind="symmetric"), rngs=nnx.Rngs(4))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(LAYERS, 7, HKV, D)), jnp.float32)
    as_queries = jnp.repeat(x, 3, axis=2)  # query head j sees what KV head j // 3 sees
    np.testing.assert_array_equal(
        hasher.encode_queries(as_queries), jnp.repeat(hasher.encode_keys(x), 3, axis=2)
    )


def test_simhash_is_a_scale_free_random_projection():
    base = simhash(_config(), seed=5)
    assert base.config.kind == "simhash" and base.config.scoring == "hamming"
    k, q = _inputs(5)
    np.testing.assert_array_equal(base.encode_keys(k), base.encode_keys(3.0 * k))
    np.testing.assert_array_equal(base.encode_queries(q), base.encode_queries(0.1 * q))
    assert not np.array_equal(base.encode_keys(k), simhash(_config(), seed=6).encode_keys(k))


def test_fit_input_stats_centres_keys():
    hasher = Hasher(_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    keys = rng.normal(3.0, 2.0, size=(2, LAYERS, 50, HKV, D)).astype(np.float32)
    queries = rng.normal(0.0, 5.0, size=(20, LAYERS, HQ, D)).astype(np.float32)
    fit_input_stats(hasher, keys, queries, sinks=4)
    np.testing.assert_allclose(hasher.key_mean[...], keys[:, :, 4:].mean(axis=(0, 2)), atol=1e-5)
    np.testing.assert_allclose(hasher.key_scale[...], 2.0, rtol=0.1)
    np.testing.assert_allclose(hasher.query_scale[...], 5.0, rtol=0.1)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"bits": 48}, "multiple of 32"),
        ({"kind": "lsh"}, "kind"),
        ({"query_hidden": (0,)}, "widths"),
        ({"scoring": "cosine"}, "scoring"),
        ({"kind": "symmetric", "scoring": "asymmetric"}, "asymmetric scoring"),
        ({"residual_groups": 3}, "residual_groups"),
        ({"tier2": "x"}, "tier2"),
        ({"dense_first": -1}, "dense layers"),
    ],
)
def test_bad_configs_are_refused(overrides, needle):
    with pytest.raises(DashKVError, match=needle):
        _config(**overrides)


def _model_like(**overrides):
    """An object with a `.config` like a loaded model's (validation reads nothing else)."""
    config = ModelConfig(
        vocab_size=10,
        hidden_size=HQ * D,
        intermediate_size=8,
        num_layers=LAYERS,
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        max_position=64,
        name="toy",
    )
    return type("Model", (), {"config": dataclasses.replace(config, **overrides)})()


def test_artifact_round_trip(tmp_path):
    hasher = Hasher(
        _config(kind="asymmetric", query_hidden=(8, 8), train_length=512), rngs=nnx.Rngs(7)
    )
    hasher.key_mean[...] = jnp.full(hasher.key_mean.shape, 0.25)
    save_hasher(hasher, tmp_path / "h", metadata={"heldout": {"recall_at_100": 0.5}})
    loaded = load_hasher(tmp_path / "h", _model_like(), bits=64)
    assert loaded.config == hasher.config
    k, q = _inputs(7)
    np.testing.assert_array_equal(loaded.encode_keys(k), hasher.encode_keys(k))
    np.testing.assert_array_equal(loaded.query_weights(q), hasher.query_weights(q))
    meta = read_metadata(tmp_path / "h")
    assert meta["heldout"] == {"recall_at_100": 0.5} and meta["config"]["bits"] == 64
    assert meta["format"] == 2 and meta["config"]["query_hidden"] == [8, 8]
    assert meta["config"]["train_length"] == 512 and meta["config"]["tier2"] == "1/64"


def test_a_mismatched_hasher_is_refused_naming_what_differs(tmp_path):
    save_hasher(Hasher(_config(), rngs=nnx.Rngs(0)), tmp_path / "h")
    other = _model_like(num_layers=4, head_dim=32, name="other")
    with pytest.raises(DashKVError) as err:
        load_hasher(tmp_path / "h", other)
    message = str(err.value)
    assert "num_layers 3 != 4" in message and "head_dim 16 != 32" in message
    assert "model id 'toy' != 'other'" in message
    with pytest.raises(DashKVError, match="bits 64 != 128"):
        load_hasher(tmp_path / "h", _model_like(), bits=128)
    # The same shape under another name loads when asked not to compare ids.
    load_hasher(tmp_path / "h", _model_like(name="renamed"), check_model_id=False)


def test_missing_or_damaged_artifacts_give_clear_errors(tmp_path):
    with pytest.raises(DashKVError, match="no hasher at"):
        load_hasher(tmp_path / "absent")
    save_hasher(Hasher(_config(), rngs=nnx.Rngs(0)), tmp_path / "h")
    meta = tmp_path / "h" / "hasher.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "format": 99}))
    with pytest.raises(DashKVError, match="not a format-2 hasher"):
        load_hasher(tmp_path / "h")
    meta.write_text(json.dumps({**record, "format": 1}))  # the two-stage method's artifacts
    with pytest.raises(DashKVError, match="before DASH-KV's three tiers .* retrain"):
        load_hasher(tmp_path / "h")


def test_the_shipped_hashers_fit_the_bundled_model(smollm2):
    model, _ = smollm2
    hasher = load_hasher(DEFAULT_HASHER, model)
    c = hasher.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.kind == "asymmetric" and c.bits == 128 and c.scoring == "hamming"
    assert 0 < c.train_length <= 2048  # short-train, long-infer
    size = sum(f.stat().st_size for f in DEFAULT_HASHER.rglob("*") if f.is_file())
    assert size < 32e6  # float32: the query MLPs 17.7 MB, their linear skips 8.8 MB
    meta = read_metadata(DEFAULT_HASHER)
    held = meta["heldout"]
    assert held["asymmetric"]["recall_at_100"] > held["simhash"]["recall_at_100"]
    symmetric = load_hasher(DEFAULT_SYMMETRIC_HASHER, model)
    assert symmetric.config.kind == "symmetric" and symmetric.config.bits == 128
