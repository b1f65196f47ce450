"""Long-context decoding on a device mesh, the KV and code caches split along the sequence.

    python experiments/decode.py --mesh seq=8,batch=1 --context 4096 --steps 16
    python experiments/decode.py --config cpu8                # experiments/configs/decode_cpu8.py
    python experiments/decode.py --config cpu8 --mesh seq=1 --mesh seq=2 --mesh seq=4 \\
        --mesh seq=8 --max-slots-per-device none --json runs/decode_devices.json

Prefills `--context` tokens of real text (the held-out split of the bundled Wikipedia unless
`--text` names another corpus), then decodes `--steps` tokens greedily, timing every step
(step 0 includes compilation and is left out of the summary). Prints each step's latency and
a table with one row per `--mesh` (give several for a sweep), and writes JSON with the machine
it ran on.

Simulated devices: on a CPU, `--host-devices 8` (or the config's `host_devices`) makes XLA
expose 8 devices. They share the CPU's cores, so latency against device count there shows the
overheads of sharding, not its speed-up.

Several hosts (a TPU pod slice, GPU hosts): start the same command on every host. The job
calls `jax.distributed.initialize()` first: TPU pod slices, SLURM and Open MPI are detected
from their environment; otherwise set JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES
and JAX_PROCESS_ID on each host. Every process loads the model and text and places its own
shards; process 0 prints and writes the JSON. For example, on a TPU VM slice:

    gcloud compute tpus tpu-vm ssh SLICE --worker=all --command \\
        "cd dashkv-jax && .venv/bin/python experiments/decode.py --config tpu_pod"
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dashkv_jax import data, load_model  # noqa: E402
from dashkv_jax.attention.methods import make_attention, make_methods  # noqa: E402
from dashkv_jax.attention.sharded import (  # noqa: E402
    BATCH,
    SEQ,
    DecodeConfig,
    ShardedAttention,
    make_mesh,
    parse_mesh,
    place,
    shard_model,
)
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.models.llama import decode_step, prefill  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402

CONFIG_PREFIX = "decode_"
DEFAULT_CONFIG = "cpu8"
INT_FIELDS = ("context", "steps", "batch", "max_slots_per_device", "host_devices")


def config_names() -> list[str]:
    """Names of the configs in experiments/configs/decode_*.py."""
    return sorted(p.stem.removeprefix(CONFIG_PREFIX) for p in HERE.glob("configs/decode_*.py"))


def load_config(name: str) -> DecodeConfig:
    if name not in config_names():
        raise DashKVError(f"unknown decode config {name!r}; known: {', '.join(config_names())}")
    return importlib.import_module(f"configs.{CONFIG_PREFIX}{name}").CONFIG


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a decode_*.py config name")
    parser.add_argument(
        "--mesh", action="append", help="AXIS=SIZE,... over batch and seq; repeat for a sweep"
    )
    for field in dataclasses.fields(DecodeConfig):
        if field.name not in ("name", "mesh"):
            parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name)
    parser.add_argument("--json", type=Path, help="default: runs/decode_CONFIG.json")
    return parser.parse_args(argv)


def build_config(args) -> tuple[DecodeConfig, list[str]]:
    """The named config with the flags given applied, and the meshes to run."""
    config = load_config(args.config)
    changes = {}
    for field in dataclasses.fields(DecodeConfig):
        text = getattr(args, field.name, None)
        if text is None or field.name == "mesh":
            continue
        if field.name in INT_FIELDS:
            try:
                changes[field.name] = None if text.lower() == "none" else int(text)
            except ValueError:
                raise DashKVError(f"--{field.name.replace('_', '-')} wants an integer") from None
        else:
            changes[field.name] = None if field.name == "hasher" and text == "none" else text
    config = dataclasses.replace(config, **changes)
    meshes = args.mesh or [config.mesh]
    for mesh in meshes:
        parse_mesh(mesh)  # refuse a bad mesh before any work
    try:
        jnp.dtype(config.dtype)
    except TypeError:
        raise DashKVError(f"--dtype {config.dtype!r} is not a dtype (float32, bfloat16)") from None
    if config.context < 2 or config.steps < 2:
        raise DashKVError("--context and --steps must be at least 2 (step 0 compiles)")
    return config, meshes


def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when this is one process of several (see the docstring)."""
    env = os.environ
    if "JAX_NUM_PROCESSES" in env:  # set by hand
        jax.distributed.initialize(
            env.get("JAX_COORDINATOR_ADDRESS"),
            int(env["JAX_NUM_PROCESSES"]),
            int(env.get("JAX_PROCESS_ID", "0")),
        )
        return True
    detected = (
        "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if detected:
        jax.distributed.initialize()
    return detected


def simulate_cpu_devices(count: int | None) -> None:
    """Ask XLA for `count` CPU devices; only possible before JAX starts its backends."""
    if not count or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started already (e.g. under pytest): keep its devices
        pass


def real_text(tokenizer, config: DecodeConfig) -> np.ndarray:
    """`batch` consecutive windows of `context` tokens of real text -> int32 [batch, T]."""
    source = data.BUNDLED_CORPUS if config.text == "bundled" else config.text
    try:
        docs = data.load_documents(source, split=config.split)
    except (OSError, ValueError) as err:
        raise DashKVError(f"cannot read the text {config.text!r}: {err}") from None
    windows = data.iter_token_windows(docs, tokenizer, config.context, concatenate=True)
    rows = [row for _, row in zip(range(config.batch), windows, strict=False)]
    if len(rows) < config.batch:
        raise DashKVError(
            f"the {config.split} split of {config.text!r} has fewer than {config.batch} "
            f"windows of {config.context} tokens"
        )
    return np.stack(rows)


@jax.jit
def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def decode_on_mesh(model, tokenizer, ids: np.ndarray, config: DecodeConfig, mesh_text: str):
    """Prefill `ids` on one mesh and decode `config.steps` tokens, timing each -> a row."""
    mesh = make_mesh(mesh_text)
    seq = mesh.shape[SEQ]
    max_len = -(-(config.context + config.steps) // seq) * seq  # the slots split evenly
    if max_len > model.config.max_position:
        raise DashKVError(
            f"context {config.context} + {config.steps} steps (a cache of {max_len} slots) "
            f"exceeds the model's context of {model.config.max_position} tokens"
        )
    if config.attention == "full":
        inner = make_attention("full")
    else:
        (inner,) = make_methods(
            model, [config.attention], config.context, config.budget, config.tier2, config.hasher
        ).values()
    attention = ShardedAttention(inner, mesh, config.max_slots_per_device)
    per_device = attention.slots_per_device(config.batch, max_len)  # refuse before any work
    sharded = shard_model(model, mesh)
    prompt = place(ids, mesh, lambda path, x: jax.P(BATCH))

    start = time.perf_counter()
    cache = sharded.init_cache(config.batch, max_len, attention)
    logits, cache = prefill(sharded, prompt, cache, attention)
    token = jax.block_until_ready(greedy(logits))
    prefill_s = time.perf_counter() - start

    step_s, tokens = [], [token]
    for _ in range(config.steps):
        start = time.perf_counter()
        logits, cache = decode_step(sharded, token, cache, attention)
        token = jax.block_until_ready(greedy(logits))
        step_s.append(time.perf_counter() - start)
        tokens.append(token)
        if jax.process_index() == 0:
            print(
                f"  [{mesh_text}] step {len(step_s) - 1:>3}: {1e3 * step_s[-1]:9.1f} ms", flush=True
            )

    tokens = multihost_utils.process_allgather(jnp.stack(tokens, axis=1), tiled=True)
    timed = step_s[1:]  # step 0 compiled decode_step
    row = {
        "mesh": mesh_text,
        "devices": mesh.size,
        "seq": seq,
        "batch_devices": mesh.shape[BATCH],
        "context": config.context,
        "cache_slots": max_len,
        "slots_per_device": per_device,
        "cache_bytes_per_device": sum(
            x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(cache)
        ),
        "prefill_s_with_compile": prefill_s,
        "step_ms": [1e3 * s for s in step_s],
        "median_ms": 1e3 * statistics.median(timed),
        "min_ms": 1e3 * min(timed),
        "max_ms": 1e3 * max(timed),
        "tokens_per_s": config.batch / statistics.median(timed),
        "generated": [tokenizer.decode([int(t) for t in row]) for row in tokens],
    }
    if hasattr(cache, "usage"):  # tokens per KV head, DASH-KV's layers, last step
        usage = np.asarray(multihost_utils.process_allgather(cache.usage, tiled=True))
        layers = np.arange(usage.shape[0])
        sparse = usage[~np.asarray(inner.is_dense(layers, len(layers)))]
        row["exact_tokens"] = float(sparse[..., 0].mean())
        row["approx_tokens"] = float(sparse[..., 1].mean())
    return row


def run(config: DecodeConfig, meshes: list[str], model_and_tokenizer=None) -> dict:
    """Every mesh's row, with the config and the machine, as written to JSON."""
    model, tokenizer = model_and_tokenizer or load_model(config.model, jnp.dtype(config.dtype))
    ids = real_text(tokenizer, config)
    rows = [decode_on_mesh(model, tokenizer, ids, config, mesh) for mesh in meshes]
    return {
        "config": dataclasses.asdict(config),
        "model": model.config.name,
        "dtype": str(np.dtype(model.embed.dtype)),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "jax_backend": jax.default_backend(),
            "devices": len(jax.devices()),
            "device_kind": jax.devices()[0].device_kind,
            "processes": jax.process_count(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "jax": jax.__version__,
        },
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(
        f"\n{'mesh':<16} {'devices':>7} {'context':>8} {'slots/dev':>9} {'MiB/dev':>8} "
        f"{'prefill s':>9} {'median ms':>9} {'min ms':>8} {'tok/s':>7} {'exact+approx':>12}"
    )
    for r in result["rows"]:
        used = f"{r['exact_tokens']:.0f}+{r['approx_tokens']:.0f}" if "exact_tokens" in r else "all"
        attended = f"{used:>12}"
        print(
            f"{r['mesh']:<16} {r['devices']:>7} {r['context']:>8} {r['slots_per_device']:>9} "
            f"{r['cache_bytes_per_device'] / 2**20:>8.1f} {r['prefill_s_with_compile']:>9.2f} "
            f"{r['median_ms']:>9.1f} {r['min_ms']:>8.1f} {r['tokens_per_s']:>7.2f} {attended}"
        )


def main(argv=None, model_and_tokenizer=None) -> int:
    try:
        args = parse_args(argv)
        config, meshes = build_config(args)
        initialize_distributed()
        simulate_cpu_devices(config.host_devices)
        result = run(config, meshes, model_and_tokenizer)
    except DashKVError as err:
        print(f"decode: error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print_table(result)
        out = args.json or Path(f"runs/decode_{config.name}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
