"""Llama-3-8B on a TPU pod slice: 32 layers, 32 query / 8 KV heads, head_dim 128, 8K context.

A v5p-64 slice (32 chips, 8 hosts) as a ("data", "layer") mesh of 4 x 8: the 32 layers split 8
ways (4 per chip, keys and optimizer moments included), the query samples 4 ways. Launch the
same command on every host (`jax.distributed.initialize()` runs when the environment says
multi-host); each host loads the full capture (160 windows of 3072 tokens, the paper's training
length, ~100 GB in float32, cached on shared storage by the first run) and feeds its own
shards. Point `--model` at a local Hugging Face folder of meta-llama/Meta-Llama-3-8B.
"""

from dashkv_jax.hashing.capture import CaptureConfig
from dashkv_jax.hashing.retrieval import Budget
from dashkv_jax.hashing.training import RunConfig, TrainConfig

CONFIG = RunConfig(
    name="llama3_8b_pod",
    model="checkpoints/Meta-Llama-3-8B",
    train_data=CaptureConfig(
        split="train", context=3072, contexts=160, queries_per_context=512, min_position=0.1
    ),
    heldout_data=CaptureConfig(
        split="validation", context=3072, contexts=8, queries_per_context=256, min_position=0.1
    ),
    train=TrainConfig(
        bits=128,
        kind="asymmetric",
        query_hidden=(256, 256),
        positives=64,
        negatives=256,
        batch_size=256,
        steps=20_000,
        learning_rate=2e-3,
        warmup_steps=500,
        eval_every=2_000,
        eval_queries=64,
        checkpoint_every=1_000,
        keep_checkpoints=3,
        data_parallel=4,
        layer_parallel=8,
    ),
    budget=Budget(tier1=1 / 32),
    out="runs/llama3_8b_pod",
)
