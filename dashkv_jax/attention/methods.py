"""Attention methods by name at a token budget: what `--attention` and evaluations choose from."""

import math
from fractions import Fraction
from pathlib import Path

from dashkv_jax.attention.eviction import H2OAttention, HashEvictAttention, SnapKVAttention
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
    "h2o": H2OAttention,  # eviction: a cache of `budget` tokens (attention.eviction)
    "snapkv": SnapKVAttention,
    "hashevict": HashEvictAttention,
}
# Hashed selection, by the hasher kind each needs.
HASHED = {"simhash": "simhash", "dashkv-symmetric": "symmetric", "dashkv": "asymmetric"}
METHODS = ("full", *BUDGETED, *HASHED)


def parse_budget(text: str, context: int, *, allow_zero: bool = False) -> int:
    """'1/32' (a fraction of the context) or '256' (tokens) -> tokens per KV head and step."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        message = f"budget {text!r} is neither a fraction like 1/32 nor a token count"
        raise DashKVError(message) from None
    if value < 0 or (value == 0 and not allow_zero):
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
    tier2: int = 0,
    **options,
) -> Attention:
    """The attention backend called `method`, keeping `budget` tokens per KV head and step
    exactly (sinks + window + what it selects).

    Hashed methods need `model` (a `Llama`) and take `hasher` (a `Hasher` or an artifact path;
    `dashkv` and `dashkv-symmetric` default to the hashers shipped for the bundled model;
    `simhash` builds random projections with the same bits), `tier2` approximate tokens, and
    `options` of `HashedAttention` (consensus, momentum, residual, scoring, dense_first,
    dense_last). Their sandwich defaults to the hasher's; every other budget method takes the
    same dense layers as the shipped hasher unless `options` say otherwise.
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
        known = {"dense_first", "dense_last"}
        if unknown := set(options) - known:
            raise DashKVError(f"--attention {method} takes no {', '.join(sorted(unknown))}")
        if method == "hashevict":  # SimHash projections shaped like the model's heads
            if model is None:
                raise DashKVError("--attention hashevict needs the model its codes are for")
            options["hasher"] = HashEvictAttention.projections(model.config)
        return BUDGETED[method](budget=budget, **options)
    hasher = method_hasher(method, model, hasher)
    c = hasher.config
    options = {"dense_first": c.dense_first, "dense_last": c.dense_last, **options}
    options.setdefault("scoring", c.scoring)
    try:
        return HashedAttention(budget=budget, hasher=hasher, tier2=tier2, **options)
    except (TypeError, ValueError) as err:
        raise DashKVError(f"--attention {method}: {err}") from None


def method_hasher(method: str, model, hasher) -> Hasher:
    """The hasher hashed `method` runs with: `hasher` (a `Hasher` or an artifact path, checked
    against `model`), else the one shipped for `model` in checkpoints/. `simhash` builds random
    projections with the bits, tiers and sandwich of `hasher` (an asymmetric one) or of the
    shipped one, or the defaults for a model without one."""
    from dashkv_jax.hashing.artifact import load_hasher, shipped_hasher

    if model is None:
        raise DashKVError(f"--attention {method} needs the model its hasher must fit")
    kind = HASHED[method]
    if kind == "simhash" and not (isinstance(hasher, Hasher) and hasher.config.kind == kind):
        hasher = hasher if hasher is not None else shipped_hasher(model)
        if hasher is None:
            return simhash(HasherConfig.for_model(model.config))
        reference = hasher if isinstance(hasher, Hasher) else load_hasher(hasher, model)
        return simhash(reference.config)
    if hasher is None:
        hasher = shipped_hasher(model, kind)
        if hasher is None:
            raise DashKVError(
                f"no {kind} hasher is shipped for {model.config.name!r}: give --hasher DIR "
                "(experiments/train.py trains one)"
            )
    if not isinstance(hasher, Hasher):
        hasher = load_hasher(hasher, model)
    if hasher.config.kind != kind:
        raise DashKVError(
            f"--attention {method} needs a {kind} hasher, got a {hasher.config.kind} one"
        )
    return hasher


def make_methods(
    model,
    names,
    context: int,
    budget: str | None = "1/32",
    tier2: str | None = None,
    hasher=None,
    symmetric=None,
    options: dict | None = None,
    equal_bytes: bool = False,
) -> dict:
    """{name: backend} for method names compared side by side on a `context`-token text, at an
    exact `budget` and `tier2` approximate tokens (fractions of `context` or counts; tier 2
    defaults to the dashkv hasher's). SimHash gets the dashkv hasher's bits, tiers and
    sandwich; `options` go to every budget method that takes them (dense layers to all, the
    rest to hashed ones). `budget` may be None when every name is "full".

    With `equal_bytes`, every budget method that is not hashed gets the token budget whose
    bytes per step and KV head (`step_bytes`, at the whole context) match DASH-KV's at `budget`
    and `tier2`: the hashed ones read codes and tier 2's V besides their exact tokens, so equal
    token budgets are not equal work.
    """
    from dashkv_jax.hashing.encoders import simhash

    options = options or {}
    hashers, approx = {}, 0
    if any(name in HASHED for name in names) or equal_bytes:
        reference = method_hasher("dashkv", model, hasher)
        fraction = reference.config.tier2 if tier2 is None else str(tier2)
        approx = parse_budget(fraction, context, allow_zero=True)
        hashers = {
            "dashkv": reference,
            "dashkv-symmetric": symmetric,
            "simhash": simhash(reference.config),
        }
    methods = {}
    for name in names:
        if name == "full":
            methods[name] = FullAttention()
            continue
        if budget is None:
            raise DashKVError(f"--attention {name} needs a --budget")
        tokens = parse_budget(str(budget), context)
        kwargs = {k: v for k, v in options.items() if k.startswith("dense")}
        if name in hashers:
            kwargs = {"hasher": hashers[name], "tier2": approx, **options}
        elif equal_bytes:
            dashkv = make_attention("dashkv", tokens, model, hasher=reference, tier2=approx)
            tokens = equal_bytes_budget(name, model, dashkv, context, **kwargs)
        methods[name] = make_attention(name, tokens, model, **kwargs)
    return methods


def equal_bytes_budget(name: str, model, reference, context: int, **options) -> int:
    """The token budget at which method `name` reads per step and KV head what `reference`
    reads at its own budget and tier 2, over a `context`-token cache (`step_bytes` is linear
    in the tokens read: solved for them)."""
    d, itemsize = model.config.head_dim, model.embed[...].dtype.itemsize
    target = reference.step_bytes(reference.budget, reference.tier2, context, d, itemsize)
    floor = SparseAttention.sinks + SparseAttention.window + 1
    probe = make_attention(name, floor, model, **options)
    base = probe.step_bytes(0, 0, context, d, itemsize)
    per_token = probe.step_bytes(1, 0, context, d, itemsize) - base
    return int(min(max((target - base) // per_token, floor), context))
