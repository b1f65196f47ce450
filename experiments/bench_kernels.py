"""Benchmark packed-bit scoring and linear-time selection against float32 q.K and lax.top_k.

For each head shape and cache length N (batch 1), it times:
  read      a plain sum over the same code array: this machine's read bandwidth, in this run
  hamming   hamming_scores, and the GB/s of codes it reads
  asym      asymmetric_scores (real query weights against the packed bits)
  qk        exact float32 q.K logits of the same tokens (K in float32, head_dim wide), summed
            over the G query heads of each KV head
  select    the radix select (`pallas_kernels.select.select_topk`) of the hamming scores at
            k = N/32, on every backend (`pk.select_topk` routes to lax.top_k on GPU)
  top_k     lax.top_k of the same int32 scores, and of the float32 q.K scores
  pipeline  hamming_topk (scores + selection) against q.K + lax.top_k
and prints a table, then the goals as met or not. Times are the minimum over --repeats runs after
a warm-up (the machine may be shared; the load average is recorded).

XLA:CPU allocates its output buffers afresh on every call. Buffers of 32 MiB or more come from
mmap, and in a VM each 4 KiB page fault is slow, which can double the time of a 1M-token call.
Unless --no-hugepages is given, the script re-executes itself with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for malloc), for every contender
alike.

  python experiments/bench_kernels.py                 # N in {64K, 256K, 1M}, both shapes
  python experiments/bench_kernels.py --quick         # small N, a smoke test
  python experiments/bench_kernels.py --json out.json
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as is

HUGEPAGES = "glibc.malloc.hugetlb=1"
# name: (KV heads, query heads per KV head G, bits b, head_dim)
SHAPES = {
    "smollm2-135m": (3, 3, 128, 64),
    "llama3-8b": (8, 4, 128, 128),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default="65536,262144,1048576",
        help="comma-separated cache lengths N (default: %(default)s)",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated head shapes among {sorted(SHAPES)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument(
        "--implementation",
        default=None,
        help="scoring implementation (default: the best for this backend)",
    )
    parser.add_argument("--topk-divisor", type=int, default=32, help="k = N / this (default 32)")
    parser.add_argument("--quick", action="store_true", help="N in {4K, 16K}, 2 repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--no-hugepages", action="store_true", help=f"do not re-run with GLIBC_TUNABLES={HUGEPAGES}"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "4096,16384", 2
    return args


def reexec_with_hugepages(args):
    """Re-runs this script with malloc's transparent huge pages on (see the module docstring)."""
    if args.no_hugepages or HUGEPAGES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), HUGEPAGES]))
    os.execve(
        sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables}
    )


def main(argv=None):
    args = parse_args(argv)
    reexec_with_hugepages(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import pallas_kernels as pk
    from pallas_kernels.select import select_topk as radix_select  # on every backend

    def best_time(fn, *fn_args):
        jax.block_until_ready(fn(*fn_args))  # compile and warm up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times.append(time.perf_counter() - start)
        return min(times)

    read_sum = jax.jit(lambda x: jnp.sum(x, dtype=jnp.uint32))

    def float_logits(q, keys):  # [1, Hkv, G, d], [1, Hkv, N, d] -> [1, Hkv, N]
        return jnp.einsum("bhgd,bhnd->bhgn", q, keys).sum(axis=2)

    float_scores = jax.jit(float_logits)
    rng = np.random.default_rng(0)
    probe = jnp.asarray(rng.integers(0, 2**32, size=128 * 2**20, dtype=np.uint32))  # 512 MiB
    probe_gbps = probe.nbytes / best_time(read_sum, probe) / 1e9
    del probe
    load_before = os.getloadavg()

    rows = []
    for shape_name in args.shapes.split(","):
        kv_heads, g_size, bits, head_dim = SHAPES[shape_name]
        n_words = bits // 32
        for n_tokens in map(int, args.sizes.split(",")):
            k = n_tokens // args.topk_divisor
            q_codes = jnp.asarray(
                rng.integers(0, 2**32, size=(1, kv_heads, g_size, n_words), dtype=np.uint32)
            )
            k_codes = jnp.asarray(
                rng.integers(0, 2**32, size=(1, kv_heads, n_tokens, n_words), dtype=np.uint32)
            )
            q_weights = jnp.asarray(
                rng.standard_normal((1, kv_heads, g_size, bits), dtype=np.float32)
            )
            lengths = jnp.asarray([n_tokens], jnp.int32)
            q_float = jnp.asarray(
                rng.standard_normal((1, kv_heads, g_size, head_dim), dtype=np.float32)
            )
            keys = jnp.asarray(
                rng.standard_normal((1, kv_heads, n_tokens, head_dim), dtype=np.float32)
            )
            impl = args.implementation
            max_score = g_size * bits
            hamming = jax.jit(
                lambda q, c, n, impl=impl: pk.hamming_scores(q, c, n, implementation=impl)
            )
            asymmetric = jax.jit(
                lambda q, c, n, impl=impl: pk.asymmetric_scores(q, c, n, implementation=impl)
            )
            select = jax.jit(lambda s, k=k, r=max_score: radix_select(s, k, value_range=(-r, r)))
            top_k = jax.jit(lambda s, k=k: lax.top_k(s, k))
            fused = jax.jit(lambda q, c, n, k=k, impl=impl: pk.hamming_topk(q, c, n, k, impl))
            float_pipeline = jax.jit(lambda q, x, k=k: lax.top_k(float_logits(q, x), k))

            scores = hamming(q_codes, k_codes, lengths)
            logits = float_scores(q_float, keys)
            # The selection must equal lax.top_k; check it once on the real data.
            got, want = select(scores), top_k(scores)
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))

            t = {
                "read": best_time(read_sum, k_codes),
                "hamming": best_time(hamming, q_codes, k_codes, lengths),
                "asymmetric": best_time(asymmetric, q_weights, k_codes, lengths),
                "float_qk": best_time(float_scores, q_float, keys),
                "select": best_time(select, scores),
                "top_k_int32": best_time(top_k, scores),
                "top_k_float32": best_time(top_k, logits),
                "hamming_topk": best_time(fused, q_codes, k_codes, lengths),
                "float_qk_top_k": best_time(float_pipeline, q_float, keys),
            }
            code_bytes = k_codes.nbytes
            row = {
                "shape": shape_name,
                "kv_heads": kv_heads,
                "g": g_size,
                "bits": bits,
                "head_dim": head_dim,
                "n": n_tokens,
                "k": k,
                "code_mb": code_bytes / 1e6,
                "float_key_mb": keys.nbytes / 1e6,
                "seconds": t,
                "read_gbps": code_bytes / t["read"] / 1e9,
                "hamming_gbps": code_bytes / t["hamming"] / 1e9,
                "asymmetric_gbps": code_bytes / t["asymmetric"] / 1e9,
                "float_qk_gbps": keys.nbytes / t["float_qk"] / 1e9,
            }
            row["hamming_fraction_of_read"] = row["hamming_gbps"] / row["read_gbps"]
            row["select_speedup_vs_top_k_int32"] = t["top_k_int32"] / t["select"]
            row["select_speedup_vs_top_k_float32"] = t["top_k_float32"] / t["select"]
            row["pipeline_speedup"] = t["float_qk_top_k"] / t["hamming_topk"]
            rows.append(row)
            print_row(row, header=len(rows) == 1)
            del keys, logits, scores

    goals = evaluate_goals(rows, probe_gbps)
    print()
    for goal in goals:
        print(f"[{'met' if goal['met'] else 'NOT met'}] {goal['goal']}: {goal['measured']}")
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "gpu": "none in this run; GPU timings not measured",
        },
        "implementation": pk.resolve_implementation(args.implementation, 4),
        "read_probe_512mib_gbps": probe_gbps,
        "repeats": args.repeats,
        "rows": rows,
        "goals": goals,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


