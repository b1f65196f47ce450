"""The trained-hasher artifact: Orbax weights plus JSON metadata, and its validated loading.

Layout of an artifact folder:

    hasher.json   format, the `HasherConfig` (model id, layers, heads, head_dim, bits, kind,
                  scoring mode, widths) and free metadata (train config, held-out recall, ...)
    params/       the hasher's state (parameters and input statistics), Orbax StandardSave

`load_hasher(path, model)` refuses a hasher whose model id, layers, heads or head_dim differ
from the model's (or whose bits differ from `bits=`), naming every difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.encoders import Hasher, HasherConfig
from dashkv_jax.models.loaders import DEFAULT_MODEL

FORMAT = 1
METADATA_FILE = "hasher.json"
PARAMS_DIR = "params"
# The trained hashers of the bundled model, shipped in the repository (b = 128): DASH-KV's
# asymmetric one, the default, and the symmetric (Spotlight-style) baseline.
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_HASHER = CHECKPOINTS / DEFAULT_MODEL
DEFAULT_SYMMETRIC_HASHER = CHECKPOINTS / f"{DEFAULT_MODEL}-symmetric"


def default_hasher_path(model: str = DEFAULT_MODEL) -> Path:
    """The shipped hasher for a model name; only the bundled model has one."""
    if model != DEFAULT_MODEL:
        raise DashKVError(f"no shipped hasher for {model!r}: give --hasher PATH")
    return DEFAULT_HASHER


def short_error(err: BaseException) -> str:
    """The root cause's type and first line, without TensorStore's spec dump."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split("See full TensorStore details")[0].strip()
    first = (text.splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}"


def save_hasher(hasher: Hasher, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Writes the artifact folder (replacing one already there); returns its path."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, nnx.state(hasher), force=True)
    record = {
        "format": FORMAT,
        "config": dataclasses.asdict(hasher.config),
        **(metadata or {}),
    }
    (path / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The artifact's hasher.json as a dict; DashKVError when missing or unreadable."""
    path = Path(path).expanduser()
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise DashKVError(f"no hasher at {str(path)!r} (no {METADATA_FILE})")
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DashKVError(f"unreadable {str(meta_path)!r}: {err}") from err
    if record.get("format") != FORMAT or "config" not in record:
        raise DashKVError(
            f"{str(meta_path)!r} is not a format-{FORMAT} hasher (format {record.get('format')})"
        )
    return record


def mismatches(config: HasherConfig, model_config, *, bits: int | None = None) -> list[str]:
    """What differs between a hasher's config and a model (`ModelConfig`), as phrases."""
    found = []
    if config.model_id != model_config.name:
        found.append(f"model id {config.model_id!r} != {model_config.name!r}")
    for field, model_field in (
        ("num_layers", "num_layers"),
        ("num_heads", "num_heads"),
        ("num_kv_heads", "num_kv_heads"),
        ("head_dim", "head_dim"),
    ):
        ours, theirs = getattr(config, field), getattr(model_config, model_field)
        if ours != theirs:
            found.append(f"{field} {ours} != {theirs}")
    if bits is not None and config.bits != bits:
        found.append(f"bits {config.bits} != {bits}")
    return found


def load_hasher(
    path: str | os.PathLike,
    model=None,
    *,
    bits: int | None = None,
    check_model_id: bool = True,
) -> Hasher:
    """Loads an artifact folder, refusing one that does not fit `model` (a `Llama`).

    Args:
      path: the artifact folder (`save_hasher`).
      model: the model it must fit; None skips the check.
      bits: if given, the bits the hasher must have.
      check_model_id: compare the model id too (off: any model of the same shape).

    Raises:
      DashKVError: no or unreadable artifact, or a hasher that does not fit, naming every
        difference ("num_layers 30 != 32, head_dim 64 != 128").
    """
    path = Path(path).expanduser().absolute()
    record = read_metadata(path)
    try:
        config = HasherConfig(**record["config"])
    except TypeError as err:
        raise DashKVError(f"{str(path)!r} has a bad hasher config: {err}") from err
    if model is not None:
        found = mismatches(config, model.config, bits=bits)
        if not check_model_id:
            found = [f for f in found if not f.startswith("model id")]
        if found:
            raise DashKVError(
                f"the hasher at {str(path)!r} does not fit the model: {', '.join(found)}"
            )
    elif bits is not None and config.bits != bits:
        raise DashKVError(f"the hasher at {str(path)!r} has {config.bits} bits, not {bits}")
    abstract = nnx.eval_shape(lambda: Hasher(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    # On this process's first device: with several processes (jax.distributed), each restores
    # its own copy instead of Orbax assembling global arrays.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), abstract_state
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(path / PARAMS_DIR, abstract_state)
    except Exception as err:  # Orbax/TensorStore raise many types for damaged files
        raise DashKVError(
            f"cannot restore the hasher weights in {str(path)!r}: {short_error(err)}"
        ) from err
    return nnx.merge(graphdef, state)
