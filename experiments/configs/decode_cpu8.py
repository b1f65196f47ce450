"""Eight simulated CPU devices: the bundled SmolLM2-135M-Instruct decoding 4096 tokens of
Wikipedia with DASH-KV, the caches split 8 ways along the sequence.

The per-device capacity of 1024 slots stands for an accelerator too small for the whole cache:
`--mesh seq=1` (unsharded) and `seq=2` are refused, `seq=4` and `seq=8` decode. The simulated
devices share the CPU's cores, so timings show sharding's overheads, not its speed-up.
"""

from dashkv_jax.attention.sharded import DecodeConfig

CONFIG = DecodeConfig(
    name="cpu8",
    attention="dashkv",
    budget="1/32",
    mesh="seq=8,batch=1",
    context=4096,
    steps=16,
    max_slots_per_device=1024,
    host_devices=8,
)
