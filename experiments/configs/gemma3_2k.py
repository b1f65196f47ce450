"""A DASH-KV hasher for the bundled Gemma 3 270M: trained on windows of 2048 tokens, decoding to
its 32K context (short-train, long-infer, as the paper).

Gemma 3 has 3 global layers (the local ones keep their own sliding window and never see DASH-KV)
of 4 query heads sharing 1 KV head, head_dim 256: with one KV head there is no cross-head vote,
so consensus never fires; momentum, tier 2 and the residual train as for SmolLM2. Windows are
shifted along RoPE as for smollm2_2k. No layer is kept exact: the 3 global layers are all the
attention DASH-KV can save. Shipped as checkpoints/gemma3-270m (2 minutes on a 2-core CPU). The
forward KL (TrainConfig's default) was chosen on validation text at 8192 tokens, exact budget
256: Recall@100 / KL 0.405 / 0.308 against 0.358 / 0.373 with the paper's reverse KL (SimHash
0.092 / 0.468). Half the windows repeat spans of their own text (`copies=0.5`): trained on
natural text alone, the hasher missed the one key a copying head needs (the passkey's next
digit) and misread passkeys that full attention reads. Validation passkeys, 3 depths x 2 keys,
budget 1/32, digits teacher-forced (experiments/passkey_digits.py, results/issue16/validation/):
mean digit NLL at 4096 / 8192 tokens 1.751 / 1.323 without copies, 0.615 / 0.582 with half,
0.584 / 0.230 with every window (full attention 0.231 / 0.271, SimHash 2.166 / 2.178).
Natural-text Recall@100 / KL at 8192 (`dashkv recall`, budget 256): 0.405 / 0.308 without,
0.400 / 0.318 with half, 0.387 / 0.323 with all; half keeps most of both.
"""

import dataclasses

from dashkv_jax.hashing.capture import CaptureConfig

from . import smollm2_cpu

CONFIG = dataclasses.replace(
    smollm2_cpu.CONFIG,
    name="gemma3_2k",
    model="gemma3-270m",
    train_data=CaptureConfig(
        split="train",
        context=2048,
        contexts=32,
        queries_per_context=256,
        min_position=0.1,
        copies=0.5,
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
