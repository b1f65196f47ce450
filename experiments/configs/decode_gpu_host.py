"""One host with 8 GPUs (e.g. 8 x H100 80 GB): Llama-3.1-8B-Instruct at its full 128K context.

The caches split 8 ways along the sequence (16K slots per GPU); the weights split 8 ways too
(`dashkv_jax.attention.sharded.WEIGHT_SPECS`). Per token and layer the bf16 cache holds K and V
for 8 KV heads of 128 dims (4 KiB) plus 8 codes of 128 bits (128 B): 132 KiB per token over 32
layers.
The cap of 262144 slots (34 GB of cache) leaves an 80 GB GPU room for its weight shard,
activations and XLA's workspace.

Give it `text`, a folder of .txt files of 128K+ tokens, one document per file (e.g. books of
PG-19's test split); `model`, a local Hugging Face folder of meta-llama/Llama-3.1-8B-Instruct;
and `hasher`, a hasher trained for that model, e.g. by
    python experiments/train.py --config llama3_8b_pod --model PATH --out runs/llama31_8b
"""

from dashkv_jax.attention.sharded import DecodeConfig

CONFIG = DecodeConfig(
    name="gpu_host",
    model="checkpoints/Llama-3.1-8B-Instruct",
    attention="dashkv",
    budget="2048",  # tokens, not a fraction: the exact parts stay fixed as the context grows
    hasher="runs/llama31_8b/hasher",
    mesh="seq=8,batch=1",
    context=131072 - 64,
    steps=64,
    max_slots_per_device=262144,
    dtype="bfloat16",
    text="data/long-books",
    split="all",
)
