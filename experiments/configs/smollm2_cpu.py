"""The default: capture, train and evaluate the bundled SmolLM2-135M-Instruct's hasher on a
2-core CPU in <= 15 minutes (16 + 4 Wikipedia windows of 1024 tokens, a few hundred steps)."""

from dashkv_jax.hashing.capture import CaptureConfig
from dashkv_jax.hashing.retrieval import Budget
from dashkv_jax.hashing.training import RunConfig, TrainConfig
from dashkv_jax.models.loaders import DEFAULT_MODEL

CONFIG = RunConfig(
    name="smollm2_cpu",
    model=DEFAULT_MODEL,
    train_data=CaptureConfig(split="train", context=1024, contexts=16, queries_per_context=256),
    heldout_data=CaptureConfig(split="heldout", context=1024, contexts=4, queries_per_context=128),
    train=TrainConfig(
        bits=128,
        kind="asymmetric",
        key_hidden=0,
        query_width=16,
        query_depth=2,
        query_skip=True,
        positives=32,
        negatives=32,
        batch_size=16,
        steps=600,
        learning_rate=3e-3,
        warmup_steps=50,
        eval_every=200,
        checkpoint_every=100,
        keep_checkpoints=2,
        data_parallel=-1,
        layer_parallel=1,
    ),
    budget=Budget(budget=1 / 32, candidates=1 / 8),
    out="runs/smollm2_cpu",
)
