"""The demo: capture, train and evaluate a hasher for the bundled SmolLM2-135M-Instruct on a
2-core CPU in about 15 minutes (Wikipedia windows of 1024 tokens, a few hundred steps). The
shipped hasher is `smollm2_2k`'s."""

from dashkv_jax.hashing.capture import CaptureConfig
from dashkv_jax.hashing.retrieval import Budget
from dashkv_jax.hashing.training import RunConfig, TrainConfig
from dashkv_jax.models.loaders import DEFAULT_MODEL

CONFIG = RunConfig(
    name="smollm2_cpu",
    model=DEFAULT_MODEL,
    train_data=CaptureConfig(split="train", context=1024, contexts=16, queries_per_context=256),
    heldout_data=CaptureConfig(
        split="validation", context=1024, contexts=4, queries_per_context=128
    ),
    train=TrainConfig(
        bits=128,
        kind="asymmetric",
        query_hidden=(64, 64),
        positives=16,
        negatives=64,
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
    budget=Budget(tier1=1 / 16),
    out="runs/smollm2_cpu",
)
