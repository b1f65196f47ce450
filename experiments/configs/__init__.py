"""Named run configs for `experiments/train.py`: one module per config, each defining CONFIG."""

import importlib

from dashkv_jax.errors import DashKVError

NAMES = ("smollm2_cpu", "smollm2_2k", "gemma3_2k", "llama3_8b_pod")
DEFAULT = "smollm2_cpu"


def load(name: str = DEFAULT):
    """The `RunConfig` named `name`."""
    if name not in NAMES:
        raise DashKVError(f"unknown config {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").CONFIG
