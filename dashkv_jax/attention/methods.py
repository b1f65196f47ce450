"""Attention methods by name at a token budget: what `--attention` and evaluations choose from."""

import math
from fractions import Fraction
from pathlib import Path

from dashkv_jax.attention.full import FullAttention
from dashkv_jax.attention.hashed import HashedAttention
from dashkv_jax.attention.sparse import (
    OracleAttention,
    QuestAttention,
    SparseAttention,
    StreamingAttention,
)
from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.encoders import Hasher, HasherConfig, simhash
from dashkv_jax.models.causal import Attention

BUDGETED = {
    "oracle": OracleAttention,
    "streaming": StreamingAttention,
    "quest": QuestAttention,
}
# Hashed selection, by the hasher kind each needs.
HASHED = {"simhash": "simhash", "dashkv-symmetric": "symmetric", "dashkv": "asymmetric"}
METHODS = ("full", *BUDGETED, *HASHED)
DEFAULT_CANDIDATES = "1/8"


def parse_budget(text: str, context: int) -> int:
    """'1/32' (a fraction of the context) or '256' (tokens) -> tokens attended per KV head."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        message = f"budget {text!r} is neither a fraction like 1/32 nor a token count"
        raise DashKVError(message) from None
    if value <= 0:
        raise DashKVError(f"budget must be positive, got {text!r}")
    tokens = math.ceil(value * context) if value < 1 or "/" in text else int(value)
    if tokens > context:
        raise DashKVError(f"budget of {tokens} tokens is larger than the context of {context}")
    return tokens


def make_attention(
    method: str,
    budget: int | None = None,
    model=None,
    *,
    hasher: Hasher | str | Path | None = None,
    candidates: int | None = None,
) -> Attention:
    """The attention backend called `method`, keeping `budget` tokens per KV head and step.

    Hashed methods need `model` (a `Llama`) and take `hasher` (a `Hasher` or an artifact path;
    `dashkv` and `dashkv-symmetric` default to the hashers shipped for the bundled model;
    `simhash` builds random projections with the same bits) and `candidates`, the coarse
    filter's output size.
    """
    if method == "full":
        return FullAttention()
    if method not in METHODS:
        raise DashKVError(f"unknown attention method {method!r} (known: {', '.join(METHODS)})")
    if budget is None:
        raise DashKVError(f"--attention {method} needs a --budget")
    floor = SparseAttention.sinks + SparseAttention.window  # the dataclass defaults
    if budget <= floor:
        raise DashKVError(
            f"budget of {budget} tokens leaves nothing to select beyond the {floor} sink and "
            "window tokens every method keeps"
        )
    if method in BUDGETED:
        return BUDGETED[method](budget=budget)
    hasher = method_hasher(method, model, hasher)
    selected = budget - floor
    return HashedAttention(
        budget=budget,
        hasher=hasher,
        candidates=max(candidates or 0, selected),
        scoring=hasher.config.scoring,
    )


def method_hasher(method: str, model, hasher) -> Hasher:
    """The hasher hashed `method` runs with: `hasher` (a `Hasher` or an artifact path, checked
    against `model`), else the one shipped for the bundled model (random projections for
    `simhash`)."""
    from dashkv_jax.hashing.artifact import DEFAULT_HASHER, DEFAULT_SYMMETRIC_HASHER, load_hasher

    if model is None:
        raise DashKVError(f"--attention {method} needs the model its hasher must fit")
    kind = HASHED[method]
    if kind == "simhash" and not isinstance(hasher, Hasher):
        bits = load_hasher(hasher, model).config.bits if hasher else 128
        return simhash(HasherConfig.for_model(model.config, bits=bits))
    if hasher is None:  # the ones shipped for the bundled model; load_hasher checks the fit
        hasher = DEFAULT_HASHER if kind == "asymmetric" else DEFAULT_SYMMETRIC_HASHER
    if not isinstance(hasher, Hasher):
        hasher = load_hasher(hasher, model)
    if hasher.config.kind != kind:
        raise DashKVError(
            f"--attention {method} needs a {kind} hasher, got a {hasher.config.kind} one"
        )
    return hasher