def print_row(row, header):
    columns = (
        ("shape", "{:>12}", row["shape"]),
        ("N", "{:>8}", row["n"]),
        ("codes MB", "{:>8.1f}", row["code_mb"]),
        ("read GB/s", "{:>9.1f}", row["read_gbps"]),
        ("ham ms", "{:>7.2f}", 1e3 * row["seconds"]["hamming"]),
        ("ham GB/s", "{:>8.1f}", row["hamming_gbps"]),
        ("%read", "{:>5.0%}", row["hamming_fraction_of_read"]),
        ("asym ms", "{:>7.2f}", 1e3 * row["seconds"]["asymmetric"]),
        ("qK ms", "{:>7.2f}", 1e3 * row["seconds"]["float_qk"]),
        ("select ms", "{:>9.2f}", 1e3 * row["seconds"]["select"]),
        ("topk i32", "{:>8.1f}", 1e3 * row["seconds"]["top_k_int32"]),
        ("topk f32", "{:>8.1f}", 1e3 * row["seconds"]["top_k_float32"]),
        ("x i32", "{:>5.1f}", row["select_speedup_vs_top_k_int32"]),
        ("x f32", "{:>5.1f}", row["select_speedup_vs_top_k_float32"]),
        ("ham+sel", "{:>7.2f}", 1e3 * row["seconds"]["hamming_topk"]),
        ("qK+topk", "{:>7.1f}", 1e3 * row["seconds"]["float_qk_top_k"]),
        ("x", "{:>5.1f}", row["pipeline_speedup"]),
    )
    if header:
        print(" ".join(f"{name:>{len(fmt.format(value))}}" for name, fmt, value in columns))
    print(" ".join(fmt.format(value) for _, fmt, value in columns), flush=True)


def evaluate_goals(rows, probe_gbps):
    largest = max(row["n"] for row in rows)
    at_largest = [row for row in rows if row["n"] == largest]
    worst_fraction = min(row["hamming_fraction_of_read"] for row in rows)
    return [
        {
            "goal": "scoring at >= 50% of the measured read bandwidth (every row)",
            "met": worst_fraction >= 0.5,
            "measured": f"worst {worst_fraction:.0%} of the same-array read "
            f"(512 MiB probe: {probe_gbps:.1f} GB/s)",
        },
        {
            "goal": f"selection >= 10x faster than lax.top_k at N={largest}, k=N/32 (int32 scores)",
            "met": min(row["select_speedup_vs_top_k_int32"] for row in at_largest) >= 10,
            "measured": ", ".join(
                f"{row['shape']}: {row['select_speedup_vs_top_k_int32']:.1f}x "
                f"(vs float32 top_k: {row['select_speedup_vs_top_k_float32']:.1f}x)"
                for row in at_largest
            ),
        },
        {
            "goal": "scoring + selection >= 4x faster than float32 q.K + lax.top_k (every row)",
            "met": min(row["pipeline_speedup"] for row in rows) >= 4,
            "measured": ", ".join(
                f"{row['shape']}@{row['n']}: {row['pipeline_speedup']:.1f}x" for row in rows
            ),
        },
    ]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
