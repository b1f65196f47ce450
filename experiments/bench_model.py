"""Prefill and decode throughput of a model with full attention on this machine.

    python experiments/bench_model.py                      # 512/2048/8192 prefill, 512/8192 decode
    python experiments/bench_model.py --prefill 512 --decode 512 --json out.json
    python experiments/bench_model.py --prefill '' --decode '' --capture 8192

`--capture N`: the wall time of capturing one window of N tokens for hasher training (the model
run over it, post-RoPE keys and 256 sampled queries kept, as `experiments/train.py` does),
first cold (compilation included, what a user waits) and then warm, with nothing read from the
capture cache.

Prints a table and writes JSON (with the machine it ran on). Each figure is the median of
`--repeats` timed runs after one compile-and-warm-up run. Prefill rows also give the process's
peak resident memory so far (`peak_rss_gb`): lengths run in the order given, so a length's own
peak is exact when it is the longest so far (or alone: `--prefill 32768 --decode ''`).

    python experiments/bench_model.py --model gemma3-270m --prefill 8192,32768 --decode ''
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dashkv_jax import DEFAULT_MODEL, data, load_model
from dashkv_jax.attention.full import FullAttention
from dashkv_jax.hashing import capture as capture_lib
from dashkv_jax.models.llama import Llama, prefill
from pallas_kernels.huge_pages import restart_with_huge_pages

FULL = FullAttention()


@nnx.jit(static_argnames="steps", donate_argnames="cache")
def decode_steps(model: Llama, token, cache, *, steps: int):
    """`steps` greedy decode steps in one compiled loop -> (last token, cache)."""

    def step(_, carry):
        token, cache = carry
        logits, cache = model.decode_step(token, cache, FULL)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, steps, step, (token, cache))


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _real_ids(tokenizer, length: int) -> jax.Array:
    docs = data.load_documents(split="heldout")
    window = next(data.iter_token_windows(docs, tokenizer, length, concatenate=True))
    return jnp.asarray(window[None], jnp.int32)


def bench_prefill(model, tokenizer, length: int, repeats: int) -> dict:
    ids = _real_ids(tokenizer, length)

    def run():
        return prefill(model, ids, model.init_cache(1, length, FULL), FULL)[0]

    seconds = _median_seconds(run, repeats)
    return {
        "phase": "prefill",
        "tokens": length,
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "peak_rss_gb": peak_rss_gb(),
    }


def capture_config(length: int) -> capture_lib.CaptureConfig:
    """One training window of `length` tokens, laid out as `experiments/train.py` captures."""
    return capture_lib.CaptureConfig(
        split="train", context=length, contexts=1, queries_per_context=256, min_position=0.1
    )


def bench_capture(model, tokenizer, length: int) -> dict:
    config = capture_config(length)
    seconds = []
    for _ in range(2):  # cold (compiles), then warm
        with tempfile.TemporaryDirectory() as empty:  # a fresh cache: nothing loaded from disk
            start = time.perf_counter()
            capture_lib.capture(model, tokenizer, config, cache_dir=empty, progress=False)
            seconds.append(time.perf_counter() - start)
    return {
        "phase": "capture",
        "tokens": length,
        "seconds": seconds[1],
        "cold_seconds": seconds[0],
        "tokens_per_s": length / seconds[1],
        "peak_rss_gb": peak_rss_gb(),
    }


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_decode(model, tokenizer, context: int, steps: int, repeats: int) -> dict:
    ids = _real_ids(tokenizer, context)
    logits, filled = prefill(model, ids, model.init_cache(1, context + steps, FULL), FULL)
    first = jnp.argmax(logits, -1).astype(jnp.int32)
    # Every run starts from a copy of the same prefilled cache (the loop donates its input).
    seconds = _median_seconds(
        lambda: decode_steps(model, first, jax.tree.map(jnp.copy, filled), steps=steps)[0],
        repeats,
    )
    return {
        "phase": "decode",
        "context": context,
        "steps": steps,
        "seconds": seconds,
        "ms_per_token": 1e3 * seconds / steps,
        "tokens_per_s": steps / seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or path")
    parser.add_argument("--prefill", default="512,2048,8192", help="prompt lengths to prefill")
    parser.add_argument("--decode", default="512,8192", help="contexts to decode at")
    parser.add_argument("--capture", default="", help="window lengths to capture, cold and warm")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_model.json"))
    args = parser.parse_args(argv)
    try:
        captures = [int(x) for x in args.capture.split(",") if x]
        for n in captures:  # a window too short for the layout fails before the model loads
            capture_config(n)
    except ValueError as error:  # DashKVError among them
        print(f"error: {error}", file=sys.stderr)
        return 2

    model, tokenizer = load_model(args.model)
    rows = []
    for n in (int(x) for x in args.prefill.split(",") if x):
        rows.append(bench_prefill(model, tokenizer, n, args.repeats))
        print(
            f"prefill {n:>6} tokens: {rows[-1]['tokens_per_s']:10.1f} tokens/s, peak resident "
            f"memory so far {rows[-1]['peak_rss_gb']:.2f} GiB",
            flush=True,
        )
    for n in (int(x) for x in args.decode.split(",") if x):
        rows.append(bench_decode(model, tokenizer, n, args.steps, args.repeats))
        print(f"decode at {n:>6}:     {rows[-1]['tokens_per_s']:10.1f} tokens/s", flush=True)

    for n in captures:
        rows.append(bench_capture(model, tokenizer, n))
        print(
            f"capture {n:>6} tokens: {rows[-1]['cold_seconds']:.1f} s cold, "
            f"{rows[-1]['seconds']:.1f} s warm, peak resident memory so far "
            f"{rows[-1]['peak_rss_gb']:.2f} GiB",
            flush=True,
        )

    print(f"\n{'phase':<8} {'tokens/context':>14} {'tokens/s':>10} {'ms/token':>9}")
    for r in rows:
        n = r.get("tokens", r.get("context"))
        ms = 1e3 / r["tokens_per_s"]
        print(f"{r['phase']:<8} {n:>14} {r['tokens_per_s']:>10.1f} {ms:>9.2f}")
    result = {
        "model": model.config.name,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        },
        "dtype": str(np.dtype(model.embed.dtype)),
        "repeats": args.repeats,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
