"""Logits and tokenizer parity with an independent implementation: Hugging Face transformers.

Needs the `reference` extra (transformers, accelerate, torch CPU); `make test` installs it.
"""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from dashkv_jax import data, load_model
from dashkv_jax.models.llama import forward
from dashkv_jax.models.loaders import bundled_gguf_path
from dashkv_jax.models.tokenizer import render_chat

torch = pytest.importorskip(
    "torch", reason="reference extra not installed (pip install .[reference])"
)
transformers = pytest.importorskip(
    "transformers", reason="reference extra not installed (pip install .[reference])"
)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def _save_tiny(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    return model


@pytest.mark.parametrize(
    "config",
    [
        transformers.LlamaConfig(**TINY, rope_theta=10000.0),
        transformers.LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=500000.0),
        transformers.LlamaConfig(
            **TINY,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        transformers.MistralConfig(**TINY, sliding_window=None),
        transformers.Qwen2Config(**TINY, use_sliding_window=False),
    ],
    ids=["llama", "llama-tied", "llama3-rope-scaling", "mistral", "qwen2"],
)
def test_tiny_hf_checkpoint_logits_match_transformers(tmp_path, config):
    reference = _save_tiny(tmp_path, config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 40), dtype=np.int32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long()).logits.numpy()
    model, _ = load_model(str(tmp_path))
    ours = np.asarray(forward(model, ids))
    assert np.abs(ours - expected).max() <= 1e-4


def test_tiny_hf_checkpoint_reads_chat_template(tmp_path):
    _save_tiny(tmp_path, transformers.LlamaConfig(**TINY))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    model, _ = load_model(str(tmp_path))
    assert render_chat(model.chat_template, [{"role": "user", "content": "hi"}]) == "<user>hi"


@pytest.fixture(scope="module")
def transformers_gguf():
    path = bundled_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, tokenizer


def _real_texts():
    docs = data.load_documents(split="heldout")
    return [docs[i]["text"][:2000] for i in range(3)]


def test_bundled_gguf_logits_match_transformers(smollm2, transformers_gguf):
    ours_model, ours_tokenizer = smollm2
    reference, _ = transformers_gguf
    ids = next(data.iter_token_windows(data.load_documents(split="heldout"), ours_tokenizer, 256))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids[None]).long()).logits.numpy()
    ours = np.asarray(forward(ours_model, ids[None]))
    diff = np.abs(ours - expected).max()
    print(f"max |logit difference| over 256 real tokens: {diff:.2e}")
    assert diff <= 2e-3


def test_bundled_tokenizer_matches_transformers(smollm2, transformers_gguf):
    model, ours = smollm2
    _, theirs = transformers_gguf
    for text in _real_texts():
        assert ours.encode(text).ids == theirs(text)["input_ids"]
        messages = [{"role": "user", "content": text[:300]}]
        chat_theirs = theirs.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        chat_ours = render_chat(model.chat_template, messages)
        assert chat_ours == chat_theirs
        assert ours.encode(chat_ours).ids == theirs(chat_theirs)["input_ids"]
