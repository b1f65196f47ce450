"""A DASH-KV hasher for the bundled Gemma 3 270M: trained on windows of 2048 tokens, decoding to
its 32K context (short-train, long-infer, as the paper).

Gemma 3 has 3 global layers (the local ones keep their own sliding window and never see DASH-KV)
of 4 query heads sharing 1 KV head, head_dim 256: with one KV head there is no cross-head vote,
so consensus never fires; momentum, tier 2 and the residual train as for SmolLM2. Windows are
shifted along RoPE as for smollm2_2k. No layer is kept exact: the 3 global layers are all the
attention DASH-KV can save. Shipped as checkpoints/gemma3-270m (6 minutes on a 2-core CPU). The
forward KL (TrainConfig's default) was chosen on validation text at 8192 tokens, exact budget
256: Recall@100 / KL 0.405 / 0.308 against 0.358 / 0.373 with the paper's reverse KL (SimHash
0.092 / 0.468).
"""

import dataclasses

from dashkv_jax.hashing.capture import CaptureConfig

from . import smollm2_cpu

CONFIG = dataclasses.replace(
    smollm2_cpu.CONFIG,
    name="gemma3_2k",
    model="gemma3-270m",
    train_data=CaptureConfig(
        split="train", context=2048, contexts=32, queries_per_context=256, min_position=0.1
    ),
    heldout_data=CaptureConfig(
        split="validation", context=2048, contexts=3, queries_per_context=128, min_position=0.1
    ),
    train=dataclasses.replace(
        smollm2_cpu.CONFIG.train,
        steps=1000,
        eval_every=500,
        dense_first=0,
        dense_last=0,
        max_shift=-1,  # windows anywhere in the 32K context along RoPE (see smollm2_2k)
    ),
    out="runs/gemma3_2k",
)
