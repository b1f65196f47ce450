"""A TPU v5p-64 slice (32 chips on 8 hosts): Llama-3.1-8B-Instruct at its full 128K context,
four sequences at once.

A mesh of 4 x 8 (batch x seq): each sequence's caches spread over 8 chips (16K slots each),
and the 4 sequences run side by side. Launch the same command on all 8 hosts:
    gcloud compute tpus tpu-vm ssh SLICE --worker=all \\
        --command "cd dashkv-jax && .venv/bin/python experiments/decode.py --config tpu_pod"
`jax.distributed.initialize()` finds the slice's hosts by itself. The bf16 cache takes 132 KiB
per token (see decode_gpu_host.py); the cap of 524288 slots (69 GB) fits a v5p chip's 95 GB of
HBM beside its weight shard.

Give it `text`, `model` and `hasher` as for decode_gpu_host.py, on every host (or on storage
they share).
"""

from dashkv_jax.attention.sharded import DecodeConfig

CONFIG = DecodeConfig(
    name="tpu_pod",
    model="checkpoints/Llama-3.1-8B-Instruct",
    attention="dashkv",
    budget="2048",  # tokens, not a fraction: the exact parts stay fixed as the context grows
    hasher="runs/llama31_8b/hasher",
    mesh="seq=8,batch=4",
    context=131072 - 64,
    steps=64,
    batch=4,
    max_slots_per_device=524288,
    dtype="bfloat16",
    text="data/long-books",
    split="all",
)
