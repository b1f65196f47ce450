"""Attention methods by name at a token budget: what `--attention` and evaluations choose from."""

import math
from fractions import Fraction

from dashkv_jax.attention import Attention, FullAttention
from dashkv_jax.errors import DashKVError
from dashkv_jax.sparse import OracleAttention, QuestAttention, SparseAttention, StreamingAttention

BUDGETED = {
    "oracle": OracleAttention,
    "streaming": StreamingAttention,
    "quest": QuestAttention,
}
METHODS = ("full", *BUDGETED)


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


def make_attention(method: str, budget: int | None = None) -> Attention:
    """The attention backend called `method`, keeping `budget` tokens per KV head and step."""
    if method == "full":
        return FullAttention()
    if method not in BUDGETED:
        raise DashKVError(f"unknown attention method {method!r} (known: {', '.join(METHODS)})")
    if budget is None:
        raise DashKVError(f"--attention {method} needs a --budget")
    defaults = SparseAttention.__dataclass_fields__
    floor = defaults["sinks"].default + defaults["window"].default
    if budget <= floor:
        raise DashKVError(
            f"budget of {budget} tokens leaves nothing to select beyond the {floor} sink and "
            "window tokens every method keeps"
        )
    return BUDGETED[method](budget=budget)
