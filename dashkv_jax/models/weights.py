"""Turn per-layer weight matrices (Hugging Face [out, in] layout) into a `Llama`."""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax.errors import DashKVError
from dashkv_jax.models.config import ModelConfig
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


def build_model(
    config: ModelConfig, get: Callable[[str], np.ndarray | None], dtype=jnp.float32
) -> Llama:
    """Build a `Llama` from tensors named as in Hugging Face checkpoints.

    `get(name)` returns the tensor (linear weights [out, in]) or None when the file lacks it.
    """
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)

    def need(name: str) -> np.ndarray:
        tensor = get(name)
        if tensor is None:
            raise DashKVError(f"checkpoint has no tensor {name!r}")
        return tensor

    def to_jax(tensor: np.ndarray, expected_shape) -> jnp.ndarray:
        array = jnp.asarray(tensor, dtype)
        if array.shape != tuple(expected_shape):
            raise DashKVError(
                f"tensor has shape {array.shape}, the config expects {expected_shape}"
            )
        return array

    params["embed"] = to_jax(need("model.embed_tokens.weight"), params["embed"].shape)
    params["final_norm"] = to_jax(need("model.norm.weight"), params["final_norm"].shape)
    if not config.tie_embeddings:
        params["lm_head"] = to_jax(need("lm_head.weight").T, params["lm_head"].shape)
    for ours, suffix in HF_LAYER_NAMES.items():
        if ours not in params["layers"]:
            continue
        per_layer = [need(f"model.layers.{i}.{suffix}") for i in range(config.num_layers)]
        stacked = np.stack([t.T if t.ndim == 2 else t for t in per_layer])  # [L, in, out]
        params["layers"][ours] = to_jax(stacked, params["layers"][ours].shape)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
