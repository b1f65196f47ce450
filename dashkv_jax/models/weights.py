"""Turn per-layer weight matrices (Hugging Face [out, in] layout) into a `Llama` or a `Gemma3`."""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.errors import DashKVError
from dashkv_jax.models.config import Gemma3Config, ModelConfig
from dashkv_jax.models.gemma3 import Gemma3
from dashkv_jax.models.llama import Llama

# Our stacked parameter name -> Hugging Face per-layer tensor suffix (layer i: model.layers.{i}.).
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
# Gemma 3: QK-norm and the sandwich norms; norm weights as Hugging Face keeps them (scale 1 + w).
HF_GEMMA3_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "wo": "self_attn.o_proj.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def build_model(
    config: ModelConfig | Gemma3Config,
    get: Callable[[str], np.ndarray | None],
    dtype=jnp.float32,
) -> Llama | Gemma3:
    """Build a `Llama` (from a `ModelConfig`) or a `Gemma3` from tensors named as in Hugging
    Face checkpoints, in `dtype`.

    `get(name)` returns the tensor (linear weights [out, in]) or None when the file lacks it.
    Tensors are fetched one parameter at a time, so a loader may dequantise them lazily.
    """
    gemma = isinstance(config, Gemma3Config)
    family = Gemma3 if gemma else Llama
    layer_names = HF_GEMMA3_LAYER_NAMES if gemma else HF_LAYER_NAMES
    abstract = nnx.eval_shape(lambda: family(config, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)

    def need(name: str) -> np.ndarray:
        tensor = get(name)
        if tensor is None:
            raise DashKVError(f"checkpoint has no tensor {name!r}")
        return tensor

    def to_jax(tensor: np.ndarray, expected_shape) -> jnp.ndarray:
        if tensor.shape != tuple(expected_shape):
            raise DashKVError(
                f"tensor has shape {tensor.shape}, the config expects {tuple(expected_shape)}"
            )
        return jnp.asarray(tensor, dtype)

    params["embed"] = to_jax(need("model.embed_tokens.weight"), params["embed"].shape)
    params["final_norm"] = to_jax(need("model.norm.weight"), params["final_norm"].shape)
    if not gemma and not config.tie_embeddings:
        params["lm_head"] = to_jax(need("lm_head.weight").T, params["lm_head"].shape)
    for ours, suffix in layer_names.items():
        if ours not in params["layers"]:
            continue
        per_layer = [need(f"model.layers.{i}.{suffix}") for i in range(config.num_layers)]
        stacked = np.stack([t.T if t.ndim == 2 else t for t in per_layer])  # [L, in, out]
        del per_layer
        params["layers"][ours] = to_jax(stacked, params["layers"][ours].shape)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
